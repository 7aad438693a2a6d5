"""The CUDA kernels' precompiled path on the CPU (no GPU needed): `precompiled.cuda_kernel`'s
generated sources, the NVRTC loader, the disk cache, the arguments handed to
`mx.fast.precompiled_cuda_kernel` and the fallback to `mx.fast.cuda_kernel`.

Sources compile with NVRTC where libnvrtc is found (set QWEN35_MLX_NVRTC to its path), else
with nvcc; `tests/kernels/test_gpu_precompiled.py` runs them on the GPU machine.
"""

import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import mlx.core as mx
import pytest

from qwen35_mlx.kernels.gated_delta import cuda, launch, nvrtc, precompiled, source
from tests.kernels.helpers import nvcc_ptx

NVCC = shutil.which("nvcc")
ACT = {"q", "k", "v", "a", "b", "qkv", "conv_state", "conv_w"}
B, T, HK, HV, DK, DV, K = 2, 3, 2, 4, 64, 32, 4


def _nvrtc_ok() -> bool:
    try:
        nvrtc.version()
        return True
    except nvrtc.NvrtcError:
        return False


HAVE_NVRTC = _nvrtc_ok()
COMPILE = nvrtc.compile_source  # the real one (some tests stub it out)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """A private cache folder, the precompiled path on, a GPU of compute capability 9.0, and a
    fresh warning flag, for every test."""
    monkeypatch.setenv(nvrtc.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(precompiled.ENV, "1")
    monkeypatch.setattr(nvrtc, "device_arch", lambda: 90)
    monkeypatch.setattr(precompiled, "_warned", False)


class Recorder:
    """Stands in for mx.fast.precompiled_cuda_kernel / mx.fast.cuda_kernel (no GPU here)."""

    def __init__(self):
        self.calls = []

    def __call__(self, **kw):
        self.calls.append(kw)
        return [
            mx.zeros(s, d) for s, d in zip(kw["output_shapes"], kw["output_dtypes"], strict=True)
        ]


def _backend():
    return launch.GpuBackend(
        header=cuda.HEADER,
        prologue=cuda.PROLOGUE,
        factory=precompiled.cuda_kernel,
        available=lambda: True,
    )


def _run_variant(backend, gate, mask, decode, conv, dt, norm=False, tokens=1, packed=False):
    """Launch one variant through the launch layer (as the model does) with inputs of dtype dt;
    returns the kernel object."""
    t = 1 if decode else T
    m = None
    state = mx.zeros((B, HV, DV, DK))
    if packed:  # proj [B * T, qkv | z | b | a]
        C = 2 * HK * DK + HV * DV
        m = mx.array([[True] * tokens, [False] + [True] * (tokens - 1)]) if mask else None
        launch.run_packed_decode(
            backend.build, mx.zeros((B * tokens, C + HV * DV + 2 * HV), dt),
            mx.zeros((B, K - 1, C), dt), mx.zeros((C, K), dt), mx.zeros((HV,)),
            mx.zeros((HV,)), state, m, tokens=tokens, norm_w=mx.ones((DV,), dt), norm_eps=1e-6,
        )  # fmt: skip
        return backend.build(gate, mask, True, True, True, tokens, True)
    if conv:
        C = 2 * HK * DK + HV * DV
        m = mx.array([True, False]) if mask else None
        extra = {}
        if norm:  # the gated norm's z [B, Hv * Dv] and weight [Dv], in the activation dtype
            extra = dict(z=mx.zeros((B, HV * DV), dt), norm_w=mx.ones((DV,), dt), norm_eps=1e-6)
        launch.run_conv_decode(
            backend.build, mx.zeros((B, C), dt), mx.zeros((B, K - 1, C), dt),
            mx.zeros((C, K), dt), mx.zeros((B, HV), dt), mx.zeros((B, HV), dt),
            mx.zeros((HV,)), mx.zeros((HV,)), state, m, **extra,
        )  # fmt: skip
        return backend.build(gate, mask, True, True, norm)
    q = mx.zeros((B, t, HK, DK), dt)
    v = mx.zeros((B, t, HV, DV), dt)
    m = mx.ones((B, t), mx.bool_) if mask else None
    if gate == "fused":
        a = mx.zeros((B, t, HV), dt)
        launch.run_fused(backend.build, q, q, v, a, a, mx.zeros((HV,)), mx.zeros((HV,)), state, m)
    else:
        g = mx.zeros((B, t, HV, DK) if gate == "per_key" else (B, t, HV))
        launch.run_gates(backend.build, q, q, v, g, mx.zeros((B, t, HV)), state, m)
    return backend.build(gate, mask, decode)


def _all_variants():
    out = [(*v, False, mx.bfloat16) for v in source.variants()]
    out += [("scalar", True, False, False, mx.float32), ("fused", False, True, False, mx.float16)]
    for dt in (mx.float32, mx.bfloat16, mx.float16):
        out += [(*v, dt) for v in source.conv_variants()]
        out += [(*v[:4], dt, True) for v in source.norm_variants()]
        out += [(*v[:4], dt, *v[4:]) for v in source.token_variants((1, 3))]
    return out


def _variant_id(v):
    return f"{source.kernel_name(*v[:4], *v[5:])}-{v[4]}".replace("mlx.core.", "")


def _capture(monkeypatch, variant):
    """(kernel object, the source it generated, its entry name) for one variant, with NVRTC
    stubbed out and precompiled_cuda_kernel recorded."""
    rec = Recorder()
    monkeypatch.setattr(mx.fast, "precompiled_cuda_kernel", rec)
    sources = []

    def fake_compile(src, options, kind, name="k.cu"):
        sources.append(src)
        return b"binary of " + name.encode()

    monkeypatch.setattr(nvrtc, "compile_source", fake_compile)
    monkeypatch.setattr(nvrtc, "version", lambda: (13, 0))
    monkeypatch.setattr(nvrtc, "target", lambda arch: (f"sm_{arch}", "cubin"))
    kern = _run_variant(_backend(), *variant)
    return kern, sources[-1], rec.calls[-1]


def _ptx(src: str, tmp_path: Path, name: str) -> str:
    if HAVE_NVRTC:
        opts = [*precompiled.OPTIONS, "--gpu-architecture=compute_90"]
        return COMPILE(src, opts, "ptx").decode()
    return nvcc_ptx(src, tmp_path, name)


@pytest.mark.skipif(not HAVE_NVRTC and NVCC is None, reason="needs libnvrtc or nvcc")
@pytest.mark.parametrize("variant", _all_variants(), ids=_variant_id)
def test_cuda_kernel_sources_compile_to_ptx_with_entry(variant, tmp_path, monkeypatch):
    """Every variant's generated, self-contained source (exactly what a GPU process would
    compile) compiles to PTX that has the `extern "C"` entry precompiled_cuda_kernel is told."""
    _, src, call = _capture(monkeypatch, variant)
    assert "#include" not in src
    # The packed variants' entry is bounded to their block (launch.py: MAX_THREADS).
    assert ("__launch_bounds__(" in src) == (len(variant) > 7 and variant[7])
    ptx = _ptx(src, tmp_path, call["name"])
    assert re.search(rf"\.entry\s+{re.escape(call['name'])}\s*\(", ptx), ptx[:2000]


@pytest.mark.skipif(not HAVE_NVRTC, reason="needs libnvrtc (QWEN35_MLX_NVRTC=path)")
def test_cuda_kernel_cubin_for_sm90_and_compile_errors():
    """A cubin for the H100/H200's sm_90 holds the entry; a broken source raises NvrtcError with
    the compiler's log (which the kernel turns into the fallback)."""
    kern = _backend().build("fused", False, True, True)
    sig = ([mx.bfloat16] * 5 + [mx.float32] * 3, [2, 3, 2, 2, 2, 1, 1, 4])
    tpl = [("Dk", 128), ("L", 16), ("P", 0), ("YT", mx.bfloat16), ("K", 4), ("W", 2)]
    src = kern.source_for(*sig, [mx.bfloat16, mx.float32, mx.bfloat16], tpl)
    opts = [*precompiled.OPTIONS, "--gpu-architecture=sm_90"]
    cubin = nvrtc.compile_source(src, opts, "cubin")
    assert cubin[:4] == b"\x7fELF"
    assert precompiled.entry_name(kern.name, tpl).encode() in cubin
    with pytest.raises(nvrtc.NvrtcError, match="out_missing"):
        nvrtc.compile_source(src.replace("qk_tg[i] = out;", "qk_tg[i] = out_missing;"), opts, "ptx")


@pytest.mark.skipif(not HAVE_NVRTC, reason="needs libnvrtc (QWEN35_MLX_NVRTC=path)")
def test_nvrtc_target_is_sass_for_known_archs():
    assert nvrtc.target(90) == ("sm_90", "cubin")
    archs = nvrtc.supported_archs()
    assert nvrtc.target(max(archs) + 1) == (f"compute_{max(archs)}", "ptx")


CUDA_INCLUDE = Path("/usr/local/cuda/include")


@pytest.mark.skipif(
    not HAVE_NVRTC or not (CUDA_INCLUDE / "cuda_bf16.h").exists(), reason="needs NVRTC + CUDA"
)
@pytest.mark.parametrize("dt", [mx.bfloat16, mx.float16])
def test_minimal_types_compile_like_cuda_headers(dt, monkeypatch):
    """The minimal bf16 / fp16 types give the same floating-point instructions (the same
    multiset of conversions, FMAs, shuffles, ...) as the same kernel over cuda_bf16.h /
    cuda_fp16.h, MLX's types: so the two paths compute the same values."""
    kern, src, _ = _capture(monkeypatch, ("fused", True, True, True, dt))
    ctype = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half"}[dt]
    mine = precompiled.CTYPES[dt]
    assert precompiled.TYPES in src
    theirs = src.replace(precompiled.TYPES, "").replace(mine, ctype)
    theirs = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n" + theirs
    float_ops = ("fma", "mul", "add", "sub", "div", "rcp", "ex2", "lg2", "rsqrt", "cvt.rn")
    float_ops += ("cvt.f32", "shfl", "neg", "max", "min", "abs", "sqrt")

    def ops(text):
        opts = [*precompiled.OPTIONS, "--gpu-architecture=compute_90", f"-I{CUDA_INCLUDE}"]
        ptx = COMPILE(text, opts, "ptx").decode()
        body = ptx[ptx.index(".entry") :]
        found = (ln.strip().strip("{}").strip().split(None, 1) for ln in body.splitlines())
        return Counter(x[0] for x in found if x and x[0].startswith(float_ops))

    assert mine not in theirs
    got, want = ops(src), ops(theirs)
    assert sum(want.values()) > 300
    assert got == want


def test_precompiled_call_passes_pointers_then_shape_scalars(monkeypatch):
    """The entry's parameters are the inputs, the outputs, then one int per dim of each input
    whose shape the body reads, in that order, and the launch passes exactly those scalars."""
    kern, src, call = _capture(monkeypatch, ("fused", True, False, False, mx.bfloat16))
    assert call["name"] == "qm_gated_delta_step_fused_mask_64_16_0_bfloat16"
    assert call["compiled_source"] == b"binary of " + call["name"].encode() + b".cu"
    assert call["ensure_row_contiguous"] is True
    assert call["grid"] == (32 * B * HV, DV // 2, 1) and call["threadgroup"] == (32, 1, 1)
    params = src[src.index(call["name"] + "(") :].split(")", 1)[0]
    names = [p.split()[-1] for p in params.split(",")]
    ins = source.input_names("fused", True)
    # The inputs whose shapes the body names (as MLX, by text: GD_CONV's a_shape and
    # state_in_shape count too, though that branch is compiled out here).
    shaped = {"q": 4, "v": 4, "a": 3, "state_in": 4}
    scalars = [f"{n}_shape_{i}" for n in ins if n in shaped for i in range(shaped[n])]
    assert names == ins + source.output_names() + scalars
    assert call["scalars"] == [B, T, HK, DK, B, T, HV, DV, B, T, HV, B, HV, DV, DK]
    assert [x.shape for x in call["inputs"]][:3] == [(B, T, HK, DK)] * 2 + [(B, T, HV, DV)]
    assert "const __nv_bfloat16* q" not in src and "const qm_bfloat16* q" in src


def _stub_compile(monkeypatch):
    """Count NVRTC compiles; every compile returns its source's hash as the 'binary'."""
    calls = []

    def fake(src, options, kind, name="k.cu"):
        calls.append(name)
        return f"bin {hash(src)} {options[-1]}".encode()

    monkeypatch.setattr(nvrtc, "compile_source", fake)
    monkeypatch.setattr(nvrtc, "version", lambda: (13, 0))
    monkeypatch.setattr(nvrtc, "target", lambda arch: (f"sm_{arch}", "cubin"))
    monkeypatch.setattr(mx.fast, "precompiled_cuda_kernel", Recorder())
    return calls


def _cache_files():
    return sorted(p for p in nvrtc.cache_dir().rglob("*") if p.is_file())


def test_disk_cache_reused_by_a_new_kernel_object(monkeypatch):
    """A second kernel object (as in a new process) loads the binary from disk: no compile."""
    calls = _stub_compile(monkeypatch)
    variant = ("fused", False, True, True, mx.bfloat16)
    backend = _backend()
    k1 = _run_variant(backend, *variant)
    assert len(calls) == 1 and k1.last == "compiled"
    files = _cache_files()
    assert len(files) == 1 and files[0].suffix == ".cubin"
    assert files[0].name.startswith("qm_gated_delta_decode_conv_64_16_0_bfloat16_4_2-")
    k2 = _run_variant(_backend(), *variant)
    assert k2 is not k1 and k2.last == "disk" and len(calls) == 1
    sent = [c["compiled_source"] for c in mx.fast.precompiled_cuda_kernel.calls]
    assert sent[0] == sent[1] == nvrtc.read_cached(files[0])
    # The same object keeps its binary in memory: no compile, no disk read.
    files[0].unlink()
    assert _run_variant(backend, *variant) is k1
    assert len(calls) == 1 and not _cache_files()


def test_disk_cache_misses_on_source_arch_and_mlx_version_change(monkeypatch):
    calls = _stub_compile(monkeypatch)
    variant = ("fused", False, True, True, mx.bfloat16)
    _run_variant(_backend(), *variant)
    other = launch.GpuBackend(
        header=cuda.HEADER + "\n// changed\n",
        prologue=cuda.PROLOGUE,
        factory=precompiled.cuda_kernel,
        available=lambda: True,
    )
    _run_variant(other, *variant)
    assert len(calls) == 2
    monkeypatch.setattr(nvrtc, "device_arch", lambda: 100)
    _run_variant(_backend(), *variant)
    assert len(calls) == 3
    monkeypatch.setattr(mx, "__version__", "0.0.0-test")
    _run_variant(_backend(), *variant)
    assert len(calls) == 4 and len(_cache_files()) == 4


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_corrupted_cache_file_is_recompiled(damage, monkeypatch):
    calls = _stub_compile(monkeypatch)
    variant = ("scalar", True, False, False, mx.float32)
    _run_variant(_backend(), *variant)
    (path,) = _cache_files()
    good = path.read_bytes()
    bad = {
        "flip": good[:-3] + bytes([good[-3] ^ 1]) + good[-2:],
        "truncate": good[: len(good) - 5],
        "empty": b"",
        "garbage": b"\x00" * len(good),
    }[damage]
    path.write_bytes(bad)
    assert nvrtc.read_cached(path) is None
    kern = _run_variant(_backend(), *variant)
    assert kern.last == "compiled" and len(calls) == 2
    assert path.read_bytes() == good  # repaired
    assert mx.fast.precompiled_cuda_kernel.calls[-1]["compiled_source"] == nvrtc.read_cached(path)


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails before its rename leaves neither a file nor a temporary behind; a
    completed one leaves only the file."""
    path = tmp_path / "c" / "k.cubin"
    nvrtc.write_cached(path, b"payload")
    assert nvrtc.read_cached(path) == b"payload"
    assert [p.name for p in path.parent.iterdir()] == ["k.cubin"]

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(nvrtc.os, "replace", boom)
    with pytest.raises(OSError):
        nvrtc.write_cached(path, b"new payload")
    assert nvrtc.read_cached(path) == b"payload"
    assert [p.name for p in path.parent.iterdir()] == ["k.cubin"]
    # An unwritable cache costs the cache, not the kernel.
    data, how = nvrtc.load_or_compile(tmp_path / "c" / "other.cubin", lambda: b"fresh")
    assert (data, how) == (b"fresh", "compiled")


def test_cache_folder_from_env_and_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(nvrtc.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert nvrtc.cache_dir() == tmp_path / "xdg" / "qwen35_mlx" / "cuda"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert nvrtc.cache_dir() == Path.home() / ".cache" / "qwen35_mlx" / "cuda"
    monkeypatch.setenv(nvrtc.CACHE_ENV, str(tmp_path / "mine"))
    assert nvrtc.cache_dir() == tmp_path / "mine"


def _fallback_recorder(monkeypatch):
    made = []

    def factory(**kw):
        made.append(kw)
        return Recorder()

    monkeypatch.setattr(mx.fast, "cuda_kernel", factory)
    return made


@pytest.mark.parametrize("failure", ["no nvrtc", "compile error"])
def test_fallback_to_cuda_kernel_with_one_warning(failure, monkeypatch):
    made = _fallback_recorder(monkeypatch)
    monkeypatch.setattr(mx.fast, "precompiled_cuda_kernel", Recorder())
    if failure == "no nvrtc":
        monkeypatch.setenv(nvrtc.LIB_ENV, "/nonexistent/libnvrtc.so")
        monkeypatch.setattr(nvrtc, "_lib", None)
    else:
        monkeypatch.setattr(nvrtc, "version", lambda: (13, 0))
        monkeypatch.setattr(nvrtc, "target", lambda arch: ("sm_90", "cubin"))

        def broken(*a, **k):
            raise nvrtc.NvrtcError("NVRTC could not compile: error: identifier undefined")

        monkeypatch.setattr(nvrtc, "compile_source", broken)
    backend = _backend()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        k1 = _run_variant(backend, "fused", False, True, True, mx.bfloat16)
        k2 = _run_variant(backend, "scalar", False, False, False, mx.float32)
        _run_variant(backend, "scalar", False, False, False, mx.float32)
    ours = [x for x in w if "QWEN35_MLX_CUDA_PRECOMPILED" in str(x.message)]
    assert len(ours) == 1, [str(x.message) for x in w]
    assert k1.last == k2.last == "fallback"
    assert [m["name"] for m in made] == ["gated_delta_decode_conv", "gated_delta_step"]
    assert made[0]["source"] == backend.kernel_source("fused", False, True, True)
    assert len(k2._fallback.calls) == 2 and not mx.fast.precompiled_cuda_kernel.calls
    assert not _cache_files()


def test_env_switch_off_uses_cuda_kernel(monkeypatch):
    made = _fallback_recorder(monkeypatch)
    monkeypatch.setenv(precompiled.ENV, "0")
    kern = _backend().build("fused", True, False)
    assert isinstance(kern, Recorder) and made[0]["name"] == "gated_delta_step_fused_mask"
    assert made[0]["header"] == cuda.HEADER


def test_mlx_without_precompiled_kernels_uses_cuda_kernel(monkeypatch):
    made = _fallback_recorder(monkeypatch)
    monkeypatch.delattr(mx.fast, "precompiled_cuda_kernel")
    assert isinstance(_backend().build("scalar", False, True), Recorder) and len(made) == 1


def test_nvrtc_library_env_override_error(monkeypatch):
    monkeypatch.setenv(nvrtc.LIB_ENV, "/nonexistent/libnvrtc.so")
    monkeypatch.setattr(nvrtc, "_lib", None)
    with pytest.raises(nvrtc.NvrtcError, match="QWEN35_MLX_NVRTC"):
        nvrtc.library()
