"""Prefill memory of a long prompt on the GPU, 0.8B shape (random bf16 weights), in steps of 2048
(issue 9): the whole prompt's peak above the memory before it at two lengths and the growth
between them against the KV cache's, and each step's own peak above the memory active when it
began (the peak reset every step), which shows whether a step's transient grows with the
history. Warm: a first prompt of 12,288 tokens compiles and fills the kernel caches.

    PYTHONPATH=src python benchmarks/probe_prefill_memory.py [--lengths 32768,131072]
        [--per-step 131072] [--repeats 2] [--shape 0.8b] [--out DIR]
        [--rounds N]    # N more rounds of both lengths: the growth per round, its median
                        # and max (the whole peak is the KV cache plus the largest step
                        # transient of the run, which varies from run to run: one round's
                        # growth is a difference of two maxima)
        [--variants qa1+onestream,streams,drain]  # then N rounds per text.py setting,
                        # alternating (qa<N>: QUEUE_AHEAD = N; split / whole: SPLIT_LAYERS;
                        # streams / onestream: QUEUE_STREAMS; drain / nodrain: DRAIN_LAYERS;
                        # sync: each wait drains the device too)
        [--per-layer 32768]  # one step after that many tokens, its layers (and with split,
                        # their mixer and MLP parts) drained one by one: each part's peak

Written for the GPU machine (on a CPU it runs, slowly, with the CPU's paths).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode  # noqa: E402

from qwen35_mlx import generation  # noqa: E402

# isort: on

GiB = 1 << 30
STEP = 2048


def _kv_bytes(cache) -> int:
    return sum(c.nbytes for c in cache if getattr(c, "keys", None) is not None)


def whole_peak(model, ids: list[int], n: int) -> dict:
    """The peak above the memory before a prefill of ids[:n] (the cache made inside it)."""
    gc.collect()
    mx.clear_cache()
    cache = model.make_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    generation.prefill(model, cache, ids[:n], prefill_step_size=STEP)
    mx.synchronize()
    dt = time.perf_counter() - t0
    out = dict(
        tokens=n,
        tok_s=n / dt,
        peak_gib=(mx.get_peak_memory() - base) / GiB,
        kv_gib=_kv_bytes(cache) / GiB,
    )
    del cache
    return out


def step_transients(model, ids: list[int], n: int) -> list[dict]:
    """Each step's peak above the memory active when it began, and the active memory after it."""
    gc.collect()
    mx.clear_cache()
    cache = model.make_cache()
    base = mx.get_active_memory()
    rows, start = [], [mx.get_active_memory()]
    mx.reset_peak_memory()

    def progress(done: int, total: int) -> None:
        mx.synchronize()
        peak, active = mx.get_peak_memory(), mx.get_active_memory()
        rows.append(
            dict(done=done, transient_gib=(peak - start[0]) / GiB, active_gib=(active - base) / GiB)
        )
        start[0] = active
        mx.reset_peak_memory()

    generation.prefill(model, cache, ids[:n], prefill_step_size=STEP, progress=progress)
    mx.synchronize()
    del cache
    return rows


def _growth_summary(rounds: list[dict], kv_growth: float) -> str:
    """Median and max growth over rounds, and how many stay within the KV growth + 10%."""
    gs = sorted(r["growth_gib"] for r in rounds)
    within = sum(x <= 1.1 * kv_growth for x in gs)
    return (
        f"growth median {gs[len(gs) // 2]:.3f}, max {gs[-1]:.3f} GiB over {len(gs)} rounds; "
        f"{within} of {len(gs)} within {1.1 * kv_growth:.3f}"
    )


def _settings(name: str) -> dict:
    """A `--variants` entry as text.py settings: "qa<N>" (QUEUE_AHEAD = N), "split" / "whole"
    (SPLIT_LAYERS on / off), "drain" / "nodrain" (DRAIN_LAYERS on / off), "streams" /
    "onestream" (QUEUE_STREAMS on / off), "sync" (every wait of the layer loop also drains the
    device and MLX's release of finished work, `mx.synchronize`: not a text.py setting, the
    probe's own), joined by "+"; the rest at their defaults."""
    out = {}
    for part in name.split("+"):
        if part in ("split", "whole"):
            out["SPLIT_LAYERS"] = part == "split"
        elif part in ("drain", "nodrain"):
            out["DRAIN_LAYERS"] = part == "drain"
        elif part in ("streams", "onestream"):
            out["QUEUE_STREAMS"] = part == "streams"
        elif part == "sync":
            out["sync"] = True
        elif part.startswith("qa") and part[2:].isdigit():
            out["QUEUE_AHEAD"] = int(part[2:])
        else:
            raise SystemExit(
                f"--variants: unknown setting {part!r} (qa<N>, split, whole, drain, nodrain, "
                "streams, onestream, sync, joined by +)"
            )
    return out


@contextlib.contextmanager
def _queue_settings(sync: bool = False, **changes):
    """text.py's layer-queue settings (QUEUE_AHEAD, SPLIT_LAYERS, DRAIN_LAYERS, QUEUE_STREAMS)
    changed for a block, the rest as they are, then all restored; sync: every `mx.eval` in the
    block is followed by `mx.synchronize` (the `--variants` entry "sync")."""
    from qwen35_mlx.models import text

    keys = ("QUEUE_AHEAD", "SPLIT_LAYERS", "DRAIN_LAYERS", "QUEUE_STREAMS")
    saved = {k: getattr(text, k) for k in keys}
    real_eval = mx.eval

    def synced_eval(*arrays) -> None:
        real_eval(*arrays)
        mx.synchronize()

    try:
        for k, v in changes.items():
            setattr(text, k, v)
        if sync:
            mx.eval = synced_eval
        yield
    finally:
        mx.eval = real_eval
        for k, v in saved.items():
            setattr(text, k, v)


def _variant_ab(model, ids: list[int], lengths: list[int], args, kv_growth: float) -> dict:
    """`--rounds` rounds of both lengths per `--variants` entry, the entries alternating by
    round: {name: [round, ...]}, each round's growth and the long prompt's tok/s."""
    names = [x for x in args.variants.split(",") if x]
    settings = {name: _settings(name) for name in names}
    out: dict = {name: [] for name in names}
    for rep in range(max(args.rounds, 1)):
        for name in names if rep % 2 == 0 else names[::-1]:
            with _queue_settings(**settings[name]):
                a, b = (whole_peak(model, ids, n) for n in lengths)
            out[name].append(dict(short=a, long=b, growth_gib=b["peak_gib"] - a["peak_gib"]))
    for name, rounds in out.items():
        tps = sorted(r["long"]["tok_s"] for r in rounds)
        print(
            f"  {name}: {_growth_summary(rounds, kv_growth)}; {lengths[1]} tokens "
            f"median {tps[len(tps) // 2]:.0f} tok/s"
        )
    return out


def layer_transients(model, ids: list[int], history: int, split: bool) -> list[dict]:
    """One step of STEP tokens after `history` tokens, its layers run one part at a time with
    the device drained between parts (mixer, then the rest of the layer, when `split`; else
    whole layers): each part's peak above the memory active when it began."""
    cache = model.make_cache()
    generation.prefill(model, cache, ids[:history], prefill_step_size=STEP)
    mx.synchronize()
    rows: list[dict] = []
    start = [mx.get_active_memory()]
    real_async_eval = mx.async_eval

    def drained(*arrays) -> None:  # every submit the layer loop makes, run to the end
        mx.eval(*arrays)
        mx.synchronize()
        rows.append(dict(transient_gib=(mx.get_peak_memory() - start[0]) / GiB))
        start[0] = mx.get_active_memory()
        mx.reset_peak_memory()

    with _queue_settings(QUEUE_AHEAD=0, SPLIT_LAYERS=split, DRAIN_LAYERS=False):
        mx.async_eval = drained
        try:
            mx.reset_peak_memory()
            model(mx.array(ids[history : history + STEP])[None], cache=cache)
        finally:
            mx.async_eval = real_async_eval
    types = ["linear" if layer.is_linear else "attention" for layer in model.layers]
    parts = ("mixer", "mlp") if split else ("layer",)
    for i, row in enumerate(rows):
        row.update(layer=i // len(parts), part=parts[i % len(parts)], kind=types[i // len(parts)])
    del cache
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="0.8b", choices=sorted(bench_decode.SHAPES))
    p.add_argument("--lengths", default="32768,131072", help="two prompt lengths")
    p.add_argument("--per-step", type=int, default=131072, help="prompt length per step (0: no)")
    p.add_argument("--repeats", type=int, default=2, help="per-step runs")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON")
    p.add_argument("--rounds", type=int, default=0, help="more rounds of whole peaks")
    p.add_argument(
        "--variants",
        default=None,
        help="comma list of text.py settings (qa<N>: QUEUE_AHEAD = N; split / whole: "
        "SPLIT_LAYERS on / off; drain: DRAIN_LAYERS; sync: each wait drains the device; "
        "joined by +): --rounds rounds of both lengths per entry, the entries alternating "
        "round by round (an A/B of the growth and the long tok/s)",
    )
    p.add_argument(
        "--per-layer",
        type=int,
        default=0,
        help="history before one step whose layers (and their parts, split) are drained one "
        "by one: each part's peak (0: no)",
    )
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if len(lengths) != 2:
        p.error(f"--lengths takes two lengths, got {args.lengths!r}")
    shape = dict(bench_decode.SHAPES[args.shape])
    model = bench_decode.build_models(shape, mx.bfloat16, which=("qwen35_mlx",))["qwen35_mlx"]
    longest = max([*lengths, args.per_step, args.per_layer + STEP])
    ids = mx.random.randint(0, shape["vocab_size"], (longest,)).tolist()
    warm = ids[: min(12288, longest)]
    generation.prefill(model, model.make_cache(), warm, prefill_step_size=STEP)
    a, b = (whole_peak(model, ids, n) for n in lengths)
    growth, kv_growth = b["peak_gib"] - a["peak_gib"], b["kv_gib"] - a["kv_gib"]
    print(f"{args.shape} bf16 on {mx.default_device()}, steps of {STEP}")
    for r in (a, b):
        print(
            f"  {r['tokens']:>7} tokens: {r['tok_s']:8.0f} tok/s, peak above the start "
            f"{r['peak_gib']:.3f} GiB (KV cache {r['kv_gib']:.3f})"
        )
    print(
        f"  growth {growth:.3f} GiB against the KV cache's {kv_growth:.3f} "
        f"(+10%: {1.1 * kv_growth:.3f}): {'within' if growth <= 1.1 * kv_growth else 'above'}"
    )
    rounds = [dict(short=a, long=b, growth_gib=growth)]
    for rep in range(0 if args.variants else args.rounds):  # (--variants: its own)
        a2, b2 = (whole_peak(model, ids, n) for n in lengths)
        g = b2["peak_gib"] - a2["peak_gib"]
        rounds.append(dict(short=a2, long=b2, growth_gib=g))
        print(
            f"  round {rep + 2}: peaks {a2['peak_gib']:.3f} / {b2['peak_gib']:.3f} GiB, growth "
            f"{g:.3f}, {b2['tok_s']:.0f} tok/s at the long one"
        )
    if args.rounds and not args.variants:
        print(f"  {_growth_summary(rounds, kv_growth)}")
    variants = _variant_ab(model, ids, lengths, args, kv_growth) if args.variants else {}
    per_layer = {}
    for split in (False, True) if args.per_layer else ():
        rows = layer_transients(model, ids, args.per_layer, split)
        per_layer["split" if split else "whole"] = rows
        for part in sorted({r["part"] for r in rows}):
            for kind in sorted({r["kind"] for r in rows}):
                xs = [r["transient_gib"] for r in rows if (r["part"], r["kind"]) == (part, kind)]
                xs.sort()
                if xs:
                    print(
                        f"  per layer after {args.per_layer} tokens, {kind} {part}: median "
                        f"{xs[len(xs) // 2]:.3f}, max {xs[-1]:.3f} GiB over {len(xs)}"
                    )
    per_step = []
    for rep in range(args.repeats if args.per_step else 0):
        rows = step_transients(model, ids, args.per_step)
        per_step.append(rows)
        later = sorted(r["transient_gib"] for r in rows[1:])
        print(
            f"  per step, run {rep + 1}: first {rows[0]['transient_gib']:.3f} GiB (with the cache "
            f"it makes), later median {later[len(later) // 2]:.3f} / max {later[-1]:.3f}; "
            f"active after the last {rows[-1]['active_gib']:.3f}"
        )
    info = dict(
        device=str(mx.default_device()),
        mlx=mx.__version__,
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        shape=args.shape,
        whole=[a, b],
        rounds=rounds,
        per_step=per_step,
        variants=variants,
        per_layer=per_layer,
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = args.out / f"prefill_memory_{args.shape}_{stamp}.json"
        path.write_text(json.dumps(info, indent=1))
        print(f"wrote {path}")
    return info


if __name__ == "__main__":
    main()
