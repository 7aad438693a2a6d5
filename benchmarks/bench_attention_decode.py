"""Decode attention on a GPU: our kernel pair (`kernels.attention.decode_attention`) against MLX's
`mx.fast.scaled_dot_product_attention` + the sigmoid gate as ops (what the decode step ran
before: at head_dim 256 MLX's CUDA backend has no attention kernel, so that is its fallback
graph), at Qwen3.5's attention shapes.

For each shape (0.8B: Hq 8, Hkv 2; 9B: Hq 16, Hkv 4; D 256), batch, query tokens T and keys C
(the keys a causal mask [1, 1, T, C] as the compiled step builds it, start = C - T), bf16:
  err64   max |kernel - float64 oracle| / max |oracle| (tests/kernels/attention_np.py), on the
          first and last batch rows, first kv head
  err_mlx the same against MLX's result (MLX rounds q * scale and the scores to bf16)
  call    median us of one call + mx.eval (host + GPU, as a decode step pays it)
  queued  us a call with --queue calls queued and evaluated once (mostly GPU time)
Both contenders are `mx.compile`d functions of the same inputs.

    python benchmarks/bench_attention_decode.py [--shapes 0.8b,9b] [--batches 1,32]
        [--tokens 1,2,4] [--contexts 512,4096,32768] [--repeats 9] [--queue 10] [--out DIR]

Prints a table; writes JSON (device, versions, date) into --out (default benchmarks/out). Exits 1
when a kernel result is off (err64 > 1e-2, or err_mlx > 5e-2).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import qwen35_mlx  # noqa: F401  isort: skip  (sets up the BLAS before mlx loads)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.kernels.attention_np import decode_attention_np, make_attention_inputs  # noqa: E402

from qwen35_mlx.kernels.attention import decode_attention  # noqa: E402

SHAPES = {"0.8b": (8, 2), "9b": (16, 4)}  # Hq, Hkv
D = 256
TOL64, TOL_MLX = 1e-2, 5e-2


def causal_mask(T: int, C: int) -> mx.array:
    pos = mx.arange(C)
    return (pos[None] <= (C - T) + mx.arange(T)[:, None])[None, None]


def mlx_attention(q, k, v, mask, qg):
    """The step's ops before the kernel: MLX's attention, [B, T, Hq * D], o * sigmoid(gate)."""
    B, Hq, T, _ = q.shape
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)
    o = o.transpose(0, 2, 1, 3).reshape(B, T, Hq * D)
    return o * mx.sigmoid(qg[..., D:].reshape(B, T, Hq * D))


def kernel_attention(q, k, v, mask, qg, start):
    return decode_attention(q, k, v, scale=D**-0.5, mask=mask, start=start, gate=qg, gate_offset=D)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def f32(x: mx.array) -> np.ndarray:
    return np.asarray(x.astype(mx.float32)).astype(np.float64)


def time_call(fn, args, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def time_queued(fn, args, n: int, repeats: int) -> float:
    ts = []
    for _ in range(max(3, repeats // 3)):
        t0 = time.perf_counter()
        mx.eval([fn(*args) for _ in range(n)])
        ts.append((time.perf_counter() - t0) / n)
    return statistics.median(ts) * 1e6


def run_case(Hq, Hkv, B, T, C, repeats, queue, fns) -> dict:
    kern, ref = fns
    q, k, v, qg = make_attention_inputs(B, Hq, Hkv, T, C, D, dtype=mx.bfloat16, gate=True, seed=C)
    mask = causal_mask(T, C)
    start = mx.array(C - T, mx.int32)
    mx.eval(q, k, v, qg, mask, start)
    out_k = kern(q, k, v, mask, qg, start)
    out_m = ref(q, k, v, mask, qg)
    mx.eval(out_k, out_m)
    # The oracle on the first and last rows' first kv head and its G query heads (the float64
    # matmuls on the host are the slow part of this script).
    rows, G = mx.array(sorted({0, B - 1})), Hq // Hkv
    sub = (q[rows, :G], k[rows, :1], v[rows, :1], qg[rows][:, :, :G])
    want = decode_attention_np(sub[0], sub[1], sub[2], D**-0.5, C - T, mask, False, sub[3], D)
    err64 = rel(f32(out_k[rows][..., : G * D]), want)
    err_mlx = rel(f32(out_k), f32(out_m))
    args_k, args_m = (q, k, v, mask, qg, start), (q, k, v, mask, qg)
    t = {}
    for name, fn, args in (("kernel", kern, args_k), ("mlx", ref, args_m)) * 2:  # alternate
        call = time_call(fn, args, repeats)
        queued = time_queued(fn, args, queue, repeats)
        t.setdefault(name, []).append((call, queued))
    res = dict(Hq=Hq, Hkv=Hkv, B=B, T=T, C=C, err64=err64, err_mlx=err_mlx)
    for name, vals in t.items():
        res[f"{name}_call_us"] = min(c for c, _ in vals)
        res[f"{name}_queued_us"] = min(qd for _, qd in vals)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="0.8b,9b")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--tokens", default="1,2,4")
    p.add_argument("--contexts", default="512,4096,32768")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--queue", type=int, default=10)
    p.add_argument("--out", default="benchmarks/out")
    a = p.parse_args(argv)
    if mx.default_device() == mx.cpu:
        print("bench_attention_decode: needs a GPU (MLX's default device is the CPU)")
        return 2
    import qwen35_mlx.kernels.attention as attention_kernel

    attention_kernel.DECODE_KERNEL = "on"  # also on a Mac, to measure the Metal build
    fns = (mx.compile(kernel_attention), mx.compile(mlx_attention))
    results, bad = [], 0
    hdr = (
        f"{'shape':>5} {'B':>3} {'T':>2} {'C':>6} {'err64':>8} {'err_mlx':>8} "
        f"{'call us':>16} {'queued us':>18} {'speedup':>8}"
    )
    print(f"{hdr}\n{'':>36}{'kernel / mlx':>16} {'kernel / mlx':>18} {'queued':>8}")
    t0 = time.perf_counter()
    for shape in a.shapes.split(","):
        Hq, Hkv = SHAPES[shape]
        for B in map(int, a.batches.split(",")):
            for T in map(int, a.tokens.split(",")):
                for C in map(int, a.contexts.split(",")):
                    r = run_case(Hq, Hkv, B, T, C, a.repeats, a.queue, fns)
                    r["shape"] = shape
                    results.append(r)
                    off = r["err64"] > TOL64 or r["err_mlx"] > TOL_MLX
                    bad += off
                    print(
                        f"{shape:>5} {B:>3} {T:>2} {C:>6} {r['err64']:>8.1e} {r['err_mlx']:>8.1e} "
                        f"{r['kernel_call_us']:>7.0f} / {r['mlx_call_us']:<7.0f}"
                        f"{r['kernel_queued_us']:>8.1f} / {r['mlx_queued_us']:<8.1f}"
                        f"{r['mlx_queued_us'] / r['kernel_queued_us']:>7.2f}x"
                        + ("  OFF" if off else ""),
                        flush=True,
                    )
    print(f"{len(results)} cases in {time.perf_counter() - t0:.0f} s; {bad} off")
    info = dict(
        date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        device=str(mx.default_device()),
        gpu=mx.device_info().get("device_name", "") if hasattr(mx, "device_info") else "",
        mlx=mx.__version__,
        python=platform.python_version(),
        results=results,
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    (out / f"bench_attention_decode_{stamp}.json").write_text(json.dumps(info, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
