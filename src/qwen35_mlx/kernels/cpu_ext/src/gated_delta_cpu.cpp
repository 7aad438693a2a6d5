// The gated delta recurrence on the CPU as one MLX primitive: every row of the state is read
// once, carried through all T steps in a small buffer, and written once.
//
// Per step t, value head h (key head h / (Hv / Hk)), row i of S [Dv, Dk]:
//   r = g_t * S[i]            (g scalar per head, or per key: [Dk])
//   kv = r . k_t;  sq = r . q_t
//   delta = (v_t[i] - kv) * beta_t
//   S[i] = r + delta * k_t;  y_t[i] = sq + delta * (k_t . q_t)     (= S[i] . q_t)
// A masked-out step (mask[b, t] false) leaves the row as it was and writes y_t[i] = 0.
// Rows are independent, so a row stays in L1 for all its steps and the state crosses memory
// once each way. All arithmetic is float32; q, k, v and y share one dtype (f32, bf16 or f16).
//
// Shapes (the Python side has checked them):
//   q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g [B, T, Hv] or [B, T, Hv, Dk] f32;
//   beta [B, T, Hv] f32; state [B, Hv, Dv, Dk] f32; mask [B, T] bool (optional)
//   -> y [B, T, Hv, Dv] in v's dtype, state [B, Hv, Dv, Dk] f32; with `record` (T > 1) also
//   the states after tokens 0 .. T-2, state_tok [(T-1) B, Hv, Dv, Dk] f32 (token t's rows
//   t B .. t B + B - 1: the T-token GPU kernel's layout, what a rollback takes).
// Inputs may have any strides; the state's buffer is reused for the new state when MLX may
// donate it (contiguous, no other reference).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <stdexcept>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"
#include "mlx/utils.h"

#include "clones.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

// Offset (in elements) of the flat row-major index `idx` of `a` under its strides.
int64_t elem_offset(int64_t idx, const mx::array& a) {
  int64_t off = 0;
  for (int d = a.ndim() - 1; d >= 0; --d) {
    int64_t n = a.shape(d);
    off += (idx % n) * a.strides()[d];
    idx /= n;
  }
  return off;
}

// A dense float32 copy of a small input of any float dtype and strides.
template <typename T>
void gather_as(const mx::array& a, float* out) {
  const T* p = a.data<T>();
  const int64_t n = a.size();
  if (a.flags().row_contiguous) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(p[elem_offset(i, a)]);
  }
}

std::vector<float> to_f32(const mx::array& a) {
  std::vector<float> out(a.size());
  switch (a.dtype()) {
    case mx::float32: gather_as<float>(a, out.data()); break;
    case mx::bfloat16: gather_as<mx::bfloat16_t>(a, out.data()); break;
    case mx::float16: gather_as<mx::float16_t>(a, out.data()); break;
    default: throw std::invalid_argument("gated_delta_cpu: inputs must be f32, bf16 or f16");
  }
  return out;
}

struct Dims {
  int B, T, Hk, Hv, Dk, Dv;
  bool per_key;
};

struct Rows {
  Dims d;
  const float *q, *k, *kq, *v, *g, *beta;  // dense f32: [B,T,Hk,Dk] x2, [B,T,Hk], [B,T,Hv,Dv], ..
  const bool* keep;                          // [B, T] or nullptr
  const float* s_in;
  int64_t s_str[4];
  float* s_out;  // dense [B, Hv, Dv, Dk]; may be s_in itself
  float* y;      // dense f32 [B, T, Hv, Dv]
  float* s_tok;  // dense [(T-1) B, Hv, Dv, Dk] (the states after each token but the last) or null
};

// Rows [row0, row1) of the flattened [B, Hv, Dv] row index.
Q35_CLONES void rows(const Rows& a, float* r, int64_t row0, int64_t row1) {
  const Dims& d = a.d;
  const int Dk = d.Dk, Dv = d.Dv, T = d.T, Hv = d.Hv, Hk = d.Hk;
  const int rep = Hv / Hk;
  const int64_t cs = a.s_str[3];
  for (int64_t row = row0; row < row1; ++row) {
    const int i = static_cast<int>(row % Dv);
    const int h = static_cast<int>((row / Dv) % Hv);
    const int b = static_cast<int>(row / (int64_t(Dv) * Hv));
    const int kh = h / rep;
    const float* src = a.s_in + b * a.s_str[0] + h * a.s_str[1] + i * a.s_str[2];
    float* dst = a.s_out + row * Dk;
    // Step by step from `cur` (the row as it stands) into dst: the first step reads the state,
    // the later ones the row they just wrote (in L1). One code path for every T, so a call of
    // T steps gives bit for bit what T calls of one step give (the verify pass relies on it).
    const float* cur = src;
    if (cs != 1) {
      for (int j = 0; j < Dk; ++j) r[j] = src[j * cs];
      cur = r;
    }
    for (int t = 0; t < T; ++t) {
      const int64_t bt = int64_t(b) * T + t;
      const int64_t yi = (bt * Hv + h) * Dv + i;
      const int64_t n_rows = int64_t(d.B) * Hv * Dv;
      if (a.keep != nullptr && !a.keep[bt]) {
        a.y[yi] = 0.0f;
        if (cur != dst) std::copy(cur, cur + Dk, dst);
        cur = dst;
        if (a.s_tok != nullptr && t + 1 < T)
          std::copy(dst, dst + Dk, a.s_tok + (t * n_rows + row) * Dk);
        continue;
      }
      const float* kt = a.k + (bt * Hk + kh) * Dk;
      const float* qt = a.q + (bt * Hk + kh) * Dk;
      float kv = 0.0f, sq = 0.0f, delta;
      if (d.per_key) {
        const float* gt = a.g + (bt * Hv + h) * Dk;
#pragma omp simd reduction(+ : kv, sq)
        for (int j = 0; j < Dk; ++j) {
          const float x = cur[j] * gt[j];
          kv += x * kt[j];
          sq += x * qt[j];
        }
        delta = (a.v[yi] - kv) * a.beta[bt * Hv + h];
#pragma omp simd
        for (int j = 0; j < Dk; ++j) dst[j] = cur[j] * gt[j] + delta * kt[j];
      } else {
        const float gs = a.g[bt * Hv + h];
#pragma omp simd reduction(+ : kv, sq)
        for (int j = 0; j < Dk; ++j) {
          const float x = cur[j] * gs;
          kv += x * kt[j];
          sq += x * qt[j];
        }
        delta = (a.v[yi] - kv) * a.beta[bt * Hv + h];
#pragma omp simd
        for (int j = 0; j < Dk; ++j) dst[j] = cur[j] * gs + delta * kt[j];
      }
      a.y[yi] = sq + delta * a.kq[bt * Hk + kh];
      cur = dst;
      if (a.s_tok != nullptr && t + 1 < T)
        std::copy(dst, dst + Dk, a.s_tok + (t * n_rows + row) * Dk);
    }
  }
}

class GatedDeltaCPU : public mx::Primitive {
 public:
  GatedDeltaCPU(mx::Stream s, bool per_key, bool masked, int threads, bool record = false)
      : mx::Primitive(s), per_key_(per_key), masked_(masked), threads_(threads), record_(record) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(
        "gated_delta_cpu: a CPU-only primitive; run it on a CPU stream (mx.cpu)");
  }

  const char* name() const override { return "GatedDeltaCPU"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const GatedDeltaCPU&>(other);
    return per_key_ == o.per_key_ && masked_ == o.masked_ && threads_ == o.threads_ &&
           record_ == o.record_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    std::vector<mx::Shape> out = {inputs[2].shape(), inputs[5].shape()};
    if (record_) out.push_back(record_shape(inputs[2], inputs[5]));
    return out;
  }

  static mx::Shape record_shape(const mx::array& v, const mx::array& state) {
    return {(v.shape(1) - 1) * v.shape(0), state.shape(1), state.shape(2), state.shape(3)};
  }

 private:
  bool per_key_, masked_;
  int threads_;
  bool record_;
};

template <typename Y>
void run_rows(const Dims& d, std::vector<mx::array> in, mx::array s_out, mx::array y_out,
              int threads, float* s_tok) {
  // Small inputs to dense f32 (a few KiB at decode); the state is read in place.
  const std::vector<float> q = to_f32(in[0]), k = to_f32(in[1]), v = to_f32(in[2]);
  const std::vector<float> g = to_f32(in[3]), beta = to_f32(in[4]);
  std::vector<float> kq(int64_t(d.B) * d.T * d.Hk);
  for (size_t n = 0; n < kq.size(); ++n) {
    float acc = 0.0f;
    const float* kn = k.data() + n * d.Dk;
    const float* qn = q.data() + n * d.Dk;
#pragma omp simd reduction(+ : acc)
    for (int j = 0; j < d.Dk; ++j) acc += kn[j] * qn[j];
    kq[n] = acc;
  }
  std::vector<char> keep_buf;
  const bool* keep = nullptr;
  if (in.size() > 6) {
    const mx::array& m = in[6];
    keep_buf.resize(m.size());
    const bool* p = m.data<bool>();
    for (size_t n = 0; n < keep_buf.size(); ++n)
      keep_buf[n] = m.flags().row_contiguous ? p[n] : p[elem_offset(n, m)];
    keep = reinterpret_cast<const bool*>(keep_buf.data());
  }
  std::vector<float> y(y_out.size());
  const mx::array& s = in[5];
  Rows a{d, q.data(), k.data(), kq.data(), v.data(), g.data(), beta.data(), keep,
         s.data<float>(), {s.strides()[0], s.strides()[1], s.strides()[2], s.strides()[3]},
         s_out.data<float>(), y.data(), s_tok};
  const int64_t n_rows = int64_t(d.B) * d.Hv * d.Dv;
  auto work = [&a, Dk = d.Dk](int64_t r0, int64_t r1) {
    std::vector<float> r(Dk);
    rows(a, r.data(), r0, r1);
  };
  const int nt = static_cast<int>(std::min<int64_t>(std::max(threads, 1), n_rows));
  if (nt <= 1) {
    work(0, n_rows);
  } else {
    std::vector<std::thread> pool;
    const int64_t per = (n_rows + nt - 1) / nt;
    for (int w = 1; w < nt; ++w) {
      const int64_t r0 = std::min(n_rows, w * per), r1 = std::min(n_rows, (w + 1) * per);
      pool.emplace_back(work, r0, r1);
    }
    work(0, std::min(n_rows, per));
    for (auto& th : pool) th.join();
  }
  Y* yo = y_out.data<Y>();
  for (size_t n = 0; n < y.size(); ++n) yo[n] = static_cast<Y>(y[n]);
}

void GatedDeltaCPU::eval_cpu(const std::vector<mx::array>& inputs,
                             std::vector<mx::array>& outputs) {
  const mx::array& q = inputs[0];
  const mx::array& v = inputs[2];
  const mx::array& s = inputs[5];
  mx::array& y_out = outputs[0];
  mx::array& s_out = outputs[1];
  Dims d{q.shape(0), q.shape(1), q.shape(2), v.shape(2), q.shape(3), v.shape(3), per_key_};

  // Each output of a multi-output primitive holds its own copy of the input list
  // (array::make_arrays), so the state would count as referenced twice and never be donated:
  // a fresh 16-64 MiB buffer every step, which glibc maps anew above 32 MiB (a page fault per
  // 4 KiB, 9x the step's time at B = 32). The graph is being evaluated (every output gets its
  // data here and is detached after), so the other outputs drop their copies first; `inputs`
  // is the list of the output MLX evaluates through and stays as it is.
  // (Not for tracers: a graph being transformed keeps its edges.)
  for (auto& o : outputs) {
    if (&o.inputs() != &inputs && !o.is_tracer()) o.inputs().clear();
  }
  y_out.set_data(mx::allocator::malloc(y_out.nbytes()));
  float* s_tok = nullptr;
  if (outputs.size() > 2) {
    outputs[2].set_data(mx::allocator::malloc(outputs[2].nbytes()));
    s_tok = outputs[2].data<float>();
  }
  if (s.is_donatable() && s.flags().row_contiguous) {
    s_out.copy_shared_buffer(s);  // rows are read before they are written: in place is safe
  } else {
    s_out.set_data(mx::allocator::malloc(s_out.nbytes()));
  }
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(y_out);
  enc.set_output_array(s_out);
  // The lambda holds references to every array it reads or writes until it has run.
  const mx::Dtype yt = y_out.dtype();
  const int threads = threads_;
  std::vector<mx::array> held = outputs;  // the recorded states' buffer too
  enc.dispatch([d, in = inputs, s_out = s_out, y_out = y_out, yt, threads, s_tok,
                held = std::move(held)]() mutable {
    switch (yt) {
      case mx::float32: run_rows<float>(d, in, s_out, y_out, threads, s_tok); break;
      case mx::bfloat16: run_rows<mx::bfloat16_t>(d, in, s_out, y_out, threads, s_tok); break;
      case mx::float16: run_rows<mx::float16_t>(d, in, s_out, y_out, threads, s_tok); break;
      default: throw std::invalid_argument("gated_delta_cpu: y must be f32, bf16 or f16");
    }
  });
}

std::vector<mx::array> gated_delta_cpu(const mx::array& q, const mx::array& k,
                                       const mx::array& v, const mx::array& g,
                                       const mx::array& beta, const mx::array& state,
                                       std::optional<mx::array> mask, int threads, bool record) {
  if (q.ndim() != 4 || k.shape() != q.shape() || v.ndim() != 4 || state.ndim() != 4)
    throw std::invalid_argument("gated_delta_cpu: q, k [B,T,Hk,Dk], v [B,T,Hv,Dv], state 4-D");
  const bool per_key = g.ndim() == 4;
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs = {
      mx::astype(q, v.dtype(), s),      mx::astype(k, v.dtype(), s), v,
      mx::astype(g, mx::float32, s),    mx::astype(beta, mx::float32, s),
      mx::astype(state, mx::float32, s)};
  if (mask) inputs.push_back(mx::astype(*mask, mx::bool_, s));
  record = record && v.shape(1) > 1;
  auto prim = std::make_shared<GatedDeltaCPU>(s, per_key, mask.has_value(), threads, record);
  std::vector<mx::Shape> shapes = {v.shape(), state.shape()};
  std::vector<mx::Dtype> dtypes = {v.dtype(), mx::float32};
  if (record) {
    shapes.push_back(GatedDeltaCPU::record_shape(v, state));
    dtypes.push_back(mx::float32);
  }
  return mx::array::make_arrays(std::move(shapes), dtypes, prim, inputs);
}


// The whole linear-attention decode step of one token a row, from the in-projection (the
// decode step of `kernels/gated_delta/decode.py` in one primitive: its ~40 MLX primitives cost
// more host time than their arithmetic at small widths). Per row b, float32 throughout (inputs
// of any float dtype; y and the conv state in qkv's dtype, the state float32):
//   x = [conv_state | qkv] [K, C];  h_c = silu(sum_j x[j, c] w[c, j])  (j in order)
//   q = l2norm(h[:Hk Dk]) Dk^-1/2,  k = l2norm(h[Hk Dk : 2 Hk Dk]),  v = h[2 Hk Dk:]
//   g = exp(-exp(A_log) softplus(a + dt_bias)),  beta = sigmoid(b);  one step (`rows`)
//   with z: y = norm_w * rmsnorm(y) * silu(z) per value head;  new conv state = x[1:]
// A masked row (mask[b] false) leaves the state, writes y = 0; its conv state still shifts.
class GatedDeltaDecodeCPU : public mx::Primitive {
 public:
  GatedDeltaDecodeCPU(mx::Stream s, int Hk, int Dk, int Hv, int Dv, bool masked, bool normed,
                      float eps)
      : mx::Primitive(s), Hk_(Hk), Dk_(Dk), Hv_(Hv), Dv_(Dv), masked_(masked),
        normed_(normed), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("gated_delta_decode_cpu: a CPU-only primitive (mx.cpu)");
  }

  const char* name() const override { return "GatedDeltaDecodeCPU"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const GatedDeltaDecodeCPU&>(other);
    return Hk_ == o.Hk_ && Dk_ == o.Dk_ && Hv_ == o.Hv_ && Dv_ == o.Dv_ &&
           masked_ == o.masked_ && normed_ == o.normed_ && eps_ == o.eps_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const int B = inputs[0].shape(0);
    return {{B, Hv_, Dv_}, inputs[7].shape(), inputs[1].shape()};
  }

 private:
  int Hk_, Dk_, Hv_, Dv_;
  bool masked_, normed_;
  float eps_;
};

struct DecodeArgs {
  int Hk, Dk, Hv, Dv;
  bool masked, normed;
  float eps;
};

// inputs: qkv [B, C], conv_state [B, K-1, C], conv_w [C, K], a, b [B, Hv], A_log, dt_bias [Hv],
// state [B, Hv, Dv, Dk], then mask [B] (masked), then z [B, Hv Dv], norm_w [Dv] (normed).
void run_decode(const DecodeArgs& da, std::vector<mx::array> in, mx::array y_out,
                mx::array s_out, mx::array c_out) {
  const int B = in[0].shape(0), C = in[0].shape(1), K = in[2].shape(1);
  const int Hk = da.Hk, Dk = da.Dk, Hv = da.Hv, Dv = da.Dv, key = Hk * Dk;
  const std::vector<float> qkv = to_f32(in[0]), cs = to_f32(in[1]), w = to_f32(in[2]);
  const std::vector<float> av = to_f32(in[3]), bv = to_f32(in[4]);
  const std::vector<float> A_log = to_f32(in[5]), dt_bias = to_f32(in[6]);
  std::vector<float> q(size_t(B) * key), k(size_t(B) * key), v(size_t(B) * Hv * Dv);
  std::vector<float> kq(size_t(B) * Hk), g(size_t(B) * Hv), beta(size_t(B) * Hv), h(C);
  std::vector<float> conv_buf(c_out.size());
  float* conv = conv_buf.data();
  const float qscale = 1.0f / std::sqrt(static_cast<float>(Dk));
  for (int b = 0; b < B; ++b) {
    // x[j, c]: conv state rows 0..K-2, then the token.
    auto x = [&](int j, int c) -> float {
      return j < K - 1 ? cs[(size_t(b) * (K - 1) + j) * C + c] : qkv[size_t(b) * C + c];
    };
    for (int c = 0; c < C; ++c) {
      float acc = x(0, c) * w[size_t(c) * K];
      for (int j = 1; j < K; ++j) acc = acc + x(j, c) * w[size_t(c) * K + j];
      h[c] = acc / (1.0f + std::exp(-acc));
    }
    for (int j = 0; j + 1 < K; ++j)
      for (int c = 0; c < C; ++c) conv[(size_t(b) * (K - 1) + j) * C + c] = x(j + 1, c);
    for (int hh = 0; hh < Hk; ++hh) {
      const float* hq = h.data() + hh * Dk;
      const float* hk = h.data() + key + hh * Dk;
      float sq = 0.0f, sk = 0.0f;
      for (int j = 0; j < Dk; ++j) {
        sq += hq[j] * hq[j];
        sk += hk[j] * hk[j];
      }
      const float rq = 1.0f / std::sqrt(sq + 1e-6f), rk = 1.0f / std::sqrt(sk + 1e-6f);
      float* qo = q.data() + (size_t(b) * Hk + hh) * Dk;
      float* ko = k.data() + (size_t(b) * Hk + hh) * Dk;
      float dot = 0.0f;
      for (int j = 0; j < Dk; ++j) {
        qo[j] = hq[j] * rq * qscale;
        ko[j] = hk[j] * rk;
        dot += ko[j] * qo[j];
      }
      kq[size_t(b) * Hk + hh] = dot;
    }
    std::copy(h.data() + 2 * key, h.data() + 2 * key + Hv * Dv, v.data() + size_t(b) * Hv * Dv);
    for (int hh = 0; hh < Hv; ++hh) {
      const size_t i = size_t(b) * Hv + hh;
      const float xa = av[i] + dt_bias[hh];
      const float sp = std::max(xa, 0.0f) + std::log1p(std::exp(-std::abs(xa)));
      g[i] = std::exp(-std::exp(A_log[hh]) * sp);
      beta[i] = 1.0f / (1.0f + std::exp(-bv[i]));
    }
  }
  std::vector<char> keep_buf;
  const bool* keep = nullptr;
  if (da.masked) {
    const mx::array& m = in[8];
    keep_buf.resize(m.size());
    const bool* p = m.data<bool>();
    for (size_t n = 0; n < keep_buf.size(); ++n)
      keep_buf[n] = m.flags().row_contiguous ? p[n] : p[elem_offset(n, m)];
    keep = reinterpret_cast<const bool*>(keep_buf.data());
  }
  const mx::array& s = in[7];
  std::vector<float> y_buf(y_out.size());
  float* y = y_buf.data();
  Dims d{B, 1, Hk, Hv, Dk, Dv, false};
  Rows a{d, q.data(), k.data(), kq.data(), v.data(), g.data(), beta.data(), keep,
         s.data<float>(), {s.strides()[0], s.strides()[1], s.strides()[2], s.strides()[3]},
         s_out.data<float>(), y};
  std::vector<float> r(Dk);
  rows(a, r.data(), 0, int64_t(B) * Hv * Dv);
  if (da.normed) {
    const int zi = da.masked ? 9 : 8;
    const std::vector<float> z = to_f32(in[zi]), nw = to_f32(in[zi + 1]);
    for (int64_t row = 0; row < int64_t(B) * Hv; ++row) {
      float* yr = y + row * Dv;
      const float* zr = z.data() + row * Dv;
      float ss = 0.0f;
      for (int j = 0; j < Dv; ++j) ss += yr[j] * yr[j];
      const float rn = 1.0f / std::sqrt(ss / static_cast<float>(Dv) + da.eps);
      for (int j = 0; j < Dv; ++j) {
        const float gate = zr[j] / (1.0f + std::exp(-zr[j]));
        yr[j] = (yr[j] * rn * nw[j]) * gate;
      }
    }
  }
  auto store = [](const std::vector<float>& from, mx::array& to) {
    switch (to.dtype()) {
      case mx::float32: std::copy(from.begin(), from.end(), to.data<float>()); break;
      case mx::bfloat16: std::copy(from.begin(), from.end(), to.data<mx::bfloat16_t>()); break;
      case mx::float16: std::copy(from.begin(), from.end(), to.data<mx::float16_t>()); break;
      default: throw std::invalid_argument("gated_delta_decode_cpu: float outputs only");
    }
  };
  store(y_buf, y_out);
  store(conv_buf, c_out);
}

void GatedDeltaDecodeCPU::eval_cpu(const std::vector<mx::array>& inputs,
                                   std::vector<mx::array>& outputs) {
  const mx::array& s = inputs[7];
  mx::array& y_out = outputs[0];
  mx::array& s_out = outputs[1];
  mx::array& c_out = outputs[2];
  // As GatedDeltaCPU: the outputs MLX does not evaluate through drop their copies of the
  // input list, so the state can be donated.
  for (auto& o : outputs) {
    if (&o.inputs() != &inputs && !o.is_tracer()) o.inputs().clear();
  }
  y_out.set_data(mx::allocator::malloc(y_out.nbytes()));
  c_out.set_data(mx::allocator::malloc(c_out.nbytes()));
  if (s.is_donatable() && s.flags().row_contiguous) {
    s_out.copy_shared_buffer(s);
  } else {
    s_out.set_data(mx::allocator::malloc(s_out.nbytes()));
  }
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) enc.set_input_array(a);
  for (auto& o : outputs) enc.set_output_array(o);
  DecodeArgs da{Hk_, Dk_, Hv_, Dv_, masked_, normed_, eps_};
  enc.dispatch([da, in = inputs, y_out = y_out, s_out = s_out, c_out = c_out]() mutable {
    run_decode(da, std::move(in), y_out, s_out, c_out);
  });
}

std::tuple<mx::array, mx::array, mx::array> gated_delta_decode_cpu(
    const mx::array& qkv, const mx::array& conv_state, const mx::array& conv_w,
    const mx::array& a, const mx::array& b, const mx::array& A_log, const mx::array& dt_bias,
    const mx::array& state, int Hk, int Dk, int Hv, int Dv, std::optional<mx::array> mask,
    std::optional<mx::array> z, std::optional<mx::array> norm_w, float eps) {
  const int B = qkv.ndim() == 2 ? qkv.shape(0) : -1;
  const int C = 2 * Hk * Dk + Hv * Dv;
  const auto dt = qkv.dtype();
  if (dt != mx::float32 && dt != mx::bfloat16 && dt != mx::float16)
    throw std::invalid_argument("gated_delta_decode_cpu: qkv float32, bfloat16 or float16");
  if (B < 0 || qkv.shape(1) != C || conv_w.ndim() != 2 ||
      conv_w.shape(0) != C || conv_state.shape() != mx::Shape{B, conv_w.shape(1) - 1, C} ||
      state.shape() != mx::Shape{B, Hv, Dv, Dk} || a.shape() != mx::Shape{B, Hv} ||
      b.shape() != mx::Shape{B, Hv} || Hv % Hk != 0)
    throw std::invalid_argument("gated_delta_decode_cpu: shapes (see the module) or dtype");
  if (z.has_value() != norm_w.has_value())
    throw std::invalid_argument("gated_delta_decode_cpu: z and norm_w go together");
  auto s = mx::default_stream(mx::Device::cpu);
  auto f32 = [&s](const mx::array& x) { return mx::astype(x, mx::float32, s); };
  std::vector<mx::array> inputs = {qkv,    mx::astype(conv_state, dt, s), f32(conv_w), f32(a),
                                   f32(b), f32(A_log), f32(dt_bias), f32(state)};
  if (mask) inputs.push_back(mx::astype(*mask, mx::bool_, s));
  if (z) {
    inputs.push_back(mx::reshape(*z, {B, Hv * Dv}, s));
    inputs.push_back(f32(*norm_w));
  }
  auto prim = std::make_shared<GatedDeltaDecodeCPU>(s, Hk, Dk, Hv, Dv, mask.has_value(),
                                                    z.has_value(), eps);
  auto outs = mx::array::make_arrays({{B, Hv, Dv}, state.shape(), conv_state.shape()},
                                     {dt, mx::float32, dt}, prim, inputs);
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

void register_gated_delta(nb::module_& m) {
  m.def("gated_delta", &gated_delta_cpu, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("g"),
        nb::arg("beta"), nb::arg("state"), nb::arg("mask") = nb::none(), nb::arg("threads") = 1,
        nb::arg("record") = false,
        "[y [B,T,Hv,Dv] in v's dtype, state [B,Hv,Dv,Dk] f32] on the CPU stream; with record "
        "(T > 1) also the states after tokens 0..T-2, [(T-1) B, Hv, Dv, Dk] f32 (token t's rows "
        "t B .. t B + B - 1).");
  m.def("gated_delta_decode", &gated_delta_decode_cpu, nb::arg("qkv"), nb::arg("conv_state"),
        nb::arg("conv_w"), nb::arg("a"), nb::arg("b"), nb::arg("A_log"), nb::arg("dt_bias"),
        nb::arg("state"), nb::arg("Hk"), nb::arg("Dk"), nb::arg("Hv"), nb::arg("Dv"),
        nb::arg("mask") = nb::none(), nb::arg("z") = nb::none(), nb::arg("norm_w") = nb::none(),
        nb::arg("eps") = 1e-6f,
        "The decode step of one token a row from the in-projection: (y [B,Hv,Dv], "
        "state [B,Hv,Dv,Dk], conv state [B,K-1,C]) on the CPU stream.");
}
