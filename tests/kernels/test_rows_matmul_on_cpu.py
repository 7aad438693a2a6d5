"""The few-rows matmul kernel (`kernels/rows_matmul.py`) without a GPU.

- Its CUDA text (prologue + body, the text the GPU compiles) run on the CPU by the lane emulator
  (tests/kernels/lane_emulator.h) in fp32 and bf16, R = 1..8 rows, N not a multiple of a
  threadgroup's columns, K at each of MLX's gemv load widths (NPT 4, 2, 1), the weight read at
  an offset into a larger buffer (a view): against a float64 NumPy product, and bit for bit
  against a NumPy model of MLX's gemv order (per-lane fp32 sums, a warp butterfly). Outputs
  start as NaN, so an element the body fails to write fails. A body broken on purpose fails.
- Its Metal text type-checked against tests/kernels/metal_stub.h, its CUDA text compiled by nvcc
  (and as the self-contained NVRTC source) where nvcc is installed.
- The ops path (the CPU's): x @ W.T.
"""

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels import rows_matmul
from tests.kernels.helpers import GXX, compile_emulated, cpu_device, np64, runner_program  # noqa: F401

pytestmark = pytest.mark.usefixtures("cpu_device")

NVCC = shutil.which("nvcc")
CT = {"fp32": "float", "bf16": "bf16"}
N, OFFSET, WARPS, COLS = 13, 3, 2, 2  # 13 columns: the last threadgroup's tile of 4 part-full
# (rows, K, dtype): every R at NPT 4 (K 256) in bf16 and NPT 2 (K 192) in fp32, NPT 1 (K 40).
CASES = [(R, 256, "bf16") for R in range(1, 9)] + [(R, 192, "fp32") for R in range(1, 9)]
CASES += [(3, 40, "bf16"), (8, 40, "fp32"), (5, 256, "fp32"), (2, 192, "bf16")]
# The "ahead" variant (AHEAD_BODY): (rows, K, dtype, U, columns a warp). U dividing the chunks
# a lane has (K 1024: 8), not dividing them (K 1024, U 3; K 192 at NPT 2: 3 chunks, U 2), the
# lanes' part-full chunk (K 40 at NPT 1), U 1; one and two columns a warp; every R once.
AHEAD_CASES = [(R, 1024, "bf16", 8, 1) for R in (1, 2, 5, 8)] + [(3, 1024, "fp32", 3, 1)]
AHEAD_CASES += [(2, 192, "fp32", 2, 1), (7, 192, "bf16", 3, 2), (4, 40, "bf16", 1, 1)]
AHEAD_CASES += [(6, 40, "fp32", 1, 2), (3, 256, "bf16", 2, 2), (8, 1024, "fp32", 4, 2)]

RM_LOAD = """
template <int NPT, typename T>
inline bool rm_aligned(const T* p) {
  return (reinterpret_cast<size_t>(p) & (NPT * sizeof(T) - 1)) == 0;
}
template <int NPT, bool VEC, typename T>
inline void rm_load(const T* p, float* out) {
  for (int j = 0; j < NPT; ++j) out[j] = static_cast<float>(p[j]);
}
"""


def _runner(i: int, R: int, K: int, ctype: str, body: str, U=None, cols=COLS) -> str:
    """run_<i>(x file, w file, y file): one variant on float32 files; W read from row OFFSET.
    U: the "ahead" body's chunks a lane loads ahead (a template constant before T)."""
    npt = rows_matmul.elements_a_load(K)
    u_param, u_arg = ("int U, ", f"{U}, ") if U is not None else ("", "")
    return f"""
namespace v{i} {{
template <int R, int K, int N, int C, int NPT, int W, {u_param}typename T>
void kernel(const T* x, const T* w, T* y) {{
{body}
}}
}}  // namespace v{i}

void run_{i}(char** argv) {{
  auto as_t = [](const std::vector<char>& v) {{
    const float* f = reinterpret_cast<const float*>(v.data());
    std::vector<{ctype}> t;
    for (size_t j = 0; j < v.size() / 4; ++j) t.push_back({ctype}(f[j]));
    return t;
  }};
  auto x = as_t(read(argv[0])), w = as_t(read(argv[1]));
  std::vector<{ctype}> y(size_t({R}) * {N}, {ctype}(NAN));
  constexpr int warps = (({N} + {cols} - 1) / {cols} + {WARPS} - 1) / {WARPS};
  run_grid({{unsigned(warps), 1, 1}}, {WARPS}, [&] {{
    v{i}::kernel<{R}, {K}, {N}, {cols}, {npt}, {WARPS}, {u_arg}{ctype}>(
        x.data(), w.data() + size_t({OFFSET}) * {K}, y.data());
  }});
  std::vector<float> yf(y.begin(), y.end());
  std::ofstream(argv[2], std::ios::binary).write((char*)yf.data(), yf.size() * 4);
}}
"""


# The ahead header's CUDA helpers (rm_copy_x, the staging's alignment) as plain C++.
AHEAD_PRELUDE = """
#define __device__
#define __forceinline__ inline
#define __align__(n) alignas(n)
"""


def _program(tmp, replace=None, ahead=False, xs_bytes=None):
    """xs_bytes: RM_XS_BYTES for the ahead body (0: x never staged)."""
    body = rows_matmul.kernel_source("cuda", ahead=ahead)
    if replace is not None:
        assert replace[0] in body
        body = body.replace(*replace)
    if ahead:
        runners = "".join(
            _runner(i, R, K, CT[dt], body, U=U, cols=c)
            for i, (R, K, dt, U, c) in enumerate(AHEAD_CASES)
        )
        n = len(AHEAD_CASES)
    else:
        runners = "".join(_runner(i, R, K, CT[dt], body) for i, (R, K, dt) in enumerate(CASES))
        n = len(CASES)
    if ahead:
        limit = "" if xs_bytes is None else f"#define RM_XS_BYTES {xs_bytes}\n"
        runners = AHEAD_PRELUDE + limit + rows_matmul.AHEAD_CUDA_HEADER + runners
    runners = RM_LOAD + runners
    return compile_emulated(runner_program(runners, n), tmp, timeout=900)


def _as(a, dt):
    """a as the kernel sees it in dtype dt (bf16: rounded to nearest even), float32."""
    if dt == "fp32":
        return a.astype(np.float32)
    return np.asarray(mx.array(a).astype(mx.bfloat16).astype(mx.float32))


def _inputs(R, K, dt, seed):
    rng = np.random.default_rng(seed)
    x = _as(rng.normal(size=(R, K)).astype(np.float32), dt)
    w = _as((rng.normal(size=(N + OFFSET + 2, K)) / np.sqrt(K)).astype(np.float32), dt)
    return x, w  # the kernel reads W = w[OFFSET : OFFSET + N]


def _run(exe, tmp, cases=CASES):
    out = {}
    for i, (R, K, dt, *_) in enumerate(cases):
        x, w = _inputs(R, K, dt, seed=i)
        files = [str(tmp / f"{n}{i}.bin") for n in ("x", "w", "y")]
        x.tofile(files[0])
        w.tofile(files[1])
        cmd = [str(exe), str(i), *files]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        out[i] = np.fromfile(files[2], np.float32).reshape(R, N)
    return out


def gemv_order_np(x, W):
    """float32 y = x @ W.T summed as MLX's CUDA gemv sums one row: lane l adds
    W[n, k] x[k] over k = NPT l + j + 32 NPT i (i, then j, ascending) into an fp32 sum, then
    the warp's butterfly (offsets 16, 8, .., 1). The products of 16-bit values are exact in
    fp32; for fp32 inputs this is the unfused order (the emulator's)."""
    R, K = x.shape
    npt = rows_matmul.elements_a_load(K)
    x32, W32 = x.astype(np.float32), W.astype(np.float32)
    lanes = np.zeros((32, R, W.shape[0]), np.float32)
    for lane in range(32):
        for k0 in range(npt * lane, K, 32 * npt):
            for j in range(npt):
                prod = x32[:, k0 + j, None] * W32[None, :, k0 + j]
                lanes[lane] = (lanes[lane] + prod).astype(np.float32)
    o = 16
    while o:
        lanes = (lanes + lanes[np.arange(32) ^ o]).astype(np.float32)
        o //= 2
    return lanes[0]


def _bf16(a):
    return np64(mx.array(np.asarray(a, np.float32)).astype(mx.bfloat16))


def _check(out, cases=CASES):
    """(case, what) for each failing case: against float64 (fp32: a few ulps; bf16: one
    rounding of the fp32 sum, two ulps at most where float64 and the fp32 sum straddle a tie)
    and bit for bit against the gemv-order model."""
    bad = []
    for i, (R, K, dt, *_) in enumerate(cases):
        x, w = _inputs(R, K, dt, seed=i)
        W = w[OFFSET : OFFSET + N]
        got = out[i]
        want = np64(x) @ np64(W).T
        scale = np.sqrt((np64(x) ** 2).sum(1, keepdims=True) / K)  # |x| / sqrt(K): y's size
        err = np.abs(got - want) / (np.abs(want) + 1e-2 * scale)
        top = 2e-5 if dt == "fp32" else 8e-3
        if not np.all(np.isfinite(got)) or err.max() > top:
            bad.append((cases[i], "float64", float(err.max())))
        exact = gemv_order_np(x, W)
        if dt == "bf16":
            exact = _bf16(exact).astype(np.float32)
        if not np.array_equal(got, exact):
            bad.append((cases[i], "order", float(np.abs(got - exact).max())))
    return bad


@pytest.mark.skipif(GXX is None, reason="needs g++")
def test_rows_matmul_kernel_on_the_lane_emulator(tmp_path):
    bad = _check(_run(_program(tmp_path), tmp_path))
    assert not bad, bad


@pytest.mark.skipif(GXX is None, reason="needs g++")
def test_lane_emulator_check_can_fail(tmp_path):
    """The last tile's columns all reading the tile's first row: every case fails."""
    exe = _program(tmp_path, replace=("rm_n0 + c < N ? rm_n0 + c : N - 1", "rm_n0"))
    bad = _check(_run(exe, tmp_path))
    assert {case for case, *_ in bad} == set(CASES)


@pytest.mark.skipif(GXX is None, reason="needs g++")
@pytest.mark.parametrize("xs_bytes", [None, 0], ids=["x-staged", "x-global"])
def test_ahead_variant_on_the_lane_emulator(tmp_path, xs_bytes):
    """The "ahead" body: the same sums in the same order as MLX's gemv, bit for bit; x staged
    in threadgroup memory (every case fits the default RM_XS_BYTES) and read from global."""
    exe = _program(tmp_path, ahead=True, xs_bytes=xs_bytes)
    bad = _check(_run(exe, tmp_path, AHEAD_CASES), AHEAD_CASES)
    assert not bad, bad


@pytest.mark.skipif(GXX is None, reason="needs g++")
def test_ahead_variant_check_can_fail(tmp_path):
    """Broken on purpose, the one-at-a-time loop starting a chunk late (the chunks past the last
    group of U lost): every case with such chunks fails (every lane's, or K 40's lanes 0-7),
    and only those."""
    broken = ("for (; k < K; k += RM_STEP) {", "for (k += RM_STEP; k < K; k += RM_STEP) {")
    bad = _check(_run(_program(tmp_path, broken, ahead=True), tmp_path, AHEAD_CASES), AHEAD_CASES)
    want = set()
    for R, K, dt, U, c in AHEAD_CASES:
        chunks = K // (32 * rows_matmul.elements_a_load(K))
        if chunks % U or K % (32 * rows_matmul.elements_a_load(K)):
            want.add((R, K, dt, U, c))
    assert want and want != set(AHEAD_CASES)
    assert {case for case, *_ in bad} == want


def test_chunks_ahead():
    """U: at most `ahead` and the chunks a lane has, a divisor of them where one is near."""
    assert [rows_matmul.chunks_ahead(K, 8) for K in (40, 192, 256, 1024, 3584)] == [1, 3, 2, 8, 7]
    assert rows_matmul.chunks_ahead(32 * 4 * 11, 8) == 8  # 11 chunks: no divisor in 5..8
    assert rows_matmul.chunks_ahead(4096, 4) == 4


def test_gemv_order_model_is_the_product():
    """The order model itself against float64 (so the bit-for-bit check tests the kernel)."""
    x, w = _inputs(3, 192, "fp32", seed=0)
    got = gemv_order_np(x, w)
    assert np.allclose(got, np64(x) @ np64(w).T, rtol=1e-5, atol=1e-6)


def test_ops_path_is_x_times_w_transposed():
    """On the CPU both entry points are MLX's product, in x's form ([R, K] or [R, K, 1])."""
    key = mx.random.split(mx.random.key(0), 2)
    x = mx.random.normal((3, 64), key=key[0]).astype(mx.bfloat16)
    w = mx.random.normal((20, 64), key=key[1]).astype(mx.bfloat16)
    with mx.stream(mx.cpu):
        want = x @ w.T
        assert not rows_matmul.kernel_available(x.dtype)
        assert mx.array_equal(rows_matmul.rows_matmul(x, w), want).item()
        assert mx.array_equal(rows_matmul.rows_matmul_t(x, w.T), want).item()
        cols = rows_matmul.rows_matmul_t(x.reshape(3, 64, 1), w.T)
        assert cols.shape == (3, 20, 1)
        assert mx.array_equal(cols.reshape(3, 20), want).item()


def test_ahead_switch_picks_the_variant_and_its_launch(monkeypatch):
    """AHEAD 0: the first kernel as before (C 2, 4 warps, no U); AHEAD 8: the "ahead" build,
    U from `chunks_ahead`, one column a warp up to 4 rows and two above, 8 warps a threadgroup,
    the grid covering N. (The kernel objects stood in by a recorder.)"""
    seen = []

    def build(contiguous, ahead=False):
        def kernel(**kw):
            seen.append((contiguous, ahead, dict(kw["template"]), kw["grid"], kw["threadgroup"]))
            return [mx.zeros(kw["output_shapes"][0], kw["output_dtypes"][0])]

        return kernel

    monkeypatch.setattr(rows_matmul, "_build", build)
    monkeypatch.setattr(rows_matmul, "kernel_available", lambda dtype: True)
    K, N = 1024, 1001
    w = mx.zeros((N, K), mx.bfloat16)
    for ahead, R in ((0, 2), (8, 2), (8, 4), (8, 5), (3, 8)):
        monkeypatch.setattr(rows_matmul, "AHEAD", ahead)
        y = rows_matmul.rows_matmul_t(mx.zeros((R, K), mx.bfloat16), w.T)
        assert y.shape == (R, N)
        contiguous, built_ahead, tpl, grid, group = seen.pop()
        assert not contiguous and built_ahead == bool(ahead)
        if not ahead:
            assert "U" not in tpl and tpl["C"] == 2 and tpl["W"] == 4 and group == (32, 4, 1)
            continue
        C = 1 if R <= 4 else 2
        assert tpl["U"] == rows_matmul.chunks_ahead(K, ahead) and tpl["C"] == C
        assert tpl["W"] == 8 and group == (32, 8, 1)
        assert grid == (32 * -(-N // (8 * C)), 8, 1)
        assert list(tpl)[-1] == "T" and tpl["R"] == R


# --- compile checks: Metal against the stub, CUDA with nvcc ---


def _metal_unit(body: str, ahead: bool = False) -> str:
    from tests.kernels.test_metal_source import METAL_ATTRIBUTES, STUB

    params = ["  const device T* x /* buffer(0) */", "  const device T* w /* buffer(1) */"]
    params += ["  device T* y"]
    params += [f"  {t} {a}" for a, t in METAL_ATTRIBUTES.items() if a in body]
    fn = "custom_kernel_rows_matmul"
    # R, K, N, C, NPT, W, (the ahead body's U,) T
    consts = [("2, 1024, 6144, 2, 4, 4", 8, "bfloat16_t"), ("8, 192, 13, 1, 2, 4", 3, "float16_t")]
    consts += [("3, 40, 5, 2, 1, 2", 1, "float")]
    args = [f"{c}, {U}, {t}" if ahead else f"{c}, {t}" for c, U, t in consts]
    u = "int U, " if ahead else ""
    inst = "\n".join(f"template decltype({fn}<{a}>) {fn}<{a}>;" for a in args)
    return (
        f'#include "{STUB}"\n{rows_matmul.header("metal", ahead)}\n'
        f"template <int R, int K, int N, int C, int NPT, int W, {u}typename T>\nvoid {fn}(\n"
        + ",\n".join(params)
        + f") {{\n{body}\n}}\n\n{inst}\n"
    )


@pytest.mark.skipif(GXX is None, reason="needs g++")
@pytest.mark.parametrize("ahead", [False, True], ids=["first", "ahead"])
def test_metal_source_compiles(tmp_path, ahead):
    from tests.kernels.test_metal_source import compile_errors

    body = rows_matmul.kernel_source("metal", ahead=ahead)
    for attr in ("thread_position_in_threadgroup", "threadgroup_position_in_grid"):
        assert attr in body  # named in `source`, so MLX declares them
    err = compile_errors(_metal_unit(body, ahead), tmp_path)
    assert not err, err
    broken = body.replace("rm_load<NPT, true>(", "load_missing<NPT, true>(")
    assert compile_errors(_metal_unit(broken, ahead), tmp_path)


def _cuda_unit(broken: bool = False, ahead: bool = False) -> str:
    from tests.kernels.test_cuda_source import CTYPES, PRELUDE

    body = rows_matmul.kernel_source("cuda", ahead=ahead)
    if broken:
        body = body.replace("gd_shuffle(", "shuffle_missing(")
    kernels = []
    for i, (t, R, K) in enumerate(
        (CTYPES[a], R, K) for a in CTYPES for R, K in ((1, 1024), (8, 3584), (3, 40))
    ):
        npt = rows_matmul.elements_a_load(K)
        consts = f"  constexpr int R = {R}, K = {K}, N = 1000, C = 2, NPT = {npt}, W = 4;\n"
        if ahead:
            consts = consts.replace("C = 2", "C = 1").replace("W = 4", "W = 8")
            consts += f"  constexpr int U = {rows_matmul.chunks_ahead(K, 8)};\n"
        kernels.append(
            f"__global__ void k{i}(const {t}* x, const {t}* w, {t}* y) {{\n"
            f"{consts}  using T = {t};\n{body}}}\n"
        )
    return PRELUDE + rows_matmul.header("cuda", ahead) + "".join(kernels)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("ahead", [False, True], ids=["first", "ahead"])
def test_cuda_source_compiles_with_nvcc(tmp_path, ahead):
    from tests.kernels.test_cuda_source import nvcc_errors

    err = nvcc_errors(_cuda_unit(ahead=ahead), tmp_path)
    assert not err, err
    assert nvcc_errors(_cuda_unit(broken=True, ahead=ahead), tmp_path)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("ahead", [False, True], ids=["first", "ahead"])
def test_precompiled_source_compiles_to_ptx(tmp_path, ahead):
    """The self-contained source the GPU process compiles with NVRTC (`precompiled.entry_source`:
    no MLX headers, its own bf16 / fp16 types) compiles to PTX with its entry, every dtype."""
    from qwen35_mlx.kernels.gated_delta import precompiled
    from tests.kernels.helpers import nvcc_ptx

    for dt in (mx.float32, mx.bfloat16, mx.float16):
        tpl = [("R", 2), ("K", 1024), ("N", 6144), ("C", 2), ("NPT", 4), ("W", 4), ("T", dt)]
        name = "qm_rows_matmul_ahead" if ahead else "qm_rows_matmul"
        if ahead:
            tpl[3], tpl[5] = ("C", 1), ("W", 8)
            tpl.insert(-1, ("U", 8))
        src = precompiled.entry_source(
            name, rows_matmul.header("cuda", ahead), rows_matmul.kernel_source("cuda", ahead),
            rows_matmul.INPUTS, [dt, dt], [2, 2], rows_matmul.OUTPUTS, [dt], tpl,
        )  # fmt: skip
        assert "#include" not in src
        text = nvcc_ptx(src, tmp_path, timeout=300)
        assert precompiled.entry_name(name, tpl) in text
        if dt != mx.float32:  # W's chunk of 4 16-bit elements: one 8-byte load
            loads = ("ld.global.v2.u32", "ld.global.u64", "ld.global.v4.u16", "ld.global.v2.b32")
            assert any(ld in text for ld in loads), text[-2000:]
