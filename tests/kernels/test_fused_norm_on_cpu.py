"""The fused add + RMSNorm and swiglu kernels (`kernels/fused_norm.py`) without a GPU.

- Their CUDA text (prologue + body, the text the GPU compiles) run on the CPU by the lane
  emulator (tests/kernels/lane_emulator.h) in fp32 and bf16, against a float64 NumPy reference;
  outputs start as NaN, so an element the body fails to write fails the comparison. A body
  broken on purpose (dividing by D + 1) must fail the same comparison.
- Their Metal text type-checked against tests/kernels/metal_stub.h, their CUDA text compiled by
  nvcc for sm_90 where nvcc is installed.
- The ops path (the CPU's): the same values as an add and `mx.fast.rms_norm`.
"""

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels import fused_norm
from qwen35_mlx.kernels.gated_delta import cuda, metal
from tests.kernels.helpers import GXX, compile_emulated, cpu_device, np64, runner_program  # noqa: F401

pytestmark = pytest.mark.usefixtures("cpu_device")

NVCC = shutil.which("nvcc")
CT = {"fp32": "float", "bf16": "bf16"}


def add_rms_norm_np(x, d, w, eps):
    s = np64(x) + np64(d)
    r = 1.0 / np.sqrt((s * s).mean(-1, keepdims=True) + eps)
    return s, s * r * np64(w)


def swiglu_np(gu):
    g, u = np.split(np64(gu), 2, axis=-1)
    return g / (1.0 + np.exp(-g)) * u


def _runner(i: int, name: str, ctype: str, body: str) -> str:
    """run_<i>(argv): kernel `name` with activations in ctype on float32 files; shapes after."""
    if name == "add_rms_norm":
        sig = "const T* x, const T* d, const T* w, const float* eps, T* s, T* n"
        tmpl = "template <int D, int W, typename T>"
        return f"""
namespace v{i} {{
{tmpl}
void kernel({sig}) {{
{body}
}}
}}  // namespace v{i}

void run_{i}(char** argv) {{
  const int rows = std::stoi(argv[4]), D = std::stoi(argv[5]);
  auto xf = read(argv[0]), df = read(argv[1]), wf = read(argv[2]), ef = read(argv[3]);
  auto as_t = [](const std::vector<char>& v) {{
    const float* f = reinterpret_cast<const float*>(v.data());
    std::vector<{ctype}> t;
    for (size_t j = 0; j < v.size() / 4; ++j) t.push_back({ctype}(f[j]));
    return t;
  }};
  auto x = as_t(xf), d = as_t(df), w = as_t(wf);
  std::vector<{ctype}> s(size_t(rows) * D, {ctype}(NAN)), n(size_t(rows) * D, {ctype}(NAN));
  constexpr int W = 2;
  run_grid({{unsigned(rows), 1, 1}}, W, [&] {{
    v{i}::kernel<DCONST, W, {ctype}>(x.data(), d.data(), w.data(),
        reinterpret_cast<const float*>(ef.data()), s.data(), n.data());
  }});
  std::vector<float> sf(s.begin(), s.end()), nf(n.begin(), n.end());
  std::ofstream(argv[6], std::ios::binary).write((char*)sf.data(), sf.size() * 4);
  std::ofstream(argv[7], std::ios::binary).write((char*)nf.data(), nf.size() * 4);
}}
"""
    return f"""
namespace v{i} {{
template <int I, int W, typename T>
void kernel(const T* gu, T* out) {{
{body}
}}
}}  // namespace v{i}

void run_{i}(char** argv) {{
  const int rows = std::stoi(argv[1]), I2 = std::stoi(argv[2]);
  auto gf = read(argv[0]);
  const float* f = reinterpret_cast<const float*>(gf.data());
  std::vector<{ctype}> gu;
  for (size_t j = 0; j < gf.size() / 4; ++j) gu.push_back({ctype}(f[j]));
  std::vector<{ctype}> out(size_t(rows) * (I2 / 2), {ctype}(NAN));
  constexpr int W = 2, I = ICONST;
  const unsigned blocks = (I + 32 * W - 1) / (32 * W);
  run_grid({{unsigned(rows), blocks, 1}}, W, [&] {{
    v{i}::kernel<I, W, {ctype}>(gu.data(), out.data());
  }});
  std::vector<float> of(out.begin(), out.end());
  std::ofstream(argv[3], std::ios::binary).write((char*)of.data(), of.size() * 4);
}}
"""


# rows, D (add_rms_norm: D not a multiple of the 64 threads, so a partial last pass) and I
# (swiglu: not a multiple of a threadgroup's 64 columns).
ROWS, D, I = 3, 200, 150
VARIANTS = [(name, dt) for name in ("add_rms_norm", "swiglu") for dt in CT]


def _program(tmp, replace=None):
    runners = ""
    for i, (name, dt) in enumerate(VARIANTS):
        body = fused_norm.kernel_source(name, "cuda")
        if replace is not None:
            body = body.replace(*replace)
        runners += _runner(i, name, CT[dt], body)
    text = runner_program(runners, len(VARIANTS))
    text = text.replace("DCONST", str(D)).replace("ICONST", str(I))
    return compile_emulated(text, tmp, timeout=600)


def _inputs(dt):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(ROWS, D)).astype(np.float32)
    d = (0.5 * rng.normal(size=(ROWS, D))).astype(np.float32)
    w = (1.0 + 0.3 * rng.normal(size=(D,))).astype(np.float32)
    gu = (2.0 * rng.normal(size=(ROWS, 2 * I))).astype(np.float32)
    if dt == "bf16":  # the inputs as the kernel sees them
        x, d, w, gu = (
            np.asarray(mx.array(a).astype(mx.bfloat16).astype(mx.float32)) for a in (x, d, w, gu)
        )
    return x, d, w, gu


def _run(exe, tmp):
    """Every variant's outputs: {(name, dtype): [arrays]}."""
    eps = 1e-6
    out = {}
    for i, (name, dt) in enumerate(VARIANTS):
        x, d, w, gu = _inputs(dt)
        files = []
        for j, a in enumerate((x, d, w, np.array([eps], np.float32), gu)):
            f = tmp / f"in{i}_{j}.bin"
            a.astype(np.float32).tofile(f)
            files.append(str(f))
        if name == "add_rms_norm":
            o = [str(tmp / f"o{i}_{k}.bin") for k in range(2)]
            args = files[:4] + [str(ROWS), str(D)] + o
        else:
            o = [str(tmp / f"o{i}_0.bin")]
            args = [files[4], str(ROWS), str(2 * I)] + o
        res = subprocess.run([str(exe), str(i), *args], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        out[name, dt] = [np.fromfile(f, np.float32).reshape(ROWS, -1) for f in o]
    return out


def _bf16(a):
    """a rounded to bfloat16 (to nearest even), as float64."""
    return np64(mx.array(np.asarray(a, np.float32)).astype(mx.bfloat16))


def _reference(name, dt, x, d, w, gu):
    """float64 results; in bf16 with the kernels' roundings applied (the sum, the normalised
    value, the output), so a wrong formula shows as a bias over every element."""
    if name == "swiglu":
        y = swiglu_np(gu)
        return [_bf16(y) if dt == "bf16" else y]
    if dt == "fp32":
        return add_rms_norm_np(x, d, w, 1e-6)
    s = _bf16(np64(x) + np64(d))
    r = 1.0 / np.sqrt((s * s).mean(-1, keepdims=True) + 1e-6)
    return [s, _bf16(np64(w) * _bf16(s * r))]


# fp32: within a few ulps of float64. bf16: a rounding may flip where the fp32 kernel and the
# float64 reference straddle a tie (one ulp, 2^-8 relative), so the bound on the largest error
# is two ulps, and on the mean error far below what a biased formula gives (D + 1 for D: 1.2e-3).
TOL = {"fp32": (2e-5, 2e-5), "bf16": (8e-3, 2e-4)}


def _check(out):
    bad = []
    for (name, dt), got in out.items():
        x, d, w, gu = _inputs(dt)
        for g, r in zip(got, _reference(name, dt, x, d, w, gu), strict=True):
            err = np.abs(g - r) / (np.abs(r) + 1e-2)
            top, mean = TOL[dt]
            if not np.all(np.isfinite(g)) or err.max() > top or err.mean() > mean:
                bad.append((name, dt, float(err.max()), float(err.mean())))
    return bad


@pytest.mark.skipif(GXX is None, reason="needs g++")
def test_fused_norm_kernels_on_the_lane_emulator(tmp_path):
    bad = _check(_run(_program(tmp_path), tmp_path))
    assert not bad, bad


@pytest.mark.skipif(GXX is None, reason="needs g++")
def test_lane_emulator_check_can_fail(tmp_path):
    """The mean over D + 1 elements instead of D: every add_rms_norm variant must fail."""
    exe = _program(tmp_path, replace=("fn_total / float(D)", "fn_total / float(D + 1)"))
    bad = _check(_run(exe, tmp_path))
    assert {(n, dt) for n, dt, *_ in bad} == {("add_rms_norm", dt) for dt in CT}


def test_ops_path_is_an_add_and_rms_norm():
    """Without a kernel (the CPU) add_rms_norm is x + d and mx.fast.rms_norm of it, swiglu the
    split and silu * up: the values the layers computed before."""
    key = mx.random.key(0)
    x, d = mx.random.normal((2, 3, 64), key=key).astype(mx.bfloat16).split(2, axis=0)
    w = mx.random.uniform(0.5, 1.5, (64,), key=key).astype(mx.bfloat16)
    with mx.stream(mx.cpu):
        s, n = fused_norm.add_rms_norm(x, d, w, 1e-6)
        assert mx.array_equal(s, x + d).item()
        assert mx.array_equal(n, mx.fast.rms_norm(x + d, w, 1e-6)).item()
        gu = mx.random.normal((3, 2, 10), key=key).astype(mx.bfloat16)
        g, u = gu[..., :5], gu[..., 5:]
        assert mx.array_equal(fused_norm.swiglu(gu), g * mx.sigmoid(g) * u).item()


# --- compile checks: Metal against the stub, CUDA with nvcc ---

METAL_TYPES = {"x": "T", "d": "T", "w": "T", "gu": "T", "eps": "float"}


def _metal_unit(name: str, body: str) -> str:
    from tests.kernels.test_metal_source import METAL_ATTRIBUTES, STUB

    inputs, outputs, _ = fused_norm.KERNELS[name]
    params = []
    for j, n in enumerate(inputs):
        space = "constant" if n == "eps" else "device"
        params.append(f"  const {space} {METAL_TYPES[n]}* {n} /* buffer({j}) */")
    params += [f"  device T* {n}" for n in outputs]
    params += [f"  {t} {a}" for a, t in METAL_ATTRIBUTES.items() if a in body]
    size = "D" if name == "add_rms_norm" else "I"
    fn = f"custom_kernel_{name}"
    inst = "\n".join(
        f"template decltype({fn}<{a}>) {fn}<{a}>;"
        for a in ("1024, 8, bfloat16_t", "4096, 8, float16_t", "100, 2, float")
    )
    return (
        f'#include "{STUB}"\n{metal.HEADER}\n'
        f"template <int {size}, int W, typename T>\nvoid {fn}(\n" + ",\n".join(params) + ") {\n"
        f"{body}\n}}\n\n{inst}\n"
    )


@pytest.mark.skipif(GXX is None, reason="needs g++")
@pytest.mark.parametrize("name", sorted(fused_norm.KERNELS))
def test_metal_source_compiles(name, tmp_path):
    from tests.kernels.test_metal_source import compile_errors

    body = fused_norm.kernel_source(name, "metal")
    for attr in ("thread_position_in_threadgroup", "threadgroup_position_in_grid"):
        assert attr in body  # named in `source`, so MLX declares them
    err = compile_errors(_metal_unit(name, body), tmp_path)
    assert not err, err
    broken = body.replace("gd_rsqrt(", "rsqrt_missing(").replace("gd_exp(", "exp_missing(")
    assert compile_errors(_metal_unit(name, broken), tmp_path)


def _cuda_unit(broken: bool = False) -> str:
    from tests.kernels.test_cuda_source import CTYPES, PRELUDE

    kernels = []
    for i, (name, act) in enumerate((n, a) for n in sorted(fused_norm.KERNELS) for a in CTYPES):
        inputs, outputs, _ = fused_norm.KERNELS[name]
        t = CTYPES[act]
        params = [f"    const {'float' if n == 'eps' else t}* {n}" for n in inputs]
        params += [f"    {t}* {n}" for n in outputs]
        size = "D" if name == "add_rms_norm" else "I"
        consts = f"  constexpr int {size} = 1024;\n  constexpr int W = 8;\n  using T = {t};\n"
        body = fused_norm.kernel_source(name, "cuda")
        if broken:
            body = body.replace("gd_group_sum<32>(", "group_sum_missing<32>(")
        kernels.append(
            f"__global__ void k{i}(\n" + ",\n".join(params) + ") {\n" + consts + body + "}\n"
        )
    return PRELUDE + cuda.HEADER + "".join(kernels)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    from tests.kernels.test_cuda_source import nvcc_errors

    err = nvcc_errors(_cuda_unit(), tmp_path)
    assert not err, err
    assert nvcc_errors(_cuda_unit(broken=True), tmp_path)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("name", sorted(fused_norm.KERNELS))
def test_precompiled_sources_compile_to_ptx(name, tmp_path):
    """The self-contained source the GPU process compiles with NVRTC (`precompiled.entry_source`:
    no MLX headers, its own bf16 / fp16 types) compiles to PTX with its entry, every dtype."""
    from qwen35_mlx.kernels.gated_delta import precompiled
    from tests.kernels.helpers import nvcc_ptx

    inputs, outputs, _ = fused_norm.KERNELS[name]
    for dt in (mx.float32, mx.bfloat16, mx.float16):
        in_dt = [mx.float32 if n == "eps" else dt for n in inputs]
        tpl = [("D" if name == "add_rms_norm" else "I", 1024), ("W", 8), ("T", dt)]
        src = precompiled.entry_source(
            "qm_" + name, cuda.HEADER, fused_norm.kernel_source(name, "cuda"), inputs, in_dt,
            [2] * len(inputs), outputs, [dt] * len(outputs), tpl,
        )  # fmt: skip
        assert "#include" not in src
        assert precompiled.entry_name("qm_" + name, tpl) in nvcc_ptx(src, tmp_path, timeout=300)
