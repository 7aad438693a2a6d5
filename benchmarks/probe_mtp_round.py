"""What a greedy MTP round costs next to a one-token step, per call (issue 13, the CPU target).

The shipped tiny model (or `--model`), a random prompt of `--context` tokens in the cache, then
per call, alternating block by block, the process's CPU time (median over blocks):
    S    one compiled one-token step (`model(y, cache)`, evaluated); the linear layers' states
         are put back and the KV cache trimmed after it, so every call sees the same cache
    V2   one compiled verify pass of 2 tokens (`model(tokens, cache, return_hidden=True)`),
         then every cache trimmed by 2
    R1   one fused greedy round at k = 1 (`verify_and_draft`: the verify pass and the MTP head
         over both positions in one compiled call), then both caches trimmed by 2
    H1   the MTP head over one position (`mtp_forward(..., last_only=True)`), H2 over two
A k = 1 round gives 1 + a tokens (a: the share of drafts accepted), so MTP pays (1 + a) S / R1
minus the generation loop's own costs. `--fp32-decode` sets `text.CPU_FP32_DECODE`.

    python benchmarks/probe_mtp_round.py                  # tiny model, CPU
    python benchmarks/probe_mtp_round.py --fp32-decode all
    python benchmarks/probe_mtp_round.py --fp32-decode all --variants ops,half,now  # A/B
    python benchmarks/probe_mtp_round.py --fp32-decode all --variants now,native
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx

from qwen35_mlx import load
from qwen35_mlx.kernels import cpu_ext
from qwen35_mlx.kernels.gated_delta import decode as decode_mod
from qwen35_mlx.models import layers as layers_mod
from qwen35_mlx.models import mtp as mtp_mod
from qwen35_mlx.models import text as text_mod
from qwen35_mlx.models.cache import LinearCache, set_history

# isort: on


def probe_calls(model, context: int) -> dict:
    """The calls S, V2, R1, H1, H2 (module doc) over a random prompt of `context` tokens, each
    leaving the caches as it found them."""
    vocab = model.config.vocab_size
    prompt = mx.random.randint(0, vocab, (1, context), key=mx.random.key(0))
    cache = model.make_cache()
    set_history(cache, 2)
    mtp_cache = model.make_mtp_cache()
    logits, h = model(prompt[:, :-1], cache=cache, return_hidden=True)
    model.mtp_forward(h[:, :-1], prompt[:, 1:-1], mtp_cache)
    mx.eval(logits, h, [c.state for c in cache], [c.state for c in mtp_cache])
    y, hid = prompt[:, -1:], h[:, -1:]
    y2, hid2 = mx.concatenate([y, y], axis=1), mx.concatenate([hid, hid], axis=1)

    def step():
        saved = [(c[0], c[1]) if isinstance(c, LinearCache) else None for c in cache]
        mx.eval(model(y, cache=cache))
        for c, s in zip(cache, saved, strict=True):
            if s is None:
                c.trim(1)
            else:
                c[0], c[1] = s

    def verify():
        mx.eval(model(y2, cache=cache, return_hidden=True))
        for c in cache:
            c.trim(2)

    def round_():
        mx.eval(model.verify_and_draft(y2, cache, mtp_cache))
        for c in cache + mtp_cache:
            c.trim(2)

    def head(T):
        def run():
            mx.eval(model.mtp_forward(hid2[:, :T], y2[:, :T], mtp_cache, last_only=True))
            for c in mtp_cache:
                c.trim(T)

        return run

    return {"S": step, "V2": verify, "R1": round_, "H1": head(1), "H2": head(2)}


# `--variants`: module settings read while a compiled step is traced, per variant name.
VARIANTS = {
    "ops": dict(HALF_OPS=False, NATIVE_RECORD=False, ROPE_JOINT=False),  # before session 16
    "half": dict(HALF_OPS=True, NATIVE_RECORD=False, ROPE_JOINT=False),  # f16 chains, casts
    "rec": dict(HALF_OPS=True, NATIVE_RECORD=True, ROPE_JOINT=False),  # + T tokens' one call
    "now": dict(HALF_OPS=True, NATIVE_RECORD=True, ROPE_JOINT=True),  # + q and k's one rope
    # + the round's head as one native primitive (session 17; R1 only: H1, H2 are MLX's head)
    "native": dict(HALF_OPS=True, NATIVE_RECORD=True, ROPE_JOINT=True, NATIVE_HEAD=True),
}
STEPS = ("decode", "verify", "mtp", "round")


def set_variant(name: str) -> None:
    flags = VARIANTS[name]
    cpu_ext.HALF_OPS = flags["HALF_OPS"]
    decode_mod.NATIVE_RECORD = flags["NATIVE_RECORD"]
    layers_mod.ROPE_JOINT = flags["ROPE_JOINT"]
    mtp_mod.NATIVE_HEAD = flags.get("NATIVE_HEAD", False)


def probe(model, context: int, iters: int, repeats: int, variants=("now",)) -> dict:
    """CPU ms a call, median over blocks; per variant its own compiled steps (traced under its
    settings), swapped in block by block."""
    fns = probe_calls(model, context)
    steps = {}
    for v in variants:
        set_variant(v)
        for n in STEPS:
            setattr(model, f"_{n}_step", mx.compile(getattr(model, f"_{n}_impl"), inputs=model))
        for fn in fns.values():
            for _ in range(5):
                fn()
        steps[v] = {n: getattr(model, f"_{n}_step") for n in STEPS}
    runs = {(v, name): [] for v in variants for name in fns}
    for rep in range(repeats):
        for v in variants if rep % 2 == 0 else variants[::-1]:
            set_variant(v)
            for n in STEPS:
                setattr(model, f"_{n}_step", steps[v][n])
            for name in list(fns) if rep % 2 == 0 else list(reversed(fns)):
                c0 = time.process_time()
                for _ in range(iters):
                    fns[name]()
                runs[(v, name)].append(1e3 * (time.process_time() - c0) / iters)
    return {k: statistics.median(t) for k, t in runs.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="a model folder (default: tiny)")
    p.add_argument("--fp32-decode", default="head", choices=["head", "all", "off"])
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument(
        "--variants",
        default="now",
        help=f"comma-separated, alternated in one process: {', '.join(VARIANTS)} (VARIANTS)",
    )
    args = p.parse_args(argv)
    text_mod.CPU_FP32_DECODE = False if args.fp32_decode == "off" else args.fp32_decode
    model, _ = load(args.model or Path(qwen35_mlx.__file__).parent / "assets" / "tiny")
    variants = tuple(args.variants.split(","))
    ms = probe(model, args.context, args.iters, args.repeats, variants)
    print(f"{mx.default_device()}, CPU_FP32_DECODE {args.fp32_decode}: CPU ms per call")
    for v in variants:
        S = ms[(v, "S")]
        print(f"{v}: " + ", ".join(f"{n} {ms[(v, n)]:.3f} ms ({ms[(v, n)] / S:.3f} S)"
                                   for vv, n in ms if vv == v))  # fmt: skip
    return ms


if __name__ == "__main__":
    main()
