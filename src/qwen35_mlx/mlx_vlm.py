"""`python -m qwen35_mlx.mlx_vlm <command> [args]`: mlx-vlm's command line, plugin registered.

Any subcommand of the installed mlx-vlm works (`generate`, `chat`, `server`, `convert`, ...), and
Qwen3.5 checkpoints run on qwen35_mlx's models (see `mlx_vlm_plugin`). mlx-vlm is an optional
extra (`pip install "qwen35_mlx[vlm]"`); without it this command says so in one line, exit 2.

    python -m qwen35_mlx.mlx_vlm generate --model PATH --image cat.png --prompt "What is this?"
    python -m qwen35_mlx.mlx_vlm server --model PATH --port 8080
"""

from __future__ import annotations

import importlib.util
import runpy
import sys

from .mlx_lm import refuse_unknown_command

PROG = "python -m qwen35_mlx.mlx_vlm"


def _has_mlx_vlm() -> bool:
    try:
        return importlib.util.find_spec("mlx_vlm") is not None
    except (ImportError, ValueError):  # a None entry in sys.modules, a broken install
        return False


def main(argv: list[str] | None = None) -> int:
    if not _has_mlx_vlm():
        print(
            f'{PROG}: error: mlx-vlm is not installed (pip install "qwen35_mlx[vlm]")',
            file=sys.stderr,
        )
        return 2
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if len(sys.argv) < 2:
        print(f"usage: {PROG} <mlx-vlm command> [args]", file=sys.stderr)
        return 2
    from .mlx_vlm_plugin import register  # the package's __init__ (BLAS before mlx) has run

    register()
    # mlx-vlm's own `python -m mlx_vlm` dispatch: it picks the subcommand from sys.argv[1].
    command = sys.argv[1]
    try:
        runpy.run_module("mlx_vlm", run_name="__main__", alter_sys=True)
    except ValueError as e:
        dispatcher = importlib.util.find_spec("mlx_vlm.__main__").origin
        refuse_unknown_command(e, PROG, dispatcher, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
