"""scripts/kernel_sources.py, the check that a refactor of the kernel text leaves every kernel as
MLX receives it: its dump records every variant (run in a subprocess: it replaces the kernel
factories), and its diff tells a changed kernel from an unchanged one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from qwen35_mlx.kernels import rows_matmul
from qwen35_mlx.kernels.attention import prefill
from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import metal, source

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kernel_sources.py"


def test_dump_records_every_variant(tmp_path):
    out = tmp_path / "kernels.json"
    path = [str(ROOT / "src"), os.environ.get("PYTHONPATH")]  # keeps where mlx comes from
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    subprocess.run([sys.executable, str(SCRIPT), "dump", str(out)], check=True, env=env)
    d = json.loads(out.read_text())
    kinds = {"gd", "chunk", "attention", "prefill", "fused_norm", "conv_qkv", "rows_matmul"}
    assert {k.split("/")[0] for k in d} == kinds | {"launch"}
    # prefill attention: per backend version 1's 4 variants, versions 2 and 3's at 3 ring sizes
    assert sum(k.startswith("prefill/") for k in d) == 2 * (4 + 2 * 4 * 3)
    v3 = d["prefill/cuda/v3/mask=False/causal=True/ring=4"]
    assert v3["source"] == prefill.source("cuda", False, True, 3, 4)
    assert v3["header"] == prefill.header("cuda")
    for which in ("h3", "h3o", "o2y", "o2p", "wy2x_fused", "h3o_stamped", "h2/no_l32", "wy2xp"):
        assert "source" in d[f"chunk/cuda/{which}"], which
    passes = {k.split("/")[1] for k in d if k.startswith("launch/")}
    assert passes == {"wy", "prep", "h", "o", "state"}
    assert all("template" in d[k] or "error" in d[k] for k in d if k.startswith("launch/"))
    for backend in ("metal", "cuda"):
        for which in ("state", "state_mma", "prep_fused_mma", "wy", "wy_fused", "h", "o", "o2"):
            assert d[f"chunk/{backend}/{which}"]["source"].startswith(cl.PROLOGUE[backend])
        name = d[f"chunk/{backend}/o2/p16=False/ring=2"]["name"]
        assert name.startswith(cl.src.O2_NAME) and "_p32_r2" in name, name
        assert d[f"rows_matmul/{backend}"]["source"] == rows_matmul.kernel_source(backend)
    assert d["chunk/cuda/h2/t32"]["header"].startswith("#define GD_MMA16 0\n")
    packed = ("fused", True, True, True, True, 3, True)
    fused = d[f"gd/metal/{packed}"]
    assert fused["name"] == "gated_delta_decode_conv_packed_t3_norm_mask"
    assert fused["source"] == metal.PROLOGUE + source.kernel_body(*packed)
    assert fused["header"] == metal.HEADER


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_diff_finds_a_changed_kernel(tmp_path):
    """A commit whose O_BODY then changes one line: the diff names the o kernels, and only
    them; white space alone is no change."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    _git(repo, "init", "-q")
    _git(repo, "add", "src")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    path = repo / "src" / "qwen35_mlx" / "kernels" / "gated_delta" / "chunk_source.py"
    text = path.read_text()
    line = "  constexpr int PH2 = C * PP + C * VP;\n"
    assert text.count(line) == 1
    cmd = [sys.executable, str(SCRIPT), "diff", "--base", "HEAD", "--repo", str(repo)]

    path.write_text(text.replace(line, "  constexpr int   PH2 = C * PP\n     + C * VP;\n"))
    same = subprocess.run(cmd, capture_output=True, text=True)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "0 differ" in same.stdout

    path.write_text(text.replace(line, "  constexpr int PH2 = C * PP + C * VP + 4;\n"))
    changed = subprocess.run(cmd, capture_output=True, text=True)
    assert changed.returncode == 1, changed.stdout + changed.stderr
    named = sorted(ln.split(" ")[0] for ln in changed.stdout.splitlines() if "differs" in ln)
    assert named == ["chunk/cuda/o", "chunk/cuda/o/t32", "chunk/metal/o"]
