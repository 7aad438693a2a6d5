"""Round 8's FUSE_Y (chunk_launch.FUSE_Y; CUDA, off by default): the output pass's Y = q H[n]^T
computed by the state pass (chunk_source.h3y_body) and the output pass starting from it
(o2y_body). In the lane emulator (CUDA's fragment layout): y, Vn and the final state of H3Y +
O2Y equal H3 + O2_VX's (the defaults) bit for bit, with rows past T, masked rows whose q is NaN,
value tiles past Dv, and 1, 2 and 4 warps a state-pass threadgroup; Yi is q H[n]^T (float64
check); the host builds the pair only with the switch, bf16, CUDA, and runs the split path
through them (recording factory); ptxas for sm_90 without spills (slow)."""

import re
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.conftest import RTOL, rel_err
from tests.kernels.chunk_rounds import (
    BEFORE_ROUND9,
    O2P_NAMESPACE,
    bench_on_zeros,
    h3o_pass_inputs,
    split_switches,
    zero_pieces,
)
from tests.kernels.helpers import EMULATED_IO, GXX, compile_emulated
from tests.kernels.test_chunk_cuda_source import NVCC
from tests.kernels.test_chunk_stamps import recorder  # noqa: F401  (fixture)
from tests.kernels.test_cuda_source import CTYPES, PRELUDE


@pytest.fixture(autouse=True)
def _round7_default(monkeypatch):
    """These tests were written against round 7's default (H3 + O2_VX) and set round 8's
    switches themselves; since session 12 FUSE_O / H3O_EARLY are on by default."""
    monkeypatch.setattr(cl, "FUSE_O", False)
    monkeypatch.setattr(cl, "H3O_EARLY", False)


C = cl.CHUNK
PROGRAM = (
    r"""
namespace h3 {{
template <int Dk, int BV, int C, int NT, int NB, int MP, typename PT>
void kernel(const PT* W, const PT* U, const PT* Kw, const float* gates, const float* state_in,
            const int* U_shape, PT* H, PT* Vn, float* state_out) {{
{h3}
}}
}}  // namespace h3
namespace h3y {{
template <int Dk, int BV, int C, int NT, int NB, int MP, typename PT>
void kernel(const PT* W, const PT* U, const PT* Kw, const float* gates, const float* state_in,
            const PT* q, const int* U_shape, const int* q_shape, float* Yi, PT* Vn,
            float* state_out) {{
{h3y}
}}
}}  // namespace h3y
namespace o2x {{
template <int Dk, int C, int NT, int DS, int BVO, int MP, typename YT>
void kernel(const YT* q, const YT* k, const float* gates, const YT* H, const YT* Vn,
            const int* dims, const int* q_shape, const int* Vn_shape, YT* y) {{
{o2x}
}}
}}  // namespace o2x
namespace o2y {{
template <int Dk, int C, int NT, int DS, int BVO, int MP, typename YT>
void kernel(const YT* q, const YT* k, const float* gates, const float* Yi, const YT* Vn,
            const int* dims, const int* q_shape, const int* Vn_shape, YT* y) {{
{o2y}
}}
}}  // namespace o2y
"""
    + O2P_NAMESPACE
    + r"""namespace h3o {{
template <int Dk, int BV, int C, int NT, int NB, int MP, typename PT>
void kernel(const PT* W, const PT* U, const PT* Kw, const float* gates, const float* state_in,
            const PT* q, const PT* P, const int* U_shape, const int* q_shape, PT* y,
            float* state_out) {{
{h3o}
}}
}}  // namespace h3o
namespace h3oe {{
template <int Dk, int BV, int C, int NT, int NB, int MP, typename PT>
void kernel(const PT* W, const PT* U, const PT* Kw, const float* gates, const float* state_in,
            const PT* q, const PT* P, const int* U_shape, const int* q_shape, PT* y,
            float* state_out) {{
{h3oe}
}}
}}  // namespace h3oe

// DIR Dk B T Hk Hv Dv NW NB: both pairs (H3 + O2_VX, H3Y + O2Y), bf16 pieces, MP 1
template <int Dk, int NW, int NB>
int run(const std::string& d, int B, int T, int Hk, int Hv, int Dv) {{
  using PT = bf16;
  constexpr int C = {C}, BV = 16 * NW, NT = 32 * NW, DS = Dk < 32 ? Dk : 32, BVO = 64;
  const int N = (T + C - 1) / C, BH = B * Hv;
  const size_t rows = size_t(BH) * N * C;
  auto W = read_as<PT>(d + "W"), U = read_as<PT>(d + "U"), Kw = read_as<PT>(d + "Kw");
  auto q = read_as<PT>(d + "q"), k = read_as<PT>(d + "k");
  auto gates = readf(d + "gates"), s0 = readf(d + "state_in");
  const int U_shape[3] = {{BH, N * C, Dv}}, q_shape[4] = {{B, T, Hk, Dk}};
  const int dims[2] = {{T, Hv}};
  std::vector<PT> H(size_t(BH) * N * Dv * Dk, PT(NAN)), Vn(rows * Dv, PT(NAN));
  std::vector<PT> Vn2(rows * Dv, PT(NAN)), y(size_t(B) * T * Hv * Dv, PT(NAN));
  std::vector<PT> y2(size_t(B) * T * Hv * Dv, PT(NAN));
  std::vector<float> s(size_t(BH) * Dv * Dk, NAN), s2(size_t(BH) * Dv * Dk, NAN);
  std::vector<float> Yi(size_t(BH) * N * Dv * C, NAN);
  run_blocks({{unsigned(BH), unsigned(Dv / BV), 1}}, NT, [&] {{
    h3::kernel<Dk, BV, C, NT, NB, 1, PT>(W.data(), U.data(), Kw.data(), gates.data(),
                                         s0.data(), U_shape, H.data(), Vn.data(), s.data());
  }});
  const unsigned VB = unsigned((Dv + BVO - 1) / BVO);
  run_blocks({{unsigned(N), unsigned(BH), VB}}, 256, [&] {{
    o2x::kernel<Dk, C, 256, DS, BVO, 1, PT>(q.data(), k.data(), gates.data(), H.data(),
                                            Vn.data(), dims, q_shape, U_shape, y.data());
  }});
  run_blocks({{unsigned(BH), unsigned(Dv / BV), 1}}, NT, [&] {{
    h3y::kernel<Dk, BV, C, NT, NB, 1, PT>(W.data(), U.data(), Kw.data(), gates.data(),
                                          s0.data(), q.data(), U_shape, q_shape, Yi.data(),
                                          Vn2.data(), s2.data());
  }});
  run_blocks({{unsigned(N), unsigned(BH), VB}}, 256, [&] {{
    o2y::kernel<Dk, C, 256, DS, BVO, 1, PT>(q.data(), k.data(), gates.data(), Yi.data(),
                                            Vn2.data(), dims, q_shape, U_shape, y2.data());
  }});
  write(d + "H", H); write(d + "Vn", Vn); write(d + "state_out", s); write(d + "y", y);
  write(d + "Yi", Yi); write(d + "Vn2", Vn2); write(d + "state_out2", s2); write(d + "y2", y2);
  // FUSE_O: P, then the state pass making y
  std::vector<PT> P(size_t(BH) * N * C * C, PT(NAN)), y3(size_t(B) * T * Hv * Dv, PT(NAN));
  std::vector<float> s3(size_t(BH) * Dv * Dk, NAN);
  run_blocks({{unsigned(N), unsigned(BH), 1}}, 256, [&] {{
    o2p::kernel<Dk, C, 256, DS, BVO, 1, PT>(q.data(), k.data(), gates.data(), dims, q_shape,
                                            P.data());
  }});
  run_blocks({{unsigned(BH), unsigned(Dv / BV), 1}}, NT, [&] {{
    h3o::kernel<Dk, BV, C, NT, NB, 1, PT>(W.data(), U.data(), Kw.data(), gates.data(),
                                          s0.data(), q.data(), P.data(), U_shape, q_shape,
                                          y3.data(), s3.data());
  }});
  write(d + "P", P); write(d + "y3", y3); write(d + "state_out3", s3);
  // H3O_EARLY: the same with Y^T issued behind Xw^T
  std::vector<PT> y4(size_t(B) * T * Hv * Dv, PT(NAN));
  std::vector<float> s4(size_t(BH) * Dv * Dk, NAN);
  run_blocks({{unsigned(BH), unsigned(Dv / BV), 1}}, NT, [&] {{
    h3oe::kernel<Dk, BV, C, NT, NB, 1, PT>(W.data(), U.data(), Kw.data(), gates.data(),
                                           s0.data(), q.data(), P.data(), U_shape, q_shape,
                                           y4.data(), s4.data());
  }});
  write(d + "y4", y4); write(d + "state_out4", s4);
  return 0;
}}

int main(int argc, char** argv) {{
  const std::string d = std::string(argv[1]) + "/";
  const int Dk = std::stoi(argv[2]), B = std::stoi(argv[3]), T = std::stoi(argv[4]);
  const int Hk = std::stoi(argv[5]), Hv = std::stoi(argv[6]), Dv = std::stoi(argv[7]);
  const int nw = std::stoi(argv[8]), nb = std::stoi(argv[9]);
#define CASE(DK_, NW_, NB_) \
  if (Dk == DK_ && nw == NW_ && nb == NB_) return run<DK_, NW_, NB_>(d, B, T, Hk, Hv, Dv);
  CASE(128, 2, 2) CASE(128, 4, 2) CASE(128, 1, 3) CASE(32, 2, 2)
  return 1;
}}
"""
)


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    if GXX is None:
        pytest.skip("needs g++")
    text = EMULATED_IO + PROGRAM.format(
        h3=cl.h3_source("cuda"),
        h3y=cl.h3y_source("cuda"),
        o2x=cl.o2_vx_source("cuda", True, 3),
        o2y=cl.o2y_source("cuda"),
        o2p=cl.o2p_source("cuda"),
        h3o=cl.h3o_source("cuda"),
        h3oe=cl.h3o_source("cuda", True),
        C=C,
    )
    return compile_emulated(text, tmp_path_factory.mktemp("chunk_fuse_y"), timeout=900)


def _bf16(x) -> np.ndarray:
    return np.asarray(mx.array(np.asarray(x, np.float32)).astype(mx.bfloat16).astype(mx.float32))


def _inputs(rng, Dk, B, T, Hk, Hv, Dv, nan_q: bool):
    """W, U, Kw (bf16 values), gates (gamma, step decay, valid, 0), state_in, q, k: rows past T
    and a hole of masked steps invalid; where nan_q, those steps' q and k are NaN (the output
    pass must select them away, as it does padded slots)."""
    N = -(-T // C)
    rows = B * Hv * N * C
    W = _bf16(rng.standard_normal((rows, Dk)) * 0.5 / np.sqrt(Dk))
    U = _bf16(rng.standard_normal((rows, Dv)))
    Kw = _bf16(rng.standard_normal((rows, Dk)) * 0.5 / np.sqrt(C))
    a = rng.uniform(0.3, 1.0, (B * Hv, N, C))
    valid = np.zeros((B, N * C), bool)
    valid[:, :T] = True
    valid[:, T // 3 : T // 3 + 5] = False  # a hole
    ok = np.broadcast_to(valid[:, None], (B, Hv, N * C)).reshape(B * Hv, N, C)
    a = np.where(ok, a, 1.0)
    gates = np.zeros((B * Hv, N, C, 4), np.float32)
    gates[..., 0] = np.cumprod(a, axis=-1)
    gates[..., 1] = a
    gates[..., 2] = ok
    s0 = rng.standard_normal((B, Hv, Dv, Dk)).astype(np.float32)
    q = _bf16(rng.standard_normal((B, T, Hk, Dk)) / np.sqrt(Dk))
    k = _bf16(rng.standard_normal((B, T, Hk, Dk)) / np.sqrt(Dk))
    if nan_q:
        hole = ~valid[:, :T]
        q[hole] = np.nan
        k[hole] = np.nan
    pieces = dict(W=W, U=U, Kw=Kw, gates=gates.reshape(rows, 4), state_in=s0, q=q, k=k)
    return pieces, valid


CASES = [
    # (Dk, B, T, Hk, Hv, Dv, NW, NB, nan_q)
    (128, 1, 200, 1, 2, 64, 2, 2, False),
    (128, 2, 150, 1, 2, 96, 2, 2, True),  # O2's second value tile past Dv
    (128, 1, 130, 2, 4, 64, 4, 2, True),
    (128, 1, 64, 1, 1, 32, 1, 3, False),
    (32, 2, 100, 1, 2, 32, 2, 2, True),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "Dk{}B{}T{}Hk{}Hv{}Dv{}nw{}nb{}nan{}".format(*c)
)
def test_fuse_y_equals_default(program, tmp_path, case):
    """H3Y + O2Y: y, Vn and the state equal H3 + O2_VX's bit for bit; Yi is q H[n]^T (H[n] the
    default pass's, float64 products, fp32's tolerance) on every valid row."""
    Dk, B, T, Hk, Hv, Dv, nw, nb, nan_q = case
    pieces, valid = _inputs(np.random.default_rng(sum(map(hash, case)) % 2**32), *case[:6], nan_q)
    for name, x in pieces.items():
        (tmp_path / name).write_bytes(np.ascontiguousarray(x, np.float32).tobytes())
    args = [str(program), str(tmp_path), *map(str, case[:8])]
    subprocess.run(args, check=True, timeout=600)
    N, BH = -(-T // C), B * Hv

    def get(name, shape):
        return np.fromfile(tmp_path / name, np.float32).reshape(shape)

    y, y2 = get("y", (B, T, Hv, Dv)), get("y2", (B, T, Hv, Dv))
    Vn, Vn2 = get("Vn", (BH, N * C, Dv)), get("Vn2", (BH, N * C, Dv))
    s, s2 = get("state_out", (BH, Dv, Dk)), get("state_out2", (BH, Dv, Dk))
    y3, s3 = get("y3", (B, T, Hv, Dv)), get("state_out3", (BH, Dv, Dk))
    y4, s4 = get("y4", (B, T, Hv, Dv)), get("state_out4", (BH, Dv, Dk))
    for name, got, want in (
        ("y", y2, y),
        ("Vn", Vn2, Vn),
        ("state", s2, s),
        ("FUSE_O y", y3, y),
        ("FUSE_O state", s3, s),
        ("H3O_EARLY y", y4, y),
        ("H3O_EARLY state", s4, s),
    ):
        assert np.isfinite(want).all(), name
        assert np.array_equal(got, want), (name, np.nanmax(np.abs(got - want)))
    # Yi = q H[n]^T on valid rows (rows past T read row T - 1; masked rows' q may be NaN)
    H = get("H", (BH, N, Dv, Dk)).astype(np.float64)
    Yi = get("Yi", (BH, N, Dv, C))
    q = pieces["q"].astype(np.float64)
    for bh in range(BH):
        b, hv = divmod(bh, Hv)
        hk = hv // (Hv // Hk)
        qp = np.concatenate([q[b, :, hk], np.repeat(q[b, -1:, hk], N * C - T, axis=0)])
        want = np.einsum("ntk,nvk->nvt", qp.reshape(N, C, Dk), H[bh])
        sel = np.broadcast_to(valid[b].reshape(N, 1, C), want.shape)
        assert rel_err(Yi[bh][sel], want[sel]) < RTOL[mx.float32]


def test_host_builds_fuse_y_only_where_it_applies(recorder, monkeypatch):  # noqa: F811
    """FUSE_Y off: H3 + O2_VX (no H3Y / O2Y build). On: H3Y with q as its sixth input, the
    ring's bytes (q rows added) of dynamic shared memory, Yi fp32 [B Hv, N, Dv, C]; O2Y with Yi
    in H's place, O2's tiles and bound; fp32 pieces keep the default passes."""
    B, T, Hk, Hv, Dk, Dv = 1, 200, 2, 4, 128, 128
    q, v, g, state = zero_pieces(B, T, Hk, Hv, Dk, Dv)
    cl.split_chunk_kernel("cuda", q, q, v, g, g, state, None)
    names = [kw["name"] for kw in recorder.built]
    assert not any(n.startswith((cs.H3Y_NAME, cs.O2Y_NAME)) for n in names), names
    assert any(n.startswith(cs.H3_NAME + "_") for n in names), names
    monkeypatch.setattr(cl, "FUSE_Y", True)
    monkeypatch.setattr(cl, "_kernels", {})
    recorder.built.clear()
    recorder.calls.clear()
    cl.split_chunk_kernel("cuda", q, q, v, g, g, state, None)
    nw, N = cl.H3, -(-T // C)
    smem = cs.h3y_smem(Dk, nw, cl.H3_NB, 2)
    assert smem == cs.h3_smem(Dk, nw, cl.H3_NB, 2) + cl.H3_NB * C * (Dk + 8) * 2
    by = {kw["name"].split("_lb")[0]: kw for kw in recorder.built}
    h3y = by[f"{cs.H3Y_NAME}_{smem}"]
    assert h3y["shared_memory"] == smem and "gd_mma_rows" in h3y["header"]
    assert h3y["input_names"] == cs.H3Y_INPUTS and h3y["output_names"] == cs.H3Y_OUTPUTS
    assert h3y["source"] == cl.h3y_source("cuda")
    o2y = by[cs.O2Y_NAME + ("_l32" if cl.LDSM32 else "")]
    assert o2y["input_names"] == cs.O2Y_INPUTS and o2y["source"] == cl.o2y_source("cuda")
    assert o2y["name"].endswith(f"_lb{cl.MIN_BLOCKS['o2']}")
    assert cl.launch_bounds_header(256, cl.MIN_BLOCKS["o2"]) in o2y["header"]
    assert [n.split("_lb")[0] for n, _ in recorder.calls][1:] == list(by)[1:]
    call = dict(recorder.calls)[h3y["name"]]
    assert call["output_shapes"][0] == (B * Hv, N, Dv, C)
    assert call["output_dtypes"][0] == mx.float32
    assert call["grid"] == (32 * nw * B * Hv, Dv // (16 * nw), 1)
    assert call["inputs"][5] is q
    call = dict(recorder.calls)[o2y["name"]]
    assert call["grid"] == (cl.O_THREADS * N, B * Hv, Dv // 64)
    assert dict(call["template"])["BVO"] == 64 and dict(call["template"])["DS"] == 32
    # fp32 pieces: the default passes
    recorder.calls.clear()
    f32 = q.astype(mx.float32)
    cl.split_chunk_kernel("cuda", f32, f32, v.astype(mx.float32), g, g, state, None)
    assert not any(n.startswith((cs.H3Y_NAME, cs.O2Y_NAME)) for n, _ in recorder.calls)


def test_fuse_y_text_is_the_default_with_named_swaps():
    """h3y_body / o2y_body are H3_BODY / O2_VX's text with their swaps; undoing the swaps gives
    the default text back (nothing else changed)."""
    for body, swaps, base in (
        (cs.h3y_body(), cs._H3Y_SWAPS, cs.H3_BODY),
        (cs.o2y_body(), cs._O2Y_SWAPS, cs.o2_vx_body(True, 3)),
    ):
        back = body
        for old, new in reversed(swaps):
            if new:
                assert back.count(new) == 1
                back = back.replace(new, old)
        # removed pieces: the text with them removed from the default equals the variant's
        stripped = base
        for old, new in swaps:
            stripped = stripped.replace(old, new)
        assert stripped == body
        # neither reads nor writes H any more (no address made from it)
        assert re.search(r"\bH \+", base) and not re.search(r"\bH \+", body)


@pytest.mark.slow  # ~60 s
@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_fuse_y_compiles_for_sm90_without_spills(tmp_path):
    """H3Y, H3O and H3O_EARLY's H3O (2 and 4 warps), O2Y and O2P (O2's bound: three
    threadgroups an SM) and H3O's stamped build through ptxas for sm_90 (bf16, Dk 128, with the
    default header and L32_TILES as the host builds them): no spill, at most 255 registers."""
    pt, sh = CTYPES["bf16"], "const __grid_constant__ Shape"
    h_params = [f"const {pt}* W", f"const {pt}* U", f"{sh} U_shape", f"const {pt}* Kw",
                "const float* gates", "const float* state_in", f"const {pt}* q",
                f"{sh} q_shape", "float* Yi", f"{pt}* Vn", "float* state_out"]  # fmt: skip
    o_params = [f"const {pt}* q", f"{sh} q_shape", f"const {pt}* k", "const float* gates",
                "const float* Yi", f"const {pt}* Vn", f"{sh} Vn_shape", "const int* dims",
                f"{pt}* y"]  # fmt: skip
    text = PRELUDE + cl.header("cuda") + cs.H3_TILES
    for nw in (2, 4):
        consts = (f"  constexpr int Dk = 128, BV = {16 * nw}, C = 64, NT = {32 * nw}, NB = 2, "
                  f"MP = 1;\n  using PT = {pt};\n")  # fmt: skip
        text += f"__global__ void h3y{nw}(" + ", ".join(h_params) + ") {\n" + consts
        text += cl.h3y_source("cuda") + "\n}\n"
        ho = [*h_params[:8], f"const {pt}* P", f"{pt}* y", "float* state_out"]
        text += f"__global__ void h3o{nw}(" + ", ".join(ho) + ") {\n" + consts
        text += cl.h3o_source("cuda") + "\n}\n"
        text += f"__global__ void h3oe{nw}(" + ", ".join(ho) + ") {\n" + consts
        text += cl.h3o_source("cuda", True) + "\n}\n"
        if nw == 2:  # the stamped build --ab8 runs
            text += "__global__ void h3os(" + ", ".join([*ho, "uint32_t* stamps"]) + ") {\n"
            text += consts + cs.stamped(cl.h3o_source("cuda"), cs.H3O_STAMPS) + "\n}\n"
    text += cs.L32_TILES + cl.launch_bounds_header(256, cl.MIN_BLOCKS["o2"])
    consts = ("  constexpr int Dk = 128, C = 64, NT = 256, DS = 32, BVO = 64, MP = 1;\n"
              f"  using YT = {pt};\n")  # fmt: skip
    text += "__global__ void o2y(" + ", ".join(o_params) + ") {\n" + consts
    text += cl.o2y_source("cuda") + "\n}\n"
    op = [*o_params[:4], "const int* dims", f"{pt}* P"]
    text += "__global__ void o2p(" + ", ".join(op) + ") {\n" + consts
    text += cl.o2p_source("cuda") + "\n}\n"
    path = tmp_path / "fy.cu"
    path.write_text(text)
    out = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-c", str(path), "-o", str(tmp_path / "fy.o"),
         "-Xptxas", "-v"],  # fmt: skip
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    spills = re.findall(r"(\d+) bytes spill stores", out.stderr)
    assert len(spills) == 9 and all(s == "0" for s in spills), out.stderr
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", out.stderr)]
    assert len(regs) == 9 and max(regs) <= 255, out.stderr


@pytest.mark.slow  # ~1-2 min: ThreadSanitizer build
def test_fuse_y_has_no_race_under_thread_sanitizer(tmp_path):
    """H3Y + O2Y and O2P + H3O (and the default pair beside them) under ThreadSanitizer: no two
    threads touch one address, one of them writing, without a barrier or __syncwarp between
    them (H3Y reads Sb for Y^T after the update's products and before the new state's stores;
    H3O's lanes write y^T to Yb and read it back as rows)."""
    if GXX is None:
        pytest.skip("needs g++")
    text = EMULATED_IO + PROGRAM.format(
        h3=cl.h3_source("cuda"),
        h3y=cl.h3y_source("cuda"),
        o2x=cl.o2_vx_source("cuda", True, 3),
        o2y=cl.o2y_source("cuda"),
        o2p=cl.o2p_source("cuda"),
        h3o=cl.h3o_source("cuda"),
        h3oe=cl.h3o_source("cuda", True),
        C=C,
    )
    exe = compile_emulated(text, tmp_path, timeout=900, sanitize="thread")
    io = tmp_path / "io"  # apart from the executable (named k, as an input)
    io.mkdir()
    case = (128, 1, 130, 1, 2, 64, 2, 2)
    pieces, _ = _inputs(np.random.default_rng(3), *case[:6], True)
    for name, x in pieces.items():
        (io / name).write_bytes(np.ascontiguousarray(x, np.float32).tobytes())
    run = subprocess.run(
        [str(exe), str(io), *map(str, case)], capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, run.stderr[-3000:]


def test_ab8_mode_runs_through_on_a_recording_factory(recorder, monkeypatch):  # noqa: F811
    """chunk_split_gpu.py --ab8's checks and timings end to end on the recording factory (zeros
    for every output): H3Y (2 and 4 warps) and O2Y (bounds 3 and 4) built, every variant compared
    with the default build, the passes checked alone, and timed."""
    # Round 9's switches pinned off: this test is about the passes before it.
    split_switches(monkeypatch, **BEFORE_ROUND9, H3_NB=2)
    g = bench_on_zeros(monkeypatch)
    rows = g.ab8_checks("cuda")
    assert {r["check"] for r in rows} == {"split", "fy passes", *g.AB8_VARIANTS}
    assert all(r["ok"] for r in rows), rows
    eq = [r["equal to default"] for r in rows if r["check"] in g.AB8_VARIANTS]
    assert eq == [True] * 2 * len(g.AB8_VARIANTS)
    built = {kw["name"] for kw in recorder.built}
    for nw in (2, 4):
        assert f"{cs.H3Y_NAME}_{cs.h3y_smem(128, nw, cl.H3_NB, 2)}" in built
    assert cs.O2Y_NAME + "_l32_lb3" in built and cs.O2Y_NAME + "_l32_lb4" in built
    assert cs.O2P_NAME + "_l32_lb3" in built
    for nw, nb in ((2, 2), (4, 2), (2, 3)):
        assert f"{cs.H3O_NAME}_{cs.h3o_smem(128, nw, nb, 2)}" in built
    assert cs.h3o_smem(128, 2, 3, 2) <= 227 * 1024  # the H200's most a threadgroup
    times = g.ab8_times("cuda", ts=(256,))
    assert set(times[0]["ms"]) >= {
        "split", "split fy", "split fy lb4", "split fy h3w4", "state", "state fy", "out",
        "out fy", "out fy lb4", "split fo", "split fo h3w4", "split fo nb3", "split fo early",
        "p fo", "state fo", "state fo early",
    }  # fmt: skip


def test_host_builds_fuse_o(recorder, monkeypatch):  # noqa: F811
    """FUSE_O on (FUSE_Y too: FUSE_O takes precedence): the WY pass, O2P (q, k, gates, dims; P
    [B Hv, N, C, C] in the pieces' type; a threadgroup a chunk and head; O2's bound) and H3O (P
    as its seventh input, the ring's bytes with P's rows and the gates, y and the state out); no
    H3Y / O2Y, no output pass."""
    # Round 9's switches pinned off: this test is about the passes before it.
    split_switches(monkeypatch, **BEFORE_ROUND9, FUSE_Y=True, FUSE_O=True)
    B, T, Hk, Hv, Dk, Dv = 2, 200, 2, 4, 128, 128
    q, v, g, state = zero_pieces(B, T, Hk, Hv, Dk, Dv)
    y, s = cl.split_chunk_kernel("cuda", q, q, v, g, g, state, None)
    assert y.shape == (B, T, Hv, Dv) and y.dtype == mx.bfloat16 and s.shape == state.shape
    names = [n for n, _ in recorder.calls]
    assert len(names) == 3 and names[0].startswith(cs.wy_name(False, True))
    nw, N = cl.H3, -(-T // C)
    smem = cs.h3o_smem(Dk, nw, cl.H3_NB, 2)
    assert smem == cs.h3y_smem(Dk, nw, cl.H3_NB, 2) + cl.H3_NB * (C * 72 * 2 + C * 16) + nw * C * 48
    assert names[1] == cs.O2P_NAME + ("_l32" if cl.LDSM32 else "") + f"_lb{cl.MIN_BLOCKS['o2']}"
    assert names[2] == f"{cs.H3O_NAME}_{smem}"
    p_call, h_call = recorder.calls[1][1], recorder.calls[2][1]
    assert p_call["grid"] == (cl.O_THREADS * N, B * Hv, 1)
    assert p_call["output_shapes"] == [(B * Hv, N, C, C)]
    assert p_call["output_dtypes"] == [mx.bfloat16]
    assert h_call["inputs"][5] is q and h_call["inputs"][6].shape == (B * Hv, N, C, C)
    assert h_call["grid"] == (32 * nw * B * Hv, Dv // (16 * nw), 1)
    kw = {k["name"]: k for k in recorder.built}
    assert kw[names[1]]["input_names"] == cs.O2P_INPUTS
    assert kw[names[1]]["source"] == cl.o2p_source("cuda")
    assert kw[names[2]]["input_names"] == cs.H3O_INPUTS and kw[names[2]]["shared_memory"] == smem
    assert (
        kw[names[2]]["source"] == cl.h3o_source("cuda") and "gd_mma_rows" in kw[names[2]]["header"]
    )


def test_h3o_stamped_build(recorder, monkeypatch):  # noqa: F811
    """h3o_pass(stamps=True): H3O's text with the stamps of H3O_STAMPS (each anchor once; without
    them the plain text), its header, dynamic shared memory and the extra output."""
    # Round 9's switches pinned off: this test is about the passes before it.
    split_switches(monkeypatch, **BEFORE_ROUND9)
    args, (B, Hv, Dk, Dv) = h3o_pass_inputs()
    *_, st = cl.h3o_pass(*args, 2, stamps=True)
    assert st.shape == (B * Hv * Dv // 32, cs.STAMP_SLOTS) and st.dtype == mx.uint32
    kw = recorder.built[-1]
    smem = cs.h3o_smem(Dk, 2, cl.H3_NB, 2)
    assert kw["name"] == f"{cs.H3O_NAME}_{smem}_stamped" and kw["shared_memory"] == smem
    assert cs.unstamped(kw["source"]) == cl.h3o_source("cuda") and "gd_mma_rows" in kw["header"]
    assert kw["output_names"] == [*cs.H3O_OUTPUTS, cs.STAMP_OUTPUT]
    got = sorted(int(x) for x in re.findall(r"GD_STAMP\((\d+)\)", kw["source"]))
    assert got == list(range(3, 4 + len(cs.H3O_STAMPS)))
