"""Speculative decoding with the MTP head (issue 13): what a verify pass costs, and what it pays.

GPU (`--device-run`): Qwen3.5-0.8B and 9B shapes, random weights with an MTP head, bf16, batch
1, a 512-token context. Per shape it times, synchronously (mx.eval after each call):
  S        one normal decode step (`model(y [1, 1], cache)`, the compiled step), then trimmed
           back, so the context stays 512;
  V(T)     one verify pass `model(tokens [1, T], cache)` for T = 2..5, trimmed back the same way;
  R(k)     one whole speculative round of `speculative.MTPSpeculator` with k drafts (MTP drafts,
           verify, rollback of the rejected drafts, MTP update); its random head is rejected,
           so this is the round cost at acceptance 0, the rollback's recompute included.
and derives, for a per-draft acceptance rate a (independent drafts), the tokens a round gives,
(1 - a^(k+1)) / (1 - a), the predicted speedup tokens * S / R(k), and the break-even a.

    python benchmarks/bench_mtp.py --device-run --out "$OUT"     # GPU, about 3-5 minutes

CPU (`--cpu-tiny`): the shipped tiny model (trained head) generates from a few chat prompts with
MTP off and with k = 1, 2, alternating, `--repeats` times: tokens/s and the acceptance rate.

    python benchmarks/bench_mtp.py --cpu-tiny --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx

from qwen35_mlx.models.config import TextConfig
from qwen35_mlx.models.text import TextModel
from qwen35_mlx.speculative import MTPSpeculator, Sampling

# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import SHAPE_9B, SHAPE_SMALL  # noqa: E402
from bench_model import SHAPE_0_8B, _device_name, random_weights  # noqa: E402

SHAPES = {"0.8b": SHAPE_0_8B, "9b": SHAPE_9B, "small": SHAPE_SMALL}  # small: a CPU smoke run
CONTEXT = 512


def build(shape: dict, dtype: mx.Dtype) -> TextModel:
    model = TextModel(TextConfig(**shape, mtp_num_hidden_layers=1))
    model.load_weights(list(random_weights(model, dtype).items()), strict=True)
    return model.eval()


def _median_time(fn, iters: int, repeats: int) -> float:
    """Median over `repeats` of the mean seconds per call of `fn` over `iters` calls."""
    fn()  # warm: trace, compile, kernel JIT
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        runs.append((time.perf_counter() - t0) / iters)
    return statistics.median(runs)


def time_shape(model: TextModel, ks=(1, 2, 3, 4), iters: int = 20, repeats: int = 5) -> dict:
    prompt = mx.random.randint(0, model.config.vocab_size, (1, CONTEXT))
    cache = model.make_cache()
    model(prompt[:, :-1], cache=cache)
    mx.eval([c.state for c in cache])
    y = prompt[:, -1:]

    def step():
        mx.eval(model(y, cache=cache))
        for c in cache:
            c.trim(1)

    def verify(T):
        toks = mx.concatenate([y] * T, axis=1)

        def run():
            mx.eval(model(toks, cache=cache, return_hidden=True))
            for c in cache:
                c.trim(T)

        return run

    out = {"S_ms": 1e3 * _median_time(step, iters, repeats), "V_ms": {}, "R_ms": {}}
    for T in (2, 3, 4, 5):
        out["V_ms"][T] = 1e3 * _median_time(verify(T), iters, repeats)
    for k in ks:
        spec_cache = model.make_cache()
        spec = MTPSpeculator(model, spec_cache, k, Sampling())
        _, h = model(prompt[:, :-1], cache=spec_cache, return_hidden=True)
        spec.on_prefill(prompt[:, :-1], h)
        mx.eval([c.state for c in spec_cache], spec.mtp_state())
        spec.start(prompt[:, -1:])
        out["R_ms"][k] = 1e3 * _median_time(spec.round, iters, repeats)
        out.setdefault("acceptance", {})[k] = spec.stats.acceptance
    return out


def predicted(S: float, R: float, k: int, a: float) -> float:
    tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return tokens * S / R


def break_even(S: float, R: float, k: int) -> float | None:
    lo, hi = 0.0, 1.0
    if predicted(S, R, k, 1.0) < 1:
        return None
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted(S, R, k, mid) < 1 else (lo, mid)
    return hi


def device_run(args) -> dict:
    result = {"device": _device_name(), "mlx": mx.__version__, "date": _now(), "shapes": {}}
    for name in args.shapes:
        model = build(SHAPES[name], mx.bfloat16)
        r = time_shape(model, iters=args.iters, repeats=args.repeats)
        S = r["S_ms"]
        r["V_over_S"] = {T: v / S for T, v in r["V_ms"].items()}
        r["break_even_acceptance"] = {k: break_even(S, R, k) for k, R in r["R_ms"].items()}
        r["predicted_speedup"] = {
            k: {a: round(predicted(S, R, k, a), 3) for a in (0.41, 0.5, 0.63, 0.73, 0.8, 0.9)}
            for k, R in r["R_ms"].items()
        }
        result["shapes"][name] = r
        print(f"{name}: step {S:.2f} ms; verify/step " + ", ".join(
            f"T={T}: {x:.2f}x" for T, x in r["V_over_S"].items()))  # fmt: skip
        for k, R in r["R_ms"].items():
            be = r["break_even_acceptance"][k]
            print(f"  k={k}: round {R:.2f} ms = {R / S:.2f} steps; break-even acceptance "
                  f"{'none' if be is None else f'{be:.2f}'}; at 0.73: "
                  f"{r['predicted_speedup'][k][0.73]:.2f}x")  # fmt: skip
        del model
        mx.clear_cache()
    return result


def cpu_tiny(args) -> dict:
    from qwen35_mlx import load, stream_generate

    model, tok = load(Path(qwen35_mlx.__file__).parent / "assets" / "tiny")
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )  # fmt: skip
        for q in ("What is a list?", "Explain the with statement.", "Tell me about dict.")
    ]
    modes = {"off": dict(mtp=False), "k=1": dict(mtp_k=1), "k=2": dict(mtp_k=2)}
    runs = {m: [] for m in modes}
    acc = {m: [] for m in modes}
    for rep in range(args.repeats):
        order = list(modes) if rep % 2 == 0 else list(reversed(modes))
        for m in order:
            n, t = 0, 0.0
            tokens = []
            for p in prompts:
                last = None
                for last in stream_generate(model, tok, p, max_tokens=args.gen, **modes[m]):
                    tokens.append(last.token)
                n += last.generation_tokens
                t += last.generation_tokens / last.generation_tps
                if last.mtp_acceptance is not None:
                    acc[m].append(last.mtp_acceptance)
            runs[m].append(n / t)
            runs.setdefault(m + "_tokens", tokens)
    result = {"device": "cpu", "date": _now(), "gen": args.gen, "repeats": args.repeats}
    for m in modes:
        result[m] = {
            "tokens_per_s": statistics.median(runs[m]),
            "all": [round(x, 1) for x in runs[m]],
            "acceptance": statistics.mean(acc[m]) if acc[m] else None,
        }
        if m != "off":
            ratios = [a / b for a, b in zip(runs[m], runs["off"], strict=True)]
            result[m]["speedup_median"] = statistics.median(ratios)
            result[m]["same_tokens"] = runs[m + "_tokens"] == runs["off_tokens"]
        print(m, json.dumps(result[m]))
    return result


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--device-run", action="store_true", help="GPU: 0.8B and 9B shapes")
    g.add_argument("--cpu-tiny", action="store_true", help="CPU: the shipped tiny model")
    p.add_argument("--shapes", nargs="+", default=["0.8b", "9b"], choices=list(SHAPES))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gen", type=int, default=96, help="tokens per prompt (--cpu-tiny)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = p.parse_args(argv)
    result = device_run(args) if args.device_run else cpu_tiny(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "bench_mtp_gpu.json" if args.device_run else "bench_mtp_cpu_tiny.json"
    (args.out / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
