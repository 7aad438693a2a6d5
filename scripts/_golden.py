"""Helpers shared by the dev-only golden-file generators `scripts/make_golden*.py`.

Imported as `_golden` when a script runs as `python scripts/make_golden*.py` (the script's folder
is first on `sys.path`). Needs torch and transformers, like the scripts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def noise_text_param(name: str, p: torch.nn.Parameter, gen: torch.Generator) -> None:
    """Replace one Qwen3.5 text parameter with non-trivial random values of a sensible scale.

    Draws from `gen` in the caller's parameter order, so the golden files depend on it."""

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    if name.endswith("A_log"):
        # decay rates exp(A_log) in [0.3, 3]: some heads forget fast, some slowly
        p.copy_(torch.empty(p.shape).uniform_(-1.2, 1.1, generator=gen))
    elif name.endswith("dt_bias"):
        p.copy_(0.5 * randn(p.shape))
    elif name.endswith("linear_attn.norm.weight"):
        # the gated norm applies w itself (centred on 1)
        p.copy_(1.0 + 0.2 * randn(p.shape))
    elif p.ndim == 1:
        # zero-centred Qwen3_5RMSNorm weights: applied as (1 + w)
        p.copy_(0.2 * randn(p.shape))
    elif name.endswith("conv1d.weight"):
        p.copy_(0.5 * randn(p.shape))  # [C, 1, K]
    elif name.endswith("embed_tokens.weight"):
        p.copy_(randn(p.shape))
    else:
        # Linear / expert weights: in-features are the last axis everywhere
        p.copy_(randn(p.shape) / np.sqrt(p.shape[-1]))


def save_hf(model, folder: Path) -> None:
    """`save_pretrained` (safetensors) without the `generation_config.json` it adds."""
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "generation_config.json").unlink(missing_ok=True)
