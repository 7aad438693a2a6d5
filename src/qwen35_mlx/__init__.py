"""qwen35_mlx: Qwen3.5 models (hybrid Gated DeltaNet + gated attention) on MLX.

Public API: load, generate, stream_generate, batch_generate (imported on first use, so
`import qwen35_mlx` stays light).
"""

import sys as _sys

# Must run before anything imports mlx: on Linux it swaps MLX's reference BLAS for OpenBLAS.
from ._blas import preload_openblas

preload_openblas()

__version__ = "0.1.0"

__all__ = ["load", "generate", "stream_generate", "batch_generate", "PromptCache"]

# The command-line module `generate` shares its name with the generate() function. Import order
# settles it, as in mlx-lm: the module is imported here (it imports only argparse at load time)
# and its name dropped, so `qwen35_mlx.generate` is the function, found below on first use; a
# later `import qwen35_mlx.generate` finds the module in sys.modules and leaves the name alone.
# Under `python -m qwen35_mlx.generate` runpy imports this package first (sys.argv[0] is "-m"
# meanwhile) and then runs the module as __main__; importing it here as well would run it twice.
# The module name may be glued to its option (`python -mqwen35_mlx.generate`, `-Im...`).
if not (
    _sys.argv[:1] == ["-m"]
    and any(a.endswith(f"{__name__}.generate") for a in getattr(_sys, "orig_argv", ()))
):
    from . import generate

    del generate

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
