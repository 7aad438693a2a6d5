"""The linear-attention decode step from the raw in-projection, in plain mx ops (the `ref` backend
of `gated_delta_decode`: the CPU path and the oracle of the fused GPU kernel).

For T = 1 and batch row b, with x = [conv_state | qkv] [K, C] (tap K-1 meets the current token):
    h = silu(sum_j x[j] * conv_w[:, j]);  [q | k | v] = h;  q = l2norm(q) Dk^-1/2;  k = l2norm(k)
    g = exp(-exp(A_log) softplus(a + dt_bias));  beta = sigmoid(b);  then one gated delta step.

Shapes: qkv [B, C], C = 2 Hk Dk + Hv Dv, channels [q | k | v]; conv_state [B, K-1, C]; conv_w
[C, K]; a, b [B, Hv]; A_log, dt_bias [Hv]; state [B, Hv, Dv, Dk] fp32; mask [B] bool or None.
Returns y [B, Hv, Dv] (qkv's dtype), state [B, Hv, Dv, Dk] fp32 and the new conv state
[B, K-1, C] (qkv's dtype, the last K-1 rows of [conv_state | qkv]). With `norm` = (z, weight,
eps), y then passes the layer's gated RMSNorm (`gated_rms_norm`). `gated_delta_decode_tokens_ref`
takes T tokens a row at once, bit for bit T calls (the CPU's verify pass).

Precision, as the layer's ops path (`models/layers.py` `_conv_qkv` then `gated_delta_update`):
conv_state and conv_w are cast to qkv's dtype, and the conv's products and sums, the silu and q's
scale run in that dtype; the l2 norms in fp32 (eps 1e-6 inside the rsqrt), rounded back to it;
gates and recurrence in fp32.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from .. import cpu_ext
from . import compute_gates
from .ref import _step

L2_EPS = 1e-6


def _l2norm(x: mx.array) -> mx.array:
    x32 = x.astype(mx.float32)
    return (x32 * mx.rsqrt((x32 * x32).sum(-1, keepdims=True) + L2_EPS)).astype(x.dtype)


@partial(mx.compile, shapeless=True)
def gated_rms_norm(x: mx.array, gate: mx.array, weight: mx.array, eps: float) -> mx.array:
    """The linear-attention layer's gated norm: weight * rmsnorm(x) * silu(gate), the product
    in fp32, rounded to x's dtype (x, gate [..., Dv]; weight [Dv])."""
    y = mx.fast.rms_norm(x, weight, eps).astype(mx.float32)
    g = gate.astype(mx.float32)
    return (y * (g * mx.sigmoid(g))).astype(x.dtype)


def apply_norm(y: mx.array, norm) -> mx.array:
    """y [B, Hv, Dv] through `gated_rms_norm` when norm = (z [B, Hv, Dv] or [B, Hv * Dv],
    weight, eps) is given."""
    if norm is None:
        return y
    z, weight, eps = norm
    return gated_rms_norm(y, z.reshape(y.shape), weight, eps)


# A float16 conv + silu as the native module's one primitive (`conv_silu`, kernels/cpu_ext) where
# it is built: the same bits as the ops below (MLX's float16 ops are integer-emulated per element
# on x86, ~40-110 ns an element a fused chain), the decode step's and the verify pass's alike.
def _half_conv(native, x: mx.array) -> bool:
    return native is not None and hasattr(native, "conv_silu") and cpu_ext.half_ops(x)


def conv_qkv_step(qkv, conv_state, conv_w, Hk: int, Dk: int, Hv: int, Dv: int, native=None):
    """Conv + silu + split + norms for one token. Returns (q, k [B, Hk, Dk], v [B, Hv, Dv],
    new conv state [B, K-1, C]). native: the built cpu_ext module (a float16 conv + silu as its
    one primitive, `_half_conv`) or None."""
    B = qkv.shape[0]
    dtype = qkv.dtype
    x = mx.concatenate([conv_state.astype(dtype), qkv[:, None]], axis=1)  # [B, K, C]
    w = conv_w.astype(dtype)
    K = w.shape[1]
    if _half_conv(native, x):
        h = native.conv_silu(x, w, 1).reshape(B, -1)
    else:
        # The taps by one split each ([B, 1, C] and [1, C] pieces), not 2K slices and squeezes:
        # every view is a primitive, i.e. host time, on MLX's CPU stream. Same products and sums.
        xs = mx.split(x, K, axis=1)
        ws = mx.split(w.T, K, axis=0)
        h = xs[0] * ws[0]
        for j in range(1, K):
            h = h + xs[j] * ws[j]
        h = h.reshape(B, -1)
        h = h * mx.sigmoid(h)  # silu
    key_dim = Hk * Dk
    q = _l2norm(h[:, :key_dim].reshape(B, Hk, Dk)) * (Dk**-0.5)
    k = _l2norm(h[:, key_dim : 2 * key_dim].reshape(B, Hk, Dk))
    v = h[:, 2 * key_dim :].reshape(B, Hv, Dv)
    return q, k, v, x[:, 1:]


def _decode(qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, dims):
    q, k, v, new_conv = conv_qkv_step(qkv, conv_state, conv_w, *dims)
    g, beta = compute_gates(a, b, A_log, dt_bias)
    y, state = _step(q, k, v, g, beta, state.astype(mx.float32), mask)
    return y, state, new_conv


# One compiled function per structure (mask or not); the head counts and sizes are constants of
# a model, so each model traces it once per batch shape.
_decode_compiled = mx.compile(
    lambda qkv, cs, w, a, b, A_log, dt_bias, state, dims: _decode(
        qkv, cs, w, a, b, A_log, dt_bias, state, None, dims
    )
)
_decode_masked_compiled = mx.compile(_decode)


def _native_step(native, q, k, v, g, beta, S, m):
    """One step through the native CPU primitive (kernels/cpu_ext) from `ref._step`'s operands: q, k
    [B, Hk, Dk], v [B, Hv, Dv], g, beta [B, Hv], m [B] or None. Returns (y [B, Hv, Dv] in v's
    dtype, S). The bare primitive, without `native_gated_delta`'s vjp: these are the inference
    steps (decode, verify), and in the compiled decode step the `mx.custom_function` wrapper
    cost the small model ~10% at B = 8 where the bare call gained 1.2-1.4x (NOTES.md);
    differentiate through backend "ref"."""
    from . import NATIVE_THREADS

    m = None if m is None else m[:, None]
    one = (q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None])
    y, S = native.gated_delta(*one, S, m, NATIVE_THREADS)
    return y[:, 0], S


def _decode_native(native, qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, dims):
    q, k, v, new_conv = conv_qkv_step(qkv, conv_state, conv_w, *dims, native=native)
    g, beta = compute_gates(a, b, A_log, dt_bias)
    y, state = _native_step(native, q, k, v, g, beta, state.astype(mx.float32), mask)
    return y, state, new_conv


_native_compiled: dict = {}  # (module id, masked) -> compiled `_decode_native`


def _native_fn(native, masked: bool):
    key = (id(native), masked)
    if key not in _native_compiled:
        if masked:
            fn = partial(_decode_native, native)
        else:

            def fn(qkv, cs, w, a, b, A_log, dt_bias, state, dims):
                return _decode_native(native, qkv, cs, w, a, b, A_log, dt_bias, state, None, dims)

        _native_compiled[key] = mx.compile(fn)
    return _native_compiled[key]


# The whole decode step (conv, silu, norms, gates, recurrence, gated norm) as the native
# extension's one primitive (`gated_delta_decode` of kernels/cpu_ext): on MLX's CPU stream each
# of the ~40 primitives the ops take a layer costs host time (a few us) whatever its size, which
# at small widths is most of the step (benchmarks/NOTES.md, "Session 15, helper cpumv"). It
# computes in float32, not as the ops to the bit (other exp, other sum orders). The decode calls
# (`gated_delta_decode_ref`) and T tokens a row (`gated_delta_decode_tokens_ref`, one call a
# token) both take it, so the step, the plain decode and the verify pass stay equal bit for bit;
# a plain call of 2-8 tokens over a cache (`gated_delta_update`: the ops' conv) is float32
# rounding apart from the verify pass. Taken for a float32 qkv only: the primitive takes
# half-precision inputs (float32 inside, y and the conv state rounded once), but a half model's
# rounding then moves from the ops' by a bfloat16 ulp or so (a test's near-tie flips:
# tests/test_fast_decode.py's quantized-KV check, NOTES), and a bfloat16 short plain call is
# bit for bit the verify pass only while both round as the ops (tests/test_add_norm.py).
# NATIVE_FUSED: False keeps the ops around the native recurrence (as before; A/B).
NATIVE_FUSED = True

# T tokens a row with the native recurrence (`_tokens`): one call that also records the states
# after each token (True), or one call a token (False, as before session 16). The one call saves
# a verify pass ~7 primitives a linear layer at T = 2 (the operands' splits, the calls, the
# concatenation of y), host time on MLX's CPU stream; the same bits either way.
NATIVE_RECORD = True


def _fused(native, qkv, conv_state) -> bool:
    return NATIVE_FUSED and hasattr(native, "gated_delta_decode") and qkv.dtype == mx.float32


def _fused_step(native, qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, dims, norm):
    """One token a row through the native decode primitive: (y [B, Hv, Dv] in qkv's dtype, normed
    when `norm` = (z, weight, eps) is given; state; conv state)."""
    z, weight, eps = norm if norm is not None else (None, None, 1e-6)
    args = (qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, *dims)
    return native.gated_delta_decode(*args, mask, z, weight, float(eps))


def gated_delta_decode_ref(
    qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, *, dims, norm=None, native=None
) -> tuple[mx.array, mx.array, mx.array]:
    """The decode step in mx ops; dims = (Hk, Dk, Hv, Dv); norm (z, weight, eps) or None.
    Inputs validated by the caller. native: the built cpu_ext module, whose one primitive then
    runs the recurrence (conv, norms and gates stay these ops; its decode primitive runs the
    whole step: `NATIVE_FUSED`), or None."""
    if native is not None and _fused(native, qkv, conv_state):
        args = (qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask)
        return _fused_step(native, *args, dims, norm)
    if native is not None:
        fn = _native_fn(native, mask is not None)
        if mask is None:
            y, s, c = fn(qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, dims)
        else:
            y, s, c = fn(qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, dims)
        return apply_norm(y, norm), s, c
    if mask is None:
        y, s, c = _decode_compiled(qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, dims)
    else:
        args = (qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, dims)
        y, s, c = _decode_masked_compiled(*args)
    return apply_norm(y, norm), s, c


# T tokens a row (the verify pass's linear layers on the CPU). `gated_delta_decode_ref` once a
# token runs its ~65 primitives T times, and on MLX's CPU stream every primitive costs a few
# microseconds whatever its size (at the tiny model's widths a token's conv, norms, gates and
# step cost ~0.25 ms a layer). Only the recurrence needs the previous token: the conv (each
# token's K taps are rows of [conv_state | qkv]), silu, l2 norms, gates, the fp32 casts and
# k . q are elementwise or per-row reductions, so here they run once over all T tokens, and
# each token then takes the state through `_step`'s arithmetic from those prepared operands:
# the same products, sums and roundings as T calls (bit for bit: tests/kernels/test_decode.py).


def _tokens(qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, dims, T, native=None):
    Hk, Dk, Hv, Dv = dims
    f32 = mx.float32
    BT, C = qkv.shape
    B, R = BT // T, Hv // Hk
    dtype = qkv.dtype
    x = mx.concatenate([conv_state.astype(dtype), qkv.reshape(B, T, C)], axis=1)  # [B, K-1+T, C]
    w = conv_w.astype(dtype)
    K = w.shape[1]
    if _half_conv(native, x):
        h = native.conv_silu(x, w, T)  # [B, T, C]
    else:
        ws = mx.split(w.T, K, axis=0)  # [1, C] each, as `conv_qkv_step`
        h = x[:, 0:T] * ws[0]
        for j in range(1, K):
            h = h + x[:, j : j + T] * ws[j]
        h = h * mx.sigmoid(h)  # [B, T, C]
    key_dim = Hk * Dk
    q = _l2norm(h[..., :key_dim].reshape(B, T, Hk, Dk)) * (Dk**-0.5)
    k = _l2norm(h[..., key_dim : 2 * key_dim].reshape(B, T, Hk, Dk))
    v = h[..., 2 * key_dim :].reshape(B, T, Hv, Dv)
    g, beta = compute_gates(a, b, A_log, dt_bias)  # [B*T, Hv]
    if native is not None:
        from . import NATIVE_THREADS

        g, beta = g.reshape(B, T, Hv), beta.reshape(B, T, Hv)
        if NATIVE_RECORD:
            # One call of the T steps, which also writes the states after each token but the
            # last (`record`: [(T-1) B, Hv, Dv, Dk], the T-token GPU kernel's layout, which the
            # cache's rollback takes as it stands); one code path for every T in the primitive,
            # so the same bits as T calls (tests/kernels/test_decode.py).
            S = state.astype(f32)
            y, S, s_tok = native.gated_delta(q, k, v, g, beta, S, mask, NATIVE_THREADS, True)
            wins = [x[:, t + 1 : t + K] for t in range(T - 1)]  # [B, K-1, C] each
            conv_tok = wins[0] if T == 2 else mx.concatenate(wins, axis=0)
            return y, (x[:, T : T + K - 1], S), (s_tok, conv_tok)
        # One native step a token. Each token's operands are [B, 1, ...] pieces of one split a
        # kind, the shape the primitive takes (`_native_step`'s after its expand): no slice,
        # squeeze and expand a token and operand (the same values, so the same bits).
        ops = [mx.split(u, T, axis=1) for u in (q, k, v, g, beta)]
        ms = [None] * T if mask is None else mx.split(mask, T, axis=1)
        S = state.astype(f32)
        ys, states = [], []
        for t in range(T):
            y, S = native.gated_delta(*(u[t] for u in ops), S, ms[t], NATIVE_THREADS)
            ys.append(y)
            states.append((x[:, t + 1 : t + K], S))
        return mx.concatenate(ys, axis=1), states[-1], states
    # `_step`'s operands for every token, [B, T, Hv, ...]; each token's is a [B, 1, Hv, ...]
    # piece of one split a kind (views; `a[:, t]` would be a gather), and the state is kept
    # [B, 1, Hv, Dv, Dk], so a token's step needs no reshape.
    q = mx.repeat(q.astype(f32), R, axis=2)  # [B, T, Hv, Dk]
    k = mx.repeat(k.astype(f32), R, axis=2)
    kdotq = (k * q).sum(-1)  # [B, T, Hv]
    kqt = mx.swapaxes(mx.stack([k, q], axis=3), -1, -2)  # [B, T, Hv, Dk, 2]
    pieces = (kqt, k[..., None, :], v.astype(f32)[..., None])
    pieces += tuple(u.reshape(B, T, Hv, 1, 1) for u in (g.astype(f32), beta, kdotq))
    ops = [mx.split(u, T, axis=1) for u in pieces]
    ms = [None] * T if mask is None else mx.split(mask.reshape(B, T, 1, 1, 1), T, axis=1)
    S = state.astype(f32)[:, None]
    ys, states = [], []
    for t in range(T):
        y, S = _token(S, *(u[t] for u in ops), ms[t])
        ys.append(y)
        states.append((x[:, t + 1 : t + K], S.reshape(B, Hv, Dv, Dk)))
    y = mx.concatenate(ys, axis=1).reshape(B, T, Hv, Dv).astype(dtype)
    return y, states[-1], states


def _token(S, kqt, k, v, g, beta, kdotq, m):
    """One recurrence step from prepared operands, `ref._step`'s arithmetic: S
    [B, 1, Hv, Dv, Dk]; kqt [B, 1, Hv, Dk, 2] ([k, q] transposed); k [B, 1, Hv, 1, Dk]; v
    [B, 1, Hv, Dv, 1]; g, beta, kdotq [B, 1, Hv, 1, 1]; m [B, 1, 1, 1, 1] or None. Returns
    (y [B, 1, Hv, Dv, 1] fp32, the new S)."""
    SKQ = g * (S @ kqt)
    delta = (v - SKQ[..., :1]) * beta
    y = SKQ[..., 1:] + delta * kdotq
    S_new = g * S + delta * k
    if m is not None:
        S_new = mx.where(m, S_new, S)
        y = mx.where(m, y, 0.0)
    return y, S_new


_tokens_compiled = mx.compile(_tokens)


def gated_delta_decode_tokens_ref(
    qkv,
    conv_state,
    conv_w,
    a,
    b,
    A_log,
    dt_bias,
    state,
    mask,
    *,
    dims,
    tokens,
    norm=None,
    native=None,
) -> tuple[mx.array, mx.array, mx.array, list | tuple]:
    """`gated_delta_decode_ref` for T = `tokens` tokens a row at once (see above), bit for bit
    the T calls. qkv [B*T, C], a, b [B*T, Hv] (row b*T + t); mask [B, T] bool or None; norm
    (z [B*T, Hv*Dv], weight, eps) or None. Returns (y [B, T, Hv, Dv] in qkv's dtype, state
    and conv state after the last token, the states after each token: the T (conv state,
    state) pairs, or with the native recurrence's one call (`NATIVE_RECORD`) the T-token GPU
    kernel's form (state_tok [(T-1) B, Hv, Dv, Dk], conv_tok [(T-1) B, K-1, C])).
    native: the built cpu_ext module (its primitive runs the recurrence) or None."""
    if native is not None and _fused(native, qkv, conv_state):
        return _fused_tokens(
            native, qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, dims, tokens, norm
        )
    args = (qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, dims, tokens)
    if native is not None:
        key = (id(native), "tokens")
        if key not in _native_compiled:
            _native_compiled[key] = mx.compile(partial(_tokens, native=native))
        y, last, states = _native_compiled[key](*args)
    else:
        y, last, states = _tokens_compiled(*args)
    if norm is not None:
        z, weight, eps = norm
        y = gated_rms_norm(y, z.reshape(y.shape), weight, eps)
    return y, last[1], last[0], states


def _fused_tokens(
    native, qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, dims, T, norm
):
    """`gated_delta_decode_tokens_ref` through the native decode primitive, one call a token
    (the very call `gated_delta_decode_ref` makes, so bit for bit T such calls)."""
    Hk, Dk, Hv, Dv = dims
    B = qkv.shape[0] // T
    rows = [u.reshape(B, T, *u.shape[1:]) for u in (qkv, a, b)]
    z = None
    if norm is not None:
        z = norm[0].reshape(B, T, Hv * Dv)
    ys, states = [], []
    for t in range(T):
        m = None if mask is None else mask[:, t]
        nt = None if norm is None else (z[:, t], norm[1], norm[2])
        qkv_t, a_t, b_t = (u[:, t] for u in rows)
        y, state, conv_state = _fused_step(
            native, qkv_t, conv_state, conv_w, a_t, b_t, A_log, dt_bias, state, m, dims, nt
        )
        ys.append(y)
        states.append((conv_state, state))
    return mx.stack(ys, axis=1), state, conv_state, states
