"""Round 10's H3O_SPLIT (chunk_launch.H3O_SPLIT; CUDA, off by default): the producer-warp state
pass (H3O_PRODUCERS = 1, H3O_EARLY's order) with each 16 value rows shared by two computing
warps (chunk_source.h3ops_body: a warp's two chunk row tiles and half of the state's key tiles,
one named barrier of the pair a chunk). In the lane emulator (CUDA's fragment layout): y and
the final state equal H3O_PRODUCERS' bit for bit (1, 2 and 4 pairs, rings of 2 and 3, Dk 128
and 32, rows past T, masked steps whose q is NaN), and are within bf16's tolerance of a float64
recurrence; ThreadSanitizer finds no race (slow); broken on purpose (the pair barrier taken
out, a half's row tiles swapped), the comparison fails; the host launches it only with the
switch (three times the threads, the same template and threadgroup memory, the pair barrier in
its header); ptxas for sm_90 without spills (slow)."""

import re
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.conftest import RTOL, rel_err
from tests.kernels.chunk_rounds import (
    bench_on_zeros,
    h3o_builds_program,
    h3o_pass_inputs,
    split_switches,
)
from tests.kernels.helpers import EMULATED_IO, GXX, compile_emulated
from tests.kernels.test_chunk_cuda_source import NVCC
from tests.kernels.test_chunk_fuse_y import _inputs
from tests.kernels.test_chunk_stamps import recorder  # noqa: F401  (fixture)
from tests.kernels.test_cuda_source import CTYPES, PRELUDE

C = cl.CHUNK
PROGRAM = h3o_builds_program([("h3oep", 2), ("h3oeps", 3)], "H3O_PRODUCERS' build and H3O_SPLIT's")


def _program_text(split_body: str | None = None) -> str:
    split = cl.PROLOGUE["cuda"] + (split_body if split_body is not None else cs.h3ops_body())
    return EMULATED_IO + PROGRAM.format(
        h3oep=cl.h3op_source("cuda"), h3oeps=split, o2p=cl.o2p_source("cuda"), C=C
    )


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    if GXX is None:
        pytest.skip("needs g++")
    return compile_emulated(_program_text(), tmp_path_factory.mktemp("h3o_split"), timeout=900)


CASES = [
    # (Dk, B, T, Hk, Hv, Dv, NW, NB, nan_q)
    (128, 1, 200, 1, 2, 64, 2, 2, False),
    (128, 2, 150, 1, 2, 128, 2, 3, True),
    (128, 1, 130, 2, 4, 64, 4, 2, True),
    (128, 1, 64, 1, 1, 32, 1, 3, False),
    (32, 2, 100, 1, 2, 32, 2, 2, True),
]
_IDS = "Dk{}B{}T{}Hk{}Hv{}Dv{}nw{}nb{}nan{}".format


def _run(program, tmp_path, case):
    """Runs the program on case's pieces in tmp_path: (pieces, valid, outputs by name)."""
    Dk, B, T, Hk, Hv, Dv, nw, nb, nan_q = case
    pieces, valid = _inputs(np.random.default_rng(sum(map(hash, case)) % 2**32), *case[:6], nan_q)
    for name, x in pieces.items():
        (tmp_path / name).write_bytes(np.ascontiguousarray(x, np.float32).tobytes())
    run = subprocess.run(
        [str(program), str(tmp_path), *map(str, case[:8])], capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    N, BH = -(-T // C), B * Hv
    shapes = {
        "y": (B, T, Hv, Dv), "y2": (B, T, Hv, Dv), "state_out": (BH, Dv, Dk),
        "state_out2": (BH, Dv, Dk), "P": (BH, N, C, C),
    }  # fmt: skip
    out = {n: np.fromfile(tmp_path / n, np.float32).reshape(s) for n, s in shapes.items()}
    return pieces, valid, out


def _bf16(x) -> np.ndarray:
    return np.asarray(mx.array(np.asarray(x, np.float32)).astype(mx.bfloat16).astype(mx.float32))


def _reference(pieces, valid, P, B, T, Hk, Hv, Dv, Dk):
    """H3O's recurrence in float64 from the same pieces and P: per chunk Sb = S in bf16, delta =
    bf16(U - Sb W^T), y_t = (valid_t ? gamma_t q_t Sb^T : 0) + sum_s P[t, s] delta_s (in bf16),
    S = decay S + delta^T Kw. Returns (y [B, T, Hv, Dv], state [B Hv, Dv, Dk])."""
    N = -(-T // C)
    g = pieces["gates"].reshape(B * Hv, N, C, 4).astype(np.float64)
    W, U, Kw = (pieces[n].reshape(B * Hv, N, C, -1).astype(np.float64) for n in ("W", "U", "Kw"))
    q = np.nan_to_num(pieces["q"].astype(np.float64))
    y = np.zeros((B, T, Hv, Dv))
    S = pieces["state_in"].reshape(B * Hv, Dv, Dk).astype(np.float64)
    for bh in range(B * Hv):
        b, hv = divmod(bh, Hv)
        hk = hv // (Hv // Hk)
        for n in range(N):
            Sb = _bf16(S[bh]).astype(np.float64)
            delta = _bf16(U[bh, n] - W[bh, n] @ Sb.T).astype(np.float64)  # C x Dv
            t = np.arange(n * C, min(n * C + C, T))
            ok = g[bh, n, : len(t), 2] != 0
            Yd = np.where(ok[:, None], g[bh, n, : len(t), 0:1] * (q[b, t, hk] @ Sb.T), 0.0)
            Pn = np.tril(np.nan_to_num(P[bh, n].astype(np.float64)))[: len(t)]
            y[b, t, hv] = _bf16(Yd + Pn @ delta)
            S[bh] = g[bh, n, C - 1, 0] * S[bh] + delta.T @ Kw[bh, n]
    return y, S


@pytest.mark.parametrize("case", CASES, ids=lambda c: _IDS(*c))
def test_h3o_split_equals_h3o_producers(program, tmp_path, case):
    """H3O_SPLIT's y and state equal H3O_PRODUCERS' bit for bit, and are within bf16's tolerance
    of the float64 recurrence on every step (masked steps' y: P's and the decay's zeros)."""
    pieces, valid, out = _run(program, tmp_path, case)
    Dk, B, T, Hk, Hv, Dv = case[:6]
    for name in ("y", "state_out"):
        want, got = out[name], out[name + "2"]
        assert np.isfinite(want).all(), name
        assert np.array_equal(got, want), (name, np.nanmax(np.abs(got - want)))
    y, S = _reference(pieces, valid, out["P"], B, T, Hk, Hv, Dv, Dk)
    assert rel_err(out["y2"], y) < RTOL[mx.bfloat16]
    assert rel_err(out["state_out2"], S) < RTOL[mx.bfloat16]


# Broken on purpose: each must make the split build differ from the producers' build.
_BROKEN = {
    # the partner's delta rows read before they are written
    "no pair barrier": ("    gd_pair_barrier(1 + pw, 64);", "    __syncwarp();"),
    # half 0's second P^T tile read from the other half's rows of P
    "row tiles": (
        "gd_mma_rows<MP, true, true, 1>(yt + 1, Db, DBL, sp + 16 * (RT - 1) * PP, PP, 0, 16 * RT);",
        "gd_mma_rows<MP, true, true, 1>(yt + 1, Db, DBL, sp + 16 * (RT - 2) * PP, PP, 0, 16 * RT);",
    ),
    # the update over the other half's Kw columns
    "key half": ("sk + 16 * KH * hf, SP", "sk + 16 * KH * (1 - hf), SP"),
}


@pytest.mark.slow  # ~3 min: three emulator builds
@pytest.mark.parametrize("what", sorted(_BROKEN))
def test_h3o_split_broken_on_purpose_differs(tmp_path, what):
    if GXX is None:
        pytest.skip("needs g++")
    old, new = _BROKEN[what]
    body = cs.h3ops_body()
    assert body.count(old) == 1
    exe = compile_emulated(_program_text(body.replace(old, new)), tmp_path, timeout=900)
    io = tmp_path / "io"
    io.mkdir()
    _, _, out = _run(exe, io, CASES[1])
    same = all(np.array_equal(out[n + "2"], out[n]) for n in ("y", "state_out"))
    assert not same, what


def test_h3ops_text_is_h3op_with_named_swaps():
    """h3ops_body is H3O_PRODUCERS' text with _H3OS_SWAPS (undone: the text back); one pair
    barrier a chunk, no warp-wide tile loop over all RT row tiles or KT key tiles left."""
    body = cs.h3ops_body()
    back = body
    for old, new in reversed(cs._H3OS_SWAPS):
        assert back.count(new) == 1
        back = back.replace(new, old)
    assert back == cs.h3op_body(True)
    assert body.count("gd_pair_barrier(") == 1 and body.count("if (tid >= NT2) {") == 2
    assert "c < KT;" not in body and "r < RT;" not in body


def test_host_launches_h3o_split(recorder, monkeypatch):  # noqa: F811
    """H3O_SPLIT on (with H3O_PRODUCERS = 1): its own name, the same template and dynamic shared
    memory as the producers' build, three times the computing threads a threadgroup and in the
    grid, the pair barrier in its header (and no other build's); off, or with H3O_PRODUCERS 2 /
    off: those builds. Stamped: h3ops with H3OPS_STAMPS."""
    split_switches(monkeypatch, WY_P=False, H3O_PRODUCERS=1, H3O_EARLY=True, H3O_SPLIT=False)
    args, (B, Hv, Dk, Dv) = h3o_pass_inputs()
    cl.h3o_pass(*args, 2)
    pname, prod = recorder.calls[-1]
    monkeypatch.setattr(cl, "H3O_SPLIT", True)
    cl.h3o_pass(*args, 2)
    sname, split = recorder.calls[-1]
    smem = cs.h3o_smem(Dk, 2, cl.H3_NB, 2)
    assert pname == f"{cs.H3O_NAME}_eyp_{smem}" and sname == f"{cs.H3O_NAME}_eyps_{smem}"
    assert split["template"] == prod["template"] and dict(split["template"])["NT"] == 64
    assert split["threadgroup"] == (192, 1, 1) and prod["threadgroup"] == (128, 1, 1)
    assert split["grid"] == (192 * B * Hv, Dv // 32, 1)
    built = {b["name"]: b for b in recorder.built}
    assert built[sname]["source"] == cl.h3ops_source("cuda")
    assert built[sname]["shared_memory"] == smem
    assert cs.H3_PAIR_TILES in built[sname]["header"] and "gd_mma_rows" in built[sname]["header"]
    assert cs.H3_PAIR_TILES not in built[pname]["header"]
    monkeypatch.setattr(cl, "H3O_PRODUCERS", 2)  # the y build takes precedence
    cl.h3o_pass(*args, 2)
    assert recorder.calls[-1][0].startswith(f"{cs.H3O_NAME}_eypy_")
    monkeypatch.setattr(cl, "H3O_PRODUCERS", False)
    cl.h3o_pass(*args, 2)
    assert recorder.calls[-1][0] == f"{cs.H3O_NAME}_ey_{smem}"
    assert recorder.calls[-1][1]["threadgroup"] == (64, 1, 1)
    monkeypatch.setattr(cl, "H3O_PRODUCERS", 1)
    *_, st = cl.h3o_pass(*args, 2, stamps=True)
    tname, sc = recorder.calls[-1]
    assert tname == f"{cs.H3O_NAME}_eyps_{smem}_stamped" and sc["threadgroup"] == (192, 1, 1)
    assert st.shape == (B * Hv * Dv // 32, cs.STAMP_SLOTS)
    kw = {b["name"]: b for b in recorder.built}[tname]
    assert cs.unstamped(kw["source"]) == cl.h3ops_source("cuda")
    assert cs.H3_PAIR_TILES in kw["header"]
    got = sorted(int(x) for x in re.findall(r"GD_STAMP\((\d+)\)", kw["source"]))
    assert got == list(range(3, 4 + len(cs.H3OPS_STAMPS)))


def test_split_path_takes_h3o_split(recorder, monkeypatch):  # noqa: F811
    """The split path (WY_P, FUSE_O, H3O_PRODUCERS 1) with H3O_SPLIT: WY2P, then H3O_SPLIT's
    build: two launches."""
    split_switches(monkeypatch, H3O_PRODUCERS=1, H3O_SPLIT=True)
    B, T, Hk, Hv, Dk, Dv = 1, 200, 2, 4, 128, 128
    q = mx.zeros((B, T, Hk, Dk), mx.bfloat16)
    v = mx.zeros((B, T, Hv, Dv), mx.bfloat16)
    g = mx.ones((B, T, Hv))
    cl.split_chunk_kernel("cuda", q, q, v, g, g, mx.zeros((B, Hv, Dv, Dk)), None)
    names = [n for n, _ in recorder.calls]
    assert len(names) == 2 and "_vxp" in names[0] and "_eyps_" in names[1], names


def test_ab10_mode_runs_through_on_a_recording_factory(recorder, monkeypatch, tmp_path):  # noqa: F811
    """chunk_split_gpu.py --ab10 end to end on the recording factory (zeros for every output):
    the split build made and compared with the default (bit for bit), the split path and the
    state pass timed with and without it, the stamped split build, Hv 16 / 64; the JSON written
    after each step, exit status 0."""
    g = bench_on_zeros(monkeypatch)
    rows = g.ab10_checks("cuda")
    assert {r["check"] for r in rows} == {"split", *g.AB10_VARIANTS}
    assert all(r["ok"] for r in rows), rows
    eq = [r["equal to default"] for r in rows if r["check"] in g.AB10_VARIANTS]
    assert eq == [True] * 2 * len(g.AB10_VARIANTS)
    built = {kw["name"] for kw in recorder.built}
    for nb in (cl.H3_NB, 2):
        assert f"{cs.H3O_NAME}_eyps_{cs.h3o_smem(128, cl.H3, nb, 2)}" in built
    assert cs.wy_name(True, True) + "_vxp_l32_lb3" in built  # "ps lb3"
    # the timings, the stamps and the other head counts through main(), at small T
    monkeypatch.setattr(g, "ab10_times", lambda b, shapes: [
        _small_times(g, b, T, hv) for T, hv in shapes
    ])  # fmt: skip
    stamps = g.ab10_split_stamps
    monkeypatch.setattr(g, "ab10_split_stamps", lambda b: stamps(b, ts=(256,)))
    monkeypatch.setattr(cl, "available_backend", lambda: "cuda")
    assert g.main(["--ab10", "--out", str(tmp_path)]) == 0
    (out,) = tmp_path.glob("*ab10*.json")
    import json

    info = json.loads(out.read_text())
    assert [r["T"] for r in info["times"]] == [256, 256] and len(info["times_hv"]) == 2
    assert {"split", "split ps", "split ps nb2", "split ps lb3", "state", "state ps"} <= set(
        info["times"][0]["ms"]
    )
    assert [r["check"] for r in info["stamps"]] == ["state fo ps"] and info["stamps"][0]["same"]
    assert f"{cs.H3O_NAME}_eyps_{cs.h3o_smem(128, cl.H3, cl.H3_NB, 2)}_stamped" in {
        kw["name"] for kw in recorder.built
    }


def _small_times(g, backend, T, hv):
    """ab10_times' row at T 256 (the timers at the given Hv's passes flag, no FLA)."""
    timers = g._ab10_timers(backend, g.Shape(1, 256, hv), {}, passes=hv == 32)
    return g._predicted_row(timers, 256, hv, {})


@pytest.mark.slow  # ~1-2 min: ThreadSanitizer build
def test_h3o_split_has_no_race_under_thread_sanitizer(tmp_path):
    """The pair's Db and Sb (both halves write, both read) are ordered by the pair barrier and
    the chunk's barrier: ThreadSanitizer reports no race (4 pairs, a ring of 2)."""
    if GXX is None:
        pytest.skip("needs g++")
    exe = compile_emulated(_program_text(), tmp_path, timeout=900, sanitize="thread")
    io = tmp_path / "io"
    io.mkdir()
    for name, x in _inputs(np.random.default_rng(3), *CASES[2][:6], True)[0].items():
        (io / name).write_bytes(np.ascontiguousarray(x, np.float32).tobytes())
    run = subprocess.run(
        [str(exe), str(io), *map(str, CASES[2][:8])], capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, run.stderr[-3000:]


@pytest.mark.slow  # ~20 s
@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_h3o_split_compiles_for_sm90_without_spills(tmp_path):
    """H3O_SPLIT's build at 2 and 4 pairs and its stamped build (bf16, Dk 128, H3's header and
    the pair barrier): no spill, registers that 3 NT threads a threadgroup can hold (<= 168 at
    4 pairs: 384 threads in 64 K)."""
    pt, sh = CTYPES["bf16"], "const __grid_constant__ Shape"
    params = [f"const {pt}* W", f"const {pt}* U", f"{sh} U_shape", f"const {pt}* Kw",
              "const float* gates", "const float* state_in", f"const {pt}* q", f"{sh} q_shape",
              f"const {pt}* P", f"{pt}* y", "float* state_out"]  # fmt: skip
    text = PRELUDE + cl.header("cuda") + cs.H3_TILES + cs.H3_PAIR_TILES
    for nw in (2, 4):
        text += f"__global__ void h3ops{nw}(" + ", ".join(params) + ") {\n"
        text += f"  constexpr int Dk = 128, BV = {16 * nw}, C = 64, NT = {32 * nw}, NB = 3, "
        text += f"MP = 1;\n  using PT = {pt};\n" + cl.h3ops_source("cuda") + "\n}\n"
    text += "__global__ void h3opss(" + ", ".join([*params, "uint32_t* stamps"]) + ") {\n"
    text += "  constexpr int Dk = 128, BV = 32, C = 64, NT = 64, NB = 3, MP = 1;\n"
    text += f"  using PT = {pt};\n" + cs.stamped(cl.h3ops_source("cuda"), cs.H3OPS_STAMPS) + "\n}\n"
    path = tmp_path / "h3ops.cu"
    path.write_text(text)
    out = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-c", str(path), "-o", str(tmp_path / "h3ops.o"),
         "-Xptxas", "-v"],  # fmt: skip
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    spills = re.findall(r"(\d+) bytes spill stores", out.stderr)
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", out.stderr)]
    assert spills == ["0"] * 3 and len(regs) == 3 and max(regs) <= 168, out.stderr
