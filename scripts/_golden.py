"""Helpers shared by the dev-only reference writers `scripts/make_*.py`.

Imported as `_golden` when a script runs as `python scripts/make_*.py` (the script's folder is
first on `sys.path`). Needs torch and transformers, like the scripts. Puts the repository root on
`sys.path`, so the scripts share `tests.models.factory` (tiny configs, the random-weight rules)
with the tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.models.factory import noise, rope_parameters, text_config_dict  # noqa: E402

__all__ = ["ROOT", "noise_text_param", "rope_parameters", "save_hf", "text_config_dict"]


@torch.no_grad()
def noise_text_param(name: str, p: torch.nn.Parameter, gen: torch.Generator) -> None:
    """Replace one Qwen3.5 text parameter (Hugging Face layout) with `factory.noise` drawn from
    `gen`, in the caller's parameter order, so the golden files depend on it."""

    def normal(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    def uniform(low, high, shape):
        return torch.empty(shape).uniform_(low, high, generator=gen)

    p.copy_(noise(name, tuple(p.shape), normal, uniform))


def save_hf(model, folder: Path) -> None:
    """`save_pretrained` (safetensors) without the `generation_config.json` it adds."""
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "generation_config.json").unlink(missing_ok=True)
