"""Round 10's H3O_SPLIT on the GPU (CUDA only): the producer-warp state pass with each 16 value
rows shared by two computing warps (chunk_source.h3ops_body), against the default build on the
same inputs (bf16, B 2 with left padding and a hole, T 1000: a partial last chunk; Hk 4, Hv 8;
Dv 128 and 96; 1, 2 and 4 pairs; rings of 2 and 3; gates given and computed in the kernel): y
and the state bit for bit; and the state pass alone, stamped or not (the lane emulator shows
the same on the CPU: test_chunk_h3o_split.py)."""

import mlx.core as mx
import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.kernels.chunk_rounds import assert_same_outputs, switches_keep_outputs
from tests.kernels.gpu import BACKEND, GPU_ONLY
from tests.kernels.test_gpu_chunk_fuse import _inputs

pytestmark = [
    *GPU_ONLY,
    pytest.mark.skipif(BACKEND != "cuda", reason="H3O_SPLIT is CUDA only"),
]


@pytest.mark.parametrize("Dv", [128, 96])
@pytest.mark.parametrize("nw", [1, 2, 4])
@pytest.mark.parametrize("nb", [2, 3])
@pytest.mark.parametrize("raw", [False, True], ids=["gates", "raw_gates"])
def test_h3o_split_equals_default(monkeypatch, nb, nw, Dv, raw):
    """The split path with H3O_SPLIT (H3 = nw, H3_NB = nb) gives the default build's y and state
    bit for bit (Dv 96 at 4 pairs: the split path's default passes, both; a ring of 3 at 4 pairs
    shrinks to 2, as H3_SMEM_MAX asks)."""
    inputs = _inputs(nw * 7 + Dv + nb + raw, Dv)
    # H3O_PRODUCERS = 1: the build H3O_SPLIT varies
    base = {"H3O_PRODUCERS": 1, "H3": nw, "H3_NB": nb}
    switches_keep_outputs(monkeypatch, inputs, raw, base, {"H3O_SPLIT": True})


@pytest.mark.parametrize("nw", [2, 4])
def test_h3o_split_pass_and_its_stamped_build(monkeypatch, nw):
    """The state pass alone (WY2P's pieces): H3O_SPLIT's build, and its stamped build, give
    H3O_PRODUCERS' y and state bit for bit; the stamps are one row a threadgroup."""
    monkeypatch.setattr(cl, "H3_NB", 2)
    monkeypatch.setattr(cl, "H3O_PRODUCERS", 1)
    q, k, v, g, beta, state, mask = _inputs(41 + nw)
    W, U, Kw, gates, P = cl.wy_pass("cuda", k, v, g, beta, mask, q=q)
    want = cl.h3o_pass(W, U, Kw, gates, state, q, P, nw)
    mx.eval(want)
    monkeypatch.setattr(cl, "H3O_SPLIT", True)
    got = cl.h3o_pass(W, U, Kw, gates, state, q, P, nw)
    *stamped, st = cl.h3o_pass(W, U, Kw, gates, state, q, P, nw, stamps=True)
    mx.eval(got, stamped, st)
    assert_same_outputs(got, want)
    assert_same_outputs(stamped, want)
    B, Hv, Dv, _ = state.shape
    assert st.shape == (B * Hv * Dv // (16 * nw), cs.STAMP_SLOTS)
