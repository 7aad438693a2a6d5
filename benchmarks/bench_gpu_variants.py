"""Time the fused GPU kernel's launch layouts (lanes per value row, warps per threadgroup,
prefetch distance) to pick `source.default_layout`, and `chunked` beside them to see whether
`auto` should hand long prefill to it. Shape of the issue's benchmark: Hk=16, Hv=32,
Dk=Dv=128, bf16 q/k/v, fp32 state [B, Hv, Dv, Dk]; decode B in {1, 8, 32, 128}, prefill B=1,
T in {128, 512, 2048, 8192}. Each timing chains N calls through the state in one evaluated
graph. Also measures the device-to-device copy bandwidth that defines the decode memory floor.

    python benchmarks/bench_gpu_variants.py [--out variants.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import mlx.core as mx

from qwen35_mlx.kernels.gated_delta import compute_gates, gated_delta

HK, HV, DK, DV = 16, 32, 128, 128


def impl():
    from qwen35_mlx.kernels.gated_delta import _gpu_backend

    return _gpu_backend("metal" if mx.metal.is_available() else "cuda")


def inputs(B, T, dtype=mx.bfloat16):
    mx.random.seed(0)
    q = mx.random.normal((B, T, HK, DK))
    k = mx.random.normal((B, T, HK, DK))
    q = (q / mx.linalg.norm(q, axis=-1, keepdims=True) / math.sqrt(DK)).astype(dtype)
    k = (k / mx.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
    v = mx.random.normal((B, T, HV, DV)).astype(dtype)
    a = mx.random.normal((B, T, HV)).astype(dtype)
    b = mx.random.normal((B, T, HV)).astype(dtype)
    A_log = mx.random.uniform(-2, 1, (HV,))
    dt_bias = mx.random.uniform(-1, 1, (HV,))
    g, beta = compute_gates(a, b, A_log, dt_bias)
    state = 0.1 * mx.random.normal((B, HV, DV, DK))
    x = dict(q=q, k=k, v=v, a=a, b=b, A_log=A_log, dt_bias=dt_bias, g=g, beta=beta, state=state)
    mx.eval(x)
    return x


def timed(step, state, n, reps=3):
    """Seconds per call: n calls chained through the state, one eval, best of reps."""

    def run():
        s = state
        for _ in range(n):
            _, s = step(s)
        return s

    mx.eval(run())  # warm-up (and compile)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(run())
        mx.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best / n


def copy_bandwidth(nbytes=1 << 30):
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    x = mx.random.uniform(shape=(nbytes // 4,))
    mx.eval(x)

    def step(s):
        y = s + 0.0  # one read and one write of every element
        return y, y

    t = timed(step, x, 20)
    return 2 * nbytes / t


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="variants.json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    m = impl()
    res = {"device": str(mx.default_device()), "mlx": mx.__version__, "rows": []}
    bw = copy_bandwidth()
    res["copy_bw_GBs"] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    decode_layouts = [(4, 4, 0), (8, 2, 0), (8, 4, 0), (8, 8, 0), (16, 2, 0), (16, 4, 0)]
    prefill_layouts = [(8, 1, 0), (8, 2, 0), (16, 1, 0), (16, 2, 0), (16, 1, 8), (32, 1, 0)]
    if args.quick:
        decode_layouts = [(8, 8, 0)]
        prefill_layouts = [(16, 1, 8)]
    cases = [("decode", B, 1) for B in (1, 8, 32, 128)]
    cases += [("prefill", 1, T) for T in (128, 512, 2048, 8192)]
    for kind, B, T in cases:
        x = inputs(B, T)
        n = 50 if T == 1 else max(3, 2048 // T * 4)
        floor = 2 * B * HV * DV * DK * 4 / bw
        row = {"kind": kind, "B": B, "T": T, "floor_us": floor * 1e6, "times_us": {}}
        for gate in ("scalar", "fused"):
            for L, W, P in decode_layouts if T == 1 else prefill_layouts:

                def step(s, L=L, W=W, P=P, gate=gate, x=x):
                    if gate == "fused":
                        return m.gated_delta_update_kernel(
                            x["q"],
                            x["k"],
                            x["v"],
                            x["a"],
                            x["b"],
                            x["A_log"],
                            x["dt_bias"],
                            s,
                            lanes=L,
                            warps=W,
                            prefetch=P,
                            fused=True,
                        )
                    return m.gated_delta_kernel(
                        x["q"], x["k"], x["v"], x["g"], x["beta"], s, lanes=L, warps=W, prefetch=P
                    )

                row["times_us"][f"{gate}_L{L}_W{W}_P{P}"] = timed(step, x["state"], n) * 1e6

        def split(s, x=x):
            return m.gated_delta_update_kernel(
                x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"], s, fused=False
            )

        def default(s, x=x):
            return m.gated_delta_update_kernel(
                x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"], s
            )

        row["times_us"]["split_gates"] = timed(split, x["state"], n) * 1e6
        row["times_us"]["update_default"] = timed(default, x["state"], n) * 1e6
        if T > 1:

            def chunked(s, x=x):
                return gated_delta(x["q"], x["k"], x["v"], x["g"], x["beta"], s, backend="chunked")

            row["times_us"]["chunked"] = timed(chunked, x["state"], max(2, n // 4), reps=2) * 1e6
        else:
            try:

                def fast(s, x=x):
                    y, s2 = mx.fast.gated_delta_update(x["q"], x["k"], x["v"], x["g"], x["beta"], s)
                    return y, s2

                row["times_us"]["mx.fast"] = timed(fast, x["state"], n) * 1e6
            except Exception as e:  # noqa: BLE001 - a peer's failure is a result, not a crash
                row["times_us"]["mx.fast"] = f"error: {e}"
        best = min(
            (v, k)
            for k, v in row["times_us"].items()
            if isinstance(v, float) and k.startswith(("scalar", "fused"))
        )
        print(
            f"{kind:8s} B={B:4d} T={T:5d} floor {floor * 1e6:9.1f} us | best {best[1]:16s} "
            f"{best[0]:9.1f} us ({best[0] / (floor * 1e6):.2f}x floor) | "
            + " ".join(
                f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row["times_us"].items()
            ),
            flush=True,
        )
        res["rows"].append(row)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
