"""The vision-language model against transformers' reference on the golden tiny checkpoint
(`scripts/make_golden_vlm.py`): logits with images and with a video, prefill + decode, a later
turn bringing a new image, a left-padded batch, and M-RoPE positions from `get_rope_index`."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file

from qwen35_mlx.loader import load_model
from qwen35_mlx.models.vlm import Model, rope_index

GOLDEN = Path(__file__).parents[1] / "data" / "golden" / "vlm"
IMAGE, VIDEO = 261, 262


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(GOLDEN / "reference.npz"))


@pytest.fixture(scope="module")
def model() -> Model:
    return load_model(GOLDEN)


def assert_logits_close(out, expected):
    # Golden tolerance of issue 3: max abs error under 1e-4 of the logit scale.
    out = np.asarray(out, dtype=np.float64)
    assert out.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(out - expected).max() < 1e-4 * scale


def image_inputs(ref, key=""):
    return dict(
        pixel_values=mx.array(ref[f"{key}pixel_values"]),
        image_grid_thw=mx.array(ref[f"{key}image_grid_thw"]),
    )


def test_loads_as_vlm(model):
    assert isinstance(model, Model)
    assert model.layers is model.language_model.layers


def test_image_logits_match_reference(model, ref):
    out = model(mx.array(ref["input_ids"]), **image_inputs(ref))
    assert_logits_close(out, ref["logits"])


def test_video_logits_match_reference(model, ref):
    out = model(
        mx.array(ref["video_input_ids"]),
        pixel_values_videos=mx.array(ref["video_pixel_values"]),
        video_grid_thw=mx.array(ref["video_grid_thw"]),
    )
    assert_logits_close(out, ref["video_logits"])


def test_rope_index_matches_transformers(ref):
    kw = dict(image_token_id=IMAGE, video_token_id=VIDEO, spatial_merge_size=2)
    pos, delta = rope_index(ref["input_ids"], ref["image_grid_thw"], **kw)
    np.testing.assert_array_equal(pos, ref["position_ids"])
    np.testing.assert_array_equal(delta, ref["rope_deltas"][:, 0])
    pos, delta = rope_index(ref["video_input_ids"], None, ref["video_grid_thw"], **kw)
    np.testing.assert_array_equal(pos, ref["video_position_ids"])
    np.testing.assert_array_equal(delta, ref["video_rope_deltas"][:, 0])
    pos, delta = rope_index(
        ref["batch_input_ids"], ref["batch_image_grid_thw"], mask=ref["batch_attention_mask"], **kw
    )
    np.testing.assert_array_equal(pos, ref["batch_position_ids"])
    np.testing.assert_array_equal(delta, ref["batch_rope_deltas"][:, 0])


def test_prefill_then_decode_matches_full_forward(model, ref):
    ids = mx.array(ref["input_ids"])
    P = int(ref["prefill_len"])
    cache = model.make_cache()
    outs = [model(ids[:, :P], cache, **image_inputs(ref))]
    for i in range(P, ids.shape[1]):
        outs.append(model(ids[:, i : i + 1], cache))  # no pixels: offset + rope delta
    assert_logits_close(mx.concatenate(outs, axis=1), ref["logits"])


def test_later_turn_brings_a_new_image(model, ref):
    # Turn 1 holds image 0; turn 2 (same cache) holds image 1; then decode.
    ids = mx.array(ref["input_ids"])
    split = int(np.flatnonzero(ref["input_ids"][0] == IMAGE)[6]) - 3  # between the images
    P = int(ref["prefill_len"])
    pix, grid = ref["pixel_values"], ref["image_grid_thw"]
    cache = model.make_cache()
    outs = [model(ids[:, :split], cache, pixel_values=mx.array(pix[:24]), image_grid_thw=grid[:1])]
    outs.append(
        model(ids[:, split:P], cache, pixel_values=mx.array(pix[24:]), image_grid_thw=grid[1:])
    )
    outs.append(model(ids[:, P : P + 2], cache))
    assert_logits_close(mx.concatenate(outs, axis=1), ref["logits"][:, : P + 2])


def test_left_padded_batch_gives_unpadded_logits(model, ref):
    mask = ref["batch_attention_mask"].astype(bool)
    cache = model.make_cache(left_padding=(~mask).sum(1).tolist())
    out = np.array(model(mx.array(ref["batch_input_ids"]), cache, **image_inputs(ref, "batch_")))
    assert_logits_close(out[mask], ref["batch_logits"][mask])


def test_fresh_text_prompt_after_an_image_uses_plain_positions(model, ref):
    model(mx.array(ref["input_ids"]), **image_inputs(ref))  # leaves rope deltas behind
    ids = mx.array(ref["input_ids"][:, :5])
    cache = model.make_cache()
    out = mx.concatenate([model(ids[:, :4], cache), model(ids[:, 4:], cache)], axis=1)
    # Stale deltas would shift the decode step's positions away from the text model's.
    assert_logits_close(out, np.array(model.language_model(ids)))


def test_sanitize_is_idempotent(model):
    raw = {k: mx.array(v) for k, v in load_file(GOLDEN / "model.safetensors").items()}
    assert any(k.startswith("mtp.") for k in raw)
    once = model.sanitize(raw)
    twice = model.sanitize(dict(once))
    assert once.keys() == twice.keys()
    assert not any("mtp" in k for k in once)
    assert once["vision_tower.patch_embed.proj.weight"].shape == (32, 2, 16, 16, 3)
    for k in once:
        assert mx.array_equal(once[k], twice[k]).item(), k


def test_prefill_in_steps_from_input_embeddings(model, ref):
    # As mlx-lm's generate_step feeds a long prompt: embedding slices, no position_ids.
    ids = mx.array(ref["input_ids"])
    P = int(ref["prefill_len"])
    cache = model.make_cache()
    embeds, _ = model.get_input_embeddings(ids[:, :P], cache=cache, **image_inputs(ref))
    outs = [
        model(ids[:, a : a + 8], cache, input_embeddings=embeds[:, a : a + 8]) for a in (0, 8, 16)
    ]
    outs.append(model(ids[:, 24:P], cache, input_embeddings=embeds[:, 24:P]))
    outs += [model(ids[:, i : i + 1], cache) for i in range(P, P + 3)]
    assert_logits_close(mx.concatenate(outs, axis=1), ref["logits"][:, : P + 3])


def test_processor_batch_through_model_without_cache(model):
    from qwen35_mlx.loader import load

    model2, processor = load(GOLDEN)
    texts = ["<|vision_start|><|image_pad|><|vision_end|>hi", "a longer prompt <|image_pad|> here"]
    images = [GOLDEN / "image1.png", GOLDEN / "image0.png"]
    inputs = processor(texts, images=images)
    out = np.array(model2(**inputs))  # left-padded rows, no cache: pads must be masked
    mask = np.array(inputs["attention_mask"]).astype(bool)
    pix, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    rows = [slice(0, 8), slice(8, 32)]
    for b in range(2):
        alone = processor(texts[b], images=[images[b]])
        assert np.array_equal(np.array(alone["pixel_values"]), np.array(pix[rows[b]]))
        expected = np.array(model2(alone["input_ids"], **image_inputs(alone)))
        assert_logits_close(out[b][mask[b]][None], expected)
    assert np.array(grid).tolist() == [[1, 2, 4], [1, 4, 6]]


def test_left_padded_batch_decode_continues_each_row(model, ref):
    # Prefill all but the last two columns, then decode them: per-row offsets + rope deltas.
    mask = ref["batch_attention_mask"].astype(bool)
    ids = mx.array(ref["batch_input_ids"])
    cache = model.make_cache(left_padding=(~mask).sum(1).tolist())
    outs = [model(ids[:, :-2], cache, **image_inputs(ref, "batch_"))]
    T = ids.shape[1]
    outs += [model(ids[:, i : i + 1], cache) for i in (T - 2, T - 1)]
    out = np.array(mx.concatenate(outs, axis=1))
    assert_logits_close(out[mask], ref["batch_logits"][mask])


def test_mlx_format_round_trip(model, ref, tmp_path):
    from qwen35_mlx.convert import save_mlx
    from qwen35_mlx.loader import read_config

    save_mlx(model, read_config(GOLDEN), tmp_path / "mlx")
    again = load_model(tmp_path / "mlx")
    assert_logits_close(again(mx.array(ref["input_ids"]), **image_inputs(ref)), ref["logits"])


@pytest.mark.parametrize("step", [8, 2048])
def test_mlx_lm_generate_step_with_embed_inputs(model, ref, step):
    # mlx-lm's multimodal path: embed_inputs once, generate_step prefills the embeddings in
    # steps (no position_ids), then decodes from token ids. Step 2048 (mlx-lm's default): the
    # images fall in the first step, which meets a fresh cache.
    from mlx_lm.generate import generate_step

    P = int(ref["prefill_len"])
    ids = mx.array(ref["input_ids"][0, :P])
    pix = ref["pixel_values"]
    per_image = [mx.array(pix[:24].reshape(1, 4, 6, -1)), mx.array(pix[24:].reshape(1, 2, 4, -1))]
    emb = model.embed_inputs(ids, pixel_values=per_image)
    steps = generate_step(ids, model, input_embeddings=emb, max_tokens=3, prefill_step_size=step)
    tokens, logprobs = zip(*[(int(t), lp) for t, lp in steps], strict=True)
    expected = ref["logits"][0, P - 1]
    expected = expected - np.log(np.exp(expected - expected.max()).sum()) - expected.max()
    assert_logits_close(np.array(logprobs[0]), expected)
    # Greedy continuation equals our own prefill-with-pixels + decode.
    cache = model.make_cache()
    out = model(ids[None], cache, **image_inputs(ref))
    mine = []
    for _ in range(3):
        mine.append(int(out[0, -1].argmax()))
        out = model(mx.array([[mine[-1]]]), cache)
    assert list(tokens) == mine


def test_text_only_conversion_loads_without_the_tower(model, ref):
    # mlx-lm converts qwen3_5 checkpoints without the vision tower but keeps vision_config.
    raw = {k: mx.array(v) for k, v in load_file(GOLDEN / "model.safetensors").items()}
    text_only = {k: v for k, v in raw.items() if not k.startswith("model.visual.")}
    bare = Model(model.config)
    bare.load_weights(list(bare.sanitize(text_only).items()), strict=True)
    assert "vision_tower" not in bare
    ids = mx.array(ref["input_ids"][:, :9])
    np.testing.assert_array_equal(np.array(bare(ids)), np.array(model(ids)))
    with pytest.raises(ValueError, match="no vision tower"):
        bare(mx.array(ref["input_ids"]), **image_inputs(ref))
