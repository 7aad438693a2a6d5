"""Tiny seeded Qwen3.5 configs and models for tests (never downloads).

Shapes chosen to catch layout bugs: Dk != Dv, Hv = 2 Hk, GQA 4/2, an irregular layer_types that
no full_attention_interval produces, partial rotary with M-RoPE sections that use all three axes.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from qwen35_mlx.models.config import TextConfig

IRREGULAR_LAYER_TYPES = [
    "linear_attention",
    "full_attention",
    "linear_attention",
    "linear_attention",
]


def make_text_config(**overrides) -> TextConfig:
    d = dict(
        model_type="qwen3_5_text",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        layer_types=list(IRREGULAR_LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        # rotary_dim 8 -> 4 frequencies: t, h, w, t under mrope_section [2, 1, 1].
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
    )
    d.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        d["layer_types"] = None
    return TextConfig(**d)


def make_moe_config(**overrides) -> TextConfig:
    d = dict(
        model_type="qwen3_5_moe_text",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=True,
    )
    d.update(overrides)
    return make_text_config(**d)


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Noise on every parameter (norms, A_log and dt_bias included), reproducibly."""
    key = mx.random.key(seed)
    params = tree_flatten(model.parameters())
    keys = mx.random.split(key, len(params))
    new = []
    for (name, p), k in zip(params, keys, strict=True):
        noise = mx.random.normal(p.shape, key=k).astype(mx.float32)
        if name.endswith("A_log"):
            v = mx.log(mx.random.uniform(0.5, 8.0, p.shape, key=k))
        elif name.endswith("dt_bias"):
            v = noise
        elif name.endswith("norm.weight"):
            v = 1.0 + 0.1 * noise
        elif name.endswith("embed_tokens.weight"):
            v = noise
        else:
            fan_in = p.shape[-1] if p.ndim >= 2 else 1
            v = noise * (fan_in**-0.5) * (scale / 0.2)
        new.append((name, v.astype(p.dtype)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    return model


def make_text_model(config: TextConfig | None = None, seed: int = 0):
    from qwen35_mlx.models.text import TextModel

    return randomize(TextModel(config or make_text_config()), seed)
