"""Prefill attention on a GPU: the prefill kernel's builds (`kernels/attention/prefill.py`:
version 2 with BK 16 (the default through session 11), version 3 (session 12: the softmax in
registers) with its tiles, with 8 warps and with DS 64) against the ops, what the model runs
without the kernel (`models.attention.attention` with PREFILL_KERNEL off: MLX's attention where
the scores fit PLAIN_BYTES, else the blocked ops path), at the 0.8B layer's
shape (Hq 8, Hkv 2, D 256, bf16, B 1), causal, the queries the last T of S keys.

For each (T, S): ms of one call + mx.eval and (unless --layers 0) of --layers calls queued and
evaluated once (a forward's full-attention layers: 6 in the 0.8B model), the builds alternating
round by round in one process (median of --repeats rounds, after a warm-up), session 12's
predictions for version 3 and the ops beside them; and each build's largest |build - ops|
relative to the largest |ops| (a sanity check; the tests hold the kernel to float64).

    PYTHONPATH=src python benchmarks/bench_prefill_attention.py [--quick]
        [--cases 2048x8192,8192x8192] [--builds v2,v3] [--repeats 7] [--layers 6] [--out DIR]

--quick: 3 rounds (about a minute on the H200 with the default cases, JIT included). Prints a
table; writes prefill_attention.json (device, versions, date) into --out
(default benchmarks/out). Exits 1 when a build is off (relative difference > 5e-2).
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
CASES = "2048x2048,2048x8192,2048x16384,2048x32768,2048x131072,8192x8192"
# (name, version, tiles, ring): the kernel's builds, timed against "ops" (None: the defaults)
BUILDS = [
    ("v2", 2, (16, 64, 4), None),
    ("v3", 3, None, None),
    ("v3_w8", 3, (16, 256, 8), None),
    ("v3_ds64", 3, (16, 64, 4), None),
]
# Session 12's predictions, ms of one call on an H200 (NOTES.md, helper fattn3). Version 2's
# session-11 times fit 0.30 ms + 2.51 us a 16-key block of the longest threadgroup's walk (T
# 2048: S / 16 blocks); version 3's block at 0.57 of that (1.43 us: its common path is ~372
# instructions a block against ~700, 2 barriers against 10); the ops from S 16384 at T 2048 are
# the blocked path (the scores past PLAIN_BYTES), at the ~35-40 TFLOP/s of its 8192 / 8192 time
PREDICTED_MS = {
    (2048, 2048): {"v3": 0.48, "v2": 0.62, "ops": 0.61},
    (2048, 8192): {"v3": 1.03, "v2": 1.59, "ops": 1.23},
    (2048, 16384): {"v3": 1.76, "v2": 2.87, "ops": 7.2},
    (2048, 32768): {"v3": 3.23, "v2": 5.44, "ops": 14.0},
    (2048, 131072): {"v3": 12.0, "v2": 20.9, "ops": 55.0},
    (8192, 8192): {"v3": 2.0, "v2": 3.23, "ops": 8.3},
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
    ap.add_argument("--builds", default=",".join(b[0] for b in BUILDS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 3
    if prefill.backend_name() is None:
        print("no GPU backend")
        return 1
    # "ops": the model's attention without the kernel (it takes 8192 queries by default)
    model_attention.PREFILL_KERNEL = False
    builds = [b for b in BUILDS if b[0] in args.builds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = ["ops"] + [b[0] for b in builds]
    main_ = "v3" if "v3" in names else names[-1]
    rows, bad = [], False
    head = " ".join(f"{n:>9}" for n in names) + f" {'v3 pred':>8} {'ops pred':>8} "
    if args.layers:
        head += " ".join(f"{n + ' xL':>10}" for n in names) + " "
    head += f"{'ops/' + main_:>8} {main_ + ' TF/s':>9}"
    print(f"{'T':>6} {'S':>6} " + head)
    for case in args.cases.split(","):
        T, S = map(int, case.split("x"))
        q, k, v, _ = make_attention_inputs(1, HQ, HKV, T, S, D, dtype=mx.bfloat16, seed=T)
        mx.eval(q, k, v)
        fns = {"ops": lambda q=q, k=k, v=v: model_attention.attention(q, k, v, None, D**-0.5,
                                                                      "causal")}  # fmt: skip
        for name, version, tiles, ring in builds:
            fns[name] = lambda q=q, k=k, v=v, version=version, tiles=tiles, ring=ring: (
                prefill.prefill_attention(
                    q, k, v, scale=D**-0.5, mask="causal", version=version, tiles_=tiles,
                    ring_=ring,
                )
            )  # fmt: skip
        ref = fns["ops"]().astype(mx.float32)
        top = max(mx.abs(ref).max().item(), 1e-6)
        rel = {}
        for name, *_ in builds:
            rel[name] = mx.abs(fns[name]().astype(mx.float32) - ref).max().item() / top
            bad |= rel[name] > 5e-2
        del ref
        one = alternating(fns, args.repeats)
        layers = {}
        if args.layers:
            layers = alternating(
                {n: (lambda fn=fn: [fn() for _ in range(args.layers)]) for n, fn in fns.items()},
                args.repeats,
            )
        flop = 4.0 * HQ * D * T * (S - T + (T + 1) / 2)  # the causal products
        pred = PREDICTED_MS.get((T, S), {})
        tflops = {n: flop / one[n] / 1e9 for n in names}
        rows.append(dict(T=T, S=S, ms=one, layers=args.layers, layers_ms=layers, rel_diff=rel,
                         predicted_ms=pred, tflops=tflops))  # fmt: skip
        line = f"{T:>6} {S:>6} " + " ".join(f"{one[n]:>9.3f}" for n in names)
        line += f" {pred.get('v3', float('nan')):>8.2f} {pred.get('ops', float('nan')):>8.2f} "
        if args.layers:
            line += " ".join(f"{layers[n]:>10.3f}" for n in names) + " "
        line += f"{one['ops'] / one[main_]:>8.2f} {flop / one[main_] / 1e9:>9.1f}"
        print(line, flush=True)
        write(out, args, builds, rows)  # after every row: a run cut short keeps its rows
    for line in advice(rows):
        print(line)
    write(out, args, builds, rows, advice(rows))
    return 1 if bad else 0


def advice(rows: list) -> list[str]:
    """The switches the measured rows argue for (models/attention.py, kernels/attention/
    prefill.py): version 3 as CUDA's default where it beats version 2 on every row; the
    smallest S from which the faster version beats the ops on every T 2048 row at or above it
    (PREFILL_KERNEL_MIN_S), and PREFILL_KERNEL_MIN_T 2048 if that is every T 2048 row."""
    lines = []
    have = [r for r in rows if "v2" in r["ms"] and "v3" in r["ms"]]
    v3_wins = bool(have) and all(r["ms"]["v3"] < r["ms"]["v2"] for r in have)
    if have:
        verdict = "beats" if v3_wins else "does not beat"
        lines.append(f"advice: version 3 {verdict} version 2 on every row -> "
                     f"prefill.VERSION['cuda'] = {3 if v3_wins else 2}")  # fmt: skip
    best = "v3" if v3_wins else "v2"
    t2k = sorted((r for r in rows if r["T"] == 2048 and best in r["ms"]), key=lambda r: r["S"])
    from_s = None
    for r in reversed(t2k):
        if r["ms"][best] >= r["ms"]["ops"]:
            break
        from_s = r["S"]
    if t2k:
        if from_s is None:
            lines.append(f"advice: {best} beats the ops at no T 2048 row from the longest down")
        elif from_s == t2k[0]["S"]:
            lines.append(f"advice: {best} beats the ops on every T 2048 row -> "
                         "attention.PREFILL_KERNEL_MIN_T = 2048")  # fmt: skip
        else:
            lines.append(f"advice: {best} beats the ops at T 2048 from S {from_s} -> "
                         f"attention.PREFILL_KERNEL_MIN_S = {from_s}")  # fmt: skip
    return lines


def write(out: Path, args, builds: list, rows: list, advice_: list | None = None) -> None:
    meta = dict(
        device=str(mx.default_device()),
        mlx=mx.__version__,
        python=platform.python_version(),
        date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        shape=dict(Hq=HQ, Hkv=HKV, D=D, dtype="bfloat16", B=1, mask="causal"),
        builds={
            n: dict(
                version=v,
                tiles=t or prefill.tiles("cuda", v, D=D),
                ring=(r or prefill.rings("cuda", v)) if v != 1 else None,
            )
            for n, v, t, r in builds
        },
        default_version=prefill.VERSION,
        quick=args.quick,
    )
    text = json.dumps(dict(meta=meta, rows=rows, advice=advice_ or []), indent=1)
    (out / "prefill_attention.json").write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
