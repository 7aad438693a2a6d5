"""Repeats the chunk-kernel test case that failed once on the H200 (2026-12-02, session 10:
test_chunk_kernel_matches_ref[simt-B1T63Hk1Hv4Dk128Dv64-scalar-nomask], y outside fp32's
tolerance, every element finite) and its siblings, in worker processes side by side (the failing
run had five pytest processes on the GPU at once).

Each worker is a fresh process. It runs, on one chunk path (the test file's fixture: simt, mma,
split, split_o2):
  first    the failing case on the test's own inputs (seed 0), right after its kernels compile
  rounds   until --reps or --seconds: the six cases (scalar / per-key gates x no mask, left
           padding, holes) of the shape that ran just before it in the test file (B3T2Hk2Hv4
           Dk64Dv32), then the six cases of the failing shape, both on fresh inputs (seed = the
           round), each held to the reference by tests/kernels/gpu.check (as the test does);
           then the failing case's seed-0 inputs again: y, state and (simt, mma) the prep
           kernel's pieces compared bit for bit with the first round's. The kernels have no
           atomics and a fixed order of summation, so a difference there is a race, a read of
           memory nothing wrote, or the machine.
The reference is --ref: "f64", the float64 NumPy loop the GPU tests use since session 11, or
"mlx", MLX's own fp32 reference (`gated_delta_ref`) on the CPU stream after evaluating the inputs
and synchronising, which the tests used before: in session 10's and 11's runs about half of the
workers had that reference wrong on their first call of a shape (the kernel within 3e-7 of
float64). --private-tmp K gives the first K workers a TMPDIR of their own, which is where MLX's
CPU backend writes and loads the shared libraries of its compiled kernels
(temp_directory_path()/mlx/<version>/cpu: a library found there is loaded, one not found is
written there, with no lock between processes): if only the workers sharing /tmp fail, that race
is the cause.
A failed check also reports the float64 loop's error of the kernel and of the reference (which
side is wrong), and the first three failures' inputs and outputs go to --save as .npz.

    PYTHONPATH=src:. python benchmarks/probe_chunk_repeat.py --workers 4 --out $OUT/probe.json

Prints a line per worker and a verdict; exits 1 if any check failed or any repeat differed.
--paths simt,split,... gives worker i path i mod len; --no-graphs K runs the last K workers with
MLX_USE_CUDA_GRAPHS=0 (MLX launching each kernel itself instead of through CUDA graphs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worker_pool  # noqa: E402

os.environ.setdefault("MLX_ENABLE_TF32", "0")  # as tests/conftest.py: fp32 matmuls in fp32

FAILED = (1, 63, 1, 4, 128, 64)  # (B, T, Hk, Hv, Dk, Dv) of the case that failed
BEFORE = (3, 2, 2, 4, 64, 32)  # the shape whose cases ran just before it
CASES = [(per_key, masked) for per_key in (False, True) for masked in ("nomask", "pad", "holes")]
PATHS = ("simt", "mma", "split", "split_o2")


def case_id(shape, per_key: bool, masked: str) -> str:
    dims = "B{}T{}Hk{}Hv{}Dk{}Dv{}".format(*shape)
    return f"{dims}-{'perkey' if per_key else 'scalar'}-{masked}"


def worker(path: str, reps: int, seconds: float, save: Path | None, ref: str) -> dict:
    """One process's run (the module docstring); its record as a dict."""
    # isort: off
    import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
    import mlx.core as mx
    import numpy as np

    # isort: on
    from tests.conftest import rel_err
    from tests.kernels import gpu
    from tests.kernels.helpers import gated_delta_np
    from tests.kernels.test_gpu_chunk_kernel import _holes

    from qwen35_mlx.kernels.gated_delta import chunk_launch as cl
    from qwen35_mlx.kernels.gated_delta.ref import gated_delta_ref

    cl.MATRIX, cl.SPLIT, cl.O2 = path == "mma", path.startswith("split"), path == "split_o2"
    f32 = mx.float32
    saved = []

    def inputs(shape, per_key, masked, seed):
        B, T = shape[:2]
        pad = gpu.pads(B, T) if masked == "pad" else None
        x = gpu.kernel_inputs(*shape, per_key=per_key, pad=pad, seed=seed)
        if masked == "holes":
            x["mask"] = _holes(B, T)
        return x

    def run(x):
        return gpu.run_kernel(cl.gated_delta_chunk_kernel, x, backend=gpu.BACKEND, prep="auto")

    def judge(name, x, got) -> tuple[list[float], dict | None]:
        """([rel_err of y, of state] against the reference, None or what the failed check
        found)."""
        if ref == "mlx":
            mx.eval([a for a in x.values() if a is not None])
            mx.synchronize()
            with mx.stream(mx.cpu):
                args = (x[n] for n in ("q", "k", "v", "g", "beta", "state", "mask"))
                want = gated_delta_ref(*args)
                mx.eval(want)
        else:
            want = gpu.ref(x)
        errs = [
            rel_err(np.array(a.astype(f32)), np.array(b.astype(f32)))
            for a, b in zip(got, want, strict=True)
        ]
        try:
            gpu.check(got, want, f32)
            return errs, None
        except AssertionError as e:
            names = ("q", "k", "v", "g", "beta", "state", "mask")
            y64, s64 = gated_delta_np(*(x[n] for n in names))
            found = {
                "case": name,
                "check": str(e),
                "kernel_vs_float64": [
                    rel_err(np.array(got[0]), y64),
                    rel_err(np.array(got[1]), s64),
                ],
                "ref_vs_float64": [
                    rel_err(np.array(want[0]), y64),
                    rel_err(np.array(want[1]), s64),
                ],
            }
            if save is not None and len(saved) < 3:
                save.mkdir(parents=True, exist_ok=True)
                f = save / f"{path}_{os.getpid()}_{len(saved)}.npz"
                arrays = {n: np.array(a) for n, a in x.items() if a is not None}
                arrays.update(y=np.array(got[0]), s=np.array(got[1]))
                arrays.update(y_ref=np.array(want[0]), s_ref=np.array(want[1]))
                np.savez(f, **arrays)
                saved.append(str(f))
                found["saved"] = str(f)
            return errs, found

    def pieces(x):
        if path.startswith("split"):
            return []
        args = (x["q"], x["k"], x["v"], x["g"], x["beta"], None)
        p = cl.prep_kernel(gpu.BACKEND, *args, matrix=path == "mma", init_value=float("nan"))
        mx.eval(p)
        return [np.array(a) for a in p]

    rec: dict = {"path": path, "pid": os.getpid(), "graphs": os.environ.get("MLX_USE_CUDA_GRAPHS")}
    rec.update(ref=ref, tmpdir=os.environ.get("TMPDIR"))
    t0 = time.perf_counter()
    x0 = inputs(FAILED, False, "nomask", 0)
    first = run(x0)
    errs, found = judge(case_id(FAILED, False, "nomask"), x0, first)
    rec["first"] = {"seconds": time.perf_counter() - t0, "rel_err": errs, "failed": found}
    first_np = [np.array(a) for a in first]
    first_pieces = pieces(x0)
    cases = {case_id(s, pk, m): {"runs": 0, "fails": 0, "max_rel_err": [0.0, 0.0]}
             for s in (BEFORE, FAILED) for pk, m in CASES}  # fmt: skip
    failures, repeat = [], {"runs": 0, "differ": 0, "pieces_differ": 0, "diffs": []}
    t1 = time.perf_counter()
    rounds = 0
    while rounds < reps and time.perf_counter() - t1 < seconds:
        for shape in (BEFORE, FAILED):
            for per_key, masked in CASES:
                name = case_id(shape, per_key, masked)
                x = inputs(shape, per_key, masked, rounds)
                errs, found = judge(name, x, run(x))
                c = cases[name]
                c["runs"] += 1
                c["max_rel_err"] = [max(a, b) for a, b in zip(c["max_rel_err"], errs, strict=True)]
                if found:
                    c["fails"] += 1
                    found["round"] = rounds
                    failures.append(found)
        again = [np.array(a) for a in run(x0)]
        repeat["runs"] += 1
        same = [a.tobytes() == b.tobytes() for a, b in zip(again, first_np, strict=True)]
        if not all(same):
            repeat["differ"] += 1
            d = {
                "round": rounds,
                "outputs_differ": [n for n, s in zip("ys", same, strict=True) if not s],
            }
            for n, a, b in zip("ys", again, first_np, strict=True):
                ne = np.argwhere(~((a == b) | (np.isnan(a) & np.isnan(b))))
                d[n] = {"count": len(ne), "first": ne[0].tolist() if len(ne) else None,
                        "max_abs": float(np.nanmax(np.abs(a - b))) if len(ne) else 0.0}  # fmt: skip
            if len(repeat["diffs"]) < 5:
                repeat["diffs"].append(d)
        if first_pieces:
            names = ("W", "U", "Qg", "P", "Kw", "decay")
            bad = [
                n
                for n, a, b in zip(names, pieces(x0), first_pieces, strict=True)
                if a.tobytes() != b.tobytes()
            ]
            if bad:
                repeat["pieces_differ"] += 1
                if len(repeat["diffs"]) < 5:
                    repeat["diffs"].append({"round": rounds, "pieces_differ": bad})
        rounds += 1
    rec.update(rounds=rounds, seconds=time.perf_counter() - t0, cases=cases, repeat=repeat)
    rec["failures"] = failures[:10]
    rec["n_failures"] = len(failures)
    return rec


def report(i: int, rec: dict) -> int:
    """Prints worker i's record `rec` (a line, then what failed or differed); returns how many
    checks failed and repeats differed."""
    first, rep = rec["first"], rec["repeat"]
    worst = max((c["max_rel_err"][0] for c in rec["cases"].values()), default=0.0)
    print(
        f"worker {i} ({rec['path']}, graphs {rec['graphs'] or 'on'}, ref {rec['ref']}, "
        f"TMPDIR {rec['tmpdir'] or 'shared'}): first call "
        f"{'FAILED' if first['failed'] else 'ok'} ({first['seconds']:.1f} s, y rel_err "
        f"{first['rel_err'][0]:.2e}); {rec['rounds']} rounds, {rec['n_failures']} failed "
        f"checks of {sum(c['runs'] for c in rec['cases'].values())}, worst y rel_err "
        f"{worst:.2e}; seed-0 repeats {rep['differ']} of {rep['runs']} differ, pieces "
        f"{rep['pieces_differ']}"
    )
    for f in ([first["failed"]] if first["failed"] else []) + rec["failures"][:3]:
        print(f"  {f['case']} (round {f.get('round', 'first')}): {f['check']}")
        print(f"    against float64: kernel {f['kernel_vs_float64']}, ref {f['ref_vs_float64']}")
    for d in rep["diffs"][:3]:
        print(f"  repeat differs: {d}")
    return bool(first["failed"]) + rec["n_failures"] + rep["differ"] + rep["pieces_differ"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4, help="processes side by side")
    p.add_argument(
        "--paths", default="simt", help="chunk paths, comma-separated: " + ",".join(PATHS)
    )
    p.add_argument("--reps", type=int, default=200, help="rounds per worker at most")
    p.add_argument("--seconds", type=float, default=100.0, help="rounds stop after this long")
    p.add_argument("--no-graphs", type=int, default=0, help="workers without CUDA graphs")
    p.add_argument("--save", type=Path, default=None, help="folder for failing cases' .npz")
    p.add_argument("--ref", choices=("f64", "mlx"), default="f64", help="the reference (above)")
    p.add_argument("--private-tmp", type=int, default=0, help="workers with a TMPDIR of their own")
    p.add_argument("--out", type=Path, default=None, help="the JSON record")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a worker's path
    args = p.parse_args(argv)
    if args.worker is not None:
        rec = worker(args.worker, args.reps, args.seconds, args.save, args.ref)
        print(json.dumps(rec))
        return 0
    paths = args.paths.split(",")
    assert all(x in PATHS for x in paths), paths
    cmds = []
    for i in range(args.workers):
        cmd = [sys.executable, __file__, "--worker", paths[i % len(paths)]]
        cmd += ["--reps", str(args.reps), "--ref", args.ref, "--seconds", str(args.seconds)]
        cmds.append(cmd + (["--save", str(args.save)] if args.save else []))
    procs = worker_pool.start(cmds, no_graphs=args.no_graphs, private_tmp=args.private_tmp)
    records, bad = worker_pool.collect(procs, report)
    return worker_pool.finish(records, bad, args.out)


if __name__ == "__main__":
    sys.exit(main())
