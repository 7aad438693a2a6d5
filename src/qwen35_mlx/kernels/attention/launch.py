"""Host side of the decode attention kernels: which shapes they take, the launch geometry the
bodies in `source.py` assume, and `AttentionBackend`, one build of them for Metal or CUDA
(`metal.py` and `cuda.py` each make one, their `BACKEND`).

Shapes: q [B, Hq, T, D]; k, v [B, Hkv, Ck, D]; start [] or [1] int; mask [Bm, 1, T, Cm] bool;
gate [B, T, Hq, G], or rows [B, T, N] with a head stride (`source.py`: GR, GS, GO); out
[B, T, Hq * D].
"""

from __future__ import annotations

import mlx.core as mx

from . import source

MAX_T = 8
MAX_D = 256
MAX_ROWS = 8  # query rows a threadgroup (registers: 2 R D / 32 floats a lane for q and acc)
WARPS = 4
# The thread's position as the bodies read it (`positions.prologue` of each backend): lane and
# warp in the threadgroup, the threadgroup's x and y.
POSITIONS = {
    "at_lane": "thread.x",
    "at_warp": "thread.y",
    "at_tg_x": "threadgroup.x",
    "at_tg_y": "threadgroup.y",
}


def shape_supported(q, k, v) -> bool:
    """Shapes the kernels run: T <= MAX_T, D = Dv a multiple of 32 up to MAX_D, Hq a multiple
    of Hkv, floating inputs."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return False
    B, Hq, T, D = q.shape
    Bk, Hkv, Ck, Dk = k.shape
    if v.shape != k.shape or Bk != B or Dk != D or not 1 <= T <= MAX_T or Ck < 1:
        return False
    if D % 32 or not 32 <= D <= MAX_D or Hkv < 1 or Hq % Hkv:
        return False
    return all(mx.issubdtype(x.dtype, mx.floating) for x in (q, k, v))


def keys_per_split(groups: int) -> int:
    """Keys a split (S) for `groups` = B * Hkv * (query-row chunks) threadgroups a split
    column: small when few heads share the GPU (the 0.8B shape at batch 1: 2 kv heads, so the
    keys are what fills the GPU: 64 keys give 128 threadgroups at 4k keys, 1024 at 32k), larger
    at large batch, where the heads fill it and fewer partials are written. It depends on the
    head counts and batch only, never on the number of keys: the split boundaries, hence the
    rounding, are the same for a buffer of any capacity (source.py)."""
    if groups <= 16:
        return 64
    if groups <= 64:
        return 128
    return 256


def layout(B: int, Hq: int, Hkv: int, T: int) -> tuple[int, int, int, int, int]:
    """(R query rows a threadgroup, NC chunks of them a kv head, S keys a split, W warps, U keys
    loaded together)."""
    rows = (Hq // Hkv) * T
    R = min(MAX_ROWS, rows)
    NC = -(-rows // R)
    U = 4 if R <= 4 else 2
    return R, NC, keys_per_split(B * Hkv * NC), WARPS, U


class AttentionBackend:
    """The decode attention kernels of one GPU backend: the gated-delta backend `base` gives the
    helpers' header, the availability check and the kernel factory (`make_kernel`); `prologue`
    names the thread's position (at_lane, at_warp, at_tg_x, at_tg_y)."""

    def __init__(self, base, prologue: str, vector_start: bool = False):
        self.base = base
        self.prologue = prologue
        # Metal: MLX passes a 0-d input as a reference, not a pointer; `start[0]` needs [1].
        self.vector_start = vector_start
        self._kernels: dict[tuple, object] = {}

    @property
    def header(self) -> str:
        return self.base.header

    def is_available(self) -> bool:
        return self.base.is_available()

    def partial_source(self, mask: bool, causal: bool) -> str:
        return self.prologue + source.partial_body(mask, causal)

    def combine_source(self, gate: bool) -> str:
        return self.prologue + source.combine_body(gate)

    def _kernel(self, key, name, inputs, outputs, text):
        if key not in self._kernels:
            self._kernels[key] = self.base.make_kernel(name, inputs, outputs, text)
        return self._kernels[key]

    def partial(self, mask: bool, causal: bool):
        return self._kernel(
            ("partial", mask, causal),
            source.partial_name(mask, causal),
            source.partial_inputs(mask),
            source.PARTIAL_OUTPUTS,
            self.partial_source(mask, causal),
        )

    def combine(self, gate: bool):
        return self._kernel(
            ("combine", gate),
            source.combine_name(gate),
            source.combine_inputs(gate),
            source.COMBINE_OUTPUTS,
            self.combine_source(gate),
        )

    def supports(self, q, k, v) -> bool:
        return self.is_available() and shape_supported(q, k, v)

    def run(
        self,
        q,
        k,
        v,
        start,
        scale,
        mask=None,
        causal=False,
        gate=None,
        gate_offset=0,
        gate_head_stride=None,
    ):
        """The two launches; shapes validated by the caller. start: int array [] or [1]; mask:
        bool [Bm, 1, T, Cm] or None; gate [B, T, Hq, G] (gate_head_stride None) or rows of N
        (B*T of them, row-contiguous) with head h's gate at gate_offset + h * gate_head_stride,
        or None. Returns [B, T, Hq * D] in q's dtype."""
        B, Hq, T, D = q.shape
        Hkv, Ck = k.shape[1], k.shape[2]
        R, NC, S, W, U = layout(B, Hq, Hkv, T)
        NS = -(-Ck // S)
        if self.vector_start and start.ndim == 0:
            start = start.reshape(1)
        inputs = [q, k, v, start, mx.array([scale], mx.float32)]
        if mask is not None:
            inputs.append(mask)
        part_acc, part_ml = self.partial(mask is not None, causal)(
            inputs=inputs,
            template=[("D", D), ("R", R), ("S", S), ("W", W), ("U", U)],
            grid=(32 * NS, W * B * Hkv * NC, 1),
            threadgroup=(32, W, 1),
            output_shapes=[(B * Hq * T, NS, D), (B, Hq, T, NS, 2)],
            output_dtypes=[mx.float32, mx.float32],
        )
        inputs = [part_acc, part_ml, start]
        template = [("D", D), ("S", S), ("OT", q.dtype)]
        if gate is not None:
            inputs.append(gate)
            if gate_head_stride is None:  # [B, T, Hq, G]
                row, stride = Hq * gate.shape[-1], gate.shape[-1]
            else:  # rows of N: [B, T, N], [B*T, N] or [B*T, N, 1]
                row, stride = gate.size // (B * T), gate_head_stride
            template += [("GR", row), ("GS", stride), ("GO", gate_offset)]
        return self.combine(gate is not None)(
            inputs=inputs,
            template=template,
            grid=(32 * B * Hq * T, D // 32, 1),
            threadgroup=(32, D // 32, 1),
            output_shapes=[(B, T, Hq * D)],
            output_dtypes=[q.dtype],
        )[0]
