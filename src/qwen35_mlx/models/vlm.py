"""Qwen3.5 vision-language model (model_type qwen3_5 / qwen3_5_moe): the text model of
`models.text` (imported, never copied) plus the vision tower of `models.vision`.

On the call that carries `pixel_values` (or `pixel_values_videos`), the tower's merged rows
replace the image-pad (video-pad) token embeddings in order, and M-RoPE positions [3, B, T]
(t, h, w) are computed as transformers' `get_rope_index` does: text counts up; an image with
merged grid (t, H, W) takes `cur + t_idx`, `cur + row`, `cur + col`; after it `cur` advances by
max(H, W); with left padding only real tokens count. The per-row `rope_delta = max_pos + 1 -
n_real` is kept, so later calls (decode steps, no pixels) continue at real-token offset + delta.
Text-only prompts use the text model's plain positions.

That per-conversation state lives in the conversation's cache (on its first linear-attention
layer's cache, which KV quantization keeps: `cache.MROPE_SHIFT` / `cache.MROPE_PROMPT`), never on
the model: one model object serves interleaved conversations (a server) and each continues
from its own cache. The one thing kept on the model is what mlx-lm's `embed_inputs` hook
returns no cache for: the positions of the embeddings it just made, bound to the cache of the
first call fed embeddings after it.

Shape letters: B batch, T tokens, N patch rows, M merged rows.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import (
    MROPE_PROMPT,
    MROPE_SHIFT,
    ArraysCache,
    BatchKVCache,
    make_cache,
    mrope_holder,
)
from .config import ModelConfig
from .text import VISION_PREFIXES, TextModel
from .vision import VisionModel, grid_list


def rope_index(
    input_ids: np.ndarray,
    image_grid_thw=None,
    video_grid_thw=None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions `[3, B, T]` (0 at padding) and per-row `rope_delta` `[B]`.

    Grids are consumed in order across the batch (images and videos separately); a video grid
    (t, h, w) counts as t frames of grid (1, h, w), each wrapped in its own vision start/end.
    """
    input_ids = np.asarray(input_ids)
    B, T = input_ids.shape
    mask = np.ones((B, T), dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    images = iter(grid_list(image_grid_thw) if image_grid_thw is not None else [])
    videos = grid_list(video_grid_thw) if video_grid_thw is not None else []
    frames = [(1, h, w) for t, h, w in videos for _ in range(t)]
    videos = iter(frames)
    m = spatial_merge_size
    positions = np.zeros((3, B, T), dtype=np.int64)
    deltas = np.zeros(B, dtype=np.int64)
    for b in range(B):
        ids = input_ids[b][mask[b]]
        pos = np.zeros((3, len(ids)), dtype=np.int64)
        is_vision = (ids == image_token_id) | (ids == video_token_id)
        cur, i = 0, 0
        while i < len(ids):
            tok = ids[i]
            if tok == image_token_id or tok == video_token_id:
                kind = "image" if tok == image_token_id else "video"
                grid = next(images if tok == image_token_id else videos, None)
                if grid is None:
                    raise ValueError(f"more {kind} tokens in input_ids than {kind} grids given")
                t, h, w = grid[0], grid[1] // m, grid[2] // m
                n = t * h * w
                if i + n > len(ids) or (ids[i : i + n] != tok).any():
                    raise ValueError(f"row {b}: a {kind} of grid {grid} needs {n} pad tokens")
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
                pos[:, i : i + n] = np.stack([tt, hh, ww]).reshape(3, -1) + cur
                cur += max(h, w)
                i += n
            else:
                nxt = np.flatnonzero(is_vision[i:])
                j = i + int(nxt[0]) if len(nxt) else len(ids)
                pos[:, i:j] = cur + np.arange(j - i)
                cur += j - i
                i = j
        positions[:, b, mask[b]] = pos
        deltas[b] = (pos.max() + 1 if len(ids) else 0) - len(ids)
    return positions, deltas


def _scatter_rows(embeds: mx.array, is_slot: np.ndarray, feats: mx.array, what: str) -> mx.array:
    """Replace embeds[b, t] where is_slot[b, t], in row-major order, by the rows of feats."""
    B, T, H = embeds.shape
    slots = np.flatnonzero(is_slot.reshape(-1))
    if len(slots) != feats.shape[0]:
        raise ValueError(
            f"{what}: {len(slots)} pad tokens in input_ids but {feats.shape[0]} vision rows"
        )
    src = np.arange(B * T)
    src[slots] = B * T + np.arange(len(slots))
    flat = mx.concatenate([embeds.reshape(B * T, H), feats.astype(embeds.dtype)])
    return flat[mx.array(src)].reshape(B, T, H)


class Model(nn.Module):
    text_model = TextModel  # the language model's class (a host plugin may subclass it)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.args = config
        self.model_type = config.model_type
        self.language_model = self.text_model(config.text_config)
        if config.vision_config is not None:
            self.vision_tower = VisionModel(config.vision_config)
        # Local (positions, deltas) from `embed_inputs`, bound to the cache of the next call fed
        # embeddings (mlx-lm calls the hook without a cache).
        self._pending: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def visual(self) -> VisionModel:
        return self.vision_tower

    @property
    def model(self) -> nn.Module:
        """The language model's backbone (embed_tokens, layers, norm, `pipeline`), where mlx-lm
        looks for it (`Model.model`)."""
        return self.language_model.model

    @property
    def layers(self) -> list:
        return self.language_model.layers

    def shard(self, group=None) -> None:
        """Tensor parallel over the language model (see `models.shard`); the vision tower is
        small and stays whole on every rank."""
        self.language_model.shard(group)

    def make_cache(self, left_padding: list[int] | None = None) -> list:
        types = [layer.layer_type for layer in self.layers]
        return make_cache(types, left_padding=left_padding, mrope=True)

    def _features(self, pixel_values: mx.array, grid) -> mx.array:
        if "vision_tower" not in self:
            raise ValueError("this checkpoint has no vision tower: it takes no images")
        dtype = self.vision_tower.patch_embed.proj.weight.dtype
        return self.vision_tower(pixel_values.astype(dtype), grid)

    def get_input_embeddings(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        image_grid_thw=None,
        pixel_values_videos: mx.array | None = None,
        video_grid_thw=None,
        mask: mx.array | np.ndarray | None = None,
        cache: list | None = None,
    ) -> tuple[mx.array, mx.array | None]:
        """Embeddings with vision rows scattered in, and M-RoPE positions `[3, B, T]` (None:
        plain positions will do).

        Records the per-row rope deltas that later calls continue from. With a filled `cache`
        (a later turn bringing a new image) positions continue from the cache. Callers that
        prefill in steps call this once and feed slices through `__call__`.
        """
        B, T = input_ids.shape
        if pixel_values is None and pixel_values_videos is None:
            embeds = self.language_model.model.embed_tokens(input_ids)
            return embeds, self._decode_positions(cache, B, T)
        if mask is None and _fresh(_attention_cache(cache)):
            mask = _mask_from_cache(cache, (B, T))
        real = None if mask is None else np.array(mask).astype(bool)
        embeds, local = self._embed(
            input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, real
        )
        return embeds, self._bind(cache, local, real)

    def embed_inputs(self, inputs: mx.array, *, pixel_values=None) -> mx.array:
        """mlx-lm's multimodal hook: `inputs` [T] -> embeddings [T, H] for `generate_step`.

        `pixel_values`: a list with one `[t, h, w, C*Tp*P*P]` array per image (the grid is the
        shape; `Processor.mlx_lm_inputs` makes them). The M-RoPE positions are bound to the cache
        on the first call fed these embeddings, so a prompt-cache prefix is honoured.
        """
        ids = inputs.reshape(1, -1)
        if pixel_values is None or len(pixel_values) == 0:
            return self.language_model.model.embed_tokens(ids)[0]
        grid = [tuple(p.shape[:3]) for p in pixel_values]
        rows = mx.concatenate([p.reshape(-1, p.shape[-1]) for p in pixel_values])
        embeds, local = self._embed(ids, rows, grid, None, None, None)
        self._pending = local
        return embeds[0]

    def _embed(self, input_ids, pixel_values, image_grid, pixel_values_videos, video_grid, real):
        """Scatter vision rows into the embeddings; local M-RoPE positions and deltas."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        ids = np.array(input_ids)
        if pixel_values is not None:
            feats = self._features(pixel_values, image_grid)
            embeds = _scatter_rows(embeds, ids == self.config.image_token_id, feats, "images")
        if pixel_values_videos is not None:
            feats = self._features(pixel_values_videos, video_grid)
            embeds = _scatter_rows(embeds, ids == self.config.video_token_id, feats, "videos")
        local = rope_index(
            ids,
            image_grid if pixel_values is not None else None,
            video_grid if pixel_values_videos is not None else None,
            image_token_id=self.config.image_token_id,
            video_token_id=self.config.video_token_id,
            spatial_merge_size=self.config.vision_config.spatial_merge_size,
            mask=real,
        )
        return embeds, local

    def _bind(self, cache, local, real) -> mx.array:
        """Place a prompt's local positions after what the cache holds; record in the cache the
        per-row shift from its offset to the next position."""
        positions, deltas = local
        B = positions.shape[1]
        c = _attention_cache(cache)
        if _fresh(c):  # a fresh prompt: it may be left-padded
            start = np.zeros(B, np.int64)
            pads = np.zeros(B, np.int64) if real is None else (~real).sum(1)
            # A plain cache's offset counts pads; a batch cache's per-row offsets do not.
            shift = deltas - (0 if c is None or isinstance(c, BatchKVCache) else pads)
        else:
            old = _shift(cache, B)
            old = np.zeros(B, np.int64) if old is None else old
            start = _offsets(c) + old
            shift = old + deltas
        positions = mx.array((positions + start[None, :, None]).astype(np.int32))
        if c is not None:
            s = _state_cache(cache)
            setattr(s, MROPE_SHIFT, shift)
            # Kept so that a prefill fed in slices of the embeddings finds its positions.
            setattr(s, MROPE_PROMPT, (_cache_len(cache), positions))
        self._pending = None
        return positions

    def _decode_positions(
        self, cache: list | None, B: int, T: int, embedded: bool = False
    ) -> mx.array | None:
        """Positions for a call without pixels: a slice of the last multimodal prompt's positions
        (a step of its prefill, fed as embeddings), offset + the cache's shift, or None (plain)."""
        if embedded and self._pending is not None:
            self._bind(cache, self._pending, None)
        c = _attention_cache(cache)
        if c is None:
            return None
        # The bound prompt's positions first: its first step meets a fresh cache too.
        prompt = getattr(_state_cache(cache), MROPE_PROMPT, None)
        if embedded and prompt is not None:
            start, positions = prompt
            o = _seen(c)
            if start <= o and o + T <= start + positions.shape[-1] and positions.shape[1] == B:
                return positions[..., o - start : o - start + T]
        if _seen(c) == 0:
            return None  # a fresh cache: plain positions (an image prompt binds its own)
        shift = _shift(cache, B)
        if shift is None:
            return None
        # As arrays: a batch cache's offsets stay lazy (no sync in the decode loop).
        if isinstance(c.offset, int):
            base = mx.array((c.offset + shift).astype(np.int32))
        else:
            base = c.offset.astype(mx.int32) + mx.array(shift.astype(np.int32))
        base = base[:, None] + mx.arange(T, dtype=mx.int32)[None]
        return mx.broadcast_to(base[None], (3, B, T))

    def __call__(
        self,
        input_ids: mx.array,
        cache: list | None = None,
        pixel_values: mx.array | None = None,
        image_grid_thw=None,
        pixel_values_videos: mx.array | None = None,
        video_grid_thw=None,
        mask: mx.array | np.ndarray | None = None,
        input_embeddings: mx.array | None = None,
        position_ids: mx.array | None = None,
        attention_mask: mx.array | np.ndarray | None = None,
        return_hidden: bool = False,
    ) -> mx.array | tuple[mx.array, mx.array]:
        """logits [B, T, vocab] (with `return_hidden`: and the normed hidden states [B, T, H]).

        `mask` (or `attention_mask`, the processor's name) [B, T]: 1 real, 0 left pad. Without a
        cache a padded batch gets a fresh left-padded one, so pads are masked. Prefilling in
        steps: `get_input_embeddings` once, then slices as `input_embeddings` (positions follow).
        """
        mask = attention_mask if mask is None else mask
        if cache is None and mask is not None:
            real = np.array(mask)
            if not real.all():
                cache = self.make_cache(left_padding=(real == 0).sum(1).tolist())
        if pixel_values is not None or pixel_values_videos is not None:
            input_embeddings, position_ids = self.get_input_embeddings(
                input_ids,
                pixel_values,
                image_grid_thw,
                pixel_values_videos,
                video_grid_thw,
                mask=mask,
                cache=cache,
            )
        elif position_ids is None:
            B, T = input_ids.shape if input_embeddings is None else input_embeddings.shape[:2]
            position_ids = self._decode_positions(cache, B, T, input_embeddings is not None)
        return self.language_model(
            input_ids,
            cache,
            input_embeddings=input_embeddings,
            position_ids=position_ids,
            return_hidden=return_hidden,
        )

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF keys (`model.language_model.*`, `model.visual.*`, `lm_head.*`, `mtp.*`) -> ours
        (`language_model.*`, `vision_tower.*`); the text part, `mtp.*` included (kept when the text
        model has an MTP head, else dropped),
        goes through the text sanitize.
        Idempotent. Pass all of a checkpoint's weights at once: without any vision weight the
        tower is removed from the model."""
        vision, text = {}, {}
        for k, v in weights.items():
            prefix = next((p for p in VISION_PREFIXES if k.startswith(p)), None)
            if prefix is not None:
                vision[k[len(prefix) :]] = v
            else:
                text[k] = v
        out = {f"language_model.{k}": v for k, v in self.language_model.sanitize(text).items()}
        if not vision and "vision_tower" in self:
            # A text-only conversion that kept vision_config (mlx-lm writes these): load it as
            # the language model alone; images then raise a clear error.
            self.pop("vision_tower")
        if vision and "vision_tower" in self:
            out.update(
                {f"vision_tower.{k}": v for k, v in self.vision_tower.sanitize(vision).items()}
            )
        return out

    @property
    def cast_predicate(self):
        return self.language_model.cast_predicate

    @property
    def quant_predicate(self):
        # The tower is small and its widths need not divide a group size: leave it unquantized.
        text_predicate = self.language_model.quant_predicate

        def predicate(path: str, module: nn.Module):
            if path.startswith("vision_tower"):
                return False
            return True if text_predicate is None else text_predicate(path, module)

        return predicate


def _attention_cache(cache: list | None) -> Any:
    """The first attention-layer cache (any mlx-lm KV cache kind: plain, quantized, batch)."""
    for c in cache or ():
        if c is not None and not isinstance(c, ArraysCache) and hasattr(c, "offset"):
            return c
    return None


def _state_cache(cache: list) -> Any:
    """The cache object that holds the M-RoPE state: the first linear-attention cache, which
    mlx-lm's `maybe_quantize_kv_cache` keeps (it replaces every KVCache with a new object),
    else the first attention cache."""
    return mrope_holder(cache)


def _shift(cache: list, B: int) -> np.ndarray | None:
    """The cache's per-row M-RoPE shift [B], or None (plain positions). The cache's batch
    operations keep one entry per row (`cache.LinearCache`); a count that differs from the rows
    fed is refused rather than guessed."""
    shift = getattr(_state_cache(cache), MROPE_SHIFT, None)
    if shift is not None and len(shift) != B:
        raise ValueError(f"the cache holds M-RoPE positions for {len(shift)} rows, not {B}")
    return shift


def _seen(c: Any) -> int:
    """Tokens (pads included) an attention cache has seen. Its offset is an int (plain caches)
    or per-row [B] real-token counts (batch caches, whose `_idx` counts pads too)."""
    if isinstance(c.offset, int):
        return c.offset
    return c._idx


def _offsets(c: Any) -> np.ndarray:
    """The cache's offset per row, as it stands (pads included for a plain cache)."""
    if isinstance(c.offset, int):
        return np.full(1, c.offset, np.int64)
    return np.array(c.offset).reshape(-1).astype(np.int64)


def _fresh(c: Any) -> bool:
    """No attention cache, or one that has seen nothing yet."""
    return c is None or _seen(c) == 0


def _cache_len(cache: list | None) -> int:
    """Tokens (pads included) the cache has seen; 0 when fresh or absent."""
    c = _attention_cache(cache)
    return 0 if c is None else _seen(c)


def _mask_from_cache(cache: list | None, shape: tuple[int, int]) -> np.ndarray | None:
    """A [B, T] real-token mask from a left-padded batch cache, if the cache carries one."""
    if cache is None:
        return None
    for c in cache:
        pad = getattr(c, "left_padding", None)
        if pad is not None:
            pad = np.array(pad).reshape(-1)
            return np.arange(shape[1])[None, :] >= pad[:, None]
    return None
