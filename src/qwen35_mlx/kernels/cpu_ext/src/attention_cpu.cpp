// Attention of a few query tokens a row over a KV buffer (decode, a speculative verify) on the
// CPU as one MLX primitive, the output gate folded in: the contract of
// `kernels/attention` `decode_attention` (its GPU kernel pair's), float32.
//
//   q [B, Hq, T, D]; k, v [B, Hkv, C, D] (a cache's whole buffer), Hq a multiple of Hkv (query
//   head h reads kv head h / (Hq / Hkv)); start: int32 [] or [1], the first query's position;
//   keys used: positions < start + T; causal: query t sees keys <= start + t; mask: bool
//   [1 or B, 1, T, C'] (True: attend), C' >= start + T; gate [B, T, Hq, G] (or [B, Hq, 1, G]
//   for T = 1: the same memory) read at [gate_offset, gate_offset + D).
//   o[b, t, h] = softmax_j(scale q . k_j) . v_j  (times sigmoid(gate))  -> [B, T, Hq * D]
// float32 scores, softmax and sums; a query with no visible key gives 0 (as the GPU kernel).
// Any strides; q, k, v, gate in float32, bfloat16 or float16 (read as float32), the output in
// q's dtype.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"

#include "clones.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

struct AttnArgs {
  float scale;
  bool causal, masked, gated;
  int gate_offset;
};

// One query row: q [D] dense; keys/values rows at k + j * ks (D dense); n keys; keep[j] or null.
Q35_CLONES void attend(const float* q, const float* k, const float* v, int64_t ks, int64_t vs,
                       int64_t n, int D, float scale, const bool* keep, float* scores,
                       float* out) {
  float mx_s = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    if (keep != nullptr && !keep[j]) {
      scores[j] = -INFINITY;
      continue;
    }
    const float* kj = k + j * ks;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int d = 0; d < D; ++d) s += q[d] * kj[d];
    s *= scale;
    scores[j] = s;
    mx_s = std::max(mx_s, s);
  }
  for (int d = 0; d < D; ++d) out[d] = 0.0f;
  if (mx_s == -INFINITY) return;  // no visible key
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    if (scores[j] == -INFINITY) continue;
    const float p = std::exp(scores[j] - mx_s);
    sum += p;
    const float* vj = v + j * vs;
#pragma omp simd
    for (int d = 0; d < D; ++d) out[d] += p * vj[d];
  }
  const float inv = 1.0f / sum;
  for (int d = 0; d < D; ++d) out[d] *= inv;
}

// Element i (an offset under its strides) of a float array of any float dtype, as float32.
float at(const mx::array& a, int64_t i) {
  switch (a.dtype()) {
    case mx::float32: return a.data<float>()[i];
    case mx::bfloat16: return static_cast<float>(a.data<mx::bfloat16_t>()[i]);
    case mx::float16: return static_cast<float>(a.data<mx::float16_t>()[i]);
    default: throw std::invalid_argument("attention_cpu: float inputs only");
  }
}

// Element offset of [i0, i1, i2, 0] in a 4-D array.
int64_t off4(const mx::array& a, int64_t i0, int64_t i1, int64_t i2) {
  return i0 * a.strides()[0] + i1 * a.strides()[1] + i2 * a.strides()[2];
}

void run(const AttnArgs& aa, std::vector<mx::array> in, mx::array out) {
  const mx::array &q = in[0], &k = in[1], &v = in[2], &st = in[3];
  const int B = q.shape(0), Hq = q.shape(1), T = q.shape(2), D = q.shape(3);
  const int Hkv = k.shape(1);
  const int64_t Ck = k.shape(2);
  const int rep = Hq / Hkv;
  const int64_t start = st.data<int32_t>()[0];
  int64_t n = std::min<int64_t>(Ck, std::max<int64_t>(0, start + T));
  int idx = 4;
  const mx::array* mask = aa.masked ? &in[idx++] : nullptr;
  if (mask != nullptr) n = std::min<int64_t>(n, mask->shape(3));
  const mx::array* gate = aa.gated ? &in[idx++] : nullptr;
  // Keys and values with a dense last axis are read in place; else gathered once.
  auto dense_rows = [&](const mx::array& a, std::vector<float>& buf, int64_t& row_stride,
                        int64_t& head_stride, int64_t& batch_stride) -> const float* {
    if (a.strides()[3] == 1 && a.dtype() == mx::float32) {
      row_stride = a.strides()[2];
      head_stride = a.strides()[1];
      batch_stride = a.strides()[0];
      return a.data<float>();
    }
    buf.resize(size_t(B) * Hkv * n * D);
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < Hkv; ++h)
        for (int64_t j = 0; j < n; ++j)
          for (int d = 0; d < D; ++d)
            buf[((size_t(b) * Hkv + h) * n + j) * D + d] = at(a, off4(a, b, h, j) + d * a.strides()[3]);
    row_stride = D;
    head_stride = n * D;
    batch_stride = int64_t(Hkv) * n * D;
    return buf.data();
  };
  std::vector<float> kbuf, vbuf;
  int64_t ks, kh, kb, vs, vh, vb;
  const float* kp = dense_rows(k, kbuf, ks, kh, kb);
  const float* vp = dense_rows(v, vbuf, vs, vh, vb);
  std::vector<float> qrow(D), scores(std::max<int64_t>(n, 1)), o(D);
  std::vector<char> keep(std::max<int64_t>(n, 1));
  std::vector<float> ybuf(out.size());
  float* y = ybuf.data();
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      // Which keys query t sees: < start + T, causal <= start + t, and the mask.
      const int64_t last = aa.causal ? std::min<int64_t>(n, start + t + 1) : n;
      bool any_off = last < n;
      if (mask != nullptr) {
        const int mb = mask->shape(0) == 1 ? 0 : b;
        const bool* mp = mask->data<bool>();
        for (int64_t j = 0; j < n; ++j) {
          const bool m = mp[mb * mask->strides()[0] + t * mask->strides()[2] +
                            j * mask->strides()[3]];
          keep[j] = m && j < last;
        }
        any_off = true;
      } else if (any_off) {
        for (int64_t j = 0; j < n; ++j) keep[j] = j < last;
      }
      for (int h = 0; h < Hq; ++h) {
        const int kvh = h / rep;
        for (int d = 0; d < D; ++d)
          qrow[d] = at(q, off4(q, b, h, t) + d * q.strides()[3]);
        attend(qrow.data(), kp + b * kb + kvh * kh, vp + b * vb + kvh * vh, ks, vs, n, D,
               aa.scale, any_off ? reinterpret_cast<const bool*>(keep.data()) : nullptr,
               scores.data(), o.data());
        float* yo = y + ((size_t(b) * T + t) * Hq + h) * D;
        if (gate != nullptr) {
          // [B, T, Hq, G], or [B, Hq, 1, G] for one token (the same memory when dense).
          const bool bthg = gate->shape(1) == T && gate->shape(2) == Hq;
          const int64_t base = bthg ? off4(*gate, b, t, h) : off4(*gate, b, h, t);
          for (int d = 0; d < D; ++d) {
            const float gv = at(*gate, base + (aa.gate_offset + d) * gate->strides()[3]);
            yo[d] = o[d] * (1.0f / (1.0f + std::exp(-gv)));
          }
        } else {
          std::copy(o.begin(), o.end(), yo);
        }
      }
    }
  }
  switch (out.dtype()) {
    case mx::float32: std::copy(ybuf.begin(), ybuf.end(), out.data<float>()); break;
    case mx::bfloat16: std::copy(ybuf.begin(), ybuf.end(), out.data<mx::bfloat16_t>()); break;
    case mx::float16: std::copy(ybuf.begin(), ybuf.end(), out.data<mx::float16_t>()); break;
    default: throw std::invalid_argument("attention_cpu: float output only");
  }
}

class AttentionCPU : public mx::Primitive {
 public:
  AttentionCPU(mx::Stream s, AttnArgs a) : mx::Primitive(s), a_(a) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([a = a_, in = inputs, out = out]() mutable { run(a, std::move(in), out); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("attention_cpu: a CPU-only primitive; run it on a CPU stream");
  }

  const char* name() const override { return "AttentionCPU"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const AttentionCPU&>(other).a_;
    return a_.scale == o.scale && a_.causal == o.causal && a_.masked == o.masked &&
           a_.gated == o.gated && a_.gate_offset == o.gate_offset;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const auto& q = inputs[0];
    return {{q.shape(0), q.shape(2), q.shape(1) * q.shape(3)}};
  }

 private:
  AttnArgs a_;
};

mx::array attention_cpu(const mx::array& q, const mx::array& k, const mx::array& v,
                        const mx::array& start, float scale, std::optional<mx::array> mask,
                        bool causal, std::optional<mx::array> gate, int gate_offset) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape() || k.shape(0) != q.shape(0) ||
      k.shape(3) != q.shape(3) || q.shape(1) % k.shape(1) != 0)
    throw std::invalid_argument("attention_cpu: q [B,Hq,T,D], k = v [B,Hkv,C,D], Hkv | Hq");
  auto floating = [](const mx::array& a) {
    return a.dtype() == mx::float32 || a.dtype() == mx::bfloat16 || a.dtype() == mx::float16;
  };
  if (!floating(q) || !floating(k) || !floating(v))
    throw std::invalid_argument("attention_cpu: q, k, v float32, bfloat16 or float16");
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs = {q, k, v, mx::astype(mx::reshape(start, {1}, s), mx::int32, s)};
  if (mask) {
    if (mask->ndim() != 4 || mask->dtype() != mx::bool_)
      throw std::invalid_argument("attention_cpu: mask bool [1 or B, 1, T, C']");
    inputs.push_back(*mask);
  }
  if (gate) {
    if (gate->ndim() != 4 || gate_offset < 0 || gate_offset + q.shape(3) > gate->shape(3))
      throw std::invalid_argument("attention_cpu: gate [B, T, Hq, G], offset + D <= G");
    if (!floating(*gate)) throw std::invalid_argument("attention_cpu: a float gate");
    inputs.push_back(*gate);
  }
  AttnArgs a{scale, causal, mask.has_value(), gate.has_value(), gate_offset};
  auto prim = std::make_shared<AttentionCPU>(s, a);
  return mx::array({q.shape(0), q.shape(2), q.shape(1) * q.shape(3)}, q.dtype(), prim,
                   std::move(inputs));
}

}  // namespace

void register_attention(nb::module_& m) {
  m.def("attention", &attention_cpu, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("start"),
        nb::arg("scale"), nb::arg("mask") = nb::none(), nb::arg("causal") = false,
        nb::arg("gate") = nb::none(), nb::arg("gate_offset") = 0,
        "Attention of a few query tokens a row over a KV buffer, gate folded in (float32 "
        "arithmetic): "
        "[B, T, Hq * D] on the CPU stream (kernels/attention's decode_attention contract).");
}
