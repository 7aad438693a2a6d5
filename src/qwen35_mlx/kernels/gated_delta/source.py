"""Fused gated-delta GPU kernel text, written once for Metal and CUDA (text only: building and
launching the kernels is `launch.py`).

Per step t, per value head h (key head h // (Hv // Hk)), per value row i of the state:
    S_i *= g_t;  delta_i = (v_ti - S_i . k_t) * beta_t;  S_i += delta_i k_t;  y_ti = S_i . q_t

Shapes: q, k [B, T, Hk, Dk]; v, y [B, T, Hv, Dv]; g [B, T, Hv] or [B, T, Hv, Dk]; beta, a, b
[B, T, Hv]; A_log, dt_bias [Hv]; state [B, Hv, Dv, Dk] fp32 (Dk contiguous); mask [B, T] bool.

Layout: a group of L lanes of one 32-lane SIMD-group / warp owns one value row of the state and
keeps it in registers for all T steps; a warp holds 32 / L rows, a threadgroup W warps of one
head. Lane `sub` of a row group holds the float4 column chunks sub, sub + L, sub + 2L, ... so each
float4 load of the warp reads whole 32-byte sectors (coalesced); the row sums (g S_i) . k,
(g S_i) . q and k . q are reduced over the L lanes with xor shuffles, all three at once, since
y_ti = (g S_i) . q + delta_i (k . q). Rows past Dv are clamped for loads and never stored, but
still take part in the shuffles. q and k are read from their key head in place.
The next step's inputs are loaded before the current step is computed (software pipelining),
and the step loop has no branch (the last load is clamped), so the compiler can interleave it.
Scalar gates (g, beta, or a, b with the fused gating math, and the mask) are read, and
transformed, once per chunk of 32 steps, one step per lane, then broadcast by shuffles: every
warp of a head needs them, so per-step loads and transcendentals would be repeated 10-100x.

One template, `BODY`, holds every variant; `kernel_body(gate, mask, decode)` puts the variant's
compile-time switches in front of it (preprocessor `#define`s, `#undef`ed at the end):
    GD_GATE    GD_SCALAR (g, beta given), GD_PER_KEY (g [.., Dk]) or GD_FUSED (a, b, A_log,
               dt_bias: the gates are computed in the kernel)
    GD_MASK    1: a mask input; padded steps leave the state alone and write y = 0
    GD_DECODE  1: T == 1 at compile time, so the step loops run once and fold away, the
               pipelined next-step load is left out and the gates need no broadcast
    GD_CONV    1 (decode with fused gates only): the whole linear-attention decode step from the
               raw in-projection: q, k and v come from `qkv` [B, C] through the causal depthwise
               conv over [conv_state | qkv], silu, the l2 norms and q's scale, all in the kernel
               (see "Conv decode" below), and the shifted conv state is a third output
    GD_NORM    1 (with GD_CONV only): y leaves through the layer's gated RMSNorm (see "Gated
               norm" below); inputs z, norm_w, norm_eps
The bodies are plain C++ over these helpers, which `metal.py` / `cuda.py` define:
    gd_lane        lane in the SIMD-group / warp (0..31)     (source prologue)
    gd_row_group   warp index along the value rows           (source prologue)
    gd_head        b * Hv + h                                (source prologue)
    gd_group_sum<W>(x)     sum over W adjacent lanes (W a power of two <= 32)
    gd_shuffle(x, j)       lane j's x (fp32), to every lane
    gd_load_f4(p) / gd_store_f4(p, x, y, z, w)   16-byte fp32 load / store
    gd_exp(x), gd_log(x)   fp32 exp / natural log
    gd_prefetch(p)         hint: bring the line at p towards the cache (may be a no-op)
Compile-time template arguments: Dk, L (lanes per value row), P (prefetch distance), YT (y's
dtype); with GD_CONV also K (conv taps) and W (warps per threadgroup). Hk, Hv, Dv and T are read
from the input shapes, so one compiled kernel serves every head count and length.

Conv decode (GD_CONV): qkv [B, C] (C = 2 Hk Dk + Hv Dv, channels [q | k | v]) in the activation
dtype YT; conv_state [B, K-1, C] (the last K-1 inputs); conv_w [C, K] (tap K-1 meets the current
token); a, b [B, Hv]; mask [B]. Outputs y [B, Hv, Dv] (YT), state_out and conv_state_out
[B, K-1, C] (YT, the last K-1 rows of [conv_state | qkv]). The conv and silu run in YT as the
ops path does on MLX's CPU: every product and sum rounded to YT; sigmoid as MLX's CPU op computes
it (e = YT(exp|h|), then YT(1 / (1 + e)) or YT(1 - 1 / (1 + e)) in fp32: MLX's GPU ops round
these intermediates differently, by up to an ulp of YT); silu's product rounded to YT; the l2
norms sum in fp32 and round the normalised q and k to YT, then q times YT(Dk^-0.5) in YT. Each
threadgroup computes the post-silu q and k channels of its key head once (2 Dk of them, staged in
threadgroup memory, 2 KB at Dk = 256); each lane then normalises its own columns, reducing the
sums of squares over its row's L lanes as the recurrence does. Each row computes its own v channel.
Every channel of conv_state_out is written exactly once: the q and k channels of key head hk by
the first threadgroup of value head hk * (Hv / Hk), a v channel by lane 0 of its row.
Extra helpers: gd_threadgroup (the threadgroup-memory qualifier), gd_threadgroup_barrier(),
gd_rsqrt(x).

Gated norm (GD_NORM): z [B, Hv, Dv] in YT (the in_proj_z output), norm_w [Dv] in YT, norm_eps
[1] fp32. y = YT(YT(YT(y0 r) w) silu(z)), y0 the row's YT-rounded output and r = rsqrt(sum of
y0^2 over the head's Dv rows / Dv + eps): what the ops path does (mx.fast.rms_norm as MLX's CPU
fallback rounds it: the normalised value to YT, then times w in YT; silu in fp32 on the fp32
cast; one rounding to YT at the end). The sum needs every row of a head in one threadgroup: the
launch gives a head ceil(Dv / R) warps (`launch.norm_layout`: 4 lanes a row, Dk, Dv <= 128,
at most 16 warps: the registers of a head's state and of each row's q and k bound it), each
warp reduces its rows with shuffles, and the warps' partial sums meet in threadgroup memory
behind one barrier, added in warp order (the same order in every thread, so every row sees the
same sum).

References: mlx-lm `models/gated_delta.py` (the one-warp-per-row Metal kernel);
flash-linear-attention `fla/ops/gated_delta_rule/fused_recurrent.py`.
"""

from __future__ import annotations

import inspect

GATES = ("scalar", "per_key", "fused")
OUTPUT_NAMES = ["y", "state_out"]
CONV_OUTPUT_NAMES = ["y", "state_out", "conv_state_out"]
TOKEN_OUTPUT_NAMES = ["state_tok", "conv_tok"]
NORM_INPUT_NAMES = ["z", "norm_w", "norm_eps"]
MAX_TOKENS = 8  # the conv decode kernel's tokens a row (GD_TOKENS)


def _check_conv(
    gate: str, decode: bool, conv: bool, norm: bool = False, tokens: int = 1, packed=False
) -> None:
    if conv and (gate != "fused" or not decode):
        raise ValueError(f"the conv variant is decode with fused gates, got {gate=}, {decode=}")
    if norm and not conv:
        raise ValueError("the gated norm is part of the conv decode variant only")
    if (tokens != 1 or packed) and not conv:
        raise ValueError("tokens > 1 and the packed projection are conv decode variants only")
    if not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(f"the conv decode kernel takes 1..{MAX_TOKENS} tokens a row, got {tokens}")


def kernel_name(
    gate: str,
    mask: bool,
    decode: bool = False,
    conv: bool = False,
    norm: bool = False,
    tokens: int = 1,
    packed: bool = False,
) -> str:
    """Kernel `name=` with its structural variant, e.g. `gated_delta_step_fused_mask`; the
    conv variant is `gated_delta_decode_conv(_packed)(_tT)(_norm)(_mask)` (T tokens a row when
    T > 1; `_packed`: reads the fused in-projection)."""
    _check_conv(gate, decode, conv, norm, tokens, packed)
    if conv:
        return (
            "gated_delta_decode_conv"
            + ("_packed" if packed else "")
            + (f"_t{tokens}" if tokens > 1 else "")
            + ("_norm" if norm else "")
            + ("_mask" if mask else "")
        )
    kind = "gated_delta_decode" if decode else "gated_delta_step"
    return kind + ("" if gate == "scalar" else f"_{gate}") + ("_mask" if mask else "")


def input_names(
    gate: str, mask: bool, conv: bool = False, norm: bool = False, packed: bool = False
) -> list[str]:
    """packed: one input `proj` (the fused in-projection [B * T, C + Hv Dv + 2 Hv], columns
    [qkv | z | b | a]) in place of qkv, a, b and z."""
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if packed:
        extra = ["norm_w", "norm_eps"] if norm else []
        names = ["proj", "conv_state", "conv_w", "A_log", "dt_bias", "state_in", *extra]
        return names + (["mask"] if mask else [])
    gates = ["a", "b", "A_log", "dt_bias"] if gate == "fused" else ["g", "beta"]
    qkv = ["qkv", "conv_state", "conv_w"] if conv else ["q", "k", "v"]
    extra = NORM_INPUT_NAMES if norm else []
    return [*qkv, *gates, "state_in", *extra] + (["mask"] if mask else [])


def output_names(conv: bool = False, tokens: int = 1) -> list[str]:
    """tokens > 1 (conv): also the states after each token but the last (`state_tok`
    [T-1, B, Hv, Dv, Dk] fp32, `conv_tok` [T-1, B, K-1, C])."""
    names = list(CONV_OUTPUT_NAMES if conv else OUTPUT_NAMES)
    return names + (TOKEN_OUTPUT_NAMES if conv and tokens > 1 else [])


def variants() -> list[tuple[str, bool, bool]]:
    """Every structural variant of the recurrence (gate kind, has mask, decode)."""
    return [(gate, mask, dec) for gate in GATES for mask in (False, True) for dec in (False, True)]


def conv_variants() -> list[tuple[str, bool, bool, bool]]:
    """The conv decode variants as (gate, mask, decode, conv) arguments."""
    return [("fused", mask, True, True) for mask in (False, True)]


def norm_variants() -> list[tuple[str, bool, bool, bool, bool]]:
    """The conv decode variants with the gated norm, as (gate, mask, decode, conv, norm)."""
    return [("fused", mask, True, True, True) for mask in (False, True)]


def token_variants(tokens=(1, 2, 3)) -> list[tuple[str, bool, bool, bool, bool, int, bool]]:
    """The packed conv decode variants with the gated norm, T tokens a row, as (gate, mask,
    decode, conv, norm, tokens, packed): the compiled decode step (T = 1) and verify step."""
    return [("fused", m, True, True, True, t, True) for t in tokens for m in (False, True)]


# Reads step t_ld's k, q, v (and per-key decay) into the *_nx registers. Used twice in BODY:
# for the first step, and (outside decode) for the step after the one being computed.
_LOAD = """{
      const size_t qk_ld = qk0 + size_t(t_ld) * qk_step;
      const size_t h_ld = h0 + size_t(t_ld) * Hv;
      #pragma unroll
      for (int c = 0; c < C; ++c) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          k_nx[4 * c + e] = static_cast<float>(k[qk_ld + c * 4 * L + e]);
          q_nx[4 * c + e] = static_cast<float>(q[qk_ld + c * 4 * L + e]);
        }
      }
      v_nx = static_cast<float>(v[vy0 + size_t(t_ld) * vy_step]);
      (void)h_ld;
#if GD_GATE == GD_PER_KEY
      #pragma unroll
      for (int c = 0; c < C; ++c) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          g_nx[4 * c + e] = static_cast<float>(g[(h_ld * Dk) + col0 + c * 4 * L + e]);
        }
      }
#endif
    }"""

# GD_CONV's replacement of the first step's load: q, k and v from the raw in-projection (see
# "Conv decode" in the docstring). gd_conv_silu(ch, out, store) computes channel ch's conv and
# silu into the float `out` (a value of YT) and, if `store`, writes the channel's new conv state.
_CONV_LOAD = """
  {
    // Token t_ld of batch row b_idx: input row b_idx * T + t_ld of qkv (or of the packed
    // projection, whose first n_ch columns are qkv); x_ext = [conv_state | the T tokens' qkv]
    // ([K-1+T, n_ch] per row), token t_ld's taps read x_ext rows t_ld .. t_ld + K-1 and the conv
    // state after it is x_ext rows t_ld + 1 .. t_ld + K-1. conv_state: [B, K-1, n_ch];
    // conv_w: [n_ch, K]. qk_tg is read by every warp for token t_ld - 1: wait before rewriting.
    const size_t cs0 = size_t(b_idx) * (K - 1) * n_ch;
#if GD_TOKENS > 1
    if (t_ld > 0) {
      gd_threadgroup_barrier();
    }
#endif
#define gd_conv_silu(ch, out, store)                                                      \\
    {                                                                                     \\
      float h = 0.0f;                                                                     \\
      for (int j = 0; j < K; ++j) {                                                       \\
        const int r = t_ld + j;                                                           \\
        const YT x = r < K - 1                                                            \\
            ? static_cast<YT>(static_cast<float>(conv_state[cs0 + size_t(r) * n_ch + (ch)])) \\
            : static_cast<YT>(static_cast<float>(                                         \\
                  gd_in_qkv[(size_t(b_idx) * T + (r - (K - 1))) * x_stride + (ch)]));     \\
        const YT w = static_cast<YT>(static_cast<float>(conv_w[size_t(ch) * K + j]));     \\
        const float p = static_cast<float>(static_cast<YT>(                               \\
            gd_mul(static_cast<float>(x), static_cast<float>(w))));                       \\
        h = j == 0 ? p : static_cast<float>(static_cast<YT>(h + p));                      \\
        if ((store) && j > 0) {                                                           \\
          gd_conv_dst(t_ld, cs0 + size_t(j - 1) * n_ch + (ch)) = x;                       \\
        }                                                                                 \\
      }                                                                                   \\
      const float e = static_cast<float>(static_cast<YT>(gd_exp(h < 0.0f ? -h : h)));     \\
      const float sig = static_cast<float>(static_cast<YT>(                               \\
          h < 0.0f ? 1.0f / (1.0f + e) : 1.0f - 1.0f / (1.0f + e)));                      \\
      out = static_cast<float>(static_cast<YT>(h * sig));                                 \\
    }
    const bool first_tg = gd_row_group / W == 0 && hv % unsigned(Hv / Hk) == 0;
    for (unsigned i = (gd_row_group % W) * 32 + gd_lane; i < unsigned(2 * Dk); i += 32 * W) {
      const unsigned ch = hk * Dk + (i < unsigned(Dk) ? i : i - Dk + Hk * Dk);
      float out;
      gd_conv_silu(ch, out, first_tg);
      qk_tg[i] = out;
    }
    // This row's v channel (every lane of the row computes it; lane 0 stores the conv state).
    {
      const unsigned ch = 2 * Hk * Dk + hv * Dv + dv;
      gd_conv_silu(ch, v_nx, row_ok && sub == 0);
    }
#undef gd_conv_silu
    gd_threadgroup_barrier();
    // l2 norms over Dk in fp32 (this lane's columns, then the row's L lanes), eps inside rsqrt.
    float qq = 0.0f;
    float kk = 0.0f;
    #pragma unroll
    for (int c = 0; c < C; ++c) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const unsigned col = col0 + c * 4 * L + e;
        q_nx[4 * c + e] = qk_tg[col];
        k_nx[4 * c + e] = qk_tg[Dk + col];
        qq += q_nx[4 * c + e] * q_nx[4 * c + e];
        kk += k_nx[4 * c + e] * k_nx[4 * c + e];
      }
    }
    const float rq = gd_rsqrt(gd_group_sum<L>(qq) + 1e-6f);
    const float rk = gd_rsqrt(gd_group_sum<L>(kk) + 1e-6f);
    const float q_scale = static_cast<float>(static_cast<YT>(gd_rsqrt(float(Dk))));
    #pragma unroll
    for (int i = 0; i < N; ++i) {
      const float qn = static_cast<float>(static_cast<YT>(q_nx[i] * rq));
      q_nx[i] = static_cast<float>(static_cast<YT>(qn * q_scale));
      k_nx[i] = static_cast<float>(static_cast<YT>(k_nx[i] * rk));
    }
  }"""

# GD_NORM (with GD_CONV): the layer's gated RMSNorm on this row's y, `out` replaced by
# YT(YT(YT(y r) w) silu(z)) with y = YT(out) and r = rsqrt(mean over the head's Dv rows of y^2 +
# eps) (see "Gated norm" in the docstring). Every thread of the threadgroup reaches the barrier.
_NORM = """
      {
        const float yr = static_cast<float>(static_cast<YT>(out));
        // The warp's rows (lane sub == 0 of each), then the threadgroup's warps in order.
        const float sq = gd_group_sum<32>(sub == 0 && row_ok ? yr * yr : 0.0f);
        if (gd_lane == 0) {
          norm_tg[gd_row_group % W] = sq;
        }
        gd_threadgroup_barrier();
        float ssq = 0.0f;
        for (int w = 0; w < W; ++w) {
          ssq += norm_tg[w];
        }
        const float r = gd_rsqrt(ssq * (1.0f / float(Dv)) + static_cast<float>(norm_eps[0]));
        const float n = static_cast<float>(static_cast<YT>(yr * r));
        const float nw = static_cast<float>(static_cast<YT>(n * static_cast<float>(norm_w[dv])));
        // z: row b_idx * T + t of [B * T, Hv * Dv] (or columns z_off.. of the packed
        // projection). silu(g) = g * sigmoid(g) in fp32, sigmoid as MLX's CPU op:
        // 1 / (1 + exp(|g|)) for g < 0, else one minus that.
        const float g = static_cast<float>(
            gd_in_z[(size_t(b_idx) * T + t) * z_stride + z_off + hv * Dv + dv]);
        const float e = 1.0f / (1.0f + gd_exp(g < 0.0f ? -g : g));
        const float sig = g < 0.0f ? e : 1.0f - e;
        out = static_cast<float>(static_cast<YT>(nw * (g * sig)));
      }"""

BODY = (
    """
  // Template: Dk (multiple of 4 * L), L (lanes per value row), P (prefetch distance in steps,
  // 0 = none), YT (y dtype). Hk, Hv, Dv and T come from the input shapes.
  constexpr int R = 32 / L;        // value rows per SIMD-group / warp
  constexpr int C = Dk / (4 * L);  // float4 column chunks per lane
  constexpr int N = 4 * C;         // state elements per lane
#if GD_CONV
  constexpr int T = GD_TOKENS;  // tokens a row, a constant of the variant
#elif GD_DECODE
  constexpr int T = 1;  // decode: the step loops below run once and fold away
#else
  const int T = q_shape[1];
#endif
  // Where the fused gates' a and b of row r = b * T + t are: gd_in_a[r * g_stride + a_off + hv]
  // (and b_off); the gated norm's z: gd_in_z[r * z_stride + z_off + hv * Dv + dv].
#if GD_CONV && GD_PACKED
  // proj: [B * T, n_tot], columns [qkv (n_ch) | z (Hv Dv) | b (Hv) | a (Hv)]: the layer's fused
  // in-projection, read in place; state_in: [B, Hv, Dv, Dk]
#define gd_in_qkv proj
#define gd_in_z proj
#define gd_in_a proj
#define gd_in_b proj
  const int x_rows = proj_shape[0];
  const int x_stride = proj_shape[1];
  const int Hv = state_in_shape[1];
  const int Dv = state_in_shape[2];
  const int n_ch = x_stride - Hv * Dv - 2 * Hv;
  const int z_stride = x_stride;
  const int z_off = n_ch;
  const int g_stride = x_stride;
  const int b_off = n_ch + Hv * Dv;
  const int a_off = b_off + Hv;
#elif GD_CONV
  // qkv: [B * T, n_ch], n_ch = 2 Hk Dk + Hv Dv; a, b: [B * T, Hv]; z: [B * T, Hv * Dv];
  // state_in: [B, Hv, Dv, Dk]
#define gd_in_qkv qkv
#define gd_in_z z
#define gd_in_a a
#define gd_in_b b
  const int x_rows = qkv_shape[0];
  const int n_ch = qkv_shape[1];
  const int x_stride = n_ch;
  const int Hv = a_shape[1];
  const int Dv = state_in_shape[2];
  const int z_stride = Hv * Dv;
  const int z_off = 0;
  const int g_stride = Hv;
  const int b_off = 0;
  const int a_off = 0;
#else
#define gd_in_a a
#define gd_in_b b
  const int Hk = q_shape[2];
  const int Hv = v_shape[2];
  const int Dv = v_shape[3];
  const int g_stride = Hv;
  const int b_off = 0;
  const int a_off = 0;
#endif
#if GD_CONV
  const int Hk = (n_ch - Hv * Dv) / (2 * Dk);
  const int n_b = x_rows / T;  // batch rows
  (void)z_stride;
  (void)z_off;
  (void)x_stride;
#endif
#if GD_CONV && GD_TOKENS > 1
  // The conv state after token t < T - 1 goes to conv_tok [T-1, B, K-1, n_ch], the last one to
  // conv_state_out; the recurrent state after token t < T - 1 to state_tok [T-1, B, Hv, Dv, Dk].
#define gd_conv_dst(t, i) \
  (*((t) < T - 1 ? &conv_tok[size_t(t) * n_b * (K - 1) * n_ch + (i)] : &conv_state_out[(i)]))
#else
#define gd_conv_dst(t, i) conv_state_out[(i)]
#endif

  const unsigned head = gd_head;  // b * Hv + hv
  const unsigned b_idx = head / Hv;
  const unsigned hv = head % Hv;
  const unsigned hk = hv / (Hv / Hk);
  const unsigned sub = gd_lane % L;
  const unsigned row = gd_row_group * R + gd_lane / L;
  const bool row_ok = row < unsigned(Dv);
  const unsigned dv = row_ok ? row : unsigned(Dv - 1);
  const unsigned col0 = sub * 4;  // first column of this lane; chunk c adds c * 4 * L
#if GD_GATE == GD_FUSED
  const float A_h = gd_exp(static_cast<float>(A_log[hv]));
  const float dt_bias_h = static_cast<float>(dt_bias[hv]);
#endif

  // state_in, state_out: [B, Hv, Dv, Dk]
  const size_t s_off = (size_t(head) * Dv + dv) * Dk + col0;
  float s[N];
  #pragma unroll
  for (int c = 0; c < C; ++c) {
    const float4 x = gd_load_f4(state_in + s_off + c * 4 * L);
    s[4 * c] = x.x;
    s[4 * c + 1] = x.y;
    s[4 * c + 2] = x.z;
    s[4 * c + 3] = x.w;
  }

  // q, k: [B, T, Hk, Dk]; v, y: [B, T, Hv, Dv]; g, beta, a, b: [B, T, Hv(, Dk)]; mask: [B, T]
  const size_t qk_step = size_t(Hk) * Dk;
  const size_t vy_step = size_t(Hv) * Dv;
  const size_t qk0 = (size_t(b_idx) * T * Hk + hk) * Dk + col0;
  const size_t vy0 = (size_t(b_idx) * T * Hv + hv) * Dv + dv;
  const size_t h0 = size_t(b_idx) * T * Hv + hv;

  // Registers for the step after the one being computed (software pipelining).
  float k_nx[N];
  float q_nx[N];
  float v_nx;
#if GD_GATE == GD_PER_KEY
  float g_nx[N];
#endif
#if GD_CONV
  // Key head hk's post-silu q (first Dk) and k channels of one token, computed once per
  // threadgroup (declared at kernel scope, as Metal wants threadgroup variables).
  gd_threadgroup float qk_tg[2 * Dk];
#if GD_NORM
  // The head's sum of squares of y, one partial sum per warp (kernel scope, as for qk_tg).
  gd_threadgroup float norm_tg[32];
#endif
#if GD_TOKENS == 1
  {
    const int t_ld = 0;
    """
    + _CONV_LOAD
    + """
  }
#endif
  // With more tokens, each token's q, k and v come from the conv at the top of its step
  // (below); one token's is loaded here, before the gates, as the registers allow at the gated
  // norm's layout (one head a block: loaded in the step, it took up to 153 a thread on sm_90).
#else
  {
    const int t_ld = 0;
    """
    + _LOAD
    + """
  }
#endif
  // The scalar gates of a chunk of 32 steps: lane j holds step t0 + j's, broadcast by shuffles
  // (decode: every lane computes step 0's gates itself, so no broadcast is needed).
#if GD_DECODE
#define gd_step_gate(x, j) (x)
#else
#define gd_step_gate(x, j) gd_shuffle(x, j)
#endif
#if GD_GATE != GD_PER_KEY
  float gl = 1.0f;
#endif
  float bl = 0.0f;
#if GD_MASK
  float ml = 1.0f;
#endif
  for (int t0 = 0; t0 < T; t0 += 32) {
    {
      const int tl = t0 + int(gd_lane) < T ? t0 + int(gd_lane) : T - 1;
      const size_t h_l = h0 + size_t(tl) * Hv;
      const size_t g_l = (size_t(b_idx) * T + tl) * g_stride + hv;  // h_l unless GD_CONV
      (void)g_l;
#if GD_GATE == GD_SCALAR
      gl = static_cast<float>(g[h_l]);
      bl = static_cast<float>(beta[h_l]);
#elif GD_GATE == GD_PER_KEY
      bl = static_cast<float>(beta[h_l]);
#else
      // Fused gating: beta = sigmoid(b), g = exp(-exp(A_log) * softplus(a + dt_bias)) in fp32,
      // softplus(x) = max(x, 0) + log(1 + exp(-|x|)); each lane transforms one step.
      const float x = static_cast<float>(gd_in_a[g_l + a_off]) + dt_bias_h;
      const float sp = (x > 0.0f ? x : 0.0f) + gd_log(1.0f + gd_exp(x > 0.0f ? -x : x));
      gl = gd_exp(-A_h * sp);
      bl = 1.0f / (1.0f + gd_exp(-static_cast<float>(gd_in_b[g_l + b_off])));
#endif
#if GD_MASK
      ml = mask[size_t(b_idx) * T + tl] ? 1.0f : 0.0f;
#endif
    }
    const int n = T - t0 < 32 ? T - t0 : 32;
#if GD_CONV
    // One token at a time: unrolled, the tokens' conv and norm code would not fit the
    // registers a thread has at the gated norm's one-head-a-block layout.
    #pragma unroll 1
#endif
    for (int j = 0; j < n; ++j) {
      const int t = t0 + j;
#if GD_CONV && GD_TOKENS > 1
      {
        const int t_ld = t;
        """
    + _CONV_LOAD
    + """
      }
#endif
      float k_cu[N];
      float q_cu[N];
      #pragma unroll
      for (int i = 0; i < N; ++i) {
        k_cu[i] = k_nx[i];
        q_cu[i] = q_nx[i];
      }
      const float v_cu = v_nx;
#if GD_GATE == GD_PER_KEY
      float g_cu[N];
      #pragma unroll
      for (int i = 0; i < N; ++i) g_cu[i] = g_nx[i];
#else
      const float g_cu = gd_step_gate(gl, j);
#endif
      const float b_cu = gd_step_gate(bl, j);
#if !GD_DECODE && !GD_CONV
      // Load step t + 1 (clamped: the last step reloads itself, so the loop has no branch).
      const int t_ld = t + 1 < T ? t + 1 : t;
      """
    + _LOAD
    + """
      if (P > 0 && t + P < T) {
        // Pull step t + P's k, q and v towards the cache (a no-op where unsupported).
        #pragma unroll
        for (int c = 0; c < C; ++c) {
          gd_prefetch(k + qk0 + size_t(t + P) * qk_step + c * 4 * L);
          gd_prefetch(q + qk0 + size_t(t + P) * qk_step + c * 4 * L);
        }
        gd_prefetch(v + vy0 + size_t(t + P) * vy_step);
      }
#endif

      float out = 0.0f;
#if GD_MASK
      // Padding (mask False) skips the step: state unchanged, y = 0. The branch is uniform
      // over the threadgroup (one batch row), so the shuffles inside stay converged.
      if (gd_step_gate(ml, j) != 0.0f) {
#endif
        // y = S_new q = (g S) q + delta (k . q): the three row sums (g S) k, (g S) q and k . q
        // are independent, so their shuffle reductions overlap and each step waits on one
        // reduction instead of two in sequence.
        float kv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        float sq[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        float kq[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        #pragma unroll
        for (int i = 0; i < N; ++i) {
#if GD_GATE == GD_PER_KEY
          s[i] *= g_cu[i];
#else
          s[i] *= g_cu;
#endif
          kv[i % 4] += s[i] * k_cu[i];
          sq[i % 4] += s[i] * q_cu[i];
          kq[i % 4] += k_cu[i] * q_cu[i];
        }
        const float kv_row = gd_group_sum<L>((kv[0] + kv[1]) + (kv[2] + kv[3]));
        const float sq_row = gd_group_sum<L>((sq[0] + sq[1]) + (sq[2] + sq[3]));
        const float kq_row = gd_group_sum<L>((kq[0] + kq[1]) + (kq[2] + kq[3]));
        const float delta = (v_cu - kv_row) * b_cu;
        out = sq_row + delta * kq_row;
        #pragma unroll
        for (int i = 0; i < N; ++i) {
          s[i] += k_cu[i] * delta;
        }
#if GD_MASK
      }
#endif
#if GD_NORM
"""
    + _NORM
    + """
#endif
      if (sub == 0 && row_ok) {
        y[vy0 + size_t(t) * vy_step] = static_cast<YT>(out);
      }
#if GD_CONV && GD_TOKENS > 1
      // The recurrent state after every token but the last (which is state_out below).
      if (t < T - 1 && row_ok) {
        const size_t tok = size_t(t) * n_b * Hv * Dv * Dk;
        #pragma unroll
        for (int c = 0; c < C; ++c) {
          const int i = 4 * c;
          gd_store_f4(state_tok + tok + s_off + c * 4 * L, s[i], s[i + 1], s[i + 2], s[i + 3]);
        }
      }
#endif
    }
  }

  if (row_ok) {
    #pragma unroll
    for (int c = 0; c < C; ++c) {
      const int j = 4 * c;
      gd_store_f4(state_out + s_off + c * 4 * L, s[j], s[j + 1], s[j + 2], s[j + 3]);
    }
  }
#undef gd_step_gate
#undef gd_conv_dst
#undef gd_in_a
#undef gd_in_b
#if GD_CONV
#undef gd_in_qkv
#undef gd_in_z
#endif
#undef GD_TOKENS
#undef GD_PACKED
#undef GD_GATE
#undef GD_MASK
#undef GD_DECODE
#undef GD_CONV
#undef GD_NORM
#undef GD_SCALAR
#undef GD_PER_KEY
#undef GD_FUSED
"""
)


def _variant(*args, **kw) -> tuple[str, bool, bool, bool, bool, int, bool]:
    """`kernel_name`'s arguments with its defaults filled in: (gate, mask, decode, conv, norm,
    tokens, packed)."""
    bound = inspect.signature(kernel_name).bind(*args, **kw)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def variant_defines(*variant, **kw) -> str:
    """The compile-time switches of one variant (`kernel_name`'s arguments), as preprocessor
    lines (see the docstring)."""
    gate, mask, decode, conv, norm, tokens, packed = _variant(*variant, **kw)
    input_names(gate, mask)  # validates gate
    name = kernel_name(gate, mask, decode, conv, norm, tokens, packed)  # validates the rest
    return (
        f"\n// Variant {name}: the switches BODY is compiled with.\n"
        "#define GD_SCALAR 0\n#define GD_PER_KEY 1\n#define GD_FUSED 2\n"
        f"#define GD_GATE GD_{gate.upper()}\n"
        f"#define GD_MASK {int(mask)}\n#define GD_DECODE {int(decode and tokens == 1)}\n"
        f"#define GD_CONV {int(conv)}\n#define GD_NORM {int(norm)}\n"
        f"#define GD_TOKENS {tokens}\n#define GD_PACKED {int(packed)}\n"
    )


def kernel_body(*variant, **kw) -> str:
    """The kernel body of one structural variant (`kernel_name`'s arguments): its switches,
    then the one template."""
    return variant_defines(*variant, **kw) + BODY
