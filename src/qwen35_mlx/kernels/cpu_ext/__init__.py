"""The optional CPU extension: native MLX CPU primitives for what MLX ops do slowly on a CPU.

MLX has no CPU custom-kernel API, so these are C++ `mx::Primitive`s in one module (`src/`, a
source file each), built with MLX's documented extension recipe (the installed mlx's CMake
package + nanobind in MLX's domain, so `mx.array` is the same Python type on both sides); they
work inside `mx.compile`:
- `gated_delta(q, k, v, g, beta, state, mask=None)` (`src/gated_delta_cpu.cpp`): the gated delta
  recurrence, each row of the state read once, carried through every step in L1 and written
  once (float32 arithmetic; q/k/v in f32, bf16 or f16). The gated delta module's backend
  "native".
- `matmul_rows(x, weights, adds=None)` (`src/matmul_rows_cpu.cpp`): `x @ W (+ add)` for a few
  rows of float32 x and each [K, N] W, W read once for all rows, summed as MLX's reference BLAS
  sums (the same bits). `matmul_rows` below.
- `silu_mul(a, b)`, `conv_silu(x, w, tokens)` (`src/half_ops_cpu.cpp`): two float16 chains of a
  decode step (the MLP's swiglu; the linear layers' causal conv + silu) rounded as MLX's float16
  ops round (the same bits), with hardware conversions: on x86 MLX emulates float16 per element
  and op. `HALF_OPS` below.
- `mtp_head(hidden, emb, keys, values, idx, weights, ...)` (`src/mtp_head_cpu.cpp`): the MTP
  head's step over a greedy round's positions (fc, the full-attention layer with its KV
  buffers, MLP, norm, lm_head, argmax) in one primitive, float32 throughout: approximate
  drafts. `models.mtp.NATIVE_HEAD` and `native_head` there.

Building needs cmake, a C++20 compiler and nanobind of MLX's ABI (`pip install "nanobind>=3"` for
mlx 0.32); nothing else in the package needs them. Build it once per machine (about a minute
on two cores):

    python -m qwen35_mlx.kernels.cpu_ext        # builds, then checks it

The module goes to `~/.cache/qwen35_mlx/cpu_ext/<key>/` (`QWEN35_MLX_CPU_EXT_DIR` overrides the
parent), keyed by the sources, the mlx version and the Python ABI, so a new mlx means a rebuild.
`load()` never compiles: without a built module (no compiler, a Mac, another mlx) it returns
None and every caller keeps its MLX-ops path, silently. `QWEN35_MLX_CPU_EXT=0` turns it off.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import mlx.core as mx

MODULE = "_qwen35_mlx_cpu"
SRC_DIR = Path(__file__).with_name("src")
DIR_ENV = "QWEN35_MLX_CPU_EXT_DIR"
OFF_ENV = "QWEN35_MLX_CPU_EXT"

_loaded: list = []  # [module or None] once load() has run


def cache_key() -> str:
    h = hashlib.sha256()
    for p in sorted(SRC_DIR.iterdir()):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    tag = sysconfig.get_config_var("EXT_SUFFIX") or ""
    h.update(f"{mx.__version__}\0{tag}\0{sys.implementation.cache_tag}".encode())
    return h.hexdigest()[:20]


def build_dir() -> Path:
    base = os.environ.get(DIR_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "qwen35_mlx", "cpu_ext")
    return Path(base).expanduser() / cache_key()


def _module_path(directory: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = directory / f"{MODULE}{suffix}"
        if p.exists():
            return p
    return None


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _works(mod) -> bool:
    """A call on tiny arrays: the module imports with another nanobind ABI too, but then mx.array
    is not its type and every call fails with TypeError."""
    try:
        (w,) = mod.matmul_rows(mx.ones((1, 2)), [mx.ones((2, 3))])
        z = mx.zeros((1, 1, 1, 2))
        y, s = mod.gated_delta(
            z, z, z, mx.ones((1, 1, 1)), mx.ones((1, 1, 1)), mx.zeros((1, 1, 2, 2))
        )
        mx.eval(y, s, w)
        return y.shape == (1, 1, 1, 2) and s.shape == (1, 1, 2, 2) and w.tolist() == [[2.0] * 3]
    except Exception:
        return False


def load():
    """The built module, or None (not built here, switched off, or unusable). Never compiles."""
    if _loaded:
        return _loaded[0]
    mod = None
    if os.environ.get(OFF_ENV, "1") != "0":
        path = _module_path(build_dir())
        if path is not None:
            try:
                mod = _import(path)
            except ImportError:
                mod = None
            if mod is not None and not _works(mod):
                mod = None
    _loaded.append(mod)
    return mod


def available() -> bool:
    return load() is not None


def build(*, jobs: int | None = None, quiet: bool = True) -> Path:
    """Configure and compile the module into build_dir(); returns the module's path. Raises
    RuntimeError (with the tool's output) when a tool is missing or the build fails."""
    out = build_dir()
    found = _module_path(out)
    if found is not None:
        return found
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cpu_ext: cmake not found")
    try:
        import nanobind
    except ImportError as e:
        raise RuntimeError('cpu_ext: nanobind not installed (pip install "nanobind>=3")') from e
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        work = Path(tmp)
        cfg = [
            cmake, "-S", str(SRC_DIR), "-B", str(work / "build"),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dnanobind_DIR={nanobind.cmake_dir()}",
            f"-DMLX_DIR={Path(mx.__file__).parent / 'share' / 'cmake' / 'MLX'}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={work / 'lib'}",
        ]  # fmt: skip
        jobs = jobs or os.cpu_count() or 1
        steps = [cfg, [cmake, "--build", str(work / "build"), "-j", str(jobs)]]
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=quiet, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"cpu_ext: {' '.join(cmd[:3])} failed:\n{r.stdout}\n{r.stderr}")
        built = _module_path(work / "lib")
        if built is None:
            raise RuntimeError(f"cpu_ext: the build gave no {MODULE} module in {work / 'lib'}")
        staged = work / "stage"
        staged.mkdir()
        shutil.copy2(built, staged / built.name)
        try:
            staged.rename(out)  # atomic: a concurrent build's result is as good as ours
        except OSError:
            if _module_path(out) is None:
                raise
    _loaded.clear()
    return _module_path(out)


def main() -> int:
    import time

    t0 = time.perf_counter()
    try:
        path = build(quiet=False)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"built {path} in {time.perf_counter() - t0:.1f} s")
    if not available():
        print("but it does not work with this mlx (nanobind ABI?)", file=sys.stderr)
        return 1
    print("it works: gated_delta backend 'native' and matmul_rows are available on the CPU")
    return 0


def matmul_rows(x: mx.array, weights, adds=None, half_out: bool = False) -> list[mx.array]:
    """[x @ w (+ add) for each w (and add)]: x float32 or float16 (converted to float32
    exactly) [..., K] (a few rows), each w float32 [K, N], each add float32 of its output's
    shape [..., N]; one primitive on the CPU stream. Summed in k order, every product and add
    rounded on its own, as MLX's bundled reference BLAS sums a float32 matmul: the same bits as
    `x @ w` there, and each row's whatever the number of rows. `half_out`: each result rounded
    to float16 as `astype` rounds (no adds then): `(x.astype(f32) @ w).astype(f16)` in one
    primitive. Needs the built module (`available()`)."""
    mod = load()
    if mod is None:
        raise RuntimeError("cpu_ext: not built (python -m qwen35_mlx.kernels.cpu_ext)")
    return mod.matmul_rows(x, list(weights), None if adds is None else list(adds), half_out)


# The float16 chains (`silu_mul`, `conv_silu`) where the module is built, on the CPU (the
# callers: models/layers.py's swiglu, kernels/gated_delta/decode.py's conv). Their bits are MLX's
# float16 ops' (tests/kernels/test_half_ops.py), so this switch only moves time. False: MLX's ops.
HALF_OPS = True


def half_ops(x: mx.array) -> bool:
    """Whether float16 `x`'s chains run as the native primitives (`HALF_OPS`)."""
    return (
        HALF_OPS
        and x.dtype == mx.float16
        and mx.default_device() == mx.cpu
        and hasattr(load(), "silu_mul")
    )


def silu_mul(a: mx.array, b: mx.array) -> mx.array:
    """silu(a) * b for float16 a, b of one shape (any strides), as MLX's float16 ops round it:
    sigmoid as MLX's (its polynomial exp, rounded to float16), then each product rounded to
    float16. One primitive on the CPU stream. Needs the built module."""
    if a.shape != b.shape:
        b = mx.broadcast_to(b, a.shape) if a.ndim >= b.ndim else b
        a = mx.broadcast_to(a, b.shape)
    return load().silu_mul(a, b)


def conv_silu(x: mx.array, w: mx.array, tokens: int) -> mx.array:
    """silu(sum_j x[:, t + j] * w[:, j]) for t < tokens: the causal depthwise conv of float16
    x [B, K-1+T, C] (channels contiguous) and w [C, K] -> [B, T, C], each product and sum
    rounded to float16 in that order, as MLX's ops (h = x_0 w_0; h = h + x_j w_j; silu). One
    primitive on the CPU stream. Needs the built module."""
    return load().conv_silu(x, w, tokens)
