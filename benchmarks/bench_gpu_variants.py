"""Time the fused GPU kernel's launch layouts (lanes per value row, warps per threadgroup,
prefetch distance) to pick `launch.default_layout`, and `chunked` beside them to see whether
`auto` should hand long prefill to it. Shape, inputs and timer are bench_gated_delta.py's:
Hk=16, Hv=32, Dk=Dv=128, bf16 q/k/v, fp32 state [B, Hv, Dv, Dk]; decode B in {1, 8, 32, 128},
prefill B=1, T in {128, 512, 2048, 8192}; N calls chained through the state in one evaluated
graph (best of 3 here). Decode rows also time the memory floor (one elementwise pass over the
state) in the same way.

    python benchmarks/bench_gpu_variants.py [--out variants.json] [--quick]
"""

from __future__ import annotations

import argparse
import json

# bench_gated_delta first: it imports qwen35_mlx before mlx (OpenBLAS on Linux).
from bench_gated_delta import Shape, _mlx_inputs, _mlx_timer, memory_floor_step  # isort: skip

import mlx.core as mx

from qwen35_mlx.kernels.gated_delta import _gpu_backend, compute_gates, gated_delta


def timed(step, shape: Shape, n: int, reps: int = 3) -> float:
    """Seconds per call of step(q, k, v, a, b, A_log, dt_bias, state) -> (y, state): n calls
    chained through the state, one eval, after a warm-up; best of reps."""
    run = _mlx_timer(step)(shape)
    run(n)
    return min(run(n) for _ in range(reps)) / n


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="variants.json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    m = _gpu_backend("metal" if mx.metal.is_available() else "cuda")
    res = {"device": str(mx.default_device()), "mlx": mx.__version__, "rows": []}
    decode_layouts = [(4, 4, 0), (8, 2, 0), (8, 4, 0), (8, 8, 0), (16, 2, 0), (16, 4, 0)]
    prefill_layouts = [(8, 1, 0), (8, 2, 0), (16, 1, 0), (16, 2, 0), (16, 1, 8), (32, 1, 0)]
    if args.quick:
        decode_layouts = [(8, 8, 0)]
        prefill_layouts = [(16, 1, 8)]
    for shape in [Shape(B, 1) for B in (1, 8, 32, 128)] + [
        Shape(1, T) for T in (128, 512, 2048, 8192)
    ]:
        q, k, v, a, b, A_log, dt_bias, _ = _mlx_inputs(shape)
        g, beta = compute_gates(a, b, A_log, dt_bias)
        mx.eval(g, beta)
        n = 50 if shape.T == 1 else max(3, 2048 // shape.T * 4)
        row = {"kind": shape.kind, "B": shape.B, "T": shape.T, "times_us": {}}
        times = row["times_us"]
        for L, W, P in decode_layouts if shape.T == 1 else prefill_layouts:
            kw = dict(lanes=L, warps=W, prefetch=P)

            def fused(q, k, v, a, b, A_log, dt_bias, s, kw=kw):
                return m.gated_delta_update_kernel(q, k, v, a, b, A_log, dt_bias, s, **kw)

            def scalar(q, k, v, a, b, A_log, dt_bias, s, kw=kw, g=g, beta=beta):
                return m.gated_delta_kernel(q, k, v, g, beta, s, **kw)

            times[f"fused_L{L}_W{W}_P{P}"] = timed(fused, shape, n) * 1e6
            times[f"scalar_L{L}_W{W}_P{P}"] = timed(scalar, shape, n) * 1e6

        def default(q, k, v, a, b, A_log, dt_bias, s):
            return m.gated_delta_update_kernel(q, k, v, a, b, A_log, dt_bias, s)

        times["update_default"] = timed(default, shape, n) * 1e6
        if shape.T > 1:

            def chunked(q, k, v, a, b, A_log, dt_bias, s, g=g, beta=beta):
                return gated_delta(q, k, v, g, beta, s, backend="chunked")

            times["chunked"] = timed(chunked, shape, max(2, n // 4), reps=2) * 1e6
        else:
            row["floor_us"] = timed(memory_floor_step, shape, n) * 1e6
            try:

                def fast(q, k, v, a, b, A_log, dt_bias, s, g=g, beta=beta):
                    return mx.fast.gated_delta_update(q, k, v, g, beta, s)

                times["mx.fast"] = timed(fast, shape, n) * 1e6
            except Exception as e:  # noqa: BLE001 - a peer's failure is a result, not a crash
                times["mx.fast"] = f"error: {e}"
        best = min(
            (t, name)
            for name, t in times.items()
            if isinstance(t, float) and name.startswith(("scalar", "fused"))
        )
        floor = row.get("floor_us")
        vs_floor = f" ({best[0] / floor:.2f}x floor {floor:.1f} us)" if floor else ""
        print(
            f"{shape.label:18s} | best {best[1]:16s} {best[0]:9.1f} us{vs_floor} | "
            + " ".join(
                f"{name}={t:.1f}" if isinstance(t, float) else f"{name}={t}"
                for name, t in times.items()
            ),
            flush=True,
        )
        res["rows"].append(row)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
