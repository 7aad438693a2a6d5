"""CPU A/B of one decode step on the small model: ours compiled, ours compiled with the GPU's
weight layout (`layers.CPU_TRANSPOSED_WEIGHTS = False`: fused transposed views, a second model
object with the same weights), ours plain path, mlx-lm; and where the native CPU gated-delta
primitive is built (`kernels/cpu_ext`, which `auto` then runs), ours compiled
with the MLX-ops recurrence instead (`QWEN35_MLX_GDN_BACKEND=ref`, a third model object), and
ours compiled with MLX's matmul instead of the extension's few-rows matmul
(`layers.CPU_NATIVE_MATMUL = False`, a fourth), and ours compiled with only the recurrence native
amid the decode step's ops (`gated_delta.decode.NATIVE_FUSED = False`, a fifth).

All are set up once (prefill + 3 steps each), then interleaved in blocks of 8 steps (who goes
first alternates), 6 blocks each; prints ms a step in wall time and in process CPU time
(steadier when other jobs share the cores), the BLAS in use, and mlx-lm's CPU time over ours
compiled: over all blocks, and the median of the per-round ratios (a round runs every contender
once, back to back, so a burst of load from other processes falls on one round).

    python benchmarks/ab_decode_cpu.py B P [BLOCKS]     # batch B, prompt P
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx
from mlx.utils import tree_flatten

from qwen35_mlx._blas import blas_status
from qwen35_mlx.kernels.gated_delta import decode as gd_decode
from qwen35_mlx.kernels.gated_delta import native_available
from qwen35_mlx.models import layers

# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import SHAPE_SMALL, build_models  # noqa: E402


def main(B: int, P: int, blocks: int = 6, steps: int = 8) -> dict:
    mx.set_default_device(mx.cpu)
    models = build_models(SHAPE_SMALL, mx.float32)
    ours, theirs = models["qwen35_mlx"], models["mlx-lm"]
    gpu_layout = build_models(SHAPE_SMALL, mx.float32, which=("qwen35_mlx",))["qwen35_mlx"]
    gpu_layout.load_weights(tree_flatten(ours.parameters()), strict=True)
    prompts = mx.random.randint(0, SHAPE_SMALL["vocab_size"], (B, P))
    model_of = {"compiled": ours, "gpu layout": gpu_layout, "plain": ours, "mlx-lm": theirs}
    if native_available():
        ops = build_models(SHAPE_SMALL, mx.float32, which=("qwen35_mlx",))["qwen35_mlx"]
        ops.load_weights(tree_flatten(ours.parameters()), strict=True)
        model_of["compiled ops recurrence"] = ops
        blas = build_models(SHAPE_SMALL, mx.float32, which=("qwen35_mlx",))["qwen35_mlx"]
        blas.load_weights(tree_flatten(ours.parameters()), strict=True)
        model_of["compiled MLX matmul"] = blas
        unfused = build_models(SHAPE_SMALL, mx.float32, which=("qwen35_mlx",))["qwen35_mlx"]
        unfused.load_weights(tree_flatten(ours.parameters()), strict=True)
        model_of["compiled unfused decode"] = unfused
    flag = layers.CPU_TRANSPOSED_WEIGHTS
    native_mm = layers.CPU_NATIVE_MATMUL
    fused = gd_decode.NATIVE_FUSED
    env = os.environ.get("QWEN35_MLX_GDN_BACKEND")

    def set_backend(name):
        if name == "compiled ops recurrence":
            os.environ["QWEN35_MLX_GDN_BACKEND"] = "ref"
        elif env is None:
            os.environ.pop("QWEN35_MLX_GDN_BACKEND", None)
        else:
            os.environ["QWEN35_MLX_GDN_BACKEND"] = env

    def step(name, cache, y):
        set_backend(name)
        ours.compiled_decode = name == "compiled"
        layers.CPU_TRANSPOSED_WEIGHTS = flag and name != "gpu layout"
        layers.CPU_NATIVE_MATMUL = native_mm if name != "compiled MLX matmul" else False
        gd_decode.NATIVE_FUSED = fused and name != "compiled unfused decode"
        y = mx.argmax(model_of[name](y[:, None], cache=cache)[:, -1], -1)
        mx.eval(y)
        return y

    print(f"BLAS: {blas_status()}")
    state = {}
    for name, m in model_of.items():
        set_backend(name)
        ours.compiled_decode = name == "compiled"
        layers.CPU_TRANSPOSED_WEIGHTS = flag and name != "gpu layout"
        layers.CPU_NATIVE_MATMUL = native_mm if name != "compiled MLX matmul" else False
        gd_decode.NATIVE_FUSED = fused and name != "compiled unfused decode"
        cache = m.make_cache()
        y = mx.argmax(m(prompts, cache=cache)[:, -1], -1)
        for _ in range(3):
            y = step(name, cache, y)
        state[name] = (cache, y)
    wall = dict.fromkeys(state, 0.0)
    cpu = dict.fromkeys(state, 0.0)
    rounds = []
    for r in range(blocks):
        block = {}
        for name in list(state) if r % 2 == 0 else list(state)[::-1]:
            cache, y = state[name]
            t, c = time.perf_counter(), time.process_time()
            for _ in range(steps):
                y = step(name, cache, y)
            wall[name] += time.perf_counter() - t
            block[name] = time.process_time() - c
            cpu[name] += block[name]
            state[name] = (cache, y)
        rounds.append(block["mlx-lm"] / block["compiled"])
    ours.compiled_decode = True
    layers.CPU_TRANSPOSED_WEIGHTS = flag
    layers.CPU_NATIVE_MATMUL = native_mm
    gd_decode.NATIVE_FUSED = fused
    set_backend("")
    n = blocks * steps
    out = {k: (wall[k] / n * 1e3, cpu[k] / n * 1e3) for k in state}
    print(
        f"B={B} P={P} ms/step wall (CPU): "
        + ", ".join(f"{k} {w:.1f} ({c:.1f})" for k, (w, c) in out.items())
    )
    print(
        f"mlx-lm / ours compiled, CPU time: {cpu['mlx-lm'] / cpu['compiled']:.2f}x overall, "
        f"{statistics.median(rounds):.2f}x median of {blocks} rounds"
    )
    if "compiled ops recurrence" in cpu:
        print(
            "ops recurrence / native (both compiled), CPU time: "
            f"{cpu['compiled ops recurrence'] / cpu['compiled']:.2f}x"
        )
        print(
            "MLX matmul / native matmul (both compiled), CPU time: "
            f"{cpu['compiled MLX matmul'] / cpu['compiled']:.2f}x"
        )
        print(
            "native recurrence amid ops / whole native decode step (both compiled), CPU time: "
            f"{cpu['compiled unfused decode'] / cpu['compiled']:.2f}x"
        )
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *map(int, sys.argv[3:4]))
