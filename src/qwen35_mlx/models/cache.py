"""Per-layer caches for the hybrid stack: mlx-lm's cache classes, plus what the compiled decode
step needs to run over them with fixed shapes.

One cache per layer in `layer_types` order:
    linear_attention -> mlx-lm ArraysCache(size=2): [conv state [B, K-1, C] (last K-1 pre-conv
                        inputs), recurrent state [B, Hv, Dv, Dk] fp32]
    full_attention   -> mlx-lm KVCache (or BatchKVCache for a left-padded batch)
Batches follow mlx-lm's protocol: ArraysCache.left_padding / .lengths give the linear layers their
mask, BatchKVCache carries left padding and per-row offsets for the attention layers. Keeping
mlx-lm's own classes keeps its `save_prompt_cache` / `load_prompt_cache`, `BatchGenerator`
(merge, extend, filter, extract, prepare/finalize) and `maybe_quantize_kv_cache` (KVCache ->
QuantizedKVCache; the ArraysCache has no `to_quantized` and passes through unchanged) working.

Decode (one token a row) runs one compiled function over these caches (`TextModel`): mlx-lm's KV
caches already preallocate their buffers in blocks of `step` (256) positions; the step writes the
new key and value at an array index (`mx.slice_update`) and attends over the whole block with a
mask, so its shapes change only when `reserve` grows a buffer by a block. The Python-int
`offset` / `_idx` that mlx-lm reads are advanced after the step, as `update_and_fetch` would.

A VLM conversation's M-RoPE state lives on its first linear-attention cache (`MROPE_SHIFT`,
`MROPE_PROMPT`; KV quantization replaces the attention caches but keeps that one), not on the
model: two conversations on one model object do not mix. A VLM's first linear cache is an
`MRopeArraysCache`, an ArraysCache whose batch operations (filter, extend, merge, extract) carry
each row's shift along (0 for a row without one), so BatchGenerator's batches of conversations
with images keep their positions.

The recurrent state cannot be trimmed: `PromptCache` (prompt_cache.py) keeps references to the
linear states at prefix boundaries instead.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache, BatchKVCache, KVCache

__all__ = [
    "make_cache",
    "mrope_holder",
    "ArraysCache",
    "MRopeArraysCache",
    "KVCache",
    "BatchKVCache",
]

# Attribute names of the VLM's per-conversation M-RoPE state on a cache object (vlm.py):
# MROPE_SHIFT [B] int32: the next position of a row is (cache offset + shift); MROPE_PROMPT:
# (cache length at the prompt's start, positions [3, B, T]) of the last multimodal prompt.
MROPE_SHIFT = "mrope_shift"
MROPE_PROMPT = "mrope_prompt"


def mrope_holder(cache: list) -> Any:
    """The layer cache that holds the M-RoPE state: the first linear-attention cache (mlx-lm's
    `maybe_quantize_kv_cache` replaces every KVCache with a new object but keeps it), else the
    first attention cache; None when there is neither."""
    for c in cache:
        if isinstance(c, ArraysCache):
            return c
    for c in cache:
        if c is not None and hasattr(c, "offset"):
            return c
    return None


class MRopeArraysCache(ArraysCache):
    """mlx-lm's ArraysCache whose batch operations keep the per-row M-RoPE state of the rows
    they keep (`MROPE_SHIFT` [B]; `MROPE_PROMPT`'s positions [3, B, T] where the rows stay in
    place). Without any state it is ArraysCache. Named ArraysCache, so that mlx-lm's
    `save_prompt_cache` / `load_prompt_cache` (which look classes up by name in their module)
    read it back."""

    def filter(self, batch_indices) -> None:
        rows = np.array(batch_indices).reshape(-1)
        super().filter(batch_indices)
        if hasattr(self, MROPE_SHIFT):
            setattr(self, MROPE_SHIFT, np.asarray(getattr(self, MROPE_SHIFT))[rows])
        prompt = getattr(self, MROPE_PROMPT, None)
        if prompt is not None:
            setattr(self, MROPE_PROMPT, (prompt[0], prompt[1][:, mx.array(rows)]))

    def extend(self, other: ArraysCache) -> None:
        a, b = self.batch_size, other.batch_size
        has = hasattr(self, MROPE_SHIFT) or hasattr(other, MROPE_SHIFT)
        shift = np.concatenate([_row_shift(self, a), _row_shift(other, b)])
        super().extend(other)
        if has:
            setattr(self, MROPE_SHIFT, shift)
        if hasattr(self, MROPE_PROMPT):  # its rows and start no longer fit the batch
            delattr(self, MROPE_PROMPT)

    def extract(self, idx: int) -> MRopeArraysCache:
        out = MRopeArraysCache(len(self.cache))
        out.cache = [c[idx : idx + 1] for c in self.cache]
        if hasattr(self, MROPE_SHIFT):
            setattr(out, MROPE_SHIFT, np.asarray(getattr(self, MROPE_SHIFT))[idx : idx + 1])
        return out

    @classmethod
    def merge(cls, caches: list) -> MRopeArraysCache:
        out = super().merge(caches)
        if any(hasattr(c, MROPE_SHIFT) for c in caches):
            setattr(out, MROPE_SHIFT, np.concatenate([_row_shift(c, c.batch_size) for c in caches]))
        return out


MRopeArraysCache.__name__ = MRopeArraysCache.__qualname__ = "ArraysCache"
LINEAR_CACHES = (ArraysCache, MRopeArraysCache)  # the linear-attention cache kinds we make


def _row_shift(c: Any, batch: int) -> np.ndarray:
    """The M-RoPE shift of each of a cache's `batch` rows, 0 for rows without one."""
    shift = getattr(c, MROPE_SHIFT, None)
    return np.zeros(batch, np.int64) if shift is None else np.asarray(shift, np.int64)


def make_cache(
    layer_types: list[str], left_padding: list[int] | None = None, mrope: bool = False
) -> list:
    """One cache per layer, in layer_types order.

    left_padding: per-row pad counts of a left-padded batch; gives ArraysCache(left_padding) and
    BatchKVCache(left_padding) so that the masks and rotary positions count real tokens only.
    mrope: a VLM's cache; its first linear-attention cache (`mrope_holder`) is an
    MRopeArraysCache.
    """
    caches = []
    for t in layer_types:
        if t == "linear_attention":
            holder = mrope and not any(isinstance(c, ArraysCache) for c in caches)
            kind = MRopeArraysCache if holder else ArraysCache
            caches.append(kind(size=2, left_padding=left_padding))
        elif left_padding is not None:
            caches.append(BatchKVCache(left_padding))
        else:
            caches.append(KVCache())
    return caches


def kv_index(c: KVCache | BatchKVCache) -> int:
    """Where the next token's key goes in the buffer (pads included)."""
    return c._idx if isinstance(c, BatchKVCache) else c.offset


def reserve(c: KVCache | BatchKVCache) -> None:
    """Make room in the preallocated KV buffer for one more token, a block (`c.step`) at a time,
    as `update_and_fetch` would; a step traced for one buffer size replays until the next block."""
    idx = kv_index(c)
    if idx + 1 <= c.keys.shape[2]:
        return
    B, H, _, Dk = c.keys.shape
    keys, values = c.keys[..., :idx, :], c.values[..., :idx, :]
    c.keys = mx.concatenate([keys, mx.zeros((B, H, c.step, Dk), keys.dtype)], axis=2)
    Dv = values.shape[3]
    c.values = mx.concatenate([values, mx.zeros((B, H, c.step, Dv), values.dtype)], axis=2)


def advance(
    c: KVCache | BatchKVCache, keys: mx.array, values: mx.array, offset: mx.array | None = None
) -> None:
    """After a decode step wrote one token into (keys, values): adopt them, count the token.
    offset: a batch cache's per-row offsets after the token, when the step computed them."""
    c.keys, c.values = keys, values
    if isinstance(c, BatchKVCache):
        c._idx += 1
        c.offset = c.offset + 1 if offset is None else offset
    else:
        c.offset += 1


class StaticKV:
    """Inside the compiled step, an attention layer's cache: a whole preallocated buffer written
    at an array index. `offset` (scalar or [B]) is the rotary position of the new token."""

    def __init__(self, keys: mx.array, values: mx.array, idx: mx.array, offset: mx.array):
        self.keys, self.values, self.idx, self.offset = keys, values, idx, offset

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, k.astype(self.keys.dtype), self.idx, axes=(2,))
        self.values = mx.slice_update(self.values, v.astype(self.values.dtype), self.idx, axes=(2,))
        return self.keys, self.values


def static_mask(capacity: int, idx: mx.array, left_padding: mx.array | None) -> mx.array:
    """Keys a one-token query may see in a buffer of `capacity`: positions up to `idx` (the new
    token), and from each row's left padding on. [1 or B, 1, 1, capacity] bool."""
    pos = mx.arange(capacity)
    mask = pos <= idx
    if left_padding is not None:
        mask = mask & (pos[None] >= left_padding[:, None])
        return mask[:, None, None, :]
    return mask[None, None, None, :]


def reserve_kv(cache: list, n: int) -> None:
    """Grow every filled KVCache / BatchKVCache of `cache` so that `n` more positions fit.

    mlx-lm's caches grow by just what a step needs, so a prompt fed in steps copies the whole
    cache at every step, and the old and the new buffers are alive together: the peak holds the
    cache twice. A prefill that knows its length reserves once (after its first step, when the
    buffers' shapes are known) and its later steps write in place. Capacity is rounded up to
    the cache's `step` as mlx-lm does; the buffers are not evaluated here.
    """
    for c in cache:
        if type(c) not in (KVCache, BatchKVCache) or c.keys is None:
            continue
        idx = kv_index(c)
        cap = -(-(idx + n) // c.step) * c.step
        if cap <= c.keys.shape[2]:
            continue
        B, H, _, Dk = c.keys.shape
        Dv = c.values.shape[3]
        keys, values = c.keys[..., :idx, :], c.values[..., :idx, :]
        c.keys = mx.concatenate([keys, mx.zeros((B, H, cap - idx, Dk), keys.dtype)], axis=2)
        c.values = mx.concatenate([values, mx.zeros((B, H, cap - idx, Dv), values.dtype)], axis=2)
