"""Fused GPU kernels (Metal or CUDA build of source.py) against the token-by-token reference.

Runs only where MLX has a GPU backend (the lent NVIDIA machine, or a Mac). The reference runs on
the CPU stream in fp32, so it is exact whatever the GPU's matmul precision. Every kernel output is
poisoned with NaN before the run, so an element the kernel fails to write fails the comparison.
State layout everywhere: [B, Hv, Dv, Dk] fp32.
"""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import _pick as pick_backend
from qwen35_mlx.kernels.gated_delta import compute_gates, gated_delta, gated_delta_update
from qwen35_mlx.kernels.gated_delta.ref import gated_delta_ref
from tests.conftest import RTOL, rel_err
from tests.kernels.helpers import left_pad_mask, make_gate_inputs, make_inputs

if mx.metal.is_available():
    BACKEND = "metal"
elif mx.cuda.is_available():
    BACKEND = "cuda"
else:
    BACKEND = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(BACKEND is None, reason="needs MLX with a Metal or CUDA GPU"),
]

NAN = float("nan")


def _impl():
    from qwen35_mlx.kernels.gated_delta import _gpu_backend

    return _gpu_backend(BACKEND)


def kernel_inputs(B, T, Hk, Hv, Dk, Dv, *, dtype=mx.float32, per_key=False, seed=0, pad=None):
    """The shared helpers' inputs as one dict: q, k, v, g, beta, state (make_inputs), the raw
    gates a, b, A_log, dt_bias (make_gate_inputs) and mask (pad: left padding per batch row, or
    None for no mask)."""
    x = make_inputs(B, T, Hk, Hv, Dk, Dv, per_key=per_key, dtype=dtype, seed=seed)
    x = dict(zip(("q", "k", "v", "g", "beta", "state"), x, strict=True))
    gates = make_gate_inputs(B, T, Hv, dtype=dtype, seed=seed)
    x.update(zip(("a", "b", "A_log", "dt_bias"), gates, strict=True))
    x["mask"] = None if pad is None else left_pad_mask(B, T, pad)
    return x


def ref(x, g=None, beta=None, state=None):
    """gated_delta_ref on the CPU stream (exact fp32)."""
    g = x["g"] if g is None else g
    beta = x["beta"] if beta is None else beta
    state = x["state"] if state is None else state
    with mx.stream(mx.cpu):
        y, s = gated_delta_ref(x["q"], x["k"], x["v"], g, beta, state, x["mask"])
        mx.eval(y, s)
    return y, s


def ref_fused(x):
    with mx.stream(mx.cpu):
        g, beta = compute_gates(x["a"], x["b"], x["A_log"], x["dt_bias"])
    return ref(x, g, beta)


def kern(x, **kw):
    y, s = _impl().gated_delta_kernel(
        x["q"], x["k"], x["v"], x["g"], x["beta"], x["state"], x["mask"], init_value=NAN, **kw
    )
    mx.eval(y, s)
    return y, s


def kern_fused(x, **kw):
    """The fused-gating kernel (gates computed inside it)."""
    y, s = _impl().gated_delta_update_kernel(
        x["q"],
        x["k"],
        x["v"],
        x["a"],
        x["b"],
        x["A_log"],
        x["dt_bias"],
        x["state"],
        x["mask"],
        init_value=NAN,
        **kw,
    )
    mx.eval(y, s)
    return y, s


def check(got, want, dtype):
    (y, s), (y_ref, s_ref) = got, want
    assert y.dtype == y_ref.dtype and s.dtype == mx.float32
    assert y.shape == y_ref.shape and s.shape == s_ref.shape
    y32, s32 = np.array(y.astype(mx.float32)), np.array(s)
    assert np.isfinite(y32).all() and np.isfinite(s32).all()
    assert rel_err(y32, np.array(y_ref.astype(mx.float32))) <= RTOL[dtype]
    assert rel_err(s32, np.array(s_ref)) <= RTOL[dtype]


# (B, T, Hk, Hv, Dk, Dv): every Hv/Hk in {1, 2, 4}, Dk in {32, 64, 128, 192, 256},
# Dv in {32, 64, 128} and odd Dv, Dk != Dv both ways, T in {1, 2, 63, 64, 65, 300}, B in {1, 3}.
SHAPES = [
    (1, 1, 1, 1, 32, 32),
    (3, 1, 2, 4, 128, 128),
    (3, 2, 2, 4, 64, 32),
    (1, 63, 1, 4, 128, 64),
    (3, 64, 2, 2, 192, 128),
    (1, 65, 1, 2, 256, 64),
    (1, 65, 2, 2, 32, 128),
    (3, 300, 2, 4, 128, 128),
    (2, 7, 4, 4, 256, 32),
    (2, 5, 1, 2, 64, 20),
    (1, 3, 1, 1, 96, 1),
    (2, 9, 16, 32, 128, 128),
]


def _pads(B, T):
    return [(T // 3, 0, T)[i % 3] for i in range(B)]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}Hk{}Hv{}Dk{}Dv{}".format(*s))
def test_gated_delta_kernel_matches_ref(shape, per_key, masked):
    B, T = shape[:2]
    x = kernel_inputs(*shape, per_key=per_key, pad=_pads(B, T) if masked else None)
    check(kern(x), ref(x), mx.float32)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize(
    "shape", [SHAPES[1], SHAPES[3], SHAPES[7], SHAPES[9], SHAPES[11]], ids=lambda s: str(s)
)
def test_gated_delta_update_kernel_matches_compute_gates_ref(shape, masked):
    B, T = shape[:2]
    x = kernel_inputs(*shape, pad=_pads(B, T) if masked else None)
    check(kern_fused(x), ref_fused(x), mx.float32)


@pytest.mark.parametrize("lanes", [4, 8, 16, 32])
@pytest.mark.parametrize("warps", [1, 4, 8])
@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("gate", ["scalar", "perkey", "fused"])
def test_every_layout_matches_ref(lanes, warps, prefetch, gate):
    # Dk = 128 admits every lane count; Dv = 72 leaves a partial warp and a partial threadgroup.
    x = kernel_inputs(2, 33, 2, 4, 128, 72, per_key=gate == "perkey", pad=[5, 0])
    kw = dict(lanes=lanes, warps=warps, prefetch=prefetch)
    if gate == "fused":
        check(kern_fused(x, **kw), ref_fused(x), mx.float32)
    else:
        check(kern(x, **kw), ref(x), mx.float32)


@pytest.mark.parametrize("lanes", [4, 8, 16, 32])
@pytest.mark.parametrize("warps", [1, 8])
@pytest.mark.parametrize("gate", ["scalar", "perkey", "fused"])
def test_every_decode_layout_matches_ref(lanes, warps, gate):
    # T = 1 runs the straight-line decode kernel; batch row 2 is padding.
    x = kernel_inputs(3, 1, 2, 4, 128, 72, per_key=gate == "perkey", pad=[0, 0, 1])
    kw = dict(lanes=lanes, warps=warps)
    if gate == "fused":
        check(kern_fused(x, **kw), ref_fused(x), mx.float32)
    else:
        check(kern(x, **kw), ref(x), mx.float32)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
def test_input_dtypes(dtype):
    x = kernel_inputs(3, 65, 2, 4, 128, 64, dtype=dtype, pad=_pads(3, 65))
    check(kern(x), ref(x), dtype)
    check(kern_fused(x), ref_fused(x), dtype)


def _offset_view(x, offset):
    """x's values in a row-contiguous view that starts `offset` elements into its buffer."""
    flat = mx.concatenate([mx.zeros((offset,), x.dtype), x.reshape(-1)])
    mx.eval(flat)
    return flat[offset:].reshape(x.shape)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32], ids=str)
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
def test_inputs_at_unaligned_offsets(dtype, per_key):
    """q, k (and per-key g) may start at any element offset (no vector loads assume more)."""
    x = kernel_inputs(2, 9, 1, 2, 64, 32, dtype=dtype, per_key=per_key)
    want = ref(x)
    x["q"], x["k"] = _offset_view(x["q"], 1), _offset_view(x["k"], 3)
    if per_key:
        x["g"] = _offset_view(x["g"], 1)
    check(kern(x), want, dtype)


@pytest.mark.parametrize("fused", [False, True], ids=["gates", "fused"])
def test_state_carried_across_two_calls(fused):
    x = kernel_inputs(3, 130, 2, 4, 128, 64, pad=[0, 40, 100])
    run = kern_fused if fused else kern
    y_full, s_full = run(x)
    split = 77
    first = {
        n: (a[:, :split] if a is not None and a.ndim >= 2 and a.shape[1] == 130 else a)
        for n, a in x.items()
    }
    second = {
        n: (a[:, split:] if a is not None and a.ndim >= 2 and a.shape[1] == 130 else a)
        for n, a in x.items()
    }
    y1, s1 = run(first)
    second["state"] = s1
    y2, s2 = run(second)
    check((mx.concatenate([y1, y2], axis=1), s2), (y_full, s_full), mx.float32)


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
def test_g_zero(per_key):
    """g == 0 resets the state at that step; the kernels must match ref exactly there."""
    x = kernel_inputs(2, 40, 1, 2, 64, 32, per_key=per_key)
    g = np.array(x["g"])
    g[:, ::7] = 0.0
    x["g"] = mx.array(g)
    check(kern(x), ref(x), mx.float32)


def test_fused_gate_underflow_to_zero():
    x = kernel_inputs(2, 40, 1, 2, 64, 32)
    a = np.array(x["a"])
    a[:, ::5] = 80.0  # softplus(80) * exp(A_log) >> 104: exp underflows to exactly 0
    x["a"] = mx.array(a)
    x["A_log"] = mx.full(x["A_log"].shape, 2.0)
    with mx.stream(mx.cpu):
        g, _ = compute_gates(x["a"], x["b"], x["A_log"], x["dt_bias"])
    assert (np.array(g)[:, ::5] == 0.0).all()
    check(kern_fused(x), ref_fused(x), mx.float32)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
def test_low_precision_inputs_4096_steps(dtype):
    """bf16 / fp16 inputs over 4096 steps: finite, and within the dtype's tolerance of ref."""
    x = kernel_inputs(1, 4096, 1, 2, 64, 32, dtype=dtype)
    x["state"] = mx.zeros_like(x["state"])
    check(kern(x), ref(x), dtype)
    check(kern_fused(x), ref_fused(x), dtype)


def _check_public_api(x, backend):
    """Both public entry points, with `backend`, against the reference."""
    y, s = gated_delta(
        x["q"], x["k"], x["v"], x["g"], x["beta"], x["state"], x["mask"], backend=backend
    )
    check((y, s), ref(x), mx.float32)
    gates = (x["a"], x["b"], x["A_log"], x["dt_bias"])
    y, s = gated_delta_update(
        x["q"], x["k"], x["v"], *gates, x["state"], x["mask"], backend=backend
    )
    check((y, s), ref_fused(x), mx.float32)


def test_public_api_runs_the_kernel():
    x = kernel_inputs(2, 17, 2, 4, 128, 64, pad=[3, 0])
    assert pick_backend("auto", x["q"], x["v"], x["g"]) in (BACKEND, "chunked")
    decode = kernel_inputs(4, 1, 2, 4, 128, 64)
    assert pick_backend("auto", decode["q"], decode["v"], decode["g"]) == BACKEND
    _check_public_api(x, BACKEND)


@pytest.mark.parametrize("Dk", [48, 16, 320])
def test_unsupported_shape_falls_back(Dk):
    x = kernel_inputs(2, 9, 1, 2, Dk, 32, pad=[2, 0])
    assert not _impl().supports(x["q"], x["v"], x["g"])
    for backend in (BACKEND, "auto"):
        _check_public_api(x, backend)
