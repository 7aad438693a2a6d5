"""The shared gated-delta module: every Qwen3.5 model (text and vision-language) calls this.

Recurrence per step t, per value head h (key head h // (Hv // Hk)):
    S *= g_t;  kv = S k_t;  delta = (v_t - kv) * beta_t;  S += delta k_t^T;  y_t = S q_t

Shapes: q, k [B, T, Hk, Dk]; v, y [B, T, Hv, Dv]; a, b, beta [B, T, Hv];
g [B, T, Hv] (scalar per head) or [B, T, Hv, Dk] (per key); state [B, Hv, Dv, Dk], always fp32
(None = zeros); mask [B, T] bool, False = padding (state unchanged, y = 0).
The caller has l2-normalised q and k and scaled q; nothing here applies a scale.

`gated_delta_decode` is the whole linear-attention decode step (T = 1) from the raw in-projection:
causal depthwise conv over [conv_state | qkv], silu, l2 norms, gates and one recurrence step, in
one kernel launch on a GPU (decode.py holds its `ref` form). `gated_delta_decode_packed` is the
same step for T = 1..8 tokens a row (the compiled decode and verify steps), reading the layer's
fused in-projection in place and giving the states after each token, in one launch on a GPU.

Backends (`backend=`, or `auto`, overridable with env QWEN35_MLX_GDN_BACKEND):
    ref      plain mx ops, token by token (oracle, fallback, differentiable)   -> ref.py
    chunked  chunked WY/UT form over chunks of 64 (prefill): on a GPU the chunk kernels
             (chunk_source.py / chunk_launch.py) where they take the shape, else MLX ops
                                                                                -> chunked.py
    metal    fused kernels through mx.fast.metal_kernel                        -> metal.py
    cuda     the same kernel bodies, compiled once per machine by NVRTC       -> cuda.py
             (disk cache ~/.cache/qwen35_mlx/cuda, precompiled.py; else mx.fast.cuda_kernel)
    native   the CPU recurrence as one MLX C++ primitive, one pass over the state for all
             T steps: an optional extension built once per machine; where it is not built
             (or on a Mac) `native` means `auto` without it                 -> kernels/cpu_ext
`native_available()` says whether this process has the native CPU primitive.
"""

from __future__ import annotations

import os

import mlx.core as mx

from .ref import gated_delta_ref
from .source import MAX_TOKENS

__all__ = [
    "gated_delta_update",
    "gated_delta",
    "gated_delta_decode",
    "gated_delta_decode_packed",
    "compute_gates",
    "BACKENDS",
    "native_available",
]

BACKENDS = ("auto", "ref", "chunked", "metal", "cuda", "native")
_ENV = "QWEN35_MLX_GDN_BACKEND"


def compute_gates(
    a: mx.array, b: mx.array, A_log: mx.array, dt_bias: mx.array
) -> tuple[mx.array, mx.array]:
    """fp32 gates: decay g = exp(-exp(A_log) * softplus(a + dt_bias)) and beta = sigmoid(b)."""
    f32 = mx.float32
    x = a.astype(f32) + dt_bias.astype(f32)
    # softplus(x) = logaddexp(x, 0): stable for large |x|.
    g = mx.exp(-mx.exp(A_log.astype(f32)) * mx.logaddexp(x, mx.zeros_like(x)))
    return g, mx.sigmoid(b.astype(f32))


def _shape_error(name: str, got, expected: str) -> ValueError:
    return ValueError(f"gated_delta: {name} has shape {tuple(got)}, expected {expected}")


def _validate(q, k, v, g, beta, state, mask) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not mx.issubdtype(x.dtype, mx.floating):
            raise ValueError(f"gated_delta: {name} must be a floating dtype, got {x.dtype}")
    if q.ndim != 4:
        raise _shape_error("q", q.shape, "[B, T, Hk, Dk]")
    B, T, Hk, Dk = q.shape
    if k.shape != q.shape:
        raise _shape_error("k", k.shape, f"q's shape {tuple(q.shape)} [B, T, Hk, Dk]")
    if v.ndim != 4 or v.shape[:2] != (B, T):
        raise _shape_error("v", v.shape, f"[B={B}, T={T}, Hv, Dv]")
    Hv = v.shape[2]
    if Hk == 0 or Hv % Hk != 0:
        raise ValueError(
            f"gated_delta: value heads Hv={Hv} (v {tuple(v.shape)}) must be a multiple of "
            f"key heads Hk={Hk} (q {tuple(q.shape)})"
        )
    if g.shape not in ((B, T, Hv), (B, T, Hv, Dk)):
        raise _shape_error("g", g.shape, f"[{B}, {T}, {Hv}] or [{B}, {T}, {Hv}, {Dk}]")
    if beta.shape != (B, T, Hv):
        raise _shape_error("beta", beta.shape, f"[{B}, {T}, {Hv}]")
    if state is not None:
        if state.shape != (B, Hv, v.shape[3], Dk):
            raise _shape_error(
                "state", state.shape, f"[B, Hv, Dv, Dk] = [{B}, {Hv}, {v.shape[3]}, {Dk}]"
            )
        if not mx.issubdtype(state.dtype, mx.floating):
            raise ValueError(f"gated_delta: state must be a floating dtype, got {state.dtype}")
    if mask is not None and mask.shape != (B, T):
        raise _shape_error("mask", mask.shape, f"[B, T] = [{B}, {T}]")


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        backend = os.environ.get(_ENV, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"gated_delta: unknown backend {backend!r}; choose one of {BACKENDS}")
    return backend


# Below this many steps the token-by-token path beats the chunked one on the CPU. Measured at
# Hk=16, Hv=32, Dk=Dv=128 on 2 x86 cores with OpenBLAS: the two are even at T=2 (B=1 and B=8),
# chunked leads from T=3 and is 3-4x ahead by T=16 (benchmarks/NOTES.md).
_CPU_CHUNKED_MIN_T = 3


# Up to this many steps `auto` on the CPU runs the native primitive where it is built
# (kernels/cpu_ext): it reads and writes the state once for all T steps, where the ops read it
# twice a step. Longer sequences too while MLX runs its bundled reference BLAS: measured on 2
# AMD EPYC cores (2026-12-03, B 1, Hk16 Hv32 Dk=Dv=128, bf16, CPU time, benchmarks/NOTES.md) the
# native recurrence took T = 16 / 128 / 512 / 2048 in 0.8 / 6.9 / 33 / 160 ms against chunked's
# 5.5 / 47 / 149 / 654 on the reference BLAS (4-7x; B 8 likewise), and against 1.0 / 9.1 / 33 /
# 195 with OpenBLAS (2 threads: about even in CPU time, chunked ahead in wall time), so with
# OpenBLAS `chunked` keeps T >= _CPU_CHUNKED_MIN_T.
_CPU_NATIVE_MAX_T = 2
_CPU_NATIVE_ANY_T_ON_REFERENCE_BLAS = True


def _reference_blas() -> bool:
    from .. import cpu_blas_is_slow

    return cpu_blas_is_slow()


def native_available() -> bool:
    """True when the native CPU primitive (backend "native", kernels/cpu_ext) is built and loads."""
    from .. import cpu_ext

    return cpu_ext.available()


def _auto_cpu(T: int, native: bool = True) -> str:
    """native: may pick the native primitive (False where the default device is a GPU: it runs
    on the CPU stream only)."""
    if native and native_available():
        if T <= _CPU_NATIVE_MAX_T or (_CPU_NATIVE_ANY_T_ON_REFERENCE_BLAS and _reference_blas()):
            return "native"
    return "chunked" if T >= _CPU_CHUNKED_MIN_T else "ref"


# From this many steps on, `auto` on a GPU runs the chunk kernels (the split path for scalar
# gates: chunk_launch.SPLIT, WY, state and output kernels) instead of the fused recurrent kernel.
# Measured on an H200 (2026-12-02 10:04 UTC, bf16, B 1, Hk16 Hv32 Dk=Dv=128, chunk_split_gpu.py
# --quick, benchmarks/RESULTS.md): the split path (output pass O2) 0.518 / 1.852 ms at T = 2048 /
# 8192 against the fused kernel's 1.130 / 4.337, every check passed (fp32 against the float64
# loop, bf16 against the fused kernel, masks with left padding and holes, a nonzero state).
# Shorter prompts were not timed, so 2048 is where it is known to win; `None` turns it off.
_GPU_CHUNKED_MIN_T: int | None = 2048


def _chunk_kernel_supports(q: mx.array, v: mx.array, g: mx.array) -> bool:
    from . import chunk_launch

    return chunk_launch.supports(q, v, g)


def _auto_gpu(q: mx.array, v: mx.array, g: mx.array) -> str:
    """The chunk kernels from _GPU_CHUNKED_MIN_T steps on for scalar gates, the fused recurrent
    kernel below and for per-key gates (whose chunk prep is mx ops), where they support the
    shape. Unsupported shapes take chunked/ref as on the CPU."""
    min_t = _GPU_CHUNKED_MIN_T
    if (
        min_t is not None
        and q.shape[1] >= min_t
        and g.ndim == 3
        and _chunk_kernel_supports(q, v, g)
    ):
        return "chunked"
    for name in ("metal", "cuda"):
        if _gpu_backend(name).supports(q, v, g):
            return name
    return _auto_cpu(q.shape[1], native=False)


def _pick(backend: str, q, v, g) -> str:
    backend = _resolve_backend(backend)
    if backend != "auto":
        return backend
    if mx.default_device() == mx.cpu:
        return _auto_cpu(q.shape[1])
    return _auto_gpu(q, v, g)


# Threads the native primitive splits the state's rows over (std::thread, inside the one MLX
# primitive). 1: on two shared cores a second thread bought no wall time (benchmarks/NOTES.md).
NATIVE_THREADS = 1


def native_gated_delta(mod, q, k, v, g, beta, state, mask):
    """The native primitive's call (mod: the built cpu_ext module), differentiable: the
    primitive has no vjp of its own, so gradients (training) are `ref`'s, which computes the
    same values. Returns (y [B, T, Hv, Dv] in v's dtype, state fp32)."""

    def ops(q, k, v, g, beta, state):
        return gated_delta_ref(q, k, v, g, beta, state.astype(mx.float32), mask)

    @mx.custom_function
    def fused(q, k, v, g, beta, state):
        return tuple(mod.gated_delta(q, k, v, g, beta, state, mask, NATIVE_THREADS))

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        return mx.vjp(ops, list(primals), list(cotangents))[1]

    return fused(q, k, v, g, beta, state)


def _zeros_state(q: mx.array, v: mx.array) -> mx.array:
    B, _, _, Dk = q.shape
    return mx.zeros((B, v.shape[2], v.shape[3], Dk), dtype=mx.float32)


def gated_delta(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    mask: mx.array | None = None,
    *,
    backend: str = "auto",
) -> tuple[mx.array, mx.array]:
    """Gated delta rule with precomputed gates (g is the decay factor, not its log).

    Returns (y [B, T, Hv, Dv] in v's dtype, state [B, Hv, Dv, Dk] fp32).
    """
    _validate(q, k, v, g, beta, state, mask)
    state = _zeros_state(q, v) if state is None else state.astype(mx.float32)
    name = _pick(backend, q, v, g)
    if name == "native":
        from .. import cpu_ext

        mod = cpu_ext.load()
        if mod is not None:
            return native_gated_delta(mod, q, k, v, g, beta, state, mask)
        name = "chunked" if q.shape[1] >= _CPU_CHUNKED_MIN_T else "ref"
    if name == "ref":
        return gated_delta_ref(q, k, v, g, beta, state, mask)
    if name == "chunked":
        if mx.default_device() != mx.cpu and _chunk_kernel_supports(q, v, g):
            from .chunk_launch import gated_delta_chunk_kernel

            return gated_delta_chunk_kernel(q, k, v, g, beta, state, mask)
        from .chunked import gated_delta_chunked

        return gated_delta_chunked(q, k, v, g, beta, state, mask)
    impl = _gpu_backend(name)
    if not impl.supports(q, v, g):
        T = q.shape[1]
        return gated_delta(q, k, v, g, beta, state, mask, backend=_auto_cpu(T, native=False))
    return impl.gated_delta_kernel(q, k, v, g, beta, state, mask)


def gated_delta_update(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: mx.array | None = None,
    mask: mx.array | None = None,
    *,
    backend: str = "auto",
) -> tuple[mx.array, mx.array]:
    """Gated delta rule from the layer's raw gate inputs (mlx-lm compatible signature).

    a, b: [B, T, Hv]; A_log, dt_bias: [Hv]. beta = sigmoid(b) and
    g = exp(-exp(A_log) * softplus(a + dt_bias)) in fp32; the fused GPU kernels compute them
    inside the kernel. Returns (y [B, T, Hv, Dv], state [B, Hv, Dv, Dk] fp32).
    """
    # Ranks first, so a malformed q or v is named as such rather than through a or b.
    if q.ndim != 4:
        raise _shape_error("q", q.shape, "[B, T, Hk, Dk]")
    if v.ndim != 4:
        raise _shape_error("v", v.shape, "[B, T, Hv, Dv]")
    B, T = q.shape[:2]
    Hv = v.shape[2]
    for name, x in (("a", a), ("b", b)):
        if x.shape != (B, T, Hv):
            raise _shape_error(name, x.shape, f"[B, T, Hv] = [{B}, {T}, {Hv}]")
    for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
        if x.shape != (Hv,):
            raise _shape_error(name, x.shape, f"[Hv] = [{Hv}]")
    name = _pick(backend, q, v, a)
    if name == "chunked" and mx.default_device() != mx.cpu and _chunk_kernel_supports(q, v, a):
        from .chunk_launch import gated_delta_update_chunk_kernel

        _validate(q, k, v, a, b, state, mask)
        state = _zeros_state(q, v) if state is None else state.astype(mx.float32)
        return gated_delta_update_chunk_kernel(q, k, v, a, b, A_log, dt_bias, state, mask)
    if name in ("metal", "cuda"):
        impl = _gpu_backend(name)
        if impl.supports(q, v, a):
            _validate(q, k, v, a, b, state, mask)
            state = _zeros_state(q, v) if state is None else state.astype(mx.float32)
            return impl.gated_delta_update_kernel(q, k, v, a, b, A_log, dt_bias, state, mask)
        name = "auto"
    g, beta = compute_gates(a, b, A_log, dt_bias)
    return gated_delta(q, k, v, g, beta, state, mask, backend=name)


DECODE_BACKENDS = ("auto", "ref", "metal", "cuda", "native")


def _validate_norm(z, norm_weight, B: int, dims) -> None:
    _, _, Hv, Dv = dims
    if norm_weight is None:
        raise ValueError("gated_delta_decode: z (the gated norm's gate) needs norm_weight")
    if z.shape not in ((B, Hv, Dv), (B, Hv * Dv)):
        raise _shape_error("z", z.shape, f"[B, Hv, Dv] = [{B}, {Hv}, {Dv}] or [B, Hv * Dv]")
    if norm_weight.shape != (Dv,):
        raise _shape_error("norm_weight", norm_weight.shape, f"[Dv] = [{Dv}]")
    for name, x in (("z", z), ("norm_weight", norm_weight)):
        if not mx.issubdtype(x.dtype, mx.floating):
            raise ValueError(f"gated_delta_decode: {name} must be a floating dtype, got {x.dtype}")


def _validate_decode(qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, dims) -> None:
    Hk, Dk, Hv, Dv = dims
    for name, n in (("num_k_heads", Hk), ("head_k_dim", Dk), ("num_v_heads", Hv)):
        if n < 1:
            raise ValueError(f"gated_delta_decode: {name} must be >= 1, got {n}")
    if Dv < 1 or Hv % Hk:
        raise ValueError(
            f"gated_delta_decode: num_v_heads={Hv} must be a multiple of num_k_heads={Hk} "
            f"and head_v_dim={Dv} >= 1"
        )
    C = 2 * Hk * Dk + Hv * Dv
    if qkv.ndim != 2 or qkv.shape[1] != C:
        raise _shape_error(
            "qkv", qkv.shape, f"[B, 2*Hk*Dk + Hv*Dv] = [B, {C}] (Hk={Hk} Dk={Dk} Hv={Hv} Dv={Dv})"
        )
    B = qkv.shape[0]
    if conv_w.ndim != 2 or conv_w.shape[0] != C or conv_w.shape[1] < 1:
        raise _shape_error("conv_w", conv_w.shape, f"[C, K] = [{C}, K], K >= 1")
    K = conv_w.shape[1]
    if conv_state.shape != (B, K - 1, C):
        raise _shape_error("conv_state", conv_state.shape, f"[B, K-1, C] = [{B}, {K - 1}, {C}]")
    for name, x in (("a", a), ("b", b)):
        if x.shape != (B, Hv):
            raise _shape_error(name, x.shape, f"[B, Hv] = [{B}, {Hv}]")
    for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
        if x.shape != (Hv,):
            raise _shape_error(name, x.shape, f"[Hv] = [{Hv}]")
    if state.shape != (B, Hv, Dv, Dk):
        raise _shape_error("state", state.shape, f"[B, Hv, Dv, Dk] = [{B}, {Hv}, {Dv}, {Dk}]")
    if mask is not None and mask.shape != (B,):
        raise _shape_error("mask", mask.shape, f"[B] = [{B}]")
    named = (("qkv", qkv), ("conv_state", conv_state), ("conv_w", conv_w), ("a", a), ("b", b))
    named += (("A_log", A_log), ("dt_bias", dt_bias), ("state", state))
    for name, x in named:
        if not mx.issubdtype(x.dtype, mx.floating):
            raise ValueError(f"gated_delta_decode: {name} must be a floating dtype, got {x.dtype}")


def gated_delta_decode(
    qkv: mx.array,
    conv_state: mx.array | None,
    conv_w: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: mx.array | None,
    *,
    num_k_heads: int,
    head_k_dim: int,
    num_v_heads: int,
    head_v_dim: int,
    mask: mx.array | None = None,
    z: mx.array | None = None,
    norm_weight: mx.array | None = None,
    norm_eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[mx.array, mx.array, mx.array]:
    """One decode step (T = 1) of the linear-attention layer from its raw in-projections.

    qkv [B, C] is in_proj_qkv's output, C = 2*Hk*Dk + Hv*Dv, channels [q | k | v], in the
    activation dtype; conv_state [B, K-1, C] the last K-1 pre-conv inputs; conv_w [C, K] the
    depthwise weight (tap K-1 meets the current token); a, b [B, Hv] raw gate inputs; A_log,
    dt_bias [Hv]; state [B, Hv, Dv, Dk] fp32; mask [B] bool or None (False: that row's
    recurrent state is unchanged and y = 0; its conv state still shifts in qkv). A conv_state
    or state of None means zeros (a fresh cache), as in the layer.

    Computes conv over [conv_state | qkv], silu, q = l2norm(q) * Dk^-0.5, k = l2norm(k) (eps
    1e-6 inside the rsqrt), g = exp(-exp(A_log) * softplus(a + dt_bias)), beta = sigmoid(b), and
    the gated delta step, with the precision of the layer's ops path: conv (products and sums),
    silu and q's scale in qkv's dtype, each op rounded to it (conv_state and conv_w are cast to
    it); the l2 norms' sums in fp32, the normalised q and k rounded to qkv's dtype; gates and
    recurrence in fp32. `ref` is that path's ops (bit for bit on the CPU); the GPU kernel rounds
    sigmoid's intermediates as MLX's CPU op does (source.py), so with bf16/fp16 activations it
    may differ from the ops path run on a GPU by an ulp of an activation.

    Returns (y [B, Hv, Dv] in qkv's dtype, state [B, Hv, Dv, Dk] fp32, new conv state
    [B, K-1, C] in qkv's dtype = the last K-1 rows of [conv_state | qkv]).

    z [B, Hv, Dv] or [B, Hv * Dv] (in_proj_z's output) with norm_weight [Dv] and norm_eps: y
    then passes the layer's gated norm, norm_weight * rmsnorm(y) * silu(z) (decode.py
    `gated_rms_norm`); in the same launch on a GPU where the kernel takes it (norm_weight in
    qkv's dtype, Dk, Dv <= 128: `launch.norm_layout`), else as ops after it.

    backend: "ref" (mx ops, decode.py), "metal" / "cuda" (one fused kernel), "native" (the ops
    with the recurrence in the native CPU primitive where it is built, kernels/cpu_ext; else ref),
    or "auto" (the GPU kernel where it supports the shape; on the CPU native where built; else
    ref). The env override QWEN35_MLX_GDN_BACKEND applies as for gated_delta; "chunked" (a
    prefill backend) means ref here.
    """
    dims = (num_k_heads, head_k_dim, num_v_heads, head_v_dim)
    if qkv.ndim == 2 and conv_w.ndim == 2:
        if conv_state is None:
            conv_state = mx.zeros((qkv.shape[0], conv_w.shape[1] - 1, qkv.shape[1]), qkv.dtype)
        if state is None:
            state = mx.zeros((qkv.shape[0], num_v_heads, head_v_dim, head_k_dim), mx.float32)
    _validate_decode(qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, dims)
    norm = None
    if z is not None:
        _validate_norm(z, norm_weight, qkv.shape[0], dims)
        norm = (z, norm_weight, norm_eps)
    from .decode import apply_norm, gated_delta_decode_ref

    args = (qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask)
    name = _resolve_backend(backend)
    if name == "auto" and mx.default_device() != mx.cpu:
        if qkv.shape[0] > _CONV_KERNEL_MAX_B:
            y, state, conv_state = _conv_ops_then_kernel(*args, dims)
            return apply_norm(y, norm), state, conv_state
        name = next(
            (n for n in ("metal", "cuda") if _gpu_backend(n).supports_conv(qkv, conv_w, state)),
            "ref",
        )
    if name in ("metal", "cuda"):
        impl = _gpu_backend(name)
        if impl.supports_conv(qkv, conv_w, state):
            if (
                norm is not None
                and NORM_IN_KERNEL
                and impl.supports_conv(qkv, conv_w, state, norm_weight)
            ):
                return impl.gated_delta_decode_kernel(
                    *args, z=z, norm_w=norm_weight, norm_eps=norm_eps
                )
            y, state, conv_state = impl.gated_delta_decode_kernel(*args)
            return apply_norm(y, norm), state, conv_state
    return gated_delta_decode_ref(*args, dims=dims, norm=norm, native=_decode_native(name))


def _decode_native(name: str):
    """The built cpu_ext module when the decode ops should run their recurrence through it
    (backend "native", or "auto" on the CPU), else None (the ops' own `ref._step`)."""
    if name == "native" or (name == "auto" and mx.default_device() == mx.cpu):
        from .. import cpu_ext

        return cpu_ext.load()
    return None


def gated_delta_decode_packed(
    proj: mx.array,
    conv_state: mx.array | None,
    conv_w: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: mx.array | None,
    norm_weight: mx.array,
    *,
    tokens: int,
    num_k_heads: int,
    head_k_dim: int,
    num_v_heads: int,
    head_v_dim: int,
    mask: mx.array | None = None,
    norm_eps: float = 1e-6,
    backend: str = "auto",
    stacked: bool = False,
) -> tuple[mx.array, mx.array, mx.array, tuple | list | None]:
    """`gated_delta_decode` with the gated norm for T = `tokens` (1..8) tokens a row, from the
    layer's fused in-projection.

    proj [B * T, C + Hv*Dv + 2*Hv]: row b * T + t is batch row b's token t; columns
    [qkv (C = 2*Hk*Dk + Hv*Dv) | z (Hv*Dv) | b (Hv) | a (Hv)] (in_proj_qkv, in_proj_z,
    in_proj_b, in_proj_a, in that order); or the same as columns [B * T, width, 1] (the same
    memory: a product of one gemv a row gives that shape), and then y comes back as columns
    too, [B * T, Hv*Dv, 1] (no reshape either way on a GPU); conv_state, conv_w, A_log,
    dt_bias, state as in `gated_delta_decode`; norm_weight [Dv]; mask [B, T] bool or None (a
    False token leaves the recurrent state as it was and gives y = 0; the conv state still
    shifts in its qkv).

    The tokens go one after the other, each exactly as `gated_delta_decode` would take it (same
    arithmetic and roundings), so T tokens in one call give what T calls give. Returns (y
    [B * T, Hv*Dv] in proj's dtype, normed; state and conv state after the last token; the
    states after the earlier tokens, for a rollback: None for T = 1, else either
    (state_tok [(T-1) B, Hv, Dv, Dk], conv_tok [(T-1) B, K-1, C]) (the GPU kernel: one launch,
    proj read in place, no split; token t's states are rows t B .. t B + B - 1, so at T = 2
    they are states as they stand; `stacked`: [T-1, B, ...], the same memory) or a list of T
    (conv state, state) pairs (the ops: on the CPU or with backend "ref" all T tokens at once,
    decode.py `gated_delta_decode_tokens_ref`, bit for bit T `gated_delta_decode` calls; else
    one call a token; the native CPU recurrence's one call gives the rows form above)).
    """
    Hk, Dk, Hv, Dv = dims = (num_k_heads, head_k_dim, num_v_heads, head_v_dim)
    C = 2 * Hk * Dk + Hv * Dv
    width = C + Hv * Dv + 2 * Hv
    if not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(f"gated_delta_decode_packed: tokens must be 1..{MAX_TOKENS}, got {tokens}")
    columns = proj.ndim == 3 and proj.shape[2] == 1
    if (proj.ndim != 2 and not columns) or proj.shape[1] != width or proj.shape[0] % tokens:
        raise _shape_error(
            "proj", proj.shape, f"[B * T, C + Hv*Dv + 2*Hv] = [B * {tokens}, {width}] (or [.., 1])"
        )
    B = proj.shape[0] // tokens
    y_shape = (B * tokens, Hv * Dv, 1) if columns else (B * tokens, Hv * Dv)
    if conv_state is None:
        conv_state = mx.zeros((B, conv_w.shape[1] - 1, C), proj.dtype)
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), mx.float32)
    if mask is not None and mask.shape != (B, tokens):
        raise _shape_error("mask", mask.shape, f"[B, T] = [{B}, {tokens}]")
    name = _resolve_backend(backend)
    if name in ("auto", "metal", "cuda") and mx.default_device() != mx.cpu:
        names = ("metal", "cuda") if name == "auto" else (name,)
        for n in names:
            impl = _gpu_backend(n)
            if B <= _CONV_KERNEL_MAX_B and impl.supports_packed(
                proj, conv_w, state, norm_weight, tokens
            ):
                args = (proj, conv_state, conv_w, A_log, dt_bias, state)
                _validate_packed(*args, norm_weight, dims, B)
                return impl.gated_delta_decode_packed_kernel(
                    *args, mask, tokens=tokens, norm_w=norm_weight, norm_eps=norm_eps,
                    stacked=stacked,
                )  # fmt: skip
    # Ops (and anything the kernel does not take): the pieces, then one decode a token.
    from .decode import gated_rms_norm

    proj = proj.reshape(B * tokens, width)  # (columns: rows again)

    qkv, z, b, a = mx.split(proj, [C, C + Hv * Dv, C + Hv * Dv + Hv], axis=-1)
    kw = dict(num_k_heads=Hk, head_k_dim=Dk, num_v_heads=Hv, head_v_dim=Dv)
    kw.update(norm_weight=norm_weight, norm_eps=norm_eps, backend=backend)
    ys, states = [], []
    if tokens == 1:
        m = None if mask is None else mask[:, 0]
        y, state, conv_state = gated_delta_decode(
            qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask=m, z=z, **kw
        )
        return y.reshape(y_shape), state, conv_state, None
    if name in ("auto", "ref", "chunked", "native") and (
        name != "auto" or mx.default_device() == mx.cpu
    ):
        # Where every token would take the ops: all of them at once (decode.py), the same
        # arithmetic with the per-token primitives only in the recurrence.
        from .decode import gated_delta_decode_tokens_ref

        _validate_packed(proj, conv_state, conv_w, A_log, dt_bias, state, norm_weight, dims, B)
        y, state, conv_state, states = gated_delta_decode_tokens_ref(
            qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, dims=dims,
            tokens=tokens, norm=(z, norm_weight, norm_eps), native=_decode_native(name),
        )  # fmt: skip
        return y.reshape(y_shape), state, conv_state, states
    del kw["norm_weight"], kw["norm_eps"]
    for t in range(tokens):
        m = None if mask is None else mask[:, t]
        qkv_t, a_t, b_t = qkv[t::tokens], a[t::tokens], b[t::tokens]
        y, state, conv_state = gated_delta_decode(
            qkv_t, conv_state, conv_w, a_t, b_t, A_log, dt_bias, state, mask=m, **kw
        )
        ys.append(y)
        states.append((conv_state, state))
    # The gated norm once over all tokens (`decode.gated_rms_norm`, elementwise per token).
    y = mx.stack(ys, axis=1)  # [B, T, Hv, Dv]
    y = gated_rms_norm(y, z.reshape(y.shape), norm_weight, norm_eps)
    return y.reshape(y_shape), state, conv_state, states


def _validate_packed(_proj, conv_state, conv_w, A_log, dt_bias, state, norm_weight, dims, B):
    """The packed call's other shapes, checked as `gated_delta_decode` checks them (the kernel
    path; the ops path checks them through `gated_delta_decode`)."""
    Hk, Dk, Hv, Dv = dims
    C = 2 * Hk * Dk + Hv * Dv
    K = conv_w.shape[1] if conv_w.ndim == 2 else 0
    want = {
        "conv_w": (conv_w, (C, K), f"[C, K] = [{C}, K]"),
        "conv_state": (conv_state, (B, K - 1, C), f"[B, K-1, C] = [{B}, {K - 1}, {C}]"),
        "A_log": (A_log, (Hv,), f"[Hv] = [{Hv}]"),
        "dt_bias": (dt_bias, (Hv,), f"[Hv] = [{Hv}]"),
        "state": (state, (B, Hv, Dv, Dk), f"[B, Hv, Dv, Dk] = [{B}, {Hv}, {Dv}, {Dk}]"),
        "norm_weight": (norm_weight, (Dv,), f"[Dv] = [{Dv}]"),
    }
    for name, (x, shape, text) in want.items():
        if x.shape != shape or K < 1:
            raise _shape_error(name, x.shape, text)
        if not mx.issubdtype(x.dtype, mx.floating):
            raise ValueError(f"gated_delta_decode: {name} must be a floating dtype, got {x.dtype}")
    if Hv % Hk:
        raise ValueError(
            f"gated_delta_decode: num_v_heads={Hv} must be a multiple of num_k_heads={Hk}"
        )


# False: `gated_delta_decode(..., z=...)` runs the conv decode kernel without the gated norm and
# the norm as mx ops after it (two more primitives a layer), e.g. to measure the in-kernel norm's
# layout (one threadgroup a head, `launch.norm_layout`) against the default one. Read at each
# call (the compiled decode step: when it is traced).
NORM_IN_KERNEL = True

# Above this batch the one-launch conv kernel loses to the conv in ops + the recurrent kernel on
# an H200 (per step, bench_gated_delta_decode.py, 2026-12-01: 3.2x / 2.5x faster at B=1 for the
# 0.8B / 9B layer, 1.55x / 1.27x at B=32, 0.87x / 0.72x at B=128): at large batch the state's
# traffic dominates and the conv kernel's layout, tuned for B=1, reads it less well.
_CONV_KERNEL_MAX_B = 64


def _conv_ops_then_kernel(qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, dims):
    """The decode step as conv ops + `gated_delta_update` (the recurrent GPU kernel)."""
    from .decode import conv_qkv_step

    q, k, v, new_conv = conv_qkv_step(qkv, conv_state, conv_w, *dims)
    y, state = gated_delta_update(
        q[:, None],
        k[:, None],
        v[:, None],
        a[:, None],
        b[:, None],
        A_log,
        dt_bias,
        state,
        None if mask is None else mask[:, None],
    )
    return y[:, 0], state, new_conv


def _gpu_backend(name: str):
    """The `launch.GpuBackend` of "metal" or "cuda" (its kernels, built on first use)."""
    if name == "metal":
        from .metal import BACKEND
    else:
        from .cuda import BACKEND
    return BACKEND
