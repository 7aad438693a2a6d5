"""Host side of the prefill attention kernel (`prefill_source.py`): the shapes it takes, its
tiles per backend, the one helper it adds to the chunk kernels' tile layer, its builds, and
`prefill_attention`.

    prefill_attention(q, k, v, scale=..., mask=None | "causal" | bool array) -> [B, Hq, T, D]

Off by default: `models/attention.py`'s PREFILL_KERNEL switch (the kernel has been checked on
the CPU's lane emulator and compiled for sm_90 and the Metal stub only; turn it on once the GPU
test, tests/kernels/test_gpu_prefill_attention.py, has passed on the device).
"""

from __future__ import annotations

import math

import mlx.core as mx

from .. import gpu_backend_name
from ..gated_delta import chunk_launch
from ..positions import prologue
from . import prefill_source as src

# (BK keys a block, DS columns staged at a time, W warps) by backend (threadgroup_bytes: CUDA
# bf16 31 KB of its 48, Metal, everything staged as floats, 22 KB of its 32).
TILES = {"cuda": (32, 64, 4), "metal": (16, 16, 4)}
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


def header(backend: str) -> str:
    """The chunk kernels' header (base helpers, copies, tile layer) and at_acc_scale_rows."""
    return chunk_launch.header(backend) + _ROWS[backend]


def source(backend: str, mask: bool, causal: bool) -> str:
    return prologue(backend, **_POSITIONS) + src.body(mask, causal)


def threadgroup_bytes(backend: str, staged: int | None = None) -> int:
    """Threadgroup memory of the kernel with the backend's tiles: (16 W + BK) (DS + 8) +
    16 W (BK + 8) staged elements (`staged` bytes each: the dtype's on CUDA, floats on Metal)
    and 16 W (BK + 16 + 1) floats."""
    BK, DS, W = TILES[backend]
    staged = 4 if backend == "metal" else staged or 2
    return ((16 * W + BK) * (DS + 8) + 16 * W * (BK + 8)) * staged + 16 * W * (BK + 17) * 4


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


def kernel(backend: str, mask: bool, causal: bool):
    key = (backend, mask, causal)
    if key not in _kernels:
        _kernels[key] = getattr(mx.fast, _FACTORY[backend])(
            name=src.name(mask, causal),
            input_names=src.inputs(mask),
            output_names=src.OUTPUTS,
            source=source(backend, mask, causal),
            header=header(backend),
        )
    return _kernels[key]


def backend_name() -> str | None:
    """The GPU backend the kernel runs on, None on the CPU stream."""
    return None if mx.default_device() == mx.cpu else gpu_backend_name()


def mask_supported(mask, B: int, T: int, S: int) -> bool:
    """Whether the kernel reads `mask`: None, "causal", or bool [Bm, 1, Tm, Sm] (leading axes of
    size 1 may be dropped) with Bm 1 or B, Tm 1 or T, Sm 1 or S."""
    if mask is None or isinstance(mask, str):
        return mask in (None, "causal")
    if not isinstance(mask, mx.array) or mask.dtype != mx.bool_ or mask.ndim > 4:
        return False
    m = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    return m[0] in (1, B) and m[1] == 1 and m[2] in (1, T) and m[3] in (1, S)


def prefill_attention(q, k, v, *, scale: float, mask=None) -> mx.array:
    """softmax(q k^T * scale + mask) v by the kernel; q [B, Hq, T, D] the last T positions of
    k, v [B, Hkv, S, D]; mask None, "causal" or bool [Bm, 1, Tm, S] (Bm 1 or B, Tm 1 or T;
    True: attend). Returns [B, Hq, T, D] in q's dtype; a row that sees no key gives 0. The
    caller checks `backend_name()` and `shape_supported` first."""
    backend = backend_name()
    if backend is None or not shape_supported(q, k, v, backend):
        raise ValueError("prefill_attention: no GPU backend or an unsupported shape")
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
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
    BK, DS, W = TILES[backend]
    inputs = [q, k, v, mx.array([scale], mx.float32)] + ([arr] if arr is not None else [])
    gx, gy = grid(B, Hq, Hkv, T, W)
    return kernel(backend, arr is not None, causal)(
        inputs=inputs,
        template=[("D", D), ("BK", BK), ("DS", DS), ("W", W), ("MP", MP), ("OT", q.dtype)],
        grid=(32 * W * gx, gy, 1),
        threadgroup=(32 * W, 1, 1),
        output_shapes=[q.shape],
        output_dtypes=[q.dtype],
    )[0]
