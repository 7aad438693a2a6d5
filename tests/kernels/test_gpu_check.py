"""tests/kernels/gpu.check, which every GPU kernel test's comparison goes through, on the CPU:
it passes outputs within the tolerance and fails the others with what it found (the error, the
worst element, where the bad elements are, NaN or not)."""

import mlx.core as mx
import numpy as np
import pytest

from tests.kernels.gpu import check


def _outputs(seed=0):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((1, 63, 4, 64)).astype(np.float32)
    s = rng.standard_normal((1, 4, 64, 128)).astype(np.float32)
    return y, s


def test_check_passes_outputs_within_tolerance():
    y, s = _outputs()
    check((mx.array(y * (1 + 1e-7)), mx.array(s)), (mx.array(y), mx.array(s)), mx.float32)


def test_check_says_where_y_is_off():
    y, s = _outputs()
    bad = y.copy()
    bad[0, 40:50, 2, 16:32] += 1e-3
    with pytest.raises(AssertionError) as e:
        check((mx.array(bad), mx.array(s)), (mx.array(y), mx.array(s)), mx.float32)
    msg = str(e.value)
    assert "y (1, 63, 4, 64): rel_err" in msg and "(tol 1e-05)" in msg
    assert "160 of 16128 elements off by more than tol, in [0..0, 40..49, 2..2, 16..31]" in msg
    assert "non-finite" not in msg


def test_check_counts_nan_in_state():
    y, s = _outputs()
    bad = s.copy()
    bad[0, 3, 5, 7] = np.nan
    bad[0, 3, 6, 0] = np.inf
    with pytest.raises(AssertionError) as e:
        check((mx.array(y), mx.array(bad)), (mx.array(y), mx.array(s)), mx.float32)
    msg = str(e.value)
    assert "2 non-finite (1 NaN), the first at (0, 3, 5, 7)" in msg
    assert "worst at (0, 3, 5, 7): got nan" in msg
