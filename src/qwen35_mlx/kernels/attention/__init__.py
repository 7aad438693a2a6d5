"""Attention of a few query tokens a row over a KV buffer (decode and speculative verify) as
one kernel pair on a GPU (`source.py`: a split pass and a combine), with the layer's sigmoid
output gate folded into the combine.

Why: Qwen3.5's full-attention heads are 256 wide, and MLX 0.32's CUDA backend has no attention
kernel for that width (its `sdpa_vector` takes 64/96/128, cuDNN <= 128), so each decode call ran
MLX's fallback graph: about a dozen primitives a layer, each costing host time in a host-bound
step. Metal's own `sdpa_vector` takes D = 256 with a mask in one kernel, so there MLX stays the
default (`DECODE_KERNEL`).

    decode_attention(q, k, v, scale=..., mask=..., start=..., gate=...) -> [B, T, Hq * D]

The CPU has no custom kernels: `decode_attention_ref` (MLX's ops) is the reference; where the
optional native CPU extension is built (kernels/cpu_ext), calls take its one primitive of the
same contract there (`CPU_NATIVE`), else the ops.
"""

from __future__ import annotations

import mlx.core as mx

from .launch import MAX_D, MAX_T, shape_supported

__all__ = [
    "DECODE_KERNEL",
    "MAX_D",
    "MAX_T",
    "decode_attention",
    "decode_attention_ref",
    "kernel_backend",
]

# Where the kernel replaces MLX's attention at decode: "auto" (CUDA only: Metal's sdpa_vector
# already takes D = 256 with a mask as one kernel; switch to "on" once the Metal build is
# measured faster on a Mac), "on" (any GPU backend) or "off" (MLX everywhere). Read at each call
# (the compiled decode step: when it is traced).
DECODE_KERNEL = "auto"
_CHOICES = ("auto", "on", "off")
# On the CPU, calls through the native extension's attention primitive where it is built (one
# primitive a layer where MLX's fallback graph takes ~15 at decode, each a few us of host time
# on its CPU stream: benchmarks/NOTES.md, "Session 15, helper cpumv"). float32 scores, softmax
# and sums (half-precision inputs read as float32, the output rounded once), in another order
# than MLX's: float32 rounding apart from the ops. False: the ops. Read at each call, like
# DECODE_KERNEL (which "off" turns this off too).
CPU_NATIVE = True


class _NativeCPU:
    """The `launch.AttentionBackend` interface over the native CPU primitive."""

    @staticmethod
    def run(
        q, k, v, start, scale, mask=None, causal=False, gate=None, gate_offset=0,
        gate_head_stride=None,
    ):  # fmt: skip
        from .. import cpu_ext

        if gate is not None and gate_head_stride is not None:
            # rows of the fused q|k|v output (GATE_IN_PLACE): the primitive reads [B, T, Hq, G]
            B, Hq, T, D = q.shape
            gate = _gate_heads(gate, B, T, Hq, D, gate_offset, gate_head_stride)
            gate_offset = 0
        return cpu_ext.load().attention(q, k, v, start, scale, mask, causal, gate, gate_offset)


def _cpu_backend(q: mx.array, k: mx.array, v: mx.array):
    from .. import cpu_ext

    floats = all(a.dtype in (mx.float32, mx.bfloat16, mx.float16) for a in (q, k, v))
    if not (CPU_NATIVE and floats and q.shape[2] <= MAX_T):
        return None
    mod = cpu_ext.load()
    return _NativeCPU if mod is not None and hasattr(mod, "attention") else None


def _shape_error(name: str, shape, want: str) -> ValueError:
    return ValueError(f"decode_attention: {name} has shape {tuple(shape)}, expected {want}")


def kernel_backend(q: mx.array, k: mx.array, v: mx.array):
    """The GPU backend (`launch.AttentionBackend`) that runs these inputs under
    `DECODE_KERNEL` (on the CPU the native primitive: `CPU_NATIVE`), or None (an unsupported
    shape, the switch, a CPU without the extension)."""
    if DECODE_KERNEL not in _CHOICES:
        raise ValueError(f"DECODE_KERNEL must be one of {_CHOICES}, got {DECODE_KERNEL!r}")
    if DECODE_KERNEL == "off":
        return None
    if mx.default_device() == mx.cpu:
        return _cpu_backend(q, k, v)
    if not shape_supported(q, k, v):
        return None
    if mx.cuda.is_available():
        from .cuda import BACKEND
    elif DECODE_KERNEL == "on" and mx.metal.is_available():
        from .metal import BACKEND
    else:
        return None
    return BACKEND if BACKEND.is_available() else None


def _gate_row(gate: mx.array, B: int, T: int) -> int | None:
    """The elements of a token's row N of a rows gate: [B, T, N], [B*T, N] or [B*T, N, 1] (row
    b*T + t: the multi-token step's activations, its row-wise products' column form); None for
    another shape."""
    if gate.ndim == 3 and gate.shape[:2] == (B, T):
        return gate.shape[2]
    if gate.ndim in (2, 3) and gate.shape[0] == B * T and gate.shape[2:] in ((), (1,)):
        return gate.shape[1]
    return None


def _check(q, k, v, mask, gate, gate_offset, gate_head_stride=None):
    if q.ndim != 4:
        raise _shape_error("q", q.shape, "[B, Hq, T, D]")
    B, Hq, T, D = q.shape
    if k.ndim != 4 or k.shape[0] != B or k.shape[3] != D or Hq % max(k.shape[1], 1):
        raise _shape_error("k", k.shape, f"[B, Hkv, C, D] = [{B}, Hkv, C, {D}], Hkv | {Hq}")
    if v.shape != k.shape:
        raise _shape_error("v", v.shape, f"k's shape {tuple(k.shape)}")
    if isinstance(mask, mx.array):
        if mask.dtype != mx.bool_:
            raise ValueError(f"decode_attention: mask must be bool, got {mask.dtype}")
        if mask.ndim != 4 or mask.shape[0] not in (1, B) or mask.shape[1:3] != (1, T):
            raise _shape_error("mask", mask.shape, f"[1 or B, 1, T, C] = [1 or {B}, 1, {T}, C]")
    elif mask not in (None, "causal"):
        raise ValueError(f"decode_attention: mask must be None, 'causal' or an array: {mask!r}")
    if gate is not None and gate_head_stride is not None:
        # Rows: head h's gate at gate_offset + h * gate_head_stride of its token's row.
        N = _gate_row(gate, B, T)
        if N is None:
            want = f"rows [B, T, N], [B*T, N] or [B*T, N, 1], B = {B}, T = {T}"
            raise _shape_error("gate", gate.shape, want)
        last = gate_offset + (Hq - 1) * gate_head_stride + D
        if gate_offset < 0 or gate_head_stride < D or last > N:
            raise ValueError(
                f"decode_attention: gate_offset={gate_offset}, gate_head_stride="
                f"{gate_head_stride} leave no {Hq} heads of {D} gate elements in a gate row of {N}"
            )
    elif gate is not None:
        # One token: [B, Hq, 1, G] is [B, 1, Hq, G] in memory, taken as it is (no reshape).
        if gate.ndim != 4 or gate.shape[:3] not in ((B, T, Hq), (B, Hq, 1)[: 3 if T == 1 else 0]):
            raise _shape_error("gate", gate.shape, f"[B, T, Hq, G] = [{B}, {T}, {Hq}, G]")
        if not 0 <= gate_offset <= gate.shape[3] - D:
            raise ValueError(
                f"decode_attention: gate_offset={gate_offset} leaves no {D} gate elements in "
                f"a gate head of {gate.shape[3]}"
            )


def _start(start, k: mx.array, T: int) -> mx.array:
    if start is None:
        return mx.array(k.shape[2] - T, mx.int32)
    if isinstance(start, int):
        return mx.array(start, mx.int32)
    return start


def _gate_heads(gate, B, T, Hq, D, gate_offset, gate_head_stride):
    """The gate as [B, T, Hq, D]: each head's D elements."""
    if gate_head_stride is None:
        return gate.reshape(B, T, Hq, -1)[..., gate_offset : gate_offset + D]
    at = gate_offset + gate_head_stride * mx.arange(Hq)[:, None] + mx.arange(D)[None]
    return gate.reshape(B, T, -1)[:, :, at]


def decode_attention_ref(
    q, k, v, *, scale, mask=None, start=None, gate=None, gate_offset=0, gate_head_stride=None
):
    """`decode_attention` as MLX ops: `mx.fast.scaled_dot_product_attention` over the first
    start + T keys (an int start: a slice; an array start: a mask, as it can be traced), then
    o * sigmoid(gate) in the output dtype."""
    B, Hq, T, D = q.shape
    if isinstance(mask, mx.array) and mask.shape[-1] < k.shape[2]:
        k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
    if start is None or isinstance(start, int):
        n = k.shape[2] if start is None else start + T
        k, v = k[:, :, :n], v[:, :, :n]
        if isinstance(mask, mx.array):
            mask = mask[..., :n]
    else:  # an array (e.g. traced): the keys from start + T on, masked
        pos = mx.arange(k.shape[2])
        causal = isinstance(mask, str)
        last = start.reshape(()) + (mx.arange(T)[:, None] if causal else T - 1)
        keep = (pos <= last)[None, None] if causal else (pos <= last)[None, None, None]
        mask = keep if not isinstance(mask, mx.array) else mask[..., : k.shape[2]] & keep
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    o = o.transpose(0, 2, 1, 3)
    if gate is not None:
        o = o * mx.sigmoid(_gate_heads(gate, B, T, Hq, D, gate_offset, gate_head_stride))
    return o.reshape(B, T, Hq * D)


def decode_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    mask: mx.array | str | None = None,
    start: mx.array | int | None = None,
    gate: mx.array | None = None,
    gate_offset: int = 0,
    gate_head_stride: int | None = None,
) -> mx.array:
    """softmax(q k^T * scale + mask) v (times sigmoid(gate)) for T <= 8 query tokens a row.

    q [B, Hq, T, D] (normed and rotated); k, v [B, Hkv, C, D], Hq a multiple of Hkv (GQA: query
    head h reads kv head h // (Hq / Hkv)); the keys used are positions < start + T, where start
    (an int or an int array [] / [1]: the first query's position; None: C - T, every key) lets a
    preallocated buffer be passed whole. mask: None (every key < start + T), "causal" (query t
    sees keys <= start + t) or a bool array [1 or B, 1, T, C'] (True: attend), C' >= start + T.
    gate [B, T, Hq, G] (or [B, Hq, 1, G] when T = 1: the same memory): query head h's gate is
    gate[b, t, h, gate_offset : gate_offset + D] (the unsplit q projection of a gated layer can
    be passed, gate_offset = D). With gate_head_stride, gate is rows [B, T, N] (or [B*T, N],
    [B*T, N, 1]: row b*T + t) instead, head h's gate at elements gate_offset + h *
    gate_head_stride .. + D of its token's row: the fused q|k|v projection of a few tokens (a
    row per token, each head's query and gate side by side) passed whole,
    gate_offset = D, gate_head_stride = 2 D, which the kernel reads in place (its gate columns
    alone are a view with a row stride, which MLX copies for a kernel). Returns [B, T, Hq * D]
    (o_proj's layout) in q's dtype.

    On a GPU under `DECODE_KERNEL` with a supported shape (`launch.shape_supported`: D a multiple
    of 32 up to 256, T <= 8): one kernel pair, fp32 softmax and accumulation, the result rounded
    once (source.py); a query row with no visible key gives 0 there (MLX's ops give the mean of
    the values). Elsewhere `decode_attention_ref`.
    """
    _check(q, k, v, mask, gate, gate_offset, gate_head_stride)
    backend = kernel_backend(q, k, v)
    gates = dict(gate=gate, gate_offset=gate_offset, gate_head_stride=gate_head_stride)
    if backend is None:
        return decode_attention_ref(q, k, v, scale=scale, mask=mask, start=start, **gates)
    T = q.shape[2]
    causal = isinstance(mask, str)
    arr = mask if isinstance(mask, mx.array) else None
    return backend.run(q, k, v, _start(start, k, T), scale, arr, causal, **gates)
