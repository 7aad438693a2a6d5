"""Speculative decoding with the MTP head (issue 13): what a verify pass costs, and what it pays.

GPU (`--device-run`): Qwen3.5-0.8B and 9B shapes, random bf16 weights of the real shapes with an
MTP head (as bench_model.py builds them), batch 1, a 512-token context, the lm_head tied to the
embedding (the 0.8B's own layout; the 9B's lm_head is its own matrix of the same bytes, so the
costs are the same, `--untied` keeps it). Why tied: with random untied weights the 9B's logits
are nearly flat (std 1.0, the top two 0.0-0.4 apart; the verify pass and the step differ by up
to 0.24 in bf16), so greedy decoding is decided by rounding: plain decoding parted from itself
at its 4th token when only the prompt's split changed, and MTP runs "parted" at their 2nd
(H200, 2026-12-03). Tied random weights give sharp logits (the 0.8B's: std 33, gaps
~100) as trained models have. Each run prints where plain decoding parts from itself. Per shape:
  S, V(T)  one compiled one-token decode step as plain decoding runs it (pipelined; S_sync:
           each call evaluated before the next), and one compiled verify pass of T = 2, 3, 4
           tokens as a speculative round runs it (`model(tokens [1, T], cache,
           return_hidden=True)`, the host's read of the accepted count, the rollback into the
           pass), alternating block by block, median over blocks of the mean per call, after
           warm-up (traces, kernels). Target: V(2) <= 1.15 S at 0.8B. Per `--variants` of the
           verify pass's projections (`layers.ROWS_GEMV`: off = MLX's GEMM, auto = the default,
           all = row-wise everywhere), each with freshly compiled steps.
  R(k)     one whole greedy MTP round at k = 1, 3 (`MTPSpeculator.round`), per call.
  tok/s    greedy decoding of `--gen` tokens without MTP (mlx-lm's pipelined loop: the next
           step queued before the current token is read), and with MTP at k = 1, 2, 3 drafts at
           forced acceptance rates (`--rates`; default 0.35, 0.63, 0.73, 0.87: the shipped tiny
           model's head on the README's prompt, its first head, the published Qwen3.5-4B
           figure, its distilled head on other prompts; session 18 ran 0.63 and 0.73 only):
           the MTP head runs as usual (its cost is real), then each draft is replaced
           by the plain run's token with that probability, else by a wrong one. Alternating
           plain and MTP runs, `--repeats` times; the median. The MTP runs' tokens are checked
           against the plain run's (greedy exactness on the device).
Prints a table; writes JSON (`--out`, default benchmarks/results).

    python benchmarks/bench_mtp.py --device-run --shapes 0.8b  # GPU, about 2 minutes
    python benchmarks/bench_mtp.py --device-run --tiny         # CPU: the same code on a tiny shape

CPU (`--cpu-tiny`): the shipped tiny model (trained head) generates from a few chat prompts with
MTP off and with k = 1, 2, 3, alternating, `--repeats` times: tokens/s by wall time and by the
process's CPU time (the machine is shared), and the acceptance rate. `--fp32-decode` sets
`text.CPU_FP32_DECODE` (all: every decode projection from float32 copies, the package's default
and so the default here since session 15; head: only the MTP head's, the default before, under
which plain decoding ran 2.5-3x slower than users get and MTP looked 1.1-1.25x). `--mtp-head`
sets `mtp.NATIVE_HEAD` (native, the package's default since session 17: a greedy round's head as
one native CPU primitive; ops: MLX's ops, the exact head).

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

from qwen35_mlx.models import layers as layers_lib
from qwen35_mlx.models.cache import set_history
from qwen35_mlx.models.config import TextConfig
from qwen35_mlx.models.mtp import use_draft_vocab
from qwen35_mlx.models.text import TextModel
from qwen35_mlx.speculative import MTPSpeculator, Sampling

# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import SHAPE_9B  # noqa: E402
from bench_model import SHAPE_0_8B, _device_name, random_weights  # noqa: E402
from tests.drafts import forced_drafts  # noqa: E402  (bench_model put the repo root on the path)

# A CPU smoke shape (`--tiny`): every code path of the device run, in seconds.
SHAPE_TINY = dict(
    SHAPE_0_8B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
)
SHAPES = {"0.8b": SHAPE_0_8B, "9b": SHAPE_9B, "tiny": SHAPE_TINY}
RATES = (0.35, 0.63, 0.73, 0.87)
KS = (1, 2, 3)
TS = (2, 3, 4)


def build(shape: dict, dtype: mx.Dtype) -> TextModel:
    model = TextModel(TextConfig(**shape, mtp_num_hidden_layers=1))
    model.load_weights(list(random_weights(model, dtype).items()), strict=True)
    mx.eval(model.parameters())
    return model.eval()


def _prefill(model: TextModel, prompt: mx.array, hidden: bool = False):
    cache = model.make_cache()
    set_history(cache, max(TS))
    out = model(prompt, cache=cache, return_hidden=hidden)
    mx.eval(out, [c.state for c in cache])
    return cache, out


def recompile(model: TextModel) -> None:
    """Fresh compiled functions (module settings such as `layers.ROWS_GEMV` are read when a
    step is traced, and each compiled function keeps its traces)."""
    for name in ("decode", "verify", "mtp", "round"):
        impl = getattr(model, f"_{name}_impl")
        setattr(model, f"_{name}_step", mx.compile(impl, inputs=model))


def set_variant(model: TextModel, variant: str) -> None:
    """`layers.ROWS_GEMV` for the verify pass's projections: off (a GEMM from two rows on,
    MLX's cuBLAS), auto (the default: the row-wise gemv where (rows - 1) x bytes <=
    ROWS_GEMV_MAX_BYTES), all (row-wise for every dense projection, the lm_head included)."""
    layers_lib.ROWS_GEMV = {"off": False, "auto": "auto", "all": True}[variant]
    recompile(model)


def draft_vocab_switch(model: TextModel):
    """set(n): the MTP head drafts over the first n token ids (None: the whole vocabulary), its
    subset matrix made once per n (`mtp.use_draft_vocab`; the ids do not matter for timing)."""
    made = {}

    def set_vocab(n: int | None) -> None:
        if n is None or n not in made:
            use_draft_vocab(model, None if n is None else range(n))
            if n is not None:
                made[n] = (model.mtp["_draft_ids"], model.mtp["_draft_rows_t"])
            return
        model.mtp["_draft_ids"], model.mtp["_draft_rows_t"] = made[n]

    return set_vocab


def time_passes(
    model: TextModel, context: int, iters: int, repeats: int, draft_vocab: int | None = None
) -> dict:
    """Per call, ms, alternating block by block, median over blocks:
    S       one-token steps as plain decoding runs them (mlx-lm's pipelined loop: the next step
            queued before the current token is read; the context grows by one a call)
    S_sync  one-token steps each evaluated before the next
    V(T)    a verify pass of T tokens as a speculative round runs it: the call, the host reads
            the accepted count (a sync), the caches are trimmed into the pass (T - 1 rejected),
            then the one kept token is trimmed too, so that every call starts alike (that last
            trim is a pop: no arithmetic).
    R(k)    a whole greedy MTP round (below); R(k) dv with the head over `draft_vocab` tokens."""
    prompt = mx.random.randint(0, model.config.vocab_size, (1, context))
    cache, _ = _prefill(model, prompt[:, :-1])
    y = prompt[:, -1:]

    def step():
        nxt = model(y, cache=cache)[:, -1].argmax(-1)
        mx.async_eval(nxt)
        for i in range(iters):
            cur = nxt
            if i < iters - 1:
                nxt = model(cur[:, None], cache=cache)[:, -1].argmax(-1)
                mx.async_eval(nxt)
            cur.item()

    def step_sync():
        for _ in range(iters):
            mx.eval(model(y, cache=cache))

    def verify(T):
        toks = mx.concatenate([y] * T, axis=1)

        def run():
            for _ in range(iters):
                logits, _ = model(toks, cache=cache, return_hidden=True)
                ok = logits[:, :-1].argmax(-1) == toks[:, 1:]
                int(mx.cumprod(ok.astype(mx.int32), axis=1).sum().item())  # the host's one read
                for c in cache:
                    c.trim(T - 1)
                for c in cache:
                    c.trim(1)

        return run

    set_vocab = draft_vocab_switch(model)

    def mtp_round(k, vocab=None):
        """Whole greedy MTP rounds (`MTPSpeculator.round`: the fused verify + head call, the
        host's read, rollback, the next drafts), as generation runs them; with random weights
        the drafts are mostly rejected, so nearly every round trims into its pass."""
        set_vocab(vocab)
        c2 = model.make_cache()
        spec = MTPSpeculator(model, c2, k, Sampling())
        _, h = model(prompt[:, :-1], cache=c2, return_hidden=True)
        spec.on_prefill(prompt[:, :-1], h)
        mx.eval([c.state for c in c2], spec.mtp_state())
        spec.start(prompt[:, -1:])

        def run():
            set_vocab(vocab)
            for _ in range(iters):
                spec.round()

        return run

    fns = {"S": step, "S_sync": step_sync, **{f"V{T}": verify(T) for T in TS}}
    if model.has_mtp:
        fns.update({f"R{k}": mtp_round(k) for k in (1, 3)})
        if draft_vocab:
            fns.update({f"R{k} dv": mtp_round(k, draft_vocab) for k in (1, 3)})
    for fn in fns.values():  # warm: trace, compile, kernel JIT
        fn()
    runs = {name: [] for name in fns}
    for rep in range(repeats):
        order = list(fns) if rep % 2 == 0 else list(reversed(fns))
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            runs[name].append(1e3 * (time.perf_counter() - t0) / iters)
    if model.has_mtp:
        set_vocab(None)
    return {name: statistics.median(v) for name, v in runs.items()}


def plain_decode(
    model: TextModel, prompt: mx.array, n: int, split: bool = False
) -> tuple[list[int], float]:
    """Greedy tokens (the first from the prompt, then n - 1 more) and the seconds the n - 1 took,
    in mlx-lm's pipelined loop (the next step queued before the current token is read). split:
    the prompt's last token as a one-token step after the rest's prefill, as an MTP run starts
    (the same arithmetic in another order)."""
    if split:
        cache, _ = _prefill(model, prompt[:, :-1])
        logits = model(prompt[:, -1:], cache=cache)
    else:
        cache, logits = _prefill(model, prompt)
    y = logits[:, -1].argmax(-1)
    toks = [y.item()]
    t0 = time.perf_counter()
    nxt = model(y[:, None], cache=cache)[:, -1].argmax(-1)
    mx.async_eval(nxt)
    for i in range(n - 1):
        cur = nxt
        if i < n - 2:
            nxt = model(cur[:, None], cache=cache)[:, -1].argmax(-1)
            mx.async_eval(nxt)
        toks.append(cur.item())
    return toks, time.perf_counter() - t0


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists differ (None: nowhere)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def mtp_decode(model, prompt, n, k, spec_cls) -> tuple[list[int], float, float]:
    """Greedy tokens with MTP (the first from the prompt, then at least n - 1 more), the seconds
    the rounds took, and the acceptance."""
    cache = model.make_cache()
    spec = spec_cls(model, cache, k, Sampling())
    _, h = model(prompt[:, :-1], cache=cache, return_hidden=True)
    spec.on_prefill(prompt[:, :-1], h)
    mx.eval([c.state for c in cache], spec.mtp_state())
    y, _ = spec.start(prompt[:, -1:])
    toks = [y.item()]
    t0 = time.perf_counter()
    while len(toks) < n:
        rows, _ = spec.round()
        toks.extend(rows[0])
    return toks[:n], time.perf_counter() - t0, spec.stats.acceptance


def time_generation(model: TextModel, context: int, n: int, repeats: int, rates=RATES) -> dict:
    prompt = mx.random.randint(0, model.config.vocab_size, (1, context), key=mx.random.key(1))
    want, _ = plain_decode(model, prompt, n)  # warm, and the tokens to force
    # How well greedy decoding is conditioned on these weights: where plain decoding parts from
    # itself when its prompt is split as an MTP run's is (None: never in n tokens). An early
    # index means near-tied logits, where any change of summation order (a verify pass's
    # included) picks another token; "same tokens" below then says nothing about MTP.
    parts = first_difference(want, plain_decode(model, prompt, n, split=True)[0])
    modes = {"plain": None}
    for k in KS:
        for a in rates:
            modes[f"k={k} a={a}"] = (k, forced_drafts(want, a, model.config.vocab_size, seed=k))
    for mode in modes.values():  # warm every trace (T = k + 1, the MTP's T = 1..k + 1)
        if mode is not None:
            mtp_decode(model, prompt, min(n, 16), mode[0], mode[1])
    tps = {m: [] for m in modes}
    out = {m: {} for m in modes}
    for rep in range(repeats):
        order = list(modes) if rep % 2 == 0 else list(reversed(modes))
        for m in order:
            if modes[m] is None:
                toks, sec = plain_decode(model, prompt, n)
            else:
                toks, sec, acc = mtp_decode(model, prompt, n, *modes[m])
                out[m].setdefault("acceptances", []).append(round(acc, 3))
            tps[m].append((len(toks) - 1) / sec)
            out[m]["same_tokens"] = out[m].get("same_tokens", True) and toks == want
    out["plain"]["parts_from_itself_at"] = parts
    for m in modes:
        out[m]["tokens_per_s"] = round(statistics.median(tps[m]), 2)
        out[m]["all"] = [round(x, 2) for x in tps[m]]
        if m != "plain":
            out[m]["acceptance"] = round(statistics.mean(out[m]["acceptances"]), 3)
            ratios = [a / b for a, b in zip(tps[m], tps["plain"], strict=True)]
            out[m]["speedup"] = round(statistics.median(ratios), 3)
    return out


def device_run(args) -> dict:
    dtype = mx.float32 if args.tiny else mx.bfloat16
    shapes = ["tiny"] if args.tiny else args.shapes
    variants = args.variants.split(",")
    rates = [float(x) for x in args.rates.split(",") if x]
    if args.rows_kernel is not None:
        rule = {"off": False, "large": "large", "wide": "wide", "all": True}[args.rows_kernel]
        layers_lib.ROWS_KERNEL = rule
    result = dict(device=_device_name(), mlx=mx.__version__, date=_now(), batch=1,
                  context=args.context, dtype=str(dtype), gen=args.gen,
                  rows_kernel=layers_lib.ROWS_KERNEL, shapes={})  # fmt: skip
    for name in shapes:
        shape = SHAPES[name] if args.untied else dict(SHAPES[name], tie_word_embeddings=True)
        model = build(shape, dtype)
        result["shapes"][name] = {"tied": shape["tie_word_embeddings"]}
        for variant in variants:
            set_variant(model, variant)
            r = {"ms": time_passes(model, args.context, args.iters, args.repeats,
                                   args.draft_vocab)}  # fmt: skip
            S = r["ms"]["S"]
            r["V_over_S"] = {T: round(r["ms"][f"V{T}"] / S, 3) for T in TS}
            r["V_over_S_sync"] = {T: round(r["ms"][f"V{T}"] / r["ms"]["S_sync"], 3) for T in TS}
            if not args.no_generation:
                r["generation"] = time_generation(
                    model, args.context, args.gen, args.repeats, rates
                )
            result["shapes"][name][variant] = r
            print(f"\n{name} ({dtype}, batch 1, context {args.context}), verify projections "
                  f"{variant}, ROWS_KERNEL {layers_lib.ROWS_KERNEL}: one-token step {S:.2f} ms "
                  "as plain decoding runs it, "
                  f"{r['ms']['S_sync']:.2f} ms evaluated one by one")  # fmt: skip
            print("| T | verify ms (a round's way) | / step | / step synced |")
            print("|---|---|---|---|")
            for T in TS:
                print(f"| {T} | {r['ms'][f'V{T}']:.2f} | {r['V_over_S'][T]:.2f}x | "
                      f"{r['V_over_S_sync'][T]:.2f}x |")  # fmt: skip
            for k in (1, 3):
                for R in (f"R{k}", f"R{k} dv"):
                    if R in r["ms"]:
                        print(f"| round k={k}{' draft vocab' if 'dv' in R else ''} | "
                              f"{r['ms'][R]:.2f} | {r['ms'][R] / S:.2f}x | "
                              f"{r['ms'][R] / r['ms']['S_sync']:.2f}x |")  # fmt: skip
            if args.no_generation:
                continue
            parts = r["generation"]["plain"]["parts_from_itself_at"]
            print(f"plain decoding, prompt split as MTP's: parts from itself at token {parts}")
            print("| mode | tok/s | speedup | acceptance | same tokens |")
            print("|---|---|---|---|---|")
            for m, g in r["generation"].items():
                print(f"| {m} | {g['tokens_per_s']:.1f} | {g.get('speedup', 1.0):.2f}x | "
                      f"{g.get('acceptance', '')} | {g['same_tokens']} |")  # fmt: skip
        del model
        mx.clear_cache()
    return result


def cpu_tiny(args) -> dict:
    from qwen35_mlx import load, stream_generate
    from qwen35_mlx.models import mtp as mtp_mod
    from qwen35_mlx.models import text as text_mod

    text_mod.CPU_FP32_DECODE = False if args.fp32_decode == "off" else args.fp32_decode
    mtp_mod.NATIVE_HEAD = args.mtp_head == "native"
    path = args.model or Path(qwen35_mlx.__file__).parent / "assets" / "tiny"
    model, tok = load(path, dtype=args.dtype)
    subset = model.mtp.draft_vocab  # draft_vocab.json's, or None
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )  # fmt: skip
        for q in ("What is a list?", "Explain the with statement.", "Tell me about dict.")
    ]
    ks = [int(k) for k in args.ks.split(",")]
    modes = {"off": dict(mtp=False), **{f"k={k}": dict(mtp=True, mtp_k=k) for k in ks}}
    # draft vocabulary per mode: the folder's, and with --compare-full also the whole one
    vocab = {m: subset for m in modes}
    if args.compare_full and subset is not None:
        for k in ks:
            modes[f"k={k} full"] = dict(mtp=True, mtp_k=k)
            vocab[f"k={k} full"] = None

    def run(m, prompt, n):
        if model.has_mtp:
            use_draft_vocab(model, vocab[m])
        return stream_generate(model, tok, prompt, max_tokens=n, **modes[m])

    for m in modes:  # warm: every trace of every mode
        list(run(m, prompts[0], 16))
    runs = {m: [] for m in modes}
    cpu = {m: [] for m in modes}
    acc = {m: [] for m in modes}
    tokens = {}
    for rep in range(args.repeats):
        order = list(modes) if rep % 2 == 0 else list(reversed(modes))
        for m in order:
            n, t, c, toks = 0, 0.0, 0.0, []
            for p in prompts:
                last = None
                c0 = time.process_time()
                for last in run(m, p, args.gen):
                    toks.append(last.token)
                c += time.process_time() - c0  # (the prompt's share included: a few %)
                n += last.generation_tokens
                t += last.generation_tokens / last.generation_tps
                if last.mtp_acceptance is not None:
                    acc[m].append(last.mtp_acceptance)
            runs[m].append(n / t)
            cpu[m].append(n / c)
            tokens.setdefault(m, toks)
    result = {"device": _device_name(), "date": _now(), "gen": args.gen, "repeats": args.repeats}
    result["dtype"] = args.dtype or "as shipped"
    result["fp32_decode"] = args.fp32_decode
    result["mtp_head"] = args.mtp_head
    result["model"] = str(path)
    result["draft_vocab"] = None if subset is None else len(subset)
    for m in modes:
        result[m] = {
            "tokens_per_s": round(statistics.median(runs[m]), 2),
            "all": [round(x, 1) for x in runs[m]],
            "tokens_per_cpu_s": round(statistics.median(cpu[m]), 2),
            "all_cpu": [round(x, 1) for x in cpu[m]],
            "acceptance": round(statistics.mean(acc[m]), 3) if acc[m] else None,
        }
        if m != "off":
            for key, r in (("speedup", runs), ("speedup_cpu", cpu)):
                ratios = [a / b for a, b in zip(r[m], r["off"], strict=True)]
                result[m][key] = round(statistics.median(ratios), 3)
            result[m]["same_tokens"] = tokens[m] == tokens["off"]
        print(m, json.dumps(result[m]))
    return result


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--device-run", action="store_true", help="GPU: 0.8B and 9B shapes")
    g.add_argument("--cpu-tiny", action="store_true", help="CPU: the shipped tiny model")
    p.add_argument("--tiny", action="store_true", help="--device-run on a tiny fp32 shape")
    p.add_argument("--dtype", default=None, help="--cpu-tiny: load the weights in this dtype")
    p.add_argument("--model", type=Path, default=None, help="--cpu-tiny: another model folder")
    p.add_argument("--ks", default="1,2,3", help="--cpu-tiny: drafts per round to run")
    p.add_argument(
        "--fp32-decode",
        default="all",
        choices=["head", "all", "off"],
        help="--cpu-tiny: text.CPU_FP32_DECODE (float32 copies of half-precision decode weights)",
    )
    p.add_argument(
        "--mtp-head",
        default="native",
        choices=["native", "ops"],
        help="--cpu-tiny: models.mtp.NATIVE_HEAD (a greedy round's head as one native primitive "
        "where the CPU extension is built; ops: MLX's, the exact head)",
    )
    p.add_argument(
        "--compare-full",
        action="store_true",
        help="--cpu-tiny: also each k with the whole vocabulary (when the model has a subset)",
    )
    p.add_argument("--shapes", nargs="+", default=["0.8b", "9b"], choices=list(SHAPES))
    p.add_argument("--context", type=int, default=512, help="prompt tokens (--device-run)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gen", type=int, default=128, help="tokens per run (per prompt: --cpu-tiny)")
    p.add_argument(
        "--variants",
        default="off,auto",
        help="--device-run: verify projections off,auto,all (layers.ROWS_GEMV; see set_variant)",
    )
    p.add_argument(
        "--rows-kernel",
        default=None,
        choices=["off", "large", "wide", "all"],
        help="--device-run: layers.ROWS_KERNEL (default: the package's); comma lists not taken",
    )
    p.add_argument(
        "--untied",
        action="store_true",
        help="--device-run: the 9B shape's own untied lm_head (random logits too flat for "
        "greedy to be decided by anything but rounding: see the module's docstring)",
    )
    p.add_argument(
        "--rates",
        default=",".join(map(str, RATES)),
        help="--device-run: forced acceptance rates for tokens/s with MTP",
    )
    p.add_argument("--no-generation", action="store_true", help="--device-run: timings only")
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        help="--device-run: also time rounds with the MTP head over this many tokens",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    result = device_run(args) if args.device_run else cpu_tiny(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M")
    kind = ("tiny" if args.tiny else "gpu") if args.device_run else "cpu_tiny"
    name = f"bench_mtp_{kind}_{stamp}.json"
    (args.out / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
