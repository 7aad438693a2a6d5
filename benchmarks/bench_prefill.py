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

`--step 2048,8192` runs every contender at each step size (tokens a forward; 8192 puts a whole
8192-token prompt in one forward), the memory lengths at the first only. `--tf-conv fla` runs
transformers' causal conv through flash-linear-attention's Triton kernel (`_fla_conv`, a shim
for transformers' `causal_conv1d_fn`, which otherwise falls back to PyTorch's conv1d where the
`causal_conv1d` package is missing), after checking it on the device against the reference conv
on one layer (`check_tf_conv`: the conv alone and the layer's output, max errors printed).

    # GPU (one command, about 5 minutes; JSON, PNG and log to $OUT or benchmarks/results):
    PYTHONPATH=src python benchmarks/bench_prefill.py --out "${OUT:-benchmarks/results}"
    # issue 9's 8k comparison (about 2 minutes):
    PYTHONPATH=src python benchmarks/bench_prefill.py --shapes 0.8b --lengths 8192 \
        --mem-lengths 8192 --step 2048,8192 --tf-conv fla --out "${OUT:-benchmarks/results}"
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
    """Ours and mlx-lm's model at every step size of `args.steps` (memory lengths at the first
    only): {"results": {step: {model: {L: run}}}, "skipped": [...]}."""
    dtype = mx.float32 if args.small and args.cpu else mx.bfloat16
    models = build_models(shape, dtype)
    rng = mx.random.randint(0, shape["vocab_size"], (max(args.lengths + args.mem_lengths),))
    all_ids = rng.tolist()
    res: dict = {}
    skipped = []
    for si, step in enumerate(args.steps):
        res[step] = {name: {} for name in models}
        for name, model in models.items():  # warm-up: kernels and traces (mlx-lm's: short)
            n = 2 * step if name == "qwen35_mlx" else min(256, step)
            run_mlx(model, all_ids[:n], min(step, n), not args.no_reserve)
        lengths = set(args.lengths) | (set(args.mem_lengths) if si == 0 else set())
        per_step: dict[str, float] = {}
        for L in sorted(lengths):
            for name, model in models.items():
                if name == "mlx-lm" and L not in args.lengths and L not in args.mlx_lm_mem:
                    skipped.append(f"{shape_name} {name} L={L}: not asked (--mlx-lm-mem)")
                    continue
                est = per_step.get(name, 0.0) * (L / step)
                tag = f"{shape_name} {name} L={L} step {step}"
                if est > args.cap_s:
                    skipped.append(f"{tag}: skipped, estimated {est:.0f} s > {args.cap_s} s")
                    log(skipped[-1])
                    continue
                if time.perf_counter() + est > deadline:
                    skipped.append(f"{tag}: skipped, over the run's budget")
                    log(skipped[-1])
                    continue
                # mlx-lm's runs are long and their noise small against the gap: one each.
                repeats = args.repeats if L <= 8192 and name == "qwen35_mlx" else 1
                reserve = not args.no_reserve
                runs = [run_mlx(model, all_ids[:L], step, reserve) for _ in range(repeats)]
                best = max(runs, key=lambda r: r["tokens_per_s"])
                best["peak_above_start"] = max(r["peak_above_start"] for r in runs)
                res[step][name][L] = best
                per_step[name] = max(per_step.get(name, 0.0), best["seconds"] / (L / step))
                log(
                    f"{shape_name} {name:>10} L={L:>6} step {step:>5}: "
                    f"{best['tokens_per_s']:10.0f} tok/s ({best['seconds']:.3f} s), peak above "
                    f"weights {best['peak_above_start'] / GiB:.3f} GiB, "
                    f"KV {best['kv_bytes'] / GiB:.3f} GiB"
                )
    del models
    gc.collect()
    mx.clear_cache()
    return {"results": res, "skipped": skipped}


def _fla_conv(calls: list):
    """transformers' `causal_conv1d_fn` (x [B, C, T], weight [C, K], bias, activation) through
    flash-linear-attention's Triton causal conv (`fla.modules.causal_conv1d.causal_conv1d`, x
    [B, T, C]): zero left padding, the activation fused (fp32 inside, one rounding), the output
    [B, C, T] in x's dtype as the reference returns it. `calls` counts the calls."""
    from fla.modules.causal_conv1d import causal_conv1d

    def conv(hidden_states, weight, bias=None, activation=None, **kwargs):
        for k in ("seq_idx", "cu_seqlens", "cu_seq_lens_q"):
            if kwargs.get(k) is not None:
                raise NotImplementedError(f"fla conv shim: {k} (packed sequences) not handled")
        x = hidden_states.transpose(1, 2)  # [B, T, C]: the in-projection's own layout
        if x.stride(-1) != 1:
            x = x.contiguous()
        y, _ = causal_conv1d(x.to(weight.dtype), weight, bias, activation=activation)
        calls.append(1)
        return y.to(hidden_states.dtype).transpose(1, 2)

    return conv


def _impl_name(fn) -> str:
    """Where a transformers kernel-with-fallback function resolved to (its `implementation`)."""
    import inspect as _inspect

    try:
        impl = _inspect.getclosurevars(fn).nonlocals.get("implementation")
    except (TypeError, ValueError):
        impl = None
    if impl is None:  # not the wrapper this was written against (transformers 5.17-5.25)
        return f"unresolved {type(fn).__name__} {getattr(fn, '__name__', '?')}"
    return f"{getattr(impl, '__module__', '?')}.{getattr(impl, '__name__', '?')}"


def check_tf_conv(torch, tm, model, conv, dev, log) -> dict:
    """The shim against transformers' reference conv on the device: the conv alone on the first
    linear layer's own in-projection of random activations (max abs error against the reference
    and of both against a float32 conv + silu), then that layer's whole output with and without
    the shim. Returns the figures."""
    layer = next(m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet"))
    ref_conv = tm.causal_conv1d_fn
    g = torch.Generator(device=dev).manual_seed(1)
    hidden = layer.in_proj_qkv.weight.shape[1]
    x = torch.randn(1, 2048, hidden, device=dev, generator=g).to(layer.in_proj_qkv.weight.dtype)
    out: dict = {}
    with torch.inference_mode():
        qkv = layer.in_proj_qkv(x).transpose(1, 2)  # [B, C, T] as the layer passes it
        w = layer.conv1d.weight.squeeze(1)
        act = layer.activation
        a = ref_conv(qkv, w, layer.conv1d.bias, activation=act)
        b = conv(qkv, w, layer.conv1d.bias, activation=act)
        K = w.shape[1]
        f = torch.nn.functional
        exact = f.conv1d(qkv.float(), w.float().unsqueeze(1), padding=K - 1, groups=w.shape[0])
        exact = f.silu(exact[..., : qkv.shape[-1]])
        out["conv_max_abs_shim_vs_ref"] = (a.float() - b.float()).abs().max().item()
        out["conv_frac_differing"] = (a != b).float().mean().item()
        out["conv_max_abs_ref_vs_fp32"] = (a.float() - exact).abs().max().item()
        out["conv_max_abs_shim_vs_fp32"] = (b.float() - exact).abs().max().item()
        out["conv_max_abs_value"] = exact.abs().max().item()
        y_ref = layer(x)
        tm.causal_conv1d_fn = conv
        try:
            y_shim = layer(x)
        finally:
            tm.causal_conv1d_fn = ref_conv
        out["layer_max_abs_shim_vs_ref"] = (y_ref.float() - y_shim.float()).abs().max().item()
        out["layer_max_abs_value"] = y_ref.float().abs().max().item()
    log(
        "transformers conv check (one linear layer, 2048 tokens): conv max |shim - ref| "
        f"{out['conv_max_abs_shim_vs_ref']:.3g} ({100 * out['conv_frac_differing']:.2f}% of "
        f"elements differ; |ref - fp32| {out['conv_max_abs_ref_vs_fp32']:.3g}, |shim - fp32| "
        f"{out['conv_max_abs_shim_vs_fp32']:.3g}, max |value| {out['conv_max_abs_value']:.3g}); "
        f"layer output max |shim - ref| {out['layer_max_abs_shim_vs_ref']:.3g} "
        f"(max |output| {out['layer_max_abs_value']:.3g})"
    )
    return out


def bench_transformers(shape_name, shape, args, deadline, log) -> dict:
    """transformers' Qwen3.5 (random init, bf16) in the same steps; prompt tokens/s.
    `args.tf_conv` "fla": its causal conv through flash-linear-attention's (`_fla_conv`),
    checked against the reference first (`check_tf_conv`)."""
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
    gdn = _impl_name(tm.torch_chunk_gated_delta_rule)
    if gdn.startswith("unresolved"):
        try:
            import fla  # noqa: F401

            gdn += ", fla importable"
        except ImportError:
            gdn += ", fla not installed"
    else:
        kind = "flash-linear-attention" if gdn.startswith("fla.") else "torch reference"
        gdn = f"{kind} ({gdn})"
    dev = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = {k: v for k, v in shape.items() if k != "model_type"}
    config = Qwen3_5TextConfig(**cfg)
    torch.manual_seed(0)
    with torch.device(dev):
        model = tm.Qwen3_5ForCausalLM(config).to(dtype).eval()
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    ref_conv = tm.causal_conv1d_fn
    conv_name = f"transformers' own ({_impl_name(ref_conv)})"
    calls: list = []
    check = None
    if args.tf_conv == "fla":
        try:
            conv = _fla_conv(calls)
            check = check_tf_conv(torch, tm, model, conv, dev, log)
            tm.causal_conv1d_fn = conv
            conv_name = "flash-linear-attention's Triton causal_conv1d (shim)"
        except Exception as e:  # reported; the run goes on with transformers' own conv
            conv_name += f"; fla shim failed: {type(e).__name__}: {e}"
    log(
        f"{shape_name} transformers {dev}: gated delta via {gdn}; causal conv: {conv_name}; "
        f"cache argument {cache_kw!r}"
    )

    def run(L: int, step: int) -> float:
        ids = torch.randint(0, shape["vocab_size"], (1, L), device=dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        cache = None  # the model makes its own (hybrid) cache on the first step; reused after
        with torch.inference_mode():
            for s in range(0, L, step):
                kw = {} if cache is None else {cache_kw: cache}
                out = model(input_ids=ids[:, s : s + step], use_cache=True, logits_to_keep=1, **kw)
                cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    res: dict = {}
    skipped = []
    try:
        for step in args.steps:
            res[step] = {}
            run(2 * step, step)  # warm-up (Triton autotuning and compiles)
            for L in args.lengths:
                if time.perf_counter() > deadline:
                    skipped.append(f"{shape_name} transformers L={L}: over the run's budget")
                    continue
                repeats = args.repeats if L <= 8192 else 1
                dt = min(run(L, step) for _ in range(repeats))
                res[step][L] = {"seconds": dt, "tokens_per_s": L / dt}
                log(
                    f"{shape_name} transformers L={L:>6} step {step:>5}: {L / dt:10.0f} tok/s "
                    f"({dt:.3f} s)"
                )
    except Exception as e:  # a peer failing is reported, not fatal
        skipped.append(f"{shape_name} transformers: failed: {type(e).__name__}: {e}")
        log(skipped[-1])
    finally:
        tm.causal_conv1d_fn = ref_conv
    if args.tf_conv == "fla":
        conv_name += f", {len(calls)} calls"
        log(f"{shape_name} transformers causal conv: {conv_name}")
    model = None
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return {
        "results": res,
        "skipped": skipped,
        "gated_delta": gdn,
        "causal_conv": conv_name,
        "conv_check": check,
    }


def table(result: dict) -> list[str]:
    lines = []
    steps = result["steps"]
    for shape_name, r in result["shapes"].items():
        mlx_res = r["mlx"]["results"]
        tf = r.get("transformers", {}).get("results", {})
        for step in steps:
            lines.append(f"{shape_name}: prompt tokens/s (steps of {step})")
            head = f"{'tokens':>8} | {'ours':>10} | {'mlx-lm':>10} | {'transformers':>12} | ours/tf"
            lines.append(head)
            for L in result["lengths"]:
                o = mlx_res.get(step, {}).get("qwen35_mlx", {}).get(L, {}).get("tokens_per_s")
                m = mlx_res.get(step, {}).get("mlx-lm", {}).get(L, {}).get("tokens_per_s")
                t = tf.get(step, {}).get(L, {}).get("tokens_per_s")
                ratio = f"{o / t:.2f}x" if o and t else "-"
                cells = [f"{x:.0f}" if x else "-" for x in (o, m, t)]
                lines.append(f"{L:>8} | {cells[0]:>10} | {cells[1]:>10} | {cells[2]:>12} | {ratio}")
        lines.append(
            f"{shape_name}: peak memory above the weights, GiB (KV cache in brackets; steps of "
            f"{steps[0]})"
        )
        lines.append(f"{'tokens':>8} | {'ours':>16} | {'mlx-lm':>16}")
        for L in result["mem_lengths"]:
            cells = []
            for name in ("qwen35_mlx", "mlx-lm"):
                x = mlx_res.get(steps[0], {}).get(name, {}).get(L)
                cells.append(
                    f"{x['peak_above_start'] / GiB:7.3f} ({x['kv_bytes'] / GiB:.3f})" if x else "-"
                )
            lines.append(f"{L:>8} | {cells[0]:>16} | {cells[1]:>16}")
        for s in r["mlx"]["skipped"] + r.get("transformers", {}).get("skipped", []):
            lines.append(f"  skipped: {s}")
        t = r.get("transformers")
        if isinstance(t, dict) and "gated_delta" in t:
            lines.append(f"  transformers' gated delta: {t['gated_delta']}")
            lines.append(f"  transformers' causal conv: {t['causal_conv']}")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(result["shapes"])
    steps = result["steps"]
    fig, axes = plt.subplots(len(shapes), 2, figsize=(10, 3.4 * len(shapes)), squeeze=False)
    for row, shape_name in enumerate(shapes):
        r = result["shapes"][shape_name]
        mlx_res = r["mlx"]["results"]
        tf = r.get("transformers", {}).get("results", {})
        ax = axes[row][0]
        for si, step in enumerate(steps):
            series = {
                "ours": mlx_res.get(step, {}).get("qwen35_mlx", {}),
                "mlx-lm": mlx_res.get(step, {}).get("mlx-lm", {}),
                "transformers+fla": tf.get(step, {}),
            }
            for ci, (label, d) in enumerate(series.items()):
                xs = [L for L in result["lengths"] if L in d]
                if xs:
                    ax.plot(
                        xs,
                        [d[L]["tokens_per_s"] for L in xs],
                        marker="o" if si == 0 else "s",
                        linestyle="-" if si == 0 else "--",
                        color=f"C{ci}",
                        label=f"{label}, steps of {step}",
                    )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("prompt tokens / s")
        ax.set_title(f"{shape_name}: prefill throughput")
        ax.legend(fontsize=7)
        ax = axes[row][1]
        first = mlx_res.get(steps[0], {})
        for label, name in (("ours", "qwen35_mlx"), ("mlx-lm", "mlx-lm")):
            d = first.get(name, {})
            xs = [L for L in result["mem_lengths"] if L in d]
            if xs:
                ax.plot(xs, [d[L]["peak_above_start"] / GiB for L in xs], marker="o", label=label)
        d = first.get("qwen35_mlx", {})
        xs = [L for L in result["mem_lengths"] if L in d]
        if xs:
            ax.plot(xs, [d[L]["kv_bytes"] / GiB for L in xs], "k--", label="KV cache")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("GiB above the weights")
        ax.set_title(f"{shape_name}: peak memory (steps of {steps[0]})")
        ax.legend(fontsize=8)
    fig.suptitle(f"prefill, {result['device']}", fontsize=9)
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
    p.add_argument("--step", default="2048", help="tokens a forward; a comma list runs each")
    p.add_argument(
        "--tf-conv",
        choices=("own", "fla"),
        default="own",
        help="transformers' causal conv: its own lookup, or flash-linear-attention's (a shim)",
    )
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
    if args.small and args.step == "2048":
        args.step = str(defaults["step"])
    args.steps = ints(args.step)
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
        "steps": args.steps,
        "tf_conv": args.tf_conv,
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
        # transformers first: past `--budget-s` what is skipped is mlx-lm's long runs.
        entry = {}
        if args.no_transformers:
            entry["transformers"] = {"skipped": [f"{shape_name} transformers: --no-transformers"]}
        else:
            tf = bench_transformers(shape_name, shape, args, deadline, log)
            if isinstance(tf.get("skipped"), str):
                log(tf["skipped"])
                tf = {"results": {}, "skipped": [tf["skipped"]]}
            entry["transformers"] = tf
        entry["mlx"] = bench_mlx(shape_name, shape, args, deadline, log)
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
