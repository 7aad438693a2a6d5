"""Host side of the prefill attention kernel (`prefill_source.py`): the shapes it takes, its
tiles per backend, the helpers it adds to the chunk kernels' tile layer, its builds, and
`prefill_attention`.

    prefill_attention(q, k, v, scale=..., mask=None | "causal" | bool array) -> [B, Hq, T, D]

Three bodies (prefill_source.VERSIONS): 1, 2 (CUDA's default) and 3 (session 12: the softmax in
registers; not yet run on a GPU); VERSION picks per backend, `version=` for A/B timings, which
the bench runs side by side.

Routing: `models/attention.py` (PREFILL_KERNEL, `prefill_kernel_wants`: from 8192 queries by
default; the long-history switch PREFILL_KERNEL_MIN_S is prepared, off).
"""

from __future__ import annotations

import math

import mlx.core as mx

from .. import gpu_backend_name
from ..gated_delta import chunk_launch
from ..gated_delta.chunk_source import COPY_TILE_LOOP, LDMATRIX4
from ..positions import prologue
from . import prefill_source as src

# (BK keys a block, DS columns staged at a time, W warps) by backend (threadgroup_bytes: CUDA
# bf16 31 KB of its 48 in version 1, 18 KB in version 2; Metal, everything staged as floats,
# 22 KB of its 32 in version 1, 17 KB in version 2).
TILES_V1 = {"cuda": (32, 64, 4), "metal": (16, 16, 4)}
# Version 2's: 64 registers of Q fragments and 128 of output a lane leave little room; ptxas
# (nvcc 13, sm_90) fits the causal / no-mask builds at BK 32 without spills (1,341 instructions
# a 32 keys in the causal loop against 838 a 16 at BK 16), the bool-mask builds (the mask's row
# offset live too) only at BK 16 (MASK_TILES). BK 16 for all of them since session 11: on the
# H200 (0.8B shape, causal) it was faster at every length measured (3.23 against 3.86 ms at 8192
# queries over 8192 keys; 0.67-1.62 against 0.74-1.92 at 2048 queries).
TILES = {"cuda": (16, 64, 4), "metal": (16, 16, 4)}
MASK_TILES = {"cuda": (16, 64, 4), "metal": (16, 16, 4)}
# Which body runs by backend (prefill_source.VERSIONS; 1 and 2 stay for A/B timings): CUDA 3
# since session 12 (H200: 1.3-2.0x version 2 at every measured length, RESULTS); Metal 1 until a
# Mac measures 2 or 3 (whose Q fragments and output, simdgroup matrices, are 256 floats a thread
# at D 256: Apple GPUs are likely to spill them). Version 2's ring of staged key / value slices:
# on CUDA 4 (3 slices in flight; a power of two dividing a block's 2 D / DS slices, so the slots
# are compile-time constants); Metal's copies are synchronous: 2 is enough.
VERSION = {"cuda": 3, "metal": 1}
RING = {"cuda": 4, "metal": 2}
# Version 3 (session 12: version 2 with the softmax in registers, prefill_source._WALK3): on CUDA
# whole 16-key blocks as the ring's slices (DS 0: DS = D, at D 256 2 barriers a block, not 10)
# in a ring of 4 (3 slices, 1.5 blocks, 24 KB in flight a threadgroup at D 256; 33,792 B
# shared); its only threadgroup memory is the ring. Metal: the version 2 tiles (not measured:
# Metal keeps version 1).
TILES_V3 = {"cuda": (16, 0, 4), "metal": (16, 16, 4)}
RING_V3 = {"cuda": 4, "metal": 2}
MP = 1  # bf16 / fp16 operands are exact in tf32 (and CUDA takes them by mma.m16n8k16)
DTYPES = (mx.bfloat16, mx.float16)
_POSITIONS = {"at_tid": "thread.x", "at_tg_x": "threadgroup.x", "at_tg_y": "threadgroup.y"}

# at_acc_scale_rows(acc, dg): row i of a warp's 16 x 16 accumulator times dg[17 i] (dg a 16 x 16
# row-major matrix in threadgroup memory, zero off its diagonal). CUDA: each lane scales its
# own rows (mma's C fragment: lane 4 g + t holds rows g and g + 8). Metal: the diagonal blocks
# of dg multiply the accumulator from the left (layout-free; 0 * x adds exact zeros).
_ROWS = {
    "cuda": """
__device__ __forceinline__ void at_acc_scale_rows(gd_acc& x, const float* dg) {
  const int g = (threadIdx.x & 31) >> 2;
  const float s0 = dg[17 * g];
  const float s1 = dg[17 * (g + 8)];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    x.c[h][0] *= s0;
    x.c[h][1] *= s0;
    x.c[h][2] *= s1;
    x.c[h][3] *= s1;
  }
}
""",
    "metal": """
inline void at_acc_scale_rows(thread gd_acc& x, threadgroup float* dg) {
  for (int i = 0; i < 2; ++i) {
    simdgroup_float8x8 d;
    simdgroup_load(d, dg + 8 * i * 16 + 8 * i, ulong(16));
    for (int j = 0; j < 2; ++j) {
      simdgroup_multiply(x.m[i][j], d, x.m[i][j]);
    }
  }
}
""",
}


# Version 2's register operands: at_frag holds a 16 x 16 A operand (the input dtype on CUDA, as
# mma.m16n8k16's A fragment; four 8 x 8 float matrices on Metal), loaded once from staged rows
# and used for many products:
#   at_frag_load(f, A, lda)            f(i, k) = A[i lda + k]
#   at_mma_frag<TB>(acc, f, B, ldb)    acc += f B, B(k, j) = B[k ldb + j] (TB: B[j ldb + k])
# (K = 16; CUDA: B by one ldmatrix, as gd_mma_staged's, 16-bit staged operands only).
_FRAGS = {
    "cuda": """
struct at_frag {
  unsigned a[4];
};
// ldmatrix .x4 at a shared address the compiler converts (__cvta_generic_to_shared: it can
// hoist and fold the conversion, where gd_ldmatrix4's own cvta is opaque to it)
template <bool TR>
__device__ __forceinline__ void at_ldmatrix4(unsigned* r, const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
"""
    + LDMATRIX4
    + """}
// gd_copy_tile's copy (an R x CL tile, row r from src + min(r, rmax) sld, by cp.async) with its
// shared address from __cvta_generic_to_shared, which the compiler folds (gd_copy_tile's cvta,
// inline asm, is redone for every copy)
template <int NT, int R, int CL, typename D, typename S>
__device__ __forceinline__ void at_copy_tile(D dst, int dld, S src, size_t sld, int rmax, int tid) {
  constexpr int V = 16 / int(sizeof(*src));  // elements of a 16-byte copy
  static_assert(CL % V == 0, "at_copy_tile: whole 16-byte copies a row");
  constexpr int U = R * CL / V;  // copies of the tile
  const unsigned d0 = static_cast<unsigned>(__cvta_generic_to_shared(dst));
"""
    + COPY_TILE_LOOP
    + """    const unsigned d = d0 + unsigned(r * dld + c) * unsigned(sizeof(*dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src + rs * sld + c));
  }
}
// Version 3's copy: at_copy_tile's, where every row is in range (rmax >= R - 1: all but the
// last block) without the per-row clamp, each thread's rows and columns fixed and its later
// copies at constant offsets from its first (immediate offsets: 4 instructions less a copy)
template <int NT, int R, int CL, typename D, typename S>
__device__ __forceinline__ void at_copy_rows(D dst, int dld, S src, size_t sld, int rmax, int tid) {
  constexpr int V = 16 / int(sizeof(*src));
  constexpr int CV = CL / V;     // copies a row
  constexpr int U = R * CV;      // copies of the tile
  constexpr int RPI = NT / CV;   // rows a round of the threadgroup's copies
  if (NT % CV != 0 || rmax < R - 1) {
    at_copy_tile<NT, R, CL>(dst, dld, src, sld, rmax, tid);
    return;
  }
  const int r0 = tid / CV;
  const int c = (tid % CV) * V;
  const unsigned d0 = static_cast<unsigned>(__cvta_generic_to_shared(dst + r0 * dld + c));
  const S s0 = src + r0 * sld + c;
#pragma unroll
  for (int it = 0; it < (U + NT - 1) / NT; ++it) {
    if (U % NT != 0 && r0 + it * RPI >= R) break;
    const unsigned d = d0 + unsigned(it * RPI * dld) * unsigned(sizeof(*dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(s0 + it * RPI * sld));
  }
}
template <typename P>
__device__ __forceinline__ void at_frag_load(at_frag& f, P A, int lda) {
  const int m = (threadIdx.x & 31) >> 3;
  const int r = threadIdx.x & 7;
  at_ldmatrix4<false>(f.a, A + (8 * (m & 1) + r) * lda + 8 * (m >> 1));
}
template <bool TB, typename P>
__device__ __forceinline__ void at_mma_frag(gd_acc& x, const at_frag& f, P B, int ldb) {
  constexpr int KIND = gd_kind16(P(nullptr));
  static_assert(KIND != 0, "at_mma_frag: bf16 / fp16 staged operands");
  const int m = (threadIdx.x & 31) >> 3;
  const int r = threadIdx.x & 7;
  unsigned b[4];
  at_ldmatrix4<!TB>(b, B + (TB ? (8 * (m >> 1) + r) * ldb + 8 * (m & 1)
                               : (8 * (m & 1) + r) * ldb + 8 * (m >> 1)));
  gd_mma_m16n8k16<KIND>(x.c[0], f.a, b);
  gd_mma_m16n8k16<KIND>(x.c[1], f.a, b + 2);
}
""",
    "metal": """
struct at_frag {
  simdgroup_float8x8 m[2][2];  // [row half][k half]
};
template <int NT, int R, int CL, typename D, typename S>
inline void at_copy_tile(D dst, int dld, S src, size_t sld, int rmax, int tid) {
  gd_copy_tile<NT, R, CL>(dst, dld, src, sld, rmax, tid);
}
template <int NT, int R, int CL, typename D, typename S>
inline void at_copy_rows(D dst, int dld, S src, size_t sld, int rmax, int tid) {
  gd_copy_tile<NT, R, CL>(dst, dld, src, sld, rmax, tid);
}
template <typename P>
inline void at_frag_load(thread at_frag& f, P A, int lda) {
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      simdgroup_load(f.m[i][j], A + 8 * i * lda + 8 * j, ulong(lda));
    }
  }
}
template <bool TB, typename P>
inline void at_mma_frag(thread gd_acc& x, thread const at_frag& f, P B, int ldb) {
  for (int kk = 0; kk < 2; ++kk) {
    simdgroup_float8x8 b[2];
    for (int j = 0; j < 2; ++j) {
      simdgroup_load(b[j], TB ? B + 8 * j * ldb + 8 * kk : B + 8 * kk * ldb + 8 * j, ulong(ldb),
                     ulong2(0, 0), TB);
    }
    for (int i = 0; i < 2; ++i) {
      for (int j = 0; j < 2; ++j) {
        simdgroup_multiply_accumulate(x.m[i][j], f.m[i][kk], b[j], x.m[i][j]);
      }
    }
  }
}
""",
}


# Version 3's layout-aware register ops: a lane's 8 elements of a warp's 16 x 16 accumulator
#   at_el(x, e)            element e (a reference): e < 4 in row at_row0(lane), e >= 4 in row
#                          at_row0(lane) + 8; column at_col(e, lane)
#   at_row_max / at_row_sum(x, lane)   over the 4 lanes holding a row's elements
#   at_fmax(a, b)          the larger (one instruction where the ternary takes two)
#   at_exp2(x)             2^x
#   at_frag_round<OT>(f, x)  x's elements rounded to OT, in x and as the A fragment f (P V)
# CUDA: mma's C fragment (lane 4 g + t: rows g, g + 8, columns 2 t, 2 t + 1 of each 8-column
# half; c[h][0..1] row g, c[h][2..3] row g + 8), which is m16n8k16's A fragment once packed in
# pairs (a[0] rows g cols 0-7, a[1] g + 8 cols 0-7, a[2] g cols 8-15, a[3] g + 8 cols 8-15);
# the lanes of a row differ in lane bits 0 and 1. Metal: a simdgroup_float8x8's two
# thread_elements (lane l: row 4 (l / 16) + (l / 2) % 4, columns 4 ((l / 8) % 2) + 2 (l % 2) +
# {0, 1}, as MLX's steel attention reads them); the lanes of a row differ in bits 0 and 3.
_REGS = {
    "cuda": """
__device__ __forceinline__ float& at_el(gd_acc& x, int e) {
  return x.c[(e >> 1) & 1][(e & 1) + 2 * (e >> 2)];
}
__device__ __forceinline__ int at_row0(int lane) {
  return lane >> 2;
}
__device__ __forceinline__ int at_col(int e, int lane) {
  return 8 * ((e >> 1) & 1) + 2 * (lane & 3) + (e & 1);
}
__device__ __forceinline__ float at_fmax(float a, float b) {
  return fmaxf(a, b);
}
__device__ __forceinline__ float at_row_max(float x, int) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float at_row_sum(float x, int) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float at_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ unsigned at_pack2(float a, float b, const __nv_bfloat16*) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const unsigned*>(&h);
}
__device__ __forceinline__ unsigned at_pack2(float a, float b, const __half*) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const unsigned*>(&h);
}
__device__ __forceinline__ float at_lo(unsigned u, const __nv_bfloat16*) {
  return __uint_as_float(u << 16);
}
__device__ __forceinline__ float at_hi(unsigned u, const __nv_bfloat16*) {
  return __uint_as_float(u & 0xffff0000u);
}
__device__ __forceinline__ float at_lo(unsigned u, const __half*) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
}
__device__ __forceinline__ float at_hi(unsigned u, const __half*) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
}
template <typename OT>
__device__ __forceinline__ void at_frag_round(at_frag& f, gd_acc& x) {
  const OT* k = nullptr;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // a[i]: column half i / 2, row half i % 2
    float& a = x.c[i >> 1][2 * (i & 1)];
    float& b = x.c[i >> 1][2 * (i & 1) + 1];
    f.a[i] = at_pack2(a, b, k);
    a = at_lo(f.a[i], k);
    b = at_hi(f.a[i], k);
  }
}
""",
    "metal": """
inline thread float& at_el(thread gd_acc& x, int e) {
  return x.m[e >> 2][(e >> 1) & 1].thread_elements()[e & 1];
}
inline int at_row0(int lane) {
  return 4 * (lane / 16) + (lane / 2) % 4;
}
inline int at_col(int e, int lane) {
  return 8 * ((e >> 1) & 1) + 4 * ((lane / 8) % 2) + 2 * (lane % 2) + (e & 1);
}
inline float at_fmax(float a, float b) {
  return metal::max(a, b);
}
inline float at_row_max(float x, int lane) {
  x = metal::max(x, simd_shuffle_xor(x, ushort(1)));
  return metal::max(x, simd_shuffle_xor(x, ushort(8)));
}
inline float at_row_sum(float x, int lane) {
  x += simd_shuffle_xor(x, ushort(1));
  return x + simd_shuffle_xor(x, ushort(8));
}
inline float at_exp2(float x) {
  return metal::exp2(x);
}
template <typename OT>
inline void at_frag_round(thread at_frag& f, thread gd_acc& x) {
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      for (int e = 0; e < 2; ++e) {
        const float r = float(static_cast<OT>(x.m[i][j].thread_elements()[e]));
        x.m[i][j].thread_elements()[e] = r;
        f.m[i][j].thread_elements()[e] = r;
      }
    }
  }
}
""",
}


def header(backend: str) -> str:
    """The chunk kernels' header (base helpers, copies, tile layer), at_acc_scale_rows, the
    register operands (at_frag) and version 3's layout-aware register ops (at_el ..)."""
    return chunk_launch.header(backend) + _ROWS[backend] + _FRAGS[backend] + _REGS[backend]


def source(
    backend: str, mask: bool, causal: bool, version: int | None = None, ring: int | None = None
) -> str:
    """The kernel text (`ring`: version 2 / 3's slots, the backend's if None: `rings`)."""
    v = VERSION[backend] if version is None else version
    return prologue(backend, **_POSITIONS) + src.body(mask, causal, v, ring or rings(backend, v))


def rings(backend: str, version: int | None = None) -> int:
    """The ring slots of a version's body on a backend (version 1 has none: RING's, unused)."""
    v = VERSION[backend] if version is None else version
    return (RING_V3 if v == 3 else RING)[backend]


def tiles(
    backend: str, version: int | None = None, mask: bool = False, D: int = 256
) -> tuple[int, int, int]:
    """(BK, DS, W) of a version's body on a backend (version 2: `mask`, a bool-mask build;
    version 3: DS 0 in TILES_V3 is D, whole rows)."""
    v = VERSION[backend] if version is None else version
    if v == 3:
        BK, DS, W = TILES_V3[backend]
        return BK, DS or D, W
    return (TILES_V1 if v == 1 else MASK_TILES if mask else TILES)[backend]


def threadgroup_bytes(
    backend: str,
    staged: int | None = None,
    version: int | None = None,
    mask: bool = False,
    D: int = 256,
) -> int:
    """Threadgroup memory of the kernel with the backend's tiles: staged elements (`staged`
    bytes each: the dtype's on CUDA, floats on Metal) (16 W + BK) (DS + 8) in version 1, RING BK
    (DS + 8) in version 2, plus 16 W (BK + 8) for P, and 16 W (BK + 17) floats; version 3 only
    its ring, RING_V3 BK (DS + 8), or the query rows' 16 W (DS + 8) (16 W 24 past the ring)."""
    v = VERSION[backend] if version is None else version
    BK, DS, W = tiles(backend, v, mask, D)
    staged = 4 if backend == "metal" else staged or 2
    if v == 3:
        rows = RING_V3[backend] * BK
        return max(rows * (DS + 8), 16 * W * (DS + 8 if 16 * W <= rows else 24)) * staged
    slices = (16 * W + BK) * (DS + 8) if v == 1 else RING[backend] * BK * (DS + 8)
    return (slices + 16 * W * (BK + 8)) * staged + 16 * W * (BK + 17) * 4


def shape_supported(q, k, v, backend: str = "cuda") -> bool:
    """q [B, Hq, T, D], k = v [B, Hkv, S, D]: bf16 / fp16, one dtype, D a multiple of the
    backend's DS (and 16) up to 256, Hkv | Hq, T <= S, T and S >= 1."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        return False
    B, Hq, T, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    DS = TILES[backend][1]
    if Bk != B or Dk != D or D % DS or D % 16 or D > 256 or not 1 <= T <= S:
        return False
    if Hkv < 1 or Hq % Hkv:
        return False
    return q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype


def grid(B: int, Hq: int, Hkv: int, T: int, W: int) -> tuple[int, int]:
    """(threadgroups along x, along y): x = head groups x query blocks, y = B * Hkv."""
    G = Hq // Hkv
    WG = math.gcd(G, W)
    TQ = 16 * (W // WG)
    return (G // WG) * (-(-T // TQ)), B * Hkv


_kernels: dict[tuple, object] = {}
_FACTORY = {"metal": "metal_kernel", "cuda": "cuda_kernel"}


def kernel(
    backend: str, mask: bool, causal: bool, version: int | None = None, ring: int | None = None
):
    v = VERSION[backend] if version is None else version
    r = (ring or rings(backend, v)) if v != 1 else None
    key = (backend, mask, causal, v, r)
    if key not in _kernels:
        _kernels[key] = getattr(mx.fast, _FACTORY[backend])(
            name=src.name(mask, causal, v, r),
            input_names=src.inputs(mask),
            output_names=src.OUTPUTS,
            source=source(backend, mask, causal, v, r),
            header=header(backend),
        )
    return _kernels[key]


def backend_name() -> str | None:
    """The GPU backend the kernel runs on, None on the CPU stream."""
    return None if mx.default_device() == mx.cpu else gpu_backend_name()


def mask_supported(mask, B: int, T: int, S: int) -> bool:
    """Whether the kernel reads `mask`: None, "causal", or bool [Bm, 1, Tm, Sm] (leading axes of
    size 1 may be dropped) with Bm 1 or B, Tm 1 or T, Sm 1 or S, and Bm Tm S < 2^31."""
    if mask is None or isinstance(mask, str):
        return mask in (None, "causal")
    if not isinstance(mask, mx.array) or mask.dtype != mx.bool_ or mask.ndim > 4:
        return False
    m = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    fits = m[0] * m[2] * S < 2**31  # the kernel's int offsets into the mask
    return m[0] in (1, B) and m[1] == 1 and m[2] in (1, T) and m[3] in (1, S) and fits


def prefill_attention(
    q,
    k,
    v,
    *,
    scale: float,
    mask=None,
    version: int | None = None,
    tiles_: tuple | None = None,
    ring_: int | None = None,
    kv_len: int | None = None,
) -> mx.array:
    """softmax(q k^T * scale + mask) v by the kernel; q [B, Hq, T, D] the last T positions of
    the first S keys of k, v [B, Hkv, SC, D] (S = `kv_len`, SC if None: a KV cache's whole
    buffers are read in place, where a slice of them would be copied to make it contiguous);
    mask None, "causal" or bool [Bm, 1, Tm, S] (Bm 1 or B, Tm 1 or T; True: attend). Returns
    [B, Hq, T, D] in q's dtype; a row that sees no key gives 0. The caller checks
    `backend_name()` and `shape_supported` first. `version`: the body
    (prefill_source.VERSIONS), VERSION if None; `tiles_`: (BK, DS, W) in place of the version's
    and `ring_`: version 2 / 3's ring slots in place of `rings` (timings: BK a multiple of 16,
    DS one dividing D)."""
    backend = backend_name()
    if backend is None or not shape_supported(q, k, v, backend):
        raise ValueError("prefill_attention: no GPU backend or an unsupported shape")
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2] if kv_len is None else kv_len
    if not T <= S <= k.shape[2]:
        raise ValueError(f"prefill_attention: kv_len {S} not in [T {T}, {k.shape[2]} keys]")
    if not mask_supported(mask, B, T, S):
        what = mask if isinstance(mask, str) else getattr(mask, "shape", type(mask).__name__)
        raise ValueError(
            f"prefill_attention: mask {what} not read (None, 'causal' or bool [B or 1, 1, T or 1,"
            f" S or 1]) for q {q.shape}, {S} keys"
        )
    causal = isinstance(mask, str)
    arr = mask if isinstance(mask, mx.array) else None
    if arr is not None:
        arr = arr.reshape((1,) * (4 - arr.ndim) + tuple(arr.shape))
        if arr.shape[3] != S:
            arr = mx.broadcast_to(arr, (*arr.shape[:3], S))
    BK, DS, W = tiles_ or tiles(backend, version, arr is not None, D)
    if D % DS:
        raise ValueError(f"prefill_attention: D {D} not a multiple of DS {DS}")
    inputs = [q, k, v, mx.array([scale], mx.float32), mx.array([S], mx.int32)]
    inputs += [arr] if arr is not None else []
    gx, gy = grid(B, Hq, Hkv, T, W)
    return kernel(backend, arr is not None, causal, version, ring_)(
        inputs=inputs,
        template=[("D", D), ("BK", BK), ("DS", DS), ("W", W), ("MP", MP), ("OT", q.dtype)],
        grid=(32 * W * gx, gy, 1),
        threadgroup=(32 * W, 1, 1),
        output_shapes=[q.shape],
        output_dtypes=[q.dtype],
    )[0]
