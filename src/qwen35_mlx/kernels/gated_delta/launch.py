"""Host side of the fused gated-delta GPU kernels: which shapes they take, the launch geometry
the bodies in `source.py` assume, and `GpuBackend`, one build of those bodies for Metal or CUDA
(`metal.py` and `cuda.py` each make one, their `BACKEND`).

Shapes: q, k [B, T, Hk, Dk]; v, y [B, T, Hv, Dv]; g [B, T, Hv] or [B, T, Hv, Dk]; beta, a, b
[B, T, Hv]; A_log, dt_bias [Hv]; state [B, Hv, Dv, Dk] fp32; mask [B, T] bool.
Conv decode (`run_conv_decode`): qkv [B, C], conv_state [B, K-1, C], conv_w [C, K], a, b [B, Hv],
mask [B]; y [B, Hv, Dv]; with the gated norm also z [B, Hv, Dv] (or [B, Hv * Dv]), norm_w [Dv].
Packed T-token decode (`run_packed_decode`): proj [B * T, C + Hv Dv + 2 Hv] (the fused
in-projection, columns [qkv | z | b | a]), mask [B, T]; y [B * T, Hv * Dv]; the states after
each token but the last as [T-1, ...] arrays.
"""

from __future__ import annotations

import mlx.core as mx

from .source import MAX_TOKENS, input_names, kernel_body, kernel_name, output_names

MAX_DK = 256
MAX_CONV_K = 8


def shape_supported(q, v, g) -> bool:
    """Valid shapes the kernels run: Dk a multiple of 32 up to 256, T >= 1, float inputs."""
    if q.ndim != 4 or v.ndim != 4:
        return False
    B, T, _, Dk = q.shape
    if T < 1 or B < 1 or v.shape[3] < 1 or Dk % 32 or not 32 <= Dk <= MAX_DK:
        return False
    return all(mx.issubdtype(x.dtype, mx.floating) for x in (q, v, g))


def default_layout(Dk: int, T: int, heads: int) -> tuple[int, int, int]:
    """(lanes per value row, warps per threadgroup, prefetch distance) for Dk, T and
    heads = B * Hv: the fastest measured on an H100 at Dk = 128 (benchmarks/NOTES.md); a
    prefetch distance > 0 measured no faster there. Lanes always divide Dk / 4, since Dk is
    a multiple of 32."""
    wide = Dk % 64 == 0  # 16 lanes need Dk / 4 divisible by 16
    if T == 1:
        # Decode is bound by the state's memory traffic; this layout was the steadiest near
        # the floor over four runs (others varied by up to 25% between runs).
        return (16, 2, 0) if wide else (8, 4, 0)
    return (16, 1, 0) if wide else (8, 2, 0)


def _geometry(B, T, Hv, Dk, Dv, lanes, warps, prefetch) -> tuple[int, int, int, int]:
    """(L, W, P, row groups rounded up to whole threadgroups) of a launch."""
    L0, W0, P0 = default_layout(Dk, T, B * Hv)
    L = lanes or L0
    P = P0 if prefetch is None else prefetch
    if 32 % L or Dk % (4 * L):
        raise ValueError(f"gated_delta kernel: lanes={L} does not divide Dk={Dk} into float4s")
    rows_per_warp = 32 // L
    groups = -(-Dv // rows_per_warp)
    W = min(warps or W0, groups)
    return L, W, P, -(-groups // W) * W


def launch(kernel, inputs, q, v, *, lanes=None, warps=None, prefetch=None, init_value=None):
    """Run one built kernel; returns (y [B, T, Hv, Dv] in v's dtype, state [B, Hv, Dv, Dk] fp32)."""
    B, T, _, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    L, W, P, groups = _geometry(B, T, Hv, Dk, Dv, lanes, warps, prefetch)
    return kernel(
        inputs=inputs,
        template=[("Dk", Dk), ("L", L), ("P", P), ("YT", v.dtype)],
        # x: one 32-lane threadgroup column per (b, hv); y: warps along the value rows.
        grid=(32 * B * Hv, groups, 1),
        threadgroup=(32, W, 1),
        output_shapes=[(B, T, Hv, Dv), (B, Hv, Dv, Dk)],
        output_dtypes=[v.dtype, mx.float32],
        init_value=init_value,
    )


def conv_shape_supported(qkv, conv_w, state) -> bool:
    """Valid conv-decode shapes the kernel runs: Dk as `shape_supported`, 2 <= K <= 8, float
    activations."""
    Dk, K = state.shape[3], conv_w.shape[1]
    if Dk % 32 or not 32 <= Dk <= MAX_DK or not 2 <= K <= MAX_CONV_K or state.shape[2] < 1:
        return False
    return mx.issubdtype(qkv.dtype, mx.floating)


# The gated-norm variant's layout: 4 lanes a value row, so a head of Dv <= 128 rows fits one
# threadgroup of at most 16 warps. Registers bound it: a head's state, and each row's copy of q
# and k, live in registers (3 Dk Dv floats a threadgroup plus overhead): at Dk = Dv = 128, nvcc
# for sm_90 gives 122-124 registers a thread, 128 x 512 threads = the 64 K a block may use
# (8 lanes x 32 warps took 64-72 a thread: over the limit; tests/kernels/test_cuda_source.py
# checks this bound).
NORM_LANES = 4
NORM_MAX_DK = NORM_MAX_DV = 128


def norm_layout(Dk: int, Dv: int) -> tuple[int, int] | None:
    """(lanes per value row, warps) that put a head's Dv rows in one threadgroup (the gated
    norm's sum over them); None beyond Dk or Dv = 128 (too many registers for one block)."""
    if Dk > NORM_MAX_DK or Dv > NORM_MAX_DV or Dk % (4 * NORM_LANES):
        return None
    return NORM_LANES, -(-Dv // (32 // NORM_LANES))


def run_conv_decode(
    build,
    qkv,
    conv_state,
    conv_w,
    a,
    b,
    A_log,
    dt_bias,
    state,
    mask=None,
    *,
    z=None,
    norm_w=None,
    norm_eps=None,
    lanes=None,
    warps=None,
    init_value=None,
):
    """The conv decode kernel (shapes validated by the caller); returns (y [B, Hv, Dv] in
    qkv's dtype, state [B, Hv, Dv, Dk] fp32, conv state [B, K-1, C] in qkv's dtype). With z
    (and norm_w, norm_eps: a float or a [1] fp32 array), y has passed the gated norm; the
    layout is then `norm_layout`'s (lanes, warps: ignored)."""
    B, Hv, Dv, Dk = state.shape
    inputs = [qkv, conv_state, conv_w, a, b, A_log, dt_bias, state.astype(mx.float32)]
    if z is not None:
        inputs += [z, *_norm_inputs(norm_w, norm_eps)]
    if mask is not None:
        inputs.append(mask.astype(mx.bool_))
    kernel = build("fused", mask is not None, True, True, z is not None)
    y_shape = (B, Hv, Dv)
    norm = z is not None
    return _launch_conv(
        kernel, inputs, y_shape, qkv.dtype, conv_w, state, 1, norm, lanes, warps, init_value
    )


def _norm_inputs(norm_w, norm_eps) -> list:
    eps = norm_eps if isinstance(norm_eps, mx.array) else mx.array([norm_eps], mx.float32)
    return [norm_w, eps.reshape(1).astype(mx.float32)]


def _launch_conv(
    kernel,
    inputs,
    y_shape,
    dtype,
    conv_w,
    state,
    T,
    norm,
    lanes,
    warps,
    init_value,
    bound=False,
    stacked=False,
):
    """One conv decode launch of T tokens a row: y (y_shape, laid out as [B, T, Hv, Dv]), state,
    conv state, and for T > 1 the states after each token but the last: [T-1, B, ...] (stacked)
    or the same memory as [(T-1) B, ...] rows (token t's are rows t B .. t B + B - 1; for T = 2
    the shape of the state itself)."""
    B, Hv, Dv, Dk = state.shape
    C, K = conv_w.shape
    if norm:
        lanes, warps = norm_layout(Dk, Dv)
    L, W, _, groups = _geometry(B, 1, Hv, Dk, Dv, lanes, warps, 0)
    shapes = [y_shape, (B, Hv, Dv, Dk), (B, K - 1, C)]
    dtypes = [dtype, mx.float32, dtype]
    if T > 1:
        lead = (T - 1, B) if stacked else ((T - 1) * B,)
        shapes += [(*lead, Hv, Dv, Dk), (*lead, K - 1, C)]
        dtypes += [mx.float32, dtype]
    template = [("Dk", Dk), ("L", L), ("P", 0), ("YT", dtype), ("K", K), ("W", W)]
    if bound:
        # The precompiled CUDA entry's __launch_bounds__ (precompiled.py): at the gated norm's
        # layout a block has up to 512 threads (Dk = Dv = 128), so at most 128 registers a
        # thread; unbounded, nvcc 12 gave the T > 1 variants 132-165 (the launch would fail).
        template.append(("MAX_THREADS", 32 * W))
    return kernel(
        inputs=inputs,
        template=template,
        grid=(32 * B * Hv, groups, 1),
        threadgroup=(32, W, 1),
        output_shapes=shapes,
        output_dtypes=dtypes,
        init_value=init_value,
    )


def packed_shape_supported(proj, conv_w, state, norm_w, tokens: int) -> bool:
    """The packed T-token kernel takes these shapes: `conv_shape_supported`, 1 <= T <= 8 rows
    a batch row, and the gated norm's layout (`norm_layout`, norm_w in proj's dtype)."""
    Dk, Dv = state.shape[3], state.shape[2]
    if not conv_shape_supported(proj, conv_w, state) or not 1 <= tokens <= MAX_TOKENS:
        return False
    return norm_w.dtype == proj.dtype and norm_layout(Dk, Dv) is not None


def run_packed_decode(
    build,
    proj,
    conv_state,
    conv_w,
    A_log,
    dt_bias,
    state,
    mask=None,
    *,
    tokens: int,
    norm_w,
    norm_eps,
    init_value=None,
    stacked=False,
):
    """The conv decode kernel over T = `tokens` tokens a row, reading the fused in-projection
    proj [B * T, C + Hv Dv + 2 Hv] (row b * T + t, columns [qkv | z | b | a]; or [.., 1]:
    then y has that trailing 1 too) in place, with
    the gated norm; mask [B, T] or None (shapes validated by the caller). Returns (y
    [B * T, Hv * Dv] in proj's dtype, state, conv state after the last token, and for T > 1
    (state_tok [(T-1) B, Hv, Dv, Dk], conv_tok [(T-1) B, K-1, C]), the states after each
    earlier token t as rows t B .. t B + B - 1 (stacked: [T-1, B, ...], the same memory); None
    for T = 1)."""
    inputs = [proj, conv_state, conv_w, A_log, dt_bias, state.astype(mx.float32)]
    inputs += _norm_inputs(norm_w, norm_eps)
    if mask is not None:
        inputs.append(mask.astype(mx.bool_))
    kernel = build("fused", mask is not None, True, True, True, tokens, True)
    B, Hv, Dv, _ = state.shape
    # proj as columns [B * T, width, 1] (its shape's first two entries are what the kernel
    # reads): y as columns too
    y_shape = (B * tokens, Hv * Dv, *proj.shape[2:])
    args = (kernel, inputs, y_shape, proj.dtype, conv_w, state, tokens, True, None, None)
    out = _launch_conv(*args, init_value, bound=True, stacked=stacked)
    return out[0], out[1], out[2], (tuple(out[3:]) if tokens > 1 else None)


def run_gates(build, q, k, v, g, beta, state, mask=None, **launch_kw):
    """Recurrence with precomputed gates through a backend's `build(gate, mask, decode)`."""
    inputs = [q, k, v, g, beta, state.astype(mx.float32)]
    if mask is not None:
        inputs.append(mask.astype(mx.bool_))
    kernel = build("per_key" if g.ndim == 4 else "scalar", mask is not None, q.shape[1] == 1)
    return launch(kernel, inputs, q, v, **launch_kw)


def run_fused(build, q, k, v, a, b, A_log, dt_bias, state, mask=None, **launch_kw):
    """Recurrence from raw gate inputs: g and beta are computed in fp32 inside the kernel
    (measured as fast as precomputed gates)."""
    inputs = [q, k, v, a, b, A_log, dt_bias, state.astype(mx.float32)]
    if mask is not None:
        inputs.append(mask.astype(mx.bool_))
    return launch(build("fused", mask is not None, q.shape[1] == 1), inputs, q, v, **launch_kw)


class GpuBackend:
    """One GPU build of the bodies in `source.py`: a backend's helpers (`header`), its prologue
    (the gd_lane / gd_row_group / gd_head lines) and its kernel factory: the name of MLX's in
    `mx.fast` (`metal_kernel`, `cuda_kernel`) or a callable with the same keyword arguments
    (CUDA: `precompiled.cuda_kernel`, which caches compiled kernels on disk). Everything else
    about building and launching is shared here; every kernel is made by `make_kernel`."""

    def __init__(self, *, header: str, prologue: str, factory, available):
        self.header = header
        self.prologue = prologue
        self._factory = factory
        self._available = available
        self._kernels: dict[tuple, object] = {}

    def is_available(self) -> bool:
        return self._available()

    def kernel_source(
        self, gate: str, mask: bool, decode=False, conv=False, norm=False, tokens=1, packed=False
    ) -> str:
        """The full `source=` for one variant: prologue + body."""
        return self.prologue + kernel_body(gate, mask, decode, conv, norm, tokens, packed)

    def build(
        self, gate: str, mask: bool, decode=False, conv=False, norm=False, tokens=1, packed=False
    ):
        """The MLX kernel object of one variant (built once), or None without the backend."""
        if not self.is_available():
            return None
        key = (gate, mask, decode, conv, norm, tokens, packed)
        if key not in self._kernels:
            self._kernels[key] = self.make_kernel(
                kernel_name(gate, mask, decode, conv, norm, tokens, packed),
                input_names(gate, mask, conv, norm, packed),
                output_names(conv, tokens),
                self.kernel_source(gate, mask, decode, conv, norm, tokens, packed),
            )
        return self._kernels[key]

    def make_kernel(self, name: str, inputs: list[str], outputs: list[str], source: str):
        """One kernel object from this backend's factory, with its `header` (any kernel of
        this backend, e.g. the chunked ones, should be made here)."""
        factory = self._factory if callable(self._factory) else getattr(mx.fast, self._factory)
        return factory(
            name=name, input_names=inputs, output_names=outputs, source=source, header=self.header
        )

    def supports(self, q, v, g) -> bool:
        return self.is_available() and shape_supported(q, v, g)

    def gated_delta_kernel(self, q, k, v, g, beta, state, mask=None, **launch_kw):
        """Fused recurrence with precomputed gates; returns (y, state [B, Hv, Dv, Dk] fp32)."""
        return run_gates(self.build, q, k, v, g, beta, state, mask, **launch_kw)

    def gated_delta_update_kernel(self, q, k, v, a, b, A_log, dt_bias, state, mask=None, **kw):
        """Fused gating + recurrence; returns (y, state [B, Hv, Dv, Dk] fp32)."""
        return run_fused(self.build, q, k, v, a, b, A_log, dt_bias, state, mask, **kw)

    def supports_conv(self, qkv, conv_w, state, norm_w=None) -> bool:
        """The conv decode kernel takes these shapes (with norm_w: the gated-norm variant,
        which needs `norm_layout` and norm_w in qkv's dtype)."""
        if not (self.is_available() and conv_shape_supported(qkv, conv_w, state)):
            return False
        if norm_w is None:
            return True
        return norm_w.dtype == qkv.dtype and norm_layout(state.shape[3], state.shape[2]) is not None

    def gated_delta_decode_kernel(
        self, qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask=None, **kw
    ):
        """Conv + silu + norms + gating + recurrence for T = 1 in one launch (with z, norm_w,
        norm_eps: and the gated norm); returns (y [B, Hv, Dv], state [B, Hv, Dv, Dk] fp32,
        conv state [B, K-1, C])."""
        return run_conv_decode(
            self.build, qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask, **kw
        )

    def supports_packed(self, proj, conv_w, state, norm_w, tokens: int) -> bool:
        """The packed T-token conv decode kernel (with the gated norm) takes these shapes."""
        return self.is_available() and packed_shape_supported(proj, conv_w, state, norm_w, tokens)

    def gated_delta_decode_packed_kernel(
        self, proj, conv_state, conv_w, A_log, dt_bias, state, mask=None, **kw
    ):
        """`run_packed_decode`: T tokens a row from the fused in-projection in one launch."""
        return run_packed_decode(
            self.build, proj, conv_state, conv_w, A_log, dt_bias, state, mask, **kw
        )
