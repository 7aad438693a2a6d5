"""Issue #9 (session 15's "illegal memory access" on the H200): the default GPU path's kernels
stay inside their buffers. The host's own launches (chunk_launch with backend "cuda", the fused
CUDA backend for T below the chunk crossover) are recorded and replayed in the lane emulator by
tests/kernels/bounds.py, built with AddressSanitizer and UndefinedBehaviorSanitizer: every input,
output and the dynamic shared memory sized exactly as the host asks MLX for them, FENCE bytes
around each unaddressable, so any read or write outside them (or a misaligned 16-byte access, a
signed index overflow) stops the run with a report. Each run also checks y and the state against
the float64 loop (bf16's tolerance) and that every output element was written (outputs start as
NaN).

Shapes: Hk = Hv = 16 (R = 1), Dk = Dv = 128, bf16, B 1-3, T 1, 65, 130, 512, 577, 2047, 2048,
with and without masks (left padding, a hole, right padding) and initial state; raw gates
(gated_delta_update's path: the WY pass computes them) and precomputed ones; B 3 takes the wave
rule's four-warp H3O build with its ring of two; Hv 32 (the issue's main shape) once. The fused
kernel at Hk = Hv = 16 over 64 steps, and at T 512 with one head. T 300 and more, and the fused
kernel, are slow (each thread of a threadgroup is an OS thread: ~20 s to ~2 min a case; all
slow cases ~10 min on two shared cores).
"""

import subprocess

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from qwen35_mlx.kernels.gated_delta import cuda
from tests.conftest import RTOL, rel_err
from tests.kernels import bounds
from tests.kernels.helpers import (
    GXX,
    compile_emulated,
    cpu_device,  # noqa: F401  (fixture)
    gated_delta_np,
    gates_np,
    make_gate_inputs,
    make_inputs,
)

pytestmark = [
    pytest.mark.skipif(GXX is None, reason="needs g++"),
    pytest.mark.usefixtures("cpu_device"),
]

Dk = Dv = 128


def _mask(B: int, T: int, kind: str | None):
    """None, or [B, T] bool: row 0 left-padded by T // 3, row 1 a hole of T // 5 steps in the
    middle, row 2 right-padded by T // 4."""
    if kind is None:
        return None
    m = np.ones((B, T), bool)
    m[0, : T // 3] = False
    if B > 1:
        m[1, T // 3 : T // 3 + T // 5] = False
    if B > 2:
        m[2, T - T // 4 :] = False
    return mx.array(m)


def _record(entry: str, q, k, v, a, b, A_log, dt_bias, state, mask, monkeypatch):
    """The launches of one call of `entry` ("update": gated_delta_update_chunk_kernel, the chunk
    crossover's path; "gates": gated_delta_chunk_kernel with precomputed gates; "fused": the
    fused CUDA backend's gated_delta_update_kernel, `auto` below the crossover), as the host
    makes them for CUDA."""
    rec = bounds.Recorder()
    if entry == "fused":
        monkeypatch.setattr(cuda.BACKEND, "_factory", rec)
        monkeypatch.setattr(cuda.BACKEND, "_available", lambda: True)
        monkeypatch.setattr(cuda.BACKEND, "_kernels", {})
        cuda.BACKEND.gated_delta_update_kernel(q, k, v, a, b, A_log, dt_bias, state, mask)
        return rec.launches
    monkeypatch.setattr(cl, "_factory", lambda backend: rec)
    monkeypatch.setattr(cl, "_kernels", {})
    if entry == "update":
        cl.gated_delta_update_chunk_kernel(
            q, k, v, a, b, A_log, dt_bias, state, mask, backend="cuda"
        )
    else:
        g, beta = (mx.array(x.astype(np.float32)) for x in gates_np(a, b, A_log, dt_bias))
        cl.gated_delta_chunk_kernel(q, k, v, g, beta, state, mask, backend="cuda")
    return rec.launches


_compiled: dict[str, object] = {}


def run_fenced(tmp_path_factory, tmp, entry, B, T, Hk, Hv, mask_kind, state_kind, monkeypatch):
    """Records `entry`'s launches at this shape, replays them fenced (bounds.Program, one
    compile a program text) and checks the program ran clean and y, state against the float64
    loop. Returns the launches."""
    q, k, v, _, _, state = make_inputs(B, T, Hk, Hv, Dk, Dv, dtype=mx.bfloat16, seed=T + B)
    if state_kind == "zeros":
        state = mx.zeros_like(state)
    a, b, A_log, dt_bias = make_gate_inputs(B, T, Hv, seed=T)
    mask = _mask(B, T, mask_kind)
    launches = _record(entry, q, k, v, a, b, A_log, dt_bias, state, mask, monkeypatch)
    prog = bounds.Program(launches)
    if prog.text not in _compiled:
        d = tmp_path_factory.mktemp("bounds")
        _compiled[prog.text] = compile_emulated(prog.text, d, timeout=1800, sanitize="address")
    prog.write_inputs(tmp)
    run = subprocess.run(
        [str(_compiled[prog.text]), str(tmp)], capture_output=True, text=True, timeout=1800
    )
    assert run.returncode == 0, run.stderr[-6000:]
    got = prog.read_results(tmp)
    g, beta = gates_np(a, b, A_log, dt_bias)
    y, s = gated_delta_np(q, k, v, g, beta, state, mask)
    assert np.isfinite(got["y"]).all() and np.isfinite(got["state_out"]).all()
    assert rel_err(got["y"], y) < RTOL[mx.bfloat16]
    assert rel_err(got["state_out"].reshape(s.shape), s) < RTOL[mx.bfloat16]
    return launches


def _names(launches) -> list[str]:
    return [ln.build["name"] for ln in launches]


# (entry, B, T, Hk, Hv, mask, state)
CASES = [
    ("update", 1, 1, 16, 16, None, "random"),
    ("update", 1, 65, 16, 16, "pad", "random"),
    ("update", 3, 130, 16, 16, "pad", "zeros"),  # the wave rule: 4 warps, a ring of 2
    pytest.param(("update", 1, 512, 16, 16, None, "random"), marks=pytest.mark.slow),
    pytest.param(("update", 2, 512, 16, 16, "pad", "zeros"), marks=pytest.mark.slow),
    pytest.param(("gates", 2, 577, 16, 16, "pad", "random"), marks=pytest.mark.slow),
    pytest.param(("update", 1, 2048, 16, 16, None, "zeros"), marks=pytest.mark.slow),
    pytest.param(("update", 2, 2048, 16, 16, "pad", "random"), marks=pytest.mark.slow),
    pytest.param(("update", 1, 2047, 16, 16, "pad", "random"), marks=pytest.mark.slow),
    pytest.param(("update", 1, 300, 16, 32, "pad", "random"), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}-B{}T{}Hk{}Hv{}-{}-{}".format(*c))
def test_default_split_path_stays_in_bounds(tmp_path_factory, tmp_path, monkeypatch, case):
    """The split path's default launches (WY2_VX making P, then H3O with producer warps writing
    y) read and write only their buffers and shared memory, and compute y and the state."""
    launches = run_fenced(tmp_path_factory, tmp_path, *case, monkeypatch)
    fused = "_fused" if case[0] == "update" else ""
    assert [n.split("_l32")[0] for n in _names(launches)] == [
        cs.wy_name(bool(fused), True) + "_vxp",
        f"{cs.H3O_NAME}_eypy_{launches[1].build['shared_memory']}",
    ]
    nw = cl.h3_warps(case[1], case[4], Dv)
    assert dict(launches[1].call["template"])["BV"] == 16 * nw


@pytest.mark.slow  # ~80 s each: 65,536 threadgroup-steps of 32 threads
@pytest.mark.parametrize("B, T, Hk, Hv", [(1, 64, 16, 16), (2, 512, 1, 1)], ids=lambda x: str(x))
def test_fused_kernel_stays_in_bounds(tmp_path_factory, tmp_path, monkeypatch, B, T, Hk, Hv):
    """`auto` below the chunk crossover (T < 2048) on CUDA: the fused recurrent kernel, with a
    mask and a state; every threadgroup of Hk = Hv = 16 over 64 steps, and T 512 at B 2 with one
    head (its launches differ only in the grid's heads: a lane-emulated step of 32 threads costs
    too much for all 16 heads over 512 steps here)."""
    launches = run_fenced(
        tmp_path_factory, tmp_path, "fused", B, T, Hk, Hv, "pad", "random", monkeypatch
    )
    assert _names(launches) == ["gated_delta_step_fused_mask"]


_GATES_READ = (
    "    if (n + 1 < N) dcn = gates[(rn + 2 * C - 1) * 4];\n",
    "    dcn = gates[(rn + 2 * C - 1) * 4];\n",
)


@pytest.mark.parametrize("bug", ["gates_read", "smem_short"])
def test_fence_stops_planted_overflows(tmp_path_factory, tmp_path, monkeypatch, bug):
    """The harness catches what it is for, at the default path's H3O: its next-chunk decay read
    made one chunk too far (the last chunk reads past the WY pass's gates), or the host asking
    for 17 bytes of dynamic shared memory fewer than h3opy_smem (the layout's last row ends in 16
    bytes of padding nothing touches: 16 fewer still runs clean, so the host's size is the
    kernel's to the byte): AddressSanitizer stops the run."""
    if bug == "gates_read":
        good, bad = _GATES_READ
        assert cl.h3opy_source("cuda").count(good) == 1
        monkeypatch.setattr(cs, "h3opy_body", lambda real=cs.h3opy_body: real().replace(good, bad))
    else:
        monkeypatch.setattr(cs, "h3opy_smem", lambda *a, real=cs.h3opy_smem: real(*a) - 17)
    with pytest.raises(AssertionError, match="AddressSanitizer"):
        run_fenced(tmp_path_factory, tmp_path, "update", 1, 100, 1, 2, None, "random", monkeypatch)
