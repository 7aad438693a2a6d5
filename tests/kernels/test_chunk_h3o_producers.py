"""Round 9's H3O_PRODUCERS (chunk_launch.H3O_PRODUCERS; CUDA, off by default): H3O (H3O_EARLY's
order) with its ring's copies issued by producer warps of their own (chunk_source.h3op_body: 2
NT threads, the NT computing ones issue no copy). In the lane emulator (CUDA's fragment layout):
y and the final state equal H3O_EARLY's bit for bit (1, 2 and 4 computing warps, rings of 2 and
3, Dk 128 and 32, rows past T, masked steps whose q is NaN); ThreadSanitizer finds no race
between the producers' copies and the computing warps' reads (slow); the host launches it only
with the switch (twice the threads, the same template); ptxas for sm_90 without spills (slow)."""

import re
import subprocess

import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.kernels.chunk_rounds import (
    BEFORE_ROUND9,
    h3o_builds_program,
    h3o_pass_inputs,
    split_switches,
    zero_pieces,
)
from tests.kernels.helpers import EMULATED_IO, GXX, compile_emulated
from tests.kernels.test_chunk_cuda_source import NVCC
from tests.kernels.test_chunk_fuse_y import _inputs
from tests.kernels.test_chunk_stamps import recorder  # noqa: F401  (fixture)
from tests.kernels.test_cuda_source import CTYPES, PRELUDE

C = cl.CHUNK
PROGRAM = h3o_builds_program(
    [("h3oe", 1), ("h3oep", 2), ("h3oepy", 2)], "H3O_EARLY's H3O and its producer-warp builds"
)


def _program_text() -> str:
    return EMULATED_IO + PROGRAM.format(
        h3oe=cl.h3o_source("cuda", True), h3oep=cl.h3op_source("cuda"), o2p=cl.o2p_source("cuda"),
        h3oepy=cl.h3opy_source("cuda"), C=C,
    )  # fmt: skip


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    if GXX is None:
        pytest.skip("needs g++")
    text = _program_text()
    return compile_emulated(text, tmp_path_factory.mktemp("h3o_producers"), timeout=900)


CASES = [
    # (Dk, B, T, Hk, Hv, Dv, NW, NB, nan_q)
    (128, 1, 200, 1, 2, 64, 2, 2, False),
    (128, 2, 150, 1, 2, 128, 2, 3, True),
    (128, 1, 130, 2, 4, 64, 4, 2, True),
    (128, 1, 64, 1, 1, 32, 1, 3, False),
    (32, 2, 100, 1, 2, 32, 2, 2, True),
]


def _run(program, tmp_path, case):
    Dk, B, T, Hk, Hv, Dv, nw, nb, nan_q = case
    pieces, _ = _inputs(np.random.default_rng(sum(map(hash, case)) % 2**32), *case[:6], nan_q)
    for name, x in pieces.items():
        (tmp_path / name).write_bytes(np.ascontiguousarray(x, np.float32).tobytes())
    return subprocess.run(
        [str(program), str(tmp_path), *map(str, case[:8])], capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "Dk{}B{}T{}Hk{}Hv{}Dv{}nw{}nb{}nan{}".format(*c)
)
def test_h3o_producers_equal_h3o(program, tmp_path, case):
    """The producer-warp builds' (copies; copies and y) y and state equal H3O_EARLY's bit for
    bit."""
    run = _run(program, tmp_path, case)
    assert run.returncode == 0, run.stderr[-2000:]
    Dk, B, T, Hk, Hv, Dv = case[:6]

    def get(name, shape):
        return np.fromfile(tmp_path / name, np.float32).reshape(shape)

    for name, shape in (("y", (B, T, Hv, Dv)), ("state_out", (B * Hv, Dv, Dk))):
        want = get(name, shape)
        assert np.isfinite(want).all(), name
        for build in ("2", "3"):
            got = get(name + build, shape)
            assert np.array_equal(got, want), (name, build, np.nanmax(np.abs(got - want)))


def test_h3op_text_is_h3o_with_named_swaps():
    """h3op_body is H3O_EARLY's text with _H3OP_SWAPS (undone: the text back); only the
    producers (tid >= NT) copy, only the computing warps touch the state."""
    body = cs.h3op_body(True)
    back = body
    for old, new in reversed(cs._H3OP_SWAPS):
        assert back.count(new) == 1
        back = back.replace(new, old)
    assert back == cs.h3o_body(True)
    assert body.count("copy(") == 2 and body.count("if (tid >= NT) {") == 2  # both calls
    assert body.count("if (tid < NT) {") == 2  # the state in, the state out
    yb = cs.h3opy_body()
    back = yb
    for old, new in reversed(cs._H3OPY_SWAPS):
        assert back.count(new) == 1
        back = back.replace(new, old)
    assert back == body and yb.count("ystore(") == 2  # behind the copies; the last chunk


def test_host_launches_h3o_producers(recorder, monkeypatch):  # noqa: F811
    """H3O_PRODUCERS on: H3O's producer build (its own name, the same dynamic shared memory and
    template, twice the threads a threadgroup and in the grid); off: H3O_EARLY's build; 2: the
    build whose producers write y (a second Yb a warp); stamped: the producer builds with
    H3OP_STAMPS / H3OPY_STAMPS."""
    # Round 9's switches pinned off: this test is about the passes before it.
    split_switches(monkeypatch, **BEFORE_ROUND9, H3O_EARLY=True, H3O_SPLIT=False)
    args, (B, Hv, Dk, Dv) = h3o_pass_inputs()
    cl.h3o_pass(*args, 2)
    name, plain = recorder.calls[-1]
    monkeypatch.setattr(cl, "H3O_PRODUCERS", True)
    cl.h3o_pass(*args, 2)
    pname, prod = recorder.calls[-1]
    smem = cs.h3o_smem(Dk, 2, cl.H3_NB, 2)
    assert name == f"{cs.H3O_NAME}_ey_{smem}" and pname == f"{cs.H3O_NAME}_eyp_{smem}"
    assert prod["template"] == plain["template"] and dict(prod["template"])["NT"] == 64
    assert prod["threadgroup"] == (128, 1, 1) and plain["threadgroup"] == (64, 1, 1)
    assert prod["grid"] == (128 * B * Hv, Dv // 32, 1)
    kw = {b["name"]: b for b in recorder.built}[pname]
    assert kw["source"] == cl.h3op_source("cuda") and kw["shared_memory"] == smem
    assert "gd_mma_rows" in kw["header"]
    monkeypatch.setattr(cl, "H3O_PRODUCERS", 2)  # the producers write y too
    cl.h3o_pass(*args, 2)
    yname, py = recorder.calls[-1]
    smem_y = cs.h3opy_smem(Dk, 2, cl.H3_NB, 2)
    assert yname == f"{cs.H3O_NAME}_eypy_{smem_y}" and smem_y == smem + 2 * C * 24 * 2
    assert py["threadgroup"] == (128, 1, 1) and py["template"] == plain["template"]
    kw = {b["name"]: b for b in recorder.built}[yname]
    assert kw["source"] == cl.h3opy_source("cuda") and kw["shared_memory"] == smem_y
    *_, st = cl.h3o_pass(*args, 2, stamps=True)
    sname, sc = recorder.calls[-1]
    assert sname == f"{cs.H3O_NAME}_eypy_{smem_y}_stamped" and sc["threadgroup"] == (128, 1, 1)
    assert st.shape == (B * Hv * Dv // 32, cs.STAMP_SLOTS)
    kw = {b["name"]: b for b in recorder.built}[sname]
    assert cs.unstamped(kw["source"]) == cl.h3opy_source("cuda") and "gd_mma_rows" in kw["header"]
    monkeypatch.setattr(cl, "H3O_PRODUCERS", True)
    cl.h3o_pass(*args, 2, stamps=True)
    kw = {b["name"]: b for b in recorder.built}[recorder.calls[-1][0]]
    assert kw["name"] == f"{cs.H3O_NAME}_eyp_{smem}_stamped"
    assert cs.unstamped(kw["source"]) == cl.h3op_source("cuda")
    got = sorted(int(x) for x in re.findall(r"GD_STAMP\((\d+)\)", kw["source"]))
    assert got == list(range(3, 4 + len(cs.H3OP_STAMPS)))


@pytest.mark.slow  # ~1-2 min: ThreadSanitizer build
def test_h3o_producers_have_no_race_under_thread_sanitizer(tmp_path):
    """The producers' copies (into the stage of chunk n + NB - 1) and the computing warps' reads
    (of chunk n's) are ordered by the barriers: ThreadSanitizer reports no race."""
    if GXX is None:
        pytest.skip("needs g++")
    exe = compile_emulated(_program_text(), tmp_path, timeout=900, sanitize="thread")
    io = tmp_path / "io"
    io.mkdir()
    run = _run(exe, io, (128, 1, 200, 1, 2, 64, 2, 2, True))
    assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, run.stderr[-3000:]


@pytest.mark.slow  # ~20 s
@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_h3o_producers_compile_for_sm90_without_spills(tmp_path):
    """The producer builds (copies; copies and y) at 2 and 4 computing warps and their stamped
    builds at 2 (bf16, Dk 128, H3's header): no spill, at most 255 registers (at 2 NT threads a
    threadgroup: 64 K registers hold it)."""
    pt, sh = CTYPES["bf16"], "const __grid_constant__ Shape"
    params = [f"const {pt}* W", f"const {pt}* U", f"{sh} U_shape", f"const {pt}* Kw",
              "const float* gates", "const float* state_in", f"const {pt}* q", f"{sh} q_shape",
              f"const {pt}* P", f"{pt}* y", "float* state_out"]  # fmt: skip
    text = PRELUDE + cl.header("cuda") + cs.H3_TILES
    for nw in (2, 4):
        text += f"__global__ void h3op{nw}(" + ", ".join(params) + ") {\n"
        text += f"  constexpr int Dk = 128, BV = {16 * nw}, C = 64, NT = {32 * nw}, NB = 2, "
        text += f"MP = 1;\n  using PT = {pt};\n" + cl.h3op_source("cuda") + "\n}\n"
        text += f"__global__ void h3opy{nw}(" + ", ".join(params) + ") {\n"
        text += f"  constexpr int Dk = 128, BV = {16 * nw}, C = 64, NT = {32 * nw}, NB = 2, "
        text += f"MP = 1;\n  using PT = {pt};\n" + cl.h3opy_source("cuda") + "\n}\n"
    # the stamped builds --ab9 runs (2 warps)
    for name, body, anchors in (("h3ops", cl.h3op_source("cuda"), cs.H3OP_STAMPS),
                                ("h3opys", cl.h3opy_source("cuda"), cs.H3OPY_STAMPS)):  # fmt: skip
        text += f"__global__ void {name}(" + ", ".join([*params, "uint32_t* stamps"]) + ") {\n"
        text += "  constexpr int Dk = 128, BV = 32, C = 64, NT = 64, NB = 2, MP = 1;\n"
        text += f"  using PT = {pt};\n" + cs.stamped(body, anchors) + "\n}\n"
    path = tmp_path / "h3op.cu"
    path.write_text(text)
    out = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-c", str(path), "-o", str(tmp_path / "h3op.o"),
         "-Xptxas", "-v"],  # fmt: skip
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    spills = re.findall(r"(\d+) bytes spill stores", out.stderr)
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", out.stderr)]
    assert spills == ["0"] * 6 and len(regs) == 6 and max(regs) <= 255, out.stderr


@pytest.mark.parametrize("nw, nb", [(2, 3), (4, 2)])
def test_h3_ring_shrinks_to_fit_shared_memory(recorder, monkeypatch, nw, nb):  # noqa: F811
    """H3_NB = 3 (the default): at 2 warps the ring keeps 3 chunks; at 4 warps 3 chunks of H3O
    would need 257 KB, above H3_SMEM_MAX, so the build takes 2 (template NB, its name's bytes):
    a launch asking for more than the device allows fails at run time ("invalid argument")."""
    monkeypatch.setattr(cl, "H3_NB", 3)
    monkeypatch.setattr(cl, "H3", nw)
    monkeypatch.setattr(cl, "FUSE_O", True)
    Dk = 128
    q, v, g, state = zero_pieces(Dk=Dk)
    for producers in (False, 1, 2):
        monkeypatch.setattr(cl, "H3O_PRODUCERS", producers)
        recorder.calls.clear()
        cl.split_chunk_kernel("cuda", q, q, v, g, g, state, None)
        name, call = recorder.calls[-1]
        smem_of = cs.h3opy_smem if producers == 2 else cs.h3o_smem
        assert dict(call["template"])["NB"] == nb, (producers, call["template"])
        built = {b["name"]: b for b in recorder.built}[name]
        assert built["shared_memory"] == smem_of(Dk, nw, nb, 2) <= cl.H3_SMEM_MAX
    for fn in (cs.h3_smem, cs.h3y_smem):  # the other H3 builds' rings at these warps
        want = 3 if fn(Dk, nw, 3, 2) <= cl.H3_SMEM_MAX else 2
        assert cl._h3_ring(lambda n, fn=fn: fn(Dk, nw, n, 2))[0] == want


@pytest.mark.parametrize(
    "Hv, sms, want", [(4, None, 2), (4, 8, 4), (4, 15, 4), (4, 16, 2), (3, 4, 2)]
)
def test_h3_warps_by_waves(recorder, monkeypatch, Hv, sms, want):  # noqa: F811
    """H3_WAVE_SMS: where H3 = 2 would give the state pass more threadgroups than it (B Hv Dv /
    32: 16 at Hv 4, Dv 128), four warps a threadgroup (half the threadgroups, the grid and
    threadgroup that go with it); at or under it, or off, two. Dv 96 (Hv 3 case: 96 is not a
    multiple of 64) keeps two."""
    split_switches(monkeypatch, H3=2, H3_WAVE_SMS=sms)
    Dv = 96 if Hv == 3 else 128
    q, v, g, state = zero_pieces(Hv=Hv, Dv=Dv)
    assert cl.h3_warps(1, Hv, Dv) == want
    cl.split_chunk_kernel("cuda", q, q, v, g, g, state, None)
    name, call = recorder.calls[-1]
    assert name.startswith(cs.H3O_NAME)
    threads = {False: 32, 1: 64, 2: 64}[cl.H3O_PRODUCERS] * want
    assert call["threadgroup"] == (threads, 1, 1)
    assert call["grid"] == (threads * Hv, Dv // (16 * want), 1)
