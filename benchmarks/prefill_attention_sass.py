"""Static figures of the prefill attention kernel's CUDA builds, no GPU needed: nvcc (sm_90,
ptxas -v: registers, spills, shared memory) and the SASS of the key-block walk (cuobjdump): the
loop holding the most HMMA, its instruction count for one block of BK keys and its mix.

    PYTHONPATH=src:. python benchmarks/prefill_attention_sass.py [--cuobjdump PATH] [NAME ...]

NAME: a build of BUILDS (all by default). The loop's count is static (every instruction of the
loop body once, taken or not: the rows' rescaling, the clamped copies of the last block and the
key tests of the diagonal blocks included). Needs nvcc and cuobjdump (the nvidia-cuda-cuobjdump
wheel has one).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.kernels.test_cuda_source import PRELUDE  # noqa: E402

from qwen35_mlx.kernels.attention import prefill  # noqa: E402

# name: (version, (BK, DS, W), ring); causal, bf16, D 256
BUILDS = {
    "v2_bk16": (2, (16, 64, 4), 4),
    "v2_bk32": (2, (32, 64, 4), 4),
    "v2_w8": (2, (16, 128, 8), 2),
    "v3": (3, (16, 256, 4), 4),
    "v3_w8": (3, (16, 256, 8), 4),
    "v3_ds64": (3, (16, 64, 4), 4),
    "v3_bk32": (3, (32, 64, 4), 4),
}
MIX = ["HMMA", "LDSM", "LDGSTS", "BAR", "DEPBAR", "MUFU", "SHFL", "FMUL", "FFMA", "FADD"]
MIX += ["FMNMX", "FSEL", "F2FP", "LDS", "STS", "IMAD", "LEA", "IADD3", "ISETP", "BRA"]


def compile_build(version, tiles, ring, tmp: Path, cuobjdump: str, D: int = 256):
    BK, DS, W = tiles
    body = prefill.source("cuda", False, True, version, ring)
    params = [f"const __nv_bfloat16* {n}" for n in ("q", "k", "v")]
    params += ["const float* scale", "const int* kv_len"]
    params += [
        f"const __grid_constant__ Shape {n}_shape" for n in ("q", "k") if f"{n}_shape" in body
    ]
    params += ["__nv_bfloat16* out"]
    consts = f"constexpr int D = {D}, BK = {BK}, DS = {DS}, W = {W}, MP = {prefill.MP};"
    text = (
        PRELUDE
        + prefill.header("cuda")
        + f"__global__ void kern({', '.join(params)}) {{\n{consts}\nusing OT = __nv_bfloat16;\n"
        + body
        + "\n}\n"
    )
    (tmp / "k.cu").write_text(text)
    res = subprocess.run(
        ["nvcc", "-arch=sm_90", "-std=c++17", "-Xptxas", "-v", "-cubin", str(tmp / "k.cu")]
        + ["-o", str(tmp / "k.cubin")],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    ptxas = " | ".join(
        line.split(":", 1)[-1].strip()
        for line in res.stderr.splitlines()
        if "registers" in line or "spill" in line
    )
    sass = subprocess.run(
        [cuobjdump, "-sass", str(tmp / "k.cubin")], capture_output=True, text=True, check=True
    ).stdout
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    loops = []  # (HMMA inside, start, end) of each backward branch
    for a, t in ins:
        m = re.search(r"BRA\s+0x([0-9a-f]+)$", t)
        if m and int(m.group(1), 16) < a:
            lo = int(m.group(1), 16)
            loops.append((sum("HMMA" in u for b, u in ins if lo <= b <= a), lo, a))
    _, lo, hi = max(loops, key=lambda x: (x[0], -(x[2] - x[1])))
    mix = collections.Counter()
    body_ins = [t for a, t in ins if lo <= a <= hi]
    for t in body_ins:
        mix[re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]] += 1
    return ptxas, len(body_ins), mix, len(ins)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=list(BUILDS))
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names:
            version, tiles, ring = BUILDS[name]
            ptxas, n, mix, total = compile_build(version, tiles, ring, Path(tmp), args.cuobjdump)
            print(f"{name}: v{version} (BK, DS, W) {tiles} ring {ring}: {ptxas}")
            print(f"  SASS {total}; the walk's loop {n} instructions a {tiles[0]} keys: "
                  + ", ".join(f"{k} {mix[k]}" for k in MIX if mix[k]))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
