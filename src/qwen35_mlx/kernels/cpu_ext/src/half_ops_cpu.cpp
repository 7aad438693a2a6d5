// Two float16 elementwise chains of a decode step as MLX CPU primitives, each rounding as MLX's
// own float16 ops round (the same bits), at hardware conversion speed:
//
//   silu_mul(a, b)        -> silu(a) * b                          (the MLP's swiglu)
//   conv_silu(x, w, T)    -> silu(sum_j x[:, t + j] * w[:, j])    (the linear layers' causal
//                            depthwise conv over x [B, K-1+T, C], w [C, K] -> [B, T, C])
//
// Why: on x86 MLX keeps float16 as a struct converted by integer bit manipulation at every op,
// one element at a time, and its exp calls libm's fmaf per polynomial term; a fused float16
// chain costs 40-110 ns an element. At the tiny model's widths these two chains were the
// largest compute of a step and grew with every token of a verify pass (benchmarks/NOTES.md,
// "Session 16, helper mtpround").
//
// Exactness, MLX 0.32's semantics on a CPU without native half arithmetic: every float16 op
// converts its operands to float, computes in float and rounds the result to float16 (round to
// nearest even, as F16C's conversion with imm 0). So each product and each sum of the conv is
// rounded to float16 on its own, in MLX's order (h = x0 w0; h = h + x_j w_j). Sigmoid follows
// MLX's `Sigmoid` for a float16 x: e = fp16(exp(|x|)) with MLX's polynomial exp (x log2(e) split
// at floor(x + 0.5) in double, a degree-6 polynomial by fma, 2^i by exponent bits, > 88 -> inf),
// y = 1 / (1 + e) in float, sigmoid = fp16(x < 0 ? y : 1 - y); silu(x) = fp16(x * sigmoid(x)).
// The tests compare every float16 x against MLX's ops. Built with -ffp-contract=off: no
// contraction besides the explicit fma.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"
#include "clones.h"
#include "strided.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

typedef _Float16 half;

inline float bits_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

// MLX's float exp (simd::exp), for x >= 0 or any float; NaN passes through.
inline float mlx_exp(float x_init) {
  float x = x_init * 1.442695f;
  const float ipart = static_cast<float>(std::floor(static_cast<double>(x) + 0.5));
  const float fpart = x - ipart;
  x = 1.535336188319500e-4f;
  x = std::fma(x, fpart, 1.339887440266574e-3f);
  x = std::fma(x, fpart, 9.618437357674640e-3f);
  x = std::fma(x, fpart, 5.550332471162809e-2f);
  x = std::fma(x, fpart, 2.402264791363012e-1f);
  x = std::fma(x, fpart, 6.931472028550421e-1f);
  x = std::fma(x, fpart, 1.000000000000000f);
  // 2^ipart from the exponent bits (ipart is clamped only to keep the shift defined: outside
  // [-88, 88] the selects below replace the product, as MLX's do).
  const float ic = ipart < -126.0f ? -126.0f : (ipart > 127.0f ? 127.0f : ipart);
  const int32_t epart = (static_cast<int32_t>(ic) + 127) << 23;
  float result = std::isnan(x_init) ? x_init : bits_float(epart) * x;
  result = x_init > 88.0f ? INFINITY : result;
  result = x_init < -88.0f ? 0.0f : result;
  return result;
}

// MLX's Sigmoid and silu of a float16 value (header comment).
inline half sigmoid16(half xh) {
  const float x = static_cast<float>(xh);
  const half e = static_cast<half>(mlx_exp(std::fabs(x)));
  const float y = 1.0f / (1.0f + static_cast<float>(e));
  return static_cast<half>(x < 0.0f ? y : 1.0f - y);
}

inline half silu16(half x) {
  return static_cast<half>(static_cast<float>(x) * static_cast<float>(sigmoid16(x)));
}

inline half mul16(half a, half b) {
  return static_cast<half>(static_cast<float>(a) * static_cast<float>(b));
}

inline half add16(half a, half b) {
  return static_cast<half>(static_cast<float>(a) + static_cast<float>(b));
}

// out[i] = silu(a[i]) * b[i] over n dense elements.
Q35_CLONES void silu_mul_dense(const half* a, const half* b, half* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = mul16(silu16(a[i]), b[i]);
}

// One row b of the conv: x [K-1+T, C] rows of stride sx (elements; channels contiguous), w [C,
// K] dense -> out [T, C] dense. wt: w transposed [K, C] (dense), made once a call.
Q35_CLONES void conv_silu_rows(const half* x, int64_t sx, const half* wt, int K, int T, int64_t C,
                              half* out) {
  for (int t = 0; t < T; ++t) {
    half* o = out + t * C;
    const half* x0 = x + t * sx;
    for (int64_t c = 0; c < C; ++c) o[c] = mul16(x0[c], wt[c]);
    for (int j = 1; j < K; ++j) {
      const half* xj = x + (t + j) * sx;
      const half* wj = wt + j * C;
      for (int64_t c = 0; c < C; ++c) o[c] = add16(o[c], mul16(xj[c], wj[c]));
    }
    for (int64_t c = 0; c < C; ++c) o[c] = silu16(o[c]);
  }
}

using qwen35_cpu_ext::offset_of;

// A dense float16 view of an input: its own buffer when row-contiguous, else a copy.
const half* dense(const mx::array& a, std::vector<half>& buf) {
  const half* p = reinterpret_cast<const half*>(a.data<mx::float16_t>());
  if (a.flags().row_contiguous) return p;
  buf.resize(a.size());
  const int64_t last = a.ndim() ? a.shape(-1) : 1;
  if (a.ndim() && a.strides().back() == 1 && last > 0) {
    for (size_t r = 0; r < buf.size() / last; ++r)
      std::memcpy(&buf[r * last], p + offset_of(r * last, a), last * sizeof(half));
  } else {
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = p[offset_of(i, a)];
  }
  return buf.data();
}

void alloc_outputs(std::vector<mx::array>& outputs) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
}

class SiluMulCPU : public mx::Primitive {
 public:
  explicit SiluMulCPU(mx::Stream s) : mx::Primitive(s) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    alloc_outputs(outputs);
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) enc.set_input_array(a);
    enc.set_output_array(outputs[0]);
    enc.dispatch([a = inputs[0], b = inputs[1], out = outputs[0]]() mutable {
      std::vector<half> abuf, bbuf;
      const half* ap = dense(a, abuf);
      const half* bp = dense(b, bbuf);
      silu_mul_dense(ap, bp, reinterpret_cast<half*>(out.data<mx::float16_t>()), out.size());
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("silu_mul_cpu: a CPU-only primitive; run it on a CPU stream");
  }

  const char* name() const override { return "SiluMulCPU"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
};

class ConvSiluCPU : public mx::Primitive {
 public:
  ConvSiluCPU(mx::Stream s, int tokens) : mx::Primitive(s), tokens_(tokens) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    alloc_outputs(outputs);
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) enc.set_input_array(a);
    enc.set_output_array(outputs[0]);
    enc.dispatch([x = inputs[0], w = inputs[1], out = outputs[0], T = tokens_]() mutable {
      const int64_t B = x.shape(0), C = x.shape(2);
      const int K = w.shape(1);
      std::vector<half> wt(K * C);
      const half* wp = reinterpret_cast<const half*>(w.data<mx::float16_t>());
      for (int64_t c = 0; c < C; ++c)
        for (int j = 0; j < K; ++j)
          wt[j * C + c] = wp[c * w.strides()[0] + j * w.strides()[1]];
      std::vector<half> xbuf;
      const half* xp;
      int64_t sb, sx;
      if (x.strides()[2] == 1) {
        xp = reinterpret_cast<const half*>(x.data<mx::float16_t>());
        sb = x.strides()[0];
        sx = x.strides()[1];
      } else {
        xp = dense(x, xbuf);
        sb = x.shape(1) * C;
        sx = C;
      }
      half* o = reinterpret_cast<half*>(out.data<mx::float16_t>());
      for (int64_t b = 0; b < B; ++b)
        conv_silu_rows(xp + b * sb, sx, wt.data(), K, T, C, o + b * T * C);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("conv_silu_cpu: a CPU-only primitive; run it on a CPU stream");
  }

  const char* name() const override { return "ConvSiluCPU"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return tokens_ == static_cast<const ConvSiluCPU&>(other).tokens_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {{inputs[0].shape(0), tokens_, inputs[0].shape(2)}};
  }

 private:
  int tokens_;
};

mx::array silu_mul(const mx::array& a, const mx::array& b) {
  if (a.dtype() != mx::float16 || b.dtype() != mx::float16 || a.shape() != b.shape())
    throw std::invalid_argument("silu_mul: a and b float16 of one shape");
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array(a.shape(), mx::float16, std::make_shared<SiluMulCPU>(s), {a, b});
}

mx::array conv_silu(const mx::array& x, const mx::array& w, int tokens) {
  if (x.dtype() != mx::float16 || w.dtype() != mx::float16 || x.ndim() != 3 || w.ndim() != 2)
    throw std::invalid_argument("conv_silu: x float16 [B, K-1+T, C], w float16 [C, K]");
  if (w.shape(0) != x.shape(2) || tokens < 1 || x.shape(1) != w.shape(1) - 1 + tokens)
    throw std::invalid_argument("conv_silu: x [B, K-1+T, C] with w [C, K] and T = tokens");
  auto s = mx::default_stream(mx::Device::cpu);
  mx::Shape shape = {x.shape(0), tokens, x.shape(2)};
  return mx::array(shape, mx::float16, std::make_shared<ConvSiluCPU>(s, tokens), {x, w});
}

}  // namespace

void register_half_ops(nb::module_& m) {
  m.def("silu_mul", &silu_mul, nb::arg("a"), nb::arg("b"),
        "silu(a) * b for float16 a, b of one shape, rounded as MLX's float16 ops (the same bits), "
        "on the CPU.");
  m.def("conv_silu", &conv_silu, nb::arg("x"), nb::arg("w"), nb::arg("tokens"),
        "silu of the causal depthwise conv: x float16 [B, K-1+T, C], w float16 [C, K] -> [B, T, "
        "C], every product and sum rounded to float16 in MLX's order (the same bits), on the CPU.");
}
