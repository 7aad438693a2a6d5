"""Shared setup of the split chunk path's round tests (rounds 8-10: test_chunk_fuse_y.py,
test_chunk_wy_p.py, test_chunk_h3o_producers.py, test_chunk_h3o_split.py): the switches a host
test pins, the zero pieces the recording factory is called with, the state pass's inputs, and
benchmarks/chunk_split_gpu.py imported with every kernel output zeros (its --abN modes end to
end on the CPU); and the GPU round tests' comparison of a switch against a base build
(test_gpu_chunk_wy_p.py, test_gpu_chunk_h3o_split.py: switches_keep_outputs)."""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl

# Round 9's switches off: the builds the round-8 host tests were written against.
BEFORE_ROUND9 = {"WY_P": False, "H3O_PRODUCERS": False}

# The O2P kernel's wrapper in the emulator programs (text for `str.format`, `{o2p}` its body).
O2P_NAMESPACE = r"""namespace o2p {{
template <int Dk, int C, int NT, int DS, int BVO, int MP, typename YT>
void kernel(const YT* q, const YT* k, const float* gates, const int* dims, const int* q_shape,
            YT* P) {{
{o2p}
}}
}}  // namespace o2p
"""


def split_switches(monkeypatch, **switches) -> None:
    """chunk_launch's switches set for this test (undone after it); each must exist."""
    for name, value in switches.items():
        assert hasattr(cl, name), name
        monkeypatch.setattr(cl, name, value)


def assert_same_outputs(got, want) -> None:
    """(y, state) of two builds: finite and equal bit for bit."""
    for name, a, b in zip(("y", "state"), got, want, strict=True):
        a32, b32 = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
        assert np.isfinite(a32).all(), name
        assert np.array_equal(a32, b32), (name, np.abs(a32 - b32).max())


def switches_keep_outputs(monkeypatch, inputs, raw: bool, base: dict, switches: dict) -> None:
    """The split path on `inputs` (q, k, v, g, beta, state, mask) with chunk_launch's `base`
    switches, then with `switches` set on top: y and the state bit for bit (GPU). raw: through
    gated_delta_update_chunk_kernel, g and beta standing in for the raw gates a and b (A_log,
    dt_bias a ramp over the heads: the WY pass computes the gates); else split_chunk_kernel."""
    q, k, v, g, beta, state, mask = inputs
    split_switches(monkeypatch, **base)
    if raw:
        Hv = v.shape[2]
        gates = (g, beta, mx.linspace(-1.0, 0.5, Hv), mx.linspace(-0.3, 0.3, Hv))

        def run():
            return cl.gated_delta_update_chunk_kernel(q, k, v, *gates, state, mask, backend="cuda")
    else:

        def run():
            return cl.split_chunk_kernel("cuda", q, k, v, g, beta, state, mask)

    want = run()
    mx.eval(want)
    split_switches(monkeypatch, **switches)
    got = run()
    mx.eval(got)
    assert_same_outputs(got, want)


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


_H3O_SIG = """template <int Dk, int BV, int C, int NT, int NB, int MP, typename PT>
void kernel(const PT* W, const PT* U, const PT* Kw, const float* gates, const float* state_in,
            const PT* q, const PT* P, const int* U_shape, const int* q_shape, PT* y,
            float* state_out) {{"""


def h3o_builds_program(builds: list[tuple[str, int]], what: str) -> str:
    """The lane emulator's program text (a format string: each build's body under its name, o2p,
    C) that makes P by O2P and then runs each H3O build of `builds` ((name, threads a threadgroup
    as a multiple of NT)) on the same pieces: usage `DIR Dk B T Hk Hv Dv NW NB`; writes P, and
    build i's y and state as y / state_out, y2 / state_out2, ... (bf16 pieces)."""
    kernels = "".join(
        f"namespace {n} {{{{\n{_H3O_SIG}\n{{{n}}}\n}}}}\n}}}}  // namespace {n}\n"
        for n, _ in builds
    )
    runs = ""
    for i, (n, threads) in enumerate(builds):
        tag = "" if i == 0 else str(i + 1)
        nt = "NT" if threads == 1 else f"{threads} * NT"
        pad = " " * len(n)
        runs += f"""  std::vector<PT> y{tag}(size_t(B) * T * Hv * Dv, PT(NAN));
  std::vector<float> s{tag}(size_t(BH) * Dv * Dk, NAN);
  run_blocks({{{{unsigned(BH), unsigned(Dv / BV), 1}}}}, {nt}, [&] {{{{
    {n}::kernel<Dk, BV, C, NT, NB, 1, PT>(W.data(), U.data(), Kw.data(), gates.data(),
    {pad}                                 s0.data(), q.data(), P.data(), U_shape, q_shape,
    {pad}                                 y{tag}.data(), s{tag}.data());
  }}}});
  write(d + "y{tag}", y{tag}); write(d + "state_out{tag}", s{tag});
"""
    return (
        kernels
        + O2P_NAMESPACE
        + r"""
// DIR Dk B T Hk Hv Dv NW NB: P (O2P), then """
        + what
        + r"""
template <int Dk, int NW, int NB>
int run(const std::string& d, int B, int T, int Hk, int Hv, int Dv) {{
  using PT = bf16;
  constexpr int C = {C}, BV = 16 * NW, NT = 32 * NW, DS = Dk < 32 ? Dk : 32, BVO = 64;
  const int N = (T + C - 1) / C, BH = B * Hv;
  auto W = read_as<PT>(d + "W"), U = read_as<PT>(d + "U"), Kw = read_as<PT>(d + "Kw");
  auto q = read_as<PT>(d + "q"), k = read_as<PT>(d + "k");
  auto gates = readf(d + "gates"), s0 = readf(d + "state_in");
  const int U_shape[3] = {{BH, N * C, Dv}}, q_shape[4] = {{B, T, Hk, Dk}};
  const int dims[2] = {{T, Hv}};
  std::vector<PT> P(size_t(BH) * N * C * C, PT(NAN));
  run_blocks({{unsigned(N), unsigned(BH), 1}}, 256, [&] {{
    o2p::kernel<Dk, C, 256, DS, BVO, 1, PT>(q.data(), k.data(), gates.data(), dims, q_shape,
                                            P.data());
  }});
  write(d + "P", P);
"""
        + runs
        + r"""  return 0;
}}

int main(int argc, char** argv) {{
  const std::string d = std::string(argv[1]) + "/";
  const int Dk = std::stoi(argv[2]), B = std::stoi(argv[3]), T = std::stoi(argv[4]);
  const int Hk = std::stoi(argv[5]), Hv = std::stoi(argv[6]), Dv = std::stoi(argv[7]);
  const int nw = std::stoi(argv[8]), nb = std::stoi(argv[9]);
#define CASE(DK_, NW_, NB_) \
  if (Dk == DK_ && nw == NW_ && nb == NB_) return run<DK_, NW_, NB_>(d, B, T, Hk, Hv, Dv);
  CASE(128, 2, 2) CASE(128, 4, 2) CASE(128, 1, 3) CASE(128, 2, 3) CASE(32, 2, 2)
  return 1;
}}
"""
    )
