"""The prefill conv kernel (`kernels/conv_qkv.py`) on the GPU (skipped without CUDA or Metal).

- Against the ops path (`layers._conv_qkv` on [conv_state | qkv], and the state slice): the new
  conv state bit for bit; in bf16 / fp16 v (taps and silu, no sum) at most one ulp off, in at
  most 2% of the elements (meant: none, the kernel's exp being MLX's `hexp`; the bench prints the
  share), q and k within two ulps (the l2 norm's fp32 sum in another order), in at most 2% of the
  elements; fp32 within 8 ulps (below).
- Against float64 as the CPU test does (tests/kernels/test_conv_qkv_on_cpu.py): the ops' roundings
  applied (within two ulps), and the exact conv + silu + norm (within the argued bound).
- The model with `layers.CONV_KERNEL` on and off: the same conv state, logits close (fp32: to
  fp32 rounding; bf16: a few ulps of the logits' scale), and the kernel taken.
"""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels import conv_qkv
from qwen35_mlx.models import layers
from tests.kernels.gpu import GPU_ONLY
from tests.kernels.helpers import np64
from tests.kernels.test_conv_qkv_on_cpu import (
    EPS,
    EXACT_ULPS,
    SHARE_MAX,
    ULP,
    ULPS_MAX,
    reference,
)
from tests.models.factory import make_text_config, make_text_model

pytestmark = GPU_ONLY

K = 4
# (B, T, Hk, Hv, Dk, Dv, state given): the 0.8B and 9B heads at a prefill step's length, T 1, 7
# and odd T, B 2, Hv != Hk, Dk 64, Dv 48 (a partial channel pass).
SHAPES = [
    (1, 2048, 16, 16, 128, 128, True),
    (1, 517, 16, 32, 128, 128, False),
    (2, 300, 2, 4, 64, 64, True),
    (2, 37, 1, 2, 64, 48, False),
    (1, 7, 1, 1, 128, 128, True),
    (2, 1, 1, 2, 128, 128, True),
]


def _inputs(B, T, Hk, Hv, Dk, Dv, hs, dtype, seed=0):
    C = 2 * Hk * Dk + Hv * Dv
    k = mx.random.split(mx.random.key(seed + T), 3)
    qkv = mx.random.normal((B, T, C), key=k[0]).astype(dtype)
    state = mx.random.normal((B, K - 1, C), key=k[1]).astype(dtype) if hs else None
    w = (0.3 * mx.random.normal((C, K), key=k[2])).astype(dtype)
    return qkv, state, w


def _ops(qkv, state, w, Hk, Dk, Hv, Dv):
    B, T, C = qkv.shape
    if state is None:
        state = mx.zeros((B, K - 1, C), dtype=qkv.dtype)
    conv_in = mx.concatenate([state.astype(qkv.dtype), qkv], axis=1)
    q, k, v = layers._conv_qkv(conv_in, w, T, Hk, Dk, Hv, Dv)
    return q, k, v, mx.contiguous(conv_in[:, T:])


def _ulps(got, want, dtype):
    g, r = np64(got), np64(want)
    ulp = ULP[dtype] * np.maximum(np.abs(r), np.finfo(np.float32).tiny)
    return float((np.abs(g - r) / ulp).max()), float((g != r).mean())


# fp32: CUDA's expf and rsqrtf are within 2 ulps of the exact functions (the programming guide's
# table), the ops' and the kernel's builds may pick different ones (fast math or not), and such
# an error passes through up to three more roundings (1.5 ulps) and products by factors <= 1:
# within ~4-5 ulps of the ops and of the rounded float64 reference; the bound is 8. In bf16 /
# fp16 those fp32 errors move a rounding only rarely: ULPS_MAX and SHARE_MAX as on the CPU.
ULPS_FP32 = 8.0


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}Hk{}Hv{}Dk{}Dv{}{}".format(*s))
def test_conv_qkv_kernel_against_ops_and_float64(shape, dtype):
    B, T, Hk, Hv, Dk, Dv, hs = shape
    qkv, state, w = _inputs(*shape, dtype)
    assert conv_qkv.kernel_available(qkv) and conv_qkv.supported(qkv, w, Hk, Dk, Hv, Dv)
    got = conv_qkv.conv_qkv(qkv, state, w, Hk, Dk, Hv, Dv, EPS)
    ops = _ops(qkv, state, w, Hk, Dk, Hv, Dv)
    for g, o in zip(got, ops, strict=True):
        assert g.dtype == dtype and g.shape == o.shape
    assert mx.array_equal(got[3], ops[3]).item()  # the new conv state: a copy
    wide = dtype == mx.float32
    # q = round(round(n) * s), s = Dk^-0.5: where the fp32 sums (in another order) move n's
    # rounding by one ulp of n, that ulp times s is up to 2 s / 2^floor(log2 s) ulps of q (2.83
    # at Dk 128), and q's own rounding adds one (H200, fp16: 2.04 seen).
    s_ = Dk**-0.5
    q_limit = max(ULPS_MAX, 1.0 + 2 * s_ / 2.0 ** np.floor(np.log2(s_)))
    for name, g, o in zip("qkv", got[:3], ops[:3], strict=True):
        ulps, share = _ulps(g, o, dtype)
        limit = ULPS_FP32 if wide else {"q": q_limit, "k": ULPS_MAX, "v": 1.0}[name]
        assert ulps <= limit and (wide or share <= SHARE_MAX), (name, ulps, share)
    # float64, as the CPU test checks the emulated body
    case = (*shape, dtype)
    x = [None if a is None else np64(a) for a in (qkv, state, w)]
    rounded, exact = reference(case, *x, True), reference(case, *x, False)
    for name, g, r, ex in zip("qkv", got[:3], rounded[:3], exact[:3], strict=True):
        ulps, _ = _ulps(g, mx.array(r.astype(np.float32)), dtype)
        # Each element against its own size (or the rms, for the small ones): the roundings the
        # ops prescribe move an element by ulps of itself, so over the 2M elements of the 9B
        # heads the ops' own largest error was 0.135 rms in bf16 (the kernel's: the same).
        scale = np.maximum(np.abs(ex), np.sqrt((ex * ex).mean()))
        assert ulps <= (ULPS_FP32 if wide else q_limit if name == "q" else ULPS_MAX), (name, ulps)
        assert (np.abs(np64(g) - ex) / scale).max() <= EXACT_ULPS * ULP[dtype], name


def test_conv_qkv_comparison_sees_a_wrong_state():
    """The comparison sees the taps: the kernel given zeros where the ops had a state differs from
    them in the first K-1 tokens by far more than an ulp."""
    shape = (1, 64, 2, 2, 128, 128, True)
    qkv, state, w = _inputs(*shape, mx.bfloat16)
    got = conv_qkv.conv_qkv(qkv, None, w, 2, 128, 2, 128, EPS)
    ops = _ops(qkv, state, w, 2, 128, 2, 128)
    assert _ulps(got[2][:, : K - 1], ops[2][:, : K - 1], mx.bfloat16)[0] > 4.0
    assert _ulps(got[2][:, K - 1 :], ops[2][:, K - 1 :], mx.bfloat16)[0] <= 1.0


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_model_with_the_conv_kernel_on_and_off(monkeypatch, dtype):
    """A prompt of 40 tokens in two calls (20 + 20: the second continues from a conv state), and
    a short call of 5 tokens (the ops path even with the switch on)."""
    cfg = make_text_config(linear_key_head_dim=64, linear_value_head_dim=32)
    model = make_text_model(cfg, seed=7)
    model.set_dtype(dtype)
    tokens = mx.array([[(7 * i + 3) % cfg.vocab_size for i in range(45)]])
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(layers, "CONV_KERNEL", on)
        conv_qkv._built.clear()
        cache = model.make_cache()
        logits = [model(tokens[:, s:e], cache=cache) for s, e in ((0, 20), (20, 40), (40, 45))]
        mx.eval(logits, [c.state for c in cache])
        runs[on] = (mx.concatenate(logits, axis=1), cache)
        assert ("conv_qkv" in conv_qkv._built) == on
    (off, c_off), (on, c_on) = runs[False], runs[True]
    # the first linear layer's conv state is a copy of inputs the kernel does not touch: exact
    first = next(i for i, layer in enumerate(model.layers) if layer.is_linear)
    assert mx.array_equal(c_on[first][0], c_off[first][0]).item()
    a, b = np64(on), np64(off)
    scale = np.sqrt((b * b).mean())
    tol = 1e-4 if dtype == mx.float32 else 0.05
    assert np.abs(a - b).max() / scale < tol, np.abs(a - b).max() / scale
