"""GPU check and A/B of the fused add + RMSNorm and swiglu kernels in the decode step (issue 8).

One process, on a GPU: for each shape (random bf16 weights of the real widths) and batch:
  - exactness: greedy tokens of the compiled step equal the plain path's (`--check` tokens);
  - speed: decode tokens/s with the kernels ("after": `layers.ADD_NORM` "auto",
    `layers.SWIGLU_KERNEL` True) against without them ("before", the default since session 7:
    ADD_NORM False, so residual adds folded where FOLD_RESIDUAL says, and swiglu as split +
    compiled ops), alternating, `--repeats` times each;
  - the step's primitive count in each mode (the device's own graph).
Prints one table. Under 4 minutes on an H200 with the defaults.

    python benchmarks/bench_fused_norm.py                  # 0.8b b1, b32; 9b b1
    python benchmarks/bench_fused_norm.py --cases 0.8b:1 --gen 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

from qwen35_mlx.kernels import fused_norm
from qwen35_mlx.models import layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import SHAPE_9B, SHAPE_SMALL, Plain, build_models, decode_run, greedy_tokens  # noqa: E402
from bench_model import SHAPE_0_8B  # noqa: E402
from count_decode_ops import count_step  # noqa: E402

SHAPES = {"0.8b": SHAPE_0_8B, "9b": SHAPE_9B, "small": SHAPE_SMALL}


def set_mode(model, mode: str) -> None:
    """'after' (the kernels) or 'before' (no add+norm kernel, swiglu as ops); the compiled
    steps are made anew so that the next call traces in this mode."""
    layers.ADD_NORM = "auto" if mode == "after" else False
    layers.SWIGLU_KERNEL = mode == "after"
    model._decode_step = mx.compile(model._decode_impl, inputs=model)
    model._verify_step = mx.compile(model._verify_impl, inputs=model)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="0.8b:1,0.8b:32,9b:1", help="shape:batch,...")
    ap.add_argument("--gen", type=int, default=100, help="timed tokens a run")
    ap.add_argument("--check", type=int, default=24, help="greedy tokens compared")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(
        f"device {mx.device_info().get('device_name', mx.default_device())}, mlx {mx.__version__}"
    )
    print(f"kernels run here: {fused_norm.kernel_available(mx.zeros((1,), mx.bfloat16))}")
    rows = []
    models = {}
    for case in args.cases.split(","):
        name, batch = case.split(":")
        batch = int(batch)
        if name not in models:
            models.clear()
            mx.clear_cache()
            t0 = time.perf_counter()
            models[name] = build_models(SHAPES[name], mx.bfloat16, ("qwen35_mlx",))["qwen35_mlx"]
            print(f"{name}: built in {time.perf_counter() - t0:.1f} s", flush=True)
        model = models[name]
        prompts = mx.random.randint(0, 1000, (batch, 16), key=mx.random.key(batch))
        res = {}
        for mode in ("after", "before"):
            set_mode(model, mode)
            same = greedy_tokens(model, prompts, args.check) == greedy_tokens(
                Plain(model), prompts, args.check
            )
            count = sum(count_step(model, batch, 16, mx.bfloat16).values())
            res[mode] = {"same": same, "count": count, "tps": []}
        for _ in range(args.repeats):
            for mode in ("before", "after"):
                set_mode(model, mode)
                res[mode]["tps"].append(decode_run(model, prompts, args.gen))
        for mode in ("before", "after"):
            r = res[mode]
            best = max(r["tps"])
            rows.append((name, batch, mode, r["count"], r["same"], best, r["tps"]))
            print(
                f"  {name} b{batch} {mode}: {r['count']} prims, same={r['same']}, "
                f"{' '.join(f'{t:.0f}' for t in r['tps'])} tok/s",
                flush=True,
            )
    set_mode(model, "after")
    print("\n| shape | batch | mode | primitives | compiled == plain | best tok/s | runs |")
    print("|---|---|---|---|---|---|---|")
    for name, batch, mode, count, same, best, tps in rows:
        runs = " ".join(f"{t:.0f}" for t in tps)
        print(f"| {name} | {batch} | {mode} | {count} | {same} | {best:.0f} | {runs} |")


if __name__ == "__main__":
    main()
