"""The native float16 chains (kernels/cpu_ext `silu_mul`, `conv_silu`) against MLX's own float16
ops, bit for bit (their contract: the compiled decode step, the verify pass and the plain path
round alike whichever runs them), and near the float64 NumPy values: silu for every float16
value; products with random and extreme operands; strided and split inputs; the conv for T 1..5
tokens, batches, strided rows, the layers' routing (`HALF_OPS` on and off give the same bits)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from qwen35_mlx.kernels import cpu_ext
from qwen35_mlx.kernels.gated_delta import decode as decode_mod
from qwen35_mlx.models import layers
from tests.conftest import NATIVE_BUILD_ERROR

pytestmark = pytest.mark.skipif(
    mx.default_device() != mx.cpu or not cpu_ext.available(),
    reason=f"native CPU extension not built or not the default device: {NATIVE_BUILD_ERROR}",
)

ALL_HALVES = np.arange(1 << 16, dtype=np.uint16).view(np.float16)


def bits_equal(got: mx.array, want: mx.array) -> None:
    """Equal float16 bits, any NaN equal to any NaN (MLX and F16C quiet NaNs differently)."""
    assert got.dtype == want.dtype == mx.float16 and got.shape == want.shape
    g, w = np.array(got), np.array(want)
    same = (g.view(np.uint16) == w.view(np.uint16)) | (np.isnan(g) & np.isnan(w))
    bad = np.flatnonzero(~same)
    first = bad[:4]
    assert bad.size == 0, f"{bad.size} differ, at {first}: {g.ravel()[first]} != {w.ravel()[first]}"


def silu_mul_ops(a, b):
    return nn.silu(a) * b


def test_silu_mul_every_float16_gate():
    a = mx.array(ALL_HALVES)
    got = cpu_ext.silu_mul(a, mx.ones_like(a))
    bits_equal(got, silu_mul_ops(a, mx.ones_like(a)))
    bits_equal(got, mx.compile(silu_mul_ops)(a, mx.ones_like(a)))
    # and near silu in float64, where exp(|x|) is a finite float16 (from |x| ~ 11.09 MLX's
    # float16 sigmoid rounds exp to inf and returns exactly 0 or 1 there: silu(x < -11.09) = -0)
    keep = np.isfinite(ALL_HALVES) & (ALL_HALVES >= -11)
    x = ALL_HALVES[keep].astype(np.float64)
    want = x / (1 + np.exp(-x))
    g = np.array(got)[keep].astype(np.float64)
    assert np.all(np.abs(g - want) <= 2e-3 * np.abs(want) + 2**-24)
    assert np.all(np.array(got)[np.isfinite(ALL_HALVES) & (ALL_HALVES < -11.1)] == 0)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0, 1e3])
def test_silu_mul_products(scale):
    rng = np.random.default_rng(int(scale * 10))
    a = mx.array(ALL_HALVES)
    b = mx.array((rng.standard_normal(a.size) * scale).astype(np.float16))
    bits_equal(cpu_ext.silu_mul(a, b), silu_mul_ops(a, b))
    bits_equal(cpu_ext.silu_mul(a, b), mx.compile(silu_mul_ops)(a, b))


@pytest.mark.parametrize("shape", [(1, 352), (3, 352), (2, 5, 7), (4, 16, 1)])
def test_silu_mul_split_and_strided(shape):
    rng = np.random.default_rng(1)
    gu = mx.array((rng.standard_normal((*shape[:-1], 2 * shape[-1])) * 4).astype(np.float16))
    g, u = mx.split(gu, 2, axis=-1)
    bits_equal(cpu_ext.silu_mul(g, u), silu_mul_ops(g, u))
    # the MLP's column form: [rows, 2I, 1] split along axis 1
    col = gu.reshape(-1, 2 * shape[-1], 1)
    g, u = mx.split(col, 2, axis=1)
    bits_equal(cpu_ext.silu_mul(g, u), silu_mul_ops(g, u))
    t = mx.swapaxes(gu, 0, -1)  # no unit stride at all
    g, u = mx.split(t, 2, axis=0)
    bits_equal(cpu_ext.silu_mul(g, u), silu_mul_ops(g, u))


def conv_ops(x, w, T):
    """The ops of decode.py's `_tokens` (and, at T = 1, `conv_qkv_step`)."""
    K = w.shape[1]
    ws = mx.split(w.T, K, axis=0)
    h = x[:, 0:T] * ws[0]
    for j in range(1, K):
        h = h + x[:, j : j + T] * ws[j]
    return h * mx.sigmoid(h)


@pytest.mark.parametrize("T", [1, 2, 3, 5])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("K", [4, 2])
def test_conv_silu_equals_ops(T, B, K):
    rng = np.random.default_rng(T * 10 + B + K)
    C = 96
    x = mx.array((rng.standard_normal((B, K - 1 + T, C)) * 3).astype(np.float16))
    w = mx.array((rng.standard_normal((C, K)) * 0.7).astype(np.float16))
    got = cpu_ext.conv_silu(x, w, T)
    bits_equal(got, conv_ops(x, w, T))
    bits_equal(got, mx.compile(lambda x, w: conv_ops(x, w, T))(x, w))
    # near the float64 conv + silu
    x64, w64 = np.array(x).astype(np.float64), np.array(w).astype(np.float64)
    h = sum(x64[:, j : j + T] * w64[:, j] for j in range(K))
    want = h / (1 + np.exp(-h))
    assert np.abs(np.array(got).astype(np.float64) - want).max() < 2e-2 * max(1, np.abs(want).max())


def test_conv_silu_strided_inputs():
    rng = np.random.default_rng(7)
    B, K, T, C = 2, 4, 2, 64
    big = mx.array((rng.standard_normal((B, K - 1 + T + 2, 2 * C)) * 2).astype(np.float16))
    x = big[:, 1 : K + T, C:]  # rows of stride 2C, an offset
    w = mx.array((rng.standard_normal((K, C)) * 0.5).astype(np.float16)).T  # [C, K] transposed
    bits_equal(cpu_ext.conv_silu(x, w, T), conv_ops(x, w, T))
    xt = mx.swapaxes(mx.array(np.array(x)).transpose(0, 2, 1), 1, 2)  # channels not unit stride
    bits_equal(cpu_ext.conv_silu(xt, w, T), conv_ops(xt, w, T))


def test_conv_silu_rejects_wrong_shapes():
    x = mx.zeros((1, 5, 8), dtype=mx.float16)
    with pytest.raises(ValueError):
        cpu_ext.conv_silu(x, mx.zeros((8, 4), dtype=mx.float16), 3)
    with pytest.raises(ValueError):
        cpu_ext.conv_silu(x.astype(mx.float32), mx.zeros((8, 4)), 2)
    with pytest.raises(ValueError):
        cpu_ext.silu_mul(x, x.astype(mx.float32))


@pytest.fixture
def half_ops_switch():
    saved = cpu_ext.HALF_OPS
    yield
    cpu_ext.HALF_OPS = saved


def test_routing_gives_the_same_bits(half_ops_switch):
    """The layers' swiglu and the decode conv with and without the native chains."""
    rng = np.random.default_rng(3)
    gate = mx.array((rng.standard_normal((2, 352)) * 3).astype(np.float16))
    up = mx.array(rng.standard_normal((2, 352)).astype(np.float16))
    qkv = mx.array(rng.standard_normal((2, 2 * 2 * 16 + 4 * 16)).astype(np.float16))
    conv_state = mx.array(rng.standard_normal((2, 3, qkv.shape[1])).astype(np.float16))
    conv_w = mx.array((rng.standard_normal((qkv.shape[1], 4)) * 0.5).astype(np.float16))
    native = cpu_ext.load()
    got = {}
    for on in (False, True):
        cpu_ext.HALF_OPS = on
        q, k, v, c = decode_mod.conv_qkv_step(qkv, conv_state, conv_w, 2, 16, 4, 16, native)
        got[on] = [layers._swiglu(gate, up), q, k, v, c]
    for a, b in zip(got[False], got[True], strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("R", [1, 2, 5, 9])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 2e4])
def test_matmul_rows_half_in_and_out(R, scale):
    """`matmul_rows(x16, [w], half_out=True)` is `(x16.astype(f32) @ w).astype(f16)` through the
    float32 native call, bit for bit: float16 x read exactly, each result rounded as astype
    (subnormal results at scale 1e-4, overflow to inf at 2e4)."""
    rng = np.random.default_rng(R)
    K, N = 128, 200
    x = mx.array((rng.standard_normal((R, K)) * scale).astype(np.float16))
    w = mx.array((rng.standard_normal((K, N)) * 0.5).astype(np.float32))
    got = cpu_ext.matmul_rows(x, [w], half_out=True)[0]
    want = cpu_ext.matmul_rows(x.astype(mx.float32), [w])[0].astype(mx.float16)
    bits_equal(got, want)
    bits_equal(got, mx.compile(lambda x, w: (x.astype(mx.float32) @ w).astype(mx.float16))(x, w))
    if scale == 2e4:
        assert np.isinf(np.array(got)).any()
    # strided x (a column slice of a wider matrix) and a [R, 1, K] shape
    wide = mx.array((rng.standard_normal((R, 2 * K)) * scale).astype(np.float16))
    xs = wide[:, K:]
    bits_equal(cpu_ext.matmul_rows(xs, [w], half_out=True)[0],
               cpu_ext.matmul_rows(xs.astype(mx.float32), [w])[0].astype(mx.float16))  # fmt: skip
    x3 = x.reshape(R, 1, K)
    bits_equal(cpu_ext.matmul_rows(x3, [w], half_out=True)[0], want.reshape(R, 1, N))
