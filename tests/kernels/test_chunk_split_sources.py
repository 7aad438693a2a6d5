"""The split chunk path's kernel text (chunk_source.WY_BODY, H_BODY, O_BODY) compiled for each
backend without its GPU: the Metal text type-checked against metal_stub.h (as
test_chunk_metal_source.py), the CUDA text through nvcc and ptxas for sm_90 (as
test_chunk_cuda_source.py), each wrapped in the signature MLX generates, with the pieces (W, U,
Kw, H, Vn) in the activations' dtype, for the template arguments the host passes on that
backend: fp32 (MP 3), bf16 and fp16 (MP 1), Dk 32 / 128 / 256."""

import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.kernels.test_chunk_cuda_source import NVCC, nvcc_errors
from tests.kernels.test_chunk_metal_source import GXX, STUB
from tests.kernels.test_cuda_source import CTYPES, PRELUDE
from tests.kernels.test_metal_source import METAL_ATTRIBUTES, compile_errors

ACT = {"q", "k", "v", "a", "b"}
PIECES = {"W", "U", "Kw", "H", "Vn"}
MTYPES = {"fp32": "float", "bf16": "bfloat16_t", "fp16": "float16_t"}
C = cl.CHUNK


def kernels(backend: str, Dk: int, itemsize: int | None = None):
    """(name, inputs, outputs, body, template args) of the three kernels as the host builds
    them on `backend` (template values as chunk_launch passes them; the types by name)."""
    ods = min(cl.O_SLICE[backend], Dk)
    out = []
    for fused in (False, True):
        tpl = [("Dk", Dk), ("C", C), ("NT", cl.WY_THREADS), ("DS", cl.WY_SLICE)]
        out.append(
            (cs.wy_name(fused), cs.wy_inputs(fused), cs.WY_OUTPUTS, cl.wy_source(backend, fused),
             tpl + [("MP", None), ("PT", None)])
        )  # fmt: skip
    wds, wnb = cl.WY2_TILES[(backend, 2 if itemsize is None else itemsize)]
    for fused in (False, True):
        tpl = [("Dk", Dk), ("C", C), ("NT", cl.WY_THREADS), ("DS", wds), ("NB", wnb)]
        out.append(
            (cs.wy_name(fused, True), cs.wy_inputs(fused), cs.WY_OUTPUTS,
             cl.wy_source(backend, fused, True), tpl + [("MP", None), ("PT", None)])
        )  # fmt: skip
    for h2 in (False, True):
        for bv in cl.H_BV_CHOICES[backend] if Dk <= 128 else (16,):
            # the host's tiles for 2-byte pieces (on Metal the staged slices are float either way)
            ds, nb = cl.h_tiles(backend, Dk, bv, 2 if itemsize is None else itemsize, h2)
            tpl = [("Dk", Dk), ("BV", bv), ("C", C), ("NT", cl.h_threads(bv)), ("DS", ds),
                   ("NB", nb)]  # fmt: skip
            out.append(
                (cs.H2_NAME if h2 else cs.H_NAME, cs.H_INPUTS, cs.H_OUTPUTS,
                 (cl.h2_source if h2 else cl.h_source)(backend),
                 tpl + [("MP", None), ("PF", 1), ("PT", None)])
            )  # fmt: skip
    tpl = [("Dk", Dk), ("C", C), ("NT", cl.O_THREADS), ("DS", ods), ("BVO", cl.O_BV[backend])]
    out.append(
        (cs.O_NAME, cs.O_INPUTS, cs.O_OUTPUTS, cl.o_source(backend),
         tpl + [("MP", None), ("YT", None)])
    )  # fmt: skip
    o2ds, o2bvo = cl.O2_TILES[(backend, 2 if itemsize is None else itemsize)]
    tpl = [("Dk", Dk), ("C", C), ("NT", cl.O_THREADS), ("DS", min(o2ds, Dk)), ("BVO", o2bvo)]
    out.append(
        (cs.O2_NAME, cs.O_INPUTS, cs.O_OUTPUTS, cl.o2_source(backend),
         tpl + [("MP", None), ("YT", None)])
    )  # fmt: skip
    return out


def _type(n: str, act: str, types) -> str:
    if n == "mask":
        return "bool"
    if n == "dims":
        return "int"
    return types[act] if n in ACT | PIECES | {"y"} else "float"


def cuda_unit(cases) -> str:
    text = PRELUDE + cl.header("cuda")
    i = 0
    for act, Dk in cases:
        mp = 3 if act == "fp32" else 1
        for name, ins, outs, body, tpl in kernels("cuda", Dk, 4 if act == "fp32" else 2):
            params = []
            for n in ins:
                params.append(f"    const {_type(n, act, CTYPES)}* {n}")
                if f"{n}_shape" in body:
                    params.append(f"    const __grid_constant__ Shape {n}_shape")
            params += [f"    {_type(n, act, CTYPES)}* {n}" for n in outs]
            consts = ""
            for k, v in tpl:
                if k in ("PT", "YT"):
                    consts += f"  using {k} = {CTYPES[act]};\n"
                else:
                    consts += f"  constexpr int {k} = {mp if k == 'MP' else v};\n"
            text += f"// {name} {act} {Dk}\n__global__ void k{i}(\n" + ",\n".join(params)
            text += ") {\n" + consts + body + "\n}\n"
            i += 1
    return text


def metal_unit(name, ins, outs, body, tpl, insts) -> str:
    params = []
    for n in ins:
        space = "constant" if n == "dims" else "device"
        t = {"mask": "bool", "dims": "int"}.get(n)
        t = t or (f"T_{n}" if n in ACT | PIECES else "float")
        params.append(f"  const {space} {t}* {n}")
        if f"{n}_shape" in body:
            params.append(f"  const constant int* {n}_shape")
    params += [
        f"  device {'YT' if n == 'y' else 'PT' if n in PIECES else 'float'}* {n}" for n in outs
    ]
    params += [f"  {t} {a}" for a, t in METAL_ATTRIBUTES.items() if a in body]
    types = [f"typename T_{n}" for n in ins if n in ACT | PIECES]
    head = ", ".join([f"{'typename' if k in ('PT', 'YT') else 'int'} {k}" for k, _ in tpl] + types)
    fn = f"custom_kernel_{name}"
    inst = "\n".join(f"template decltype({fn}<{a}>) {fn}<{a}>;" for a in insts)
    return (
        f'#include "{STUB}"\n{cl.header("metal")}\n'
        f"template <{head}>\nvoid {fn}(\n" + ",\n".join(params) + ") {\n"
        f"{body}\n}}\n\n{inst}\n"
    )


METAL_CASES = [("fp32", 32), ("bf16", 128), ("fp16", 128), ("bf16", 256)]


@pytest.mark.skipif(GXX is None, reason="needs g++")
@pytest.mark.parametrize(
    "which", range(8), ids=["wy", "wy_fused", "wy2", "wy2_fused", "h", "h2", "o", "o2"]
)
def test_split_metal_sources_compile(tmp_path, which):
    """Each kernel, for fp32 / bf16 / fp16 activations at the Dk the host may pass."""
    for act, Dk in METAL_CASES:
        name, ins, outs, body, tpl = kernels("metal", Dk)[which]
        t = MTYPES[act]
        vals = [str(3 if act == "fp32" else 1) if k == "MP" else t if v is None else str(v)
                for k, v in tpl]  # fmt: skip
        vals += [t for n in ins if n in ACT | PIECES]
        err = compile_errors(metal_unit(name, ins, outs, body, tpl, [", ".join(vals)]), tmp_path)
        assert not err, f"{name} {act} {Dk}: {err}"


@pytest.mark.skipif(GXX is None, reason="needs g++")
def test_split_metal_check_can_fail(tmp_path):
    """A tile operation given the bf16 pieces in device memory instead of the staged floats
    (simdgroup_load has no bf16 -> float form) fails the check."""
    name, ins, outs, body, tpl = kernels("metal", 128)[4]
    bad = body.replace("gd_acc_load(sa, S_t + 16 * sv * SD", "gd_acc_load(sa, Kw + 16 * sv * SD")
    assert bad != body
    vals = ["1" if k == "MP" else "bfloat16_t" if v is None else str(v) for k, v in tpl]
    vals += ["bfloat16_t" for n in ins if n in ACT | PIECES]
    assert compile_errors(metal_unit(name, ins, outs, bad, tpl, [", ".join(vals)]), tmp_path)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_split_cuda_sources_compile_for_sm90(tmp_path):
    """Every kernel for fp32, bf16, fp16 at Dk 128, bf16 at Dk 32 and 256; ptxas checks the
    threadgroup memory (48 KB static) and the inline PTX."""
    cases = [("fp32", 128), ("bf16", 128), ("fp16", 128), ("bf16", 32), ("bf16", 256)]
    err = nvcc_errors(cuda_unit(cases), tmp_path)
    assert not err, err


def _registers(text: str, tmp_path) -> list[int]:
    """Registers a thread of each kernel in `text` (ptxas -v, sm_90)."""
    import re
    import subprocess

    path = tmp_path / "lb.cu"
    path.write_text(text)
    res = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-c", str(path), "-o", str(tmp_path / "lb.o"),
         "-Xptxas", "-v"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return [int(x) for x in re.findall(r"Used (\d+) registers", res.stderr)]


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("which", [0, 8], ids=["wy", "o"])
def test_split_launch_bounds_header_caps_registers(tmp_path, which):
    """chunk_launch.MIN_BLOCKS's header (the __global__ macro redefined with
    __launch_bounds__(256, 2)) reaches the kernel MLX declares after it: ptxas keeps it within
    128 registers (two 256-thread threadgroups an SM); without it the kernel takes more."""
    unit = cuda_unit([("bf16", 128)])
    head = PRELUDE + cl.header("cuda")
    assert unit.startswith(head)
    # one kernel a unit, as MLX compiles them
    parts = unit[len(head) :].split("// gated_delta_chunk_")[1:]
    assert len(parts) == 10  # wy, wy_fused, wy2, wy2_fused, h, h2 (16 and 32 value rows), o, o2
    kernel = "// gated_delta_chunk_" + parts[which]
    plain = _registers(head + kernel, tmp_path)
    bounded = _registers(head + cl.launch_bounds_header(256, 2) + kernel, tmp_path)
    assert len(plain) == len(bounded) == 1
    assert bounded[0] <= 128 < plain[0], (plain, bounded)
