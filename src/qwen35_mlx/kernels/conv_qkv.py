"""The linear-attention layers' prefill conv as one GPU kernel, one text for Metal and CUDA.

`conv_qkv(qkv, conv_state, w, Hk, Dk, Hv, Dv, eps)` -> (q, k, v, new_state): the causal
depthwise conv of [conv_state | qkv] with w, silu, then q's and k's l2 norms (q also times
Dk^-0.5), and the conv state after the last token, in one launch where the ops take a concat,
seven tap ops, silu, a split and two compiled norms, each a pass over [B, T, C].

Shapes: qkv [B, T, C] in the activation dtype YT (bf16, fp16 or fp32), C = 2 Hk Dk + Hv Dv with
channels [q | k | v]; conv_state [B, K-1, C] (the last K-1 inputs) or None (zeros); w [C, K], tap
K-1 meeting the current token. Outputs q, k [B, T, Hk, Dk], v [B, T, Hv, Dv] and new_state
[B, K-1, C] (the last K-1 rows of [conv_state | qkv]), all YT.

Numerics, per channel and token, as the ops do them on CUDA (MLX 0.32: a separate kernel per op,
`mlx/backend/cuda/device/{binary,unary}_ops.cuh` and `fp16_math.cuh`):
- taps: h = YT(x_0 w_0), then h = YT(h + YT(x_j w_j)) for j = 1 .. K-1. In fp32 the product is
  `gd_mul` (`__fmul_rn` on CUDA: never contracted into the add), so fp32 is each op's rounding;
  for bf16 / fp16 the product of two 8- (11-) bit significands is exact in fp32 and a sum of two
  YT values rounded from fp32 is the correctly rounded sum (double rounding is harmless when the
  wide format has >= 2p + 2 bits: 24 >= 18, 24 >= 24), so YT(float op float) is what `__hmul` /
  `__hadd` give. Bit for bit the ops on CUDA (tests/kernels/test_gpu_conv_qkv.py checks it).
- silu: MLX's Sigmoid in YT with its int-and-half operators (`1 + e`, `1 / d`, `1 - y` each
  computed in fp32 and rounded to YT; the compiled silu keeps sigmoid's result in YT): e =
  YT(exp|h|), y = YT(1 / YT(1 + e)), s = h < 0 ? y : YT(1 - y); silu = YT(h s). The exp is MLX's
  for YT on CUDA (`EXP_CUDA`: `hexp` for bf16 / fp16, expf for fp32), so silu too is meant bit
  for bit (the GPU test bounds any difference to an ulp in 2% of the elements and the bench
  prints the share); Metal and the lane emulator use `gd_exp`.
- l2 norms (q, k): the fp32 sum of squares of the YT silu values over Dk (a warp's lanes, then
  `gd_group_sum`: not the ops' order), r = rsqrt(sum + eps), YT(s r); q then YT(. * scale) with
  scale = YT(Dk^-0.5) (the value of `x * Dk**-0.5` in YT).
On Metal the same text runs; fast math may contract a product into a sum there (not checked).

Launch: threadgroups of (32, W) threads, one warp a (batch row, head, tile of TT tokens): its
lanes hold channels lane, lane + 32, ... of the head (N = ceil(max(Dk, Dv) / 32) each, with the
head's K taps and a K-row sliding window of inputs in registers), so every input is read once
per tile plus K-1 rows of overlap. Grid: x over the 2 Hk + Hv heads (q heads, k heads, v heads),
y over the tiles (W a threadgroup), z over B. The first tile's warp of each head also writes its
channels of the new conv state, so each element of it is written exactly once.
Bodies are plain C++ over the gated-delta kernels' helpers (their `HEADER`s: gd_group_sum,
gd_exp, gd_rsqrt, gd_mul) and five names the prologue defines (`POSITIONS`).
"""

from __future__ import annotations

import mlx.core as mx

from . import gpu_build
from .positions import prologue

# Warps a threadgroup and tokens a warp (a tile): 4 x 16 = 64 tokens of one head a threadgroup.
# At the 0.8B shape and T 2048: 48 heads x 32 threadgroups of 128 threads.
WARPS = 4
TOKENS = 16
# Largest head size the registers are sized for (N = 8 channels a lane).
MAX_HEAD_DIM = 256

BODY = """
  // qkv: [B, T, C] in YT, C = 2 Hk Dk + Hv Dv, channels [q | k | v]; conv_state: [B, K-1, C] in
  // YT (read when HS, else zeros); w: [C, K] in YT (tap K-1 meets the current token);
  // consts: [2] fp32 (the l2 norms' eps, q's scale YT(Dk^-0.5)).
  // q, k: [B, T, Hk, Dk]; v: [B, T, Hv, Dv]; state_out: [B, K-1, C] (YT).
  constexpr int C = 2 * Hk * Dk + Hv * Dv;
  constexpr int N = ((Dk > Dv ? Dk : Dv) + 31) / 32;
  const int n_tok = qkv_shape[1];
  const unsigned head = cv_head;
  const size_t b = cv_batch;
  const int t0 = int(cv_tile * W + cv_warp) * TT;
  const bool is_q = head < unsigned(Hk);
  const bool is_v = head >= unsigned(2 * Hk);
  const int D = is_v ? Dv : Dk;
  const int ch0 = is_v ? 2 * Hk * Dk + int(head - 2 * Hk) * Dv : int(head) * Dk;
  // Row e of [conv_state | qkv] (K-1+T rows of this batch row), channel ch, as a float of YT.
#define cv_ext(e, ch)                                                                  \\
  ((e) < K - 1 ? (HS ? static_cast<float>(conv_state[(b * (K - 1) + (e)) * C + (ch)]) : 0.0f) \\
               : static_cast<float>(qkv[(b * n_tok + ((e) - (K - 1))) * C + (ch)]))
  if (t0 < n_tok) {
    float wr[N][K];
    float xr[N][K];  // xr[n][j]: row t - (K-1) + j of channel ch0 + lane + 32 n, t the token
    #pragma unroll
    for (int n = 0; n < N; ++n) {
      const int c = int(cv_lane) + 32 * n;
      #pragma unroll
      for (int j = 0; j < K; ++j) {
        wr[n][j] = c < D ? static_cast<float>(w[size_t(ch0 + c) * K + j]) : 0.0f;
        xr[n][j] = c < D && j < K - 1 ? cv_ext(t0 + j, ch0 + c) : 0.0f;
      }
    }
    const float eps = consts[0];
    const float scale = consts[1];
    for (int tt = 0; tt < TT; ++tt) {
      const int t = t0 + tt;
      if (t >= n_tok) {
        break;  // the same t in every lane of the warp
      }
      const size_t row = b * n_tok + t;
      float s[N];
      float ss = 0.0f;
      #pragma unroll
      for (int n = 0; n < N; ++n) {
        const int c = int(cv_lane) + 32 * n;
        xr[n][K - 1] = c < D ? static_cast<float>(qkv[row * C + ch0 + c]) : 0.0f;
        float h = static_cast<float>(static_cast<YT>(gd_mul(xr[n][0], wr[n][0])));
        #pragma unroll
        for (int j = 1; j < K; ++j) {
          const float p = static_cast<float>(static_cast<YT>(gd_mul(xr[n][j], wr[n][j])));
          h = static_cast<float>(static_cast<YT>(h + p));
        }
        float e;
        cv_exp_yt(h < 0.0f ? -h : h, e);
        const float y = static_cast<float>(
            static_cast<YT>(1.0f / static_cast<float>(static_cast<YT>(1.0f + e))));
        const float sg = h < 0.0f ? y : static_cast<float>(static_cast<YT>(1.0f - y));
        s[n] = static_cast<float>(static_cast<YT>(gd_mul(h, sg)));
        ss += c < D ? s[n] * s[n] : 0.0f;
        #pragma unroll
        for (int j = 0; j < K - 1; ++j) {
          xr[n][j] = xr[n][j + 1];
        }
      }
      if (!is_v) {  // the same branch in every lane of the warp
        const float r = gd_rsqrt(gd_group_sum<32>(ss) + eps);
        #pragma unroll
        for (int n = 0; n < N; ++n) {
          s[n] = static_cast<float>(static_cast<YT>(gd_mul(s[n], r)));
          if (is_q) {
            s[n] = static_cast<float>(static_cast<YT>(gd_mul(s[n], scale)));
          }
        }
      }
      #pragma unroll
      for (int n = 0; n < N; ++n) {
        const int c = int(cv_lane) + 32 * n;
        if (c < D) {
          if (is_v) {
            v[(row * Hv + (head - 2 * Hk)) * Dv + c] = static_cast<YT>(s[n]);
          } else if (is_q) {
            q[(row * Hk + head) * Dk + c] = static_cast<YT>(s[n]);
          } else {
            k[(row * Hk + (head - Hk)) * Dk + c] = static_cast<YT>(s[n]);
          }
        }
      }
    }
    if (t0 == 0) {  // the new conv state: rows T .. T+K-2 of [conv_state | qkv]
      for (int r = 0; r < K - 1; ++r) {
        for (int c = int(cv_lane); c < D; c += 32) {
          state_out[(b * (K - 1) + r) * C + ch0 + c] = static_cast<YT>(cv_ext(n_tok + r, ch0 + c));
        }
      }
    }
  }
#undef cv_ext
"""

# cv_exp_yt(a, e): e = exp(a) for a >= 0 as MLX's op computes it for YT, rounded to YT. CUDA: for
# bf16 and fp16 MLX's Sigmoid calls `hexp` (cuda_bf16.hpp / cuda_fp16.hpp of CUDA 13): ex2.approx
# of a times log2(e) in fp32 (bf16: the constant rounded up, 0x3FB8AA3C, and ex2.approx.f32;
# fp16: 0x3FB8AA3B and ex2.approx.ftz.f32, as those headers' asm), then the rounding, and fp16's
# two corrections for positive inputs (half 0x1F79 and 0x25CF: minus one ulp); for fp32 expf
# (gd_exp). EXP says which: 0 fp32, 1 bf16, 2 fp16. Metal: gd_exp for every dtype (MLX's Metal
# exp of a half type is not reproduced).
EXP_CUDA = """
#define cv_exp_yt(a, e)                                                                   \\
  {                                                                                       \\
    if (EXP == 0) {                                                                       \\
      e = gd_exp(a);                                                                      \\
    } else {                                                                              \\
      float cv_x = __fmul_rn((a), __uint_as_float(EXP == 1 ? 0x3FB8AA3Cu : 0x3FB8AA3Bu)); \\
      if (EXP == 1) {                                                                     \\
        asm("ex2.approx.f32 %0, %0;" : "+f"(cv_x));                                       \\
      } else {                                                                            \\
        asm("ex2.approx.ftz.f32 %0, %0;" : "+f"(cv_x));                                   \\
      }                                                                                   \\
      e = cv_x;                                                                           \\
    }                                                                                     \\
    e = static_cast<float>(static_cast<YT>(e));                                           \\
    if (EXP == 2 && ((a) == 0.007297515869140625f || (a) == 0.0226898193359375f)) {       \\
      e -= 0.0009765625f;                                                                 \\
    }                                                                                     \\
  }
"""
EXP_PLAIN = """
#define cv_exp_yt(a, e) \\
  { e = static_cast<float>(static_cast<YT>(gd_exp(a))); }
"""
EXP_KIND = {mx.float32: 0, mx.bfloat16: 1, mx.float16: 2}

INPUT_NAMES = ["qkv", "conv_state", "w", "consts"]
OUTPUT_NAMES = ["q", "k", "v", "state_out"]

# The thread's lane and warp; the threadgroup's head (x), tile group (y) and batch row (z).
POSITIONS = {
    "cv_lane": "thread.x",
    "cv_warp": "thread.y",
    "cv_head": "threadgroup.x",
    "cv_tile": "threadgroup.y",
    "cv_batch": "threadgroup.z",
}


def kernel_source(backend: str) -> str:
    """The full `source=` for backend "cuda" or "metal": prologue, the exp, body."""
    exp = EXP_CUDA if backend == "cuda" else EXP_PLAIN
    return prologue(backend, **POSITIONS) + exp + BODY + "#undef cv_exp_yt\n"


_built: dict[str, object] = {}


def _build():
    if "conv_qkv" not in _built:
        backend = gpu_build()
        kind = "cuda" if mx.cuda.is_available() else "metal"
        _built["conv_qkv"] = backend.make_kernel(
            "qm_conv_qkv", INPUT_NAMES, OUTPUT_NAMES, kernel_source(kind)
        )
    return _built["conv_qkv"]


def supported(qkv: mx.array, w: mx.array, Hk: int, Dk: int, Hv: int, Dv: int) -> bool:
    """Whether the kernel takes these shapes and dtypes: qkv [B, T, C] of a float dtype with
    C = 2 Hk Dk + Hv Dv, w [C, K] with K >= 2, head sizes <= MAX_HEAD_DIM."""
    return (
        qkv.ndim == 3
        and qkv.dtype in (mx.bfloat16, mx.float16, mx.float32)
        and qkv.shape[2] == 2 * Hk * Dk + Hv * Dv
        and w.ndim == 2
        and w.shape[0] == qkv.shape[2]
        and w.shape[1] >= 2
        and 0 < max(Dk, Dv) <= MAX_HEAD_DIM
    )


def kernel_available(x: mx.array) -> bool:
    """Whether `conv_qkv` runs as a kernel for activations like x: a GPU backend and the default
    device a GPU."""
    return mx.default_device() != mx.cpu and gpu_build() is not None


_consts: dict[tuple, mx.array] = {}


def consts(eps: float, Dk: int, dtype) -> mx.array:
    """[eps, YT(Dk^-0.5)] in fp32: the l2 norms' eps and q's scale as `x * Dk**-0.5` rounds it."""
    key = (eps, Dk, dtype)
    if key not in _consts:
        scale = mx.array(Dk**-0.5, dtype=dtype).astype(mx.float32)
        _consts[key] = mx.concatenate([mx.array([eps], dtype=mx.float32), scale[None]])
    return _consts[key]


def conv_qkv(qkv, conv_state, w, Hk: int, Dk: int, Hv: int, Dv: int, eps: float):
    """(q, k, v, new conv state) from the in-projection qkv [B, T, C] and the conv state
    [B, K-1, C] (None: zeros) through one kernel; the caller checks `kernel_available` and
    `supported` first."""
    return run_conv_qkv(_build(), qkv, conv_state, w, Hk, Dk, Hv, Dv, eps)


def run_conv_qkv(
    kernel, qkv, conv_state, w, Hk, Dk, Hv, Dv, eps, warps: int = WARPS, tokens: int = TOKENS
):
    """Launch a built conv_qkv kernel (shapes as `conv_qkv`)."""
    B, T, C = qkv.shape
    K = w.shape[1]
    dt = qkv.dtype
    has_state = conv_state is not None
    if has_state:
        conv_state = conv_state.astype(dt)  # as the ops' concat casts it
    else:
        conv_state = mx.zeros((1,), dtype=dt)  # never read
    tiles = -(-T // tokens)
    groups = -(-tiles // warps)
    return kernel(
        inputs=[qkv, conv_state, w.astype(dt), consts(eps, Dk, dt)],
        template=[
            ("Hk", Hk),
            ("Hv", Hv),
            ("Dk", Dk),
            ("Dv", Dv),
            ("K", K),
            ("W", warps),
            ("TT", tokens),
            ("HS", has_state),
            ("EXP", EXP_KIND[dt]),
            ("YT", dt),
        ],  # fmt: skip
        grid=(32 * (2 * Hk + Hv), warps * groups, B),
        threadgroup=(32, warps, 1),
        output_shapes=[(B, T, Hk, Dk), (B, T, Hk, Dk), (B, T, Hv, Dv), (B, K - 1, C)],
        output_dtypes=[dt] * 4,
    )
