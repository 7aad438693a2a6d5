"""Decode attention GPU kernel text, written once for Metal and CUDA (text only: building and
launching is `launch.py`).

softmax(q k^T * scale + mask) v for a few query tokens a row (decode: T = 1; a speculative
verify step: T = 2..8) over a KV buffer, in two launches (flash-decoding):

1. `PARTIAL`: the keys are cut into splits of S positions. A threadgroup of W warps owns one
   (row b, kv head, split) and a chunk of R query rows of that kv head (the G = Hq / Hkv query
   heads times the T tokens: row r -> head g = r / T, token t = r % T). Warp w takes the
   positions [w S / W, (w + 1) S / W) of the split, U keys at a time (their loads issued
   together); lane l holds elements [l E, l E + E) of a key row (E = D / 32), so a warp reads a
   whole row per load. Per key and query row: the score q . k (q scaled by `scale` in fp32 at
   load) summed over the 32 lanes, then the online softmax update m, l, acc. The W warps' (m, l,
   acc) meet in threadgroup memory, added in warp order; the split's fp32 (m, l, acc) is written.
2. `COMBINE`: one threadgroup a query row, one thread an output element: the splits' partials
   merged in split order, o = acc / l, then (AT_GATE) o * sigmoid(gate); written as [B, T, Hq * D]
   (o_proj's layout) in the output dtype.

Which keys a query row sees: positions j < n = start + T (`start`, an int array, is the first
new token's position: the keys after n are never read, so a preallocated buffer costs only what
it holds), and
    AT_MASK    1: mask[b or 0, 0, t, j] (bool [1 or B, 1, T, Cm], Cm >= n)
    AT_CAUSAL  1: j <= n - T + t (the last T positions are the queries' own)
               both 0: every j < n.
A masked key takes no part at all (no arithmetic, not even 0 * v), so the result does not depend
on what the buffer holds there, and the split boundaries are positions, fixed by S alone: the
same keys give bit-identical results whatever the buffer's capacity (a compiled step over a
preallocated buffer and the plain path over the filled prefix agree exactly). A query row with
no visible key at all (left padding, a fully masked row) gets o = 0: finite, where MLX's ops
fallback gives the mean of the values (its masked scores are the dtype's lowest, not -inf); such
rows are padding, whose outputs no real position reads. The running maximum starts at AT_NEG
(finite), so no inf - inf arises anywhere.

Precision: every product, the softmax and the accumulation in fp32; the output rounded once to
its dtype. With the gate: o rounded to the dtype, sigmoid(gate) rounded to it, their product
rounded (what `o * sigmoid(gate)` as ops on a rounded attention output does).

Shapes: q [B, Hq, T, D]; k, v [B, Hkv, Ck, D]; start [] or [1] int; mask [Bm, 1, T, Cm] bool;
part_acc [B * Hq * T, NS, D] fp32 and part_ml [B, Hq, T, NS, 2] fp32 (m, l), NS = ceil(Ck / S);
gate: a row of GR elements a token ([B, T, GR], row-contiguous), head h's gate at elements
[h GS + GO, h GS + GO + D) of its token's row: a gate [B, T, Hq, GS] is GR = Hq GS; the fused
q|k|v projection of a few tokens ([B, T, N], each head's query and gate side by side, then k and
v) is GR = N, GS = 2 D, GO = D, read in place (its q|gate columns alone are a view with a row
stride, which MLX would copy for the kernel); out [B, T, Hq * D].
Compile-time template arguments: D (a multiple of 32, <= 256), R (query rows a threadgroup,
<= 8), S (keys a split, a multiple of W * U), W (warps a threadgroup), U (keys loaded together)
for PARTIAL; D, S, GR, GS, GO, OT (the output dtype) for COMBINE. B, the head counts, T and Ck
are read from the input shapes.

Helpers (each backend's, shared with the gated-delta kernels: gated_delta/metal.py, cuda.py):
gd_group_sum<32>(x), gd_exp(x), gd_threadgroup, gd_threadgroup_barrier(); and from this
package's prologue: at_lane (lane in the warp), at_warp (warp in the threadgroup), at_tg_x,
at_tg_y (the threadgroup's position in the grid).

References: FlashDecoding (Dao et al. 2023, split-K attention with a combine pass); MLX's
`sdpa_vector` Metal kernel (one SIMD-group a key row).
"""

from __future__ import annotations

PARTIAL_INPUTS = ["q", "k", "v", "start", "scale"]
PARTIAL_OUTPUTS = ["part_acc", "part_ml"]
COMBINE_INPUTS = ["part_acc", "part_ml", "start"]
COMBINE_OUTPUTS = ["out"]

# The running maximum's start: below any score, finite (exp(AT_NEG - m) is 0 for a real m).
_DEFINES = """
#define AT_NEG (-3.0e38f)
#define AT_MAX(a, b) ((a) > (b) ? (a) : (b))
"""
_UNDEFS = """
#undef AT_NEG
#undef AT_MAX
#undef AT_MASK
#undef AT_CAUSAL
#undef AT_GATE
"""

PARTIAL = """
  // q: [B, Hq, T, D]; k, v: [B, Hkv, Ck, D]; start: [] or [1]; scale: [1] fp32
  // mask: [Bm, 1, T, Cm] bool; part_acc: [B * Hq * T, NS, D]; part_ml: [B, Hq, T, NS, 2]
  constexpr int E = D / 32;  // elements of a key row a lane holds
  const int Hq = q_shape[1];
  const int T = q_shape[2];
  const int Hkv = k_shape[1];
  const int Ck = k_shape[2];
  const int G = Hq / Hkv;
  const int NS = (Ck + S - 1) / S;
  const int NC = (G * T + R - 1) / R;  // chunks of R query rows a kv head
  const int split = int(at_tg_x);
  const int bh = int(at_tg_y) / NC;  // b * Hkv + kv head
  const int chunk = int(at_tg_y) % NC;
  const int b = bh / Hkv;
  const int hkv = bh % Hkv;
  const int n = AT_MAX(0, int(start[0]) + T) < Ck ? AT_MAX(0, int(start[0]) + T) : Ck;
  const int rows = G * T - chunk * R < R ? G * T - chunk * R : R;
  const float sc = static_cast<float>(scale[0]);
#if AT_MASK
  const int Cm = mask_shape[3];
  const size_t mask0 = size_t(mask_shape[0] == 1 ? 0 : b) * T * Cm;
#endif

  // This lane's slice of each query row (scaled), and the row's query head and token.
  float qr[R][E];
  float acc[R][E];
  float m[R];
  float l[R];
  int tok[R];
  size_t row_id[R];  // (b * Hq + head) * T + t
  #pragma unroll
  for (int r = 0; r < R; ++r) {
    const int rr = chunk * R + (r < rows ? r : 0);
    const int g = rr / T;
    tok[r] = rr % T;
    row_id[r] = (size_t(b) * Hq + hkv * G + g) * T + tok[r];
    m[r] = AT_NEG;
    l[r] = 0.0f;
    #pragma unroll
    for (int e = 0; e < E; ++e) {
      qr[r][e] = static_cast<float>(q[row_id[r] * D + at_lane * E + e]) * sc;
      acc[r][e] = 0.0f;
    }
  }

  // This warp's positions of the split, U at a time.
  constexpr int PER_WARP = S / W;
  const int j_lo = split * S + int(at_warp) * PER_WARP;
  const int j_hi = j_lo + PER_WARP < n ? j_lo + PER_WARP : n;
  const size_t kv0 = size_t(bh) * Ck * D + at_lane * E;
  for (int j0 = j_lo; j0 < j_hi; j0 += U) {
    // Which query rows see key j0 + u (the same in every lane: the branches below are uniform).
    bool see[U][R];
    bool any[U];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      any[u] = false;
      #pragma unroll
      for (int r = 0; r < R; ++r) {
        bool ok = r < rows && j < j_hi;
#if AT_CAUSAL
        ok = ok && j <= n - T + tok[r];
#endif
#if AT_MASK
        ok = ok && bool(mask[mask0 + size_t(tok[r]) * Cm + (j < Cm ? j : Cm - 1)]) && j < Cm;
#endif
        see[u][r] = ok;
        any[u] = any[u] || ok;
      }
    }
    float kk[U][E];
    float vv[U][E];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
      const size_t at = kv0 + size_t(any[u] ? j0 + u : j0) * D;
      #pragma unroll
      for (int e = 0; e < E; ++e) {
        kk[u][e] = any[u] ? static_cast<float>(k[at + e]) : 0.0f;
        vv[u][e] = any[u] ? static_cast<float>(v[at + e]) : 0.0f;
      }
    }
    #pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!any[u]) {
        continue;
      }
      #pragma unroll
      for (int r = 0; r < R; ++r) {
        float part = 0.0f;
        #pragma unroll
        for (int e = 0; e < E; ++e) {
          part += qr[r][e] * kk[u][e];
        }
        const float s = gd_group_sum<32>(part);
        if (see[u][r]) {
          const float m_new = AT_MAX(m[r], s);
          const float alpha = gd_exp(m[r] - m_new);
          const float p = gd_exp(s - m_new);
          l[r] = l[r] * alpha + p;
          #pragma unroll
          for (int e = 0; e < E; ++e) {
            acc[r][e] = acc[r][e] * alpha + p * vv[u][e];
          }
          m[r] = m_new;
        }
      }
    }
  }

  // The W warps' partials: one maximum, then the sums rescaled to it, added in warp order.
  gd_threadgroup float tg_ml[2 * W * R];
  gd_threadgroup float tg_acc[R * D];
  if (at_lane == 0) {
    #pragma unroll
    for (int r = 0; r < R; ++r) {
      tg_ml[2 * (at_warp * R + r)] = m[r];
      tg_ml[2 * (at_warp * R + r) + 1] = l[r];
    }
  }
  gd_threadgroup_barrier();
  float m_all[R];
  float l_all[R];
  #pragma unroll
  for (int r = 0; r < R; ++r) {
    m_all[r] = AT_NEG;
    for (int w = 0; w < W; ++w) {
      m_all[r] = AT_MAX(m_all[r], tg_ml[2 * (w * R + r)]);
    }
    l_all[r] = 0.0f;
    for (int w = 0; w < W; ++w) {
      l_all[r] += tg_ml[2 * (w * R + r) + 1] * gd_exp(tg_ml[2 * (w * R + r)] - m_all[r]);
    }
    const float own = gd_exp(m[r] - m_all[r]);
    #pragma unroll
    for (int e = 0; e < E; ++e) {
      acc[r][e] *= own;
    }
  }
  for (int w = 0; w < W; ++w) {
    if (int(at_warp) == w) {
      #pragma unroll
      for (int r = 0; r < R; ++r) {
        #pragma unroll
        for (int e = 0; e < E; ++e) {
          const int i = r * D + at_lane * E + e;
          tg_acc[i] = w == 0 ? acc[r][e] : tg_acc[i] + acc[r][e];
        }
      }
    }
    gd_threadgroup_barrier();
  }
  // Rows r = at_warp, at_warp + W, ... written by warp at_warp (r unrolled: the per-row arrays
  // stay in registers).
  #pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r % W != int(at_warp) || r >= rows) {
      continue;
    }
    const size_t out0 = (row_id[r] * NS + split) * D;
    #pragma unroll
    for (int e = 0; e < E; ++e) {
      part_acc[out0 + at_lane * E + e] = tg_acc[r * D + at_lane * E + e];
    }
    if (at_lane == 0) {
      part_ml[2 * (row_id[r] * NS + split)] = m_all[r];
      part_ml[2 * (row_id[r] * NS + split) + 1] = l_all[r];
    }
  }
"""

COMBINE = """
  // part_acc: [B * Hq * T, NS, D]; part_ml: [B, Hq, T, NS, 2]; start: [] or [1]
  // gate: [B, T, GR] (head h at [h GS + GO, h GS + GO + D)); out: [B, T, Hq * D]
  const int Hq = part_ml_shape[1];
  const int T = part_ml_shape[2];
  const int NS = part_ml_shape[3];
  const int n = int(start[0]) + T;
  const int live = (n + S - 1) / S < NS ? (n + S - 1) / S : NS;  // splits holding keys
  const size_t row = at_tg_x;  // (b * Hq + head) * T + t
  const int d = int(at_warp) * 32 + int(at_lane);
  float m_all = AT_NEG;
  for (int s = 0; s < live; ++s) {
    m_all = AT_MAX(m_all, part_ml[2 * (row * NS + s)]);
  }
  float l_all = 0.0f;
  float a = 0.0f;
  for (int s = 0; s < live; ++s) {
    const float w = gd_exp(part_ml[2 * (row * NS + s)] - m_all);
    l_all += part_ml[2 * (row * NS + s) + 1] * w;
    a += part_acc[(row * NS + s) * D + d] * w;
  }
  float o = l_all > 0.0f ? a / l_all : 0.0f;  // no visible key: 0 (see the docstring)
  const int t = int(row % T);
  const int head = int((row / T) % Hq);
  const size_t b = row / (size_t(T) * Hq);
  const size_t at = ((b * T + t) * Hq + head);
#if AT_GATE
  const float g = static_cast<float>(gate[(b * T + t) * GR + size_t(head) * GS + GO + d]);
  const float sig = static_cast<float>(static_cast<OT>(1.0f / (1.0f + gd_exp(-g))));
  o = static_cast<float>(static_cast<OT>(o)) * sig;
#endif
  out[at * D + d] = static_cast<OT>(o);
"""


def partial_name(mask: bool, causal: bool) -> str:
    """Kernel `name=` of the split pass, e.g. `attn_decode_partial_mask`."""
    if mask and causal:
        raise ValueError("a mask and causal exclude each other")
    return "attn_decode_partial" + ("_mask" if mask else "_causal" if causal else "")


def combine_name(gate: bool) -> str:
    return "attn_decode_combine" + ("_gate" if gate else "")


def partial_inputs(mask: bool) -> list[str]:
    return PARTIAL_INPUTS + (["mask"] if mask else [])


def combine_inputs(gate: bool) -> list[str]:
    return COMBINE_INPUTS + (["gate"] if gate else [])


def partial_variants() -> list[tuple[bool, bool]]:
    """(mask, causal) of every split-pass variant."""
    return [(False, False), (False, True), (True, False)]


def partial_body(mask: bool, causal: bool) -> str:
    """The split pass of one variant: its switches, then the template."""
    partial_name(mask, causal)
    switches = (
        f"\n#define AT_MASK {int(mask)}\n#define AT_CAUSAL {int(causal)}\n#define AT_GATE 0\n"
    )
    return switches + _DEFINES + PARTIAL + _UNDEFS


def combine_body(gate: bool) -> str:
    switches = f"\n#define AT_MASK 0\n#define AT_CAUSAL 0\n#define AT_GATE {int(gate)}\n"
    return switches + _DEFINES + COMBINE + _UNDEFS
