"""Round 6's variants of the split path (chunk_launch.WY2_VX, H2_VX, O2_VX; CUDA only, off by
default): their text against the default bodies, the host's choice of them (through a recording
factory: no GPU here), ptxas for sm_90 within the passes' launch bounds without spills, and
benchmarks/chunk_split_gpu.py --ab6 end to end on the recording factory. That they compute the
default builds' outputs bit for bit is checked in the lane emulator
(test_chunk_split_on_cpu.py::test_split_vx_equals_default)."""

import re
import subprocess

import mlx.core as mx
import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.kernels.test_chunk_cuda_source import NVCC
from tests.kernels.test_chunk_split_sources import cuda_unit
from tests.kernels.test_chunk_stamps import _inputs, recorder  # noqa: F401  (fixture)
from tests.kernels.test_cuda_source import PRELUDE

BAR = "gd_barrier();"


@pytest.mark.usefixtures("plain_split")
def test_vx_bodies_change_only_their_parts():
    """Each variant is its default body with the named parts swapped: the rest of the text is
    the default's, letter for letter (the swapped parts put back give the default)."""
    wy = cs.wy2_vx_body()
    assert wy != cs.wy2_v16_body() and "GD_ST16(Kw" in wy
    assert "Kw[(rn + i) * Dk + q * DS + d] =" not in wy  # no scalar Kw store left
    assert wy.count(BAR) == cs.WY2_BODY.count(BAR) - 1  # L made in the accumulators
    assert wy.startswith(cs._DECAY_R1_MACRO) and wy.endswith("#undef GD_DECAY_R1\n")
    h = cs.h2_vx_body()
    assert h.count(BAR) == cs.H2_BODY.count(BAR) - 1  # delta completed by slice KSL's barrier
    back = h.replace(cs._H2_H_STORES_VX, cs._H2_H_STORES).replace(cs._H2_XU_VX, cs._H2_XU)
    back = back.replace(cs._H2_XW_VX, cs._H2_XW).replace(cs._H2_DELTA_VX, cs._H2_DELTA)
    assert back == cs.H2_BODY
    for p16, ring in ((True, 3), (False, 3), (True, 2)):
        o, o_vx = cs.o2_body(p16, ring), cs.o2_vx_body(p16, ring)
        # Y's decay (3 barriers) and P (1) made in the accumulators; Y staged behind a barrier
        # only where P (fp32) is in X
        assert o_vx.count(BAR) == o.count(BAR) - 4
        assert "if (PSZ == 4) gd_barrier();" in o_vx
        assert o_vx.startswith(cs._DECAY_R1_MACRO) and o_vx.endswith("#undef GD_DECAY_R1\n")
        o_vx = o_vx[len(cs._DECAY_R1_MACRO) : -len("#undef GD_DECAY_R1\n")]
        back = o_vx.replace(cs._O2_DECAY_VX, cs._O2_DECAY).replace(cs._O2_P_VX, cs._O2_P)
        back = back.replace(cs._O2_Y_STORES_VX, cs._O2_Y_STORES)
        back = back.replace(cs._O2_Y_BAR, "  gd_barrier();")
        assert back == o


@pytest.mark.usefixtures("plain_split")
def test_defaults_build_the_default_text(recorder):  # noqa: F811
    """With the switches off (the default) the passes build the default names and text."""
    assert not (cl.WY2_VX or cl.H2_VX or cl.O2_VX)
    k, v, g, beta = _inputs()
    W, U, Kw, gates = cl.wy_pass("cuda", k, v, g, beta, None)
    assert recorder.built[-1]["source"] == cl.wy_source("cuda", False, True)
    state = mx.zeros((1, 4, 128, 128), mx.float32)
    H, Vn, _ = cl.h_pass("cuda", W, U, Kw, gates, state)
    assert recorder.built[-1]["name"] == cs.H2_NAME
    cl.o_pass("cuda", mx.zeros_like(k), k, gates, H, Vn, 130, 4, mx.bfloat16)
    assert recorder.built[-1]["name"] == cs.O2_NAME + "_lb2"


@pytest.mark.usefixtures("plain_split")
def test_switches_build_the_variants(recorder, monkeypatch):  # noqa: F811
    """WY2_VX / H2_VX / O2_VX build the variant text under names of their own, with the
    default passes' launch bounds and the same grids; Metal, and O2 with Dv not a multiple of
    8 (bf16), keep the default text."""
    for sw in ("WY2_VX", "H2_VX", "O2_VX"):
        monkeypatch.setattr(cl, sw, True)
    k, v, g, beta = _inputs()
    W, U, Kw, gates = cl.wy_pass("cuda", k, v, g, beta, None)
    kw = recorder.built[-1]
    assert kw["name"] == cs.wy_name(False, True) + "_vx_lb3"
    assert kw["source"] == cl.wy_source("cuda", False, True, vx=True)
    assert "__launch_bounds__(256, 3)" in kw["header"]
    cl.wy_pass("cuda", k, v, None, None, None, raw_gates=(g, g, g[0, 0], g[0, 0]))
    assert recorder.built[-1]["name"] == cs.wy_name(True, True) + "_vx_lb3"
    state = mx.zeros((1, 4, 128, 128), mx.float32)
    H, Vn, _ = cl.h_pass("cuda", W, U, Kw, gates, state)
    kw = recorder.built[-1]
    assert kw["name"] == cs.H2_NAME + "_vx" and kw["source"] == cl.h2_vx_source("cuda")
    grid = recorder.calls[-1][1]["grid"]
    q = mx.zeros_like(k)
    cl.o_pass("cuda", q, k, gates, H, Vn, 130, 4, mx.bfloat16)
    kw = recorder.built[-1]
    assert kw["name"] == cs.O2_NAME + "_vx_lb2" and kw["source"] == cl.o2_vx_source("cuda")
    # the same launches as the defaults'
    monkeypatch.setattr(cl, "H2_VX", False)
    cl.h_pass("cuda", W, U, Kw, gates, state)
    assert recorder.calls[-1][1]["grid"] == grid
    # Metal: the default text
    cl.wy_pass("metal", k, v, g, beta, None)
    assert recorder.built[-1]["source"] == cl.wy_source("metal", False, True)
    cl.o_pass("metal", q, k, gates, H, Vn, 130, 4, mx.bfloat16)
    assert recorder.built[-1]["source"] == cl.o2_source("metal")
    # Dv 36: y's 16-byte groups would straddle the value rows' end
    Vn36 = mx.zeros((4, 3 * 64, 36), mx.bfloat16)
    H36 = mx.zeros((4, 3, 36, 128), mx.bfloat16)
    cl.o_pass("cuda", q, k, gates, H36, Vn36, 130, 4, mx.bfloat16)
    assert recorder.built[-1]["source"] == cl.o2_source("cuda")


@pytest.mark.usefixtures("plain_split")
def test_dynamic_ring_builds(recorder, monkeypatch):  # noqa: F811
    """H2_DYN = (DS, NB): the state pass with its ring in dynamic shared memory, asked for at
    launch (the ring's bytes, also in the kernel's name), its tiles as template arguments; with
    H2_VX the variant's text; Metal and the stamped build keep the static ring."""
    k, v, g, beta = _inputs()
    W, U, Kw, gates = cl.wy_pass("cuda", k, v, g, beta, None)
    state = mx.zeros((1, 4, 128, 128), mx.float32)
    monkeypatch.setattr(cl, "H2_DYN", (128, 3))
    cl.h_pass("cuda", W, U, Kw, gates, state)
    kw = recorder.built[-1]
    smem = 3 * cl.CHUNK * (128 + 8) * 2  # bf16 rows padded by 16 bytes
    assert kw["name"] == f"{cs.H2_NAME}_dyn_{smem}" and kw["shared_memory"] == smem
    assert kw["source"] == cl.h2_dyn_source("cuda")
    tpl = dict(recorder.calls[-1][1]["template"])
    assert (tpl["DS"], tpl["NB"]) == (128, 3)
    monkeypatch.setattr(cl, "H2_VX", True)
    cl.h_pass("cuda", W, U, Kw, gates, state)
    kw = recorder.built[-1]
    assert kw["name"] == f"{cs.H2_NAME}_vx_dyn_{smem}"
    assert kw["source"] == cl.h2_dyn_source("cuda", True)
    assert "extern __shared__" in kw["source"]
    cl.h_pass("metal", W, U, Kw, gates, state)
    assert "shared_memory" not in recorder.built[-1]
    cl.h_pass("cuda", W, U, Kw, gates, state, stamps=True)
    assert "shared_memory" not in recorder.built[-1]


def _ptxas(text, tmp_path):
    path = tmp_path / "vx.cu"
    path.write_text(text)
    res = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-c", str(path), "-o", str(tmp_path / "vx.o"),
         "-Xptxas", "-v"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stderr


def _vx_cases(itemsize: int):
    """(name, ins, outs, body, tpl, launch bound) of the variants as the host builds them."""
    wds, wnb = cl.WY2_TILES[("cuda", itemsize)]
    out = []
    for fused in (False, True):
        tpl = [("Dk", 128), ("C", cl.CHUNK), ("NT", cl.WY_THREADS), ("DS", wds), ("NB", wnb)]
        body = cl.wy_source("cuda", fused, True, vx=True)
        out.append((cs.wy_name(fused, True), cs.wy_inputs(fused), cs.WY_OUTPUTS, body,
                    tpl + [("MP", None), ("PT", None)], cl.MIN_BLOCKS["wy2"]))  # fmt: skip
    ds, nb = cl.h_tiles("cuda", 128, 16, itemsize, True)
    tpl = [("Dk", 128), ("BV", 16), ("C", cl.CHUNK), ("NT", cl.h_threads(16)), ("DS", ds),
           ("NB", nb), ("MP", None), ("PF", 1), ("PT", None)]  # fmt: skip
    out.append((cs.H2_NAME, cs.H_INPUTS, cs.H_OUTPUTS, cl.h2_vx_source("cuda"), tpl, None))
    # H2_DYN's (128, 3): the ring in dynamic shared memory, the rest static
    tpl = [(n, 3 if n == "NB" else 128 if n == "DS" else x) for n, x in tpl]
    out.append((cs.H2_NAME, cs.H_INPUTS, cs.H_OUTPUTS, cl.h2_dyn_source("cuda", True), tpl, None))
    o2ds, o2bvo = cl.O2_TILES[("cuda", itemsize)]
    tpl = [("Dk", 128), ("C", cl.CHUNK), ("NT", cl.O_THREADS), ("DS", o2ds), ("BVO", o2bvo),
           ("MP", None), ("YT", None)]  # fmt: skip
    out.append((cs.O2_NAME, cs.O_INPUTS, cs.O_OUTPUTS, cl.o2_vx_source("cuda"), tpl,
                cl.MIN_BLOCKS["o2"]))  # fmt: skip
    return out


@pytest.mark.slow  # ~25 s a case; the variants are off by default
@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("act", ["bf16", "fp32"])
@pytest.mark.usefixtures("plain_split")
def test_vx_variants_compile_for_sm90_within_bounds_without_spills(tmp_path, monkeypatch, act):
    """Each variant (WY2_VX with gates precomputed and inside, H2_VX, O2_VX) through ptxas for
    sm_90, one kernel a unit as MLX compiles them, under its pass's launch bound: within the
    bound's registers, no spill (WY2_VX: no more than the default WY2_BODY, which spills a few
    bytes at three threadgroups an SM); bf16's WY2_VX stores Kw, W and U as 16-byte vectors
    only."""
    itemsize = 2 if act == "bf16" else 4
    head = PRELUDE + cl.header("cuda")
    for name, ins, outs, body, tpl, lb in _vx_cases(itemsize):
        case = (name, ins, outs, body, tpl)
        monkeypatch.setattr(
            "tests.kernels.test_chunk_split_sources.kernels",
            lambda backend, Dk, itemsize=None, c=case: [c],
        )
        unit = cuda_unit([(act, 128)])
        bound = cl.launch_bounds_header(256, lb) if lb else ""
        log = _ptxas(head + bound + unit[len(head) :], tmp_path)
        regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
        assert len(regs) == 1, log
        assert regs[0] <= (65536 // (256 * lb) if lb else 255), log
        if act == "bf16" and name.startswith(cs.wy_name(False, True)):
            ptx = tmp_path / "vx.ptx"
            subprocess.run(
                [NVCC, "-arch=sm_90", "-std=c++17", "-ptx", str(tmp_path / "vx.cu"), "-o",
                 str(ptx)],
                capture_output=True, check=True, timeout=1800,
            )  # fmt: skip
            stores = re.findall(r"st\.global\.(\S+)", ptx.read_text())
            assert stores and all(s.startswith(("v4.", "f32")) for s in stores), stores
        spill = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
        if name.startswith(cs.wy_name(False, True)):
            # WY2_BODY spills at three threadgroups an SM (bf16 12 bytes, fp32 4): no more
            default = cl.wy_source("cuda", name.endswith("_fused"), True)
            monkeypatch.setattr(
                "tests.kernels.test_chunk_split_sources.kernels",
                lambda backend, Dk, itemsize=None, c=(name, ins, outs, default, tpl): [c],
            )
            plain = _ptxas(head + bound + cuda_unit([(act, 128)])[len(head) :], tmp_path)
            cap = [int(x) for x in re.findall(r"(\d+) bytes spill stores", plain)]
            assert len(spill) == len(cap) == 1 and spill[0] <= cap[0], (log, plain)
        else:
            assert spill == [0], log


@pytest.mark.usefixtures("plain_split")
def test_ab6_mode_runs_through_on_a_recording_factory(recorder, monkeypatch):  # noqa: F811
    """chunk_split_gpu.py --ab6's checks and timings end to end on the recording factory (zeros
    for every output): every variant built (the three variant kernels by name), compared with
    the default build and timed."""
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[2] / "benchmarks")
    monkeypatch.syspath_prepend(bench)
    sys.modules.pop("chunk_split_gpu", None)
    import chunk_split_gpu as g

    monkeypatch.setattr(g, "_gpu_backend", lambda backend: _ZerosFused())
    monkeypatch.setattr(cl, "H3_WAVE_SMS", None)  # names below: H3's warps at B 2, Hv 32
    monkeypatch.setattr(g, "float64_loop", lambda *a: _zeros_like_outputs(*a))
    rows = g.ab6_checks("cuda")
    names = {r["check"] for r in rows}
    assert names == {"split", *g.AB6_VARIANTS, "vx bv32"}
    assert all(r.get("equal to default", True) for r in rows)
    built = {kw["name"] for kw in recorder.built}
    assert cs.wy_name(True, True) + "_vx_lb3" in built
    assert cs.H2_NAME + "_vx" in built and cs.O2_NAME + "_vx_lb2" in built
    stamps = g.ab6_state_stamps("cuda", ts=(256,))
    assert stamps[0]["same"] is True
    assert list(stamps[0]["stamps"]["phases"]) == [x[0] for x in cs.H2_STAMPS]
    assert cs.H2_NAME + "_stamped" in {kw["name"] for kw in recorder.built}
    times = g.ab6_times("cuda", ts=(256,))
    assert set(times[0]["ms"]) >= {"split", "split vx", "wy vx", "state vx", "out vx"}
    dyn = g.ab6_dyn("cuda", ts=(256,))
    assert dyn["same"] == {"dyn3": True, "dyn4": True}
    assert set(dyn["times"][0]["ms"]) == {
        "state vx", "split vx", "state vx dyn3", "split vx dyn3", "state vx dyn4", "split vx dyn4"
    }  # fmt: skip
    assert {kw.get("shared_memory") for kw in recorder.built} >= {
        3 * 64 * 136 * 2,
        4 * 64 * 136 * 2,
    }


@pytest.mark.usefixtures("plain_split")
def test_h2_stamped_text_is_the_pass_plus_stamps():
    """The stamped state pass: H2_BODY with GD_STAMP lines and nothing else; every sampled stamp
    once, under its chunk / slice condition."""
    text = cs.stamped(cs.H2_BODY, cs.H2_STAMPS)
    assert cs.unstamped(text) == cs.H2_BODY
    got = sorted(int(j) for j in re.findall(r"GD_STAMP\((\d+)\);", text))
    assert got == list(range(3, 4 + len(cs.H2_STAMPS)))
    for j, (_, _, *cond) in enumerate(cs.H2_STAMPS):
        if cond:
            assert text.count(f"if ({cond[0]}) GD_STAMP({3 + j});\n") == 1


@pytest.mark.usefixtures("plain_split")
def test_host_launches_the_stamped_state_pass(recorder, monkeypatch):  # noqa: F811
    """h_pass(stamps=True): the stamped H2 text under its own name, stamps [threadgroups,
    STAMP_SLOTS] uint32 after the three outputs, the plain pass's grid; H_BODY refuses."""
    k, v, g, beta = _inputs()
    W, U, Kw, gates = cl.wy_pass("cuda", k, v, g, beta, None)
    state = mx.zeros((1, 4, 128, 128), mx.float32)
    *_, st = cl.h_pass("cuda", W, U, Kw, gates, state, stamps=True)
    assert st.shape == (4 * 128 // cl.H_BV, cs.STAMP_SLOTS) and st.dtype == mx.uint32
    kw = recorder.built[-1]
    assert kw["name"] == cs.H2_NAME + "_stamped"
    assert kw["output_names"] == [*cs.H_OUTPUTS, "stamps"]
    assert cs.unstamped(kw["source"]) == cl.h2_source("cuda")
    grid = recorder.calls[-1][1]["grid"]
    cl.h_pass("cuda", W, U, Kw, gates, state)
    assert recorder.calls[-1][1]["grid"] == grid
    monkeypatch.setattr(cl, "H2", False)
    with pytest.raises(ValueError, match="H2_BODY"):
        cl.h_pass("cuda", W, U, Kw, gates, state, stamps=True)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.usefixtures("plain_split")
def test_h2_stamped_compiles_for_sm90(tmp_path, monkeypatch):
    """The stamped state pass (bf16, Dk 128, the host's tiles) through ptxas for sm_90, without
    spills."""
    ds, nb = cl.h_tiles("cuda", 128, 16, 2, True)
    tpl = [("Dk", 128), ("BV", 16), ("C", cl.CHUNK), ("NT", cl.h_threads(16)), ("DS", ds),
           ("NB", nb), ("MP", None), ("PF", 1), ("PT", None)]  # fmt: skip
    body = cs.stamped(cl.h2_source("cuda"), cs.H2_STAMPS)
    case = (cs.H2_NAME, cs.H_INPUTS, [*cs.H_OUTPUTS, "stamps"], body, tpl)
    monkeypatch.setattr(
        "tests.kernels.test_chunk_split_sources.kernels",
        lambda backend, Dk, itemsize=None, c=case: [c],
    )
    unit = cuda_unit([("bf16", 128)]).replace("float* stamps", "unsigned* stamps")
    assert "unsigned* stamps" in unit
    log = _ptxas(unit, tmp_path)
    assert re.findall(r"(\d+) bytes spill stores", log) == ["0"], log


class _ZerosFused:
    def gated_delta_update_kernel(self, q, k, v, a, b, A_log, dt_bias, state, mask=None):
        return mx.zeros(v.shape, v.dtype), mx.zeros(state.shape, mx.float32)


def _zeros_like_outputs(q, k, v, g, beta, state, mask):
    import numpy as np

    return np.zeros(v.shape), np.zeros(state.shape)
