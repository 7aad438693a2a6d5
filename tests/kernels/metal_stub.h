// Host C++ stand-ins for the Metal builtins the gated-delta Metal prologue and helpers use, so
// `g++ -fsyntax-only -std=c++17` can type-check the Metal kernel sources (tests/kernels/
// test_metal_source.py). Declarations only: nothing here is meant to run.
#pragma once

#include <cstddef>
#include <cstdint>

// Address spaces and kernel attributes carry no meaning for a syntax check.
#define device
#define constant
#define thread
#define threadgroup

using uint = unsigned int;
using ushort = unsigned short;

struct uint3 {
  uint x, y, z;
};

struct float4 {
  float x, y, z, w;
  float4() = default;
  float4(float x_, float y_, float z_, float w_) : x(x_), y(y_), z(z_), w(w_) {}
};

// 16-bit float types: explicit from float (as static_cast uses them), implicit to float.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  explicit bfloat16_t(float);
  operator float() const;
};

struct half {
  uint16_t bits;
  half() = default;
  explicit half(float);
  operator float() const;
};
using float16_t = half;

// SIMD-group shuffle: only the overloads the helpers need, so a wrong argument type fails.
float simd_shuffle_xor(float data, ushort mask);
float simd_sum(float data);
float simd_shuffle(float data, ushort lane);

namespace metal {
float exp(float x);
float exp2(float x);
float max(float a, float b);
float log(float x);
float rsqrt(float x);
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
void threadgroup_barrier(mem_flags flags);
}  // namespace metal

// Threadgroup barrier (the chunk kernels).
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
void threadgroup_barrier(mem_flags flags);

// simdgroup matrices (the chunk kernels' tile layer): the declarations it uses.
using ulong = unsigned long;
struct ulong2 {
  ulong x, y;
  ulong2(ulong x_, ulong y_) : x(x_), y(y_) {}
};
template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diagonal);  // dval on the diagonal, 0 elsewhere (MSL 6.7)
  struct elements {
    T& operator[](int i);
  };
  elements& thread_elements();  // the thread's 2 elements (MSL: thread vec<T, 2>&)
};
using simdgroup_float8x8 = simdgroup_matrix<float, 8, 8>;
template <typename T, int Cols, int Rows>
simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value);
template <typename T, int Cols, int Rows>
void simdgroup_load(simdgroup_matrix<T, Cols, Rows>& d, const T* src,
                    ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0, 0),
                    bool transpose_matrix = false);
template <typename T, int Cols, int Rows>
void simdgroup_store(const simdgroup_matrix<T, Cols, Rows>& a, T* dst,
                     ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0, 0),
                     bool transpose_matrix = false);
template <typename T, int K, int Cols, int Rows>
void simdgroup_multiply_accumulate(simdgroup_matrix<T, Cols, Rows>& d,
                                   const simdgroup_matrix<T, K, Rows>& a,
                                   const simdgroup_matrix<T, Cols, K>& b,
                                   const simdgroup_matrix<T, Cols, Rows>& c);
template <typename T, int K, int Cols, int Rows>
void simdgroup_multiply(simdgroup_matrix<T, Cols, Rows>& d, const simdgroup_matrix<T, K, Rows>& a,
                        const simdgroup_matrix<T, Cols, K>& b);
