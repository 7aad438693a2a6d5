"""Where a call's CPU time goes, by thread and by kind (Linux `perf`): the tiny model's compiled
one-token step (S), 2-token verify pass (V2), fused greedy k = 1 round (R1) and MTP head over one
position (H1), as `probe_mtp_round.py` runs them, alternated block by block in one process.

MLX runs a CPU stream's work on its own thread: the caller's thread builds the graph and
dispatches every primitive (MLX's graph walk, allocation, the task queue), the stream's thread
computes. The two overlap, so a call's wall time is about the larger of the two; its CPU time is
their sum. `perf record` samples both (CLOCK_MONOTONIC timestamps); each mode's blocks are its
time windows; samples are sorted into the caller's thread (the one running Python) and the rest,
and by kind: MLX's fused float16/float32 elementwise kernels (JIT-compiled libraries, by name),
the native extension, libc's malloc, the kernel (context switches, futexes), MLX's graph code,
Python. Figures are microseconds a call (samples x period / calls).

    python benchmarks/perf_mtp_threads.py                      # S, V2, R1, H1
    python benchmarks/perf_mtp_threads.py --modes S,V2 --blocks 10 --iters 200

Needs `perf` (and perf_event_paranoid <= 2 for one's own processes); --run is the child.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HZ = 5000


def kind(dso: str, sym: str) -> str:
    if dso.startswith("lib") and any(t in dso for t in ("_VV", "_V_", "contiguous", "strided")):
        return "jit: " + ("exp/fma (inlined helpers)" if sym.startswith("mlx") else sym[:28])
    if dso.startswith("_qwen35"):
        return "native extension"
    if "kernel" in dso:
        return "kernel (switches, futex)"
    if dso.startswith(("libpython", "core.cpython")):
        return "python"
    if any(t in sym for t in ("malloc", "free", "unlink_chunk", "consolidate", "Allocator")):
        return "malloc/free"
    if dso.startswith(("libc", "libstdc")):
        return "libc/libstdc++ other"
    if dso.startswith("libmlx"):
        for t in ("copy_", "arg_reduce", "reduce", "gather", "gemm"):
            if t in sym:
                return "mlx op: " + t
        return "mlx graph/dispatch"
    if dso.startswith("libm."):
        return "libm"
    return "other"


def child(args) -> None:
    """The timed process: the calls of probe_mtp_round.py, windows written as JSON."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from probe_mtp_round import probe_calls

    import qwen35_mlx  # noqa: F401  (first: its BLAS preload)
    from qwen35_mlx import load
    from qwen35_mlx.models import text as text_mod

    text_mod.CPU_FP32_DECODE = args.fp32_decode
    model, _ = load(Path(qwen35_mlx.__file__).parent / "assets" / "tiny")
    fns = probe_calls(model, args.context)
    modes = args.modes.split(",")
    for m in modes:
        for _ in range(10):
            fns[m]()
    wins = {m: [] for m in modes}
    for b in range(args.blocks):
        for m in modes if b % 2 == 0 else modes[::-1]:
            t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
            for _ in range(args.iters):
                fns[m]()
            wins[m].append((t0, time.clock_gettime(time.CLOCK_MONOTONIC)))
    Path(args.run).write_text(json.dumps(wins))


def split(report: str, calls: int) -> dict:
    """perf report lines (pid, dso, symbol) -> {thread: {kind: us a call}}."""
    by = collections.defaultdict(collections.Counter)
    for line in report.splitlines():
        p = line.split()
        if len(p) < 5 or line.startswith("#") or not p[1].isdigit():
            continue
        sym = line.split("] ", 1)[1].strip() if "] " in line else p[-1]
        by[p[2]][kind(p[3], sym)] += int(p[1]) * 1e6 / HZ / calls
    tids = sorted(by, key=lambda t: -by[t]["python"])
    worker = collections.Counter()
    for t in tids[1:]:
        worker.update(by[t])
    return {"caller": dict(by[tids[0]]) if tids else {}, "stream": dict(worker)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="S,V2,R1,H1")
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--fp32-decode", default="all", choices=["head", "all"])
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        child(args)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        data, wins = Path(tmp) / "perf.data", Path(tmp) / "wins.json"
        cmd = ["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-F", str(HZ), "-o", str(data),
               sys.executable, __file__, "--run", str(wins), *(argv or sys.argv[1:])]  # fmt: skip
        subprocess.run(cmd, check=True, env=os.environ.copy())
        windows = json.loads(wins.read_text())
        out = {}
        for m, ws in windows.items():
            t = " ".join(f"{a:.6f},{b:.6f}" for a, b in ws)
            rep = subprocess.run(
                ["perf", "report", "-i", str(data), "--time", t, "--sort", "pid,dso,sym",
                 "-n", "--stdio"], capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            out[m] = split(rep, len(ws) * args.iters)
    modes = list(out)
    for th in ("caller", "stream"):
        kinds = sorted(
            {k for m in modes for k in out[m][th]}, key=lambda k: -out[modes[0]][th].get(k, 0)
        )
        print(f"\n{th} thread, us a call | " + " | ".join(modes))
        print("total | " + " | ".join(f"{sum(out[m][th].values()):.0f}" for m in modes))
        for k in kinds:
            if max(out[m][th].get(k, 0) for m in modes) >= 4:
                print(f"{k} | " + " | ".join(f"{out[m][th].get(k, 0):.1f}" for m in modes))
    return out


if __name__ == "__main__":
    main()
