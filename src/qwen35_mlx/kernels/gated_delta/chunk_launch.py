"""Host side of the chunked gated-delta GPU kernels (`chunk_source.py`): the helpers they need
beyond `metal.py` / `cuda.py`, their builds, and `gated_delta_chunk_kernel`.

Work split (benchmarks/NOTES.md "Chunked GPU kernel"):
  prep    parallel over every chunk and head: the decays, k k^T and q k^T, the unit-lower-
          triangular solve for U and W, Qg, Kw (PREP_BODY, scalar gates). Per-key gates use the
          MLX-ops pieces of `chunked.py` instead (not the Qwen3.5 path; correctness only).
  state   one threadgroup per (batch x value head, BV value rows) loops over the chunks with
          its state tile on chip and writes y and the final state (STATE_BODY).
Shapes as everywhere in the module: q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g [B, T, Hv] or
[B, T, Hv, Dk]; beta [B, T, Hv]; state [B, Hv, Dv, Dk] fp32; mask [B, T] bool.
"""

from __future__ import annotations

import mlx.core as mx

from . import chunk_source as src
from . import cuda, metal
from .launch import shape_supported

CHUNK = 64  # steps per chunk (PREP_BODY needs a multiple of 16)
BV = 16  # value rows per state-pass threadgroup: B * Hv * Dv / 16 threadgroups
STATE_THREADS = 256
PREP_THREADS = 256  # PREP_BODY's 16 x 16 tile grid
KEY_SLICE = 32  # key columns staged at a time in PREP_BODY
# The state pass prefetches the next chunk's rows into L2 (CUDA; a no-op on Metal). Not yet
# measured against 0: `benchmarks/run_gpu.sh chunk-parts` times both.
PREFETCH = 1

# Helpers of the chunk kernels on each backend (added to that backend's header).
_EXTRA_HEADER = {
    "metal": """
#define GD_TG threadgroup
#define GD_TG_PTR threadgroup
inline void gd_barrier() {
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
inline float4 gd_f4(float x, float y, float z, float w) {
  return float4(x, y, z, w);
}
""",
    "cuda": """
#define GD_TG __shared__
#define GD_TG_PTR
__device__ __forceinline__ void gd_barrier() {
  __syncthreads();
}
__device__ __forceinline__ float4 gd_f4(float x, float y, float z, float w) {
  return make_float4(x, y, z, w);
}
""",
}
PROLOGUE = {
    "metal": """
  const unsigned gd_tid = thread_position_in_threadgroup.x;
  const unsigned gd_tg_x = threadgroup_position_in_grid.x;
  const unsigned gd_tg_y = threadgroup_position_in_grid.y;
""",
    "cuda": """
  const unsigned gd_tid = threadIdx.x;
  const unsigned gd_tg_x = blockIdx.x;
  const unsigned gd_tg_y = blockIdx.y;
""",
}
_BASE = {"metal": metal, "cuda": cuda}
_FACTORY = {"metal": "metal_kernel", "cuda": "cuda_kernel"}
_AVAILABLE = {"metal": lambda: mx.metal.is_available(), "cuda": lambda: mx.cuda.is_available()}


def header(backend: str) -> str:
    return _BASE[backend].HEADER + _EXTRA_HEADER[backend]


def state_source(backend: str) -> str:
    return PROLOGUE[backend] + src.STATE_BODY


def prep_source(backend: str, fused: bool = False) -> str:
    return PROLOGUE[backend] + src.prep_body(fused)


_kernels: dict[tuple[str, str], object] = {}


def _build(backend: str, which: str):
    """which: "state", "prep" or "prep_fused"."""
    key = (backend, which)
    if key not in _kernels:
        if which == "state":
            name, ins, outs = src.STATE_NAME, src.STATE_INPUTS, src.STATE_OUTPUTS
            body = state_source(backend)
        else:
            fused = which == "prep_fused"
            name, ins, outs = src.prep_name(fused), src.prep_inputs(fused), src.PREP_OUTPUTS
            body = prep_source(backend, fused)
        _kernels[key] = _factory(backend)(
            name=name, input_names=ins, output_names=outs, source=body, header=header(backend)
        )
    return _kernels[key]


def _factory(backend: str):
    """MLX's kernel factory for the backend (a seam: the CPU tests put the lane emulator here)."""
    return getattr(mx.fast, _FACTORY[backend])


def available_backend() -> str | None:
    """ "metal" or "cuda" where MLX has that GPU backend, else None."""
    for name in ("metal", "cuda"):
        if _AVAILABLE[name]():
            return name
    return None


def supports(q, v, g) -> bool:
    """Shapes the chunk kernels take: those of the fused kernels (Dk a multiple of 32 up to
    256), on a machine with a GPU backend."""
    return available_backend() is not None and shape_supported(q, v, g)


def prep_ops(q, k, v, g, beta, mask, C: int = CHUNK):
    """The state pass's inputs from MLX ops (chunked.py's intra-chunk pieces): W, U, Qg, P, Kw
    [B*Hv, N*C, .] and decay [B*Hv, N, Dk], fp32, rows padded to N*C."""
    from . import chunked as ch

    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    R = Hv // Hk
    per_key = g.ndim == 4
    qc, kc, vc, bc, gc, N = ch._chunked_inputs(q, k, v, g, beta, mask, C)
    if per_key:
        # Per-key decays build a [C, C, Dk] tensor per chunk: chunks go in groups, as chunked.py.
        step = max(1, ch._PER_KEY_GROUP_ELEMS // (B * Hv * C * C * Dk))
        parts = []
        for n0 in range(0, N, step):
            sl = (slice(None),) * 3 + (slice(n0, min(N, n0 + step)),)
            parts.append(ch._prep_per_key(qc[sl], kc[sl], vc[sl], gc[sl], bc[sl]))
        U, W, P, kw, qs, decay = (
            mx.concatenate([p[i] for p in parts], axis=3) for i in (0, 1, 2, 3, 4, 6)
        )
        ys_scale = None
    else:
        U, W, P, kw, qs, ys_scale, decay = ch._prep_scalar(qc, kc, vc, gc, bc)
    shape = (B, Hk, R, N, C)
    if ys_scale is not None:
        qs = ys_scale * qs
    BH = B * Hv

    def rows(x, width):
        return mx.contiguous(mx.broadcast_to(x, (*shape, width)).reshape(BH, N * C, width))

    decay = mx.broadcast_to(decay, (B, Hk, R, N, Dk, 1)).reshape(BH, N, Dk)
    return (
        rows(W, Dk),
        rows(U, Dv),
        rows(qs, Dk),
        rows(P, C),
        rows(mx.swapaxes(kw, -1, -2), Dk),
        mx.contiguous(decay),
    )


def prep_kernel(backend: str, q, k, v, g, beta, mask, C: int = CHUNK, raw_gates=None):
    """The state pass's inputs from PREP_BODY (scalar gates only); same layout as prep_ops.
    raw_gates = (a, b, A_log, dt_bias): the gates are computed in the kernel (g, beta unused)."""
    B, T, _, Dk = q.shape
    Hv, Dv = v.shape[2:]
    N = -(-T // C)
    BH = B * Hv
    if mask is None:
        mask = mx.ones((B, T), dtype=mx.bool_)
    f32 = mx.float32
    if raw_gates is None:
        gates, which = [g.astype(f32), beta.astype(f32)], "prep"
    else:
        a, b, A_log, dt_bias = raw_gates
        gates, which = [a, b, A_log.astype(f32), dt_bias.astype(f32)], "prep_fused"
    return _build(backend, which)(
        inputs=[q, k, v, *gates, mask.astype(mx.bool_)],
        template=[("Dk", Dk), ("C", C), ("NT", PREP_THREADS), ("DS", KEY_SLICE)],
        grid=(PREP_THREADS * N, BH, 1),
        threadgroup=(PREP_THREADS, 1, 1),
        output_shapes=[
            (BH, N * C, Dk),
            (BH, N * C, Dv),
            (BH, N * C, Dk),
            (BH, N * C, C),
            (BH, N * C, Dk),
            (BH, N, Dk),
        ],
        output_dtypes=[f32] * 6,
    )


def state_pass(
    backend: str,
    pieces,
    state,
    T: int,
    y_dtype,
    C: int = CHUNK,
    init_value=None,
    bv=None,
    prefetch=None,
):
    """The sequential pass over the chunks: returns (y [B, T, Hv, Dv] in y_dtype, state).
    bv: value rows per threadgroup (default BV; a multiple of 4; 32 needs more than Apple's
    32 KB of threadgroup memory at Dk = 128)."""
    W, U, Qg, P, Kw, decay = pieces
    B, Hv, Dv, Dk = state.shape
    BV_ = bv or BV
    return _build(backend, "state")(
        inputs=[W, U.reshape(B, Hv, -1, Dv), Qg, P, Kw, decay, state, mx.array([T], mx.int32)],
        template=[
            ("Dk", Dk),
            ("BV", BV_),
            ("C", C),
            ("NT", STATE_THREADS),
            ("PF", PREFETCH if prefetch is None else int(prefetch)),
            ("YT", y_dtype),
        ],
        grid=(STATE_THREADS * B * Hv, -(-Dv // BV_), 1),
        threadgroup=(STATE_THREADS, 1, 1),
        output_shapes=[(B, T, Hv, Dv), (B, Hv, Dv, Dk)],
        output_dtypes=[y_dtype, mx.float32],
        init_value=init_value,
    )


def gated_delta_chunk_kernel(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
    *,
    backend: str | None = None,
    prep: str = "auto",
    init_value: float | None = None,
    bv: int | None = None,
) -> tuple[mx.array, mx.array]:
    """Chunked gated delta rule on the GPU; state [B, Hv, Dv, Dk] fp32 (the other shapes as in
    the module docstring). `prep`: "kernel" (PREP_BODY, scalar gates),
    "ops" (MLX ops) or "auto" (the kernel for scalar gates); `bv`: see state_pass.
    Returns (y, state fp32)."""
    backend = backend or available_backend()
    if backend is None:
        raise RuntimeError("gated_delta chunk kernel: no Metal or CUDA backend in this MLX")
    T = q.shape[1]
    state = state.astype(mx.float32)
    if prep == "auto":
        prep = "ops" if g.ndim == 4 else "kernel"
    if prep == "kernel":
        if g.ndim == 4:
            raise ValueError("gated_delta chunk kernel: the prep kernel takes scalar gates only")
        pieces = prep_kernel(backend, q, k, v, g, beta, mask)
    else:
        pieces = prep_ops(q, k, v, g, beta, mask)
    return state_pass(backend, pieces, state, T, v.dtype, init_value=init_value, bv=bv)


def gated_delta_update_chunk_kernel(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    A_log: mx.array,
    dt_bias: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
    *,
    backend: str | None = None,
    init_value: float | None = None,
    bv: int | None = None,
) -> tuple[mx.array, mx.array]:
    """Chunked gated delta rule on the GPU from the raw gate inputs (a, b [B, T, Hv]; A_log,
    dt_bias [Hv]), computed in fp32 inside the prep kernel. Returns (y, state fp32)."""
    backend = backend or available_backend()
    if backend is None:
        raise RuntimeError("gated_delta chunk kernel: no Metal or CUDA backend in this MLX")
    pieces = prep_kernel(backend, q, k, v, None, None, mask, raw_gates=(a, b, A_log, dt_bias))
    return state_pass(
        backend,
        pieces,
        state.astype(mx.float32),
        q.shape[1],
        v.dtype,
        init_value=init_value,
        bv=bv,
    )
