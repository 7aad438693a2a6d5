"""The prefill conv kernel (`kernels/conv_qkv.py`) against the ops it replaces (issue 9).

1. One layer's conv alone: the kernel vs the ops path of `GatedDeltaNet.__call__` (the concat of
   the conv state and qkv, `layers._conv_qkv`'s taps, silu, split and l2 norms, the new state's
   slice), at the 0.8B (Hk 16, Hv 16) and 9B (Hk 16, Hv 32) heads, Dk = Dv = 128, bf16, T 2048 and
   8192, a conv state given. Each timing queues `--calls` calls, then evaluates them together;
   the variants alternate, min of `--repeats`; ms a call. With `--sweep 1` (default) also the
   kernel at the other launch shapes of `TILES` (tokens a warp, warps a threadgroup).
2. The share of the kernel's elements that differ from the ops' (0.8B heads, T 2048; bf16,
   fp16, fp32): the new state and v meant 0 on CUDA, q and k a small share (the norm's sum).
3. A whole prefill of `--prompt` tokens (0.8B shape, bf16) by `generation.prefill` in steps of
   each of `--steps`, `layers.CONV_KERNEL` off and on alternated, min of the repeats, tok/s; and
   the last position's logits of the two compared (max |on - off| over their rms).

    PYTHONPATH=src python benchmarks/bench_conv_qkv.py --out "$OUT"     # GPU, about a minute
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx

import qwen35_mlx.generation as generation
from qwen35_mlx.kernels import conv_qkv
from qwen35_mlx.models import layers as L

# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import build_models  # noqa: E402
from bench_model import _device_name  # noqa: E402
from bench_prefill import SHAPES  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
HEADS = {"0.8b": (16, 16), "9b": (16, 32)}
D, K = 128, 4


def _ops(qkv, state, w, Hk, Hv):
    T = qkv.shape[1]
    conv_in = mx.concatenate([state.astype(qkv.dtype), qkv], axis=1)
    q, k, v = L._conv_qkv(conv_in, w, T, Hk, D, Hv, D)
    return q, k, v, mx.contiguous(conv_in[:, T:])


def _kernel(qkv, state, w, Hk, Hv):
    return conv_qkv.conv_qkv(qkv, state, w, Hk, D, Hv, D, L._L2_EPS)


# The kernel's launch shapes timed beside the default (tokens a warp, warps a threadgroup).
TILES = [(8, 8), (32, 4), (16, 8), (4, 8)]


def conv_times(T: int, Hk: int, Hv: int, calls: int, repeats: int, tiles=()) -> dict:
    """{"ops": ms, "kernel": ms, "kernel TT<t> W<w>": ms for tiles} a call: `calls` calls queued
    and evaluated together, the variants alternated, min of repeats (one warm-up round)."""
    C = 2 * Hk * D + Hv * D
    keys = mx.random.split(mx.random.key(T + Hv), 3)
    qkv = mx.random.normal((1, T, C), key=keys[0]).astype(mx.bfloat16)
    state = mx.random.normal((1, K - 1, C), key=keys[1]).astype(mx.bfloat16)
    w = (0.3 * mx.random.normal((C, K), key=keys[2])).astype(mx.bfloat16)
    mx.eval(qkv, state, w)
    fns = {"ops": _ops, "kernel": _kernel}
    for tt, wp in tiles:

        def fn(qkv, state, w, Hk, Hv, tt=tt, wp=wp):
            kernel = conv_qkv._build()
            return conv_qkv.run_conv_qkv(
                kernel, qkv, state, w, Hk, D, Hv, D, L._L2_EPS, warps=wp, tokens=tt
            )

        fns[f"kernel TT{tt} W{wp}"] = fn
    best = {name: float("inf") for name in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            mx.synchronize()
            t0 = time.perf_counter()
            mx.eval([fn(qkv, state, w, Hk, Hv) for _ in range(calls)])
            mx.synchronize()
            if r:
                best[name] = min(best[name], (time.perf_counter() - t0) / calls)
    return {name: 1e3 * s for name, s in best.items()}


def exactness(T: int, Hk: int, Hv: int) -> dict:
    """{dtype: {q, k, v, state: share of elements differing from the ops}}: 0.8B heads, T tokens,
    a conv state given. Meant: state and v 0 (taps and silu as the ops round them), q and k
    small (the l2 norm's sum order)."""
    out = {}
    C = 2 * Hk * D + Hv * D
    keys = mx.random.split(mx.random.key(1), 3)
    for dt in (mx.bfloat16, mx.float16, mx.float32):
        qkv = mx.random.normal((1, T, C), key=keys[0]).astype(dt)
        state = mx.random.normal((1, K - 1, C), key=keys[1]).astype(dt)
        w = (0.3 * mx.random.normal((C, K), key=keys[2])).astype(dt)
        got, ops = _kernel(qkv, state, w, Hk, Hv), _ops(qkv, state, w, Hk, Hv)
        out[str(dt)] = {
            n: (g != o).astype(mx.float32).mean().item()
            for n, g, o in zip(("q", "k", "v", "state"), got, ops, strict=True)
        }
    return out


def prefill_ab(model, ids: list[int], steps: list[int], repeats: int) -> dict:
    """{step: {"off"/"on": seconds}} of a whole prefill, the switch alternated, min of repeats
    (one warm-up round); plus each step's logits difference on vs off."""
    saved = L.CONV_KERNEL
    res: dict = {step: {"off": [], "on": []} for step in steps}
    diff = {}
    try:
        for r in range(repeats + 1):
            for step in steps:
                last = {}
                for name in ("off", "on"):
                    L.CONV_KERNEL = name == "on"
                    cache = model.make_cache()
                    mx.synchronize()
                    t0 = time.perf_counter()
                    generation.prefill(model, cache, ids[:-1], prefill_step_size=step)
                    mx.synchronize()
                    if r:
                        res[step][name].append(time.perf_counter() - t0)
                    else:  # the warm-up round: the next token's logits, on vs off
                        logits = model(mx.array(ids[-1:])[None], cache=cache)
                        last[name] = logits.astype(mx.float32)
                    del cache
                if last:
                    d = mx.abs(last["on"] - last["off"]).max() / mx.sqrt(
                        (last["off"] * last["off"]).mean()
                    )
                    diff[step] = d.item()
    finally:
        L.CONV_KERNEL = saved
    return {
        st: {k: min(v) for k, v in d.items()} | {"logits_maxdiff_over_rms": diff.get(st)}
        for st, d in res.items()
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--sweep", type=int, default=1, help="1: also time the launch shapes TILES")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt", type=int, default=8192, help="0: no whole prefill")
    p.add_argument("--steps", default="2048,8192")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    assert conv_qkv.kernel_available(mx.zeros((1,))), "needs a GPU"
    result = {
        "benchmark": "bench_conv_qkv",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": _device_name(),
        "mlx": mx.__version__,
        "dtype": "bfloat16",
        "conv": {},
    }
    print(f"{result['device']}, mlx {mx.__version__}, bf16")
    for shape, (Hk, Hv) in HEADS.items():
        for T in (int(x) for x in args.lengths.split(",")):
            t = conv_times(T, Hk, Hv, args.calls, args.repeats, TILES if args.sweep else ())
            result["conv"][f"{shape}/T{T}"] = t
            others = ", ".join(f"{k[7:]} {v:.3f}" for k, v in t.items() if k.startswith("kernel "))
            print(
                f"conv {shape} (Hk {Hk}, Hv {Hv}) T {T:>5}: ops {t['ops']:.3f} ms, kernel "
                f"{t['kernel']:.3f} ms ({t['ops'] / t['kernel']:.1f}x)"
                + (f"; {others}" if others else ""),
                flush=True,
            )
    ex = exactness(2048, *HEADS["0.8b"])
    result["differing_share_vs_ops"] = ex
    for dt, d in ex.items():
        print(
            f"kernel != ops, share of elements, {dt}: "
            + ", ".join(f"{n} {v:.2e}" for n, v in d.items())
        )
    if args.prompt:
        shape = SHAPES["0.8b"]
        model = build_models(shape, mx.bfloat16, which=("qwen35_mlx",))["qwen35_mlx"]
        ids = mx.random.randint(0, shape["vocab_size"], (args.prompt + 1,)).tolist()
        steps = [int(x) for x in args.steps.split(",")]
        ab = prefill_ab(model, ids, steps, max(2, args.repeats // 2))
        result["prefill"] = {"tokens": args.prompt, "shape": "0.8b", "steps": ab}
        for step, d in ab.items():
            print(
                f"prefill {args.prompt} (0.8B) steps of {step}: off {1e3 * d['off']:.2f} ms "
                f"({args.prompt / d['off']:.0f} tok/s), on {1e3 * d['on']:.2f} ms "
                f"({args.prompt / d['on']:.0f} tok/s); last logits max|on-off|/rms "
                f"{d['logits_maxdiff_over_rms']:.2e}",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    path = args.out / f"bench_conv_qkv_{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
