"""Prefill attention on a GPU: the prefill kernel's builds (`kernels/attention/prefill.py`:
version 2 with its tiles (BK 32), BK 16, DS 128, 8 warps; version 1) against what
the model runs today (`models.attention.attention` with PREFILL_KERNEL off: MLX's attention
where the scores fit PLAIN_BYTES, else the blocked ops path), at the 0.8B layer's shape (Hq 8,
Hkv 2, D 256, bf16, B 1), causal, the queries the last T of S keys.

For each (T, S): ms of one call + mx.eval and of --layers calls queued and evaluated once (a
forward's full-attention layers: 6 in the 0.8B model), the builds alternating round by round in
one process (median of --repeats rounds, after a warm-up), the session's prediction beside the
default build's; and each build's largest |build - ops| relative to the largest |ops| (a sanity
check; the tests hold the kernel to float64).

    PYTHONPATH=src python benchmarks/bench_prefill_attention.py [--cases 2048x8192,8192x8192]
        [--repeats 7] [--layers 6] [--out DIR]

Prints a table; writes prefill_attention.json (device, versions, date) into --out (default
benchmarks/out). Exits 1 when a build is off (relative difference > 5e-2).
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
CASES = "2048x2048,2048x4096,2048x6144,2048x8192,8192x8192"
# (name, version, tiles, ring): the kernel's builds, timed against "ops" (None: the defaults)
BUILDS = [
    ("v2", 2, None, None),
    ("v2_bk16", 2, (16, 64, 4), None),
    ("v2_ds128", 2, (32, 128, 4), 3),
    ("v2_w8", 2, (16, 128, 8), 2),
    ("v1", 1, None, None),
]
# Session 11's prediction for the default build (v2), ms of one call on an H200 (NOTES.md)
PREDICTED_MS = {
    (2048, 2048): 0.30,
    (2048, 4096): 0.48,
    (2048, 6144): 0.71,
    (2048, 8192): 0.95,
    (8192, 8192): 1.9,
}


def alternating(fns: dict, repeats: int) -> dict:
    """Median ms of each of `fns` (name: () -> arrays), one call each a round, in turn."""
    for fn in fns.values():
        mx.eval(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            mx.eval(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    if prefill.backend_name() is None:
        print("no GPU backend")
        return 1
    names = ["ops"] + [b[0] for b in BUILDS]
    rows, bad = [], False
    head = " ".join(f"{n:>9}" for n in names) + f" {'v2 pred':>8} "
    head += " ".join(f"{n + ' xL':>10}" for n in names) + f" {'ops/v2':>7} {'v2 TF/s':>8}"
    print(f"{'T':>6} {'S':>6} " + head)
    for case in args.cases.split(","):
        T, S = map(int, case.split("x"))
        q, k, v, _ = make_attention_inputs(1, HQ, HKV, T, S, D, dtype=mx.bfloat16, seed=T)
        mx.eval(q, k, v)
        fns = {"ops": lambda q=q, k=k, v=v: model_attention.attention(q, k, v, None, D**-0.5,
                                                                      "causal")}  # fmt: skip
        for name, version, tiles, ring in BUILDS:
            fns[name] = lambda q=q, k=k, v=v, version=version, tiles=tiles, ring=ring: (
                prefill.prefill_attention(
                    q, k, v, scale=D**-0.5, mask="causal", version=version, tiles_=tiles,
                    ring_=ring,
                )
            )  # fmt: skip
        ref = fns["ops"]().astype(mx.float32)
        top = max(mx.abs(ref).max().item(), 1e-6)
        rel = {}
        for name, *_ in BUILDS:
            rel[name] = mx.abs(fns[name]().astype(mx.float32) - ref).max().item() / top
            bad |= rel[name] > 5e-2
        one = alternating(fns, args.repeats)
        layers = alternating(
            {n: (lambda fn=fn: [fn() for _ in range(args.layers)]) for n, fn in fns.items()},
            args.repeats,
        )
        flop = 4.0 * HQ * D * T * (S - T + (T + 1) / 2)  # the causal products
        pred = PREDICTED_MS.get((T, S))
        rows.append(dict(T=T, S=S, ms=one, layers=args.layers, layers_ms=layers, rel_diff=rel,
                         predicted_v2_ms=pred, v2_tflops=flop / one["v2"] / 1e9))  # fmt: skip
        print(f"{T:>6} {S:>6} " + " ".join(f"{one[n]:>9.3f}" for n in names)
              + f" {pred or float('nan'):>8.2f} " + " ".join(f"{layers[n]:>10.3f}" for n in names)
              + f" {one['ops'] / one['v2']:>7.2f} {flop / one['v2'] / 1e9:>8.1f}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=str(mx.default_device()),
        mlx=mx.__version__,
        python=platform.python_version(),
        date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        shape=dict(Hq=HQ, Hkv=HKV, D=D, dtype="bfloat16", B=1, mask="causal"),
        builds={
            n: dict(
                version=v,
                tiles=t or prefill.tiles("cuda", v),
                ring=(r or prefill.RING["cuda"]) if v == 2 else None,
            )
            for n, v, t, r in BUILDS
        },
        ring=prefill.RING,
    )
    (out / "prefill_attention.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
