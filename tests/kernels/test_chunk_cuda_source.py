"""Compile the chunk kernels' CUDA text (chunk_source bodies behind the CUDA prologue, with the
CUDA header and the tile layer) with nvcc for sm_90 (no GPU needed), wrapped as MLX's
`mx.fast.cuda_kernel` wraps a body (test_cuda_source.py): every kernel the host builds, for
fp32, bf16 and fp16 activations and the template arguments the host passes, the matrix state
pass with both operand precisions and both threadgroup widths (16 and 32 value rows; 32 only
where its 43.5 KB of threadgroup memory fits: ptxas rejects more than 48 KB). Inline PTX
(mma.sync, cvt.rna.tf32) that ptxas rejects fails here."""

import subprocess
from pathlib import Path

import pytest

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.kernels.test_cuda_source import CTYPES, NVCC, PRELUDE

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


def nvcc_errors(text: str, tmp_path: Path) -> str:
    """nvcc -c for sm_90 (through ptxas, which checks the inline PTX); the compiler's errors."""
    path = tmp_path / "kernels.cu"
    path.write_text(text)
    res = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-c", str(path), "-o", str(tmp_path / "k.o")],
        capture_output=True,
        text=True,
        timeout=1800,  # the prep kernels' unrolled solve is slow to compile on a loaded machine
    )
    return "" if res.returncode == 0 else res.stderr[-5000:]


def variants():
    """(id, kernel args) of every kernel the host builds: each prep variant (gates in the kernel
    or not, products on fp32 lanes or the tile layer; Dk = 128) and each state pass, for fp32,
    bf16 and fp16 activations at Dk = 128 and in bf16 at Dk = 32 and 256; the matrix state pass with
    both operand precisions and both threadgroup widths (32 value rows only where its 43.5 KB
    of threadgroup memory fits: Dk <= 128)."""
    out = []
    cases = [("fp32", 128), ("bf16", 128), ("fp16", 128), ("bf16", 32), ("bf16", 256)]
    for act, Dk in cases:
        mp = 3 if act == "fp32" else 1
        for fused in (False, True):
            for matrix in (False, True):
                # The prep kernels' unrolled solve takes minutes to compile here: each variant
                # at Dk = 128, the matrix ones in fp32 (MP 3) and bf16 (MP 1), the others bf16.
                if Dk != 128 or act == "fp16" or (act == "fp32" and not matrix):
                    continue
                consts = [("Dk", Dk), ("C", cl.CHUNK), ("NT", cl.PREP_THREADS)]
                consts += [("DS", cl.KEY_SLICE)] + ([("MP", mp)] if matrix else [])
                name = cs.prep_name(fused, matrix)
                out.append(
                    (f"{name}-{act}-{Dk}",
                     (name, cs.prep_inputs(fused), cs.PREP_OUTPUTS,
                      cl.prep_source("cuda", fused, matrix), act, consts))
                )  # fmt: skip
        consts = [("Dk", Dk), ("BV", cl.BV), ("C", cl.CHUNK), ("NT", cl.STATE_THREADS)]
        consts += [("PF", 1), ("YT", act)]
        out.append(
            (f"{cs.STATE_NAME}-{act}-{Dk}",
             (cs.STATE_NAME, cs.STATE_INPUTS, cs.STATE_OUTPUTS, cl.state_source("cuda"), act,
              consts))
        )  # fmt: skip
        for mp in (1, 3):
            for bv in (16, 32) if Dk <= 128 else (16,):
                consts = [("Dk", Dk), ("BV", bv), ("C", cl.CHUNK), ("NT", cl.mma_threads(bv))]
                consts += [("MP", mp), ("PF", 1), ("YT", act)]
                out.append(
                    (f"{cs.STATE_MMA_NAME}-{act}-{Dk}-mp{mp}-bv{bv}",
                     (cs.STATE_MMA_NAME, cs.STATE_INPUTS, cs.STATE_OUTPUTS,
                      cl.state_mma_source("cuda"), act, consts))
                )  # fmt: skip
    return out


def translation_unit(kernels, header=None) -> str:
    header = cl.header("cuda") if header is None else header
    return PRELUDE + header + "".join(kernel(i, *k) for i, k in enumerate(kernels))


# One compile per kind of kernel (every dtype / width of it in one translation unit), so that
# each stays within a test's time on a loaded two-core machine.
KINDS = sorted({vid.split("-")[0] for vid, _ in variants()})


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_cuda_sources_compile_for_sm90(tmp_path, kind):
    kernels = [k for vid, k in variants() if vid.split("-")[0] == kind]
    assert kernels
    err = nvcc_errors(translation_unit(kernels), tmp_path)
    assert not err, err


def test_chunk_cuda_check_can_fail(tmp_path):
    """The inline PTX goes through ptxas: an mma with an accumulator type the tf32 shape does
    not have (f16) must not compile."""
    header = cl.header("cuda")
    bad = header.replace(".tf32.tf32.f32 {", ".tf32.tf32.f16 {")
    assert bad != header
    kernels = [k for vid, k in variants() if vid.endswith("bf16-128-mp1-bv16")]
    tu = translation_unit(kernels, bad)
    assert len(kernels) == 1 and "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f16" in tu
    assert nvcc_errors(tu, tmp_path)
