"""The package namespace: `qwen35_mlx.generate` is the function, whatever imported the CLI module
of the same name first; `import qwen35_mlx` stays light; the CLI modules run with `python -m`."""

import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def python(*args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter on this checkout's package (nothing imported by this test process)."""
    path = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, QWEN35_MLX_BLAS="reference")
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_generate_is_the_function_after_importing_the_cli_module():
    code = (
        "import sys\n"
        "import qwen35_mlx.generate\n"
        "from qwen35_mlx import generate\n"
        "import qwen35_mlx\n"
        "assert callable(generate) and generate.__module__ == 'qwen35_mlx.generation', generate\n"
        "assert qwen35_mlx.generate is generate\n"
        "assert callable(sys.modules['qwen35_mlx.generate'].main)\n"
        "print('ok')\n"
    )
    r = python("-c", code)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


def test_import_is_light():
    code = "import sys, qwen35_mlx\nprint(sorted(m for m in sys.modules if m.startswith('mlx')))"
    r = python("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[]\n"


def test_cli_modules_run_with_python_m():
    r = python("-m", "qwen35_mlx.generate", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m qwen35_mlx.generate")
    # runpy warns when the package has already imported the module it is about to run.
    assert "found in sys.modules" not in r.stderr, r.stderr
    r = python("-mqwen35_mlx.generate", "--help")  # the module name glued to -m
    assert r.returncode == 0 and "found in sys.modules" not in r.stderr, r.stderr
    r = python("-m", "qwen35_mlx.mlx_lm")
    assert r.returncode == 2 and "usage: python -m qwen35_mlx.mlx_lm" in r.stderr


def test_unknown_command_is_one_line_exit_2():
    for module, lib in (("qwen35_mlx.mlx_lm", "mlx-lm"), ("qwen35_mlx.mlx_vlm", "mlx-vlm")):
        r = python("-m", module, "nosuchcmd")
        assert r.returncode == 2, (module, r.stderr)
        assert r.stdout == "" and r.stderr.count("\n") == 1, (module, r.stderr)
        assert f"python -m {module}: error: unknown command 'nosuchcmd'" in r.stderr, r.stderr
        assert "generate" in r.stderr and "server" in r.stderr, (lib, r.stderr)


def test_unknown_command_leaves_other_value_errors_alone():
    # Only the dispatcher's own refusal is reworded; a ValueError raised anywhere else (inside a
    # subcommand) goes on as it was.
    import pytest
    from mlx_lm import cli

    from qwen35_mlx.mlx_lm import refuse_unknown_command

    try:
        raise ValueError("CLI requires a subcommand in ('generate',)")
    except ValueError as e:
        with pytest.raises(ValueError, match="CLI requires"):
            refuse_unknown_command(e, "prog", cli.__file__, "generate")
