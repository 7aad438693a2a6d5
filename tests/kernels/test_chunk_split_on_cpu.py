"""The split chunk path's kernel bodies (chunk_source.WY_BODY, H_BODY, O_BODY with the CUDA
prologue: the text the CUDA and, with the Metal prologue, the Metal builds compile) run on the
CPU by tests/kernels/lane_emulator.h in block mode, the tile layer emulated with CUDA's fragment
layout and tf32 roundings.

Checked against the float64 NumPy loop (y and the final state) and the MLX-ops pieces (W, U,
Kw): the shapes, masks (left padding, a hole, right padding), g = 0, strong decays and garbage in
padded slots of test_chunk_kernel_on_cpu.py, for each tile configuration the host picks (Metal's
and CUDA's slices and value tiles, the state pass at 16 and 32 value rows) with MP 3 and fp32
pieces (fp32's tolerance), and with bf16 pieces and MP 1 (bf16's tolerance, not fp32's); the
host launch (input order, template arguments, grids) with the emulator behind the kernel
factory, gates precomputed and computed in the WY kernel. Outputs start as NaN, so an element
the kernels fail to write fails the comparison.
"""

import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from qwen35_mlx.kernels.gated_delta import compute_gates
from tests.conftest import RTOL, rel_err
from tests.kernels.helpers import (
    EMULATOR,
    GXX,
    compile_emulated,
    cpu_device,  # noqa: F401  (fixture)
    gated_delta_np,
    make_gate_inputs,
    make_inputs,
)
from tests.kernels.test_chunk_kernel_on_cpu import CASES, DK, SHAPES, _mask

pytestmark = [
    pytest.mark.skipif(GXX is None, reason="needs g++"),
    pytest.mark.usefixtures("cpu_device"),
]
C = cl.CHUNK
TOL = RTOL[mx.float32]
TOL_BF16 = RTOL[mx.bfloat16]

# Tile configurations: (piece type, MP, state-pass BV, state-pass (key slice, ring) at Dk 128,
# O slice, O value rows). The state pass's tiles are those the host picks for that backend and
# piece type (chunk_launch.h_tiles), and a ring of three (CUDA's pick at Dk 256, bf16).
CFGS = {
    "metal": ("float", 3, 16, cl.h_tiles("metal", 128, 16, 4), cl.O_SLICE["metal"],
              cl.O_BV["metal"]),
    "cuda": ("float", 3, 16, cl.h_tiles("cuda", 128, 16, 4), cl.O_SLICE["cuda"], cl.O_BV["cuda"]),
    "cuda_bv32": ("float", 3, 32, cl.h_tiles("cuda", 128, 32, 4), cl.O_SLICE["cuda"],
                  cl.O_BV["cuda"]),
    "cuda_bf16": ("bf16", 1, 16, cl.h_tiles("cuda", 128, 16, 2), cl.O_SLICE["cuda"],
                  cl.O_BV["cuda"]),
    "cuda_ring3": ("float", 3, 16, (64, 3), cl.O_SLICE["cuda"], cl.O_BV["cuda"]),
    "cuda_bf16_w64": ("bf16", 1, 16, cl.h_tiles("cuda", 128, 16, 2), cl.O_SLICE["cuda"],
                      cl.O_BV["cuda"]),
    # the state pass's ring of three whole key rows (chunk_launch.H2_DYN's (128, 3))
    "cuda_bf16_r3": ("bf16", 1, 16, (128, 3), cl.O_SLICE["cuda"], cl.O_BV["cuda"]),
}  # fmt: skip
# WY2_BODY's (slice, ring) where a configuration departs from the host's WY2_TILES: slices of 64
# (two output tiles a warp), as chunk_split_gpu.py --ab times them.
WY2_CFG = {"cuda_bf16_w64": (64, 2)}

# WY2_BODY and its 16-byte-store variant (chunk_source.wy2_v16_body), each with raw and fused
# gates: one kernel signature a gate form, a namespace a build (PROGRAM's {wy2} ... slots).
WY2_NAMESPACES = ("wy2", "wy2_fused", "wy2v", "wy2v_fused", "wy2x", "wy2x_fused")
_WY2_SIGS = (
    "void kernel(const PT* k, const PT* v, const float* g, const float* beta, const bool* mask,\n"
    "            const int* k_shape, const int* v_shape, PT* W, PT* U, PT* Kw, float* gates)",
    "void kernel(const PT* k, const PT* v, const float* a, const float* b, const float* A_log,\n"
    "            const float* dt_bias, const bool* mask, const int* k_shape, const int* v_shape,\n"
    "            PT* W, PT* U, PT* Kw, float* gates)",
)


_WY2_TEMPLATE = "template <int Dk, int C, int NT, int DS, int NB, int MP, typename PT>"
_H_TEMPLATE = (
    "template <int Dk, int BV, int C, int NT, int DS, int NB, int MP, int PF, typename PT>"
)
_H_SIG = (
    "void kernel(const PT* W, const PT* U, const PT* Kw, const float* gates,\n"
    "            const float* state_in, const int* U_shape, PT* H, PT* Vn, float* state_out)"
)
_O2_TEMPLATE = "template <int Dk, int C, int NT, int DS, int BVO, int MP, typename YT>"
_O2_SIG = """void kernel(const YT* q, const YT* k, const float* gates, const YT* H, const YT* Vn,
            const int* dims, const int* q_shape, const int* Vn_shape, YT* y)"""


def _namespace(name: str, signature: str, template: str = _WY2_TEMPLATE) -> str:
    """A build's namespace in PROGRAM's format text (braces doubled, its body's slot)."""
    return (
        f"namespace {name} {{{{\n{template}\n"
        f"{signature} {{{{\n{{{name}}}\n}}}}\n}}}}  // namespace {name}\n"
    )


PROGRAM = (
    r"""
#include "{emulator}"
#include <fstream>
#include <iterator>
#include <string>

std::vector<char> read(const std::string& path) {{
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}}
template <typename X>
const X* as(const std::vector<char>& v) {{ return reinterpret_cast<const X*>(v.data()); }}
template <typename X>
void write(const std::string& path, const std::vector<X>& x) {{
  std::vector<float> f(x.begin(), x.end());
  std::ofstream(path, std::ios::binary).write((const char*)f.data(), f.size() * 4);
}}
template <typename X>
std::vector<X> read_as(const std::string& path) {{
  auto raw = read(path);
  const float* f = as<float>(raw);
  std::vector<X> x;
  for (size_t i = 0; i < raw.size() / 4; ++i) x.push_back(X(f[i]));
  return x;
}}

namespace wy {{
template <int Dk, int C, int NT, int DS, int MP, typename PT>
void kernel(const float* k, const float* v, const float* g, const float* beta, const bool* mask,
            const int* k_shape, const int* v_shape, PT* W, PT* U, PT* Kw, float* gates) {{
{wy}
}}
}}  // namespace wy

namespace wy_fused {{
template <int Dk, int C, int NT, int DS, int MP, typename PT>
void kernel(const float* k, const float* v, const float* a, const float* b, const float* A_log,
            const float* dt_bias, const bool* mask, const int* k_shape, const int* v_shape,
            PT* W, PT* U, PT* Kw, float* gates) {{
{wy_fused}
}}
}}  // namespace wy_fused

"""
    + "\n".join(_namespace(n, _WY2_SIGS[n.endswith("_fused")]) for n in WY2_NAMESPACES)
    + "\n"
    + "\n".join(_namespace(n, _H_SIG, _H_TEMPLATE) for n in ("h", "h2", "h2x", "h2xd"))
    + r"""
namespace o {{
template <int Dk, int C, int NT, int DS, int BVO, int MP, typename YT, typename PT>
void kernel(const float* q, const float* k, const float* gates, const PT* H, const PT* Vn,
            const int* dims, const int* q_shape, const int* Vn_shape, YT* y) {{
{o}
}}
}}  // namespace o

"""
    + "\n".join(_namespace(n, _O2_SIG, _O2_TEMPLATE) for n in ("o2", "o2x"))
    + r"""

template <int Dk, typename PT, int MP, int BV, int HDS, int HNB, int ODS, int BVO, int O2DS,
          int O2BVO, int WDS, int WNB>
void run(char** argv) {{
  const std::string what = argv[1], d = std::string(argv[2]) + "/";
  constexpr int C = {C};
  const int B = std::stoi(argv[4]), T = std::stoi(argv[5]), Hk = std::stoi(argv[6]);
  const int Hv = std::stoi(argv[7]), Dv = std::stoi(argv[8]);
  const int N = (T + C - 1) / C, BH = B * Hv;
  const size_t rows = size_t(BH) * N * C;
  const int k_shape[4] = {{B, T, Hk, Dk}}, v_shape[4] = {{B, T, Hv, Dv}};
  if (what.rfind("wy", 0) == 0) {{
    const bool fused = what.size() > 6 && what.substr(what.size() - 6) == "_fused";
    const bool ring = what.rfind("wy2", 0) == 0;
    const bool v16 = what.rfind("wy2v", 0) == 0;
    const bool vx = what.rfind("wy2x", 0) == 0;
    auto k = read(d + "k"), v = read(d + "v"), mask = read(d + "mask");
    auto g = read(d + (fused ? "a" : "g")), beta = read(d + (fused ? "b" : "beta"));
    auto A_log = fused ? read(d + "A_log") : g, dt_bias = fused ? read(d + "dt_bias") : g;
    std::vector<PT> W(rows * Dk, PT(NAN)), U(rows * Dv, PT(NAN)), Kw(rows * Dk, PT(NAN));
    std::vector<float> gates(rows * 4, NAN);
    // WY2_BODY copies k, v raw into its PT ring: they come in PT (as the host passes them)
    auto kp = read_as<PT>(d + "k"), vp = read_as<PT>(d + "v");
    run_blocks({{unsigned(N), unsigned(BH), 1}}, {wy_threads}, [&] {{
      // a WY2 build (plain or 16-byte stores), raw or fused gates: the same arguments
      auto ring_call = [&](auto plain, auto with_gates) {{
        if (fused) {{
          with_gates(kp.data(), vp.data(), as<float>(g), as<float>(beta), as<float>(A_log),
                     as<float>(dt_bias), as<bool>(mask), k_shape, v_shape, W.data(), U.data(),
                     Kw.data(), gates.data());
        }} else {{
          plain(kp.data(), vp.data(), as<float>(g), as<float>(beta), as<bool>(mask), k_shape,
                v_shape, W.data(), U.data(), Kw.data(), gates.data());
        }}
      }};
      if (vx) {{
        ring_call(&wy2x::kernel<Dk, C, {wy_threads}, WDS, WNB, MP, PT>,
                  &wy2x_fused::kernel<Dk, C, {wy_threads}, WDS, WNB, MP, PT>);
      }} else if (v16) {{
        ring_call(&wy2v::kernel<Dk, C, {wy_threads}, WDS, WNB, MP, PT>,
                  &wy2v_fused::kernel<Dk, C, {wy_threads}, WDS, WNB, MP, PT>);
      }} else if (ring) {{
        ring_call(&wy2::kernel<Dk, C, {wy_threads}, WDS, WNB, MP, PT>,
                  &wy2_fused::kernel<Dk, C, {wy_threads}, WDS, WNB, MP, PT>);
      }} else if (fused) {{
        wy_fused::kernel<Dk, C, {wy_threads}, {wy_slice}, MP, PT>(as<float>(k), as<float>(v),
            as<float>(g), as<float>(beta), as<float>(A_log), as<float>(dt_bias), as<bool>(mask),
            k_shape, v_shape, W.data(), U.data(), Kw.data(), gates.data());
      }} else {{
        wy::kernel<Dk, C, {wy_threads}, {wy_slice}, MP, PT>(as<float>(k), as<float>(v),
            as<float>(g), as<float>(beta), as<bool>(mask), k_shape, v_shape, W.data(), U.data(),
            Kw.data(), gates.data());
      }}
    }});
    write(d + "W", W); write(d + "U", U); write(d + "Kw", Kw); write(d + "gates", gates);
  }} else if (what == "h" || what == "h2" || what == "h2x" || what == "h2xd") {{
    auto W = read_as<PT>(d + "W"), U = read_as<PT>(d + "U"), Kw = read_as<PT>(d + "Kw");
    auto gates = read(d + "gates"), s0 = read(d + "state_in");
    const int U_shape[3] = {{BH, N * C, Dv}};
    std::vector<PT> H(size_t(BH) * N * Dv * Dk, PT(NAN)), Vn(rows * Dv, PT(NAN));
    std::vector<float> s(size_t(BH) * Dv * Dk, NAN);
    constexpr int NT = 32 * (C / 16) * (BV / 16);
    run_blocks({{unsigned(BH), unsigned((Dv + BV - 1) / BV), 1}}, NT, [&] {{
      if (what == "h2xd") {{
        h2xd::kernel<Dk, BV, C, NT, HDS, HNB, MP, 1, PT>(W.data(), U.data(), Kw.data(),
            as<float>(gates), as<float>(s0), U_shape, H.data(), Vn.data(), s.data());
      }} else if (what == "h2x") {{
        h2x::kernel<Dk, BV, C, NT, HDS, HNB, MP, 1, PT>(W.data(), U.data(), Kw.data(),
            as<float>(gates), as<float>(s0), U_shape, H.data(), Vn.data(), s.data());
      }} else if (what == "h2") {{
        h2::kernel<Dk, BV, C, NT, HDS, HNB, MP, 1, PT>(W.data(), U.data(), Kw.data(),
            as<float>(gates), as<float>(s0), U_shape, H.data(), Vn.data(), s.data());
      }} else {{
        h::kernel<Dk, BV, C, NT, HDS, HNB, MP, 1, PT>(W.data(), U.data(), Kw.data(),
            as<float>(gates), as<float>(s0), U_shape, H.data(), Vn.data(), s.data());
      }}
    }});
    write(d + "H", H); write(d + "Vn", Vn); write(d + "state_out", s);
  }} else if (what == "o2" || what == "o2x") {{
    auto q = read_as<PT>(d + "q"), k = read_as<PT>(d + "k"), gates = read(d + "gates");
    auto H = read_as<PT>(d + "H"), Vn = read_as<PT>(d + "Vn");
    const int dims[2] = {{T, Hv}}, Vn_shape[3] = {{BH, N * C, Dv}};
    std::vector<PT> y(size_t(B) * T * Hv * Dv, PT(NAN));
    const unsigned VB = unsigned((Dv + O2BVO - 1) / O2BVO);
    run_blocks({{unsigned(N), unsigned(BH), VB}}, {o_threads}, [&] {{
      if (what == "o2x") {{
        o2x::kernel<Dk, C, {o_threads}, O2DS, O2BVO, MP, PT>(q.data(), k.data(),
            as<float>(gates), H.data(), Vn.data(), dims, k_shape, Vn_shape, y.data());
      }} else {{
        o2::kernel<Dk, C, {o_threads}, O2DS, O2BVO, MP, PT>(q.data(), k.data(),
            as<float>(gates), H.data(), Vn.data(), dims, k_shape, Vn_shape, y.data());
      }}
    }});
    write(d + "y", y);
  }} else {{
    auto q = read(d + "q"), k = read(d + "k"), gates = read(d + "gates");
    auto H = read_as<PT>(d + "H"), Vn = read_as<PT>(d + "Vn");
    const int dims[2] = {{T, Hv}}, Vn_shape[3] = {{BH, N * C, Dv}};
    std::vector<float> y(size_t(B) * T * Hv * Dv, NAN);
    run_blocks({{unsigned(N), unsigned(BH), unsigned((Dv + BVO - 1) / BVO)}}, {o_threads}, [&] {{
      o::kernel<Dk, C, {o_threads}, ODS, BVO, MP, float, PT>(as<float>(q), as<float>(k),
          as<float>(gates), H.data(), Vn.data(), dims, k_shape, Vn_shape, y.data());
    }});
    write(d + "y", y);
  }}
}}

// wy|wy_fused|h|o DIR Dk B T Hk Hv Dv CFG
template <int Dk>
void run_dk(char** argv) {{
  const std::string cfg = argv[9];
{dispatch}
}}

int main(int argc, char** argv) {{
  const int Dk = std::stoi(argv[3]);
  if (Dk == 32) run_dk<32>(argv);
  else if (Dk == 128) run_dk<128>(argv);
  else return 1;
}}
"""
)


def _dispatch() -> str:
    lines = []
    for name, (pt, mp, bv, (hds, hnb), ods, bvo) in CFGS.items():
        t = "float" if pt == "float" else "bf16"
        backend = "metal" if name == "metal" else "cuda"
        o2ds, o2bvo = cl.O2_TILES[(backend, 4 if t == "float" else 2)]
        wds, wnb = WY2_CFG.get(name, cl.WY2_TILES[(backend, 4 if t == "float" else 2)])
        lines.append(
            f'  if (cfg == "{name}") return run<Dk, {t}, {mp}, {bv}, (Dk < {hds} ? Dk : {hds}), '
            f"{hnb}, (Dk < {ods} ? Dk : {ods}), {bvo}, (Dk < {o2ds} ? Dk : {o2ds}), {o2bvo}, "
            f"(Dk < {wds} ? Dk : {wds}), {wnb}>(argv);"
        )
    return "\n".join(lines)


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    text = PROGRAM.format(
        emulator=EMULATOR,
        wy=cl.wy_source("cuda"),
        wy_fused=cl.wy_source("cuda", fused=True),
        wy2=cl.wy_source("cuda", ring=True),
        wy2_fused=cl.wy_source("cuda", fused=True, ring=True),
        wy2v=cl.wy_source("cuda", ring=True, v16=True),
        wy2v_fused=cl.wy_source("cuda", fused=True, ring=True, v16=True),
        wy2x=cl.wy_source("cuda", ring=True, vx=True),
        wy2x_fused=cl.wy_source("cuda", fused=True, ring=True, vx=True),
        h2x=cl.h2_vx_source("cuda"),
        h2xd=cl.h2_dyn_source("cuda", vx=True),
        o2x=cl.o2_vx_source("cuda"),
        h=cl.h_source("cuda"),
        h2=cl.h2_source("cuda"),
        o=cl.o_source("cuda"),
        o2=cl.o2_source("cuda"),
        C=C,
        wy_threads=cl.WY_THREADS,
        wy_slice=cl.WY_SLICE,
        o_threads=cl.O_THREADS,
        dispatch=_dispatch(),
    )
    return compile_emulated(text, tmp_path_factory.mktemp("chunk_split"), timeout=900)


def _f32(x) -> np.ndarray:
    return np.asarray(x.astype(mx.float32) if isinstance(x, mx.array) else x, np.float32)


def _put(tmp, **arrays):
    for name, x in arrays.items():
        if name == "mask":
            (tmp / name).write_bytes(np.asarray(x, dtype=bool).tobytes())
        else:
            (tmp / name).write_bytes(_f32(x).tobytes())


def _get(tmp, name, shape):
    return np.fromfile(tmp / name, np.float32).reshape(shape)


def _run(program, tmp, what, dims, cfg):
    cmd = [str(program), what, str(tmp), *map(str, dims), cfg]
    subprocess.run(cmd, check=True, timeout=600)


def run_split(
    program, tmp, q, k, v, g, beta, state, mask, cfg, gates=None, out="o", wy="wy", h="h"
):
    """WY ("wy" WY_BODY, "wy2" WY2_BODY), state ("h" H_BODY, "h2" H2_BODY) and output pass (out:
    "o" O_BODY, "o2" O2_BODY) in the emulator: (W, U, Kw), (y, state_out)."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    N = -(-T // C)
    if mask is None:
        mask = mx.ones((B, T), dtype=mx.bool_)
    dims = [Dk, B, T, Hk, Hv, Dv]
    if gates is None:
        _put(tmp, q=q, k=k, v=v, g=g, beta=beta, mask=mask, state_in=state)
        _run(program, tmp, wy, dims, cfg)
    else:
        a, b, A_log, dt_bias = gates
        _put(tmp, q=q, k=k, v=v, a=a, b=b, A_log=A_log, dt_bias=dt_bias, mask=mask)
        _put(tmp, state_in=state)
        _run(program, tmp, wy + "_fused", dims, cfg)
    rows = B * Hv, N * C
    pieces = _get(tmp, "W", (*rows, Dk)), _get(tmp, "U", (*rows, Dv)), _get(tmp, "Kw", (*rows, Dk))
    _run(program, tmp, h, dims, cfg)
    _run(program, tmp, out, dims, cfg)
    y = _get(tmp, "y", (B, T, Hv, Dv))
    s = _get(tmp, "state_out", (B, Hv, Dv, Dk))
    return pieces, (y, s)


def _check(got, want, tol=TOL):
    (y, s), (y_np, s_np) = got, want
    assert np.isfinite(y).all() and np.isfinite(s).all()
    assert rel_err(y, y_np) < tol
    assert rel_err(s, s_np) < tol


IDS = dict(
    ids=lambda c: (
        "B{}T{}Hk{}Hv{}Dk{}Dv{}".format(*c) if isinstance(c, tuple) else ("mask" if c else "nomask")
    )
)


@pytest.mark.parametrize("shape,masked", CASES, **IDS)
def test_split_kernels_match_numpy(program, tmp_path, shape, masked, out="o", wy="wy", h="h"):
    """Every shape with the CUDA tiles; W, U, Kw against the MLX-ops pieces."""
    B, T, Hk, Hv, Dk, Dv = shape
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv)
    mask = _mask(B, T, "pad" if masked else None)
    pieces, got = run_split(
        program, tmp_path, q, k, v, g, beta, state, mask, "cuda", out=out, wy=wy, h=h
    )
    with mx.stream(mx.cpu):
        ops = [np.asarray(x) for x in cl.prep_ops(q, k, v, g, beta, mask)]
    for name, p, ref in zip(("W", "U", "Kw"), pieces, (ops[0], ops[1], ops[4]), strict=True):
        assert np.isfinite(p).all(), name
        assert rel_err(p, ref) < TOL, name
    _check(got, gated_delta_np(q, k, v, g, beta, state, mask))
    if mask is not None:
        assert not np.any(got[0][~np.asarray(mask)])


@pytest.mark.parametrize("shape,masked", CASES, **IDS)
def test_split_o2_matches_numpy(program, tmp_path, shape, masked):
    """The same with the output pass as O2_BODY (the copied ring, selection on the results)."""
    test_split_kernels_match_numpy(program, tmp_path, shape, masked, out="o2")


# WY2_BODY takes Dv a multiple of 8: the shapes of CASES that have one, and Dk 128 with a
# partial last v slice (Dv 40: columns 32..39 of the second slice of 32, 8..15 of Metal's 16).
WY2_SHAPES = [SHAPES[0], SHAPES[2], SHAPES[3], (2, 130, 2, 4, 128, 40)]
WY2_CASES = [(shape, shape[1] > 1) for shape in WY2_SHAPES] + [(SHAPES[3], False)]


@pytest.mark.parametrize("shape,masked", WY2_CASES, **IDS)
def test_split_wy2_matches_numpy(program, tmp_path, shape, masked):
    """WY2_BODY (the copied ring, k k^T on raw slices, U and W from scaled slices) with the
    CUDA tiles, then H2_BODY (the state in the accumulators) and O2_BODY: W, U, Kw against the
    MLX-ops pieces, y and the state against float64."""
    test_split_kernels_match_numpy(program, tmp_path, shape, masked, out="o2", wy="wy2", h="h2")


@pytest.mark.parametrize("cfg", ["metal", "cuda_bf16", "cuda_bv32", "cuda_ring3", "cuda_bf16_w64"])
def test_split_wy2_tiles_and_bf16(program, tmp_path, cfg):
    """WY2_BODY and H2_BODY with Metal's tiles (floats staged, slices of 16 / 32, rings of two),
    the state pass at 32 value rows and with a ring of three, within fp32's tolerance; with bf16
    pieces (X, the scaled slices, S and delta rounded to bf16 for the products) within bf16's
    and outside fp32's, also with WY2's slices of 64 (two output tiles a warp); masked, Dk 128,
    a partial v slice; gates computed in the kernel."""
    B, T, Hk, Hv, Dk, Dv = WY2_SHAPES[3]
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv)
    mask = _mask(B, T, "pad")
    a, b, A_log, dt_bias = make_gate_inputs(B, T, Hv)
    with mx.stream(mx.cpu):
        g, beta = compute_gates(a, b, A_log, dt_bias)
    gates = (a, b, A_log, dt_bias)
    _, got = run_split(
        program, tmp_path, q, k, v, None, None, state, mask, cfg, gates, out="o2", wy="wy2", h="h2"
    )
    want = gated_delta_np(q, k, v, g, beta, state, mask)
    bf16 = cfg.startswith("cuda_bf16")
    _check(got, want, TOL_BF16 if bf16 else TOL)
    if bf16:
        assert rel_err(got[0], want[0]) > TOL


@pytest.mark.parametrize("cfg", ["cuda", "cuda_bf16", "cuda_bf16_w64"])
@pytest.mark.parametrize("fused", [False, True], ids=["gates", "fused"])
def test_split_wy2_v16_equals_wy2(program, tmp_path, cfg, fused):
    """WY2_BODY with 16-byte stores of W and U (chunk_launch.WY2_V16) writes the same W, U, Kw
    and gates as WY2_BODY, bit for bit: fp32 and bf16 pieces, slices of 32 and 64, masked, Dk 128
    with Dv 40 (the last v slice partial: a copy at column 32 written, at 40 not); y and the
    state from them within the tolerance of the float64 loop."""
    B, T, Hk, Hv, Dk, Dv = WY2_SHAPES[3]
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv)
    mask = _mask(B, T, "pad")
    gates = make_gate_inputs(B, T, Hv) if fused else None
    if fused:
        with mx.stream(mx.cpu):
            g, beta = compute_gates(*gates)
    args = (program, tmp_path, q, k, v, None if fused else g, None if fused else beta, state)
    want_pieces, _ = run_split(*args, mask, cfg, gates, out="o2", wy="wy2", h="h2")
    want_gates = _get(tmp_path, "gates", (B * Hv, -(-T // C) * C, 4))
    pieces, got = run_split(*args, mask, cfg, gates, out="o2", wy="wy2v", h="h2")
    for name, p, ref in zip(("W", "U", "Kw"), pieces, want_pieces, strict=True):
        assert np.isfinite(p).all(), name
        assert np.array_equal(p, ref), name
    assert np.array_equal(_get(tmp_path, "gates", want_gates.shape), want_gates)
    bf16 = cfg.startswith("cuda_bf16")
    _check(got, gated_delta_np(q, k, v, g, beta, state, mask), TOL_BF16 if bf16 else TOL)


# Round 6's variants (chunk_launch.WY2_VX, H2_VX, O2_VX): Dk 128 with Dv 40 (a partial v slice,
# a partial state tile of 16 value rows, y's value tile partial), Dv 128 (every tile whole), and
# Dk 32 (fewer 16-byte groups of a state tile than threads).
VX_SHAPES = [WY2_SHAPES[3], (1, 200, 1, 2, 128, 128), SHAPES[3]]


def _vx_inputs(shape, fused: bool):
    """The round-6 checks' inputs: q, k, v, g, beta, state (g and beta from the raw gates when
    `fused`), a left-padding mask and the raw gates (None unless `fused`)."""
    B, T, Hk, Hv, Dk, Dv = shape
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv)
    gates = make_gate_inputs(B, T, Hv) if fused else None
    if fused:
        with mx.stream(mx.cpu):
            g, beta = compute_gates(*gates)
    return q, k, v, g, beta, state, _mask(B, T, "pad"), gates


@pytest.mark.parametrize("cfg", ["cuda", "cuda_bf16", "cuda_bf16_w64", "cuda_bv32"])
@pytest.mark.parametrize("fused", [False, True], ids=["gates", "fused"])
@pytest.mark.parametrize("shape", VX_SHAPES, ids=lambda s: f"Dk{s[4]}Dv{s[5]}")
def test_split_vx_equals_default(program, tmp_path, cfg, fused, shape):
    """WY2_VX (16-byte Kw / W / U stores and slice scaling, L from the accumulators), H2_VX
    (16-byte H stores, delta from the accumulators) and O2_VX (Y's decay and P from the
    accumulators, 16-byte y stores) give the default builds' W, U, Kw, gates, H, Vn, y and state
    bit for bit: fp32 and bf16 pieces, WY slices of 32 and 64, the state pass at 16 and 32 value
    rows, masked (left padding: whole masked chunks and rows past T), partial and whole tiles; y
    and the state within the tolerance of the float64 loop."""
    B, T, Hk, Hv, Dk, Dv = shape
    N = -(-T // C)
    q, k, v, g, beta, state, mask, gates = _vx_inputs(shape, fused)
    args = (program, tmp_path, q, k, v, None if fused else g, None if fused else beta, state)
    extra = {"gates": (B * Hv, N * C, 4), "H": (B * Hv, N, Dv, Dk), "Vn": (B * Hv, N * C, Dv)}
    want_pieces, want = run_split(*args, mask, cfg, gates, out="o2", wy="wy2", h="h2")
    want_extra = {name: _get(tmp_path, name, sh) for name, sh in extra.items()}
    pieces, got = run_split(*args, mask, cfg, gates, out="o2x", wy="wy2x", h="h2x")
    for name, p, ref in zip(("W", "U", "Kw"), pieces, want_pieces, strict=True):
        assert np.isfinite(p).all(), name
        assert np.array_equal(p, ref), name
    for name, sh in extra.items():
        assert np.array_equal(_get(tmp_path, name, sh), want_extra[name], equal_nan=True), name
    for name, x, ref in zip(("y", "state"), got, want, strict=True):
        assert np.isfinite(x).all() and np.array_equal(x, ref), name
    bf16 = cfg.startswith("cuda_bf16")
    _check(got, gated_delta_np(q, k, v, g, beta, state, mask), TOL_BF16 if bf16 else TOL)


@pytest.mark.parametrize("fused", [False, True], ids=["gates", "fused"])
@pytest.mark.parametrize("shape", VX_SHAPES, ids=lambda s: f"Dk{s[4]}Dv{s[5]}")
def test_split_vx_dynamic_ring_equals_default(program, tmp_path, fused, shape):
    """H2_DYN's text (chunk_source.h2_dyn_body; here its static array, the ring three whole key
    rows deep as chunk_launch.H2_DYN = (128, 3) asks) after WY2_VX, before O2_VX: bf16, the
    default builds' H, Vn, y and state bit for bit."""
    B, T, Hk, Hv, Dk, Dv = shape
    N = -(-T // C)
    q, k, v, g, beta, state, mask, gates = _vx_inputs(shape, fused)
    args = (program, tmp_path, q, k, v, None if fused else g, None if fused else beta, state)
    extra = {"H": (B * Hv, N, Dv, Dk), "Vn": (B * Hv, N * C, Dv)}
    _, want = run_split(*args, mask, "cuda_bf16", gates, out="o2", wy="wy2", h="h2")
    want_extra = {name: _get(tmp_path, name, sh) for name, sh in extra.items()}
    _, got = run_split(*args, mask, "cuda_bf16_r3", gates, out="o2x", wy="wy2x", h="h2xd")
    for name, sh in extra.items():
        assert np.array_equal(_get(tmp_path, name, sh), want_extra[name], equal_nan=True), name
    for name, x, ref in zip(("y", "state"), got, want, strict=True):
        assert np.isfinite(x).all() and np.array_equal(x, ref), name


TILE_SHAPES = [SHAPES[4], SHAPES[5]]


def _tile_ids(s):
    return "T{}Dk{}Dv{}".format(*s[1:2], *s[4:])


@pytest.mark.parametrize("cfg", ["metal", "cuda_bv32"])
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=_tile_ids)
def test_split_tile_configurations(program, tmp_path, cfg, shape, out="o"):
    """Metal's slices and value tiles, and the state pass at 32 value rows (Dv below, at and
    above a tile), masked."""
    B, T, Hk, Hv, Dk, Dv = shape
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv)
    mask = _mask(B, T, "pad")
    _, got = run_split(program, tmp_path, q, k, v, g, beta, state, mask, cfg, out=out)
    _check(got, gated_delta_np(q, k, v, g, beta, state, mask))


@pytest.mark.parametrize("shape", TILE_SHAPES, ids=_tile_ids)
def test_split_o2_metal_tiles(program, tmp_path, shape):
    """O2_BODY with Metal's tiles (float staged, key slices of 8, 32 value rows)."""
    test_split_tile_configurations(program, tmp_path, "metal", shape, out="o2")


@pytest.mark.parametrize("out", ["o", "o2"])
def test_split_bf16_pieces_within_bf16_tolerance(program, tmp_path, out):
    """bf16 pieces and tf32 operands (what bf16 activations get; O2_BODY also reads q, k and
    writes y in bf16): within bf16's tolerance, and measurably outside fp32's (the emulated
    roundings are real)."""
    B, T, Hk, Hv, Dk, Dv = SHAPES[5]
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv)
    mask = _mask(B, T, "pad")
    _, got = run_split(program, tmp_path, q, k, v, g, beta, state, mask, "cuda_bf16", out=out)
    want = gated_delta_np(q, k, v, g, beta, state, mask)
    _check(got, want, TOL_BF16)
    assert rel_err(got[0], want[0]) > TOL


@pytest.mark.parametrize(
    "cfg,out,wy",
    [(c, o, "wy") for o in ("o", "o2") for c in ("cuda", "metal")]
    + [(c, "o2", "wy2") for c in ("cuda", "metal", "cuda_bf16")]
    + [(c, "o2x", "wy2x") for c in ("cuda", "cuda_bf16")],  # round 6's variants (CUDA)
)
def test_split_g_zero_strong_decay_and_garbage_in_padding(program, tmp_path, cfg, out, wy):
    """g = 0 mid-chunk and at a chunk's first step, decays of 1e-4..0.05 (products far below
    fp32's normal range), and nan / inf in padded slots, which must not leak."""
    B, T, Hk, Hv, Dv = 2, 130, 1, 2, 16
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, DK, Dv, g_range=(1e-4, 0.05))
    g = np.array(g)
    g[0, 5] = g[1, 64] = 0.0
    g[0, 100:] = np.random.default_rng(0).uniform(0.8, 1.0, g[0, 100:].shape)
    g = mx.array(g)
    mask = _mask(B, T, "pad")
    want = gated_delta_np(q, k, v, g, beta, state, mask)
    pad = ~mask
    nan4 = mx.where(pad[:, :, None, None], mx.nan, 0.0)
    bad = (q + nan4, k + nan4, v + nan4, mx.where(pad[:, :, None], mx.inf, g), beta)
    h = {"wy2": "h2", "wy2x": "h2x"}.get(wy, "h")
    _, got = run_split(program, tmp_path, *bad, state, mask, cfg, out=out, wy=wy, h=h)
    _check(got, want, TOL_BF16 if cfg == "cuda_bf16" else TOL)


class EmulatedKernel:
    """Stands in for an `mx.fast.cuda_kernel` object of the split path: checks the launch
    (template arguments, grid, threadgroup, output shapes and dtypes) against what the emulated
    program assumes, then runs that kernel of the program on the inputs."""

    def __init__(self, program, tmp, name, input_names, output_names, header="", **_):
        # a launch-bounded build (chunk_launch.MIN_BLOCKS) has a name of its own and the bound
        # in its header; the emulator runs the same body
        base, _, lb = name.rpartition("_lb")
        if base and lb.isdigit():
            assert cl.launch_bounds_header(256, int(lb)) in header
            name = base
        self.program, self.tmp, self.name = program, tmp, name
        self.input_names, self.output_names = input_names, output_names

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, **_):
        x = dict(zip(self.input_names, inputs, strict=True))
        for n, a in x.items():
            if n == "mask":
                (self.tmp / n).write_bytes(np.asarray(a, np.bool_).tobytes())
            elif n != "dims":
                (self.tmp / n).write_bytes(_f32(a).tobytes())
        tpl = dict(template)
        assert tpl["C"] == C and tpl["MP"] == 3  # fp32 activations
        wy_names = {cs.wy_name(f, r): (f, r) for f in (False, True) for r in (False, True)}
        if self.name in wy_names:
            fused, ring = wy_names[self.name]
            B, T, Hk, Dk = x["k"].shape
            Hv, Dv = x["v"].shape[2:]
            N = -(-T // C)
            # WY2_BODY wherever it applies (WY2 on, Dv a multiple of 8), with CUDA's fp32 tiles
            assert ring == (cl.WY2 and Dv % 8 == 0)
            ds, nb = cl.WY2_TILES[("cuda", 4)] if ring else (cl.WY_SLICE, None)
            ds = min(ds, Dk)
            assert tpl == {
                "Dk": Dk,
                "C": C,
                "NT": cl.WY_THREADS,
                "DS": ds,
                **({"NB": nb} if ring else {}),
                "MP": 3,
                "PT": mx.float32,
            }
            assert grid == (cl.WY_THREADS * N, B * Hv, 1)
            assert threadgroup == (cl.WY_THREADS, 1, 1)
            assert output_dtypes == [mx.float32] * 4
            what = ("wy2" if ring else "wy") + ("_fused" if fused else "")
            self.tmp.joinpath("dims").write_text(" ".join(map(str, [Dk, B, T, Hk, Hv, Dv])))
        elif self.name in (cs.H_NAME, cs.H2_NAME):
            B, Hv, Dv, Dk = x["state_in"].shape
            nt = cl.h_threads(cl.H_BV)
            h2 = self.name == cs.H2_NAME
            assert h2 == cl.H2  # H2_BODY wherever it is on (its tiles fit every case here)
            ds, nb = cl.h_tiles("cuda", Dk, cl.H_BV, 4, h2)
            want = {"Dk": Dk, "BV": cl.H_BV, "C": C, "NT": nt, "DS": ds, "NB": nb}
            assert tpl == want | {"MP": 3, "PF": cl.PREFETCH, "PT": mx.float32}
            assert grid == (nt * B * Hv, -(-Dv // cl.H_BV), 1)
            assert threadgroup == (nt, 1, 1)
            what = "h2" if h2 else "h"
        else:
            # O2_BODY where chunk_launch.O2 is on (fp32 q, k, H and y agree here), else O_BODY.
            assert self.name == (cs.O2_NAME if cl.O2 else cs.O_NAME)
            BH, N, Dv, Dk = x["H"].shape
            T, Hv = (int(i) for i in np.asarray(x["dims"]))
            ds, bvo = cl.O2_TILES[("cuda", 4)] if cl.O2 else (cl.O_SLICE["cuda"], cl.O_BV["cuda"])
            assert tpl == {
                "Dk": Dk,
                "C": C,
                "NT": cl.O_THREADS,
                "DS": min(ds, Dk),
                "BVO": bvo,
                "MP": 3,
                "YT": mx.float32,
            }
            assert grid == (cl.O_THREADS * N, BH, -(-Dv // bvo))
            assert threadgroup == (cl.O_THREADS, 1, 1)
            what = "o2" if cl.O2 else "o"
        dims = self.tmp.joinpath("dims").read_text().split()
        _run(self.program, self.tmp, what, dims, "cuda")
        outs = []
        for n, shape, dt in zip(self.output_names, output_shapes, output_dtypes, strict=True):
            assert dt == mx.float32
            outs.append(mx.array(_get(self.tmp, n, shape)))
        return outs


@pytest.mark.parametrize("Dv", [20, 24])
@pytest.mark.parametrize("o2", [True, False], ids=["o2", "o"])
@pytest.mark.parametrize("fused", [False, True], ids=["gates", "fused"])
@pytest.mark.usefixtures("plain_split")
def test_split_host_launch_through_emulator(program, tmp_path, monkeypatch, fused, o2, Dv):
    """gated_delta_chunk_kernel / gated_delta_update_chunk_kernel with SPLIT on: input order,
    shapes, grids and template arguments, the kernels run by the emulator; the fused variant's
    gates computed in the WY kernel, including gates that underflow to exactly 0; both output
    passes (chunk_launch.O2, on by default); WY_BODY at Dv 20, WY2_BODY at Dv 24."""
    monkeypatch.setattr(cl, "SPLIT", True)
    monkeypatch.setattr(cl, "O2", o2)
    monkeypatch.setattr(cl, "_kernels", {})
    monkeypatch.setattr(
        cl, "_factory", lambda backend: lambda **kw: EmulatedKernel(program, tmp_path, **kw)
    )
    B, T, Hk, Hv = 3, 100, 1, 2
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, DK, Dv)
    mask = _mask(B, T, "pad")
    with mx.stream(mx.cpu):
        if fused:
            a, b, A_log, dt_bias = make_gate_inputs(B, T, Hv)
            a = np.array(a)
            a[:, ::9] = 80.0  # softplus(80) * exp(A_log) >> 104: g underflows to exactly 0
            a = mx.array(a)
            A_log = mx.full(A_log.shape, 2.0)
            g, beta = compute_gates(a, b, A_log, dt_bias)
            assert (np.array(g)[:, ::9] == 0.0).all()
            y, s = cl.gated_delta_update_chunk_kernel(
                q, k, v, a, b, A_log, dt_bias, state, mask, backend="cuda"
            )
        else:
            y, s = cl.gated_delta_chunk_kernel(q, k, v, g, beta, state, mask, backend="cuda")
    assert y.shape == (B, T, Hv, Dv) and s.shape == (B, Hv, Dv, DK)
    _check((np.asarray(y), np.asarray(s)), gated_delta_np(q, k, v, g, beta, state, mask))


@pytest.mark.parametrize("backend,bv,Dk", [("metal", 32, 128), ("cuda", 32, 256), ("cuda", 8, 128)])
def test_split_state_pass_rejects_tiles_that_do_not_fit(backend, bv, Dk):
    """32 value rows need 44.5 KB of threadgroup memory at Dk 128 (CUDA only) and 61 KB at
    Dk 256 (nowhere); other widths have no layout: one clear error, before any build."""
    state = mx.zeros((1, 2, 16, Dk))
    U = mx.zeros((2, C, 16))
    with pytest.raises(ValueError, match=f"bv={bv} with Dk={Dk}"):
        cl.h_pass(backend, None, U, None, None, state, bv=bv)
