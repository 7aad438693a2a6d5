"""The chunked GPU kernels' bodies (chunk_source.PREP_BODY and STATE_BODY with the CUDA prologue,
the same text the CUDA and, with the Metal prologue, the Metal builds compile), run on the CPU
by tests/kernels/lane_emulator.h in block mode: one thread per GPU thread, every thread of a
threadgroup at once, meeting at the threadgroup barriers, threadgroup memory shared.

Checked: the prep kernel's pieces against the MLX-ops pieces (chunk_launch.prep_ops), and the
whole pipeline (prep kernel or MLX-ops prep, then the state kernel) against the float64 NumPy
loop, with masks (left padding, a hole, right padding), T not a multiple of the chunk, Hv > Hk,
Dv not a multiple of the state tile, g = 0, strong decay. Outputs start as NaN, so an element the
kernels fail to write fails the comparison; threadgroup memory too, so does a read of it before
a write. Under ThreadSanitizer (a missing barrier) and AddressSanitizer (out-of-bounds), the case
that failed once on the H200.
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

pytestmark = [
    pytest.mark.skipif(GXX is None, reason="needs g++"),
    pytest.mark.usefixtures("cpu_device"),
]
C = cl.CHUNK
TOL = RTOL[mx.float32]

PROGRAM = r"""
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
void write(const std::string& path, const std::vector<float>& x) {{
  std::ofstream(path, std::ios::binary).write((const char*)x.data(), x.size() * 4);
}}

namespace prep {{
template <int Dk, int C, int NT, int DS>
void kernel(const float* q, const float* k, const float* v, const float* g, const float* beta,
            const bool* mask, const int* q_shape, const int* v_shape, float* W, float* U,
            float* Qg, float* P, float* Kw, float* decay) {{
{prep}
}}
}}  // namespace prep

namespace prep_fused {{
template <int Dk, int C, int NT, int DS>
void kernel(const float* q, const float* k, const float* v, const float* a, const float* b,
            const float* A_log, const float* dt_bias, const bool* mask, const int* q_shape,
            const int* v_shape, float* W, float* U, float* Qg, float* P, float* Kw,
            float* decay) {{
{prep_fused}
}}
}}  // namespace prep_fused

namespace prep_mma {{
template <int Dk, int C, int NT, int DS, int MP>
void kernel(const float* q, const float* k, const float* v, const float* g, const float* beta,
            const bool* mask, const int* q_shape, const int* v_shape, float* W, float* U,
            float* Qg, float* P, float* Kw, float* decay) {{
{prep_mma}
}}
}}  // namespace prep_mma

namespace prep_fused_mma {{
template <int Dk, int C, int NT, int DS, int MP>
void kernel(const float* q, const float* k, const float* v, const float* a, const float* b,
            const float* A_log, const float* dt_bias, const bool* mask, const int* q_shape,
            const int* v_shape, float* W, float* U, float* Qg, float* P, float* Kw,
            float* decay) {{
{prep_fused_mma}
}}
}}  // namespace prep_fused_mma

namespace state {{
template <int Dk, int BV, int C, int NT, int PF, typename YT>
void kernel(const float* W, const float* U, const float* Qg, const float* P, const float* Kw,
            const float* decay, const float* state_in, const int* dims, const int* U_shape,
            YT* y, float* state_out) {{
{state}
}}
}}  // namespace state

namespace state_mma {{
template <int Dk, int BV, int C, int NT, int MP, int PF, typename YT>
void kernel(const float* W, const float* U, const float* Qg, const float* P, const float* Kw,
            const float* decay, const float* state_in, const int* dims, const int* U_shape,
            YT* y, float* state_out) {{
{state_mma}
}}
}}  // namespace state_mma

// prep|prep_fused|prep_mma|prep_fused_mma DIR Dk B T Hk Hv Dv (the _mma ones with MP 3)
// | state|state_mma1|state_mma3|state_mma3_bv32 DIR Dk B T Hv Dv N
template <int Dk>
void run(char** argv) {{
  const std::string what = argv[1], d = std::string(argv[2]) + "/";
  constexpr int C = {C};
  argv += 1;
  if (what.rfind("prep", 0) == 0) {{
    const int B = std::stoi(argv[3]), T = std::stoi(argv[4]), Hk = std::stoi(argv[5]);
    const int Hv = std::stoi(argv[6]), Dv = std::stoi(argv[7]);
    const int N = (T + C - 1) / C, BH = B * Hv;
    const int q_shape[4] = {{B, T, Hk, Dk}}, v_shape[4] = {{B, T, Hv, Dv}};
    auto q = read(d + "q"), k = read(d + "k"), v = read(d + "v"), mask = read(d + "mask");
    const bool fused = what.rfind("prep_fused", 0) == 0;
    const bool mma = what.size() > 4 && what.substr(what.size() - 4) == "_mma";
    auto g = read(d + (fused ? "a" : "g")), beta = read(d + (fused ? "b" : "beta"));
    auto A_log = fused ? read(d + "A_log") : g, dt_bias = fused ? read(d + "dt_bias") : g;
    const size_t rows = size_t(BH) * N * C;
    std::vector<float> W(rows * Dk, NAN), U(rows * Dv, NAN), Qg(rows * Dk, NAN);
    std::vector<float> P(rows * C, NAN), Kw(rows * Dk, NAN), dec(size_t(BH) * N * Dk, NAN);
    run_blocks({{unsigned(N), unsigned(BH), 1}}, {prep_threads}, [&] {{
      if (fused && mma) {{
        prep_fused_mma::kernel<Dk, C, {prep_threads}, {slice}, 3>(as<float>(q), as<float>(k),
            as<float>(v), as<float>(g), as<float>(beta), as<float>(A_log), as<float>(dt_bias),
            as<bool>(mask), q_shape, v_shape, W.data(), U.data(), Qg.data(), P.data(),
            Kw.data(), dec.data());
      }} else if (mma) {{
        prep_mma::kernel<Dk, C, {prep_threads}, {slice}, 3>(as<float>(q), as<float>(k),
            as<float>(v), as<float>(g), as<float>(beta), as<bool>(mask), q_shape, v_shape,
            W.data(), U.data(), Qg.data(), P.data(), Kw.data(), dec.data());
      }} else if (fused) {{
        prep_fused::kernel<Dk, C, {prep_threads}, {slice}>(as<float>(q), as<float>(k),
            as<float>(v), as<float>(g), as<float>(beta), as<float>(A_log), as<float>(dt_bias),
            as<bool>(mask), q_shape, v_shape, W.data(), U.data(), Qg.data(), P.data(),
            Kw.data(), dec.data());
      }} else {{
        prep::kernel<Dk, C, {prep_threads}, {slice}>(as<float>(q), as<float>(k), as<float>(v),
            as<float>(g), as<float>(beta), as<bool>(mask), q_shape, v_shape, W.data(),
            U.data(), Qg.data(), P.data(), Kw.data(), dec.data());
      }}
    }});
    write(d + "W", W); write(d + "U", U); write(d + "Qg", Qg); write(d + "P", P);
    write(d + "Kw", Kw); write(d + "decay", dec);
  }} else {{
    const int B = std::stoi(argv[3]), T = std::stoi(argv[4]), Hv = std::stoi(argv[5]);
    const int Dv = std::stoi(argv[6]), N = std::stoi(argv[7]);
    const int dims[1] = {{T}}, U_shape[4] = {{B, Hv, N * C, Dv}};
    auto W = read(d + "W"), U = read(d + "U"), Qg = read(d + "Qg"), P = read(d + "P");
    auto Kw = read(d + "Kw"), dec = read(d + "decay"), s0 = read(d + "state_in");
    std::vector<float> y(size_t(B) * T * Hv * Dv, NAN), s(size_t(B) * Hv * Dv * Dk, NAN);
    if (what == "state") {{
      const unsigned tiles = (Dv + {bv} - 1) / {bv};
      run_blocks({{unsigned(B * Hv), tiles, 1}}, {state_threads}, [&] {{
        state::kernel<Dk, {bv}, C, {state_threads}, 1, float>(as<float>(W), as<float>(U),
            as<float>(Qg), as<float>(P), as<float>(Kw), as<float>(dec), as<float>(s0), dims,
            U_shape, y.data(), s.data());
      }});
    }} else if (what == "state_mma3_bv32") {{
      const unsigned tiles = (Dv + 31) / 32;
      run_blocks({{unsigned(B * Hv), tiles, 1}}, {mma_threads32}, [&] {{
        state_mma::kernel<Dk, 32, C, {mma_threads32}, 3, 1, float>(as<float>(W), as<float>(U),
            as<float>(Qg), as<float>(P), as<float>(Kw), as<float>(dec), as<float>(s0), dims,
            U_shape, y.data(), s.data());
      }});
    }} else {{
      const unsigned tiles = (Dv + {mma_bv} - 1) / {mma_bv};
      const bool mp3 = what == "state_mma3";
      run_blocks({{unsigned(B * Hv), tiles, 1}}, {mma_threads}, [&] {{
        if (mp3) {{
          state_mma::kernel<Dk, {mma_bv}, C, {mma_threads}, 3, 1, float>(as<float>(W),
              as<float>(U), as<float>(Qg), as<float>(P), as<float>(Kw), as<float>(dec),
              as<float>(s0), dims, U_shape, y.data(), s.data());
        }} else {{
          state_mma::kernel<Dk, {mma_bv}, C, {mma_threads}, 1, 1, float>(as<float>(W),
              as<float>(U), as<float>(Qg), as<float>(P), as<float>(Kw), as<float>(dec),
              as<float>(s0), dims, U_shape, y.data(), s.data());
        }}
      }});
    }}
    write(d + "y", y); write(d + "state_out", s);
  }}
}}

int main(int argc, char** argv) {{
  const int Dk = std::stoi(argv[3]);
  if (Dk == 32) run<32>(argv);
  else if (Dk == 128) run<128>(argv);
  else return 1;
}}
"""

DK = 32  # key width of most cases (the program is compiled for Dk = 32 and 128)


def build(tmp: Path, sanitize: str | None = None, state: str | None = None) -> Path:
    """The emulated program (compile_emulated, with `sanitize`); state: STATE_BODY's text in
    place of the package's (a planted bug)."""
    text = PROGRAM.format(
        emulator=EMULATOR,
        prep=cl.prep_source("cuda"),
        prep_fused=cl.prep_source("cuda", fused=True),
        prep_mma=cl.prep_source("cuda", matrix=True),
        prep_fused_mma=cl.prep_source("cuda", fused=True, matrix=True),
        state=state or cl.state_source("cuda"),
        state_mma=cl.state_mma_source("cuda"),
        mma_bv=cl.MMA_BV,
        mma_threads=cl.MMA_THREADS,
        mma_threads32=cl.mma_threads(32),
        C=C,
        prep_threads=cl.PREP_THREADS,
        state_threads=cl.STATE_THREADS,
        slice=cl.KEY_SLICE,
        bv=cl.BV,
    )
    return compile_emulated(text, tmp, timeout=600, sanitize=sanitize)


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("chunk_kernel"))


def run_program(program, *args) -> subprocess.CompletedProcess:
    """`program ARGS`; fails with its stderr (a sanitizer's report among it) if it exits
    nonzero."""
    res = subprocess.run(
        [str(program), *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-8000:]
    return res


def _f32(x) -> np.ndarray:
    return np.asarray(x.astype(mx.float32) if isinstance(x, mx.array) else x, np.float32)


def run_prep(program, tmp, q, k, v, g, beta, mask, which="prep"):
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    if mask is None:
        mask = mx.ones((B, T), dtype=mx.bool_)
    for name, x in zip(("q", "k", "v", "g", "beta"), (q, k, v, g, beta), strict=True):
        (tmp / name).write_bytes(_f32(x).tobytes())
    (tmp / "mask").write_bytes(np.asarray(mask, dtype=bool).tobytes())
    dims = [Dk, B, T, Hk, Hv, Dv]
    run_program(program, which, tmp, *dims)
    N = -(-T // C)
    shapes = {
        "W": (B * Hv, N * C, Dk),
        "U": (B * Hv, N * C, Dv),
        "Qg": (B * Hv, N * C, Dk),
        "P": (B * Hv, N * C, C),
        "Kw": (B * Hv, N * C, Dk),
        "decay": (B * Hv, N, Dk),
    }
    return tuple(np.fromfile(tmp / n, np.float32).reshape(s) for n, s in shapes.items())


def run_state(program, tmp, pieces, state, T, which="state"):
    B, Hv, Dv, Dk = state.shape
    for name, x in zip(cs.PREP_OUTPUTS, pieces, strict=True):
        (tmp / name).write_bytes(_f32(x).tobytes())
    (tmp / "state_in").write_bytes(_f32(state).tobytes())
    N = pieces[0].shape[1] // C
    dims = [Dk, B, T, Hv, Dv, N]
    run_program(program, which, tmp, *dims)
    y = np.fromfile(tmp / "y", np.float32).reshape(B, T, Hv, Dv)
    s = np.fromfile(tmp / "state_out", np.float32).reshape(B, Hv, Dv, Dk)
    return y, s


def _mask(B, T, kind):
    """[B, T] bool masks: left padding, a hole in the middle, right padding, none."""
    m = np.ones((B, T), bool)
    if kind == "pad":
        m[0, : T // 3] = False  # left padding
        if B > 1:
            m[1, T // 4 : T // 2] = False  # a hole
        if B > 2:
            m[2, T - T // 5 :] = False  # right padding
        return mx.array(m)
    return None


# (B, T, Hk, Hv, Dk, Dv): T around the chunk (1, 63, 64, 65) and several chunks (200),
# Hv = 2 Hk, Dv not a multiple of the state tile (20) and smaller than it, Dk = 128 (every
# thread of the state pass busy, two items each).
SHAPES = [
    (1, 1, 1, 1, 32, 16),
    (2, 63, 1, 2, 32, 20),
    (1, 64, 1, 1, 32, 32),
    (3, 65, 1, 2, 32, 16),
    (3, 200, 1, 2, 32, 20),
    (2, 130, 2, 4, 128, 36),
]


def _check(got, want):
    (y, s), (y_np, s_np) = got, want
    assert np.isfinite(y).all() and np.isfinite(s).all()
    assert rel_err(y, y_np) < TOL
    assert rel_err(s, s_np) < TOL


# Masked where T allows a hole (the emulator is slow: one thread per GPU thread).
CASES = [(shape, shape[1] > 1) for shape in SHAPES] + [(SHAPES[3], False)]


@pytest.mark.parametrize(
    "shape,masked",
    CASES,
    ids=lambda c: (
        "B{}T{}Hk{}Hv{}Dk{}Dv{}".format(*c) if isinstance(c, tuple) else ("mask" if c else "nomask")
    ),
)
def test_prep_and_state_kernels_match_numpy(program, tmp_path, shape, masked):
    B, T, Hk, Hv, Dk, Dv = shape
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv)
    mask = _mask(B, T, "pad" if masked else None)
    pieces = run_prep(program, tmp_path, q, k, v, g, beta, mask)
    with mx.stream(mx.cpu):
        want = [np.asarray(x) for x in cl.prep_ops(q, k, v, g, beta, mask)]
    for name, got, ref in zip(cs.PREP_OUTPUTS, pieces, want, strict=True):
        assert np.isfinite(got).all(), name
        assert rel_err(got, ref) < TOL, name
    got = run_state(program, tmp_path, pieces, state, T)
    _check(got, gated_delta_np(q, k, v, g, beta, state, mask))
    if mask is not None:
        assert not np.any(got[0][~np.asarray(mask)])


@pytest.mark.parametrize(
    "shape", [SHAPES[1], SHAPES[5]], ids=lambda s: "B{}T{}Dk{}".format(*s[:2], s[4])
)
def test_state_kernel_per_key_gates_matches_numpy(program, tmp_path, shape):
    """Per-key gates: MLX-ops prep (on the CPU), then the state kernel."""
    B, T, Hk, Hv, Dk, Dv = shape
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv, per_key=True)
    mask = _mask(B, T, "pad")
    with mx.stream(mx.cpu):
        pieces = [np.asarray(x) for x in cl.prep_ops(q, k, v, g, beta, mask)]
    got = run_state(program, tmp_path, pieces, state, T)
    _check(got, gated_delta_np(q, k, v, g, beta, state, mask))


def test_kernels_g_zero_strong_decay_and_garbage_in_padding(program, tmp_path):
    """g = 0 (a reset) mid-chunk and at a chunk's first step, decays of 1e-4..0.05 (products far
    below fp32's normal range), and nan / inf in padded slots, which must not leak."""
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
    pieces = run_prep(program, tmp_path, *bad, mask)
    _check(run_state(program, tmp_path, pieces, state, T), want)


# H200, 2026-12-02 (session 10): simt-B1T63Hk1Hv4Dk128Dv64-scalar-nomask of
# test_gpu_chunk_kernel.py failed once (y outside fp32's tolerance, every element finite); it
# passed in session 9's run of the same kernel text. That case (one partial chunk, no mask,
# Dv 64: four state tiles) under the sanitizers: ThreadSanitizer reports any threadgroup
# memory (or output) written by one thread and read or written by another with no barrier
# between them, whatever order the threads ran in; AddressSanitizer any read or write past an
# input or output. Every block's threadgroup memory starts as NaN (compile_emulated), so a read
# before a write shows.
SANITIZED_SHAPE = (1, 63, 1, 4, 128, 64)


# ThreadSanitizer in CI; AddressSanitizer (~25 s) with -m slow
@pytest.mark.parametrize("sanitize", ["thread", pytest.param("address", marks=pytest.mark.slow)])
def test_prep_and_state_kernels_clean_under_sanitizers(tmp_path, sanitize):
    (tmp_path / "build").mkdir()
    exe = build(tmp_path / "build", sanitize)
    B, T, Hk, Hv, Dk, Dv = SANITIZED_SHAPE
    q, k, v, g, beta, state = make_inputs(*SANITIZED_SHAPE)
    pieces = run_prep(exe, tmp_path, q, k, v, g, beta, None)
    _check(run_state(exe, tmp_path, pieces, state, T), gated_delta_np(q, k, v, g, beta, state))


def test_thread_sanitizer_finds_a_missing_barrier(tmp_path, monkeypatch):
    """The check above can fail: STATE_BODY without the barrier between phase 1 (delta and
    Qg S^T to threadgroup memory) and phase 2 (which reads other threads' rows) is reported."""
    body = cl.state_source("cuda")
    anchor = "    gd_barrier();\n\n    // Phase 2"
    assert body.count(anchor) == 1
    (tmp_path / "build").mkdir()
    exe = build(tmp_path / "build", "thread", body.replace(anchor, "\n    // Phase 2"))
    B, T, Hk, Hv, Dk, Dv = 1, 63, 1, 1, 32, 16
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv)
    with mx.stream(mx.cpu):
        pieces = [np.asarray(x) for x in cl.prep_ops(q, k, v, g, beta, None)]
    monkeypatch.setenv("TSAN_OPTIONS", "halt_on_error=1")
    with pytest.raises(AssertionError, match="ThreadSanitizer: data race") as err:
        run_state(exe, tmp_path, pieces, state, T)
    assert "::d4" in str(err.value) or "::y4" in str(err.value)


# A shuffle between a threadgroup-memory write and another lane's read orders nothing on CUDA
# (__shfl_sync is no memory fence): the emulator's ThreadSanitizer build reports that read.
SHUFFLE_NOT_A_FENCE = """
void body(float* out) {
  GD_TG float x[32];
  const int lane = int(threadIdx.x);
  x[lane] = float(lane);
  const float s = gd_group_sum<32>(1.0f);  // every lane meets here, as at a barrier
  out[lane] = x[(lane + 1) % 32] + s;
}
int main() {
  std::vector<float> out(32);
  run_blocks({1, 1, 1}, 32, [&] { body(out.data()); });
  return out[0] == 33.0f ? 0 : 1;
}
"""


def test_thread_sanitizer_shuffle_orders_no_memory(tmp_path, monkeypatch):
    exe = compile_emulated(
        f'#include "{EMULATOR}"\n' + SHUFFLE_NOT_A_FENCE, tmp_path, 300, sanitize="thread"
    )
    monkeypatch.setenv("TSAN_OPTIONS", "halt_on_error=1")
    with pytest.raises(AssertionError, match="ThreadSanitizer: data race"):
        run_program(exe)
    fenced = SHUFFLE_NOT_A_FENCE.replace("out[lane] =", "gd_barrier();\n  out[lane] =")
    (tmp_path / "fenced").mkdir()
    run_program(
        compile_emulated(f'#include "{EMULATOR}"\n' + fenced, tmp_path / "fenced", 300, "thread")
    )


class EmulatedKernel:
    """Stands in for an `mx.fast.cuda_kernel` object: checks the launch (template arguments,
    grid, threadgroup, output shapes) against what the emulated program assumes, then runs the
    program on the inputs, which it takes by the kernel's input names."""

    def __init__(self, program, tmp, name, input_names, output_names, **_):
        self.program, self.tmp, self.name = program, tmp, name
        self.input_names, self.output_names = input_names, output_names

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes, **_):
        x = dict(zip(self.input_names, inputs, strict=True))
        for n, a in x.items():
            dt = {"mask": np.bool_, "dims": np.int32}.get(n, np.float32)
            arr = np.asarray(a.astype(mx.float32) if dt is np.float32 else a, dt)
            (self.tmp / n).write_bytes(arr.tobytes())
        tpl = dict(template)
        preps = {cs.prep_name(f, m): (f, m) for f in (False, True) for m in (False, True)}
        if self.name in preps:
            fused, mma = preps[self.name]
            B, T, Hk, Dk = x["q"].shape
            Hv, Dv = x["v"].shape[2:]
            N = -(-T // C)
            want = {"Dk": Dk, "C": C, "NT": cl.PREP_THREADS, "DS": cl.KEY_SLICE}
            assert tpl == (want | {"MP": 3} if mma else want)
            assert grid == (cl.PREP_THREADS * N, B * Hv, 1)
            assert threadgroup == (cl.PREP_THREADS, 1, 1)
            which = "prep" + ("_fused" if fused else "") + ("_mma" if mma else "")
            args = [which, Dk, B, T, Hk, Hv, Dv]
        elif self.name == cs.STATE_MMA_NAME:
            B, Hv, Dv, Dk = x["state_in"].shape
            T = int(np.asarray(x["dims"])[0])
            N = x["U"].shape[2] // C
            assert x["U"].shape == (B, Hv, N * C, Dv)
            assert tpl == {
                "Dk": Dk,
                "BV": 16,
                "C": C,
                "NT": cl.MMA_THREADS,
                "MP": 3,  # fp32 activations
                "PF": cl.PREFETCH,
                "YT": mx.float32,
            }
            assert grid == (cl.MMA_THREADS * B * Hv, -(-Dv // 16), 1)
            assert threadgroup == (cl.MMA_THREADS, 1, 1)
            args = ["state_mma3", Dk, B, T, Hv, Dv, N]
        else:
            B, Hv, Dv, Dk = x["state_in"].shape
            T = int(np.asarray(x["dims"])[0])
            N = x["U"].shape[2] // C
            assert x["U"].shape == (B, Hv, N * C, Dv)
            assert tpl["Dk"] == Dk and tpl["BV"] == cl.BV and tpl["C"] == C
            assert tpl["NT"] == cl.STATE_THREADS and tpl["YT"] == mx.float32
            assert tpl["PF"] == cl.PREFETCH == 1
            assert grid == (cl.STATE_THREADS * B * Hv, -(-Dv // cl.BV), 1)
            assert threadgroup == (cl.STATE_THREADS, 1, 1)
            args = ["state", Dk, B, T, Hv, Dv, N]
        subprocess.run([str(self.program), args[0], str(self.tmp), *map(str, args[1:])], check=True)
        outs = []
        for n, shape, dt in zip(self.output_names, output_shapes, output_dtypes, strict=True):
            assert dt == mx.float32
            outs.append(mx.array(np.fromfile(self.tmp / n, np.float32).reshape(shape)))
        return outs


@pytest.mark.parametrize("matrix", [False, True], ids=["simt", "mma"])
@pytest.mark.parametrize("prep", ["kernel", "ops"])
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
def test_host_launch_through_emulator(program, tmp_path, monkeypatch, prep, per_key, matrix):
    """gated_delta_chunk_kernel's host side (input order, shapes, grids, template arguments)
    with the kernels run by the emulator; both state passes (MATRIX off and on)."""
    if per_key and prep == "kernel":
        pytest.skip("the prep kernel takes scalar gates only")
    monkeypatch.setattr(cl, "MATRIX", matrix)
    monkeypatch.setattr(cl, "SPLIT", False)  # the two-kernel path (the split one: its own file)
    monkeypatch.setattr(cl, "_kernels", {})
    monkeypatch.setattr(
        cl, "_factory", lambda backend: lambda **kw: EmulatedKernel(program, tmp_path, **kw)
    )
    B, T, Hk, Hv, Dv = 3, 100, 1, 2, 20
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, DK, Dv, per_key=per_key)
    mask = _mask(B, T, "pad")
    with mx.stream(mx.cpu):
        y, s = cl.gated_delta_chunk_kernel(q, k, v, g, beta, state, mask, backend="cuda", prep=prep)
    assert y.shape == (B, T, Hv, Dv) and s.shape == (B, Hv, Dv, DK)
    _check((np.asarray(y), np.asarray(s)), gated_delta_np(q, k, v, g, beta, state, mask))


@pytest.mark.parametrize("matrix", [False, True], ids=["simt", "mma"])
def test_fused_gating_prep_through_emulator(program, tmp_path, monkeypatch, matrix):
    """gated_delta_update_chunk_kernel: the gates computed in the prep kernel (fused variant)
    match compute_gates + the float64 loop, including gates that underflow to exactly 0."""
    monkeypatch.setattr(cl, "MATRIX", matrix)
    monkeypatch.setattr(cl, "SPLIT", False)  # the two-kernel path (the split one: its own file)
    monkeypatch.setattr(cl, "_kernels", {})
    monkeypatch.setattr(
        cl, "_factory", lambda backend: lambda **kw: EmulatedKernel(program, tmp_path, **kw)
    )
    B, T, Hk, Hv, Dv = 2, 70, 1, 2, 20
    q, k, v, _, _, state = make_inputs(B, T, Hk, Hv, DK, Dv)
    a, b, A_log, dt_bias = make_gate_inputs(B, T, Hv)
    a = np.array(a)
    a[:, ::9] = 80.0  # softplus(80) * exp(A_log) >> 104: g underflows to exactly 0
    a = mx.array(a)
    A_log = mx.full(A_log.shape, 2.0)
    mask = _mask(B, T, "pad")
    with mx.stream(mx.cpu):
        g, beta = compute_gates(a, b, A_log, dt_bias)
        y, s = cl.gated_delta_update_chunk_kernel(
            q, k, v, a, b, A_log, dt_bias, state, mask, backend="cuda"
        )
    assert (np.array(g)[:, ::9] == 0.0).all()
    _check((np.asarray(y), np.asarray(s)), gated_delta_np(q, k, v, g, beta, state, mask))


def test_prep_ops_per_key_groups_equal_one_group(monkeypatch):
    """Per-key pieces are built a few chunks at a time (memory): one chunk per group gives the
    same pieces as all at once."""
    from qwen35_mlx.kernels.gated_delta import chunked as ch

    x = make_inputs(2, 200, 1, 2, 32, 16, per_key=True)
    mask = _mask(2, 200, "pad")
    whole = cl.prep_ops(*x[:5], mask)
    monkeypatch.setattr(ch, "_PER_KEY_GROUP_ELEMS", 2 * 2 * C * C * 32)
    for a, b in zip(whole, cl.prep_ops(*x[:5], mask), strict=True):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))


# The state pass on matrix units (STATE_MMA_BODY), its tile operations emulated with CUDA's
# fragment layout and tf32 roundings (lane_emulator.h): MP 3 (three tf32 products) is the fp32
# activations' variant and must meet fp32's tolerance; MP 1 (tf32 operands) is bf16 / fp16's.


@pytest.mark.parametrize(
    "shape,masked",
    CASES,
    ids=lambda c: (
        "B{}T{}Hk{}Hv{}Dk{}Dv{}".format(*c) if isinstance(c, tuple) else ("mask" if c else "nomask")
    ),
)
def test_state_mma_kernel_matches_numpy(program, tmp_path, shape, masked):
    """Both threadgroup widths (16 value rows; 32, CUDA only: Dv below, at and above it)."""
    B, T, Hk, Hv, Dk, Dv = shape
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv)
    mask = _mask(B, T, "pad" if masked else None)
    pieces = run_prep(program, tmp_path, q, k, v, g, beta, mask)
    want = gated_delta_np(q, k, v, g, beta, state, mask)
    for which in ("state_mma3", "state_mma3_bv32"):
        got = run_state(program, tmp_path, pieces, state, T, which)
        _check(got, want)
        if mask is not None:
            assert not np.any(got[0][~np.asarray(mask)])


@pytest.mark.parametrize(
    "shape,masked",
    CASES,
    ids=lambda c: (
        "B{}T{}Hk{}Hv{}Dk{}Dv{}".format(*c) if isinstance(c, tuple) else ("mask" if c else "nomask")
    ),
)
def test_prep_mma_kernel_matches_ops_and_numpy(program, tmp_path, shape, masked):
    """PREP_BODY with GD_MMA (k k^T, q k^T on the tile layer, MP 3): its pieces against the
    MLX-ops pieces, then with the matrix state pass against the float64 loop."""
    B, T, Hk, Hv, Dk, Dv = shape
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv)
    mask = _mask(B, T, "pad" if masked else None)
    pieces = run_prep(program, tmp_path, q, k, v, g, beta, mask, "prep_mma")
    with mx.stream(mx.cpu):
        want = [np.asarray(x) for x in cl.prep_ops(q, k, v, g, beta, mask)]
    for name, got, ref in zip(cs.PREP_OUTPUTS, pieces, want, strict=True):
        assert np.isfinite(got).all(), name
        assert rel_err(got, ref) < TOL, name
    got = run_state(program, tmp_path, pieces, state, T, "state_mma3")
    _check(got, gated_delta_np(q, k, v, g, beta, state, mask))


@pytest.mark.parametrize(
    "shape", [SHAPES[1], SHAPES[5]], ids=lambda s: "B{}T{}Dk{}".format(*s[:2], s[4])
)
def test_state_mma_kernel_per_key_gates_matches_numpy(program, tmp_path, shape):
    B, T, Hk, Hv, Dk, Dv = shape
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv, per_key=True)
    mask = _mask(B, T, "pad")
    with mx.stream(mx.cpu):
        pieces = [np.asarray(x) for x in cl.prep_ops(q, k, v, g, beta, mask)]
    got = run_state(program, tmp_path, pieces, state, T, "state_mma3")
    _check(got, gated_delta_np(q, k, v, g, beta, state, mask))


@pytest.mark.parametrize("prep", ["prep", "prep_mma"])
def test_state_mma_kernel_g_zero_strong_decay_and_garbage_in_padding(program, tmp_path, prep):
    """The matrix state pass after either prep kernel (k k^T, q k^T on lanes or on the tile
    layer): g = 0, strong decay, NaN / inf in the padded positions."""
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
    pieces = run_prep(program, tmp_path, *bad, mask, prep)
    _check(run_state(program, tmp_path, pieces, state, T, "state_mma3"), want)


def test_state_mma_tf32_operands_within_bf16_tolerance_not_fp32(program, tmp_path):
    """MP 1 (what bf16 / fp16 activations run): one tf32 product per term. Its error must fit
    the bf16 tolerance, and (a check that the emulated rounding is real) miss fp32's, which
    MP 3 meets on the same inputs. Dk = 128, 200 steps (4 chunks: the state carries the error)."""
    B, T, Hk, Hv, Dk, Dv = 1, 200, 1, 2, 128, 32
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv)
    y_np, s_np = gated_delta_np(q, k, v, g, beta, state)
    pieces = run_prep(program, tmp_path, q, k, v, g, beta, None)
    y1, s1 = run_state(program, tmp_path, pieces, state, T, "state_mma1")
    y3, s3 = run_state(program, tmp_path, pieces, state, T, "state_mma3")
    err1 = max(rel_err(y1, y_np), rel_err(s1, s_np))
    err3 = max(rel_err(y3, y_np), rel_err(s3, s_np))
    assert err1 < RTOL[mx.bfloat16] / 4, err1
    assert err1 > TOL, err1
    assert err3 < TOL, err3
