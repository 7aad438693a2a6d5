"""Metal build of the fused gated-delta kernels (`mx.fast.metal_kernel`).

The kernel bodies live in `source.py`; this file adds only the Metal helpers they use. State
layout [B, Hv, Dv, Dk] fp32. Every builder returns None, and `supports()` False, without Metal.
MLX adds a Metal attribute (thread_position_in_grid, ...) to the kernel signature only when its
name appears in `source`, so the prologue that reads them is part of `source`, not `header`.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from . import source

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

// Metal has no cache-prefetch instruction: the hint compiles to nothing.
#define gd_prefetch(p) ((void)0)
"""

PROLOGUE = """
  const unsigned gd_lane = thread_position_in_threadgroup.x;
  const unsigned gd_row_group = thread_position_in_grid.y;
  const unsigned gd_head = threadgroup_position_in_grid.x;
"""


def is_available() -> bool:
    return mx.metal.is_available()


def kernel_source(gate: str, mask: bool, decode: bool = False) -> str:
    """The full `source=` for one variant: prologue + body."""
    return PROLOGUE + source.kernel_body(gate, mask, decode)


@cache
def build(gate: str, mask: bool, decode: bool = False):
    """The `mx.fast.metal_kernel` of one variant, or None without Metal."""
    if not is_available():
        return None
    return mx.fast.metal_kernel(
        name=source.kernel_name(gate, mask, decode),
        input_names=source.input_names(gate, mask),
        output_names=source.OUTPUT_NAMES,
        source=kernel_source(gate, mask, decode),
        header=HEADER,
    )


def supports(q: mx.array, v: mx.array, g: mx.array) -> bool:
    return is_available() and source.shape_supported(q, v, g)


def gated_delta_kernel(q, k, v, g, beta, state, mask=None, **launch_kw):
    """Fused recurrence with precomputed gates; returns (y, state [B, Hv, Dv, Dk] fp32)."""
    return source.run_gates(build, q, k, v, g, beta, state, mask, **launch_kw)


def gated_delta_update_kernel(q, k, v, a, b, A_log, dt_bias, state, mask=None, **launch_kw):
    """Fused gating + recurrence; returns (y, state [B, Hv, Dv, Dk] fp32)."""
    return source.run_fused(build, q, k, v, a, b, A_log, dt_bias, state, mask, **launch_kw)
