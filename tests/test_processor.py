"""The VLM processor: the checkpoint's own image settings, placeholder expansion, clear errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qwen35_mlx.processor import load_processor

GOLDEN = Path(__file__).parent / "data" / "golden" / "vlm"
IMAGE_PAD = 261


@pytest.fixture(scope="module")
def processor():
    return load_processor(GOLDEN)


def test_tokenizer_is_mlx_lm_wrapper(processor):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    assert isinstance(processor.tokenizer, TokenizerWrapper)
    assert processor.tokenizer.eos_token_ids == {258}


def test_image_placeholder_expansion(processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    out = processor(prompt, images=[GOLDEN / "image0.png"])
    ids = np.array(out["input_ids"])
    # 64x96 pixels -> 4x6 patches of 16 -> 2x3 merged rows -> 6 pad tokens, in one run.
    assert np.array(out["image_grid_thw"]).tolist() == [[1, 4, 6]]
    assert (ids == IMAGE_PAD).sum() == 6
    run = np.flatnonzero(ids[0] == IMAGE_PAD)
    assert (np.diff(run) == 1).all()
    assert ids[0, run[0] - 1] == 259 and ids[0, run[-1] + 1] == 260
    # Same pixels as transformers' image processor gave the golden reference.
    ref = np.load(GOLDEN / "reference.npz")
    np.testing.assert_array_equal(np.array(out["pixel_values"]), ref["pixel_values"][:24])


def test_batch_left_padding_and_image_order(processor):
    texts = ["a <|image_pad|> b", "longer text <|image_pad|> then more"]
    out = processor(texts, images=[GOLDEN / "image1.png", GOLDEN / "image0.png"])
    ids, mask = np.array(out["input_ids"]), np.array(out["attention_mask"])
    assert np.array(out["image_grid_thw"]).tolist() == [[1, 2, 4], [1, 4, 6]]
    assert (ids[0] == IMAGE_PAD).sum() == 2 and (ids[1] == IMAGE_PAD).sum() == 6
    assert mask[1].all() and not mask[0, 0] and mask[0, -1]
    assert (ids[0][mask[0] == 0] == processor.tokenizer.pad_token_id).all()


def test_checkpoint_pixel_range_is_used(tmp_path):
    for f in GOLDEN.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("config.json", "chat_template.jinja"):
            shutil.copy(f, tmp_path / f.name)
    pre = json.loads((GOLDEN / "preprocessor_config.json").read_text())
    pre["size"] = {"shortest_edge": 1024, "longest_edge": 2048}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    out = load_processor(tmp_path)("<|image_pad|>", images=[GOLDEN / "image0.png"])
    # 64x96 exceeds 2048 pixels: scaled down to 32x32 -> 2x2 patches -> 1 token.
    assert np.array(out["image_grid_thw"]).tolist() == [[1, 2, 2]]
    assert np.array(out["input_ids"]).tolist() == [[IMAGE_PAD]]


def test_unreadable_image_names_the_file(processor, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png"):
        processor("<|image_pad|>", images=[bad])
    with pytest.raises(ValueError, match="missing.jpg"):
        processor("<|image_pad|>", images=[tmp_path / "missing.jpg"])


def test_placeholder_count_mismatch(processor):
    with pytest.raises(ValueError, match="placeholder"):
        processor("no placeholder here", images=[GOLDEN / "image0.png"])
    with pytest.raises(ValueError, match="no images"):
        processor("<|image_pad|>")


def test_mlx_lm_inputs_carry_the_grid_in_the_shape(processor):
    text, pixel_values = processor.mlx_lm_inputs(
        "x <|image_pad|> y <|image_pad|>", images=[GOLDEN / "image0.png", GOLDEN / "image1.png"]
    )
    assert [tuple(p.shape) for p in pixel_values] == [(1, 4, 6, 1536), (1, 2, 4, 1536)]
    assert text.count("<|image_pad|>") == 8
    ref = np.load(GOLDEN / "reference.npz")["pixel_values"]
    rows = np.concatenate([np.array(p).reshape(-1, 1536) for p in pixel_values])
    np.testing.assert_array_equal(rows, ref)
