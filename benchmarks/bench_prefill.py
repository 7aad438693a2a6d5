"""End-to-end prefill: prompt tokens/s and peak memory above the weights (issue 9).

Ours vs mlx-lm's qwen3_5 model on the same random bf16 weights (bench_decode.build_models: one
set of arrays loaded into both), both driven by the same loop: `qwen35_mlx.generation.prefill`,
the prompt in steps of `--step` (2048) tokens, each step's caches evaluated, never the logits.
That loop reserves the KV cache for the whole prompt after its first step (models/cache.py
`reserve_kv`) for both models alike; `--no-reserve` leaves mlx-lm's grow-per-step caches.
transformers' Qwen3.5 (flash-linear-attention for the gated delta rule when `fla` imports)
runs the same steps with the cache it makes itself, for prompt throughput only; it is skipped,
with the reason printed, where torch, CUDA or transformers' Qwen3.5 are missing.

Peak memory: `mx.get_peak_memory()` over the whole prefill, less the memory held before it
(the weights), so it counts the KV cache, the recurrent states and the activations.

mlx-lm's gated delta rule runs as plain ops off Apple GPUs (a Python loop over the tokens of
each step): each of its runs is estimated from its seconds per step so far and skipped when the
estimate passes `--cap-s`; the whole run stops starting new cases past `--budget-s`. Skips are
printed and recorded.

    # GPU (one command, about 5 minutes; JSON, PNG and log to $OUT or benchmarks/results):
    PYTHONPATH=src python benchmarks/bench_prefill.py --out "${OUT:-benchmarks/results}"
    # CPU smoke test (a small model with the 0.8B's attention heads, short prompts):
    PYTHONPATH=src python benchmarks/bench_prefill.py --cpu --small
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import sys
import time
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx

import qwen35_mlx.generation as generation
from qwen35_mlx.models import attention
from qwen35_mlx.models.cache import BatchKVCache, KVCache

# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import SHAPE_0_8B, SHAPE_9B, build_models  # noqa: E402
from bench_model import _device_name  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
GiB = 1 << 30

# The CPU smoke model: the 0.8B's attention heads (8 query, 2 key/value heads of 256), 5 layers
# (3 linear, 1 full, 1 linear: the attention output reaches a cache only through a later
# layer), small hidden sizes, linear heads and vocabulary.
SHAPE_SMALL = dict(
    SHAPE_0_8B,
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=5,
    linear_num_key_heads=4,
    linear_num_value_heads=4,
)
SHAPES = {"0.8b": SHAPE_0_8B, "9b": SHAPE_9B, "small": SHAPE_SMALL}


def kv_bytes(cache: list) -> int:
    """Bytes the attention layers' caches hold (their buffers' capacity)."""
    return sum(c.nbytes for c in cache if isinstance(c, KVCache | BatchKVCache))


def run_mlx(model, ids: list[int], step: int, reserve: bool) -> dict:
    """One prefill of `ids` through `generation.prefill`: seconds, peak above what was live
    before, KV bytes, and the peak above the start after each step."""
    cache = model.make_cache()
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    steps = []
    saved = generation.reserve_kv
    if not reserve:
        generation.reserve_kv = lambda cache, n: None
    t0 = time.perf_counter()
    try:
        generation.prefill(
            model,
            cache,
            ids,
            prefill_step_size=step,
            progress=lambda done, total: steps.append(mx.get_peak_memory() - base),
        )
        mx.synchronize()
    finally:
        generation.reserve_kv = saved
    dt = time.perf_counter() - t0
    out = {
        "seconds": dt,
        "tokens_per_s": len(ids) / dt,
        "peak_above_start": mx.get_peak_memory() - base,
        "kv_bytes": kv_bytes(cache),
        "step_peaks": steps,
    }
    del cache
    gc.collect()
    mx.clear_cache()
    return out


def bench_mlx(shape_name, shape, args, deadline, log) -> dict:
    dtype = mx.float32 if args.small and args.cpu else mx.bfloat16
    models = build_models(shape, dtype)
    rng = mx.random.randint(0, shape["vocab_size"], (max(args.lengths + args.mem_lengths),))
    all_ids = rng.tolist()
    res: dict = {name: {} for name in models}
    skipped = []
    for name, model in models.items():  # warm-up: kernels and traces (mlx-lm's: short)
        n = 2 * args.step if name == "qwen35_mlx" else min(256, args.step)
        run_mlx(model, all_ids[:n], min(args.step, n), not args.no_reserve)
    lengths = sorted(set(args.lengths) | set(args.mem_lengths))
    per_step: dict[str, float] = {}
    for L in lengths:
        for name, model in models.items():
            if name == "mlx-lm" and L not in args.lengths and L not in args.mlx_lm_mem:
                skipped.append(f"{shape_name} {name} L={L}: not asked (--mlx-lm-mem)")
                continue
            est = per_step.get(name, 0.0) * (L / args.step)
            if est > args.cap_s:
                msg = f"{shape_name} {name} L={L}: skipped, estimated {est:.0f} s > {args.cap_s} s"
                skipped.append(msg)
                log(msg)
                continue
            if time.perf_counter() + est > deadline:
                msg = f"{shape_name} {name} L={L}: skipped, over the run's budget"
                skipped.append(msg)
                log(msg)
                continue
            # mlx-lm's runs are long and their noise small against the gap: one each.
            repeats = args.repeats if L <= 8192 and name == "qwen35_mlx" else 1
            reserve = not args.no_reserve
            runs = [run_mlx(model, all_ids[:L], args.step, reserve) for _ in range(repeats)]
            best = max(runs, key=lambda r: r["tokens_per_s"])
            best["peak_above_start"] = max(r["peak_above_start"] for r in runs)
            res[name][L] = best
            per_step[name] = max(per_step.get(name, 0.0), best["seconds"] / (L / args.step))
            log(
                f"{shape_name} {name:>10} L={L:>6}: {best['tokens_per_s']:10.0f} tok/s "
                f"({best['seconds']:.2f} s), peak above weights "
                f"{best['peak_above_start'] / GiB:.3f} GiB, KV {best['kv_bytes'] / GiB:.3f} GiB"
            )
    del models
    gc.collect()
    mx.clear_cache()
    return {"results": res, "skipped": skipped}


def bench_transformers(shape_name, shape, args, deadline, log) -> dict:
    """transformers' Qwen3.5 (random init, bf16) in the same steps; prompt tokens/s."""
    try:
        import torch
    except ImportError:
        return {"skipped": f"{shape_name} transformers: torch not installed"}
    if args.cpu or not torch.cuda.is_available():
        if not args.small:
            return {"skipped": f"{shape_name} transformers: no CUDA device for torch"}
    try:
        from transformers.models.qwen3_5 import modeling_qwen3_5 as tm
        from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    except ImportError as e:
        return {"skipped": f"{shape_name} transformers: Qwen3.5 not available ({e})"}
    try:
        import fla  # noqa: F401

        gdn = "flash-linear-attention"
    except ImportError:
        gdn = "torch (fla not installed)"
    dev = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = {k: v for k, v in shape.items() if k != "model_type"}
    config = Qwen3_5TextConfig(**cfg)
    torch.manual_seed(0)
    with torch.device(dev):
        model = tm.Qwen3_5ForCausalLM(config).to(dtype).eval()
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    log(f"{shape_name} transformers {dev}: gated delta via {gdn}, cache argument {cache_kw!r}")

    def run(L: int) -> float:
        ids = torch.randint(0, shape["vocab_size"], (1, L), device=dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        cache = None  # the model makes its own (hybrid) cache on the first step; reused after
        with torch.inference_mode():
            for s in range(0, L, args.step):
                kw = {} if cache is None else {cache_kw: cache}
                out = model(
                    input_ids=ids[:, s : s + args.step], use_cache=True, logits_to_keep=1, **kw
                )
                cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    res, skipped = {}, []
    try:
        run(2 * args.step)  # warm-up (Triton autotuning and compiles)
        for L in args.lengths:
            if time.perf_counter() > deadline:
                skipped.append(f"{shape_name} transformers L={L}: over the run's budget")
                continue
            repeats = args.repeats if L <= 8192 else 1
            dt = min(run(L) for _ in range(repeats))
            res[L] = {"seconds": dt, "tokens_per_s": L / dt}
            log(f"{shape_name} transformers L={L:>6}: {L / dt:10.0f} tok/s ({dt:.2f} s)")
    except Exception as e:  # a peer failing is reported, not fatal
        skipped.append(f"{shape_name} transformers: failed: {type(e).__name__}: {e}")
        log(skipped[-1])
    model = None
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return {"results": res, "skipped": skipped, "gated_delta": gdn}


def table(result: dict) -> list[str]:
    lines = []
    for shape_name, r in result["shapes"].items():
        mlx_res = r["mlx"]["results"]
        tf = r.get("transformers", {}).get("results", {})
        lines.append(f"{shape_name}: prompt tokens/s (steps of {result['step']})")
        head = f"{'tokens':>8} | {'ours':>10} | {'mlx-lm':>10} | {'transformers':>12} | ours/tf"
        lines.append(head)
        for L in result["lengths"]:
            o = mlx_res.get("qwen35_mlx", {}).get(L, {}).get("tokens_per_s")
            m = mlx_res.get("mlx-lm", {}).get(L, {}).get("tokens_per_s")
            t = tf.get(L, {}).get("tokens_per_s")
            ratio = f"{o / t:.2f}x" if o and t else "-"
            cells = [f"{x:.0f}" if x else "-" for x in (o, m, t)]
            lines.append(f"{L:>8} | {cells[0]:>10} | {cells[1]:>10} | {cells[2]:>12} | {ratio}")
        lines.append(f"{shape_name}: peak memory above the weights, GiB (KV cache in brackets)")
        lines.append(f"{'tokens':>8} | {'ours':>16} | {'mlx-lm':>16}")
        for L in result["mem_lengths"]:
            cells = []
            for name in ("qwen35_mlx", "mlx-lm"):
                x = mlx_res.get(name, {}).get(L)
                cells.append(
                    f"{x['peak_above_start'] / GiB:7.3f} ({x['kv_bytes'] / GiB:.3f})" if x else "-"
                )
            lines.append(f"{L:>8} | {cells[0]:>16} | {cells[1]:>16}")
        for s in r["mlx"]["skipped"] + r.get("transformers", {}).get("skipped", []):
            lines.append(f"  skipped: {s}")
        if isinstance(r.get("transformers"), dict) and "gated_delta" in r["transformers"]:
            lines.append(f"  transformers' gated delta: {r['transformers']['gated_delta']}")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(result["shapes"])
    fig, axes = plt.subplots(len(shapes), 2, figsize=(10, 3.4 * len(shapes)), squeeze=False)
    for row, shape_name in enumerate(shapes):
        r = result["shapes"][shape_name]
        mlx_res = r["mlx"]["results"]
        tf = r.get("transformers", {}).get("results", {})
        ax = axes[row][0]
        series = {"ours": mlx_res.get("qwen35_mlx", {}), "mlx-lm": mlx_res.get("mlx-lm", {})}
        series["transformers+fla"] = tf
        for label, d in series.items():
            xs = [L for L in result["lengths"] if L in d]
            if xs:
                ax.plot(xs, [d[L]["tokens_per_s"] for L in xs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("prompt tokens / s")
        ax.set_title(f"{shape_name}: prefill throughput")
        ax.legend(fontsize=8)
        ax = axes[row][1]
        for label, name in (("ours", "qwen35_mlx"), ("mlx-lm", "mlx-lm")):
            d = mlx_res.get(name, {})
            xs = [L for L in result["mem_lengths"] if L in d]
            if xs:
                ax.plot(xs, [d[L]["peak_above_start"] / GiB for L in xs], marker="o", label=label)
        d = mlx_res.get("qwen35_mlx", {})
        xs = [L for L in result["mem_lengths"] if L in d]
        if xs:
            ax.plot(xs, [d[L]["kv_bytes"] / GiB for L in xs], "k--", label="KV cache")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("GiB above the weights")
        ax.set_title(f"{shape_name}: peak memory")
        ax.legend(fontsize=8)
    fig.suptitle(f"prefill in steps of {result['step']}, {result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Prefill throughput and memory: ours vs peers")
    p.add_argument("--cpu", action="store_true", help="run MLX on the CPU")
    p.add_argument("--small", action="store_true", help="the small model, short prompts")
    p.add_argument("--shapes", default=None, help="comma list of 0.8b, 9b, small")
    p.add_argument("--lengths", default=None, help="prompt lengths for tokens/s")
    p.add_argument("--mem-lengths", default=None, help="prompt lengths for peak memory")
    p.add_argument("--mlx-lm-mem", default=None, help="memory-only lengths mlx-lm runs too")
    p.add_argument("--step", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2, help="for prompts up to 8192 tokens")
    p.add_argument("--cap-s", type=float, default=75.0, help="longest single run allowed")
    p.add_argument("--budget-s", type=float, default=300.0, help="no new case after this")
    p.add_argument("--no-reserve", action="store_true", help="KV caches grow step by step")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--plain-mb", type=float, default=None, help="one MLX call below this")
    p.add_argument("--block-mb", type=float, default=None, help="attention key-block budget")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    if args.small:
        defaults = dict(shapes="small", lengths="512,2048", mem="1024,2048,4096,8192", step=512)
        args.cap_s = min(args.cap_s, 120.0)
    else:
        defaults = dict(shapes="0.8b,9b", lengths="2048,8192,32768", mem="8192,32768,131072")
    if args.small and args.step == 2048:
        args.step = defaults["step"]
    args.shapes = (args.shapes or defaults["shapes"]).split(",")
    args.lengths = ints(args.lengths or defaults["lengths"])
    args.mem_lengths = ints(args.mem_lengths or defaults["mem"])
    args.mlx_lm_mem = ints(args.mlx_lm_mem or ",".join(map(str, args.mem_lengths[:2])))
    if args.cpu:
        mx.set_default_device(mx.cpu)
    if args.block_mb is not None:
        attention.BLOCK_BYTES = int(args.block_mb * (1 << 20))
    if args.plain_mb is not None:
        attention.PLAIN_BYTES = int(args.plain_mb * (1 << 20))

    import mlx_lm

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    tag = "cpu" if mx.default_device() == mx.cpu else "gpu"
    stem = args.out / f"bench_prefill_{tag}_{stamp}"
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    result = {
        "benchmark": "bench_prefill",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": _device_name(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "step": args.step,
        "lengths": args.lengths,
        "mem_lengths": args.mem_lengths,
        "reserve_kv": not args.no_reserve,
        "attention_block_bytes": attention.BLOCK_BYTES,
        "attention_plain_bytes": attention.PLAIN_BYTES,
        "shapes": {},
    }
    log(f"{result['device']}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}")
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        entry = {"mlx": bench_mlx(shape_name, shape, args, deadline, log)}
        if args.no_transformers:
            entry["transformers"] = {"skipped": [f"{shape_name} transformers: --no-transformers"]}
        else:
            tf = bench_transformers(shape_name, shape, args, deadline, log)
            if isinstance(tf.get("skipped"), str):
                log(tf["skipped"])
                tf = {"results": {}, "skipped": [tf["skipped"]]}
            entry["transformers"] = tf
        result["shapes"][shape_name] = entry
    result["wall_s"] = time.perf_counter() - t_start

    print()
    for line in table(result):
        log(line)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    stem.with_suffix(".log").write_text("\n".join(log_lines) + "\n")
    try:
        plot(result, stem.with_suffix(".png"))
    except ImportError:
        print("matplotlib not installed: no PNG")
    print(f"wrote {stem}.json ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
