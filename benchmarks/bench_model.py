"""Prompt and generation speed: our Qwen3.5 text model vs mlx-lm's, same weights, one run.

A Qwen3.5-0.8B-shaped random checkpoint (hidden 1024, 24 layers in 3 linear + 1 full blocks,
attention 8 / 2 heads of 256, linear attention 16 key / 16 value heads of 128, FFN 3584,
vocab 248320, tied embeddings, bf16 weights, A_log fp32) is built once in memory in MLX layout
and handed to both models: the same arrays, no copy. Both are driven by the same loop
(`mlx_lm.generate.generate_step`: chunked prefill, greedy sampling), so the numbers compare the
models, not the drivers. Runs alternate ours / mlx-lm (who goes first alternates too) and each
figure is the best of `--repeats` (the CPU is shared; the best run is the least disturbed one).
Besides wall-clock tokens/s it reports tokens per CPU-second of the process (all threads), which
moves less when other jobs share the cores.

    python benchmarks/bench_model.py [--prompt 512] [--gen 64] [--repeats 2]

Prints a table; writes benchmarks/out/bench_model_<dtype>.{json,png}.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx

from qwen35_mlx.models.config import TextConfig
from qwen35_mlx.models.text import TextModel

# isort: on

# The random-weight rules shared with the tests and the golden scripts (tests/models/factory.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.models.factory import random_weights  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"

SHAPE_0_8B = dict(
    model_type="qwen3_5_text",
    vocab_size=248320,
    hidden_size=1024,
    intermediate_size=3584,
    num_hidden_layers=24,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=16,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
    full_attention_interval=4,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    max_position_embeddings=262144,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10_000_000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
)


def build_models(dtype: mx.Dtype):
    from mlx_lm.models import qwen3_5 as mlx_lm_qwen3_5

    config = TextConfig(**SHAPE_0_8B)
    ours = TextModel(config)
    weights = random_weights(ours, dtype)
    ours.load_weights(list(weights.items()), strict=True)
    ours.eval()

    # mlx-lm does not accept model_type qwen3_5_text; its qwen3_5 reads a flat text config.
    args = mlx_lm_qwen3_5.ModelArgs.from_dict(dict(SHAPE_0_8B, model_type="qwen3_5"))
    theirs = mlx_lm_qwen3_5.Model(args)
    theirs.load_weights([("language_model." + k, v) for k, v in weights.items()], strict=True)
    theirs.eval()
    nbytes = sum(v.nbytes for v in weights.values())
    nparams = sum(v.size for v in weights.values())
    return {"qwen35_mlx": ours, "mlx-lm": theirs}, nbytes, nparams


def run_once(model, prompt: mx.array, gen: int, prefill_step: int) -> dict:
    from mlx_lm.generate import generate_step

    # Wall time is what a user sees; process CPU time (all threads) is the steadier figure on a
    # shared machine, where other jobs take turns on the cores.
    tokens = []
    t0, c0 = time.perf_counter(), time.process_time()
    t_first = c_first = None
    for token, _ in generate_step(prompt, model, max_tokens=gen, prefill_step_size=prefill_step):
        if t_first is None:
            t_first, c_first = time.perf_counter(), time.process_time()
        tokens.append(int(token))
    t_end, c_end = time.perf_counter(), time.process_time()
    n_gen = len(tokens) - 1
    return {
        "prompt_tps": prompt.size / (t_first - t0),
        "generation_tps": n_gen / (t_end - t_first),
        "prompt_tps_cpu": prompt.size / (c_first - c0),
        "generation_tps_cpu": n_gen / (c_end - c_first),
        "prompt_s": t_first - t0,
        "generation_s": t_end - t_first,
        "tokens": tokens,
    }


def _device_name() -> str:
    if mx.default_device() == mx.cpu:
        return f"{platform.machine()} CPU ({platform.processor() or 'unknown'})"
    return mx.device_info().get("device_name", str(mx.default_device()))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, title in (
        (axes[0], "prompt_tps", f"prompt ({result['prompt_tokens']} tokens)"),
        (axes[1], "generation_tps", f"generation ({result['generation_tokens']} tokens)"),
    ):
        vals = [result["models"][n][key] for n in names]
        bars = ax.bar(names, vals, color=["tab:blue", "tab:gray"][: len(names)])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(title)
        ax.set_ylabel("tokens / s")
    fig.suptitle(f"Qwen3.5-0.8B shape, {result['dtype']}, {result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Qwen3.5-0.8B-shaped speed: ours vs mlx-lm")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    parser.add_argument("--gen", type=int, default=64, help="generated tokens (greedy)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prefill-step", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    import mlx_lm

    dtype = getattr(mx, args.dtype)
    t0 = time.perf_counter()
    models, nbytes, nparams = build_models(dtype)
    build_s = time.perf_counter() - t0
    prompt = mx.random.randint(0, SHAPE_0_8B["vocab_size"], (args.prompt,), key=mx.random.key(1))

    for model in models.values():  # warm-up: first-call costs stay out of the figures
        run_once(model, prompt[:16], 3, args.prefill_step)

    runs: dict[str, list[dict]] = {name: [] for name in models}
    for r in range(args.repeats):
        # Alternate who goes first, so neither always runs on the other's warmed-up allocator.
        order = list(models.items()) if r % 2 == 0 else list(models.items())[::-1]
        for name, model in order:
            res = run_once(model, prompt, args.gen, args.prefill_step)
            runs[name].append(res)
            print(
                f"  run {r + 1} {name:>10}: prompt {res['prompt_tps']:7.2f} tok/s "
                f"({res['prompt_tps_cpu']:.2f} per CPU-s), generation "
                f"{res['generation_tps']:6.3f} tok/s ({res['generation_tps_cpu']:.3f} per CPU-s)",
                flush=True,
            )
            gc.collect()

    summary = {}
    for name, rs in runs.items():
        summary[name] = {}
        for key in ("prompt_tps", "generation_tps", "prompt_tps_cpu", "generation_tps_cpu"):
            summary[name][key] = max(r[key] for r in rs)
            summary[name][key + "_runs"] = [r[key] for r in rs]
    # Same weights, same model: the logits must agree (greedy tokens of a random model with
    # near-flat logits may part early on rounding alone, so compare logits, not tokens).
    probe = prompt[None, :32]
    a = models["qwen35_mlx"](probe).astype(mx.float32)
    b = models["mlx-lm"](probe).astype(mx.float32)
    logits_rel_err = (mx.abs(a - b).max() / mx.abs(b).max()).item()
    result = {
        "benchmark": "bench_model",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": _device_name(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "dtype": args.dtype,
        "params": nparams,
        "weight_bytes": nbytes,
        "prompt_tokens": args.prompt,
        "generation_tokens": args.gen,
        "repeats": args.repeats,
        "prefill_step": args.prefill_step,
        "build_s": build_s,
        "logits_rel_err": logits_rel_err,
        "models": summary,
    }

    print()
    print(f"Qwen3.5-0.8B shape, {nparams / 1e6:.0f}M params, {args.dtype}, {result['device']}")
    head = ("model", "prompt tok/s", "gen tok/s", "prompt /CPU-s", "gen /CPU-s")
    print(f"{head[0]:>12} | {head[1]:>12} | {head[2]:>9} | {head[3]:>13} | {head[4]:>10}")
    print("-" * 12 + "-+-" + "-" * 12 + "-+-" + "-" * 9 + "-+-" + "-" * 13 + "-+-" + "-" * 10)
    for name, s in summary.items():
        print(
            f"{name:>12} | {s['prompt_tps']:12.2f} | {s['generation_tps']:9.3f} | "
            f"{s['prompt_tps_cpu']:13.2f} | {s['generation_tps_cpu']:10.3f}"
        )
    ours, theirs = summary["qwen35_mlx"], summary["mlx-lm"]
    ratios = {k: ours[k] / theirs[k] for k in ("prompt_tps", "generation_tps")}
    ratios.update({k: ours[k] / theirs[k] for k in ("prompt_tps_cpu", "generation_tps_cpu")})
    result["ours_over_mlx_lm"] = ratios
    print(
        f"ours / mlx-lm: prompt {ratios['prompt_tps']:.2f}x "
        f"({ratios['prompt_tps_cpu']:.2f}x per CPU-s), generation "
        f"{ratios['generation_tps']:.2f}x ({ratios['generation_tps_cpu']:.2f}x per CPU-s); "
        f"logits max rel. difference {logits_rel_err:.1e}"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_model_{args.dtype}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(result, stem.with_suffix(".png"))
    except ImportError:
        print("matplotlib not installed: no PNG")
    print(f"wrote {stem}.json")
    return result


if __name__ == "__main__":
    main()
