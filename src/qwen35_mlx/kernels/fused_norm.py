"""Two small GPU kernels for the decode step's layer boundaries, one text for Metal and CUDA.

- `add_rms_norm(x, d, w, eps)` -> (s, n): the residual sum s = x + d, rounded to the activation
  dtype T, and its RMSNorm n = T(w * T(s * r)), r = rsqrt(mean(s^2) + eps) summed in fp32: the
  order of MLX's own rms_norm kernels (the normalised value rounded to T, then times w in T).
  One launch where the ops path takes two (an add and `mx.fast.rms_norm`).
- `swiglu(gu)` -> silu(g) * u in fp32, rounded once to T, read from the fused [rows, 2I] output
  of one gate|up matmul (gate columns first): one launch where the ops path takes a split and a
  fused silu/multiply.

Shapes: x, d, s, n [rows, D] (any leading dims, flattened), w [D]; gu [rows, 2I] -> [rows, I].
Both kernels run where a GPU backend is (CUDA: through `gated_delta.precompiled`'s disk cache,
Metal: `mx.fast.metal_kernel`) and the default device is the GPU; elsewhere (the CPU) the
functions are the ops above, so callers need no branch. `kernel_available(x)` says which.
The bodies are plain C++ over the gated-delta kernels' helpers (their `HEADER`s: gd_group_sum,
gd_exp, gd_rsqrt, gd_threadgroup, gd_threadgroup_barrier) and four names the prologue defines:
    fn_lane   lane in the warp / SIMD-group (0..31)      fn_warp   warp in the threadgroup
    fn_row    threadgroup index along x (the row)        fn_block  threadgroup index along y
Launch: threadgroups of (32, W) threads; rows along the grid's x (CUDA allows 2^31 - 1
threadgroups there, 65535 along y), swiglu's column blocks along y.
"""

from __future__ import annotations

import mlx.core as mx

from . import gpu_build
from .positions import prologue

# add_rms_norm: warps a threadgroup (a row each). 8 x 32 = 256 threads: at D = 1024 (0.8B) four
# elements a thread, at D = 4096 (9B) sixteen.
NORM_WARPS = 8
# swiglu: warps a threadgroup; a threadgroup covers 32 * SWIGLU_WARPS columns of one row.
SWIGLU_WARPS = 4

ADD_NORM_BODY = """
  // x, d, s, n: [rows, D] in T; w: [D] in T; eps: [1] fp32. One threadgroup a row.
  (void)fn_block;
  const int fn_tid = int(fn_warp) * 32 + int(fn_lane);
  const size_t fn_base = size_t(fn_row) * size_t(D);
  float fn_ss = 0.0f;
  for (int i = fn_tid; i < D; i += 32 * W) {
    const T si = static_cast<T>(static_cast<float>(x[fn_base + i]) +
                                static_cast<float>(d[fn_base + i]));
    s[fn_base + i] = si;
    const float f = static_cast<float>(si);
    fn_ss += f * f;
  }
  fn_ss = gd_group_sum<32>(fn_ss);
  gd_threadgroup float fn_part[W];
  if (fn_lane == 0) {
    fn_part[fn_warp] = fn_ss;
  }
  gd_threadgroup_barrier();
  float fn_total = 0.0f;  // the warps' sums in warp order: the same sum in every thread
  for (int j = 0; j < W; ++j) {
    fn_total += fn_part[j];
  }
  const float fn_r = gd_rsqrt(fn_total / float(D) + eps[0]);
  for (int i = fn_tid; i < D; i += 32 * W) {
    // s recomputed (the same rounding as written above), not read back from the output.
    const float f = static_cast<float>(static_cast<T>(static_cast<float>(x[fn_base + i]) +
                                                      static_cast<float>(d[fn_base + i])));
    const T ni = static_cast<T>(f * fn_r);
    n[fn_base + i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(ni));
  }
"""

SWIGLU_BODY = """
  // gu: [rows, 2 I] in T (gate columns, then up columns); out: [rows, I] in T.
  const int i = (int(fn_block) * W + int(fn_warp)) * 32 + int(fn_lane);
  if (i < I) {
    const size_t row = size_t(fn_row);
    const float g = static_cast<float>(gu[row * size_t(2 * I) + i]);
    const float u = static_cast<float>(gu[row * size_t(2 * I) + I + i]);
    out[row * size_t(I) + i] = static_cast<T>(g / (1.0f + gd_exp(-g)) * u);
  }
"""

# The thread's lane and warp, the threadgroup's row (x) and block of the row (y).
_POSITIONS = {
    "fn_lane": "thread.x",
    "fn_warp": "thread.y",
    "fn_row": "threadgroup.x",
    "fn_block": "threadgroup.y",
}

# name: (input names, output names, body)
KERNELS = {
    "add_rms_norm": (["x", "d", "w", "eps"], ["s", "n"], ADD_NORM_BODY),
    "swiglu": (["gu"], ["out"], SWIGLU_BODY),
}


def kernel_source(name: str, backend: str) -> str:
    """The full `source=` of kernel `name` for backend "cuda" or "metal": prologue + body."""
    return prologue(backend, **_POSITIONS) + KERNELS[name][2]


_built: dict[str, object] = {}


def _build(name: str):
    if name not in _built:
        backend = gpu_build()
        kind = "cuda" if mx.cuda.is_available() else "metal"
        inputs, outputs, _ = KERNELS[name]
        _built[name] = backend.make_kernel("qm_" + name, inputs, outputs, kernel_source(name, kind))
    return _built[name]


def kernel_available(x: mx.array) -> bool:
    """Whether `add_rms_norm` / `swiglu` run as kernels for activations like x (a GPU backend,
    the default device a GPU, a float dtype); else they are the ops."""
    return (
        mx.default_device() != mx.cpu
        and mx.issubdtype(x.dtype, mx.floating)
        and gpu_build() is not None
    )


_eps_arrays: dict[float, mx.array] = {}


def _eps(eps: float) -> mx.array:
    if eps not in _eps_arrays:
        _eps_arrays[eps] = mx.array([eps], dtype=mx.float32)
    return _eps_arrays[eps]


def add_rms_norm(x: mx.array, d: mx.array, w: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """(x + d, rms_norm(x + d) * w), the sum in x's dtype; one kernel on a GPU, else ops."""
    if not (kernel_available(x) and x.dtype == d.dtype == w.dtype and x.shape == d.shape):
        s = x + d
        return s, mx.fast.rms_norm(s, w, eps)
    return run_add_rms_norm(_build("add_rms_norm"), x, d, w, eps)


def run_add_rms_norm(kernel, x, d, w, eps, warps: int = NORM_WARPS):
    """Launch a built add_rms_norm kernel (shapes as `add_rms_norm`)."""
    D = x.shape[-1]
    rows = x.size // D
    s, n = kernel(
        inputs=[x, d, w, _eps(eps)],
        template=[("D", D), ("W", warps), ("T", x.dtype)],
        grid=(32 * rows, warps, 1),
        threadgroup=(32, warps, 1),
        output_shapes=[x.shape, x.shape],
        output_dtypes=[x.dtype, x.dtype],
    )
    return s, n


def swiglu(gu: mx.array) -> mx.array:
    """silu(gate) * up from the fused [..., 2I] gate|up output; one kernel on a GPU, else ops."""
    if not kernel_available(gu):
        g, u = mx.split(gu, 2, axis=-1)
        return swiglu_ops(g, u)
    return run_swiglu(_build("swiglu"), gu)


def run_swiglu(kernel, gu, warps: int = SWIGLU_WARPS):
    """Launch a built swiglu kernel (shapes as `swiglu`)."""
    two_i = gu.shape[-1]
    I = two_i // 2
    rows = gu.size // two_i
    per_block = 32 * warps
    blocks = -(-I // per_block)
    return kernel(
        inputs=[gu],
        template=[("I", I), ("W", warps), ("T", gu.dtype)],
        grid=(32 * rows, warps * blocks, 1),
        threadgroup=(32, warps, 1),
        output_shapes=[(*gu.shape[:-1], I)],
        output_dtypes=[gu.dtype],
    )[0]


def _swiglu_ops(gate: mx.array, up: mx.array) -> mx.array:
    return gate * mx.sigmoid(gate) * up


# silu(gate) * up as one compiled elementwise kernel (the ops path; shapeless: one trace).
swiglu_ops = mx.compile(_swiglu_ops, shapeless=True)
