"""Shared setup of the split chunk path's round tests (rounds 8-10: test_chunk_fuse_y.py,
test_chunk_wy_p.py, test_chunk_h3o_producers.py, test_chunk_h3o_split.py): the switches a host
test pins, the zero pieces the recording factory is called with, the state pass's inputs, and
benchmarks/chunk_split_gpu.py imported with every kernel output zeros (its --abN modes end to
end on the CPU)."""

import sys
from pathlib import Path

import mlx.core as mx

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl

# Round 9's switches off: the builds the round-8 host tests were written against.
BEFORE_ROUND9 = {"WY_P": False, "H3O_PRODUCERS": False}


def split_switches(monkeypatch, **switches) -> None:
    """chunk_launch's switches set for this test (undone after it); each must exist."""
    for name, value in switches.items():
        assert hasattr(cl, name), name
        monkeypatch.setattr(cl, name, value)


def zero_pieces(B=1, T=200, Hk=2, Hv=4, Dk=128, Dv=128, dtype=mx.bfloat16):
    """q [B, T, Hk, Dk], v [B, T, Hv, Dv] in dtype, g [B, T, Hv] ones, state [B, Hv, Dv, Dk]
    zeros: the split path's arguments for a recording factory."""
    q = mx.zeros((B, T, Hk, Dk), dtype)
    v = mx.zeros((B, T, Hv, Dv), dtype)
    return q, v, mx.ones((B, T, Hv)), mx.zeros((B, Hv, Dv, Dk))


def h3o_pass_inputs(B=1, T=200, Hk=2, Hv=4, Dk=128, Dv=128):
    """h3o_pass's first seven arguments (W, U, Kw, gates, state, q, P: the WY pass's and O2P's
    outputs on zero pieces) and (B, Hv, Dk, Dv)."""
    q, v, g, state = zero_pieces(B, T, Hk, Hv, Dk, Dv)
    W, U, Kw, gates = cl.wy_pass("cuda", q, v, g, g, None)
    P = cl.o2p_pass(q, q, gates, T, Hv, mx.bfloat16)
    return (W, U, Kw, gates, state, q, P), (B, Hv, Dk, Dv)


def bench_on_zeros(monkeypatch):
    """benchmarks/chunk_split_gpu.py imported afresh, its GPU backend replaced by one whose
    fused kernel returns zeros (the recording factory makes the split passes' outputs zeros)."""
    from tests.kernels.test_chunk_vx import _ZerosFused

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    sys.modules.pop("chunk_split_gpu", None)
    import chunk_split_gpu as g

    monkeypatch.setattr(g, "_gpu_backend", lambda backend: _ZerosFused())
    # the rounds' checks run B 2 at Hv 32 (256 state-pass threadgroups of two warps): the build
    # names the tests expect are H3's, not the wave rule's four warps
    monkeypatch.setattr(cl, "H3_WAVE_SMS", None)
    return g
