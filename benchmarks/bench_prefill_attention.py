"""Prefill attention on a GPU: the prefill kernel (`kernels/attention/prefill.py`) against what the
model runs today (`models.attention.attention` with PREFILL_KERNEL off: MLX's attention where
the scores fit PLAIN_BYTES, else the blocked ops path), at the 0.8B layer's shape (Hq 8, Hkv 2,
D 256, bf16, B 1), causal, the queries the last T of S keys.

For each (T, S): ms of one call + mx.eval (median of --repeats, after a warm-up) for both, the
same for --layers calls queued and evaluated once (a forward's full-attention layers: 6 in the
0.8B model), and the largest |kernel - ops| relative to the largest |ops| (a sanity check; the
tests hold the kernel to float64).

    PYTHONPATH=src python benchmarks/bench_prefill_attention.py [--cases 2048x8192,8192x8192]
        [--repeats 7] [--layers 6] [--out DIR]

Prints a table; writes prefill_attention.json (device, versions, date) into --out (default
benchmarks/out). Exits 1 when the kernel is off (relative difference > 5e-2).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.kernels.attention_np import make_attention_inputs  # noqa: E402

from qwen35_mlx.kernels.attention import prefill  # noqa: E402
from qwen35_mlx.models import attention as model_attention  # noqa: E402

HQ, HKV, D = 8, 2, 256


def timed(fn, repeats: int) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="2048x2048,2048x8192,8192x8192")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    if prefill.backend_name() is None:
        print("no GPU backend")
        return 1
    rows, bad = [], False
    print(f"{'T':>6} {'S':>6} {'kernel ms':>10} {'ops ms':>8} {'x layers k':>11} "
          f"{'x layers ops':>13} {'speedup':>8} {'rel diff':>9}")  # fmt: skip
    for case in args.cases.split(","):
        T, S = map(int, case.split("x"))
        q, k, v, _ = make_attention_inputs(1, HQ, HKV, T, S, D, dtype=mx.bfloat16, seed=T)
        mx.eval(q, k, v)

        def kern(q=q, k=k, v=v):
            return prefill.prefill_attention(q, k, v, scale=D**-0.5, mask="causal")

        def ops(q=q, k=k, v=v):
            return model_attention.attention(q, k, v, None, D**-0.5, "causal")

        def layers(fn):
            return lambda: [fn() for _ in range(args.layers)]

        a, b = kern(), ops()
        diff = (mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max()).item()
        rel = diff / max(mx.abs(b.astype(mx.float32)).max().item(), 1e-6)
        bad |= rel > 5e-2
        tk, to = timed(kern, args.repeats), timed(ops, args.repeats)
        lk, lo = timed(layers(kern), args.repeats), timed(layers(ops), args.repeats)
        rows.append(dict(T=T, S=S, kernel_ms=tk, ops_ms=to, layers=args.layers,
                         kernel_layers_ms=lk, ops_layers_ms=lo, rel_diff=rel))  # fmt: skip
        print(f"{T:>6} {S:>6} {tk:>10.3f} {to:>8.3f} {lk:>11.3f} {lo:>13.3f} {lo / lk:>8.2f} "
              f"{rel:>9.2e}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=str(mx.default_device()),
        mlx=mx.__version__,
        python=platform.python_version(),
        date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        shape=dict(Hq=HQ, Hkv=HKV, D=D, dtype="bfloat16", B=1, mask="causal"),
        tiles=prefill.TILES,
    )
    (out / "prefill_attention.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
