"""CUDA build of the fused gated-delta kernels (compiled by NVRTC).

The kernel bodies live in `source.py`, the host side in `launch.py`; this file adds only the
CUDA helpers the bodies use. The kernels are made by `precompiled.cuda_kernel`: compiled once per
machine into a disk cache (`nvrtc.py`: ~/.cache/qwen35_mlx/cuda) and run through
`mx.fast.precompiled_cuda_kernel`; QWEN35_MLX_CUDA_PRECOMPILED=0 (or no NVRTC) makes them with
`mx.fast.cuda_kernel`, compiled in every process. The helpers below need no header (the
precompiled source includes none). State layout [B, Hv, Dv, Dk] fp32. Without CUDA,
`BACKEND.build` returns None and `BACKEND.supports` False.
"""

from __future__ import annotations

import mlx.core as mx

from . import precompiled
from .launch import GpuBackend

HEADER = """
template <int W>
__device__ __forceinline__ float gd_group_sum(float x) {
#pragma unroll
  for (int o = W / 2; o > 0; o /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, o);
  }
  return x;
}

__device__ __forceinline__ float gd_shuffle(float x, int lane) {
  return __shfl_sync(0xffffffffu, x, lane);
}

__device__ __forceinline__ float4 gd_load_f4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}

__device__ __forceinline__ void gd_store_f4(float* p, float x, float y, float z, float w) {
  *reinterpret_cast<float4*>(p) = make_float4(x, y, z, w);
}

__device__ __forceinline__ float gd_exp(float x) {
  return expf(x);
}

__device__ __forceinline__ float gd_log(float x) {
  return logf(x);
}

__device__ __forceinline__ float gd_rsqrt(float x) {
  return rsqrtf(x);
}

// A product the compiler may not fuse into a following add (no FMA contraction): the conv of
// the decode kernels rounds x w before the sum, so that every T-token variant sums alike.
__device__ __forceinline__ float gd_mul(float a, float b) {
  return __fmul_rn(a, b);
}

// Threadgroup (block) memory and barrier (the conv decode variant).
#define gd_threadgroup __shared__
__device__ __forceinline__ void gd_threadgroup_barrier() {
  __syncthreads();
}

// Asks L2 for the 128-byte line holding p (generic address), so a later load hits L2.
template <typename T>
__device__ __forceinline__ void gd_prefetch(const T* p) {
  asm volatile("prefetch.L2 [%0];" ::"l"(p));
}
"""

PROLOGUE = """
  const unsigned gd_lane = threadIdx.x;
  const unsigned gd_row_group = blockIdx.y * blockDim.y + threadIdx.y;
  const unsigned gd_head = blockIdx.x;
"""


# The kernels of this backend: BACKEND.build / supports / gated_delta_kernel /
# gated_delta_update_kernel (launch.GpuBackend).
BACKEND = GpuBackend(
    header=HEADER,
    prologue=PROLOGUE,
    factory=precompiled.cuda_kernel,
    available=mx.cuda.is_available,
)
