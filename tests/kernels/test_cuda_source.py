"""Compile the CUDA kernel sources with nvcc (no GPU needed), where nvcc is installed.

Each variant's CUDA `header` + `source` is wrapped the way MLX's `mx.fast.cuda_kernel` wraps it
(mlx/backend/cuda/custom_kernel.cpp `build_kernel`: a `__global__` function with the inputs,
`<name>_shape` parameters of type `Shape` where the source names them, the outputs, and the
template arguments as `constexpr` / `using` lines in front of the body), for fp32, bf16 and fp16
activations, and compiled for sm_90. A CUDA-only error (a type, a qualifier, shared memory) that
the CPU emulator cannot see fails here instead of on the GPU machine.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qwen35_mlx.kernels.gated_delta import cuda, source

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc")

PRELUDE = """#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
using Shape = cuda::std::array<int, 8>;  // as MLX's device/utils.cuh (MAX_NDIM = 8)
"""
CTYPES = {"fp32": "float", "bf16": "__nv_bfloat16", "fp16": "__half"}
# Inputs in the activation dtype; the rest are fp32 (mask: bool).
ACT = {"q", "k", "v", "a", "b", "qkv", "conv_w", "z", "norm_w", "proj"}


def kernel(
    index: int,
    gate,
    mask,
    decode,
    conv,
    act: str,
    Dk: int,
    L: int,
    W: int,
    norm=False,
    tokens=1,
    packed=False,
) -> str:
    body = cuda.BACKEND.kernel_source(gate, mask, decode, conv, norm, tokens, packed)
    params = []
    for n in source.input_names(gate, mask, conv, norm, packed):
        t = "bool" if n == "mask" else (CTYPES[act] if n in ACT else "float")
        params.append(f"    const {t}* {n}")
        if f"{n}_shape" in body:
            params.append(f"    const __grid_constant__ Shape {n}_shape")
    out_types = {"y": CTYPES[act], "state_out": "float", "conv_state_out": CTYPES[act]}
    out_types.update(state_tok="float", conv_tok=CTYPES[act])
    params += [f"    {out_types[n]}* {n}" for n in source.output_names(conv, tokens)]
    consts = f"  constexpr int Dk = {Dk};\n  constexpr int L = {L};\n  constexpr int P = 0;\n"
    # The packed variants launch with MAX_THREADS: the precompiled entry's __launch_bounds__.
    bounds = f"__launch_bounds__({32 * W}) " if packed else ""
    consts += f"  using YT = {CTYPES[act]};\n"
    if conv:
        consts += f"  constexpr int K = 4;\n  constexpr int W = {W};\n"
    return (
        f"__global__ void {bounds}k{index}(\n"
        + ",\n".join(params)
        + ") {\n"
        + consts
        + body
        + "\n}\n"
    )


def translation_unit() -> str:
    kernels = []
    for gate, mask, decode in source.variants():
        kernels.append((gate, mask, decode, False, "bf16", 128, 16, 1))
    for act in CTYPES:
        for Dk, L, W in ((128, 16, 2), (32, 4, 1), (256, 32, 8)):
            for _, mask, _, _ in source.conv_variants():
                kernels.append(("fused", mask, True, True, act, Dk, L, W))
        # The gated-norm variants at their layouts (launch.norm_layout: one head a block).
        for Dk, L, W in ((128, 4, 16), (32, 4, 2), (64, 4, 8)):
            for _, mask, _, _, norm in source.norm_variants():
                kernels.append(("fused", mask, True, True, act, Dk, L, W, norm))
        # The packed T-token variants (the compiled decode / verify steps' kernel).
        for Dk, L, W in ((128, 4, 16), (32, 4, 2)):
            for _, mask, _, _, norm, tokens, packed in source.token_variants((1, 2, 3, 8)):
                kernels.append(("fused", mask, True, True, act, Dk, L, W, norm, tokens, packed))
    return PRELUDE + cuda.HEADER + "".join(kernel(i, *k) for i, k in enumerate(kernels))


def nvcc_errors(text: str, tmp_path: Path) -> str:
    path = tmp_path / "kernels.cu"
    path.write_text(text)
    res = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-c", str(path), "-o", str(tmp_path / "k.o")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return "" if res.returncode == 0 else res.stderr[-5000:]


def test_cuda_sources_compile_with_nvcc(tmp_path):
    err = nvcc_errors(translation_unit(), tmp_path)
    assert not err, err


def test_norm_layout_fits_the_register_file(tmp_path):
    """The gated-norm variant runs a head in one block: at the largest shape its layout takes
    (Dk = Dv = 128), nvcc's registers a thread (allocated in steps of 8) x the block's threads
    must fit the 64 K registers a block may use on sm_90, or the launch fails on the GPU."""
    from qwen35_mlx.kernels.gated_delta.launch import NORM_MAX_DK, NORM_MAX_DV, norm_layout

    L, W = norm_layout(NORM_MAX_DK, NORM_MAX_DV)
    assert norm_layout(NORM_MAX_DK * 2, NORM_MAX_DV) is None
    ks = [
        ("fused", mask, True, True, act, NORM_MAX_DK, L, W, True)
        for mask in (False, True)
        for act in CTYPES
    ]
    # The packed variants (bounded to the block's threads: launch.py, precompiled.py).
    ks += [
        ("fused", mask, True, True, act, NORM_MAX_DK, L, W, True, tokens, True)
        for _, mask, _, _, _, tokens, _ in source.token_variants((1, 2, 3, 8))
        for act in CTYPES
    ]
    text = PRELUDE + cuda.HEADER + "".join(kernel(i, *k) for i, k in enumerate(ks))
    path = tmp_path / "norm.cu"
    path.write_text(text)
    res = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-c", str(path), "-o", str(tmp_path / "n.o")]
        + ["-Xptxas", "-v"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # ptxas names each entry (k<index>) before its registers, in no set order.
    found = re.findall(r"entry function '_Z\d+k(\d+)\D.*?Used (\d+) registers", res.stderr, re.S)
    regs = {ks[int(i)]: int(r) for i, r in found}
    assert len(regs) == len(ks)
    for k, r in regs.items():
        assert -(-r // 8) * 8 * 32 * W <= 65536, (k, r, L, W)


def test_cuda_norm_source_check_can_fail(tmp_path):
    """The gated-norm body reading an undeclared name must not compile (the variant is in the
    translation unit)."""
    text = translation_unit().replace("ssq += norm_tg[w];", "ssq += norm_missing[w];")
    assert "norm_missing" in text
    assert nvcc_errors(text, tmp_path)


def test_cuda_source_check_can_fail(tmp_path):
    """A conv body that reads an undeclared name must not compile."""
    text = translation_unit().replace("qk_tg[i] = out;", "qk_tg[i] = out_missing;")
    assert "out_missing" in text
    assert nvcc_errors(text, tmp_path)
