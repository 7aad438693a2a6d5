"""`python -m qwen35_mlx.mlx_lm <command> [args]`: mlx-lm's command line with the plugin registered.

Any mlx-lm subcommand works (`generate`, `chat`, `server`, `cache_prompt`, `convert`, ...), and
Qwen3.5 checkpoints (`qwen3_5`, `qwen3_5_text`, `qwen3_5_moe`, `qwen3_5_moe_text`) run on
qwen35_mlx's models. Example:

    python -m qwen35_mlx.mlx_lm generate --model PATH --prompt "Hello"
    python -m qwen35_mlx.mlx_lm server --model PATH --host 127.0.0.1 --port 8080
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    # The package's __init__ (which preloads the BLAS before mlx) has run: this module is only
    # ever loaded as qwen35_mlx.mlx_lm. Its name matches the dependency's, but every import of
    # `mlx_lm` here is absolute, so it reaches the dependency, never this module.
    from .mlx_lm_plugin import register

    register()
    from mlx_lm import cli

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if len(sys.argv) < 2:
        print("usage: python -m qwen35_mlx.mlx_lm <mlx-lm command> [args]", file=sys.stderr)
        raise SystemExit(2)
    cli.main()


if __name__ == "__main__":
    main()
