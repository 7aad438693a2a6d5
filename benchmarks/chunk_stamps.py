"""Reading the stamped builds' stamps (chunk_source.stamped; issue 9, round 5): where a
threadgroup of the WY / output pass spends its cycles, how many threadgroups an SM holds at
once, how many waves the grid takes. NumPy only (tested on the CPU with made-up stamps:
tests/test_chunk_stamps_reading.py); chunk_split_gpu.py --stamps feeds it the device's."""

from __future__ import annotations

import numpy as np

WRAP = 1 << 32


def _since(x: np.ndarray, ref: int) -> np.ndarray:
    """x - ref for 32-bit counters that may have wrapped once (as signed 32-bit)."""
    d = (x.astype(np.int64) - ref) % WRAP
    return np.where(d >= WRAP // 2, d - WRAP, d)


def max_overlap(start: np.ndarray, end: np.ndarray) -> int:
    """Most intervals [start, end) open at one time."""
    ev = np.concatenate(
        [np.stack([end, np.zeros_like(end)], 1), np.stack([start, np.ones_like(start)], 1)]
    )
    ev = ev[np.lexsort((ev[:, 1], ev[:, 0]))]  # ends before starts at equal times
    return int(np.max(np.cumsum(np.where(ev[:, 1] == 1, 1, -1))))


def summarize(stamps: np.ndarray, phases: list[str]) -> dict:
    """stamps [threadgroups, >= 4 + len(phases)] (slot 0 SM, 1 / 2 start / end ns, 3.. clocks):
    per phase the median and mean cycles and the share of the mean total; a threadgroup's
    median time (us, cycles) and the clock (GHz); the pass's span (us, first start to last
    end); threadgroups in flight on average (whole GPU, and an SM) and at most on one SM; waves
    (span / median threadgroup time); the median time of the first-started threadgroups (the
    first 5%) against the rest."""
    s = stamps.astype(np.int64)
    P = len(phases)
    clk = s[:, 3 : 4 + P]
    cyc = (clk[:, 1:] - clk[:, :-1]) % WRAP  # [TG, P]
    total = cyc.sum(1)
    start = _since(s[:, 1], int(s[0, 1]))
    end = start + (s[:, 2] - s[:, 1]) % WRAP
    start, end = start - start.min(), end - start.min()
    dur = end - start
    span = int(end.max())
    sm = s[:, 0]
    sms = np.unique(sm)
    per_sm = [max_overlap(start[sm == i], end[sm == i]) for i in sms]
    first = start <= np.quantile(start, 0.05)
    mean = cyc.mean(0)
    return {
        "threadgroups": int(len(s)),
        "phases": {
            name: {
                "median": float(np.median(cyc[:, j])),
                "mean": float(mean[j]),
                "share": float(mean[j] / mean.sum()) if mean.sum() > 0 else 0.0,
            }
            for j, name in enumerate(phases)
        },
        "tg_cycles": float(np.median(total)),
        "tg_us": float(np.median(dur) / 1e3),
        "ghz": float(np.median(total) / max(np.median(dur), 1.0)),
        "span_us": span / 1e3,
        "sms": int(len(sms)),
        "in_flight": float(dur.sum() / max(span, 1)),
        "in_flight_sm": float(dur.sum() / max(span, 1) / len(sms)),
        "max_on_sm": int(max(per_sm)),
        "waves": float(span / max(np.median(dur), 1.0)),
        "first_us": float(np.median(dur[first]) / 1e3),
        "rest_us": float(np.median(dur[~first]) / 1e3) if (~first).any() else float("nan"),
    }


def table(name: str, T: int, r: dict) -> str:
    """A summary as text lines."""
    lines = [
        f"  {name} T {T}: {r['threadgroups']} threadgroups on {r['sms']} SMs, span "
        f"{r['span_us']:.0f} us, {r['waves']:.1f} waves of {r['tg_us']:.1f} us "
        f"({r['tg_cycles']:.0f} cycles, {r['ghz']:.2f} GHz); in flight {r['in_flight_sm']:.2f} "
        f"an SM (at most {r['max_on_sm']}); first 5% {r['first_us']:.1f} us, rest "
        f"{r['rest_us']:.1f} us"
    ]
    for p, v in r["phases"].items():
        lines.append(
            f"    {p:<20} median {v['median']:8.0f}  mean {v['mean']:8.0f} cycles  "
            f"{100 * v['share']:5.1f}%"
        )
    return "\n".join(lines)
