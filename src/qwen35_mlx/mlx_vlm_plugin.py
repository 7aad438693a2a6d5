"""Make mlx-vlm run Qwen3.5 checkpoints on this package's models (mlx-vlm is an optional extra).

mlx-vlm resolves `model_type` like mlx-lm: `MODEL_REMAPPING`, then the module
`mlx_vlm.models.<type>`, whose `ModelConfig.from_dict(config)` and `Model(config)` it uses.
`register()` maps `qwen3_5`, `qwen3_5_text`, `qwen3_5_moe`, `qwen3_5_moe_text` to one extra module
name, `mlx_vlm.models.qwen35_mlx` (this module, put in `sys.modules`); mlx-vlm's own Qwen3.5
modules stay importable and untouched, `unregister()` undoes it.

The two plugins adapt models one way (see `mlx_lm_plugin`): `Model` is the loader's
`build_model`, with our parameter names (a checkpoint mlx-vlm saves through this plugin loads in
our loader, and ours in mlx-vlm), building subclasses that speak mlx-vlm's model protocol:

- `language_model(inputs, inputs_embeds=..., cache=...)` -> mlx-vlm's `LanguageModelOutput`:
  prefill steps fed as embeddings, then decode steps whose M-RoPE positions continue from the
  cache. A text checkpoint's model is its own `language_model`; the vision-language model's is
  its text model (`language_model`, as in ours), which asks the model for the positions;
- `get_input_embeddings(input_ids, pixel_values, mask, image_grid_thw=...)` -> embeddings with
  the vision rows scattered in; their positions are bound to the cache of the first call fed
  them (as for mlx-lm's `embed_inputs`);
- `config.model_type` / `config.eos_token_id`, `sanitize`, `make_cache`, `layers` are ours.

mlx-vlm's own processor (transformers' Qwen3-VL processor) prepares text and images.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .loader import build_model
from .mlx_lm_plugin import MODEL_TYPES as MODEL_TYPES
from .mlx_lm_plugin import MODULE_NAME as MODULE_NAME  # mlx-vlm looks for mlx_vlm.models.<this>
from .mlx_lm_plugin import Remapping
from .models import config as our_config
from .models import vlm
from .models.text import TextModel


@dataclass
class ModelConfig:
    """What mlx-vlm's `ModelConfig.from_dict` returns: config.json as `raw`, which `Model` parses
    and checks. It has no `text_config` / `vision_config` attributes on purpose: mlx-vlm would
    rebuild them with its own classes."""

    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ModelConfig:
        return cls(dict(params))


def _output(logits: mx.array):
    """mlx-vlm's own `LanguageModelOutput` (its speculative decoding reads the optional fields)."""
    from mlx_vlm.models.base import LanguageModelOutput

    return LanguageModelOutput(logits=logits)


def _features(embeds: mx.array):
    from mlx_vlm.models.base import InputEmbeddingsFeatures

    return InputEmbeddingsFeatures(inputs_embeds=embeds)


def _with_fallback_group(predicate):
    """The model's quantization predicate for mlx-vlm's converter: a module whose width the
    group size does not divide (a tiny model's router) falls back to groups of 32, through
    mlx-vlm's own `fallback_group_size`."""
    if predicate is None:
        return None

    def with_fallback(path: str, module: nn.Module):
        decision = predicate(path, module)
        return {**decision, "fallback_group_size": 32} if isinstance(decision, dict) else decision

    return with_fallback


class LanguageModel(TextModel):
    """Our text model behind mlx-vlm's `language_model` protocol (ids or embeddings + cache ->
    `LanguageModelOutput`); inside a vision-language model, its positions come from that model."""

    _owner = None  # weakref to the VisionLanguageModel holding this text model, if any

    @property
    def language_model(self) -> LanguageModel:
        return self

    def __call__(self, inputs=None, inputs_embeds=None, cache=None, **kwargs):
        if inputs is not None and inputs.ndim == 1:
            inputs = inputs[None]
        owner = self._owner() if self._owner is not None else None
        positions = None
        if owner is not None:
            B, T = (inputs if inputs_embeds is None else inputs_embeds).shape[:2]
            positions = owner._decode_positions(cache, B, T, inputs_embeds is not None)
        logits = super().__call__(
            inputs, cache, input_embeddings=inputs_embeds, position_ids=positions
        )
        return _output(logits)

    def make_cache(self, *args, **kwargs) -> list:
        owner = self._owner() if self._owner is not None else None
        if owner is not None:  # the M-RoPE holder goes in the vision-language model's cache
            return owner.make_cache(*args, **kwargs)
        return super().make_cache(*args, **kwargs)

    def get_input_embeddings(self, input_ids=None, pixel_values=None, mask=None, **kwargs):
        return _features(self.model.embed_tokens(input_ids))

    @property
    def quant_predicate(self):
        # The vision-language model's predicate asks this one for the text part.
        return _with_fallback_group(super().quant_predicate)


class VisionLanguageModel(vlm.Model):
    """Our vision-language model behind mlx-vlm's model protocol."""

    text_model = LanguageModel

    def __init__(self, config):
        super().__init__(config)
        self.language_model._owner = weakref.ref(self)

    def get_input_embeddings(self, input_ids=None, pixel_values=None, mask=None, **kwargs):
        """Embeddings with the vision rows scattered in; their M-RoPE positions wait for the
        cache of the next call fed embeddings. Text-only prompts drop what an earlier image
        prompt left waiting."""
        self._pending = None
        if pixel_values is None:
            return _features(self.language_model.model.embed_tokens(input_ids))
        real = None if mask is None else np.array(mask).astype(bool)
        grid = kwargs.get("image_grid_thw")
        embeds, self._pending = self._embed(input_ids, pixel_values, grid, None, None, real)
        return _features(embeds)

    def __call__(self, input_ids, pixel_values=None, mask=None, cache=None, **kwargs):
        embeds = self.get_input_embeddings(input_ids, pixel_values, mask, **kwargs)
        return self.language_model(input_ids, inputs_embeds=embeds.inputs_embeds, cache=cache)


def Model(config: ModelConfig) -> nn.Module:  # noqa: N802  (mlx-vlm calls `arch.Model(config)`)
    """mlx-vlm's model constructor: our model, as the subclass that speaks mlx-vlm's protocol."""
    parsed = our_config.ModelConfig.from_dict(config.raw)
    return build_model(parsed, LanguageModel, VisionLanguageModel)


# Importing mlx-vlm's own qwen3_5 registers the Qwen3.5 processor with transformers.
_remapping = Remapping("mlx_vlm", __name__, preload=("mlx_vlm.models.qwen3_5",))
register = _remapping.register
unregister = _remapping.unregister
is_registered = _remapping.is_registered
