"""The linear-attention decode step between the in-projections and the gated norm: today's path
(concatenate, the compiled `_conv_qkv` ops, `gated_delta_update`'s fused kernel, the conv-state
slice) against `gated_delta_decode` (one kernel launch on a GPU; its `ref` ops on the CPU).

A sibling of bench_gated_delta.py rather than a part of it: that script's contenders all take
the same post-conv q, k, v; these take the raw in-projection and the conv state.

Shapes: the 0.8B layer (Hk=16, Hv=16, Dk=Dv=128) and the 9B layer (Hk=16, Hv=32), conv K=4,
bf16 activations, fp32 state; B in {1, 32, 128}. Both contenders are `mx.compile`d whole (as in
the compiled decode step) and fed their own outputs (state and conv state) step after step.

Two timings, each the median over --repeats of (time / --steps), contenders alternating:
  step   one mx.eval per step: host work (graph build, launches) + GPU time, as decode runs
  graph  --steps steps chained in one graph, evaluated once: mostly device time
and the primitive count of one step's graph (mx.export_to_dot).

    python benchmarks/bench_gated_delta_decode.py [--batches 1,32,128] [--steps 50]
        [--repeats 5] [--layouts 16x4,8x4] [--out DIR]

Prints a table; writes JSON (device, versions, date) into --out (default benchmarks/out).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import qwen35_mlx  # noqa: F401  isort: skip  (sets up the BLAS before mlx loads)
import mlx.core as mx  # noqa: E402

from qwen35_mlx.kernels.gated_delta import gated_delta_decode, gated_delta_update  # noqa: E402
from qwen35_mlx.models.layers import _conv_qkv_decode  # noqa: E402

SHAPES = {"0.8B": (16, 16, 128, 128), "9B": (16, 32, 128, 128)}  # Hk, Hv, Dk, Dv
K = 4


def inputs(B, Hk, Hv, Dk, Dv, seed=0):
    C = 2 * Hk * Dk + Hv * Dv
    ks = mx.random.split(mx.random.key(seed), 6)
    bf = mx.bfloat16
    x = {
        "qkv": mx.random.normal((B, C), key=ks[0]).astype(bf),
        "conv_state": mx.random.normal((B, K - 1, C), key=ks[1]).astype(bf),
        "conv_w": (0.5 * mx.random.normal((C, K), key=ks[2])).astype(bf),
        "a": mx.random.normal((B, Hv), key=ks[3]).astype(bf),
        "b": mx.random.normal((B, Hv), key=ks[4]).astype(bf),
        "A_log": mx.log(mx.random.uniform(1.0, 16.0, (Hv,), key=ks[5])),
        "dt_bias": mx.full((Hv,), -3.0),
        "state": mx.zeros((B, Hv, Dv, Dk), mx.float32),
    }
    mx.eval(x)
    return x


def today(Hk, Hv, Dk, Dv):
    """The layer's T = 1 path between the in-projections and the gated norm."""

    def step(qkv, conv_state, conv_w, a, b, A_log, dt_bias, state):
        conv_in = mx.concatenate([conv_state.astype(qkv.dtype), qkv[:, None]], axis=1)
        new_conv = mx.contiguous(conv_in[:, 1:])
        q, k, v = _conv_qkv_decode(conv_in, conv_w, 1, Hk, Dk, Hv, Dv)
        y, state = gated_delta_update(q, k, v, a[:, None], b[:, None], A_log, dt_bias, state)
        return y[:, 0], state, new_conv

    return mx.compile(step)


def fused(Hk, Hv, Dk, Dv):
    def step(qkv, conv_state, conv_w, a, b, A_log, dt_bias, state):
        return gated_delta_decode(
            qkv, conv_state, conv_w, a, b, A_log, dt_bias, state,
            num_k_heads=Hk, head_k_dim=Dk, num_v_heads=Hv, head_v_dim=Dv,
        )  # fmt: skip

    return mx.compile(step)


def fused_layout(Hk, Hv, Dk, Dv, lanes, warps):
    """The GPU kernel at a given layout (lanes per value row, warps per threadgroup)."""
    from qwen35_mlx.kernels.gated_delta import _gpu_backend

    impl = next(_gpu_backend(n) for n in ("metal", "cuda") if _gpu_backend(n).is_available())

    def step(qkv, conv_state, conv_w, a, b, A_log, dt_bias, state):
        return impl.gated_delta_decode_kernel(
            qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, lanes=lanes, warps=warps
        )

    return mx.compile(step)


def with_norm(Hk, Hv, Dk, Dv, B, in_kernel: bool):
    """GPU only: the kernel and the layer's gated norm, inside the kernel (one threadgroup a
    head, launch.norm_layout) or as mx ops after it (the default layout); z and the norm weight
    are fixed random arrays."""
    from qwen35_mlx.kernels.gated_delta import _gpu_backend
    from qwen35_mlx.kernels.gated_delta.decode import gated_rms_norm

    impl = next(_gpu_backend(n) for n in ("metal", "cuda") if _gpu_backend(n).is_available())
    z = mx.random.normal((B, Hv * Dv), key=mx.random.key(1)).astype(mx.bfloat16)
    w = (1 + 0.1 * mx.random.normal((Dv,), key=mx.random.key(2))).astype(mx.bfloat16)
    mx.eval(z, w)

    def step(qkv, conv_state, conv_w, a, b, A_log, dt_bias, state):
        args = (qkv, conv_state, conv_w, a, b, A_log, dt_bias, state)
        if in_kernel:
            return impl.gated_delta_decode_kernel(*args, z=z, norm_w=w, norm_eps=1e-6)
        y, state, conv = impl.gated_delta_decode_kernel(*args)
        return gated_rms_norm(y, z.reshape(y.shape), w, 1e-6), state, conv

    return mx.compile(step)


def _call(fn, x, state, conv):
    return fn(x["qkv"], conv, x["conv_w"], x["a"], x["b"], x["A_log"], x["dt_bias"], state)


def time_step(fn, x, steps):
    state, conv = x["state"], x["conv_state"]
    t0 = time.perf_counter()
    for _ in range(steps):
        y, state, conv = _call(fn, x, state, conv)
        mx.eval(y, state, conv)
    return (time.perf_counter() - t0) / steps


def time_graph(fn, x, steps):
    state, conv, ys = x["state"], x["conv_state"], []
    t0 = time.perf_counter()
    for _ in range(steps):
        y, state, conv = _call(fn, x, state, conv)
        ys.append(y)
    mx.eval(ys, state, conv)
    return (time.perf_counter() - t0) / steps


def primitives(fn, x) -> int:
    """Nodes of one step's graph that are primitives (not inputs)."""
    out = _call(fn, x, x["state"], x["conv_state"])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "g.dot"
        mx.export_to_dot(str(path), *out)
        text = path.read_text()
    mx.eval(out)
    return sum(1 for line in text.splitlines() if "shape=rectangle" in line)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--shapes", default="0.8B,9B")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument(
        "--layouts",
        default="",
        help="GPU only: extra kernel layouts LANESxWARPS, e.g. 16x4,8x4 (default layout: 16x2)",
    )
    p.add_argument(
        "--norm",
        action="store_true",
        help="GPU only: also the kernel + gated norm as ops, and the norm inside the kernel",
    )
    args = p.parse_args(argv)
    rows = []
    for shape in args.shapes.split(","):
        Hk, Hv, Dk, Dv = SHAPES[shape]
        cands = {"today": today(Hk, Hv, Dk, Dv), "fused": fused(Hk, Hv, Dk, Dv)}
        for lay in filter(None, args.layouts.split(",")):
            lanes, warps = map(int, lay.split("x"))
            cands[f"fused {lay}"] = fused_layout(Hk, Hv, Dk, Dv, lanes, warps)
        for B in (int(b) for b in args.batches.split(",")):
            x = inputs(B, Hk, Hv, Dk, Dv)
            if args.norm:
                cands["norm ops"] = with_norm(Hk, Hv, Dk, Dv, B, False)
                cands["norm kernel"] = with_norm(Hk, Hv, Dk, Dv, B, True)
            res = {n: {"step": [], "graph": []} for n in cands}
            for fn in cands.values():  # warm-up: trace, compile kernels
                time_step(fn, x, 2)
                time_graph(fn, x, 2)
            for _ in range(args.repeats):
                for n, fn in cands.items():
                    res[n]["step"].append(time_step(fn, x, args.steps))
                    res[n]["graph"].append(time_graph(fn, x, args.steps))
            row = {"shape": shape, "B": B}
            for n, fn in cands.items():
                row[n] = {m: statistics.median(v) * 1e3 for m, v in res[n].items()}
                row[n]["min_ms"] = {m: min(v) * 1e3 for m, v in res[n].items()}
                row[n]["primitives"] = primitives(fn, x)
            rows.append(row)
            t = row["today"]
            for n in list(cands)[1:]:
                f = row[n]
                print(
                    f"{shape:>4} B={B:<4} {n:>11} step ms: today {t['step']:.3f} ours "
                    f"{f['step']:.3f} ({t['step'] / f['step']:.2f}x) | graph ms: today "
                    f"{t['graph']:.3f} ours {f['graph']:.3f} ({t['graph'] / f['graph']:.2f}x) | "
                    f"primitives {t['primitives']} -> {f['primitives']}",
                    flush=True,
                )
    env = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
        "platform": platform.platform(),
        "mlx": mx.__version__,
        "default_device": str(mx.default_device()),
    }
    try:
        env["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
    except Exception:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
    path = out / f"gated_delta_decode_{device}_{stamp}.json"
    path.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
