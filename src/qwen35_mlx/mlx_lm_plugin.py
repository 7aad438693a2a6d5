"""Make mlx-lm run Qwen3.5 checkpoints on this package's models.

mlx-lm resolves a checkpoint's `model_type` to a module `mlx_lm.models.<type>` that exposes
`Model` and `ModelArgs` (`mlx_lm.utils._get_classes`, after looking the type up in
`MODEL_REMAPPING`). 0.32 has no module for `qwen3_5_text` / `qwen3_5_moe_text` ("Model type not
supported") and its `qwen3_5` builds the layer stack from an interval formula.

`register()` does the least it can: it maps the four Qwen3.5 model types to one extra module name,
`mlx_lm.models.qwen35_mlx`, in `MODEL_REMAPPING`, and registers this module under that name in
`sys.modules`. mlx-lm's own `mlx_lm.models.qwen3_5` stays importable and untouched; `unregister()`
undoes both. After it, mlx-lm's `load`, `generate`, `stream_generate`, `batch_generate`, server
and chat build `qwen35_mlx` models (the text model, or the vision-language model for a checkpoint
with a vision tower) from `config.json`, `layer_types` included. mlx-lm then calls the model's
`sanitize` (Hugging Face and MLX layouts alike), quantizes and loads the weights as usual.

Both plugins (this one and `mlx_vlm_plugin`) adapt our models one way: the host resolves the
model type through `Remapping` to the plugin module, hands `HostConfig.from_dict(config.json)` to
the module's `Model`, and `HostConfig.build()` makes our model, with our parameter names, so a
checkpoint either host saves loads in the other and in ours. Where the host's model protocol is
ours (mlx-lm), `Model` returns that model itself; where it differs (mlx-vlm: its output class,
`get_input_embeddings` features, `language_model` entry point), it returns our model's
subclass that speaks the host's protocol, never a wrapper.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import mlx.nn as nn

MODULE_NAME = "qwen35_mlx"  # mlx-lm looks for mlx_lm.models.<this>
MODEL_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")


class Remapping:
    """Route `host`'s Qwen3.5 model types to the module `plugin`: `MODEL_REMAPPING` entries to
    `MODULE_NAME`, and `<host>.models.<MODULE_NAME>` in `sys.modules`. `unregister` restores the
    entries it replaced. mlx-vlm resolves `model_type` the same way, so its plugin uses this too.
    `preload`: modules to import before registering (their import has side effects the host
    needs).
    """

    def __init__(self, host: str, plugin: str, preload: tuple[str, ...] = ()):
        self.host = host  # "mlx_lm" or "mlx_vlm"
        self.plugin = plugin  # the plugin module's __name__
        self.preload = preload
        self._saved: dict[str, str | None] = {}

    def _table(self) -> dict[str, str]:
        return importlib.import_module(f"{self.host}.utils").MODEL_REMAPPING

    def register(self) -> None:
        """Route the host's Qwen3.5 model types to the plugin (idempotent)."""
        for name in self.preload:
            importlib.import_module(name)
        table = self._table()
        sys.modules[f"{self.host}.models.{MODULE_NAME}"] = sys.modules[self.plugin]
        for t in MODEL_TYPES:
            if table.get(t) != MODULE_NAME:
                self._saved.setdefault(t, table.get(t))
                table[t] = MODULE_NAME

    def unregister(self) -> None:
        """Give the host its own resolution back."""
        table = self._table()
        for t, old in self._saved.items():
            if old is None:
                table.pop(t, None)
            else:
                table[t] = old
        self._saved.clear()
        sys.modules.pop(f"{self.host}.models.{MODULE_NAME}", None)

    def is_registered(self) -> bool:
        table = self._table()
        return all(table.get(t) == MODULE_NAME for t in MODEL_TYPES)


@dataclass
class HostConfig:
    """What a host's `ModelArgs.from_dict` / `ModelConfig.from_dict` returns: config.json as
    `raw` (checked and parsed by `build`).

    It has no `text_config` / `vision_config` attributes on purpose: mlx-vlm would rebuild them
    with its own classes."""

    model_type: str
    raw: dict[str, Any] = field(default_factory=dict)
    eos_token_id: Any = None

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> HostConfig:
        return cls(
            model_type=params["model_type"],
            raw=dict(params),
            eos_token_id=params.get("eos_token_id"),
        )

    def build(self, text_model: type | None = None, vlm_model: type | None = None) -> nn.Module:
        """Our model (text or vision-language) for this config; a host whose model protocol
        differs from ours passes subclasses of our classes that speak it."""
        from .loader import build_model
        from .models.config import ModelConfig

        return build_model(ModelConfig.from_dict(self.raw), text_model, vlm_model)


ModelArgs = HostConfig  # mlx-lm's name


def Model(args: HostConfig) -> nn.Module:  # noqa: N802  (mlx-lm calls `arch.Model(args)`)
    """mlx-lm's model constructor: our model itself, which speaks mlx-lm's model protocol."""
    return args.build()


_remapping = Remapping("mlx_lm", __name__)
register = _remapping.register
unregister = _remapping.unregister
is_registered = _remapping.is_registered
