"""Tensor parallel on the CPU: tokens/s of one process against two ring processes, same model.

A small Qwen3.5-shaped random model (hidden 512, 4 layers: 3 linear + 1 full attention,
attention 8 / 2 heads of 64, linear attention 8 / 8 heads of 64, FFN 1536, vocab 16384, untied
head, fp32; 31M parameters) is built from the same seed on every
rank, then sharded with `model.shard()` when there are several processes. Each run prefills a
prompt and generates greedily (mlx-lm's `generate_step`); the best of `--repeats` is kept. The
greedy tokens of the two runs must be identical: this is a correctness-of-scaling figure (two
processes sharing one 2-core machine do not get faster), not a speed claim.

    python benchmarks/bench_shard.py [--prompt 64] [--gen 32] [--repeats 3]

runs the one-process case here, then itself under `mlx.launch --backend ring -n 2` on
127.0.0.1, prints a table and writes benchmarks/out/bench_shard.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx
from mlx.utils import tree_flatten

from qwen35_mlx.models.config import TextConfig
from qwen35_mlx.models.text import TextModel

# isort: on

OUT = Path(__file__).resolve().parent / "out"

SHAPE = dict(
    model_type="qwen3_5_text",
    vocab_size=16384,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=8,
    linear_num_value_heads=8,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    linear_conv_kernel_dim=4,
    full_attention_interval=4,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10_000_000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [3, 3, 2],
        "mrope_interleaved": True,
    },
)


def build_model(seed: int = 0) -> TextModel:
    """The same random weights on every rank (same seed, same order)."""
    mx.random.seed(seed)
    model = TextModel(TextConfig(**SHAPE))
    weights = []
    for name, p in tree_flatten(model.parameters()):
        if name.endswith("A_log"):
            w = mx.log(mx.random.uniform(1.0, 16.0, p.shape))
        elif name.endswith("norm.weight"):
            w = 1.0 + 0.05 * mx.random.normal(p.shape)
        elif p.ndim == 1:
            w = mx.ones(p.shape)
        else:
            w = mx.random.normal(p.shape) * p.shape[-1] ** -0.5
        weights.append((name, w.astype(mx.float32)))
    model.load_weights(weights, strict=True)
    model.eval()
    return model


def run_once(model, prompt: mx.array, gen: int) -> dict:
    from mlx_lm.generate import generate_step

    tokens = []
    t0 = time.perf_counter()
    t_first = None
    for token, _ in generate_step(prompt, model, max_tokens=gen):
        if t_first is None:
            t_first = time.perf_counter()
        tokens.append(int(token))
    t_end = time.perf_counter()
    return {
        "prompt_tps": prompt.size / (t_first - t0),
        "generation_tps": (len(tokens) - 1) / (t_end - t_first),
        "tokens": tokens,
    }


def measure(args, group) -> dict:
    model = build_model()
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if group is not None:
        model.shard(group)
    mx.eval(model.parameters())
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    prompt = mx.random.randint(0, SHAPE["vocab_size"], (args.prompt,), key=mx.random.key(1))
    run_once(model, prompt[:16], 2)  # warm-up
    runs = [run_once(model, prompt, args.gen) for _ in range(args.repeats)]
    assert all(r["tokens"] == runs[0]["tokens"] for r in runs)
    return {
        "processes": 1 if group is None else group.size(),
        "prompt_tps": max(r["prompt_tps"] for r in runs),
        "generation_tps": max(r["generation_tps"] for r in runs),
        "weights_gb_total": total / 1e9,
        "weights_gb_per_process": held / 1e9,
        "tokens": runs[0]["tokens"],
    }


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:  # a rank under mlx.launch
        group = mx.distributed.init(strict=True)
        result = measure(args, group)
        if group.rank() == 0:
            Path(args.worker).write_text(json.dumps(result))
        return 0

    one = measure(args, None)
    OUT.mkdir(exist_ok=True)
    part = OUT / "bench_shard_ring2.json"
    cmd = [
        shutil.which("mlx.launch") or "mlx.launch",
        "--backend", "ring", "-n", "2", "--starting-port", str(_free_port_pair()),
        "--", sys.executable, str(Path(__file__).resolve()),
        "--prompt", str(args.prompt), "--gen", str(args.gen), "--repeats", str(args.repeats),
        "--worker", str(part),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=1800)
    two = json.loads(part.read_text())
    part.unlink()
    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} CPU, {platform.processor() or 'unknown'}",
        "mlx": mx.__version__,
        "shape": {k: v for k, v in SHAPE.items() if k != "rope_parameters"},
        "prompt": args.prompt,
        "gen": args.gen,
        "runs": [one, two],
        "same_tokens": one["tokens"] == two["tokens"],
    }
    (OUT / "bench_shard.json").write_text(json.dumps(result, indent=1))
    print("| processes | weights per process (GB) | prompt tok/s | generation tok/s |")
    print("|---|---|---|---|")
    for r in (one, two):
        print(
            f"| {r['processes']} | {r['weights_gb_per_process']:.3f} of "
            f"{r['weights_gb_total']:.3f} | {r['prompt_tps']:.1f} | {r['generation_tps']:.1f} |"
        )
    print(f"same greedy tokens: {result['same_tokens']}")
    return 0 if result["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
