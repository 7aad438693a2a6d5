"""Qwen3.5 decoder layers: Gated DeltaNet, gated attention, SwiGLU MLP, sparse MoE.

Gated DeltaNet (linear attention), per value head h with key head h // (Hv / Hk):
    S_t = g_t S_{t-1} + beta_t (v_t - g_t S_{t-1} k_t) k_t^T,   y_t = S_t q_t
after a causal depthwise conv1d + SiLU over [q | k | v], with q, k l2-normalised over Dk and q
scaled by Dk^-1/2; the output passes a gated RMSNorm with silu(z) and out_proj.
Shapes: q, k [B, T, Hk, Dk]; v, y [B, T, Hv, Dv]; a, b [B, T, Hv]; recurrent state
[B, Hv, Dv, Dk] fp32; conv state [B, K-1, C] holds the last K-1 pre-conv inputs.

Full attention: q_proj gives per head [query | gate]; q_norm/k_norm over head_dim; partial rotary
(rotate-half) on the first rotary_dim dims; GQA; output * sigmoid(gate) before o_proj.

Norms: every Qwen3_5RMSNorm is mlx's nn.RMSNorm (mx.fast.rms_norm) with its weight the full
multiplier (1 + w, shifted once by `sanitize`); the gated norm applies its weight as stored.
conv1d.weight is MLX layout [C, K, 1].

References: transformers models/qwen3_5/modeling_qwen3_5.py, qwen3_5_moe/modeling_qwen3_5_moe.py.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear

from ..kernels import conv_qkv as conv_kernel
from ..kernels import cpu_blas_is_slow, cpu_ext, fused_norm
from ..kernels import rows_matmul as rows_kernel
from ..kernels.attention import MAX_T as DECODE_MAX_T
from ..kernels.gated_delta import (
    gated_delta_decode,
    gated_delta_decode_packed,
    gated_delta_update,
)
from ..kernels.gated_delta.decode import gated_rms_norm
from .attention import attention, decode_attention
from .config import TextConfig

_L2_EPS = 1e-6


# Decode projections. In the compiled decode step every primitive costs host time per token
# (benchmarks/NOTES.md, "Fast decode"), and nn.Linear is two: a Transpose of its weight and the
# Matmul. `prepare_projections` gives a module's Linear layers that read the same input (e.g.
# in_proj_qkv/z/b/a) one matrix, stored transposed, and `project` applies them as one Matmul
# and one Split. The fused matrix is a new buffer and the layers' own weights become row views
# of it, so memory does not grow, and the parameters keep their names, shapes and values
# (saving, quantizing, sharding and loading see nothing else). It is rebuilt whenever a
# layer's weight is no longer the view it made (new weights, a cast, quantization), and skipped
# for layers that do not fit (biases, LoRA or sharded wrappers, mixed dtypes or quantization).


# False: each Linear keeps its own matmul at decode (its weight still a transposed view), for a
# backend whose GEMM would round a fused matrix's outputs differently from the separate ones
# (the compiled step must match the plain path token for token).
FUSE_DECODE_PROJECTIONS = True

# On the CPU, float32 matmuls run in BLAS (MLX calls cblas_sgemm), and `x @ W.T` with W stored
# [out, in] is its slow form: MLX's bundled reference BLAS then runs one scalar dot product per
# output (latency-bound), OpenBLAS packs all of W for a one-row product. With W stored [in, out]
# (`x @ W_t`, W_t contiguous) the reference BLAS runs axpy loops instead, bit-identical and
# 1.5-2x faster, and OpenBLAS 1.2-2x (benchmarks/NOTES.md, "CPU decode, 2026-12-02"). So on a CPU
# stream, float32 Linear layers without bias (and a tied output layer's Embedding) get their
# weight stored transposed: the layer's `weight` becomes the transposed view of a contiguous
# [in, out] buffer (same shape, values and name; no second copy), which the plain path's
# `x @ weight.T` and the step both read in the fast form. Such groups are not fused (a fused
# [in, sum(out)] buffer could not back the layers' own weights as views without a copy per plain
# call). False: the layout above, as on a GPU.
CPU_TRANSPOSED_WEIGHTS = True


# Half-precision projections on the CPU: MLX multiplies a float16 / bfloat16 matrix there by
# converting both operands to float32, one sgemm and a rounding of the result to the input's
# dtype (bit for bit: tests/models/test_mtp.py), so each call converts the whole weight again,
# which at small widths is most of the product's time (the tiny model's 128 x 2048 output
# layer: 0.46 ms a call, 0.14 ms from a float32 copy [in, out]). `prepare_projections(...,
# fp32=True)` makes a float32 copy [in, out] of such a group its decode form, and `project`
# takes x to float32 and the product back to x's dtype: the same numbers, for twice the group's
# bytes of memory (the copy is extra; the layers keep their own weights). The text model asks it
# on the CPU for the MTP head, or for every projection (text.py `CPU_FP32_DECODE`).


# The decode projections through the optional native CPU extension's few-rows matmul
# (`kernels.cpu_ext.matmul_rows`: x @ W for 1-8 rows with W read once, each group's layers in
# one primitive, a residual add folded into it). MLX's CPU wheel runs float32 matmuls on its
# bundled reference BLAS, scalar code: a one-row product of the small model's step ran at ~1
# multiply-add a ns, 3-4x slower than the native one (benchmarks/NOTES.md, "Session 15, helper
# cpumv"). The native sum runs in k order with every product and add rounded on its own, as that
# BLAS sums, so on it the step, the plain path (MLX's matmul) and the verify pass (any row
# count) give the same bits. CPU_NATIVE_MATMUL: "auto" (where the extension is built and MLX
# runs its reference BLAS), True (wherever it is built: benchmarks; with OpenBLAS the step would
# round differently from the plain path), False (MLX's matmul). Read when a step is traced.
CPU_NATIVE_MATMUL: str | bool = "auto"
# Rows a call at most (a verify pass has B (k + 1)); the kernel reads W once for each 8.
CPU_NATIVE_MATMUL_MAX_ROWS = 32


def _native_matmul(x: mx.array, ws, x_dtype=mx.float32) -> bool:
    """Whether x @ w for each w of `ws` (float32 [K, N]) runs as one native call (x of
    `x_dtype`: float32, or float16 for the native call's own casts)."""
    if not CPU_NATIVE_MATMUL or mx.default_device() != mx.cpu:
        return False
    if x.dtype != x_dtype or not all(w.ndim == 2 and w.dtype == mx.float32 for w in ws):
        return False
    if x.ndim == 0 or x.size > CPU_NATIVE_MATMUL_MAX_ROWS * x.shape[-1]:
        return False
    if CPU_NATIVE_MATMUL == "auto" and not cpu_blas_is_slow():
        return False
    return cpu_ext.available()


class _Fused:
    """What `prepare_projections` made for one group: the weights it took (to see a change),
    the output sizes, the quantization arguments (None for a dense matrix), whether the group
    is one matrix (else one transposed view per layer), and whether that matrix is a float32
    copy of half-precision weights (see above)."""

    def __init__(
        self,
        weights: list,
        sizes: list[int],
        quant: dict | None,
        fused: bool = True,
        fp32: bool = False,
    ):
        self.weights, self.sizes, self.quant, self.fused = weights, sizes, quant, fused
        self.fp32 = fp32


def _key(names: tuple[str, ...]) -> str:
    # An underscore key: not a parameter (not saved or loaded), but the compiled step, which
    # takes its model's whole tree as implicit inputs (`inputs=`), reads it at every call.
    return "_decode_" + names[0]


def _fusable(mods: list) -> dict | None | bool:
    """False when `mods` cannot share one matrix; None when they are dense (same dtype, no
    bias); their common quantization arguments when they are quantized alike."""
    if any("bias" in m for m in mods):
        return False
    if len(mods) == 1 and type(mods[0]) is nn.Conv1d:
        return None
    if all(type(m) in (nn.Linear, nn.Embedding) for m in mods):
        return None if len({m.weight.dtype for m in mods}) == 1 else False
    if len(mods) > 1 and all(type(m) is nn.QuantizedLinear for m in mods):
        args = [(m.group_size, m.bits, m.mode, m.scales.dtype, "biases" in m) for m in mods]
        if len(set(args)) == 1:
            return dict(group_size=mods[0].group_size, bits=mods[0].bits, mode=mods[0].mode)
    return False


def prepare_projections(owner: nn.Module, names: tuple[str, ...], fp32: bool = False) -> None:
    """Make (or keep, or drop) the decode form of owner's Linear layers `names`, which all read
    the same input (see `project`). One identity check per layer when nothing changed. `fp32`:
    on the CPU, dense half-precision layers get a float32 copy [in, out] (see `_Fused`)."""
    key = _key(names)
    mods = [owner[n] for n in names]
    fp32 = fp32 and _cpu_fp32_copy(mods) and (len(mods) == 1 or FUSE_DECODE_PROJECTIONS)
    made = _made(owner, names)
    if made is not None and made.fp32 == fp32:
        return
    if key in owner:
        del owner[key]
    object.__setattr__(owner, key + "_made", None)
    quant = _fusable(mods)
    if quant is False:
        return
    sizes = [m.weight.shape[0] for m in mods]
    if quant is None and fp32:
        if len(mods) == 1:
            w = mods[0].weight.T
        else:
            w = mx.concatenate([_view(m, m.weight) for m in mods], axis=1)
        owner[key] = mx.contiguous(w.astype(mx.float32))  # [in, sum(out)]
        mx.eval(owner[key])
        made = _Fused([m.weight for m in mods], sizes, None, fused=True, fp32=True)
        object.__setattr__(owner, key + "_made", made)
        return
    if quant is None and _cpu_transposed(mods):
        owner[key] = tuple(_transposed_storage(m) for m in mods)
        mx.eval(owner[key], [m.weight for m in mods])
        made = _Fused([m.weight for m in mods], sizes, None, fused=False)
        object.__setattr__(owner, key + "_made", made)
        return
    if len(mods) > 1 and not FUSE_DECODE_PROJECTIONS:
        if quant is None:  # (a quantized layer is one primitive already)
            owner[key] = tuple(m.weight.T for m in mods)
            mx.eval(owner[key])
            made = _Fused([m.weight for m in mods], sizes, None, fused=False)
            object.__setattr__(owner, key + "_made", made)
        return
    arrays = ("weight", "scales", "biases") if quant else ("weight",)
    arrays = [a for a in arrays if a in mods[0]]
    if len(mods) == 1:
        fused = {"weight": mods[0].weight}
    else:
        fused = {a: mx.concatenate([m[a] for m in mods]) for a in arrays}
        mx.eval(fused)
        starts = np.cumsum([0] + sizes)
        for m, lo, hi in zip(mods, starts[:-1], starts[1:], strict=True):
            for a in arrays:  # views of the fused buffer: the old arrays can go
                m[a] = fused[a][int(lo) : int(hi)]
        mx.eval([m[a] for m in mods for a in arrays])
    if quant is None:
        w = fused["weight"]
        if len(mods) == 1 and not isinstance(mods[0], nn.Conv1d):
            # Row-contiguous (a shared buffer when it is already): `rows_kernel.rows_matmul_t`
            # reads the buffer under the transposed view as W [N, K].
            w = mx.contiguous(w)
        owner[key] = _view(mods[0], w)  # no Transpose (Reshape) in the step
        mx.eval(owner[key])
    else:
        owner[key] = tuple(fused.get(a) for a in ("weight", "scales", "biases"))
    object.__setattr__(owner, key + "_made", _Fused([m.weight for m in mods], sizes, quant))


def _cpu_transposed(mods: list) -> bool:
    """Whether `mods` take the CPU's transposed storage (`CPU_TRANSPOSED_WEIGHTS`)."""
    # A tied output layer (an Embedding) too: its decode matmul is the step's largest, and the
    # lookup of a token's row from the transposed view costs only in prefill (strided rows).
    return (
        CPU_TRANSPOSED_WEIGHTS
        and mx.default_device() == mx.cpu
        and all(type(m) in (nn.Linear, nn.Embedding) for m in mods)
        and all(m.weight.dtype == mx.float32 for m in mods)
    )


def _cpu_fp32_copy(mods: list) -> bool:
    """Whether `prepare_projections(..., fp32=True)` makes a float32 copy of `mods`: dense
    float16 / bfloat16 Linear layers (or a tied output layer's Embedding) on a CPU stream."""
    return (
        mx.default_device() == mx.cpu
        and all(type(m) in (nn.Linear, nn.Embedding) for m in mods)
        and all(m.weight.dtype in (mx.float16, mx.bfloat16) for m in mods)
    )


def _transposed_storage(mod: nn.Linear | nn.Embedding) -> mx.array:
    """mod's weight [out, in] moved to a contiguous [in, out] buffer, returned; the layer keeps
    the transposed view of it as its weight (the old buffer is freed: no second copy)."""
    w_t = mx.contiguous(mod.weight.T)
    mod.weight = w_t.T
    return w_t


def _view(mod: nn.Module, w: mx.array) -> mx.array:
    """The layout the step uses: a Linear's (or tied Embedding's) weight transposed, a depthwise
    Conv1d's [C, K, 1] as [C, K]. Made from an evaluated array, a view of its buffer."""
    return w.reshape(w.shape[0], -1) if isinstance(mod, nn.Conv1d) else w.T


def decode_weight(owner: nn.Module, name: str) -> mx.array:
    """owner's layer `name`'s weight as the compiled step uses it (`_view`): the one
    `prepare_projections` made, else made now."""
    if getattr(owner, _key((name,)) + "_made", None) is not None:
        return owner[_key((name,))]
    return _view(owner[name], owner[name].weight)


def _made(owner: nn.Module, names: tuple[str, ...]) -> _Fused | None:
    """The group's `_Fused` if its layers still hold the weights it was made from."""
    made = getattr(owner, _key(names) + "_made", None)
    if made is None:
        return None
    current = (owner[n].get("weight") for n in names)
    return made if all(w is m for w, m in zip(current, made.weights, strict=True)) else None


def retake_projections(owner: nn.Module, names: tuple[str, ...]) -> None:
    """After `mx.compile` traced a function that takes `owner`'s tree as implicit inputs: it
    put back the same arrays as new Python objects, so record those as the weights the group
    was made from (nothing can have changed them between `prepare_projections` and the end of
    the trace)."""
    made = getattr(owner, _key(names) + "_made", None)
    if made is not None:
        made.weights = [owner[n].get("weight") for n in names]


def project(owner: nn.Module, names: tuple[str, ...], x: mx.array) -> list[mx.array]:
    """x through owner's Linear layers `names` (an Embedding: as its tied output layer), as one
    matmul when `prepare_projections` made one for them, else each layer's own call. For the
    compiled decode step only, right after `prepare_projections` checked the weights: while
    `mx.compile` traces, the layers hold tracers, so no identity check can be made here."""
    made = getattr(owner, _key(names) + "_made", None)
    if made is None:
        mods = [owner[n] for n in names]
        return [m.as_linear(x) if hasattr(m, "as_linear") else m(x) for m in mods]
    if not made.fused:
        ws = owner[_key(names)]
        if _native_matmul(x, ws):
            return cpu_ext.matmul_rows(x, ws)
        return [x @ wi for wi in ws]
    y = _fused_matmul(owner, names, made, x)
    if len(names) == 1:
        return [y]
    return mx.split(y, np.cumsum(made.sizes[:-1]).tolist(), axis=-1)


def _fused_matmul(owner: nn.Module, names: tuple[str, ...], made: _Fused, x: mx.array):
    """x through the one matrix (plain or quantized) `prepare_projections` made for `names`."""
    w = owner[_key(names)]
    if made.fp32:
        if x.dtype == mx.float16 and cpu_ext.half_ops(x) and _native_matmul(x, [w], x.dtype):
            # The casts in the native call (`half_out`): two primitives fewer, the same bits.
            return cpu_ext.matmul_rows(x, [w], half_out=True)[0]
        x32 = x.astype(mx.float32)
        y = cpu_ext.matmul_rows(x32, [w])[0] if _native_matmul(x32, [w]) else x32 @ w
        return y.astype(x.dtype)
    if made.quant is None:
        return rows_matmul(x, w, owner, names) if _rows_gemv(x, w) else x @ w
    return mx.quantized_matmul(x, w[0], scales=w[1], biases=w[2], transpose=True, **made.quant)


def project_columns(owner: nn.Module, names: tuple[str, ...], x: mx.array) -> mx.array | None:
    """x through the group's one dense matrix as one gemv a row (`ROWS_GEMV`), the rows as
    column vectors in and out: x [R, K] or [R, K, 1] -> [R, N, 1] (the layers' outputs side by
    side along axis 1, in `names` order); where the few-rows kernel takes it (`ROWS_KERNEL`),
    -> [R, N], rows, whatever x's form (the kernel reads either, and writes rows: no reshape).
    Callers take both forms (a split along axis 1, a reshape to rows: free when the shape is
    already that). A chain of projections (the MLP's gate|up, swiglu, down) then reshapes only
    at its ends. None where the row-wise form does not apply (one row, a quantized or unfused
    group, `ROWS_GEMV` off): then `project`. For the compiled steps."""
    made = getattr(owner, _key(names) + "_made", None)
    if made is None or not made.fused or made.quant is not None or made.fp32:
        return None
    if not ROWS_PREBUILT:
        return None
    w = owner[_key(names)]
    R, K = x.shape[0], w.shape[0]
    if x.shape[1:] not in ((K,), (K, 1)) or not _rows_take(R, w):
        return None
    if _rows_kernel(R, w, x.dtype):
        return rows_kernel.rows_matmul_t(x, w, out_shape=(R, w.shape[1]))
    return _rows_product(owner, names, w, x.reshape(R, K, 1))


def project_split_columns(owner: nn.Module, names: tuple[str, ...], x: mx.array) -> list | None:
    """`project_columns`, split into the layers' outputs [R, n_i, 1] (or [R, n_i]: the
    kernel's rows) (views); None where it does not apply."""
    y = project_columns(owner, names, x)
    return y if y is None else split_outputs(owner, names, y)


def project_whole(owner: nn.Module, names: tuple[str, ...], x: mx.array) -> mx.array | None:
    """The group's one matrix's output, unsplit (the layers' outputs side by side along axis
    1): `project_columns`' form where it applies, else [R, N] from the fused matmul (dense or
    quantized); None where the group has no one matrix (then `project`). For the compiled
    steps (as `project`)."""
    y = project_columns(owner, names, x)
    if y is not None:
        return y
    made = getattr(owner, _key(names) + "_made", None)
    if made is None or not made.fused or x.ndim != 2:
        return None
    return _fused_matmul(owner, names, made, x)


def split_outputs(owner: nn.Module, names: tuple[str, ...], y: mx.array) -> list[mx.array]:
    """`project_whole`'s (or `project_columns`') output split into the layers' outputs along
    axis 1 (views), as `project` splits it."""
    if len(names) == 1:
        return [y]
    sizes = getattr(owner, _key(names) + "_made").sizes
    return mx.split(y, np.cumsum(sizes[:-1]).tolist(), axis=1)


def _rows_product(owner: nn.Module | None, names: tuple | None, w: mx.array, x: mx.array):
    """x [R, K, 1] (R rows as column vectors) through w [K, N] (the transposed view the step
    uses, of a row-contiguous W [N, K]) -> [R, N, 1]: one `rows_kernel` launch reading W once
    where it runs (`ROWS_KERNEL`), else R matrix-vector products: W [N, K] broadcast over the
    rows, from `rows_weights` where the compiled step was given owner's group `names` (no view
    made in the step), else made here (a Transpose and a Broadcast)."""
    R = x.shape[0]
    if _rows_kernel(R, w, x.dtype):  # (the callers take the kernel first: rows, no reshape)
        return rows_kernel.rows_matmul_t(x, w)
    wb = None
    if _ROWS_WEIGHTS and owner is not None:
        wb = _ROWS_WEIGHTS.get((id(owner), _key(names)))
    if wb is None or wb.shape[0] != R:
        W = w.T  # [N, K]: for the step's transposed views, the row-major buffer itself
        wb = mx.broadcast_to(W, (R, *W.shape))
    return mx.matmul(wb, x)


# A few rows (a speculative verify pass: T tokens a row) on CUDA. MLX runs a matmul of one row
# with a transposed weight (`x @ W.T`) as its own gemv kernel, one kernel node, but from two
# rows on as a cuBLASLt GEMM, and builds that per call: descriptors, an algorithm heuristic
# query (not cached) and a stream capture into a child graph, ~20-30 us of host time where the
# gemv costs ~3 (benchmarks/NOTES.md, "The verify pass's fixed cost"). At batch 1 the 0.8B
# verify pass has ~97 matmuls: that was its fixed ~3 ms over a step. `rows_matmul` asks MLX
# for the same product as R matrix-vector products (W [N, K] broadcast over R, each row a
# [K, 1] vector: MLX's batched gemv, one kernel node), which reads W once a row instead of
# once: it pays while (R - 1) x W's bytes stay small next to the host time it saves, and each
# row is computed exactly as the one-token step's gemv computes it (the same kernel on the same
# data), so a verify pass's projections round as the decode step's do (a GEMM's rounding
# depends on the row count): one source less of greedy MTP parting from plain decoding.
# ROWS_GEMV: "auto" (CUDA, 2 to ROWS_GEMV_MAX_ROWS rows, (R - 1) x bytes of W at most
# ROWS_GEMV_MAX_BYTES), True / False (always / never: tests and benchmarks).
ROWS_GEMV: str | bool = "auto"
# At most a verify pass's rows at batch 1 (text.MAX_STEP_TOKENS): the same rule also meets a
# batch of 2-8 rows decoding, where W read once a row (up to 7 x 64 MiB a projection) was not
# measured against cuBLAS's host cost.
ROWS_GEMV_MAX_ROWS = 8
ROWS_GEMV_MAX_BYTES = 64 << 20
# The row-wise products as one launch of `kernels.rows_matmul`: W read once whatever the rows,
# each row summed as MLX's one-row gemv sums it (so the same bits as the broadcast form), no
# broadcast matrix passed into the compiled steps, and no byte limit (the lm_head, 9B's
# projections: cuBLAS GEMMs before). A custom kernel costs MLX's host more than its own gemv
# (~5 against ~2 us, benchmarks/NOTES.md), so where the broadcast gemv's extra reads stay cheap
# (small matrices, in L2) it may not pay at batch 1. ROWS_KERNEL: True (every row-wise
# product), "large" (only where the broadcast form is over ROWS_GEMV_MAX_BYTES, i.e. in place
# of a cuBLAS GEMM), "wide" (only where W has at least twice as many outputs as inputs, N >= 2K:
# the in-projections and the lm_head; the kernel gives a warp C outputs, so a product of few
# outputs and a long K (o_proj, out_proj, down_proj) runs on few warps with long loops, where
# MLX's gemv was faster on the H200: `probe_verify.py --matmul`, 2026-12-02 17:35), False (MLX's
# batched gemv over W broadcast, as before). Where the kernel
# does not run (the CPU, another dtype) the broadcast form stays. Read when a step is traced
# and at every plain call. Off by default: on the H200 (2026-12-02, `probe_verify.py`) the
# kernel took host time off a 2-token verify pass (0.8B: 1.04x a step in CPU time against the
# gemv's 1.11x; 9B "large": 1.11x against 1.41x) but its own GPU time put wall time behind the
# gemv's (0.8B 1.25x against 1.15x, 9B 1.20x against 1.16x): its bandwidth is the next step.
# `rows_kernel.AHEAD` (> 0) picks the kernel's "ahead" variant (more of W in flight a warp).
ROWS_KERNEL: str | bool = False


def _rows_kernel(rows: int, w: mx.array, dtype) -> bool:
    """Whether a row-wise product of `rows` rows of `dtype` with w [K, N] runs the kernel."""
    if not ROWS_KERNEL or w.ndim != 2 or not 1 <= rows <= rows_kernel.MAX_ROWS:
        return False
    if ROWS_KERNEL == "large" and (rows - 1) * w.nbytes <= ROWS_GEMV_MAX_BYTES:
        return False
    if ROWS_KERNEL == "wide" and w.shape[1] < 2 * w.shape[0]:  # w [K, N]
        return False
    return w.dtype == dtype and rows_kernel.kernel_available(dtype)


def _rows_gemv(x: mx.array, w: mx.array) -> bool:
    return _rows_take(x.size // x.shape[-1] if x.ndim else 0, w)


def _rows_take(rows: int, w: mx.array) -> bool:
    """Whether a product of `rows` rows with w [K, N] runs as one gemv a row (`ROWS_GEMV`)."""
    if rows < 2 or w.ndim != 2:
        return False
    if ROWS_GEMV != "auto":
        return bool(ROWS_GEMV)
    if mx.default_device() != mx.gpu or not mx.cuda.is_available() or rows > ROWS_GEMV_MAX_ROWS:
        return False
    # The kernel reads W once: no limit on W's bytes (the activations share W's dtype).
    return _rows_kernel(rows, w, w.dtype) or (rows - 1) * w.nbytes <= ROWS_GEMV_MAX_BYTES


def rows_matmul(x: mx.array, w: mx.array, owner=None, names=None) -> mx.array:
    """x [..., K] @ w [K, N] as one matrix-vector product per row of x (`ROWS_GEMV`): one
    `rows_kernel` launch where it runs (`ROWS_KERNEL`; then x must be row-contiguous and w the
    transposed view of a row-contiguous W, as the decode weights and every caller's activations
    are: the kernel reads both buffers as they lie), else the transposed weight w's matrix
    W [N, K] broadcast over the rows, each row a [K, 1] vector (`_rows_product`; owner, names:
    the decode group w is, for its broadcast matrix)."""
    K = x.shape[-1]
    R = x.size // K
    if _rows_kernel(R, w, x.dtype):  # [..., K] in, [..., N] out: no reshape
        return rows_kernel.rows_matmul_t(x, w)
    out = _rows_product(owner, names, w, x.reshape(R, K, 1))
    return out.reshape(*x.shape[:-1], w.shape[1])


# Each row-wise product above costs the step a Transpose and a Broadcast of its weight besides
# the matmul: views, but every primitive costs MLX's host time per call (~1.5-3 us on the
# H200), and a 0.8B verify pass has 96 such products. So the compiled multi-token steps take
# the broadcast matrices as inputs (`rows_weights`, made once outside the step: views of the
# weights, no memory) and `_rows_product` reads them from here while the step is traced. Not
# in the model's tree: the one-token step, which takes the whole tree as inputs at every call,
# would flatten them too.
_ROWS_WEIGHTS: dict | None = None
# False: the row-wise form as it was first written (each product's Transpose, Broadcast and
# Reshapes made in the step, no column chains): benchmarks' A/B (probe_verify.py) only.
ROWS_PREBUILT = True


def rows_weights(groups: list, rows: int) -> tuple[list, list]:
    """For a compiled step over `rows` rows: (keys, matrices) of the decode projections of
    `groups` ((owner, names), as `TextModel._decode_groups`) that run row-wise there, each its
    matrix W [N, K] broadcast to [rows, N, K] (an evaluated view). Pass the matrices into the
    step and trace it inside `using_rows_weights(keys, matrices)`."""
    keys, mats = [], []
    for owner, names in groups if ROWS_PREBUILT else ():
        made = getattr(owner, _key(names) + "_made", None)
        if made is None or not made.fused or made.quant is not None or made.fp32:
            continue
        w = owner[_key(names)]
        if _rows_take(rows, w) and not _rows_kernel(rows, w, w.dtype):  # (the kernel: none)
            keys.append((id(owner), _key(names)))
            mats.append(mx.broadcast_to(w.T, (rows, *w.T.shape)))
    mx.eval(mats)
    return keys, mats


class using_rows_weights:
    """Context: `_rows_product` takes the matrices of `rows_weights` (tracers in a trace)."""

    def __init__(self, keys: list, mats: list):
        self.table = dict(zip(keys, mats, strict=True))

    def __enter__(self):
        global _ROWS_WEIGHTS
        self.saved, _ROWS_WEIGHTS = _ROWS_WEIGHTS, self.table

    def __exit__(self, *exc):
        global _ROWS_WEIGHTS
        _ROWS_WEIGHTS = self.saved


# Residual adds folded into the projection before them: `x + out_proj(y)` as one
# `mx.addmm(x, y, W.T)` (one primitive instead of a matmul and an add), in the plain path and
# the compiled step alike, so the two stay equal. The sum then rounds once, where matmul + add
# round the product first. Where it pays (MLX 0.32): on MLX's CUDA backend an AddMM never takes
# the gemv kernel that a one-row matmul with a transposed weight gets (it runs cuBLAS with a bias
# epilogue: about 10 us of host time against 2.6 for gemv + add), so one-row calls there keep
# the matmul and the add; from two rows both forms are cuBLAS and the fold saves the add. On the
# CPU the step is bound by the matmuls, not by primitives (benchmarks/NOTES.md), so it is left
# as it was. FOLD_RESIDUAL: "auto" (that rule), True or False (always / never: tests); the
# compiled step reads it when it is traced.
FOLD_RESIDUAL: str | bool = "auto"


def _fold(y: mx.array, w: mx.array, residual: mx.array) -> bool:
    if not residual.dtype == y.dtype == w.dtype or not mx.issubdtype(y.dtype, mx.floating):
        return False
    if FOLD_RESIDUAL != "auto":
        return bool(FOLD_RESIDUAL)
    return _fold_auto(y.size // y.shape[-1])


def _fold_auto(rows: int) -> bool:
    """FOLD_RESIDUAL "auto" for a matmul of `rows` rows on the default device."""
    if mx.default_device() == mx.cpu:
        return False
    return rows > 1 or not mx.cuda.is_available()


def linear_add(layer: nn.Module, y: mx.array, residual: mx.array | None) -> mx.array:
    """residual + layer(y) (just layer(y) without a residual), as one AddMM where `_fold`
    allows and `layer` is a plain bias-free nn.Linear; otherwise the layer's call and an add."""
    if residual is None:
        return layer(y)
    if type(layer) is nn.Linear and "bias" not in layer and _fold(y, layer.weight, residual):
        return mx.addmm(residual, y, layer.weight.T)
    return residual + layer(y)


def project_add(owner: nn.Module, name: str, y: mx.array, residual: mx.array | None):
    """`linear_add` for the compiled step: owner's layer `name` through `project`, with its
    decode weight (the transposed view `prepare_projections` made) when the fold applies."""
    made = getattr(owner, _key((name,)) + "_made", None)
    if residual is not None and made is not None and made.quant is None:
        w = owner[_key((name,))]
        w = w if made.fused else w[0]  # one layer: its matrix, or its own transposed view
        if made.fp32:
            # A float32 AddMM does not round as the half-precision one (the product and the
            # add in another order): fold through the layer's own weight, as the plain path.
            weight = owner[name].weight
            if _fold(y, weight, residual):
                return mx.addmm(residual, y, weight.T)
        elif _fold(y, w, residual):
            return mx.addmm(residual, y, w)
        elif (
            not made.fused
            and residual.dtype == y.dtype
            and residual.shape == (*y.shape[:-1], w.shape[1])
            and _native_matmul(y, [w])
        ):
            # The add in the same primitive, rounded after the product as `residual + out` is.
            return cpu_ext.matmul_rows(y, [w], [residual])[0]
    out = project(owner, (name,), y)[0]
    return out if residual is None else residual + out


# Residual adds fused with the RMSNorm after them (`kernels.fused_norm.add_rms_norm`: one
# kernel returns the sum and its norm). Every residual add of a decoder layer is followed by a
# norm of the sum (post_attention_layernorm after the mixer's, the next layer's input_layernorm
# or the final norm after the MLP's), so a layer hands the next one its residual stream as a
# pair (x, d), the stream being x + d, and the add happens inside the next norm's kernel: one
# primitive instead of two at each of the 2 L boundaries. Then no add is folded into a
# projection (`FOLD_RESIDUAL`): where a fold applies (from two rows on CUDA) it is also two
# primitives a boundary (an AddMM and the norm) against two here (the matmul and the fused
# kernel), and the MoE block, quantized and sharded layers, which never fold, save theirs; so
# the fused kernel is taken wherever it runs. ADD_NORM: "auto" (where `fused_norm` runs its
# kernel: a GPU), True (the pair structure everywhere, with the add and the norm as ops where
# no kernel runs: tests on the CPU), False (the add folded or separate, as before). Read when
# a step is traced and at every plain call, by the plain path and the compiled step alike.
# Default False: measured on the H200 (2026-12-02, 0.8B bf16, fresh model each), the step was
# faster without this kernel and the swiglu one (`SWIGLU_KERNEL`): batch 1 360 tok/s with
# neither against 339 with both, batch 128 20,120 against 17,475. One custom-kernel launch
# costs MLX's host ~8 us against ~2-3 for one of its own primitives (benchmarks/NOTES.md), so
# replacing two primitives by one kernel loses at batch 1, and at batch 128 the folded adds
# (`FOLD_RESIDUAL`) that the pair structure gives up were worth more.
ADD_NORM: str | bool = False


def add_norm_on(x: mx.array) -> bool:
    """Whether a layer stack over activations x passes its residual as (x, d) pairs. "auto":
    where the kernel runs, for calls of up to `FUSED_PLAIN_MAX_T` tokens a row (x [B, T, H];
    the compiled steps' x [rows, H] always): the calls a compiled step replaces, which must
    round as it does. Prefill keeps MLX's add and rms_norm."""
    if ADD_NORM != "auto":
        return bool(ADD_NORM)
    return fused_norm.kernel_available(x) and (x.ndim < 3 or x.shape[1] <= FUSED_PLAIN_MAX_T)


def add_norm(norm: nn.Module, x: mx.array, d: mx.array | None) -> tuple[mx.array, mx.array]:
    """(x + d, norm(x + d)) with the RMSNorm `norm`, as one kernel where it runs; d None:
    (x, norm(x))."""
    if d is None:
        return x, norm(x)
    return fused_norm.add_rms_norm(x, d, norm.weight, norm.eps)


def project_packed(owner: nn.Module, names: tuple[str, ...], x: mx.array, checked=False):
    """x through the group's one fused matmul, its output left whole ([..., sum of the layers'
    sizes], the layers' outputs side by side in `names` order), or None where
    `prepare_projections` made no single matrix for the group. For the compiled step, as
    `project`; `checked`: outside it, only if the layers still hold the weights it was made
    from (`_made`)."""
    made = _made(owner, names) if checked else getattr(owner, _key(names) + "_made", None)
    if made is None or not made.fused or len(names) < 2:
        return None
    return _fused_matmul(owner, names, made, x)


class RMSNormGated(nn.Module):
    """weight * rmsnorm(x) * silu(gate), the gate in fp32 (linear_attn.norm)."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        return _gated_rms_norm(x, gate, self.weight, self.eps)


# The linear-attention layer's elementwise work around the gated-delta call, compiled: at
# decode every op is a kernel launch, and these are ~30 of them per layer, which made batch-1
# generation on an H100 slower than mlx-lm's despite the faster recurrence (benchmarks/NOTES.md).


# The same function as the decode step's own (`gated_delta_decode(..., z=...)`, which runs it in
# its kernel on a GPU): prefill and decode share its arithmetic.
_gated_rms_norm = gated_rms_norm


def _l2norm(x: mx.array) -> mx.array:
    x32 = x.astype(mx.float32)
    return (x32 * mx.rsqrt((x32 * x32).sum(-1, keepdims=True) + _L2_EPS)).astype(x.dtype)


def _conv_qkv(conv_in: mx.array, w: mx.array, T: int, Hk: int, Dk: int, Hv: int, Dv: int):
    """Causal depthwise conv + silu, split into l2-normalised q (scaled by Dk^-0.5), k and v.

    conv_in [B, K-1+T, C] (tap K-1 meets the current token), w [C, K] -> q, k [B, T, Hk, Dk],
    v [B, T, Hv, Dv].
    """
    return _split_qkv(_conv_silu(conv_in, w, T), Hk, Dk, Hv, Dv)


def _conv_silu(conv_in: mx.array, w: mx.array, T: int) -> mx.array:
    """silu of the causal depthwise conv: conv_in [B, K-1+T, C], w [C, K] -> [B, T, C]."""
    K = w.shape[1]
    w = w.astype(conv_in.dtype)
    h = conv_in[:, 0:T] * w[:, 0]
    for j in range(1, K):
        h = h + conv_in[:, j : j + T] * w[:, j]
    return nn.silu(h)


def _l2norm_scaled(x: mx.array, scale: float) -> mx.array:
    """`_l2norm(x) * scale`, the product in x's dtype."""
    return _l2norm(x) * scale


# The l2 norms of q and k as compiled ops: the elementwise ops on either side of the sum fuse
# (a prefill step's q and k went through 15 kernels, each a pass over [T, Hk * Dk] in fp32;
# issue 9). The same ops in the same dtypes, and no product meets a sum inside a fused kernel
# (the sum of squares is its own primitive), so no multiply-add can be contracted: bit for bit
# the ops' results (tests/models/test_text.py). Shapeless: one trace serves every length.
_l2norm_fused = mx.compile(_l2norm, shapeless=True)
_l2norm_scaled_fused = mx.compile(_l2norm_scaled, shapeless=True)


def _split_qkv(h: mx.array, Hk: int, Dk: int, Hv: int, Dv: int):
    """The conv's output h [B, T, C] -> l2-normalised q (scaled by Dk^-0.5), k, and v."""
    B, T = h.shape[:2]
    q, k, v = mx.split(h, [Hk * Dk, 2 * Hk * Dk], axis=-1)
    q = _l2norm_scaled_fused(q.reshape(B, T, Hk, Dk), Dk**-0.5)
    return q, _l2norm_fused(k.reshape(B, T, Hk, Dk)), v.reshape(B, T, Hv, Dv)


# A prefill call's conv (the concat with the conv state, the taps, silu, the split and the q/k l2
# norms, and the new conv state) as `kernels.conv_qkv`'s one kernel (True, the default since
# session 12) or as the ops (False). On the H200 (session 11) the kernel ran 3.1-3.5x the ops and
# an 8k prefill of the 0.8B shape took 71.8 ms against 84.5; session 12's GPU run of the model
# files with it on found one failure, training (the kernel had no vjp: `_conv_kernel_call` now
# gives it the ops'). Taken on a GPU for calls of more than
# CONV_KERNEL_MIN_T tokens a row (the short verify calls keep the ops) without right-padded
# `lengths`; the taps round as the ops do, silu and the norms' sums to an ulp (the kernel's
# docstring). Read at every call.
CONV_KERNEL = True
CONV_KERNEL_MIN_T = 8


def _conv_kernel_applies(qkv, w, T, lengths, Hk, Dk, Hv, Dv) -> bool:
    return (
        CONV_KERNEL
        and T > CONV_KERNEL_MIN_T
        and lengths is None
        and conv_kernel.kernel_available(qkv)
        and conv_kernel.supported(qkv, w, Hk, Dk, Hv, Dv)
    )


def _conv_kernel_call(qkv, conv_state, w, Hk, Dk, Hv, Dv, n_keep):
    """`conv_kernel.conv_qkv` differentiable: the kernel has no vjp of its own (MLX custom
    kernels), so gradients (training, examples/train_tiny.py) are the ops' (`_conv_qkv`), which
    compute the same values."""
    T = qkv.shape[1]
    first = conv_state is None  # the kernel then reads no state (zeros)

    def ops(qkv, w, *state):
        prev = mx.zeros((qkv.shape[0], n_keep, qkv.shape[2]), qkv.dtype) if first else state[0]
        conv_in = mx.concatenate([prev.astype(qkv.dtype), qkv], axis=1)
        q, k, v = _conv_qkv(conv_in, w, T, Hk, Dk, Hv, Dv)
        return q, k, v, conv_in[:, conv_in.shape[1] - n_keep :]

    @mx.custom_function
    def fused(qkv, w, *state):
        prev = None if first else state[0]
        return conv_kernel.conv_qkv(qkv, prev, w, Hk, Dk, Hv, Dv, _L2_EPS)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        return mx.vjp(ops, list(primals), list(cotangents))[1]

    return fused(qkv, w) if first else fused(qkv, w, conv_state)


# Compiled for decode only: its slices depend on T, so a compiled version is traced per shape,
# and prompts of every length would each add one; prefill's launches are few against its work.
_conv_qkv_decode = mx.compile(_conv_qkv)


# The T-token decode kernel's states after each token but the last (a verify pass's, kept for a
# rollback: `cache.LinearCache.record_states`) as [(T-1) B, ...] rows, token t's at rows t B ..
# t B + B - 1: at T = 2 (one draft) they are states as they stand, so a trim into the pass takes
# them with no op at all (before: a Reshape of the [T-1, B, ...] stack for each of the two, made
# by the trim and walked by the next call's host), and from T = 3 one Slice each. The same
# memory either way. True, or False (the stacked form: probe_verify.py's A/B). Read when the
# verify step is traced.
TOKEN_STATES_AS_ROWS = True
# The verify pass's linear layer in the row-wise products' column form end to end: the fused
# in-projection's output [B*T, N, 1] (`project_columns`) goes to the T-token decode kernel as it
# is, whose y comes back as columns [B*T, Hv*Dv, 1] for out_proj's gemvs (no kernel text
# changed: the kernel reads proj's first two dims). Before: a Reshape of the projection to rows
# for the kernel and one of y back to columns, two view primitives a layer that the one-token
# step has not (36 of the 0.8B pass's ~150 extra views; each costs MLX's host ~1.5 us in eval
# on the H200 and its share of the compiled call's replay). The same memory and arithmetic.
# True, or False (probe_verify.py's A/B). H200, session 17, 0.8B, the 2-token pass against a
# step, two runs of 120 interleaved rounds each: 1.125x / 1.142x on, 1.146x / 1.157x off. Read
# when the verify step is traced.
PACKED_COLUMNS = True


class GatedDeltaNet(nn.Module):
    IN_PROJ = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
    DECODE_GROUPS = (IN_PROJ, ("out_proj",), ("conv1d",))

    def __init__(self, config: TextConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_kernel_size = config.linear_conv_kernel_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim

        H = config.hidden_size
        self.in_proj_qkv = nn.Linear(H, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(H, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(H, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(H, self.num_v_heads, bias=False)
        # Holds the depthwise weight [C, K, 1]; the taps are applied by hand in _conv_qkv.
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.conv_kernel_size, groups=self.conv_dim, bias=False
        )
        self.dt_bias = mx.ones((self.num_v_heads,))
        self.A_log = mx.log(mx.random.uniform(1.0, 16.0, (self.num_v_heads,)))
        self.norm = RMSNormGated(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, H, bias=False)

    def __call__(
        self, x: mx.array, mask: mx.array | None = None, cache: Any = None, residual=None
    ) -> mx.array:
        """x [B, T, H] -> out_proj's output, plus `residual` when given (`linear_add`)."""
        B, T, _ = x.shape
        Hk, Hv, Dk, Dv = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        n_keep = self.conv_kernel_size - 1
        if mask is not None:
            # As transformers does: padded positions contribute nothing to any projection, so
            # they never reach the conv state or the recurrent state.
            x = mx.where(mask[..., None], x, mx.zeros((), x.dtype))
        lengths = getattr(cache, "lengths", None) if cache is not None else None
        if T == 1 and cache is not None and lengths is None:
            # One token a row where the compiled step has fused the in-projections: its own
            # matmul and kernel (`_decode_packed`), so the two paths compute the same thing.
            proj = project_packed(self, self.IN_PROJ, x.reshape(B, -1), checked=True)
            if proj is not None:
                y, _ = self._decode_packed(proj, 1, mask, cache)
                state, conv_state = cache[1], cache[0]
                y = y.reshape(B, 1, Hv, Dv)
                return self._finish(y, None, state, conv_state, cache, residual)
        qkv = self.in_proj_qkv(x)
        z = self.in_proj_z(x).reshape(B, T, Hv, Dv)
        b = self.in_proj_b(x)
        a = self.in_proj_a(x)

        conv_state = cache[0] if cache is not None else None
        state = cache[1] if cache is not None else None
        if T == 1 and lengths is None:
            # One token a row: the compiled decode step's own call (one kernel launch on a
            # GPU, the gated norm included), so the plain path and the compiled step compute
            # the same thing.
            y, state, conv_state = gated_delta_decode(
                qkv[:, 0],
                conv_state,
                self.conv1d.weight[:, :, 0],
                a[:, 0],
                b[:, 0],
                self.A_log,
                self.dt_bias,
                state,
                num_k_heads=Hk,
                head_k_dim=Dk,
                num_v_heads=Hv,
                head_v_dim=Dv,
                mask=None if mask is None else mask[:, 0],
                z=z.reshape(B, -1),
                norm_weight=self.norm.weight,
                norm_eps=self.norm.eps,
            )
            return self._finish(y[:, None], None, state, conv_state, cache, residual)
        w = self.conv1d.weight[:, :, 0]
        kernel = _conv_kernel_applies(qkv, w, T, lengths, Hk, Dk, Hv, Dv)
        if kernel:
            q, k, v, new_conv = _conv_kernel_call(qkv, conv_state, w, Hk, Dk, Hv, Dv, n_keep)
            if cache is not None:
                cache[0] = new_conv
        if conv_state is None:
            conv_state = mx.zeros((B, n_keep, self.conv_dim), dtype=qkv.dtype)
        # [B, K-1+T, C]; after the kernel only a graph node, evaluated if record_inputs keeps it
        conv_in = mx.concatenate([conv_state.astype(qkv.dtype), qkv], axis=1)
        if cache is not None and not kernel:
            if lengths is not None:
                # Right-padded rows (mlx-lm's BatchGenerator): keep the K-1 inputs that end at
                # each row's last real token.
                ends = mx.clip(lengths, 0, T)
                idx = ends[:, None] + mx.arange(n_keep)[None]
                cache[0] = mx.take_along_axis(conv_in, idx[..., None], axis=1)
            else:
                cache[0] = mx.contiguous(conv_in[:, conv_in.shape[1] - n_keep :])
        if not kernel:
            conv_qkv = _conv_qkv_decode if T == 1 else _conv_qkv
            q, k, v = conv_qkv(conv_in, w, T, Hk, Dk, Hv, Dv)
        y, state = gated_delta_update(q, k, v, a, b, self.A_log, self.dt_bias, state, mask)
        if hasattr(cache, "record_inputs"):
            # A LinearCache keeps a short call's inputs to roll back into it (cache.py).
            cache.record_inputs(T, (conv_in, q, k, v, a, b, self.A_log, self.dt_bias, mask))
        return self._finish(y, z, state, None, cache, residual)

    def _finish(self, y, z, state, conv_state, cache, residual=None) -> mx.array:
        """Store the new states (conv_state None: already stored), then the gated norm (z None:
        y is normed already) and out_proj. y, z [B, T, Hv, Dv]."""
        B, T = y.shape[:2]
        if cache is not None:
            cache[1] = state
            if conv_state is not None:
                cache[0] = conv_state
            if hasattr(cache, "advance"):
                cache.advance(T)
        if z is not None:
            y = self.norm(y, z)  # [B, T, Hv, Dv]
        return linear_add(self.out_proj, y.reshape(B, T, self.value_dim), residual)

    def step(self, x: mx.array, mask: mx.array | None, cache: list, residual=None) -> mx.array:
        """One token a row at decode (the compiled step): x [B, H] -> [B, H]; cache is
        [conv state, recurrent state], replaced by the new ones. Same arithmetic as `__call__`
        at T = 1, without its [B, 1, ...] reshapes."""
        B = x.shape[0]
        if mask is not None:  # mask [B]
            x = mx.where(mask[:, None], x, mx.zeros((), x.dtype))  # as in __call__
        proj = project_packed(self, self.IN_PROJ, x)
        if proj is not None:
            # The fused in-projection read in place by the kernel: no split, no copies.
            y, _ = self._decode_packed(proj, 1, None if mask is None else mask[:, None], cache)
            return project_add(self, "out_proj", y, residual)
        qkv, z, b, a = project(self, self.IN_PROJ, x)
        # z [B, Hv * Dv]: the gated norm, in the same call
        y = self._recur(qkv, a, b, mask, cache, z=z, norm_weight=self.norm.weight)
        return project_add(self, "out_proj", y.reshape(B, self.value_dim), residual)

    def _recur(self, qkv, a, b, mask, cache: list, **norm) -> mx.array:
        """One token a row through `gated_delta_decode` (conv, gates, recurrence; with `norm`,
        the gated norm too) over cache [conv state, recurrent state], replaced by the new ones;
        returns y."""
        if norm:
            norm["norm_eps"] = self.norm.eps
        y, cache[1], cache[0] = gated_delta_decode(
            qkv,
            cache[0],
            decode_weight(self, "conv1d"),
            a,
            b,
            self.A_log,
            self.dt_bias,
            cache[1],
            num_k_heads=self.num_k_heads,
            head_k_dim=self.head_k_dim,
            num_v_heads=self.num_v_heads,
            head_v_dim=self.head_v_dim,
            mask=mask,
            **norm,
        )
        return y

    def _decode_packed(self, proj, T: int, mask, cache: list) -> tuple:
        """T tokens a row from the fused in-projection proj [B*T, qkv | z | b | a] (or as
        columns [B*T, N, 1]) through `gated_delta_decode_packed` (conv, gates, recurrence, gated
        norm) over cache [conv state, recurrent state], replaced by the states after the last
        token; returns (y [B*T, value_dim] (columns: [B*T, value_dim, 1]), the states after
        each token: see `LinearCache.record_states`)."""
        y, cache[1], cache[0], states = gated_delta_decode_packed(
            proj,
            cache[0],
            decode_weight(self, "conv1d"),
            self.A_log,
            self.dt_bias,
            cache[1],
            self.norm.weight,
            tokens=T,
            num_k_heads=self.num_k_heads,
            head_k_dim=self.head_k_dim,
            num_v_heads=self.num_v_heads,
            head_v_dim=self.head_v_dim,
            mask=mask,
            norm_eps=self.norm.eps,
            stacked=not TOKEN_STATES_AS_ROWS,
        )
        return y, states

    def steps(self, x: mx.array, T: int, mask: mx.array | None, cache: list) -> tuple:
        """A few tokens a row (the compiled verify step): x [B*T, H] (row b*T + t: row b's
        token t; 2-D, so the projections are one matmul each, no flatten) -> [B*T, H]. The
        projections run once over all tokens; the conv and recurrence go token by token
        through the decode kernel (`step`'s arithmetic: where the in-projections are fused, all T
        tokens in one launch on a GPU, read from the fused projection in place).
        cache [conv state, recurrent state] is replaced by the states after the last token;
        also returns the states after each token (a list of T (conv state, recurrent state), or
        the kernel's (state_tok, conv_tok) [T-1, ...] arrays: `LinearCache.record_states`), so
        that a rollback to any of them needs no recompute. mask [B, T] bool or None, as in
        `__call__`."""
        if mask is not None:  # as in __call__
            x = mx.where(mask.reshape(-1, 1), x, mx.zeros((), x.dtype))
        proj = project_columns(self, self.IN_PROJ, x) if PACKED_COLUMNS else None
        if proj is not None:
            # Row-wise: the kernel takes the columns and gives y as columns (`PACKED_COLUMNS`),
            # out_proj's gemvs take them: one reshape, of out_proj's output to rows.
            y, states = self._decode_packed(proj, T, mask, cache)
            out = project_columns(self, ("out_proj",), y)
            if out is None:
                out = project(self, ("out_proj",), y.reshape(y.shape[0], -1))[0]
            # (no -1: MLX makes a Reshape for it even where the shape stays, as the kernel's do)
            return out.reshape(x.shape[0], out.size // x.shape[0]), states
        proj = project_packed(self, self.IN_PROJ, x)
        if proj is not None:
            # All T tokens in one call (one kernel launch on a GPU), the states after each kept.
            y, states = self._decode_packed(proj, T, mask, cache)
            return project(self, ("out_proj",), y)[0], states
        qkv, z, b, a = project(self, self.IN_PROJ, x)
        ys, states = [], []
        for t in range(T):
            m = None if mask is None else mask[:, t]
            ys.append(self._recur(qkv[t::T], a[t::T], b[t::T], m, cache))
            states.append((cache[0], cache[1]))
        y = mx.stack(ys, axis=1)  # [B, T, Hv, Dv]
        y = self.norm(y, z.reshape(y.shape))
        return project(self, ("out_proj",), y.reshape(-1, self.value_dim))[0], states


def rope_inv_freq(rotary_dim: int, theta: float) -> np.ndarray:
    """inv_freq[i] = theta^(-2i / rotary_dim), fp32 as transformers computes it."""
    exps = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    return (1.0 / (np.float32(theta) ** exps)).astype(np.float32)


def mrope_axis_index(rotary_dim: int, mrope_section: list[int]) -> np.ndarray:
    """For each frequency i < rotary_dim/2: 0 (t), 1 (h) or 2 (w), interleaved sections."""
    half = rotary_dim // 2
    axis = np.zeros(half, dtype=np.int32)
    for i in range(half):
        if i % 3 == 1 and i < 3 * mrope_section[1]:
            axis[i] = 1
        elif i % 3 == 2 and i < 3 * mrope_section[2]:
            axis[i] = 2
    return axis


class Rotary(nn.Module):
    """Partial rotate-half rotary. Plain positions go through mx.fast.rope (per-row offsets
    allowed); explicit [3, B, T] (t, h, w) positions give interleaved M-RoPE's cos and sin
    (`cos_sin`), applied by `apply_rotate_half`."""

    def __init__(self, head_dim: int, rotary_dim: int, theta: float, mrope_section: list[int]):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        inv = rope_inv_freq(rotary_dim, theta)
        self._inv_freq = mx.array(inv)
        # mx.fast.rope takes periods (1 / inv_freq); same frequencies on both paths.
        self._periods = mx.array((1.0 / inv.astype(np.float64)).astype(np.float32))
        axis = mrope_axis_index(rotary_dim, mrope_section)
        self._axis_onehot = mx.array((axis[None, :] == np.arange(3)[:, None]).astype(np.float32))

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        """x [B, H, T, D]; offset int or [B]."""
        if _cuda_rope_block_too_deep(self.rotary_dim, x.shape):
            B, T = x.shape[0], x.shape[-2]
            pos = mx.array(offset, mx.int32).reshape(-1, 1) + mx.arange(T, dtype=mx.int32)
            cos, sin = self.cos_sin(mx.broadcast_to(pos, (3, B, T)))
            return apply_rotate_half(x, cos, sin)
        return mx.fast.rope(
            x,
            self.rotary_dim,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )

    def cos_sin(self, position_ids: mx.array) -> tuple[mx.array, mx.array]:
        """position_ids [3, B, T] -> cos, sin [B, 1, T, rotary_dim] fp32."""
        freqs = position_ids.astype(mx.float32)[..., None] * self._inv_freq  # [3, B, T, R/2]
        angles = (freqs * self._axis_onehot[:, None, None, :]).sum(0)  # [B, T, R/2]
        angles = mx.concatenate([angles, angles], axis=-1)[:, None]
        return mx.cos(angles), mx.sin(angles)


def _cuda_rope_block_too_deep(rotary_dim: int, shape: tuple) -> bool:
    """Whether MLX's CUDA rope kernel would be launched with more than 64 threads along z,
    CUDA's limit (`cudaGraphAddKernelNode ... invalid argument`, the process's CUDA graph then
    unusable): those calls take the rotate-half ops path instead (`rope_block_z`)."""
    if not mx.cuda.is_available() or mx.default_device() != mx.gpu:
        return False
    return rope_block_z(rotary_dim, shape) > 64


def rope_block_z(rotary_dim: int, shape: tuple) -> int:
    """Threads along z of MLX 0.32's CUDA launch of `mx.fast.rope` with frequencies for x of
    `shape` [B, heads, T, D]. It sizes the threadgroup over (rotary_dim / 2, T, B x ceil(heads
    / 4)) by doubling each side in turn up to 1024 threads (`get_block_dims_common`) and never
    caps z at CUDA's 64: a small rotary dimension at a large batch overflows it (the shipped
    tiny model's 16 rotary dims from batch 128 on; the released models' 64 never). 1 for the
    one-row kernel (B = T = 1: a 2-D launch)."""
    B, T = shape[0], shape[-2]
    if B == 1 and T == 1:
        return 1
    heads = int(np.prod(shape[1:-2]))
    dims = [rotary_dim // 2, T, B * -(-heads // 4)]
    pows = [0, 0, 0]
    total = 0
    while True:
        before = total
        for i in range(3):
            if dims[i] >= 1 << (pows[i] + 1):
                pows[i] += 1
                total += 1
            if total == 10:
                break
        if total in (10, before):
            return 1 << pows[2]


def apply_rotate_half(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half rotary on the first R = cos.shape[-1] dims of x, in fp32 (the rest pass
    through); cos and sin broadcast against x[..., :R]. Text M-RoPE and the vision tower."""
    R = cos.shape[-1]
    xr = x[..., :R].astype(mx.float32)
    rot = mx.concatenate([-xr[..., R // 2 :], xr[..., : R // 2]], axis=-1)
    out = (xr * cos + rot * sin).astype(x.dtype)
    if R == x.shape[-1]:
        return out
    return mx.concatenate([out, x[..., R:]], axis=-1)


# The verify pass's q and k (`Attention.steps`, T > 1 tokens a row) transposed to [B, heads, T,
# D] before their RMSNorms, not after: the same values, but after the norm the transposed view
# reached rope (which keeps its input's strides) and the decode attention kernel, which MLX's
# CUDA custom kernels make row-contiguous first: one hidden copy a layer of the verify pass
# that the one-token step (T = 1: every layout contiguous) never had. The norm's input is a
# strided view of the split projection either way, which MLX's RMSNorm copies. True, or False
# (the order before session 14: probe_verify.py's A/B). Read when the verify step is traced.
VERIFY_HEADS_FIRST = True
# The output gate read by the attention kernel's combine in place, from the fused q|k|v
# projection's output passed whole (rows of N = Hq 2D + 2 Hkv D, head h's gate at h 2D + D): at
# T > 1 (the verify pass) or B > 1 its gate columns alone are a view with a row stride, which
# MLX's CUDA custom kernels copy row-contiguous first: one hidden copy kernel a gated attention
# layer that a one-token step at batch 1 never had. The same memory and arithmetic (same bits).
# True, or False (the gate as the split view: probe_verify.py's A/B). Read when a step is traced.
GATE_IN_PLACE = True


class Attention(nn.Module):
    DECODE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",))

    def __init__(self, config: TextConfig):
        super().__init__()
        H = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.output_gate = config.attn_output_gate
        bias = config.attention_bias
        q_out = self.num_heads * self.head_dim * (2 if self.output_gate else 1)
        self.q_proj = nn.Linear(H, q_out, bias=bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, H, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rope = Rotary(
            self.head_dim, config.rotary_dim, config.rope_theta, config.mrope_section
        )

    def __call__(
        self,
        x: mx.array,
        mask: mx.array | str | None = None,
        cache: Any = None,
        rope: tuple[mx.array, mx.array] | None = None,
        residual: mx.array | None = None,
    ) -> mx.array:
        """rope: M-RoPE (cos, sin) from `Rotary.cos_sin`, the same for every layer, so the
        backbone computes it once per call; None uses plain positions from the cache offset.
        residual: added to o_proj's output (`linear_add`)."""
        B, T, _ = x.shape
        D = self.head_dim
        q = self.q_proj(x)
        if self.output_gate:
            q = q_gate = q.reshape(B, T, self.num_heads, 2 * D)
            q, gate = q[..., :D], q[..., D:]
            gate = gate.reshape(B, T, self.num_heads * D)
        else:
            q, gate, q_gate = q.reshape(B, T, self.num_heads, D), None, None
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.num_kv_heads, D)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, D).transpose(0, 2, 1, 3)

        q, k = self._rotate(q, k, cache, rope)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)

        if T <= DECODE_MAX_T:
            # A few tokens over a cache: one kernel pair, gate included, where it runs (GPU).
            o = decode_attention(q, k, v, cache, self.scale, mask, q_gate, D)
            if o is not None:
                return linear_add(self.o_proj, o, residual)
        o = attention(q, k, v, cache, self.scale, mask)
        o = o.transpose(0, 2, 1, 3).reshape(B, T, self.num_heads * D)
        if gate is not None:
            o = _sigmoid_gate(o, gate)
        return linear_add(self.o_proj, o, residual)

    def step(
        self,
        x: mx.array,
        mask: mx.array,
        cache: Any,
        rope: tuple[mx.array, mx.array] | None = None,
        residual: mx.array | None = None,
    ) -> mx.array:
        """One token a row at decode (the compiled step): x [B, H] -> [B, H]; cache a
        `cache.StaticKV`, mask [1 or B, 1, 1, capacity] bool. Same arithmetic as `__call__` at
        T = 1: with one token, [B, heads, 1, D] is a reshape of the projection, no transposes."""
        B, D = x.shape[0], self.head_dim
        names = self.DECODE_GROUPS[0]
        whole = project_whole(self, names, x) if self._gate_in_place(B) else None
        q, k, v = project(self, names, x) if whole is None else split_outputs(self, names, whole)
        q = q_gate = q.reshape(B, self.num_heads, 1, -1)
        q, gate = mx.split(q, 2, axis=-1) if self.output_gate else (q, None)
        k = k.reshape(B, self.num_kv_heads, 1, D)
        v = v.reshape(B, self.num_kv_heads, 1, D)
        q, k = self._rotate(self.q_norm(q), self.k_norm(k), cache, rope)
        k, v = cache.update_and_fetch(k, v)
        # The gate: offset D of each head of the unsplit [B, Hq, 1, 2D] projection, or of each
        # row of the whole q|k|v output (`GATE_IN_PLACE`: a view of it at B > 1 would be copied).
        q_gate, stride = (q_gate, None) if whole is None else (whole, 2 * D)
        q_gate = q_gate if gate is not None else None
        kmask = cache.kernel_mask(mask, 1)
        o = decode_attention(q, k, v, cache, self.scale, kmask, q_gate, D, stride)
        if o is not None:
            return project_add(self, "o_proj", o.reshape(B, self.num_heads * D), residual)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        if gate is not None:
            o = _sigmoid_gate(o, gate)
        return project_add(self, "o_proj", o.reshape(B, self.num_heads * D), residual)

    def steps(
        self,
        x: mx.array,
        T: int,
        mask: mx.array,
        cache: Any,
        rope: tuple[mx.array, mx.array] | None = None,
    ) -> mx.array:
        """A few tokens a row (the compiled verify step): x [B*T, H] (row b*T + t) -> [B*T, H];
        cache a `cache.StaticKV`, mask [1 or B, 1, T, capacity] bool (causal inside the new
        tokens). `__call__`'s arithmetic through `project`."""
        B, D = x.shape[0] // T, self.head_dim
        # Row-wise (`ROWS_GEMV`): the outputs as columns [B*T, n, 1], reshaped below as rows.
        names = self.DECODE_GROUPS[0]
        in_place = self._gate_in_place(B * T)
        whole = (project_whole if in_place else project_columns)(self, names, x)
        # The gate: read in place from the whole output (`GATE_IN_PLACE`), else q's split view.
        stride = 2 * D if in_place and whole is not None else None
        q, k, v = project(self, names, x) if whole is None else split_outputs(self, names, whole)
        q = q_gate = q.reshape(B, T, self.num_heads, -1)
        q, gate = mx.split(q, 2, axis=-1) if self.output_gate else (q, None)
        k = k.reshape(B, T, self.num_kv_heads, D)
        if VERIFY_HEADS_FIRST:
            # Heads first before the norms: their inputs are strided views either way (split
            # columns: MLX's RMSNorm copies them), so their outputs come out row-contiguous in
            # [B, heads, T, D], which rope keeps and the attention kernel reads in place.
            q = self.q_norm(q.transpose(0, 2, 1, 3))
            k = self.k_norm(k.transpose(0, 2, 1, 3))
        else:
            q = self.q_norm(q).transpose(0, 2, 1, 3)
            k = self.k_norm(k).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, self.num_kv_heads, D).transpose(0, 2, 1, 3)
        q, k = self._rotate(q, k, cache, rope)
        k, v = cache.update_and_fetch(k, v)
        if T <= DECODE_MAX_T:
            g = (q_gate if stride is None else whole) if self.output_gate else None
            kmask = cache.kernel_mask(mask, T)
            o = decode_attention(q, k, v, cache, self.scale, kmask, g, D, stride)
            if o is not None:
                K = self.num_heads * D
                y = project_columns(self, ("o_proj",), o.reshape(B * T, K, 1))
                if y is not None:  # row-wise: one reshape of the kernel's output each way
                    # (the shape given: MLX makes a Reshape for a -1 even where the shape stays,
                    # as the few-rows kernel's rows do)
                    return y.reshape(B * T, y.size // (B * T))
                return project(self, ("o_proj",), o.reshape(B * T, K))[0]
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        o = o.transpose(0, 2, 1, 3).reshape(B * T, self.num_heads * D)
        if gate is not None:
            o = _sigmoid_gate(o, gate.reshape(B * T, self.num_heads * D))
        return project(self, ("o_proj",), o)[0]

    def _gate_in_place(self, rows: int) -> bool:
        """Whether a compiled step over `rows` rows passes the whole q|k|v output as the gate
        (`GATE_IN_PLACE`): a gated layer, more than one row (one row's gate columns are
        contiguous already: the form as before)."""
        return GATE_IN_PLACE and self.output_gate and rows > 1

    def _rotate(self, q, k, cache, rope):
        """q, k [B, heads, T, D] rotated: M-RoPE (cos, sin) when given, else plain positions
        from the cache offset (0 without a cache)."""
        if rope is not None:
            return apply_rotate_half(q, *rope), apply_rotate_half(k, *rope)
        offset = cache.offset if cache is not None else 0
        if ROPE_JOINT and mx.default_device() == mx.cpu and q.dtype == k.dtype:
            # One rope over q | k (heads side by side): on the CPU mx.fast.rope is MLX's
            # fallback graph, ~12 primitives a call of which most make its cos and sin; the
            # rotation is elementwise by position, so the same bits as two calls.
            qk = self.rope(mx.concatenate([q, k], axis=1), offset)
            return qk[:, : q.shape[1]], qk[:, q.shape[1] :]
        return self.rope(q, offset), self.rope(k, offset)


# q and k through one rope call on the CPU (`Attention._rotate`); False: two calls (A/B).
ROPE_JOINT = True


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    DECODE_GROUPS = (("gate_proj", "up_proj"), ("down_proj",))

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        """down_proj's output, plus `residual` when given (`linear_add`). Up to
        `FUSED_PLAIN_MAX_T` tokens a row, once the compiled step has fused gate_proj and
        up_proj (`prepare_projections`) and while they still hold that matrix's views, the
        plain call goes through the same fused matmul and `swiglu` as `step`: a GEMM may round
        a wider matrix's outputs differently, and the compiled step must equal this path."""
        if x.ndim < 2 or x.shape[-2] > FUSED_PLAIN_MAX_T:
            h = _swiglu(self.gate_proj(x), self.up_proj(x))
        elif _made(self, self.DECODE_GROUPS[0]) is None:
            h = _swiglu_pair(self.gate_proj(x), self.up_proj(x))
        else:
            h = self._gate_up(x)
        return linear_add(self.down_proj, h, residual)

    def step(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        """`__call__` through `project` (the compiled decode step). A few rows without a
        residual (the verify pass's MLP) row-wise where that applies: gate|up, swiglu and
        down_proj over the rows as columns [rows, n, 1] (`project_columns`), reshaped only at
        the ends, the same products and arithmetic as the row form."""
        if residual is None and not _swiglu_kernel(x):
            gu = project_columns(self, self.DECODE_GROUPS[0], x)
            if gu is not None:
                h = _swiglu(*mx.split(gu, 2, axis=1))  # [rows, I, 1] (kernel: [rows, I])
                y = project_columns(self, ("down_proj",), h)
                if y is not None:
                    return y.reshape(x.shape)
                return project_add(self, "down_proj", h.reshape(h.shape[:2]), None)
        return project_add(self, "down_proj", self._gate_up(x), residual)

    def _gate_up(self, x: mx.array) -> mx.array:
        """silu(gate_proj(x)) * up_proj(x) through `project`: from the fused matrix's output,
        by one `fused_norm.swiglu` (a kernel reading [.., 2I]) under `SWIGLU_KERNEL`, else
        split (views) + the compiled ops."""
        gu = project_packed(self, self.DECODE_GROUPS[0], x)
        if gu is None:
            return _swiglu_pair(*project(self, self.DECODE_GROUPS[0], x))
        if _swiglu_kernel(gu):
            return fused_norm.swiglu(gu)
        return _swiglu(*mx.split(gu, 2, axis=-1))


# silu(gate) * up as `fused_norm.swiglu`'s kernel where it runs (True), or as MLX's compiled
# ops (False, the default: see ADD_NORM for the measurement). Read when a step is traced and
# at every plain call.
SWIGLU_KERNEL = False


def _swiglu_kernel(x: mx.array) -> bool:
    return SWIGLU_KERNEL and fused_norm.kernel_available(x)


def _swiglu_pair(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up with `fused_norm.swiglu`'s arithmetic where its kernel is taken (gate
    and up joined first: the plain call before the compiled step fused them, or a group that
    does not fuse), so that plain and compiled calls round alike; else the ops."""
    if _swiglu_kernel(gate):
        return fused_norm.swiglu(mx.concatenate([gate, up], axis=-1))
    return _swiglu(gate, up)


# Plain calls of up to this many tokens a row (text.MAX_STEP_TOKENS: the calls the compiled
# steps replace) take the decode projections' fused gate|up matmul once it is made (`MLP`).
FUSED_PLAIN_MAX_T = 8


def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up: float16 on the CPU as the native extension's one primitive where it is
    built (`cpu_ext.silu_mul`: MLX's float16 ops are integer-emulated per element on x86; the
    same bits, tested against these ops for every float16 gate), else MLX's compiled ops."""
    if gate.dtype == mx.float16 and cpu_ext.half_ops(gate):
        return cpu_ext.silu_mul(gate, up)
    return _swiglu_ops(gate, up)


@partial(mx.compile, shapeless=True)
def _swiglu_ops(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


@partial(mx.compile, shapeless=True)
def _sigmoid_gate(x: mx.array, gate: mx.array) -> mx.array:
    return x * mx.sigmoid(gate)


def route(logits: mx.array, top_k: int, normalize: bool) -> tuple[mx.array, mx.array]:
    """Softmax over all experts in fp32, then top-k: (indices [..., k], weights [..., k] fp32)."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    inds = mx.argpartition(-probs, kth=top_k - 1, axis=-1)[..., :top_k]
    weights = mx.take_along_axis(probs, inds, axis=-1)
    if normalize:
        weights = _normalized(weights)
    return inds, weights


# Elementwise pieces that a compiled step fuses run compiled in the plain path too (as
# `_sigmoid_gate`, `_swiglu`): a fused CUDA kernel may compute a sigmoid or a division unlike
# MLX's separate kernel, and a routing decision flips on the last bit.
@partial(mx.compile, shapeless=True)
def _normalized(w: mx.array) -> mx.array:
    return w / w.sum(-1, keepdims=True)


def _cpu_needs_fp32(experts: SwitchGLU) -> bool:
    """MLX's CPU GatherMM takes float32 only (`gather_qmm`, for quantized experts, is fine)."""
    w = experts.gate_proj
    return (
        isinstance(w, SwitchLinear)
        and w.weight.dtype != mx.float32
        and mx.default_device() == mx.cpu
    )


def _switch_glu_fp32(experts: SwitchGLU, x: mx.array, inds: mx.array) -> mx.array:
    """What `experts(x, inds)` computes, in float32, with the weights kept in their dtype.

    Per projection it converts min(N * k, E) expert matrices: for a few tokens (decode) only the
    selected ones, gathered into a stack of N * k; for many (prefill) all E, once per call.
    x [..., H], inds [..., k] -> [..., k, H] float32.
    """
    n_sel = inds.size
    few = n_sel < experts.gate_proj.weight.shape[0]
    idx = mx.arange(n_sel).reshape(inds.shape) if few else inds
    flat = inds.reshape(-1)

    def project(lin: SwitchLinear, h: mx.array) -> mx.array:
        w = lin.weight[flat] if few else lin.weight  # [E or N*k, O, I]
        out = mx.gather_mm(h, w.astype(mx.float32).swapaxes(-1, -2), rhs_indices=idx)
        if "bias" in lin:
            out = out + mx.expand_dims(lin.bias[inds].astype(mx.float32), -2)
        return out  # [..., k, 1, O]

    h = mx.expand_dims(x.astype(mx.float32), (-2, -3))  # [..., 1, 1, H]
    up = project(experts.up_proj, h)
    gate = project(experts.gate_proj, h)
    return project(experts.down_proj, experts.activation(up, gate)).squeeze(-2)


class SparseMoeBlock(nn.Module):
    """Top-k routed SwiGLU experts (stacked, mlx-lm's SwitchGLU) plus a sigmoid-gated shared expert.

    Expert weights: experts.{gate,up}_proj.weight [E, I, H], experts.down_proj.weight [E, H, I].
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        H = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(H, config.num_experts, bias=False)
        self.experts = SwitchGLU(H, config.moe_intermediate_size, config.num_experts)
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = MLP(H, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(H, 1, bias=False)
        # Set by models.shard: the experts hold a slice of every expert, summed across ranks.
        self.sharding_group = None

    @property
    def DECODE_GROUPS(self) -> tuple:
        # The router and the shared expert's gate read the same input.
        return (("gate", "shared_expert_gate"),) if "shared_expert" in self else (("gate",),)

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        """The block's output, plus `residual` when given (an add: no single projection). Up
        to `FUSED_PLAIN_MAX_T` tokens a row, as `step` computes it: over the step's 2-D rows
        and, once the compiled step has fused the router with the shared expert's gate (and
        while they hold that matrix's views), through the same matmul: a routing decision must
        not hang on how a GEMM rounds."""
        names = self.DECODE_GROUPS[0]
        shared = self.shared_expert(x) if "shared_expert" in self else None
        if x.ndim >= 2 and x.shape[-2] <= FUSED_PLAIN_MAX_T:
            rows = x.reshape(-1, x.shape[-1])
            made = _made(self, names) is not None
            gates = project(self, names, rows) if made else [self[n](rows) for n in names]
            flat = None if shared is None else shared.reshape(rows.shape)
            y = self._mix(rows, gates, flat).reshape(x.shape)
        else:
            y = self._mix(x, [self[n](x) for n in names], shared)
        return y if residual is None else residual + y

    def step(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        """`__call__` through `project` (the compiled decode step): x [rows, H]."""
        shared = self.shared_expert.step(x) if "shared_expert" in self else None
        y = self._mix(x, project(self, self.DECODE_GROUPS[0], x), shared)
        return y if residual is None else residual + y

    def _mix(self, x: mx.array, gates: list, shared: mx.array | None) -> mx.array:
        """The routed experts' weighted sum over x, plus the shared expert's output `shared`
        gated by gates[1]."""
        inds, weights = route(gates[0], self.top_k, self.norm_topk_prob)
        if _cpu_needs_fp32(self.experts):
            y = _switch_glu_fp32(self.experts, x, inds).astype(x.dtype)
        else:
            y = self.experts(x, inds)  # [..., k, H]
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        if shared is not None:
            y = y + _sigmoid_gate(shared, gates[1])
        if self.sharding_group is not None:
            y = mx.distributed.all_sum(y, group=self.sharding_group)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.is_linear = self.layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = Attention(config)
        if config.layer_is_moe(layer_idx):
            self.mlp = SparseMoeBlock(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(
        self,
        x: mx.array,
        mask: Any = None,
        cache: Any = None,
        rope: tuple[mx.array, mx.array] | None = None,
    ) -> mx.array:
        """The layer's output: the residual stream after it (one array; see `chain`)."""
        x, d = self.chain(x, None, mask, cache, rope)
        return x if d is None else x + d

    # The stack's loops (text.py) pass the residual stream between layers as a pair (x, d),
    # the stream being x + d (d None: x), when `add_norm_on`: each add then runs inside the
    # next norm (`add_norm`). Otherwise d stays None and the adds are folded where that pays.

    def chain(
        self, x: mx.array, d, mask: Any = None, cache: Any = None, rope=None, submit=None
    ) -> tuple:
        """The plain call on the residual stream x + d; returns the next (x, d).
        submit: called with the mixer's outputs (a list of arrays) before the MLP is built,
        for a caller that queues the work in parts (text.py, long prompts on a GPU)."""
        mixer = self.linear_attn if self.is_linear else self.self_attn
        return self._block(mixer, x, d, mask, cache, rope, self.mlp, submit)

    def step(self, x: mx.array, d, mask: Any, cache: Any, rope=None) -> tuple:
        """One token a row at decode (the compiled step): x, d [B, H]; the mixers' `step`.
        Returns the next (x, d), as `chain`."""
        mixer = self.linear_attn if self.is_linear else self.self_attn
        return self._block(mixer.step, x, d, mask, cache, rope, self.mlp.step)

    def steps(self, x: mx.array, d, T: int, mask: Any, cache: Any, rope=None) -> tuple:
        """A few tokens a row (the compiled verify step): x, d [B*T, H] (row b*T + t); the
        mixers' `steps` and the MLP's `step` (which takes any rows). Returns (x, d, a linear
        layer's per-token states or None)."""
        x, h = self._norm(self.input_layernorm, x, d)
        states = None
        if self.is_linear:
            h, states = self.linear_attn.steps(h, T, mask, cache)
        else:
            h = self.self_attn.steps(h, T, mask, cache, rope)
        if d is None and not add_norm_on(x):
            x = x + h
            return x + self.mlp.step(self.post_attention_layernorm(x)), None, states
        x, h = add_norm(self.post_attention_layernorm, x, h)
        return x, self.mlp.step(h), states

    def _norm(self, norm, x, d):
        """(the stream x + d, its norm): `add_norm` in the pair structure, else an add."""
        if d is not None and not add_norm_on(x):
            x, d = x + d, None
        return add_norm(norm, x, d)

    def _block(self, mix, x, d, mask, cache, rope, mlp, submit=None):
        if d is None and not add_norm_on(x):
            # Each residual add folded into the projection before it where that pays
            # (`linear_add`), in the plain path and the compiled step alike.
            h = self.input_layernorm(x)
            if self.is_linear:
                x = mix(h, mask, cache, residual=x)
            else:
                x = mix(h, mask, cache, rope, residual=x)
            if submit is not None:
                submit([x])
            return mlp(self.post_attention_layernorm(x), residual=x), None
        x, h = self._norm(self.input_layernorm, x, d)
        h = mix(h, mask, cache) if self.is_linear else mix(h, mask, cache, rope)
        x, h = add_norm(self.post_attention_layernorm, x, h)
        if submit is not None:
            submit([x, h])
        return x, mlp(h)

    def decode_groups(self):
        """(owner, names) of each group of this layer's projections that `step` applies
        through `project`."""
        owners = [self.linear_attn if self.is_linear else self.self_attn, self.mlp]
        if "shared_expert" in self.mlp:
            owners.append(self.mlp.shared_expert)
        return [(owner, names) for owner in owners for names in owner.DECODE_GROUPS]
