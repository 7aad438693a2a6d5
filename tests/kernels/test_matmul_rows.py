"""The native few-rows matmul (`kernels.cpu_ext.matmul_rows`) against a float64 NumPy matmul:
shapes with column tails, 1-8 rows and more, several weights and adds in one call, strided
inputs, inside `mx.compile`; each row's bits whatever the row count; and on MLX's reference BLAS
the bits of MLX's own `x @ W`, the contract the decode projections rely on."""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels import cpu_blas_is_slow, cpu_ext
from tests.conftest import NATIVE_BUILD_ERROR, RTOL, rel_err

needs_native = pytest.mark.skipif(
    mx.default_device() != mx.cpu or not cpu_ext.available(),
    reason=f"native CPU extension not built or not the default device: {NATIVE_BUILD_ERROR}",
)

# (R, K, N): N with tails past the 16-wide vectors and the R-dependent tiles (16 C columns),
# K down to 1, the small model's widths.
SHAPES = [
    (1, 256, 4096),
    (1, 1, 1),
    (1, 33, 17),
    (2, 256, 8),
    (3, 64, 130),
    (4, 768, 256),
    (5, 7, 33),
    (6, 256, 96),
    (7, 40, 47),
    (8, 256, 512),
    (11, 48, 80),  # more than 8 rows: W read once for each 8
]
IDS = ["R{}K{}N{}".format(*s) for s in SHAPES]


def _arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@needs_native
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_matmul_rows_matches_numpy(shape):
    R, K, N = shape
    x, w, add = _arrays(R * K + N, (R, K), (K, N), (R, N))
    y, ya = cpu_ext.matmul_rows(mx.array(x), [mx.array(w)] * 2, [mx.zeros((R, N)), mx.array(add)])
    assert y.shape == (R, N) and y.dtype == mx.float32
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert rel_err(y, ref) < RTOL[mx.float32]
    assert rel_err(ya, ref + add) < RTOL[mx.float32]
    # The add rounds once after the product, as `add + x @ W` does.
    (plain,) = cpu_ext.matmul_rows(mx.array(x), [mx.array(w)])
    np.testing.assert_array_equal(np.array(ya), np.array(mx.array(add) + plain))


@needs_native
@pytest.mark.parametrize("K, N", [(256, 4096), (33, 17), (64, 130)])
def test_matmul_rows_each_row_as_alone(K, N):
    """Row r of R rows has the bits of that row alone, for R 1-8 and past 8: the compiled step
    (1 row), the verify pass (B (k + 1) rows) and the plain path may not part."""
    (x, w) = _arrays(K + N, (11, K), (K, N))
    W = mx.array(w)
    alone = np.concatenate(
        [np.array(cpu_ext.matmul_rows(mx.array(x[r : r + 1]), [W])[0]) for r in range(11)]
    )
    for R in range(1, 12):
        (y,) = cpu_ext.matmul_rows(mx.array(x[:R]), [W])
        np.testing.assert_array_equal(np.array(y), alone[:R])


@needs_native
@pytest.mark.skipif(not cpu_blas_is_slow(), reason="MLX runs another BLAS than its reference one")
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_matmul_rows_equals_mlx_on_reference_blas(shape):
    R, K, N = shape
    x, w, add = _arrays(R + K + N, (R, K), (K, N), (R, N))
    X, W, A = mx.array(x), mx.array(w), mx.array(add)
    y, ya = cpu_ext.matmul_rows(X, [W, W], [mx.zeros((R, N)), A])
    np.testing.assert_array_equal(np.array(y), np.array(X @ W))
    np.testing.assert_array_equal(np.array(ya), np.array(A + X @ W))
    # W as the transposed view of a Linear's [out, in] weight (MLX's other BLAS form): equal too.
    np.testing.assert_array_equal(np.array(y), np.array(X @ mx.array(w.T.copy()).T))


@needs_native
def test_matmul_rows_several_weights_leading_dims_and_strides():
    x, w0, w1, w2 = _arrays(3, (6, 2, 40), (40, 24), (40, 8), (24, 40))
    # x [3, 1, 40] from a strided slice; w0 contiguous, w1 a column slice, w2's transpose a view.
    X = mx.array(x)[::2, 1:]
    W1 = mx.array(np.concatenate([w1, w1], axis=1))[:, 8:]
    outs = cpu_ext.matmul_rows(X, [mx.array(w0), W1, mx.array(w2).T])
    assert [o.shape for o in outs] == [(3, 1, 24), (3, 1, 8), (3, 1, 24)]
    xs = x[::2, 1:].astype(np.float64)
    for o, w in zip(outs, (w0, w1, w2.T), strict=True):
        assert rel_err(o, xs @ w.astype(np.float64)) < RTOL[mx.float32]
    # The add may be strided too.
    A = mx.array(_arrays(4, (3, 2, 24))[0])[:, :1]
    (ya,) = cpu_ext.matmul_rows(X, [mx.array(w0)], [A])
    np.testing.assert_array_equal(np.array(ya), np.array(A + outs[0]))


@needs_native
def test_matmul_rows_inside_compile():
    x, w0, w1, add = _arrays(5, (2, 64), (64, 48), (64, 16), (2, 48))
    X, W0, W1, A = map(mx.array, (x, w0, w1, add))

    def f(X, A):
        y0, y1 = cpu_ext.matmul_rows(X * 2.0, [W0, W1])
        (z,) = cpu_ext.matmul_rows(X, [W0], [A])
        return y0 + z, y1

    got = mx.compile(f)(X, A)
    want = f(X, A)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.array(g), np.array(w))
    assert rel_err(got[1], (2 * x.astype(np.float64)) @ w1) < RTOL[mx.float32]


@needs_native
def test_matmul_rows_rejects_what_it_does_not_compute():
    x = mx.zeros((2, 8))
    with pytest.raises(ValueError):
        cpu_ext.matmul_rows(x, [mx.zeros((4, 8))])  # K does not match
    with pytest.raises(ValueError):
        cpu_ext.matmul_rows(x.astype(mx.bfloat16), [mx.zeros((8, 4), mx.bfloat16)])
    with pytest.raises(ValueError):
        cpu_ext.matmul_rows(x, [mx.zeros((8, 4))], [mx.zeros((2, 5))])  # add's shape


def test_matmul_rows_not_built(monkeypatch):
    monkeypatch.setattr(cpu_ext, "_loaded", [None])
    assert not cpu_ext.available()
    with pytest.raises(RuntimeError, match="not built"):
        cpu_ext.matmul_rows(mx.zeros((1, 2)), [mx.zeros((2, 2))])
