"""Round 9's WY_P and H3O_PRODUCERS on the GPU (CUDA only): FUSE_O's P made by the WY pass
(chunk_source.wy2p_body) and the state pass's copies (and y: h3opy_body) issued by producer
warps (h3op_body), apart, together and as the defaults, against round 8's build (bf16, B 2
with left padding and a hole, T 1000: a partial last chunk; Hk 4, Hv 8; Dv 128 and 96; gates
given and computed in the kernel): y and the state bit for bit; and the WY pass alone: W, U,
Kw, the gates bit for bit WY2_VX's and P O2P's on the tiles both write (the lane emulator shows
the same on the CPU: test_chunk_wy_p.py, test_chunk_h3o_producers.py)."""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from tests.kernels.chunk_rounds import switches_keep_outputs
from tests.kernels.gpu import BACKEND, GPU_ONLY
from tests.kernels.test_gpu_chunk_fuse import _inputs

pytestmark = [
    *GPU_ONLY,
    pytest.mark.skipif(BACKEND != "cuda", reason="WY_P / H3O_PRODUCERS are CUDA only"),
]
C = cl.CHUNK


# The module's round-9 defaults (session 15), checked as a mode like the others.
DEFAULTS = {
    "WY_P": cl.WY_P,
    "H3O_PRODUCERS": cl.H3O_PRODUCERS,
    "H3_NB": cl.H3_NB,
    "MIN_BLOCKS": dict(cl.MIN_BLOCKS),
}
# The base every mode is compared with: round 8's passes (FUSE_O, H3O_EARLY), a ring of 2.
ROUND8 = {"WY_P": False, "H3O_PRODUCERS": False, "H3_NB": 2}
MODES = {
    "defaults": DEFAULTS,
    "wyp": {"WY_P": True},
    "prod": {"H3O_PRODUCERS": True},
    "both": {"WY_P": True, "H3O_PRODUCERS": True},
    "prody": {"H3O_PRODUCERS": 2},
    "both_nb3": {"WY_P": True, "H3O_PRODUCERS": 2, "H3_NB": 3},
}


@pytest.mark.parametrize("Dv", [128, 96])
@pytest.mark.parametrize("nw", [2, 4])
@pytest.mark.parametrize("raw", [False, True], ids=["gates", "raw_gates"])
@pytest.mark.parametrize("mode", list(MODES))
def test_wy_p_split_equals_default(monkeypatch, mode, nw, Dv, raw):
    """The split path with `mode`'s switches on (H3 = nw) gives round 8's build's y and state
    bit for bit (Dv 96 at 4 warps: FUSE_O does not apply, both take the default passes; a ring
    of 3 at 4 warps shrinks to 2, as H3_SMEM_MAX asks)."""
    inputs = _inputs(nw * 5 + Dv + raw, Dv)
    switches_keep_outputs(monkeypatch, inputs, raw, ROUND8 | {"H3": nw}, MODES[mode])


def test_wy_p_pass_equals_wy2_vx_and_o2p():
    """WY2P alone: W, U, Kw and the gates equal WY2_VX's, P equals O2P's on the tiles at or
    below the diagonal (the only ones either writes or H3O reads)."""
    q, k, v, g, beta, state, mask = _inputs(23)
    T, Hv = q.shape[1], v.shape[2]
    want = cl.wy_pass("cuda", k, v, g, beta, mask)
    P = cl.o2p_pass(q, k, want[3], T, Hv, v.dtype)
    got = cl.wy_pass("cuda", k, v, g, beta, mask, q=q)
    mx.eval(want, P, got)
    for name, a, b in zip(("W", "U", "Kw", "gates"), got[:4], want, strict=True):
        assert mx.array_equal(a, b).item(), name
    lower = np.kron(np.tril(np.ones((C // 16, C // 16), bool)), np.ones((16, 16), bool))
    sel = mx.array(np.flatnonzero(lower))
    a = got[4].reshape(*P.shape[:2], C * C)[..., sel]
    b = P.reshape(*P.shape[:2], C * C)[..., sel]
    assert mx.array_equal(a, b).item()
