"""Type-check the Metal text of the chunked kernels (chunk_source.PREP_BODY / STATE_BODY behind
the Metal prologue, with the Metal header) against metal_stub.h, as test_metal_source.py does
for the fused kernels: wrapped in the signature MLX's `mx.fast.metal_kernel` generates and
instantiated for the template arguments the host uses."""

import shutil
from pathlib import Path

import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.kernels.test_metal_source import METAL_ATTRIBUTES, compile_errors

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="needs g++")
STUB = Path(__file__).with_name("metal_stub.h")

IN_TYPES = {"q": "bfloat16_t", "k": "bfloat16_t", "v": "bfloat16_t", "a": "bfloat16_t"}
IN_TYPES |= {"b": "bfloat16_t", "mask": "bool", "dims": "int"}
CONSTANT = {"dims"}  # inputs under 8 bytes go to the constant address space


def wrap(name, inputs, outputs, body, template, instantiations) -> str:
    params = []
    for n in inputs:
        space = "constant" if n in CONSTANT else "device"
        params.append(f"  const {space} {IN_TYPES.get(n, 'float')}* {n}")
        if f"{n}_shape" in body:
            params.append(f"  const constant int* {n}_shape")
    params += [f"  device {'YT' if n == 'y' else 'float'}* {n}" for n in outputs]
    params += [f"  {t} {a}" for a, t in METAL_ATTRIBUTES.items() if a in body]
    fn = f"custom_kernel_{name}"
    inst = "\n".join(f"template decltype({fn}<{a}>) {fn}<{a}>;" for a in instantiations)
    return (
        f'#include "{STUB}"\n{cl.header("metal")}\n'
        f"template <{template}>\nvoid {fn}(\n" + ",\n".join(params) + ") {\n"
        f"{body}\n}}\n\n{inst}\n"
    )


def test_chunk_state_metal_source_compiles(tmp_path):
    body = cl.state_source("metal")
    for attr in ("thread_position_in_threadgroup", "threadgroup_position_in_grid"):
        assert attr in body
    inst = [
        f"{dk}, {cl.BV}, {cl.CHUNK}, {cl.STATE_THREADS}, {pf}, {yt}"
        for dk, yt, pf in ((32, "float", 0), (128, "bfloat16_t", 1), (256, "float16_t", 1))
    ]
    tu = wrap(
        cs.STATE_NAME,
        cs.STATE_INPUTS,
        cs.STATE_OUTPUTS,
        body,
        "int Dk, int BV, int C, int NT, int PF, typename YT",
        inst,
    )
    err = compile_errors(tu, tmp_path)
    assert not err, err


def test_chunk_state_mma_metal_source_compiles(tmp_path):
    """The matrix state pass (simdgroup matrices through the tile layer), for the Dk the host
    may pass and both operand precisions (MP is a CUDA setting; the Metal text must take it)."""
    body = cl.state_mma_source("metal")
    inst = [
        f"{dk}, {cl.MMA_BV}, {cl.CHUNK}, {cl.MMA_THREADS}, {mp}, {pf}, {yt}"
        for dk, yt, pf, mp in (
            (32, "float", 0, 3),
            (128, "bfloat16_t", 1, 1),
            (256, "float16_t", 1, 1),
        )
    ]
    tu = wrap(
        cs.STATE_MMA_NAME,
        cs.STATE_INPUTS,
        cs.STATE_OUTPUTS,
        body,
        "int Dk, int BV, int C, int NT, int MP, int PF, typename YT",
        inst,
    )
    err = compile_errors(tu, tmp_path)
    assert not err, err


def test_chunk_state_mma_metal_check_can_fail(tmp_path):
    """A tile operation called with a pointer of the wrong type fails the check."""
    body = cl.state_mma_source("metal").replace(
        "gd_acc_load(sa, S_t + 16 * sv * SD + 16 * c, SD);", "gd_acc_load(sa, dims, SD);"
    )
    assert "gd_acc_load(sa, dims, SD);" in body
    tu = wrap(
        cs.STATE_MMA_NAME,
        cs.STATE_INPUTS,
        cs.STATE_OUTPUTS,
        body,
        "int Dk, int BV, int C, int NT, int MP, int PF, typename YT",
        [f"128, {cl.MMA_BV}, {cl.CHUNK}, {cl.MMA_THREADS}, 1, 1, float"],
    )
    assert compile_errors(tu, tmp_path)


@pytest.mark.parametrize("matrix", [False, True], ids=["simt", "mma"])
@pytest.mark.parametrize("fused", [False, True], ids=["gates", "fused"])
def test_chunk_prep_metal_source_compiles(tmp_path, fused, matrix):
    body = cl.prep_source("metal", fused, matrix)
    inst = [f"{dk}, {cl.CHUNK}, {cl.PREP_THREADS}, {cl.KEY_SLICE}" for dk in (32, 128, 256)]
    if matrix:
        inst = [f"{a}, {mp}" for a, mp in zip(inst, (3, 1, 1), strict=True)]
    tu = wrap(
        cs.prep_name(fused, matrix),
        cs.prep_inputs(fused),
        cs.PREP_OUTPUTS,
        body,
        "int Dk, int C, int NT, int DS" + (", int MP" if matrix else ""),
        inst,
    )
    err = compile_errors(tu, tmp_path)
    assert not err, err


def test_chunk_metal_check_can_fail(tmp_path):
    """A Metal builtin used wrongly (a barrier without its flags) fails the check."""
    body = cl.state_source("metal") + "\n  threadgroup_barrier();\n"
    tu = wrap(
        cs.STATE_NAME,
        cs.STATE_INPUTS,
        cs.STATE_OUTPUTS,
        body,
        "int Dk, int BV, int C, int NT, int PF, typename YT",
        [f"128, {cl.BV}, {cl.CHUNK}, {cl.STATE_THREADS}, 1, float"],
    )
    assert compile_errors(tu, tmp_path)
