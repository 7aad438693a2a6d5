"""Array math for Qwen3.5: kernels know shapes, never layers; they import only mlx.

The one thing they take from above is injected: `on_cpu_matmul(hook)` registers a callable (no
arguments) that runs before a matmul-heavy path starts on the CPU. The package registers its
slow-BLAS warning there (`qwen35_mlx._blas`). This file imports nothing, so it can be loaded
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
