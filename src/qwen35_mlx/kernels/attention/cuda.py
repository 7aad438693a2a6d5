"""CUDA build of the decode attention kernels.

The bodies are `source.py`'s, the host side `launch.py`'s; the helpers (gd_group_sum, gd_exp,
shared memory and barrier) are the gated-delta kernels' CUDA header, and the kernels are made by
the same factory (`gated_delta.precompiled.cuda_kernel`: compiled once per machine by NVRTC into
the disk cache, or by `mx.fast.cuda_kernel`). This file adds only the prologue that names the
thread's position. Without CUDA, `BACKEND.is_available()` is False.
"""

from __future__ import annotations

from ..gated_delta.cuda import BACKEND as _GATED_DELTA
from ..positions import prologue
from .launch import POSITIONS, AttentionBackend

PROLOGUE = prologue("cuda", **POSITIONS)

BACKEND = AttentionBackend(_GATED_DELTA, PROLOGUE)
