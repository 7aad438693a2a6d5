"""The chunked GPU kernels (chunk_launch: prep kernel or MLX-ops prep, then the state pass)
against the token-by-token reference and the float64 NumPy loop, over the shape / mask / gate
grid of test_gpu_kernels.py plus T in {1, 63, 64, 65, 200, 1000}, fp32 and bf16; every test with
each chunk path (two kernels with the state pass on fp32 lanes or matrix units; the split
path), and the tile layer alone against NumPy.

Runs only where MLX has a GPU backend. Outputs are poisoned with NaN before the run, so an element
the kernels fail to write fails the comparison.
"""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import _pick as pick_backend
from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import gated_delta_update
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
from tests.kernels.helpers import gated_delta_np

pytestmark = GPU_ONLY


@pytest.fixture(autouse=True, params=["simt", "mma", "split", "split_o2"])
def matrix_state(request, monkeypatch):
    """Every test runs with each chunk path for scalar gates, whatever the defaults: the
    two-kernel path with STATE_BODY (fp32 lanes) or STATE_MMA_BODY (the tile layer: tensor cores
    / simdgroup matrices), and the split path (WY, state and output kernels; per-key gates keep
    the two-kernel path with fp32 lanes there, as do head sizes `cl.split_shape_ok` refuses),
    also with the output pass as O2_BODY. Returns whether the tile layer is on."""
    monkeypatch.setattr(cl, "MATRIX", request.param == "mma")
    monkeypatch.setattr(cl, "SPLIT", request.param.startswith("split"))
    monkeypatch.setattr(cl, "O2", request.param == "split_o2")
    return request.param != "simt"


def chunk(x, prep="auto"):
    return run_kernel(cl.gated_delta_chunk_kernel, x, backend=BACKEND, prep=prep)


def _holes(B, T):
    """[B, T] mask: left padding, a hole in the middle, right padding, none, by batch row."""
    m = np.ones((B, T), bool)
    for b in range(B):
        kind = b % 4
        if kind == 0:
            m[b, : T // 3] = False
        elif kind == 1:
            m[b, T // 4 : T // 2 + 1] = False
        elif kind == 2:
            m[b, T - T // 5 - 1 :] = False
    return mx.array(m)


# test_gpu_kernels' grid (Hv/Hk in {1, 2, 4}, Dk 32..256, Dv 1..128, B in {1, 3}), and
# T in {1, 63, 64, 65, 200, 1000} at the Qwen3.5 head shape.
CHUNK_SHAPES = SHAPES + [
    (1, 1, 16, 32, 128, 128),
    (2, 63, 16, 32, 128, 128),
    (1, 64, 2, 4, 128, 128),
    (3, 65, 2, 4, 128, 64),
    (2, 200, 4, 8, 128, 128),
    (1, 1000, 2, 4, 128, 128),
    (3, 1000, 1, 2, 64, 96),
]


@pytest.mark.parametrize("masked", ["nomask", "pad", "holes"])
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
@pytest.mark.parametrize("shape", CHUNK_SHAPES, ids=lambda s: "B{}T{}Hk{}Hv{}Dk{}Dv{}".format(*s))
def test_chunk_kernel_matches_ref(shape, per_key, masked):
    B, T = shape[:2]
    x = kernel_inputs(*shape, per_key=per_key, pad=_pads(B, T) if masked == "pad" else None)
    if masked == "holes":
        x["mask"] = _holes(B, T)
    check(chunk(x), ref(x), mx.float32)


@pytest.mark.parametrize("prep", ["kernel", "ops"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200, 1000])
def test_chunk_kernel_matches_numpy(T, prep):
    """Against the float64 loop (not only ref), both preps, with holes in the mask."""
    x = kernel_inputs(3, T, 2, 4, 64, 32)
    x["mask"] = _holes(3, T)
    y, s = chunk(x, prep=prep)
    y_np, s_np = gated_delta_np(x["q"], x["k"], x["v"], x["g"], x["beta"], x["state"], x["mask"])
    assert rel_err(np.array(y), y_np) < RTOL[mx.float32]
    assert rel_err(np.array(s), s_np) < RTOL[mx.float32]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32], ids=str)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200, 1000])
def test_chunk_kernel_dtypes(T, dtype):
    x = kernel_inputs(2, T, 16, 32, 128, 128, dtype=dtype, pad=[0, T // 3])
    check(chunk(x), ref(x), dtype)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
def test_chunk_kernel_low_precision_4096_steps(dtype):
    x = kernel_inputs(1, 4096, 1, 2, 64, 32, dtype=dtype)
    x["state"] = mx.zeros_like(x["state"])
    check(chunk(x), ref(x), dtype)


@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
def test_chunk_kernel_g_zero_and_strong_decay(per_key):
    x = kernel_inputs(2, 150, 1, 2, 64, 32, per_key=per_key, pad=[0, 7])
    g = np.array(x["g"])
    g[:, ::7] = 0.0
    g[:, 64] = 0.0  # a chunk's first step
    x["g"] = mx.array(g)
    check(chunk(x), ref(x), mx.float32)
    strong = np.random.default_rng(0).uniform(1e-4, 0.05, g.shape).astype(np.float32)
    x["g"] = mx.array(strong)
    check(chunk(x), ref(x), mx.float32)


def test_chunk_kernel_garbage_in_padding_does_not_leak():
    x = kernel_inputs(3, 130, 1, 2, 64, 32)
    x["mask"] = _holes(3, 130)
    want = chunk(x)
    pad = ~x["mask"]
    nan4 = mx.where(pad[:, :, None, None], mx.nan, 0.0)
    for n in ("q", "k", "v"):
        x[n] = x[n] + nan4
    x["g"] = mx.where(pad[:, :, None], mx.inf, x["g"])
    x["beta"] = mx.where(pad[:, :, None], mx.nan, x["beta"])
    got = chunk(x)
    assert np.array_equal(np.array(got[0]), np.array(want[0]))
    assert np.array_equal(np.array(got[1]), np.array(want[1]))


def test_chunk_kernel_state_carried_across_calls():
    x = kernel_inputs(3, 300, 2, 4, 128, 64, pad=[0, 40, 100])
    y_full, s_full = chunk(x)
    first, second = split_at(x, 77)
    y1, s1 = chunk(first)
    second["state"] = s1
    y2, s2 = chunk(second)
    check((mx.concatenate([y1, y2], axis=1), s2), (y_full, s_full), mx.float32)


def chunk_fused(x):
    return run_kernel(cl.gated_delta_update_chunk_kernel, x, fused=True, backend=BACKEND)


@pytest.mark.parametrize("masked", ["nomask", "pad", "holes"])
@pytest.mark.parametrize(
    "shape", CHUNK_SHAPES[::2], ids=lambda s: "B{}T{}Hk{}Hv{}Dk{}Dv{}".format(*s)
)
def test_chunk_kernel_fused_gates_match_compute_gates_ref(shape, masked):
    B, T = shape[:2]
    x = kernel_inputs(*shape, pad=_pads(B, T) if masked == "pad" else None)
    if masked == "holes":
        x["mask"] = _holes(B, T)
    check(chunk_fused(x), ref_fused(x), mx.float32)


def test_chunk_kernel_fused_gate_underflow_to_zero():
    x = kernel_inputs(2, 140, 1, 2, 64, 32)
    a = np.array(x["a"])
    a[:, ::5] = 80.0  # softplus(80) * exp(A_log) >> 104: exp underflows to exactly 0
    x["a"] = mx.array(a)
    x["A_log"] = mx.full(x["A_log"].shape, 2.0)
    check(chunk_fused(x), ref_fused(x), mx.float32)


def test_public_api_chunked_and_auto_crossover(monkeypatch):
    """backend="chunked" runs the kernels on a GPU (both entry points); auto picks them from
    _GPU_CHUNKED_MIN_T on, the fused kernel below."""
    import qwen35_mlx.kernels.gated_delta as gd

    x = kernel_inputs(2, 130, 2, 4, 128, 64, pad=[3, 0])
    calls = []
    for name in ("gated_delta_chunk_kernel", "gated_delta_update_chunk_kernel"):
        real = getattr(cl, name)
        monkeypatch.setattr(
            cl, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k)
        )
    check_public_api(x, "chunked")
    gates = (x["a"], x["b"], x["A_log"], x["dt_bias"])
    assert calls == ["gated_delta_chunk_kernel", "gated_delta_update_chunk_kernel"]
    assert gd._GPU_CHUNKED_MIN_T == 2048  # the split path measured faster from there on
    assert pick_backend("auto", x["q"], x["v"], x["g"]) == BACKEND  # T = 130
    monkeypatch.setattr(gd, "_GPU_CHUNKED_MIN_T", 100)
    assert pick_backend("auto", x["q"], x["v"], x["g"]) == "chunked"
    assert pick_backend("auto", x["q"][:, :99], x["v"][:, :99], x["g"][:, :99]) == BACKEND
    g_per_key = mx.ones((*x["g"].shape, x["q"].shape[-1]))
    assert pick_backend("auto", x["q"], x["v"], g_per_key) == BACKEND  # per-key: fused kernel
    y, s = gated_delta_update(x["q"], x["k"], x["v"], *gates, x["state"], x["mask"])
    check((y, s), ref_fused(x), mx.float32)
    assert calls[-1] == "gated_delta_update_chunk_kernel" and len(calls) == 3


# The tile layer alone (chunk_launch._TILES): one warp computes C + A B for a 16 x 16 C and
# K = 32, every operand layout, both operand precisions, against float64.
TILE_BODY = """
  gd_acc acc;
  gd_acc_load(acc, c_in, 16);
  gd_mma<MP, TA, TB>(acc, a, TA ? 16 : K, b, TB ? K : 16, K);
  gd_acc_store(acc, out, 16);
"""


def _tile_product(a, b, c, mp: int, ta: bool, tb: bool) -> mx.array:
    """TILE_BODY in one warp: C + A B for A [16, K] (given as [K, 16] if ta), B [K, 16] (given
    as [16, K] if tb), C [16, 16] fp32; the output starts as NaN."""
    K = a.shape[0] if ta else a.shape[1]
    kern = getattr(mx.fast, f"{BACKEND}_kernel")(
        # a name per operand width, as before the two tests shared this
        name="gd_tile_check16" if a.dtype.size == 2 else "gd_tile_check",
        input_names=["a", "b", "c_in"],
        output_names=["out"],
        source=cl.PROLOGUE[BACKEND] + TILE_BODY,
        header=cl.header(BACKEND),
    )
    return kern(
        inputs=[a, b, c],
        template=[("MP", mp), ("TA", ta), ("TB", tb), ("K", K)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(16, 16)],
        output_dtypes=[mx.float32],
        init_value=NAN,
    )[0]


@pytest.mark.parametrize("mp", [1, 3])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_tile_layer_matches_numpy(matrix_state, ta, tb, mp):
    if matrix_state:
        pytest.skip("independent of the state pass")
    K = 32
    rng = np.random.default_rng(7)
    a = rng.standard_normal((16, K)).astype(np.float32)
    b = rng.standard_normal((K, 16)).astype(np.float32)
    c = rng.standard_normal((16, 16)).astype(np.float32)
    at, bt = mx.array(a.T.copy() if ta else a), mx.array(b.T.copy() if tb else b)
    out = _tile_product(at, bt, mx.array(c), mp, ta, tb)
    want = c.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
    err = float(np.abs(np.array(out) - want).max() / np.abs(want).max())
    # tf32 operands: ~2^-11 relative per product; three tf32 products: about fp32 (2^-24 per
    # rounding, summed over K); Metal multiplies in fp32 whatever MP says.
    assert err < (1e-2 if mp == 1 else 2e-6), err
    if BACKEND == "cuda" and mp == 1:
        assert err > 1e-5, err  # the operands were rounded: tf32 really ran


def _16bit_operands(seed: int, K: int, dtype: mx.Dtype):
    """A [16, K] and B [K, 16] rounded to `dtype`, C [16, 16] fp32 (NumPy)."""
    rng = np.random.default_rng(seed)
    a = mx.array(rng.standard_normal((16, K)).astype(np.float32)).astype(dtype)
    b = mx.array(rng.standard_normal((K, 16)).astype(np.float32)).astype(dtype)
    return a, b, rng.standard_normal((16, 16)).astype(np.float32)


def _err_16bit(out: mx.array, a: mx.array, b: mx.array, c: np.ndarray) -> float:
    """Max error of `out` against float64's C + A B of the same 16-bit values, relative to the
    largest |C + A B|."""
    a64 = np.array(a.astype(mx.float32), np.float64)
    b64 = np.array(b.astype(mx.float32), np.float64)
    want = c.astype(np.float64) + a64 @ b64
    return float(np.abs(np.array(out) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mp", [1, 3])
def test_tile_layer_16bit_operands_are_exact(matrix_state, dtype, mp):
    """16-bit operands (the staged pieces of the state and output passes) reach the tensor
    cores unrounded (exact in tf32) and without low parts: the products equal float64's of the
    same 16-bit values to fp32's precision, at MP 1 too (CUDA: Metal's simdgroup_load has no
    16-bit form)."""
    if matrix_state or BACKEND != "cuda":
        pytest.skip("CUDA tile layer only; independent of the state pass")
    a, b, c = _16bit_operands(8, 32, dtype)
    out = _tile_product(a, b, mx.array(c), mp, False, False)
    assert _err_16bit(out, a, b, c) < 2e-6


# gd_mma_staged with 16-bit operands in threadgroup memory (CUDA: ldmatrix, .trans where the
# stored rows run along k, and mma.m16n8k16): A and B copied into threadgroup arrays with rows
# padded by 8 elements (16 bytes, as the kernels' staged slices), one warp.
STAGED_BODY = """
  constexpr int AR = TA ? K : 16;  // stored rows of A
  constexpr int AC = TA ? 16 : K;
  constexpr int BR = TB ? 16 : K;
  constexpr int BC = TB ? K : 16;
  GD_TG16 gd_staged<T> as_[AR * (AC + 8)];
  GD_TG16 gd_staged<T> bs_[BR * (BC + 8)];
  const int tid = int(gd_tid);
  for (int e = tid; e < AR * AC; e += 32) as_[(e / AC) * (AC + 8) + e % AC] = a[e];
  for (int e = tid; e < BR * BC; e += 32) bs_[(e / BC) * (BC + 8) + e % BC] = b[e];
  gd_barrier();
  gd_acc acc;
  gd_acc_load(acc, c_in, 16);
  gd_mma_staged<MP, TA, TB>(acc, as_, AC + 8, bs_, BC + 8, K);
  gd_acc_store(acc, out, 16);
"""


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_tile_layer_staged_16bit_operands_are_exact(matrix_state, dtype, ta, tb):
    """gd_mma_staged (chunk_launch.MMA16: the WY2, H2 and O2 products over staged bf16 / fp16
    pieces) for every operand layout: C + A B equals float64's product of the same 16-bit values
    to fp32's precision (K = 48: three steps of 16)."""
    if matrix_state:
        pytest.skip("independent of the chunk path")
    K = 48
    a, b, c = _16bit_operands(9, K, dtype)
    at = mx.contiguous(a.T) if ta else a
    bt = mx.contiguous(b.T) if tb else b
    kern = getattr(mx.fast, f"{BACKEND}_kernel")(
        name="gd_tile_check_staged",
        input_names=["a", "b", "c_in"],
        output_names=["out"],
        source=cl.PROLOGUE[BACKEND] + STAGED_BODY,
        header=cl.header(BACKEND),
    )
    out = kern(
        inputs=[at, bt, mx.array(c)],
        template=[("MP", 1), ("TA", ta), ("TB", tb), ("K", K), ("T", dtype)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(16, 16)],
        output_dtypes=[mx.float32],
        init_value=NAN,
    )[0]
    assert _err_16bit(out, a, b, c) < 2e-6
