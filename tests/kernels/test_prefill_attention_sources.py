"""The prefill attention kernel's text for both backends, without a GPU: the CUDA build (prologue,
body, the chunk header with the tile layer, `at_acc_scale_rows`, `at_frag`) compiled by nvcc for
sm_90 as MLX's `mx.fast.cuda_kernel` wraps a body, both bodies (versions), every variant in
bf16 and fp16 at D = 256 with the host's tiles, ptxas reporting no spills; the Metal build
(both versions) type-checked against metal_stub.h as the chunk kernels'
(test_chunk_metal_source.py), with its threadgroup memory within Apple's 32 KB."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qwen35_mlx.kernels.attention import prefill
from qwen35_mlx.kernels.attention import prefill_source as ps
from tests.kernels.test_cuda_source import CTYPES, PRELUDE
from tests.kernels.test_metal_source import METAL_ATTRIBUTES, compile_errors

NVCC = shutil.which("nvcc") or (
    "/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None
)
GXX = shutil.which("g++")
STUB = Path(__file__).with_name("metal_stub.h")
DTYPES = ("bf16", "fp16")
METAL_TYPES = {"bf16": "bfloat16_t", "fp16": "float16_t"}


def cuda_kernel(
    index: int, mask: bool, causal: bool, act: str, D: int = 256, version: int | None = None
) -> str:
    body = prefill.source("cuda", mask, causal, version)
    t = CTYPES[act]
    params = [
        f"    const {t}* q",
        f"    const {t}* k",
        f"    const {t}* v",
        "    const float* scale",
        "    const int* kv_len",
    ]
    params += ["    const bool* mask"] if mask else []
    params += [f"    const __grid_constant__ Shape {n}_shape" for n in ("q", "k", "mask")
               if f"{n}_shape" in body]  # fmt: skip
    params += [f"    {t}* out"]
    BK, DS, W = prefill.tiles("cuda", version, mask)
    consts = f"  constexpr int D = {D}, BK = {BK}, DS = {DS}, W = {W}, MP = {prefill.MP};\n"
    consts += f"  using OT = {t};\n"
    name = f"{ps.name(mask, causal)}_{act}"
    return (
        f"// {name}\n__global__ void k{index}(\n"
        + ",\n".join(params)
        + ") {\n"
        + consts
        + body
        + "\n}\n"
    )


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("version", ps.VERSIONS)
def test_prefill_cuda_compiles_for_sm90_without_spills(version, tmp_path):
    kernels = [
        cuda_kernel(i, m, c, act, version=version)
        for i, ((m, c), act) in enumerate((v, a) for v in ps.variants() for a in DTYPES)
    ]
    path = tmp_path / "prefill.cu"
    path.write_text(PRELUDE + prefill.header("cuda") + "".join(kernels))
    res = subprocess.run(
        [NVCC, "-arch=sm_90", "-std=c++17", "-Xptxas", "-v", "-c", str(path)]
        + ["-o", str(tmp_path / "k.o")],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    report = res.stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    smem = [int(s) for s in re.findall(r"(\d+) bytes smem", report)]
    assert len(spills) == len(kernels) == len(regs), report[-3000:]
    assert all(s == ("0", "0") for s in spills), report[-3000:]
    assert max(regs) <= 255 and max(smem) <= 48 * 1024, report[-3000:]
    print("\n".join(line for line in report.splitlines() if "registers" in line or "spill" in line))


def metal_unit(mask: bool, causal: bool, version: int) -> str:
    body = prefill.source("metal", mask, causal, version)
    for attr in ("thread_position_in_threadgroup", "threadgroup_position_in_grid"):
        assert attr in body
    params = ["  const device IT* q", "  const device IT* k", "  const device IT* v"]
    params += ["  const device float* scale", "  const device int* kv_len"]
    params += ["  const device bool* mask"] if mask else []
    params += [
        f"  const constant int* {n}_shape" for n in ("q", "k", "mask") if f"{n}_shape" in body
    ]
    params += ["  device IT* out"]
    params += [f"  {t} {a}" for a, t in METAL_ATTRIBUTES.items() if a in body]
    fn = f"custom_kernel_{ps.name(mask, causal)}"
    BK, DS, W = prefill.tiles("metal", version, mask)
    inst = "\n".join(
        f"template decltype({fn}<{D}, {BK}, {DS}, {W}, {prefill.MP}, {METAL_TYPES[a]}>) "
        f"{fn}<{D}, {BK}, {DS}, {W}, {prefill.MP}, {METAL_TYPES[a]}>;"
        for D in (64, 256)
        for a in DTYPES
    )
    return (
        f'#include "{STUB}"\n{prefill.header("metal")}\n'
        f"template <int D, int BK, int DS, int W, int MP, typename OT, typename IT = OT>\n"
        f"void {fn}(\n" + ",\n".join(params) + ") {\n"
        f"{body}\n}}\n\n{inst}\n"
    )


@pytest.mark.skipif(GXX is None, reason="needs g++")
@pytest.mark.parametrize("version", ps.VERSIONS)
@pytest.mark.parametrize("variant", ps.variants(), ids=lambda v: ps.name(*v))
def test_prefill_metal_source_compiles(variant, version, tmp_path):
    err = compile_errors(metal_unit(*variant, version), tmp_path)
    assert not err, err


def test_threadgroup_memory_fits():
    """Metal: 32 KB; CUDA: 48 KB of static shared memory (the tiles' formula, prefill_source)."""
    for version in ps.VERSIONS:
        for mask in (False, True):
            assert prefill.threadgroup_bytes("metal", None, version, mask) <= 32 * 1024
            assert prefill.threadgroup_bytes("cuda", 2, version, mask) <= 48 * 1024
