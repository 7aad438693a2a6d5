"""Where a verify pass's time goes, next to a one-token step's (issue 13: the fixed cost a
verify call paid on the H200 at batch 1, ~3 ms over a step at any T).

Per call, S and V(T) interleaved call by call (`probe`: one of each a round, the order rotating),
medians over rounds:
    build   the Python call that builds the graph: for S `model(y, cache)` (the compiled step's
            replay and the cache bookkeeping around it), for V(T) `model(tokens [1, T], cache,
            return_hidden=True)` (the same for the verify step, `_adopt_verify` included)
    eval    mx.eval of its outputs (on the CPU: the arithmetic; on a GPU: MLX's host work to
            encode and launch, then the wait)
    after   the bookkeeping after it: nothing for S; for V(T) the rollback a round rejecting
            every draft does (every cache trimmed into the call by T - 1; the kept token stays,
            so V(T) advances the context by one, as S does. Before session 16 the probe also
            popped the kept token inside this figure: about twice the rollback)
    pass    build + eval: the verify pass (V(T)'s figure against S; the rollback stands beside it)
and V(T) / S as the median of per-round ratios (pass, and pass + rollback), which cancels a
drift of the machine between rounds. Times are the process's CPU time (all threads: MLX's CPU
stream runs on its own) and wall time.
Also: how many times each compiled function traced during the timed calls (must be 0: a
retrace per call would be a fixed cost), and with `--matmul` the matmul microbenchmark behind
the fix (one [T, K] x [K, N] product as MLX runs it for T = 1 (gemv) and T > 1 (a GEMM:
cuBLAS on CUDA), and in `layers.project`'s row-wise form).

    python benchmarks/probe_verify.py --model tiny         # the shipped tiny model (CPU)
    python benchmarks/probe_verify.py --model pattern      # 0.8B's layer pattern, hidden 256
    python benchmarks/probe_verify.py --model 0.8b         # the real 0.8B shape (GPU)
    python benchmarks/probe_verify.py --model 9b           # the 9B shape (GPU, ~18 GB)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx

from qwen35_mlx.kernels import rows_matmul as rows_kernel
from qwen35_mlx.models import cache as cache_lib
from qwen35_mlx.models import layers as layers_lib
from qwen35_mlx.models.cache import set_history
from qwen35_mlx.models.config import TextConfig
from qwen35_mlx.models.text import TextModel

# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import SHAPE_9B  # noqa: E402
from bench_model import SHAPE_0_8B, random_weights  # noqa: E402

# The 0.8B layer pattern (24 layers, 18 linear + 6 attention, heads as 0.8B's ratios) at small
# widths: every primitive of the real step, little arithmetic.
SHAPE_PATTERN = dict(
    SHAPE_0_8B,
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=4,
    linear_num_value_heads=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
)


def build_config(name: str) -> TextConfig:
    return TextConfig(**{"pattern": SHAPE_PATTERN, "0.8b": SHAPE_0_8B, "9b": SHAPE_9B}[name])


def build(name: str, dtype: str | None) -> TextModel:
    if name == "tiny":
        from qwen35_mlx import load

        model, _ = load(Path(qwen35_mlx.__file__).parent / "assets" / "tiny", dtype=dtype)
        return model
    shape = {"pattern": SHAPE_PATTERN, "0.8b": SHAPE_0_8B, "9b": SHAPE_9B}[name]
    model = TextModel(TextConfig(**shape, mtp_num_hidden_layers=1))
    default = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    dt = getattr(mx, dtype) if dtype else default
    model.load_weights(list(random_weights(model, dt).items()), strict=True)
    mx.eval(model.parameters())
    return model.eval()


class TraceCounter:
    """Counts traces of the compiled functions: the backbone's `decode` / `verify` and the MTP
    body run only while mx.compile traces."""

    def __init__(self, model: TextModel):
        self.n = {"decode": 0, "verify": 0, "mtp": 0}
        for obj, attr, key in (
            (model.model, "decode", "decode"),
            (model.model, "verify", "verify"),
            (model, "_mtp_body", "mtp"),
        ):
            fn = getattr(obj, attr)

            def wrapped(*a, _fn=fn, _key=key, **kw):
                self.n[_key] += 1
                return _fn(*a, **kw)

            object.__setattr__(obj, attr, wrapped) if attr == "_mtp_body" else setattr(
                obj, attr, wrapped
            )


def _clock():
    return time.process_time(), time.perf_counter()


def _since(t0):
    c, w = _clock()
    return 1e3 * (c - t0[0]), 1e3 * (w - t0[1])


_GPU_LAYOUT = False


def gpu_layout() -> None:
    """On the CPU, the verify pass in the GPU's form where the CPU allows it: fused decode
    projections in their transposed layout, row-wise products (`ROWS_GEMV` True) and the packed
    decode's per-token states in the kernel's form ([(T-1) B, ...] rows or stacked, as
    `layers.TOKEN_STATES_AS_ROWS` asks), so that the Python around a verify pass (build, the
    rollback) is the GPU's. The arithmetic stays the CPU's ops."""
    global _GPU_LAYOUT
    _GPU_LAYOUT = True
    layers_lib.CPU_TRANSPOSED_WEIGHTS = False
    layers_lib.ROWS_GEMV = True
    real = layers_lib.gated_delta_decode_packed

    def kernel_form(*args, **kw):
        y, s, c, per = real(*args, **kw)
        if per is not None:
            join = mx.stack if kw.get("stacked") else mx.concatenate
            per = (join([p[1] for p in per[:-1]]), join([p[0] for p in per[:-1]]))
        return y, s, c, per

    layers_lib.gated_delta_decode_packed = kernel_form


_STAND_INS = None


def stand_ins(vocab: int) -> None:
    """On the CPU, the GPU's graph itself (`gpu_layout`, then `count_decode_ops.GpuStandIns`
    for CUDA: each primitive the GPU runs as one, one stand-in primitive; the row-wise rule of
    CUDA's ROWS_GEMV "auto"), so that `build` (the compiled call's replay of the GPU's tape,
    its inputs and outputs, the Python around it) is the GPU host's work at this host's speed.
    Eval is then meaningless (stand-ins compute nothing of the model)."""
    global _STAND_INS
    from count_decode_ops import GpuStandIns

    gpu_layout()
    _STAND_INS = GpuStandIns("cuda", vocab=vocab)
    _STAND_INS.__enter__()


PARTS = ("build", "eval", "after")


def probe(model: TextModel, context: int, Ts: list[int], iters: int, repeats: int) -> dict:
    """S and V(T) for each T in `Ts`, interleaved call by call: `iters` x `repeats` rounds, each
    round one S and one call of each V(T), the order rotating from round to round (with one
    V(T): S first, then V(T) first, ...). Per call the parts (build, eval, after: module
    docstring), CPU time and wall, medians over the rounds; `pass` = build + eval (the verify
    pass itself), its median over rounds. `ratio`: per V(T), the median over rounds of V(T)'s
    pass / that round's S (wall and CPU), and of (pass + rollback) / S, so that a drift of the
    machine between rounds (S moved 2.64 -> 3.46 ms between variants of one H200 process)
    cancels."""
    vocab = model.config.vocab_size
    prompt = mx.random.randint(0, vocab, (1, context), key=mx.random.key(0))
    cache = model.make_cache()
    set_history(cache, max(Ts))
    mx.eval(model(prompt[:, :-1], cache=cache), [c.state for c in cache])
    y = prompt[:, -1:]

    def step():
        t0 = _clock()
        out = model(y, cache=cache)
        b = _since(t0)
        t0 = _clock()
        mx.eval(out)
        return b, _since(t0), (0.0, 0.0)

    def verify(T):
        toks = mx.concatenate([y] * T, axis=1)
        mx.eval(toks)

        def run():
            t0 = _clock()
            out = model(toks, cache=cache, return_hidden=True)
            b = _since(t0)
            t0 = _clock()
            if _GPU_LAYOUT:  # the kernel's per-token states are siblings of its y on a GPU
                recs = [rec for c in cache for _, rec in getattr(c, "_calls", [])]
                out = [out, [(r.states, r.final) for r in recs if getattr(r, "final", None)]]
            mx.eval(out)
            e = _since(t0)
            t0 = _clock()
            for c in cache:  # a round rejecting every draft: the first token kept
                c.trim(T - 1)
            return b, e, _since(t0)

        return run

    fns = {"S": step, **{f"V{T}": verify(T) for T in Ts}}
    for _ in range(3):
        for fn in fns.values():
            fn()
    counter = TraceCounter(model)
    names = list(fns)
    rounds = []  # per round: {name: (build, eval, after)}, each (cpu ms, wall ms)
    for r in range(iters * repeats):
        k = r % len(names)  # each call first, second, ... in turn
        rounds.append({name: fns[name]() for name in names[k:] + names[:k]})
    out = {}
    for name in names:
        parts = {k: [rd[name][i] for rd in rounds] for i, k in enumerate(PARTS)}
        both = zip(parts["build"], parts["eval"], strict=True)
        parts["pass"] = [(b[0] + e[0], b[1] + e[1]) for b, e in both]
        out[name] = {
            k: {
                "cpu_ms": round(statistics.median(x[0] for x in v), 3),
                "wall_ms": round(statistics.median(x[1] for x in v), 3),
            }
            for k, v in parts.items()
        }
    out["ratio"] = {}
    for name in names[1:]:
        per = {"pass_wall": [], "pass_cpu": [], "with_rollback_wall": [], "with_rollback_cpu": []}
        for rd in rounds:
            (sb, se, _), (vb, ve, va) = rd["S"], rd[name]
            for j, unit in ((1, "wall"), (0, "cpu")):
                s_ms = sb[j] + se[j]
                per[f"pass_{unit}"].append((vb[j] + ve[j]) / s_ms)
                per[f"with_rollback_{unit}"].append((vb[j] + ve[j] + va[j]) / s_ms)
        out["ratio"][name] = {k: round(statistics.median(v), 4) for k, v in per.items()}
        q = statistics.quantiles(per["pass_wall"], n=4)
        out["ratio"][name]["pass_wall_quartiles"] = [round(q[0], 4), round(q[2], 4)]
    out["rounds"] = len(rounds)
    out["retraces_while_timed"] = dict(counter.n)
    return out


def matmul_probe(K: int, N: int, Ts: list[int], iters: int, dtype) -> dict:
    """One product [T, K] x [K, N] (a transposed weight, as the step's projections), per call:
    plain `x @ w` (gemv at T = 1, a GEMM above) and `layers.rows_matmul` (the verify step's
    form: the broadcast gemv, the few-rows kernel, its "ahead" variant), each in a compiled
    function of 24 products (a layer stack's worth), synchronised. GB/s: W's bytes a product
    over its wall time (the whole call's, launches included)."""
    W = mx.random.normal((N, K)).astype(dtype) * 0.02
    mx.eval(W)
    w = W.T
    res = {}
    for T in [1, *Ts]:
        x = mx.random.normal((T, K)).astype(dtype)
        forms = {"x @ w": lambda x: x @ w}
        if T > 1 and hasattr(layers_lib, "rows_matmul"):
            forms["rows_matmul"] = lambda x: layers_lib.rows_matmul(x, w)
            if hasattr(layers_lib, "ROWS_KERNEL"):  # the broadcast gemv, then the kernel
                forms = {"x @ w": forms["x @ w"], "rows gemv": forms["rows_matmul"],
                         "rows kernel": forms["rows_matmul"]}  # fmt: skip
                if hasattr(rows_kernel, "AHEAD"):  # its "ahead" variant, U <= 8 and 16
                    forms["rows ahead"] = forms["rows ahead16"] = forms["rows kernel"]
        for label, f in forms.items():
            if hasattr(layers_lib, "ROWS_KERNEL"):  # read when `chain` is traced (below)
                layers_lib.ROWS_KERNEL = label != "rows gemv"
            if hasattr(rows_kernel, "AHEAD"):
                rows_kernel.AHEAD = {"rows ahead": 8, "rows ahead16": 16}.get(label, 0)

            def chain(x, f=f):
                for _ in range(24):
                    y = f(x)
                    if N < K:  # the next product's input: y repeated to K
                        y = mx.tile(y, (1, -(-K // N)))
                    x = y[:, :K] * 0.5
                return x

            fn = mx.compile(chain)
            for _ in range(3):
                mx.eval(fn(x))
            t0 = _clock()
            for _ in range(iters):
                mx.eval(fn(x))
            c, wl = _since(t0)
            wall_us = 1e3 * wl / iters / 24
            res[f"T={T} {label}"] = {"cpu_us": round(1e3 * c / iters / 24, 2),
                                     "wall_us": round(wall_us, 2),
                                     "GB/s": round(W.nbytes / wall_us / 1e3, 1)}  # fmt: skip
    if hasattr(rows_kernel, "AHEAD"):
        rows_kernel.AHEAD = 0
    return res


def gate_probe(iters: int, rounds: int = 5, T: int = 2) -> dict:
    """The combine kernel's gate as a verify pass hands it (0.8B's attention layer: Hq 8, Hkv 2,
    D 256, bf16, 64 keys, T tokens), six kernel pairs a compiled call (a pass's attention
    layers), each gate made outside the call from an evaluated fused q|k|v output [T, N, 1]:
    `view` its q|gate columns as [1, T, Hq, 2D] (a view with a row stride, which MLX copies
    for the kernel: `layers.GATE_IN_PLACE` False), `in place` the whole output read with a head
    stride (True). Synchronised calls, the forms alternated; median over rounds of us a kernel
    pair, CPU time / wall. Their difference is the hidden copy's cost."""
    from qwen35_mlx.kernels.attention import decode_attention

    Hq, Hkv, D, C = 8, 2, 256, 64
    N, dt = Hq * 2 * D + 2 * Hkv * D, mx.bfloat16
    ks = mx.random.split(mx.random.key(3), 4)
    q = mx.random.normal((1, Hq, T, D), key=ks[0]).astype(dt)
    k = mx.random.normal((1, Hkv, C, D), key=ks[1]).astype(dt)
    v = mx.random.normal((1, Hkv, C, D), key=ks[2]).astype(dt)
    ys = [mx.random.normal((T, N, 1), key=kk).astype(dt) for kk in mx.random.split(ks[3], 6)]
    mx.eval(q, k, v, ys)
    forms = {
        "view": ([y[:, : Hq * 2 * D].reshape(1, T, Hq, 2 * D) for y in ys], None),
        "in place": (ys, 2 * D),
    }
    mx.eval([g for g, _ in forms.values()])
    fns = {}
    for label, (_, stride) in forms.items():

        def call(*gates, stride=stride):
            kw = dict(scale=D**-0.5, start=C - T, gate_offset=D, gate_head_stride=stride)
            return [decode_attention(q, k, v, gate=g, **kw) for g in gates]

        fns[label] = mx.compile(call)
    outs = {label: fns[label](*forms[label][0]) for label in forms}
    same = all(mx.array_equal(a, b).item() for a, b in zip(*outs.values(), strict=True))
    times = {label: [] for label in forms}
    for r in range(rounds):
        for label in forms if r % 2 == 0 else reversed(list(forms)):
            gates = forms[label][0]
            for _ in range(3):
                mx.eval(fns[label](*gates))
            t0 = _clock()
            for _ in range(iters):
                mx.eval(fns[label](*gates))
            c, w = _since(t0)
            times[label].append((1e3 * c / iters / 6, 1e3 * w / iters / 6))
    res = {"same_bits": same}
    for label, v_ in times.items():
        res[label] = {"cpu_us": round(statistics.median(x[0] for x in v_), 2),
                      "wall_us": round(statistics.median(x[1] for x in v_), 2)}  # fmt: skip
    print(f"gate probe (T {T}; us a kernel pair, CPU / wall; same bits: {same}): "
          + ", ".join(f"{k_} {x['cpu_us']} / {x['wall_us']}" for k_, x in res.items()
                      if k_ != "same_bits"))  # fmt: skip
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pattern", choices=["tiny", "pattern", "0.8b", "9b"])
    p.add_argument("--dtype", default=None)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--tokens", default="2,3,4", help="verify token counts")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--variants",
        default="auto",
        help="layers.ROWS_GEMV: off,auto,all (with the few-rows kernel, layers.ROWS_KERNEL "
        "True); kernel: auto with the kernel (= auto); kernel-large: auto with the kernel only "
        "in place of cuBLAS (ROWS_KERNEL 'large'); gemv: auto with MLX's batched gemv over "
        "broadcast weights (ROWS_KERNEL False, the form before session 9); auto-views: gemv "
        "with each row-wise product's views made in the step (layers.ROWS_PREBUILT False: the "
        "form before session 8); kernel-ahead, kernel-large-ahead (or -ahead4 etc.): kernel, "
        "kernel-large with the kernel's 'ahead' variant (rows_matmul.AHEAD 8, or the number); "
        "before, after: gemv with the verify-pass switches of sessions 14-15 all off / all on "
        "(layers.TOKEN_STATES_AS_ROWS, layers.VERIFY_HEADS_FIRST, cache.LEAN_TRIM, "
        "layers.GATE_IN_PLACE); after-stacked, after-heads, after-trim, after-gate: all on but "
        "that one; a suffix +all: every "
        "dense projection row-wise (the lm_head too: ROWS_GEMV True), +large: the few-rows "
        "kernel where the gemv form is over the byte limit (the lm_head), +wide: the kernel "
        "where N >= 2K (the in-projections and the lm_head: ROWS_KERNEL 'wide'); and after any "
        "of those +cols: the linear layers' projection to the kernel and y back as columns "
        "(layers.PACKED_COLUMNS True; False otherwise)",
    )
    p.add_argument("--matmul", action="store_true", help="also the matmul microbenchmark")
    p.add_argument(
        "--gate-probe", action="store_true", help="also the attention gate's forms (gate_probe)"
    )
    p.add_argument(
        "--gpu-layout", action="store_true", help="on the CPU: the GPU's verify layout (gpu_layout)"
    )
    p.add_argument(
        "--stand-ins",
        action="store_true",
        help="on the CPU: the GPU's graph through count_decode_ops' stand-ins (stand_ins): "
        "build is the GPU host's, eval meaningless",
    )
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = p.parse_args(argv)
    Ts = [int(t) for t in args.tokens.split(",")]
    if args.stand_ins:
        stand_ins(build_config(args.model).vocab_size)
    elif args.gpu_layout:
        gpu_layout()
    model = build(args.model, args.dtype)
    result = {"model": args.model, "device": str(mx.default_device()), "mlx": mx.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    from bench_mtp import set_variant

    if args.gate_probe:  # first: seconds, and the variants below may meet a time limit
        result["gate_probe"] = gate_probe(args.iters * 5)
    result["calls"] = {}
    for asked in args.variants.split(","):
        # a suffix +cols: the linear layers' projection to the kernel and back as columns
        # (layers.PACKED_COLUMNS), on top of the variant before it
        variant = asked.removesuffix("+cols")
        layers_lib.PACKED_COLUMNS = asked.endswith("+cols")
        lean = variant.split("+")[0].split("-")[0] in ("before", "after")
        if lean:
            # sessions 14-15's verify-pass switches (the gemv form): "before" all off, "after"
            # all on, "after-<switch>" all on but that one (stacked, heads, trim, gate).
            layers_lib.ROWS_PREBUILT, layers_lib.ROWS_KERNEL, rows_kernel.AHEAD = True, False, 0
            # +all: ROWS_GEMV True; +large, +wide: the few-rows kernel (ROWS_KERNEL that rule)
            name, _, extra = variant.partition("+")
            on = name.startswith("after")
            off = name.split("-")[1:] if on else []
            layers_lib.TOKEN_STATES_AS_ROWS = on and "stacked" not in off
            layers_lib.VERIFY_HEADS_FIRST = on and "heads" not in off
            cache_lib.LEAN_TRIM = on and "trim" not in off
            layers_lib.GATE_IN_PLACE = on and "gate" not in off
            set_variant(model, "all" if extra == "all" else "auto")
            layers_lib.ROWS_KERNEL = extra if extra in ("large", "wide") else False
        else:
            layers_lib.TOKEN_STATES_AS_ROWS = layers_lib.VERIFY_HEADS_FIRST = True
            cache_lib.LEAN_TRIM = layers_lib.GATE_IN_PLACE = True
        base, _, ahead = variant.partition("-ahead")
        rows_kernel.AHEAD = int(ahead or 8) if "-ahead" in variant else 0
        if not lean:
            layers_lib.ROWS_PREBUILT = variant != "auto-views"
            kernel = {"gemv": False, "auto-views": False, "kernel-large": "large"}.get(base, True)
            layers_lib.ROWS_KERNEL = kernel
        old_names = ("gemv", "auto-views", "kernel", "kernel-large")
        if not lean:
            set_variant(model, "auto" if base in old_names else variant)
        if _GPU_LAYOUT and _STAND_INS is None:  # (set_variant's "auto": CUDA's rule, off here)
            layers_lib.ROWS_GEMV = True
        key = asked  # a variant asked for again: its own entry ("after #2")
        while key in result["calls"]:
            key = f"{asked} #{int(key.rpartition('#')[2]) + 1 if '#' in key else 2}"
        calls = result["calls"][key] = probe(model, args.context, Ts, args.iters, args.repeats)
        print(f"{args.model} on {result['device']}, verify projections {asked}: ms per call "
              "(CPU time / wall)")  # fmt: skip
        print("| call | build | eval | pass (build + eval) | after (rollback) |")
        print("|---|---|---|---|---|")
        for name, parts in calls.items():
            if name in ("retraces_while_timed", "ratio", "rounds"):
                continue
            cells = [f"{parts[k]['cpu_ms']:.3f} / {parts[k]['wall_ms']:.3f}"
                     for k in ("build", "eval", "pass", "after")]  # fmt: skip
            print(f"| {name} | " + " | ".join(cells) + " |")
        for name, r in calls["ratio"].items():
            print(
                f"{name} / S over {calls['rounds']} rounds (median of per-round ratios): pass "
                f"{r['pass_wall']:.3f}x wall (quartiles {r['pass_wall_quartiles'][0]:.3f}-"
                f"{r['pass_wall_quartiles'][1]:.3f}), {r['pass_cpu']:.3f}x CPU; with the "
                f"rollback {r['with_rollback_wall']:.3f}x wall, "
                f"{r['with_rollback_cpu']:.3f}x CPU"
            )
        print("retraces while timed:", calls["retraces_while_timed"])
    if args.matmul:
        dtype = model.model.embed_tokens.weight.dtype
        H = model.config.hidden_size
        result["matmul"] = {}
        # (K, N): hidden to hidden, to 4 hidden (an MLP's up), the lm_head, 4 hidden to hidden
        for K, N in ((H, H), (H, 4 * H), (H, model.config.vocab_size), (4 * H, H)):
            r = matmul_probe(K, N, Ts, args.iters * 5, dtype)
            result["matmul"][f"K={K} N={N}"] = r
            print(f"matmul K={K} N={N} ({dtype}), us a product (CPU / wall):",
                  ", ".join(f"{k} {v['cpu_us']}/{v['wall_us']} ({v['GB/s']} GB/s)"
                            for k, v in r.items()))  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"probe_verify_{args.model}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print("wrote", path)
    return result


if __name__ == "__main__":
    main()
