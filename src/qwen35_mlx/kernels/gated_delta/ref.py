"""Gated delta rule, token by token in plain mx ops: the oracle and the fallback.

Per step t, for every value head h (key head h // (Hv // Hk)):
    S *= g_t;  delta = (v_t - S k_t) * beta_t;  S += delta k_t^T;  y_t = S q_t

Shapes: q, k [B, T, Hk, Dk]; v, y [B, T, Hv, Dv]; g [B, T, Hv] or [B, T, Hv, Dk];
beta [B, T, Hv]; state [B, Hv, Dv, Dk], fp32; mask [B, T] bool (False = padding:
the step leaves the state unchanged and writes y = 0). Everything is computed in fp32;
y is returned in v's dtype. Differentiable (plain ops only).
"""

from __future__ import annotations

import mlx.core as mx


def _repeat_heads(x: mx.array, rep: int) -> mx.array:
    # [B, T, Hk, Dk] -> [B, T, Hv, Dk]; value head h reads key head h // rep.
    return x if rep == 1 else mx.repeat(x, rep, axis=2)


def gated_delta_ref(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Token-by-token recurrence. `state` is [B, Hv, Dv, Dk] fp32; returns (y, new state)."""
    T = q.shape[1]
    Hv = v.shape[2]
    rep = Hv // q.shape[2]
    f32 = mx.float32
    out_dtype = v.dtype
    q = _repeat_heads(q.astype(f32), rep)
    k = _repeat_heads(k.astype(f32), rep)
    v = v.astype(f32)
    g = g.astype(f32)
    beta = beta.astype(f32)
    per_key = g.ndim == 4
    S = state.astype(f32)
    ys = []
    for t in range(T):
        decay = g[:, t, :, None, :] if per_key else g[:, t, :, None, None]  # [B, Hv, 1, Dk|1]
        k_t = k[:, t]  # [B, Hv, Dk]
        S_t = S * decay
        kv = (S_t @ k_t[..., None])[..., 0]  # [B, Hv, Dv]
        delta = (v[:, t] - kv) * beta[:, t, :, None]
        S_t = S_t + delta[..., None] * k_t[:, :, None, :]
        y_t = (S_t @ q[:, t, :, :, None])[..., 0]  # [B, Hv, Dv]
        if mask is not None:
            m = mask[:, t]
            S_t = mx.where(m[:, None, None, None], S_t, S)
            y_t = mx.where(m[:, None, None], y_t, 0.0)
        S = S_t
        ys.append(y_t)
    y = mx.stack(ys, axis=1) if ys else mx.zeros(v.shape, f32)
    return y.astype(out_dtype), S
