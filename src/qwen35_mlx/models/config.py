"""Configuration dataclasses for Qwen3.5 (text, vision, top level), with Hugging Face field names.

`layer_types` decides the stack: layer i is "linear_attention" (Gated DeltaNet) or
"full_attention" (gated softmax attention). When a config leaves it out it is derived from
`full_attention_interval` (layer i is full attention iff (i + 1) % interval == 0), as
transformers does. Rotary settings are read from `rope_parameters` (transformers >= 5) or from the
older `rope_theta` / `rope_scaling` / `partial_rotary_factor` fields.

Required fields. transformers gives every field a default, but for the fields that decide weight
shapes the default is the size of one particular model (`hidden_size=4096`, `head_dim=256`, ...):
a config.json without them describes some other model, and loading it would only end in a list
of shape mismatches. `ModelConfig.from_dict` (reading a config.json) therefore refuses a config
that lacks any of `TEXT_REQUIRED`, plus `layer_types` or `full_attention_interval` (one of them
decides which layers are linear), `intermediate_size` when any layer is a dense MLP, `MOE_REQUIRED`
for the MoE model types, and `vision_config.out_hidden_size` (it must match the text model).
The error names every missing field. The other fields keep transformers' defaults
(`rms_norm_eps`, `max_position_embeddings`, `linear_conv_kernel_dim=4`, rotary settings, ...) and
so do the vision tower's sizes, which are the same for every Qwen3.5 release. Building a
`TextConfig` / `VisionConfig` directly (tests, scripts) checks nothing of this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self

LAYER_TYPES = ("linear_attention", "full_attention")
TEXT_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text")
MODEL_TYPES = ("qwen3_5", "qwen3_5_moe", *TEXT_MODEL_TYPES)
# Rotary variants this port implements; others (yarn, dynamic, ...) are refused, not ignored.
ROPE_TYPES = ("default", "mrope")
# Fields of a config.json without which the model's weight shapes are unknown (see above).
TEXT_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
)
MOE_REQUIRED = (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)
VISION_REQUIRED = ("out_hidden_size",)


def missing_fields(d: dict[str, Any], moe: bool) -> list[str]:
    """The required fields (module docstring) a text config dict lacks (None counts as absent)."""

    def has(k):
        return d.get(k) is not None

    missing = [k for k in TEXT_REQUIRED if not has(k)]
    if not has("layer_types") and not has("full_attention_interval"):
        missing.append("layer_types (or full_attention_interval)")
    if moe:
        missing += [k for k in MOE_REQUIRED if not has(k)]
    dense_layers = not moe or d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1
    if dense_layers and not has("intermediate_size"):
        missing.append("intermediate_size")
    return missing


def _known_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


class _DictConfig:
    """`from_dict` keeps the keys the dataclass has fields for (config.json carries more)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        return cls(**_known_fields(cls, d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TextConfig(_DictConfig):
    model_type: str = "qwen3_5_text"
    vocab_size: int = 248320
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    layer_types: list[str] | None = None
    full_attention_interval: int = 4
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    attn_output_gate: bool = True
    # Rotary: `rope_parameters` is the normalised dict; the fields below are read from it.
    rope_parameters: dict[str, Any] | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_theta: float | None = None
    partial_rotary_factor: float | None = None
    mrope_section: list[int] | None = None
    mrope_interleaved: bool | None = None
    # MoE (num_experts == 0: dense MLP everywhere).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # Multi-token prediction head (`mtp.*`, models/mtp.py): 0 = none, 1 = one layer (released).
    mtp_num_hidden_layers: int = 0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        n = self.num_hidden_layers
        if self.layer_types is None:
            interval = self.full_attention_interval
            if not isinstance(interval, int) or interval < 1:
                raise ValueError(
                    f"full_attention_interval must be a positive int, got {interval!r}"
                )
            self.layer_types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention"
                for i in range(n)
            ]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != n:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {n}"
            )
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise ValueError(f"layer_types[{i}] is {t!r}; expected one of {LAYER_TYPES}")
        if self.linear_num_value_heads % self.linear_num_key_heads != 0:
            raise ValueError(
                f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})"
            )
        if self.mtp_num_hidden_layers not in (0, 1):
            raise ValueError(
                f"mtp_num_hidden_layers is {self.mtp_num_hidden_layers}; only 0 or 1 is supported"
            )
        self._normalise_rope()
        self.mlp_only_layers = list(self.mlp_only_layers or [])

    def _normalise_rope(self) -> None:
        # Precedence: rope_parameters, then the old rope_scaling dict, then top-level fields.
        src: dict[str, Any] = {}
        for d in (self.rope_scaling, self.rope_parameters):
            if d:
                src.update(d)
        rope_type = src.get("rope_type", src.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope type {rope_type!r} is not supported; expected one of {ROPE_TYPES}"
            )

        def pick(key, current, default):
            if key in src and src[key] is not None:
                return src[key]
            return current if current is not None else default

        self.rope_theta = float(pick("rope_theta", self.rope_theta, 10000.0))
        self.partial_rotary_factor = float(
            pick("partial_rotary_factor", self.partial_rotary_factor, 0.25)
        )
        self.mrope_section = list(pick("mrope_section", self.mrope_section, [11, 11, 10]))
        self.mrope_interleaved = bool(pick("mrope_interleaved", self.mrope_interleaved, True))
        self.rope_parameters = {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
            "mrope_section": self.mrope_section,
            "mrope_interleaved": self.mrope_interleaved,
        }

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, i: int) -> bool:
        return (
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )


@dataclass
class VisionConfig(_DictConfig):
    model_type: str = "qwen3_5_vision"
    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: list[int] = field(default_factory=list)
    initializer_range: float = 0.02


@dataclass
class ModelConfig:
    model_type: str
    text_config: TextConfig
    vision_config: VisionConfig | None = None
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    tie_word_embeddings: bool = False
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict: nested (text_config / vision_config) or flat text-only."""
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"not a Qwen3.5 config: model_type is {model_type!r}; expected one of {MODEL_TYPES}"
            )
        top = {k: d[k] for k in _known_fields(cls, d) if k not in ("text_config", "vision_config")}
        moe = model_type in ("qwen3_5_moe", "qwen3_5_moe_text")
        nested = "text_config" in d
        text_dict = d["text_config"] if nested else d
        if not isinstance(text_dict, dict):
            raise ValueError(
                f"config text_config must be an object, got {type(text_dict).__name__}"
            )
        missing = missing_fields(text_dict, moe)
        if nested:
            missing = [f"text_config.{k}" for k in missing]
        vc = d.get("vision_config")
        if vc is not None:
            if not isinstance(vc, dict):
                raise ValueError(f"config vision_config must be an object, got {type(vc).__name__}")
            missing += [f"vision_config.{k}" for k in VISION_REQUIRED if vc.get(k) is None]
        if missing:
            raise ValueError(f"config ({model_type}) lacks required field(s): {', '.join(missing)}")
        if nested:
            text = dict(d["text_config"])
            text["model_type"] = "qwen3_5_moe_text" if moe else "qwen3_5_text"
            # The top-level flag decides tying for the conditional-generation model.
            if "tie_word_embeddings" in d:
                text["tie_word_embeddings"] = d["tie_word_embeddings"]
            text_config = TextConfig.from_dict(text)
            vision_config = VisionConfig.from_dict(vc) if vc is not None else None
        else:
            flat = dict(d)
            if model_type in ("qwen3_5", "qwen3_5_moe"):
                flat["model_type"] = model_type + "_text"
            text_config = TextConfig.from_dict(flat)
            vision_config = None
        top["tie_word_embeddings"] = text_config.tie_word_embeddings
        return cls(text_config=text_config, vision_config=vision_config, **top)
