"""Speculators with controlled drafts, for the MTP tests and `benchmarks/bench_mtp.py`; and a
recorder of the native round head's traces, for the MTP tests."""

import random

import mlx.core as mx

from qwen35_mlx.speculative import MTPSpeculator


def forced_drafts(want: list[int], rate: float, vocab: int, seed: int = 0) -> type:
    """An MTPSpeculator whose head runs as usual (so its cache bookkeeping is exercised) but
    whose drafts are then replaced: each is the plain greedy run's token (`want`) with
    probability `rate`, else a wrong one."""
    rng = random.Random(seed)

    class Forced(MTPSpeculator):
        emitted = 0

        def _draft(self, hidden, tokens):
            super()._draft(hidden, tokens)
            self.emitted += tokens.shape[1]
            row = []
            for j in range(self.k):
                i = self.emitted + j
                t = want[i] if i < len(want) else 0
                row.append(t if rng.random() < rate else (t + 1) % vocab)
            self._drafts = mx.array([row])

    return Forced


def counting_native_head(monkeypatch) -> list:
    """Record each trace of the native round head (`mtp.native_head`): True where it applied."""
    from qwen35_mlx.models import mtp as mtp_mod

    calls = []
    orig = mtp_mod.native_head

    def counting(*args):
        out = orig(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(mtp_mod, "native_head", counting)
    return calls
