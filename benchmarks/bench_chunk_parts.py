"""Where the chunked GPU path spends its time, and the crossover against the fused kernel.

For Hk=16, Dk=Dv=128, bf16, B=1 and each (T, Hv): the fused recurrent kernel (gates inside),
the whole chunked path as `auto` would run it (prep kernel with the gates inside + state pass),
and its parts alone: compute_gates, the prep kernel with precomputed gates and with its own
gating, the MLX-ops prep, the state pass with 8, 16 and 32 value rows per threadgroup (BV; 32
exceeds Apple's 32 KB of threadgroup memory, CUDA only), and at the default BV without the L2
prefetch of the next chunk. Same timer as bench_gated_delta.py: n calls in one evaluated
graph, best of 3, ms per call.

    python benchmarks/bench_chunk_parts.py [--t 2048,8192] [--hv 16,32,64] [--out parts.json]

Prints one line per (T, Hv) and the suggested _GPU_CHUNKED_MIN_T: the smallest measured T from
which the chunked path beats the fused kernel at every measured Hv.
"""

from __future__ import annotations

import argparse
import json
import time

# bench_gated_delta first: it imports qwen35_mlx before mlx (OpenBLAS on Linux).
from bench_gated_delta import Shape, _mlx_inputs  # isort: skip

import mlx.core as mx

from qwen35_mlx.kernels.gated_delta import _gpu_backend, compute_gates
from qwen35_mlx.kernels.gated_delta import chunk_launch as cl


def best_ms(fn, n: int, reps: int = 3) -> float:
    """ms per call of fn() -> arrays: n calls evaluated together, after a warm-up; best of reps."""
    mx.eval(fn())
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(n)])
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3


def measure(backend: str, bvs, T: int, hv: int) -> dict:
    """ms per call of every contender and part at (T, Hv)."""
    fused_impl = _gpu_backend(backend)
    q, k, v, a, b, A_log, dt_bias, state = _mlx_inputs(Shape(1, T, hv))
    g, beta = compute_gates(a, b, A_log, dt_bias)
    pieces = cl.prep_kernel(backend, q, k, v, g, beta, None)
    mx.eval(g, beta, pieces)
    n = max(2, min(50, 65536 // T))

    def fused():
        return fused_impl.gated_delta_update_kernel(q, k, v, a, b, A_log, dt_bias, state)

    def chunked():
        return cl.gated_delta_update_chunk_kernel(
            q, k, v, a, b, A_log, dt_bias, state, backend=backend
        )

    t = {
        "fused": best_ms(fused, n),
        "chunked": best_ms(chunked, n),
        "gates": best_ms(lambda: compute_gates(a, b, A_log, dt_bias), n),
        "prep kernel": best_ms(lambda: cl.prep_kernel(backend, q, k, v, g, beta, None), n),
        "prep fused": best_ms(
            lambda: cl.prep_kernel(
                backend, q, k, v, g, beta, None, raw_gates=(a, b, A_log, dt_bias)
            ),
            n,
        ),
        "prep ops": best_ms(lambda: cl.prep_ops(q, k, v, g, beta, None), max(2, n // 4)),
    }
    for bv in bvs:
        t[f"state BV={bv}"] = best_ms(
            lambda bv=bv: cl.state_pass(backend, pieces, state, T, v.dtype, bv=bv), n
        )
    t[f"state BV={cl.BV} no prefetch"] = best_ms(
        lambda: cl.state_pass(backend, pieces, state, T, v.dtype, prefetch=0), n
    )
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--t", default="64,128,256,512,1024,2048,4096,8192,32768")
    p.add_argument("--hv", default="16,32,64")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    backend = cl.available_backend()
    if backend is None:
        raise SystemExit("bench_chunk_parts: needs MLX with a Metal or CUDA GPU")
    bvs = (8, 16, 32) if backend == "cuda" else (8, 16)
    rows = []
    for hv in (int(x) for x in args.hv.split(",")):
        for T in (int(x) for x in args.t.split(",")):
            t = measure(backend, bvs, T, hv)
            rows.append({"T": T, "Hv": hv, "ms": t})
            print(f"T={T:6d} Hv={hv:3d} " + "  ".join(f"{k} {x:.3f}" for k, x in t.items()))
    wins = {}
    for r in rows:
        wins.setdefault(r["T"], []).append(r["ms"]["chunked"] < r["ms"]["fused"])
    ok = [T for T in sorted(wins) if all(all(wins[u]) for u in wins if u >= T)]
    print(f"suggested _GPU_CHUNKED_MIN_T: {ok[0] if ok else 'none (fused wins somewhere)'}")
    if args.out:
        info = {"device": str(mx.default_device()), "mlx": mx.__version__, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
