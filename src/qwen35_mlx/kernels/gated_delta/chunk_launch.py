"""Host side of the chunked gated-delta GPU kernels (`chunk_source.py`): the helpers they need
beyond `metal.py` / `cuda.py`, their builds, and `gated_delta_chunk_kernel`.

Work split (benchmarks/NOTES.md "Chunked GPU kernel"):
  prep    parallel over every chunk and head: the decays, k k^T and q k^T, the unit-lower-
          triangular solve for U and W, Qg, Kw (PREP_BODY, scalar gates). Per-key gates use the
          MLX-ops pieces of `chunked.py` instead (not the Qwen3.5 path; correctness only).
  state   one threadgroup per (batch x value head, BV value rows) loops over the chunks with
          its state tile on chip and writes y and the final state (STATE_BODY).
The split path (SPLIT, scalar gates; split_chunk_kernel) replaces both with three kernels on the
tile layer: WY (per chunk x head: the blocked (I + A)^-1, W, U, Kw in the activations' dtype),
the state pass (per head x value tile, state on chip, writing each chunk's start state H and
delta) and the output pass (per chunk x head x value tile). Each has a newer body behind a
switch (WY2, H2, O2 with O2_P16 / O2_RING; MMA16 for the tile layer's 16-bit products), the
older one kept for A/B timings (benchmarks/chunk_split_gpu.py --ab).
Both have a matrix-unit variant behind MATRIX (the prep's k k^T / q k^T, and STATE_MMA_BODY),
over the tile layer `_TILES`: tensor cores (mma.sync tf32 by inline PTX) on CUDA, simdgroup
matrices on Metal, one kernel text for both.
Shapes as everywhere in the module: q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g [B, T, Hv] or
[B, T, Hv, Dk]; beta [B, T, Hv]; state [B, Hv, Dv, Dk] fp32; mask [B, T] bool.
"""

from __future__ import annotations

import mlx.core as mx

from ..positions import prologue
from . import chunk_source as src
from . import cuda, metal
from .launch import shape_supported

CHUNK = 64  # steps per chunk (PREP_BODY needs a multiple of 16)
BV = 16  # value rows per state-pass threadgroup: B * Hv * Dv / 16 threadgroups
STATE_THREADS = 256
PREP_THREADS = 256  # PREP_BODY's 16 x 16 tile grid
KEY_SLICE = 32  # key columns staged at a time in PREP_BODY
# The chunk kernels on matrix units (tensor cores on CUDA, simdgroup matrices on Metal): the
# prep kernel's k k^T and q k^T (PREP_BODY with GD_MMA) and the state pass (STATE_MMA_BODY)
# instead of fp32 lanes. Off until the lead's H200 run (`benchmarks/chunk_mma_gpu.py`) has
# checked them against the reference there: the CPU lane emulator and the sm_90 / Metal-stub
# compiles are all this machine can check.
MATRIX = False
MMA_BV = 16  # value rows per threadgroup of STATE_MMA_BODY (a multiple of 16)
# BV = 32 halves the threadgroups' reads of the pieces (each reads the whole chunk's W, Qg, Kw,
# P for its value rows) but needs 43.5 KB of threadgroup memory at Dk = 128: CUDA only (48 KB),
# Dk <= 128.
MMA_BV_CHOICES = {"metal": (16,), "cuda": (16, 32)}


def mma_threads(bv: int = MMA_BV, C: int = CHUNK) -> int:
    """STATE_MMA_BODY's threads: one warp per (16 rows of the chunk, 16 value rows)."""
    return 32 * (C // 16) * (bv // 16)


MMA_THREADS = mma_threads()
# The state pass prefetches the next chunk's rows into L2 (CUDA; a no-op on Metal). Not yet
# measured against 0: `benchmarks/run_gpu.sh chunk-parts` times both.
PREFETCH = 1

# Helpers of the chunk kernels on each backend (added to that backend's header).
_EXTRA_HEADER = {
    "metal": """
#define GD_TG threadgroup
#define GD_TG_PTR threadgroup
inline void gd_barrier() {
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
inline float4 gd_f4(float x, float y, float z, float w) {
  return float4(x, y, z, w);
}
// Staged tile copies (H_BODY, O2_BODY): a synchronous copy that widens to float (the tile
// layer's simdgroup_load reads threadgroup floats); gd_copy_commit / gd_copy_wait do nothing.
#define GD_TG16 threadgroup
template <typename T>
using gd_staged = float;
template <int NT, int R, int CL, typename D, typename S>
inline void gd_copy_tile(D dst, int dld, S src, size_t sld, int rmax, int tid, int cmax = CL) {
  for (int e = tid; e < R * CL; e += NT) {
    const int r = e / CL < rmax ? e / CL : rmax;
    const int c = e % CL < cmax ? e % CL : cmax - 1;
    dst[(e / CL) * dld + e % CL] = float(src[r * sld + c]);
  }
}
inline void gd_copy_commit() {}
template <int N>
inline void gd_copy_wait() {}
""",
    "cuda": """
#define GD_TG __shared__
#define GD_TG_PTR
__device__ __forceinline__ void gd_barrier() {
  __syncthreads();
}
__device__ __forceinline__ float4 gd_f4(float x, float y, float z, float w) {
  return make_float4(x, y, z, w);
}
// Staged tile copies (H_BODY, O2_BODY, WY2_BODY): an R x CL tile, row r read from src + min(r,
// rmax) sld; columns at or past cmax (a multiple of 8 elements) hold copies of other columns of
// the row below cmax (callers select them away).
// cp.async (sm_80+) copies the bytes as they are, 16 at a time, from device to threadgroup
// memory without passing through registers; a thread's copies since the last gd_copy_commit()
// form a group, and gd_copy_wait<N>() waits until at most N of its groups are still in flight
// (a barrier after it makes every thread's copies visible).
#define GD_TG16 __shared__ __align__(16)
template <typename T>
using gd_staged = T;
template <int NT, int R, int CL, typename D, typename S>
__device__ __forceinline__ void gd_copy_tile(D dst, int dld, S src, size_t sld, int rmax, int tid,
                                             int cmax = CL) {
  constexpr int V = 16 / int(sizeof(*src));  // elements of a 16-byte copy
  static_assert(CL % V == 0, "gd_copy_tile: whole 16-byte copies a row");
  constexpr int U = R * CL / V;  // copies of the tile
"""
    + src.COPY_TILE_LOOP
    + """    const int cs = c < cmax ? c : cmax - V;
    asm volatile(
        "{ .reg .u64 s; .reg .u32 a; cvta.to.shared.u64 s, %0; cvt.u32.u64 a, s;"
        "  cp.async.cg.shared.global [a], [%1], 16; }" ::"l"(dst + r * dld + c),
        "l"(src + rs * sld + cs));
  }
}
__device__ __forceinline__ void gd_copy_commit() {
  asm volatile("cp.async.commit_group;");
}
template <int N>
__device__ __forceinline__ void gd_copy_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
""",
}
# The tile layer of STATE_MMA_BODY: a warp (SIMD-group) holds a 16 x 16 fp32 accumulator tile
# (`gd_acc`) and adds A B to it, A [16 x K] and B [K x 16] read from threadgroup or device
# memory (K a multiple of 8):
#   gd_acc_zero(acc); gd_acc_load(acc, p, ld); gd_acc_store(acc, p, ld)   C(i, j) = p[i ld + j]
#   gd_acc_scale(acc, s)   C *= s
#   gd_mma<MP, TA, TB>(acc, A, lda, B, ldb, K)   C += A B with
#       A(i, k) = A[i lda + k] (TA: A[k lda + i]), B(k, j) = B[k ldb + j] (TB: B[j ldb + k])
# Every lane of the warp calls them together (uniform control flow). MP: operand precision on
# CUDA's tensor cores (mma.sync m16n8k8, tf32 operands, fp32 accumulation): 1 rounds each
# operand to tf32 (10-bit mantissa); 3 splits it into tf32 high + low parts and adds three
# products (hi hi + hi lo + lo hi), about fp32's precision at three times the work. Metal's
# simdgroup 8 x 8 float matrices multiply in fp32 (MP has no effect). The CPU lane emulator
# (tests/kernels/lane_emulator.h) implements the same four operations with CUDA's fragment
# layout and the same tf32 roundings.
_TILES = {
    "metal": """
#if defined(__METAL_VERSION__)
#include <metal_simdgroup_matrix>
#endif
struct gd_acc {
  simdgroup_float8x8 m[2][2];  // [row half][column half]
};
inline void gd_acc_zero(thread gd_acc& x) {
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      x.m[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }
}
template <typename P>
inline void gd_acc_load(thread gd_acc& x, P p, int ld) {
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      simdgroup_load(x.m[i][j], p + 8 * i * ld + 8 * j, ulong(ld));
    }
  }
}
template <typename P>
inline void gd_acc_store(thread gd_acc& x, P p, int ld) {
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      simdgroup_store(x.m[i][j], p + 8 * i * ld + 8 * j, ulong(ld));
    }
  }
}
template <int MP, bool TA, bool TB, typename PA, typename PB>
inline void gd_mma(thread gd_acc& x, PA A, int lda, PB B, int ldb, int K) {
  for (int k0 = 0; k0 < K; k0 += 8) {
    simdgroup_float8x8 a[2];
    simdgroup_float8x8 b[2];
    for (int i = 0; i < 2; ++i) {
      // transpose_matrix = true: element (r, c) of the 8 x 8 block is p[c * ld + r].
      simdgroup_load(a[i], TA ? A + k0 * lda + 8 * i : A + 8 * i * lda + k0, ulong(lda),
                     ulong2(0, 0), TA);
      simdgroup_load(b[i], TB ? B + 8 * i * ldb + k0 : B + k0 * ldb + 8 * i, ulong(ldb),
                     ulong2(0, 0), TB);
    }
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        simdgroup_multiply_accumulate(x.m[i][j], a[i], b[j], x.m[i][j]);
      }
    }
  }
}
// acc *= s: by the diagonal matrix s I (simdgroup_matrix(T) fills the diagonal).
inline void gd_acc_scale(thread gd_acc& x, float s) {
  const simdgroup_float8x8 d(s);
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      simdgroup_multiply(x.m[i][j], x.m[i][j], d);
    }
  }
}
// Operands staged in threadgroup memory (floats on Metal): gd_mma.
template <int MP, bool TA, bool TB, typename PA, typename PB>
inline void gd_mma_staged(thread gd_acc& x, PA A, int lda, PB B, int ldb, int K) {
  gd_mma<MP, TA, TB>(x, A, lda, B, ldb, K);
}
""",
    "cuda": """
// Fragments of mma.m16n8k8 (PTX ISA), lane = 4 g + t: A a0 (g, t), a1 (g + 8, t), a2 (g, t + 4),
// a3 (g + 8, t + 4); B b0 (t, g), b1 (t + 4, g); C c0, c1 (g, 2 t + {0, 1}), c2, c3 (g + 8, ...).
// Within each step of 8, operand slot t stands for k0 + 2 t and slot t + 4 for k0 + 2 t + 1 in
// both A and B (a dot product does not depend on the order of its terms), so a lane reads two
// adjacent k of a row.
struct gd_acc {
  float c[2][4];  // [column half][c0..c3]
};
__device__ __forceinline__ unsigned gd_tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ void gd_mma_m16n8k8(float* c, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void gd_acc_zero(gd_acc& x) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int e = 0; e < 4; ++e) x.c[h][e] = 0.0f;
  }
}
__device__ __forceinline__ void gd_acc_scale(gd_acc& x, float s) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int e = 0; e < 4; ++e) x.c[h][e] *= s;
  }
}
template <typename P>
__device__ __forceinline__ void gd_acc_load(gd_acc& x, P p, int ld) {
  const int g = (threadIdx.x & 31) >> 2;
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int e = 0; e < 4; ++e) x.c[h][e] = p[(g + 8 * (e >> 1)) * ld + 8 * h + 2 * t + (e & 1)];
  }
}
template <typename E>
__device__ __forceinline__ void gd_acc_store(gd_acc& x, E* p, int ld) {
  const int g = (threadIdx.x & 31) >> 2;
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      p[(g + 8 * (e >> 1)) * ld + 8 * h + 2 * t + (e & 1)] = static_cast<E>(x.c[h][e]);
    }
  }
}
template <int MP, bool TA, bool TB, typename PA, typename PB>
__device__ __forceinline__ void gd_mma(gd_acc& x, PA A, int lda, PB B, int ldb, int K) {
  static_assert(MP == 1 || MP == 3, "MP: 1 (tf32) or 3 (3 x tf32)");
  const int g = (threadIdx.x & 31) >> 2;
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 8) {
    float af[4];
    float bf[2][2];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = g + 8 * (e & 1);
      const int k = k0 + 2 * t + (e >> 1);
      af[e] = static_cast<float>(TA ? A[k * lda + i] : A[i * lda + k]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = 8 * h + g;
        const int k = k0 + 2 * t + e;
        bf[h][e] = static_cast<float>(TB ? B[j * ldb + k] : B[k * ldb + j]);
      }
    }
    unsigned ah[4];
    unsigned al[4];
    unsigned bh[2][2];
    unsigned bl[2][2];
    // 16-bit operands (bf16 / fp16 staged pieces) are exact in tf32: no rounding, no low part
    constexpr bool XA = sizeof(A[0]) == 2;
    constexpr bool XB = sizeof(B[0]) == 2;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      ah[e] = XA ? __float_as_uint(af[e]) : gd_tf32(af[e]);
      al[e] = MP == 3 && !XA ? gd_tf32(af[e] - __uint_as_float(ah[e])) : 0u;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        bh[h][e] = XB ? __float_as_uint(bf[h][e]) : gd_tf32(bf[h][e]);
        bl[h][e] = MP == 3 && !XB ? gd_tf32(bf[h][e] - __uint_as_float(bh[h][e])) : 0u;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (MP == 3 && !XA) gd_mma_m16n8k8(x.c[h], al, bh[h]);
      if (MP == 3 && !XB) gd_mma_m16n8k8(x.c[h], ah, bl[h]);
      gd_mma_m16n8k8(x.c[h], ah, bh[h]);
    }
  }
}
// gd_mma_staged: gd_mma with both operands in threadgroup memory. Where they are the same
// 16-bit type (the staged bf16 / fp16 pieces) and GD_MMA16 is on, the fragments come by ldmatrix
// (one .x4 a 16 x 16 operand a step of 16; .trans where the stored rows run along k) into
// mma.m16n8k16 (bf16 / fp16 products, exact in fp32, fp32 accumulation): per 16 of K a warp
// issues 2 ldmatrix + 2 mma instead of 16 16-bit loads, their widening and 4 mma. Fragments as
// the PTX ISA's: A a0..a3 = (g, 2t..2t+1), (g + 8, ..), (g, 8 + 2t..), (g + 8, 8 + 2t..); B
// b0, b1 = (k 2t..2t+1, n g), (k 8 + 2t.., n g); C as m16n8k8's. Needs K a multiple of 16 and
// every 8-element row segment read 16-byte aligned (row strides and tile offsets multiples of
// 8 elements). Otherwise (float operands, or GD_MMA16 0) it is gd_mma.
#ifndef GD_MMA16
#define GD_MMA16 1
#endif
__host__ __device__ constexpr int gd_kind16(const void*) {
  return 0;
}
__host__ __device__ constexpr int gd_kind16(const __nv_bfloat16*) {
  return 1;
}
__host__ __device__ constexpr int gd_kind16(const __half*) {
  return 2;
}
template <bool TR>
__device__ __forceinline__ void gd_ldmatrix4(unsigned* r, const void* p) {
  unsigned a;
  asm("{ .reg .u64 s; cvta.to.shared.u64 s, %1; cvt.u32.u64 %0, s; }" : "=r"(a) : "l"(p));
"""
    + src.LDMATRIX4
    + """}
template <int KIND>
__device__ __forceinline__ void gd_mma_m16n8k16(float* c, const unsigned* a, const unsigned* b) {
  if (KIND == 1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
template <bool F>
struct gd_flag {};
template <int MP, bool TA, bool TB, typename PA, typename PB>
__device__ __forceinline__ void gd_mma_staged_(gd_flag<false>, gd_acc& x, PA A, int lda, PB B,
                                               int ldb, int K) {
  gd_mma<MP, TA, TB>(x, A, lda, B, ldb, K);
}
template <int MP, bool TA, bool TB, typename PA, typename PB>
__device__ __forceinline__ void gd_mma_staged_(gd_flag<true>, gd_acc& x, PA A, int lda, PB B,
                                               int ldb, int K) {
  // lane L gives the address of row L % 8 of 8 x 8 matrix L / 8 (m): A's m = (row half m & 1,
  // k half m >> 1), B's m = (k half m & 1, column half m >> 1)
  const int m = (threadIdx.x & 31) >> 3;
  const int r = threadIdx.x & 7;
  const int ao = TA ? (8 * (m >> 1) + r) * lda + 8 * (m & 1)   // rows along k: .trans
                    : (8 * (m & 1) + r) * lda + 8 * (m >> 1);
  const int bo = TB ? (8 * (m >> 1) + r) * ldb + 8 * (m & 1)   // B given as [n][k]
                    : (8 * (m & 1) + r) * ldb + 8 * (m >> 1);  // rows along k: .trans
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 16) {
    unsigned a[4];
    unsigned b[4];
    gd_ldmatrix4<TA>(a, A + ao + (TA ? k0 * lda : k0));
    gd_ldmatrix4<!TB>(b, B + bo + (TB ? k0 : k0 * ldb));
    gd_mma_m16n8k16<gd_kind16(PA(nullptr))>(x.c[0], a, b);
    gd_mma_m16n8k16<gd_kind16(PA(nullptr))>(x.c[1], a, b + 2);
  }
}
template <int MP, bool TA, bool TB, typename PA, typename PB>
__device__ __forceinline__ void gd_mma_staged(gd_acc& x, PA A, int lda, PB B, int ldb, int K) {
  constexpr int KA = gd_kind16(PA(nullptr));
  constexpr bool F = GD_MMA16 && KA != 0 && KA == gd_kind16(PB(nullptr));
  gd_mma_staged_<MP, TA, TB>(gd_flag<F>(), x, A, lda, B, ldb, K);
}
""",
}
_POSITIONS = {
    "gd_tid": "thread.x",
    "gd_tg_x": "threadgroup.x",
    "gd_tg_y": "threadgroup.y",
    "gd_tg_z": "threadgroup.z",
}
PROLOGUE = {backend: prologue(backend, **_POSITIONS) for backend in ("metal", "cuda")}
_BASE = {"metal": metal, "cuda": cuda}
_FACTORY = {"metal": "metal_kernel", "cuda": "cuda_kernel"}
_AVAILABLE = {"metal": lambda: mx.metal.is_available(), "cuda": lambda: mx.cuda.is_available()}


def header(backend: str) -> str:
    return _BASE[backend].HEADER + _EXTRA_HEADER[backend] + _TILES[backend]


def state_source(backend: str) -> str:
    return PROLOGUE[backend] + src.STATE_BODY


def prep_source(backend: str, fused: bool = False, matrix: bool = False) -> str:
    return PROLOGUE[backend] + src.prep_body(fused, matrix)


def state_mma_source(backend: str) -> str:
    return PROLOGUE[backend] + src.STATE_MMA_BODY


def wy_source(
    backend: str,
    fused: bool = False,
    ring: bool = False,
    v16: bool = False,
    vx: bool = False,
    p: bool = False,
) -> str:
    """The WY pass's text (chunk_source.wy_body); p: WY2_VX making FUSE_O's P too (WY_P)."""
    return PROLOGUE[backend] + src.wy_body(fused, ring, v16, vx, p)


def h_source(backend: str) -> str:
    return PROLOGUE[backend] + src.H_BODY


def h2_source(backend: str) -> str:
    return PROLOGUE[backend] + src.H2_BODY


def h2_vx_source(backend: str) -> str:
    """H2_BODY with 16-byte H stores and delta in the accumulators (H2_VX; CUDA)."""
    return PROLOGUE[backend] + src.h2_vx_body()


def h2_dyn_source(backend: str, vx: bool = False) -> str:
    """H2_BODY (vx: H2_VX's) with its ring in dynamic shared memory (H2_DYN; CUDA)."""
    return PROLOGUE[backend] + src.h2_dyn_body(vx)


def h3_source(backend: str) -> str:
    """H3_BODY: the state pass with one warp a chain of 16 value rows (H3; CUDA)."""
    return PROLOGUE[backend] + src.H3_BODY


def h3y_source(backend: str) -> str:
    """H3_BODY computing the output pass's Y = q H[n]^T and writing it instead of H (FUSE_Y;
    CUDA)."""
    return PROLOGUE[backend] + src.h3y_body()


def o2y_source(backend: str) -> str:
    """O2_VX's output pass starting from the state pass's Y (FUSE_Y; CUDA): q, k staged, not H."""
    return PROLOGUE[backend] + src.o2y_body()


def o2p_source(backend: str) -> str:
    """O2Y's q k^T slices writing P (FUSE_O; CUDA)."""
    return PROLOGUE[backend] + src.o2p_body()


def h3o_source(backend: str, early: bool = False) -> str:
    """H3 making and writing y (FUSE_O; CUDA); early: H3O_EARLY's order."""
    return PROLOGUE[backend] + src.h3o_body(early)


def h3op_source(backend: str) -> str:
    """H3O_EARLY's H3O with its copies issued by producer warps (H3O_PRODUCERS; CUDA)."""
    return PROLOGUE[backend] + src.h3op_body(True)


def h3opy_source(backend: str) -> str:
    """h3op_source with y written by the producer warps too (H3O_PRODUCERS = 2; CUDA)."""
    return PROLOGUE[backend] + src.h3opy_body()


def h3ops_source(backend: str) -> str:
    """h3op_source with each 16 value rows shared by two computing warps (H3O_SPLIT; CUDA)."""
    return PROLOGUE[backend] + src.h3ops_body()


def o_source(backend: str) -> str:
    return PROLOGUE[backend] + src.o_body()


def o2_source(backend: str, p16: bool | None = None, ring: int | None = None) -> str:
    """O2_BODY; p16 (None: O2_P16): P and Vn staged in the pieces' type for Y += P Vn; ring
    (None: O2_RING): stages of its ring."""
    return PROLOGUE[backend] + src.o2_body(
        O2_P16 if p16 is None else p16, O2_RING if ring is None else ring
    )


def o2_vx_source(backend: str, p16: bool | None = None, ring: int | None = None) -> str:
    """O2_BODY with the Y decay in the accumulators and 16-byte y stores (O2_VX; CUDA)."""
    return PROLOGUE[backend] + src.o2_vx_body(
        O2_P16 if p16 is None else p16, O2_RING if ring is None else ring
    )


# MP of the matrix kernels for every dtype (1 or 3), or None: by the activations' dtype
# (operand_precision). For measurements (benchmarks/chunk_mma_gpu.py times bf16 with MP 3 too).
MATRIX_PRECISION: int | None = None


def operand_precision(dtype) -> int:
    """MP of the matrix kernels: 3 (three tf32 products, about fp32) for fp32 activations,
    whose tolerance is fp32's; 1 (tf32 operands) for bf16 / fp16 (whose q, k are exact in
    tf32, so the prep's products lose nothing). MATRIX_PRECISION overrides it."""
    if MATRIX_PRECISION is not None:
        return MATRIX_PRECISION
    return 3 if dtype == mx.float32 else 1


_kernels: dict[tuple, object] = {}

# CUDA only: threadgroups of the split path's WY / output kernels that must fit on one SM at
# once, given to ptxas as __launch_bounds__(256, m) (a register cap of 65536 / (256 m): 128 at
# m = 2). Unbounded, ptxas takes 160-230 registers a thread there, so one 256-thread threadgroup
# fills an SM's registers: 8 warps an SM, nothing else to run while they wait on memory or a
# barrier. Measured on the H200 (2026-12-02, T 8192, Hv 32, bf16): wy 1.05 -> 0.73 ms, out
# 1.29 -> 0.87 ms with m = 2 (both checks passed), so 2 is the default; {} builds them unbounded.
# MLX writes the kernel's declaration itself, so the bound goes in through the header, by
# redefining the __global__ keyword macro (as CUDA's crt/host_defines.h spells it) for that unit.
# "wy2p": round 9's WY_P build (WY2_VX making P), 4 since session 15 (H200, --ab9 11:38 UTC,
# with H3O_PRODUCERS = 2 and H3_NB = 3: 2.602 -> 2.489 ms at 32768, 0.736 -> 0.714 at 8192; it
# spills 24 bytes a thread at 64 registers, and is faster still).
MIN_BLOCKS: dict[str, int] = {"wy": 2, "wy2": 3, "wy2p": 4, "o": 2, "o2": 3}
_BOUNDED = ("wy", "wy_fused", "wy2", "wy2_fused", "wy2v", "wy2v_fused", "o", "o2")
# Round 6's variants (WY2_VX, O2_VX; CUDA): bounded as the pass they vary.
_BOUNDED_AS = {"wy2x": "wy2", "wy2x_fused": "wy2", "o2x": "o2", "o2y": "o2", "o2p": "o2"}
_BOUNDED_AS |= {"wy2xp": "wy2p", "wy2xp_fused": "wy2p"}  # round 9's WY_P

# CUDA only: gd_mma_staged (the tile products over staged operands) takes two 16-bit operands
# of one type (bf16 / fp16) through ldmatrix and mma.m16n8k16 instead of widening them for
# tf32 mma.m16n8k8; the products are the same (exact in fp32). False builds every chunk kernel
# with the tf32 path ("_t32" names), for A/B timings in one process.
MMA16 = True


def launch_bounds_header(threads: int, blocks: int) -> str:
    """Header text after which the unit's __global__ function carries
    __launch_bounds__(threads, blocks)."""
    return (
        "\n#undef __global__\n"
        f"#define __global__ __location__(global) __launch_bounds__({threads}, {blocks})\n"
    )


# The chunk kernels without switches: which -> (name, input names, output names, source).
_PLAIN = {
    "h": (src.H_NAME, src.H_INPUTS, src.H_OUTPUTS, h_source),
    "h2": (src.H2_NAME, src.H_INPUTS, src.H_OUTPUTS, h2_source),
    "h2x": (src.H2_NAME + "_vx", src.H_INPUTS, src.H_OUTPUTS, h2_vx_source),
    "h2d": (src.H2_NAME + "_dyn", src.H_INPUTS, src.H_OUTPUTS, h2_dyn_source),
    "h2xd": (
        src.H2_NAME + "_vx_dyn",
        src.H_INPUTS,
        src.H_OUTPUTS,
        lambda b: h2_dyn_source(b, True),
    ),
    "h3": (src.H3_NAME, src.H3_INPUTS, src.H_OUTPUTS, h3_source),
    "h3y": (src.H3Y_NAME, src.H3Y_INPUTS, src.H3Y_OUTPUTS, h3y_source),
    "h3o": (src.H3O_NAME, src.H3O_INPUTS, src.H3O_OUTPUTS, h3o_source),
    "h3oe": (
        src.H3O_NAME + "_ey",
        src.H3O_INPUTS,
        src.H3O_OUTPUTS,
        lambda b: h3o_source(b, True),
    ),
    "h3oep": (src.H3O_NAME + "_eyp", src.H3O_INPUTS, src.H3O_OUTPUTS, h3op_source),
    "h3oepy": (src.H3O_NAME + "_eypy", src.H3O_INPUTS, src.H3O_OUTPUTS, h3opy_source),
    "h3oeps": (src.H3O_NAME + "_eyps", src.H3O_INPUTS, src.H3O_OUTPUTS, h3ops_source),
    "o": (src.O_NAME, src.O_INPUTS, src.O_OUTPUTS, o_source),
    "o2": (src.O2_NAME, src.O_INPUTS, src.O_OUTPUTS, o2_source),
    "o2x": (src.O2_NAME + "_vx", src.O_INPUTS, src.O_OUTPUTS, o2_vx_source),
    "o2y": (src.O2Y_NAME, src.O2Y_INPUTS, src.O_OUTPUTS, o2y_source),
    "o2p": (src.O2P_NAME, src.O2P_INPUTS, src.O2P_OUTPUTS, o2p_source),
    "state": (src.STATE_NAME, src.STATE_INPUTS, src.STATE_OUTPUTS, state_source),
    "state_mma": (src.STATE_MMA_NAME, src.STATE_INPUTS, src.STATE_OUTPUTS, state_mma_source),
}


def _build(backend: str, which: str, smem: int = 0):
    """which: "state", "state_mma", "prep", "prep_fused", "prep_mma", "prep_fused_mma", or the
    split path's "wy", "wy_fused", "h", "o" (and their variants); a "_stamped" suffix (CUDA,
    "wy2", "wy2_fused", "o2", "h2"): that kernel with clock stamps and the extra output `stamps`
    (chunk_source.stamped). smem: bytes of dynamic shared memory ("h2d", "h2xd": H2_DYN's ring),
    in the kernel's name too."""
    stamp = which.endswith("_stamped")
    if stamp:
        if backend != "cuda" or which not in _STAMPED:
            raise ValueError(f"gated_delta chunk kernel: no stamped build of {which} on {backend}")
        key = (backend, which, MIN_BLOCKS.get(which.split("_")[0]), not MMA16, O2_P16, O2_RING)
        key += (smem,)
        if key not in _kernels:
            name, ins, outs, body, anchors = _STAMPED[which]()
            if which == "o2_stamped":
                name += ("" if O2_P16 else "_p32") + ("" if O2_RING == 3 else f"_r{O2_RING}")
            name += "" if MMA16 else "_t32"
            lb = MIN_BLOCKS.get(which.split("_")[0])
            head = _stamped_header(which.split("_")[0])
            extra = {"shared_memory": smem} if smem else {}
            _kernels[key] = _factory(backend)(
                name=name + (f"_lb{lb}" if lb else "") + (f"_{smem}" if smem else "") + "_stamped",
                input_names=ins,
                output_names=[*outs, src.STAMP_OUTPUT],
                source=src.stamped(body, anchors),
                header=head
                + (src.H3_TILES if which.startswith("h3") else "")
                + (src.H3_PAIR_TILES if which.startswith("h3oeps") else ""),
                **extra,
            )
        return _kernels[key]
    if which in _BOUNDED_AS:
        lb = MIN_BLOCKS.get(_BOUNDED_AS[which]) if backend == "cuda" else None
    else:
        lb = MIN_BLOCKS.get(which.removesuffix("_fused").replace("wy2v", "wy2"))
        lb = lb if backend == "cuda" and which in _BOUNDED else None
    t32 = backend == "cuda" and not MMA16
    p32 = which in ("o2", "o2x") and not O2_P16
    r2 = which in ("o2", "o2x") and O2_RING != 3
    l32 = LDSM32 and backend == "cuda" and which in _L32
    key = (backend, which, lb, t32, p32, r2, smem, l32)
    if key not in _kernels:
        if which in _PLAIN:
            name, ins, outs, source = _PLAIN[which]
            body = source(backend)
        elif which.startswith("wy"):
            fused, ring = which.endswith("_fused"), which.startswith("wy2")
            v16, vx, p = "2v" in which, "2x" in which, "2xp" in which
            name, ins, outs = src.wy_name(fused, ring), src.wy_inputs(fused), src.WY_OUTPUTS
            name += "_v16" if v16 else "_vx" if vx else ""
            if p:
                name, ins, outs = name + "p", ins + src.WY2P_INPUTS_EXTRA, src.WY2P_OUTPUTS
            body = wy_source(backend, fused, ring, v16, vx, p)
        else:
            fused = which.startswith("prep_fused")
            matrix = which.endswith("_mma")
            name, ins = src.prep_name(fused, matrix), src.prep_inputs(fused)
            outs = src.PREP_OUTPUTS
            body = prep_source(backend, fused, matrix)
        h3 = which in ("h3", "h3y", "h3o", "h3oe", "h3oep", "h3oepy", "h3oeps")
        head = header(backend) + (src.H3_TILES if h3 else "")
        head += src.H3_PAIR_TILES if which == "h3oeps" else ""
        if l32:
            name, head = f"{name}_l32", head + src.H3_TILES + src.L32_TILES
        if p32:
            name += "_p32"
        if r2:
            name += f"_r{O2_RING}"
        if t32:
            # gd_mma_staged as gd_mma (tf32 products), for A/B timings; a name of its own
            name, head = f"{name}_t32", "#define GD_MMA16 0\n" + head
        if lb:
            # a name of its own: MLX caches compiled kernels by name
            name, head = f"{name}_lb{lb}", head + launch_bounds_header(256, lb)
        extra = {"shared_memory": smem} if smem else {}
        _kernels[key] = _factory(backend)(
            name=name + (f"_{smem}" if smem else ""),
            input_names=ins,
            output_names=outs,
            source=body,
            header=head,
            **extra,
        )
    return _kernels[key]


# Stamped builds (round 5, diagnosis only; CUDA): the default WY2 / O2 text with clock stamps
# (chunk_source.stamped), under the default switches' names and launch bounds, built only when
# a caller passes stamps=True to wy_pass / o_pass (benchmarks/chunk_split_gpu.py --ab).
_STAMPED = {
    "wy2_stamped": lambda: (
        src.wy_name(False, True), src.wy_inputs(False), src.WY_OUTPUTS,
        wy_source("cuda", False, True), src.WY2_STAMPS,
    ),
    "wy2_fused_stamped": lambda: (
        src.wy_name(True, True), src.wy_inputs(True), src.WY_OUTPUTS,
        wy_source("cuda", True, True), src.WY2_STAMPS,
    ),
    "o2_stamped": lambda: (
        src.O2_NAME, src.O_INPUTS, src.O_OUTPUTS, o2_source("cuda"), src.O2_STAMPS,
    ),
    # round 6: the state pass, one sampled chunk a threadgroup (chunk_source.H2_STAMPS)
    "h2_stamped": lambda: (
        src.H2_NAME, src.H_INPUTS, src.H_OUTPUTS, h2_source("cuda"), src.H2_STAMPS,
    ),
    # round 7: H3_BODY, one sampled chunk a threadgroup (chunk_source.H3_STAMPS)
    "h3_stamped": lambda: (
        src.H3_NAME, src.H3_INPUTS, src.H_OUTPUTS, h3_source("cuda"), src.H3_STAMPS,
    ),
    # round 8: H3O (FUSE_O's state pass), one sampled chunk a threadgroup (H3O_STAMPS)
    "h3o_stamped": lambda: (
        src.H3O_NAME, src.H3O_INPUTS, src.H3O_OUTPUTS, h3o_source("cuda"), src.H3O_STAMPS,
    ),
    # round 9: H3O_PRODUCERS' builds (H3O_EARLY's order), one sampled chunk (H3OP_STAMPS)
    "h3oep_stamped": lambda: (
        src.H3O_NAME + "_eyp", src.H3O_INPUTS, src.H3O_OUTPUTS, h3op_source("cuda"),
        src.H3OP_STAMPS,
    ),
    "h3oepy_stamped": lambda: (
        src.H3O_NAME + "_eypy", src.H3O_INPUTS, src.H3O_OUTPUTS, h3opy_source("cuda"),
        src.H3OPY_STAMPS,
    ),
    # round 10: H3O_SPLIT's build (two computing warps a 16 value rows; H3OPS_STAMPS)
    "h3oeps_stamped": lambda: (
        src.H3O_NAME + "_eyps", src.H3O_INPUTS, src.H3O_OUTPUTS, h3ops_source("cuda"),
        src.H3OPS_STAMPS,
    ),
}  # fmt: skip


def _stamped_header(base: str) -> str:
    """The CUDA header of a stamped build of `base` ("wy2", "o2"): the default build's switches
    and launch bounds (names made unique by the caller's suffix)."""
    head = header("cuda")
    if not MMA16:
        head = "#define GD_MMA16 0\n" + head
    lb = MIN_BLOCKS.get(base)
    return head + launch_bounds_header(256, lb) if lb else head


# The split path (chunk_source "split chunk path": WY kernel, state pass, output pass) runs
# scalar gates on the chunk backend; False: the two-kernel path (prep kernel + state pass, MATRIX
# picks its variant), which per-key gates always take. Whether `auto` uses the chunk backend at
# all is the one constant _GPU_CHUNKED_MIN_T (kernels/gated_delta/__init__.py), to be set from
# `benchmarks/chunk_split_gpu.py` on the GPU; checked there and on the CPU's lane emulator.
SPLIT = True
WY_THREADS = 256
WY_SLICE = 32  # key / value columns staged at a time in WY_BODY
# The WY pass as WY2_BODY (k and v slices copied into a ring that runs through the kernel, k k^T
# on the raw slices, X and the scaled slices in the pieces' type for U and W) where Dv is a
# multiple of 8 and k, v share a dtype; False (or otherwise): WY_BODY.
WY2 = True
# WY2_BODY with 16-byte stores of W and U (chunk_source.wy2_v16_body; round 5, CUDA only where the
# staged type is the pieces'): off by default until the H200 has checked and timed it
# (benchmarks/chunk_split_gpu.py --stamps, "wy v16").
WY2_V16 = False
# Defaults since session 11 (H200, `chunk_split_gpu.py --ab7`, bf16, Hv 32): WY2_VX, O2_VX at
# three threadgroups an SM (MIN_BLOCKS "o2"), H3 = 2 and LDSM32, all bit for bit the earlier
# defaults' outputs in its checks: the split path 1.304 -> 0.989 ms at 8k, 5.024 -> 3.770 at 32k.
# Round 6 (helper chunk6; CUDA only, checked and timed on the H200,
# benchmarks/chunk_split_gpu.py --ab6): each pass's outputs moved 16 bytes a thread, the same
# arithmetic (outputs bit for bit the default build's). WY2_VX: WY2_V16 plus Kw's stores and
# the U / W slices' scaling in 16-byte groups (chunk_source.wy2_vx_body; takes precedence over
# WY2_V16). H2_VX: H[n]'s stores (h2_vx_body). O2_VX: Y's decay in the accumulators (three
# barriers fewer) and y's stores (o2_vx_body; where Dv is a multiple of 16 / y's item size).
WY2_VX = True
H2_VX = False
O2_VX = True
# H2_DYN: (key slice DS, ring NB) of the state pass with its ring of staged slices in dynamic
# shared memory (chunk_source.h2_dyn_body; CUDA, Dk <= 128): rings past the 48 KB of static
# shared memory, e.g. (128, 3): three whole W / Kw slices of Dk 128, 52 KB, each copy a whole
# chunk ahead. None: the static ring of h_tiles.
H2_DYN: tuple[int, int] | None = None
# Round 7 (helper chunk7; CUDA, 16-bit pieces, Dk <= 128, off by default until the H200 has
# checked and timed it: benchmarks/chunk_split_gpu.py --ab7): the state pass as H3_BODY, one warp
# a chain of 16 value rows with the state in its accumulators, H3 warps a threadgroup sharing a
# ring of H3_NB whole chunks (W, Kw, U) in dynamic shared memory; same arithmetic as H2_BODY
# (H, Vn and the state bit for bit). None: H2_BODY / H_BODY. Where Dv is not a multiple of 16 H3,
# the default pass.
H3: int | None = 2
# Where H3 warps a threadgroup give the state pass more threadgroups than this (one an SM: the H3
# family's ring takes most of an SM's shared memory), twice H3 where Dv allows: one wave of
# fuller threadgroups instead of a second, partly empty one (Hv 48 at Dv 128: 192 threadgroups
# of two warps on the H200's 132 SMs, 96 of four). None: H3 always. 132 (the H100 / H200 SXM's
# SMs; MLX does not report the count) since session 15: H200, T 32768, bf16, Hk 16
# (benchmarks/probe_state_warps.py, 12:31 UTC, median of 4): Hv 48 3.912 -> 3.263 ms, Hv 64
# 4.872 -> 4.021, Hv 32 unchanged (128 threadgroups: two warps; four measured 2.484 against
# 2.460). Same arithmetic (bit for bit).
H3_WAVE_SMS: int | None = 132


def h3_warps(B: int, Hv: int, Dv: int) -> int | None:
    """The H3 family's warps a threadgroup for a state [B, Hv, Dv, Dk]: H3, or 2 H3 where H3's
    grid would exceed H3_WAVE_SMS threadgroups and Dv is a multiple of 32 H3."""
    nw = H3
    if nw and H3_WAVE_SMS and B * Hv * Dv // (16 * nw) > H3_WAVE_SMS and Dv % (32 * nw) == 0:
        nw *= 2
    return nw


H3_NB = 3  # 3 since session 15 (round 9's `wyp prod nb3`, H200)
# The most dynamic shared memory a threadgroup may ask for (CUDA's opt-in limit on sm_90: 227
# KB). Where a ring of H3_NB chunks does not fit (4 warps of 16-bit pieces at Dk 128 with FUSE_O:
# 257 KB at 3 chunks), the H3 family takes the largest ring from 2 up that does.
H3_SMEM_MAX = 227 * 1024
# Round 7 (CUDA, off by default): the WY2, H2 and O2 builds (and their variants) with
# chunk_source.L32_TILES in their header ("_l32" names): gd_mma_staged / gd_copy_tile converting
# threadgroup addresses once a call instead of once an ldmatrix / a copy. Same outputs.
LDSM32 = True
_L32 = (
    "wy2", "wy2_fused", "wy2v", "wy2v_fused", "wy2x", "wy2x_fused", "h2", "h2x", "o2", "o2x", "o2y",
    "o2p", "wy2xp", "wy2xp_fused",
)  # fmt: skip
# Round 8 (helper chunk8; CUDA, off by default until the H200 has checked and timed it:
# benchmarks/chunk_split_gpu.py --ab8): the output pass's Y = q H[n]^T computed by the state pass
# (chunk_source.h3y_body: H3_BODY with the chunk's q rows in its ring, Y^T = S q^T from the same
# Sb as Xw^T, Y written fp32 instead of H) and the output pass starting from it (o2y_body: O2_VX
# staging q and k only). Where H3 and O2_VX both apply (16-bit pieces in q's dtype, Dk <= 128,
# Dv a multiple of 16 H3); else the default passes. Same arithmetic: y and the state bit for bit.
FUSE_Y = False
# Round 8 (helper chunk8; CUDA, on since session 12; takes precedence over FUSE_Y where both
# are on): one pass over the chunks for the state and y. O2P (chunk_source.o2p_body) makes
# P = D o q k^T a chunk and head (in the pieces' type, as O2 rounds it); H3O (h3o_body) is H3Y
# with P's rows and the gates in its ring, adding Y's decay and y^T += delta^T P^T and writing y
# (no H, Yi, Vn). Where FUSE_Y would apply; same arithmetic: y and the state bit for bit.
FUSE_O = True
# H3O with Y^T = S q^T issued right behind Xw^T instead of behind the update (chunk_source
# h3o_body(early)); "_ey" names. Same products.
# Default since session 12 (H200, `--ab8`, bf16 Hv 32: 1.061 -> 0.873 ms at 8192, 3.844 -> 3.120
# at 32768; 17 checks bit for bit the old default's outputs).
H3O_EARLY = True
# Round 9 (helper chunk9; CUDA, on since session 15; benchmarks/chunk_split_gpu.py --ab9, H200
# 2026-12-03, with H3O_PRODUCERS = 1 and H3_NB = 3: 0.880 -> 0.733 ms at 8192, 3.176 -> 2.625 at
# 32768, bf16 Hv 32; 15 checks bit for bit the old default's outputs): FUSE_O's P = D o q k^T
# made by the WY pass (chunk_source.wy2p_body: WY2_VX with q's slices staged beside k's, q k^T on
# the k k^T tiles, P written with L's decays), so the P pass (O2P) and its launch go. Where
# FUSE_O applies and the WY pass is WY2_VX (16-bit pieces); else FUSE_O's three passes. Same
# arithmetic: P bit for bit O2P's, y and the state the defaults'.
WY_P = True
# Round 9 (helper chunk9; CUDA, on since session 15, as WY_P): H3O (with H3O_EARLY) with its
# ring's copies issued by H3 producer warps of their own (chunk_source.h3op_body; 2 x 32 H3
# threads a threadgroup): the ~1,400 of ~4,500 cycles a chunk that round 8's stamps put in
# issuing copies leave the chain. Same bytes, same products: y and the state bit for bit. 2: the
# producers also write y (y^T staged by the computing warps in a double Yb, stored a chunk later:
# chunk_source.h3opy_body).
# 2 since session 15 (with MIN_BLOCKS["wy2p"] = 4: the 11:38 UTC --ab9 row above).
H3O_PRODUCERS: bool | int = 2
# Round 10 (helper chunk10; CUDA, off by default until the H200 has checked and timed it:
# benchmarks/chunk_split_gpu.py --ab10): H3O_PRODUCERS = 1's build with each 16 value rows shared
# by two computing warps (chunk_source.h3ops_body: a warp's half of the chunk's row tiles and of
# the state's key tiles, one named barrier of the pair a chunk; 3 x 32 H3 threads a
# threadgroup), so the products run on all four SM sub-partitions instead of two: 106 mma a
# warp a chunk instead of 212. Same products in the same order: y and the state bit for bit.
# Where H3O_PRODUCERS = 1 applies (with H3O_EARLY); else that build.
H3O_SPLIT = False
# WY2_BODY's (key / value slice DS, ring of NB) by backend and staged element size: CUDA bf16 /
# fp16 43520 B, fp32 40448 B; Metal (float staged, synchronous copies) 32256 B of its 32 KB.
WY2_TILES = {
    ("cuda", 2): (32, 3),
    ("cuda", 4): (32, 2),
    ("metal", 2): (16, 2),
    ("metal", 4): (16, 2),
}
H_BV = 16  # value rows per state-pass threadgroup (16 or 32; 32: CUDA only, Dk <= 128)
H_BV_CHOICES = {"metal": (16,), "cuda": (16, 32)}
# Threadgroup memory a state-pass threadgroup may take (static): Apple GPUs 32 KB, CUDA 48 KB.
H_SMEM = {"metal": 32768, "cuda": 49152}
# (key slice DS, ring of NB staged slices) of the state pass, first that fits H_SMEM: a whole
# key row a slice (fewest barriers: NSL + 1 a chunk), then rings of three (a copy has two
# slices of products to land behind), then smaller slices.
H_TILE_ORDER = ((256, 2), (128, 2), (64, 3), (64, 2), (32, 3), (32, 2), (16, 2))
# (DS, NB) forced for every state pass (timing runs, benchmarks/chunk_split_gpu.py): the caller
# makes sure it fits (h_smem).
H_TILES: tuple[int, int] | None = None
# The state pass as H2_BODY (the state in the warps' accumulators, a PS copy in threadgroup
# memory for the products, 16-bit operands where the pieces are); False: H_BODY.
H2 = True
O_THREADS = 256
O_SLICE = {"metal": 16, "cuda": 32}  # key columns of q, k, H staged at a time
O_BV = {"metal": 32, "cuda": 64}  # value rows per output threadgroup
# The output pass as O2_BODY (q, k, H slices copied into a ring by cp.async on CUDA, the
# selection applied to the results) instead of O_BODY, where q, k and the pieces share one
# dtype. H200, 2026-12-02 (benchmarks/chunk_split_gpu.py --quick): "out o2" 0.176 / 0.627 ms
# against O_BODY's 0.230 / 0.870 at T = 2048 / 8192 (Hv 32, bf16), both checks passed.
O2 = True
# O2_BODY's Y += P Vn with P and Vn staged in the pieces' type (bf16 / fp16: P rounded to it, the
# products on CUDA's mma.m16n8k16; fp32 pieces and Metal: floats as before); False: P fp32 and
# Vn staged as floats ("_p32" names), for A/B timings.
O2_P16 = True
# Stages of O2_BODY's ring of staged q / k / H slices: 3 (each copy issued two slices ahead; the
# staged Vn moved into the ring's space after the loop, so it fits 47104 B); 2: session 8's
# ("_r2" names), for A/B timings.
O2_RING = 3
# O2_BODY's (key slice, value rows) by backend and staged element size: threadgroup memory
# 47104 B on CUDA (bf16 32 / 64, fp32 16 / 64), 27648 B on Metal (float staged, 8 / 32).
O2_TILES = {
    ("cuda", 2): (32, 64),
    ("cuda", 4): (16, 64),
    ("metal", 2): (8, 32),
    ("metal", 4): (8, 32),
}


def h_smem(backend: str, Dk: int, bv: int, ds: int, nb: int, itemsize: int, C: int = CHUNK) -> int:
    """Bytes of threadgroup memory of H_BODY: S and delta fp32, NB staged slices (the pieces'
    type on CUDA, float on Metal) with rows padded by 16 bytes."""
    size = itemsize if backend == "cuda" else 4
    return 4 * (bv * (Dk + 4) + C * (bv + 4)) + nb * C * (ds * size + 16)


def h2_smem(
    backend: str, Dk: int, bv: int, ds: int, nb: int, itemsize: int, C: int = CHUNK
) -> int | None:
    """Bytes of threadgroup memory of H2_BODY (Xw / delta fp32, Sb, a 16-bit delta, the ring), or
    None where the ring is too small to stage the fp32 state through (16-bit pieces)."""
    size = itemsize if backend == "cuda" else 4
    pad = 16 // size
    ring = nb * C * (ds + pad) * size
    if size == 2 and bv * (Dk + 4) * 4 > ring:
        return None
    delta16 = C * (bv + 8) * 2 if size == 2 else 32
    return 4 * C * bv + bv * (Dk + pad) * size + delta16 + ring


def h_tiles(
    backend: str, Dk: int, bv: int, itemsize: int, h2: bool = False
) -> tuple[int, int] | None:
    """(DS, NB) of the state pass (h2: H2_BODY's): the first of H_TILE_ORDER that divides Dk
    and fits."""
    for ds, nb in H_TILE_ORDER:
        smem = (h2_smem if h2 else h_smem)(backend, Dk, bv, ds, nb, itemsize)
        if Dk % ds == 0 and smem is not None and smem <= H_SMEM[backend]:
            return ds, nb
    return None


def h_threads(bv: int = H_BV, C: int = CHUNK) -> int:
    """H_BODY's threads: one warp per 16 x 16 tile of the chunk's W S^T."""
    return 32 * (C // 16) * (bv // 16)


def _gate_inputs(which: str, g, beta, mask, raw_gates, B: int, T: int) -> tuple:
    """(mask, gate inputs, kernel name) of a pass that takes either precomputed gates (g, beta)
    or raw_gates = (a, b, A_log, dt_bias), computed in the kernel ("<which>_fused")."""
    if mask is None:
        mask = mx.ones((B, T), dtype=mx.bool_)
    f32 = mx.float32
    if raw_gates is None:
        return mask, [g.astype(f32), beta.astype(f32)], which
    a, b, A_log, dt_bias = raw_gates
    return mask, [a, b, A_log.astype(f32), dt_bias.astype(f32)], which + "_fused"


def wy_pass(
    backend: str,
    k,
    v,
    g,
    beta,
    mask,
    C: int = CHUNK,
    raw_gates=None,
    init_value=None,
    stamps: bool = False,
    q=None,
):
    """WY_BODY (WY2_BODY where WY2 is set, Dv is a multiple of 8 and k, v share a dtype): W, Kw
    [B*Hv, N*C, Dk] and U [B*Hv, N*C, Dv] in v's dtype, gates [B*Hv, N*C, 4] fp32 (gamma, g,
    valid, w per step). raw_gates = (a, b, A_log, dt_bias): the gates are computed in the kernel
    (g, beta unused). stamps (CUDA, WY2_BODY only): the stamped build, its stamps [N * B*Hv,
    STAMP_SLOTS] uint32 appended to the outputs. q (where wy_p_applies; WY_P): the build that
    also makes FUSE_O's P [B*Hv, N, C, C] in v's dtype, appended to the outputs."""
    B, T, _, Dk = k.shape
    Hv, Dv = v.shape[2:]
    N = -(-T // C)
    BH = B * Hv
    ring = WY2 and Dv % 8 == 0 and k.dtype == v.dtype  # k, v copied raw into one ring
    vx = ring and WY2_VX and backend == "cuda" and not stamps
    v16 = ring and WY2_V16 and backend == "cuda" and not stamps
    base = "wy2x" if vx else "wy2v" if v16 else "wy2" if ring else "wy"
    if q is not None:
        if stamps or not wy_p_applies(backend, q, k, v):
            raise ValueError("gated_delta chunk kernel: P in the WY pass needs WY2_VX, 16-bit")
        base = "wy2xp"
    mask, gates, which = _gate_inputs(base, g, beta, mask, raw_gates, B, T)
    extra_shapes, extra_dtypes = [], []
    if q is not None:
        extra_shapes, extra_dtypes = [(BH, N, C, C)], [v.dtype]
    if stamps:
        if not ring:
            raise ValueError("gated_delta chunk kernel: stamps need the WY2_BODY pass")
        which += "_stamped"
        extra_shapes, extra_dtypes = [(N * BH, src.STAMP_SLOTS)], [mx.uint32]
    pt = v.dtype
    ds, nb = WY2_TILES[(backend, pt.size)] if ring else (WY_SLICE, None)
    ds = min(ds, Dk)  # Dk 32 with slices of 64
    return _build(backend, which)(
        inputs=[k, v, *gates, mask.astype(mx.bool_), *([] if q is None else [q])],
        template=[
            ("Dk", Dk),
            ("C", C),
            ("NT", WY_THREADS),
            ("DS", ds),
            *([("NB", nb)] if ring else []),
            ("MP", operand_precision(pt)),
            ("PT", pt),
        ],
        grid=(WY_THREADS * N, BH, 1),
        threadgroup=(WY_THREADS, 1, 1),
        output_shapes=[
            (BH, N * C, Dk),
            (BH, N * C, Dv),
            (BH, N * C, Dk),
            (BH, N * C, 4),
            *extra_shapes,
        ],
        output_dtypes=[pt, pt, pt, mx.float32, *extra_dtypes],
        init_value=init_value,
    )


def wy_p_applies(backend: str, q, k, v) -> bool:
    """Whether the WY pass can make FUSE_O's P (wy2p_body: WY2_VX's ring, 16-bit pieces, q in
    k's dtype)."""
    ring = WY2 and v.shape[-1] % 8 == 0 and k.dtype == v.dtype
    return ring and WY2_VX and backend == "cuda" and v.dtype.size == 2 and q.dtype == k.dtype


def h_pass(
    backend: str,
    W,
    U,
    Kw,
    gates,
    state,
    C: int = CHUNK,
    bv=None,
    prefetch=None,
    init_value=None,
    stamps: bool = False,
):
    """H_BODY (H2_BODY where H2 is set and its tiles fit): (H [B*Hv, N, Dv, Dk], Vn [B*Hv, N*C,
    Dv]) in the pieces' dtype, and the final state [B, Hv, Dv, Dk] fp32. stamps (CUDA, H2_BODY
    only): the stamped build (chunk_source.H2_STAMPS), its stamps [threadgroups, STAMP_SLOTS]
    uint32 appended to the outputs."""
    B, Hv, Dv, Dk = state.shape
    NC = U.shape[1]
    bv = bv or H_BV
    pt = U.dtype
    h2 = H2 and h_tiles(backend, Dk, bv, pt.size, True) is not None
    tiles = h_tiles(backend, Dk, bv, pt.size, h2) if bv in H_BV_CHOICES[backend] else None
    if tiles is None or (bv > 16 and Dk > 128):
        raise ValueError(
            f"gated_delta chunk kernel: the state pass takes bv in {H_BV_CHOICES[backend]} on "
            f"{backend} (32 only for Dk <= 128: threadgroup memory), got bv={bv} with Dk={Dk}"
        )
    ds, nb = H_TILES or tiles
    nw3 = h3_warps(B, Hv, Dv) if backend == "cuda" and pt.size == 2 and Dk <= 128 else None
    if nw3 and Dv % (16 * nw3) == 0:
        return _h3_pass(W, U, Kw, gates, state, nw3, C, init_value, stamps)
    nt = h_threads(bv, C)
    name = ("h2x" if H2_VX and backend == "cuda" else "h2") if h2 else "h"
    smem = 0
    if H2_DYN and h2 and backend == "cuda" and Dk <= 128 and not stamps:
        ds, nb = min(H2_DYN[0], Dk), H2_DYN[1]
        smem = nb * C * (ds + 16 // pt.size) * pt.size
        name += "d"
    extra_shapes, extra_dtypes = [], []
    if stamps:
        if not h2:
            raise ValueError("gated_delta chunk kernel: stamps need the H2_BODY pass")
        name = "h2_stamped"
        extra_shapes, extra_dtypes = [(B * Hv * -(-Dv // bv), src.STAMP_SLOTS)], [mx.uint32]
    return (_build(backend, name, smem) if smem else _build(backend, name))(
        inputs=[W, U, Kw, gates, state],
        template=[
            ("Dk", Dk),
            ("BV", bv),
            ("C", C),
            ("NT", nt),
            ("DS", ds),
            ("NB", nb),
            ("MP", operand_precision(pt)),
            ("PF", PREFETCH if prefetch is None else int(prefetch)),
            ("PT", pt),
        ],
        grid=(nt * B * Hv, -(-Dv // bv), 1),
        threadgroup=(nt, 1, 1),
        output_shapes=[(B * Hv, NC // C, Dv, Dk), (B * Hv, NC, Dv), (B, Hv, Dv, Dk), *extra_shapes],
        output_dtypes=[pt, pt, mx.float32, *extra_dtypes],
        init_value=init_value,
    )


def _h3_ring(smem_of) -> tuple[int, int]:
    """(chunks in the ring, bytes of shared memory) for an H3-family build whose bytes at a ring
    of n chunks are smem_of(n): H3_NB chunks, fewer (not below 2) where they exceed H3_SMEM_MAX."""
    nb = H3_NB
    while nb > 2 and smem_of(nb) > H3_SMEM_MAX:
        nb -= 1
    return nb, smem_of(nb)


def _h3_launch(Dk: int, nw: int, C: int, pt, heads: int, Dv: int, nb: int) -> dict:
    """The H3 family's (H3, H3Y, H3O) template, grid and threadgroup: nw warps a threadgroup, a
    warp a chain of 16 value rows, a ring of nb chunks."""
    bv, nt = 16 * nw, 32 * nw
    return dict(
        template=[
            ("Dk", Dk),
            ("BV", bv),
            ("C", C),
            ("NT", nt),
            ("NB", nb),
            ("MP", operand_precision(pt)),
            ("PT", pt),
        ],
        grid=(nt * heads, Dv // bv, 1),
        threadgroup=(nt, 1, 1),
    )


def _h3_pass(W, U, Kw, gates, state, nw: int, C: int, init_value, stamps: bool = False):
    """h_pass by H3_BODY (CUDA): nw warps (16 value rows each) a threadgroup, a ring of H3_NB
    chunks in dynamic shared memory. stamps: the stamped build (chunk_source.H3_STAMPS), its
    stamps [threadgroups, STAMP_SLOTS] uint32 appended to the outputs."""
    B, Hv, Dv, Dk = state.shape
    NC = U.shape[1]
    pt = U.dtype
    bv = 16 * nw
    nb, smem = _h3_ring(lambda n: src.h3_smem(Dk, nw, n, pt.size, C))
    extra_shapes, extra_dtypes = [], []
    if stamps:
        extra_shapes, extra_dtypes = [(B * Hv * (Dv // bv), src.STAMP_SLOTS)], [mx.uint32]
    return _build("cuda", "h3_stamped" if stamps else "h3", smem)(
        inputs=[W, U, Kw, gates, state],
        **_h3_launch(Dk, nw, C, pt, B * Hv, Dv, nb),
        output_shapes=[(B * Hv, NC // C, Dv, Dk), (B * Hv, NC, Dv), (B, Hv, Dv, Dk), *extra_shapes],
        output_dtypes=[pt, pt, mx.float32, *extra_dtypes],
        init_value=init_value,
    )


def _o2_template(Dk: int, C: int, ds: int, bvo: int, pieces, y_dtype) -> list:
    """The output-pass family's (O2, O2Y, O2P) template: O_THREADS threads, key slices of ds,
    bvo value columns a threadgroup, operands at the pieces' precision, y in y_dtype."""
    return [
        ("Dk", Dk),
        ("C", C),
        ("NT", O_THREADS),
        ("DS", ds),
        ("BVO", bvo),
        ("MP", operand_precision(pieces)),
        ("YT", y_dtype),
    ]


def o_pass(
    backend: str,
    q,
    k,
    gates,
    H,
    Vn,
    T: int,
    Hv: int,
    y_dtype,
    C: int = CHUNK,
    init_value=None,
    stamps: bool = False,
):
    """O_BODY (O2_BODY where O2 is set and q, k, H and y_dtype agree): y [B, T, Hv, Dv] in
    y_dtype. stamps (CUDA, O2_BODY only): (y, the stamped build's stamps [threadgroups,
    STAMP_SLOTS] uint32)."""
    B, _, _, Dk = q.shape
    BH, N, Dv, _ = H.shape
    name, bvo, ds = "o", O_BV[backend], min(O_SLICE[backend], Dk)
    if O2 and q.dtype == k.dtype == H.dtype == Vn.dtype == y_dtype and y_dtype.size in (2, 4):
        o2_ds, o2_bvo = O2_TILES[(backend, y_dtype.size)]
        if Dk % o2_ds == 0:
            name, bvo, ds = "o2", o2_bvo, o2_ds
            vx = O2_VX and backend == "cuda" and Dv % (16 // y_dtype.size) == 0
            name += "x" if vx and not stamps else ""
    nz = -(-Dv // bvo)
    extra_shapes, extra_dtypes = [], []
    if stamps:
        if name != "o2":
            raise ValueError("gated_delta chunk kernel: stamps need the O2_BODY pass")
        name += "_stamped"
        extra_shapes, extra_dtypes = [(N * BH * nz, src.STAMP_SLOTS)], [mx.uint32]
    outs = _build(backend, name)(
        inputs=[q, k, gates, H, Vn, mx.array([T, Hv], mx.int32)],
        template=_o2_template(Dk, C, ds, bvo, Vn.dtype, y_dtype),
        grid=(O_THREADS * N, BH, nz),
        threadgroup=(O_THREADS, 1, 1),
        output_shapes=[(B, T, Hv, Dv), *extra_shapes],
        output_dtypes=[y_dtype, *extra_dtypes],
        init_value=init_value,
    )
    return (outs[0], outs[1]) if stamps else outs[0]


def fuse_y_warps(backend: str, q, k, U, state) -> int | None:
    """H3's warps where FUSE_Y / FUSE_O apply to these pieces (U: the WY pass's), else None."""
    B, Hv, Dv, Dk = state.shape
    # O2Y / O2P are O2_VX's text at its defaults (16-bit P, a ring of three)
    nw = h3_warps(B, Hv, Dv) if (FUSE_Y or FUSE_O) and backend == "cuda" and O2 and O2_VX else None
    nw = nw if O2_P16 and O2_RING == 3 else None
    if not nw or U.dtype.size != 2 or Dk > 128 or Dv % (16 * nw) != 0:
        return None
    ds, _ = O2_TILES[(backend, 2)]
    return nw if q.dtype == k.dtype == U.dtype and Dk % ds == 0 else None


def h3y_pass(W, U, Kw, gates, state, q, nw: int, C: int = CHUNK, init_value=None):
    """The state pass with FUSE_Y (CUDA: chunk_source.h3y_body, nw warps a threadgroup): (Yi = q
    H[n]^T fp32 [B * Hv, N, Dv, C], Vn [B * Hv, N * C, Dv] in the pieces' dtype, the final state
    fp32)."""
    B, Hv, Dv, Dk = state.shape
    NC = U.shape[1]
    pt = U.dtype
    nb, smem = _h3_ring(lambda n: src.h3y_smem(Dk, nw, n, pt.size, C))
    return _build("cuda", "h3y", smem)(
        inputs=[W, U, Kw, gates, state, q],
        **_h3_launch(Dk, nw, C, pt, B * Hv, Dv, nb),
        output_shapes=[(B * Hv, NC // C, Dv, C), (B * Hv, NC, Dv), (B, Hv, Dv, Dk)],
        output_dtypes=[mx.float32, pt, mx.float32],
        init_value=init_value,
    )


def o2y_pass(q, k, gates, Yi, Vn, T: int, Hv: int, C: int = CHUNK, init_value=None):
    """The output pass with FUSE_Y (CUDA: chunk_source.o2y_body): y [B, T, Hv, Dv] in Vn's
    dtype, from the state pass's Yi."""
    B, _, _, Dk = q.shape
    BH, N, Dv, _ = Yi.shape
    pt = Vn.dtype
    ds, bvo = O2_TILES[("cuda", pt.size)]
    return _build("cuda", "o2y")(
        inputs=[q, k, gates, Yi, Vn, mx.array([T, Hv], mx.int32)],
        template=_o2_template(Dk, C, ds, bvo, pt, pt),
        grid=(O_THREADS * N, BH, -(-Dv // bvo)),
        threadgroup=(O_THREADS, 1, 1),
        output_shapes=[(B, T, Hv, Dv)],
        output_dtypes=[pt],
        init_value=init_value,
    )[0]


def o2p_pass(q, k, gates, T: int, Hv: int, pt, C: int = CHUNK, init_value=None):
    """FUSE_O's P pass (CUDA: chunk_source.o2p_body): P = D o q k^T [B * Hv, N, C, C] in pt
    (rows i, columns j <= i; the tiles above the diagonal unwritten)."""
    B, _, _, Dk = q.shape
    N = -(-T // C)
    ds, bvo = O2_TILES[("cuda", pt.size)]
    return _build("cuda", "o2p")(
        inputs=[q, k, gates, mx.array([T, Hv], mx.int32)],
        template=_o2_template(Dk, C, ds, bvo, pt, pt),
        grid=(O_THREADS * N, B * Hv, 1),
        threadgroup=(O_THREADS, 1, 1),
        output_shapes=[(B * Hv, N, C, C)],
        output_dtypes=[pt],
        init_value=init_value,
    )[0]


def h3o_pass(
    W, U, Kw, gates, state, q, P, nw: int, C: int = CHUNK, init_value=None, stamps: bool = False
):
    """FUSE_O's state pass (CUDA: chunk_source.h3o_body, nw warps a threadgroup): (y [B, T, Hv,
    Dv] in the pieces' dtype, the final state fp32). stamps: the stamped build
    (chunk_source.H3O_STAMPS), its stamps [threadgroups, STAMP_SLOTS] uint32 appended."""
    B, Hv, Dv, Dk = state.shape
    T = q.shape[1]
    pt = U.dtype
    extra_shapes, extra_dtypes = [], []
    if stamps:
        extra_shapes, extra_dtypes = [(B * Hv * (Dv // (16 * nw)), src.STAMP_SLOTS)], [mx.uint32]
    which = "h3o_stamped" if stamps else "h3oe" if H3O_EARLY else "h3o"
    smem_of = src.h3o_smem
    if which != "h3o" and H3O_PRODUCERS:
        which = "h3oep" if H3O_PRODUCERS != 2 else "h3oepy"
        smem_of = src.h3o_smem if H3O_PRODUCERS != 2 else src.h3opy_smem
    nb, smem = _h3_ring(lambda n: smem_of(Dk, nw, n, pt.size, C))
    launch = _h3_launch(Dk, nw, C, pt, B * Hv, Dv, nb)
    if which.startswith("h3oep"):
        # the producer warps (H3O_EARLY's order; stamped too): twice the threads, the
        # template's NT the computing ones; "h3oepy": the producers also write y
        nt = 64 * nw
        if which == "h3oep" and H3O_SPLIT:
            # two computing warps a 16 value rows, then the producers: the same threadgroup
            # memory, three times the threads
            which, nt = "h3oeps", 96 * nw
        launch |= {"grid": (nt * B * Hv, *launch["grid"][1:]), "threadgroup": (nt, 1, 1)}
        which += "_stamped" if stamps else ""
    return _build("cuda", which, smem)(
        inputs=[W, U, Kw, gates, state, q, P],
        **launch,
        output_shapes=[(B, T, Hv, Dv), (B, Hv, Dv, Dk), *extra_shapes],
        output_dtypes=[pt, mx.float32, *extra_dtypes],
        init_value=init_value,
    )


def split_shape_ok(k: mx.array, v: mx.array) -> bool:
    """Head sizes the split path is taken for: those it was checked at on the H200 (Dk 32, 64,
    128, 192, 256 with Dv 20 to 128). Dk 96 with Dv 1 (test_gpu_chunk_kernel's odd shape) gave
    wrong outputs there (2026-12-02, cause not found yet); other shapes take the two-kernel
    path."""
    Dk, Dv = k.shape[-1], v.shape[-1]
    return (Dk == 32 or Dk % 64 == 0) and Dv >= 16


def split_chunk_kernel(
    backend: str,
    q,
    k,
    v,
    g,
    beta,
    state,
    mask,
    raw_gates=None,
    bv=None,
    prefetch=None,
    init_value=None,
):
    """The split path for scalar gates: WY kernel, state pass, output pass. Returns (y in v's
    dtype, state fp32). init_value: every output of the three kernels starts as it (tests)."""
    T = q.shape[1]
    Hv = v.shape[2]
    iv = init_value
    if WY_P and FUSE_O and wy_p_applies(backend, q, k, v):
        nw = fuse_y_warps(backend, q, k, v, state)  # U is in v's dtype
        if nw:
            W, U, Kw, gates, P = wy_pass(
                backend, k, v, g, beta, mask, raw_gates=raw_gates, init_value=iv, q=q
            )
            return h3o_pass(W, U, Kw, gates, state, q, P, nw, init_value=iv)
    W, U, Kw, gates = wy_pass(backend, k, v, g, beta, mask, raw_gates=raw_gates, init_value=iv)
    nw = fuse_y_warps(backend, q, k, U, state)
    if nw and U.dtype == v.dtype and FUSE_O:
        P = o2p_pass(q, k, gates, T, Hv, U.dtype, init_value=iv)
        y, state_out = h3o_pass(W, U, Kw, gates, state, q, P, nw, init_value=iv)
        return y, state_out
    if nw and U.dtype == v.dtype:
        Yi, Vn, state_out = h3y_pass(W, U, Kw, gates, state, q, nw, init_value=iv)
        return o2y_pass(q, k, gates, Yi, Vn, T, Hv, init_value=iv), state_out
    H, Vn, state_out = h_pass(
        backend, W, U, Kw, gates, state, bv=bv, prefetch=prefetch, init_value=iv
    )
    y = o_pass(backend, q, k, gates, H, Vn, T, Hv, v.dtype, init_value=iv)
    return y, state_out


def _factory(backend: str):
    """MLX's kernel factory for the backend (a seam: the CPU tests put the lane emulator here)."""
    return getattr(mx.fast, _FACTORY[backend])


def available_backend() -> str | None:
    """ "metal" or "cuda" where MLX has that GPU backend, else None."""
    for name in ("metal", "cuda"):
        if _AVAILABLE[name]():
            return name
    return None


def supports(q, v, g) -> bool:
    """Shapes the chunk kernels take: those of the fused kernels (Dk a multiple of 32 up to
    256), on a machine with a GPU backend."""
    return available_backend() is not None and shape_supported(q, v, g)


def prep_ops(q, k, v, g, beta, mask, C: int = CHUNK):
    """The state pass's inputs from MLX ops (chunked.py's intra-chunk pieces): W, U, Qg, P, Kw
    [B*Hv, N*C, .] and decay [B*Hv, N, Dk], fp32, rows padded to N*C."""
    from . import chunked as ch

    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    R = Hv // Hk
    per_key = g.ndim == 4
    qc, kc, vc, bc, gc, N = ch._chunked_inputs(q, k, v, g, beta, mask, C)
    if per_key:
        # Per-key decays build a [C, C, Dk] tensor per chunk: chunks go in groups, as chunked.py.
        step = max(1, ch._PER_KEY_GROUP_ELEMS // (B * Hv * C * C * Dk))
        parts = []
        for n0 in range(0, N, step):
            sl = (slice(None),) * 3 + (slice(n0, min(N, n0 + step)),)
            parts.append(ch._prep_per_key(qc[sl], kc[sl], vc[sl], gc[sl], bc[sl]))
        U, W, P, kw, qs, decay = (
            mx.concatenate([p[i] for p in parts], axis=3) for i in (0, 1, 2, 3, 4, 6)
        )
        ys_scale = None
    else:
        U, W, P, kw, qs, ys_scale, decay = ch._prep_scalar(qc, kc, vc, gc, bc)
    shape = (B, Hk, R, N, C)
    if ys_scale is not None:
        qs = ys_scale * qs
    BH = B * Hv

    def rows(x, width):
        return mx.contiguous(mx.broadcast_to(x, (*shape, width)).reshape(BH, N * C, width))

    decay = mx.broadcast_to(decay, (B, Hk, R, N, Dk, 1)).reshape(BH, N, Dk)
    return (
        rows(W, Dk),
        rows(U, Dv),
        rows(qs, Dk),
        rows(P, C),
        rows(mx.swapaxes(kw, -1, -2), Dk),
        mx.contiguous(decay),
    )


def prep_kernel(
    backend: str,
    q,
    k,
    v,
    g,
    beta,
    mask,
    C: int = CHUNK,
    raw_gates=None,
    matrix=None,
    init_value=None,
):
    """The state pass's inputs from PREP_BODY (scalar gates only); same layout as prep_ops.
    raw_gates = (a, b, A_log, dt_bias): the gates are computed in the kernel (g, beta unused).
    matrix: k k^T and q k^T on the tile layer (None = MATRIX), MP by q's dtype. init_value:
    every output starts as it (tests)."""
    B, T, _, Dk = q.shape
    Hv, Dv = v.shape[2:]
    N = -(-T // C)
    BH = B * Hv
    mask, gates, which = _gate_inputs("prep", g, beta, mask, raw_gates, B, T)
    template = [("Dk", Dk), ("C", C), ("NT", PREP_THREADS), ("DS", KEY_SLICE)]
    if MATRIX if matrix is None else matrix:
        which += "_mma"
        template.append(("MP", operand_precision(q.dtype)))
    return _build(backend, which)(
        inputs=[q, k, v, *gates, mask.astype(mx.bool_)],
        template=template,
        grid=(PREP_THREADS * N, BH, 1),
        threadgroup=(PREP_THREADS, 1, 1),
        output_shapes=[
            (BH, N * C, Dk),
            (BH, N * C, Dv),
            (BH, N * C, Dk),
            (BH, N * C, C),
            (BH, N * C, Dk),
            (BH, N, Dk),
        ],
        output_dtypes=[mx.float32] * 6,
        init_value=init_value,
    )


def state_pass(
    backend: str,
    pieces,
    state,
    T: int,
    y_dtype,
    C: int = CHUNK,
    init_value=None,
    bv=None,
    prefetch=None,
    matrix=None,
):
    """The sequential pass over the chunks: returns (y [B, T, Hv, Dv] in y_dtype, state).
    bv: value rows per threadgroup (default BV; a multiple of 4; 32 needs more than Apple's
    32 KB of threadgroup memory at Dk = 128). matrix: STATE_MMA_BODY (True) or STATE_BODY
    (False); None = MATRIX. The matrix pass takes bv in MMA_BV_CHOICES[backend] (default
    MMA_BV), 32 only for Dk <= 128."""
    W, U, Qg, P, Kw, decay = pieces
    B, Hv, Dv, Dk = state.shape
    if MATRIX if matrix is None else matrix:
        bv = bv or MMA_BV
        if bv not in MMA_BV_CHOICES[backend] or (bv > 16 and Dk > 128):
            raise ValueError(
                f"gated_delta chunk kernel: the matrix state pass takes bv in "
                f"{MMA_BV_CHOICES[backend]} on {backend} (32 only for Dk <= 128), got bv={bv} "
                f"with Dk={Dk}"
            )
        which, nt = "state_mma", mma_threads(bv, C)
        precision = [("MP", operand_precision(y_dtype))]
    else:
        bv = bv or BV
        which, nt, precision = "state", STATE_THREADS, []
    template = [("Dk", Dk), ("BV", bv), ("C", C), ("NT", nt), *precision]
    template += [("PF", PREFETCH if prefetch is None else int(prefetch)), ("YT", y_dtype)]
    return _build(backend, which)(
        inputs=[W, U.reshape(B, Hv, -1, Dv), Qg, P, Kw, decay, state, mx.array([T], mx.int32)],
        template=template,
        grid=(nt * B * Hv, -(-Dv // bv), 1),
        threadgroup=(nt, 1, 1),
        output_shapes=[(B, T, Hv, Dv), (B, Hv, Dv, Dk)],
        output_dtypes=[y_dtype, mx.float32],
        init_value=init_value,
    )


def gated_delta_chunk_kernel(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
    *,
    backend: str | None = None,
    prep: str = "auto",
    init_value: float | None = None,
    bv: int | None = None,
    matrix: bool | None = None,
    split: bool | None = None,
) -> tuple[mx.array, mx.array]:
    """Chunked gated delta rule on the GPU; state [B, Hv, Dv, Dk] fp32 (the other shapes as in
    the module docstring). `prep`: "kernel" (PREP_BODY, scalar gates),
    "ops" (MLX ops) or "auto" (the kernel for scalar gates); `bv`, `matrix`: see state_pass.
    `split` (None = SPLIT): scalar gates take the split path (split_chunk_kernel; `prep` and
    `matrix` unused, `bv` is the state pass's). init_value: every output of the kernels (the
    prep kernel's pieces too) starts as it (tests). Returns (y, state fp32)."""
    backend = backend or available_backend()
    if backend is None:
        raise RuntimeError("gated_delta chunk kernel: no Metal or CUDA backend in this MLX")
    T = q.shape[1]
    state = state.astype(mx.float32)
    if (SPLIT if split is None else split) and g.ndim == 3 and split_shape_ok(k, v):
        return split_chunk_kernel(
            backend, q, k, v, g, beta, state, mask, bv=bv, init_value=init_value
        )
    if prep == "auto":
        prep = "ops" if g.ndim == 4 else "kernel"
    if prep == "kernel":
        if g.ndim == 4:
            raise ValueError("gated_delta chunk kernel: the prep kernel takes scalar gates only")
        pieces = prep_kernel(backend, q, k, v, g, beta, mask, matrix=matrix, init_value=init_value)
    else:
        pieces = prep_ops(q, k, v, g, beta, mask)
    return state_pass(
        backend, pieces, state, T, v.dtype, init_value=init_value, bv=bv, matrix=matrix
    )


def gated_delta_update_chunk_kernel(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
    *,
    backend: str | None = None,
    init_value: float | None = None,
    bv: int | None = None,
    matrix: bool | None = None,
    split: bool | None = None,
) -> tuple[mx.array, mx.array]:
    """Chunked gated delta rule on the GPU from the raw gate inputs (a, b [B, T, Hv]; A_log,
    dt_bias [Hv]), computed in fp32 inside the prep (or WY) kernel. Returns (y, state fp32)."""
    backend = backend or available_backend()
    if backend is None:
        raise RuntimeError("gated_delta chunk kernel: no Metal or CUDA backend in this MLX")
    gates = (a, b, A_log, dt_bias)
    if (SPLIT if split is None else split) and split_shape_ok(k, v):
        return split_chunk_kernel(
            backend,
            q,
            k,
            v,
            None,
            None,
            state.astype(mx.float32),
            mask,
            raw_gates=gates,
            bv=bv,
            init_value=init_value,
        )
    pieces = prep_kernel(
        backend, q, k, v, None, None, mask, raw_gates=gates, matrix=matrix, init_value=init_value
    )
    return state_pass(
        backend,
        pieces,
        state.astype(mx.float32),
        q.shape[1],
        v.dtype,
        init_value=init_value,
        bv=bv,
        matrix=matrix,
    )
