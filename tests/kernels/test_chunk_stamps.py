"""The stamped builds of the split path's parallel passes (chunk_source.stamped, round 5): the
default WY2 / O2 text with clock stamps and nothing else, compiled for sm_90 with the extra
`stamps` output, the host's launch of them (through a recording factory: no GPU here), and the
default builds untouched."""

import re
import subprocess

import mlx.core as mx
import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.kernels.test_chunk_cuda_source import NVCC
from tests.kernels.test_chunk_split_sources import cuda_unit, kernels
from tests.kernels.test_cuda_source import PRELUDE

BODIES = {
    "wy2": lambda: cs.wy_body(False, True),
    "wy2_fused": lambda: cs.wy_body(True, True),
    "o2": lambda: cs.o2_body(True, 3),
    "o2 session 8": lambda: cs.o2_body(False, 2),
}


@pytest.mark.parametrize("which", BODIES)
@pytest.mark.usefixtures("plain_split")
def test_stamped_text_is_the_pass_plus_stamps(which):
    """Removing the stamp lines and their definitions gives the pass's text back, letter for
    letter; every anchor took one stamp, numbered in order, and the start / end times too."""
    body = BODIES[which]()
    anchors = cs.WY2_STAMPS if which.startswith("wy2") else cs.O2_STAMPS
    text = cs.stamped(body, anchors)
    assert text != body
    assert cs.unstamped(text) == body
    got = [int(j) for j in re.findall(r"GD_STAMP\((\d+)\);", text)]
    assert sorted(got) == list(range(3, 4 + len(anchors)))
    # the loop's sampled stamps under their condition, once each
    for j, (_, _, *cond) in enumerate(anchors):
        if cond:
            assert text.count(f"    if ({cond[0]}) GD_STAMP({3 + j});\n") == 1
    assert text.count("GD_STAMP_GT(1);") == text.count("GD_STAMP_GT(2);") == 1
    assert text.count("GD_STAMP_SM();") == 1


@pytest.mark.usefixtures("plain_split")
def test_stamped_refuses_a_missing_or_repeated_anchor():
    body = cs.wy_body(False, True)
    with pytest.raises(ValueError, match="occurs 0 times"):
        cs.stamped(body, (("x", "no such line\n"),))
    with pytest.raises(ValueError, match="times"):
        cs.stamped(body, (("x", "gd_barrier();"),))


def _stamped_cases(itemsize: int):
    """(name, ins, outs, stamped body, tpl) for WY2 (plain, fused) and O2 as the host builds
    them for pieces of `itemsize` bytes, from the split-source test's list of the defaults."""
    out = []
    for name, ins, outs, body, tpl in kernels("cuda", 128, itemsize):
        if name in (cs.wy_name(False, True), cs.wy_name(True, True)):
            out.append((name, ins, outs, cs.stamped(body, cs.WY2_STAMPS), tpl))
        elif name == cs.O2_NAME:
            out.append((name, ins, outs, cs.stamped(body, cs.O2_STAMPS), tpl))
    assert len(out) == 3
    return out


def _ptxas(text, tmp_path):
    path = tmp_path / "stamped.cu"
    path.write_text(text)
    res = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-c", str(path), "-o", str(tmp_path / "s.o"),
         "-Xptxas", "-v"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stderr


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("act", ["bf16", "fp32"])
@pytest.mark.usefixtures("plain_split")
def test_stamped_kernels_compile_for_sm90(tmp_path, monkeypatch, act):
    """The stamped WY2 / O2 kernels (with `unsigned* stamps` after the outputs, the globaltimer
    and smid reads as inline PTX) compile through ptxas for sm_90 under the default launch
    bounds."""
    cases = _stamped_cases(2 if act == "bf16" else 4)
    monkeypatch.setattr(
        "tests.kernels.test_chunk_split_sources.kernels",
        lambda backend, Dk, itemsize=None: [
            (n, i, [*o, "stamps"], b, t) for n, i, o, b, t in cases
        ],
    )
    unit = cuda_unit([(act, 128)])
    unit = unit.replace("float* stamps", "unsigned* stamps")
    assert unit.count("unsigned* stamps") == 3
    head = PRELUDE + cl.header("cuda")
    # one kernel a unit with its launch bound, as the host builds them
    parts = unit[len(head) :].split("// gated_delta_chunk_")[1:]
    for part in parts:
        lb = cl.MIN_BLOCKS["o2" if part.startswith("o2") else "wy2"]
        log = _ptxas(head + cl.launch_bounds_header(256, lb) + "// x" + part, tmp_path)
        regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
        assert len(regs) == 1 and regs[0] <= 65536 // (256 * lb), log


class _Recorder:
    """A kernel factory that records what the host asks for and returns arrays of the asked
    shapes (zeros)."""

    def __init__(self):
        self.built, self.calls = [], []

    def __call__(self, **kw):
        self.built.append(kw)

        def run(**call):
            self.calls.append((kw["name"], call))
            return [
                mx.zeros(s, d)
                for s, d in zip(call["output_shapes"], call["output_dtypes"], strict=True)
            ]

        return run


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(cl, "_factory", lambda backend: rec)
    monkeypatch.setattr(cl, "_kernels", {})
    return rec


def _inputs(T=130, Hk=2, Hv=4, Dk=128, Dv=128, dtype=mx.bfloat16):
    k = mx.zeros((1, T, Hk, Dk), dtype)
    v = mx.zeros((1, T, Hv, Dv), dtype)
    g = mx.ones((1, T, Hv), mx.float32)
    return k, v, g, g


@pytest.mark.usefixtures("plain_split")
def test_host_launches_the_stamped_passes(recorder):
    """stamps=True builds the stamped text under the default kernel's name + "_lb<m>_stamped"
    and returns stamps [threadgroups, STAMP_SLOTS] uint32; the grid is the default one."""
    k, v, g, beta = _inputs()
    N = 3
    *_, st = cl.wy_pass("cuda", k, v, g, beta, None, stamps=True)
    assert st.shape == (N * 4, cs.STAMP_SLOTS) and st.dtype == mx.uint32
    kw = recorder.built[-1]
    assert kw["name"] == cs.wy_name(False, True) + "_lb3_stamped"
    assert kw["output_names"] == [*cs.WY_OUTPUTS, "stamps"]
    assert cs.unstamped(kw["source"]) == cl.wy_source("cuda", False, True)
    assert "__launch_bounds__(256, 3)" in kw["header"]
    stamped_grid = recorder.calls[-1][1]["grid"]
    cl.wy_pass("cuda", k, v, g, beta, None)
    plain = recorder.built[-1]
    assert plain["name"] == cs.wy_name(False, True) + "_lb3"
    assert plain["source"] == cl.wy_source("cuda", False, True)
    assert plain["output_names"] == cs.WY_OUTPUTS
    assert recorder.calls[-1][1]["grid"] == stamped_grid

    q = mx.zeros_like(k)
    gates = mx.zeros((4, N * 64, 4), mx.float32)
    H = mx.zeros((4, N, 128, 128), mx.bfloat16)
    Vn = mx.zeros((4, N * 64, 128), mx.bfloat16)
    y, st = cl.o_pass("cuda", q, k, gates, H, Vn, 130, 4, mx.bfloat16, stamps=True)
    assert y.shape == (1, 130, 4, 128)
    assert st.shape == (N * 4 * 2, cs.STAMP_SLOTS)  # two value tiles of 64
    kw = recorder.built[-1]
    assert kw["name"] == cs.O2_NAME + "_lb2_stamped"
    assert cs.unstamped(kw["source"]) == cl.o2_source("cuda")
    y2 = cl.o_pass("cuda", q, k, gates, H, Vn, 130, 4, mx.bfloat16)
    assert isinstance(y2, mx.array) and recorder.built[-1]["source"] == cl.o2_source("cuda")


@pytest.mark.usefixtures("plain_split")
def test_stamped_builds_are_cuda_and_wy2_o2_only(recorder, monkeypatch):
    k, v, g, beta = _inputs()
    with pytest.raises(ValueError, match="no stamped build"):
        cl.wy_pass("metal", k, v, g, beta, None, stamps=True)
    monkeypatch.setattr(cl, "WY2", False)
    with pytest.raises(ValueError, match="WY2_BODY"):
        cl.wy_pass("cuda", k, v, g, beta, None, stamps=True)


def _reading():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "chunk_stamps.py"
    spec = importlib.util.spec_from_file_location("chunk_stamps", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.usefixtures("plain_split")
def test_stamps_reading_on_made_up_stamps():
    """benchmarks/chunk_stamps.summarize on stamps whose answers are known: 8 threadgroups on 2
    SMs, two waves of 1000 ns, 2000 cycles each (100 / 200 / 1700 a phase), both counters
    wrapping past 2^32 within the pass."""
    import numpy as np

    cs_read = _reading()
    wrap = 1 << 32
    rows = []
    for i in range(8):
        t0 = (wrap - 1500 + (i // 4) * 1000) % wrap
        c0 = wrap - 150 + 37 * i
        clocks = [c0, c0 + 100, c0 + 300, c0 + 2000]
        rows.append([i % 2, t0, (t0 + 1000) % wrap, *[c % wrap for c in clocks], 0, 0])
    r = cs_read.summarize(np.array(rows, dtype=np.uint32), ["a", "b", "c"])
    assert r["threadgroups"] == 8 and r["sms"] == 2
    assert [r["phases"][p]["median"] for p in "abc"] == [100, 200, 1700]
    assert abs(r["phases"]["c"]["share"] - 0.85) < 1e-12
    assert r["tg_cycles"] == 2000 and r["tg_us"] == 1.0 and r["ghz"] == 2.0
    assert r["span_us"] == 2.0 and r["waves"] == 2.0
    assert r["in_flight"] == 4.0 and r["in_flight_sm"] == 2.0 and r["max_on_sm"] == 2
    assert "2 waves" not in cs_read.table("wy", 8192, r)  # formatted with one decimal
    assert "2.0 waves" in cs_read.table("wy", 8192, r)


@pytest.mark.usefixtures("plain_split")
def test_max_overlap_counts_touching_intervals_once():
    import numpy as np

    cs_read = _reading()
    assert cs_read.max_overlap(np.array([0, 10, 20]), np.array([10, 20, 30])) == 1
    assert cs_read.max_overlap(np.array([0, 5, 6, 20]), np.array([10, 8, 30, 25])) == 3


@pytest.mark.usefixtures("plain_split")
def test_stamps_mode_runs_through_on_a_recording_factory(recorder, monkeypatch):
    """chunk_split_gpu.py --stamps's per-T step end to end with the recording factory (zeros
    for every output): the stamped and plain builds compared, both passes read with their
    phase names, every timed variant built, checked and timed."""
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[2] / "benchmarks")
    monkeypatch.syspath_prepend(bench)
    sys.modules.pop("chunk_split_gpu", None)
    import chunk_split_gpu as g

    row = g._stamps_at("cuda", 256, 4)
    assert row["same"] == {"wy": True, "out": True}
    assert list(row["wy"]["phases"]) == [a[0] for a in cs.WY2_STAMPS]
    assert list(row["out"]["phases"]) == [a[0] for a in cs.O2_STAMPS]
    assert row["out"]["threadgroups"] == 4 * 4 * 2  # chunks (256 / 64) x heads x value tiles
    assert set(row["variants_ok"]) == {
        "split best3", "split lb4", "split v16", "wy lb4", "wy ds64 lb4", "wy v16"
    }  # fmt: skip
    assert all(row["variants_ok"].values())
    assert set(row["ms"]) == {
        "wy",
        "wy stamped",
        "out",
        "out stamped",
        "split",
        *row["variants_ok"],
    }
    names = {kw["name"] for kw in recorder.built}
    assert cs.wy_name(True, True) + "_lb4" in names and cs.O2_NAME + "_lb3" in names
    assert cs.wy_name(True, True) + "_v16_lb3" in names


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("act", ["bf16", "fp32"])
@pytest.mark.usefixtures("plain_split")
def test_wy2_v16_compiles_for_sm90_within_its_bound(tmp_path, act):
    """WY2_BODY with 16-byte stores (chunk_launch.WY2_V16), gates inside and precomputed, through
    ptxas for sm_90 under the WY pass's launch bound (three threadgroups an SM)."""
    itemsize = 2 if act == "bf16" else 4
    wds, wnb = cl.WY2_TILES[("cuda", itemsize)]
    head = PRELUDE + cl.header("cuda") + cl.launch_bounds_header(256, cl.MIN_BLOCKS["wy2"])
    for fused in (False, True):
        tpl = [("Dk", 128), ("C", cl.CHUNK), ("NT", cl.WY_THREADS), ("DS", wds), ("NB", wnb)]
        body = cl.wy_source("cuda", fused, True, v16=True)
        tpl += [("MP", None), ("PT", None)]
        case = (cs.wy_name(fused, True), cs.wy_inputs(fused), cs.WY_OUTPUTS, body, tpl)
        import tests.kernels.test_chunk_split_sources as srcs

        orig = srcs.kernels
        srcs.kernels = lambda backend, Dk, itemsize=None, c=case: [c]
        try:
            unit = cuda_unit([(act, 128)])
        finally:
            srcs.kernels = orig
        log = _ptxas(head + unit[len(PRELUDE + cl.header("cuda")) :], tmp_path)
        regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
        assert len(regs) == 1 and regs[0] <= 65536 // (256 * cl.MIN_BLOCKS["wy2"]), log
        assert "gd_v16" in unit
