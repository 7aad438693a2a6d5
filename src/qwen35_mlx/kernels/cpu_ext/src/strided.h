// Shared by the extension's primitives: where an element of a strided MLX array lies.
#pragma once

#include <cstdint>

#include "mlx/array.h"

namespace qwen35_cpu_ext {

// Offset (in elements) of the flat row-major index `idx` of `a` under its strides.
inline int64_t offset_of(int64_t idx, const mlx::core::array& a) {
  int64_t off = 0;
  for (int d = a.ndim() - 1; d >= 0; --d) {
    const int64_t n = a.shape(d);
    off += (idx % n) * a.strides()[d];
    idx /= n;
  }
  return off;
}

}  // namespace qwen35_cpu_ext
