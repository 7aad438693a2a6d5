"""Per-layer caches for the hybrid stack, built on mlx-lm's cache classes.

One cache per layer in `layer_types` order:
    linear_attention -> mlx-lm ArraysCache(size=2): [conv state [B, K-1, C] (last K-1 pre-conv
                        inputs), recurrent state [B, Hv, Dv, Dk] fp32]
    full_attention   -> mlx-lm KVCache (or BatchKVCache for a left-padded batch)
Batches follow mlx-lm's protocol: ArraysCache.left_padding / .lengths give the linear layers their
mask, BatchKVCache carries left padding and per-row offsets for the attention layers.

The recurrent state cannot be trimmed: `PromptCache` (prompt_cache.py) keeps references to the
linear states at prefix boundaries instead. `copy_cache` is an independent copy of a whole
cache, for apps that branch a conversation.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, BatchKVCache, KVCache

__all__ = ["make_cache", "copy_cache", "ArraysCache", "KVCache", "BatchKVCache"]


def _layer_types(model_or_types: Any) -> list[str]:
    if isinstance(model_or_types, (list, tuple)):
        return list(model_or_types)
    for attr in ("config", "args"):
        cfg = getattr(model_or_types, attr, None)
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            return list(types)
        text = getattr(cfg, "text_config", None)
        if getattr(text, "layer_types", None) is not None:
            return list(text.layer_types)
    return [
        "linear_attention" if layer.is_linear else "full_attention"
        for layer in model_or_types.layers
    ]


def make_cache(model_or_types: Any, left_padding: list[int] | None = None) -> list:
    """One cache per layer, in layer_types order.

    model_or_types: a model (with .config / .args carrying layer_types, or .layers with
    is_linear) or the layer_types list itself. left_padding: per-row pad counts of a left-padded
    batch; gives ArraysCache(left_padding) and BatchKVCache(left_padding) so that the masks and
    rotary positions count real tokens only.
    """
    caches = []
    for t in _layer_types(model_or_types):
        if t == "linear_attention":
            caches.append(ArraysCache(size=2, left_padding=left_padding))
        elif left_padding is not None:
            caches.append(BatchKVCache(left_padding))
        else:
            caches.append(KVCache())
    return caches


def _copy_layer_cache(c: Any) -> Any:
    if isinstance(c, ArraysCache):
        new = ArraysCache(size=len(c.cache))
        new.cache = list(c.cache)
        new.left_padding = c.left_padding
        new.lengths = c.lengths
        return new
    if isinstance(c, KVCache):
        new = KVCache()
        if c.keys is not None:
            # Slices are new arrays: later in-place writes into c.keys do not reach them.
            new.keys = mx.contiguous(c.keys[..., : c.offset, :])
            new.values = mx.contiguous(c.values[..., : c.offset, :])
            new.offset = c.offset
        return new
    if isinstance(c, BatchKVCache):
        new = BatchKVCache([0] * int(c.left_padding.shape[0]))
        if c.keys is not None:
            new.keys = mx.contiguous(c.keys[..., : c._idx, :])
            new.values = mx.contiguous(c.values[..., : c._idx, :])
        new.offset = c.offset
        new.left_padding = c.left_padding
        new._idx = c._idx
        return new
    raise TypeError(f"copy_cache: unsupported cache type {type(c).__name__}")


def copy_cache(cache: list) -> list:
    """An independent copy of every layer's cache (snapshot at a prefix boundary).

    Feeding more tokens through either copy leaves the other unchanged; restoring a snapshot is
    copying it again.
    """
    return [_copy_layer_cache(c) for c in cache]
