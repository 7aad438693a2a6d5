"""Round 9's WY_P (chunk_launch.WY_P; CUDA, off by default): FUSE_O's P = D o q k^T made by the
WY pass (chunk_source.wy2p_body: WY2_VX with q's slices staged beside k's in Ai's space, q k^T
on the k k^T tiles, P written with L's decays), so that the P pass (O2P) goes. In the lane
emulator (CUDA's fragment layout): W, U, Kw, the gates and P of WY2P equal WY2_VX's and O2P's
bit for bit (gates given and computed in the kernel; rows past T, a hole of masked steps whose
q and k are NaN, decays strong enough to underflow gamma, Dk 32 and 128, Hk < Hv) and P is
D o q k^T within bf16's rounding of float64; the host takes it only with the switch, FUSE_O,
16-bit pieces and CUDA (recording factory); ptxas for sm_90 at WY's bound without spills
(slow)."""

import re
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.conftest import RTOL
from tests.kernels.chunk_rounds import (
    BEFORE_ROUND9,
    O2P_NAMESPACE,
    bench_on_zeros,
    split_switches,
    zero_pieces,
)
from tests.kernels.helpers import EMULATED_IO, GXX, compile_emulated
from tests.kernels.test_chunk_cuda_source import NVCC
from tests.kernels.test_chunk_stamps import recorder  # noqa: F401  (fixture)
from tests.kernels.test_cuda_source import CTYPES, PRELUDE

C = cl.CHUNK
_WY_ARGS = {
    False: "const float* g, const float* beta",
    True: "const float* a, const float* b, const float* A_log, const float* dt_bias",
}
_WY_TPL = "template <int Dk, int C, int NT, int DS, int NB, int MP, typename PT>"


def _wy_namespace(name: str, fused: bool, p: bool) -> str:
    q_in = "const PT* q_in, " if p else ""
    p_out = ", PT* P" if p else ""
    return f"""namespace {name} {{{{
{_WY_TPL}
void kernel(const PT* k, const PT* v, {_WY_ARGS[fused]}, const bool* mask, {q_in}
            const int* k_shape, const int* v_shape, PT* W, PT* U, PT* Kw, float* gates{p_out}) {{{{
{{{name}}}
}}}}
}}}}  // namespace {name}
"""


PROGRAM = (
    "".join(
        _wy_namespace(n, n.endswith("_fused"), "xp" in n)
        for n in ("wy2x", "wy2x_fused", "wy2xp", "wy2xp_fused")
    )
    + O2P_NAMESPACE
    + r"""
// DIR Dk B T Hk Hv Dv FUSED: WY2_VX + O2P, then WY2P (bf16 pieces, MP 1, the host's tiles)
template <int Dk, bool FUSED>
int run(const std::string& d, int B, int T, int Hk, int Hv, int Dv) {{
  using PT = bf16;
  constexpr int C = {C}, NT = {wy_threads}, DS = Dk < {wds} ? Dk : {wds}, NB = {wnb}, BVO = 64;
  const int N = (T + C - 1) / C, BH = B * Hv;
  const size_t rows = size_t(BH) * N * C;
  auto q = read_as<PT>(d + "q"), k = read_as<PT>(d + "k"), v = read_as<PT>(d + "v");
  auto g = readf(d + "g"), beta = readf(d + "beta"), A_log = readf(d + "A_log");
  auto dt_bias = readf(d + "dt_bias"), maskf = readf(d + "mask");
  std::unique_ptr<bool[]> mask(new bool[maskf.size()]);
  for (size_t i = 0; i < maskf.size(); ++i) mask[i] = maskf[i] != 0.0f;
  const int k_shape[4] = {{B, T, Hk, Dk}}, v_shape[4] = {{B, T, Hv, Dv}};
  const int dims[2] = {{T, Hv}};
  std::vector<PT> W(rows * Dk, PT(NAN)), U(rows * Dv, PT(NAN)), Kw(rows * Dk, PT(NAN));
  std::vector<PT> W2(W), U2(U), Kw2(Kw), P(size_t(BH) * N * C * C, PT(NAN)), P2(P);
  std::vector<float> gates(rows * 4, NAN), gates2(gates);
  run_blocks({{unsigned(N), unsigned(BH), 1}}, NT, [&] {{
    if (FUSED) {{
      wy2x_fused::kernel<Dk, C, NT, DS, NB, 1, PT>(k.data(), v.data(), g.data(), beta.data(),
          A_log.data(), dt_bias.data(), mask.get(), k_shape, v_shape, W.data(), U.data(),
          Kw.data(), gates.data());
    }} else {{
      wy2x::kernel<Dk, C, NT, DS, NB, 1, PT>(k.data(), v.data(), g.data(), beta.data(),
          mask.get(), k_shape, v_shape, W.data(), U.data(), Kw.data(), gates.data());
    }}
  }});
  run_blocks({{unsigned(N), unsigned(BH), 1}}, 256, [&] {{
    o2p::kernel<Dk, C, 256, DS, BVO, 1, PT>(q.data(), k.data(), gates.data(), dims, k_shape,
                                            P.data());
  }});
  run_blocks({{unsigned(N), unsigned(BH), 1}}, NT, [&] {{
    if (FUSED) {{
      wy2xp_fused::kernel<Dk, C, NT, DS, NB, 1, PT>(k.data(), v.data(), g.data(), beta.data(),
          A_log.data(), dt_bias.data(), mask.get(), q.data(), k_shape, v_shape, W2.data(),
          U2.data(), Kw2.data(), gates2.data(), P2.data());
    }} else {{
      wy2xp::kernel<Dk, C, NT, DS, NB, 1, PT>(k.data(), v.data(), g.data(), beta.data(),
          mask.get(), q.data(), k_shape, v_shape, W2.data(), U2.data(), Kw2.data(),
          gates2.data(), P2.data());
    }}
  }});
  write(d + "W", W); write(d + "U", U); write(d + "Kw", Kw); write(d + "gates", gates);
  write(d + "P", P); write(d + "W2", W2); write(d + "U2", U2); write(d + "Kw2", Kw2);
  write(d + "gates2", gates2); write(d + "P2", P2);
  return 0;
}}

int main(int argc, char** argv) {{
  const std::string d = std::string(argv[1]) + "/";
  const int Dk = std::stoi(argv[2]), B = std::stoi(argv[3]), T = std::stoi(argv[4]);
  const int Hk = std::stoi(argv[5]), Hv = std::stoi(argv[6]), Dv = std::stoi(argv[7]);
  const bool fused = std::stoi(argv[8]) != 0;
#define CASE(DK_, F_) if (Dk == DK_ && fused == F_) return run<DK_, F_>(d, B, T, Hk, Hv, Dv);
  CASE(128, false) CASE(128, true) CASE(32, false) CASE(32, true)
  return 1;
}}
"""
)


def _program_text() -> str:
    wds, wnb = cl.WY2_TILES[("cuda", 2)]
    return (
        EMULATED_IO
        + "#include <memory>\n"
        + PROGRAM.format(
            wy2x=cl.wy_source("cuda", False, True, vx=True),
            wy2x_fused=cl.wy_source("cuda", True, True, vx=True),
            wy2xp=cl.wy_source("cuda", False, True, vx=True, p=True),
            wy2xp_fused=cl.wy_source("cuda", True, True, vx=True, p=True),
            o2p=cl.o2p_source("cuda"),
            C=C,
            wy_threads=cl.WY_THREADS,
            wds=wds,
            wnb=wnb,
        )
    )


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    if GXX is None:
        pytest.skip("needs g++")
    return compile_emulated(_program_text(), tmp_path_factory.mktemp("chunk_wy_p"), timeout=900)


def _bf16(x) -> np.ndarray:
    return np.asarray(mx.array(np.asarray(x, np.float32)).astype(mx.bfloat16).astype(mx.float32))


def _inputs(rng, Dk, B, T, Hk, Hv, Dv, g_lo):
    """q, k, v (bf16 values), g in (g_lo, 1), beta, the raw gates (a, b, A_log, dt_bias) and a
    mask with a hole of masked steps, whose q and k are NaN (both passes must select them
    away)."""
    q = _bf16(rng.standard_normal((B, T, Hk, Dk)) / np.sqrt(Dk))
    k = _bf16(rng.standard_normal((B, T, Hk, Dk)) / np.sqrt(Dk))
    v = _bf16(rng.standard_normal((B, T, Hv, Dv)))
    mask = np.ones((B, T), bool)
    mask[:, T // 3 : T // 3 + 5] = False
    q[~mask] = np.nan
    k[~mask] = np.nan
    return dict(
        q=q,
        k=k,
        v=v,
        g=rng.uniform(g_lo, 1.0, (B, T, Hv)),
        beta=rng.uniform(0.0, 1.0, (B, T, Hv)),
        a=rng.standard_normal((B, T, Hv)),
        b=rng.standard_normal((B, T, Hv)),
        A_log=rng.uniform(-1.0, 1.5 if g_lo < 0.1 else 0.5, Hv),
        dt_bias=rng.uniform(-0.5, 0.5, Hv),
        mask=mask,
    )


CASES = [
    # (Dk, B, T, Hk, Hv, Dv, fused gates, g's lower bound)
    (128, 1, 200, 1, 2, 64, False, 0.3),
    (128, 2, 150, 1, 2, 96, True, 0.3),
    (128, 1, 130, 2, 4, 128, False, 0.01),  # gamma underflows: GD_DECAY_R1's running products
    (128, 1, 64, 1, 1, 32, True, 0.01),
    (32, 2, 100, 1, 2, 32, False, 0.3),
    (32, 1, 70, 1, 2, 48, True, 0.3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "Dk{}B{}T{}Hk{}Hv{}Dv{}fused{}g{}".format(*c))
def test_wy_p_equals_wy2_vx_and_o2p(program, tmp_path, case):
    """WY2P: W, U, Kw and the gates equal WY2_VX's bit for bit; P equals O2P's (from WY2_VX's
    gates) bit for bit on every tile at or below the diagonal, and is D o q k^T (float64 from
    the same bf16 q, k and the kernel's gates) within bf16's rounding on valid rows and
    columns, 0 where either step is masked or past T."""
    Dk, B, T, Hk, Hv, Dv, fused, g_lo = case
    x = _inputs(np.random.default_rng(sum(map(hash, case)) % 2**32), *case[:6], g_lo)
    for name, a in x.items():
        (tmp_path / name).write_bytes(np.ascontiguousarray(a, np.float32).tobytes())
    subprocess.run(
        [str(program), str(tmp_path), *map(str, case[:6]), str(int(fused))], check=True,
        timeout=600,
    )  # fmt: skip
    N, BH = -(-T // C), B * Hv

    def get(name, shape):
        return np.fromfile(tmp_path / name, np.float32).reshape(shape)

    rows = BH * N * C
    for name, shape in (("W", (rows, Dk)), ("U", (rows, Dv)), ("Kw", (rows, Dk)),
                        ("gates", (rows, 4))):  # fmt: skip
        want, got = get(name, shape), get(name + "2", shape)
        assert np.isfinite(want).all(), name
        assert np.array_equal(got, want), (name, np.nanmax(np.abs(got - want)))
    P, P2 = get("P", (BH, N, C, C)), get("P2", (BH, N, C, C))
    lower = np.kron(np.tril(np.ones((C // 16, C // 16), bool)), np.ones((16, 16), bool))
    assert np.isfinite(P[..., lower]).all()
    assert np.array_equal(P2[..., lower], P[..., lower])
    # P = D o q k^T, D_ij = gamma_i / gamma_j (j <= i, both steps valid), from the gates
    gates = get("gates", (BH, N, C, 4)).astype(np.float64)
    gam, ok = gates[..., 0], gates[..., 2] != 0
    q, k = x["q"].astype(np.float64), x["k"].astype(np.float64)
    tri = np.tril(np.ones((C, C), bool))
    for bh in range(BH):
        b, hv = divmod(bh, Hv)
        hk = hv // (Hv // Hk)
        pad = ((0, N * C - T), (0, 0))
        qc = np.nan_to_num(np.pad(q[b, :, hk], pad)).reshape(N, C, Dk)
        kc = np.nan_to_num(np.pad(k[b, :, hk], pad)).reshape(N, C, Dk)
        keep = ok[bh][:, :, None] & ok[bh][:, None, :] & tri & (gam[bh][:, None, :] > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(keep, gam[bh][:, :, None] / gam[bh][:, None, :], 0.0)
        want = d * np.einsum("nik,njk->nij", qc, kc)
        got = P2[bh].astype(np.float64)
        sel = keep & (d > 1e-12)
        scale = np.abs(want[sel]).max()
        assert np.abs(got[sel] - want[sel]).max() <= RTOL[mx.bfloat16] * scale
        masked = tri & ~(ok[bh][:, :, None] & ok[bh][:, None, :])
        assert (got[masked] == 0).all()


def test_wy_p_text_is_wy2_vx_with_named_swaps():
    """wy2p_body is wy2_vx_body with _WY2P_SWAPS and P's lines in L's loop: taking them out
    again gives the default text; _lower_tiles_vx without the new hooks is its old text."""
    body = cs.wy2p_body()
    base = cs.wy2_vx_body()
    tail = "#undef GD_ST2\n#undef GD_ST4\n"
    assert body.endswith(tail)
    back = body[: -len(tail)].replace(cs._WY2P_BEFORE, "").replace(cs._WY2P_THEN, "")
    for old, new in reversed(cs._WY2P_SWAPS):
        assert back.count(new) == 1
        back = back.replace(new, old)
    assert back == base
    assert body.count("gd_barrier();") == base.count("gd_barrier();") + 1
    assert "q_in + krow" in body and "q_in" not in base


def test_host_builds_wy_p_only_where_it_applies(recorder, monkeypatch):  # noqa: F811
    """WY_P off (producers off): FUSE_O's three passes (WY2_VX, O2P, H3O). On: two, WY2P (q as
    its last input, P [B Hv, N, C, C] in v's dtype appended, WY's bound and LDSM32's header)
    and H3O with that P; raw gates too; fp32 pieces, Metal, FUSE_O off or WY2_VX off keep the
    default passes."""
    # Round 9's switches pinned off: this test is about the passes before it.
    split_switches(
        monkeypatch, **BEFORE_ROUND9, FUSE_O=True, H3=2, O2_VX=True, WY2_VX=True, LDSM32=True
    )
    B, T, Hk, Hv, Dk, Dv = 2, 200, 2, 4, 128, 128
    q, v, g, state = zero_pieces(B, T, Hk, Hv, Dk, Dv)
    k = mx.ones((B, T, Hk, Dk), mx.bfloat16)
    cl.split_chunk_kernel("cuda", q, k, v, g, g, state, None)
    default = [n for n, _ in recorder.calls]
    assert len(default) == 3 and default[1].startswith(cs.O2P_NAME), default
    monkeypatch.setattr(cl, "WY_P", True)
    recorder.calls.clear()
    y, s = cl.split_chunk_kernel("cuda", q, k, v, g, g, state, None)
    assert y.shape == (B, T, Hv, Dv) and y.dtype == mx.bfloat16 and s.shape == state.shape
    names = [n for n, _ in recorder.calls]
    N = -(-T // C)
    lb = cl.MIN_BLOCKS["wy2p"]
    assert names == [cs.wy_name(False, True) + f"_vxp_l32_lb{lb}", default[2]], names
    wy, h3o = recorder.calls[0][1], recorder.calls[1][1]
    assert wy["inputs"][-1] is q and wy["inputs"][0] is k
    assert wy["grid"] == (cl.WY_THREADS * N, B * Hv, 1)
    assert wy["output_shapes"][-1] == (B * Hv, N, C, C)
    assert wy["output_dtypes"][-1] == mx.bfloat16
    assert h3o["inputs"][5] is q and h3o["inputs"][6].shape == (B * Hv, N, C, C)
    kw = {b["name"]: b for b in recorder.built}[names[0]]
    assert kw["input_names"] == [*cs.wy_inputs(False), "q_in"]
    assert kw["output_names"] == cs.WY2P_OUTPUTS
    assert kw["source"] == cl.wy_source("cuda", False, True, vx=True, p=True)
    assert cl.launch_bounds_header(256, cl.MIN_BLOCKS["wy2p"]) in kw["header"]
    assert cs.L32_TILES in kw["header"]
    # raw gates: the fused build
    recorder.calls.clear()
    raw = (g, g, g[0, 0], g[0, 0])
    cl.gated_delta_update_chunk_kernel(q, k, v, *raw[:2], raw[2], raw[3], state, backend="cuda")
    assert recorder.calls[0][0] == cs.wy_name(True, True) + f"_vxp_l32_lb{cl.MIN_BLOCKS['wy2p']}"
    assert len(recorder.calls) == 2
    # where it does not apply: the three passes
    for switch in ("FUSE_O", "WY2_VX"):
        monkeypatch.setattr(cl, switch, False)
        recorder.calls.clear()
        cl.split_chunk_kernel("cuda", q, k, v, g, g, state, None)
        assert recorder.calls and not any("_vxp" in n for n, _ in recorder.calls)
        monkeypatch.setattr(cl, switch, True)
    recorder.calls.clear()
    f32 = k.astype(mx.float32)
    cl.split_chunk_kernel("cuda", f32, f32, v.astype(mx.float32), g, g, state, None)
    assert not any("_vxp" in n for n, _ in recorder.calls)
    with pytest.raises(ValueError):
        cl.wy_pass("cuda", k, v, g, g, None, q=q, stamps=True)


@pytest.mark.slow  # ~10 s
@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_wy_p_compiles_for_sm90_without_spills(tmp_path):
    """WY2P (gates given and computed), bf16, Dk 128, with the header the host builds it with
    (LDSM32, WY's bound of three threadgroups an SM): no spill, within the bound's registers,
    and no more threadgroup memory than WY2_VX (q's ring is in Ai's space)."""
    pt = CTYPES["bf16"]
    lb = cl.MIN_BLOCKS["wy2"]
    head = PRELUDE + cl.header("cuda") + cs.H3_TILES + cs.L32_TILES
    head += cl.launch_bounds_header(256, lb)
    text = head
    for p in (False, True):
        for fused in (False, True):
            ins = cs.wy_inputs(fused) + (cs.WY2P_INPUTS_EXTRA if p else [])
            outs = cs.WY2P_OUTPUTS if p else cs.WY_OUTPUTS
            act = ("k", "v", "a", "b", "q_in")
            params = [
                f"const {'bool' if n == 'mask' else pt if n in act else 'float'}* {n}" for n in ins
            ]
            params += ["const __grid_constant__ Shape k_shape"]
            params += ["const __grid_constant__ Shape v_shape"]
            params += [f"{'float' if n == 'gates' else pt}* {n}" for n in outs]
            text += f"__global__ void wy{int(p)}{int(fused)}(" + ", ".join(params) + ") {\n"
            text += "  constexpr int Dk = 128, C = 64, NT = 256, DS = 32, NB = 3, MP = 1;\n"
            text += f"  using PT = {pt};\n" + cl.wy_source("cuda", fused, True, vx=True, p=p)
            text += "\n}\n"
    path = tmp_path / "wyp.cu"
    path.write_text(text)
    out = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-c", str(path), "-o", str(tmp_path / "wyp.o"),
         "-Xptxas", "-v"],  # fmt: skip
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stderr
    funcs = re.findall(r"Compiling entry function '_Z\d+(wy\d\d)", log)
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", log)]
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    smem = [int(s) for s in re.findall(r"(\d+) bytes smem", log)]
    assert len(funcs) == len(spills) == len(regs) == len(smem) == 4, log
    by = dict(zip(funcs, zip(spills, regs, smem, strict=True), strict=True))
    for fused in (0, 1):
        sp, rg, sm = by[f"wy1{fused}"]
        assert sp == 0 and rg <= 65536 // (256 * lb), log
        assert sm == by[f"wy0{fused}"][2], log


def test_ab9_mode_runs_through_on_a_recording_factory(recorder, monkeypatch):  # noqa: F811
    """chunk_split_gpu.py --ab9's checks and timings end to end on the recording factory (zeros
    for every output): WY2P built (gates given and computed), every variant compared with the
    default build, the WY pass checked alone, the passes timed, the producer builds stamped."""
    split_switches(monkeypatch, H3O_SPLIT=False)  # round 9's producer builds, not round 10's
    g = bench_on_zeros(monkeypatch)
    rows = g.ab9_checks("cuda")
    assert {r["check"] for r in rows} == {"split", "wy p pass", *g.AB9_VARIANTS}
    assert all(r["ok"] for r in rows), rows
    eq = [r["equal to default"] for r in rows if r["check"] in g.AB9_VARIANTS]
    assert eq == [True] * 2 * len(g.AB9_VARIANTS)
    built = {kw["name"] for kw in recorder.built}
    assert cs.wy_name(True, True) + f"_vxp_l32_lb{cl.MIN_BLOCKS['wy2p']}" in built
    assert f"{cs.H3O_NAME}_eyp_{cs.h3o_smem(128, cl.H3, cl.H3_NB, 2)}" in built
    assert f"{cs.H3O_NAME}_eypy_{cs.h3opy_smem(128, cl.H3, cl.H3_NB, 2)}" in built
    times = g.ab9_times("cuda", ts=(256,))
    assert set(times[0]["ms"]) >= {
        "split", "split wyp", "split prod", "split wyp prod", "wy", "wy p", "p fo", "state fo",
        "state fo prod", "split wyp prody", "state fo prody",
    }  # fmt: skip
    stamps = g.ab9_producer_stamps("cuda", ts=(256,))
    assert [r["check"] for r in stamps] == ["state fo prod", "state fo prody"]
    assert all(r["same"] for r in stamps), stamps
    built = {kw["name"] for kw in recorder.built}
    assert {n for n in built if n.endswith("_stamped")} >= {
        f"{cs.H3O_NAME}_eyp_{cs.h3o_smem(128, cl.H3, cl.H3_NB, 2)}_stamped",
        f"{cs.H3O_NAME}_eypy_{cs.h3opy_smem(128, cl.H3, cl.H3_NB, 2)}_stamped",
    }


@pytest.mark.slow  # ~1 min: ThreadSanitizer build
def test_wy_p_has_no_race_under_thread_sanitizer(tmp_path):
    """WY2P (and WY2_VX, O2P beside it) under ThreadSanitizer: q's stages in Ai's space are read
    by every warp's q k^T before L writes Ai (the barrier between them), and refilled only
    after the barrier that ends their use."""
    if GXX is None:
        pytest.skip("needs g++")
    exe = compile_emulated(_program_text(), tmp_path, timeout=900, sanitize="thread")
    io = tmp_path / "io"  # apart from the executable (named k, as an input)
    io.mkdir()
    for case in ((128, 1, 130, 1, 2, 64, False, 0.3), (32, 1, 70, 1, 2, 48, True, 0.3)):
        x = _inputs(np.random.default_rng(5), *case[:6], case[7])
        for name, a in x.items():
            (io / name).write_bytes(np.ascontiguousarray(a, np.float32).tobytes())
        run = subprocess.run(
            [str(exe), str(io), *map(str, case[:6]), str(int(case[6]))], capture_output=True,
            text=True, timeout=900,
        )  # fmt: skip
        assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, run.stderr[-3000:]
