"""The prefill conv kernel (`kernels/conv_qkv.py`) without a GPU.

- Its CUDA text (prologue + body, the text the GPU compiles) run on the CPU by the lane emulator
  (tests/kernels/lane_emulator.h) in fp32, bf16 and fp16, against float64 NumPy: (1) the ops'
  order with every rounding the kernel and the ops make (the taps are bit for bit, see the
  module's docstring; silu's exp and the l2 norm's sum order may move a result by an ulp), and
  (2) the exact conv + silu + l2 norm (no roundings), within a bound argued below. Outputs start
  as NaN, so an element the body fails to write fails the comparison. Bodies broken on purpose
  (a tap left out; the l2 norm's sum over half the lanes) must fail the same checks.
- Its Metal text type-checked against tests/kernels/metal_stub.h; its CUDA text compiled by nvcc
  for sm_90 (the module's nvcc check), and the self-contained NVRTC source to PTX.
"""

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels import conv_qkv
from qwen35_mlx.kernels.gated_delta import cuda, metal
from tests.kernels.helpers import GXX, compile_emulated, cpu_device, np64, runner_program  # noqa: F401

pytestmark = pytest.mark.usefixtures("cpu_device")

NVCC = shutil.which("nvcc")
CT = {mx.float32: "float", mx.bfloat16: "bf16", mx.float16: "fp16"}
NAME = {mx.float32: "fp32", mx.bfloat16: "bf16", mx.float16: "fp16"}
EPS = 1e-6
K = 4
# The emulator's launch: 2 warps of 4 tokens a threadgroup, so T 300 spans 75 tiles in 38
# threadgroups (the last one half empty) and T 7 a partial tile.
W, TT = 2, 4

# (B, T, Hk, Hv, Dk, Dv, state given, dtype): T 1 / 7 / 300 and odd T 37; B 2; Hv != Hk; Dk 64 /
# 128; Dv 48 (a partial last channel pass); every dtype with and without a state.
CASES = [
    (2, 300, 1, 2, 64, 64, True, mx.bfloat16),
    (1, 7, 2, 2, 128, 128, False, mx.bfloat16),
    (2, 1, 1, 2, 128, 64, True, mx.float16),
    (1, 300, 1, 1, 128, 128, False, mx.float16),
    (2, 37, 1, 2, 64, 48, True, mx.float32),
    (1, 7, 1, 1, 128, 128, False, mx.float32),
]


def _case_id(c):
    B, T, Hk, Hv, Dk, Dv, hs, dt = c
    return f"B{B}T{T}Hk{Hk}Hv{Hv}Dk{Dk}Dv{Dv}{'state' if hs else 'nostate'}-{NAME[dt]}"


FP16 = """
struct fp16 {  // IEEE half storage: round to nearest even from float, exact widening to float
  _Float16 v;
  fp16() = default;
  explicit fp16(float f) : v(static_cast<_Float16>(f)) {}
  operator float() const { return static_cast<float>(v); }
};
"""


def _runner(i: int, case, body: str) -> str:
    B, T, Hk, Hv, Dk, Dv, hs, dt = case
    ct = CT[dt]
    C = 2 * Hk * Dk + Hv * Dv
    return f"""
namespace v{i} {{
template <int Hk, int Hv, int Dk, int Dv, int K, int W, int TT, bool HS, int EXP, typename YT>
void kernel(const YT* qkv, const YT* conv_state, const YT* w, const float* consts,
            const int* qkv_shape, YT* q, YT* k, YT* v, YT* state_out) {{
{body}
}}
}}  // namespace v{i}

void run_{i}(char** argv) {{
  auto as_t = [](const std::vector<char>& b) {{
    const float* f = reinterpret_cast<const float*>(b.data());
    std::vector<{ct}> t;
    for (size_t j = 0; j < b.size() / 4; ++j) t.push_back({ct}(f[j]));
    return t;
  }};
  auto x = as_t(read(argv[0])), cs = as_t(read(argv[1])), w = as_t(read(argv[2]));
  auto cf = read(argv[3]);
  const int qkv_shape[3] = {{{B}, {T}, {C}}};
  std::vector<{ct}> q(size_t({B * T * Hk * Dk}), {ct}(NAN)), k(q.size(), {ct}(NAN));
  std::vector<{ct}> v(size_t({B * T * Hv * Dv}), {ct}(NAN));
  std::vector<{ct}> so(size_t({B * (K - 1) * C}), {ct}(NAN));
  const unsigned groups = ({T} + {TT * W} - 1) / {TT * W};
  run_grid({{unsigned({2 * Hk + Hv}), groups, unsigned({B})}}, {W}, [&] {{
    v{i}::kernel<{Hk}, {Hv}, {Dk}, {Dv}, {K}, {W}, {TT}, {"true" if hs else "false"},
                 {conv_qkv.EXP_KIND[dt]}, {ct}>(
        x.data(), cs.data(), w.data(), reinterpret_cast<const float*>(cf.data()), qkv_shape,
        q.data(), k.data(), v.data(), so.data());
  }});
  int o = 4;
  for (auto* out : {{&q, &k, &v, &so}}) {{
    std::vector<float> f(out->begin(), out->end());
    std::ofstream(argv[o++], std::ios::binary).write((char*)f.data(), f.size() * 4);
  }}
}}
"""


def _program(tmp, replace=None):
    # the CUDA text, its exp (PTX's ex2.approx for bf16 / fp16) replaced by gd_exp, as on Metal
    body = conv_qkv.kernel_source("cuda").replace(conv_qkv.EXP_CUDA, conv_qkv.EXP_PLAIN)
    if replace is not None:
        assert replace[0] in body
        body = body.replace(*replace)
    runners = FP16 + "".join(_runner(i, c, body) for i, c in enumerate(CASES))
    return compile_emulated(runner_program(runners, len(CASES)), tmp, timeout=900)


def _round(a, dt):
    """a rounded to dt (to nearest even), as float64."""
    if dt == mx.float32:
        return np.asarray(a, np.float32).astype(np.float64)
    if dt == mx.float16:
        return np.asarray(a, np.float16).astype(np.float64)
    return np64(mx.array(np.asarray(a, np.float32)).astype(mx.bfloat16))


def _inputs(case, seed=0):
    """qkv [B, T, C], conv_state [B, K-1, C] or None, w [C, K]: float64 values of dt. Scales as
    a layer's: the in-projection's outputs ~N(0, 1), the taps ~N(0, 0.3)."""
    B, T, Hk, Hv, Dk, Dv, hs, dt = case
    C = 2 * Hk * Dk + Hv * Dv
    rng = np.random.default_rng(seed + T)
    qkv = _round(rng.normal(size=(B, T, C)), dt)
    state = _round(rng.normal(size=(B, K - 1, C)), dt) if hs else None
    w = _round(0.3 * rng.normal(size=(C, K)), dt)
    return qkv, state, w


def _ext(qkv, state):
    B, _, C = qkv.shape
    state = np.zeros((B, K - 1, C)) if state is None else state
    return np.concatenate([state, qkv], axis=1)


def reference(case, qkv, state, w, rounded: bool):
    """float64 (q, k, v, new state). rounded: every rounding of the ops' order applied (each tap's
    product and sum, silu's exp, 1 + e, 1 / d, 1 - y and product, the normalised value, q's scale);
    else the exact conv + silu + l2 norm + Dk^-0.5."""
    B, T, Hk, Hv, Dk, Dv, hs, dt = case
    r = (lambda a: _round(a, dt)) if rounded else (lambda a: a)
    x = _ext(qkv, state)
    h = r(x[:, 0:T] * w[:, 0])
    for j in range(1, K):
        h = r(h + r(x[:, j : j + T] * w[:, j]))
    if rounded:
        e = r(np.exp(np.abs(h)))
        y = r(1.0 / r(1.0 + e))
        s = r(h * np.where(h < 0, y, r(1.0 - y)))
    else:
        s = h / (1.0 + np.exp(-h))
    qs, ks, vs = np.split(s, [Hk * Dk, 2 * Hk * Dk], axis=-1)

    def l2(u):
        u = u.reshape(B, T, -1, Dk)
        return r(u / np.sqrt((u * u).sum(-1, keepdims=True) + EPS))

    scale = _round(Dk**-0.5, dt) if rounded else Dk**-0.5
    q = r(l2(qs) * scale)
    return q, l2(ks), vs.reshape(B, T, Hv, Dv), x[:, T:]


def _run(exe, tmp):
    """Every case's outputs: {case index: (q, k, v, new state)} as float64."""
    out = {}
    for i, case in enumerate(CASES):
        B, T, Hk, Hv, Dk, Dv, hs, dt = case
        qkv, state, w = _inputs(case)
        consts = np.asarray(conv_qkv.consts(EPS, Dk, dt), np.float32)
        files = []
        for j, a in enumerate((qkv, np.zeros(1) if state is None else state, w, consts)):
            f = tmp / f"in{i}_{j}.bin"
            np.asarray(a, np.float32).tofile(f)
            files.append(str(f))
        o = [str(tmp / f"o{i}_{j}.bin") for j in range(4)]
        res = subprocess.run([str(exe), str(i), *files, *o], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        C = 2 * Hk * Dk + Hv * Dv
        shapes = [(B, T, Hk, Dk), (B, T, Hk, Dk), (B, T, Hv, Dv), (B, K - 1, C)]
        out[i] = [
            np.fromfile(f, np.float32).astype(np.float64).reshape(s)
            for f, s in zip(o, shapes, strict=True)
        ]
    return out


ULP = {mx.float32: 2.0**-23, mx.bfloat16: 2.0**-7, mx.float16: 2.0**-10}


def _errors(case, got):
    """Per output (q, k, v): (largest error in ulps of the rounded reference's magnitude, share
    of elements differing from it, largest error against the exact float64 relative to the
    output's rms). The new state must equal its rows bit for bit (None if not)."""
    B, T, Hk, Hv, Dk, Dv, hs, dt = case
    qkv, state, w = _inputs(case)
    rounded = reference(case, qkv, state, w, True)
    exact = reference(case, qkv, state, w, False)
    if not np.array_equal(got[3], rounded[3]):
        return None
    errs = []
    for g, rr, ex in zip(got[:3], rounded[:3], exact[:3], strict=True):
        if not np.all(np.isfinite(g)):
            return None
        ulp = ULP[dt] * np.maximum(np.abs(rr), np.finfo(np.float32).tiny)
        rms = np.sqrt((ex * ex).mean())
        errs.append(
            (
                float((np.abs(g - rr) / ulp).max()),
                float((g != rr).mean()),
                float(np.abs(g - ex).max() / rms),
            )
        )
    return errs


# Against the ops' order: silu's e is expf here and exp in float64 there (both then rounded to the
# dtype), and the l2 norm's fp32 sum runs in another order, so an element may sit one ulp away
# (two where a q value is rounded twice, normalised then scaled). In bf16 / fp16 that happens to
# at most 2% of the elements (the sum's last fp32 bit rarely moves a rounding to 8 or 11 bits); in
# fp32 q and k differ in the last bit about half the time (any change of the sum's rounding does),
# so there only the 2-ulp bound holds, and v (no sum) keeps the 2% bound.
# Against the exact float64: each tap's product and sum is rounded (seven roundings, half an ulp
# each, of terms up to ~3x the output's rms: inputs ~N(0, 1) to |x| ~4, taps ~N(0, 0.3)), then
# silu's and the norm's three or four: <= (7 x 3 + 4) / 2 ~ 12 ulps of the dtype relative to the
# output's rms in the worst element; the bound is 16 (measured: 10.3 at most over these cases).
ULPS_MAX, SHARE_MAX, EXACT_ULPS = 2.0, 0.02, 16.0


def _bad(out):
    bad = []
    for i, case in enumerate(CASES):
        errs = _errors(case, out[i])
        if errs is None:
            bad.append((_case_id(case), "state or NaN"))
            continue
        dt = case[7]
        for name, (ulps, share, ex) in zip("qkv", errs, strict=True):
            share_max = 1.0 if dt == mx.float32 and name != "v" else SHARE_MAX
            if ulps > ULPS_MAX or share > share_max or ex > EXACT_ULPS * ULP[dt]:
                bad.append((_case_id(case), name, ulps, share, ex))
    return bad


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if GXX is None:
        pytest.skip("needs g++")
    tmp = tmp_path_factory.mktemp("conv_qkv")
    return _run(_program(tmp), tmp)


def test_conv_qkv_body_on_the_lane_emulator(emulated):
    bad = _bad(emulated)
    assert not bad, bad


def test_taps_and_v_bit_for_bit_in_fp32(emulated):
    """fp32: every rounding of the taps and silu the reference makes, so v (no norm) is the
    reference's bit for bit where exp rounds alike, and no element is more than an ulp off."""
    for i, case in enumerate(CASES):
        if case[7] == mx.float32:
            ulps, share, _ = _errors(case, emulated[i])[2]
            assert ulps <= 1.0 and share < 0.01, (_case_id(case), ulps, share)


@pytest.mark.skipif(GXX is None, reason="needs g++")
@pytest.mark.parametrize(
    "replace",
    [
        ("for (int j = 1; j < K; ++j) {", "for (int j = 1; j < K - 1; ++j) {"),  # a tap left out
        ("gd_group_sum<32>(ss)", "gd_group_sum<16>(ss)"),  # half the lanes' squares
    ],
    ids=["tap", "l2norm"],
)
def test_lane_emulator_check_can_fail(replace, tmp_path):
    """A broken body fails every case: the tap in all three outputs, the norm in q and k."""
    bad = _bad(_run(_program(tmp_path, replace), tmp_path))
    failed = {b[0] for b in bad}
    assert failed == {_case_id(c) for c in CASES}, bad
    names = {b[1] for b in bad}
    assert names == ({"q", "k", "v"} if replace[0].startswith("for") else {"q", "k"}), bad


def test_consts_are_eps_and_the_scale_as_the_ops_round_it():
    for dt in CT:
        c = conv_qkv.consts(EPS, 128, dt)
        assert c.dtype == mx.float32 and c[0].item() == np.float32(EPS)
        ops = (mx.ones((1,), dtype=dt) * 128**-0.5).astype(mx.float32)
        assert c[1].item() == ops.item()


def test_supported_shapes():
    qkv = mx.zeros((1, 5, 2 * 16 * 128 + 32 * 128), dtype=mx.bfloat16)
    w = mx.zeros((qkv.shape[2], 4), dtype=mx.bfloat16)
    assert conv_qkv.supported(qkv, w, 16, 128, 32, 128)
    assert not conv_qkv.supported(qkv, w, 16, 128, 16, 128)  # C mismatch
    assert not conv_qkv.supported(qkv.astype(mx.int32), w, 16, 128, 32, 128)
    big = mx.zeros((1, 5, 2 * 512 + 512), dtype=mx.bfloat16)
    assert not conv_qkv.supported(big, mx.zeros((1536, 4)), 1, 512, 1, 512)


# --- compile checks: Metal against the stub, CUDA with nvcc ---

TEMPLATE = "int Hk, int Hv, int Dk, int Dv, int K, int W, int TT, bool HS, int EXP, typename YT"
INSTANCES = (
    "16, 16, 128, 128, 4, 4, 16, true, 1, bfloat16_t",
    "16, 32, 128, 128, 4, 4, 16, false, 2, float16_t",
    "1, 2, 64, 48, 4, 2, 4, true, 0, float",
)


def _metal_unit(body: str) -> str:
    from tests.kernels.test_metal_source import METAL_ATTRIBUTES, STUB

    params = [
        "  const device YT* qkv /* buffer(0) */",
        "  const device YT* conv_state /* buffer(1) */",
        "  const device YT* w /* buffer(2) */",
        "  const device float* consts /* buffer(3) */",
        "  const constant int* qkv_shape /* buffer(4) */",
    ]
    params += [f"  device YT* {n}" for n in conv_qkv.OUTPUT_NAMES]
    params += [f"  {t} {a}" for a, t in METAL_ATTRIBUTES.items() if a in body]
    fn = "custom_kernel_conv_qkv"
    inst = "\n".join(f"template decltype({fn}<{a}>) {fn}<{a}>;" for a in INSTANCES)
    return (
        f'#include "{STUB}"\n{metal.HEADER}\ntemplate <{TEMPLATE}>\nvoid {fn}(\n'
        + ",\n".join(params)
        + f") {{\n{body}\n}}\n\n{inst}\n"
    )


@pytest.mark.skipif(GXX is None, reason="needs g++")
def test_metal_source_compiles(tmp_path):
    from tests.kernels.test_metal_source import compile_errors

    body = conv_qkv.kernel_source("metal")
    for attr in ("thread_position_in_threadgroup", "threadgroup_position_in_grid"):
        assert attr in body  # named in `source`, so MLX declares them
    err = compile_errors(_metal_unit(body), tmp_path)
    assert not err, err
    broken = body.replace("gd_rsqrt(", "rsqrt_missing(")
    assert compile_errors(_metal_unit(broken), tmp_path)


def _cuda_unit(broken: bool = False) -> str:
    from tests.kernels.test_cuda_source import CTYPES, PRELUDE

    kernels = []
    for i, act in enumerate(CTYPES):
        t = CTYPES[act]
        params = [f"    const {t}* {n}" for n in ("qkv", "conv_state", "w")]
        params += ["    const float* consts", "    const int* qkv_shape"]
        params += [f"    {t}* {n}" for n in conv_qkv.OUTPUT_NAMES]
        consts = (
            "  constexpr int Hk = 16, Hv = 32, Dk = 128, Dv = 128, K = 4, W = 4, TT = 16;\n"
            f"  constexpr bool HS = {'true' if i % 2 else 'false'};\n"
            f"  constexpr int EXP = {dict(fp32=0, bf16=1, fp16=2)[act]};\n  using YT = {t};\n"
        )
        body = conv_qkv.kernel_source("cuda")
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
def test_precompiled_source_compiles_to_ptx(tmp_path):
    """The self-contained source the GPU process compiles with NVRTC (`precompiled.entry_source`:
    no MLX headers, its own bf16 / fp16 types) compiles to PTX with its entry, every dtype; in
    fp32 the taps' products stay `mul.rn` (never contracted into the sum's add)."""
    from qwen35_mlx.kernels.gated_delta import precompiled
    from tests.kernels.helpers import nvcc_ptx

    for dt in (mx.float32, mx.bfloat16, mx.float16):
        tpl = [("Hk", 16), ("Hv", 32), ("Dk", 128), ("Dv", 128), ("K", 4), ("W", 4)]
        tpl += [("TT", 16), ("HS", True), ("EXP", conv_qkv.EXP_KIND[dt]), ("YT", dt)]
        src = precompiled.entry_source(
            "qm_conv_qkv", cuda.HEADER, conv_qkv.kernel_source("cuda"), conv_qkv.INPUT_NAMES,
            [dt, dt, dt, mx.float32], [3, 3, 2, 1], conv_qkv.OUTPUT_NAMES, [dt] * 4, tpl,
        )  # fmt: skip
        assert "#include" not in src
        ptx = nvcc_ptx(src, tmp_path, timeout=300)
        assert precompiled.entry_name("qm_conv_qkv", tpl) in ptx
        if dt == mx.float32:
            assert "mul.rn.f32" in ptx
        else:  # MLX's hexp: ex2.approx on the product (ftz in fp16's, as cuda_fp16.hpp)
            ex2 = "ex2.approx.ftz.f32" if dt == mx.float16 else "ex2.approx.f32"
            assert ex2 in ptx


def test_hexp_corrections_are_the_inputs_cuda_fp16_hpp_names():
    """EXP_CUDA's fp16 corrections: the positive inputs half 0x1F79 and 0x25CF of hexp's
    __SPEC_CASE lines, each moved by half 0x9400 (minus 2^-10, one ulp of e in [1, 2))."""
    half = lambda bits: float(np.array([bits], np.uint16).view(np.float16)[0])  # noqa: E731
    assert half(0x1F79) == 0.007297515869140625 and half(0x25CF) == 0.0226898193359375
    assert half(0x9400) == -0.0009765625
    for x in ("0.007297515869140625f", "0.0226898193359375f", "0.0009765625f"):
        assert x in conv_qkv.EXP_CUDA
    # the log2(e) constants: 0x3FB8AA3B is log2(e) rounded to fp32; bf16's rounds it up
    c = np.array([0x3FB8AA3B, 0x3FB8AA3C], np.uint32).view(np.float32).astype(np.float64)
    assert c[0] == np.float32(np.log2(np.e)) and c[1] > np.log2(np.e) > c[0]
