"""The split chunk path's state pass by warps a threadgroup (chunk_launch.H3) and head count, on
the GPU (issue 9): `gated_delta_update` (backend auto) at T steps, B 1, Hk 16, bf16, with H3 = 2
and 4, with and without round 10's H3O_SPLIT, alternating in one process; the median of the
repeats in ms a call. Where H3 = 2 gives more state-pass threadgroups than the GPU has SMs (one
fits an SM), H3 = 4 makes one wave of fuller ones: `chunk_launch.H3_WAVE_SMS` picks that, and
is switched off here so that each arm is the warps it names.

    PYTHONPATH=src python benchmarks/probe_state_warps.py [--t 32768] [--hv 48,64,32] [--repeats 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gated_delta as bench  # noqa: E402

from qwen35_mlx.kernels.gated_delta import chunk_launch as cl  # noqa: E402

# isort: on

ARMS = {
    "w2": {"H3": 2},
    "w4": {"H3": 4},
    "w2 split": {"H3": 2, "H3O_PRODUCERS": 1, "H3O_SPLIT": True},
    "w4 split": {"H3": 4, "H3O_PRODUCERS": 1, "H3O_SPLIT": True},
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--t", type=int, default=32768)
    p.add_argument("--hv", default="48,64,32")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--calls", type=int, default=6, help="calls a timed repeat")
    args = p.parse_args(argv)
    saved = {k: getattr(cl, k) for k in ("H3", "H3O_PRODUCERS", "H3O_SPLIT", "H3_WAVE_SMS")}

    def use(arm: str) -> None:
        for k, v in {**saved, "H3_WAVE_SMS": None, **ARMS[arm]}.items():
            setattr(cl, k, v)

    out = {}
    try:
        for hv in (int(x) for x in args.hv.split(",") if x):
            run = bench._ours("auto")(bench.Shape(1, args.t, hv))
            for arm in ARMS:  # builds and warm-up
                use(arm)
                run(1)
                run(1)
            times = {arm: [] for arm in ARMS}
            for _ in range(args.repeats):
                for arm in ARMS:
                    use(arm)
                    times[arm].append(run(args.calls) / args.calls * 1e3)
            med = {arm: sorted(v)[len(v) // 2] for arm, v in times.items()}
            out[hv] = med
            print(f"T {args.t} Hv {hv}: " + "  ".join(f"{a} {m:.3f}" for a, m in med.items()))
    finally:
        for k, v in saved.items():
            setattr(cl, k, v)
    return out


if __name__ == "__main__":
    main()
