"""Kernels import nothing of ours above kernels/ (STYLE.md: kernels <- models <- loader <- ...)."""

import ast
from pathlib import Path

import qwen35_mlx.kernels

KERNELS = Path(qwen35_mlx.kernels.__file__).parent


def _imports_above_kernels(path: Path) -> list[str]:
    depth = len(path.relative_to(KERNELS).parts) - 1  # folders below kernels/
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > depth + 1:
            bad.append(f"{'.' * node.level}{node.module or ''}")
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        bad += [
            n
            for n in names
            if n.split(".")[0] == "qwen35_mlx" and not n.startswith("qwen35_mlx.kernels")
        ]
    return bad


def test_kernels_import_nothing_above_kernels():
    files = sorted(KERNELS.rglob("*.py"))
    assert len(files) >= 8
    found = {str(p.relative_to(KERNELS)): _imports_above_kernels(p) for p in files}
    assert {k: v for k, v in found.items() if v} == {}
