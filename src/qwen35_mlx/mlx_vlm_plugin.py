"""Make mlx-vlm run Qwen3.5 checkpoints on this package's models (mlx-vlm is an optional extra).

mlx-vlm resolves `model_type` like mlx-lm: `MODEL_REMAPPING`, then the module
`mlx_vlm.models.<type>`, whose `ModelConfig.from_dict(config)` and `Model(config)` it uses.
`register()` maps `qwen3_5`, `qwen3_5_text`, `qwen3_5_moe`, `qwen3_5_moe_text` to one extra module
name, `mlx_vlm.models.qwen35_mlx` (this module, put in `sys.modules`); mlx-vlm's own Qwen3.5
modules stay importable and untouched, `unregister()` undoes it.

The two plugins adapt models one way (see `mlx_lm_plugin`: `Remapping`, `HostConfig`). mlx-vlm
drives a model through its own protocol, which this module's `Model` adapts to qwen35_mlx's
vision-language (or text) model, held as the child `model`:

- `get_input_embeddings(input_ids, pixel_values, mask, image_grid_thw=...)` -> embeddings with the
  vision rows scattered in (the M-RoPE positions are kept by our model for the calls that follow);
- `language_model(inputs, inputs_embeds=..., cache=...)` -> mlx-vlm's `LanguageModelOutput`: prefill
  steps fed as embeddings, then decode steps whose positions continue from the cache;
- `sanitize` (our model's, under the `model.` prefix), `make_cache`, `layers`.

mlx-vlm's own processor (transformers' Qwen3-VL processor) prepares text and images.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .mlx_lm_plugin import MODEL_TYPES as MODEL_TYPES
from .mlx_lm_plugin import MODULE_NAME as MODULE_NAME  # mlx-vlm looks for mlx_vlm.models.<this>
from .mlx_lm_plugin import HostConfig, Remapping

ModelConfig = HostConfig  # mlx-vlm's name


def _output(logits: mx.array):
    """mlx-vlm's own `LanguageModelOutput` (its speculative decoding reads the optional fields)."""
    from mlx_vlm.models.base import LanguageModelOutput

    return LanguageModelOutput(logits=logits)


class _LanguageModel:
    """What mlx-vlm calls `model.language_model`: token ids or embeddings + cache -> logits.

    Not an nn.Module, so it adds no parameters; the weights live in `Model.model`.
    """

    def __init__(self, owner: Model):
        self._owner = owner

    @property
    def model(self) -> nn.Module:
        return self._owner.model

    def __call__(self, inputs=None, inputs_embeds=None, cache=None, **kwargs):
        if inputs is not None and inputs.ndim == 1:
            inputs = inputs[None]
        return _output(self.model(inputs, cache=cache, input_embeddings=inputs_embeds))

    def make_cache(self, *args, **kwargs) -> list:
        return self.model.make_cache(*args, **kwargs)

    @property
    def layers(self) -> list:
        return self.model.layers


class Model(nn.Module):
    """qwen35_mlx's model (vision-language or text) behind mlx-vlm's model protocol."""

    def __init__(self, config: HostConfig):
        super().__init__()
        self.config = config
        self.model_type = config.model_type
        self.model = config.build()
        self._lm = _LanguageModel(self)

    @property
    def language_model(self) -> _LanguageModel:
        return self._lm

    @property
    def layers(self) -> list:
        return self.model.layers

    def make_cache(self, *args, **kwargs) -> list:
        return self.model.make_cache(*args, **kwargs)

    def get_input_embeddings(self, input_ids=None, pixel_values=None, mask=None, **kwargs):
        from mlx_vlm.models.base import InputEmbeddingsFeatures

        if not hasattr(self.model, "get_input_embeddings"):  # a text-only model
            return InputEmbeddingsFeatures(inputs_embeds=self.model.model.embed_tokens(input_ids))
        # Text-only prompts go through the VLM too: it resets the M-RoPE positions an earlier
        # image prompt left behind.
        embeds, _ = self.model.get_input_embeddings(
            input_ids, pixel_values, kwargs.get("image_grid_thw"), mask=mask
        )
        return InputEmbeddingsFeatures(inputs_embeds=embeds)

    def __call__(self, input_ids, pixel_values=None, mask=None, cache=None, **kwargs):
        extra = {}
        if pixel_values is not None:
            extra = {"pixel_values": pixel_values, "image_grid_thw": kwargs.get("image_grid_thw")}
        return _output(self.model(input_ids, cache=cache, **extra))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        from mlx.utils import tree_flatten

        ours = {f"model.{k}" for k, _ in tree_flatten(self.model.parameters())}
        # mlx-vlm sanitizes before quantizing, so a quantized checkpoint of ours adds these.
        if {k for k in weights if not k.endswith((".scales", ".biases"))} <= ours:
            return weights  # already sanitized by this adapter
        return {f"model.{k}": v for k, v in self.model.sanitize(weights).items()}

    def quantization_path_aliases(self, path: str) -> tuple[str, ...]:
        # Quantization overrides in config.json name our model's paths, without the prefix.
        return (path[len("model.") :],) if path.startswith("model.") else ()

    @property
    def cast_predicate(self):
        return self.model.cast_predicate

    @property
    def quant_predicate(self):
        """Our model's predicate (8-bit routers and shared-expert gate, no vision tower) under
        the `model.` prefix, for mlx-vlm's converter. A router whose width the model's group size
        does not divide (tiny models) falls back to groups of 32, through mlx-vlm's own
        `fallback_group_size`."""
        inner = getattr(self.model, "quant_predicate", None)
        if inner is None:
            return None

        def predicate(path: str, module: nn.Module):
            decision = inner(path[len("model.") :] if path.startswith("model.") else path, module)
            if isinstance(decision, dict):
                return {**decision, "fallback_group_size": 32}
            return decision

        return predicate


# Importing mlx-vlm's own qwen3_5 registers the Qwen3.5 processor with transformers.
_remapping = Remapping("mlx_vlm", __name__, preload=("mlx_vlm.models.qwen3_5",))
register = _remapping.register
unregister = _remapping.unregister
is_registered = _remapping.is_registered
