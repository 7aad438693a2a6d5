"""`python -m qwen35_mlx.mlx_lm <command> [args]`: mlx-lm's command line with the plugin registered.

Any mlx-lm subcommand works (`generate`, `chat`, `server`, `cache_prompt`, `convert`, ...), and
Qwen3.5 checkpoints (`qwen3_5`, `qwen3_5_text`, `qwen3_5_moe`, `qwen3_5_moe_text`) run on
qwen35_mlx's models. Example:

    python -m qwen35_mlx.mlx_lm generate --model PATH --prompt "Hello"
    python -m qwen35_mlx.mlx_lm server --model PATH --host 127.0.0.1 --port 8080
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PROG = "python -m qwen35_mlx.mlx_lm"


def refuse_unknown_command(error: ValueError, prog: str, dispatcher: str, command: str) -> None:
    """Turn the `ValueError` a library's subcommand dispatcher (the file `dispatcher`: mlx-lm's
    `cli.py`, mlx-vlm's `__main__.py`) raises for an unknown `command` into one line and exit 2;
    re-raise anything else (an error from inside a subcommand is not ours to rename).

    The dispatchers keep their command lists in local variables, and name them only in the
    message ("CLI requires a subcommand in (...)"), so the valid ones are read from there."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or Path(tb.tb_frame.f_code.co_filename).resolve() != Path(dispatcher).resolve():
        raise error
    _, _, listed = str(error).partition(" in ")
    try:
        valid = ", ".join(sorted(ast.literal_eval(listed)))
    except (ValueError, SyntaxError, TypeError):
        valid = listed or str(error)
    print(f"{prog}: error: unknown command {command!r} (valid: {valid})", file=sys.stderr)
    raise SystemExit(2) from None


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
        print(f"usage: {PROG} <mlx-lm command> [args]", file=sys.stderr)
        raise SystemExit(2)
    if sys.argv[1] == "server":
        # mlx-lm's server is a stdlib ThreadingHTTPServer, whose listen backlog is 5: a burst of
        # concurrent requests (32 in tests/test_server_load.py) had some connections reset
        # before the server saw them. This process only serves, so raise the backlog here.
        from http.server import ThreadingHTTPServer

        ThreadingHTTPServer.request_queue_size = 128
    command = sys.argv[1]
    try:
        cli.main()
    except ValueError as e:
        refuse_unknown_command(e, PROG, cli.__file__, command)


if __name__ == "__main__":
    main()
