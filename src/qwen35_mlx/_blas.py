"""A fast BLAS for MLX's Linux CPU build, loaded before mlx is.

MLX's Linux CPU wheel (mlx-cpu) links a bundled reference BLAS/LAPACK (mlx_cpu.libs/libblas-*):
a 2048^2 fp32 matmul runs at a few GFLOP/s, against well over 100 with OpenBLAS on the same
cores. The chunked gated-delta prefill (and every CPU matmul) lives or dies by this.

preload_openblas(), called by qwen35_mlx/__init__.py before anything imports mlx, dlopens a
system OpenBLAS (Debian/Ubuntu: `apt-get install libopenblas0-pthread`) with RTLD_GLOBAL. When
mlx's library is loaded afterwards, the dynamic linker resolves its cblas_*/BLAS/LAPACK symbols
in the global scope first, so they bind to OpenBLAS instead of the bundled reference library
(the same effect as LD_PRELOAD, without restarting the process).

- Off switch: QWEN35_MLX_BLAS=reference. QWEN35_MLX_BLAS=/path/to/libopenblas.so.0 picks a file.
- Nothing happens on macOS (MLX uses Accelerate there), nor when mlx's build brings no bundled
  reference BLAS, nor when mlx was imported first (too late; the chunked path then warns once).
- Older OpenBLAS releases do not recognise some recent x86 CPUs and fall back to a generic SSE3
  kernel (several times slower); where the CPU has AVX-512 or AVX2 and OPENBLAS_CORETYPE is
  unset, the matching kernel is named for the load only (the variable is restored afterwards).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import warnings
from pathlib import Path

# Plain Python (imports nothing, mlx included): the kernels' hook for matmul-heavy CPU paths.
from .kernels import on_cpu_matmul, set_slow_blas_query

_ENV = "QWEN35_MLX_BLAS"
_SEARCH = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_INSTALL_HINT = (
    "install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread) and import "
    "qwen35_mlx before mlx; set QWEN35_MLX_BLAS=reference to silence this"
)

# What preload_openblas() found; read by blas_status() and warn_if_reference_blas().
_status: dict = {"blas": "not checked"}
_warned = False


def _mlx_bundles_reference_blas() -> bool | None:
    """True when the installed mlx links its bundled reference BLAS (mlx-cpu wheel)."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    # mlx is a namespace package: look next to the location that holds its compiled core.
    for loc in map(Path, spec.submodule_search_locations):
        if any(loc.glob("core*.so")):
            return any((loc.parent / "mlx_cpu.libs").glob("libblas*.so*"))
    return None


def _coretype() -> str | None:
    """OpenBLAS kernel name for this x86 CPU, from /proc/cpuinfo flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return None
    flags = set(flags)
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "SKYLAKEX"
    if {"avx2", "fma"} <= flags:
        return "HASWELL"
    return None


def _load(path: str) -> ctypes.CDLL | None:
    coretype = _coretype() if os.uname().machine == "x86_64" else None
    set_core = coretype is not None and "OPENBLAS_CORETYPE" not in os.environ
    if set_core:
        os.environ["OPENBLAS_CORETYPE"] = coretype
    try:
        return ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    except OSError:
        return None
    finally:
        if set_core:
            del os.environ["OPENBLAS_CORETYPE"]


def preload_openblas() -> None:
    """Load OpenBLAS globally before mlx is imported, where that is possible and safe."""
    global _status
    choice = os.environ.get(_ENV, "").strip()
    if sys.platform != "linux":
        _status = {"blas": "platform default", "reason": f"not Linux ({sys.platform})"}
        return
    if choice.lower() in ("reference", "ref", "off", "0", "none"):
        _status = {"blas": "reference", "reason": f"{_ENV}={choice}", "opt_out": True}
        return
    if "mlx.core" in sys.modules or _libmlx_loaded():
        _status = {"blas": "reference", "reason": "mlx was imported before qwen35_mlx"}
        _status.update(_already_loaded())
        return
    if not _mlx_bundles_reference_blas():
        _status = {"blas": "mlx default", "reason": "mlx does not bundle the reference BLAS"}
        return
    for path in (choice,) if choice else _SEARCH:
        lib = _load(path)
        if lib is not None:
            _status = {"blas": "openblas", "path": path}
            try:
                lib.openblas_get_corename.restype = ctypes.c_char_p
                _status["core"] = lib.openblas_get_corename().decode()
                _status["threads"] = int(lib.openblas_get_num_threads())
            except (AttributeError, OSError):
                pass
            return
    _status = {"blas": "reference", "reason": "no OpenBLAS found"}


def _proc_maps() -> str:
    """This process's mapped files ("" where /proc is unreadable)."""
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""


def _libmlx_loaded() -> bool:
    return "libmlx" in _proc_maps()


def _already_loaded() -> dict:
    """An OpenBLAS that the user put in LD_PRELOAD is in use even when mlx came first."""
    if "libopenblas" in _proc_maps() and "LD_PRELOAD" in os.environ:
        return {"blas": "openblas", "reason": "LD_PRELOAD"}
    return {}


def blas_status() -> dict:
    """Which BLAS MLX's CPU backend uses in this process, and why (for logs and benchmarks)."""
    return dict(_status)


def warn_if_reference_blas() -> None:
    """One warning per process when a matmul-heavy CPU path runs on the reference BLAS."""
    global _warned
    if _warned or _status.get("blas") != "reference" or _status.get("opt_out"):
        return
    _warned = True
    warnings.warn(
        f"qwen35_mlx: MLX's CPU backend uses its slow reference BLAS ({_status.get('reason')}), "
        f"so chunked prefill runs several times slower; {_INSTALL_HINT}.",
        RuntimeWarning,
        stacklevel=4,
    )


# The chunked gated-delta path runs its CPU hooks first; kernels import nothing above kernels/.
on_cpu_matmul(warn_if_reference_blas)
set_slow_blas_query(lambda: _status.get("blas") == "reference")
