"""`python -m qwen35_mlx.kernels.export --swift`: the Swift file carries the very kernel text the
Python Metal backend builds, and its wrapper has mlx-swift-lm's `gatedDeltaUpdate` signature
(tests/data/mlx_swift_lm/gated_delta.json, read from mlx-swift-lm at the commit it names).
No Swift compiler here: the Metal text itself is compiled by test_metal_source.py."""

import json
import re
from pathlib import Path

import pytest

from qwen35_mlx.kernels import export
from qwen35_mlx.kernels.gated_delta import metal
from qwen35_mlx.kernels.gated_delta.launch import MAX_DK, default_layout
from qwen35_mlx.kernels.gated_delta.source import input_names, kernel_name

FIXTURE = Path(__file__).parents[1] / "data" / "mlx_swift_lm" / "gated_delta.json"


@pytest.fixture(scope="module")
def swift(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("swift")
    assert export.main(["--swift", str(out)]) == 0
    return (out / export.SWIFT_FILE).read_text(encoding="utf-8")


def raw_strings(text: str) -> dict[str, str]:
    """`private let NAME = #\"\"\"...\"\"\"#` constants and their values (Swift's rules for a raw
    multi-line literal whose closing delimiter sits at column 0)."""
    found = re.findall(r'private let (\w+) = #"""\n(.*?)\n"""#', text, flags=re.S)
    return dict(found)


def test_exported_kernel_text_is_the_python_metal_text(swift):
    consts = raw_strings(swift)
    assert consts.pop("gatedDeltaFusedHeader") == metal.BACKEND.header
    for gate, mask, decode in export.SWIFT_VARIANTS:
        name = kernel_name(gate, mask, decode)
        ident = export._swift_ident(name) + "Source"
        assert consts.pop(ident) == metal.BACKEND.kernel_source(gate, mask, decode), name
        # The kernel is registered under its Python name, with the Python input names.
        inputs = ", ".join(f'"{n}"' for n in input_names(gate, mask))
        assert f'("{name}", [{inputs}], {ident}),' in swift
    assert not consts  # nothing else embedded
    assert {v[1:] for v in export.SWIFT_VARIANTS} == {(m, d) for m in (0, 1) for d in (0, 1)}


def test_exported_layouts_are_launch_default_layout(swift):
    table = swift.split("gatedDeltaFusedLayouts: [Int: (Int, Int, Int)] = [", 1)[1]
    table = table.split("\n]", 1)[0]
    got = {
        int(k): tuple(map(int, v)) for k, *v in re.findall(r"(\d+): \((\d+), (\d+), (\d+)\)", table)
    }
    want = {
        2 * Dk + decode: default_layout(Dk, 1 if decode else 2, 1)
        for Dk in range(32, MAX_DK + 1, 32)
        for decode in (0, 1)
    }
    assert got == want


def _signature(text: str, name: str):
    m = re.search(rf"public func {name}\((.*?)\) -> (\([^)]*\))", text, flags=re.S)
    assert m, f"no public func {name}"
    args = []
    for part in m.group(1).split(","):
        if not part.strip():
            continue
        label, rest = (x.strip() for x in part.split(":", 1))
        type_, _, default = (x.strip() for x in rest.partition("="))
        args.append({"label": label, "type": type_, "default": default or None})
    return args, m.group(2)


def test_swift_wrapper_signature_matches_mlx_swift_lm(swift):
    fixture = json.loads(FIXTURE.read_text())
    assert fixture["source"]["commit"] and fixture["function"] == "gatedDeltaUpdate"
    args, returns = _signature(swift, export.SWIFT_FUNCTION)
    want = [{k: a[k] for k in ("label", "type", "default")} for a in fixture["arguments"]]
    assert args == want
    assert returns == fixture["returns"]["type"]
    # The documented shapes are the fixture's.
    for a in fixture["arguments"]:
        assert re.search(rf"///   - {a['label']}: {re.escape(a['shape'])}", swift), a["label"]
    y, state = fixture["returns"]["values"]
    assert f"(y {y['shape']} in q's dtype, state {state['shape']} float32)" in swift
    # Unsupported shapes go to mlx-swift-lm's own function, with every argument by label.
    labels = ", ".join(f"{a['label']}: {a['label']}" for a in fixture["arguments"])
    assert f"MLXLMCommon.gatedDeltaUpdate(\n            {labels})" in swift


def test_export_cli_errors(tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert export.main(["--swift", str(not_a_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a folder" in err
    with pytest.raises(SystemExit) as e:
        export.main([])
    assert e.value.code == 2


def test_exported_file_is_readable_by_others(tmp_path):
    path = export.write_swift(tmp_path)
    assert path.stat().st_mode & 0o044 == 0o044  # group and others read it, as a written file
    assert [p.name for p in tmp_path.iterdir()] == [export.SWIFT_FILE]
