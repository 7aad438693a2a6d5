"""Prefill attention GPU kernel text (FlashAttention-2 style), written once for Metal and CUDA
over the chunk kernels' tile layer (gated_delta/chunk_launch.py `_TILES`: a warp's 16 x 16 fp32
accumulator `gd_acc`, `gd_mma_staged` products of staged operands; tensor cores on CUDA,
simdgroup matrices on Metal). Text only: building and launching is `prefill.py`.

softmax(q k^T * scale + mask) v for the last T positions of S keys (q [B, Hq, T, D], k, v
[B, Hkv, SC, D], the cache's layout, of which the first S = kv_len[0] <= SC keys are read: a KV
cache's buffers are read in place; query token t is at position S - T + t), in one launch:

A threadgroup of W warps owns one (row b, kv head) and WG = gcd(G, W) of its G query heads
times TQ = 16 W / WG query tokens; warp w owns 16 consecutive tokens of one query head (head
(w % WG), tokens 16 (w / WG) ..). The threadgroup walks the keys in blocks of BK:
  1. S = q k^T over D in slices of DS: each warp stages its 16 query rows' slice, the
     threadgroup the block's key slice (`gd_copy_tile`, rows past the end read the last row),
     then each warp adds its 16 x BK scores (BK / 16 tiles) with `gd_mma_staged`.
  2. Online softmax, in fp32, by the lanes (lane l: row l % 16, half l / 16 of the block's
     columns; the halves meet by a shuffle): s *= scale; the row's running maximum m over its
     visible keys; p = exp(s - m) rounded to the input dtype (as the blocked ops path rounds
     its weights before they meet v), 0 for a key the row does not see; l = l alpha + sum p
     (of the rounded p); alpha = exp(m_old - m) rescales the output rows (`at_acc_scale_rows`).
  3. O += P V over D in slices of DS: the threadgroup stages the block's value slice, each warp
     adds P (16 x BK, in the input dtype) times it into its output tiles.
Finally o = O / l (0 where the row saw no key), rounded once to the output dtype.

That is version 1 (BODY). Version 2 (BODY2, session 11; the default) does the same arithmetic
with fewer trips through memory: each warp loads its 16 query rows once, as register fragments
(`at_frag`, 16 x 16 each: D / 16 of them), and P's fragments once a block; the key and value
slices (BK x DS, a block's D / DS key slices then its value slices) stream through a ring of
AT_RING slots by cp.async, AT_RING - 1 in flight ahead of the one in use (one barrier a slice);
the rows' rescaling is skipped where no row's maximum moved (alpha = 1 for all 16). Its
threadgroup memory: AT_RING BK (DS + 8) staged + 16 W (BK + 8) for P (the query rows pass
through it once) + 16 W (BK + 17) floats.
A warp that sees no key of a block (causal) skips its products (the result is the same: all its
p are 0 and alpha 1); the threadgroup stops at the last key its last token sees.

Which keys query token t sees: positions j < S, and
    AT_CAUSAL 1: j <= S - T + t
    AT_MASK   1: mask[b or 0, 0, t or 0, j] (bool [Bm, 1, Tm, S], Bm in {1, B}, Tm in {1, T})
A masked key takes no part (p = 0 exactly); a row that sees no key at all (left padding) gives
o = 0, where the blocked ops path gives the mean of the values (its masked scores are the
dtype's lowest, not -inf); such rows are padding, which no real position reads.

Precision: the scores are fp32 sums of exact products (bf16 / fp16 operands; CUDA's
mma.m16n8k16, Metal's fp32 simdgroup products), scaled in fp32 (the blocked path scales q in its
dtype first and rounds the scores to it; for a power-of-two scale, 1 / 16 at D = 256, the scaling
is exact in both); softmax statistics fp32; P rounded to the input dtype; P V in fp32; the output
rounded once.

Template arguments: D (a multiple of DS), BK (keys a block, a multiple of 16), DS (columns
staged at a time, a multiple of 16), W (warps), MP (the tile layer's operand precision; bf16 /
fp16 are exact at 1), OT (the input and output dtype). B, the head counts, T and SC are read
from the input shapes, S from kv_len. Threadgroup memory (elements of gd_staged<OT>: OT on
CUDA, float on Metal): (16 W + BK) (DS + 8) staged + 16 W (BK + 8) for P, plus 16 W (BK + 17)
floats.

Helpers: the chunk tile layer and copies (gd_acc, gd_acc_zero, gd_acc_store, gd_mma_staged,
gd_copy_tile / commit / wait, gd_barrier, GD_TG, GD_TG16, GD_TG_PTR, gd_staged), the base
header's gd_shuffle and gd_exp, and `prefill.py`'s `at_acc_scale_rows(acc, dg)` (multiply row
i of the tile by dg[17 i]: dg a 16 x 16 row-major matrix, zero off its diagonal) and, version 2,
its register operands (at_frag, at_frag_load, at_mma_frag). The prologue
names at_tid (the thread in the threadgroup, 1-D), at_tg_x, at_tg_y.

References: FlashAttention-2 (Dao 2023): query rows split over warps, keys streamed through
on-chip memory, online softmax with rescaled accumulators.
"""

from __future__ import annotations

NAME = "attn_prefill"
INPUTS = ["q", "k", "v", "scale", "kv_len"]
OUTPUTS = ["out"]

_DEFINES = """
#define AT_NEG (-3.0e38f)
#define AT_MAX(a, b) ((a) > (b) ? (a) : (b))
#define AT_MIN(a, b) ((a) < (b) ? (a) : (b))
"""
# BODY2's walk of staged slices: key block j0 (a multiple of BK) has 2 NSL slices, its NSL key
# slices then its NSL value slices; slice p_ counted from block jb's first (p_ a constant
# after unrolling) is block jb + (p_ / (2 NSL)) BK's part p_ % (2 NSL), into ring slot
# (base + p_) % AT_RING, base the slot of block jb's first. Every thread commits a group per
# call, a copy or none (past the last block), so gd_copy_wait's counts stay uniform. The copy:
# at_copy_tile (its shared address folded: 1,341 instructions a block in the causal BK 32 loop
# against 1,455), except in the bool-mask builds, where ptxas then spills 4 bytes (outside the
# loop, but a spill): gd_copy_tile there.
_DEFINES2 = """
#if AT_MASK
#define AT_COPY gd_copy_tile
#else
#define AT_COPY at_copy_tile
#endif
#define AT_ISSUE(jb, p_)                                                                      \\
  {                                                                                           \\
    const int j_ = (jb) + ((p_) / (2 * NSL)) * BK;                                            \\
    if (j_ < n_tg) {                                                                          \\
      AT_COPY<32 * W, BK, DS>(ring + ((base + (p_)) % AT_RING) * RS, QL,                  \\
                                   ((p_) % (2 * NSL) < NSL ? k : v) + kv0 + size_t(j_) * D +  \\
                                       ((p_) % NSL) * DS,                                     \\
                                   size_t(D), S - 1 - j_, tid);                               \\
    }                                                                                         \\
    gd_copy_commit();                                                                         \\
  }
"""
_UNDEFS = """
#undef AT_NEG
#undef AT_MAX
#undef AT_MIN
#undef AT_MASK
#undef AT_CAUSAL
#undef AT_ISSUE
#undef AT_RING
#undef AT_COPY
"""
# Version 3's own switches (its text only: versions 1 and 2 keep theirs to the letter): the lazy
# rescaling's margin (log2 units), the score products' chains at BK 16, the ring's copy
# (at_copy_rows: no per-row clamp but in a walk's last block).
_DEFINES3 = """
#define AT_LAZY 8.0f
#define AT_CHAINS 2
#undef AT_COPY
#define AT_COPY at_copy_rows
"""
_UNDEFS3 = """
#undef AT_LAZY
#undef AT_CHAINS
"""

# The walk's set-up, shared by both bodies: shapes, this threadgroup's heads and tokens, the
# keys it reads.
_HEAD = """
  // q: [B, Hq, T, D]; k, v: [B, Hkv, SC, D], the first S = kv_len[0] <= SC keys filled (a KV
  // cache's buffers, read in place); scale: [1] fp32; mask: [Bm, 1, Tm, S] bool
  // out: [B, Hq, T, D]
  using ST = gd_staged<OT>;
  constexpr int NKT = BK / 16;  // score tiles a warp a block
  constexpr int NDT = D / 16;   // output tiles a warp
  constexpr int HALF = BK / 2;  // columns a lane takes in the softmax
  // staged row strides, 16 bytes (CUDA) past the tile: a 128-byte stride would put the 8 rows
  // of an ldmatrix in the same banks
  constexpr int QL = DS + 8;
  constexpr int PL = BK + 8;
  const int Hq = q_shape[1];
  const int T = q_shape[2];
  const int Hkv = k_shape[1];
  const int S = kv_len[0];
  const int SC = k_shape[2];  // a head's keys in the buffers: its rows' stride
  const int G = Hq / Hkv;
  int WG = W;  // gcd(G, W): query heads a threadgroup
  for (int a = G; a != 0;) {
    const int r = WG % a;
    WG = a;
    a = r;
  }
  const int TQ = 16 * (W / WG);  // query tokens a threadgroup
  const int NQB = (T + TQ - 1) / TQ;
  const int tid = int(at_tid);
  const int w = tid / 32;
  const int lane = tid % 32;
  // the last query blocks (the most keys, if causal) first
  const int qb = NQB - 1 - int(at_tg_x) % NQB;
  const int hg = int(at_tg_x) / NQB;
  const int bh = int(at_tg_y);  // b * Hkv + kv head
  const int b = bh / Hkv;
  const int head = (bh % Hkv) * G + hg * WG + w % WG;
  const int t0 = qb * TQ + 16 * (w / WG);  // the warp's first token (may be >= T)
  const int qrow0 = AT_MIN(t0, T - 1);
  const int offset = S - T;  // position of token 0
  const float sc = scale[0];
  // keys the threadgroup needs: all, or up to its last token's position
#if AT_CAUSAL
  const int n_tg = AT_MIN(S, offset + AT_MIN(qb * TQ + TQ, T));
  // the warp's last key (-1: a warp past T sees none)
  const int last_w = t0 < T ? offset + AT_MIN(t0 + 15, T - 1) : -1;
#else
  const int n_tg = S;
#endif
#if AT_MASK
  const int Tm = mask_shape[2];
  const int mask0 = (mask_shape[0] == 1 ? 0 : b) * Tm * S;
#endif

"""

_STATE = """  GD_TG16 ST ps[16 * W * PL];   // each warp's weights P
  GD_TG float sf[16 * W * BK];  // each warp's scores; at the end its output tiles
  GD_TG float dg[16 * W * 16];  // each warp's row factors, on a diagonal
  GD_TG float ls[16 * W];       // each warp's row sums, at the end
  GD_TG_PTR ST* pw = ps + 16 * w * PL;
  GD_TG_PTR float* sw = sf + 16 * w * BK;
  GD_TG_PTR float* dw = dg + 256 * w;
  for (int e = lane; e < 256; e += 32) {
    dw[e] = 0.0f;
  }

  const size_t q0 = (size_t(b) * Hq + head) * T * D;
  const size_t kv0 = size_t(bh) * SC * D;
  // the row this lane takes in the softmax, its token (clamped) and its half of the columns
  const int row = lane % 16;
  const int c0 = (lane / 16) * HALF;
  const int tok = AT_MIN(t0 + row, T - 1);
  (void)tok;
#if AT_MASK
  // the row's mask from mask's start (under 2^31 elements: prefill.mask_supported)
  const int mrow = mask0 + (Tm == 1 ? 0 : tok) * S;
#endif
  (void)offset;
  float m = AT_NEG;
  float l = 0.0f;
  gd_acc o[NDT];
  #pragma unroll
  for (int c = 0; c < NDT; ++c) {
    gd_acc_zero(o[c]);
  }

"""

# Both bodies' softmax of a block (the scores s in registers on entry).
_SOFTMAX = """    // 2. online softmax of the block
    #pragma unroll
    for (int c = 0; c < NKT; ++c) {
      gd_acc_store(s[c], sw + 16 * c, BK);
    }
    gd_barrier();
    float mx = AT_NEG;
    for (int c = c0; c < c0 + HALF; ++c) {
      const int j = j0 + c;
      bool see = j < S;
#if AT_CAUSAL
      see = see && j <= offset + tok;
#endif
#if AT_MASK
      see = see && bool(mask[mrow + AT_MIN(j, S - 1)]);
#endif
      const float x = sw[row * BK + c] * sc;
      sw[row * BK + c] = see ? x : AT_NEG;
      mx = see ? AT_MAX(mx, x) : mx;
    }
    const float mx_other = gd_shuffle(mx, lane ^ 16);  // not inside AT_MAX: one call a lane
    mx = AT_MAX(mx, mx_other);
    const float m_new = AT_MAX(m, mx);
    const float alpha = gd_exp(m - m_new);
    float sum = 0.0f;
    for (int c = c0; c < c0 + HALF; ++c) {
      const float x = sw[row * BK + c];
      // AT_NEG marks a key the row does not see (a seen score is far above it)
      const float p = x > 0.5f * AT_NEG ? float(static_cast<OT>(gd_exp(x - m_new))) : 0.0f;
      pw[row * PL + c] = static_cast<ST>(p);
      sum += p;
    }
    sum += gd_shuffle(sum, lane ^ 16);
    l = l * alpha + sum;
    m = m_new;
    if (lane < 16) {
      dw[row * 17] = alpha;
    }
    gd_barrier();
"""

# Version 1: Q re-staged with each key slice, every slice waited for at once.
_WALK1 = (
    """  GD_TG16 ST qs[16 * W * QL];   // each warp's query rows, one slice
  GD_TG16 ST ks[BK * QL];       // the block's key (then value) rows, one slice
  GD_TG_PTR ST* qw = qs + 16 * w * QL;
"""
    + _STATE
    + """  for (int j0 = 0; j0 < n_tg; j0 += BK) {
#if AT_CAUSAL
    const bool live = j0 <= last_w;  // uniform in the warp
#else
    const bool live = t0 < T;
#endif
    // 1. scores
    gd_acc s[NKT];
    #pragma unroll
    for (int c = 0; c < NKT; ++c) {
      gd_acc_zero(s[c]);
    }
    for (int ds = 0; ds < D; ds += DS) {
      gd_barrier();  // the last slice's readers are done
      gd_copy_tile<32, 16, DS>(qw, QL, q + q0 + size_t(qrow0) * D + ds, size_t(D),
                               T - 1 - qrow0, lane);
      gd_copy_tile<32 * W, BK, DS>(ks, QL, k + kv0 + size_t(j0) * D + ds, size_t(D),
                                   S - 1 - j0, tid);
      gd_copy_commit();
      gd_copy_wait<0>();
      gd_barrier();
      if (live) {
        #pragma unroll
        for (int c = 0; c < NKT; ++c) {
          gd_mma_staged<MP, false, true>(s[c], qw, QL, ks + 16 * c * QL, QL, DS);
        }
      }
    }
"""
    + _SOFTMAX
    + """    // 3. O = diag(alpha) O + P V
    if (live) {
      #pragma unroll
      for (int c = 0; c < NDT; ++c) {
        at_acc_scale_rows(o[c], dw);
      }
    }
    #pragma unroll
    for (int ds = 0; ds < D; ds += DS) {
      gd_barrier();
      gd_copy_tile<32 * W, BK, DS>(ks, QL, v + kv0 + size_t(j0) * D + ds, size_t(D),
                                   S - 1 - j0, tid);
      gd_copy_commit();
      gd_copy_wait<0>();
      gd_barrier();
      if (live) {
        #pragma unroll
        for (int c = 0; c < DS / 16; ++c) {
          gd_mma_staged<MP, false, false>(o[ds / 16 + c], pw, PL, ks + 16 * c, QL, BK);
        }
      }
    }
  }

"""
)


# Versions 2 and 3's pieces of the walk (the same text in both):
# the warp's query rows into its register fragments qf, QC columns at a time, staged through
# `rows` (row stride `ld`, threadgroup memory of the warp's own)
def _query_frags(rows: str, ld: str) -> str:
    return f"""  #pragma unroll
  for (int c = 0; c < D; c += QC) {{
    gd_barrier();
    gd_copy_tile<32, 16, QC>({rows}, {ld}, q + q0 + size_t(qrow0) * D + c, size_t(D), T - 1 - qrow0,
                             lane);
    gd_copy_commit();
    gd_copy_wait<0>();
    gd_barrier();
    #pragma unroll
    for (int kk = 0; kk < QC / 16; ++kk) {{
      at_frag_load(qf[c / 16 + kk], {rows} + 16 * kk, {ld});
    }}
  }}
"""


# the ring's set-up and its first AT_RING - 1 slices in flight
_RING_START = """  constexpr int NSL = D / DS;  // slices of a block's keys (and of its values)
  constexpr int RS = BK * QL;  // a ring slot
  int base = 0;                // the ring slot of this block's first slice
  #pragma unroll
  for (int p = 0; p < AT_RING - 1; ++p) {
    AT_ISSUE(0, p)
  }
"""


# opens the loop over a block's key slices (first "") or value slices (first "NSL + "): slice i
# waited for, the one AT_RING - 1 ahead issued, `ptr` its slot; then, if live, the products'
# loops (closed by the caller)
def _ring_slices(first: str, ptr: str) -> str:
    return f"""    #pragma unroll
    for (int i = 0; i < NSL; ++i) {{
      gd_copy_wait<AT_RING - 2>();
      gd_barrier();
      AT_ISSUE(j0, {first}i + AT_RING - 1)
      GD_TG_PTR ST* {ptr} = ring + ((base + {first}i) % AT_RING) * RS;
      if (live) {{
        #pragma unroll
"""


# step 3's products, O += P V over the block's value slices (P's fragments pf), and the ring's
# base moved on to the next block's first slice
_PV = (
    _ring_slices("NSL + ", "vb")
    + """        for (int c = 0; c < DS / 16; ++c) {
          #pragma unroll
          for (int kk = 0; kk < NKT; ++kk) {
            at_mma_frag<false>(o[i * (DS / 16) + c], pf[kk], vb + 16 * kk * QL + 16 * c, QL);
          }
        }
      }
    }
    // (a constant 0 where the ring's size divides a block's slices: slots known at compile time)
    base = (2 * NSL) % AT_RING == 0 ? 0 : (base + 2 * NSL) % AT_RING;
  }
"""
)

# Version 2 (session 11): Q and P as register fragments (at_frag), loaded once; key and value
# slices through a ring of AT_RING slots, the next ones in flight while one is used.
_WALK2 = (
    """  GD_TG16 ST ring[AT_RING * BK * QL];  // AT_RING staged key / value slices
"""
    + _STATE
    + """  // 0. the warp's query rows into registers (an A fragment a 16 columns), once, staged
  // through the warp's weight rows
  constexpr int QC = D % BK == 0 ? BK : 16;  // columns staged at a time
  at_frag qf[NDT];
"""
    + _query_frags("pw", "PL")
    + """\
  // the walk's slices (AT_ISSUE), AT_RING - 1 in flight ahead of the one in use: slice n is
  // waited for, then a barrier makes it visible and frees slot (n - 1) % AT_RING for slice
  // n + AT_RING - 1
"""
    + _RING_START
    + """
  for (int j0 = 0; j0 < n_tg; j0 += BK) {
#if AT_CAUSAL
    const bool live = j0 <= last_w;  // uniform in the warp
#else
    const bool live = t0 < T;
#endif
    // 1. scores: Q (registers) times the block's key slices
    gd_acc s[NKT];
    #pragma unroll
    for (int c = 0; c < NKT; ++c) {
      gd_acc_zero(s[c]);
    }
"""
    + _ring_slices("", "kb")
    + """        for (int c = 0; c < NKT; ++c) {
          #pragma unroll
          for (int kk = 0; kk < DS / 16; ++kk) {
            at_mma_frag<true>(s[c], qf[i * (DS / 16) + kk], kb + 16 * c * QL + 16 * kk, QL);
          }
        }
      }
    }
"""
    + _SOFTMAX
    + """    // 3. O = diag(alpha) O + P V, P's fragments loaded once a block; the rescaling only
    // where some row's maximum moved (alpha < 1; lanes r and r + 16 hold row r's, the same)
    float moved = alpha < 1.0f ? 1.0f : 0.0f;
    #pragma unroll
    for (int bit = 1; bit < 16; bit *= 2) {
      const float other = gd_shuffle(moved, lane ^ bit);  // not inside AT_MAX: one call a lane
      moved = AT_MAX(moved, other);
    }
    at_frag pf[NKT];
    if (live) {
      if (moved > 0.0f) {
        #pragma unroll
        for (int c = 0; c < NDT; ++c) {
          at_acc_scale_rows(o[c], dw);
        }
      }
      #pragma unroll
      for (int kk = 0; kk < NKT; ++kk) {
        at_frag_load(pf[kk], pw + 16 * kk, PL);
      }
    }
"""
    + _PV
    + """
"""
)


# Version 3's lazy rescaling of the lane's row r (0: row at_row0, its elements 0-3; 1: row
# at_row0 + 8, elements 4-7) after a block's maximum mx_r
def _lazy_rescale(r: int) -> str:
    return f"""      if (mx{r} > m{r} + AT_LAZY) {{
        const float alpha = at_exp2(m{r} - mx{r});
        m{r} = mx{r};
        l{r} *= alpha;
        #pragma unroll
        for (int c = 0; c < NDT; ++c) {{
          #pragma unroll
          for (int e = {4 * r}; e < {4 * r + 4}; ++e) {{
            at_el(o[c], e) *= alpha;
          }}
        }}
      }}
"""


# Version 3 (session 12): version 2's walk with the softmax in registers. Each lane keeps the
# scores of its own accumulator elements (at_el: rows at_row0 and at_row0 + 8 of the warp's 16,
# the layout the backend's tile has), reduces a row over the 4 lanes holding it (at_row_max),
# and turns the rounded weights into P's A fragments in place (at_frag_round): no scores or
# weights in threadgroup memory and no barriers outside the ring's. exp2 with the scale and
# log2(e) folded into one factor. The rows' reference maxima move lazily: only when a block's
# maximum exceeds a row's by more than AT_LAZY (log2 units; the weights stay <= 2^AT_LAZY, the
# same relative rounding), so most blocks rescale nothing. Partial row sums per lane, reduced
# once at the end; the output written from the accumulators. Threadgroup memory: the ring only,
# max(AT_RING BK, 16 W) (DS + 8) staged (the query rows pass through it once, before the walk;
# 16 W (16 + 8) where 16 W > AT_RING BK).
_WALK3 = (
    """  // the query rows pass through the ring's memory first, QC columns at a time (warp w's
  // rows at 16 w (QC + 8)): whole slices where the ring holds them, else 16 columns
  constexpr int QC = 16 * W <= AT_RING * BK ? DS : 16;
  constexpr int RN = AT_MAX(AT_RING * BK * QL, 16 * W * (QC + 8));
  GD_TG16 ST ring[RN];  // AT_RING staged key / value slices
  const size_t q0 = (size_t(b) * Hq + head) * T * D;
  const size_t kv0 = size_t(bh) * SC * D;
  // the lane's two rows: r0 and r0 + 8 of the warp's 16 (at_el elements 0-3 and 4-7)
  const int r0 = at_row0(lane);
  const int tok0 = AT_MIN(t0 + r0, T - 1);
  const int tok1 = AT_MIN(t0 + r0 + 8, T - 1);
  (void)tok0;
  (void)tok1;
#if AT_MASK
  const int mrow0 = mask0 + (Tm == 1 ? 0 : tok0) * S;
  const int mrow1 = mask0 + (Tm == 1 ? 0 : tok1) * S;
#endif
  (void)offset;
  const float sl2 = sc * 1.4426950408889634f;  // scores to log2 units
  float m0 = AT_NEG, m1 = AT_NEG;              // the rows' reference maxima (log2 units)
  float l0 = 0.0f, l1 = 0.0f;                  // the lane's part of the rows' sums
  gd_acc o[NDT];
  #pragma unroll
  for (int c = 0; c < NDT; ++c) {
    gd_acc_zero(o[c]);
  }
  // 0. the warp's query rows into registers (an A fragment a 16 columns), once
  at_frag qf[NDT];
  GD_TG_PTR ST* qw = ring + 16 * w * (QC + 8);
"""
    + _query_frags("qw", "QC + 8")
    + """  gd_barrier();  // the query rows are read before the ring's first copies land
"""
    + _RING_START
    + """
  for (int j0 = 0; j0 < n_tg; j0 += BK) {
#if AT_CAUSAL
    const bool live = j0 <= last_w;  // uniform in the warp
    // every row of the warp sees every key of the block: no per-key test
    const bool full = !AT_MASK && j0 + BK <= S && j0 + BK - 1 <= offset + t0;
#else
    const bool live = t0 < T;
    const bool full = !AT_MASK && j0 + BK <= S;
#endif
    // 1. scores: Q (registers) times the block's key slices; with one score tile (BK 16) the
    // D / 16 products of a tile are two chains (even and odd 16-column steps into s and s2,
    // added at the end), not one chain of dependent products
    gd_acc s[NKT];
    gd_acc s2[NKT];
    #pragma unroll
    for (int c = 0; c < NKT; ++c) {
      gd_acc_zero(s[c]);
      gd_acc_zero(s2[c]);
    }
"""
    + _ring_slices("", "kb")
    + """        for (int c = 0; c < NKT; ++c) {
          #pragma unroll
          for (int kk = 0; kk < DS / 16; ++kk) {
            if (AT_CHAINS == 2 && NKT == 1 && (i * (DS / 16) + kk) % 2 == 1) {
              at_mma_frag<true>(s2[c], qf[i * (DS / 16) + kk], kb + 16 * c * QL + 16 * kk, QL);
            } else {
              at_mma_frag<true>(s[c], qf[i * (DS / 16) + kk], kb + 16 * c * QL + 16 * kk, QL);
            }
          }
        }
      }
    }
    if (AT_CHAINS == 2 && NKT == 1) {
      #pragma unroll
      for (int e = 0; e < 8; ++e) {
        at_el(s[0], e) += at_el(s2[0], e);
      }
    }
    // 2. online softmax in registers (a warp with no key of the block visible skips it: its
    // weights would all be 0)
    at_frag pf[NKT];
    if (live) {
      float mx0 = AT_NEG, mx1 = AT_NEG;
      #pragma unroll
      for (int c = 0; c < NKT; ++c) {
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
          float x = at_el(s[c], e) * sl2;
          if (!full) {
            const int j = j0 + 16 * c + at_col(e, lane);
            bool see = j < S;
#if AT_CAUSAL
            see = see && j <= offset + (e < 4 ? tok0 : tok1);
#endif
#if AT_MASK
            see = see && bool(mask[(e < 4 ? mrow0 : mrow1) + AT_MIN(j, S - 1)]);
#endif
            x = see ? x : AT_NEG;
          }
          at_el(s[c], e) = x;
          if (e < 4) {
            mx0 = at_fmax(mx0, x);
          } else {
            mx1 = at_fmax(mx1, x);
          }
        }
      }
      mx0 = at_row_max(mx0, lane);
      mx1 = at_row_max(mx1, lane);
      // a row's reference maximum moves when the block's is above it by more than AT_LAZY
      // (AT_NEG + AT_LAZY is AT_NEG: a row's first visible key moves it); its output rows and
      // sum scale by 2^(old - new) then (the 4 lanes of a row decide alike)
"""
    + _lazy_rescale(0)
    + _lazy_rescale(1)
    + """      #pragma unroll
      for (int c = 0; c < NKT; ++c) {
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float x = at_el(s[c], e);
          // AT_NEG marks a key the row does not see (a seen score is far above it)
          at_el(s[c], e) = x > 0.5f * AT_NEG ? at_exp2(x - (e < 4 ? m0 : m1)) : 0.0f;
        }
        // the weights rounded to the input dtype, as P's A fragment and in s (for the sums)
        at_frag_round<OT>(pf[c], s[c]);
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (e < 4) {
            l0 += at_el(s[c], e);
          } else {
            l1 += at_el(s[c], e);
          }
        }
      }
    }
    // 3. O += P V
"""
    + _PV
    + """
  // o = O / l (0 where the row saw no key), rounded once, from the accumulators; rows past T
  // are not written
  l0 = at_row_sum(l0, lane);
  l1 = at_row_sum(l1, lane);
  const float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;
  const float i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
  #pragma unroll
  for (int c = 0; c < NDT; ++c) {
    #pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int t = t0 + r0 + (e < 4 ? 0 : 8);
      if (t < T) {
        out[q0 + size_t(t) * D + 16 * c + at_col(e, lane)] =
            static_cast<OT>(at_el(o[c], e) * (e < 4 ? i0 : i1));
      }
    }
  }
"""
)


# Both bodies' end: o = O / l through the warp's score rows.
_TAIL = """  // o = O / l (O times 1 / l, 0 where the row saw no key), rounded once; rows past T are
  // not written
  if (lane < 16) {
    ls[16 * w + row] = l > 0.0f ? 1.0f / l : 0.0f;
  }
  const int oc = lane % 16;  // the lane's column of a tile
  #pragma unroll
  for (int c = 0; c < NDT; ++c) {
    gd_barrier();
    gd_acc_store(o[c], sw, BK);
    gd_barrier();
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = 2 * i + lane / 16;
      if (t0 + r < T) {
        const float x = sw[r * BK + oc] * ls[16 * w + r];
        out[q0 + size_t(t0 + r) * D + 16 * c + oc] = static_cast<OT>(x);
      }
    }
  }
"""

BODY = _HEAD + _WALK1 + _TAIL
BODY2 = _HEAD + _WALK2 + _TAIL
BODY3 = _HEAD + _WALK3
VERSIONS = (1, 2, 3)


def name(mask: bool, causal: bool, version: int = 2, ring: int | None = None) -> str:
    """Kernel `name=`, e.g. `attn_prefill_causal` (version 1), `attn_prefill_causal_v2r4`
    (version 2, a ring of 4: each text its own name)."""
    tail = "" if version == 1 else f"_v{version}" + (f"r{ring}" if ring else "")
    return NAME + ("_mask" if mask else "") + ("_causal" if causal else "") + tail


def inputs(mask: bool) -> list[str]:
    return INPUTS + (["mask"] if mask else [])


def variants() -> list[tuple[bool, bool]]:
    """(mask, causal) of every variant."""
    return [(False, False), (False, True), (True, False), (True, True)]


def body(mask: bool, causal: bool, version: int = 2, ring: int = 3) -> str:
    """The kernel text of a variant; versions 2 and 3 stage through `ring` (>= 2) slots."""
    if version not in VERSIONS or ring < 2:
        raise ValueError(f"prefill body: version {version}, ring {ring}")
    switches = f"\n#define AT_MASK {int(mask)}\n#define AT_CAUSAL {int(causal)}\n"
    if version == 1:
        return switches + _DEFINES + BODY + _UNDEFS
    switches += f"#define AT_RING {ring}\n"
    if version == 2:
        return switches + _DEFINES + _DEFINES2 + BODY2 + _UNDEFS
    return switches + _DEFINES + _DEFINES2 + _DEFINES3 + BODY3 + _UNDEFS3 + _UNDEFS
