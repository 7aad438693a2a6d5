"""Sampling options checked in one place, for the library and the command line alike.

mlx-lm's `make_sampler` treats out-of-range values as "off" (`top_p=2`, `top_k=-3`), samples from
the inverted distribution for a negative temperature, and emits one token forever for a NaN one.
`check_sampling` refuses all of those with a `ValueError` naming the option and its value.
It imports nothing heavy, so the CLI runs it before the model loads.

Accepted: `temp` finite and >= 0 (0: greedy); `top_p` and `min_p` in [0, 1] (0 and, for top_p,
1: off); `top_k` an integer >= 0 (0: off); `repetition_penalty` None or finite and > 0.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def _flag(name: str, cli: bool) -> str:
    return "--" + name.replace("_", "-") if cli else name


def check_sampling(
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    *,
    cli: bool = False,
) -> None:
    """Raise ValueError naming the first invalid option (`--top-p` style names when `cli`)."""

    def real(name, value, lo, hi, lo_open=False):
        ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
        if not ok:
            bound = f"> {lo}" if lo_open else f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"{_flag(name, cli)} must be a finite number {bound}, got {value!r}")

    real("temp", temp, 0, None)
    real("top_p", top_p, 0, 1)
    real("min_p", min_p, 0, 1)
    if not isinstance(top_k, Integral) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"{_flag('top_k', cli)} must be an integer >= 0, got {top_k!r}")
    if repetition_penalty is not None:
        real("repetition_penalty", repetition_penalty, 0, None, lo_open=True)
