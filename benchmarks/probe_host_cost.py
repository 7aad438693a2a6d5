"""What one MLX primitive costs the host, by kind (issue #8), and where a decode step's time goes.

A decode step at batch 1 is host-bound: its time is (number of primitives) x (cost of one), plus
what the Python code around it costs. Two probes:

1. Per kind (`--kinds`): a graph of N primitives of one kind on tiny arrays, built without
   `mx.compile` (so nothing fuses), then `mx.async_eval` timed: that is MLX's host work for the
   graph (encoding every primitive, MLX's CUDA graph building and launching), without the GPU's
   work; the slope over N = 50 .. 400 is the host cost of one primitive. The kinds and the cost
   class of `count_decode_ops.COSTS_US` each measures:
       reshape   view    reshape / reshape back: no kernel
       exp       kernel  one elementwise kernel each (unfused)
       rmsnorm   kernel  mx.fast.rms_norm
       concat    copy    x[:, 1:] and x[:, :1] concatenated: per primitive, the slice (a view)
                         and the concatenate averaged, as before
       astype    copy    a cast (MLX's copy dispatch)
       update    copy    mx.slice_update at an array index (the KV cache write)
       gemv      gemv    [1, 256] @ W.T (a transposed weight, one row: MLX's gemv kernel)
       gemm1     gemm    [1, 256] @ W (not transposed: cuBLAS)
       gemm32    gemm    [32, 256] @ W.T (cuBLAS)
       addmm1    -       mx.addmm(c, [1, 256], W.T): cuBLAS with a bias epilogue on CUDA
       addmm32   -       mx.addmm(c, [32, 256], W.T)
       custom    custom  a one-line elementwise `mx.fast.cuda_kernel` / `metal_kernel` (a GPU
                         only): what one of our kernels costs the host, against "exp"
2. The decode step (`--step`): the 0.8B shape with random weights, ours (compiled step) and
   mlx-lm's model, alternating: per token the Python call that builds the step's graph (for ours
   the compiled function's replay and the cache bookkeeping around it), `mx.async_eval` (MLX's
   host work), and the rest of the token (waiting for the GPU), at batch 1 and 32.

    python benchmarks/probe_host_cost.py            # both; a table; JSON to $OUT or benchmarks/out
    python benchmarks/probe_host_cost.py --kinds    # the per-kind table only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx

# isort: on

KINDS = {
    "reshape": "view",
    "exp": "kernel",
    "rmsnorm": "kernel",
    "concat": "copy",
    "astype": "copy",
    "update": "copy",
    "gemv": "gemv",
    "gemm1": "gemm",
    "gemm32": "gemm",
    "addmm1": None,
    "addmm32": None,
    "custom": "custom",
}


def _custom_kernel():
    """y = x + 1 as a custom kernel of this machine's GPU backend, or None (the CPU)."""
    if mx.default_device() == mx.cpu:
        return None
    body = "if (i < x_shape[0] * x_shape[1]) y[i] = x[i] + static_cast<T>(1);"
    if mx.cuda.is_available():
        src = "unsigned i = blockIdx.x * blockDim.x + threadIdx.x; " + body
        return mx.fast.cuda_kernel(
            name="probe_add_one", input_names=["x"], output_names=["y"], source=src
        )
    src = "uint i = thread_position_in_grid.x; " + body
    return mx.fast.metal_kernel(
        name="probe_add_one", input_names=["x"], output_names=["y"], source=src
    )


CUSTOM = _custom_kernel()


def chain(kind: str, n: int, x: mx.array, w: mx.array, nw: mx.array, buf: mx.array):
    """n primitives of `kind` (about: see the docstring), from x."""
    for i in range(n):
        if kind == "reshape":
            x = x.reshape(-1, 16, 16) if i % 2 == 0 else x.reshape(-1, 256)
        elif kind == "exp":
            x = mx.exp(x)
        elif kind == "rmsnorm":
            x = mx.fast.rms_norm(x, nw, 1e-6)
        elif kind == "concat":
            if i % 2:
                x = mx.concatenate([x[:, 1:], x[:, :1]], axis=1)
        elif kind == "astype":
            x = x.astype(mx.float16 if x.dtype == mx.float32 else mx.float32)
        elif kind == "update":
            buf = mx.slice_update(buf, x[:, None], mx.array(i % 8), axes=(1,))
            x = buf[:, 0]  # a view: the next update depends on this one
        elif kind in ("gemv", "gemm32"):
            x = x @ w.T
        elif kind == "gemm1":
            x = x @ w
        elif kind in ("addmm1", "addmm32"):
            x = mx.addmm(x, x, w.T)
        elif kind == "custom":
            x = CUSTOM(
                inputs=[x],
                template=[("T", x.dtype)],
                grid=(x.size, 1, 1),
                threadgroup=(256, 1, 1),
                output_shapes=[x.shape],
                output_dtypes=[x.dtype],
            )[0]
    return x


def host_time(kind: str, n: int, reps: int) -> float:
    """Median seconds of `mx.async_eval` over a freshly built graph of n primitives."""
    rows = 32 if kind.endswith("32") else 1
    w = mx.random.normal((256, 256)) * 0.01
    nw = mx.ones((256,))
    buf = mx.zeros((rows, 8, 256))
    mx.eval(w, nw, buf)
    ts = []
    for r in range(reps + 2):
        x = mx.random.normal((rows, 256), key=mx.random.key(r))
        mx.eval(x)
        y = chain(kind, n, x, w, nw, buf)
        t0 = time.perf_counter()
        mx.async_eval(y)
        t1 = time.perf_counter()
        mx.eval(y)
        if r >= 2:
            ts.append(t1 - t0)
    return statistics.median(ts)


def probe_kinds(reps: int = 15) -> list[dict]:
    rows = []
    for kind, cls in KINDS.items():
        if kind == "custom" and CUSTOM is None:
            continue
        ts = {n: host_time(kind, n, reps) for n in (50, 400)}
        per = (ts[400] - ts[50]) / 350
        rows.append(
            {
                "kind": kind,
                "class": cls,
                "t50_ms": ts[50] * 1e3,
                "t400_ms": ts[400] * 1e3,
                "us_per_op": per * 1e6,
            }
        )
        print(
            f"{kind:8s} ({cls or '-':6s}) N=50 {ts[50] * 1e3:7.3f} ms  "
            f"N=400 {ts[400] * 1e3:7.3f} ms  -> {per * 1e6:6.2f} us/op",
            flush=True,
        )
    # One figure per cost class: the mean of its kinds.
    for cls in ("view", "kernel", "copy", "gemv", "gemm", "custom"):
        vals = [r["us_per_op"] for r in rows if r["class"] == cls]
        if vals:
            print(f"class {cls:6s} {statistics.mean(vals):6.2f} us/op", flush=True)
    return rows


def probe_step(shape="0.8b", batches=(1, 32), tokens: int = 24, repeats: int = 3) -> list[dict]:
    """Per decode token: Python call (graph build), async_eval (MLX host work), the rest."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_decode import SHAPES, build_models

    models = build_models(SHAPES[shape], mx.bfloat16)
    out = []
    for B in batches:
        prompts = mx.random.randint(0, 1000, (B, 32), key=mx.random.key(B))
        runs = {k: [] for k in models}
        for r in range(repeats):
            for name in list(models) if r % 2 == 0 else list(models)[::-1]:
                model = models[name]
                cache = model.make_cache()
                y = mx.argmax(model(prompts, cache=cache)[:, -1], axis=-1)
                mx.eval(y)
                build, host, total = [], [], []
                for i in range(tokens + 3):
                    t0 = time.perf_counter()
                    logits = model(y[:, None], cache=cache)
                    y = mx.argmax(logits[:, -1], axis=-1)
                    t1 = time.perf_counter()
                    mx.async_eval(y)
                    t2 = time.perf_counter()
                    mx.eval(y)
                    t3 = time.perf_counter()
                    if i >= 3:  # the first steps trace and allocate
                        build.append(t1 - t0)
                        host.append(t2 - t1)
                        total.append(t3 - t0)
                runs[name].append(
                    {
                        "build_ms": statistics.median(build) * 1e3,
                        "async_eval_ms": statistics.median(host) * 1e3,
                        "token_ms": statistics.median(total) * 1e3,
                    }
                )
                del cache
        for name, rs in runs.items():
            row = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            row.update(model=name, batch=B, shape=shape)
            out.append(row)
            print(
                f"{shape} B={B:<3} {name:>10}: graph build {row['build_ms']:6.3f} ms, async_eval "
                f"{row['async_eval_ms']:6.3f} ms, token (synchronous) {row['token_ms']:6.3f} ms",
                flush=True,
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="MLX host cost per primitive; decode step breakdown")
    p.add_argument("--kinds", action="store_true", help="only the per-kind probe")
    p.add_argument("--step", action="store_true", help="only the decode-step breakdown")
    p.add_argument("--shape", default="0.8b", help="the step's shape (bench_decode.SHAPES)")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--tokens", type=int, default=24)
    a = p.parse_args()
    both = not (a.kinds or a.step)
    result = {}
    if a.kinds or both:
        result["rows"] = probe_kinds()
    if a.step or both:
        batches = tuple(int(b) for b in a.batches.split(","))
        result["step"] = probe_step(a.shape, batches, a.tokens)
    out = Path(os.environ.get("OUT", "benchmarks/out"))
    out.mkdir(parents=True, exist_ok=True)
    result["meta"] = {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "env": {k: v for k, v in os.environ.items() if k.startswith("MLX_")},
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (out / "probe_host_cost.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'probe_host_cost.json'}")


if __name__ == "__main__":
    main()
