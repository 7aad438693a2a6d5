"""gated_delta_ref (the oracle every backend is tested against) against a float64 NumPy loop."""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta.ref import gated_delta_ref
from tests.conftest import RTOL, rel_err
from tests.kernels.helpers import gated_delta_np, left_pad_mask, make_inputs, np64

# (B, T, Hk, Hv, Dk, Dv, per_key): GQA 1x/2x/4x, Dk != Dv both ways, odd T.
SHAPES = [
    (1, 1, 1, 1, 32, 32, False),
    (2, 5, 1, 2, 32, 16, False),
    (1, 7, 2, 8, 16, 32, True),
    (3, 4, 2, 4, 8, 24, False),
    (2, 6, 1, 1, 24, 8, True),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_ref_matches_numpy(shape):
    B, T, Hk, Hv, Dk, Dv, per_key = shape
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv, per_key=per_key)
    y, s = gated_delta_ref(q, k, v, g, beta, state)
    y_np, s_np = gated_delta_np(q, k, v, g, beta, state)
    assert y.shape == (B, T, Hv, Dv) and s.shape == (B, Hv, Dv, Dk)
    assert s.dtype == mx.float32
    assert rel_err(y, y_np) < RTOL[mx.float32]
    assert rel_err(s, s_np) < RTOL[mx.float32]


@pytest.mark.parametrize("per_key", [False, True])
def test_ref_mask_matches_numpy(per_key):
    B, T = 3, 6
    q, k, v, g, beta, state = make_inputs(B, T, 1, 2, 16, 8, per_key=per_key)
    mask = left_pad_mask(B, T, [0, 2, 5])
    y, s = gated_delta_ref(q, k, v, g, beta, state, mask)
    y_np, s_np = gated_delta_np(q, k, v, g, beta, state, mask)
    assert rel_err(y, y_np) < RTOL[mx.float32]
    assert rel_err(s, s_np) < RTOL[mx.float32]
    # Padded steps write exact zeros.
    assert not np.any(np.asarray(y)[~np.asarray(mask)])


def test_ref_bf16_inputs_fp32_state():
    q, k, v, g, beta, state = make_inputs(2, 5, 1, 2, 32, 16, dtype=mx.bfloat16)
    y, s = gated_delta_ref(q, k, v, g, beta, state)
    assert y.dtype == mx.bfloat16 and s.dtype == mx.float32
    y_np, s_np = gated_delta_np(q, k, v, g, beta, state)
    assert rel_err(np64(y), y_np) < RTOL[mx.bfloat16]
    assert rel_err(s, s_np) < RTOL[mx.float32]


# The compiled single step (CPU decode): odd sizes, Hv = 2 Hk and 4 Hk, Dk != Dv both ways.
DECODE_SHAPES = [(3, 1, 2, 24, 40), (2, 2, 8, 64, 16), (1, 3, 3, 7, 5), (5, 2, 4, 33, 33)]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "B{}Hk{}Hv{}Dk{}Dv{}".format(*s))
def test_ref_decode_step_matches_numpy(shape, per_key, masked):
    B, Hk, Hv, Dk, Dv = shape
    q, k, v, g, beta, state = make_inputs(B, 1, Hk, Hv, Dk, Dv, per_key=per_key, seed=3)
    # g == 0 for some heads (the state is wiped there before the update).
    g = mx.where(mx.arange(Hv).reshape((1, 1, Hv) + (1,) * (g.ndim - 3)) % 3 == 0, 0.0, g)
    mask = mx.array([[b % 2 == 0] for b in range(B)]) if masked else None
    y, s = gated_delta_ref(q, k, v, g, beta, state, mask)
    y_np, s_np = gated_delta_np(q, k, v, g, beta, state, mask)
    assert y.shape == (B, 1, Hv, Dv) and s.shape == (B, Hv, Dv, Dk)
    assert rel_err(y, y_np) < RTOL[mx.float32]
    assert rel_err(s, s_np) < RTOL[mx.float32]
    if masked:
        assert not np.any(np.asarray(y)[1::2])
        assert np.array_equal(np.asarray(s)[1::2], np.asarray(state)[1::2])
