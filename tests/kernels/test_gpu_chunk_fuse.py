"""Round 8's FUSE_Y, FUSE_O and H3O_EARLY on the GPU (CUDA only): the split path with the output
pass's q H^T in the state pass (H3Y + O2Y) and with one pass over the chunks for the state and y
(O2P + H3O, Y^T issued behind the update or behind Xw^T) against the default build on the same
inputs (bf16, B 2 with left padding and a hole, T 1000: a partial last chunk; Hk 4, Hv 8; Dv 128
and 96): y and the state bit for bit (the same arithmetic; the lane emulator shows it on the CPU,
test_chunk_fuse_y.py), and Yi = q H[n]^T."""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from tests.conftest import RTOL, rel_err
from tests.kernels.gpu import BACKEND, GPU_ONLY

pytestmark = [
    *GPU_ONLY,
    pytest.mark.skipif(BACKEND != "cuda", reason="FUSE_Y / FUSE_O are CUDA only"),
]
C = cl.CHUNK


def _inputs(seed: int, Dv: int = 128):
    rng = np.random.default_rng(seed)
    B, T, Hk, Hv, D = 2, 1000, 4, 8, 128

    def r(*shape, scale=1.0):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(mx.bfloat16)

    q = r(B, T, Hk, D, scale=D**-0.5)
    k = r(B, T, Hk, D, scale=D**-0.5)
    v = r(B, T, Hv, Dv)
    g = mx.array(-rng.uniform(0.0, 0.2, (B, T, Hv)).astype(np.float32))
    beta = mx.array(rng.uniform(0.1, 0.9, (B, T, Hv)).astype(np.float32))
    state = mx.array(rng.standard_normal((B, Hv, Dv, D)).astype(np.float32) * 0.1)
    m = np.ones((B, T), bool)
    m[1, : T // 8] = False
    m[1, T // 2 : T // 2 + 37] = False
    return q, k, v, g, beta, state, mx.array(m)


@pytest.mark.parametrize("Dv", [128, 96])
@pytest.mark.parametrize("nw", [2, 4])
@pytest.mark.parametrize(
    "mode", [("FUSE_Y",), ("FUSE_O",), ("FUSE_O", "H3O_EARLY")], ids=["fy", "fo", "fo_early"]
)
def test_fused_split_equals_default(monkeypatch, mode, nw, Dv):
    """The split path with `mode`'s switches on (H3 = nw) gives the default build's y and
    state bit for bit (Dv 96 at 4 warps takes the default passes: not a multiple of 64)."""
    x = _inputs(nw * 7 + Dv, Dv)
    want = cl.split_chunk_kernel("cuda", *x)
    monkeypatch.setattr(cl, "H3", nw)
    base = cl.split_chunk_kernel("cuda", *x)
    for switch in mode:
        monkeypatch.setattr(cl, switch, True)
    monkeypatch.setattr(cl, "_kernels", {})
    got = cl.split_chunk_kernel("cuda", *x)
    mx.eval(want, base, got)
    for name, a, b, c in zip(("y", "state"), got, base, want, strict=True):
        a32, b32 = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
        assert np.isfinite(a32).all(), name
        assert rel_err(a32, np.array(c.astype(mx.float32))) < RTOL[mx.bfloat16], name
        assert np.array_equal(a32, b32), (name, rel_err(a32, b32))


def test_h3y_yi_is_q_h_transposed():
    """H3Y's Yi against q H[n]^T (fp32 matmul of the default state pass's H; rows past T: q's
    last row), and its Vn and state equal to the default pass's."""
    q, k, v, g, beta, state, mask = _inputs(11)
    W, U, Kw, gates = cl.wy_pass("cuda", k, v, g, beta, mask)
    H, Vn, s = cl.h_pass("cuda", W, U, Kw, gates, state)
    Yi, Vn2, s2 = cl.h3y_pass(W, U, Kw, gates, state, q, cl.H3)
    B, T, Hk, Dk = q.shape
    BH, N, Dv, _ = H.shape
    Hv = BH // B
    qp = mx.concatenate([q, mx.repeat(q[:, -1:], N * C - T, axis=1)], axis=1)
    qp = qp.astype(mx.float32).reshape(B, N, C, Hk, Dk).transpose(0, 3, 1, 2, 4)
    qp = mx.repeat(qp, Hv // Hk, axis=1).reshape(BH, N, C, Dk)
    want = mx.swapaxes(qp @ mx.swapaxes(H.astype(mx.float32), -1, -2), -1, -2)
    mx.eval(Yi, Vn2, s2, want, Vn, s)
    assert rel_err(np.array(Yi), np.array(want)) < RTOL[mx.float32]
    assert mx.array_equal(Vn2, Vn).item() and mx.array_equal(s2, s).item()
