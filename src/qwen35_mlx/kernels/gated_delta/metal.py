"""Metal build of the fused gated-delta kernels (`mx.fast.metal_kernel`).

The kernel bodies live in `source.py`, the host side in `launch.py`; this file adds only the
Metal helpers the bodies use. State layout [B, Hv, Dv, Dk] fp32. Without Metal, `BACKEND.build`
returns None and `BACKEND.supports` False.
MLX adds a Metal attribute (thread_position_in_grid, ...) to the kernel signature only when its
name appears in `source`, so the prologue that reads them is part of `source`, not `header`.
"""

from __future__ import annotations

import mlx.core as mx

from .launch import GpuBackend

HEADER = """
template <int W>
inline float gd_group_sum(float x) {
  for (int o = W / 2; o > 0; o /= 2) {
    x += simd_shuffle_xor(x, ushort(o));
  }
  return x;
}

inline float gd_shuffle(float x, int lane) {
  return simd_shuffle(x, ushort(lane));
}

inline float4 gd_load_f4(const device float* p) {
  return *reinterpret_cast<const device float4*>(p);
}

inline void gd_store_f4(device float* p, float x, float y, float z, float w) {
  *reinterpret_cast<device float4*>(p) = float4(x, y, z, w);
}

inline float gd_exp(float x) {
  return metal::exp(x);
}

inline float gd_log(float x) {
  return metal::log(x);
}

inline float gd_rsqrt(float x) {
  return metal::rsqrt(x);
}

inline float gd_mul(float a, float b) {
  return a * b;
}

// Threadgroup memory and barrier (the conv decode variant).
#define gd_threadgroup threadgroup
inline void gd_threadgroup_barrier() {
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
}

// Metal has no cache-prefetch instruction: the hint compiles to nothing.
#define gd_prefetch(p) ((void)0)
"""

PROLOGUE = """
  const unsigned gd_lane = thread_position_in_threadgroup.x;
  const unsigned gd_row_group = thread_position_in_grid.y;
  const unsigned gd_head = threadgroup_position_in_grid.x;
"""


# The kernels of this backend: BACKEND.build / supports / gated_delta_kernel /
# gated_delta_update_kernel (launch.GpuBackend).
BACKEND = GpuBackend(
    header=HEADER, prologue=PROLOGUE, factory="metal_kernel", available=mx.metal.is_available
)
