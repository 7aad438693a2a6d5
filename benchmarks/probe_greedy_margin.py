"""How well greedy decoding is conditioned on a benchmark's random weights (issue 13, session 18).

A speculative round's verify pass sums in another order than one-token steps do, so its logits
differ from theirs by rounding; greedy MTP equals plain decoding only where the top logit wins
by more than that. Per shape (random bf16 weights as `bench_mtp.py` builds them, a 512-token
random prompt): the logits of a verify pass of 4 tokens against 4 one-token steps (max
|difference|, the steps' std, correlation, whether the argmax agrees, the steps' top-2 gap), and
where plain greedy decoding parts from itself when only the order of the same arithmetic changes:
the prompt split as an MTP run starts (511 prefilled, then a step), and `layers.PACKED_COLUMNS`
off. On the H200 (2026-12-03) the untied 9B shape had logits of std 1.0 with top-2 gaps
0.0-0.4 against differences up to 0.24, and plain decoding parted from itself at token 4: the
reason `bench_mtp.py` ties the lm_head by default.

    python benchmarks/probe_greedy_margin.py --shapes 9b 0.8b [--untied]   # GPU
    python benchmarks/probe_greedy_margin.py --shapes tiny                 # CPU smoke run
"""

from __future__ import annotations

import argparse
import time

import bench_mtp  # noqa: F401  (first: it puts the package and the repo root on the path)
import mlx.core as mx
import numpy as np
from bench_mtp import SHAPES, _prefill, build, first_difference, plain_decode, recompile

from qwen35_mlx.models import layers


def steps(model, cache, first: int, n: int) -> list[np.ndarray]:
    """Logits of n greedy one-token steps from `first`."""
    out, t = [], first
    for _ in range(n):
        out.append(np.array(model(mx.array([[t]]), cache=cache)[0, -1].astype(mx.float32)))
        t = int(np.argmax(out[-1]))
    return out


def probe(name: str, tied: bool, n: int) -> dict:
    t0 = time.perf_counter()
    shape = dict(SHAPES[name], tie_word_embeddings=True) if tied else SHAPES[name]
    model = build(shape, mx.float32 if name == "tiny" else mx.bfloat16)
    V = model.config.vocab_size
    prompt = mx.random.randint(0, V, (1, 512), key=mx.random.key(1))
    cache, logits = _prefill(model, prompt)
    first = int(np.argmax(np.array(logits[0, -1].astype(mx.float32))))
    S = steps(model, cache, first, 4)
    toks = [first] + [int(np.argmax(s)) for s in S[:3]]
    cache, _ = _prefill(model, prompt)
    multi = model(mx.array([toks]), cache=cache, return_hidden=True)[0][0]
    Vr = np.array(multi.astype(mx.float32))
    rows = []
    print(f"== {name} (tied lm_head: {shape['tie_word_embeddings']}; built in "
          f"{time.perf_counter() - t0:.0f} s): a verify pass of 4 against 4 steps")  # fmt: skip
    for i, (s, v) in enumerate(zip(S, Vr, strict=True)):
        top = np.sort(s)[-2:]
        row = dict(max_diff=float(np.abs(v - s).max()), std=float(s.std()),
                   corr=float(np.corrcoef(v, s)[0, 1]), same_argmax=bool(v.argmax() == s.argmax()),
                   top2_gap=float(top[1] - top[0]))  # fmt: skip
        rows.append(row)
        print(f"  position {i}: max |V - S| {row['max_diff']:.4f}, std(S) {row['std']:.3f}, "
              f"correlation {row['corr']:.6f}, same argmax {row['same_argmax']}, "
              f"top-2 gap {row['top2_gap']:.4f}")  # fmt: skip
    base = plain_decode(model, prompt, n)[0]
    split = first_difference(base, plain_decode(model, prompt, n, split=True)[0])
    saved = layers.PACKED_COLUMNS
    layers.PACKED_COLUMNS = not saved
    recompile(model)
    packed = first_difference(base, plain_decode(model, prompt, n)[0])
    layers.PACKED_COLUMNS = saved
    recompile(model)
    print(f"  plain greedy parts from itself (None: not in {n} tokens): prompt split at {split}, "
          f"PACKED_COLUMNS {not saved} at {packed}")  # fmt: skip
    return dict(positions=rows, parts_split=split, parts_packed=packed)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["9b", "0.8b"], choices=list(SHAPES))
    p.add_argument("--untied", action="store_true", help="the shapes' own lm_head layout")
    p.add_argument("--tokens", type=int, default=24, help="greedy tokens compared")
    args = p.parse_args(argv)
    out = {}
    for name in args.shapes:
        out[name] = probe(name, tied=not args.untied, n=args.tokens)
        mx.clear_cache()
    return out


if __name__ == "__main__":
    main()
