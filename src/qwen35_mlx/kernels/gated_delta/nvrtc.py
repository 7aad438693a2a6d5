"""NVRTC through ctypes, and an on-disk cache of the compiled kernels (CUDA only).

MLX compiles `mx.fast.cuda_kernel` sources with NVRTC in every new process and never writes them
to its own PTX cache (mlx/backend/cuda/custom_kernel.cpp passes `use_disk_cache=false`), so
`precompiled.py` compiles our self-contained sources here, once per machine, and hands the
binary to `mx.fast.precompiled_cuda_kernel`.

Library: $QWEN35_MLX_NVRTC (a path to libnvrtc.so), else the libnvrtc this process already
loaded (MLX's CUDA build links it), else the `nvidia-cuda-nvrtc` wheel in site-packages
(`nvidia/cu13/lib` or `nvidia/cuda_nvrtc/lib`), else $CUDA_HOME / $CUDA_PATH / /usr/local/cuda.

Cache: $QWEN35_MLX_CUDA_CACHE, else $XDG_CACHE_HOME/qwen35_mlx/cuda, else
~/.cache/qwen35_mlx/cuda. One file per compiled kernel, named `<entry>-<key>.<cubin|ptx>`, the key
a hash of the full source, the NVRTC options (target architecture included), the NVRTC version
and MLX's version; so a changed source, GPU or upgrade misses and compiles anew. Each file holds
a checksum of its payload, so a truncated or corrupted file is recompiled (and replaced); files
are written to a temporary name and renamed, so a reader never sees half a file. Deleting the
folder is always safe (`rm -rf ~/.cache/qwen35_mlx/cuda`).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

LIB_ENV = "QWEN35_MLX_NVRTC"
CACHE_ENV = "QWEN35_MLX_CUDA_CACHE"
_MAGIC = b"qwen35_mlx cuda kernel v1\n"
_lock = threading.Lock()
_lib = None


class NvrtcError(RuntimeError):
    """NVRTC is missing, or it could not compile a source (the message carries its log)."""


def _candidates() -> list[str]:
    if os.environ.get(LIB_ENV):
        return [os.environ[LIB_ENV]]
    found = []
    try:  # the copy MLX's CUDA build has loaded already (same compiler as its own kernels)
        with open("/proc/self/maps") as f:
            found += sorted({ln.split()[-1] for ln in f if "/libnvrtc.so" in ln})
    except OSError:
        pass
    for site in sys.path:
        for sub in ("nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib", "nvidia/cu12/lib"):
            found += sorted(glob.glob(os.path.join(site, sub, "libnvrtc.so*")))
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            found += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    found += ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]  # the loader's search path
    return [p for p in found if ".alt." not in p]


def _load(path: str):
    if os.sep in path:
        # libnvrtc dlopens its builtins library by name; load it from the same folder first,
        # since a wheel's folder is on no search path.
        for b in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
            if ".alt." not in b:
                ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def library():
    """The loaded libnvrtc (ctypes), found as the module docstring says; raises NvrtcError."""
    global _lib
    with _lock:
        if _lib is None:
            errors = []
            for path in _candidates():
                try:
                    _lib = _load(path)
                    break
                except OSError as e:
                    errors.append(f"{path}: {e}")
            else:
                raise NvrtcError(
                    "libnvrtc not found (set QWEN35_MLX_NVRTC to its path); tried "
                    + "; ".join(errors[:4])
                )
        return _lib


def _check(lib, code: int, what: str) -> None:
    if code != 0:
        raise NvrtcError(f"{what} failed: {lib.nvrtcGetErrorString(code).decode()}")


def version() -> tuple[int, int]:
    lib = library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def supported_archs() -> list[int]:
    """Compute capabilities NVRTC emits SASS for, e.g. [75, 80, ..., 90, 100, ...]."""
    lib = library()
    n = ctypes.c_int()
    _check(lib, lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "nvrtcGetNumSupportedArchs")
    archs = (ctypes.c_int * n.value)()
    _check(lib, lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
    return list(archs)


def device_arch() -> int:
    """The default GPU's compute capability as major * 10 + minor (90 on an H100 / H200)."""
    info = mx.device_info(mx.gpu)
    if "compute_capability_major" in info:
        return 10 * int(info["compute_capability_major"]) + int(info["compute_capability_minor"])
    arch = str(info.get("architecture", ""))
    if arch.startswith("sm_") and arch[3:].isdigit():
        return int(arch[3:])
    raise NvrtcError(f"cannot tell the GPU's compute capability from mx.device_info(): {info}")


def target(arch: int) -> tuple[str, str]:
    """(NVRTC --gpu-architecture, binary kind): SASS (`cubin`) for an architecture NVRTC knows,
    else PTX for the newest one it knows (`ptx`), which the driver compiles for a newer GPU."""
    archs = supported_archs()
    if arch in archs:
        return f"sm_{arch}", "cubin"
    older = [a for a in archs if a <= arch]
    if not older:
        raise NvrtcError(f"NVRTC supports compute capabilities {archs}, not the GPU's {arch}")
    return f"compute_{max(older)}", "ptx"


def compile_source(source: str, options: list[str], kind: str, name: str = "kernel.cu") -> bytes:
    """Compile a self-contained CUDA source with NVRTC; returns the cubin or PTX bytes (`kind`).
    Raises NvrtcError with the compiler's log when the source does not compile."""
    lib = library()
    prog = ctypes.c_void_p()
    _check(
        lib,
        lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
        "nvrtcCreateProgram",
    )
    try:
        opts = [o.encode() for o in options]
        code = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if code != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value + 1)
            lib.nvrtcGetProgramLog(prog, log)
            raise NvrtcError(f"NVRTC could not compile {name}:\n{log.value.decode()[-4000:]}")
        get_size, get = (
            (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN)
            if kind == "cubin"
            else (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX)
        )
        size = ctypes.c_size_t()
        _check(lib, get_size(prog, ctypes.byref(size)), f"nvrtcGet{kind.upper()}Size")
        buf = ctypes.create_string_buffer(size.value)
        _check(lib, get(prog, buf), f"nvrtcGet{kind.upper()}")
        data = buf.raw
        # PTX is a C string: drop its terminating NUL so the bytes are text.
        return data.rstrip(b"\0") if kind == "ptx" else data
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qwen35_mlx" / "cuda"


def cache_key(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def read_cached(path: Path) -> bytes | None:
    """The payload of a cache file, or None if it is missing, truncated or corrupted."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head = len(_MAGIC) + 65  # magic, sha256 hex digest, newline
    if len(data) <= head or not data.startswith(_MAGIC):
        return None
    digest, payload = data[len(_MAGIC) : head - 1], data[head:]
    return payload if hashlib.sha256(payload).hexdigest().encode() == digest else None


def write_cached(path: Path, payload: bytes) -> None:
    """Write atomically: a temporary file in the same folder, then a rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_or_compile(path: Path, compile_fn: Callable[[], bytes]) -> tuple[bytes, str]:
    """(binary, how): the cached binary at `path` ("disk"), or `compile_fn()` written there
    ("compiled"). A cache folder that cannot be written only costs the cache."""
    cached = read_cached(path)
    if cached is not None:
        return cached, "disk"
    payload = compile_fn()
    try:
        write_cached(path, payload)
    except OSError:
        pass
    return payload, "compiled"
