"""qwen35_mlx: Qwen3.5 models (hybrid Gated DeltaNet + gated attention) on MLX.

Public API: load, generate, stream_generate, batch_generate (imported on first use, so
`import qwen35_mlx` stays light).
"""

import sys as _sys
import types as _types

# Must run before anything imports mlx: on Linux it swaps MLX's reference BLAS for OpenBLAS.
from ._blas import preload_openblas

preload_openblas()

__version__ = "0.1.0"

__all__ = ["load", "generate", "stream_generate", "batch_generate", "PromptCache"]

_LAZY = {
    "load": ("loader", "load"),
    "generate": ("generation", "generate"),
    "stream_generate": ("generation", "stream_generate"),
    "batch_generate": ("generation", "batch_generate"),
    "PromptCache": ("prompt_cache", "PromptCache"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


class _Package(_types.ModuleType):
    def __setattr__(self, name, value):
        # Importing the CLI module `qwen35_mlx.generate` would bind it over the generate()
        # function; the module stays reachable through sys.modules (`python -m`, `from ... import`).
        if name == "generate" and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
