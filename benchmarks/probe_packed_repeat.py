"""Repeats the packed decode kernel's one GPU test failure of session 16 (2026-12-03 14:02 UTC,
`test_packed_tokens_match_ref[B1Hk16Hv16Dk128Dv128-1-True-mlx.core.bfloat16]`: y 0.197 off
MLX's CPU-stream reference, every element finite), in fresh processes side by side (the failing
run had two pytest-xdist workers on that file), and says which side is wrong when a check fails.

Each worker runs rounds until --rounds, or --seconds after its round 0. Round r, for the masked
case (the one that failed) and then the unmasked one (the same math at B = 1; it never failed),
on inputs of seed 2 in round 0 (the test's own) and 1000 + r after:
  kernel   the packed kernel (T = 1, gated norm; outputs start as NaN), as the test calls it
  MLX ref  MLX's `ref` ops on the CPU stream, fed (worker i: --refs' (i mod n)th) the GPU's
           arrays straight away, as the test did until session 16 ("gpu"), or host copies of
           them, as it does now ("host"), or none; the test's check: kernel within bf16's
           tolerance of it. When that fails, the float64 loop (tests/kernels/helpers.packed_np)
           says which side is off (the one further from it; bf16's own error against float64
           varies with the inputs, up to 0.07 over 400 seeds, so float64 alone cannot judge)
  repeats  the kernel --repeats more times on the same inputs: bit for bit its first output
and, each round, the round-0 masked inputs once more: bit for bit round 0's output. The kernel
has no atomics and a fixed order of summation, so a repeat that differs is a race, a read of
memory nothing wrote, or the machine. The first three failures' inputs and outputs go to --save
as .npz.

--generations G runs G such sets of workers one after another (each worker's round 0 is a
first call: the failures of the kind in NOTES sessions 10-11 came only there). The workers of
a generation share one fresh TMPDIR (MLX's CPU backend compiles its fused kernels into
TMPDIR/mlx/<version>/cpu and loads any library it finds there, with no lock between processes:
fresh, every worker compiles the reference's kernels at once, as on a fresh machine); --private-
tmp K gives the first K workers a TMPDIR of their own, --no-graphs K runs the last K without CUDA
graphs (MLX_USE_CUDA_GRAPHS=0). --kernel ops puts MLX's ops on the default device in the
kernel's place (a check of the probe itself on a machine without a GPU).

    PYTHONPATH=src:. python benchmarks/probe_packed_repeat.py --workers 4 --out $OUT/probe.json

Prints a line per worker and a verdict; exits 1 if any check failed or any repeat differed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worker_pool  # noqa: E402

os.environ.setdefault("MLX_ENABLE_TF32", "0")  # as tests/conftest.py

SHAPE = (1, 16, 16, 128, 128)  # (B, Hk, Hv, Dk, Dv) of the failing case; T = 1, bf16
T = 1


def worker(args) -> dict:
    """One process's run (the module docstring); its record as a dict."""
    # isort: off
    import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
    import mlx.core as mx
    import numpy as np

    # isort: on
    from tests.conftest import RTOL, rel_err
    from tests.kernels import test_gpu_decode_tokens as g
    from tests.kernels.helpers import np64, packed_np

    from qwen35_mlx.kernels.gated_delta import gated_delta_decode_packed

    B, Hk, Hv, Dk, Dv = SHAPE
    dims = (Hk, Dk, Hv, Dv)
    dtype = mx.bfloat16
    tol = RTOL[dtype]
    kw = dict(num_k_heads=Hk, head_k_dim=Dk, num_v_heads=Hv, head_v_dim=Dv, norm_eps=1e-6)
    saved: list[str] = []

    def kernel(x, mask) -> np.ndarray:
        if args.kernel == "gpu":
            y, _ = g.kernel(x, T, mask, dims)
        else:
            y, *_ = gated_delta_decode_packed(
                *[x[n] for n in g.NAMES], tokens=T, mask=mask, backend="ref", **kw
            )
        return np.array(y.astype(mx.float32))

    def mlx_ref(x, mask) -> np.ndarray | None:
        """MLX's ops on the CPU stream: fed the GPU's arrays (gpu) or host copies (host)."""
        if args.ref == "none":
            return None
        if args.ref == "host":
            y, _ = g.reference(x, T, mask, dims)
            return np.array(y.astype(mx.float32))
        with mx.stream(mx.cpu):
            y, s, cs, _ = gated_delta_decode_packed(
                *[x[n] for n in g.NAMES], tokens=T, mask=mask, backend="ref", **kw
            )
            mx.eval(y, s, cs)
        return np.array(y.astype(mx.float32))

    def float64(x, mask) -> np.ndarray:
        m = None if mask is None else np.array(mask)
        y64 = packed_np({n: np64(x[n]) for n in g.NAMES}, m, T, dims, 1e-6)[0]
        return y64.reshape(B * T, Hv * Dv)

    def where_off(got, want) -> dict:
        d = np.abs(got - want)
        off = d > 0.01 * np.abs(want).max()
        heads = sorted({int(i) % (Hv * Dv) // Dv for i in np.nonzero(off.reshape(-1))[0]})
        i = int(np.argmax(d))
        pair = [float(got.reshape(-1)[i]), float(want.reshape(-1)[i])]
        return {"count": int(off.sum()), "heads": heads, "worst_index": i, "worst": pair}

    def save(name, x, mask, **outs) -> str | None:
        if args.save is None or len(saved) >= 3:
            return None
        args.save.mkdir(parents=True, exist_ok=True)
        f = args.save / f"{name}_{os.getpid()}_{len(saved)}.npz"
        arrays = {n: np.array(x[n].astype(mx.float32)) for n in g.NAMES}
        arrays.update(outs, mask=np.array(mask) if mask is not None else np.ones((B, T), bool))
        np.savez(f, **arrays)
        saved.append(str(f))
        return str(f)

    rec: dict = {"pid": os.getpid(), "graphs": os.environ.get("MLX_USE_CUDA_GRAPHS")}
    rec.update(ref=args.ref, kernel=args.kernel, tmpdir=os.environ.get("TMPDIR"))
    stats = {
        m: {
            "runs": 0,
            "fails": 0,
            "kernel_off": 0,
            "ref_off": 0,
            "repeats": 0,
            "repeat_differ": 0,
            "max_kernel_vs_ref": 0.0,
            "max_kernel_vs_f64": 0.0,
        }  # fmt: skip
        for m in ("mask", "nomask")
    }
    failures: list[dict] = []
    x0 = y0 = None
    again = {"runs": 0, "differ": 0}
    t0 = time.perf_counter()
    r = 0
    t1 = t0  # round 0's end (its first calls compile): --seconds counts from there
    while r < args.rounds and (r == 0 or time.perf_counter() - t1 < args.seconds):
        for name in ("mask", "nomask"):
            st = stats[name]
            x = g.inputs(B, T, Hk, Hv, Dk, Dv, dtype, seed=2 if r == 0 else 1000 + r)
            mask = g.masks(B, T) if name == "mask" else None
            y = kernel(x, mask)
            yr = mlx_ref(x, mask)  # before anything else reads x on the host, as the test did
            y64 = float64(x, mask)
            ek = rel_err(y, y64)
            st["runs"] += 1
            st["max_kernel_vs_f64"] = max(st["max_kernel_vs_f64"], ek)
            if yr is not None:
                ekr, er = rel_err(y, yr), rel_err(yr, y64)
                st["max_kernel_vs_ref"] = max(st["max_kernel_vs_ref"], ekr)
                if ekr > tol:  # the test's assertion failed: float64 says which side is off
                    side = "kernel" if ek > er else "ref"
                    st["fails"] += 1
                    st[f"{side}_off"] += 1
                    f = {"case": name, "round": r, "off": side, "kernel_vs_ref": ekr}
                    f.update(kernel_vs_float64=ek, ref_vs_float64=er)
                    f["where"] = where_off(y if side == "kernel" else yr, y64)
                    f["saved"] = save(name, x, mask, y=y, y_ref=yr, y64=y64)
                    failures.append(f)
            for _ in range(args.repeats):
                st["repeats"] += 1
                y2 = kernel(x, mask)
                if y2.tobytes() != y.tobytes():
                    st["repeat_differ"] += 1
                    failures.append({"case": name, "round": r, "repeat": where_off(y2, y)})
            if r == 0 and name == "mask":
                x0, y0 = x, y
        if r > 0:
            again["runs"] += 1
            y2 = kernel(x0, g.masks(B, T))
            if y2.tobytes() != y0.tobytes():
                again["differ"] += 1
                failures.append({"case": "mask seed 2", "round": r, "again": where_off(y2, y0)})
        if r == 0:
            t1 = time.perf_counter()
            rec["first_seconds"] = t1 - t0
        r += 1
    rec.update(rounds=r, seconds=time.perf_counter() - t0, stats=stats, again=again)
    rec["failures"] = failures[:20]
    rec["n_failures"] = len(failures)
    return rec


def report(i: int, rec: dict) -> int:
    """Prints worker i's record (a line a case, then what failed or differed); returns how many
    checks failed and repeats differed."""
    print(
        f"worker {i} (kernel {rec['kernel']}, graphs {rec['graphs'] or 'on'}, ref {rec['ref']}, "
        f"TMPDIR {rec['tmpdir'] or 'default'}): {rec['rounds']} rounds in {rec['seconds']:.0f} s "
        f"(round 0 {rec['first_seconds']:.1f} s); seed-2 masked again: {rec['again']['differ']} "
        f"of {rec['again']['runs']} differ"
    )
    for name, st in rec["stats"].items():
        print(
            f"  {name:6s}: kernel vs MLX ref over tolerance {st['fails']} of {st['runs']} "
            f"(float64 blames kernel {st['kernel_off']}, ref {st['ref_off']}; worst kernel vs ref "
            f"{st['max_kernel_vs_ref']:.2e}, kernel vs float64 {st['max_kernel_vs_f64']:.2e}); "
            f"repeats differing {st['repeat_differ']} of {st['repeats']}"
        )
    for f in rec["failures"][:5]:
        print(f"  {f}")
    return rec["n_failures"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4, help="processes side by side")
    p.add_argument("--generations", type=int, default=1, help="worker sets, one after another")
    p.add_argument("--rounds", type=int, default=300, help="rounds per worker at most")
    p.add_argument("--seconds", type=float, default=60.0, help="rounds after round 0 this long")
    p.add_argument("--repeats", type=int, default=2, help="kernel repeats a case and round")
    p.add_argument(
        "--refs", default="gpu,host", help="MLX refs, worker i the (i mod n)th: gpu, host, none"
    )
    p.add_argument("--kernel", choices=("gpu", "ops"), default="gpu", help="ops: probe check")
    p.add_argument("--no-graphs", type=int, default=0, help="workers without CUDA graphs")
    p.add_argument("--private-tmp", type=int, default=0, help="workers with a TMPDIR of their own")
    p.add_argument("--save", type=Path, default=None, help="folder for failing cases' .npz")
    p.add_argument("--out", type=Path, default=None, help="the JSON record")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ref", default="gpu", help=argparse.SUPPRESS)  # a worker's
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    refs = args.refs.split(",")
    assert all(r in ("gpu", "host", "none") for r in refs), refs
    records, bad = [], 0
    for gen in range(args.generations):
        shared = tempfile.mkdtemp(prefix=f"probe_packed_g{gen}_")
        cmds = []
        for i in range(args.workers):
            cmd = [sys.executable, __file__, "--worker", "--rounds", str(args.rounds)]
            cmd += ["--seconds", str(args.seconds), "--repeats", str(args.repeats)]
            cmd += ["--ref", refs[i % len(refs)], "--kernel", args.kernel]
            cmd += ["--save", str(args.save)] if args.save else []
            cmds.append(cmd)
        procs = worker_pool.start(
            cmds,
            no_graphs=args.no_graphs,
            private_tmp=args.private_tmp,
            shared_tmp=shared,
            prefix=f"probe_g{gen}w",
        )
        print(f"generation {gen} (fresh TMPDIR {shared}):")
        recs, n = worker_pool.collect(procs, report, {"generation": gen})
        records += recs
        bad += n
    return worker_pool.finish(records, bad, args.out)


if __name__ == "__main__":
    sys.exit(main())
