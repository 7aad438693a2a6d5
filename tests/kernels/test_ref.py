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
