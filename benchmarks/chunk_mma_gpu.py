"""The chunk kernels' matrix-unit state pass (STATE_MMA_BODY) on a GPU, in one go: build, check
against the references, time, print one table.

    python benchmarks/chunk_mma_gpu.py [--quick] [--out DIR]
    (on the lent H200: `benchmarks/run_gpu.sh chunk-mma`)

1. The tile layer alone (chunk_launch._TILES) against float64: every operand layout, MP 1 / 3.
2. Correctness, B = 2 (row 0 unmasked, row 1 left padding and a hole in the middle), a nonzero
   initial state, the raw gates (gated_delta_update's path, gates computed in the prep kernel),
   Hv 16 / 32 / 64 x T 512 ... 32768 (Hk 16, Dk = Dv = 128): the chunked path on matrix units
   ("mma": chunk_launch.MATRIX on) and on fp32 lanes ("simt"), fp32 and bf16 activations, against
   the fused recurrent kernel (same dtype, the module's tolerance for the dtype) and, for
   T <= 2048, the float64 loop (vectorised over heads) at fp32.
3. Timing, B = 1, bf16, the benchmarks' gates (bench_gated_delta.py): ours fused recurrent kernel,
   ours chunked on matrix units ("mma": prep products and state pass) and on fp32 lanes
   ("simt"), the matrix path with MP 3 (three tf32 products) instead of bf16's MP 1, the
   parts (each prep kernel with the gates inside; each state pass alone; the matrix one also
   with 32 value rows per threadgroup on CUDA), and flash-linear-attention's
   chunk_gated_delta_rule (torch; skipped where it does not import), T in {2048, 8192, 32768},
   Hv 16 / 32 / 64 (--quick: Hv 32 only). Each
   contender: n calls chained through the state in one evaluated graph (torch: queued, then
   synchronised), contenders interleaved, best of 3 repeats, ms per call.

Ends with what to set: chunk_launch.MATRIX = True if every check passed, and the smallest T
from which "chunked mma" beats "ours fused" at every Hv (kernels/gated_delta/__init__.py
_GPU_CHUNKED_MIN_T; measured T only). Exit status 1 if any check fails (the timings still
print). JSON of everything to --out.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

# bench_gated_delta first: it imports qwen35_mlx before mlx (OpenBLAS on Linux).
from bench_gated_delta import Shape, _fla_contenders, _mlx_inputs  # isort: skip

import mlx.core as mx
import numpy as np

from qwen35_mlx.kernels.gated_delta import _gpu_backend, compute_gates
from qwen35_mlx.kernels.gated_delta import chunk_launch as cl

HK, D = 16, 128
RTOL = {mx.float32: 1e-5, mx.float16: 1e-2, mx.bfloat16: 2e-2}  # tests/conftest.py's tolerances
TILE_BODY = """
  gd_acc acc;
  gd_acc_load(acc, c_in, 16);
  gd_mma<MP, TA, TB>(acc, a, TA ? 16 : K, b, TB ? K : 16, K);
  gd_acc_store(acc, out, 16);
"""


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def check_tiles(backend: str) -> list[dict]:
    kern = getattr(mx.fast, f"{backend}_kernel")(
        name="gd_tile_check",
        input_names=["a", "b", "c_in"],
        output_names=["out"],
        source=cl.PROLOGUE[backend] + TILE_BODY,
        header=cl.header(backend),
    )
    rng = np.random.default_rng(7)
    K = 64
    a = rng.standard_normal((16, K)).astype(np.float32)
    b = rng.standard_normal((K, 16)).astype(np.float32)
    c = rng.standard_normal((16, 16)).astype(np.float32)
    want = c.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
    rows = []
    for mp in (1, 3):
        for ta in (False, True):
            for tb in (False, True):
                (out,) = kern(
                    inputs=[
                        mx.array(a.T.copy() if ta else a),
                        mx.array(b.T.copy() if tb else b),
                        mx.array(c),
                    ],
                    template=[("MP", mp), ("TA", ta), ("TB", tb), ("K", K)],
                    grid=(32, 1, 1),
                    threadgroup=(32, 1, 1),
                    output_shapes=[(16, 16)],
                    output_dtypes=[mx.float32],
                    init_value=float("nan"),
                )
                err = rel_err(np.array(out), want)
                ok = bool(np.isfinite(err) and err < (1e-2 if mp == 1 else 2e-6))
                rows.append({"MP": mp, "TA": ta, "TB": tb, "err": err, "ok": ok})
    return rows


def inputs(B: int, T: int, Hv: int, dtype, seed: int = 1):
    """q, k, v (dtype), raw gates (Mamba-style, as the benchmarks), a nonzero fp32 state, and a
    mask: row 0 all valid, row 1 left padding T/8 and a hole of T/16 at the middle."""
    key = mx.random.key(seed)
    kq, kk, kv, ka, kb, kA, kd, ks = mx.random.split(key, 8)

    def l2(x):
        return x * mx.rsqrt((x * x).sum(-1, keepdims=True) + 1e-6)

    q = (l2(mx.random.normal((B, T, HK, D), key=kq)) * D**-0.5).astype(dtype)
    k = l2(mx.random.normal((B, T, HK, D), key=kk)).astype(dtype)
    v = mx.random.normal((B, T, Hv, D), key=kv).astype(dtype)
    a = mx.random.normal((B, T, Hv), key=ka).astype(dtype)
    b = mx.random.normal((B, T, Hv), key=kb).astype(dtype)
    A_log = mx.log(mx.random.uniform(1.0, 16.0, (Hv,), key=kA))
    dt = mx.exp(mx.random.uniform(np.log(1e-3), np.log(1e-1), (Hv,), key=kd))
    dt_bias = dt + mx.log(-mx.expm1(-dt))
    state = 0.1 * mx.random.normal((B, Hv, D, D), key=ks)
    m = np.ones((B, T), bool)
    if B > 1:
        m[1, : T // 8] = False
        m[1, T // 2 : T // 2 + T // 16] = False
    return q, k, v, a, b, A_log, dt_bias, state, mx.array(m)


def float64_loop(q, k, v, g, beta, state, mask):
    """The gated delta rule in float64, vectorised over batch and heads (loop over T)."""
    f = [np.asarray(x.astype(mx.float32), np.float64) for x in (q, k, v, g, beta, state)]
    q, k, v, g, beta, S = f
    m = np.asarray(mask)
    B, T, Hk, _ = q.shape
    Hv = v.shape[2]
    rep = Hv // Hk
    y = np.zeros(v.shape)
    for t in range(T):
        kt = np.repeat(k[:, t], rep, axis=1)  # [B, Hv, Dk]
        qt = np.repeat(q[:, t], rep, axis=1)
        Sn = S * g[:, t, :, None, None]
        delta = (v[:, t] - np.einsum("bhvd,bhd->bhv", Sn, kt)) * beta[:, t, :, None]
        Sn = Sn + delta[..., None] * kt[:, :, None, :]
        keep = m[:, t][:, None, None, None]
        S = np.where(keep, Sn, S)
        y[:, t] = np.where(m[:, t][:, None, None], np.einsum("bhvd,bhd->bhv", S, qt), 0.0)
    return y, S


def check_shapes(backend: str, ts, hvs) -> list[dict]:
    fused = _gpu_backend(backend)
    rows = []
    for hv in hvs:
        for T in ts:
            for dtype in (mx.float32, mx.bfloat16):
                q, k, v, a, b, A_log, dt_bias, state, mask = inputs(2, T, hv, dtype)
                want = fused.gated_delta_update_kernel(q, k, v, a, b, A_log, dt_bias, state, mask)
                mx.eval(want)
                exact = None
                if dtype == mx.float32 and T <= 2048:
                    with mx.stream(mx.cpu):
                        g, beta = compute_gates(a, b, A_log, dt_bias)
                        mx.eval(g, beta)
                    exact = float64_loop(q, k, v, g, beta, state, mask)
                for name, matrix in (("mma", True), ("simt", False)):
                    y, s = cl.gated_delta_update_chunk_kernel(
                        q, k, v, a, b, A_log, dt_bias, state, mask,
                        backend=backend, init_value=float("nan"), matrix=matrix, split=False,
                    )  # fmt: skip
                    mx.eval(y, s)
                    y32, s32 = np.array(y.astype(mx.float32)), np.array(s)
                    row = {"T": T, "Hv": hv, "dtype": str(dtype).rsplit(".", 1)[-1]}
                    row |= {"state pass": name}
                    row["vs fused y"] = rel_err(y32, np.array(want[0].astype(mx.float32)))
                    row["vs fused state"] = rel_err(s32, np.array(want[1]))
                    errs = [row["vs fused y"], row["vs fused state"]]
                    if exact is not None:
                        row["vs f64 y"] = rel_err(y32, exact[0])
                        row["vs f64 state"] = rel_err(s32, exact[1])
                        errs += [row["vs f64 y"], row["vs f64 state"]]
                    finite = bool(np.isfinite(y32).all() and np.isfinite(s32).all())
                    row["ok"] = finite and max(errs) <= RTOL[dtype]
                    rows.append(row)
                    print(
                        f"  check T={T:6d} Hv={hv:3d} {row['dtype']:8s} {name:4s} "
                        + "  ".join(f"{k} {x:.2e}" for k, x in row.items() if k.startswith("vs"))
                        + ("  ok" if row["ok"] else "  FAILED"),
                        flush=True,
                    )
                del want, exact
    return rows


def chained(step, state0, n: int) -> float:
    t0 = time.perf_counter()
    state, ys = state0, []
    for _ in range(n):
        y, state = step(state)
        ys.append(y)
    mx.eval(ys, state)
    return time.perf_counter() - t0


def _timers(backend: str, shape: Shape, fla) -> dict:
    """name -> run(n) (seconds for n chained calls) of every contender and part at shape."""
    fused = _gpu_backend(backend)
    q, k, v, a, b, A_log, dt_bias, state0 = _mlx_inputs(shape)
    gates = (a, b, A_log, dt_bias)
    pieces = cl.prep_kernel(backend, q, k, v, None, None, None, raw_gates=gates)
    mx.eval(pieces)

    def chunk(matrix):
        return lambda s: cl.gated_delta_update_chunk_kernel(
            q, k, v, *gates, s, backend=backend, matrix=matrix, split=False
        )

    def state(matrix, bv=None):
        return lambda s: cl.state_pass(backend, pieces, s, shape.T, v.dtype, matrix=matrix, bv=bv)

    def prep(matrix):
        return lambda s: (
            cl.prep_kernel(backend, q, k, v, None, None, None, raw_gates=gates, matrix=matrix)[0],
            s,
        )

    def mp3(s):
        """The matrix path with three tf32 products (MP 3) although the activations are bf16."""
        old = cl.MATRIX_PRECISION
        cl.MATRIX_PRECISION = 3
        try:
            return chunk(True)(s)
        finally:
            cl.MATRIX_PRECISION = old

    steps = {
        "ours fused": lambda s: fused.gated_delta_update_kernel(q, k, v, *gates, s),
        "chunked mma": chunk(True),
        "chunked mma mp3": mp3,
        "chunked simt": chunk(False),
        "prep mma": prep(True),
        "prep simt": prep(False),
        "state mma": state(True),
        "state simt": state(False),
    }
    for bv in cl.MMA_BV_CHOICES[backend]:
        if bv != cl.MMA_BV:
            steps[f"state mma bv{bv}"] = state(True, bv)
    timers = {name: (lambda n, f=f: chained(f, state0, n)) for name, f in steps.items()}
    for name, c in fla.items():
        timers[name.split(" (")[0]] = c.make(shape)
    return timers


def time_shapes(backend: str, ts, hvs) -> list[dict]:
    fla = {c.name: c for c in _fla_contenders() if c.name.startswith("fla chunk")}
    rows = []
    for hv in hvs:
        for T in ts:
            timers = _timers(backend, Shape(1, T, hv), fla)
            n = max(2, min(50, 65536 // T))
            for run in timers.values():
                run(1)  # warm-up: compile, caches, autotune
            best = {}
            for _ in range(3):
                for name, run in timers.items():
                    best[name] = min(best.get(name, float("inf")), run(n) / n * 1e3)
            rows.append({"T": T, "Hv": hv, "n": n, "ms": best})
            print(
                f"  time T={T:6d} Hv={hv:3d} " + "  ".join(f"{k} {x:.3f}" for k, x in best.items()),
                flush=True,
            )
    return rows


def table(rows) -> str:
    names = list(rows[0]["ms"])
    head = f"{'ms per call':14s}" + "".join(f"{n:>14s}" for n in names)
    lines = [head]
    for r in rows:
        ms = r["ms"]
        cells = "".join(f"{ms[n]:14.3f}" for n in names)
        lines.append(f"T={r['T']:<6d}Hv={r['Hv']:<3d} " + cells)
        if "fla chunk" in ms:
            ratio = "".join(
                f"{ms[n] / ms['fla chunk']:13.2f}x"
                if n.startswith(("ours", "chunked"))
                else " " * 14
                for n in names
            )
            lines.append(f"{'  / fla chunk':14s}" + ratio)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Hv 32 only, T up to 8192 in the checks")
    p.add_argument("--out", default="benchmarks/out")
    args = p.parse_args(argv)
    backend = cl.available_backend()
    if backend is None:
        raise SystemExit("chunk_mma_gpu: needs MLX with a Metal or CUDA GPU")
    hvs = (32,) if args.quick else (16, 32, 64)
    check_ts = (512, 2048, 8192) if args.quick else (512, 2048, 8192, 32768)
    print(f"device {mx.default_device()} backend {backend} mlx {mx.__version__}", flush=True)
    print("1. tile layer vs float64", flush=True)
    tiles = check_tiles(backend)
    for r in tiles:
        print(
            f"  MP={r['MP']} TA={r['TA']:d} TB={r['TB']:d} err {r['err']:.2e}",
            "ok" if r["ok"] else "FAILED",
        )
    print("2. chunked (mma / simt state pass) vs fused kernel and float64", flush=True)
    checks = check_shapes(backend, check_ts, hvs)
    print("3. timing (bf16, B=1, Hk=16, Dk=Dv=128)", flush=True)
    times = time_shapes(backend, (2048, 8192, 32768), hvs)
    print(table(times))
    failed = [r for r in tiles + checks if not r["ok"]]
    print(f"checks: {len(tiles) + len(checks) - len(failed)} ok, {len(failed)} failed")
    if failed:
        print("keep chunk_launch.MATRIX = False (a check failed)")
    else:
        print("every check passed: chunk_launch.MATRIX = True may be set")
    wins = {}
    for r in times:
        wins.setdefault(r["T"], []).append(r["ms"]["chunked mma"] < r["ms"]["ours fused"])
    ok = [T for T in sorted(wins) if all(all(wins[u]) for u in wins if u >= T)]
    print(
        f"suggested _GPU_CHUNKED_MIN_T: {ok[0] if ok else 'None (the fused kernel wins somewhere)'}"
    )
    write_result(args.out, "mma", backend, {"tiles": tiles, "checks": checks, "times": times})
    return 1 if failed else 0


def write_result(out_dir, kind: str, backend: str, parts: dict) -> tuple[Path, dict]:
    """`parts` after the device, MLX's version and the date, written as JSON to
    out_dir/chunk_<kind>_<backend>_<date>.json (the folder made if need be); returns the path
    and the dict written, for a caller that adds to it and writes it again."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    path = out / f"chunk_{kind}_{backend}_{stamp}.json"
    info = {"device": str(mx.default_device()), "mlx": mx.__version__, "date": stamp} | parts
    path.write_text(json.dumps(info, indent=1))
    print(f"wrote {path}", flush=True)
    return path, info


if __name__ == "__main__":
    sys.exit(main())
