"""Compile the chunk kernels' CUDA text (chunk_source bodies behind the CUDA prologue, with the
CUDA header and the tile layer) with nvcc for sm_90 (no GPU needed), wrapped as MLX's
`mx.fast.cuda_kernel` wraps a body (test_cuda_source.py): every kernel the host builds, for
fp32, bf16 and fp16 activations and the template arguments the host passes, the matrix state
pass with both operand precisions and both threadgroup widths (16 and 32 value rows; 32 only
where its 43.5 KB of threadgroup memory fits: ptxas rejects more than 48 KB). Inline PTX
(mma.sync, cvt.rna.tf32) that ptxas rejects fails here."""

import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.kernels.test_cuda_source import CTYPES, NVCC, PRELUDE, nvcc_errors

pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc")
ACT = {"q", "k", "v", "a", "b"}


def kernel(index, name, inputs, outputs, body, act, consts) -> str:
    params = []
    for n in inputs:
        t = {"mask": "bool", "dims": "int"}.get(n, CTYPES[act] if n in ACT else "float")
        params.append(f"    const {t}* {n}")
        if f"{n}_shape" in body:
            params.append(f"    const __grid_constant__ Shape {n}_shape")
    params += [f"    {CTYPES[act] if n == 'y' else 'float'}* {n}" for n in outputs]
    lines = "".join(
        f"  using {k} = {CTYPES[v]};\n" if k == "YT" else f"  constexpr int {k} = {v};\n"
        for k, v in consts
    )
    return (
        f"// {name}\n__global__ void k{index}(\n" + ",\n".join(params) + ") {\n" + lines + body
    ) + "\n}\n"


# (activation dtype, Dk): every dtype at the Qwen3.5 width, the smallest and largest width in
# bf16 (compiling every combination takes several minutes on two cores).
CASES = [("fp32", 128), ("bf16", 128), ("fp16", 128), ("bf16", 32), ("bf16", 256)]


def translation_unit(header=None, cases=CASES, only_mma=False) -> str:
    mma = cl.state_mma_source("cuda")
    kernels = []
    for act, Dk in cases:
        if not only_mma:
            for fused in (False, True):
                consts = [("Dk", Dk), ("C", cl.CHUNK), ("NT", cl.PREP_THREADS)]
                consts.append(("DS", cl.KEY_SLICE))
                kernels.append(
                    (cs.prep_name(fused), cs.prep_inputs(fused), cs.PREP_OUTPUTS,
                     cl.prep_source("cuda", fused), act, consts)
                )  # fmt: skip
            consts = [("Dk", Dk), ("BV", cl.BV), ("C", cl.CHUNK), ("NT", cl.STATE_THREADS)]
            consts += [("PF", 1), ("YT", act)]
            kernels.append(
                (cs.STATE_NAME, cs.STATE_INPUTS, cs.STATE_OUTPUTS, cl.state_source("cuda"), act,
                 consts)
            )  # fmt: skip
        for mp in (1, 3):
            for bv in (16, 32) if Dk <= 128 else (16,):
                consts = [("Dk", Dk), ("BV", bv), ("C", cl.CHUNK), ("NT", cl.mma_threads(bv))]
                consts += [("MP", mp), ("PF", 1), ("YT", act)]
                kernels.append(
                    (cs.STATE_MMA_NAME, cs.STATE_INPUTS, cs.STATE_OUTPUTS, mma, act, consts)
                )
    header = cl.header("cuda") if header is None else header
    return PRELUDE + header + "".join(kernel(i, *k) for i, k in enumerate(kernels))


def test_chunk_cuda_sources_compile_for_sm90(tmp_path):
    err = nvcc_errors(translation_unit(), tmp_path)
    assert not err, err


def test_chunk_cuda_check_can_fail(tmp_path):
    """The inline PTX goes through ptxas: an mma with an accumulator type the tf32 shape does
    not have (f16) must not compile."""
    header = cl.header("cuda")
    bad = header.replace(".tf32.tf32.f32 {", ".tf32.tf32.f16 {")
    assert bad != header
    tu = translation_unit(bad, [("bf16", 128)], only_mma=True)
    assert "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f16" in tu
    assert nvcc_errors(tu, tmp_path)
