"""Qwen3.5 vision tower: patches -> ViT blocks with 2-D rotary -> 2x2 patch merger.

Input rows are flattened patches `[C, Tp, P, P]` (N rows for an image grid (t, h, w),
N = t*h*w), laid out in 2x2 merge-block order by the image processor. The tower adds
learned position embeddings resampled bilinearly (align_corners=True) from their square
grid to each image's grid, runs `depth` pre-LayerNorm blocks whose attention is
bidirectional within each frame of each image (per-frame segments, as transformers'
`cu_seqlens`), and merges every 4 consecutive rows into one output row of width
`out_hidden_size`: the tokens that replace the image-pad embeddings.

Shape letters: N patches, H heads, D head dim, M = N / merge^2 merged rows.
Reference: transformers `models/qwen3_5/modeling_qwen3_5.py` (Qwen3_5VisionModel) and
`vision_utils.py`. Parameter names match it after the `model.visual.` prefix; the patch
embedding weight is stored in MLX's Conv3d layout `[O, Tp, P, P, C]`.
"""

from __future__ import annotations

import itertools
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .layers import apply_rotate_half

_ACTIVATIONS = {
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_new": nn.gelu_approx,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
}


# The tower's rotary base: fixed, as in transformers (its vision config carries none).
_ROPE_THETA = 10000.0


def grid_list(grid_thw) -> list[tuple[int, int, int]]:
    """`grid_thw` (an `[n, 3]` array or nested list) as a list of int triples."""
    if isinstance(grid_thw, mx.array | np.ndarray):
        grid_thw = grid_thw.tolist()
    return [(int(t), int(h), int(w)) for t, h, w in grid_thw]


def patch_coords(grid, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every patch row, in 2x2 merge-block order, frames repeated: `[N]` each."""
    rows, cols = [], []
    for t, h, w in grid:
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        r = r.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        c = c.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        rows.append(np.tile(r, t))
        cols.append(np.tile(c, t))
    return np.concatenate(rows), np.concatenate(cols)


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int):
    """Bilinear taps (floor, floor + 1), clamped, and weights, align_corners=True."""
    # Same operation order as transformers, so exact-integer sources floor identically.
    src = index.astype(np.float32) * np.float32(side - 1)
    src = src / np.maximum(size - 1, 1).astype(np.float32)
    lo = np.floor(src)
    taps = np.clip(lo[:, None].astype(np.int64) + np.arange(2), 0, side - 1)
    weights = np.clip(1.0 - np.abs(src[:, None] - lo[:, None] - np.arange(2)), 0.0, None)
    return taps, weights.astype(np.float32)


def interpolation_taps(grid, merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather indices and weights `[N, 4]` that resample a `side x side` table to each grid."""
    rows, cols = patch_coords(grid, merge)
    heights = np.concatenate([np.full(t * h * w, h) for t, h, w in grid])
    widths = np.concatenate([np.full(t * h * w, w) for t, h, w in grid])
    h_taps, h_w = _axis_taps(rows, heights, side)
    w_taps, w_w = _axis_taps(cols, widths, side)
    idx = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    wts = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return idx, wts


def segment_lengths(grid) -> list[int]:
    """Attention segments: each frame of each image attends only within itself."""
    return [h * w for t, h, w in grid for _ in range(t)]


class VisionRotaryEmbedding(nn.Module):
    """Axial 2-D rotary: a quarter of the head dim per axis (h, then w), the pair repeated."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        spatial = head_dim // 2
        self._inv_freq = 1.0 / (theta ** (mx.arange(0, spatial, 2, dtype=mx.float32) / spatial))

    def __call__(self, rows: mx.array, cols: mx.array) -> tuple[mx.array, mx.array]:
        fh = rows.astype(mx.float32)[:, None] * self._inv_freq  # [N, D/4]
        fw = cols.astype(mx.float32)[:, None] * self._inv_freq
        freqs = mx.concatenate([fh, fw, fh, fw], axis=-1)  # [N, D]
        return mx.cos(freqs), mx.sin(freqs)


class VisionPatchEmbed(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.in_channels = config.in_channels
        self.temporal_patch_size = config.temporal_patch_size
        self.patch_size = config.patch_size
        k = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, k, stride=k, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        # A stride == kernel Conv3d over one patch is a matmul: flatten in the weight's layout.
        C, Tp, P = self.in_channels, self.temporal_patch_size, self.patch_size
        x = x.reshape(-1, C, Tp, P, P).transpose(0, 2, 3, 4, 1).reshape(-1, Tp * P * P * C)
        w = self.proj.weight  # [O, Tp, P, P, C]
        return x.astype(w.dtype) @ w.reshape(w.shape[0], -1).T + self.proj.bias


class VisionMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported vision hidden_act {config.hidden_act!r}")
        self.act_fn = _ACTIVATIONS[config.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))


class VisionAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array], segments: list[int]):
        N = x.shape[0]
        H, D = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(N, 3, H, D)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, H, D]
        cos, sin = rope[0][:, None, :], rope[1][:, None, :]
        q, k = apply_rotate_half(q, cos, sin), apply_rotate_half(k, cos, sin)
        q, k, v = (a.transpose(1, 0, 2) for a in (q, k, v))  # [H, N, D]
        # Runs of equal-length segments (an image, a video's frames) attend as one batch each:
        # cost sum(L^2), no [N, N] mask.
        outs, start = [], 0
        for L, group in itertools.groupby(segments):
            S = len(list(group))
            sl = slice(start, start + S * L)
            qs, ks, vs = (a[:, sl].reshape(H, S, L, D).transpose(1, 0, 2, 3) for a in (q, k, v))
            o = mx.fast.scaled_dot_product_attention(qs, ks, vs, scale=self.scale)
            outs.append(o.transpose(0, 2, 1, 3).reshape(S * L, H * D))
            start += S * L
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        return self.proj(out)


class VisionBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def __call__(self, x: mx.array, rope, segments: list[int]) -> mx.array:
        x = x + self.attn(self.norm1(x), rope, segments)
        return x + self.mlp(self.norm2(x))


class VisionPatchMerger(nn.Module):
    """LayerNorm per patch, then each 2x2 block (4 consecutive rows) -> fc1, erf GELU, fc2."""

    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size * config.spatial_merge_size**2
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.hidden_size, self.hidden_size, bias=True)
        self.linear_fc2 = nn.Linear(self.hidden_size, config.out_hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.norm(x).reshape(-1, self.hidden_size)
        return self.linear_fc2(nn.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    """`__call__(pixel_values [N, C*Tp*P*P], grid_thw [n, 3]) -> [M, out_hidden_size]`."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        self.num_grid_per_side = math.isqrt(config.num_position_embeddings)
        self.patch_embed = VisionPatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        head_dim = config.hidden_size // config.num_heads
        self.rotary_pos_emb = VisionRotaryEmbedding(head_dim, _ROPE_THETA)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.merger = VisionPatchMerger(config)

    def __call__(self, pixel_values: mx.array, grid_thw) -> mx.array:
        grid = grid_list(grid_thw)
        merge = self.spatial_merge_size
        n = sum(t * h * w for t, h, w in grid)
        if pixel_values.shape[0] != n:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows, grid_thw needs {n}")
        x = self.patch_embed(pixel_values)
        idx, wts = interpolation_taps(grid, merge, self.num_grid_per_side)
        pos = (self.pos_embed(mx.array(idx)) * mx.array(wts)[:, :, None]).sum(axis=1)
        x = x + pos.astype(x.dtype)
        rows, cols = patch_coords(grid, merge)
        rope = self.rotary_pos_emb(mx.array(rows), mx.array(cols))
        segments = segment_lengths(grid)
        for block in self.blocks:
            x = block(x, rope, segments)
        return self.merger(x)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Tower-relative HF weights -> ours: the Conv3d patch weight `[O, C, Tp, P, P]` becomes
        MLX's `[O, Tp, P, P, C]`. Idempotent (an MLX-layout weight already ends in C)."""
        C = self.config.in_channels
        out = {}
        for k, v in weights.items():
            if k == "patch_embed.proj.weight" and v.ndim == 5 and v.shape[-1] != C:
                v = v.transpose(0, 2, 3, 4, 1)
            out[k] = v
        return out
