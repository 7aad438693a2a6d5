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
model type through `Remapping` to the plugin module, whose `Model(<its config>)` is the loader's
`build_model`, so our model is built with our parameter names and a checkpoint either host saves
loads in the other and in ours. mlx-lm's model protocol and config handling are ours: its
`ModelArgs` is our `ModelConfig` and its `Model` our `build_model`. Where they differ (mlx-vlm:
its output class, `get_input_embeddings` features, `language_model` entry point, config classes
it rebuilds), `Model` builds our model's subclasses that speak the host's protocol, never a
wrapper.
"""

from __future__ import annotations

import importlib
import sys

from .loader import build_model
from .models.config import ModelConfig

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


# mlx-lm builds a model as `arch.Model(arch.ModelArgs.from_dict(config))`.
ModelArgs = ModelConfig
Model = build_model

_remapping = Remapping("mlx_lm", __name__)
register = _remapping.register
unregister = _remapping.unregister
is_registered = _remapping.is_registered
