"""What one MLX primitive costs the host, by kind, inside a compiled function (issue #8).

A decode step at batch 1 is host-bound: its time is (number of primitives) x (cost of one).
This times compiled functions made of N primitives of one kind on tiny arrays, so the GPU's
work is negligible and the slope over N is the per-primitive host cost:
    matmul   [1, 256] @ [256, 256] chained        (one kernel launch each)
    add      x + c_i, c_i distinct inputs, compiled (fused by mx.compile: the baseline)
    reshape  reshape / reshape back                (views: no kernel)
    slice    x[:, 1:] then pad back via concatenate (copy kernels)
    rmsnorm  mx.fast.rms_norm chained              (one kernel each)

    python benchmarks/probe_host_cost.py   # a table; JSON to $OUT or benchmarks/out
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import mlx.core as mx


def chain(kind: str, n: int):
    w = mx.random.normal((256, 256)) * 0.01
    cs = [mx.random.normal((1, 256)) for _ in range(8)]
    nw = mx.ones((256,))

    def f(x):
        for i in range(n):
            if kind == "matmul":
                x = x @ w
            elif kind == "add":
                x = x + cs[i % 8]
            elif kind == "reshape":
                x = x.reshape(16, 16).reshape(1, 256) if i % 2 else x.reshape(1, 16, 16)
            elif kind == "slice":
                x = mx.concatenate([x[:, 1:], x[:, :1]], axis=1)
            elif kind == "rmsnorm":
                x = mx.fast.rms_norm(x, nw, 1e-6)
        return x.reshape(1, 256)

    mx.eval(w, nw, *cs)
    return mx.compile(f)


def time_it(fn, x, reps: int) -> float:
    for _ in range(3):
        mx.eval(fn(x))
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn(x))
    return (time.perf_counter() - t0) / reps


def main() -> None:
    x = mx.random.normal((1, 256))
    rows = []
    for kind in ("add", "matmul", "reshape", "slice", "rmsnorm"):
        ts = {}
        for n in (50, 400):
            ts[n] = time_it(chain(kind, n), x, 30)
        per = (ts[400] - ts[50]) / 350
        rows.append(
            {"kind": kind, "t50_ms": ts[50] * 1e3, "t400_ms": ts[400] * 1e3, "us_per_op": per * 1e6}
        )
        print(
            f"{kind:8s} N=50 {ts[50] * 1e3:7.3f} ms  N=400 {ts[400] * 1e3:7.3f} ms"
            f"  -> {per * 1e6:6.2f} us/op",
            flush=True,
        )
    out = Path(os.environ.get("OUT", "benchmarks/out"))
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (out / "probe_host_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
