"""float64 NumPy decode attention (the oracle of the attention kernel tests and
benchmarks/bench_attention_decode.py), and seeded inputs for it.

Query row (b, head h, token t) sees key j when j < n = start + T and: mask[b or 0, 0, t, j]
(mask given), j <= start + t (causal), or always. o = softmax(q . k_j * scale) v over those keys,
0 where none is visible (the kernel's choice: source.py); gate: o * sigmoid(gate).
"""

import mlx.core as mx
import numpy as np


def np64(x) -> np.ndarray:
    if isinstance(x, mx.array):
        x = x.astype(mx.float32)
    return np.asarray(x, dtype=np.float64)


def visible(B, T, C, start, mask=None, causal=False) -> np.ndarray:
    """[B, T, C] bool: which keys each query token sees."""
    n = start + T
    vis = np.broadcast_to(np.arange(C)[None, None] < n, (B, T, C)).copy()
    if causal:
        vis &= np.arange(C)[None, None] <= (start + np.arange(T))[None, :, None]
    if mask is not None:
        m = np.asarray(mask, dtype=bool)[:, 0, :, :C]  # [Bm, T, Cm]
        full = np.zeros((m.shape[0], T, C), bool)
        full[..., : m.shape[-1]] = m
        vis &= full
    return vis


def decode_attention_np(q, k, v, scale, start=None, mask=None, causal=False, gate=None, go=0):
    """q [B, Hq, T, D], k, v [B, Hkv, C, D]; gate [B, T, Hq, G] read at [go, go + D).
    Returns [B, T, Hq * D] float64."""
    q, k, v = np64(q), np64(k), np64(v)
    B, Hq, T, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    start = C - T if start is None else start
    vis = visible(B, T, C, start, mask, causal)
    rep = Hq // Hkv
    # Query heads grouped by kv head: [B, Hkv, rep * T, D] against [B, Hkv, C, D] (BLAS matmuls).
    qg = q.reshape(B, Hkv, rep * T, D)
    s = (qg @ k.transpose(0, 1, 3, 2)).reshape(B, Hq, T, C) * scale
    s = np.where(vis[:, None], s, -np.inf)
    mx_ = s.max(-1, keepdims=True)
    p = np.where(vis[:, None], np.exp(s - np.where(np.isfinite(mx_), mx_, 0)), 0.0)
    den = p.sum(-1, keepdims=True)
    o = (p.reshape(B, Hkv, rep * T, C) @ v).reshape(B, Hq, T, D) / np.where(den > 0, den, 1.0)
    o = o.transpose(0, 2, 1, 3)  # [B, T, Hq, D]
    if gate is not None:
        o = o * (1 / (1 + np.exp(-np64(gate)[..., go : go + D])))
    return o.reshape(B, T, Hq * D)


def make_attention_inputs(B, Hq, Hkv, T, C, D, *, dtype=mx.float32, gate=False, seed=0):
    """q, k, v ~ N(0, 1) (q scaled so scores spread over a few units), and the unsplit gated q
    projection [B, T, Hq, 2D] (gate at offset D) when `gate`."""
    kq, kk, kv, kg = mx.random.split(mx.random.key(seed), 4)
    q = (2.0 * mx.random.normal((B, Hq, T, D), key=kq)).astype(dtype)
    k = mx.random.normal((B, Hkv, C, D), key=kk).astype(dtype)
    v = mx.random.normal((B, Hkv, C, D), key=kv).astype(dtype)
    g = (2.0 * mx.random.normal((B, T, Hq, 2 * D), key=kg)).astype(dtype) if gate else None
    return q, k, v, g
