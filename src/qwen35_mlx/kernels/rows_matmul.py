"""A few rows through a matrix, the matrix read once: y[R, N] = x[R, K] @ W[N, K]^T, R = 1..8.

One GPU kernel, one text for Metal and CUDA. Each warp (SIMD-group) owns C output columns n and
all R rows: lane l loads W's row n in chunks of NPT elements at k = NPT l + 32 NPT i, and adds
each chunk times the R rows' matching x elements into R fp32 sums; the warp then sums its lanes
(the butterfly's tree, halving the values at each level). Every W element is loaded once,
whatever R: where a batched matrix-vector form (W broadcast over the rows) reads W R times.

The order of the sums is that of MLX's CUDA gemv (`backend/cuda/gemms/gemv.cu`: one warp an
output, NPT 4 where K % 128 == 0, 2 where K % 64 == 0, else 1, fp32 sums, a warp butterfly),
which MLX runs for a one-row `x @ W.T`: so each row's output equals that one-row product's bit
for bit (16-bit inputs: their products are exact in fp32, so no FMA question either).

Shapes: x [R, K] or [R, K, 1] (the rows as column vectors) in T; W [N, K] row-major in T (the
same dtype: bf16, fp16 or fp32); y [R, N] or [R, N, 1], as x, in T.
- `rows_matmul(x, w)`: W given as [N, K] (MLX makes the inputs row-contiguous first).
- `rows_matmul_t(x, w_t)`: W given as its transposed view [K, N], the layout of a decode weight
  (`x @ w_t`): the kernel reads the buffer under that view as W [N, K], with no copy and no
  view made. So w_t must be the transpose of a row-contiguous [N, K] array and x row-contiguous:
  the caller guarantees it (inputs are passed as they are, `ensure_row_contiguous=False`).
Both run where a GPU backend is and the default device is the GPU (`kernel_available`); on the
CPU they are `x @ W.T` (MLX's ops), so callers need no branch.
The body is plain C++ over the gated-delta kernels' helpers (their `HEADER`s: gd_shuffle)
and two of its own per backend, `rm_aligned<NPT>(p)` and `rm_load<NPT, VEC>(p, out)` (NPT
elements from p into floats: one vector load on CUDA where x and W are aligned for it), and
three names the prologue defines:
    rm_lane   lane in the warp (0..31)   rm_warp   warp in the threadgroup   rm_block   threadgroup
Launch: threadgroups of (32, WARPS) threads along the grid's x, ceil(N / (WARPS C)) of them.

The "ahead" variant (`AHEAD` > 0, its own body and header; the first kernel's text unchanged):
the same sums in the same order, built for W's bandwidth: one column a warp up to 4 rows (two
above), 8 warps a threadgroup, the k loop taken U chunks at a time (`chunks_ahead`), x staged
in threadgroup memory where it fits (so a lane's global loads in the loop are W's alone, and
the compiler keeps several in flight) while each lane asks L2 for its first U W chunks.
"""

from __future__ import annotations

import mlx.core as mx

from . import gpu_backend_name
from .positions import prologue

# At most this many rows (a verify pass's tokens at batch 1, a small decode batch).
MAX_ROWS = 8
# Warps a threadgroup, and output columns a warp. C 1 is MLX's gemv layout (a warp an output);
# C 2 loads each x chunk once for two columns.
WARPS = 4
COLUMNS = 2
# The "ahead" variant (`AHEAD_BODY`): 0 off (the kernel above), else the W chunks a lane loads
# before using the first (U, at most this; see `chunks_ahead`), with AHEAD_WARPS warps a
# threadgroup (MLX's gemv: 8, one output a warp) and AHEAD_COLUMNS columns a warp (0: one up to
# 4 rows, as the gemv; two above, so that a warp's x loads, L1 hits, stay under twice its W
# loads: each x chunk is loaded once a warp a row).
AHEAD = 0
AHEAD_WARPS = 8
AHEAD_COLUMNS = 0

# The k loop, once with vector loads (x and W aligned for them) and once without: a branch on
# alignment at each load would keep the compiler from issuing the loads ahead.
_LOOP = """
    for (int k = NPT * int(rm_lane); k < K; k += 32 * NPT) {{
      float rm_x[R][NPT];
#pragma unroll
      for (int r = 0; r < R; ++r) {{
        rm_load<NPT, {vec}>(x + size_t(r) * K + k, rm_x[r]);
      }}
#pragma unroll
      for (int c = 0; c < C; ++c) {{
        // The last warp's columns past N read row N - 1 again (never stored).
        const int n = rm_n0 + c < N ? rm_n0 + c : N - 1;
        float rm_w[NPT];
        rm_load<NPT, {vec}>(w + size_t(n) * K + k, rm_w);
#pragma unroll
        for (int r = 0; r < R; ++r) {{
#pragma unroll
          for (int j = 0; j < NPT; ++j) {{
            rm_acc[c * R + r] += rm_w[j] * rm_x[r][j];
          }}
        }}
      }}
    }}
"""


# The warp's sums: the C R values (padded to P, a power of two) summed over the 32 lanes with
# the butterfly's tree (offsets 16, 8, .., 1; each partial sum the same two operands as
# gd_group_sum's), but halving the values at each step while more than one is left: at offset
# o a lane keeps one of each pair (by its bit o) and adds the partner's, so P - 1 + (5 - log2 P)
# shuffles instead of 5 P. Then lane l holds value q = sum_j bit(16 >> j of l) << j, as do the
# lanes that differ from it in the butterfly's bits (below 32 / P); the one with those bits 0
# stores it.
# One step of that sum, at offset o (the j-th): halving while the values left (RM_P >> j) are
# two or more, else the butterfly's step. Written out for each offset (constant bounds: the
# values stay in registers).
def _vector_or_scalar(aligned: str, fragment: str) -> str:
    """`fragment` twice in one branch: its 16-byte-load build where `aligned` holds, its
    element-by-element build otherwise."""
    return (
        f"    if ({aligned}) {{"
        + fragment.format(vec="true")
        + "    } else {"
        + fragment.format(vec="false")
        + "    }\n"
    )


_STEP = """
    if (RM_P >= {size}) {{
      const bool hi = (rm_l & {o}) != 0;
      rm_q |= int(hi) << {j};
#pragma unroll
      for (int i = 0; i < RM_P / {size}; ++i) {{
        const float keep = hi ? rm_acc[2 * i + 1] : rm_acc[2 * i];
        const float send = hi ? rm_acc[2 * i] : rm_acc[2 * i + 1];
        rm_acc[i] = keep + gd_shuffle(send, rm_l ^ {o});
      }}
    }} else {{
      rm_acc[0] += gd_shuffle(rm_acc[0], rm_l ^ {o});
    }}
"""

BODY = (
    """
  // x: [R, K] in T; w: W [N, K] row-major in T; y: [R, N] in T. A warp: C columns, all R rows.
  constexpr int RM_V = R * C;
  constexpr int RM_P = RM_V <= 1 ? 1 : RM_V <= 2 ? 2 : RM_V <= 4 ? 4 : RM_V <= 8 ? 8
                     : RM_V <= 16 ? 16 : 32;
  const int rm_n0 = (int(rm_block) * W + int(rm_warp)) * C;
  if (rm_n0 < N) {
    float rm_acc[RM_P];  // [c R + r]; past R C: zeros
#pragma unroll
    for (int i = 0; i < RM_P; ++i) {
      rm_acc[i] = 0.0f;
    }
"""
    + _vector_or_scalar("rm_aligned<NPT>(x) && rm_aligned<NPT>(w)", _LOOP)
    + """    const int rm_l = int(rm_lane);
    int rm_q = 0;
"""
    + "".join(_STEP.format(o=16 >> j, j=j, size=2 << j) for j in range(5))
    + """    const int rm_c = rm_q / R, rm_r = rm_q % R;
    if ((rm_l & (32 / RM_P - 1)) == 0 && rm_q < RM_V && rm_n0 + rm_c < N) {
      y[size_t(rm_r) * N + rm_n0 + rm_c] = static_cast<T>(rm_acc[0]);
    }
  }
"""
)

# The "ahead" variant (AHEAD > 0): the same sums in the same order, the k loop taken U chunks
# at a time, each lane issuing its U W loads (U NPT elements a column, U 8-byte loads in bf16 at
# NPT 4) before the first is used, then the chunks' products in k order. The first kernel's
# loop issues one W load a column and waits for it (K a template constant, but the compiler
# does not hoist loads over the adds it feeds), so few bytes of W are in flight a warp: that,
# and a quarter of the broadcast gemv's warps at R 2 (C 2 against one warp an output and row),
# is why its reads ran below the gemv's on the H200. The lanes' chunks past the last full group
# of U (K / (32 NPT) not a multiple of U, or K % (32 NPT) != 0) run one at a time after.
_AHEAD_GROUP = """
    for (; k + (U - 1) * RM_STEP < RM_FULL_K; k += U * RM_STEP) {{
#pragma unroll
      for (int c = 0; c < C; ++c) {{
        const int n = rm_n0 + c < N ? rm_n0 + c : N - 1;
#pragma unroll
        for (int u = 0; u < U; ++u) {{
          rm_load<NPT, {vec}>(w + size_t(n) * K + k + u * RM_STEP, rm_w[c][u]);
        }}
      }}
#pragma unroll
      for (int u = 0; u < U; ++u) {{
        float rm_x[R][NPT];
#pragma unroll
        for (int r = 0; r < R; ++r) {{
          if (RM_XS) {{
            rm_load_tg<NPT, {vec}>(rm_xs + size_t(r) * K + k + u * RM_STEP, rm_x[r]);
          }} else {{
            rm_load<NPT, {vec}>(x + size_t(r) * K + k + u * RM_STEP, rm_x[r]);
          }}
        }}
#pragma unroll
        for (int c = 0; c < C; ++c) {{
#pragma unroll
          for (int r = 0; r < R; ++r) {{
#pragma unroll
            for (int j = 0; j < NPT; ++j) {{
              rm_acc[c * R + r] += rm_w[c][u][j] * rm_x[r][j];
            }}
          }}
        }}
      }}
    }}
    for (; k < K; k += RM_STEP) {{
      float rm_x[R][NPT];
#pragma unroll
      for (int r = 0; r < R; ++r) {{
        if (RM_XS) {{
          rm_load_tg<NPT, {vec}>(rm_xs + size_t(r) * K + k, rm_x[r]);
        }} else {{
          rm_load<NPT, {vec}>(x + size_t(r) * K + k, rm_x[r]);
        }}
      }}
#pragma unroll
      for (int c = 0; c < C; ++c) {{
        const int n = rm_n0 + c < N ? rm_n0 + c : N - 1;
        rm_load<NPT, {vec}>(w + size_t(n) * K + k, rm_w[c][0]);
#pragma unroll
        for (int r = 0; r < R; ++r) {{
#pragma unroll
          for (int j = 0; j < NPT; ++j) {{
            rm_acc[c * R + r] += rm_w[c][0][j] * rm_x[r][j];
          }}
        }}
      }}
    }}
"""

# The ahead variant's staging of x: where its R K elements fit in RM_XS_BYTES, the threadgroup
# copies x into threadgroup memory first (rm_copy_x: 16-byte pieces where it can) and the k
# loops read it there: then the only loads from global memory in the loops are W's, and the
# compiler keeps ~6 of a lane's W chunks in flight (sm_90 SASS, R 2) where with x's loads
# beside them it kept 2 (MLX's gemv: 4). Before the early exit: every thread meets the barrier.
# While x is copied, each lane asks L2 for the lines of its first U W chunks (gd_prefetch; none
# on Metal), so that the copy's round trip and the first W loads' overlap.
_STAGE_X = """  constexpr bool RM_XS = R * K * sizeof(T) <= RM_XS_BYTES;
  rm_align16 gd_threadgroup T rm_xs[RM_XS ? R * K : 1];
  if (RM_XS) {
    if (rm_n0 < N) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int n = rm_n0 + c < N ? rm_n0 + c : N - 1;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int k = NPT * int(rm_lane) + u * 32 * NPT;
          if (k < K) {
            gd_prefetch(w + size_t(n) * K + k);
          }
        }
      }
    }
    rm_copy_x<R * K>(x, rm_xs, int(rm_warp) * 32 + int(rm_lane), 32 * W);
    gd_threadgroup_barrier();
  }
"""
_PREFIX = BODY.split("    if (rm_aligned<NPT>(x)")[0]
AHEAD_BODY = (
    _PREFIX.replace("  if (rm_n0 < N) {", _STAGE_X + "  if (rm_n0 < N) {")
    + """    // k: this lane's next chunk; RM_FULL_K: the end of the chunks every lane has.
    constexpr int RM_STEP = 32 * NPT, RM_FULL_K = K / RM_STEP * RM_STEP;
    int k = NPT * int(rm_lane);
    float rm_w[C][U][NPT];
"""
    + _vector_or_scalar("(RM_XS || rm_aligned<NPT>(x)) && rm_aligned<NPT>(w)", _AHEAD_GROUP)
    + """    const int rm_l = int(rm_lane);
    int rm_q = 0;
"""
    + BODY.split("    int rm_q = 0;\n")[1]
)

CUDA_HEADER = """
// Whether p (a row start; rows of K elements) is aligned for loads of NPT elements.
template <int NPT, typename T>
__device__ __forceinline__ bool rm_aligned(const T* p) {
  return (reinterpret_cast<size_t>(p) & (NPT * sizeof(T) - 1)) == 0;
}

// NPT consecutive elements of p as floats: VEC, one load of NPT * sizeof(T) bytes (p aligned
// to that), else element by element (x or W at an odd offset; the same values).
template <int NPT, bool VEC, typename T>
__device__ __forceinline__ void rm_load(const T* p, float* out) {
  struct alignas(NPT * sizeof(T)) Chunk {
    T v[NPT];
  };
  if (VEC) {
    const Chunk u = *reinterpret_cast<const Chunk*>(p);
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
      out[j] = static_cast<float>(u.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < NPT; ++j) {
      out[j] = static_cast<float>(p[j]);
    }
  }
}
"""

METAL_HEADER = """
template <int NPT, typename T>
inline bool rm_aligned(const device T* p) {
  return true;  // (loads are element by element)
}

template <int NPT, bool VEC, typename T>
inline void rm_load(const device T* p, thread float* out) {
  for (int j = 0; j < NPT; ++j) {
    out[j] = static_cast<float>(p[j]);
  }
}
"""

# The ahead variant's helpers (its header only: the first kernel's stays as it was).
# RM_XS_BYTES: x staged in threadgroup memory where its R K elements take at most this (CUDA
# 48 KB, the static limit: R 2 at K 12288 in bf16, 9B's down_proj; 4 threadgroups of 8 warps
# an SM there. Metal 32 KB, Apple GPUs' threadgroup memory).
# rm_copy_x<NX>(x, xs, t, threads): the threadgroup's threads (t of threads) copy x's NX
# elements; 16-byte pieces where x is aligned to 16 and NX fills them, else element by element.
# rm_load_tg: rm_load from the copy.
AHEAD_CUDA_HEADER = """
#define rm_align16 __align__(16)
#ifndef RM_XS_BYTES
#define RM_XS_BYTES 49152
#endif
struct alignas(16) RmPiece {
  unsigned int v[4];
};
template <int NX, typename T>
__device__ __forceinline__ void rm_copy_x(const T* x, T* xs, int t, int threads) {
  constexpr int PER = 16 / sizeof(T);
  if (NX % PER == 0 && (reinterpret_cast<size_t>(x) & 15) == 0) {
    const RmPiece* src = reinterpret_cast<const RmPiece*>(x);
    RmPiece* dst = reinterpret_cast<RmPiece*>(xs);
    for (int i = t; i < NX / PER; i += threads) {
      dst[i] = src[i];
    }
  } else {
    for (int i = t; i < NX; i += threads) {
      xs[i] = x[i];
    }
  }
}

// rm_load from the staged copy (Metal: a threadgroup pointer).
template <int NPT, bool VEC, typename T>
__device__ __forceinline__ void rm_load_tg(const T* p, float* out) {
  rm_load<NPT, VEC>(p, out);
}
"""

AHEAD_METAL_HEADER = """
#define rm_align16
#define RM_XS_BYTES 32768
template <int NX, typename T>
inline void rm_copy_x(const device T* x, threadgroup T* xs, int t, int threads) {
  for (int i = t; i < NX; i += threads) {
    xs[i] = x[i];
  }
}

template <int NPT, bool VEC, typename T>
inline void rm_load_tg(const threadgroup T* p, thread float* out) {
  for (int j = 0; j < NPT; ++j) {
    out[j] = static_cast<float>(p[j]);
  }
}
"""

# The thread's lane and warp, the threadgroup's block of output columns.
_POSITIONS = {"rm_lane": "thread.x", "rm_warp": "thread.y", "rm_block": "threadgroup.x"}

INPUTS = ["x", "w"]
OUTPUTS = ["y"]


def kernel_source(backend: str, ahead: bool = False) -> str:
    """The full `source=` for backend "cuda" or "metal": prologue + body (ahead: the "ahead"
    variant's body, which takes one more template constant, U)."""
    return prologue(backend, **_POSITIONS) + (AHEAD_BODY if ahead else BODY)


def header(backend: str, ahead: bool = False) -> str:
    """The `header=` for backend "cuda" or "metal": the gated-delta helpers + `rm_load` (ahead:
    + the ahead variant's helpers)."""
    if backend == "cuda":
        from .gated_delta.cuda import HEADER

        return HEADER + CUDA_HEADER + (AHEAD_CUDA_HEADER if ahead else "")
    from .gated_delta.metal import HEADER

    return HEADER + METAL_HEADER + (AHEAD_METAL_HEADER if ahead else "")


# (backend, inputs made row-contiguous) -> kernel object.
_built: dict[tuple, object] = {}


def _build(contiguous: bool, ahead: bool = False):
    kind = gpu_backend_name()
    if (kind, contiguous, ahead) not in _built:
        # One name for both layouts: the same binary (the disk cache compiles it once).
        name = "qm_rows_matmul_ahead" if ahead else "qm_rows_matmul"
        kw = dict(name=name, input_names=INPUTS, output_names=OUTPUTS)
        kw.update(source=kernel_source(kind, ahead), header=header(kind, ahead))
        if kind == "cuda":
            from .gated_delta import precompiled

            k = precompiled.cuda_kernel(**kw, ensure_row_contiguous=contiguous)
        else:
            k = mx.fast.metal_kernel(**kw, ensure_row_contiguous=contiguous)
        _built[kind, contiguous, ahead] = k
    return _built[kind, contiguous, ahead]


def kernel_available(dtype) -> bool:
    """Whether the kernel runs for activations of `dtype`: a GPU backend, the default device a
    GPU, bf16, fp16 or fp32."""
    return (
        mx.default_device() != mx.cpu
        and dtype in (mx.bfloat16, mx.float16, mx.float32)
        and gpu_backend_name() is not None
    )


def takes(x: mx.array, w: mx.array, K: int) -> bool:
    """Whether `rows_matmul` / `_t` run the kernel for x (K its row length) and weight w: a GPU,
    1..MAX_ROWS rows, w 2-D of x's dtype."""
    rows = x.size // K if K else 0
    return (
        w.ndim == 2
        and x.dtype == w.dtype
        and 1 <= rows <= MAX_ROWS
        and x.shape[-1] in (K, 1)
        and kernel_available(x.dtype)
    )


def elements_a_load(K: int) -> int:
    """NPT: the elements a lane loads at once, as MLX's gemv picks it for a row of K."""
    return 4 if K % 128 == 0 else 2 if K % 64 == 0 else 1


def chunks_ahead(K: int, ahead: int) -> int:
    """U of the "ahead" variant for a row of K: at most `ahead` and the chunks every lane has
    (K // (32 NPT)), the largest such that divides them if one above ahead / 2 does (no
    chunks left for the one-at-a-time loop), else the most."""
    chunks = max(1, K // (32 * elements_a_load(K)))
    most = max(1, min(ahead, chunks))
    for u in range(most, most // 2, -1):
        if chunks % u == 0:
            return u
    return most


def _out_shape(x: mx.array, K: int, N: int) -> tuple:
    """x [..., K] -> [..., N]; x [R, K, 1] (columns) -> [R, N, 1]."""
    if x.ndim == 3 and x.shape[1:] == (K, 1):
        return (x.shape[0], N, 1)
    return (*x.shape[:-1], N)


def launch(
    kernel, x, w, K: int, N: int, columns: int = COLUMNS, init_value=None, out_shape=None,
    ahead: int = 0, warps: int = WARPS,
):  # fmt: skip
    """Run a built kernel: x (R rows of K, any of the accepted shapes), w the weight input as
    the kernel object takes it; returns y in x's form, or out_shape (any shape of R N
    elements: the kernel writes rows) (init_value: y's value before the kernel, for tests).
    ahead: 0 for the first kernel, else the "ahead" variant's kernel, U = chunks_ahead(K,
    ahead); warps: a threadgroup's."""
    R = x.size // K
    warps_needed = -(-N // columns)
    blocks = -(-warps_needed // warps)
    template = [("R", R), ("K", K), ("N", N), ("C", columns), ("NPT", elements_a_load(K))]
    template += [("W", warps), ("T", x.dtype)]
    if ahead:
        template.insert(-1, ("U", chunks_ahead(K, ahead)))
    return kernel(
        inputs=[x, w],
        template=template,
        grid=(32 * blocks, warps, 1),
        threadgroup=(32, warps, 1),
        output_shapes=[out_shape or _out_shape(x, K, N)],
        output_dtypes=[x.dtype],
        init_value=init_value,
    )[0]


def rows_matmul(x: mx.array, w: mx.array) -> mx.array:
    """x [R, K] (or [R, K, 1]) @ W.T with W = w [N, K]: one kernel reading W once on a GPU,
    else the ops."""
    N, K = w.shape
    if not takes(x, w, K):
        y = x.reshape(-1, K) @ w.T
        return y.reshape(_out_shape(x, K, N))
    return _launch_as_set(x, w, K, N, contiguous=True)


def rows_matmul_t(x: mx.array, w_t: mx.array, out_shape: tuple | None = None) -> mx.array:
    """x [R, K] (or [R, K, 1]) @ w_t, w_t [K, N] the transposed view of a row-contiguous
    W [N, K], x row-contiguous (not checked: see the module docstring). One kernel reading W's
    buffer once, with no copy; on the CPU the ops. out_shape: y's shape (R N elements, rows in
    order), else x's form."""
    K, N = w_t.shape
    if not takes(x, w_t, K):
        y = x.reshape(-1, K) @ w_t
        return y.reshape(out_shape or _out_shape(x, K, N))
    return _launch_as_set(x, w_t, K, N, contiguous=False, out_shape=out_shape)


def _launch_as_set(x, w, K: int, N: int, contiguous: bool, out_shape=None) -> mx.array:
    """The kernel AHEAD picks (read at each call: under `mx.compile`, when traced)."""
    if not AHEAD:
        return launch(_build(contiguous), x, w, K, N, out_shape=out_shape)
    kernel = _build(contiguous, ahead=True)
    columns = AHEAD_COLUMNS or (1 if x.size // K <= 4 else 2)
    return launch(kernel, x, w, K, N, columns, out_shape=out_shape, ahead=AHEAD, warps=AHEAD_WARPS)
