"""gated_delta_chunked (the chunked WY/UT prefill path) against ref and the float64 NumPy loop."""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta.chunked import gated_delta_chunked
from qwen35_mlx.kernels.gated_delta.ref import gated_delta_ref
from tests.conftest import RTOL, rel_err
from tests.kernels.helpers import gated_delta_np, left_pad_mask, make_inputs, np64

TOL = RTOL[mx.float32]

# (B, T, Hk, Hv, Dk, Dv, per_key): a covering set, not the product. Every value of
# Hv/Hk in {1, 2, 4}, Dk in {32, 64, 128, 192, 256}, Dv in {32, 64, 128}, T in
# {1, 2, 63, 64, 65, 300}, B in {1, 3} appears, with Dk != Dv both ways, both gate kinds.
SHAPES = [
    (1, 1, 1, 1, 32, 32, False),
    (3, 2, 1, 2, 64, 32, True),
    (1, 63, 2, 4, 128, 64, False),
    (3, 64, 1, 4, 192, 32, False),
    (1, 65, 4, 4, 256, 128, False),
    (1, 65, 1, 2, 64, 128, True),
    (3, 63, 2, 2, 32, 64, True),
    (1, 300, 2, 4, 256, 64, False),
    (3, 300, 1, 1, 32, 128, False),
    (1, 300, 1, 2, 64, 32, True),
]


def _ids(shape):
    B, T, Hk, Hv, Dk, Dv, pk = shape
    return f"B{B}-T{T}-Hk{Hk}-Hv{Hv}-Dk{Dk}-Dv{Dv}-{'perkey' if pk else 'scalar'}"


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_chunked_matches_ref(shape):
    B, T, Hk, Hv, Dk, Dv, per_key = shape
    x = make_inputs(B, T, Hk, Hv, Dk, Dv, per_key=per_key)
    y, s = gated_delta_chunked(*x)
    y_ref, s_ref = gated_delta_ref(*x)
    assert y.shape == (B, T, Hv, Dv) and s.shape == (B, Hv, Dv, Dk) and s.dtype == mx.float32
    assert rel_err(y, y_ref) < TOL
    assert rel_err(s, s_ref) < TOL


@pytest.mark.parametrize("per_key", [False, True])
def test_chunked_matches_numpy(per_key):
    x = make_inputs(1, 70, 1, 2, 32, 16, per_key=per_key)
    y, s = gated_delta_chunked(*x)
    y_np, s_np = gated_delta_np(*x)
    assert rel_err(y, y_np) < TOL
    assert rel_err(s, s_np) < TOL


@pytest.mark.parametrize("per_key", [False, True])
def test_chunked_left_padding_mask(per_key):
    B, T = 3, 70
    q, k, v, g, beta, state = make_inputs(B, T, 1, 2, 64, 32, per_key=per_key)
    mask = left_pad_mask(B, T, [0, 3, 66])
    y, s = gated_delta_chunked(q, k, v, g, beta, state, mask)
    y_ref, s_ref = gated_delta_ref(q, k, v, g, beta, state, mask)
    assert rel_err(y, y_ref) < TOL
    assert rel_err(s, s_ref) < TOL
    assert not np.any(np.asarray(y)[~np.asarray(mask)])
    # Garbage (even nan/inf) in padded slots must not leak into outputs or state.
    pad = ~mask
    nan4 = mx.where(pad[:, :, None, None], mx.nan, 0.0)
    g_bad = mx.where(pad[:, :, None, None] if per_key else pad[:, :, None], mx.inf, g)
    beta_bad = mx.where(pad[:, :, None], mx.nan, beta)
    y2, s2 = gated_delta_chunked(q + nan4, k + nan4, v + nan4, g_bad, beta_bad, state, mask)
    assert np.array_equal(np.asarray(y2), np.asarray(y))
    assert np.array_equal(np.asarray(s2), np.asarray(s))


def test_chunked_split_equals_one_call():
    q, k, v, g, beta, state = make_inputs(3, 150, 2, 4, 64, 32)
    y, s = gated_delta_chunked(q, k, v, g, beta, state)
    cut = 70
    head = [x[:, :cut] for x in (q, k, v, g, beta)]
    tail = [x[:, cut:] for x in (q, k, v, g, beta)]
    y1, s1 = gated_delta_chunked(*head, state)
    y2, s2 = gated_delta_chunked(*tail, s1)
    assert rel_err(mx.concatenate([y1, y2], axis=1), y) < TOL
    assert rel_err(s2, s) < TOL


@pytest.mark.parametrize("per_key", [False, True])
def test_chunked_g_exactly_zero(per_key):
    q, k, v, g, beta, state = make_inputs(1, 130, 1, 2, 32, 32, per_key=per_key)
    # A full reset in the middle of a chunk, at a chunk's first step, and near the end;
    # per-key: only some key columns reset.
    steps = mx.array([5, 64, 127])
    zero = (mx.arange(130)[:, None] == steps[None, :]).any(-1)  # [T]
    if per_key:
        cols = mx.arange(32) % 3 == 0
        zero = zero[:, None, None] & cols[None, None, :]
        g = mx.where(zero[None], 0.0, g)
    else:
        g = mx.where(zero[None, :, None], 0.0, g)
    y, s = gated_delta_chunked(q, k, v, g, beta, state)
    assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(s)).all()
    y_np, s_np = gated_delta_np(q, k, v, g, beta, state)
    assert rel_err(y, y_np) < TOL
    assert rel_err(s, s_np) < TOL
    # Tiny but nonzero decays over a whole chunk (products underflow to 0).
    g_tiny = mx.full(g.shape, 1e-20)
    y, s = gated_delta_chunked(q, k, v, g_tiny, beta, state)
    y_np, s_np = gated_delta_np(q, k, v, g_tiny, beta, state)
    assert rel_err(y, y_np) < TOL and rel_err(s, s_np) < TOL


@pytest.mark.parametrize("per_key", [False, True])
def test_chunked_strong_decay(per_key):
    # Decays of 1e-4..0.05 per step: products inside a chunk run far below fp32's normal range
    # (cut to 0 at e^-40 for speed); results must still match the float64 loop.
    x = make_inputs(1, 130, 1, 2, 32, 16, per_key=per_key, g_range=(1e-4, 0.05))
    y, s = gated_delta_chunked(*x)
    y_np, s_np = gated_delta_np(*x)
    assert rel_err(y, y_np) < TOL and rel_err(s, s_np) < TOL


def test_chunked_correlated_keys():
    # Near-identical keys, beta near 1, no decay: (I + A) is as far from I as it gets.
    B, T, Hk, Hv, Dk, Dv = 1, 128, 1, 2, 64, 32
    q, _, v, _, _, state = make_inputs(B, T, Hk, Hv, Dk, Dv)
    base = mx.random.normal((1, 1, Hk, Dk))
    k = base + 1e-3 * mx.random.normal((B, T, Hk, Dk))
    k = k * mx.rsqrt((k * k).sum(-1, keepdims=True))
    g = mx.ones((B, T, Hv))
    beta = mx.random.uniform(0.95, 1.0, (B, T, Hv))
    y, s = gated_delta_chunked(q, k, v, g, beta, state)
    y_np, s_np = gated_delta_np(q, k, v, g, beta, state)
    assert rel_err(y, y_np) < TOL
    assert rel_err(s, s_np) < TOL


def _low_precision_drift(fn, dtype, T):
    # Same underlying values in fp32 and in `dtype`: the drift is input rounding only, and
    # must stay within that dtype's tolerance over the whole sequence (no accumulating error).
    q, k, v, g, beta, state = make_inputs(1, T, 1, 2, 32, 32, g_range=(0.9, 1.0))
    y32, s32 = fn(q, k, v, g, beta, state)
    y16, s16 = fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta, state)
    assert y16.dtype == dtype and s16.dtype == mx.float32
    assert np.isfinite(np64(y16)).all() and np.isfinite(np.asarray(s16)).all()
    assert rel_err(np64(y16), y32) < RTOL[dtype]
    assert rel_err(s16, s32) < RTOL[dtype]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_chunked_low_precision_long(dtype):
    _low_precision_drift(gated_delta_chunked, dtype, 4096)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_ref_low_precision_long(dtype):
    _low_precision_drift(gated_delta_ref, dtype, 4096)


@pytest.mark.parametrize("per_key", [False, True])
def test_chunked_grad_matches_ref(per_key):
    B, T, Hk, Hv, Dk, Dv = 2, 67, 1, 2, 32, 16
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv, per_key=per_key)
    mask = left_pad_mask(B, T, [0, 4])
    wy = mx.random.normal((B, T, Hv, Dv))
    ws = mx.random.normal((B, Hv, Dv, Dk))

    def loss(fn):
        def f(q, k, v, g, beta, state):
            y, s = fn(q, k, v, g, beta, state, mask)
            return (y * wy).sum() + (s * ws).sum()

        return f

    argnums = list(range(6))
    grads_c = mx.grad(loss(gated_delta_chunked), argnums=argnums)(q, k, v, g, beta, state)
    grads_r = mx.grad(loss(gated_delta_ref), argnums=argnums)(q, k, v, g, beta, state)
    for name, gc, gr in zip(("q", "k", "v", "g", "beta", "state"), grads_c, grads_r, strict=True):
        assert np.isfinite(np.asarray(gc)).all(), name
        assert rel_err(gc, gr) < TOL, name


def test_unit_lower_inverse_paths_agree():
    # LAPACK (CPU) and the block recursion in plain ops (GPU streams) against float64 NumPy,
    # values and gradients (the LAPACK path carries a hand-written vjp).
    from qwen35_mlx.kernels.gated_delta import chunked as ch

    A = mx.where(ch._lower(64, strict=True), 0.3 * mx.random.normal((3, 2, 64, 64)), 0.0)
    want = np.linalg.inv(np.eye(64) + np.asarray(A, dtype=np.float64))
    G = mx.random.normal(A.shape)
    grads = []
    for inv in (ch._inv_unit_lower_lapack, ch._inv_unit_lower_blocks):
        assert rel_err(inv(A), want) < TOL
        grads.append(mx.grad(lambda a, inv=inv: (inv(a) * G).sum())(A))
    assert rel_err(grads[0], grads[1]) < TOL
    assert not np.any(np.triu(np.asarray(grads[0])))


def test_chunked_block_inverse_path_matches_ref(monkeypatch):
    from qwen35_mlx.kernels.gated_delta import chunked as ch

    monkeypatch.setattr(ch, "_inv_unit_lower", ch._inv_unit_lower_blocks)
    x = make_inputs(2, 100, 1, 2, 64, 32)
    y, s = gated_delta_chunked(*x)
    y_ref, s_ref = gated_delta_ref(*x)
    assert rel_err(y, y_ref) < TOL and rel_err(s, s_ref) < TOL


@pytest.mark.parametrize("group", [1, 3, 1 << 30])
def test_chunked_chunk_groups_match_ref(monkeypatch, group):
    """Scalar-gate chunks are prepared in groups (2 on the CPU, all at once on a GPU): uneven
    groups and one group for all 5 chunks give the same result."""
    from qwen35_mlx.kernels.gated_delta import chunked as ch

    monkeypatch.setattr(ch, "_SCALAR_GROUP", group)
    x = make_inputs(1, 300, 1, 2, 32, 32)
    y, s = gated_delta_chunked(*x)
    y_ref, s_ref = gated_delta_ref(*x)
    assert rel_err(y, y_ref) < TOL and rel_err(s, s_ref) < TOL
