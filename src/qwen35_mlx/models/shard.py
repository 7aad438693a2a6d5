"""Tensor parallel sharding of Qwen3.5 models over an `mx.distributed` group, from outside.

`shard_text_model(model, group)` splits a `TextModel`'s weights in place so that each of the N
ranks holds about 1/N of them and runs the same forward pass on its share (mlx-lm's convention:
`model.shard(group)` after a lazy load, then `mx.eval(model.parameters())`, so only each rank's
rows or columns are ever kept in memory). MLX does the communication; this module only decides
which rows and columns a rank keeps and turns the outputs into all-reduces:

- Full attention: rank r keeps query heads [r H/N, (r+1) H/N) (q_proj rows per head are
  [query | gate], so the output gate follows its head), the key/value heads those query heads
  use (replicated when N > KV heads, as mlx-lm does), and the matching o_proj columns; o_proj
  becomes MLX's `ShardedToAllLinear` (an all_sum). q_norm/k_norm act per head_dim: replicated.
- Gated DeltaNet: rank r keeps value heads [r Hv/N, (r+1) Hv/N) and the key heads they use
  (value head h uses key head h // (Hv/Hk); whole groups when Hk divides by N, one replicated key
  head per rank when N divides Hk). in_proj_qkv rows and conv1d channels are taken per q/k/v
  segment, in_proj_z/b/a rows, A_log and dt_bias follow the value heads, the gated norm (per
  Dv) is replicated, out_proj becomes `ShardedToAllLinear`. The recurrent state a rank's cache
  holds is then [B, Hv/N, Dv, Dk] fp32: only its heads.
- Dense MLP: gate/up rows and down columns split (down all-reduced). MoE: every expert's
  gate/up rows and down columns split, as mlx-lm's qwen3_5 does, and the shared expert likewise;
  the router (mlp.gate) and shared_expert_gate are replicated; the block all-reduces its sum
  once (`SparseMoeBlock.sharding_group`).
- An untied lm_head is split by vocabulary rows and its logits gathered (when N divides the
  vocabulary; otherwise it stays whole). Embeddings, norms and the vision tower are replicated.

Head counts that do not split (H or Hv not divisible by N, KV or Hk neither a multiple nor a
divisor of N) raise one ValueError naming every count, before any weight changes. The layers read
their per-rank head counts from their own attributes (`num_heads`, `num_kv_heads`, `num_k_heads`,
`num_v_heads`, `key_dim`, `value_dim`, `conv_dim`), which this module rewrites.

Inference only: gradients of the layer inputs are not summed across ranks.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import shard_inplace, shard_linear

from .layers import MLP, Attention, GatedDeltaNet, SparseMoeBlock

__all__ = ["shard_text_model", "check_shardable"]

_ROW_PARAMS = ("weight", "bias", "scales", "biases")


def _heads_of(rank: int, n: int, total: int) -> np.ndarray:
    """The contiguous block of `total` heads that rank `rank` of `n` holds."""
    per = total // n
    return np.arange(rank * per, (rank + 1) * per)


def _kv_heads_of(rank: int, n: int, q_heads: int, kv_heads: int) -> np.ndarray:
    """The key/value heads rank `rank`'s query (value) heads use: head h uses h // (Q / KV)."""
    return np.unique(_heads_of(rank, n, q_heads) // (q_heads // kv_heads))


def _rows(heads: np.ndarray, dim: int, offset: int = 0) -> np.ndarray:
    """Row indices of `heads`, each `dim` rows wide, in a block starting at `offset`."""
    return (offset + heads[:, None] * dim + np.arange(dim)[None]).reshape(-1)


def _take_rows(module: nn.Module, rows: np.ndarray) -> None:
    """Keep only `rows` of a Linear / QuantizedLinear / Conv1d (output rows on axis 0)."""
    idx = mx.array(rows.astype(np.int32))
    params = module.parameters()
    module.update({k: mx.contiguous(params[k][idx]) for k in _ROW_PARAMS if k in params})


def _splits(what: str, total: int, n: int, divisor_ok: bool = False) -> str | None:
    if total % n == 0 or (divisor_ok and n % total == 0):
        return None
    also = f" (nor does {total} divide {n})" if divisor_ok else ""
    return f"{what} = {total} is not divisible by the group size {n}{also}"


def _quantized_column_problems(model: nn.Module, n: int) -> list[str]:
    """Quantized layers whose inputs are split must keep whole quantization groups per rank."""
    out = []
    for path, m in model.named_modules():
        if path.endswith(("o_proj", "out_proj", "down_proj")) and hasattr(m, "group_size"):
            cols = m.weight.shape[-1] * 32 // m.bits
            if cols % (n * m.group_size):
                out.append(
                    f"{path} has {cols} quantized inputs in groups of {m.group_size}, which do "
                    f"not split into {n} parts of whole groups"
                )
    return out


def check_shardable(config: Any, n: int, model: nn.Module | None = None) -> None:
    """Raise ValueError naming every head count (or width) that does not split across `n`,
    and, given the model, every quantized layer whose groups would be cut."""
    problems = []
    types = set(config.layer_types)
    if "full_attention" in types:
        problems.append(_splits("num_attention_heads", config.num_attention_heads, n))
        problems.append(_splits("num_key_value_heads", config.num_key_value_heads, n, True))
    if "linear_attention" in types:
        problems.append(_splits("linear_num_value_heads", config.linear_num_value_heads, n))
        problems.append(_splits("linear_num_key_heads", config.linear_num_key_heads, n, True))
    for i in range(config.num_hidden_layers):
        if config.layer_is_moe(i):
            problems.append(_splits("moe_intermediate_size", config.moe_intermediate_size, n))
            if config.shared_expert_intermediate_size > 0:
                size = config.shared_expert_intermediate_size
                problems.append(_splits("shared_expert_intermediate_size", size, n))
        else:
            problems.append(_splits("intermediate_size", config.intermediate_size, n))
    if model is not None:
        problems += _quantized_column_problems(model, n)
    found = list(dict.fromkeys(p for p in problems if p is not None))
    if found:
        raise ValueError(f"cannot shard this model across {n} processes: " + "; ".join(found))


def _shard_attention(attn: Attention, rank: int, n: int, group: Any) -> None:
    H, KV, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q_heads = _heads_of(rank, n, H)
    kv_heads = _kv_heads_of(rank, n, H, KV)
    width = 2 * D if attn.output_gate else D  # q_proj rows per head: [query | gate]
    _take_rows(attn.q_proj, _rows(q_heads, width))
    _take_rows(attn.k_proj, _rows(kv_heads, D))
    _take_rows(attn.v_proj, _rows(kv_heads, D))
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    attn.num_heads = len(q_heads)
    attn.num_kv_heads = len(kv_heads)


def _shard_linear_attention(gdn: GatedDeltaNet, rank: int, n: int, group: Any) -> None:
    Hk, Hv, Dk, Dv = gdn.num_k_heads, gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim
    v_heads = _heads_of(rank, n, Hv)
    k_heads = _kv_heads_of(rank, n, Hv, Hk)
    key_dim = Hk * Dk
    # in_proj_qkv rows and conv channels: [q (Hk Dk) | k (Hk Dk) | v (Hv Dv)].
    channels = np.concatenate(
        [_rows(k_heads, Dk), _rows(k_heads, Dk, key_dim), _rows(v_heads, Dv, 2 * key_dim)]
    )
    _take_rows(gdn.in_proj_qkv, channels)
    _take_rows(gdn.conv1d, channels)
    gdn.conv1d.groups = len(channels)
    _take_rows(gdn.in_proj_z, _rows(v_heads, Dv))
    _take_rows(gdn.in_proj_b, v_heads)
    _take_rows(gdn.in_proj_a, v_heads)
    idx = mx.array(v_heads.astype(np.int32))
    gdn.A_log = mx.contiguous(gdn.A_log[idx])
    gdn.dt_bias = mx.contiguous(gdn.dt_bias[idx])
    gdn.out_proj = shard_linear(gdn.out_proj, "sharded-to-all", group=group)
    gdn.num_k_heads, gdn.num_v_heads = len(k_heads), len(v_heads)
    gdn.key_dim = gdn.num_k_heads * Dk
    gdn.value_dim = gdn.num_v_heads * Dv
    gdn.conv_dim = len(channels)


def _split_swiglu(mlp: nn.Module, group: Any) -> None:
    """gate/up rows and down columns split in place, no communication (the caller sums)."""
    shard_inplace(mlp.gate_proj, "all-to-sharded", group=group)
    shard_inplace(mlp.up_proj, "all-to-sharded", group=group)
    shard_inplace(mlp.down_proj, "sharded-to-all", group=group)


def _shard_mlp(mlp: MLP, group: Any) -> None:
    """Dense SwiGLU: down_proj becomes ShardedToAllLinear (an all_sum)."""
    mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
    mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
    mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)


def _shard_moe(moe: SparseMoeBlock, group: Any) -> None:
    """Experts ([E, I, H] rows, [E, H, I] columns) and the shared expert split; the router and
    shared_expert_gate stay whole; the block all-reduces its output once."""
    _split_swiglu(moe.experts, group)
    if "shared_expert" in moe:
        _split_swiglu(moe.shared_expert, group)
    moe.sharding_group = group


def shard_text_model(model: nn.Module, group: Any = None) -> nn.Module:
    """Shard a `TextModel` in place across `group` (default: `mx.distributed.init()`).

    A group of size 1 changes nothing. Call it on a lazily loaded model, then evaluate the
    parameters: each rank then reads and keeps only its share.
    """
    group = group if group is not None else mx.distributed.init()
    n, rank = group.size(), group.rank()
    if n == 1:
        return model
    if getattr(model, "_shard_size", 1) > 1:
        raise ValueError(f"this model is already sharded across {model._shard_size} processes")
    config = model.config
    check_shardable(config, n, model)
    for layer in model.model.layers:
        if layer is None:  # a layer another pipeline stage runs
            continue
        if layer.is_linear:
            _shard_linear_attention(layer.linear_attn, rank, n, group)
        else:
            _shard_attention(layer.self_attn, rank, n, group)
        if isinstance(layer.mlp, SparseMoeBlock):
            _shard_moe(layer.mlp, group)
        elif isinstance(layer.mlp, MLP):
            _shard_mlp(layer.mlp, group)
    if "lm_head" in model and config.vocab_size % n == 0:
        shard_inplace(model.lm_head, "all-to-sharded", group=group)
        model.sharding_group = group
    model._shard_size = n
    return model
