"""Config parsing: layer_types, both config layouts, rotary forms, errors."""

import pytest

from qwen35_mlx.models.config import ModelConfig, TextConfig, VisionConfig
from tests.models.factory import make_text_config


def test_layer_types_default_interval():
    c = TextConfig(num_hidden_layers=8)
    assert c.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 2
    c = TextConfig(num_hidden_layers=6, full_attention_interval=3)
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [2, 5]


def test_layer_types_explicit_kept():
    types = ["full_attention", "linear_attention", "full_attention"]
    assert TextConfig(num_hidden_layers=3, layer_types=types).layer_types == types


def test_layer_types_wrong_length():
    with pytest.raises(ValueError, match=r"3 entries.*num_hidden_layers is 4"):
        TextConfig(num_hidden_layers=4, layer_types=["linear_attention"] * 3)


def test_layer_types_unknown_type():
    types = ["linear_attention", "sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"layer_types\[1\] is 'sliding_attention'"):
        TextConfig(num_hidden_layers=3, layer_types=types)


def test_rope_forms():
    new = TextConfig(
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1e7,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        }
    )
    old = TextConfig(
        rope_theta=1e7,
        partial_rotary_factor=0.25,
        rope_scaling={"type": "mrope", "mrope_section": [11, 11, 10]},
    )
    for c in (new, old):
        assert (c.rope_theta, c.partial_rotary_factor) == (1e7, 0.25)
        assert c.mrope_section == [11, 11, 10] and c.rotary_dim == 64
    with pytest.raises(ValueError, match="yarn"):
        TextConfig(rope_parameters={"rope_type": "yarn", "factor": 4.0})


def test_text_from_dict_ignores_unknown_keys():
    c = TextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "use_cache": True})
    assert c.hidden_size == 64 and c.head_dim == 16


def _nested(model_type="qwen3_5", **top):
    text = make_text_config().to_dict()
    text.pop("model_type")
    return {
        "model_type": model_type,
        "text_config": text,
        "vision_config": {"depth": 2, "hidden_size": 32, "out_hidden_size": 64, "extra": 1},
        "image_token_id": 7,
        **top,
    }


def test_model_config_nested():
    c = ModelConfig.from_dict(_nested(tie_word_embeddings=True))
    assert c.model_type == "qwen3_5" and c.image_token_id == 7
    assert c.text_config.model_type == "qwen3_5_text"
    assert c.text_config.tie_word_embeddings and c.tie_word_embeddings
    assert isinstance(c.vision_config, VisionConfig) and c.vision_config.depth == 2
    assert c.text_config.layer_types == make_text_config().layer_types
    moe = ModelConfig.from_dict(_nested("qwen3_5_moe"))
    assert moe.text_config.model_type == "qwen3_5_moe_text"


def test_model_config_flat():
    d = make_text_config(tie_word_embeddings=True).to_dict()
    c = ModelConfig.from_dict(d)
    assert c.model_type == "qwen3_5_text" and c.vision_config is None
    assert c.text_config.hidden_size == 64 and c.tie_word_embeddings


def test_model_config_wrong_model_type():
    with pytest.raises(ValueError, match="'qwen3_next'"):
        ModelConfig.from_dict({"model_type": "qwen3_next", "hidden_size": 64})


def test_to_dict_round_trip():
    c = make_text_config(num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])
    assert TextConfig.from_dict(c.to_dict()) == c
    v = VisionConfig(depth=3, deepstack_visual_indexes=[1])
    assert VisionConfig.from_dict(v.to_dict()) == v
