"""The repeat probes' worker processes (probe_chunk_repeat.py, probe_packed_repeat.py): start
them side by side, gather the JSON record each prints last, and give the verdict.

Worker i gets MLX_USE_CUDA_GRAPHS=0 when it is one of the last `no_graphs`, a TMPDIR of its own
when it is one of the first `private_tmp` (where MLX's CPU backend keeps its compiled kernels'
libraries), else `shared_tmp` when given (else the caller's TMPDIR).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path


def start(
    cmds: list[list[str]],
    *,
    no_graphs: int = 0,
    private_tmp: int = 0,
    shared_tmp: str | None = None,
    prefix: str = "probe_worker",
) -> list[subprocess.Popen]:
    """One process a command, each with the environment above."""
    procs = []
    for i, cmd in enumerate(cmds):
        env = dict(os.environ)
        if i >= len(cmds) - no_graphs:
            env["MLX_USE_CUDA_GRAPHS"] = "0"
        if i < private_tmp:
            env["TMPDIR"] = tempfile.mkdtemp(prefix=f"{prefix}{i}_")
        elif shared_tmp is not None:
            env["TMPDIR"] = shared_tmp
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    return procs


def collect(
    procs: list[subprocess.Popen], report: Callable[[int, dict], int], extra: dict | None = None
) -> tuple[list[dict], int]:
    """Each worker's record (its last line of output, `extra` merged in) and the problems
    `report(i, record)` counts; a worker that failed or printed nothing is one problem."""
    records, bad = [], 0
    for i, proc in enumerate(procs):
        out, _ = proc.communicate()
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            print(f"worker {i}: exit {proc.returncode}")
            records.append({"exit": proc.returncode} | (extra or {}))
            bad += 1
            continue
        rec = json.loads(lines[-1]) | (extra or {})
        records.append(rec)
        bad += report(i, rec)
    return records, bad


def finish(records: list[dict], bad: int, out: Path | None) -> int:
    """Write the records (JSON) and print the verdict; the exit code (1 if any problem)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=1))
    print("verdict:", "nothing failed, every repeat identical" if not bad else f"{bad} problems")
    return 1 if bad else 0
