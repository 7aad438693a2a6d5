"""Metal build of the decode attention kernels (`mx.fast.metal_kernel`).

The bodies are `source.py`'s, the host side `launch.py`'s; the helpers (gd_group_sum, gd_exp,
threadgroup memory and barrier) are the gated-delta kernels' Metal header, reused as it is. This
file adds only the prologue that names the thread's position: MLX declares a Metal attribute
only when its name appears in `source`, so it is part of `source`. Without Metal,
`BACKEND.is_available()` is False.
"""

from __future__ import annotations

from ..gated_delta.metal import BACKEND as _GATED_DELTA
from ..positions import prologue
from .launch import POSITIONS, AttentionBackend

PROLOGUE = prologue("metal", **POSITIONS)

BACKEND = AttentionBackend(_GATED_DELTA, PROLOGUE, vector_start=True)
