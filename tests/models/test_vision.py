"""Vision tower vs transformers' torch Qwen3_5VisionModel on the same random weights.

The references (weights, inputs and transformers' outputs) are committed under
`tests/data/vision/`, written by `scripts/make_vision_reference.py` (needs torch), so these tests
run without torch. The golden VLM test carries the main proof.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.models.config import VisionConfig
from qwen35_mlx.models.vision import VisionModel, interpolation_taps

from ..conftest import RTOL, rel_err

DATA = Path(__file__).resolve().parents[1] / "data" / "vision"

TINY = json.loads((DATA / "tower_config.json").read_text())

# Two images of different shapes and a 2-frame video: unequal attention segments, a
# non-square grid and a grid larger than the 6x6 learned table.
GRID = [[1, 4, 6], [1, 2, 2], [2, 8, 4]]


@pytest.fixture(scope="module")
def ref():
    return np.load(DATA / "tower_reference.npz")


def _hf_weights() -> dict[str, mx.array]:
    """The tower's weights as transformers names and lays them out."""
    return mx.load(str(DATA / "tower.safetensors"))


def _to_mlx(weights) -> VisionModel:
    model = VisionModel(VisionConfig.from_dict(TINY))
    model.load_weights(list(model.sanitize(dict(weights)).items()), strict=True)
    return model


def test_interpolation_taps_match_transformers(ref):
    np.testing.assert_array_equal(ref["grid"], GRID)
    idx, w = interpolation_taps(GRID, merge=2, side=6)
    np.testing.assert_array_equal(idx, ref["taps_index"])
    np.testing.assert_allclose(w, ref["taps_weight"], atol=1e-6)


def test_vision_tower_matches_transformers(ref):
    model = _to_mlx(_hf_weights())
    n = sum(t * h * w for t, h, w in GRID)
    pixels = ref["pixels"]
    assert pixels.shape == (n, 3 * 2 * 4 * 4)
    out = model(mx.array(pixels), mx.array(GRID))
    assert out.shape == (n // 4, 24)
    assert rel_err(out, ref["pooler_output"]) < RTOL[mx.float32]


def test_vision_sanitize_is_idempotent():
    model = VisionModel(VisionConfig.from_dict(TINY))
    weights = _hf_weights()
    once = model.sanitize(weights)
    twice = model.sanitize(dict(once))
    assert once.keys() == twice.keys()
    for k in once:
        assert once[k].shape == twice[k].shape
        assert mx.array_equal(once[k], twice[k]).item()


def test_moe_vlm_matches_transformers():
    """qwen3_5_moe: a tiny random HF checkpoint (experts as transformers saves them) through our
    loader, logits with an image vs transformers'."""
    from qwen35_mlx.loader import load_model

    ref = np.load(DATA / "moe_vlm" / "reference.npz")
    model = load_model(DATA / "moe_vlm")
    out = model(
        mx.array(ref["input_ids"]),
        pixel_values=mx.array(ref["pixel_values"]),
        image_grid_thw=mx.array(ref["image_grid_thw"]),
    )
    ref = ref["logits"]
    assert np.abs(np.array(out) - ref).max() < 1e-4 * np.abs(ref).max()
