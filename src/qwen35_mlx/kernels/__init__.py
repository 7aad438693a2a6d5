"""Array math for Qwen3.5: kernels know shapes, never layers; they import only mlx.

The things they take from above are injected: `on_cpu_matmul(hook)` registers a callable (no
arguments) that runs before a matmul-heavy path starts on the CPU; the package registers its
slow-BLAS warning there (`qwen35_mlx._blas`). `set_slow_blas_query(fn)`: fn() says whether CPU
matmuls run on MLX's slow reference BLAS (the gated delta dispatch then prefers the native
recurrence over the matmul-heavy chunked form). This file imports nothing, so it can be loaded
before mlx is.
"""

from __future__ import annotations

from collections.abc import Callable

_cpu_matmul_hooks: list[Callable[[], None]] = []


def on_cpu_matmul(hook: Callable[[], None]) -> None:
    """Run `hook()` before each matmul-heavy CPU path (registered once; order kept)."""
    if hook not in _cpu_matmul_hooks:
        _cpu_matmul_hooks.append(hook)


def run_cpu_matmul_hooks() -> None:
    for hook in _cpu_matmul_hooks:
        hook()


_slow_blas_query: list[Callable[[], bool]] = []


def set_slow_blas_query(fn: Callable[[], bool]) -> None:
    """fn() -> True when CPU matmuls run on a slow (reference) BLAS; the last one set counts."""
    _slow_blas_query[:] = [fn]


def cpu_blas_is_slow() -> bool:
    """What the query set by `set_slow_blas_query` says; False when none was set."""
    return bool(_slow_blas_query and _slow_blas_query[0]())


def gpu_backend_name() -> str | None:
    """ "cuda" or "metal", whichever GPU this MLX build has, else None (imports mlx when called)."""
    import mlx.core as mx

    if mx.cuda.is_available():
        return "cuda"
    return "metal" if mx.metal.is_available() else None


def gpu_build():
    """The gated-delta kernels' GPU build of this machine (its helpers and kernel factory), or
    None: what the kernels outside that package (fused_norm, conv_qkv) compile with."""
    name = gpu_backend_name()
    if name == "cuda":
        from .gated_delta.cuda import BACKEND
    elif name == "metal":
        from .gated_delta.metal import BACKEND
    else:
        return None
    return BACKEND
