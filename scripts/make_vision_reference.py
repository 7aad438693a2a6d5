"""Write transformers' references for tests/models/test_vision.py, so those tests run without torch.

Dev-only: needs torch and transformers (the `dev` extra). Tests never import this file; they read
what it writes under `tests/data/vision/`:

- `tower_config.json` + `tower.safetensors`: a tiny random `Qwen3_5VisionModel` (`TOWER`
  below) as transformers names and lays out its weights (5-D Conv3d patch weight);
- `tower_reference.npz`: `grid` [N, 3] (two images of different shapes and a 2-frame video:
  unequal attention segments, a non-square grid, a grid larger than the 6x6 learned table),
  `pixels` [sum(t*h*w), 3*2*4*4], `pooler_output` (the tower's merged float32 output), and
  `taps_index`, `taps_weight` from `get_vision_interpolation_indices_and_weights`;
- `moe_vlm/`: a tiny random `Qwen3_5MoeForConditionalGeneration` checkpoint (`save_pretrained`,
  experts as transformers saves them) and `reference.npz` with `input_ids` (text, one image,
  text), `pixel_values`, `image_grid_thw` and transformers' float32 `logits`.

Run: `python scripts/make_vision_reference.py` (a few seconds on CPU).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from _golden import rope_parameters, save_hf, text_config_dict
from safetensors.torch import save_file
from transformers import (
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5VisionConfig,
)
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "vision"

TOWER = dict(
    depth=2,
    hidden_size=32,
    hidden_act="gelu_pytorch_tanh",
    intermediate_size=48,
    num_heads=2,
    in_channels=3,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=24,
    num_position_embeddings=36,
)
GRID = [[1, 4, 6], [1, 2, 2], [2, 8, 4]]

MOE_TEXT = text_config_dict(
    model_type=None,
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    layer_types=["linear_attention", "full_attention"],
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    rope_parameters=rope_parameters(0.25, [2, 1, 1], None),
)
del MOE_TEXT["intermediate_size"]  # no dense MLP

IMAGE = 60
MOE_GRID = [[1, 4, 6]]
MOE_IDS = [5, 7, 58] + [IMAGE] * 6 + [59, 9, 11, 13]


def tower() -> None:
    torch.manual_seed(0)
    model = hf.Qwen3_5VisionModel(Qwen3_5VisionConfig(**TOWER)).float().eval()
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.2)
    n = sum(t * h * w for t, h, w in GRID)
    pixels = np.random.default_rng(0).standard_normal((n, 3 * 2 * 4 * 4)).astype(np.float32)
    out = model(torch.from_numpy(pixels), grid_thw=torch.tensor(GRID)).pooler_output
    idx, w = get_vision_interpolation_indices_and_weights(
        torch.tensor(GRID), num_grid_per_side=6, mode="bilinear", align_corners=True,
        spatial_merge_size=2,
    )  # fmt: skip
    (OUT / "tower_config.json").write_text(json.dumps(TOWER, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, OUT / "tower.safetensors", metadata={"format": "pt"})
    np.savez_compressed(
        OUT / "tower_reference.npz",
        grid=np.array(GRID, dtype=np.int32),
        pixels=pixels,
        pooler_output=out.float().numpy(),
        taps_index=idx.numpy(),
        taps_weight=w.float().numpy(),
    )


def moe_vlm() -> None:
    config = Qwen3_5MoeConfig(
        text_config=MOE_TEXT,
        vision_config=dict(TOWER, out_hidden_size=32),
        image_token_id=IMAGE,
        video_token_id=61,
        vision_start_token_id=58,
        vision_end_token_id=59,
    )
    torch.manual_seed(1)
    model = Qwen3_5MoeForConditionalGeneration(config).float().eval()
    model.set_attn_implementation("eager")
    for name, p in model.named_parameters():
        if name.endswith("A_log") or p.ndim == 1:
            p.copy_(0.3 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    folder = OUT / "moe_vlm"
    shutil.rmtree(folder, ignore_errors=True)
    save_hf(model, folder)
    pixels = np.random.default_rng(1).standard_normal((24, 3 * 2 * 4 * 4)).astype(np.float32)
    ids = torch.tensor([MOE_IDS])
    logits = model(
        input_ids=ids,
        pixel_values=torch.from_numpy(pixels),
        image_grid_thw=torch.tensor(MOE_GRID),
        mm_token_type_ids=(ids == IMAGE).long(),
    ).logits
    np.savez_compressed(
        folder / "reference.npz",
        input_ids=np.array([MOE_IDS], dtype=np.int32),
        pixel_values=pixels,
        image_grid_thw=np.array(MOE_GRID, dtype=np.int32),
        logits=logits.float().numpy(),
    )


def main() -> None:
    torch.set_grad_enabled(False)
    OUT.mkdir(parents=True, exist_ok=True)
    tower()
    moe_vlm()
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"total {total / 1e3:.0f} kB under {OUT}")


if __name__ == "__main__":
    main()
