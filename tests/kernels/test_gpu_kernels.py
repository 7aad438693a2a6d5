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
from qwen35_mlx.kernels.gated_delta import compute_gates, gated_delta_decode
from tests.conftest import RTOL, rel_err
from tests.kernels.gpu import (
    BACKEND,
    GPU_ONLY,
    NAN,
    SHAPES,
    check,
    check_public_api,
    kernel_inputs,
    ref,
    ref_fused,
    run_kernel,
    split_at,
)
from tests.kernels.gpu import pads as _pads
from tests.kernels.helpers import gated_delta_decode_np, make_decode_inputs

pytestmark = GPU_ONLY


def _impl():
    from qwen35_mlx.kernels.gated_delta import _gpu_backend

    return _gpu_backend(BACKEND)


def kern(x, **kw):
    return run_kernel(_impl().gated_delta_kernel, x, **kw)


def kern_fused(x, **kw):
    """The fused-gating kernel (gates computed inside it)."""
    return run_kernel(_impl().gated_delta_update_kernel, x, fused=True, **kw)


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
    first, second = split_at(x, 77)
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


def test_public_api_runs_the_kernel():
    x = kernel_inputs(2, 17, 2, 4, 128, 64, pad=[3, 0])
    assert pick_backend("auto", x["q"], x["v"], x["g"]) in (BACKEND, "chunked")
    decode = kernel_inputs(4, 1, 2, 4, 128, 64)
    assert pick_backend("auto", decode["q"], decode["v"], decode["g"]) == BACKEND
    check_public_api(x, BACKEND)


@pytest.mark.parametrize("Dk", [48, 16, 320])
def test_unsupported_shape_falls_back(Dk):
    x = kernel_inputs(2, 9, 1, 2, Dk, 32, pad=[2, 0])
    assert not _impl().supports(x["q"], x["v"], x["g"])
    for backend in (BACKEND, "auto"):
        check_public_api(x, backend)


# gated_delta_decode: the conv decode kernel (conv + silu + norms + gates + recurrence, T = 1).
DECODE_NAMES = ("qkv", "conv_state", "conv_w", "a", "b", "A_log", "dt_bias", "state")
# (B, Hk, Hv, Dk, Dv, K): the 0.8B and 9B shapes at B = 1, 3, 32; Hv/Hk in {1, 2, 4}; Dk in
# {32, 64, 96, 128, 256}; odd and tiny Dv; K in {2, 4}.
DECODE_SHAPES = [
    (1, 16, 16, 128, 128, 4),
    (3, 16, 32, 128, 128, 4),
    (32, 16, 16, 128, 128, 4),
    (2, 2, 4, 64, 32, 4),
    (5, 1, 2, 32, 20, 4),
    (3, 2, 2, 256, 64, 4),
    (2, 1, 1, 96, 1, 2),
]


def _decode_kw(Hk, Dk, Hv, Dv):
    return dict(num_k_heads=Hk, head_k_dim=Dk, num_v_heads=Hv, head_v_dim=Dv)


def _decode_mask(B):
    return mx.array([b % 3 != 1 for b in range(B)])


def decode_kern(x, mask, dims, **kw):
    """The conv decode kernel with NaN-poisoned outputs."""
    args = [x[n] for n in DECODE_NAMES]
    out = _impl().gated_delta_decode_kernel(*args, mask, init_value=NAN, **kw)
    mx.eval(out)
    return out


def decode_ref(x, mask, dims):
    """The ref backend on the CPU stream (exact fp32)."""
    with mx.stream(mx.cpu):
        out = gated_delta_decode(
            *[x[n] for n in DECODE_NAMES], mask=mask, backend="ref", **_decode_kw(*dims)
        )
        mx.eval(out)
    return out


def check_decode(got, x, mask, dims, dtype):
    """got against ref (the same roundings) and the float64 step, within dtype's tolerance;
    the conv state exactly."""
    Hk, Dk, Hv, Dv = dims
    y, s, cs = got
    y_ref, s_ref, cs_ref = decode_ref(x, mask, dims)
    y_np, s_np, _ = gated_delta_decode_np(
        *[x[n] for n in DECODE_NAMES], mask, Hk=Hk, Dk=Dk, Hv=Hv, Dv=Dv
    )
    assert y.dtype == cs.dtype == x["qkv"].dtype and s.dtype == mx.float32
    assert y.shape == y_ref.shape and s.shape == s_ref.shape and cs.shape == cs_ref.shape
    y32, s32 = np.array(y.astype(mx.float32)), np.array(s)
    assert np.isfinite(y32).all() and np.isfinite(s32).all()
    assert np.array_equal(np.array(cs.astype(mx.float32)), np.array(cs_ref.astype(mx.float32)))
    assert rel_err(y32, np.array(y_ref.astype(mx.float32))) <= RTOL[dtype]
    assert rel_err(s32, np.array(s_ref)) <= RTOL[dtype]
    assert rel_err(y32, y_np) <= RTOL[dtype]
    assert rel_err(s32, s_np) <= RTOL[dtype]
    if mask is not None:
        off = ~np.array(mask)
        assert not np.any(y32[off])
        assert np.array_equal(s32[off], np.array(x["state"])[off])


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "B{}Hk{}Hv{}Dk{}Dv{}K{}".format(*s))
def test_gated_delta_decode_kernel_matches_ref(shape, masked, dtype):
    B, Hk, Hv, Dk, Dv, K = shape
    dims = (Hk, Dk, Hv, Dv)
    x = make_decode_inputs(B, Hk, Hv, Dk, Dv, K, dtype=dtype, seed=B)
    mask = _decode_mask(B) if masked else None
    check_decode(decode_kern(x, mask, dims), x, mask, dims, dtype)


@pytest.mark.parametrize("lanes", [4, 8, 16, 32])
@pytest.mark.parametrize("warps", [1, 2, 4, 8])
def test_every_conv_decode_layout_matches_ref(lanes, warps):
    # Dv = 72 leaves a partial warp and a partial threadgroup; row 1 is padding.
    dims = (2, 128, 4, 72)
    x = make_decode_inputs(3, 2, 4, 128, 72, dtype=mx.bfloat16, seed=1)
    mask = _decode_mask(3)
    out = decode_kern(x, mask, dims, lanes=lanes, warps=warps)
    check_decode(out, x, mask, dims, mx.bfloat16)


def test_conv_decode_mixed_dtypes_and_views():
    """fp32 conv state and weight with bf16 activations; the weight as the layer passes it (a
    [C, K] view of the [C, K, 1] conv1d weight); q, k, v values match ref."""
    dims = (2, 64, 4, 32)
    x = make_decode_inputs(3, 2, 4, 64, 32, dtype=mx.bfloat16, seed=2)
    x["conv_state"] = x["conv_state"].astype(mx.float32) * 1.001
    x["conv_w"] = x["conv_w"].astype(mx.float32)[:, :, None][:, :, 0]
    check_decode(decode_kern(x, None, dims), x, None, dims, mx.bfloat16)


def test_conv_decode_chained_steps_match_ref():
    """Sixteen steps, each feeding back its conv state and recurrent state."""
    dims = (2, 128, 4, 128)
    x = make_decode_inputs(4, 2, 4, 128, 128, dtype=mx.bfloat16, seed=3)
    r = dict(x)
    mask = _decode_mask(4)
    tokens = mx.random.normal((16, 4, x["qkv"].shape[1]), key=mx.random.key(9))
    for t in range(16):
        x["qkv"] = r["qkv"] = tokens[t].astype(mx.bfloat16)
        y, x["state"], x["conv_state"] = decode_kern(x, mask, dims)
        y_r, r["state"], r["conv_state"] = decode_ref(r, mask, dims)
    assert rel_err(np.array(x["state"]), np.array(r["state"])) <= RTOL[mx.bfloat16]
    assert (
        rel_err(np.array(y.astype(mx.float32)), np.array(y_r.astype(mx.float32)))
        <= RTOL[mx.bfloat16]
    )


def test_gated_delta_decode_auto_runs_the_kernel(monkeypatch):
    monkeypatch.delenv("QWEN35_MLX_GDN_BACKEND", raising=False)
    import qwen35_mlx.kernels.gated_delta.decode as decode_mod

    def no_ref(*a, **kw):
        raise AssertionError("auto took the ref path on the GPU")

    dims = (16, 128, 32, 128)
    x = make_decode_inputs(2, 16, 32, 128, 128, dtype=mx.bfloat16)
    want = decode_ref(x, None, dims)
    monkeypatch.setattr(decode_mod, "gated_delta_decode_ref", no_ref)
    got = gated_delta_decode(*[x[n] for n in DECODE_NAMES], **_decode_kw(*dims))
    mx.eval(got)
    assert rel_err(np.array(got[1]), np.array(want[1])) <= RTOL[mx.bfloat16]


def test_gated_delta_decode_auto_large_batch_takes_conv_ops_and_recurrent_kernel(monkeypatch):
    # Above _CONV_KERNEL_MAX_B rows, auto runs the conv in ops and the recurrent kernel (faster
    # there); the result is the same step.
    monkeypatch.delenv("QWEN35_MLX_GDN_BACKEND", raising=False)
    import qwen35_mlx.kernels.gated_delta as gd

    calls = []
    real = gd._conv_ops_then_kernel
    monkeypatch.setattr(gd, "_conv_ops_then_kernel", lambda *a: calls.append(1) or real(*a))
    dims = (16, 128, 16, 128)
    B = gd._CONV_KERNEL_MAX_B + 3
    x = make_decode_inputs(B, 16, 16, 128, 128, dtype=mx.bfloat16)
    want = decode_ref(x, None, dims)
    got = gated_delta_decode(*[x[n] for n in DECODE_NAMES], **_decode_kw(*dims))
    mx.eval(got)
    assert calls == [1]
    for i in range(3):
        f32 = mx.float32
        assert (
            rel_err(np.array(got[i].astype(f32)), np.array(want[i].astype(f32)))
            <= RTOL[mx.bfloat16]
        )


def _norm_inputs(B, Hv, Dv, dtype, seed=0):
    kz, kw = mx.random.split(mx.random.key(seed + 31))
    z = (2 * mx.random.normal((B, Hv * Dv), key=kz)).astype(dtype)
    w = (1 + 0.3 * mx.random.normal((Dv,), key=kw)).astype(dtype)
    return z, w


# The gated-norm variant: Dv = 128 (16 warps of 4 lanes), 64 (8), 20 (a partial warp), and a
# batch of 32 rows.
NORM_SHAPES = [
    (1, 16, 16, 128, 128, 4),
    (3, 16, 32, 128, 128, 4),
    (32, 16, 16, 128, 128, 4),
    (2, 2, 4, 64, 64, 4),
    (5, 1, 2, 32, 20, 4),
]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "B{}Hk{}Hv{}Dk{}Dv{}K{}".format(*s))
def test_gated_delta_decode_norm_kernel_matches_ref(shape, masked, dtype):
    """The conv decode kernel with the layer's gated norm inside, against ref (the step, then
    the norm as mx ops, on the CPU stream); the states as without the norm."""
    B, Hk, Hv, Dk, Dv, K = shape
    dims = (Hk, Dk, Hv, Dv)
    x = make_decode_inputs(B, Hk, Hv, Dk, Dv, K, dtype=dtype, seed=B + 1)
    z, w = _norm_inputs(B, Hv, Dv, dtype, seed=B)
    mask = _decode_mask(B) if masked else None
    assert _impl().supports_conv(x["qkv"], x["conv_w"], x["state"], w)
    got = decode_kern(x, mask, dims, z=z, norm_w=w, norm_eps=1e-6)
    with mx.stream(mx.cpu):
        want = gated_delta_decode(
            *[x[n] for n in DECODE_NAMES], mask=mask, z=z, norm_weight=w, norm_eps=1e-6,
            backend="ref", **_decode_kw(*dims),
        )  # fmt: skip
        mx.eval(want)
    y, s, cs = got
    assert y.dtype == dtype and y.shape == want[0].shape
    y32 = np.array(y.astype(mx.float32))
    assert np.isfinite(y32).all()
    assert rel_err(y32, np.array(want[0].astype(mx.float32))) <= RTOL[dtype]
    assert rel_err(np.array(s), np.array(want[1])) <= RTOL[dtype]
    assert np.array_equal(np.array(cs.astype(mx.float32)), np.array(want[2].astype(mx.float32)))
    if mask is not None:
        assert not np.any(y32[~np.array(mask)])


def test_gated_delta_decode_norm_auto_takes_the_kernel(monkeypatch):
    """auto with z runs the norm inside the kernel (no ops norm after it) at the 0.8B layer."""
    monkeypatch.delenv("QWEN35_MLX_GDN_BACKEND", raising=False)
    import qwen35_mlx.kernels.gated_delta.decode as decode_mod

    calls = []
    real = decode_mod.gated_rms_norm
    monkeypatch.setattr(decode_mod, "gated_rms_norm", lambda *a: calls.append(1) or real(*a))
    dims = (16, 128, 16, 128)
    x = make_decode_inputs(1, 16, 16, 128, 128, dtype=mx.bfloat16)
    z, w = _norm_inputs(1, 16, 128, mx.bfloat16)
    args = [x[n] for n in DECODE_NAMES]
    got = gated_delta_decode(*args, z=z, norm_weight=w, **_decode_kw(*dims))
    mx.eval(got)
    assert calls == []
    # A norm weight in another dtype than the activations: the kernel without the norm, then
    # the ops norm.
    got = gated_delta_decode(*args, z=z, norm_weight=w.astype(mx.float32), **_decode_kw(*dims))
    mx.eval(got)
    assert calls == [1]


def test_gated_delta_decode_unsupported_shape_falls_back_to_ref():
    dims = (1, 48, 2, 16)  # Dk = 48: not a multiple of 32
    x = make_decode_inputs(2, 1, 2, 48, 16, seed=4)
    assert not _impl().supports_conv(x["qkv"], x["conv_w"], x["state"])
    for backend in (BACKEND, "auto"):
        got = gated_delta_decode(
            *[x[n] for n in DECODE_NAMES], backend=backend, **_decode_kw(*dims)
        )
        mx.eval(got)
        want = decode_ref(x, None, dims)
        assert rel_err(np.array(got[1]), np.array(want[1])) <= RTOL[mx.float32]
