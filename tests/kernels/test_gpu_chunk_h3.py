"""Round 7's H3_BODY on the GPU (CUDA only): its tile primitives (chunk_source.H3_TILES:
gd_acc_load16 / gd_acc_store16 by ldmatrix / stmatrix, plain and transposed; gd_mma_rows) against
NumPy, exact, and the state pass itself (chunk_launch.H3) against H2_BODY on the same pieces: H,
Vn and the state equal bit for bit or, should the tensor cores sum the swapped products' terms in
another order, within bf16's tolerance. The CPU's lane emulator checks the same text
(test_chunk_h3.py); this is where the fragment layouts of ldmatrix / stmatrix .trans meet the
hardware."""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.conftest import RTOL, rel_err
from tests.kernels.gpu import BACKEND, GPU_ONLY, NAN

pytestmark = [
    *GPU_ONLY,
    pytest.mark.skipif(BACKEND != "cuda", reason="H3_BODY is CUDA only"),
]

TILE_BODY = """
  constexpr int LD = 24;  // rows padded by 16 bytes, as H3's buffers
  GD_TG16 T ts[16 * LD];
  GD_TG16 T us[16 * LD];
  const int tid = int(gd_tid);
  for (int e = tid; e < 256; e += 32) ts[(e / 16) * LD + e % 16] = a[e];
  gd_barrier();
  gd_acc x;
  gd_acc_load16<TR>(x, ts, LD);
  gd_acc_store(x, out, 16);
  gd_acc_store16<TR>(x, us, LD);
  gd_barrier();
  for (int e = tid; e < 256; e += 32) back[e] = us[(e / 16) * LD + e % 16];
"""


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tr", [False, True], ids=["plain", "trans"])
def test_tile16_load_store_layouts(dtype, tr):
    """gd_acc_load16<TR> puts element (row, col) of the tile (TR: of its transpose) in the
    accumulator's (row, col); gd_acc_store16<TR> writes it back where it came from."""
    a = mx.array(np.random.default_rng(3).standard_normal((16, 16)).astype(np.float32)).astype(
        dtype
    )
    kern = mx.fast.cuda_kernel(
        name="gd_h3_tile16_check",
        input_names=["a"],
        output_names=["out", "back"],
        source=cl.PROLOGUE["cuda"] + TILE_BODY,
        header=cl.header("cuda") + cs.H3_TILES,
    )
    out, back = kern(
        inputs=[a],
        template=[("TR", tr), ("T", dtype)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(16, 16), (16, 16)],
        output_dtypes=[mx.float32, dtype],
        init_value=NAN,
    )
    want = np.array(a.astype(mx.float32))
    assert np.array_equal(np.array(out), want.T if tr else want)
    assert np.array_equal(np.array(back.astype(mx.float32)), want)


ROWS_BODY = """
  constexpr int AR = TA ? K : 16;
  constexpr int AC = TA ? 16 : K;
  constexpr int BR = TB ? 32 : K;  // two B tiles
  constexpr int BC = TB ? K : 32;
  GD_TG16 T as_[AR * (AC + 8)];
  GD_TG16 T bs_[BR * (BC + 8)];
  const int tid = int(gd_tid);
  for (int e = tid; e < AR * AC; e += 32) as_[(e / AC) * (AC + 8) + e % AC] = a[e];
  for (int e = tid; e < BR * BC; e += 32) bs_[(e / BC) * (BC + 8) + e % BC] = b[e];
  gd_barrier();
  gd_acc acc[2];
  gd_acc_zero(acc[0]);
  gd_acc_zero(acc[1]);
  gd_mma_rows<1, TA, TB, 2>(acc, as_, AC + 8, bs_, BC + 8, TB ? 16 * (BC + 8) : 16, K);
  gd_acc_store(acc[0], out, 32);
  gd_acc_store(acc[1], out + 16, 32);
"""


@pytest.mark.parametrize("ta,tb", [(False, True), (True, False), (False, False), (True, True)])
def test_mma_rows_matches_numpy(ta, tb):
    """gd_mma_rows<MP, TA, TB, 2>: [A B_0, A B_1] (B_r the r-th 16 columns of B) equals float64's
    product of the same bf16 values to fp32's precision (K = 48)."""
    K = 48
    rng = np.random.default_rng(5)
    a = mx.array(rng.standard_normal((16, K)).astype(np.float32)).astype(mx.bfloat16)
    b = mx.array(rng.standard_normal((K, 32)).astype(np.float32)).astype(mx.bfloat16)
    kern = mx.fast.cuda_kernel(
        name="gd_h3_rows_check",
        input_names=["a", "b"],
        output_names=["out"],
        source=cl.PROLOGUE["cuda"] + ROWS_BODY,
        header=cl.header("cuda") + cs.H3_TILES,
    )
    out = kern(
        inputs=[mx.contiguous(a.T) if ta else a, mx.contiguous(b.T) if tb else b],
        template=[("TA", ta), ("TB", tb), ("K", K), ("T", mx.bfloat16)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(16, 32)],
        output_dtypes=[mx.float32],
        init_value=NAN,
    )[0]
    want = np.array(a.astype(mx.float32), np.float64) @ np.array(b.astype(mx.float32), np.float64)
    assert np.abs(np.array(out) - want).max() <= 2e-6 * np.abs(want).max()


@pytest.mark.parametrize("nw,nb", [(4, 2), (2, 2), (4, 3), (1, 2)])
def test_h3_state_pass_equals_h2(monkeypatch, nw, nb):
    """The state pass with H3 = nw, H3_NB = nb against H2_BODY on the WY pass's pieces (bf16,
    B 2, Hv 8, T 1000: a partial last chunk): H, Vn and the state bit for bit, or within bf16's
    tolerance (reported)."""
    rng = np.random.default_rng(nw * 10 + nb)
    B, T, Hk, Hv, D = 2, 1000, 4, 8, 128

    def r(*shape, scale=1.0):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(mx.bfloat16)

    k = r(B, T, Hk, D, scale=D**-0.5)
    v = r(B, T, Hv, D)
    g = mx.array(-rng.uniform(0.0, 0.2, (B, T, Hv)).astype(np.float32))
    beta = mx.array(rng.uniform(0.1, 0.9, (B, T, Hv)).astype(np.float32))
    state = mx.array(rng.standard_normal((B, Hv, D, D)).astype(np.float32) * 0.1)
    W, U, Kw, gates = cl.wy_pass("cuda", k, v, g, beta, None)
    want = cl.h_pass("cuda", W, U, Kw, gates, state)
    monkeypatch.setattr(cl, "H3", nw)
    monkeypatch.setattr(cl, "H3_NB", nb)
    got = cl.h_pass("cuda", W, U, Kw, gates, state)
    mx.eval(want, got)
    for name, x, y in zip(("H", "Vn", "state"), got, want, strict=True):
        x32, y32 = np.array(x.astype(mx.float32)), np.array(y.astype(mx.float32))
        assert np.isfinite(x32).all(), name
        if not np.array_equal(x32, y32):
            print(f"H3 ({nw}, {nb}) {name}: not bit for bit H2's, rel err {rel_err(x32, y32)}")
        assert rel_err(x32, y32) < RTOL[mx.bfloat16], name
