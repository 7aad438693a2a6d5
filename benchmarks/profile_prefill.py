"""Where one prefill step's time goes (issue 9): our model, split by part, plus the whole step.

A step of T tokens over a cache already holding H (`--cases T@H,...`; default 2048@0, 2048@6144,
8192@0 on a GPU: the first and last step of an 8192-token prompt in steps of 2048, and the whole
prompt in one forward). Each part runs alone from evaluated inputs, `mx.synchronize()` before
and after, on one linear-attention layer and one full-attention layer of the model (the code the
layers run: `layers._conv_qkv`, `gated_delta_update`, ...), min of `--repeats`; the table
multiplies each by how many layers run it and compares the sum with the whole step
(`generation.prefill`'s call: the model, then the caches evaluated) and with the whole layers
timed alone. Parts alone pay one host round trip each (a few to tens of microseconds on a GPU),
which the whole step overlaps: sum above whole means launches and syncs, sum below whole means
time the step spends between parts (host work the GPU waits for, the layers' one-ahead queue).

`--prompt N` also times `generation.prefill` of an N-token prompt in each step size of `--steps`
under each of `VARIANTS` (alternated): the buffer cache cleared once at the end (the default)
or after every step (before session 10; `generation.PREFILL_CLEAR_CACHE`: on CUDA a cleared
cache makes every step allocate its buffers again), and the layers queued 1, 2 or 4 ahead
(`text.QUEUE_AHEAD`). All give the same results (tests/test_generation.py); the peak above the
start is printed too.

    # GPU (0.8B shape, bf16, about a minute):
    PYTHONPATH=src python benchmarks/profile_prefill.py --prompt 8192 --out "$OUT"
    # CPU (a small model, float32):
    PYTHONPATH=src python benchmarks/profile_prefill.py --cpu --small
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx

import qwen35_mlx.generation as generation
from qwen35_mlx.kernels.gated_delta import gated_delta_update
from qwen35_mlx.models import layers as L
from qwen35_mlx.models.attention import attention
from qwen35_mlx.models import text
from qwen35_mlx.models.cache import reserve_kv
from mlx_lm.models.base import create_attention_mask

# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import build_models  # noqa: E402
from bench_model import _device_name  # noqa: E402
from bench_prefill import SHAPES  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def timed(fn, repeats: int) -> float:
    """Seconds of fn() evaluated, synchronized before and after: min of `repeats` (one warm-up)."""
    mx.eval(fn())
    mx.synchronize()
    best = float("inf")
    for _ in range(repeats):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def fresh_cache(model, ids: list[int], H: int, T: int) -> list:
    """A cache holding the first H tokens (prefilled in steps of 2048) with room for T more."""
    cache = model.make_cache()
    if H:
        generation.prefill(model, cache, ids[:H], prefill_step_size=2048)
        reserve_kv(cache, T)
        mx.eval([c.state for c in cache])
    return cache


def part_times(model, cache: list, x: mx.array, ids: mx.array, repeats: int) -> dict:
    """{part: (seconds, layers that run it)} for one step over `cache` (not changed)."""
    bb = model.model
    layers = bb.layers
    lin_i = next(i for i, lay in enumerate(layers) if lay.is_linear)
    fa_i = next(i for i, lay in enumerate(layers) if not lay.is_linear)
    n_lin = sum(lay.is_linear for lay in layers)
    n_fa = len(layers) - n_lin
    B, T, _ = x.shape
    out: dict = {}

    def add(name, fn, count):
        try:
            out[name] = (timed(fn, repeats), count)
        except Exception as e:  # one part failing on a device is reported, not fatal
            print(f"  {name}: failed: {type(e).__name__}: {e}", flush=True)
            out[name] = (float("nan"), count)

    add("embedding", lambda: bb.embed_tokens(ids), 1)
    lay = layers[lin_i]
    add("norms (RMSNorm, 2 a layer + final)", lambda: lay.input_layernorm(x), 2 * len(layers) + 1)
    h = lay.input_layernorm(x)
    mx.eval(h)

    # Linear-attention layer: the steps of GatedDeltaNet.__call__, each alone.
    la = lay.linear_attn
    Hk, Hv, Dk, Dv = la.num_k_heads, la.num_v_heads, la.head_k_dim, la.head_v_dim
    add(
        "lin: in-projections (qkv, z, b, a)",
        lambda: [la.in_proj_qkv(h), la.in_proj_z(h), la.in_proj_b(h), la.in_proj_a(h)],
        n_lin,
    )
    qkv, z = la.in_proj_qkv(h), la.in_proj_z(h).reshape(B, T, Hv, Dv)
    b, a = la.in_proj_b(h), la.in_proj_a(h)
    conv_state, state = cache[lin_i][0], cache[lin_i][1]
    if conv_state is None:
        conv_state = mx.zeros((B, la.conv_kernel_size - 1, la.conv_dim), dtype=qkv.dtype)
    mx.eval(qkv, z, b, a, conv_state)
    w = la.conv1d.weight[:, :, 0]

    def conv_in_fn():
        return mx.concatenate([conv_state.astype(qkv.dtype), qkv], axis=1)

    add("lin: conv input (state | qkv) + new conv state", conv_in_fn, n_lin)
    conv_in = conv_in_fn()
    mx.eval(conv_in)
    add(
        "lin: conv + silu + split + l2norm (_conv_qkv)",
        lambda: L._conv_qkv(conv_in, w, T, Hk, Dk, Hv, Dv),
        n_lin,
    )
    add("lin:   of which conv taps + silu", lambda: L._conv_silu(conv_in, w, T), None)
    hs = L._conv_silu(conv_in, w, T)
    mx.eval(hs)
    add("lin:   of which split + l2norm", lambda: L._split_qkv(hs, Hk, Dk, Hv, Dv), None)

    def split_ops():  # `_split_qkv` before session 10: the l2 norms op by op
        hq, hk, hv = mx.split(hs, [Hk * Dk, 2 * Hk * Dk], axis=-1)
        qq = L._l2norm(hq.reshape(B, T, Hk, Dk)) * (Dk**-0.5)
        return qq, L._l2norm(hk.reshape(B, T, Hk, Dk)), hv.reshape(B, T, Hv, Dv)

    add("lin:   (split + l2norm as ops, before)", split_ops, None)
    q, k, v = L._split_qkv(hs, Hk, Dk, Hv, Dv)
    mx.eval(q, k, v)
    add(
        "lin: gated-delta kernel (gated_delta_update)",
        lambda: gated_delta_update(q, k, v, a, b, la.A_log, la.dt_bias, state, None),
        n_lin,
    )
    y, _ = gated_delta_update(q, k, v, a, b, la.A_log, la.dt_bias, state, None)
    mx.eval(y)
    add("lin: gated norm", lambda: la.norm(y, z), n_lin)
    yn = la.norm(y, z).reshape(B, T, la.value_dim)
    mx.eval(yn)
    add("lin: out-projection (+ residual)", lambda: L.linear_add(la.out_proj, yn, x), n_lin)

    # Full-attention layer: projections, the rest of Attention.__call__, o_proj.
    fl = layers[fa_i]
    at, c = fl.self_attn, cache[fa_i]
    mask = create_attention_mask(h, c)
    D = at.head_dim
    add(
        "attn: q/k/v projections",
        lambda: [at.q_proj(h), at.k_proj(h), at.v_proj(h)],
        n_fa,
    )
    qg, kp, vp = at.q_proj(h), at.k_proj(h), at.v_proj(h)
    mx.eval(qg, kp, vp)
    offset = c.offset if c is not None else 0

    def core():
        # Attention.__call__ between its projections (output gate on, as in Qwen3.5).
        q4 = qg.reshape(B, T, at.num_heads, 2 * D)
        qq, gate = q4[..., :D], q4[..., D:].reshape(B, T, at.num_heads * D)
        qq = at.q_norm(qq).transpose(0, 2, 1, 3)
        kk = at.k_norm(kp.reshape(B, T, at.num_kv_heads, D)).transpose(0, 2, 1, 3)
        vv = vp.reshape(B, T, at.num_kv_heads, D).transpose(0, 2, 1, 3)
        qq, kk = at._rotate(qq, kk, c, None)
        if c is not None:
            kk, vv = c.update_and_fetch(kk, vv)
            c.offset = offset  # the cache unchanged for the next call
        o = attention(qq, kk, vv, c, at.scale, mask)
        o = o.transpose(0, 2, 1, 3).reshape(B, T, at.num_heads * D)
        return L._sigmoid_gate(o, gate)

    add("attn: norms, rope, cache write, attention, gate", core, n_fa)
    o = core()
    mx.eval(o)
    add("attn: o-projection (+ residual)", lambda: L.linear_add(at.o_proj, o, x), n_fa)

    # MLP (every layer; the last layer's output is never evaluated in a prefill step).
    mlp = lay.mlp
    add("mlp: gate + up projections", lambda: [mlp.gate_proj(h), mlp.up_proj(h)], len(layers))
    gp, up = mlp.gate_proj(h), mlp.up_proj(h)
    mx.eval(gp, up)
    add("mlp: swiglu", lambda: L._swiglu(gp, up), len(layers))
    hh = L._swiglu(gp, up)
    mx.eval(hh)
    add(
        "mlp: down-projection (+ residual)", lambda: L.linear_add(mlp.down_proj, hh, x), len(layers)
    )

    # Whole layers alone (the cache restored after each call).
    def whole(i):
        def fn():
            cc = cache[i]
            if layers[i].is_linear:
                saved = (cc[0], cc[1])
                lmask = None
            else:
                saved = cc.offset if cc is not None else None
                lmask = mask
            res = layers[i].chain(x, None, lmask, cc)
            if layers[i].is_linear:
                cc[0], cc[1] = saved
            elif cc is not None:
                cc.offset = saved
            return [r for r in res if r is not None]

        return fn

    add("whole linear layer", whole(lin_i), n_lin)
    add("whole full-attention layer", whole(fa_i), n_fa)
    return out


def whole_step(model, all_ids: list[int], H: int, T: int, repeats: int) -> float:
    """`generation.prefill`'s step: model(ids, cache), the caches evaluated (fresh each time)."""
    best = float("inf")
    for r in range(repeats + 1):
        cache = fresh_cache(model, all_ids, H, T)
        ids = mx.array(all_ids[H : H + T])[None]
        mx.synchronize()
        t0 = time.perf_counter()
        model(ids, cache=cache)
        mx.eval([c.state for c in cache])
        mx.synchronize()
        if r:  # the first is a warm-up
            best = min(best, time.perf_counter() - t0)
    return best


# --prompt's variants: (generation.PREFILL_CLEAR_CACHE, text.QUEUE_AHEAD); the first is the default.
VARIANTS = {
    "cache cleared at the end, 1 layer ahead (default)": ("end", 1),
    "cache cleared every step, 1 layer ahead (before)": ("step", 1),
    "cache cleared at the end, 2 layers ahead": ("end", 2),
    "cache cleared at the end, 4 layers ahead": ("end", 4),
}


def prompt_ab(model, all_ids: list[int], n: int, steps: list[int], repeats: int) -> dict:
    """A whole `generation.prefill` of n tokens in each step size of `steps` under each of
    `VARIANTS`, alternated, min of `repeats` (one warm-up round): {step: {variant: (seconds,
    peak GiB above the start)}}."""
    saved = (generation.PREFILL_CLEAR_CACHE, text.QUEUE_AHEAD)
    res: dict = {step: {v: [] for v in VARIANTS} for step in steps}
    try:
        for r in range(repeats + 1):
            for step in steps:
                for name, (clear, ahead) in VARIANTS.items():
                    generation.PREFILL_CLEAR_CACHE, text.QUEUE_AHEAD = clear, ahead
                    cache = model.make_cache()
                    mx.clear_cache()
                    mx.synchronize()
                    base = mx.get_active_memory()
                    mx.reset_peak_memory()
                    t0 = time.perf_counter()
                    generation.prefill(model, cache, all_ids[:n], prefill_step_size=step)
                    mx.synchronize()
                    dt = time.perf_counter() - t0
                    if r:
                        res[step][name].append((dt, (mx.get_peak_memory() - base) / (1 << 30)))
                    del cache
    finally:
        generation.PREFILL_CLEAR_CACHE, text.QUEUE_AHEAD = saved
    return {
        st: {k: (min(v)[0], max(p for _, p in v)) for k, v in d.items()} for st, d in res.items()
    }


def report(case: str, parts: dict, step_s: float, log) -> dict:
    log(f"\n{case}: ms (alone) x layers = ms in the step")
    total = 0.0
    rows = {}
    for name, (s, count) in parts.items():
        if name.startswith("whole"):
            continue
        if count is None:
            log(f"  {name:<48} {1e3 * s:8.3f}")
            continue
        total += s * count
        rows[name] = {"ms": 1e3 * s, "count": count, "ms_total": 1e3 * s * count}
        log(f"  {name:<48} {1e3 * s:8.3f} x {count:>2} = {1e3 * s * count:8.2f}")
    layers_s = sum(s * n for k, (s, n) in parts.items() if k.startswith("whole"))
    layers_s += parts["embedding"][0] + parts["norms (RMSNorm, 2 a layer + final)"][0]
    for k in ("whole linear layer", "whole full-attention layer"):
        s, n = parts[k]
        log(f"  {k:<48} {1e3 * s:8.3f} x {n:>2} = {1e3 * s * n:8.2f}")
    log(f"  {'sum of the parts':<48} {'':>8}        {1e3 * total:8.2f}")
    label = "sum of whole layers (+ embedding, final norm)"
    log(f"  {label:<48} {'':>8}        {1e3 * layers_s:8.2f}")
    log(f"  {'whole step (model + caches evaluated)':<48} {'':>8}        {1e3 * step_s:8.2f}")
    return {
        "parts": rows,
        "sub_parts_ms": {k: 1e3 * s for k, (s, n) in parts.items() if n is None},
        "whole_layers_ms": {k: 1e3 * parts[k][0] for k in parts if k.startswith("whole")},
        "sum_parts_ms": 1e3 * total,
        "sum_layers_ms": 1e3 * layers_s,
        "step_ms": 1e3 * step_s,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="One prefill step of our model, split by part")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--small", action="store_true", help="bench_prefill's small model")
    p.add_argument("--shape", default=None, help="0.8b (default), 9b or small")
    p.add_argument("--cases", default=None, help="T@H list: T tokens over H in the cache")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--prompt", type=int, default=0, help="also A/B a whole prefill of N tokens")
    p.add_argument("--steps", default="2048,4096,8192", help="--prompt's step sizes")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.cpu:
        mx.set_default_device(mx.cpu)
    small = args.small or args.shape == "small"
    shape_name = "small" if small else (args.shape or "0.8b")
    cases = args.cases or ("256@0,256@256,512@0" if small else "2048@0,2048@6144,8192@0")
    cases = [tuple(int(x) for x in c.split("@")) for c in cases.split(",")]
    repeats = args.repeats or (3 if small else 5)
    dtype = mx.float32 if small and mx.default_device() == mx.cpu else mx.bfloat16
    shape = SHAPES[shape_name]
    model = build_models(shape, dtype, which=("qwen35_mlx",))["qwen35_mlx"]
    n_ids = max(max(T + H for T, H in cases), args.prompt)
    all_ids = mx.random.randint(0, shape["vocab_size"], (n_ids,)).tolist()
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    log(f"{_device_name()}, mlx {mx.__version__}, shape {shape_name}, {dtype}")
    result = {
        "benchmark": "profile_prefill",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": _device_name(),
        "mlx": mx.__version__,
        "shape": shape_name,
        "dtype": str(dtype),
        "repeats": repeats,
        "cases": {},
    }
    for T, H in cases:
        try:
            step_s = whole_step(model, all_ids, H, T, repeats)
            cache = fresh_cache(model, all_ids, H, T)
            ids = mx.array(all_ids[H : H + T])[None]
            x = model.model.embed_tokens(ids)
            mx.eval(x)
            parts = part_times(model, cache, x, ids, repeats)
            rep = report(f"step of {T} tokens over {H}", parts, step_s, log)
        except Exception as e:  # reported; the other cases and the A/B still run
            log(f"step of {T} tokens over {H}: failed: {type(e).__name__}: {e}")
            rep = {"error": f"{type(e).__name__}: {e}"}
        result["cases"][f"{T}@{H}"] = rep
    if args.prompt:
        steps = [int(x) for x in args.steps.split(",") if x]
        ab = prompt_ab(model, all_ids, args.prompt, steps, max(2, repeats // 2))
        log(f"\nprefill of {args.prompt} tokens (generation.prefill), min of the repeats:")
        for step, d in ab.items():
            for k, (s, peak) in d.items():
                log(
                    f"  steps of {step:>5}, {k:<54} {1e3 * s:8.2f} ms ({args.prompt / s:7.0f} "
                    f"tok/s), peak {peak:.3f} GiB"
                )
        result["prompt_ab"] = {"tokens": args.prompt, "seconds_peak_gib": ab}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if mx.default_device() == mx.cpu else "gpu"
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    stem = args.out / f"profile_prefill_{tag}_{stamp}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".log").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json")
    return result


if __name__ == "__main__":
    main()
