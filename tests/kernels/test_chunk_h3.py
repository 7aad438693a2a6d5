"""Round 7's state pass H3_BODY (chunk_launch.H3; CUDA, off by default): one warp a chain of 16
value rows, the state in its accumulators, a ring of whole chunks shared by the threadgroup's
warps. In the lane emulator (CUDA's fragment layout): H, Vn and the final state equal H2_BODY's
bit for bit (bf16 pieces with MP 1, fp32 with MP 3; Dk 128 and 32; 1, 2 and 4 warps a
threadgroup; rings of two and three), and within the tolerance of the float64 recurrence; the
host's choice of it (recording factory); ptxas for sm_90 without spills. Also: H2_BODY at 32
value rows a threadgroup (the "state bv32" of round 7's combined configuration) equal to 16."""

import re
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.conftest import RTOL, rel_err
from tests.kernels.helpers import EMULATED_IO, GXX, compile_emulated
from tests.kernels.test_chunk_cuda_source import NVCC
from tests.kernels.test_chunk_stamps import _inputs, recorder  # noqa: F401  (fixture)
from tests.kernels.test_cuda_source import CTYPES, PRELUDE

C = cl.CHUNK
_SIG = (
    "void kernel(const PT* W, const PT* U, const PT* Kw, const float* gates,\n"
    "            const float* state_in, const int* U_shape, PT* H, PT* Vn, float* state_out)"
)
PROGRAM = r"""
namespace h2 {{
template <int Dk, int BV, int C, int NT, int DS, int NB, int MP, int PF, typename PT>
{sig} {{
{h2}
}}
}}  // namespace h2
namespace h3 {{
template <int Dk, int BV, int C, int NT, int NB, int MP, typename PT>
{sig} {{
{h3}
}}
}}  // namespace h3

// WHAT(h2|h3) DIR BH N Dv, then h2: BV DS NB; h3: NW NB
template <int Dk, typename PT, int MP>
int run(char** argv) {{
  const std::string what = argv[1], d = std::string(argv[2]) + "/";
  const int BH = std::stoi(argv[4]), N = std::stoi(argv[5]), Dv = std::stoi(argv[6]);
  const int a = std::stoi(argv[7]), b = std::stoi(argv[8]);
  constexpr int C = {C};
  auto W = read_as<PT>(d + "W"), U = read_as<PT>(d + "U"), Kw = read_as<PT>(d + "Kw");
  auto gates = readf(d + "gates"), s0 = readf(d + "state_in");
  const int U_shape[3] = {{BH, N * C, Dv}};
  std::vector<PT> H(size_t(BH) * N * Dv * Dk, PT(NAN)), Vn(size_t(BH) * N * C * Dv, PT(NAN));
  std::vector<float> s(size_t(BH) * Dv * Dk, NAN);
  auto call = [&](auto f, int bv, int nt) {{
    run_blocks({{unsigned(BH), unsigned(Dv / bv), 1}}, nt, [&] {{
      f(W.data(), U.data(), Kw.data(), gates.data(), s0.data(), U_shape, H.data(), Vn.data(),
        s.data());
    }});
  }};
  if (what == "h2") {{
    const int c = std::stoi(argv[9]);
#define H2_CASE(BV_, DS_, NB_) \
    if (a == BV_ && b == (DS_ < Dk ? DS_ : Dk) && c == NB_) \
      call(&h2::kernel<Dk, BV_, C, 32 * (C / 16) * (BV_ / 16), (DS_ < Dk ? DS_ : Dk), NB_, MP, \
                       1, PT>, BV_, 32 * (C / 16) * (BV_ / 16));
    H2_CASE(16, 128, 2) H2_CASE(16, 64, 2) H2_CASE(16, 32, 3) H2_CASE(32, 64, 2)
    if constexpr (Dk == 32) {{ H2_CASE(32, 32, 3) }}
  }} else {{
#define H3_CASE(NW_, NB_) \
    if (a == NW_ && b == NB_) call(&h3::kernel<Dk, 16 * NW_, C, 32 * NW_, NB_, MP, PT>, \
                                   16 * NW_, 32 * NW_);
    H3_CASE(1, 2) H3_CASE(2, 2) H3_CASE(4, 2) H3_CASE(1, 3) H3_CASE(2, 3)
  }}
  write(d + "H", H); write(d + "Vn", Vn); write(d + "state_out", s);
  return 0;
}}

int main(int argc, char** argv) {{
  const int Dk = std::stoi(argv[3]);
  const std::string pt = argv[argc - 1];
  if (Dk == 128) return pt == "bf16" ? run<128, bf16, 1>(argv) : run<128, float, 3>(argv);
  if (Dk == 32) return pt == "bf16" ? run<32, bf16, 1>(argv) : run<32, float, 3>(argv);
  return 1;
}}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    if GXX is None:
        pytest.skip("needs g++")
    text = EMULATED_IO + PROGRAM.format(
        sig=_SIG, h2=cl.h2_source("cuda"), h3=cl.h3_source("cuda"), C=C
    )
    return compile_emulated(text, tmp_path_factory.mktemp("chunk_h3"), timeout=900)


def _pieces(rng, BH, N, Dk, Dv, bf16: bool):
    """W, U, Kw, gates, state_in as float32 arrays (bf16-representable where bf16): a stable
    recurrence (small W, Kw; decays in (0.3, 1])."""
    rows = BH * N * C

    def r(*shape, scale=1.0):
        x = (rng.standard_normal(shape) * scale).astype(np.float32)
        return np.asarray(mx.array(x).astype(mx.bfloat16).astype(mx.float32)) if bf16 else x

    W = r(rows, Dk, scale=0.5 / np.sqrt(Dk))
    U = r(rows, Dv)
    Kw = r(rows, Dk, scale=0.5 / np.sqrt(C))
    gates = rng.uniform(0.3, 1.0, (rows, 4)).astype(np.float32)
    s0 = rng.standard_normal((BH, Dv, Dk)).astype(np.float32)
    return W, U, Kw, gates, s0


def _run(program, tmp, what, Dk, BH, N, Dv, args, pt, pieces):
    for name, x in zip(("W", "U", "Kw", "gates", "state_in"), pieces, strict=True):
        (tmp / name).write_bytes(np.ascontiguousarray(x, np.float32).tobytes())
    cmd = [str(program), what, str(tmp), str(Dk), str(BH), str(N), str(Dv), *map(str, args), pt]
    subprocess.run(cmd, check=True, timeout=600)
    H = np.fromfile(tmp / "H", np.float32).reshape(BH, N, Dv, Dk)
    Vn = np.fromfile(tmp / "Vn", np.float32).reshape(BH, N * C, Dv)
    s = np.fromfile(tmp / "state_out", np.float32).reshape(BH, Dv, Dk)
    return H, Vn, s


def _reference(W, U, Kw, gates, s0, BH, N, Dk, Dv):
    """The state pass in float64: H[n] = S; delta = U_n - W_n S^T; S = dc S + delta^T Kw_n."""
    f = np.float64
    H = np.zeros((BH, N, Dv, Dk))
    Vn = np.zeros((BH, N * C, Dv))
    S = s0.astype(f).copy()
    for b in range(BH):
        for n in range(N):
            rows = slice((b * N + n) * C, (b * N + n + 1) * C)
            H[b, n] = S[b]
            d = U[rows].astype(f) - W[rows].astype(f) @ S[b].T
            Vn[b, n * C : (n + 1) * C] = d
            S[b] = gates[(b * N + n) * C + C - 1, 0] * S[b] + d.T @ Kw[rows].astype(f)
    return H, Vn, S


H3_CASES = [
    # (Dk, Dv, NW, NB)
    (128, 64, 4, 2),
    (128, 32, 2, 2),
    (128, 32, 1, 2),
    (128, 32, 2, 3),
    (32, 16, 1, 3),
    (32, 32, 2, 2),
]


@pytest.mark.parametrize("pt", ["bf16", "fp32"])
@pytest.mark.parametrize("case", H3_CASES, ids=lambda c: "Dk{}Dv{}nw{}nb{}".format(*c))
def test_h3_equals_h2_and_float64(program, tmp_path, case, pt):
    """H3_BODY's H, Vn and final state equal H2_BODY's (the host's tiles for that piece type)
    bit for bit, and are within the piece type's tolerance of the float64 recurrence."""
    Dk, Dv, nw, nb = case
    BH, N = 2, 3
    bf16 = pt == "bf16"
    pieces = _pieces(np.random.default_rng(hash(case) % 2**32), BH, N, Dk, Dv, bf16)
    ds, hnb = cl.h_tiles("cuda", Dk, 16, 2 if bf16 else 4, True)
    want = _run(program, tmp_path, "h2", Dk, BH, N, Dv, (16, min(ds, Dk), hnb), pt, pieces)
    got = _run(program, tmp_path, "h3", Dk, BH, N, Dv, (nw, nb), pt, pieces)
    for name, x, y in zip(("H", "Vn", "state"), got, want, strict=True):
        assert np.isfinite(x).all(), name
        assert np.array_equal(x, y), (name, np.abs(x - y).max())
    ref = _reference(*pieces, BH, N, Dk, Dv)
    tol = RTOL[mx.bfloat16 if bf16 else mx.float32]
    for name, x, y in zip(("H", "Vn", "state"), got, ref, strict=True):
        assert rel_err(x, y) < tol, (name, rel_err(x, y))


@pytest.mark.parametrize("Dk", [128, 32])
def test_h2_bv32_equals_bv16(program, tmp_path, Dk):
    """H2_BODY at 32 value rows a threadgroup (round 7's combined configuration's state pass)
    gives bf16 H, Vn and the state of 16 value rows bit for bit."""
    BH, N, Dv = 2, 3, 64
    pieces = _pieces(np.random.default_rng(7 + Dk), BH, N, Dk, Dv, True)
    outs = []
    for bv in (16, 32):
        ds, nb = cl.h_tiles("cuda", Dk, bv, 2, True)
        outs.append(_run(program, tmp_path, "h2", Dk, BH, N, Dv, (bv, min(ds, Dk), nb), "bf16",
                         pieces))  # fmt: skip
    for x, y in zip(*outs, strict=True):
        assert np.isfinite(x).all() and np.array_equal(x, y)


@pytest.mark.usefixtures("plain_split")
def test_host_builds_h3_only_where_it_applies(recorder, monkeypatch):  # noqa: F811
    """H3 off: H2_BODY. On: H3_BODY for bf16 pieces with Dv a multiple of 16 H3
    (its header with gd_mma_rows, the ring's bytes of dynamic shared memory, H3 warps a
    threadgroup, Dv / (16 H3) threadgroups a head); fp32 pieces and Metal keep the default."""
    monkeypatch.setattr(cl, "H3_NB", 2)  # the ring's bytes below are for 2 chunks
    k, v, g, beta = _inputs()
    W, U, Kw, gates = cl.wy_pass("cuda", k, v, g, beta, None)
    state = mx.zeros((1, 4, 128, 128), mx.float32)
    cl.h_pass("cuda", W, U, Kw, gates, state)
    assert recorder.built[-1]["name"] == cs.H2_NAME
    monkeypatch.setattr(cl, "H3", 4)
    cl.h_pass("cuda", W, U, Kw, gates, state)
    kw = recorder.built[-1]
    smem = cs.h3_smem(128, 4, cl.H3_NB, 2)
    assert kw["name"] == f"{cs.H3_NAME}_{smem}" and kw["shared_memory"] == smem == 117760
    assert kw["source"] == cl.h3_source("cuda") and "gd_mma_rows" in kw["header"]
    call = recorder.calls[-1][1]
    assert call["threadgroup"] == (128, 1, 1) and call["grid"] == (128 * 4, 2, 1)
    assert dict(call["template"])["BV"] == 64 and dict(call["template"])["NB"] == cl.H3_NB
    f32 = [x.astype(mx.float32) for x in (W, U, Kw)]
    cl.h_pass("cuda", *f32, gates, state)
    assert recorder.calls[-1][0] == cs.H2_NAME


def _ptxas(text, tmp_path):
    path = tmp_path / "h3.cu"
    path.write_text(text)
    res = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-c", str(path), "-o", str(tmp_path / "h3.o"),
         "-Xptxas", "-v"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stderr


@pytest.mark.slow  # ~30 s; H3 is off by default
@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("nw", [4, 2])
def test_h3_compiles_for_sm90_without_spills(tmp_path, nw):
    """H3_BODY (bf16, Dk 128) and its stamped build through ptxas for sm_90 as MLX compiles them
    (its header, the template as constants): no spill, within 255 registers."""
    t = CTYPES["bf16"]
    consts = f"  using PT = {t};\n" + "".join(
        f"  constexpr int {k} = {v};\n"
        for k, v in (("Dk", 128), ("BV", 16 * nw), ("C", C), ("NT", 32 * nw), ("NB", 2), ("MP", 1))
    )
    params = [f"const {t}* W", f"const {t}* U", f"const {t}* Kw", "const float* gates",
              "const float* state_in", "const __grid_constant__ Shape U_shape", f"{t}* H",
              f"{t}* Vn", "float* state_out"]  # fmt: skip
    text = PRELUDE + cl.header("cuda") + cs.H3_TILES
    text += "__global__ void h3(" + ", ".join(params) + ") {\n" + consts
    text += cl.h3_source("cuda") + "\n}\n"
    # the stamped build too (its extra output)
    text += "__global__ void h3s(" + ", ".join([*params, "uint32_t* stamps"]) + ") {\n" + consts
    text += cs.stamped(cl.h3_source("cuda"), cs.H3_STAMPS) + "\n}\n"
    log = _ptxas(text, tmp_path)
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    spill = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    assert len(regs) == 2 and max(regs) <= 255 and spill == [0, 0], log


@pytest.mark.usefixtures("plain_split")
def test_ab7_mode_runs_through_on_a_recording_factory(recorder, monkeypatch):  # noqa: F811
    """chunk_split_gpu.py --ab7's checks and timings end to end on the recording factory (zeros
    for every output): every variant built (H3 with 4 and 2 warps, rings of 2 and 3; BEST7's
    kernels), compared with the default build and timed."""
    monkeypatch.setattr(cl, "H3_NB", 2)  # round 7's default ring, which its names below assume
    import sys
    from pathlib import Path

    from tests.kernels.test_chunk_vx import _zeros_like_outputs, _ZerosFused

    bench = str(Path(__file__).resolve().parents[2] / "benchmarks")
    monkeypatch.syspath_prepend(bench)
    sys.modules.pop("chunk_split_gpu", None)
    import chunk_split_gpu as g

    monkeypatch.setattr(g, "_gpu_backend", lambda backend: _ZerosFused())
    monkeypatch.setattr(cl, "H3_WAVE_SMS", None)  # names below: H3's warps at B 2, Hv 32
    monkeypatch.setattr(g, "float64_loop", lambda *a: _zeros_like_outputs(*a))
    rows = g.ab7_checks("cuda")
    assert {r["check"] for r in rows} == {"split", *g.AB7_VARIANTS}
    assert all(r.get("equal to default", True) for r in rows)
    built = {kw["name"] for kw in recorder.built}
    for nw, nb in ((4, 2), (2, 2), (4, 3)):
        assert f"{cs.H3_NAME}_{cs.h3_smem(128, nw, nb, 2)}" in built
    assert cs.wy_name(True, True) + "_vx_lb3" in built and cs.O2_NAME + "_vx_lb3" in built
    assert cs.wy_name(True, True) + "_vx_l32_lb3" in built and cs.O2_NAME + "_vx_l32_lb3" in built
    times = g.ab7_times("cuda", ts=(256,))
    assert set(times[0]["ms"]) >= {
        "split", "split best7", "split best7 h3", "split best7 h3w2 l32", "state h3",
        "wy vx l32", "out vx lb3 l32", "state bv32 l32",
    }  # fmt: skip


@pytest.mark.usefixtures("plain_split")
def test_ldsm32_builds_l32_variants(recorder, monkeypatch):  # noqa: F811
    """LDSM32 (CUDA): the WY2, H2 and O2 builds with L32_TILES after H3_TILES in their header
    (macros renaming gd_mma_staged / gd_copy_tile), the same kernel text, "_l32" names; off,
    the default header."""
    k, v, g, beta = _inputs()
    W, U, Kw, gates = cl.wy_pass("cuda", k, v, g, beta, None)
    state = mx.zeros((1, 4, 128, 128), mx.float32)
    H, Vn, _ = cl.h_pass("cuda", W, U, Kw, gates, state)
    cl.o_pass("cuda", mx.zeros_like(k), k, gates, H, Vn, 130, 4, mx.bfloat16)
    plain = recorder.built[-3:]
    monkeypatch.setattr(cl, "LDSM32", True)
    W, U, Kw, gates = cl.wy_pass("cuda", k, v, g, beta, None)
    H, Vn, _ = cl.h_pass("cuda", W, U, Kw, gates, state)
    cl.o_pass("cuda", mx.zeros_like(k), k, gates, H, Vn, 130, 4, mx.bfloat16)
    l32 = recorder.built[-3:]
    want = [cs.wy_name(False, True) + "_l32_lb3", cs.H2_NAME + "_l32", cs.O2_NAME + "_l32_lb2"]
    assert [kw["name"] for kw in l32] == want
    for a, b in zip(plain, l32, strict=True):
        assert a["source"] == b["source"] and "gd_mma_staged_l32" not in a["header"]
        assert b["header"].count("#define gd_mma_staged gd_mma_staged_l32") == 1


@pytest.mark.slow  # ~1 min: ThreadSanitizer build
def test_h3_has_no_race_under_thread_sanitizer(tmp_path):
    """H3_BODY under ThreadSanitizer (bf16, Dk 128, 4 warps / ring of 2 and 2 warps / ring of 3):
    no two threads touch one address, one of them writing, without a barrier or __syncwarp
    between them (checked to report the race with the __syncwarp after delta taken out)."""
    if GXX is None:
        pytest.skip("needs g++")
    text = EMULATED_IO + PROGRAM.format(
        sig=_SIG, h2=cl.h2_source("cuda"), h3=cl.h3_source("cuda"), C=C
    )
    exe = compile_emulated(text, tmp_path, timeout=900, sanitize="thread")
    pieces = _pieces(np.random.default_rng(1), 1, 3, 128, 64, True)
    for name, x in zip(("W", "U", "Kw", "gates", "state_in"), pieces, strict=True):
        (tmp_path / name).write_bytes(np.ascontiguousarray(x, np.float32).tobytes())
    for nw, nb in ((4, 2), (2, 3)):
        cmd = [str(exe), "h3", str(tmp_path), "128", "1", "3", "64", str(nw), str(nb), "bf16"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, run.stderr[-3000:]


def test_h3_stamped_build(recorder, monkeypatch):  # noqa: F811
    """h_pass(stamps=True) with H3 on: H3_BODY's text with the stamps of H3_STAMPS (and nothing
    else: unstamped gives the text back), its header and dynamic shared memory, stamps
    [threadgroups, STAMP_SLOTS] uint32 appended; the sampled phases each under their condition."""
    monkeypatch.setattr(cl, "H3", 4)
    k, v, g, beta = _inputs()
    W, U, Kw, gates = cl.wy_pass("cuda", k, v, g, beta, None)
    state = mx.zeros((1, 4, 128, 128), mx.float32)
    *_, st = cl.h_pass("cuda", W, U, Kw, gates, state, stamps=True)
    assert st.shape == (4 * 2, cs.STAMP_SLOTS) and st.dtype == mx.uint32
    kw = recorder.built[-1]
    smem = cs.h3_smem(128, 4, cl.H3_NB, 2)
    assert kw["name"] == f"{cs.H3_NAME}_{smem}_stamped" and kw["shared_memory"] == smem
    assert cs.unstamped(kw["source"]) == cl.h3_source("cuda") and "gd_mma_rows" in kw["header"]
    got = sorted(int(j) for j in re.findall(r"GD_STAMP\((\d+)\);", kw["source"]))
    assert got == list(range(3, 4 + len(cs.H3_STAMPS)))
    for j, (_, _, *cond) in enumerate(cs.H3_STAMPS):
        if cond:
            assert kw["source"].count(f"if ({cond[0]}) GD_STAMP({3 + j});\n") == 1


@pytest.mark.slow  # ~1 min a case; LDSM32 is off by default
@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("act", ["bf16", "fp32"])
def test_ldsm32_compiles_for_sm90_with_no_more_spill(tmp_path, monkeypatch, act):
    """The round-6 variants' builds (WY2_VX, H2_VX, O2_VX; tests/kernels/test_chunk_vx.py's
    cases, under their launch bounds) with L32_TILES in the header: they compile for sm_90; bf16
    spills no more than without it (nvcc 13.0, by hand at the timed bounds: O2_VX at three an SM
    20 -> 0 bytes, WY2_VX 8 -> 4), fp32 as measured (WY2_VX 0 -> 16 bytes, the rest no more)."""
    from tests.kernels.test_chunk_split_sources import cuda_unit
    from tests.kernels.test_chunk_vx import _vx_cases

    head = PRELUDE + cl.header("cuda")
    for name, ins, outs, body, tpl, lb in _vx_cases(2 if act == "bf16" else 4):
        if "extern __shared__" in body:  # H2_DYN: not an LDSM32 build
            continue
        case = (name, ins, outs, body, tpl)
        monkeypatch.setattr(
            "tests.kernels.test_chunk_split_sources.kernels",
            lambda backend, Dk, itemsize=None, c=case: [c],
        )
        unit = cuda_unit([(act, 128)])[len(head) :]
        bound = cl.launch_bounds_header(256, lb) if lb else ""
        spills = []
        for extra in ("", cs.H3_TILES + cs.L32_TILES):
            log = _ptxas(head + extra + bound + unit, tmp_path)
            spills.append([int(x) for x in re.findall(r"(\d+) bytes spill stores", log)])
        assert len(spills[1]) == 1, (name, spills)
        # bf16 (the timed builds): no more spill; fp32: WY2_VX spills 16 bytes with it (0
        # without), the copies' offsets held across its slices
        cap = spills[0][0] if act == "bf16" else spills[0][0] + (16 if "wy2" in name else 0)
        assert spills[1][0] <= cap, (name, spills)
