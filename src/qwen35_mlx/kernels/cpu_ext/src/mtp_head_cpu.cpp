// The MTP head's step at a greedy speculative round (models/mtp.py) as one MLX CPU primitive:
// in place of the ~73 MLX primitives of the compiled head, each of which costs the caller's
// thread a few microseconds on a CPU stream (benchmarks/NOTES.md, "Session 16, helper
// mtpround"; "Session 17, helper mtphead").
//
//   rows r = b T + t (B rows of T new positions each, at positions idx .. idx + T - 1):
//   u   = fc([rms(emb) w_e | rms(hidden) w_h])                         fc [2H, H]
//   a   = rms(u) w_in;  q | gate, k, v = a @ W_qkv                     q, gate per head [D]
//   q, k = rope(rms(q) w_q), rope(rms(k) w_k)                          rotate-half, first R dims
//   keys/values[b, :, idx + t] = k, v (rounded to the buffer's dtype)
//   o   = softmax(q K^T / sqrt(D)) V over keys 0 .. idx + t (GQA), o *= sigmoid(gate)
//   x   = u + o @ W_o;  x = x + (silu(m @ W_g) * (m @ W_u)) @ W_d with m = rms(x) w_post
//   out = rms(x) w_norm;  draft = argmax(out @ W_lm) (the first of equal maxima)
//
// Arithmetic: float32 throughout (the weight matrices float32 copies [in, out], the float16
// inputs and norm weights converted exactly), where MLX's compiled head rounds each op's result
// to float16. So `out` and the drafts are close to the exact path's, not equal: drafts only,
// which the verify pass checks exactly (the emitted tokens cannot change; the acceptance is
// measured). The KV buffers are outputs: the inputs' own storage where MLX can donate it, else
// a copy.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>
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

// The weights, in this order (float32, [in, out] for the matrices).
enum W { NORM_E, NORM_H, FC, LN_IN, QKV, Q_NORM, K_NORM, O_PROJ, LN_POST, GATE_UP, DOWN, NORM,
         LM_HEAD, INV_FREQ, N_WEIGHTS };

struct Dims {
  int T, Hq, Hkv, D, R;  // tokens a row, heads, kv heads, head dim, rotary dims
  float eps;
  bool gate;
};

// y [R, N] (+)= x [R, K] @ w [K, N]: W read once for the R rows, 4 vectors of columns a tile.
template <int R>
inline __attribute__((always_inline)) void mm_r(const float* x, int64_t K, const float* w,
                                                int64_t N, float* y) {
  int64_t n = 0;
  for (; n + 64 <= N; n += 64) {
    vf16 acc[R][4] = {};
    for (int64_t k = 0; k < K; ++k) {
      vf16 wv[4];
      std::memcpy(wv, w + k * N + n, sizeof(wv));
      for (int r = 0; r < R; ++r) {
        const float xs = x[r * K + k];
        for (int c = 0; c < 4; ++c) acc[r][c] += xs * wv[c];
      }
    }
    for (int r = 0; r < R; ++r) std::memcpy(y + r * N + n, acc[r], sizeof(acc[r]));
  }
  for (; n + 16 <= N; n += 16) {
    vf16 acc[R] = {};
    for (int64_t k = 0; k < K; ++k) {
      vf16 wv;
      std::memcpy(&wv, w + k * N + n, sizeof(wv));
      for (int r = 0; r < R; ++r) acc[r] += x[r * K + k] * wv;
    }
    for (int r = 0; r < R; ++r) std::memcpy(y + r * N + n, &acc[r], sizeof(acc[r]));
  }
  for (; n < N; ++n) {
    for (int r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += x[r * K + k] * w[k * N + n];
      y[r * N + n] = acc;
    }
  }
}

Q35_CLONES void matmul(const float* x, int64_t rows, int64_t K, const float* w, int64_t N,
                      float* y) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    switch (std::min<int64_t>(4, rows - r0)) {
      case 1: mm_r<1>(x + r0 * K, K, w, N, y + r0 * N); break;
      case 2: mm_r<2>(x + r0 * K, K, w, N, y + r0 * N); break;
      case 3: mm_r<3>(x + r0 * K, K, w, N, y + r0 * N); break;
      default: mm_r<4>(x + r0 * K, K, w, N, y + r0 * N); break;
    }
  }
}

// y = x / sqrt(mean(x^2) + eps) * w, n elements.
#define MH_INLINE inline __attribute__((always_inline))

MH_INLINE void rms(const float* x, const float* w, int n, float eps, float* y) {
  float ss = 0.0f;
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  const float s = 1.0f / std::sqrt(ss / n + eps);
  for (int i = 0; i < n; ++i) y[i] = x[i] * s * w[i];
}

// rotate-half rotary of the first R dims of x [D] at position pos.
MH_INLINE void rope(float* x, int R, const float* inv_freq, float pos) {
  const int h = R / 2;
  for (int i = 0; i < h; ++i) {
    const float a = pos * inv_freq[i];
    const float c = std::cos(a), s = std::sin(a);
    const float x1 = x[i], x2 = x[i + h];
    x[i] = x1 * c - x2 * s;
    x[i + h] = x1 * s + x2 * c;
  }
}

MH_INLINE float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// a dense float32 copy of a (float16 / float32, any strides).
MH_INLINE std::vector<float> as_float(const mx::array& a) {
  std::vector<float> out(a.size());
  const bool rc = a.flags().row_contiguous;
  if (a.dtype() == mx::float16) {
    const _Float16* p = reinterpret_cast<const _Float16*>(a.data<mx::float16_t>());
    for (size_t i = 0; i < out.size(); ++i)
      out[i] = static_cast<float>(p[rc ? i : qwen35_cpu_ext::offset_of(i, a)]);
  } else {
    const float* p = a.data<float>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = p[rc ? i : qwen35_cpu_ext::offset_of(i, a)];
  }
  return out;
}

// A cache buffer [B, Hkv, cap, D] of float16 or float32, as element accessors.
struct Buffer {
  void* p;
  bool half;
  MH_INLINE float get(int64_t i) const {
    return half ? static_cast<float>(static_cast<const _Float16*>(p)[i])
                : static_cast<const float*>(p)[i];
  }
  MH_INLINE float put(int64_t i, float v) {  // stores, returns the stored (rounded) value
    if (half) {
      _Float16 h = static_cast<_Float16>(v);
      static_cast<_Float16*>(p)[i] = h;
      return static_cast<float>(h);
    }
    static_cast<float*>(p)[i] = v;
    return v;
  }
};

// out: the cache buffer's storage, the input's shared (donated) or a copy of it.
void take_buffer(const mx::array& in, mx::array& out) {
  if (in.is_donatable() && in.flags().row_contiguous && in.itemsize() == out.itemsize()) {
    out.copy_shared_buffer(in);
    return;
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
}

void fill_buffer(const mx::array& in, mx::array& out) {
  if (out.data<void>() == in.data<void>()) return;
  const size_t n = in.size(), item = in.itemsize();
  char* o = static_cast<char*>(out.data<void>());
  const char* p = static_cast<const char*>(in.data<void>());
  if (in.flags().row_contiguous) {
    std::memcpy(o, p, n * item);
    return;
  }
  for (size_t i = 0; i < n; ++i)
    std::memcpy(o + i * item, p + qwen35_cpu_ext::offset_of(i, in) * item, item);
}

// inputs: hidden [rows, H], emb [rows, H], keys, values [B, Hkv, cap, D], idx (int32 scalar),
// the N_WEIGHTS weights. outputs: out [rows, H], drafts [rows] uint32, keys, values.
Q35_CLONES void run(const std::vector<mx::array>& in, std::vector<mx::array>& out, Dims d) {
  const mx::array &hid = in[0], &emb = in[1], &kin = in[2], &vin = in[3];
  const int64_t H = hid.shape(-1), rows = hid.size() / H;
  const int T = d.T, Hq = d.Hq, Hkv = d.Hkv, D = d.D;
  const int64_t B = rows / T, cap = kin.shape(2);
  const int64_t idx = in[4].data<int32_t>()[0];
  // (the caller reserves the buffer: `cache.reserve`; never write past it)
  if (idx < 0 || idx + T > cap) throw std::out_of_range("mtp_head: idx + T past the KV buffer");
  const float* w[N_WEIGHTS];
  std::vector<float> dense[N_WEIGHTS];  // (float16 vectors, or not row-contiguous: copies)
  for (int i = 0; i < N_WEIGHTS; ++i) {
    if (in[5 + i].flags().row_contiguous && in[5 + i].dtype() == mx::float32) {
      w[i] = in[5 + i].data<float>();
    } else {
      dense[i] = as_float(in[5 + i]);
      w[i] = dense[i].data();
    }
  }
  const int64_t nq = int64_t(Hq) * D * (d.gate ? 2 : 1), nkv = int64_t(Hkv) * D;
  const int64_t nqkv = nq + 2 * nkv, I = in[5 + DOWN].shape(0), V = in[5 + LM_HEAD].shape(1);

  fill_buffer(kin, out[2]);
  fill_buffer(vin, out[3]);
  Buffer kb{out[2].data<void>(), out[2].dtype() == mx::float16};
  Buffer vb{out[3].data<void>(), out[3].dtype() == mx::float16};

  std::vector<float> h = as_float(hid), e = as_float(emb);
  std::vector<float> eh(rows * 2 * H), u(rows * H), a(rows * H), qkv(rows * nqkv);
  for (int64_t r = 0; r < rows; ++r) {
    rms(&e[r * H], w[NORM_E], H, d.eps, &eh[r * 2 * H]);
    rms(&h[r * H], w[NORM_H], H, d.eps, &eh[r * 2 * H + H]);
  }
  matmul(eh.data(), rows, 2 * H, w[FC], H, u.data());
  for (int64_t r = 0; r < rows; ++r) rms(&u[r * H], w[LN_IN], H, d.eps, &a[r * H]);
  matmul(a.data(), rows, H, w[QKV], nqkv, qkv.data());

  // q normed and rotated [rows, Hq, D]; k, v into the buffers at idx + t.
  std::vector<float> q(rows * Hq * D), tmp(D);
  const int64_t qstride = d.gate ? 2 * D : D;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / T, t = r % T;
    const float pos = static_cast<float>(idx + t);
    const float* row = &qkv[r * nqkv];
    for (int hq = 0; hq < Hq; ++hq) {
      float* qh = &q[(r * Hq + hq) * D];
      rms(row + hq * qstride, w[Q_NORM], D, d.eps, qh);
      rope(qh, d.R, w[INV_FREQ], pos);
    }
    for (int g = 0; g < Hkv; ++g) {
      rms(row + nq + g * D, w[K_NORM], D, d.eps, tmp.data());
      rope(tmp.data(), d.R, w[INV_FREQ], pos);
      const int64_t base = ((b * Hkv + g) * cap + idx + t) * D;
      for (int i = 0; i < D; ++i) {
        kb.put(base + i, tmp[i]);
        vb.put(base + i, row[nq + nkv + g * D + i]);
      }
    }
  }

  // attention, gated: o [rows, Hq * D]; each kv head's keys and values 0 .. idx + T - 1
  // converted to float once for its query heads and rows.
  std::vector<float> o(rows * Hq * D), p(idx + T), kf((idx + T) * D), vf((idx + T) * D);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int rep = Hq / Hkv;
  for (int64_t b = 0; b < B; ++b) {
    for (int g = 0; g < Hkv; ++g) {
      const int64_t kbase = (b * Hkv + g) * cap * D;
      for (int64_t i = 0; i < (idx + T) * D; ++i) {
        kf[i] = kb.get(kbase + i);
        vf[i] = vb.get(kbase + i);
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = b * T + t, n = idx + t + 1;
        for (int hq = g * rep; hq < (g + 1) * rep; ++hq) {
          const float* qh = &q[(r * Hq + hq) * D];
          float mx_ = -INFINITY;
          for (int64_t j = 0; j < n; ++j) {
            float s = 0.0f;
            for (int i = 0; i < D; ++i) s += qh[i] * kf[j * D + i];
            p[j] = s * scale;
            mx_ = std::max(mx_, p[j]);
          }
          float sum = 0.0f;
          for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx_));
          float* oh = &o[(r * Hq + hq) * D];
          std::fill(oh, oh + D, 0.0f);
          const float inv = 1.0f / sum;
          for (int64_t j = 0; j < n; ++j) {
            const float pj = p[j] * inv;
            for (int i = 0; i < D; ++i) oh[i] += pj * vf[j * D + i];
          }
          if (d.gate) {
            const float* gh = &qkv[r * nqkv + hq * qstride + D];
            for (int i = 0; i < D; ++i) oh[i] *= sigmoid(gh[i]);
          }
        }
      }
    }
  }

  // x = u + o @ W_o; x += MLP(rms(x)); out = rms(x)
  std::vector<float> x(rows * H), m(rows * H), gu(rows * 2 * I), act(rows * I), y(rows * H);
  matmul(o.data(), rows, int64_t(Hq) * D, w[O_PROJ], H, x.data());
  for (int64_t i = 0; i < rows * H; ++i) x[i] += u[i];
  for (int64_t r = 0; r < rows; ++r) rms(&x[r * H], w[LN_POST], H, d.eps, &m[r * H]);
  matmul(m.data(), rows, H, w[GATE_UP], 2 * I, gu.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < I; ++i) {
      const float gv = gu[r * 2 * I + i];
      act[r * I + i] = gv * sigmoid(gv) * gu[r * 2 * I + I + i];
    }
  matmul(act.data(), rows, I, w[DOWN], H, y.data());
  for (int64_t i = 0; i < rows * H; ++i) x[i] += y[i];
  for (int64_t r = 0; r < rows; ++r) rms(&x[r * H], w[NORM], H, d.eps, &m[r * H]);

  if (out[0].dtype() == mx::float16) {
    _Float16* op = reinterpret_cast<_Float16*>(out[0].data<mx::float16_t>());
    for (int64_t i = 0; i < rows * H; ++i) op[i] = static_cast<_Float16>(m[i]);
  } else {
    std::memcpy(out[0].data<float>(), m.data(), rows * H * sizeof(float));
  }

  std::vector<float> logits(rows * V);
  matmul(m.data(), rows, H, w[LM_HEAD], V, logits.data());
  uint32_t* dr = out[1].data<uint32_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = &logits[r * V];
    int64_t best = 0;
    for (int64_t v = 1; v < V; ++v)
      if (l[v] > l[best]) best = v;
    dr[r] = static_cast<uint32_t>(best);
  }
}

class MTPHeadCPU : public mx::Primitive {
 public:
  MTPHeadCPU(mx::Stream s, Dims d) : mx::Primitive(s), d_(d) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    outputs[0].set_data(mx::allocator::malloc(outputs[0].nbytes()));
    outputs[1].set_data(mx::allocator::malloc(outputs[1].nbytes()));
    take_buffer(inputs[2], outputs[2]);
    take_buffer(inputs[3], outputs[3]);
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) enc.set_input_array(a);
    for (auto& o : outputs) enc.set_output_array(o);
    enc.dispatch([in = inputs, out = outputs, d = d_]() mutable { run(in, out, d); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("mtp_head_cpu: a CPU-only primitive; run it on a CPU stream");
  }

  const char* name() const override { return "MTPHeadCPU"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const MTPHeadCPU&>(other).d_;
    return o.T == d_.T && o.Hq == d_.Hq && o.Hkv == d_.Hkv && o.D == d_.D && o.R == d_.R &&
           o.eps == d_.eps && o.gate == d_.gate;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const int64_t rows = inputs[0].size() / inputs[0].shape(-1);
    return {inputs[0].shape(), {static_cast<int>(rows)}, inputs[2].shape(), inputs[3].shape()};
  }

 private:
  Dims d_;
};

std::vector<mx::array> mtp_head(const mx::array& hidden, const mx::array& emb,
                                const mx::array& keys, const mx::array& values,
                                const mx::array& idx, const std::vector<mx::array>& weights,
                                int tokens, int num_heads, int num_kv_heads, int rotary_dim,
                                float eps, bool gate) {
  auto fail = [](const char* m) { throw std::invalid_argument(std::string("mtp_head: ") + m); };
  if (weights.size() != N_WEIGHTS) fail("14 weights (see the source)");
  for (const auto& w : weights)
    if (w.dtype() != mx::float32 && (w.ndim() != 1 || w.dtype() != mx::float16))
      fail("weights float32 (the vectors float32 or float16)");
  if (hidden.ndim() != 2 || emb.shape() != hidden.shape()) fail("hidden, emb [rows, H]");
  for (const auto& a : {hidden, emb})
    if (a.dtype() != mx::float16 && a.dtype() != mx::float32) fail("float16 or float32 inputs");
  if (keys.ndim() != 4 || values.shape() != keys.shape() || values.dtype() != keys.dtype())
    fail("keys, values [B, Hkv, capacity, D] of one dtype");
  if (keys.dtype() != mx::float16 && keys.dtype() != mx::float32) fail("float16 or float32 KV");
  const int64_t rows = hidden.shape(0), H = hidden.shape(1);
  const int D = keys.shape(3);
  if (tokens < 1 || rows % tokens || rows / tokens != keys.shape(0) || keys.shape(1) != num_kv_heads)
    fail("rows = B * tokens, keys [B, Hkv, capacity, D]");
  if (num_heads % num_kv_heads || rotary_dim % 2 || rotary_dim > D) fail("heads / rotary dims");
  const int64_t nq = int64_t(num_heads) * D * (gate ? 2 : 1), nkv = int64_t(num_kv_heads) * D;
  auto shape_is = [&](int i, std::initializer_list<int64_t> s) {
    const auto& w = weights[i];
    if (w.ndim() != static_cast<int>(s.size())) fail("a weight's shape (see the source)");
    int j = 0;
    for (int64_t n : s)
      if (w.shape(j++) != n) fail("a weight's shape (see the source)");
  };
  const int64_t I = weights[DOWN].shape(0);
  shape_is(NORM_E, {H});
  shape_is(NORM_H, {H});
  shape_is(FC, {2 * H, H});
  shape_is(LN_IN, {H});
  shape_is(QKV, {H, nq + 2 * nkv});
  shape_is(Q_NORM, {D});
  shape_is(K_NORM, {D});
  shape_is(O_PROJ, {int64_t(num_heads) * D, H});
  shape_is(LN_POST, {H});
  shape_is(GATE_UP, {H, 2 * I});
  shape_is(DOWN, {I, H});
  shape_is(NORM, {H});
  if (weights[LM_HEAD].ndim() != 2 || weights[LM_HEAD].shape(0) != H) fail("lm_head [H, V]");
  shape_is(INV_FREQ, {rotary_dim / 2});
  if (idx.dtype() != mx::int32 || idx.size() != 1) fail("idx: an int32 scalar");
  std::vector<mx::array> inputs = {hidden, emb, keys, values, idx};
  for (const auto& w : weights) inputs.push_back(w);
  Dims d{tokens, num_heads, num_kv_heads, D, rotary_dim, eps, gate};
  auto s = mx::default_stream(mx::Device::cpu);
  auto prim = std::make_shared<MTPHeadCPU>(s, d);
  return mx::array::make_arrays(
      {hidden.shape(), {static_cast<int>(rows)}, keys.shape(), values.shape()},
      {hidden.dtype(), mx::uint32, keys.dtype(), values.dtype()}, prim, inputs);
}

}  // namespace

void register_mtp_head(nb::module_& m) {
  m.def("mtp_head", &mtp_head, nb::arg("hidden"), nb::arg("emb"), nb::arg("keys"),
        nb::arg("values"), nb::arg("idx"), nb::arg("weights"), nb::arg("tokens"),
        nb::arg("num_heads"), nb::arg("num_kv_heads"), nb::arg("rotary_dim"), nb::arg("eps"),
        nb::arg("gate"),
        "The MTP head's step over T new positions a row in float32 (mtp_head_cpu.cpp): "
        "[out [rows, H], drafts [rows] uint32, keys, values] (the buffers with the new "
        "positions written at idx .. idx + T - 1), on the CPU.");
}
