"""Prefill attention in bounded memory: softmax(q k^T * scale + mask) v over key blocks.

Qwen3.5's attention heads are 256 wide. MLX's fused attention kernels do not take that width
for a multi-token query (CUDA's cuDNN path stops at head_dim 128, Metal's full-attention kernel
takes 64, 80 and 128; MLX 0.32), so `mx.fast.scaled_dot_product_attention` falls back to plain
ops: the scores [B, Hq, T, S] of a whole prefill step against the whole history S. In a prompt
fed in steps of 2048 those scores grow with every step (1 GiB in bf16 per layer at 32k for the
0.8B shape), and on a GPU the buffers of ops already queued stay alive until the GPU has run
them, so several layers' scores were alive at once (issue 9: 9.2 GiB above the weights at 32k
against mlx-lm's 3.1 GiB, 22 GiB at 128k).

Here, where no fused kernel takes the shape and the scores would exceed `PLAIN_BYTES`, queries
are taken in blocks of at most `QUERY_BLOCK` and keys in blocks sized so that one block's scores
fit in `BLOCK_BYTES`, merged with a running maximum and sum (the online softmax of
FlashAttention, Dao et al. 2022) in fp32. Key blocks wholly after a causal query block are
skipped; only blocks that reach past the query block's first position get a causal mask. What
one step holds is then one block of scores, independent of how long the history is.
Numerics follow MLX's fallback: q is scaled in its dtype, scores come out of the matmul in the
input dtype, the softmax runs in fp32 and its weights meet v in v's dtype. Masked positions get
the dtype's lowest value (not -inf), as in the fallback, so fully masked rows (left padding)
stay finite.

Shapes: q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] (the cache's layout); the last T
keys are the queries' own positions; mask None, "causal", or an array broadcastable to
[B, Hq, T, S] (bool: True = attend; else additive).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention as _mlx_lm_sdpa

from ..kernels import attention as attention_kernel
from ..kernels.attention import prefill as prefill_kernel
from .cache import BatchKVCache, KVCache, StaticKV, kv_index

# One block of scores (all query heads of one query block against one key block), in the
# input's dtype; its softmax weights are as large. Small enough that the blocks queued on a GPU
# ahead of it stay small; large enough for matmuls that keep the GPU busy.
BLOCK_BYTES = 16 << 20
# A step whose whole scores fit in this goes to MLX's attention in one call (faster when short).
PLAIN_BYTES = 256 << 20
QUERY_BLOCK = 2048
# On a GPU the host queues a long history's key blocks far ahead of the GPU, and every queued
# block's scores stay alive until the GPU has run it: the step's peak grew with the history
# again (issue 9, H200). There the running sums are evaluated every `SYNC_BLOCKS` key blocks
# (0: never), so at most about that many blocks' scores are alive at once.
SYNC_BLOCKS = 8
# Key blocks are a multiple of this many keys (matmul-friendly) and never shorter.
KEY_ALIGN = 128
# The prefill attention kernel (kernels/attention/prefill.py: FlashAttention-2 style, one launch,
# scores never in device memory) where it takes the step (a GPU, bf16 / fp16, head dim <= 256,
# masks None / "causal" / bool), MLX has no fused kernel, and the step has at least
# PREFILL_KERNEL_MIN_T queries. Measured on the H200 (session 12, 0.8B shape, version 3, causal):
# 1.09x the ops at 2048 queries over 2048 keys, 1.39x over 8192, 4.4-4.9x over 16k-128k keys
# (where the ops take the key-blocked path) and at 8192 over 8192.
PREFILL_KERNEL = True
PREFILL_KERNEL_MIN_T = 2048
# ... and, when PREFILL_KERNEL_MIN_S > 0, a step of at least PREFILL_KERNEL_MIN_T_AT_S queries
# over at least PREFILL_KERNEL_MIN_S keys (a long prompt's later steps: the ops path walks and
# syncs on many key blocks there, the kernel keeps no scores). Off (0): with PREFILL_KERNEL_MIN_T
# at 2048 it adds nothing on CUDA; it is for a backend where the kernel wins only over a long
# history (a Mac, unmeasured). Fewer queries than PREFILL_KERNEL_MIN_T_AT_S would leave
# most of the GPU idle (16 query tokens a threadgroup: 256 threadgroups at 2048 in the 0.8B
# shape, about the H200's 264 resident ones).
PREFILL_KERNEL_MIN_S = 0
PREFILL_KERNEL_MIN_T_AT_S = 2048
# The prefill kernel reads a KVCache's / BatchKVCache's whole buffers and the filled length, not
# the filled slice that `update_and_fetch` returns: a slice of a longer buffer is not contiguous,
# and MLX copied it for the kernel at every step, keys and values, all the history (H200, session
# 13: 256 MiB a layer at 128k, most of the peak's growth from 32k to 128k).
PREFILL_IN_PLACE = True


def has_fused_kernel(q: mx.array, k: mx.array, v: mx.array) -> bool:
    """Whether MLX (0.32) runs attention for this multi-token query in one fused kernel."""
    if mx.default_device() == mx.cpu:
        return False
    D, Dv = q.shape[-1], v.shape[-1]
    if mx.metal.is_available():
        return D == Dv and D in (64, 80, 128)
    # CUDA: cuDNN, compute capability 8+, fp16/bf16, both head dims multiples of 8 up to 128.
    return q.dtype in (mx.float16, mx.bfloat16) and D <= 128 and Dv <= 128 and D % 8 == Dv % 8 == 0


# The weights of a key block, compiled (shapeless: one trace serves every block) into one kernel
# that writes them in the scores' dtype. The small running updates stay plain ops: compiled, the
# accumulator's update kept every block's weights alive until the step ended (seen on the CPU:
# the peak grew with the history again).
@partial(mx.compile, shapeless=True)
def _weights(s: mx.array, m: mx.array) -> mx.array:
    """exp(s - m) in s's dtype; s [..., n, kb] scores, m [..., n, 1] fp32 running max."""
    return mx.exp(s.astype(mx.float32) - m).astype(s.dtype)


def _blocked(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Any) -> mx.array:
    B, Hq, T, D = q.shape
    _, Hkv, S, Dv = v.shape
    rep = Hq // Hkv
    offset = S - T  # position of the first query
    causal = isinstance(mask, str)
    arr = None
    if mask is not None and not causal:
        # [Bm, Hm, T, S] -> [Bm, Hkv or 1, rep or 1, T, S], matching the scores' 5-D view.
        arr = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        Hm = arr.shape[1]
        arr = arr[:, :, None] if Hm == 1 else arr.reshape(arr.shape[0], Hkv, rep, *arr.shape[2:])
    low = mx.array(mx.finfo(q.dtype).min, q.dtype)
    q = (q * mx.array(scale, q.dtype)).reshape(B, Hkv, rep, T, D)

    qb = min(T, QUERY_BLOCK)
    per_key = B * Hq * qb * q.dtype.size
    kb = max(KEY_ALIGN, BLOCK_BYTES // per_key // KEY_ALIGN * KEY_ALIGN)
    sync = SYNC_BLOCKS if mx.default_device() != mx.cpu else 0
    outs = []
    for q0 in range(0, T, qb):
        q1 = min(q0 + qb, T)
        n = q1 - q0
        qs = q[:, :, :, q0:q1].reshape(B, Hkv, rep * n, D)
        m = mx.full((B, Hkv, rep * n, 1), -mx.inf, mx.float32)
        l = mx.zeros((B, Hkv, rep * n, 1), mx.float32)
        acc = mx.zeros((B, Hkv, rep * n, Dv), mx.float32)
        # Keys this query block can see: all of them, or up to its last position if causal.
        k_end = offset + q1 if causal else S
        for j, k0 in enumerate(range(0, k_end, kb)):
            if sync and j and j % sync == 0:
                mx.eval(acc, l, m)
            k1 = min(k0 + kb, k_end)
            s = qs @ k[:, :, k0:k1].swapaxes(-1, -2)  # [B, Hkv, rep * n, k1 - k0]
            if causal and k1 - 1 > offset + q0:
                qpos = mx.arange(offset + q0, offset + q1)[:, None]
                allow = qpos >= mx.arange(k0, k1)[None]  # [n, k1 - k0]
                s = mx.where(allow[None, None, None], s.reshape(B, Hkv, rep, n, -1), low)
                s = s.reshape(B, Hkv, rep * n, -1)
            elif arr is not None:
                blk = arr[..., k0:k1] if arr.shape[-2] == 1 else arr[..., q0:q1, k0:k1]
                s = s.reshape(B, Hkv, rep, n, -1)
                s = mx.where(blk, s, low) if blk.dtype == mx.bool_ else s + blk.astype(s.dtype)
                s = s.reshape(B, Hkv, rep * n, -1)
            m_new = mx.maximum(m, s.max(-1, keepdims=True).astype(mx.float32))
            p = _weights(s, m_new)
            alpha = mx.exp(m - m_new)
            acc = acc * alpha + (p.astype(v.dtype) @ v[:, :, k0:k1]).astype(mx.float32)
            l = l * alpha + p.sum(-1, keepdims=True).astype(mx.float32)
            m = m_new
        outs.append((acc / l).astype(v.dtype).reshape(B, Hq, n, Dv))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def prefill_kernel_takes(q: mx.array, k: mx.array, v: mx.array, mask: Any) -> bool:
    """Whether the prefill attention kernel runs this step (under PREFILL_KERNEL): a GPU
    backend, a shape it takes, and a mask it reads (None, "causal", or bool [B or 1, 1, T or 1,
    S]; additive masks take the ops paths)."""
    backend = prefill_kernel.backend_name()
    if backend is None or not prefill_kernel.shape_supported(q, k, v, backend):
        return False
    return prefill_kernel.mask_supported(mask, q.shape[0], q.shape[2], k.shape[2])


def prefill_kernel_wants(T: int, S: int) -> bool:
    """Whether a step of T queries over S keys is one for the prefill kernel by its size (where
    PREFILL_KERNEL is on and prefill_kernel_takes it): T >= PREFILL_KERNEL_MIN_T, or, when
    PREFILL_KERNEL_MIN_S is set (> 0), S >= PREFILL_KERNEL_MIN_S and T >=
    PREFILL_KERNEL_MIN_T_AT_S."""
    if T >= PREFILL_KERNEL_MIN_T:
        return True
    return 0 < PREFILL_KERNEL_MIN_S <= S and T >= PREFILL_KERNEL_MIN_T_AT_S


def dequantize_kv(q: mx.array) -> bool:
    """Whether a quantized KV cache is dequantized before attention: on MLX's CUDA backend
    (0.32), whose quantized matmul lacks kernels for attention's shapes ("[quantized_matmul] No
    implementation for problem shape", seen on an H200 with --kv-bits 8: float32 activations, and
    32-wide heads in groups of 32). Metal and the CPU have them. The cache stays quantized; only
    this step's keys and values are expanded, one layer at a time."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def attention(
    q: mx.array, k: mx.array, v: mx.array, cache: Any, scale: float, mask: Any
) -> mx.array:
    """Scaled dot-product attention for the model's layers: mlx-lm's (fused kernel, quantized
    cache) where that keeps the scores small or fused, else in key blocks (module docstring)."""
    if hasattr(cache, "bits") and dequantize_kv(q):
        # k, v: (packed, scales, biases) from a QuantizedKVCache (mlx-lm's --kv-bits).
        k = mx.dequantize(*k, group_size=cache.group_size, bits=cache.bits).astype(q.dtype)
        v = mx.dequantize(*v, group_size=cache.group_size, bits=cache.bits).astype(q.dtype)
        cache = None
    if hasattr(cache, "bits") or q.shape[2] == 1 or has_fused_kernel(q, k, v):
        return _mlx_lm_sdpa(q, k, v, cache=cache, scale=scale, mask=mask)
    if (
        PREFILL_KERNEL
        and prefill_kernel_wants(q.shape[2], k.shape[2])
        and prefill_kernel_takes(q, k, v, mask)
    ):
        if PREFILL_IN_PLACE and type(cache) in (KVCache, BatchKVCache) and cache.keys is not None:
            # k, v are the first k.shape[2] keys of these buffers (update_and_fetch's slice)
            kv = (cache.keys, cache.values, k.shape[2])
        else:
            kv = (k, v, None)
        return prefill_kernel.prefill_attention(
            q, kv[0], kv[1], scale=scale, mask=mask, kv_len=kv[2]
        )
    B, Hq, T, _ = q.shape
    if B * Hq * T * k.shape[2] * q.dtype.size <= PLAIN_BYTES:
        return _mlx_lm_sdpa(q, k, v, cache=cache, scale=scale, mask=mask)
    return _blocked(q, k, v, scale, mask)


def decode_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    cache: Any,
    scale: float,
    mask: Any,
    gate: mx.array | None = None,
    gate_offset: int = 0,
    gate_head_stride: int | None = None,
) -> mx.array | None:
    """A few query tokens a row (decode, a speculative verify, a short prompt) through the
    decode attention kernel (`kernels.attention`), gated: [B, T, Hq * D] = o * sigmoid(gate), gate
    [B, T, Hq, G] read at [gate_offset, gate_offset + D), or with gate_head_stride rows [B, T, N]
    (the kernel's doc: the fused q|k|v projection passed whole). None where the kernel does not run
    (the CPU, Metal under the default switch, shapes it lacks, caches other than KVCache,
    BatchKVCache and the compiled step's StaticKV, masks other than None / "causal" / bool): the
    caller then takes the ops path.

    q [B, Hq, T, D]; k, v what `cache.update_and_fetch` returned. The kernel is given the cache's
    whole buffer and the first new token's position, so the filled prefix is read in place (no
    copy of a sliced view), and the plain path over a KVCache and the compiled step over its
    preallocated buffer see the same keys in the same splits: their outputs are bit-identical.
    """
    T = q.shape[2]
    if isinstance(cache, StaticKV):
        keys, values, start = cache.keys, cache.values, cache.idx
    elif type(cache) in (KVCache, BatchKVCache) and isinstance(k, mx.array):
        keys, values, start = cache.keys, cache.values, None
    else:
        return None
    if attention_kernel.kernel_backend(q, keys, values) is None:
        return None
    if start is None:
        start = mx.array(kv_index(cache) - T, mx.int32)
    if isinstance(mask, mx.array):
        if mask.dtype != mx.bool_:
            return None
        if mask.ndim != 4:
            mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        if mask.shape[0] not in (1, q.shape[0]) or mask.shape[1] != 1:
            return None
        if mask.shape[2] != T:
            mask = mx.broadcast_to(mask, (mask.shape[0], 1, T, mask.shape[3]))
    elif mask not in (None, "causal"):
        return None
    gates = dict(gate=gate, gate_offset=gate_offset, gate_head_stride=gate_head_stride)
    return attention_kernel.decode_attention(
        q, keys, values, scale=scale, mask=mask, start=start, **gates
    )
