"""The decode attention kernel sources compile: Metal against the stub header (g++, as
test_metal_source.py does), CUDA with nvcc in MLX's wrapping (as test_cuda_source.py) and as the
precompiled path generates it (`precompiled.entry_source`, what runs by default on a GPU)."""

import shutil

import mlx.core as mx
import pytest

from qwen35_mlx.kernels.attention import cuda, metal, source
from qwen35_mlx.kernels.gated_delta import precompiled
from tests.kernels.test_cuda_source import CTYPES as CUDA_TYPES
from tests.kernels.test_cuda_source import PRELUDE, nvcc_errors
from tests.kernels.test_metal_source import METAL_ATTRIBUTES, STUB, compile_errors

GXX = shutil.which("g++")
NVCC = shutil.which("nvcc")

# (D, R, S, W, U) of the split pass: the layouts launch.layout picks at D = 256, and D = 64.
LAYOUTS = [(256, 4, 64, 4, 4), (256, 8, 128, 4, 2), (64, 1, 256, 4, 4)]
METAL_TYPES = {"fp32": "float", "bf16": "bfloat16_t", "fp16": "float16_t"}


def _metal_partial(i, mask, causal, act) -> str:
    body = metal.BACKEND.partial_source(mask, causal)
    t = METAL_TYPES[act]
    ctype = {"q": t, "k": t, "v": t, "start": "int", "scale": "float", "mask": "bool"}
    params = []
    for n in source.partial_inputs(mask):
        params.append(f"  const device {ctype[n]}* {n}")
        if f"{n}_shape" in body:
            params.append(f"  const constant int* {n}_shape")
    params += ["  device float* part_acc", "  device float* part_ml"]
    params += [f"  {t_} {a}" for a, t_ in METAL_ATTRIBUTES.items() if a in body]
    fn = f"partial{i}"
    inst = "\n".join(
        f"template decltype({fn}<{','.join(map(str, lay))}>) {fn}<{','.join(map(str, lay))}>;"
        for lay in LAYOUTS
    )
    return (
        f"template <int D, int R, int S, int W, int U>\nvoid {fn}(\n"
        + ",\n".join(params)
        + f") {{\n{body}\n}}\n{inst}\n"
    )


def _metal_combine(i, gate, act) -> str:
    body = metal.BACKEND.combine_source(gate)
    t = METAL_TYPES[act]
    params = ["  const device float* part_acc", "  const device float* part_ml"]
    params += ["  const constant int* part_ml_shape", "  const device int* start"]
    params += [f"  const device {t}* gate"] if gate else []
    params += [f"  device {t}* out"]
    params += [f"  {t_} {a}" for a, t_ in METAL_ATTRIBUTES.items() if a in body]
    fn = f"combine{i}"
    targs = f"256, 64, {t}" + (", 5120, 512, 256" if gate else "")
    tparams = "int D, int S, typename OT" + (", int GR, int GS, int GO" if gate else "")
    return (
        f"template <{tparams}>\nvoid {fn}(\n"
        + ",\n".join(params)
        + f") {{\n{body}\n}}\ntemplate decltype({fn}<{targs}>) {fn}<{targs}>;\n"
    )


@pytest.mark.skipif(GXX is None, reason="needs g++")
def test_metal_attention_sources_compile(tmp_path):
    for attr in ("thread_position_in_threadgroup", "threadgroup_position_in_grid"):
        assert attr in metal.BACKEND.partial_source(False, False)
        assert attr in metal.BACKEND.combine_source(True)
    parts = [f'#include "{STUB}"\n', metal.BACKEND.header]
    i = 0
    for act in METAL_TYPES:
        for mask, causal in source.partial_variants():
            parts.append(_metal_partial(i, mask, causal, act))
            i += 1
        for gate in (False, True):
            parts.append(_metal_combine(i, gate, act))
            i += 1
    err = compile_errors("\n".join(parts), tmp_path)
    assert not err, err


def _cuda_kernel(i, name_inputs, body, outs, consts) -> str:
    params = []
    for n, t in name_inputs:
        params.append(f"    const {t}* {n}")
        if f"{n}_shape" in body:
            params.append(f"    const __grid_constant__ Shape {n}_shape")
    params += [f"    {t}* {n}" for n, t in outs]
    return f"__global__ void k{i}(\n" + ",\n".join(params) + ") {\n" + consts + body + "\n}\n"


def cuda_translation_unit(broken: bool = False) -> str:
    kernels = []
    for t in CUDA_TYPES.values():
        for mask, causal in source.partial_variants():
            body = cuda.BACKEND.partial_source(mask, causal)
            if broken:
                body = body.replace("gd_group_sum<32>(part)", "gd_group_sum<32>(part, 1.0f)")
            ins = [("q", t), ("k", t), ("v", t), ("start", "int"), ("scale", "float")]
            ins += [("mask", "bool")] if mask else []
            outs = [("part_acc", "float"), ("part_ml", "float")]
            for D, R, S, W, U in LAYOUTS:
                consts = f"  constexpr int D = {D}, R = {R}, S = {S}, W = {W}, U = {U};\n"
                kernels.append(_cuda_kernel(len(kernels), ins, body, outs, consts))
        for gate in (False, True):
            body = cuda.BACKEND.combine_source(gate)
            ins = [("part_acc", "float"), ("part_ml", "float"), ("start", "int")]
            ins += [("gate", t)] if gate else []
            consts = "  constexpr int D = 256, S = 64, GR = 5120, GS = 512, GO = 256;\n"
            consts += f"  using OT = {t};\n"
            kernels.append(_cuda_kernel(len(kernels), ins, body, [("out", t)], consts))
    return PRELUDE + cuda.BACKEND.header + "".join(kernels)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_cuda_attention_sources_compile_with_nvcc(tmp_path):
    err = nvcc_errors(cuda_translation_unit(), tmp_path)
    assert not err, err
    assert nvcc_errors(cuda_translation_unit(broken=True), tmp_path)  # the check can fail


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_cuda_attention_precompiled_entries_compile(tmp_path):
    """The sources as `precompiled.cuda_kernel` builds them (no MLX headers, shapes as ints)."""
    texts = []
    for mask, causal in source.partial_variants():
        names = source.partial_inputs(mask)
        dts = [mx.bfloat16] * 3 + [mx.int32, mx.float32] + ([mx.bool_] if mask else [])
        nds = [4, 4, 4, 0, 1] + ([4] if mask else [])
        texts.append(
            precompiled.entry_source(
                source.partial_name(mask, causal),
                cuda.BACKEND.header,
                cuda.BACKEND.partial_source(mask, causal),
                names,
                dts,
                nds,
                source.PARTIAL_OUTPUTS,
                [mx.float32] * 2,
                [("D", 256), ("R", 4), ("S", 64), ("W", 4), ("U", 4)],
            )  # fmt: skip
        )
    for gate in (False, True):
        names = source.combine_inputs(gate)
        dts = [mx.float32, mx.float32, mx.int32] + ([mx.bfloat16] if gate else [])
        tmpl = [("D", 256), ("S", 64), ("OT", mx.bfloat16)]
        # GR: the 0.8B layer's fused q|k|v row (the gate read in place: layers.GATE_IN_PLACE)
        tmpl += [("GR", 5120), ("GS", 512), ("GO", 256)] if gate else []
        texts.append(
            precompiled.entry_source(
                source.combine_name(gate),
                cuda.BACKEND.header,
                cuda.BACKEND.combine_source(gate),
                names,
                dts,
                [3, 5, 0, 4][: len(names)],
                source.COMBINE_OUTPUTS,
                [mx.bfloat16],
                tmpl,
            )  # fmt: skip
        )
    for i, text in enumerate(texts):
        err = nvcc_errors(
            text, tmp_path / str(i) if (tmp_path / str(i)).mkdir() is None else tmp_path
        )
        assert not err, err
