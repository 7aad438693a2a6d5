"""Gated delta rule in chunked (WY / UT transform) form: matmuls over chunks, for prefill.

Recurrence per step t, per value head (key head h // (Hv // Hk)), S the [Dv, Dk] state:
    S_t = S_{t-1} diag(g_t) + delta_t k_t^T,   delta_t = beta_t (v_t - S_{t-1} diag(g_t) k_t)
    y_t = S_t q_t
(g_t is a scalar per head, or one factor per key dimension.)

Within a chunk of C steps starting from state S0, the decays are gamma_i = prod_{l<=i} g_l and,
for j <= i, D_ij = prod_{j<l<=i} g_l. Then
    (I + A) delta = beta (v - S0 diag(gamma) k),   A_ij = beta_i <k_i, D_ij k_j>  (j < i)
so with T = (I + A)^-1 (unit lower triangular; for scalar gates T = D * (I + A')^-1 with the
undecayed A'): delta = U - W S0^T, U = T diag(beta) v,
W = T diag(beta gamma) k; y = gamma (q S0^T) + P delta with P_ij = <q_i, D_ij k_j> (j <= i),
and S_C = S0 diag(gamma_C) + delta^T diag(w) k with w_j = prod_{l>j} g_l.
U, W, P are computed for many chunks at once; only the state hand-off (four matmuls per
chunk) runs sequentially.

Numerics: no cumulative decay is ever divided by. D, gamma and w are products over their own
steps (cumulative products of g masked to the segment, never a ratio of two prefix products),
so g = 0 gives exact zeros and no inf/nan. T is a triangular inverse (LAPACK on the CPU, a
recursive 2x2 block inversion elsewhere), stable for strongly correlated keys. Strong decays
never produce subnormal numbers (dozens of times slower on x86): decay products below e^-40
are cut to 0, and for scalar gates the decay is applied after the inversion. All math is fp32.

Shapes: q, k [B, T, Hk, Dk]; v, y [B, T, Hv, Dv]; g [B, T, Hv] or [B, T, Hv, Dk] (decay factor);
beta [B, T, Hv]; state [B, Hv, Dv, Dk] fp32; mask [B, T] bool (False = padding: g = 1, beta = 0
and y = 0 there). Internally heads are laid out [B, Hk, R, ...] with R = Hv // Hk so that q and
k are broadcast over R instead of repeated. The returned state may be a transposed view.
Differentiable (mx ops; the LAPACK inverse carries its own vjp).

References: Yang et al., "Gated Delta Networks" (2024); flash-linear-attention
fla/ops/gated_delta_rule (chunk form).
"""

from __future__ import annotations

import mlx.core as mx

from .. import run_cpu_matmul_hooks

# Per-key gates build a [C, C, Dk] decay tensor per chunk; chunks are processed in groups whose
# tensor stays below this many elements.
_PER_KEY_GROUP_ELEMS = 1 << 24
# Scalar gates: chunks per group on the CPU. Small groups keep each op's operands in cache;
# measured on 2 x86 cores at T=512 and 2048, groups of 1-2 chunks ran 1.2-1.4x faster than all
# at once. On a GPU every op is a launch, so all chunks go in one group there.
_SCALAR_GROUP = 2
# Decay products below e^-40 (4e-18) are set to exactly 0 (see _decays).
_LOG_TINY = -40.0


def _lower(C: int, strict: bool) -> mx.array:
    """[C, C] bool: j < i (strict) or j <= i."""
    i = mx.arange(C)[:, None]
    j = mx.arange(C)[None, :]
    return (j < i) if strict else (j <= i)


def _inv_unit_lower_blocks(A: mx.array) -> mx.array:
    """(I + A)^-1 for strictly lower triangular A [..., C, C], C a power of two, in plain ops.

    Bottom-up recursive block inversion: diagonal blocks of size b are merged in pairs,
    [[T11, 0], [-T22 L21 T11, T22]], until one block covers the chunk; each level is one
    batched op over all blocks. Used where LAPACK is not (GPU streams).
    """
    C = A.shape[-1]
    batch = A.shape[:-2]
    Tb = mx.ones((*batch, C, 1, 1), dtype=A.dtype)
    b = 1
    while b < C:
        M = C // (2 * b)
        # Diagonal 2b-blocks of A: [..., M, 2b, 2b]; their lower-left b x b quarter is L21.
        blocks = A.reshape(*batch, M, 2 * b, M, 2 * b)
        blocks = mx.moveaxis(mx.diagonal(blocks, 0, -4, -2), -1, -3)
        L21 = blocks[..., b:, :b]
        T11 = Tb[..., 0::2, :, :]
        T22 = Tb[..., 1::2, :, :]
        if b < 8:
            # Tiny blocks: a broadcast product beats thousands of b x b matmul calls.
            X = (T22[..., :, :, None] * L21[..., None, :, :]).sum(-2)
            T21 = -(X[..., :, :, None] * T11[..., None, :, :]).sum(-2)
        else:
            T21 = -((T22 @ L21) @ T11)
        top = mx.concatenate([T11, mx.zeros_like(T11)], axis=-1)
        bottom = mx.concatenate([T21, T22], axis=-1)
        Tb = mx.concatenate([top, bottom], axis=-2)
        b *= 2
    return Tb[..., 0, :, :]


@mx.custom_function
def _inv_unit_lower_lapack(A: mx.array) -> mx.array:
    """(I + A)^-1 through LAPACK's triangular inverse (CPU only): a few times faster than the
    block recursion in MLX ops on the CPU. MLX has no vjp for it, hence the custom one."""
    eye = mx.eye(A.shape[-1], dtype=A.dtype)
    return mx.linalg.tri_inv(A + eye, upper=False, stream=mx.cpu)


@_inv_unit_lower_lapack.vjp
def _inv_unit_lower_lapack_vjp(primals, cotangents, outputs):
    # T = M^-1 gives dT = -T dM T, so dL/dM = -T^T G T^T; A only lives below the diagonal.
    G = cotangents[0] if isinstance(cotangents, (list, tuple)) else cotangents
    T = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    Tt = mx.swapaxes(T, -1, -2)
    gA = -(Tt @ G @ Tt)
    return (mx.where(_lower(T.shape[-1], strict=True), gA, 0.0),)


def _inv_unit_lower(A: mx.array) -> mx.array:
    """(I + A)^-1, unit lower triangular, for strictly lower triangular A [..., C, C]."""
    if mx.default_device() == mx.cpu:
        return _inv_unit_lower_lapack(A)
    return _inv_unit_lower_blocks(A)


def _decays(g: mx.array, axis: int):
    """Decay products along the chunk axis of g (decay factors, per step).

    Returns D [.., C, C(, Dk)] with D_ij = prod_{j<l<=i} g_l for j <= i and 0 above the diagonal,
    gamma_i = prod_{l<=i} g_l and w_j = prod_{l>j} g_l. Cumulative products, not
    exp(cumsum(log g)): exact zeros when g underflows to 0, no division, and MLX's CPU exp is slow
    on large tensors.

    A product is cut to exactly 0 once it falls below e^_LOG_TINY: strongly decaying heads would
    otherwise run the products through the subnormal range, where x86 arithmetic (cumprod and
    every BLAS call downstream) is dozens of times slower. The cut is decided on sums of
    log(max(g, 1e-30)); its rounding only moves the cut, and a dropped term is 1e-17 of the
    surviving ones, far below fp32 resolution.
    """
    C = g.shape[axis]
    strict = _lower(C, strict=True)
    lower = _lower(C, strict=False)
    lg = mx.log(mx.maximum(g, 1e-30))
    lc = mx.cumsum(lg, axis=axis)  # sum_{l<=i} log g_l
    if axis == -2:  # per-key gates [.., C, Dk]
        strict, lower = strict[..., None], lower[..., None]
        # seg[l, j] = sum_{j<m<=l} log g_m; x[l, j] = g_l for l > j while the product from
        # j + 1 to l is still above the cut, 0 once it is not, 1 on and above the diagonal.
        seg = lc[..., :, None, :] - lc[..., None, :, :]
        x = mx.where(strict, mx.where(seg > _LOG_TINY, g[..., :, None, :], 0.0), 1.0)
        D = mx.where(lower, mx.cumprod(x, axis=-3), 0.0)
    else:
        seg = lc[..., :, None] - lc[..., None, :]
        x = mx.where(strict, mx.where(seg > _LOG_TINY, g[..., :, None], 0.0), 1.0)
        D = mx.where(lower, mx.cumprod(x, axis=-2), 0.0)
    gamma = mx.cumprod(mx.where(lc > _LOG_TINY, g, 0.0), axis=axis)
    suffix = mx.cumsum(lg, axis=axis, reverse=True)  # sum_{l>=j} log g_l
    w = mx.cumprod(mx.where(suffix > _LOG_TINY, g, 0.0), axis=axis, reverse=True, inclusive=False)
    return D, gamma, w


def _prep_scalar(q, k, v, g, beta):
    """Intra-chunk pieces for scalar gates, for a group of chunks at once.

    q, k: [B, Hk, 1, N, C, Dk]; v: [B, Hk, R, N, C, Dv]; g, beta: [B, Hk, R, N, C].
    Returns U [.., N, C, Dv], W [.., N, C, Dk], P [.., N, C, C], kw [.., N, Dk, C] (k^T diag w),
    the query side (q, and gamma [.., N, C, 1] to scale q S0 by) and the whole chunk's decay
    [.., N, 1, 1].
    """
    C = g.shape[-1]
    D, gamma, w = _decays(g, axis=-1)
    kt = mx.swapaxes(k, -1, -2)
    # With one decay per step, every path j -> m -> i through A picks up D_im D_mj = D_ij, so
    # (I + A)^-1 = D * (I + A')^-1 with the undecayed A'_ij = beta_i <k_i, k_j>. Inverting A'
    # keeps strongly decaying heads from filling T with subnormal products (slow on x86).
    A = mx.where(_lower(C, strict=True), k @ kt, 0.0) * beta[..., :, None]
    # T' diag(beta): folding beta into the columns is cheaper than scaling v and k.
    Tb = _inv_unit_lower(A) * beta[..., None, :]
    U = (Tb * D) @ v
    # W = T diag(beta gamma) k, and T_ij gamma_j = T'_ij gamma_i: scaling rows by gamma_i
    # never multiplies two small decays together (their product could be subnormal).
    W = gamma[..., None] * (Tb @ k)
    P = (q @ kt) * D
    kw = kt * w[..., None, :]
    return U, W, P, kw, q, gamma[..., None], gamma[..., -1:, None]


def _prep_per_key(q, k, v, g, beta):
    """Intra-chunk pieces for per-key gates; g is [B, Hk, R, N, C, Dk]. Same outputs as
    _prep_scalar, with q already scaled by gamma, and the whole chunk's decay [.., N, Dk, 1]."""
    C = g.shape[-2]
    D, gamma, w = _decays(g, axis=-2)  # D: [.., N, C, C, Dk]
    kD = k[..., None, :, :] * D  # [.., N, C(i), C(j), Dk]: D_ij * k_j
    A = mx.where(_lower(C, strict=True), (k[..., :, None, :] * kD).sum(-1), 0.0)
    Tb = _inv_unit_lower(A * beta[..., :, None]) * beta[..., None, :]
    U = Tb @ v
    W = Tb @ (gamma * k)
    P = (q[..., :, None, :] * kD).sum(-1)
    kw = mx.swapaxes(k * w, -1, -2)
    return U, W, P, kw, gamma * q, None, mx.swapaxes(gamma[..., -1:, :], -1, -2)


def _to_chunks(x: mx.array, N: int, C: int) -> mx.array:
    """[B, N*C, H, ...] -> [B, H, N, C, ...] in fp32 (one strided copy)."""
    B, _, H = x.shape[:3]
    x = x.reshape(B, N, C, H, *x.shape[3:])
    return mx.moveaxis(x, 3, 1).astype(mx.float32)


def _chunked_inputs(q, k, v, g, beta, mask, C: int):
    """The inputs in chunks of C steps, fp32 gates, padded steps neutral: (qc, kc [B, Hk, 1, N,
    C, Dk], vc [B, Hk, R, N, C, Dv], bc [B, Hk, R, N, C], gc [B, Hk, R, N, C(, Dk)], N)."""
    B, T, Hk, _ = q.shape
    Hv, Dv = v.shape[2:]
    R = Hv // Hk
    per_key = g.ndim == 4
    g = g.astype(mx.float32)
    beta = beta.astype(mx.float32)
    if mask is not None:
        # A padded step must not touch the state: decay 1, beta 0. Zeroing q also makes its
        # y exactly 0, and zeroing k/v keeps garbage (even inf/nan) in padded slots out of sums.
        m3 = mask[:, :, None]
        g = mx.where(m3[..., None] if per_key else m3, g, 1.0)
        beta = mx.where(m3, beta, 0.0)
        q = mx.where(m3[..., None], q, 0.0)
        k = mx.where(m3[..., None], k, 0.0)
        v = mx.where(m3[..., None], v, 0.0)
    N = -(-T // C)
    pad = N * C - T
    if pad:
        widths = [(0, 0), (0, pad)]
        q = mx.pad(q, widths + [(0, 0), (0, 0)])
        k = mx.pad(k, widths + [(0, 0), (0, 0)])
        v = mx.pad(v, widths + [(0, 0), (0, 0)])
        beta = mx.pad(beta, widths + [(0, 0)])
        g = mx.pad(g, widths + [(0, 0)] * (g.ndim - 2), constant_values=1.0)
    qc = _to_chunks(q, N, C)[:, :, None]  # [B, Hk, 1, N, C, Dk]
    kc = _to_chunks(k, N, C)[:, :, None]
    vc = _to_chunks(v, N, C).reshape(B, Hk, R, N, C, Dv)
    bc = _to_chunks(beta, N, C).reshape(B, Hk, R, N, C)
    gc = _to_chunks(g, N, C).reshape(B, Hk, R, N, C, *g.shape[3:])
    return qc, kc, vc, bc, gc, N


def gated_delta_chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
    chunk_size: int = 64,
) -> tuple[mx.array, mx.array]:
    """Chunked gated delta rule. `state` is [B, Hv, Dv, Dk] fp32; returns (y, new state).

    chunk_size must be a power of two; the tail chunk is padded with steps that change nothing.
    """
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"gated_delta_chunked: chunk_size must be a power of two, got {chunk_size}"
        )
    if mx.default_device() == mx.cpu:
        run_cpu_matmul_hooks()  # e.g. the package's slow-BLAS warning
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    R = Hv // Hk
    f32 = mx.float32
    out_dtype = v.dtype
    per_key = g.ndim == 4
    if T == 0:
        return mx.zeros(v.shape, out_dtype), state.astype(f32)

    C = min(chunk_size, 1 << (T - 1).bit_length())
    qc, kc, vc, bc, gc, N = _chunked_inputs(q, k, v, g, beta, mask, C)

    if per_key:
        step = max(1, _PER_KEY_GROUP_ELEMS // (B * Hv * C * C * Dk))
        prep = _prep_per_key
    else:
        step = _SCALAR_GROUP if mx.default_device() == mx.cpu else N
        prep = _prep_scalar

    # State kept transposed, [B, Hk, R, Dk, Dv], so every hand-off matmul reads it as is.
    St = mx.swapaxes(state.astype(f32), -1, -2).reshape(B, Hk, R, Dk, Dv)
    ys = []
    for n0 in range(0, N, step):
        sl = (slice(None),) * 3 + (slice(n0, min(N, n0 + step)),)
        U, W, P, kw, qs, ys_scale, decay = prep(qc[sl], kc[sl], vc[sl], gc[sl], bc[sl])
        for n in range(U.shape[3]):
            delta = U[..., n, :, :] - W[..., n, :, :] @ St  # [B, Hk, R, C, Dv]
            y0 = qs[..., n, :, :] @ St
            if ys_scale is not None:
                y0 = ys_scale[..., n, :, :] * y0
            y = y0 + P[..., n, :, :] @ delta
            # [B, Hk, R, C, Dv] -> [B, C, Hv, Dv], in the output dtype.
            ys.append(mx.swapaxes(y.reshape(B, Hv, C, Dv), 1, 2).astype(out_dtype))
            St = decay[..., n, :, :] * St + kw[..., n, :, :] @ delta

    y = mx.concatenate(ys, axis=1) if len(ys) > 1 else ys[0]
    # The state goes back as a transposed view; nothing downstream needs it contiguous.
    return y[:, :T], mx.swapaxes(St.reshape(B, Hv, Dk, Dv), -1, -2)
