"""Tiny seeded Qwen3.5 configs and random weights: the one copy for tests, scripts, benchmarks.

Shapes chosen to catch layout bugs: Dk != Dv, Hv = 2 Hk, GQA 4/2, an irregular layer_types that
no full_attention_interval produces, partial rotary with M-RoPE sections that use all three axes.

Dev-only, never imported by `src/`. `scripts/` and `benchmarks/` import it as
`tests.models.factory` after putting the repository root on `sys.path`: it lives with the tests,
which use it most, and `src/` stays free of test helpers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from qwen35_mlx.models.config import TextConfig

# isort: on

IRREGULAR_LAYER_TYPES = [
    "linear_attention",
    "full_attention",
    "linear_attention",
    "linear_attention",
]


def rope_parameters(
    partial_rotary_factor: float, mrope_section: list[int], mrope_interleaved: bool | None = True
) -> dict:
    """Qwen3.5's M-RoPE settings (theta 10000); `mrope_interleaved=None` leaves the key out."""
    d = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": partial_rotary_factor,
        "mrope_section": mrope_section,
        "mrope_interleaved": mrope_interleaved,
    }
    return {k: v for k, v in d.items() if v is not None}


def text_config_dict(**overrides) -> dict:
    """A tiny `qwen3_5_text` config as a plain dict, for TextConfig or transformers'
    Qwen3_5TextConfig (pass `model_type=None` to leave it out)."""
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
        rope_parameters=rope_parameters(0.5, [2, 1, 1]),
    )
    d.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        d["layer_types"] = None
    if d["model_type"] is None:
        del d["model_type"]
    return d


def make_text_config(**overrides) -> TextConfig:
    return TextConfig(**text_config_dict(**overrides))


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


def noise(name: str, shape, normal: Callable, uniform: Callable):
    """Random values of a sensible scale for one Qwen3.5 text parameter, in Hugging Face's
    layout (zero-centred RMSNorm weights, applied as 1 + w).

    `normal(shape)` and `uniform(low, high, shape)` draw the randomness (mlx or torch), one call
    per parameter, so the golden files written with torch depend only on the parameter order.
    """
    if name.endswith("A_log"):
        # decay rates exp(A_log) in [0.3, 3]: some heads forget fast, some slowly
        return uniform(-1.2, 1.1, shape)
    if name.endswith("dt_bias"):
        return 0.5 * normal(shape)
    if name.endswith("linear_attn.norm.weight"):
        # the gated norm applies w itself (centred on 1)
        return 1.0 + 0.2 * normal(shape)
    if len(shape) == 1:
        # zero-centred RMSNorm weights: applied as (1 + w)
        return 0.2 * normal(shape)
    if name.endswith("conv1d.weight"):
        return 0.5 * normal(shape)
    if name.endswith("embed_tokens.weight"):
        return normal(shape)
    # Linear and expert weights: in-features are the last axis everywhere
    return normal(shape) / math.sqrt(shape[-1])


def _is_shifted_norm(name: str) -> bool:
    """A Qwen3_5RMSNorm weight (applied as 1 + w; the MTP head's pre-fc norms included)."""
    return (name.endswith("norm.weight") or "pre_fc_norm_" in name) and "linear_attn" not in name


def random_weights(model: nn.Module, dtype: mx.Dtype | None = None, seed: int = 0) -> dict:
    """`noise` for every parameter of an MLX text model, in MLX layout (norms stored as applied),
    cast to `dtype` (default: each parameter's own; A_log stays float32). Each is evaluated as it
    is made, so a large model never holds its float32 draws all at once."""
    params = tree_flatten(model.parameters())
    keys = iter(mx.random.split(mx.random.key(seed), len(params)))
    out = {}
    for name, p in params:
        key = next(keys)
        v = noise(
            name,
            p.shape,
            lambda shape, k=key: mx.random.normal(shape, key=k),
            lambda lo, hi, shape, k=key: mx.random.uniform(lo, hi, shape, key=k),
        )
        if p.ndim == 1 and _is_shifted_norm(name):
            v = 1.0 + v
        v = v.astype(mx.float32 if name.endswith("A_log") else dtype or p.dtype)
        mx.eval(v)
        out[name] = v
    return out


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Noise on every parameter (norms, A_log and dt_bias included), reproducibly."""
    model.load_weights(list(random_weights(model, seed=seed).items()), strict=True)
    mx.eval(model.parameters())
    return model


def make_text_model(config: TextConfig | None = None, seed: int = 0):
    from qwen35_mlx.models.text import TextModel

    return randomize(TextModel(config or make_text_config()), seed)
