// A few rows times one or more float32 weights on the CPU, as one MLX primitive: the product
// of a decode step (R = 1-8 rows) with W read once for all rows.
//
//   x [..., K] (R rows); for each weight i: W_i [K, N_i] (row-contiguous: the [in, out]
//   storage of a Linear's weight) -> y_i [..., N_i] = x @ W_i (+ add_i [..., N_i], optional)
//
// Exactness: every output is summed in k order from 0, one product and one add at a time
// (rounded separately: built with -ffp-contract=off, no FMA), as MLX's bundled reference BLAS
// sums a float32 matmul (sgemm, the NN form). So each row's values are those of that row alone
// (the same bits for any R), and equal to MLX's `x @ W` on that BLAS; an add rounds once after
// the product, as `add + x @ W` does. Columns in registers: a tile of R rows x 16 C columns is
// kept in vector accumulators while k runs, so W is read once whatever R is.
// float16 x is converted to float32 (exactly) first, and `half_out` rounds each result to
// float16 (nearest even, as MLX's astype): a half model's `astype(f32) -> x @ W -> astype(f16)`
// in one primitive, the same bits (MLX emulates those conversions per element on x86).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

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

typedef float vf16 __attribute__((vector_size(64)));

// R rows x C vectors of 16 columns, starting at column n0 of W [K, N] and y [R, ldy].
template <int R, int C>
inline __attribute__((always_inline)) void tile(const float* x, int64_t K, const float* w,
                                                int64_t N, float* y, int64_t ldy,
                                                const float* add) {
  vf16 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vf16{};
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * N;
    vf16 wv[C];
    for (int c = 0; c < C; ++c) std::memcpy(&wv[c], wk + 16 * c, sizeof(vf16));
    for (int r = 0; r < R; ++r) {
      const float xs = x[r * K + k];
      for (int c = 0; c < C; ++c) acc[r][c] = acc[r][c] + xs * wv[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      vf16 out = acc[r][c];
      if (add != nullptr) {
        vf16 a;
        std::memcpy(&a, add + r * ldy + 16 * c, sizeof(vf16));
        out = a + out;
      }
      std::memcpy(y + r * ldy + 16 * c, &out, sizeof(vf16));
    }
  }
}

// One column at a time (the last N % 16), same order.
template <int R>
inline __attribute__((always_inline)) void column(const float* x, int64_t K, const float* w,
                                                  int64_t N, float* y, int64_t ldy,
                                                  const float* add) {
  for (int r = 0; r < R; ++r) {
    float acc = 0.0f;
    for (int64_t k = 0; k < K; ++k) acc = acc + x[r * K + k] * w[k * N];
    y[r * ldy] = add != nullptr ? add[r * ldy] + acc : acc;
  }
}

template <int R>
inline __attribute__((always_inline)) void rows_r(const float* x, int64_t K, const float* w,
                                                  int64_t N, float* y, const float* add) {
  constexpr int C = R == 1 ? 8 : (R == 2 ? 4 : (R <= 4 ? 2 : 1));
  int64_t n = 0;
  for (; n + 16 * C <= N; n += 16 * C)
    tile<R, C>(x, K, w + n, N, y + n, N, add ? add + n : nullptr);
  for (; n + 16 <= N; n += 16) tile<R, 1>(x, K, w + n, N, y + n, N, add ? add + n : nullptr);
  for (; n < N; ++n) column<R>(x, K, w + n, N, y + n, N, add ? add + n : nullptr);
}

// y [R, N] = x [R, K] @ w [K, N] (+ add [R, N]); all dense; R 1-8 per call.
Q35_CLONES void rows_matmul(const float* x, int R, int64_t K, const float* w, int64_t N, float* y,
                           const float* add) {
  switch (R) {
    case 1: rows_r<1>(x, K, w, N, y, add); break;
    case 2: rows_r<2>(x, K, w, N, y, add); break;
    case 3: rows_r<3>(x, K, w, N, y, add); break;
    case 4: rows_r<4>(x, K, w, N, y, add); break;
    case 5: rows_r<5>(x, K, w, N, y, add); break;
    case 6: rows_r<6>(x, K, w, N, y, add); break;
    case 7: rows_r<7>(x, K, w, N, y, add); break;
    case 8: rows_r<8>(x, K, w, N, y, add); break;
    default: throw std::invalid_argument("matmul_rows: 1 to 8 rows a call");
  }
}

using qwen35_cpu_ext::offset_of;

// A dense float32 view of a small input: its own buffer when float32 and row-contiguous, else
// a copy (float16 converted exactly).
const float* dense(const mx::array& a, std::vector<float>& buf) {
  if (a.dtype() == mx::float16) {
    buf.resize(a.size());
    const _Float16* p = reinterpret_cast<const _Float16*>(a.data<mx::float16_t>());
    const bool rc = a.flags().row_contiguous;
    for (size_t i = 0; i < buf.size(); ++i)
      buf[i] = static_cast<float>(p[rc ? i : offset_of(i, a)]);
    return buf.data();
  }
  if (a.flags().row_contiguous) return a.data<float>();
  buf.resize(a.size());
  const float* p = a.data<float>();
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = p[offset_of(i, a)];
  return buf.data();
}

// float32 results to a float16 output, rounded to nearest even (as MLX's astype).
void store_half(const float* y, mx::array& out) {
  _Float16* o = reinterpret_cast<_Float16*>(out.data<mx::float16_t>());
  for (size_t i = 0; i < out.size(); ++i) o[i] = static_cast<_Float16>(y[i]);
}

// inputs: x, W_0 .. W_{n-1}, then (with adds) add_0 .. add_{n-1}.
void run(std::vector<mx::array> in, std::vector<mx::array> out, bool with_add) {
  const int n = static_cast<int>(out.size());
  const mx::array& xa = in[0];
  const int64_t K = xa.shape(-1);
  const int64_t R = K == 0 ? 0 : xa.size() / K;
  std::vector<float> xbuf, abuf;
  const float* x = dense(xa, xbuf);
  for (int i = 0; i < n; ++i) {
    const mx::array& w = in[1 + i];
    const int64_t N = w.shape(1);
    std::vector<float> wbuf;
    const float* wp = dense(w, wbuf);
    const float* add = with_add ? dense(in[1 + n + i], abuf) : nullptr;
    const bool half = out[i].dtype() == mx::float16;
    std::vector<float> ybuf(half ? out[i].size() : 0);
    float* y = half ? ybuf.data() : out[i].data<float>();
    for (int64_t r0 = 0; r0 < R; r0 += 8) {
      const int rr = static_cast<int>(std::min<int64_t>(8, R - r0));
      rows_matmul(x + r0 * K, rr, K, wp, N, y + r0 * N, add ? add + r0 * N : nullptr);
    }
    if (half) store_half(y, out[i]);
  }
}

class MatmulRowsCPU : public mx::Primitive {
 public:
  MatmulRowsCPU(mx::Stream s, bool with_add, bool half_out)
      : mx::Primitive(s), with_add_(with_add), half_out_(half_out) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) enc.set_input_array(a);
    for (auto& o : outputs) enc.set_output_array(o);
    enc.dispatch([in = inputs, out = outputs, with_add = with_add_]() mutable {
      run(std::move(in), std::move(out), with_add);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("matmul_rows_cpu: a CPU-only primitive; run it on a CPU stream");
  }

  const char* name() const override { return "MatmulRowsCPU"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const MatmulRowsCPU&>(other);
    return with_add_ == o.with_add_ && half_out_ == o.half_out_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const int n = static_cast<int>(with_add_ ? (inputs.size() - 1) / 2 : inputs.size() - 1);
    std::vector<mx::Shape> shapes;
    for (int i = 0; i < n; ++i) {
      mx::Shape s = inputs[0].shape();
      s.back() = inputs[1 + i].shape(1);
      shapes.push_back(s);
    }
    return shapes;
  }

 private:
  bool with_add_, half_out_;
};

std::vector<mx::array> matmul_rows(const mx::array& x, const std::vector<mx::array>& weights,
                                   std::optional<std::vector<mx::array>> adds, bool half_out) {
  if (weights.empty()) throw std::invalid_argument("matmul_rows: no weight");
  if (x.ndim() < 1 || (x.dtype() != mx::float32 && x.dtype() != mx::float16))
    throw std::invalid_argument("matmul_rows: x must be float32 or float16 [..., K]");
  if (half_out && adds) throw std::invalid_argument("matmul_rows: no adds with a float16 output");
  const int64_t K = x.shape(-1);
  std::vector<mx::array> inputs = {x};
  std::vector<mx::Shape> shapes;
  for (const auto& w : weights) {
    if (w.ndim() != 2 || w.shape(0) != K || w.dtype() != mx::float32)
      throw std::invalid_argument("matmul_rows: each weight float32 [K, N]");
    inputs.push_back(w);
    mx::Shape s = x.shape();
    s.back() = w.shape(1);
    shapes.push_back(s);
  }
  if (adds) {
    if (adds->size() != weights.size())
      throw std::invalid_argument("matmul_rows: one add a weight");
    for (size_t i = 0; i < adds->size(); ++i) {
      const auto& a = (*adds)[i];
      if (a.shape() != shapes[i] || a.dtype() != mx::float32)
        throw std::invalid_argument("matmul_rows: an add must be float32 of its output's shape");
      inputs.push_back(a);
    }
  }
  auto s = mx::default_stream(mx::Device::cpu);
  auto prim = std::make_shared<MatmulRowsCPU>(s, adds.has_value(), half_out);
  std::vector<mx::Dtype> dtypes(shapes.size(), half_out ? mx::float16 : mx::float32);
  return mx::array::make_arrays(std::move(shapes), dtypes, prim, inputs);
}

}  // namespace

void register_matmul_rows(nb::module_& m) {
  m.def("matmul_rows", &matmul_rows, nb::arg("x"), nb::arg("weights"),
        nb::arg("adds") = nb::none(), nb::arg("half_out") = false,
        "[x @ w (+ add) for w in weights]: x float32 or float16 (converted exactly) [..., K] (a "
        "few rows: W is read once for each 8), each w float32 [K, N]; summed in k order as MLX's "
        "reference BLAS sums (the same bits); half_out: each result rounded to float16 (as "
        "astype), on the CPU.");
}
