"""Gated delta rule, token by token in plain mx ops: the oracle and the fallback.

Per step t, for every value head h (key head h // (Hv // Hk)):
    S *= g_t;  delta = (v_t - S k_t) * beta_t;  S += delta k_t^T;  y_t = S q_t

Shapes: q, k [B, T, Hk, Dk]; v, y [B, T, Hv, Dv]; g [B, T, Hv] or [B, T, Hv, Dk];
beta [B, T, Hv]; state [B, Hv, Dv, Dk], fp32; mask [B, T] bool (False = padding:
the step leaves the state unchanged and writes y = 0). Everything is computed in fp32;
y is returned in v's dtype. Differentiable (plain ops only).

Each step is one compiled function written to touch the state as few times as possible (this is
the CPU decode path): one batched matmul reads S once for both S k and S q, and one fused
elementwise pass writes g S + delta k^T. Since y_t = (g S) q + delta (k . q), the updated state
is never read back.
"""

from __future__ import annotations

import mlx.core as mx


def _step(q, k, v, g, beta, S, m):
    """One step. q, k [B, Hk, Dk]; v [B, Hv, Dv]; g [B, Hv] or [B, Hv, Dk]; beta [B, Hv];
    S [B, Hv, Dv, Dk] fp32; m [B] bool or None. Returns (y [B, Hv, Dv] in v's dtype, S)."""
    f32 = mx.float32
    out_dtype = v.dtype
    B, Hk, Dk = q.shape
    Hv, Dv = v.shape[1:]
    R = Hv // Hk
    N = B * Hv
    # Flat [B*Hv, ...] operands: MLX's fused CPU kernels and batched matmuls run fastest on
    # plain 3-D layouts. Repeating q/k over the R value heads copies only [B, Hv, Dk].
    q = mx.repeat(q.astype(f32), R, axis=1).reshape(N, Dk)
    k = mx.repeat(k.astype(f32), R, axis=1).reshape(N, Dk)
    v = v.astype(f32).reshape(N, Dv, 1)
    beta = beta.astype(f32).reshape(N, 1, 1)
    S3 = S.reshape(N, Dv, Dk)
    # S @ [k, q]: one batched matmul reads S once for both products. (The transposed form
    # [k; q] @ S^T runs the same dot products in the reference BLAS and is bit-identical, but
    # OpenBLAS runs this form 6-14% faster for the whole step: benchmarks/NOTES.md.)
    kq = mx.stack([k, q], axis=1)  # [N, 2, Dk]
    if g.ndim == 3:
        # Per-key decay scales the state's columns: fold it into k and q before the matmul.
        g3 = g.astype(f32).reshape(N, 1, Dk)
        SKQ = S3 @ mx.swapaxes(kq * g3, -1, -2)  # [N, Dv, 2] = S diag(g) [k, q]
    else:
        g3 = g.astype(f32).reshape(N, 1, 1)
        SKQ = g3 * (S3 @ mx.swapaxes(kq, -1, -2))
    delta = (v - SKQ[..., :1]) * beta  # [N, Dv, 1]
    kdotq = (k * q).sum(-1)[:, None, None]  # [N, 1, 1]
    y = SKQ[..., 1:] + delta * kdotq  # [N, Dv, 1]
    S_new = g3 * S3 + delta * k[:, None, :]
    if m is not None:
        m3 = mx.repeat(m, Hv).reshape(N, 1, 1)
        S_new = mx.where(m3, S_new, S3)
        y = mx.where(m3, y, 0.0)
    return y.reshape(B, Hv, Dv).astype(out_dtype), S_new.reshape(B, Hv, Dv, Dk)


_step_compiled = mx.compile(lambda q, k, v, g, beta, S: _step(q, k, v, g, beta, S, None))
_step_masked_compiled = mx.compile(_step)


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
    S = state.astype(mx.float32)
    ys = []
    for t in range(T):
        args = (q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
        if mask is None:
            y_t, S = _step_compiled(*args)
        else:
            y_t, S = _step_masked_compiled(*args, mask[:, t])
        ys.append(y_t)
    if len(ys) == 1:  # decode: a view, not a copy
        y = mx.expand_dims(ys[0], 1)
    else:
        y = mx.stack(ys, axis=1) if ys else mx.zeros(v.shape, v.dtype)
    return y, S
