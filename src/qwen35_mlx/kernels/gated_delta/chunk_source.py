"""Chunked gated-delta GPU kernel text, written once for Metal and CUDA (text only: building and
launching is `chunk_launch.py`).

The chunked (WY / UT) form of the recurrence (see `chunked.py` for the derivation): per chunk n
of C steps, per value head, with S the [Dv, Dk] state at the chunk's start,
    delta = U - W S^T                  [C, Dv]   (U, W: the intra-chunk UT products)
    y     = Qg S^T + P delta           [C, Dv]   (Qg = gamma * q, P = decayed q k^T, j <= i)
    S     = decay * S + delta^T Kw     [Dv, Dk]  (Kw = w * k, decay = the chunk's whole decay)
The intra-chunk pieces (W, U, Qg, P, Kw, decay) of every chunk and head are computed in parallel
beforehand (`PREP_BODY`, or MLX ops for per-key gates); `STATE_BODY` is the sequential part:
ONE threadgroup per (batch x value head, tile of BV value rows) loops over all chunks and keeps
its [BV, Dk] tile of the state on chip the whole time (registers, mirrored in threadgroup memory
for the products that need every key column).

STATE_BODY layout (NT = 4 C threads, all of one threadgroup):
  phase 1  X = [W; Qg] S^T: LR = NT / C adjacent lanes share row j of W and of Qg, split its
           key quads and keep all BV value rows (2 BV accumulators; S read from threadgroup
           memory, 4 lanes reading 4 consecutive quads); gd_group_sum<LR> adds the partials;
           delta = U - W S^T and Qg S^T go to threadgroup memory.
  barrier
  phase 2  y = Qg S^T + P delta: the same LR lanes per row split the row of P in quads of steps
           (quads above the diagonal skipped), all BV value rows each, gd_group_sum; y is
           written in YT.
  phase 3  S = decay * S + delta^T Kw, items (pair of value rows, key quad), key quads fastest
           (a SIMD-group reads whole rows of Kw); the new values stay in registers and are
           mirrored into threadgroup memory for the next chunk's phase 1.
  barrier
Threadgroup memory: S (BV x Dk) + delta and Qg S^T (C x BV each) fp32: 16 KB at BV=16, Dk=128,
C=64; 24 KB at Dk=256 (Apple GPUs allow 32 KB).

Helpers: those of `metal.py` / `cuda.py` (gd_load_f4, gd_store_f4, gd_group_sum, gd_exp, gd_log,
gd_prefetch), and from `chunk_launch.py`:
    gd_tid            thread index in the threadgroup (0..NT-1)          (source prologue)
    gd_tg_x, gd_tg_y  threadgroup index in the grid                      (source prologue)
    GD_TG             threadgroup-memory qualifier of a variable (`threadgroup` / `__shared__`)
    GD_TG_PTR         address space of a pointer into it (`threadgroup` / nothing)
    gd_barrier()      threadgroup-wide barrier (threadgroup memory visible afterwards)
    gd_f4(x, y, z, w) a float4 value
Template arguments: Dk, BV (value rows per threadgroup, multiple of 4), C (chunk), NT (threads),
PF (1: prefetch the next chunk's rows into L2, `gd_prefetch`), YT (y's dtype). Hv, Dv, the
padded length N*C and T come from the inputs' shapes and `dims`.

Inputs ([BH] = B * Hv, rows padded to N * C; padded and masked steps have zero rows, so they
change nothing and give y = 0):
    W, Qg, Kw [BH, N*C, Dk] fp32; U [BH, N*C, Dv] fp32; P [BH, N*C, C] fp32 (0 above the
    diagonal); decay [BH, N, Dk] fp32; state_in [B, Hv, Dv, Dk] fp32; dims int32 [1] = (T,).
Outputs: y [B, T, Hv, Dv] (YT), state_out [B, Hv, Dv, Dk] fp32.

References: flash-linear-attention fla/ops/common/chunk_delta_h.py and chunk_o.py (the same
split of the work between a parallel part and a state pass; their kernels are Triton).
"""

from __future__ import annotations

import textwrap

STATE_INPUTS = ["W", "U", "Qg", "P", "Kw", "decay", "state_in", "dims"]
STATE_OUTPUTS = ["y", "state_out"]
STATE_NAME = "gated_delta_chunk_state"

# STATE_BODY's phase-3 items: opens the loops over a thread's items it (item e = (pair of value
# rows vp, key quad dq)) and the two rows v of the pair; the body at each use closes both.
_STATE_ITEM_ROWS = """  #pragma unroll
  for (int it = 0; it < I3; ++it) {
    const int e = int(tid) + it * NT;
    const int vp = e / DQ;
    const int dq = e % DQ;
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int v = 2 * vp + h;
"""

STATE_BODY = (
    """
  constexpr int DQ = Dk / 4;       // key quads
  constexpr int VQ = BV / 4;       // value quads of the tile
  constexpr int LR = NT / C;       // phase 1: lanes per row (adjacent lanes of a SIMD-group)
  constexpr int E3 = (BV / 2) * DQ;  // phase-3 items: (pair of value rows, key quad)
  constexpr int I3 = (E3 + NT - 1) / NT;
  static_assert(NT == LR * C && LR <= 32 && (LR & (LR - 1)) == 0, "layout: LR lanes a row");
  static_assert(DQ % LR == 0 && C % (4 * LR) == 0, "layout: whole quads per lane");
  static_assert(BV % 4 == 0, "BV");
  const int Hv = U_shape[1];
  const int NC = U_shape[2];
  const int Dv = U_shape[3];
  const int N = NC / C;
  const int T = dims[0];

  const unsigned tid = gd_tid;
  const unsigned head = gd_tg_x;  // b * Hv + hv
  const int v0 = int(gd_tg_y) * BV;
  const unsigned b_idx = head / unsigned(Hv);
  const unsigned hv = head % unsigned(Hv);

  GD_TG float4 S4[BV * DQ];   // the state tile, row v at S4[v * DQ]
  GD_TG float4 d4[C * VQ];    // delta, row i at d4[i * VQ]
  GD_TG float4 y4[C * VQ];    // Qg S^T, row i at y4[i * VQ]
  GD_TG_PTR float* d_f = reinterpret_cast<GD_TG_PTR float*>(d4);

  // Phase-3 items own their state elements for the whole run (registers): rows 2 vp, 2 vp + 1.
  float s[I3][2][4];
"""
    + _STATE_ITEM_ROWS
    + """      float4 x = gd_f4(0.0f, 0.0f, 0.0f, 0.0f);
      if (e < E3 && v0 + v < Dv) {
        x = gd_load_f4(state_in + (size_t(head) * Dv + (v0 + v)) * Dk + 4 * dq);
      }
      s[it][h][0] = x.x;
      s[it][h][1] = x.y;
      s[it][h][2] = x.z;
      s[it][h][3] = x.w;
      if (e < E3) S4[v * DQ + dq] = x;
    }
  }
  gd_barrier();

  // W, Qg, Kw: [B * Hv, N * C, Dk]; U: [B, Hv, N * C, Dv]; P: [B * Hv, N * C, C];
  // decay: [B * Hv, N, Dk]; state_in, state_out: [B, Hv, Dv, Dk]; y: [B, T, Hv, Dv]
  const size_t row0 = size_t(head) * NC;  // first row of this head in W, U, Qg, P, Kw
  // Phase 1 layout: LR adjacent lanes share row j of W and of Qg and split its key quads
  // (dq = l, l + LR, ...), so a SIMD-group reads whole 16 * LR-byte pieces of 32 / LR rows;
  // each lane keeps all BV value rows, and the partial sums are added with gd_group_sum<LR>.
  const int j1 = int(tid) / LR;
  const int l1 = int(tid) % LR;
  for (int n = 0; n < N; ++n) {
    const size_t rn = row0 + size_t(n) * C;
    if (PF && n + 1 < N) {
      // Ask L2 for the next chunk's rows (128-byte lines) while this one is computed: the
      // pieces are far larger than L2, so each chunk would otherwise start on memory latency.
      const size_t rx = rn + C;
      for (int c = l1; c < Dk / 32; c += LR) {
        gd_prefetch(W + (rx + j1) * Dk + 32 * c);
        gd_prefetch(Qg + (rx + j1) * Dk + 32 * c);
      }
      for (int c = int(tid); c < C * Dk / 32; c += NT) gd_prefetch(Kw + rx * Dk + 32 * c);
      for (int c = int(tid); c < C * C / 32; c += NT) gd_prefetch(P + rx * C + 32 * c);
      if (int(tid) < C) gd_prefetch(U + (rx + tid) * Dv + v0);
    }
    // Phase 1: X = [W; Qg] S^T; delta = U - W S^T.
    {
      float aw[BV];
      float aq[BV];
      #pragma unroll
      for (int v = 0; v < BV; ++v) {
        aw[v] = 0.0f;
        aq[v] = 0.0f;
      }
      const size_t r1 = (rn + j1) * Dk;
      // Unrolled (DQ / LR trips), so every load of the row can be issued up front.
      #pragma unroll
      for (int m = 0; m < DQ / LR; ++m) {
        const int dq = l1 + m * LR;
        const float4 w = gd_load_f4(W + r1 + 4 * dq);
        const float4 qg = gd_load_f4(Qg + r1 + 4 * dq);
        #pragma unroll
        for (int v = 0; v < BV; ++v) {
          const float4 sv = S4[v * DQ + dq];
          aw[v] += w.x * sv.x + w.y * sv.y + w.z * sv.z + w.w * sv.w;
          aq[v] += qg.x * sv.x + qg.y * sv.y + qg.z * sv.z + qg.w * sv.w;
        }
      }
      #pragma unroll
      for (int v = 0; v < BV; ++v) {
        aw[v] = gd_group_sum<LR>(aw[v]);
        aq[v] = gd_group_sum<LR>(aq[v]);
      }
      #pragma unroll
      for (int vq = 0; vq < VQ; ++vq) {
        if (vq % LR == l1) {
          float uu[4];
          #pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int v = v0 + 4 * vq + u;
            uu[u] = v < Dv ? U[(rn + j1) * Dv + v] - aw[4 * vq + u] : 0.0f;
          }
          d4[j1 * VQ + vq] = gd_f4(uu[0], uu[1], uu[2], uu[3]);
          y4[j1 * VQ + vq] = gd_f4(aq[4 * vq], aq[4 * vq + 1], aq[4 * vq + 2], aq[4 * vq + 3]);
        }
      }
    }
    gd_barrier();

    // Phase 2: y = Qg S^T + P delta. Row i = j1 again: its LR lanes split the row of P in
    // quads of steps (float4 reads, whole 16 * LR-byte pieces per row), keep all BV value rows,
    // skip the quads above the diagonal (P is 0 there) and add their sums with gd_group_sum.
    {
      float o[BV];
      #pragma unroll
      for (int v = 0; v < BV; ++v) o[v] = 0.0f;
      const size_t p0 = (rn + j1) * C;
      #pragma unroll
      for (int m = 0; m < C / (4 * LR); ++m) {
        const int jq = l1 + m * LR;
        if (4 * jq <= j1) {
          const float4 p = gd_load_f4(P + p0 + 4 * jq);
          const float pj[4] = {p.x, p.y, p.z, p.w};
          #pragma unroll
          for (int u = 0; u < 4; ++u) {
            #pragma unroll
            for (int vq = 0; vq < VQ; ++vq) {
              const float4 dl = d4[(4 * jq + u) * VQ + vq];
              o[4 * vq] += pj[u] * dl.x;
              o[4 * vq + 1] += pj[u] * dl.y;
              o[4 * vq + 2] += pj[u] * dl.z;
              o[4 * vq + 3] += pj[u] * dl.w;
            }
          }
        }
      }
      #pragma unroll
      for (int v = 0; v < BV; ++v) o[v] = gd_group_sum<LR>(o[v]);
      const int t = n * C + j1;
      if (t < T) {
        const size_t yrow = ((size_t(b_idx) * T + t) * Hv + hv) * Dv;
        #pragma unroll
        for (int vq = 0; vq < VQ; ++vq) {
          if (vq % LR == l1) {
            const float4 y0 = y4[j1 * VQ + vq];
            const float yq[4] = {y0.x, y0.y, y0.z, y0.w};
            #pragma unroll
            for (int u = 0; u < 4; ++u) {
              const int v = v0 + 4 * vq + u;
              if (v < Dv) y[yrow + v] = static_cast<YT>(yq[u] + o[4 * vq + u]);
            }
          }
        }
      }
    }

    // Phase 3: S = decay * S + delta^T Kw; a SIMD-group reads whole rows of Kw.
    #pragma unroll
    for (int it = 0; it < I3; ++it) {
      const int e = int(tid) + it * NT;
      if (E3 % NT == 0 || e < E3) {
        const int vp = e / DQ;
        const int dq = e % DQ;
        float a0[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        float a1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        #pragma unroll 4
        for (int j = 0; j < C; ++j) {
          const float dl0 = d_f[j * BV + 2 * vp];
          const float dl1 = d_f[j * BV + 2 * vp + 1];
          const float4 kw = gd_load_f4(Kw + (rn + j) * Dk + 4 * dq);
          a0[0] += dl0 * kw.x;
          a0[1] += dl0 * kw.y;
          a0[2] += dl0 * kw.z;
          a0[3] += dl0 * kw.w;
          a1[0] += dl1 * kw.x;
          a1[1] += dl1 * kw.y;
          a1[2] += dl1 * kw.z;
          a1[3] += dl1 * kw.w;
        }
        const float4 dc = gd_load_f4(decay + (size_t(head) * N + n) * Dk + 4 * dq);
        const float dcs[4] = {dc.x, dc.y, dc.z, dc.w};
        #pragma unroll
        for (int c = 0; c < 4; ++c) {
          s[it][0][c] = dcs[c] * s[it][0][c] + a0[c];
          s[it][1][c] = dcs[c] * s[it][1][c] + a1[c];
        }
        S4[(2 * vp) * DQ + dq] = gd_f4(s[it][0][0], s[it][0][1], s[it][0][2], s[it][0][3]);
        S4[(2 * vp + 1) * DQ + dq] = gd_f4(s[it][1][0], s[it][1][1], s[it][1][2], s[it][1][3]);
      }
    }
    gd_barrier();
  }

"""
    + _STATE_ITEM_ROWS
    + """      if ((E3 % NT == 0 || e < E3) && v0 + v < Dv) {
        gd_store_f4(state_out + (size_t(head) * Dv + (v0 + v)) * Dk + 4 * dq, s[it][h][0],
                    s[it][h][1], s[it][h][2], s[it][h][3]);
      }
    }
  }
"""
)

PREP_OUTPUTS = ["W", "U", "Qg", "P", "Kw", "decay"]


def prep_inputs(fused: bool) -> list[str]:
    """PREP_BODY's inputs: precomputed gates g, beta, or (fused) the raw a, b, A_log, dt_bias."""
    gates = ["a", "b", "A_log", "dt_bias"] if fused else ["g", "beta"]
    return ["q", "k", "v", *gates, "mask"]


def prep_body(fused: bool, matrix: bool = False) -> str:
    """PREP_BODY behind its two switches: GD_FUSED 1 computes the gates in the kernel, as the
    fused recurrent kernel does: beta = sigmoid(b), g = exp(-exp(A_log) softplus(a + dt_bias)),
    fp32; GD_MMA 1 computes k k^T and q k^T on the tile layer (template argument MP, as
    STATE_MMA_BODY's)."""
    defs = f"\n#define GD_FUSED {int(fused)}\n#define GD_MMA {int(matrix)}\n"
    return defs + PREP_BODY + "#undef GD_FUSED\n#undef GD_MMA\n"


def prep_name(fused: bool, matrix: bool = False) -> str:
    return "gated_delta_chunk_prep" + ("_fused" if fused else "") + ("_mma" if matrix else "")


# The intra-chunk pieces for scalar gates, one threadgroup per (chunk, batch x value head), in
# four steps (NT = 256 threads, C a multiple of 16):
#  1. the chunk's gates: padded / masked steps get g = 1, beta = 0 and zero q, k, v (selected,
#     never multiplied, so garbage there cannot leak); gamma_i = prod_{l<=i} g_l and
#     w_j = prod_{l>j} g_l as running products, cut to exactly 0 below e^-40 (as chunked.py:
#     no subnormal products, no division, g = 0 gives exact zeros).
#  2. k k^T and q k^T for the chunk, each thread an R x R tile (R = C / 16: rows R ti + r,
#     columns R tj + c), k and q staged transposed in threadgroup memory DS key columns at a
#     time and read R rows per float4; then A_ij = beta_i D_ij k_i.k_j (j < i) into threadgroup
#     memory and P_ij = D_ij q_i.k_j (j <= i) to memory, D_ij = prod_{j<l<=i} g_l as
#     gamma_i / gamma_j while neither prefix was cut, else as a running product (same cut).
#  3. forward substitution (I + A) X = [beta v | beta gamma k], one thread per column of X:
#     U = X[:, :Dv], W = X[:, Dv:] (the unit-lower-triangular solve; no inverse is formed).
#  4. Qg = gamma q, Kw = w k, decay = gamma_{C-1} (broadcast over Dk).
# Threadgroup memory: max(2 DS, C) (C + 4) + 5 C floats: 18.7 KB at C=64, DS=32.
# The D_ij macros' common end (GD_DECAY, GD_DECAY_R), after their ratio branch: else the running
# product of g_l over j < l <= i, flushed to 0 below `tiny` at every step and at the end.
_DECAY_RUN = """    } else {                                \\
      dij = 1.0f;                           \\
      for (int l = (j) + 1; l <= (i); ++l) { \\
        dij *= gs[l];                       \\
        dij = dij < tiny ? 0.0f : dij;      \\
      }                                     \\
    }                                       \\
    dij = dij < tiny ? 0.0f : dij;          \\
  }
"""

# D_ij = prod_{j<l<=i} g_l (0 for j > i) from the arrays gam, gs of the chunk: the ratio of the
# two prefix products while neither was cut, else the running product.
_DECAY_MACRO = (
    """
#define GD_DECAY(dij, i, j)                 \\
  float dij = 0.0f;                         \\
  if ((j) <= (i)) {                         \\
    if (gam[i] > 0.0f && gam[j] > 0.0f) {   \\
      dij = gam[i] / gam[j];                \\
"""
    + _DECAY_RUN
)

# The split kernels' D_ij (_decayed_lower_tiles): as GD_DECAY, the ratio as gam[i] times
# rg[j] = 1 / gam[j] (gj, rj: gam[j], rg[j], read once a thread) instead of a division.
_DECAY_R_MACRO = (
    """
#define GD_DECAY_R(dij, i, j, gj, rj)         \\
  float dij = 0.0f;                         \\
  if ((j) <= (i)) {                         \\
    const float gi_ = gam[i];               \\
    if (gi_ > 0.0f && (gj) > 0.0f) {        \\
      dij = gi_ * (rj);                     \\
"""
    + _DECAY_RUN
)

# The chunk's gates in threadgroup memory, as _CHUNK_GATES fills them.
_CHUNK_GATE_ARRAYS = """  GD_TG float gs[C];
  GD_TG float bs[C];
  GD_TG float ok[C];
  GD_TG float gam[C];
  GD_TG float wts[C];
"""

# Both chunk prep kernels' first stage (PREP_BODY, WY_BODY): step i of the chunk's gates
# (g, beta: precomputed, or with GD_FUSED from a, b, A_log, dt_bias; 1 and 0 on masked steps)
# into gs, bs, ok, then the prefix products gam (thread 0) and the suffix products wts
# (thread 32), flushed to 0 below `tiny`.
_CHUNK_GATES = """  for (int i = tid; i < C; i += NT) {
    const int t = t0 + i;
    const bool valid = t < T && mask[size_t(b_idx) * T + (t < T ? t : 0)];
    const size_t h = (size_t(b_idx) * T + (t < T ? t : 0)) * Hv + hv;
#if GD_FUSED
    // softplus(x) = max(x, 0) + log(1 + exp(-|x|)); g underflows to exactly 0 for large x.
    const float x = static_cast<float>(a[h]) + static_cast<float>(dt_bias[hv]);
    const float sp = (x > 0.0f ? x : 0.0f) + gd_log(1.0f + gd_exp(x > 0.0f ? -x : x));
    const float g_t = gd_exp(-gd_exp(static_cast<float>(A_log[hv])) * sp);
    const float beta_t = 1.0f / (1.0f + gd_exp(-static_cast<float>(b[h])));
    gs[i] = valid ? g_t : 1.0f;
    bs[i] = valid ? beta_t : 0.0f;
#else
    gs[i] = valid ? static_cast<float>(g[h]) : 1.0f;
    bs[i] = valid ? static_cast<float>(beta[h]) : 0.0f;
#endif
    ok[i] = valid ? 1.0f : 0.0f;
  }
  gd_barrier();
  if (tid == 0) {
    float p = 1.0f;
    for (int i = 0; i < C; ++i) {
      p *= gs[i];
      p = p < tiny ? 0.0f : p;
      gam[i] = p;
    }
  } else if (tid == 32) {
    float p = 1.0f;
    for (int i = C - 1; i >= 0; --i) {
      wts[i] = p;
      p *= gs[i];
      p = p < tiny ? 0.0f : p;
    }
  }
"""


def _chunk_head(T: str, Hk: str, Hv: str, Dv: str) -> str:
    """The chunk-parallel kernels' (PREP_BODY, WY_BODY, O_BODY, O2_BODY) common start: the
    sizes (T, Hk, Hv, Dv from the kernel's inputs as given) and the threadgroup's chunk n (x)
    and head (y), its batch row, value head and key head."""
    return f"""  const float tiny = 4.2483542e-18f;  // e^-40
  const int T = {T};
  const int Hk = {Hk};
  const int Hv = {Hv};
  const int Dv = {Dv};
  const int N = (T + C - 1) / C;
  const size_t NC = size_t(N) * C;

  const int tid = int(gd_tid);
  const int n = int(gd_tg_x);
  const unsigned head = gd_tg_y;  // b * Hv + hv
  const unsigned b_idx = head / unsigned(Hv);
  const unsigned hv = head % unsigned(Hv);
  const unsigned hk = hv / unsigned(Hv / Hk);
  const int t0 = n * C;
"""


PREP_BODY = (
    """
  constexpr int R = C / 16;        // tile rows / columns per thread in step 2
  constexpr int CS = C + 4;        // staged k / q: stride of a key column (16-byte aligned)
  constexpr int CP = C + 4;        // A row stride (rows 16-byte aligned: read as float4)
  constexpr int BUF = 2 * DS * CS > C * CP ? 2 * DS * CS : C * CP;
  static_assert(C % 64 == 0 && NT == 256, "PREP_BODY: 16 x 16 threads, C / 16 rows each");
"""
    + _chunk_head("q_shape[1]", "q_shape[2]", "v_shape[2]", "v_shape[3]")
    + """\
  // q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; g, beta, a, b: [B, T, Hv]; A_log, dt_bias: [Hv];
  // mask: [B, T]; W, Qg, Kw: [B * Hv, N * C, Dk]; U: [.., Dv]; P: [.., C]; decay: [B * Hv, N, Dk]
  const size_t rn = size_t(head) * NC + t0;  // this chunk's first row in W, U, Qg, P, Kw

  GD_TG float4 buf4[(BUF + 3) / 4];  // step 2: staged k | q; steps 2-3: A
  GD_TG_PTR float* buf = reinterpret_cast<GD_TG_PTR float*>(buf4);
"""
    + _CHUNK_GATE_ARRAYS
    + """
  // 1. gates
"""
    + _CHUNK_GATES
    + """
"""
    + _DECAY_MACRO
    + """
#if GD_MMA
  // 2. (matrix units) k k^T and q k^T as 16 x 16 tiles: warp w holds tile row w / 2, tile
  // columns 2 (w % 2) and 2 (w % 2) + 1 of both (tiles above the diagonal skipped: A and P are
  // 0 there), k and q staged transposed as below (A(i, d) = k_i[d] = buf[d CS + i]).
  static_assert(C == 64 && NT == 256, "GD_MMA: 8 warps, 2 x 2 tiles of each product");
  const int w = tid / 32;
  const int tr = w / 2;
  gd_acc kk[2];
  gd_acc qk[2];
  for (int c = 0; c < 2; ++c) {
    gd_acc_zero(kk[c]);
    gd_acc_zero(qk[c]);
  }
#else
  // 2. k k^T and q k^T (the barrier at the top of the slice loop also publishes gam / wts).
  // Thread (ti, tj) computes rows 4 ti .. 4 ti + 3 against columns 4 tj .. 4 tj + 3, reading
  // k and q staged transposed ([d][row], rows contiguous) four rows at a time.
  const int ti = tid % 16;
  const int tj = tid / 16;
  float kk[R][R];
  float qk[R][R];
  #pragma unroll
  for (int r = 0; r < R; ++r) {
    #pragma unroll
    for (int c = 0; c < R; ++c) {
      kk[r][c] = 0.0f;
      qk[r][c] = 0.0f;
    }
  }
#endif
  for (int d0 = 0; d0 < Dk; d0 += DS) {
    gd_barrier();
    for (int e = tid; e < C * DS; e += NT) {
      const int i = e / DS;
      const int d = e % DS;
      const int t = t0 + i < T ? t0 + i : T - 1;
      const size_t off = ((size_t(b_idx) * T + t) * Hk + hk) * Dk + d0 + d;
      const bool valid = ok[i] != 0.0f;
      buf[d * CS + i] = valid ? static_cast<float>(k[off]) : 0.0f;
      buf[(DS + d) * CS + i] = valid ? static_cast<float>(q[off]) : 0.0f;
    }
    gd_barrier();
#if GD_MMA
    for (int c = 0; c < 2; ++c) {
      const int tc = 2 * (w % 2) + c;
      if (tc <= tr) {
        gd_mma<MP, true, false>(kk[c], buf + 16 * tr, CS, buf + 16 * tc, CS, DS);
        gd_mma<MP, true, false>(qk[c], buf + DS * CS + 16 * tr, CS, buf + 16 * tc, CS, DS);
      }
    }
#else
    for (int d = 0; d < DS; ++d) {
      float ki[R];
      float qi[R];
      float kj[R];
      #pragma unroll
      for (int r4 = 0; r4 < R / 4; ++r4) {
        const float4 a = buf4[(d * CS + R * ti) / 4 + r4];
        const float4 b = buf4[((DS + d) * CS + R * ti) / 4 + r4];
        const float4 c = buf4[(d * CS + R * tj) / 4 + r4];
        ki[4 * r4] = a.x;
        ki[4 * r4 + 1] = a.y;
        ki[4 * r4 + 2] = a.z;
        ki[4 * r4 + 3] = a.w;
        qi[4 * r4] = b.x;
        qi[4 * r4 + 1] = b.y;
        qi[4 * r4 + 2] = b.z;
        qi[4 * r4 + 3] = b.w;
        kj[4 * r4] = c.x;
        kj[4 * r4 + 1] = c.y;
        kj[4 * r4 + 2] = c.z;
        kj[4 * r4 + 3] = c.w;
      }
      #pragma unroll
      for (int r = 0; r < R; ++r) {
        #pragma unroll
        for (int c = 0; c < R; ++c) {
          kk[r][c] += ki[r] * kj[c];
          qk[r][c] += qi[r] * kj[c];
        }
      }
    }
#endif
  }
#if GD_MMA
  // P = D q k^T, then A = beta D k k^T, each product staged in buf (the slices are done with),
  // D_ij = prod_{j<l<=i} g_l as below; every element written by selection (j > i: 0).
  for (int pass = 0; pass < 2; ++pass) {
    gd_barrier();
    for (int c = 0; c < 2; ++c) {
      const int tc = 2 * (w % 2) + c;
      if (tc <= tr) gd_acc_store(pass == 0 ? qk[c] : kk[c], buf + 16 * tr * CP + 16 * tc, CP);
    }
    gd_barrier();
    for (int e = tid; e < C * C; e += NT) {
      const int i = e / C;
      const int j = e % C;
      GD_DECAY(dij, i, j);
      if (pass == 0) {
        P[(rn + i) * C + j] = j <= i ? dij * buf[i * CP + j] : 0.0f;
      } else {
        buf[i * CP + j] = j < i ? bs[i] * dij * buf[i * CP + j] : 0.0f;
      }
    }
  }
  gd_barrier();
#else
  gd_barrier();  // every thread is done with the staged slices: buf becomes A
  #pragma unroll
  for (int r = 0; r < R; ++r) {
    #pragma unroll
    for (int c = 0; c < R; ++c) {
      const int i = R * ti + r;
      const int j = R * tj + c;
      GD_DECAY(dij, i, j);
      buf[i * CP + j] = j < i ? bs[i] * dij * kk[r][c] : 0.0f;
      P[(rn + i) * C + j] = dij * qk[r][c];
    }
  }
  gd_barrier();

#endif
#undef GD_DECAY

  // 3. (I + A) X = [beta v | beta gamma k], column by column
  for (int col = tid; col < Dv + Dk; col += NT) {
    const bool is_v = col < Dv;
    float x[C];
    #pragma unroll
    for (int i = 0; i < C; ++i) {
      const int t = t0 + i < T ? t0 + i : T - 1;
      const float src = is_v
          ? static_cast<float>(v[((size_t(b_idx) * T + t) * Hv + hv) * Dv + col])
          : static_cast<float>(k[((size_t(b_idx) * T + t) * Hk + hk) * Dk + (col - Dv)]);
      // x_i = r_i - A[i, :i] x[:i]: four entries of A per (broadcast) threadgroup-memory read,
      // summed in four independent chains (the solve is a dependency chain per thread).
      float r0 = 0.0f;
      float r1 = 0.0f;
      float r2 = 0.0f;
      float r3 = 0.0f;
      #pragma unroll
      for (int jq = 0; 4 * jq < i; ++jq) {
        const float4 a = buf4[(i * CP) / 4 + jq];
        r0 += a.x * x[4 * jq];
        if (4 * jq + 1 < i) r1 += a.y * x[4 * jq + 1];
        if (4 * jq + 2 < i) r2 += a.z * x[4 * jq + 2];
        if (4 * jq + 3 < i) r3 += a.w * x[4 * jq + 3];
      }
      const float rhs = ok[i] != 0.0f ? bs[i] * (is_v ? 1.0f : gam[i]) * src : 0.0f;
      x[i] = rhs - ((r0 + r1) + (r2 + r3));
    }
    #pragma unroll
    for (int i = 0; i < C; ++i) {
      if (is_v) {
        U[(rn + i) * Dv + col] = x[i];
      } else {
        W[(rn + i) * Dk + (col - Dv)] = x[i];
      }
    }
  }

  // 4. Qg = gamma q, Kw = w k, decay
  for (int e = tid; e < C * Dk; e += NT) {
    const int i = e / Dk;
    const int d = e % Dk;
    const int t = t0 + i < T ? t0 + i : T - 1;
    const size_t off = ((size_t(b_idx) * T + t) * Hk + hk) * Dk + d;
    const bool valid = ok[i] != 0.0f;
    Qg[(rn + i) * Dk + d] = valid ? gam[i] * static_cast<float>(q[off]) : 0.0f;
    Kw[(rn + i) * Dk + d] = valid ? wts[i] * static_cast<float>(k[off]) : 0.0f;
  }
  for (int d = tid; d < Dk; d += NT) {
    decay[(size_t(head) * N + n) * Dk + d] = gam[C - 1];
  }
"""
)


# The state passes' (STATE_MMA_BODY, H_BODY) threadgroup: one head (x) and BV value rows from
# v0 (y); warp w takes row tile rt and value tile vt.
_STATE_PASS_WARP = """
  const int tid = int(gd_tid);
  const int w = tid / 32;
  const int rt = w % RT;
  const int vt = w / RT;
  const unsigned head = gd_tg_x;  // b * Hv + hv
  const int v0 = int(gd_tg_y) * BV;
"""


def _state_in(x: str, s: str) -> str:
    """The state passes' (STATE_MMA_BODY, H_BODY, H2_BODY) start: the threadgroup's BV value rows
    of state_in into threadgroup floats x (row stride s), rows past Dv as 0."""
    return f"""  for (int e = tid; e < BV * Dk; e += NT) {{
    const int v = e / Dk;
    const int d = e % Dk;
    {x}[v * {s} + d] = v0 + v < Dv ? state_in[(size_t(head) * Dv + (v0 + v)) * Dk + d] : 0.0f;
  }}
"""


def _state_out(x: str, s: str) -> str:
    """The state passes' end: the threadgroup's value rows < Dv of the state, threadgroup floats
    at x (row stride s), to state_out."""
    return f"""  for (int e = tid; e < BV * Dk; e += NT) {{
    const int v = e / Dk;
    const int d = e % Dk;
    if (v0 + v < Dv) state_out[(size_t(head) * Dv + (v0 + v)) * Dk + d] = {x}[v * {s} + d];
  }}
"""


# The state pass on matrix units (the tile layer of chunk_launch: tensor cores on CUDA,
# simdgroup matrices on Metal): the same inputs, outputs and grid as STATE_BODY, BV value rows
# (VT = BV / 16 tiles) per threadgroup, NT = 32 (C / 16) VT threads: one warp (SIMD-group) per
# (16-row tile of the chunk, value tile). Per chunk n, warp w = row tile r = w % (C / 16), value
# tile vt = w / (C / 16):
#   1. Xw = W S^T and Xq = Qg S^T for its tile (K = Dk; S from threadgroup memory) -> D, Y[n % 2]
#   barrier
#   2. every thread: delta = U - Xw in D; S *= decay (per key column)
#   barrier
#   3. y = Xq + P delta for its tile (K = 16 (r + 1): P is 0 above the diagonal) -> Y[n % 2];
#      S[16 vt'.., 16 c ..] += delta[:, 16 vt'..]^T Kw[:, 16 c ..] for the tiles (vt', c)
#      numbered w, w + NW, ...
#   barrier
#   4. every thread: y rows t < T to memory from Y[n % 2] (no barrier after: the next chunk's
#      step 1 writes D and the other Y buffer, and only reads S).
# MP (1: tf32 operands, 3: three tf32 products, about fp32) is the CUDA operand precision; the
# host picks 3 for fp32 activations (the module's fp32 tolerance) and 1 for bf16 / fp16.
# Threadgroup memory: S (BV x (Dk + 4)) + D (C x (BV + 8)) + Y (2 x C x BV) floats; BV = 16:
# 22.5 KB at Dk = 128, 30.7 KB at Dk = 256 (Apple GPUs allow 32 KB); BV = 32 (CUDA, Dk <= 128):
# 43.5 KB (CUDA's static limit is 48 KB). The row strides Dk + 4 and BV + 8 keep the fragment
# reads of S and D free of bank conflicts.
STATE_MMA_NAME = "gated_delta_chunk_state_mma"

STATE_MMA_BODY = (
    """
  constexpr int RT = C / 16;       // row tiles of a chunk
  constexpr int VT = BV / 16;      // value tiles of the threadgroup
  constexpr int NW = NT / 32;      // warps (SIMD-groups)
  constexpr int KT = Dk / 16;      // key tiles of the state
  constexpr int SD = Dk + 4;       // row stride of S in threadgroup memory
  constexpr int DL = BV + 8;       // row stride of D (delta)
  static_assert(BV % 16 == 0 && C % 16 == 0 && Dk % 16 == 0, "layout: whole tiles");
  static_assert(NW == RT * VT, "layout: one warp per (row tile, value tile)");
  const int Hv = U_shape[1];
  const int NC = U_shape[2];
  const int Dv = U_shape[3];
  const int N = NC / C;
  const int T = dims[0];
"""
    + _STATE_PASS_WARP
    + """  const unsigned b_idx = head / unsigned(Hv);
  const unsigned hv = head % unsigned(Hv);

  GD_TG float S_t[BV * SD];     // the state tile, row v at S_t[v * SD]
  GD_TG float D_t[C * DL];      // Xw, then delta: row i at D_t[i * DL]
  GD_TG float Y_t[2 * C * BV];  // Xq, then y, by chunk parity: row i at Y_t[p C BV + i BV]

  // W, Qg, Kw: [B * Hv, N * C, Dk]; U: [B, Hv, N * C, Dv]; P: [B * Hv, N * C, C];
  // decay: [B * Hv, N, Dk]; state_in, state_out: [B, Hv, Dv, Dk]; y: [B, T, Hv, Dv]
"""
    + _state_in("S_t", "SD")
    + """  gd_barrier();

  const size_t row0 = size_t(head) * NC;  // first row of this head in W, U, Qg, P, Kw
  for (int n = 0; n < N; ++n) {
    const size_t rn = row0 + size_t(n) * C;
    GD_TG_PTR float* Yn = Y_t + (n % 2) * C * BV;
    if (PF && n + 1 < N) {
      // Ask L2 for the next chunk's rows (128-byte lines) while this one is computed.
      const size_t rx = rn + C;
      for (int c = tid; c < C * Dk / 32; c += NT) {
        gd_prefetch(W + rx * Dk + 32 * c);
        gd_prefetch(Qg + rx * Dk + 32 * c);
        gd_prefetch(Kw + rx * Dk + 32 * c);
      }
      for (int c = tid; c < C * C / 32; c += NT) gd_prefetch(P + rx * C + 32 * c);
      if (tid < C) gd_prefetch(U + (rx + tid) * Dv + v0);
    }
    // 1. Xw = W S^T, Xq = Qg S^T (B(d, v) = S_t[v * SD + d]: transposed)
    {
      gd_acc xw;
      gd_acc xq;
      gd_acc_zero(xw);
      gd_acc_zero(xq);
      gd_mma<MP, false, true>(xw, W + (rn + 16 * rt) * Dk, Dk, S_t + 16 * vt * SD, SD, Dk);
      gd_mma<MP, false, true>(xq, Qg + (rn + 16 * rt) * Dk, Dk, S_t + 16 * vt * SD, SD, Dk);
      gd_acc_store(xw, D_t + 16 * rt * DL + 16 * vt, DL);
      gd_acc_store(xq, Yn + 16 * rt * BV + 16 * vt, BV);
    }
    gd_barrier();
    // 2. delta = U - Xw (rows past Dv: S is 0 there, so Xw = 0 and delta = 0); S *= decay
    for (int e = tid; e < C * BV; e += NT) {
      const int i = e / BV;
      const int v = e % BV;
      const float u = v0 + v < Dv ? U[(rn + i) * Dv + v0 + v] : 0.0f;
      D_t[i * DL + v] = u - D_t[i * DL + v];
    }
    for (int e = tid; e < BV * Dk; e += NT) {
      const int d = e % Dk;
      S_t[(e / Dk) * SD + d] *= decay[(size_t(head) * N + n) * Dk + d];
    }
    gd_barrier();
    // 3. y = Xq + P delta (rows 16 rt..: P is 0 past column 16 rt + 15); S += delta^T Kw
    {
      gd_acc ya;
      gd_acc_load(ya, Yn + 16 * rt * BV + 16 * vt, BV);
      gd_mma<MP, false, false>(ya, P + (rn + 16 * rt) * C, C, D_t + 16 * vt, DL, 16 * (rt + 1));
      gd_acc_store(ya, Yn + 16 * rt * BV + 16 * vt, BV);
    }
    for (int e = w; e < VT * KT; e += NW) {
      const int sv = e / KT;
      const int c = e % KT;
      gd_acc sa;
      gd_acc_load(sa, S_t + 16 * sv * SD + 16 * c, SD);
      gd_mma<MP, true, false>(sa, D_t + 16 * sv, DL, Kw + rn * Dk + 16 * c, Dk, C);
      gd_acc_store(sa, S_t + 16 * sv * SD + 16 * c, SD);
    }
    gd_barrier();
    // 4. y to memory, rows t < T, value rows v < Dv
    for (int e = tid; e < C * BV; e += NT) {
      const int i = e / BV;
      const int v = e % BV;
      const int t = n * C + i;
      if (t < T && v0 + v < Dv) {
        y[((size_t(b_idx) * T + t) * Hv + hv) * Dv + v0 + v] = static_cast<YT>(Yn[e]);
      }
    }
  }

"""
    + _state_out("S_t", "SD")
)


# ---------------------------------------------------------------------------------------------
# The split chunk path (issue 9, session 6): three kernels, the decomposition of the fast
# chunked implementations (flash-linear-attention's chunk_gated_delta_rule: a WY kernel, a state
# pass, an output pass), every product on the tile layer, the pieces in the activations' dtype
# PT (bf16 for bf16 activations: half the bytes of fp32) and every matrix operand staged through
# threadgroup memory with coalesced loads (the tile layer never reads device memory, so its
# Metal form is simdgroup_load from threadgroup floats, and no warp waits on a scattered load).
#
#   WY     per (chunk, head): gates; A = -beta D k k^T (strictly lower); X = (I - A)^-1 ... see
#          WY_BODY; W = X diag(beta gamma) k, U = X diag(beta) v, Kw = w k, gates row
#          (gamma, g, valid, w) fp32.
#   state  per (head, BV value rows), sequential over the chunks, state on chip: H[n] = S
#          (the state at chunk n's start, PT), delta = U - W S^T (to memory as Vn, PT),
#          S = decay S + delta^T Kw.
#   out    per (chunk, head, BVO value rows): y = diag(gamma) q H[n]^T + (D o q k^T) Vn.
# Work and bytes per pass: benchmarks/NOTES.md "Split chunk kernels".

WY_OUTPUTS = ["W", "U", "Kw", "gates"]


def wy_inputs(fused: bool) -> list[str]:
    gates = ["a", "b", "A_log", "dt_bias"] if fused else ["g", "beta"]
    return ["k", "v", *gates, "mask"]


def wy_name(fused: bool, ring: bool = False) -> str:
    return "gated_delta_chunk_wy" + ("2" if ring else "") + ("_fused" if fused else "")


def wy_body(
    fused: bool, ring: bool = False, v16: bool = False, vx: bool = False, p: bool = False
) -> str:
    """WY_BODY (ring: WY2_BODY; v16: wy2_v16_body(); vx: wy2_vx_body(); p: wy2p_body());
    GD_FUSED 1 computes the gates from a, b, A_log, dt_bias as PREP_BODY does."""
    defs = f"\n#define GD_FUSED {int(fused)}\n"
    body = wy2_vx_body() if vx else wy2_v16_body() if v16 else WY2_BODY if ring else WY_BODY
    body = wy2p_body() if p else body
    return defs + _DECAY_R_MACRO + body + "#undef GD_DECAY_R\n#undef GD_FUSED\n"


def _lower_tiles_mma(acc: str, a: str, b: str, s: str) -> str:
    """acc += a b^T over one staged slice of DS columns (rows at `a` and `b`, row stride
    `s`), on the lower-triangular 16 x 16 tiles of a C = 64 chunk: warp w takes tile row
    tr = w / 2, tile columns 2 (w % 2) + {0, 1}, tiles above the diagonal skipped."""
    return f"""    for (int c = 0; c < 2; ++c) {{
      const int tc = 2 * (w % 2) + c;
      if (tc <= tr) {{
        gd_mma_staged<MP, false, true>({acc}[c], {a} + 16 * tr * {s}, {s}, {b} + 16 * tc * {s}, {s},
                                       DS);
      }}
    }}
"""


def _decayed_lower_tiles(
    acc: str, dst: str, s: str, keep: str, scale: str, staged="", out=None, so=None, ot="float"
) -> str:
    """`_lower_tiles_mma`'s tiles acc[0..1] to threadgroup memory at dst (row stride s); then
    (after the text `staged` and a barrier) each element (i, j) of the chunk times `scale` where
    `keep` holds, else 0, to `out` (row stride so, type ot; default: dst in place): scale and
    keep may use D_ij (dij, GD_DECAY_R). A thread keeps one column j (NT a multiple of C)."""
    out, so = out or dst, so or s
    return f"""  for (int c = 0; c < 2; ++c) {{
    const int tc = 2 * (w % 2) + c;
    if (tc <= tr) gd_acc_store({acc}[c], {dst} + 16 * tr * {s} + 16 * tc, {s});
  }}
{staged}  gd_barrier();
  {{
    const int j = tid % C;
    const float gj = gam[j];
    const float rj = rg[j];
    for (int i = tid / C; i < C; i += NT / C) {{
      GD_DECAY_R(dij, i, j, gj, rj);
      {out}[i * {so} + j] = static_cast<{ot}>({keep} ? {scale} * {dst}[i * {s} + j] : 0.0f);
    }}
  }}
"""


def _rows_to_registers(x: str, src: str, bv: str) -> str:
    """A thread's share of the chunk's C rows of src [.., Dv] (rows from rn), value columns
    v0 .. v0 + bv (clamped to Dv - 1, selected away later), into registers x."""
    return f"""    float {x}[C * {bv} / NT];
    #pragma unroll
    for (int it = 0; it < C * {bv} / NT; ++it) {{
      const int e = tid + it * NT;
      const int v = v0 + e % {bv} < Dv ? v0 + e % {bv} : Dv - 1;
      {x}[it] = static_cast<float>({src}[(rn + e / {bv}) * Dv + v]);
    }}
"""


# Both WY kernels' (WY_BODY, WY2_BODY) start: sizes, chunk, head and warp (_chunk_head), the
# chunk's first row rn.
_WY_PROLOGUE = _chunk_head("k_shape[1]", "k_shape[2]", "v_shape[2]", "v_shape[3]") + (
    """  const int w = tid / 32;
  // k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; g, beta, a, b: [B, T, Hv]; A_log, dt_bias: [Hv];
  // mask: [B, T]; W, Kw: [B * Hv, N * C, Dk]; U: [.., Dv]; gates: [B * Hv, N * C, 4] fp32
  const size_t rn = size_t(head) * NC + t0;  // this chunk's first row
"""
)

# Both WY kernels' gate arrays: _CHUNK_GATE_ARRAYS and rg.
_WY_GATE_ARRAYS = (
    _CHUNK_GATE_ARRAYS
    + """  GD_TG float rg[C];  // 1 / gam (0 where gam is)
"""
)

# Both WY kernels: the gates row (gamma, g, valid, w) to `gates` for the other passes, and rg.
_WY_GATES_OUT = """  gd_barrier();
  for (int i = tid; i < C; i += NT) {
    gates[(rn + i) * 4] = gam[i];
    gates[(rn + i) * 4 + 1] = gs[i];
    gates[(rn + i) * 4 + 2] = ok[i];
    gates[(rn + i) * 4 + 3] = wts[i];
    rg[i] = gam[i] > 0.0f ? 1.0f / gam[i] : 0.0f;
  }
"""


def _wy_inverse(xs: str) -> str:
    """Both WY kernels' step 4: Ai := (I - L)^-1 in place (fp32), the block products' scratch
    tiles at xs (threadgroup floats, 256 a warp, warps 0..RT - 2)."""
    return f"""  // 4. (I - L)^-1: diagonal blocks (thread = (block, column c): x_c = 1,
  // x_i = sum_j L_ij x_j)
  {{
    float x[16];
    const int o = 16 * (tid / 16);
    const int c = tid % 16;
    if (tid < C) {{
      #pragma unroll
      for (int i = 0; i < 16; ++i) {{
        float s = 0.0f;
        #pragma unroll
        for (int j = 0; j < i; ++j) s += Ai[(o + i) * CP + o + j] * x[j];
        x[i] = i < c ? 0.0f : (i == c ? 1.0f : s);
      }}
    }}
    gd_barrier();
    if (tid < C) {{
      #pragma unroll
      for (int i = 0; i < 16; ++i) Ai[(o + i) * CP + o + c] = x[i];
    }}
  }}
  // block columns jb = RT - 2 .. 0; warp w computes block (jb + 1 + w, jb)
  for (int jb = RT - 2; jb >= 0; --jb) {{
    const int ib = jb + 1 + w;
    gd_acc xt;
    gd_barrier();
    if (ib < RT) {{
      gd_acc_zero(xt);
      gd_mma<MP, false, false>(xt, Ai + 16 * ib * CP + 16 * (jb + 1), CP,
                               Ai + 16 * (jb + 1) * CP + 16 * jb, CP, 16 * (ib - jb));
      gd_acc_store(xt, {xs} + 256 * w, 16);
    }}
    gd_barrier();
    if (ib < RT) {{
      gd_acc_zero(xt);
      gd_mma<MP, false, false>(xt, {xs} + 256 * w, 16, Ai + 16 * jb * CP + 16 * jb, CP, 16);
    }}
    gd_barrier();
    if (ib < RT) gd_acc_store(xt, Ai + 16 * ib * CP + 16 * jb, CP);
  }}
"""


# WY_BODY: one threadgroup of NT = 256 (8 warps) per (chunk n, batch x value head), C = 64.
#  1. gates as PREP_BODY (padded / masked steps: g = 1, beta = 0, k = v = 0 by selection);
#     the row (gamma_i, g_i, valid_i, w_i) to `gates` for the other two kernels.
#  2. k k^T on the tile layer over key slices of DS columns staged row-major (warp w: tile row
#     w / 2, tile columns 2 (w % 2) + {0, 1}, tiles above the diagonal skipped); Kw = w k is
#     written from the same staged slices.
#  3. L = -beta_i D_ij k_i.k_j (j < i, else 0) in Ai, so that I + A = I - L.
#  4. Ai := (I - L)^-1, blocked on 16 x 16 blocks: the diagonal blocks by forward substitution
#     (one thread per column, 64 threads), then block columns right to left,
#     X_ij = (sum_{j<k<=i} X_ik L_kj) X_jj, one warp per block of the column (two products on
#     the tile layer; results stored after a barrier, since the column's L blocks are read by
#     the other blocks of that column).
#  5. U = X diag(beta) v and W = X diag(beta gamma) k, in column slices of DS: the scaled rows
#     staged (selected), one 16 x 16 output tile per warp (K = 16 (row tile + 1): X is lower
#     triangular), staged back and written in PT.
# Threadgroup memory: C (C + 4) + C (DS + 4) + 5 C floats: 27.9 KB at C = 64, DS = 32.
WY_BODY = (
    """
  constexpr int RT = C / 16;       // row tiles (and 16 x 16 blocks) of a chunk
  constexpr int CP = C + 4;        // row stride of Ai
  constexpr int SP = DS + 4;       // row stride of a staged slice
  static_assert(C == 64 && NT == 256, "WY_BODY: 8 warps, 4 x 4 blocks");
  static_assert(DS == 32 && Dk % DS == 0, "WY_BODY: one 16 x 16 output tile per warp a slice");
"""
    + _WY_PROLOGUE
    + """
  GD_TG float Ai[C * CP];  // L, then (I - L)^-1
  GD_TG float st[C * SP];  // a staged slice; a product tile; the inverse's scratch tiles
"""
    + _WY_GATE_ARRAYS
    + """
  // 0. The chunk's k and v rows towards L2 (a 128-byte line a thread), so that the staging
  // loads below, each exposed for part of its latency, find them there.
  {
    const int KE = 128 / int(sizeof(k[0]));  // elements of a line
    const int VE = 128 / int(sizeof(v[0]));
    const int KL = (Dk + KE - 1) / KE;       // lines of a row
    const int VL = (Dv + VE - 1) / VE;
    for (int c = tid; c < C * (KL + VL); c += NT) {
      const int i = c / (KL + VL);
      const int l = c % (KL + VL);
      const int t = t0 + i < T ? t0 + i : T - 1;
      if (l < KL) {
        gd_prefetch(k + ((size_t(b_idx) * T + t) * Hk + hk) * Dk + l * KE);
      } else {
        gd_prefetch(v + ((size_t(b_idx) * T + t) * Hv + hv) * Dv + (l - KL) * VE);
      }
    }
  }

  // 1. gates
"""
    + _CHUNK_GATES
    + _WY_GATES_OUT
    + """
  // 2. k k^T; Kw = w k
  const int tr = w / 2;
  gd_acc kk[2];
  gd_acc_zero(kk[0]);
  gd_acc_zero(kk[1]);
  // Staging: every load of a slice first (unconditional, clamped rows), then the stores: a
  // load after a store to Kw / W / U (which may alias k, v for all the compiler knows) or
  // behind a branch would wait for the previous one, a memory round trip per element.
  // Each slice is loaded one ahead (before the previous slice's products).
  constexpr int PR = C * DS / NT;  // elements of a slice a thread stages
  float xs[PR];
#define GD_WY_LOAD_K(d0_)                                                                   \
  _Pragma("unroll") for (int it = 0; it < PR; ++it) {                                       \
    const int e = tid + it * NT;                                                            \
    const int t = t0 + e / DS < T ? t0 + e / DS : T - 1;                                    \
    xs[it] = static_cast<float>(k[((size_t(b_idx) * T + t) * Hk + hk) * Dk + (d0_) + e % DS]); \
  }
  GD_WY_LOAD_K(0);
  for (int d0 = 0; d0 < Dk; d0 += DS) {
    gd_barrier();
    #pragma unroll
    for (int it = 0; it < PR; ++it) {
      const int e = tid + it * NT;
      const int i = e / DS;
      const int d = e % DS;
      const bool valid = ok[i] != 0.0f;
      st[i * SP + d] = valid ? xs[it] : 0.0f;
      Kw[(rn + i) * Dk + d0 + d] = static_cast<PT>(valid ? wts[i] * xs[it] : 0.0f);
    }
    if (d0 + DS < Dk) GD_WY_LOAD_K(d0 + DS);
    gd_barrier();
"""
    + _lower_tiles_mma("kk", "st", "st", "SP")
    + """  }

  // Slice s_ of v (s_ < nvs) or k into xs, rows and columns clamped (selected below); each
  // slice is loaded one ahead, before the previous slice's products and stores.
#define GD_WY_LOAD(s_)                                                                   \
  {                                                                                      \
    if ((s_) < nvs) {                                                                    \
      _Pragma("unroll") for (int it = 0; it < PR; ++it) {                                \
        const int e = tid + it * NT;                                                     \
        const int t = t0 + e / DS < T ? t0 + e / DS : T - 1;                             \
        const int col = (s_) * DS + e % DS < Dv ? (s_) * DS + e % DS : Dv - 1;           \
        xs[it] = static_cast<float>(v[((size_t(b_idx) * T + t) * Hv + hv) * Dv + col]);  \
      }                                                                                  \
    } else {                                                                             \
      _Pragma("unroll") for (int it = 0; it < PR; ++it) {                                \
        const int e = tid + it * NT;                                                     \
        const int t = t0 + e / DS < T ? t0 + e / DS : T - 1;                             \
        const int col = ((s_) - nvs) * DS + e % DS;                                      \
        xs[it] = static_cast<float>(k[((size_t(b_idx) * T + t) * Hk + hk) * Dk + col]);  \
      }                                                                                  \
    }                                                                                    \
  }
  const int nvs = (Dv + DS - 1) / DS;
  GD_WY_LOAD(0);  // step 5's first slice, in flight during steps 3 and 4

  // 3. L = -beta D k k^T, strictly lower
"""
    + _decayed_lower_tiles("kk", "Ai", "CP", "j < i", "-bs[i] * dij")
    + """  gd_barrier();

"""
    + _wy_inverse("st")
    + """
  // 5. U = X diag(beta) v, W = X diag(beta gamma) k, slices of DS columns (v's first)
  const int ort = w / (DS / 16);
  const int oct = w % (DS / 16);
  for (int s = 0; s < nvs + Dk / DS; ++s) {
    const bool is_v = s < nvs;
    const int c0 = (is_v ? s : s - nvs) * DS;
    gd_barrier();
    #pragma unroll
    for (int it = 0; it < PR; ++it) {
      const int e = tid + it * NT;
      const int i = e / DS;
      const int col = c0 + e % DS;
      const bool take = ok[i] != 0.0f && (!is_v || col < Dv);
      st[i * SP + e % DS] = take ? (is_v ? bs[i] : bs[i] * gam[i]) * xs[it] : 0.0f;
    }
    if (s + 1 < nvs + Dk / DS) GD_WY_LOAD(s + 1);
    gd_barrier();
    gd_acc o;
    gd_acc_zero(o);
    gd_mma<MP, false, false>(o, Ai + 16 * ort * CP, CP, st + 16 * oct, SP, 16 * (ort + 1));
    gd_barrier();
    gd_acc_store(o, st + 16 * ort * SP + 16 * oct, SP);
    gd_barrier();
    for (int e = tid; e < C * DS; e += NT) {
      const int i = e / DS;
      const int col = c0 + e % DS;
      if (is_v) {
        if (col < Dv) U[(rn + i) * Dv + col] = static_cast<PT>(st[i * SP + e % DS]);
      } else {
        W[(rn + i) * Dk + col] = static_cast<PT>(st[i * SP + e % DS]);
      }
    }
  }
#undef GD_WY_LOAD
#undef GD_WY_LOAD_K
"""
)


def _wy2_slice(x: str) -> str:
    """WY2_BODY's step over ring slice q: its copy waited for, a barrier, the copy of slice
    q + NB - 1 started (into the buffer slice q - 1 used), x its buffer; then opens the loop over
    the slice's elements (row i, column d), which the body closes."""
    return f"""    gd_copy_wait<NB - 2>();
    gd_barrier();
    GD_WY2_COPY(q + NB - 1);
    GD_TG_PTR PS* {x} = ring + (q % NB) * (C * SQ);
    for (int e = tid; e < C * DS; e += NT) {{
      const int i = e / DS;
      const int d = e % DS;
"""


# WY2_BODY's pieces that WY2_VX (wy2_vx_body) swaps: Kw = w k from a staged k slice an
# element a thread; the U / W slice scaled in place an element a thread; L.
_WY2_KW = """      const float x = static_cast<float>(ks[i * SQ + d]);
      Kw[(rn + i) * Dk + q * DS + d] = static_cast<PT>(ok[i] != 0.0f ? wts[i] * x : 0.0f);
    }
"""
_WY2_SCALE = """      const bool take = ok[i] != 0.0f && (!is_v || c0 + d < Dv);
      const float sc = is_v ? bs[i] : bs[i] * gam[i];
      bsl[i * SQ + d] = static_cast<PS>(take ? sc * static_cast<float>(bsl[i * SQ + d]) : 0.0f);
    }
"""
# WY2_BODY's L: k k^T's tiles to Ai, a barrier, then -beta D o k k^T by columns in place.
_WY2_L_KEEP = "j < i && ok[i] != 0.0f && ok[j] != 0.0f"
_WY2_L = _decayed_lower_tiles("kk", "Ai", "CP", _WY2_L_KEEP, "-bs[i] * dij")


# WY2_BODY: WY_BODY with its k and v slices copied (gd_copy_tile: cp.async on CUDA, the bytes
# as they are) into a ring of NB staged slices that runs through the whole kernel: the Dk / DS
# k slices of k k^T, then the v slices of U, then the k slices of W, each copy started NB - 1
# slices ahead (so the first U slices land during the inverse). Same threadgroups, outputs and
# steps as WY_BODY; what changes:
#  - no element is loaded, converted and stored by a thread before a product: k k^T reads the
#    raw slices (tile layer; on CUDA bf16 / fp16 pieces go to mma.m16n8k16), the selection moves
#    to L (j < i, valid_i, valid_j) and Kw = w k is written from the staged slice;
#  - U and W: each staged slice is scaled in place (beta_i v_i, beta_i gamma_i k_i; rows of
#    masked steps and columns past Dv selected to 0, so garbage there cannot leak), X = (I -
#    L)^-1 is held in the staged type PS (16-bit pieces: X rounded to it, as flash-linear-
#    attention's solve_tril output; floats: Ai itself), output tiles w + 8 u a warp (OT of them
#    a slice), staged (16-bit: in Ai's space, free once X is copied out; floats: in the slice it
#    came from, after a barrier) and written in PT: 3 barriers a slice (floats 4).
# Needs Dv a multiple of 8 (16-byte copies of v's rows; chunk_launch takes WY_BODY otherwise).
# Threadgroup memory: C (C + 4) floats (Ai) + NB C (DS + 16 / size) PS (ring) + X (C (C + 16 /
# size) PS, 16-bit only; else the inverse's 768-float scratch) + 6 C floats: CUDA bf16 (DS 32,
# NB 3) 43520 B, fp32 (32, 2) 40448 B; Metal (float staged, DS 16, NB 2) 32256 B.
# W and U from the staged slice to memory, an element a thread (WY2_V16 swaps in its 16-byte form).
_WY2_STORES = """    for (int e = tid; e < C * DS; e += NT) {
      const int i = e / DS;
      const int col = c0 + e % DS;
      const PT x = static_cast<PT>(ot[i * SQ + e % DS]);
      if (!is_v) {
        W[(rn + i) * Dk + col] = x;
      } else if (col < Dv) {
        U[(rn + i) * Dv + col] = x;
      }
    }
"""


WY2_BODY = (
    """
  constexpr int RT = C / 16;       // row tiles (and 16 x 16 blocks) of a chunk
  constexpr int NW = NT / 32;
  constexpr int CP = C + 4;        // row stride of Ai
  using PS = gd_staged<PT>;        // the staged slices, and X for the output products
  constexpr int PSZ = int(sizeof(PS));
  constexpr int SQ = DS + 16 / PSZ;           // row stride of a staged slice
  constexpr int XL = PSZ == 4 ? CP : C + 8;   // row stride of X (Ai itself for floats)
  constexpr int NSK = Dk / DS;                // k slices
  constexpr int OT = RT * (DS / 16);          // output tiles a slice
  constexpr int OTW = (OT + NW - 1) / NW;     // of them a warp (tile w + NW u)
  static_assert(C == 64 && NT == 256, "WY2_BODY: 8 warps, 4 x 4 blocks");
  static_assert(DS % 16 == 0 && Dk % DS == 0 && NB >= 2, "WY2_BODY tiles");
  static_assert(PSZ == 4 || SQ * PSZ <= CP * 4, "WY2_BODY: output tiles staged in Ai's space");
"""
    + _WY_PROLOGUE
    + """  const int nvs = (Dv + DS - 1) / DS;        // v slices
  const int NQ = 2 * NSK + nvs;              // slices through the ring

  GD_TG float Ai[C * CP];  // L, then (I - L)^-1
  GD_TG16 PS ring[NB * C * SQ];
  GD_TG16 PS aux[PSZ == 4 ? 768 : C * XL];  // the inverse's scratch (floats); then X in PS
"""
    + _WY_GATE_ARRAYS
    + """  const size_t krow = ((size_t(b_idx) * T + t0) * Hk + hk) * Dk;
  const size_t vrow = ((size_t(b_idx) * T + t0) * Hv + hv) * Dv;
  // Slice q_ into its ring buffer: rows past T read row T - 1, v's columns past Dv some column
  // of the row (both selected away).
#define GD_WY2_COPY(q_)                                                                      \\
  {                                                                                          \\
    if ((q_) < NQ) {                                                                         \\
      GD_TG_PTR PS* st_ = ring + ((q_) % NB) * (C * SQ);                                      \\
      if ((q_) >= NSK && (q_) < NSK + nvs) {                                                 \\
        const int c0_ = ((q_) - NSK) * DS;                                                   \\
        gd_copy_tile<NT, C, DS>(st_, SQ, v + vrow + c0_, size_t(Hv) * Dv, T - 1 - t0, tid,   \\
                                Dv - c0_);                                                   \\
      } else {                                                                               \\
        const int d0_ = ((q_) < NSK ? (q_) : (q_) - NSK - nvs) * DS;                         \\
        gd_copy_tile<NT, C, DS>(st_, SQ, k + krow + d0_, size_t(Hk) * Dk, T - 1 - t0, tid,   \\
                                DS);                                                         \\
      }                                                                                      \\
    }                                                                                        \\
    gd_copy_commit();                                                                        \\
  }
  for (int q = 0; q < NB - 1; ++q) GD_WY2_COPY(q);

  // 1. gates
"""
    + _CHUNK_GATES
    + _WY_GATES_OUT
    + """
  // 2. k k^T over the raw k slices; Kw = w k from them. Before slice q: its copy waited for,
  // a barrier, then the copy of slice q + NB - 1 into the buffer slice q - 1 used.
  const int tr = w / 2;
  gd_acc kk[2];
  gd_acc_zero(kk[0]);
  gd_acc_zero(kk[1]);
  for (int q = 0; q < NSK; ++q) {
"""
    + _wy2_slice("ks")
    + _WY2_KW
    + _lower_tiles_mma("kk", "ks", "ks", "SQ")
    + """  }

  // 3. L = -beta D k k^T, strictly lower, rows and columns of masked steps 0
"""
    + _WY2_L
    + """  gd_barrier();

"""
    + _wy_inverse("((GD_TG_PTR float*)aux)")
    + """
  // X in the staged type (16-bit: rounded copy in aux; floats: Ai). The output tiles are staged
  // in Ai's space once X is copied out of it (16-bit), else in the slice they were made from.
  GD_TG_PTR PS* X = PSZ == 4 ? (GD_TG_PTR PS*)Ai : aux;
  if (PSZ != 4) {
    gd_barrier();  // the inverse's last blocks stored, its scratch free
    for (int e = tid; e < C * C; e += NT) {
      X[(e / C) * XL + e % C] = static_cast<PS>(Ai[(e / C) * CP + e % C]);
    }
  }

  // 5. U = X diag(beta) v, W = X diag(beta gamma) k over the v slices, then the k slices
  for (int q = NSK; q < NQ; ++q) {
    const bool is_v = q < NSK + nvs;
    const int c0 = (is_v ? q - NSK : q - NSK - nvs) * DS;
"""
    + _wy2_slice("bsl")
    + _WY2_SCALE
    + """    gd_barrier();
    gd_acc o[OTW];
    #pragma unroll
    for (int u = 0; u < OTW; ++u) {
      const int e = w + NW * u;  // output tile: rows 16 (e / (DS / 16)), columns 16 (e % ..)
      if (OT % NW == 0 || e < OT) {
        gd_acc_zero(o[u]);
        gd_mma_staged<MP, false, false>(o[u], X + 16 * (e / (DS / 16)) * XL, XL,
                                        bsl + 16 * (e % (DS / 16)), SQ, 16 * (e / (DS / 16) + 1));
      }
    }
    GD_TG_PTR PS* ot = PSZ == 4 ? bsl : (GD_TG_PTR PS*)Ai;
    if (PSZ == 4) gd_barrier();  // every warp done with the slice
    #pragma unroll
    for (int u = 0; u < OTW; ++u) {
      const int e = w + NW * u;
      if (OT % NW == 0 || e < OT) {
        gd_acc_store(o[u], ot + 16 * (e / (DS / 16)) * SQ + 16 * (e % (DS / 16)), SQ);
      }
    }
    gd_barrier();
"""
    + _WY2_STORES
    + """  }
#undef GD_WY2_COPY
"""
)

H_INPUTS = ["W", "U", "Kw", "gates", "state_in"]
H_OUTPUTS = ["H", "Vn", "state_out"]
H_NAME = "gated_delta_chunk_h"


# The split state passes' (H_BODY, H2_BODY) sizes and threadgroup (_STATE_PASS_WARP).
_H_PROLOGUE = (
    """  const int NC = U_shape[1];
  const int Dv = U_shape[2];
  const int N = NC / C;
"""
    + _STATE_PASS_WARP
)


def _h_state_in(x: str, s: str) -> str:
    """The split state passes' (H_BODY, H2_BODY) operand layout, and _state_in(x, s)."""
    layout = """\
  // W, Kw: [B * Hv, N * C, Dk]; U, Vn: [B * Hv, N * C, Dv]; gates: [B * Hv, N * C, 4];
  // H: [B * Hv, N, Dv, Dk]; state_in, state_out: [B, Hv, Dv, Dk] fp32
"""
    return layout + _state_in(x, s)


def _h_ring(one_line: bool = False) -> str:
    """The split state passes' (H_BODY, H2_BODY) ring of staged slices: GD_H_COPY(q) starts the
    copy of slice q of the pass (q < NQ: the W, then the Kw key slice q % NSL of chunk q / NSL)
    into buffer q % NB, the first NB - 1 copies started; then opens the loop over the chunks n
    (rows from rn), which the body closes. one_line: GD_H_COPY on one line, as H_BODY's text
    has always had it (its source used Python line continuations)."""
    text = """  const size_t row0 = size_t(head) * NC;
  constexpr int LINE = 128 / int(sizeof(PT));  // elements of a 128-byte line
  const int NQ = N * NSL;
#define GD_H_COPY(q_)                                                                  \\
  {                                                                                    \\
    const int qq_ = (q_);                                                              \\
    if (qq_ < NQ) {                                                                    \\
      const int sq_ = qq_ % NSL;                                                       \\
      const size_t off_ = (row0 + size_t(qq_ / NSL) * C) * Dk + (sq_ % KSL) * DS;      \\
      gd_copy_tile<NT, C, DS>(sb + (qq_ % NB) * C * SP, SP, (sq_ < KSL ? W : Kw) + off_, \\
                              size_t(Dk), C, tid);                                     \\
    }                                                                                  \\
    gd_copy_commit();                                                                  \\
  }
  for (int q = 0; q < NB - 1; ++q) GD_H_COPY(q);
  for (int n = 0; n < N; ++n) {
    const size_t rn = row0 + size_t(n) * C;
"""
    return text.replace("\\\n", "") if one_line else text


def _h_slice(note: str) -> str:
    """The split state passes' step over slice s of chunk n (slice q of the pass): opens the loop
    over the slices, which the body closes; Xw to D_t at s = KSL, slice q's copy waited for, a
    barrier (note: what else it completes), the copy of slice q + NB - 1 started."""
    return f"""    for (int s = 0; s < NSL; ++s) {{
      const int q = n * NSL + s;
      if (s == KSL) gd_acc_store(xw, D_t + 16 * rt * DL + 16 * vt, DL);
      gd_copy_wait<NB - 2>();
      gd_barrier();  // slice q staged; slice q - 1's buffer free; {note}
      GD_H_COPY(q + NB - 1);
"""


# The split state passes' prefetch (PF) at chunk n's first slice: chunk n + 2's W, Kw and U rows
# towards L2.
_H_PREFETCH = """        const size_t rx = rn + 2 * C;
        for (int c = tid; c < C * Dk / LINE; c += NT) {
          gd_prefetch(W + rx * Dk + LINE * c);
          gd_prefetch(Kw + rx * Dk + LINE * c);
        }
        for (int i = tid; i < C; i += NT) gd_prefetch(U + (rx + i) * Dv + v0);
"""


def _h_store_and_delta(x: str, s: str, store: str) -> str:
    """The split state passes' H[n] = S (PT) from threadgroup memory x (row stride s), value rows
    < Dv, one branch for the whole tile, in slice 0's branch (which it closes, and that of the
    slices s < KSL); then opens slice KSL's branch, which the body closes: delta = U - Xw (Xw in
    D_t, U's rows in xu), stored by `store` (of dl at row i, value v) and to Vn; value rows past
    Dv get delta 0 and no Vn."""
    return f"""          const size_t hb = (size_t(head) * N + n) * Dv + v0;
          if (v0 + BV <= Dv) {{
{_h_whole_tile_stores(x, s)}          }} else {{
            for (int e = tid; e < BV * Dk; e += NT) {{
              if (v0 + e / Dk < Dv) {{
                H[(hb + e / Dk) * Dk + e % Dk] = static_cast<PT>({x}[(e / Dk) * {s} + e % Dk]);
              }}
            }}
          }}
        }}
        continue;
      }}
{_h_delta(store)}"""


def _h_whole_tile_stores(x: str, s: str) -> str:
    """H[n] of a whole value tile from threadgroup memory x (row stride s), an element a
    thread (H2_VX swaps in its 16-byte copies)."""
    return f"""            #pragma unroll
            for (int it = 0; it < BV * Dk / NT; ++it) {{
              const int e = tid + it * NT;
              H[(hb + e / Dk) * Dk + e % Dk] = static_cast<PT>({x}[(e / Dk) * {s} + e % Dk]);
            }}
"""


def _h_delta(store: str) -> str:
    """Slice KSL's branch, opened: delta = U - Xw (Xw in D_t, U's rows in xu), stored by `store`
    (of dl at row i, value v) and to Vn; value rows past Dv get delta 0 and no Vn."""
    return f"""      if (s == KSL) {{
        // value rows past Dv (a partial last tile only) get delta 0 and no Vn
        const bool full = v0 + BV <= Dv;
        #pragma unroll
        for (int it = 0; it < C * BV / NT; ++it) {{
          const int e = tid + it * NT;
          const int i = e / BV;
          const int v = e % BV;
          const bool in = full || v0 + v < Dv;
          const float dl = in ? xu[it] - D_t[i * DL + v] : 0.0f;
          {store};
          if (in) Vn[(rn + i) * Dv + v0 + v] = static_cast<PT>(dl);
        }}
"""


# H_BODY: the state pass, one threadgroup per (batch x value head, BV value rows), NT = 32 (C /
# 16) (BV / 16) threads: one warp per 16 x 16 tile of W S^T. A chunk's operands are its W rows
# then its Kw rows in key slices of DS: 2 Dk / DS slices a chunk, slice q of the pass (chunk
# q / NSL) staged in buffer q % NB of a ring of NB. Per chunk n:
#   slice s < KSL:   Xw += W[:, slice] S[:, slice]^T            (s = 0 then writes H[n] = S)
#   slice s = KSL:   delta = U - Xw (fp32 in threadgroup memory, to memory as Vn), S *= decay
#   slice s >= KSL:  S[:, slice] += delta^T Kw[:, slice]        (tiles over the warps)
# Before slice q: wait for its copy, one barrier, then start the copy of slice q + NB - 1 into
# the buffer slice q - 1 used (every warp is past it): each copy has NB - 1 slices of products
# to land behind, and the chain of a chunk has NSL + 1 barriers (3 at DS = Dk) and no global
# load but U's rows (loaded at the chunk's start, used after the W S^T products). On CUDA the
# copies are cp.async of the pieces as they are (bf16 staged as bf16: 48.4 KB at Dk 128, DS 128,
# NB 2); Metal copies synchronously, widening to float (31.3 KB at DS 32, NB 2).
# Threadgroup memory: BV (Dk + 4) + C (BV + 4) floats + NB C (DS + 16 / size) staged elements.
H_BODY = (
    """
  constexpr int RT = C / 16;
  constexpr int VT = BV / 16;
  constexpr int NW = NT / 32;
  constexpr int SD = Dk + 4;       // row stride of S
  constexpr int DL = BV + 4;       // row stride of delta
  constexpr int SP = DS + 16 / int(sizeof(gd_staged<PT>));  // row stride of a staged slice
  constexpr int KS = DS / 16;      // key tiles of a slice
  constexpr int KSL = Dk / DS;     // key slices of W (then of Kw) a chunk
  constexpr int NSL = 2 * KSL;     // slices a chunk
  constexpr int XT = VT * KS;      // S tiles a Kw slice updates
  constexpr int XW = (XT + NW - 1) / NW;
  static_assert(NW == RT * VT && Dk % DS == 0 && DS % 16 == 0, "H_BODY layout");
  static_assert(NB >= 2 && (C * BV) % NT == 0 && (BV * Dk) % NT == 0, "H_BODY: ring, rounds");
"""
    + _H_PROLOGUE
    + """
  GD_TG float S_t[BV * SD];
  GD_TG float D_t[C * DL];
  GD_TG16 gd_staged<PT> sb[NB * C * SP];

"""
    + _h_state_in("S_t", "SD")
    + _h_ring(one_line=True)
    + """    // This chunk's U rows (columns clamped) and decay, loaded at its start: a load after a
    // store to H or Vn (which may alias them for all the compiler knows) would wait for it.
"""
    + _rows_to_registers("xu", "U", "BV")
    + """    const float dc = gates[(rn + C - 1) * 4];
    gd_acc xw;
    gd_acc_zero(xw);
"""
    + _h_slice("S (s = 0) / delta's Xw complete")
    + """      GD_TG_PTR gd_staged<PT>* st = sb + (q % NB) * C * SP;
      if (s == 0) {
        if (PF && n + 2 < N) {
"""
    + textwrap.indent(_H_PREFETCH, "  ")
    + """        }
      }
      if (s < KSL) {
        gd_mma<MP, false, true>(xw, st + 16 * rt * SP, SP, S_t + 16 * vt * SD + s * DS, SD, DS);
        if (s == 0) {
          // H[n] = S, after the products are issued (S stays unchanged until slice KSL's
          // barrier); one branch for the whole tile, so the stores can fill the MMA chain's gaps.
"""
    + _h_store_and_delta("S_t", "SD", "D_t[i * DL + v] = dl")
    + """        #pragma unroll
        for (int it = 0; it < BV * Dk / NT; ++it) {
          const int e = tid + it * NT;
          S_t[(e / Dk) * SD + e % Dk] *= dc;
        }
        gd_barrier();  // delta and the decayed S complete
      }
      const int sl = s - KSL;
      #pragma unroll
      for (int u = 0; u < XW; ++u) {
        const int e = w + NW * u;
        if (XT % NW == 0 || e < XT) {
          const int sv = e / KS;
          const int c = e % KS;
          gd_acc sa;
          gd_acc_load(sa, S_t + 16 * sv * SD + sl * DS + 16 * c, SD);
          gd_mma<MP, true, false>(sa, D_t + 16 * sv, DL, st + 16 * c, SP, C);
          gd_acc_store(sa, S_t + 16 * sv * SD + sl * DS + 16 * c, SD);
        }
      }
    }
  }
#undef GD_H_COPY
  gd_copy_wait<0>();
  gd_barrier();
"""
    + _state_out("S_t", "SD")
)

# H2_BODY's end of slice KSL's delta branch: the decay of the state tiles, a barrier (delta
# complete; H2_VX makes delta before slice KSL's barrier and drops this one).
_H2_DECAY_BARRIER = """        #pragma unroll
        for (int u = 0; u < TW; ++u) gd_acc_scale(sa[u], dc);
        gd_barrier();  // delta complete
      }
"""
H2_NAME = "gated_delta_chunk_h2"

# H2_BODY: the state pass with the state in the warps' accumulators (as flash-linear-attention's
# chunk_fwd_h keeps it in registers) instead of threadgroup memory: same inputs, outputs, grid,
# warps and ring of staged W / Kw slices as H_BODY. Warp w owns state tiles w + NW u (16 x 16,
# fp32; all BV x Dk of S over the warps), updates them in their Kw slice, and after each update
# stores them into Sb, the state in the staged type PS: the W S^T operand of the next chunk and
# H[n] (PT, so H = S rounded as before). delta (fp32 in D_t) is also written in PS (Db) for the
# update S = decay S + delta^T Kw, where decay S scales the accumulators. With 16-bit pieces
# both products take 16-bit operands (S and delta rounded to bf16 / fp16 as flash-linear-
# attention does; mma.m16n8k16 on CUDA); with floats Sb, Db are exact copies (Db = D_t).
# The slice loop is unrolled (the accumulators are indexed by slice). state_in and state_out go
# through threadgroup floats: Sb where PS is float, else the ring (before / after its copies).
# Threadgroup memory: C BV floats + BV (Dk + 16 / size) PS + C (BV + 8) PS (16-bit only) + NB C
# (DS + 16 / size) PS: CUDA bf16 Dk 128 (DS 128, NB 2) 46336 B, (64, 4) 48384 B.
H2_BODY = (
    """
  constexpr int RT = C / 16;
  constexpr int VT = BV / 16;
  constexpr int NW = NT / 32;
  using PS = gd_staged<PT>;
  constexpr int PSZ = int(sizeof(PS));
  constexpr int SB = Dk + 16 / PSZ;  // row stride of Sb
  constexpr int DL = BV;             // row stride of Xw / delta (fp32; 1 KB less than BV + 4)
  constexpr int DBL = PSZ == 4 ? DL : BV + 8;  // row stride of Db
  constexpr int SP = DS + 16 / PSZ;  // row stride of a staged slice
  constexpr int SX = Dk + 4;         // row stride of the fp32 state staging
  constexpr int KS = DS / 16;        // key tiles of a slice
  constexpr int KSL = Dk / DS;       // key slices of W (then of Kw) a chunk
  constexpr int NSL = 2 * KSL;       // slices a chunk
  constexpr int KT = Dk / 16;        // key tiles of the state
  constexpr int TT = VT * KT;        // state tiles; warp w holds w + NW u, u < TW
  constexpr int TW = (TT + NW - 1) / NW;
  static_assert(NW == RT * VT && Dk % DS == 0 && DS % 16 == 0, "H2_BODY layout");
  static_assert(NB >= 2 && (C * BV) % NT == 0 && (BV * Dk) % NT == 0, "H2_BODY: ring, rounds");
  static_assert(PSZ == 4 || BV * SX * 4 <= NB * C * SP * PSZ, "H2_BODY: state staging");
"""
    + _H_PROLOGUE
    + """
  GD_TG float D_t[C * DL];
  GD_TG16 PS Sb[BV * SB];
  GD_TG16 PS db16[PSZ == 4 ? 8 : C * DBL];
  GD_TG16 PS sb[NB * C * SP];
  GD_TG_PTR PS* Db = PSZ == 4 ? (GD_TG_PTR PS*)D_t : db16;
  GD_TG_PTR float* Sx = PSZ == 4 ? (GD_TG_PTR float*)Sb : (GD_TG_PTR float*)sb;

"""
    + _h_state_in("Sx", "SX")
    + """  gd_barrier();
  // warp w's state tiles: tile g = w + NW u holds value rows 16 (g / KT).., keys 16 (g % KT)..
  gd_acc sa[TW];
  #pragma unroll
  for (int u = 0; u < TW; ++u) {
    const int g = w + NW * u;
    if (TT % NW == 0 || g < TT) gd_acc_load(sa[u], Sx + 16 * (g / KT) * SX + 16 * (g % KT), SX);
  }
  gd_barrier();  // Sx read (it may be Sb or the ring)
  #pragma unroll
  for (int u = 0; u < TW; ++u) {
    const int g = w + NW * u;
    if (TT % NW == 0 || g < TT) gd_acc_store(sa[u], Sb + 16 * (g / KT) * SB + 16 * (g % KT), SB);
  }
"""
    + _h_ring()
    + """    // This chunk's U rows (columns clamped) and decay, loaded at its start.
"""
    + _rows_to_registers("xu", "U", "BV")
    + """    const float dc = gates[(rn + C - 1) * 4];
    gd_acc xw;
    gd_acc_zero(xw);
    #pragma unroll
"""
    + _h_slice("Sb (s = 0) / Xw complete")
    + """      GD_TG_PTR PS* st = sb + (q % NB) * C * SP;
      if (s == 0 && PF && n + 2 < N) {
"""
    + _H_PREFETCH
    + """      }
      if (s < KSL) {
        gd_mma_staged<MP, false, true>(xw, st + 16 * rt * SP, SP, Sb + 16 * vt * SB + s * DS, SB,
                                       DS);
        if (s == 0) {
          // H[n] = S (Sb is not written before slice KSL's barriers), branch-free when whole
"""
    + _h_store_and_delta("Sb", "SB", "Db[i * DBL + v] = static_cast<PS>(dl)")
    + _H2_DECAY_BARRIER
    + """      // the tiles of this warp in Kw's key slice s - KSL
      #pragma unroll
      for (int u = 0; u < TW; ++u) {
        const int g = w + NW * u;
        const int kc = g % KT;
        if ((TT % NW == 0 || g < TT) && kc / KS == s - KSL) {
          gd_mma_staged<MP, true, false>(sa[u], Db + 16 * (g / KT), DBL, st + 16 * (kc % KS), SP,
                                         C);
          gd_acc_store(sa[u], Sb + 16 * (g / KT) * SB + 16 * kc, SB);
        }
      }
    }
  }
#undef GD_H_COPY
  gd_copy_wait<0>();
  gd_barrier();  // the ring's copies landed and read; Sb's last reads done
  #pragma unroll
  for (int u = 0; u < TW; ++u) {
    const int g = w + NW * u;
    if (TT % NW == 0 || g < TT) gd_acc_store(sa[u], Sx + 16 * (g / KT) * SX + 16 * (g % KT), SX);
  }
  gd_barrier();
"""
    + _state_out("Sx", "SX")
)

O_INPUTS = ["q", "k", "gates", "H", "Vn", "dims"]
O_OUTPUTS = ["y"]
O_NAME = "gated_delta_chunk_o"


def o_body() -> str:
    return _DECAY_R_MACRO + O_BODY + "#undef GD_DECAY_R\n"


# The output passes' common start (O_BODY, O2_BODY): sizes, the threadgroup's chunk, head and
# value block.
_O_PROLOGUE = _chunk_head("dims[0]", "q_shape[2]", "dims[1]", "Vn_shape[2]") + (
    """  const int w = tid / 32;
  const int v0 = int(gd_tg_z) * BVO;
  const size_t rn = size_t(head) * NC + t0;
  // q, k: [B, T, Hk, Dk]; gates: [B * Hv, N * C, 4]; H: [B * Hv, N, Dv, Dk];
  // Vn: [B * Hv, N * C, Dv]; y: [B, T, Hv, Dv]
"""
)


def _o_epilogue(P: str, pp="PP", vp="VP", ys="vs") -> str:
    """The output passes' common end: Y += P Vn (P, the decayed q k^T, at `P` in threadgroup
    memory, row stride pp; Vn's rows staged in vs, row stride vp), Y's tiles staged through
    threadgroup floats at `ys` (row stride VP), then written to y in YT, rows t < T and value
    columns < Dv."""
    return f"""  gd_barrier();
  for (int u = 0; u < YTW; ++u) {{
    const int e = w + NW * u;
    const int r = e / YC;
    gd_mma_staged<MP, false, false>(ya[u], {P} + 16 * r * {pp}, {pp}, vs + 16 * (e % YC), {vp},
                                    16 * (r + 1));
  }}
  gd_barrier();
  for (int u = 0; u < YTW; ++u) {{
    const int e = w + NW * u;
    gd_acc_store(ya[u], {ys} + 16 * (e / YC) * VP + 16 * (e % YC), VP);
  }}
  gd_barrier();
""" + _y_stores(ys)


def _y_stores(ys: str) -> str:
    """The output passes' y stores: Y staged at `ys` (threadgroup floats, row stride VP) to y in
    YT, an element a thread, rows t < T and value columns < Dv."""
    return f"""  for (int e = tid; e < C * BVO; e += NT) {{
    const int i = e / BVO;
    const int v = e % BVO;
    const int t = t0 + i;
    if (t < T && v0 + v < Dv) {{
      y[((size_t(b_idx) * T + t) * Hv + hv) * Dv + v0 + v] = static_cast<YT>({ys}[i * VP + v]);
    }}
  }}
"""


# Both output passes read the chunk's gates (gamma, g, valid) from the WY kernel's `gates`.
_O_GATES = """  for (int i = tid; i < C; i += NT) {
    const float gi = gates[(rn + i) * 4];
    gam[i] = gi;
    rg[i] = gi > 0.0f ? 1.0f / gi : 0.0f;
    gs[i] = gates[(rn + i) * 4 + 1];
    ok[i] = gates[(rn + i) * 4 + 2];
  }
"""


def _o_stage_vn(vp="VP", t="float") -> str:
    """The output passes' Vn rows (registers xv) into threadgroup memory vs (row stride vp,
    type t), value rows past Dv as 0."""
    return f"""  #pragma unroll
  for (int it = 0; it < C * BVO / NT; ++it) {{
    const int e = tid + it * NT;
    vs[(e / BVO) * {vp} + e % BVO] = static_cast<{t}>(v0 + e % BVO < Dv ? xv[it] : 0.0f);
  }}
"""


# The output passes' accumulators: q k^T's two tiles of tile row tr, and Y's YTW tiles.
_O_ACCS = """  const int tr = w / 2;
  gd_acc qk[2];
  gd_acc ya[YTW];
  gd_acc_zero(qk[0]);
  gd_acc_zero(qk[1]);
  for (int u = 0; u < YTW; ++u) gd_acc_zero(ya[u]);
"""


def _y_tiles_mma(q: str, h: str, s: str) -> str:
    """Y += q H^T over one staged key slice (q at `q`, H's rows at `h`, row stride `s`):
    warp w's YTW tiles of Y (tile e = w + NW u: row tile e / YC, value tile e % YC)."""
    return f"""    for (int u = 0; u < YTW; ++u) {{
      const int e = w + NW * u;
      gd_mma_staged<MP, false, true>(ya[u], {q} + 16 * (e / YC) * {s}, {s},
                                     {h} + 16 * (e % YC) * {s}, {s}, DS);
    }}
"""


O2_NAME = "gated_delta_chunk_o2"


def o2_body(p16: bool = True, ring: int = 3) -> str:
    """O2_BODY; p16 (GD_O2_P16): P and Vn staged in the pieces' type for Y += P Vn (16-bit
    operands on CUDA's tile layer), else as floats (P fp32); ring (GD_O2_NB): stages of the
    ring of staged slices (2 or 3)."""
    defs = f"\n#define GD_O2_P16 {int(p16)}\n#define GD_O2_NB {int(ring)}\n"
    undef = "#undef GD_DECAY_R\n#undef GD_O2_P16\n#undef GD_O2_NB\n"
    return defs + _DECAY_R_MACRO + O2_BODY + undef


# O2_BODY's pieces that O2_VX (o2_vx_body) swaps.
# O2_BODY's Y decay: Y staged to threadgroup floats, scaled there, loaded back (3 barriers).
_O2_DECAY = (
    """  for (int u = 0; u < YTW; ++u) {
    const int e = w + NW * u;
    gd_acc_store(ya[u], X + 16 * (e / YC) * VP + 16 * (e % YC), VP);
  }
"""
    + _o_stage_vn("VS", "PS")
    + """  gd_barrier();
  #pragma unroll
  for (int it = 0; it < C * BVO / NT; ++it) {
    const int e = tid + it * NT;
    const int i = e / BVO;
    X[i * VP + e % BVO] = ok[i] != 0.0f ? gam[i] * X[i * VP + e % BVO] : 0.0f;
  }
  gd_barrier();
  for (int u = 0; u < YTW; ++u) {
    const int e = w + NW * u;
    gd_acc_load(ya[u], X + 16 * (e / YC) * VP + 16 * (e % YC), VP);
  }
  gd_barrier();  // X free for P
"""
)
# O2_BODY's P: q k^T's tiles to threadgroup floats, a barrier, then D o q k^T by columns.
_O2_P = _decayed_lower_tiles(
    "qk", "X", "PP", "j <= i && ok[i] != 0.0f && ok[j] != 0.0f", "dij", out="Pm", so="PB", ot="PS"
)


# O2_VX: P made from the accumulators (element (h, c) of lane 4 g + t of tile (tr, tc) is (16 tr
# + g + 8 (c / 2), 16 tc + 8 h + 2 t + c % 2)), written straight to Pm: no fp32 round trip, no
# barrier (the epilogue's first barrier orders Pm before P Vn). Tiles above the diagonal are not
# written (P Vn reads row tile r's columns below 16 (r + 1) only).


# O2_BODY: the output pass with its q, k and H slices copied (gd_copy_tile: cp.async on CUDA,
# the bytes as they are) into a ring of three stages (each copy issued two slices ahead)
# instead of loaded, selected and stored by every thread. Same threadgroups, warps and tiles as
# O_BODY; q, k, H (and y) share one type YT. Since the staged rows are raw (masked / padded
# steps may hold anything, NaN included), the selection moves to the results, always by
# selection, never by multiplication:
#   per slice of DS keys: q k^T (warp tiles as O_BODY) and Y = q H^T (raw q);
#   Y to threadgroup memory, Y_i := valid_i ? gamma_i Y_i : 0 (fp32), back into the
#   accumulators; P_ij := (j <= i, valid_i, valid_j) ? D_ij (q k^T)_ij : 0; Y += P Vn; Vn's
#   rows (finite: the state pass writes them) staged as in O_BODY.
# Rows past T read row T - 1 and value rows past Dv read row Dv - 1 (rmax), both selected
# away. With GD_O2_P16 (o2_body(p16)) P and Vn are staged in the staged pieces' type PS for
# Y += P Vn (bf16 / fp16 on CUDA: P rounded to it, as flash-linear-attention's chunk_fwd_o
# does; the products on mma.m16n8k16; P written next to the fp32 q k^T tiles it is made
# from), else as floats (P in place); Vn staged after the loop, in the ring's space too.
# Threadgroup memory: max(3 (2 C + BVO) (DS + 16 / size) staged, C (max(C, BVO) + 4) fp32 + C (C
# + 8) PS where PS is 16-bit + C (BVO + 16 / size(PS)) PS) + 4 C floats: 47104 B on CUDA (bf16:
# DS 32, BVO 64; fp32: DS 16), Metal (float staged, DS 8, BVO 32) 27648 B.
O2_BODY = (
    """
  constexpr int RT = C / 16;
  constexpr int NW = NT / 32;
  constexpr int YC = BVO / 16;
  constexpr int YTW = RT * YC / NW;  // y tiles per warp
  constexpr int PP = C + 4;
  constexpr int VP = BVO + 4;
  constexpr int SQ = DS + 16 / int(sizeof(gd_staged<YT>));  // row stride of a staged slice
  constexpr int STG = (2 * C + BVO) * SQ;                    // staged elements a stage
  constexpr int NBO = GD_O2_NB;                              // stages of the ring
  constexpr int RING = NBO * STG * int(sizeof(gd_staged<YT>)) / 4;
#if GD_O2_P16
  using PS = gd_staged<YT>;  // P and the staged Vn
#else
  using PS = float;
#endif
  constexpr int PSZ = int(sizeof(PS));
  constexpr int PB = C + 16 / PSZ;    // row stride of P
  constexpr int VS = BVO + 16 / PSZ;  // row stride of the staged Vn
  constexpr int XS = C * (PP > VP ? PP : VP);
  constexpr int XP = XS + (PSZ == 4 ? 0 : C * PB * PSZ / 4);  // fp32 tiles, then a 16-bit P
  constexpr int XV = XP + C * VS * PSZ / 4;                    // then the staged Vn
  constexpr int NS = Dk / DS;
  static_assert(C == 64 && NT == 256 && YTW * NW == RT * YC && Dk % DS == 0, "O2_BODY layout");
  static_assert(DS % 8 == 0 && (C * BVO) % NT == 0, "O2_BODY: k-steps of 8, whole rounds");
"""
    + _O_PROLOGUE
    + """
  GD_TG16 float sm[RING > XV ? RING : XV];  // the ring of slices; then Y, q k^T, P and Vn
  GD_TG float gam[C];
  GD_TG float gs[C];
  GD_TG float ok[C];
  GD_TG float rg[C];
  GD_TG_PTR gd_staged<YT>* ring = (GD_TG_PTR gd_staged<YT>*)sm;
  const size_t qrow = ((size_t(b_idx) * T + t0) * Hk + hk) * Dk;
  const size_t hrow = ((size_t(head) * N + n) * Dv + v0) * Dk;
#define GD_O2_COPY(s_)                                                                      \
  {                                                                                         \
    if ((s_) < NS) {                                                                        \
      GD_TG_PTR gd_staged<YT>* st_ = ring + ((s_) % NBO) * STG;                             \
      const int d0_ = (s_) * DS;                                                            \
      gd_copy_tile<NT, C, DS>(st_, SQ, q + qrow + d0_, size_t(Hk) * Dk, T - 1 - t0, tid);   \
      gd_copy_tile<NT, C, DS>(st_ + C * SQ, SQ, k + qrow + d0_, size_t(Hk) * Dk,            \
                              T - 1 - t0, tid);                                             \
      gd_copy_tile<NT, BVO, DS>(st_ + 2 * C * SQ, SQ, H + hrow + d0_, size_t(Dk),           \
                                Dv - 1 - v0, tid);                                          \
    }                                                                                       \
    gd_copy_commit();                                                                       \
  }
  for (int s = 0; s < NBO - 1; ++s) GD_O2_COPY(s);
"""
    + _O_GATES
    + """\
  // Vn's rows for this chunk and value tile (columns clamped), in flight with the first slices.
"""
    + _rows_to_registers("xv", "Vn", "BVO")
    + """"""
    + _O_ACCS
    + """  for (int s = 0; s < NS; ++s) {
    gd_copy_wait<NBO - 2>();
    gd_barrier();  // slice s staged; slice s - 1's stage free
    GD_O2_COPY(s + NBO - 1);
    GD_TG_PTR gd_staged<YT>* qs = ring + (s % NBO) * STG;
    GD_TG_PTR gd_staged<YT>* ks = qs + C * SQ;
    GD_TG_PTR gd_staged<YT>* hs = qs + 2 * C * SQ;
"""
    + _lower_tiles_mma("qk", "qs", "ks", "SQ")
    + _y_tiles_mma("qs", "hs", "SQ")
    + """  }
#undef GD_O2_COPY
  gd_copy_wait<0>();
  gd_barrier();  // every warp past the ring
  GD_TG_PTR float* X = sm;
  GD_TG_PTR PS* vs = (GD_TG_PTR PS*)(sm + XP);
"""
    + _O2_DECAY
    + """  GD_TG_PTR PS* Pm = (GD_TG_PTR PS*)(X + (PSZ == 4 ? 0 : XS));
"""
    + _O2_P
    + _o_epilogue("Pm", "PB", "VS", "X")
)

# O_BODY: the output pass, one threadgroup of NT = 256 (8 warps) per (chunk n, batch x value
# head, BVO value rows). Over key slices of DS (q, gamma q, k and H[n]'s rows staged, masked
# steps' q and k selected to 0): q k^T (warp w: tile row w / 2, tile columns 2 (w % 2) + {0, 1},
# above the diagonal skipped) and Y = (gamma q) H^T (YTW tiles a warp). Then P = D o q k^T
# (j <= i) in threadgroup memory, Vn's rows staged, Y += P Vn (K = 16 (row tile + 1)), staged
# back and written in YT, rows t < T. dims = (T, Hv). Threadgroup memory: max(3 C (DS + 4) +
# BVO (DS + 4), C (C + 4) + C (BVO + 4)) + 3 C floats: 37.6 KB at DS 32, BVO 64 (CUDA); 27.4 KB
# at DS 16, BVO 32 (Metal).
O_BODY = (
    """
  constexpr int RT = C / 16;
  constexpr int NW = NT / 32;
  constexpr int SP = DS + 4;
  constexpr int YC = BVO / 16;
  constexpr int YTW = RT * YC / NW;  // y tiles per warp
  constexpr int PP = C + 4;
  constexpr int VP = BVO + 4;
  constexpr int PH1 = 3 * C * SP + BVO * SP;
  constexpr int PH2 = C * PP + C * VP;
  static_assert(C == 64 && NT == 256 && YTW * NW == RT * YC && Dk % DS == 0, "O_BODY layout");
  static_assert((C * DS) % NT == 0 && (BVO * DS) % NT == 0, "O_BODY: whole staging rounds");
"""
    + _O_PROLOGUE
    + """
  GD_TG float sm[PH1 > PH2 ? PH1 : PH2];
  GD_TG float gam[C];
  GD_TG float gs[C];
  GD_TG float ok[C];
  GD_TG float rg[C];
  GD_TG_PTR float* qs = sm;
  GD_TG_PTR float* gqs = sm + C * SP;
  GD_TG_PTR float* ks = sm + 2 * C * SP;
  GD_TG_PTR float* hs = sm + 3 * C * SP;
"""
    + _O_GATES
    + """"""
    + _O_ACCS
    + """  const size_t hrow = (size_t(head) * N + n) * Dv;
  // Staging: a slice's loads first (unconditional, rows clamped; selected by the valid flag
  // when stored), so they are in flight together, not one memory round trip per element.
  constexpr int PQ = C * DS / NT;
  constexpr int PH = BVO * DS / NT;
  // Each slice is loaded one ahead (before the previous slice's products).
  float xq[PQ];
  float xk[PQ];
  float xh[PH];
#define GD_O_LOAD(d0_)                                                                     \
  {                                                                                        \
    _Pragma("unroll") for (int it = 0; it < PQ; ++it) {                                    \
      const int e = tid + it * NT;                                                         \
      const int t = t0 + e / DS < T ? t0 + e / DS : T - 1;                                 \
      const size_t off = ((size_t(b_idx) * T + t) * Hk + hk) * Dk + (d0_) + e % DS;       \
      xq[it] = static_cast<float>(q[off]);                                                 \
      xk[it] = static_cast<float>(k[off]);                                                 \
    }                                                                                      \
    _Pragma("unroll") for (int it = 0; it < PH; ++it) {                                    \
      const int e = tid + it * NT;                                                         \
      const int v = v0 + e / DS < Dv ? v0 + e / DS : Dv - 1;                               \
      xh[it] = static_cast<float>(H[(hrow + v) * Dk + (d0_) + e % DS]);                    \
    }                                                                                      \
  }
  GD_O_LOAD(0);
  // Vn's rows for this chunk and value tile (columns clamped), in flight with the first slice.
"""
    + _rows_to_registers("xv", "Vn", "BVO")
    + """  for (int d0 = 0; d0 < Dk; d0 += DS) {
    gd_barrier();
    #pragma unroll
    for (int it = 0; it < PQ; ++it) {
      const int e = tid + it * NT;
      const int i = e / DS;
      const int d = e % DS;
      const bool valid = ok[i] != 0.0f;
      const float x = valid ? xq[it] : 0.0f;
      qs[i * SP + d] = x;
      gqs[i * SP + d] = gam[i] * x;
      ks[i * SP + d] = valid ? xk[it] : 0.0f;
    }
    #pragma unroll
    for (int it = 0; it < PH; ++it) {
      const int e = tid + it * NT;
      hs[(e / DS) * SP + e % DS] = v0 + e / DS < Dv ? xh[it] : 0.0f;
    }
    if (d0 + DS < Dk) GD_O_LOAD(d0 + DS);
    gd_barrier();
"""
    + _lower_tiles_mma("qk", "qs", "ks", "SP")
    + _y_tiles_mma("gqs", "hs", "SP")
    + """  }
#undef GD_O_LOAD
  gd_barrier();
  GD_TG_PTR float* Pm = sm;
  GD_TG_PTR float* vs = sm + C * PP;
"""
    + _decayed_lower_tiles("qk", "Pm", "PP", "j <= i", "dij", staged=_o_stage_vn())
    + _o_epilogue("Pm")
)


# WY2_BODY with 16-byte stores of W and U (round 5, helper chunk5; chunk_launch.WY2_V16, CUDA
# only, off by default): each output slice, staged in the pieces' type, goes to memory as one
# 16-byte copy a thread (bf16: 8 elements; the default writes them one 2-byte store at a time,
# 8 stores a thread a slice with their address arithmetic) read from Ai's space, made 16-byte
# aligned. Needs the staged type to be the pieces' (CUDA; the emulator) and Dv % 8 == 0 (as
# WY2_BODY). Same arithmetic, same outputs bit for bit.
_WY2_STORES_V16 = """    static_assert(sizeof(PS) == sizeof(PT), "WY2_V16: PS must be PT");
    constexpr int VE = 16 / PSZ;  // elements of a 16-byte copy
    struct alignas(16) gd_v16 {
      unsigned int x[4];
    };
    for (int e = tid * VE; e < C * DS; e += NT * VE) {
      const int i = e / DS;
      const int col = c0 + e % DS;
      const gd_v16 x = *reinterpret_cast<const GD_TG_PTR gd_v16*>(ot + i * SQ + e % DS);
      if (!is_v) {
        *reinterpret_cast<gd_v16*>(W + (rn + i) * Dk + col) = x;
      } else if (col < Dv) {
        *reinterpret_cast<gd_v16*>(U + (rn + i) * Dv + col) = x;
      }
    }
"""
_AI = "  GD_TG float Ai[C * CP];  // L, then (I - L)^-1\n"
_AI16 = "  GD_TG16 float Ai[C * CP];  // L, then (I - L)^-1; 16-byte aligned (WY2_V16's copies)\n"


def wy2_v16_body() -> str:
    """WY2_BODY with the 16-byte stores of W and U (_WY2_STORES_V16)."""
    assert WY2_BODY.count(_WY2_STORES) == 1 and WY2_BODY.count(_AI) == 1
    return WY2_BODY.replace(_WY2_STORES, _WY2_STORES_V16).replace(_AI, _AI16)


# ---------------------------------------------------------------------------------------------
# Round 6 (helper chunk6, issue 9): 16-byte pieces everywhere a pass moves its outputs, and O2's
# Y decay in the accumulators. CUDA only (the 16-byte copies need the staged type to be the
# pieces'; O2X reads CUDA's accumulator fragment layout, which the lane emulator shares), each
# off by default behind a switch of chunk_launch (WY2_VX, H2_VX, O2_VX), each the same arithmetic
# element for element as the default text, so the same outputs bit for bit.
# A 16-byte group of elements of type T (declared inside a kernel, where T is known).
def _vec_struct(name: str, t: str) -> str:
    return f"""  struct alignas(16) {name} {{
    {t} x[16 / sizeof({t})];
  }};
"""


def _wy2_slice_vx(x: str) -> str:
    """_wy2_slice with the loop over the slice's 16-byte groups (VE elements from row i,
    column d) instead of its elements."""
    loop = "    for (int e = tid; e < C * DS; e += NT) {\n"
    text = _wy2_slice(x)
    assert text.count(loop) == 1
    return text.replace(loop, "    for (int e = tid * VE; e < C * DS; e += NT * VE) {\n")


# Kw = w k from the staged k slice, a 16-byte group a thread (the default: an element a thread).
_WY2_KW_VX = """      const bool row = ok[i] != 0.0f;
      const float wi = wts[i];
      const gd_vx x = *reinterpret_cast<const GD_TG_PTR gd_vx*>(ks + i * SQ + d);
      gd_vx o;
      #pragma unroll
      for (int r = 0; r < VE; ++r) {
        o.x[r] = static_cast<PT>(row ? wi * static_cast<float>(x.x[r]) : 0.0f);
      }
      GD_ST16(Kw + (rn + i) * Dk + q * DS + d, o);
    }
"""
# One 16-byte store of a gd_vx (16 / PSZ elements of PT) to device memory at p_: on CUDA
# st.global.v4 of its four words (nvcc leaves an element-wise copy of the struct as 2-byte
# stores here); elsewhere (the lane emulator) the copy.
_ST16 = """#ifdef __CUDA_ARCH__
#define GD_ST16(p_, v_)                                                                     \\
  {                                                                                         \\
    unsigned int u_[4];                                                                     \\
    _Pragma("unroll") for (int j_ = 0; j_ < 4; ++j_) {                                      \\
      const unsigned short* h_ = reinterpret_cast<const unsigned short*>(&(v_).x[0]);       \\
      const unsigned int* w_ = reinterpret_cast<const unsigned int*>(&(v_).x[0]);           \\
      u_[j_] = PSZ == 2 ? unsigned(h_[2 * j_]) | (unsigned(h_[2 * j_ + 1]) << 16) : w_[j_]; \\
    }                                                                                       \\
    asm volatile(                                                                           \\
        "{ .reg .u64 g; cvta.to.global.u64 g, %0; st.global.v4.b32 [g], {%1, %2, %3, %4}; }" \\
        ::"l"(p_), "r"(u_[0]), "r"(u_[1]), "r"(u_[2]), "r"(u_[3])                           \\
        : "memory");                                                                        \\
  }
#else
#define GD_ST16(p_, v_) (*reinterpret_cast<gd_vx*>(p_) = (v_))
#endif
"""
# The staged U / W slice scaled in place a 16-byte group a thread (one read, one write).
_WY2_SCALE_VX = """      const bool row = ok[i] != 0.0f;
      const float sc = is_v ? bs[i] : bs[i] * gam[i];
      gd_vx x = *reinterpret_cast<const GD_TG_PTR gd_vx*>(bsl + i * SQ + d);
      #pragma unroll
      for (int r = 0; r < VE; ++r) {
        const bool take = row && (!is_v || c0 + d + r < Dv);
        x.x[r] = static_cast<PS>(take ? sc * static_cast<float>(x.x[r]) : 0.0f);
      }
      *reinterpret_cast<GD_TG_PTR gd_vx*>(bsl + i * SQ + d) = x;
    }
"""
_WY2_HEAD = "  const int NQ = 2 * NSK + nvs;              // slices through the ring\n"


def wy2_vx_body() -> str:
    """WY2_V16 (16-byte W / U stores) with Kw's stores and the U / W slices' scaling a 16-byte
    group a thread as well (WY2_VX): per slice a thread issues one 16-byte shared read, one
    write or global store where the default issues 8 of each (bf16), with their address
    arithmetic; and L made from k k^T's accumulators (_lower_tiles_vx: a barrier and a round
    trip through Ai fewer). Same products and roundings: W, U, Kw, gates bit for bit
    WY2_BODY's."""
    body = wy2_v16_body()
    kk = _wy2_slice("ks") + _WY2_KW
    sc = _wy2_slice("bsl") + _WY2_SCALE
    assert body.count(kk) == 1 and body.count(sc) == 1 and body.count(_WY2_HEAD) == 1
    head = _WY2_HEAD + "  constexpr int VE = 16 / PSZ;  // elements of a 16-byte group\n"
    head += _vec_struct("gd_vx", "PS") + _ST16
    assert body.count(_WY2_L) == 1
    body = body.replace(
        _WY2_L, _lower_tiles_vx("kk", "Ai", "CP", "float", _WY2_L_KEEP, "-bs[i] * dij", zero=True)
    )
    body = body.replace(kk, _wy2_slice_vx("ks") + _WY2_KW_VX)
    body = body.replace(sc, _wy2_slice_vx("bsl") + _WY2_SCALE_VX)
    body = body.replace(_WY2_HEAD, head)
    return _DECAY_R1_MACRO + body + "#undef GD_ST16\n#undef GD_DECAY_R1\n"


# O2_VX: the same decay on the accumulators in place (CUDA's fragments: element (h, c) of a
# lane 4 g + t is row g + 8 (c / 2) of its tile), no barrier; Vn staged meanwhile (read after
# the barriers of P's making).
_O2_DECAY_VX = """  for (int u = 0; u < YTW; ++u) {
    const int r0 = 16 * ((w + NW * u) / YC) + (tid & 31) / 4;
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      #pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = r0 + 8 * (c / 2);
        ya[u].c[h][c] = ok[i] != 0.0f ? gam[i] * ya[u].c[h][c] : 0.0f;
      }
    }
  }
""" + _o_stage_vn("VS", "PS")
_O2_Y_STORES = _y_stores("X")
# O2_VX: y written a 16-byte group a thread (needs Dv % (16 / sizeof(YT)) == 0: a group is whole
# inside or outside the value rows; chunk_launch takes O2_BODY otherwise).
_O2_Y_STORES_VX = (
    """  constexpr int VE = 16 / int(sizeof(YT));  // elements of a 16-byte group
"""
    + _vec_struct("gd_vy", "YT")
    + """  for (int e = tid * VE; e < C * BVO; e += NT * VE) {
    const int i = e / BVO;
    const int v = e % BVO;
    const int t = t0 + i;
    if (t < T && v0 + v < Dv) {
      gd_vy o;
      #pragma unroll
      for (int r = 0; r < VE; ++r) o.x[r] = static_cast<YT>(X[i * VP + v + r]);
      *reinterpret_cast<gd_vy*>(y + ((size_t(b_idx) * T + t) * Hv + hv) * Dv + v0 + v) = o;
    }
  }
"""
)


# GD_DECAY_R with its running-product loop kept rolled (round 6's accumulator forms evaluate it at
# 16 elements a lane, each unrolled copy of the rare loop would cost code, not time).
_DECAY_R1_LOOP = "      for (int l = (j) + 1; l <= (i); ++l) { \\\n"
_DECAY_R1_MACRO = _DECAY_R_MACRO.replace("GD_DECAY_R(", "GD_DECAY_R1(").replace(
    _DECAY_R1_LOOP, '      _Pragma("unroll 1") for (int l = (j) + 1; l <= (i); ++l) { \\\n'
)
assert _DECAY_R_MACRO.count(_DECAY_R1_LOOP) == 1


def _lower_tiles_vx(
    acc: str, out: str, so: str, ot: str, keep: str, scale: str, zero=False, before="", then=""
):
    """_decayed_lower_tiles made from the accumulators (round 6; CUDA's fragments: element (h, e)
    of lane 4 g + t of tile (tr, tc) is (16 tr + g + 8 (e / 2), 16 tc + 8 h + 2 t + e % 2)) and
    written straight to `out` (row stride so, type ot): no round trip through threadgroup floats,
    no barrier. Tiles above the diagonal are written 0 where `zero`, else not at all. `before`
    (text at a lower tile's start) and `then` (after each element's store, dij still in scope):
    round 9's second output from the same decays (empty: the text as before)."""
    upper = (
        f"""    }} else {{
      #pragma unroll
      for (int h = 0; h < 2; ++h) {{
        #pragma unroll
        for (int e = 0; e < 4; ++e) {{
          const int i = 16 * tr + (tid & 31) / 4 + 8 * (e / 2);
          {out}[i * {so} + 16 * tc + 8 * h + 2 * (tid & 3) + e % 2] = 0.0f;
        }}
      }}
"""
        if zero
        else ""
    )
    return f"""  for (int c = 0; c < 2; ++c) {{
    const int tc = 2 * (w % 2) + c;
    if (tc <= tr) {{
      const int ib = 16 * tr + (tid & 31) / 4;  // rows ib, ib + 8
      const int jb = 16 * tc + 2 * (tid & 3);   // columns jb + 8 h + {{0, 1}}
{before}      #pragma unroll
      for (int h = 0; h < 2; ++h) {{
        #pragma unroll
        for (int e = 0; e < 4; ++e) {{
          const int i = ib + 8 * (e / 2);
          const int j = jb + 8 * h + e % 2;
          const float gj = gam[j];
          const float rj = rg[j];
          GD_DECAY_R1(dij, i, j, gj, rj);
          const bool keep = {keep};
          {out}[i * {so} + j] = static_cast<{ot}>(keep ? {scale} * {acc}[c].c[h][e] : 0.0f);
{then}        }}
      }}
{upper}    }}
  }}
"""


_O2_P_VX = _lower_tiles_vx(
    "qk", "Pm", "PB", "PS", "j <= i && ok[i] != 0.0f && ok[j] != 0.0f", "dij"
)


def o2_vx_body(p16: bool = True, ring: int = 3) -> str:
    """o2_body with Y's decay and P made in the accumulators (_O2_DECAY_VX, _O2_P_VX: four
    barriers and two round trips through threadgroup floats fewer) and y written a 16-byte group
    a thread (O2_VX; CUDA). Same arithmetic element for element: y bit for bit o2_body's."""
    body = o2_body(p16, ring)
    for text in (_O2_DECAY, _O2_P, _O2_Y_STORES):
        assert body.count(text) == 1
    body = body.replace(_O2_DECAY, _O2_DECAY_VX).replace(_O2_P, _O2_P_VX)
    # Y staged in X's fp32 tiles, which (16-bit P) nothing reads any more: no barrier before
    assert body.count(_O2_Y_STAGED) == 1
    body = body.replace(_O2_Y_STAGED, _O2_Y_STAGED.replace("  gd_barrier();", _O2_Y_BAR, 1))
    body = body.replace(_O2_Y_STORES, _O2_Y_STORES_VX)
    return _DECAY_R1_MACRO + body + "#undef GD_DECAY_R1\n"


_O2_Y_STAGED = """  gd_barrier();
  for (int u = 0; u < YTW; ++u) {
    const int e = w + NW * u;
    gd_acc_store(ya[u], X + 16 * (e / YC) * VP"""
_O2_Y_BAR = "  if (PSZ == 4) gd_barrier();  // P (in X) read by every warp"


_H2_H_STORES = _h_whole_tile_stores("Sb", "SB")
# H2_VX: H[n] of a whole value tile copied from Sb a 16-byte group a thread (Sb is the state in
# PT already).
_H2_H_STORES_VX = """            static_assert(sizeof(PS) == sizeof(PT), "H2_VX: PS must be PT");
            constexpr int VE = 16 / PSZ;  // elements of a 16-byte group
            struct alignas(16) gd_vh {
              unsigned int x[4];
            };
            #pragma unroll
            for (int e = tid * VE; e < BV * Dk; e += NT * VE) {  // Dk 32: half the threads
              *reinterpret_cast<gd_vh*>(H + (hb + e / Dk) * Dk + e % Dk) =
                  *reinterpret_cast<const GD_TG_PTR gd_vh*>(Sb + (e / Dk) * SB + e % Dk);
            }
"""


# H2_BODY's U rows (a thread's C BV / NT of the chunk's, row-major), Xw to D_t at slice KSL,
# and delta from them after slice KSL's barrier, behind a barrier of its own.
_H2_XU = _rows_to_registers("xu", "U", "BV")
_H2_XW = "      if (s == KSL) gd_acc_store(xw, D_t + 16 * rt * DL + 16 * vt, DL);\n"
_H2_DELTA = _h_delta("Db[i * DBL + v] = static_cast<PS>(dl)") + _H2_DECAY_BARRIER
# H2_VX: each warp's U values in its Xw tile's fragment layout (element (h, e) of lane 4 g + t:
# row 16 rt + g + 8 (e / 2), value 16 vt + 8 h + 2 t + e % 2), delta = U - Xw made in the
# registers before slice KSL's wait and written to Db and Vn there, so slice KSL's barrier
# also completes delta: one barrier a chunk and Xw's round trip through D_t fewer.
_H2_XU_VX = """    float xu[2][4];  // U where this warp holds Xw (values clamped)
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 16 * rt + (tid & 31) / 4 + 8 * (e / 2);
        const int v = v0 + 16 * vt + 8 * h + 2 * (tid & 3) + e % 2;
        xu[h][e] = static_cast<float>(U[(rn + i) * Dv + (v < Dv ? v : Dv - 1)]);
      }
    }
"""
_H2_XW_VX = """      if (s == KSL) {
        // delta = U - Xw from the accumulators; value rows past Dv get delta 0 and no Vn
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
          #pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = 16 * rt + (tid & 31) / 4 + 8 * (e / 2);
            const int v = 16 * vt + 8 * h + 2 * (tid & 3) + e % 2;
            const bool in = v0 + v < Dv;
            const float dl = in ? xu[h][e] - xw.c[h][e] : 0.0f;
            Db[i * DBL + v] = static_cast<PS>(dl);
            if (in) Vn[(rn + i) * Dv + v0 + v] = static_cast<PT>(dl);
          }
        }
      }
"""
_H2_DELTA_VX = """      if (s == KSL) {
        #pragma unroll
        for (int u = 0; u < TW; ++u) gd_acc_scale(sa[u], dc);
      }
"""


def h2_vx_body() -> str:
    """H2_BODY with H[n]'s stores a 16-byte group a thread where the value tile is whole (2
    stores a thread a chunk instead of 16: bf16, BV 16, Dk 128), and delta made in the
    accumulators before slice KSL's barrier (H2_VX; CUDA): 2 barriers a chunk instead of 3.
    Same arithmetic: H, Vn and the state bit for bit H2_BODY's."""
    body = H2_BODY
    swaps = ((_H2_H_STORES, _H2_H_STORES_VX), (_H2_XU, _H2_XU_VX), (_H2_XW, _H2_XW_VX))
    for old, new in (*swaps, (_H2_DELTA, _H2_DELTA_VX)):
        assert body.count(old) == 1, old
        body = body.replace(old, new)
    return body


# H2_DYN (round 6, CUDA): the state pass's ring of staged slices in dynamic shared memory, the
# rest as before, so that the ring can outgrow the 48 KB of static shared memory (a ring of three
# whole W / Kw slices at Dk 128: each copy a whole chunk ahead instead of half); the host asks
# for the ring's bytes (chunk_launch.H2_DYN). Elsewhere (the lane emulator) the static array.
_H2_RING = "  GD_TG16 PS sb[NB * C * SP];\n"
_H2_RING_DYN = """#ifdef __CUDA_ARCH__
  extern __shared__ __align__(16) unsigned char gd_dyn_ring[];  // NB C SP PS: the launch's
  GD_TG_PTR PS* sb = reinterpret_cast<GD_TG_PTR PS*>(gd_dyn_ring);
#else
  GD_TG16 PS sb[NB * C * SP];
#endif
"""


def h2_dyn_body(vx: bool = False) -> str:
    """H2_BODY (vx: h2_vx_body()) with the ring in dynamic shared memory (H2_DYN; CUDA)."""
    body = h2_vx_body() if vx else H2_BODY
    assert body.count(_H2_RING) == 1
    return body.replace(_H2_RING, _H2_RING_DYN)


# ---------------------------------------------------------------------------------------------
# Stamped builds (issue 9, round 5, helper chunk5): where a threadgroup of a parallel pass spends
# its time on the device. The pass's text with `GD_STAMP(j);` lines inserted before fixed
# anchors, nothing else changed (removing those lines and _STAMP_DEFS gives the text back, which
# the CPU tests check); thread 0 of each threadgroup writes one extra output, stamps [number of
# threadgroups, STAMP_SLOTS] uint32 (x fastest, as CUDA numbers blocks): slot 0 the SM it ran on,
# 1 and 2 %globaltimer_lo (ns) at its start and end, 3.. clock64's low 32 bits at the anchors
# (differences modulo 2^32). CUDA only; elsewhere (the lane emulator) the stamps are not written.
STAMP_OUTPUT = "stamps"
STAMP_SLOTS = 16
_STAMP_DEFS = """
#ifdef __CUDA_ARCH__
#define GD_STAMP_AT(j, x_)                                                                    \\
  if (threadIdx.x == 0)                                                                      \\
  stamps[((size_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * 16 + (j)] = \\
      (x_)
#define GD_STAMP(j) GD_STAMP_AT(j, unsigned(clock64()))
#define GD_STAMP_GT(j)                                                \\
  {                                                                   \\
    unsigned gt_;                                                     \\
    asm volatile("mov.u32 %0, %%globaltimer_lo;" : "=r"(gt_)::"memory"); \\
    GD_STAMP_AT(j, gt_);                                              \\
  }
#define GD_STAMP_SM()                                    \\
  {                                                      \\
    unsigned sm_;                                        \\
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm_));     \\
    GD_STAMP_AT(0, sm_);                                 \\
  }
#else
#define GD_STAMP(j) {}
#define GD_STAMP_GT(j) {}
#define GD_STAMP_SM() {}
#endif
"""
# (phase, anchor[, condition]) of each pass, in the order the stamps are taken: stamp 3 + i just
# before anchor i (each occurs once in the pass's text; entries may share one), inside a loop only
# where the condition holds (one sampled iteration), so phase i runs from stamp 3 + i to the next
# (the last to the end stamp). The first entry also records the SM and the start time, the end
# the end time. Thread 0's clock: a phase that ends in a barrier includes warp 0's wait there.
_WY2_SLICE = (
    "    gd_copy_wait<NB - 2>();\n    gd_barrier();\n    GD_WY2_COPY(q + NB - 1);\n"
    "    GD_TG_PTR PS* bsl"
)
WY2_STAMPS = (
    ("first copies", "  const int nvs = (Dv + DS - 1) / DS;        // v slices\n"),
    ("gates", "  // 1. gates\n"),
    ("k k^T, Kw", "\n  // 2. k k^T over the raw k slices;"),
    ("L", "  // 3. L = -beta D k k^T"),
    ("inverse", "  // 4. (I - L)^-1: diagonal blocks"),
    ("X to PT", "  // X in the staged type"),
    ("U slice 0", "  // 5. U = X diag(beta) v, W = X diag(beta gamma) k"),
    ("U slice 1: wait", _WY2_SLICE, "q == NSK + 1"),
    ("U slice 1: scale", "    GD_TG_PTR PS* bsl = ring", "q == NSK + 1"),
    ("U slice 1: product", "    gd_acc o[OTW];\n", "q == NSK + 1"),
    (
        "U slice 1: stores",
        "    for (int e = tid; e < C * DS; e += NT) {\n      const int i = e / DS;\n"
        "      const int col",
        "q == NSK + 1",
    ),
    ("slices 2..", _WY2_SLICE, "q == NSK + 2"),
)
# The state pass H2_BODY (round 6, helper chunk6): one sampled chunk n = N / 2 of every
# threadgroup, its W slices (s < KSL) and Kw slices (s >= KSL) split at the copy wait, then the
# chunks after it; the first phase is the state's load, the first copies and chunks 0 .. N/2 - 1.
_H2_CHUNK = "    // This chunk's U rows (columns clamped) and decay, loaded at its start.\n"
_H2_SLICE = "      const int q = n * NSL + s;\n"
_H2_STAGED = "      GD_TG_PTR PS* st = sb + (q % NB) * C * SP;\n"
_H2_UPDATE = "      // the tiles of this warp in Kw's key slice s - KSL\n"
H2_STAMPS = (
    ("chunks before", "  for (int q = 0; q < NB - 1; ++q) GD_H_COPY(q);\n"),
    ("U rows", _H2_CHUNK, "n == N / 2"),
    ("W slice: wait", _H2_SLICE, "n == N / 2 && s == 0"),
    ("W S^T, H", _H2_STAGED, "n == N / 2 && s == 0"),
    ("Kw slice: Xw, wait", _H2_SLICE, "n == N / 2 && s == KSL"),
    ("delta, decay", _H2_STAGED, "n == N / 2 && s == KSL"),
    ("update", _H2_UPDATE, "n == N / 2 && s == KSL"),
    ("chunks after", _H2_CHUNK, "n == N / 2 + 1"),
)
_O2_SLICE = "    gd_copy_wait<NBO - 2>();\n    gd_barrier();  // slice s staged"
O2_STAMPS = (
    ("copies, gates, Vn", "  for (int s = 0; s < NBO - 1; ++s) GD_O2_COPY(s);\n"),
    ("slice 0", "  for (int s = 0; s < NS; ++s) {\n"),
    ("slice 1: wait", _O2_SLICE, "s == 1"),
    ("slice 1: products", "    GD_TG_PTR gd_staged<YT>* qs = ring", "s == 1"),
    ("slices 2..", _O2_SLICE, "s == 2"),
    ("ring drained", "#undef GD_O2_COPY\n"),
    ("Y decayed", "  GD_TG_PTR float* X = sm;\n"),
    ("P", "  gd_barrier();  // X free for P\n"),
    (
        "P Vn, Y staged",
        "  gd_barrier();\n  for (int u = 0; u < YTW; ++u) {\n    const int e = w + NW * u;\n"
        "    const int r",
    ),
    ("y stores", "  for (int e = tid; e < C * BVO; e += NT) {\n    const int i = e / BVO;\n"),
)


def stamped(body: str, anchors) -> str:
    """`body` with the stamps of `anchors` (*_STAMPS above) inserted."""
    if len(anchors) + 4 > STAMP_SLOTS:
        raise ValueError("stamped: too many anchors")
    inserts = []
    for j, (_, anchor, *cond) in enumerate(anchors):
        if body.count(anchor) != 1:
            raise ValueError(f"stamped: anchor {anchor!r} occurs {body.count(anchor)} times")
        lead = "\n" if anchor.startswith("\n") else ""
        line = f"  GD_STAMP({3 + j});\n" if not cond else f"    if ({cond[0]}) GD_STAMP({3 + j});\n"
        if j == 0:
            line = "  GD_STAMP_SM();\n  GD_STAMP_GT(1);\n" + line
        inserts.append((body.index(anchor) + len(lead), j, line))
    out = body
    for at, _, line in sorted(inserts, key=lambda x: (-x[0], -x[1])):
        out = out[:at] + line + out[at:]
    end = 3 + len(anchors)
    return _STAMP_DEFS + out + f"  GD_STAMP({end});\n  GD_STAMP_GT(2);\n"


def unstamped(text: str) -> str:
    """stamped's inverse: the text without _STAMP_DEFS and the GD_STAMP lines."""
    text = text.replace(_STAMP_DEFS, "", 1)
    return "".join(line for line in text.splitlines(True) if "GD_STAMP" not in line)


# ---------------------------------------------------------------------------------------------
# H3_BODY (round 7, helper chunk7; CUDA, off by default: chunk_launch.H3): the state pass with
# one warp a chain. H2_BODY splits each chunk's two products over the threadgroup's warps (W S^T
# by chunk rows, the update by key tiles), so every chunk crosses the warps twice (Xw to delta
# through threadgroup memory, S back to Sb), behind two or three barriers: the round-6 stamps
# show ~5,500 cycles a chunk for a few hundred of products. Here warp w owns value rows vw = v0 +
# 16 w .. + 16 of the state, all Dk keys, as KT = Dk / 16 fp32 accumulator tiles (as flash-linear-
# attention's chunk_fwd_h keeps b_h in registers), and does both products of a chunk itself:
#   Xw^T = S W^T       (C layout: value rows x chunk rows; A = its Sb, the state in PS)
#   delta = U - Xw      (fp32, from the staged U rows), to its Db (PS) and, from there, Vn
#   S = decay S + delta^T Kw
# so the state never leaves the warp: between the products a __syncwarp, not a barrier. The
# threadgroup's warps share one ring of NB chunks, each stage W, Kw (C x Dk) and U (C x BV)
# staged by cp.async a whole chunk (NB - 1 chunks) ahead, one barrier a chunk (the stage landed,
# every warp past the buffer it replaces). gd_mma_rows (H3_TILES) loads A's fragment once for the
# R tiles of a step and issues their products together. Same arithmetic element for element as
# H2_BODY (S and delta rounded to PS for the products, Xw and the update accumulated over k in the
# same order, delta = U - Xw in fp32, H[n] = Sb, the final state from the accumulators): H, Vn and
# the state bit for bit H2_BODY's. Needs Dv a multiple of BV = 16 NW (the host checks).
# Threadgroup memory (dynamic on CUDA, the static array in the lane emulator): NB (2 C (Dk + 16 /
# size) + C (BV + 16 / size)) + NW (16 (Dk + 16 / size) + C (16 + 16 / size)) PS: bf16, Dk 128,
# NW 4, NB 2: 117760 B.
H3_NAME = "gated_delta_chunk_h3"
H3_INPUTS = ["W", "U", "Kw", "gates", "state_in"]
H3_BODY = """
  using PS = gd_staged<PT>;
  constexpr int PSZ = int(sizeof(PS));
  constexpr int NW = NT / 32;
  constexpr int PAD = 16 / PSZ;
  constexpr int SP = Dk + PAD;   // row stride of the staged W / Kw rows and of a warp's Sb
  constexpr int UP = BV + PAD;   // row stride of the staged U rows
  constexpr int DBL = 16 + PAD;  // row stride of a warp's delta
  constexpr int KT = Dk / 16;    // key tiles of the state
  constexpr int RT = C / 16;     // row tiles of a chunk
  constexpr int STAGE = 2 * C * SP + C * UP;  // one chunk's W, Kw and U rows
  constexpr int WARP = 16 * SP + C * DBL;     // a warp's Sb and Db
  static_assert(BV == 16 * NW && Dk % 16 == 0 && C % 16 == 0 && NB >= 2, "H3_BODY layout");
  // W, Kw: [B * Hv, N * C, Dk]; U, Vn: [B * Hv, N * C, Dv]; gates: [B * Hv, N * C, 4];
  // H: [B * Hv, N, Dv, Dk]; state_in, state_out: [B, Hv, Dv, Dk] fp32; Dv a multiple of BV
  const int NC = U_shape[1];
  const int Dv = U_shape[2];
  const int N = NC / C;
  const int tid = int(gd_tid);
  const int w = tid / 32;
  const unsigned head = gd_tg_x;  // b * Hv + hv
  const int v0 = int(gd_tg_y) * BV;
  const int vw = v0 + 16 * w;     // this warp's value rows
#ifdef __CUDA_ARCH__
  extern __shared__ __align__(16) unsigned char gd_dyn_h3[];
  GD_TG_PTR PS* sm = reinterpret_cast<GD_TG_PTR PS*>(gd_dyn_h3);
#else
  GD_TG16 PS sm[NB * STAGE + NW * WARP];
#endif
  GD_TG_PTR PS* Sb = sm + NB * STAGE + w * WARP;  // this warp's state in PS: 16 x Dk
  GD_TG_PTR PS* Db = Sb + 16 * SP;                // this warp's delta in PS: C x 16
  struct alignas(16) gd_vh {
    unsigned int x[4];
  };

  // the state: warp w's tile c holds value rows vw.., keys 16 c..
  gd_acc sa[KT];
  #pragma unroll
  for (int c = 0; c < KT; ++c) {
    gd_acc_load(sa[c], state_in + (size_t(head) * Dv + vw) * Dk + 16 * c, Dk);
    gd_acc_store16<false>(sa[c], Sb + 16 * c, SP);
  }
  const size_t row0 = size_t(head) * NC;
  // the copies of chunk nn's stage: thread tid copies 16 bytes of W and Kw rows kr + j KR (from
  // column kc) and of U rows ur + j UR (from value uc), j = 0, 1, ..
  constexpr int KR = NT / (Dk / PAD);  // W / Kw rows a round of copies
  constexpr int UR = NT / (BV / PAD);  // U rows a round
  static_assert(NT % (Dk / PAD) == 0 && NT % (BV / PAD) == 0 && C % KR == 0 && C % UR == 0,
                "H3_BODY copies");
  const int kr = tid / (Dk / PAD);
  const int kc = (tid % (Dk / PAD)) * PAD;
  const int ur = tid / (BV / PAD);
  const int uc = (tid % (BV / PAD)) * PAD;
  auto copy = [&](int nn) {
    if (nn < N) {
      GD_TG_PTR PS* b = sm + (nn % NB) * STAGE;
      const size_t r0 = row0 + size_t(nn) * C;
      const PT* wr = W + (r0 + kr) * Dk + kc;
      const PT* kw = Kw + (r0 + kr) * Dk + kc;
      #pragma unroll
      for (int j = 0; j < C / KR; ++j) {
        const unsigned o = unsigned(((kr + j * KR) * SP + kc) * PSZ);
        gd_cp16(b, o, wr + size_t(j) * KR * Dk);
        gd_cp16(b, o + unsigned(C * SP * PSZ), kw + size_t(j) * KR * Dk);
      }
      const PT* ug = U + (r0 + ur) * Dv + v0 + uc;
      #pragma unroll
      for (int j = 0; j < C / UR; ++j) {
        gd_cp16(b, unsigned((2 * C * SP + (ur + j * UR) * UP + uc) * PSZ),
                ug + size_t(j) * UR * Dv);
      }
    }
    gd_copy_commit();
  };
  for (int q = 0; q < NB - 1; ++q) copy(q);
  float dcn = N > 0 ? gates[(row0 + C - 1) * 4] : 1.0f;  // the next chunk's decay
  for (int n = 0; n < N; ++n) {
    const size_t rn = row0 + size_t(n) * C;
    const float dc = dcn;
    if (n + 1 < N) dcn = gates[(rn + 2 * C - 1) * 4];
    gd_copy_wait<NB - 2>();
    gd_barrier();  // chunk n staged; every warp past chunk n - 1, so its buffer is free
    copy(n + NB - 1);
    const GD_TG_PTR PS* sw = sm + (n % NB) * STAGE;  // W rows, then Kw rows, then U rows
    const GD_TG_PTR PS* sk = sw + C * SP;
    const GD_TG_PTR PS* su = sw + 2 * C * SP;
    // Xw^T = S W^T: tile r holds the warp's value rows x chunk rows 16 r..
    gd_acc xt[RT];
    #pragma unroll
    for (int r = 0; r < RT; ++r) gd_acc_zero(xt[r]);
    gd_mma_rows<MP, false, true, RT>(xt, Sb, SP, sw, SP, 16 * SP, Dk);
    // H[n] = S (Sb is the state in PT), 16 bytes a lane
    const size_t hb = (size_t(head) * N + n) * Dv + vw;
    #pragma unroll
    for (int e = (tid & 31) * PAD; e < 16 * Dk; e += 32 * PAD) {
      *reinterpret_cast<gd_vh*>(H + (hb + e / Dk) * Dk + e % Dk) =
          *reinterpret_cast<const GD_TG_PTR gd_vh*>(Sb + (e / Dk) * SP + e % Dk);
    }
    // delta^T = U^T - Xw^T tile by tile (U's rows read transposed), to Db as delta (transposed)
    #pragma unroll
    for (int r = 0; r < RT; ++r) {
      gd_acc dl;
      gd_acc_load16<true>(dl, su + 16 * r * UP + 16 * w, UP);
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) dl.c[h][e] -= xt[r].c[h][e];
      }
      gd_acc_store16<true>(dl, Db + 16 * r * DBL, DBL);
    }
    __syncwarp();  // Db complete; Sb's reads (the products, H) done
    // Vn = delta (PS is PT), 16 bytes a lane
    #pragma unroll
    for (int e = (tid & 31) * PAD; e < C * 16; e += 32 * PAD) {
      *reinterpret_cast<gd_vh*>(Vn + (rn + e / 16) * Dv + vw + e % 16) =
          *reinterpret_cast<const GD_TG_PTR gd_vh*>(Db + (e / 16) * DBL + e % 16);
    }
    // S = decay S + delta^T Kw
    #pragma unroll
    for (int c = 0; c < KT; ++c) gd_acc_scale(sa[c], dc);
    gd_mma_rows<MP, true, false, KT>(sa, Db, DBL, sk, SP, 16, C);
    #pragma unroll
    for (int c = 0; c < KT; ++c) gd_acc_store16<false>(sa[c], Sb + 16 * c, SP);
  }
  gd_copy_wait<0>();
  #pragma unroll
  for (int c = 0; c < KT; ++c) {
    gd_acc_store(sa[c], state_out + (size_t(head) * Dv + vw) * Dk + 16 * c, Dk);
  }
"""
# ldmatrix .x4 (.trans where TR) of a warp into r[0..3] from the shared-window address a: the
# body of the tile layers' three helpers (chunk_launch's gd_ldmatrix4, H3_TILES' gd_ldsm4,
# prefill attention's at_ldmatrix4), which differ only in how they get a.
LDMATRIX4 = """  if (TR) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  }
"""


# The staged tile copies' loop (chunk_launch's gd_copy_tile, L32_TILES' gd_copy_tile_l32,
# prefill attention's at_copy_tile): opens a thread's share of the tile's U 16-byte copies of V
# elements (NT threads), copy e the row r (rs = min(r, rmax) read) and column c; each copy's
# asm and the loop's closing brace are the caller's.
COPY_TILE_LOOP = """#pragma unroll
  for (int it = 0; it < (U + NT - 1) / NT; ++it) {
    const int e = tid + it * NT;
    if (U % NT != 0 && e >= U) break;
    const int r = e / (CL / V);
    const int c = (e % (CL / V)) * V;
    const int rs = r < rmax ? r : rmax;
"""


# gd_acc_load16 / gd_acc_store16's element-a-lane path: the lane's elements e of the C fragment's
# halves h, (row i, column j) of the tile; `stmt` moves one (x.c[h][e] and p)
def _tile16_lanes(stmt: str) -> str:
    return f"""  const int g = (threadIdx.x & 31) >> 2;
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {{
#pragma unroll
    for (int e = 0; e < 4; ++e) {{
      const int i = g + 8 * (e >> 1);
      const int j = 8 * h + 2 * t + (e & 1);
      {stmt}
    }}
  }}
"""


# gd_mma_rows (H3_BODY's header, CUDA): C_r += A B_r for r < R, B_r = B + r bo, K a multiple of
# 16: gd_mma_staged's products tile for tile (the same arithmetic); where those take ldmatrix
# (GD_MMA16, one 16-bit operand type) A's fragment of each step of 16 is loaded once for the R
# tiles, and the step's R products (independent accumulators) are issued together.
H3_TILES = (
    """
// The shared-window address of a threadgroup pointer; callers add their offsets in 32 bits.
// CUDA 11+ (NVRTC too): the compiler's own conversion, which it folds into the addressing (an
// asm cvta, as gd_ldmatrix4's, cost H3 17 instructions a chunk and 70 registers); else the asm.
__device__ __forceinline__ unsigned gd_smem32(const void* p) {
#if defined(__CUDACC_VER_MAJOR__) && __CUDACC_VER_MAJOR__ >= 11
  return unsigned(__cvta_generic_to_shared(p));
#else
  unsigned a;
  asm("{ .reg .u64 s; cvta.to.shared.u64 s, %1; cvt.u32.u64 %0, s; }" : "=r"(a) : "l"(p));
  return a;
#endif
}
template <int MP, bool TA, bool TB, int R, typename PA, typename PB>
__device__ __forceinline__ void gd_mma_rows_(gd_flag<false>, gd_acc* x, PA A, int lda, PB B,
                                             int ldb, int bo, int K) {
#pragma unroll
  for (int r = 0; r < R; ++r) gd_mma<MP, TA, TB>(x[r], A, lda, B + r * bo, ldb, K);
}
// ldmatrix .x4 from a shared-window address (the operands' bases converted once, the steps'
// offsets added to them: no generic-to-shared conversion an instruction)
template <bool TR>
__device__ __forceinline__ void gd_ldsm4(unsigned* r, unsigned a) {
"""
    + LDMATRIX4
    + """}
template <int MP, bool TA, bool TB, int R, typename PA, typename PB>
__device__ __forceinline__ void gd_mma_rows_(gd_flag<true>, gd_acc* x, PA A, int lda, PB B,
                                             int ldb, int bo, int K) {
  const int m = (threadIdx.x & 31) >> 3;
  const int rr = threadIdx.x & 7;
  const int ao = TA ? (8 * (m >> 1) + rr) * lda + 8 * (m & 1)
                    : (8 * (m & 1) + rr) * lda + 8 * (m >> 1);
  const int bs = TB ? (8 * (m >> 1) + rr) * ldb + 8 * (m & 1)
                    : (8 * (m & 1) + rr) * ldb + 8 * (m >> 1);
  const unsigned a0 = gd_smem32(A + ao);
  const unsigned b0 = gd_smem32(B + bs);
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += 16) {
    unsigned a[4];
    gd_ldsm4<TA>(a, a0 + 2u * unsigned(TA ? k0 * lda : k0));
#pragma unroll
    for (int r = 0; r < R; ++r) {
      unsigned b[4];
      gd_ldsm4<!TB>(b, b0 + 2u * unsigned(r * bo + (TB ? k0 : k0 * ldb)));
      gd_mma_m16n8k16<gd_kind16(PA(nullptr))>(x[r].c[0], a, b);
      gd_mma_m16n8k16<gd_kind16(PA(nullptr))>(x[r].c[1], a, b + 2);
    }
  }
}
template <int MP, bool TA, bool TB, int R, typename PA, typename PB>
__device__ __forceinline__ void gd_mma_rows(gd_acc* x, PA A, int lda, PB B, int ldb, int bo,
                                            int K) {
  constexpr int KA = gd_kind16(PA(nullptr));
  constexpr bool F = GD_MMA16 && KA != 0 && KA == gd_kind16(PB(nullptr));
  gd_mma_rows_<MP, TA, TB, R>(gd_flag<F>(), x, A, lda, B, ldb, bo, K);
}
// A 16 x 16 tile between the accumulator and threadgroup memory of the pieces' type E, element
// (row, col) at p[row ld + col] (TR: p[col ld + row]): gd_acc_load16 widens to float,
// gd_acc_store16 rounds to E (to nearest even, as static_cast). 16-bit E on sm_90: one ldmatrix /
// stmatrix .x4 (.trans for TR) a tile, lane L giving the address of row L % 8 of 8 x 8 block
// m = L / 8 = (row half m & 1, column half m >> 1), whose fragment is c[m >> 1][2 (m & 1)..];
// otherwise an element a lane at a time. Rows 16-byte aligned.
template <bool TR, typename E>
__device__ __forceinline__ unsigned gd_tile16_addr(E* p, int ld) {
  const int m = (threadIdx.x & 31) >> 3;
  const int l = threadIdx.x & 7;
  const int r0 = 8 * (m & 1);
  const int c0 = 8 * (m >> 1);
  return gd_smem32(TR ? p + (c0 + l) * ld + r0 : p + (r0 + l) * ld + c0);
}
template <bool TR, typename E>
__device__ __forceinline__ void gd_acc_load16(gd_acc& x, const E* p, int ld) {
  constexpr int KIND = gd_kind16((const E*)nullptr);
#if __CUDA_ARCH__ >= 900
  if (KIND != 0) {
    unsigned r[4];
    gd_ldsm4<TR>(r, gd_tile16_addr<TR>(p, ld));
#pragma unroll
    for (int m = 0; m < 4; ++m) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const unsigned short h = (unsigned short)(r[m] >> (16 * j));
        x.c[m >> 1][2 * (m & 1) + j] = static_cast<float>(*reinterpret_cast<const E*>(&h));
      }
    }
    return;
  }
#endif
"""
    + _tile16_lanes("x.c[h][e] = static_cast<float>(TR ? p[j * ld + i] : p[i * ld + j]);")
    + """}
template <bool TR, typename E>
__device__ __forceinline__ void gd_acc_store16(const gd_acc& x, E* p, int ld) {
  constexpr int KIND = gd_kind16((const E*)nullptr);
#if __CUDA_ARCH__ >= 900
  if (KIND != 0) {
    unsigned r[4];
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      unsigned short h[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const E v = static_cast<E>(x.c[m >> 1][2 * (m & 1) + j]);
        h[j] = *reinterpret_cast<const unsigned short*>(&v);
      }
      r[m] = unsigned(h[0]) | (unsigned(h[1]) << 16);
    }
    const unsigned a = gd_tile16_addr<TR>(p, ld);
    if (TR) {
      asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};"
                   ::"r"(a), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
    } else {
      asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};"
                   ::"r"(a), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
    }
    return;
  }
#endif
"""
    + _tile16_lanes("(TR ? p[j * ld + i] : p[i * ld + j]) = static_cast<E>(x.c[h][e]);")
    + """}
// One 16-byte cp.async (H3_BODY's ring) to byte `off` past the threadgroup-memory base s (its
// conversion to a shared-window address is common to a chunk's copies) from g.
__device__ __forceinline__ void gd_cp16(const void* s, unsigned off, const void* g) {
  const unsigned a = gd_smem32(s) + off;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(a), "l"(g));
}
"""
)


def h3_smem(Dk: int, nw: int, nb: int, itemsize: int, C: int = 64) -> int:
    """Bytes of H3_BODY's threadgroup memory: NB stages of W, Kw and U rows, each warp's Sb and
    Db, rows padded by 16 bytes."""
    pad = 16 // itemsize
    stage = 2 * C * (Dk + pad) + C * (16 * nw + pad)
    warp = 16 * (Dk + pad) + C * (16 + pad)
    return (nb * stage + nw * warp) * itemsize


# H3_BODY stamped (round 7): one sampled chunk n = N / 2 of every threadgroup (warp 0's clock),
# split into the wait for its stage (+ the barrier), the next stage's copies issued, Xw^T, H's
# stores, delta, Vn's stores, the update and Sb's stores; the first phase is the state's load and
# chunks 0 .. N/2 - 1, the last the chunks after.
_H3_SB = (
    "    #pragma unroll\n"
    "    for (int c = 0; c < KT; ++c) gd_acc_store16<false>(sa[c], Sb + 16 * c, SP);\n"
)
_H3_AT = "n == N / 2"
H3_STAMPS = (
    ("chunks before", "  for (int q = 0; q < NB - 1; ++q) copy(q);\n"),
    ("wait, barrier", "    gd_copy_wait<NB - 2>();\n", _H3_AT),
    ("copies issued", "    copy(n + NB - 1);\n", _H3_AT),
    ("Xw^T", "    gd_mma_rows<MP, false, true, RT>", _H3_AT),
    ("H stores", "    // H[n] = S (Sb is the state in PT), 16 bytes a lane\n", _H3_AT),
    ("delta", "    // delta^T = U^T - Xw^T", _H3_AT),
    ("Vn stores", "    // Vn = delta (PS is PT), 16 bytes a lane\n", _H3_AT),
    ("update", "    // S = decay S + delta^T Kw\n", _H3_AT),
    ("Sb", _H3_SB, _H3_AT),
    ("chunks after", "    const size_t rn = row0 + size_t(n) * C;\n", "n == N / 2 + 1"),
)


# L32_TILES (round 7, chunk_launch.LDSM32; CUDA, off by default): appended after H3_TILES to the
# header of the WY2 / state / output passes, it makes their gd_mma_staged and gd_copy_tile (by
# macro: the kernel text is unchanged) convert each threadgroup-memory operand's address to the
# shared window once a call and add the offsets in 32 bits, where the tile layer converts a 64-bit
# generic address per ldmatrix and per 16-byte copy (H3's first build spent ~600 of 1130
# instructions a chunk on that). The same copies, ldmatrix and mma in the same order: the same
# outputs bit for bit.
L32_TILES = (
    """
template <int MP, bool TA, bool TB, typename PA, typename PB>
__device__ __forceinline__ void gd_mma_staged_l32(gd_acc& x, PA A, int lda, PB B, int ldb, int K) {
  constexpr int KA = gd_kind16(PA(nullptr));
  constexpr bool F = GD_MMA16 && KA != 0 && KA == gd_kind16(PB(nullptr));
  gd_mma_rows_<MP, TA, TB, 1>(gd_flag<F>(), &x, A, lda, B, ldb, 0, K);
}
template <int NT, int R, int CL, typename D, typename S>
__device__ __forceinline__ void gd_copy_tile_l32(D dst, int dld, S src, size_t sld, int rmax,
                                                 int tid, int cmax = CL) {
  constexpr int V = 16 / int(sizeof(*src));  // elements of a 16-byte copy
  static_assert(CL % V == 0, "gd_copy_tile: whole 16-byte copies a row");
  constexpr int U = R * CL / V;  // copies of the tile
  const unsigned d0 = gd_smem32(dst);
"""
    + COPY_TILE_LOOP
    + """    const int cs = c < cmax ? c : cmax - V;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                     d0 + unsigned((r * dld + c) * int(sizeof(*dst)))),
                 "l"(src + rs * sld + cs));
  }
}
#define gd_mma_staged gd_mma_staged_l32
#define gd_copy_tile gd_copy_tile_l32
"""
)


# ---------------------------------------------------------------------------------------------
# FUSE_Y (round 8, helper chunk8; CUDA, off by default: chunk_launch.FUSE_Y): the output pass's
# Y = q H[n]^T moved into H3_BODY. H3's warp holds the state at chunk n's start in PS as Sb (=
# H[n], the A operand of Xw^T = S W^T); Y^T = S q^T is the same product with the chunk's q rows
# as B (staged in the ring beside W, Kw and U), so the state pass computes it (64 mma a warp a
# chunk, issued behind the update's, off the chain) and writes Y (fp32, [B * Hv, N, Dv, C]: a
# warp's C fragments as 8-byte stores) instead of H. The output pass (O2Y, from O2_VX's text)
# starts its Y accumulators from those values instead of 0 and stages only q and k: half its
# products, a third fewer staged bytes, 36 KB of threadgroup memory instead of 46. Same
# arithmetic element for element (Y's k order, fp32 accumulation, the decay and P Vn after):
# y and the state bit for bit the default's. H is not written at all.
H3Y_NAME = "gated_delta_chunk_h3y"
H3Y_INPUTS = [*H3_INPUTS, "q"]
H3Y_OUTPUTS = ["Yi", "Vn", "state_out"]
O2Y_NAME = O2_NAME + "_y"
O2Y_INPUTS = ["q", "k", "gates", "Yi", "Vn", "dims"]

_H3Y_SWAPS = (
    # the stage: W, Kw, U rows, then q's C rows
    (
        "  constexpr int STAGE = 2 * C * SP + C * UP;  // one chunk's W, Kw and U rows\n",
        "  constexpr int STAGE = 3 * C * SP + C * UP;  // one chunk's W, Kw, U and q rows\n",
    ),
    # q's head and rows
    (
        "  const int vw = v0 + 16 * w;     // this warp's value rows\n",
        """  const int vw = v0 + 16 * w;     // this warp's value rows
  // q: [B, T, Hk, Dk]; Yi: [B * Hv, N, Dv, C] fp32
  const int T = q_shape[1];
  const int Hk = q_shape[2];
  const unsigned Hv = unsigned(U_shape[0]) / unsigned(q_shape[0]);
  const unsigned b_idx = head / Hv;
  const unsigned hk = (head % Hv) / (Hv / unsigned(Hk));
""",
    ),
    # q's rows copied with the stage (rows past T read row T - 1; their y is never written)
    (
        """        gd_cp16(b, unsigned((2 * C * SP + (ur + j * UR) * UP + uc) * PSZ),
                ug + size_t(j) * UR * Dv);
      }
""",
        """        gd_cp16(b, unsigned((2 * C * SP + (ur + j * UR) * UP + uc) * PSZ),
                ug + size_t(j) * UR * Dv);
      }
      #pragma unroll
      for (int j = 0; j < C / KR; ++j) {
        const int t = nn * C + kr + j * KR < T ? nn * C + kr + j * KR : T - 1;
        gd_cp16(b, unsigned((2 * C * SP + C * UP + (kr + j * KR) * SP + kc) * PSZ),
                q + ((size_t(b_idx) * T + t) * Hk + hk) * Dk + kc);
      }
""",
    ),
    (
        "  for (int q = 0; q < NB - 1; ++q) copy(q);\n",
        "  for (int s = 0; s < NB - 1; ++s) copy(s);\n",
    ),
    # no H
    (
        """    // H[n] = S (Sb is the state in PT), 16 bytes a lane
    const size_t hb = (size_t(head) * N + n) * Dv + vw;
    #pragma unroll
    for (int e = (tid & 31) * PAD; e < 16 * Dk; e += 32 * PAD) {
      *reinterpret_cast<gd_vh*>(H + (hb + e / Dk) * Dk + e % Dk) =
          *reinterpret_cast<const GD_TG_PTR gd_vh*>(Sb + (e / Dk) * SP + e % Dk);
    }
""",
        "",
    ),
    # Y^T = S q^T behind the update; Sb's new state after every lane's reads of the old
    (
        "    gd_mma_rows<MP, true, false, KT>(sa, Db, DBL, sk, SP, 16, C);\n",
        """    gd_mma_rows<MP, true, false, KT>(sa, Db, DBL, sk, SP, 16, C);
    // Y^T = S q^T (S: Sb, the state at the chunk's start in PS, the output pass's H[n]): tile r
    // holds the warp's value rows x chunk rows 16 r..
    const GD_TG_PTR PS* sq = su + C * UP;
    gd_acc yt[RT];
    #pragma unroll
    for (int r = 0; r < RT; ++r) gd_acc_zero(yt[r]);
    gd_mma_rows<MP, false, true, RT>(yt, Sb, SP, sq, SP, 16 * SP, Dk);
    __syncwarp();  // Sb's reads done
""",
    ),
    # Y written after the new state's stores: lane 4 g + t4 holds value rows g, g + 8 and chunk
    # rows 16 r + 8 h + 2 t4 + {0, 1}: 8 bytes a store
    (
        "    for (int c = 0; c < KT; ++c) gd_acc_store16<false>(sa[c], Sb + 16 * c, SP);\n  }\n",
        """    for (int c = 0; c < KT; ++c) gd_acc_store16<false>(sa[c], Sb + 16 * c, SP);
    {
      struct alignas(8) gd_y2 {
        float x[2];
      };
      float* yb = Yi + ((size_t(head) * N + n) * Dv + vw + (tid & 31) / 4) * C + 2 * (tid & 3);
      #pragma unroll
      for (int r = 0; r < RT; ++r) {
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
          #pragma unroll
          for (int e = 0; e < 2; ++e) {
            gd_y2 o;
            o.x[0] = yt[r].c[h][2 * e];
            o.x[1] = yt[r].c[h][2 * e + 1];
            *reinterpret_cast<gd_y2*>(yb + 8 * e * C + 16 * r + 8 * h) = o;
          }
        }
      }
    }
  }
""",
    ),
)


def _swapped(body: str, swaps) -> str:
    """body with each (old, new) of swaps replaced; each old occurs exactly once."""
    for old, new in swaps:
        assert body.count(old) == 1, old
        body = body.replace(old, new)
    return body


def h3y_body() -> str:
    """H3_BODY computing the output pass's Y = q H[n]^T (FUSE_Y) and writing it as Yi instead
    of H."""
    return _swapped(H3_BODY, _H3Y_SWAPS)


def h3y_smem(Dk: int, nw: int, nb: int, itemsize: int, C: int = 64) -> int:
    """Bytes of H3Y's threadgroup memory: H3's and the ring's q rows."""
    return h3_smem(Dk, nw, nb, itemsize, C) + nb * C * (Dk + 16 // itemsize) * itemsize


# O2_BODY's copy of H's slice in GD_O2_COPY (the macro's lines joined by Python's backslash-newline)
_i = O2_BODY.index("      gd_copy_tile<NT, BVO, DS>(st_ + 2 * C * SQ, SQ, H + hrow")
_O2_H_COPY = O2_BODY[_i : O2_BODY.index("tid);", _i) + len("tid);")]
_O2Y_SWAPS = (
    (
        "  constexpr int STG = (2 * C + BVO) * SQ;                    // staged elements a stage\n",
        "  constexpr int STG = 2 * C * SQ;  // staged elements a stage: q, k\n",
    ),
    ("  const size_t hrow = ((size_t(head) * N + n) * Dv + v0) * Dk;\n", ""),
    (
        _O2_H_COPY,
        "",
    ),
    ("    GD_TG_PTR gd_staged<YT>* hs = qs + 2 * C * SQ;\n", ""),
    (_y_tiles_mma("qs", "hs", "SQ"), ""),
    # Y from the state pass, loaded before the slices (in flight with them). Dv is a multiple
    # of 16 here (chunk_launch.fuse_y_warps): a value tile past Dv reads the last one instead,
    # never written to y (a clamp a tile: one an element spilled 60 bytes at three an SM)
    (
        "  for (int u = 0; u < YTW; ++u) gd_acc_zero(ya[u]);\n",
        """  for (int u = 0; u < YTW; ++u) {
    const int e = w + NW * u;
    const int vt = v0 + 16 * (e % YC) < Dv ? v0 + 16 * (e % YC) : Dv - 16;
    const float* yb = Yi + ((size_t(head) * N + n) * Dv + vt + 2 * (tid & 3)) * C +
                      16 * (e / YC) + (tid & 31) / 4;
    #pragma unroll
    for (int h = 0; h < 2; ++h) {
      #pragma unroll
      for (int c = 0; c < 4; ++c) ya[u].c[h][c] = yb[(8 * h + c % 2) * C + 8 * (c / 2)];
    }
  }
""",
    ),
)


def o2y_body() -> str:
    """O2_VX's output pass (16-bit P, a ring of three) with Y = q H[n]^T read from the state pass
    (FUSE_Y: Yi) instead of computed: q and k staged, not H."""
    return _swapped(o2_vx_body(True, 3), _O2Y_SWAPS)


# ---------------------------------------------------------------------------------------------
# FUSE_O (round 8, helper chunk8; CUDA, off by default: chunk_launch.FUSE_O): one pass over the
# chunks for the state and y. The output pass's work that does not depend on the state, P = D o
# q k^T (masked, rounded to the pieces' type as O2 makes it), moves to a pass of its own, O2P
# (O2Y's slices of q k^T, one threadgroup a chunk and head instead of one a value tile, P written
# [B * Hv, N, C, C] in the pieces' type, tiles above the diagonal unwritten); the rest goes into
# H3Y, as H3O: with P's rows and the gates in the ring, after Y^T = S q^T the warp decays Y's
# columns (valid_t ? gamma_t Y : 0), adds y^T += delta^T P^T (A: its Db, which the update
# reads too; K = 16 (r + 1) a row tile, as O2), stages y^T in PS (stmatrix .trans, rounded as
# O2's static_cast) and writes rows t < T 16 bytes a lane, as Vn was. Neither H, Yi nor Vn is
# written. The same arithmetic as O2_VX element for element (P's bf16 values, the decay before
# P Vn, the k order): y and the state bit for bit the defaults'.
O2P_NAME = O2_NAME + "_p"
O2P_INPUTS = ["q", "k", "gates", "dims"]
O2P_OUTPUTS = ["P"]
H3O_NAME = "gated_delta_chunk_h3o"
H3O_INPUTS = [*H3_INPUTS, "q", "P"]
H3O_OUTPUTS = ["y", "state_out"]


def o2p_body() -> str:
    """O2Y's q k^T slices, then P made from the accumulators and written to P (FUSE_O)."""
    body = o2y_body()
    cut = body.index("#undef GD_O2_COPY\n") + len("#undef GD_O2_COPY\n")
    tail = body[body.index("#undef GD_DECAY_R\n#undef GD_O2_P16\n") :]
    head = _swapped(
        body[:cut],
        (
            ("  const int Dv = Vn_shape[2];\n", ""),
            (_rows_to_registers("xv", "Vn", "BVO"), ""),
            (_swaps_text(_O2Y_SWAPS, "  for (int u = 0; u < YTW; ++u) gd_acc_zero(ya[u]);\n"), ""),
            ("  gd_acc ya[YTW];\n", ""),
            (
                "  // Vn's rows for this chunk and value tile (columns clamped), in flight with the"
                " first slices.\n",
                "",
            ),
        ),
    )
    keep = "j <= i && ok[i] != 0.0f && ok[j] != 0.0f"
    make = _lower_tiles_vx("qk", "Pg", "C", "PS", keep, "dij")
    return (
        head
        + "  // P [B * Hv, N, C, C]: row i, column j of chunk n at (head N + n) C C + i C + j\n"
        + "  YT* Pg = P + (size_t(head) * N + n) * C * C;\n"
        + make
        + tail
    )


def _swaps_text(swaps, old: str) -> str:
    """The new text that swaps put in old's place."""
    return next(new for o, new in swaps if o == old)


_H3O_SWAPS = (
    # the stage: W, Kw, U, q rows, then P's C rows and the chunk's gates (4 floats a row)
    (
        "  constexpr int STAGE = 3 * C * SP + C * UP;  // one chunk's W, Kw, U and q rows\n",
        """  constexpr int PP = C + PAD;  // row stride of the staged P rows
  constexpr int GO = 3 * C * SP + C * UP + C * PP;  // the staged gates: a row of 16 bytes
  constexpr int STAGE = GO + C * (16 / PSZ);  // one chunk's W, Kw, U, q, P rows and gates
""",
    ),
    (
        "  constexpr int WARP = 16 * SP + C * DBL;     // a warp's Sb and Db\n",
        "  constexpr int WARP = 16 * SP + 2 * C * DBL;  // a warp's Sb, Db and y^T (Yb)\n",
    ),
    (
        "  GD_TG_PTR PS* Db = Sb + 16 * SP;                // this warp's delta in PS: C x 16\n",
        """  GD_TG_PTR PS* Db = Sb + 16 * SP;                // this warp's delta in PS: C x 16
  GD_TG_PTR PS* Yb = Db + C * DBL;                 // this warp's y in PS: C x 16
  constexpr int PR = NT / (C / PAD);  // P rows a round of copies
  static_assert(NT % (C / PAD) == 0 && C % PR == 0, "H3O_BODY copies");
  const int hv = int(head % Hv);
""",
    ),
    # P's rows and the gates copied with the stage
    (
        """      const PT* ug = U + (r0 + ur) * Dv + v0 + uc;
""",
        """      const PT* pg = P + (r0 + tid / (C / PAD)) * C + (tid % (C / PAD)) * PAD;
      #pragma unroll
      for (int j = 0; j < C / PR; ++j) {
        gd_cp16(b, unsigned((3 * C * SP + C * UP + (tid / (C / PAD) + j * PR) * PP +
                             (tid % (C / PAD)) * PAD) * PSZ),
                pg + size_t(j) * PR * C);
      }
      for (int i = tid; i < C; i += NT) gd_cp16(b, unsigned((GO + i * (16 / PSZ)) * PSZ),
                                                 gates + (r0 + i) * 4);
      const PT* ug = U + (r0 + ur) * Dv + v0 + uc;
""",
    ),
    # no Vn
    (
        """    // Vn = delta (PS is PT), 16 bytes a lane
    #pragma unroll
    for (int e = (tid & 31) * PAD; e < C * 16; e += 32 * PAD) {
      *reinterpret_cast<gd_vh*>(Vn + (rn + e / 16) * Dv + vw + e % 16) =
          *reinterpret_cast<const GD_TG_PTR gd_vh*>(Db + (e / 16) * DBL + e % 16);
    }
""",
        "",
    ),
    # Y's decay by columns, then y^T += delta^T P^T
    (
        "    __syncwarp();  // Sb's reads done\n",
        """    __syncwarp();  // Sb's reads done
    // y^T's columns are the chunk's rows t: Y_t := valid_t ? gamma_t Y_t : 0 (O2's decay)
    const GD_TG_PTR float* sg = reinterpret_cast<const GD_TG_PTR float*>(sw + GO);
    #pragma unroll
    for (int r = 0; r < RT; ++r) {
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t = 16 * r + 8 * h + 2 * (tid & 3) + (e & 1);
          yt[r].c[h][e] = sg[4 * t + 2] != 0.0f ? sg[4 * t] * yt[r].c[h][e] : 0.0f;
        }
      }
    }
    // y^T += delta^T P^T: row tile r of P (rows t) over its columns s < 16 (r + 1)
    const GD_TG_PTR PS* sp = sq + C * SP;
    #pragma unroll
    for (int r = 0; r < RT; ++r) {
      gd_mma_rows<MP, true, true, 1>(yt + r, Db, DBL, sp + 16 * r * PP, PP, 0, 16 * (r + 1));
    }
""",
    ),
    # the new state's stores, then y: staged in PS (y^T transposed back), rows t < T written
    (
        "    for (int c = 0; c < KT; ++c) gd_acc_store16<false>(sa[c], Sb + 16 * c, SP);\n  }\n",
        """    for (int c = 0; c < KT; ++c) gd_acc_store16<false>(sa[c], Sb + 16 * c, SP);
    #pragma unroll
    for (int r = 0; r < RT; ++r) gd_acc_store16<true>(yt[r], Yb + 16 * r * DBL, DBL);
    __syncwarp();  // Yb complete
    #pragma unroll
    for (int e = (tid & 31) * PAD; e < C * 16; e += 32 * PAD) {
      const int t = n * C + e / 16;
      if (t < T) {
        *reinterpret_cast<gd_vh*>(y + ((size_t(b_idx) * T + t) * Hv + hv) * Dv + vw + e % 16) =
            *reinterpret_cast<const GD_TG_PTR gd_vh*>(Yb + (e / 16) * DBL + e % 16);
      }
    }
  }
""",
    ),
)


def h3o_body(early: bool = False) -> str:
    """H3Y without Yi, with y made and written (FUSE_O: chunk_source's FUSE_O comment). early
    (chunk_launch.H3O_EARLY): Y^T = S q^T issued right behind Xw^T = S W^T (the same A, ready at
    the chunk's start) instead of behind the update, so that its products' latency is covered by
    delta and the update, and Y's decay and P^T find it done; the same products: the same y."""
    body = _swapped(_swapped(H3_BODY, _H3Y_SWAPS[:-1]), _H3O_SWAPS)
    if early:
        at = "    gd_mma_rows<MP, false, true, RT>(xt, Sb, SP, sw, SP, 16 * SP, Dk);\n"
        body = _swapped(body, ((_H3O_YT, ""), (at, at + _H3O_YT)))
    return body


# H3Y / H3O's Y^T product (the text _H3Y_SWAPS puts behind the update)
_H3O_YT = (
    "    // Y^T = S q^T (S: Sb, the state at the chunk's start in PS, the output pass's H[n]):"
    " tile r\n"
    """    // holds the warp's value rows x chunk rows 16 r..
    const GD_TG_PTR PS* sq = su + C * UP;
    gd_acc yt[RT];
    #pragma unroll
    for (int r = 0; r < RT; ++r) gd_acc_zero(yt[r]);
    gd_mma_rows<MP, false, true, RT>(yt, Sb, SP, sq, SP, 16 * SP, Dk);
"""
)


def h3o_smem(Dk: int, nw: int, nb: int, itemsize: int, C: int = 64) -> int:
    """Bytes of H3O's threadgroup memory: H3Y's, the ring's P rows and gates, a warp's Yb."""
    pad = 16 // itemsize
    stage = C * (C + pad) * itemsize + C * 16
    return h3y_smem(Dk, nw, nb, itemsize, C) + nb * stage + nw * C * (16 + pad) * itemsize


# H3O stamped (round 8): one sampled chunk n = N / 2 of every threadgroup (warp 0's clock), as
# H3_STAMPS, with H3O's phases: Y^T = S q^T, Y's decay, y^T += delta^T P^T, y's stores.
H3O_STAMPS = (
    ("chunks before", "  for (int s = 0; s < NB - 1; ++s) copy(s);\n"),
    ("wait, barrier", "    gd_copy_wait<NB - 2>();\n", _H3_AT),
    ("copies issued", "    copy(n + NB - 1);\n", _H3_AT),
    ("Xw^T", "    gd_mma_rows<MP, false, true, RT>(xt,", _H3_AT),
    ("delta", "    // delta^T = U^T - Xw^T", _H3_AT),
    ("update", "    // S = decay S + delta^T Kw\n", _H3_AT),
    ("Y^T", "    // Y^T = S q^T", _H3_AT),
    ("Y decay", "    // y^T's columns are the chunk's rows t", _H3_AT),
    ("P^T", "    // y^T += delta^T P^T", _H3_AT),
    ("Sb", _H3_SB, _H3_AT),
    (
        "y stores",
        "    #pragma unroll\n    for (int r = 0; r < RT; ++r) gd_acc_store16<true>(yt[r], Yb",
        _H3_AT,
    ),
    ("chunks after", "    const size_t rn = row0 + size_t(n) * C;\n", "n == N / 2 + 1"),
)


# ---------------------------------------------------------------------------------------------
# Round 9 (helper chunk9, issue 9; CUDA, off by default: chunk_launch.WY_P): FUSE_O's P made by
# the WY pass (WY2_VX), and the P pass (O2P) and its launch gone. The WY pass already has the
# chunk's gates and k's slices staged for k k^T; q's slices join them: copied with each of the
# first Dk / DS k slices (cp.async, the same commit groups) into a ring of NB stages in Ai's
# space (Ai is not written before L: 15,360 of its 17,408 bytes at DS 32, NB 3, bf16), q k^T
# made by the same warps' tiles beside k k^T (the call O2P makes, in the same slice and k
# order: the same accumulators), a barrier before L takes Ai back, and P = D o q k^T written
# from the accumulators in L's loop with L's decays (the same GD_DECAY_R1(dij) as O2P's; two
# adjacent columns a 4-byte store). P equal to O2P's bit for bit, so H3O's y and state too.
WY2P_INPUTS_EXTRA = ["q_in"]  # q [B, T, Hk, Dk] (the loop over ring slices is named q)
WY2P_OUTPUTS = [*WY_OUTPUTS, "P"]
# WY2_BODY's copy of a k slice in GD_WY2_COPY (two lines of the macro)
_i = WY2_BODY.index("        gd_copy_tile<NT, C, DS>(st_, SQ, k + krow")
_WY2P_K_COPY = WY2_BODY[_i : WY2_BODY.index("\n", WY2_BODY.index("DS);", _i)) + 1]
_WY2P_SWAPS = (
    (
        _AI16,
        _AI16
        + """  // q's slices during k k^T: a ring of NB stages in Ai's space (free until L)
  GD_TG_PTR PS* qring = (GD_TG_PTR PS*)Ai;
  static_assert(NB * C * SQ * PSZ <= C * CP * 4 && PSZ == 2, "WY2P: q's ring in Ai's space");
""",
    ),
    (
        _WY2P_K_COPY,
        _WY2P_K_COPY
        + """\
        if ((q_) < NSK) {                                                                    \\
          gd_copy_tile<NT, C, DS>(qring + ((q_) % NB) * (C * SQ), SQ, q_in + krow + d0_,     \\
                                  size_t(Hk) * Dk, T - 1 - t0, tid, DS);                     \\
        }                                                                                    \\
""",
    ),
    (
        "  gd_acc_zero(kk[1]);\n",
        "  gd_acc_zero(kk[1]);\n  gd_acc qk[2];  // q k^T\n  gd_acc_zero(qk[0]);\n"
        "  gd_acc_zero(qk[1]);\n",
    ),
    (
        _lower_tiles_mma("kk", "ks", "ks", "SQ"),
        _lower_tiles_mma("kk", "ks", "ks", "SQ")
        + "    GD_TG_PTR PS* qs = qring + (q % NB) * (C * SQ);\n"
        + _lower_tiles_mma("qk", "qs", "ks", "SQ"),
    ),
    (
        "  // 3. L = -beta D k k^T, strictly lower, rows and columns of masked steps 0\n",
        """  gd_barrier();  // every warp done with q's slices: Ai is L's
  // P [B * Hv, N, C, C] (P = D o q k^T, rows i, columns j <= i; tiles above the diagonal
  // unwritten): made with L's decays
  PT* Pg = P + (size_t(head) * N + n) * C * C;
#ifdef __CUDA_ARCH__
#define GD_ST4(p_, u_) (*reinterpret_cast<unsigned int*>(p_) = (u_))
#else
#define GD_ST4(p_, u_) std::memcpy((p_), &(u_), 4)
#endif
#define GD_ST2(p_, a_, b_)                                                      \\
  {                                                                             \\
    const PT a2_ = static_cast<PT>(a_);                                         \\
    const PT b2_ = static_cast<PT>(b_);                                         \\
    const unsigned int u_ =                                                     \\
        unsigned(*reinterpret_cast<const unsigned short*>(&a2_)) |              \\
        (unsigned(*reinterpret_cast<const unsigned short*>(&b2_)) << 16);       \\
    GD_ST4(p_, u_);                                                             \\
  }
  // 3. L = -beta D k k^T, strictly lower, rows and columns of masked steps 0
""",
    ),
)
_WY2P_L = (
    _WY2_L_KEEP,
    "-bs[i] * dij",
)
_WY2P_BEFORE = "      float pe = 0.0f;  // P (i, j) of an even e, stored with (i, j + 1)\n"
_WY2P_THEN = """\
          const float po = j <= i && ok[i] != 0.0f && ok[j] != 0.0f ? dij * qk[c].c[h][e]
                                                                    : 0.0f;
          if (e % 2 == 0) {
            pe = po;
          } else {
            GD_ST2(Pg + i * C + j - 1, pe, po);
          }
"""


def wy2p_body() -> str:
    """wy2_vx_body making FUSE_O's P as well (WY_P): q's slices staged beside k's, q k^T by the
    k k^T tiles, P written with L."""
    body = _swapped(wy2_vx_body(), _WY2P_SWAPS)
    plain = _lower_tiles_vx("kk", "Ai", "CP", "float", *_WY2P_L, zero=True)
    with_p = _lower_tiles_vx(
        "kk", "Ai", "CP", "float", *_WY2P_L, zero=True, before=_WY2P_BEFORE, then=_WY2P_THEN
    )
    return _swapped(body, ((plain, with_p),)) + "#undef GD_ST2\n#undef GD_ST4\n"


# Round 9 (helper chunk9; CUDA, off by default: chunk_launch.H3O_PRODUCERS): H3O's copies issued
# by warps of their own. Round 8's stamps (H200, 2026-12-03 04:07) put 1,431 of a chunk's ~4,520
# cycles in issuing the next chunk's copies (~61 cp.async a thread with their 64-bit address
# arithmetic), on the same warps as the chain: at two warps a threadgroup and one threadgroup an
# SM, each warp is alone on its SM sub-partition, so every instruction's latency is the chain's.
# Here the threadgroup has 2 NT threads: warps w < NW compute as before and issue no copies; the
# NW producer warps (tid >= NT, copy thread ct = tid - NT: the same NT threads' share of each
# copy as before) issue the ring's copies (the first NB - 1 chunks, then chunk n + NB - 1 after
# chunk n's barrier) and go to the next chunk's barrier. The barrier protocol is the same (a
# stage is refilled only after every compute warp has passed the barrier that ends its use), so
# the same bytes reach the same products: y and the state bit for bit H3O's.
_H3OP_SWAPS = (
    (
        "  const int kr = tid / (Dk / PAD);\n  const int kc = (tid % (Dk / PAD)) * PAD;\n"
        "  const int ur = tid / (BV / PAD);\n  const int uc = (tid % (BV / PAD)) * PAD;\n",
        "  const int ct = tid - NT;  // a producer warp's thread (tid >= NT): the copies' index\n"
        "  const int kr = ct / (Dk / PAD);\n  const int kc = (ct % (Dk / PAD)) * PAD;\n"
        "  const int ur = ct / (BV / PAD);\n  const int uc = (ct % (BV / PAD)) * PAD;\n",
    ),
    (
        "      const PT* pg = P + (r0 + tid / (C / PAD)) * C + (tid % (C / PAD)) * PAD;\n",
        "      const PT* pg = P + (r0 + ct / (C / PAD)) * C + (ct % (C / PAD)) * PAD;\n",
    ),
    (
        "(3 * C * SP + C * UP + (tid / (C / PAD) + j * PR) * PP +\n"
        "                             (tid % (C / PAD)) * PAD) * PSZ)",
        "(3 * C * SP + C * UP + (ct / (C / PAD) + j * PR) * PP +\n"
        "                             (ct % (C / PAD)) * PAD) * PSZ)",
    ),
    (
        "      for (int i = tid; i < C; i += NT) gd_cp16(",
        "      for (int i = ct; i < C; i += NT) gd_cp16(",
    ),
    (
        """  #pragma unroll
  for (int c = 0; c < KT; ++c) {
    gd_acc_load(sa[c], state_in + (size_t(head) * Dv + vw) * Dk + 16 * c, Dk);
    gd_acc_store16<false>(sa[c], Sb + 16 * c, SP);
  }
""",
        """  if (tid < NT) {
    #pragma unroll
    for (int c = 0; c < KT; ++c) {
      gd_acc_load(sa[c], state_in + (size_t(head) * Dv + vw) * Dk + 16 * c, Dk);
      gd_acc_store16<false>(sa[c], Sb + 16 * c, SP);
    }
  }
""",
    ),
    (
        "  for (int s = 0; s < NB - 1; ++s) copy(s);\n",
        "  if (tid >= NT) {\n    for (int s = 0; s < NB - 1; ++s) copy(s);\n  }\n",
    ),
    (
        "    copy(n + NB - 1);\n",
        "    if (tid >= NT) {  // a producer: chunk n + NB - 1's copies, then the next barrier\n"
        "      copy(n + NB - 1);\n      continue;\n    }\n",
    ),
    (
        """  gd_copy_wait<0>();
  #pragma unroll
  for (int c = 0; c < KT; ++c) {
    gd_acc_store(sa[c], state_out + (size_t(head) * Dv + vw) * Dk + 16 * c, Dk);
  }
""",
        """  gd_copy_wait<0>();
  if (tid < NT) {
    #pragma unroll
    for (int c = 0; c < KT; ++c) {
      gd_acc_store(sa[c], state_out + (size_t(head) * Dv + vw) * Dk + 16 * c, Dk);
    }
  }
""",
    ),
)


def h3op_body(early: bool = True) -> str:
    """h3o_body(early) with its copies issued by NW producer warps of their own (H3O_PRODUCERS:
    the threadgroup has 2 NT threads)."""
    return _swapped(h3o_body(early), _H3OP_SWAPS)


# H3O_PRODUCERS = 2 (round 9; CUDA, off): the producers also write y. Round 8's stamps put ~600
# cycles of H3O's chunk in "y stores" (y^T staged to Yb, then 16-byte global stores with their
# 64-bit addresses). Here a computing warp only stages chunk n's y^T, into Yb's half n % 2 (Yb
# doubled); after chunk n + 1's barrier (which the warp reaches only once Yb is complete)
# producer warp p writes computing warp p's y of chunk n from it, behind its copies; the last
# chunk's after a barrier past the loop. Half n % 2 is staged again in chunk n + 2, after the
# barrier that the producers reach only once they have written it. Same values: y bit for bit.
# H3O's y stores (the end of _H3O_SWAPS' last text: a lane's 16-byte rows of Yb to y)
_i = _H3O_SWAPS[-1][1].index("    #pragma unroll\n    for (int e = (tid & 31) * PAD;")
_H3OPY_STORES = _H3O_SWAPS[-1][1][_i : _H3O_SWAPS[-1][1].rindex("    }\n") + len("    }\n")]
_H3OPY_SWAPS = (
    (
        "  constexpr int WARP = 16 * SP + 2 * C * DBL;  // a warp's Sb, Db and y^T (Yb)\n",
        "  constexpr int WARP = 16 * SP + 3 * C * DBL;  // a warp's Sb, Db and two y^T (Yb)\n",
    ),
    (
        "    for (int r = 0; r < RT; ++r) gd_acc_store16<true>(yt[r], Yb + 16 * r * DBL, DBL);\n"
        "    __syncwarp();  // Yb complete\n" + _H3OPY_STORES,
        """    for (int r = 0; r < RT; ++r) {
      gd_acc_store16<true>(yt[r], Yb + ((n % 2) * C + 16 * r) * DBL, DBL);  // producers store it
    }
""",
    ),
    (
        "  for (int n = 0; n < N; ++n) {\n",
        """\
  // a producer (tid >= NT): y of chunk nn from computing warp (tid - NT) / 32's Yb (half nn % 2)
  auto ystore = [&](int nn) {
    const int pw = (tid - NT) / 32;
    const int vw = v0 + 16 * pw;
    const GD_TG_PTR PS* Yb = sm + NB * STAGE + pw * WARP + 16 * SP + C * DBL + (nn % 2) * C * DBL;
    const int n = nn;
"""
        + _H3OPY_STORES
        + """  };
  for (int n = 0; n < N; ++n) {
""",
    ),
    (
        "      copy(n + NB - 1);\n      continue;\n",
        "      copy(n + NB - 1);\n      if (n > 0) ystore(n - 1);\n      continue;\n",
    ),
    (
        "  gd_copy_wait<0>();\n  if (tid < NT) {\n",
        """  gd_copy_wait<0>();
  gd_barrier();  // the last chunk's Yb complete
  if (tid >= NT && N > 0) ystore(N - 1);
  if (tid < NT) {
""",
    ),
)


def h3opy_body() -> str:
    """h3op_body (H3O_EARLY's order) with y written by the producer warps (H3O_PRODUCERS = 2)."""
    return _swapped(h3op_body(True), _H3OPY_SWAPS)


def h3opy_smem(Dk: int, nw: int, nb: int, itemsize: int, C: int = 64) -> int:
    """Bytes of h3opy_body's threadgroup memory: H3O's and a second Yb a warp."""
    return h3o_smem(Dk, nw, nb, itemsize, C) + nw * C * (16 + 16 // itemsize) * itemsize


# The producer builds stamped (round 9): one sampled chunk n = N / 2 of every threadgroup, warp
# 0's clock (a computing warp), in H3O_EARLY's order (Y^T behind Xw^T); "producers' branch" is
# the computing warps' test of tid >= NT, where H3O_STAMPS has "copies issued".
_H3O_AT = {a[0]: a for a in H3O_STAMPS}
H3OP_STAMPS = (
    ("chunks before", "  if (tid >= NT) {\n    for (int s = 0; s < NB - 1; ++s) copy(s);\n"),
    _H3O_AT["wait, barrier"],
    ("producers' branch", "    if (tid >= NT) {  // a producer", _H3_AT),
    *(_H3O_AT[x] for x in ("Xw^T", "Y^T", "delta", "update", "Y decay", "P^T", "Sb")),
    _H3O_AT["y stores"],
    _H3O_AT["chunks after"],
)
# h3opy_body's: "y staged" (y^T to Yb only; the producers store it).
H3OPY_STAMPS = tuple(
    (
        "y staged",
        "    #pragma unroll\n    for (int r = 0; r < RT; ++r) {\n"
        "      gd_acc_store16<true>(yt[r], Yb + ((n % 2)",
        _H3_AT,
    )
    if a[0] == "y stores"
    else a
    for a in H3OP_STAMPS
)


# ---------------------------------------------------------------------------------------------
# Round 10 (helper chunk10; CUDA, off by default: chunk_launch.H3O_SPLIT): the state pass's 16
# value rows shared by two computing warps. With one warp a chain (H3O_PRODUCERS' build, Hv 32:
# 128 threadgroups of two computing warps, one an SM) only 256 of the H200's 528 SM
# sub-partitions do the products: each computing warp issues 212 mma a chunk (Xw^T 64, Y^T 64,
# update 64, P^T 20) on its sub-partition's tensor core, the others idle. Here computing warp w is
# half hf = w % 2 of pair pw = w / 2 (value rows v0 + 16 pw): its Xw^T, Y^T, delta, Y's decay,
# P^T and y are chunk row tiles hf and RT - 1 - hf (P^T's triangle balanced: 1 + 4 and 2 + 3
# steps of 16), its state the key tiles KH hf .. KH hf + KH - 1 (KH = KT / 2: the update's half
# of Kw's columns), so each warp issues 106 mma a chunk. Both halves' delta rows meet in the
# pair's Db (the update and P^T read all of it): one named barrier of the pair's 64 threads a
# chunk (gd_pair_barrier, CUDA bar.sync 1 + pw); both halves' new state meets in Sb at the
# chunk's barrier, which every warp passes anyway. Every output element is the same products in
# the same order as H3O's (only which warp issues them changes): y and the state bit for bit.
# Threadgroup: 2 NT computing threads (NT = 32 NW, the template's, stays the copies' thread
# count), then the NW producer warps; the same threadgroup memory as H3O (a pair's Sb, Db, Yb in
# place of a warp's).
H3_PAIR_TILES = """
// The named barrier `id` (1 ..) of n threads (a multiple of 32): H3O_SPLIT's warp pairs.
__device__ __forceinline__ void gd_pair_barrier(int id, int n) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}
"""
_H3OS_ROW = "(j == 0 ? hf : RT - 1 - hf)"  # chunk row tile j (of 2) of half hf
_H3OS_SWAPS = (
    (
        "  constexpr int KT = Dk / 16;    // key tiles of the state\n",
        "  constexpr int KT = Dk / 16;    // key tiles of the state\n"
        "  constexpr int KH = KT / 2;     // key tiles of a half's state\n",
    ),
    (
        'NB >= 2, "H3_BODY layout");\n',
        'NB >= 2, "H3_BODY layout");\n'
        '  static_assert(KT % 2 == 0 && RT == 4, "H3O_SPLIT: halves of the keys, 2 row tiles");\n'
        "  constexpr int NT2 = 2 * NT;  // computing threads: two warps a 16 value rows\n",
    ),
    (
        "  const int w = tid / 32;\n",
        "  const int w = tid / 32;\n"
        "  const int pw = w / 2;  // the pair: value rows v0 + 16 pw ..\n"
        "  const int hf = w % 2;  // the half: key tiles KH hf .., row tiles hf, RT - 1 - hf\n",
    ),
    (
        "  const int vw = v0 + 16 * w;     // this warp's value rows\n",
        "  const int vw = v0 + 16 * pw;    // this pair's value rows\n",
    ),
    (
        "  GD_TG_PTR PS* Sb = sm + NB * STAGE + w * WARP;  // this warp's state in PS: 16 x Dk\n",
        "  GD_TG_PTR PS* Sb = sm + NB * STAGE + pw * WARP;  // this pair's state in PS: 16 x Dk\n",
    ),
    (
        """  gd_acc sa[KT];
  if (tid < NT) {
    #pragma unroll
    for (int c = 0; c < KT; ++c) {
      gd_acc_load(sa[c], state_in + (size_t(head) * Dv + vw) * Dk + 16 * c, Dk);
      gd_acc_store16<false>(sa[c], Sb + 16 * c, SP);
    }
  }
""",
        """  gd_acc sa[KH];  // this half's: key tiles KH hf + c
  if (tid < NT2) {
    #pragma unroll
    for (int c = 0; c < KH; ++c) {
      gd_acc_load(sa[c], state_in + (size_t(head) * Dv + vw) * Dk + 16 * (KH * hf + c), Dk);
      gd_acc_store16<false>(sa[c], Sb + 16 * (KH * hf + c), SP);
    }
  }
""",
    ),
    (
        "  const int ct = tid - NT;  // a producer warp's thread (tid >= NT): the copies' index\n",
        "  const int ct = tid - NT2;  // a producer's thread (tid >= NT2): the copies' index\n",
    ),
    (
        "  if (tid >= NT) {\n    for (int s = 0; s < NB - 1; ++s) copy(s);\n",
        "  if (tid >= NT2) {\n    for (int s = 0; s < NB - 1; ++s) copy(s);\n",
    ),
    (
        "    if (tid >= NT) {  // a producer",
        "    if (tid >= NT2) {  // a producer",
    ),
    (
        """    gd_acc xt[RT];
    #pragma unroll
    for (int r = 0; r < RT; ++r) gd_acc_zero(xt[r]);
    gd_mma_rows<MP, false, true, RT>(xt, Sb, SP, sw, SP, 16 * SP, Dk);
""",
        """    // (this half's tiles j: rows 16 r_j.., r_0 = hf, r_1 = RT - 1 - hf)
    gd_acc xt[2];
    #pragma unroll
    for (int j = 0; j < 2; ++j) gd_acc_zero(xt[j]);
    gd_mma_rows<MP, false, true, 2>(xt, Sb, SP, sw + 16 * hf * SP, SP, 16 * (RT - 1 - 2 * hf) * SP,
                                    Dk);
""",
    ),
    (
        """    gd_acc yt[RT];
    #pragma unroll
    for (int r = 0; r < RT; ++r) gd_acc_zero(yt[r]);
    gd_mma_rows<MP, false, true, RT>(yt, Sb, SP, sq, SP, 16 * SP, Dk);
""",
        """    gd_acc yt[2];
    #pragma unroll
    for (int j = 0; j < 2; ++j) gd_acc_zero(yt[j]);
    gd_mma_rows<MP, false, true, 2>(yt, Sb, SP, sq + 16 * hf * SP, SP, 16 * (RT - 1 - 2 * hf) * SP,
                                    Dk);
""",
    ),
    (
        """    for (int r = 0; r < RT; ++r) {
      gd_acc dl;
      gd_acc_load16<true>(dl, su + 16 * r * UP + 16 * w, UP);
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) dl.c[h][e] -= xt[r].c[h][e];
      }
      gd_acc_store16<true>(dl, Db + 16 * r * DBL, DBL);
    }
    __syncwarp();  // Db complete; Sb's reads (the products, H) done
""",
        f"""    for (int j = 0; j < 2; ++j) {{
      const int r = {_H3OS_ROW};
      gd_acc dl;
      gd_acc_load16<true>(dl, su + 16 * r * UP + 16 * pw, UP);
      #pragma unroll
      for (int h = 0; h < 2; ++h) {{
        #pragma unroll
        for (int e = 0; e < 4; ++e) dl.c[h][e] -= xt[j].c[h][e];
      }}
      gd_acc_store16<true>(dl, Db + 16 * r * DBL, DBL);
    }}
    gd_pair_barrier(1 + pw, 64);  // the pair's Db complete; both halves' Sb reads done
""",
    ),
    (
        """    for (int c = 0; c < KT; ++c) gd_acc_scale(sa[c], dc);
    gd_mma_rows<MP, true, false, KT>(sa, Db, DBL, sk, SP, 16, C);
""",
        """    for (int c = 0; c < KH; ++c) gd_acc_scale(sa[c], dc);
    gd_mma_rows<MP, true, false, KH>(sa, Db, DBL, sk + 16 * KH * hf, SP, 16, C);
""",
    ),
    (
        """    for (int r = 0; r < RT; ++r) {
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t = 16 * r + 8 * h + 2 * (tid & 3) + (e & 1);
          yt[r].c[h][e] = sg[4 * t + 2] != 0.0f ? sg[4 * t] * yt[r].c[h][e] : 0.0f;
        }
      }
    }
""",
        f"""    for (int j = 0; j < 2; ++j) {{
      const int r = {_H3OS_ROW};
      #pragma unroll
      for (int h = 0; h < 2; ++h) {{
        #pragma unroll
        for (int e = 0; e < 4; ++e) {{
          const int t = 16 * r + 8 * h + 2 * (tid & 3) + (e & 1);
          yt[j].c[h][e] = sg[4 * t + 2] != 0.0f ? sg[4 * t] * yt[j].c[h][e] : 0.0f;
        }}
      }}
    }}
""",
    ),
    (
        """    for (int r = 0; r < RT; ++r) {
      gd_mma_rows<MP, true, true, 1>(yt + r, Db, DBL, sp + 16 * r * PP, PP, 0, 16 * (r + 1));
    }
    #pragma unroll
    for (int c = 0; c < KT; ++c) gd_acc_store16<false>(sa[c], Sb + 16 * c, SP);
    #pragma unroll
    for (int r = 0; r < RT; ++r) gd_acc_store16<true>(yt[r], Yb + 16 * r * DBL, DBL);
    __syncwarp();  // Yb complete
    #pragma unroll
    for (int e = (tid & 31) * PAD; e < C * 16; e += 32 * PAD) {
      const int t = n * C + e / 16;
      if (t < T) {
        *reinterpret_cast<gd_vh*>(y + ((size_t(b_idx) * T + t) * Hv + hv) * Dv + vw + e % 16) =
            *reinterpret_cast<const GD_TG_PTR gd_vh*>(Yb + (e / 16) * DBL + e % 16);
      }
    }
""",
        f"""    // (K = 16 (r + 1) a compile-time constant in each branch: the two tiles' chains
    // interleave; the branch is the warp's, hf)
    if (hf == 0) {{
      gd_mma_rows<MP, true, true, 1>(yt, Db, DBL, sp, PP, 0, 16);
      gd_mma_rows<MP, true, true, 1>(yt + 1, Db, DBL, sp + 16 * (RT - 1) * PP, PP, 0, 16 * RT);
    }} else {{
      gd_mma_rows<MP, true, true, 1>(yt, Db, DBL, sp + 16 * PP, PP, 0, 32);
      gd_mma_rows<MP, true, true, 1>(yt + 1, Db, DBL, sp + 16 * (RT - 2) * PP, PP, 0,
                                     16 * (RT - 1));
    }}
    #pragma unroll
    for (int c = 0; c < KH; ++c) gd_acc_store16<false>(sa[c], Sb + 16 * (KH * hf + c), SP);
    #pragma unroll
    for (int j = 0; j < 2; ++j) gd_acc_store16<true>(yt[j], Yb + 16 * {_H3OS_ROW} * DBL, DBL);
    __syncwarp();  // this half's rows of Yb complete
    #pragma unroll
    for (int j = 0; j < 2; ++j) {{
      const int r = {_H3OS_ROW};
      #pragma unroll
      for (int e = (tid & 31) * PAD; e < 16 * 16; e += 32 * PAD) {{
        const int t = n * C + 16 * r + e / 16;
        if (t < T) {{
          *reinterpret_cast<gd_vh*>(y + ((size_t(b_idx) * T + t) * Hv + hv) * Dv + vw + e % 16) =
              *reinterpret_cast<const GD_TG_PTR gd_vh*>(Yb + (16 * r + e / 16) * DBL + e % 16);
        }}
      }}
    }}
""",
    ),
    (
        """  if (tid < NT) {
    #pragma unroll
    for (int c = 0; c < KT; ++c) {
      gd_acc_store(sa[c], state_out + (size_t(head) * Dv + vw) * Dk + 16 * c, Dk);
    }
  }
""",
        """  if (tid < NT2) {
    #pragma unroll
    for (int c = 0; c < KH; ++c) {
      gd_acc_store(sa[c], state_out + (size_t(head) * Dv + vw) * Dk + 16 * (KH * hf + c), Dk);
    }
  }
""",
    ),
)


def h3ops_body() -> str:
    """h3op_body (H3O_EARLY's order, producer warps) with each 16 value rows shared by two
    computing warps (H3O_SPLIT: the threadgroup has 3 NT threads)."""
    return _swapped(h3op_body(True), _H3OS_SWAPS)


# h3ops_body stamped: H3OP_STAMPS' phases in its text (thread 0: half 0 of pair 0), with "pair
# barrier" (the wait for the partner's delta rows) split off the end of "delta"; the producers'
# branch (~36 cycles) in "wait, barrier" (the slots: 12 phases at most).
H3OPS_STAMPS = (
    ("chunks before", "  if (tid >= NT2) {\n    for (int s = 0; s < NB - 1; ++s) copy(s);\n"),
    _H3O_AT["wait, barrier"],
    ("Xw^T", "    gd_mma_rows<MP, false, true, 2>(xt,", _H3_AT),
    _H3O_AT["Y^T"],
    _H3O_AT["delta"],
    ("pair barrier", "    gd_pair_barrier(1 + pw, 64);", _H3_AT),
    *(_H3O_AT[x] for x in ("update", "Y decay", "P^T")),
    ("Sb", "    for (int c = 0; c < KH; ++c) gd_acc_store16<false>(sa[c], Sb", _H3_AT),
    ("y stores", "    for (int j = 0; j < 2; ++j) gd_acc_store16<true>(yt[j], Yb", _H3_AT),
    _H3O_AT["chunks after"],
)
