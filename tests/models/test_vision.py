"""Vision tower vs transformers' torch Qwen3_5VisionModel on the same random weights.

Needs torch (the `dev` extra); skipped without it. The golden VLM test carries the main proof.
"""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.models.config import VisionConfig
from qwen35_mlx.models.vision import VisionModel, interpolation_taps

from ..conftest import RTOL, rel_err

torch = pytest.importorskip("torch")
hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
vision_utils = pytest.importorskip("transformers.vision_utils")

TINY = dict(
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

# Two images of different shapes and a 2-frame video: unequal attention segments, a
# non-square grid and a grid larger than the 6x6 learned table.
GRID = [[1, 4, 6], [1, 2, 2], [2, 8, 4]]


def _hf_tower():
    from transformers import Qwen3_5VisionConfig

    torch.manual_seed(0)
    model = hf.Qwen3_5VisionModel(Qwen3_5VisionConfig(**TINY)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def _to_mlx(model_hf) -> VisionModel:
    model = VisionModel(VisionConfig.from_dict(TINY))
    weights = {k: mx.array(v.numpy()) for k, v in model_hf.state_dict().items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model


def test_interpolation_taps_match_transformers():
    grid = torch.tensor(GRID)
    idx_ref, w_ref = vision_utils.get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=6, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    idx, w = interpolation_taps(GRID, merge=2, side=6)
    np.testing.assert_array_equal(idx, idx_ref.numpy())
    np.testing.assert_allclose(w, w_ref.numpy(), atol=1e-6)


def test_vision_tower_matches_transformers():
    model_hf = _hf_tower()
    model = _to_mlx(model_hf)
    n = sum(t * h * w for t, h, w in GRID)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((n, 3 * 2 * 4 * 4)).astype(np.float32)
    with torch.no_grad():
        ref = model_hf(torch.from_numpy(pixels), grid_thw=torch.tensor(GRID)).pooler_output
    out = model(mx.array(pixels), mx.array(GRID))
    assert out.shape == (n // 4, 24)
    assert rel_err(out, ref.numpy()) < RTOL[mx.float32]


def test_vision_sanitize_is_idempotent():
    model_hf = _hf_tower()
    model = VisionModel(VisionConfig.from_dict(TINY))
    weights = {k: mx.array(v.numpy()) for k, v in model_hf.state_dict().items()}
    once = model.sanitize(weights)
    twice = model.sanitize(dict(once))
    assert once.keys() == twice.keys()
    for k in once:
        assert once[k].shape == twice[k].shape
        assert mx.array_equal(once[k], twice[k]).item()


def test_moe_vlm_matches_transformers(tmp_path):
    """qwen3_5_moe: a tiny random HF checkpoint (experts as transformers saves them) through our
    loader, logits with an image vs transformers'."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    from qwen35_mlx.loader import load_model

    text = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
        },
    )
    vision = dict(TINY, out_hidden_size=32)
    config = Qwen3_5MoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=60,
        video_token_id=61,
        vision_start_token_id=58,
        vision_end_token_id=59,
    )
    torch.manual_seed(1)
    ref_model = Qwen3_5MoeForConditionalGeneration(config).float().eval()
    ref_model.set_attn_implementation("eager")
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if name.endswith("A_log") or p.ndim == 1:
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    ref_model.save_pretrained(tmp_path)

    grid = [[1, 4, 6]]
    ids = [5, 7, 58] + [60] * 6 + [59, 9, 11, 13]
    pixels = np.random.default_rng(1).standard_normal((24, 3 * 2 * 4 * 4)).astype(np.float32)
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        ref = ref_model(
            input_ids=ids_t,
            pixel_values=torch.from_numpy(pixels),
            image_grid_thw=torch.tensor(grid),
            mm_token_type_ids=(ids_t == 60).long(),
        ).logits.numpy()
    model = load_model(tmp_path)
    out = model(mx.array([ids]), pixel_values=mx.array(pixels), image_grid_thw=mx.array(grid))
    assert np.abs(np.array(out) - ref).max() < 1e-4 * np.abs(ref).max()
