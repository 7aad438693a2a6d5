"""Decode speed and cold start: our Qwen3.5 text model vs mlx-lm's own qwen3_5, same weights.

Random weights of the real shapes (bench_model.random_weights, MLX layout) are built once and
loaded into both models (the same arrays). Both run the same loop: a batch of B random prompts
is prefilled into the model's own `make_cache()`, then `--gen` greedy tokens are decoded, each
step queued with `mx.async_eval` before the previous one is read (as mlx-lm's generate_step
does). Runs alternate ours / mlx-lm, who goes first alternates too, `--repeats` times; a case's
figure is the median, and the ratio is taken run by run (ours over the mlx-lm run beside it).

Cold start: a fresh subprocess per model builds the model (not timed), then times the first
512-token prompt plus 16 generated tokens through mlx_lm.generate.generate_step (trace,
compile and kernel JIT included).

    # GPU (one command, about 6 minutes at most; writes bench_decode.{json,png,log} to OUT):
    python benchmarks/bench_decode.py --device-run --out "$OUT"
    # the same without cold start, in two processes: MLX's default CUDA graph size and larger
    # graphs (about 9 minutes; see NOTES.md "Decode step diet, round 2"):
    python benchmarks/bench_decode.py --device-run --budget-s 200 --out "$OUT" \
        --env MLX_MAX_OPS_PER_BUFFER=4000,MLX_MAX_MB_PER_BUFFER=1000000
    # CPU: the small model (hidden 256, 8 layers, fp32), batch 1, plus cold start:
    python benchmarks/bench_decode.py --cpu --out benchmarks/results

`--budget-s` bounds the whole run: cases that would start after it are skipped (and listed).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx

from qwen35_mlx.models.config import TextConfig
from qwen35_mlx.models.text import TextModel

# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import SHAPE_0_8B, _device_name, random_weights  # noqa: E402

SHAPE_9B = dict(
    SHAPE_0_8B,
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=16,
    num_key_value_heads=4,
    linear_num_value_heads=32,
    intermediate_size=12288,
    tie_word_embeddings=False,
)
# Host overhead is all there is: a tiny vocabulary, 8 layers (6 linear, 2 full attention).
SHAPE_SMALL = dict(
    SHAPE_0_8B,
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
)
SHAPES = {"0.8b": SHAPE_0_8B, "9b": SHAPE_9B, "small": SHAPE_SMALL}


def build_models(shape: dict, dtype: mx.Dtype, which=("qwen35_mlx", "mlx-lm")) -> dict:
    from mlx_lm.models import qwen3_5 as mlx_lm_qwen3_5

    ours = TextModel(TextConfig(**shape))
    weights = random_weights(ours, dtype)
    models = {}
    if "qwen35_mlx" in which:
        ours.load_weights(list(weights.items()), strict=True)
        models["qwen35_mlx"] = ours.eval()
    if "mlx-lm" in which:
        args = mlx_lm_qwen3_5.ModelArgs.from_dict(dict(shape, model_type="qwen3_5"))
        theirs = mlx_lm_qwen3_5.Model(args)
        theirs.load_weights([("language_model." + k, v) for k, v in weights.items()], strict=True)
        models["mlx-lm"] = theirs.eval()
    return models


class Plain:
    """Our model with the compiled decode step off (the plain path: the A/B of issue #8)."""

    def __init__(self, model):
        self.model = model

    def make_cache(self):
        return self.model.make_cache()

    def __call__(self, *args, **kwargs):
        self.model.compiled_decode = False
        try:
            return self.model(*args, **kwargs)
        finally:
            self.model.compiled_decode = True


def greedy_tokens(model, prompts: mx.array, gen: int) -> list:
    cache = model.make_cache()
    y = mx.argmax(model(prompts, cache=cache)[:, -1, :], axis=-1)
    out = [y.tolist()]
    for _ in range(gen - 1):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        out.append(y.tolist())
    return out


def decode_run(model, prompts: mx.array, gen: int) -> float:
    """Prefill `prompts` [B, P], decode `gen` greedy tokens; decode tokens/s (all rows)."""
    cache = model.make_cache()
    logits = model(prompts, cache=cache)
    y = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(y)
    for _ in range(2):  # the first steps trace / allocate: out of the timing
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(y)
    t0 = time.perf_counter()
    for _ in range(gen):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.async_eval(y)
    mx.eval(y)
    dt = time.perf_counter() - t0
    del cache
    mx.clear_cache()
    return prompts.shape[0] * gen / dt


COUNTED = ("compiled", "plain", "mlx-lm")


def bench_shape(name, shape, dtype, batches, gen, prompt_len, repeats, deadline, log) -> list:
    rows = []
    if time.perf_counter() > deadline:
        log(f"{name}: skipped (time budget)")
        return [{"shape": name, "batch": B, "skipped": "time budget"} for B in batches]
    try:  # the primitives of one decode step (count_decode_ops.py): the host cost per token
        from count_decode_ops import FALLBACKS, cost_lines, count_all, host_cost, narrow

        for B in sorted({1, *(b for b in batches if b <= 32)}):
            kinds = {w: count_all(narrow(shape), w, batch=B, dtype=dtype) for w in COUNTED}
            counts = {w: sum(n for k, n in c.items() if k != FALLBACKS) for w, c in kinds.items()}
            est = {w: round(host_cost(c, B)["total"][1]) for w, c in kinds.items()}
            row = {"shape": name, "count_batch": B, "primitives_per_step": counts}
            rows.append(
                dict(row, host_us_estimate=est, kinds={w: dict(c) for w, c in kinds.items()})
            )
            log(f"{name}: primitives per decode step (batch {B}): {counts}")
            log(f"{name}: estimated host time a step (batch {B}, count_decode_ops.COSTS_US):")
            for line in cost_lines(kinds, B):
                log(line)
    except Exception as e:  # noqa: BLE001  (the timing still tells)
        log(f"{name}: primitive count failed: {e!r}")
    t0 = time.perf_counter()
    models = build_models(shape, dtype)
    models = {"qwen35_mlx": models["qwen35_mlx"], "plain": Plain(models["qwen35_mlx"]),
              "mlx-lm": models["mlx-lm"]}  # fmt: skip
    log(f"{name}: built in {time.perf_counter() - t0:.1f} s")
    # The compiled step and the plain path on this device: greedy tokens of 3 rows, 12 steps.
    try:
        probe = mx.random.randint(0, shape["vocab_size"], (3, 20), key=mx.random.key(5))
        a = greedy_tokens(models["qwen35_mlx"], probe, 12)
        b = greedy_tokens(models["plain"], probe, 12)
        rows.append({"shape": name, "check": "compiled == plain greedy tokens", "equal": a == b})
        log(f"{name}: compiled step == plain path, greedy tokens (3 rows x 12): {a == b}")
    except Exception as e:  # noqa: BLE001  (report and go on: the timing still tells)
        rows.append({"shape": name, "check": "compiled == plain", "error": repr(e)})
        log(f"{name}: compiled-vs-plain check failed: {e!r}")
    for B in batches:
        if time.perf_counter() > deadline:
            rows.append({"shape": name, "batch": B, "skipped": "time budget"})
            log(f"{name} batch {B}: skipped (time budget)")
            continue
        prompts = mx.random.randint(0, shape["vocab_size"], (B, prompt_len), key=mx.random.key(B))
        try:
            for m in models.values():  # warm-up at this batch shape
                decode_run(m, prompts, 4)
            runs = {k: [] for k in models}
            for r in range(repeats):
                order = list(models) if r % 2 == 0 else list(models)[::-1]
                for k in order:
                    runs[k].append(decode_run(models[k], prompts, gen))
        except Exception as e:  # noqa: BLE001  (one failing case must not lose the others)
            rows.append({"shape": name, "batch": B, "error": repr(e)})
            log(f"{name} batch {B}: failed: {e!r}")
            mx.clear_cache()
            continue
        ratios = [a / b for a, b in zip(runs["qwen35_mlx"], runs["mlx-lm"], strict=True)]
        plain = [a / b for a, b in zip(runs["qwen35_mlx"], runs["plain"], strict=True)]
        row = {
            "shape": name,
            "batch": B,
            "prompt": prompt_len,
            "gen": gen,
            "tps": {k: statistics.median(v) for k, v in runs.items()},
            "tps_runs": runs,
            "ratio": statistics.median(ratios),
            "ratio_runs": ratios,
            "compiled_over_plain": statistics.median(plain),
        }
        rows.append(row)
        log(
            f"{name} batch {B:>3}: ours {row['tps']['qwen35_mlx']:9.1f} tok/s, mlx-lm "
            f"{row['tps']['mlx-lm']:9.1f} tok/s, ratio {row['ratio']:.2f}x "
            f"(runs {', '.join(f'{x:.2f}' for x in ratios)}); plain path "
            f"{row['tps']['plain']:9.1f} tok/s"
        )
    del models
    gc.collect()  # the compiled step refers back to its model: a cycle
    mx.clear_cache()
    return rows


def cold_child(which: str, shape_name: str, dtype_name: str, prompt_len: int, gen: int) -> None:
    """In a fresh process: time the first prompt + `gen` tokens (after building the model)."""
    from mlx_lm.generate import generate_step

    model = build_models(SHAPES[shape_name], getattr(mx, dtype_name), (which,))[which]
    shape = SHAPES[shape_name]
    prompt = mx.random.randint(0, shape["vocab_size"], (prompt_len,), key=mx.random.key(7))
    mx.eval(prompt)
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for _tok, _ in generate_step(prompt, model, max_tokens=gen):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
    t1 = time.perf_counter()
    print(json.dumps({"model": which, "prompt_s": t_first - t0, "gen_s": t1 - t_first, "n": n}))


def cold_start(shape_name, dtype_name, prompt_len, gen, timeout, log, reps=1) -> list:
    rows = []
    order = ["qwen35_mlx", "mlx-lm"]
    for which in [w for r in range(reps) for w in (order if r % 2 == 0 else order[::-1])]:
        cmd = [sys.executable, __file__, "--cold-child", which, "--shapes", shape_name]
        cmd += ["--dtype", dtype_name, "--prompt", str(prompt_len), "--gen", str(gen)]
        if mx.default_device() == mx.cpu:
            cmd.append("--cpu-device")
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            line = [x for x in p.stdout.splitlines() if x.startswith("{")]
            if p.returncode != 0 or not line:
                rows.append({"model": which, "error": p.stderr[-2000:]})
                log(f"cold start {which}: failed\n{p.stderr[-2000:]}")
                continue
            r = json.loads(line[-1])
        except subprocess.TimeoutExpired:
            rows.append({"model": which, "error": f"timeout {timeout} s"})
            log(f"cold start {which}: timeout")
            continue
        rows.append(r)
        log(
            f"cold start {shape_name} {which}: first {prompt_len}-token prompt "
            f"{r['prompt_s']:.2f} s + {r['n']} tokens {r['gen_s']:.2f} s = "
            f"{r['prompt_s'] + r['gen_s']:.2f} s"
        )
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["decode"] if "tps" in r]
    names = ("qwen35_mlx", "plain", "mlx-lm")
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 3.4))
    labels = [f"{r['shape']}\nB={r['batch']}" for r in rows]
    xs = range(len(rows))
    colors = ("tab:blue", "tab:cyan", "tab:gray")
    labels_ = ("qwen35_mlx (compiled step)", "qwen35_mlx (plain path)", "mlx-lm")
    for i, (n, c, lab) in enumerate(zip(names, colors, labels_, strict=True)):
        vals = [r["tps"][n] for r in rows]
        ax.bar([x + (i - 1) * 0.27 for x in xs], vals, 0.27, label=lab, color=c)
    for x, r in zip(xs, rows, strict=True):
        top = max(r["tps"].values())
        ax.text(x, top, f"{r['ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens / s")
    ax.legend(fontsize=8)
    ax.set_title(f"decode, {result['dtype']}, {result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _without_env(argv: list[str]) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--env":
            skip = True
        elif not x.startswith("--env="):
            out.append(x)
    return out


def env_variants(spec: str, argv: list[str], out: Path) -> dict:
    """The benchmark in two child processes, the environment as it is and with `spec`'s
    variables (MLX reads MLX_MAX_OPS_PER_BUFFER / MLX_MAX_MB_PER_BUFFER once, when a device's
    command encoder is made, so a setting needs its own process); then their tables side by
    side. Cold start is left out (--no-cold)."""
    extra = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    base = _without_env(argv)
    results = {}
    for tag, env in (("default", {}), ("env", extra)):
        sub = out / f"env_{tag}"
        cmd = [sys.executable, __file__, *base, "--no-cold", "--out", str(sub)]
        print(f"[{tag}] {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(cmd)}", flush=True)
        p = subprocess.run(cmd, env={**os.environ, **env})
        path = sub / ("bench_decode_" + ("cpu" if "--cpu" in base else "gpu") + ".json")
        if p.returncode != 0 or not path.exists():
            print(f"[{tag}] failed (exit {p.returncode})", flush=True)
            continue
        results[tag] = json.loads(path.read_text())
    print(f"\nMLX settings compared: default vs {extra}")
    head = f"{'shape':>6} | {'B':>4} | {'setting':>7} | {'ours tok/s':>10} | "
    print(head + f"{'mlx-lm tok/s':>12} | ratio")
    cases = {}
    for tag, res in results.items():
        for r in res["decode"]:
            if "tps" in r:
                cases.setdefault((r["shape"], r["batch"]), {})[tag] = r
    for (shape, B), by in cases.items():
        for tag, r in by.items():
            print(
                f"{shape:>6} | {B:>4} | {tag:>7} | {r['tps']['qwen35_mlx']:10.1f} | "
                f"{r['tps']['mlx-lm']:12.1f} | {r['ratio']:.2f}x"
            )
    summary = {"env": extra, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_decode_env.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'bench_decode_env.json'}")
    return summary


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description="decode tok/s and cold start: ours vs mlx-lm")
    p.add_argument("--device-run", action="store_true", help="GPU: 0.8B and 9B, B 1/32/128")
    p.add_argument("--cpu", action="store_true", help="CPU: small model, fp32, B 1")
    p.add_argument("--shapes", default=None, help="comma list of 0.8b, 9b, small")
    p.add_argument("--batches", default=None, help="comma list of batch sizes")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens a row")
    p.add_argument("--gen", type=int, default=None, help="decode steps a run")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None, help="skip cases after this")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-start subprocesses")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument(
        "--env",
        default=None,
        help="K=V[,K=V...]: run the benchmark twice, in two child processes (the environment as "
        "it is, then with these variables), e.g. MLX_MAX_OPS_PER_BUFFER=2000,"
        "MLX_MAX_MB_PER_BUFFER=100000; both contenders of a process share its setting",
    )
    p.add_argument("--cold-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cpu-device", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.cpu or a.cpu_device:
        mx.set_default_device(mx.cpu)
    if a.cold_child:
        cold_child(a.cold_child, a.shapes, a.dtype, a.prompt, a.gen)
        return None
    if a.env:
        return env_variants(a.env, argv if argv is not None else sys.argv[1:], a.out)

    if a.cpu:
        d = dict(shapes="small", batches="1", dtype="float32", prompt=64, gen=64, repeats=5)
        d.update(budget_s=600.0, cold_shape="small", cold_prompt=512, cold_dtype="float32")
        d.update(cold_reps=2)
    else:
        d = dict(shapes="0.8b,9b", batches="1,32,128", dtype="bfloat16", prompt=128, gen=32)
        d.update(repeats=3, budget_s=240.0, cold_shape="0.8b", cold_prompt=512)
        d.update(cold_dtype="bfloat16", cold_reps=1)
    shapes = (a.shapes or d["shapes"]).split(",")
    batches = [int(x) for x in (a.batches or d["batches"]).split(",")]
    dtype_name = a.dtype or d["dtype"]
    prompt_len = a.prompt or d["prompt"]
    gen = a.gen or d["gen"]
    repeats = a.repeats or d["repeats"]
    budget = a.budget_s or d["budget_s"]

    a.out.mkdir(parents=True, exist_ok=True)
    log_path = a.out / "bench_decode.log"
    log_file = log_path.open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    import mlx_lm

    start = time.perf_counter()
    deadline = start + budget
    log(f"bench_decode {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    log(f"device {_device_name()}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}")
    from qwen35_mlx._blas import blas_status

    if mx.default_device() == mx.cpu:  # the CPU's float32 matmuls are this library's
        log(f"BLAS: {blas_status()}")
    rows = []
    for name in shapes:
        rows += bench_shape(
            name, SHAPES[name], getattr(mx, dtype_name), batches, gen, prompt_len, repeats,
            deadline, log,
        )  # fmt: skip
    cold = []
    if not a.no_cold:
        cold = cold_start(
            d["cold_shape"], d["cold_dtype"], d["cold_prompt"], 16, 150, log, d["cold_reps"]
        )
    result = {
        "benchmark": "bench_decode",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": _device_name(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "python": sys.version.split()[0],
        "env": {k: v for k, v in os.environ.items() if k.startswith(("MLX_", "QWEN35_MLX"))},
        "blas": blas_status(),
        "dtype": dtype_name,
        "decode": rows,
        "cold_start": {
            "shape": d["cold_shape"],
            "prompt": d["cold_prompt"],
            "gen": 16,
            "runs": cold,
        },  # fmt: skip
        "wall_s": time.perf_counter() - start,
    }
    log("")
    head = f"{'shape':>6} | {'B':>4} | {'ours tok/s':>10} | {'plain tok/s':>11} | "
    log(head + f"{'mlx-lm tok/s':>12} | ours/mlx-lm | ours/plain")
    for r in rows:
        if "tps" in r:
            t = r["tps"]
            log(
                f"{r['shape']:>6} | {r['batch']:>4} | {t['qwen35_mlx']:10.1f} | "
                f"{t['plain']:11.1f} | {t['mlx-lm']:12.1f} | {r['ratio']:10.2f}x | "
                f"{r['compiled_over_plain']:9.2f}x"
            )
        elif "batch" in r:
            log(f"{r['shape']:>6} | {r['batch']:>4} | {r.get('skipped') or r.get('error')}")
    tag = "cpu" if mx.default_device() == mx.cpu else "gpu"
    stem = a.out / f"bench_decode_{tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(result, stem.with_suffix(".png"))
    except ImportError:
        log("matplotlib not installed: no PNG")
    log(f"wrote {stem}.json ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
