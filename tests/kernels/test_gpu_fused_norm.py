"""The fused add + RMSNorm and swiglu kernels on the GPU (skipped without CUDA or Metal): against
float64 (the kernels' roundings applied in bf16 and fp16), the sum equal to MLX's add, the norm
within an ulp of MLX's own rms_norm, and compiled == plain for small bf16 models with the
kernels in the decode step (`layers.ADD_NORM` "auto", `layers.SWIGLU_KERNEL`: opt-in)."""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels import fused_norm
from qwen35_mlx.models import layers
from tests.kernels.gpu import GPU_ONLY
from tests.kernels.helpers import np64
from tests.models.factory import make_moe_config, make_text_config, make_text_model
from tests.test_fast_decode import TOKENS, assert_same

pytestmark = GPU_ONLY


def _round(a, dtype):
    return np64(mx.array(np.asarray(a, np.float32)).astype(dtype))


def _inputs(rows, D, dtype, seed=0):
    k = mx.random.split(mx.random.key(seed), 3)
    x = mx.random.normal((rows, D), key=k[0]).astype(dtype)
    d = (0.5 * mx.random.normal((rows, D), key=k[1])).astype(dtype)
    w = (1.0 + 0.3 * mx.random.normal((D,), key=k[2])).astype(dtype)
    return x, d, w


def _errs(got, want):
    err = np.abs(np64(got) - want) / (np.abs(want) + 1e-2)
    return err.max(), err.mean()


# (largest, mean) relative error: fp32 a few ulps; 16-bit: a rounding may flip (one or two ulps
# at the largest), the mean far below a biased formula's.
TOL = {mx.float32: (2e-5, 2e-6), mx.bfloat16: (8e-3, 2e-4), mx.float16: (1e-3, 1e-4)}


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=str)
@pytest.mark.parametrize("rows,D", [(1, 1024), (32, 4096), (3, 200)])
def test_add_rms_norm_kernel(dtype, rows, D):
    x, d, w = _inputs(rows, D, dtype)
    assert fused_norm.kernel_available(x)
    s, n = fused_norm.add_rms_norm(x, d, w, 1e-6)
    assert s.dtype == n.dtype == dtype and s.shape == n.shape == x.shape
    assert mx.array_equal(s, x + d).item()  # the sum rounds as MLX's add
    s64 = np64(s)
    r = 1.0 / np.sqrt((s64 * s64).mean(-1, keepdims=True) + 1e-6)
    if dtype == mx.float32:
        want = s64 * r * np64(w)
    else:
        want = _round(np64(w) * _round(s64 * r, dtype), dtype)
    top, mean = _errs(n, want)
    assert top <= TOL[dtype][0] and mean <= TOL[dtype][1], (top, mean)
    # MLX's own rms_norm of the same sum: the same order of roundings, so within an ulp.
    ref = mx.fast.rms_norm(x + d, w, 1e-6)
    ulp = {mx.float32: 2e-6, mx.bfloat16: 8e-3, mx.float16: 1e-3}[dtype]
    assert _errs(n, np64(ref))[0] <= ulp


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
@pytest.mark.parametrize("rows,I", [(1, 3584), (32, 12288), (3, 150)])
def test_swiglu_kernel(dtype, rows, I):
    gu = (2.0 * mx.random.normal((rows, 2 * I), key=mx.random.key(1))).astype(dtype)
    out = fused_norm.swiglu(gu)
    assert out.shape == (rows, I) and out.dtype == dtype
    g, u = np.split(np64(gu), 2, axis=-1)
    want = g / (1.0 + np.exp(-g)) * u
    if dtype != mx.float32:
        want = _round(want, dtype)
    top, mean = _errs(out, want)
    assert top <= TOL[dtype][0] and mean <= TOL[dtype][1], (top, mean)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("B", [1, 3])
def test_compiled_equals_plain_with_the_kernels(monkeypatch, moe, B):
    monkeypatch.setattr(layers, "ADD_NORM", "auto")
    monkeypatch.setattr(layers, "SWIGLU_KERNEL", True)
    model = make_text_model(make_moe_config() if moe else make_text_config(), seed=31)
    model.set_dtype(mx.bfloat16)
    x = mx.zeros((1, 8), mx.bfloat16)
    assert layers.add_norm_on(x)
    assert_same(model, [TOKENS[i : i + 6] for i in range(B)], 12)
    assert {"add_rms_norm", "swiglu"} <= set(fused_norm._built)
