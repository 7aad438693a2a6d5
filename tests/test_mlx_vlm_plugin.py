"""mlx-vlm's generation on qwen35_mlx's vision-language model via `qwen35_mlx.mlx_vlm_plugin`
(skipped when mlx-vlm, an optional extra, is not installed)."""

import itertools
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

pytest.importorskip("mlx_vlm")

from mlx_vlm import load as vlm_load  # noqa: E402
from mlx_vlm.generate import generate_step  # noqa: E402
from mlx_vlm.prompt_utils import apply_chat_template  # noqa: E402
from mlx_vlm.utils import prepare_inputs  # noqa: E402

from qwen35_mlx import load, mlx_vlm_plugin, stream_generate  # noqa: E402
from qwen35_mlx.loader import load_model  # noqa: E402
from qwen35_mlx.models.vlm import Model as OurVLM  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "golden" / "vlm"
N = 10


@pytest.fixture(scope="module")
def registered():
    mlx_vlm_plugin.register()
    yield
    mlx_vlm_plugin.unregister()


def test_mlx_vlm_generate_step_same_tokens_as_ours(registered):
    model, processor = vlm_load(str(GOLDEN))
    assert isinstance(model, mlx_vlm_plugin.VisionLanguageModel) and isinstance(model, OurVLM)
    prompt = apply_chat_template(processor, model.config, "Describe this.", num_images=1)
    image = str(GOLDEN / "image0.png")
    inputs = prepare_inputs(processor, images=[image], prompts=prompt)
    extra = {
        k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")
    }
    steps = generate_step(
        inputs["input_ids"], model, inputs["pixel_values"], inputs["attention_mask"],
        max_tokens=N, temperature=0.0, **extra,
    )  # fmt: skip
    theirs = [tok for tok, _ in itertools.islice(steps, N)]

    ours_model, ours_processor = load(GOLDEN)
    ours_inputs = ours_processor(prompt, images=[image])
    assert ours_inputs["input_ids"].tolist() == inputs["input_ids"].tolist()
    ours = [
        r.token
        for r in stream_generate(ours_model, ours_processor, prompt, images=[image], max_tokens=N)
    ]
    assert len(ours) >= 4 and theirs[: len(ours)] == ours


def test_unregister_restores_mlx_vlm(registered):
    import mlx_vlm.utils as utils

    mlx_vlm_plugin.unregister()
    try:
        assert not mlx_vlm_plugin.is_registered()
        assert utils.get_model_and_args({"model_type": "qwen3_5"})[1] == "qwen3_5"
    finally:
        mlx_vlm_plugin.register()
    assert utils.get_model_and_args({"model_type": "qwen3_5_text"})[1] == "qwen35_mlx"


def test_mlx_vlm_stream_generate_with_image(registered):
    from mlx_lm.sample_utils import make_logits_processors
    from mlx_vlm import stream_generate as vlm_stream_generate

    model, processor = vlm_load(str(GOLDEN))
    prompt = apply_chat_template(processor, model.config, "Describe this.", num_images=1)
    image = str(GOLDEN / "image0.png")
    # The golden model's vocabulary is wider than its tokenizer: keep sampling to real tokens,
    # so mlx-vlm's detokenizer can follow.
    vocab = model.config.text_config.vocab_size
    bias = {i: -1e9 for i in range(len(processor.tokenizer), vocab)}
    theirs = [
        r.token
        for r in vlm_stream_generate(
            model, processor, prompt, image=[image], max_tokens=N, temperature=0.0, logit_bias=bias
        )
    ]
    ours_model, ours_processor = load(GOLDEN)
    ours = [
        r.token
        for r in stream_generate(
            ours_model, ours_processor, prompt, images=[image], max_tokens=N,
            logits_processors=make_logits_processors(logit_bias=bias),
        )
    ]  # fmt: skip
    assert len(ours) >= 4 and theirs[: len(ours)] == ours


def _greedy(model, inputs):
    extra = {
        k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")
    }
    steps = generate_step(
        inputs["input_ids"], model, inputs.get("pixel_values"), inputs.get("attention_mask"),
        max_tokens=N, temperature=0.0, **extra,
    )  # fmt: skip
    return [tok for tok, _ in itertools.islice(steps, N)]


def test_text_prompt_after_image_prompt_equals_fresh(registered):
    """A text-only prompt must not inherit the M-RoPE positions of an earlier image prompt."""
    model, processor = vlm_load(str(GOLDEN))
    text = apply_chat_template(processor, model.config, "Say something.", num_images=0)
    fresh = _greedy(model, prepare_inputs(processor, prompts=text))
    image_prompt = apply_chat_template(processor, model.config, "Describe this.", num_images=1)
    _greedy(
        model, prepare_inputs(processor, images=[str(GOLDEN / "image0.png")], prompts=image_prompt)
    )
    assert _greedy(model, prepare_inputs(processor, prompts=text)) == fresh


def test_sanitize_skips_own_quantized_names(registered):
    """Our own names, plus quantization's scales/biases, are not sanitized again."""
    model, _ = vlm_load(str(GOLDEN))
    from mlx.utils import tree_flatten

    own = dict(tree_flatten(model.parameters()))
    name = next(k for k in own if k.endswith("mlp.down_proj.weight"))
    quantized = dict(own, **{name[: -len("weight")] + "scales": own[name]})
    again = model.sanitize(quantized)
    assert sorted(again) == sorted(quantized)
    assert all(again[k] is v or mx.array_equal(again[k], v).item() for k, v in quantized.items())


def test_outputs_are_mlx_vlm_language_model_output(registered):
    """mlx-vlm's own output class, so the fields its speculative decoding reads exist."""
    from mlx_vlm.models.base import LanguageModelOutput

    model, _ = vlm_load(str(GOLDEN))
    ids = mx.array([[1, 5, 9]])
    for out in (model(ids), model.language_model(ids)):
        assert isinstance(out, LanguageModelOutput)
        assert out.logits.shape == (1, 3, model.config.text_config.vocab_size)
        assert out.gdn_states is None and out.shared_kv_states is None


def test_mlx_vlm_quantize_model_uses_our_quant_predicate(registered):
    """mlx-vlm's converter quantizes with the model's predicate: routers and the shared-expert
    gate at 8 bits (groups of 32 where 64 does not divide), the vision tower left alone."""
    from mlx.utils import tree_flatten
    from mlx_vlm.quant_utils import quantize_model

    moe = json.loads((GOLDEN.parent / "moe_per_expert" / "config.json").read_text())
    model = mlx_vlm_plugin.Model(mlx_vlm_plugin.ModelConfig.from_dict(moe))
    _, config = quantize_model(model, {}, 32, 4)
    gates = {k: v for k, v in config["quantization"].items() if k.endswith("gate")}
    assert len(gates) == 8 and {v["bits"] for v in gates.values()} == {8}
    layer = model.model.layers[0].mlp
    assert layer.gate.bits == 8 and layer.shared_expert_gate.bits == 8
    assert layer.experts.gate_proj.bits == 4

    vlm_config = json.loads((GOLDEN / "config.json").read_text())
    vlm = mlx_vlm_plugin.Model(mlx_vlm_plugin.ModelConfig.from_dict(vlm_config))
    predicate = vlm.quant_predicate
    names = [n for n, m in vlm.named_modules() if isinstance(m, nn.Linear)]
    vision = [n for n in names if n.startswith("vision_tower.")]
    assert vision and not any(predicate(n, vlm) for n in vision)
    quantize_model(vlm, {}, 32, 4)
    params = dict(tree_flatten(vlm.parameters()))
    assert not any(k.startswith("vision_tower") and k.endswith("scales") for k in params)
    assert any(k.startswith("language_model") and k.endswith("scales") for k in params)


def _image_prompt_inputs(processor, config):
    prompt = apply_chat_template(processor, config, "Describe this.", num_images=1)
    return prepare_inputs(processor, images=[str(GOLDEN / "image0.png")], prompts=prompt)


def _mlx_vlm_prefill(model, inputs) -> mx.array:
    """Logits of an image prompt fed as mlx-vlm feeds it: get_input_embeddings, then
    language_model on the embeddings with a fresh cache."""
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values")}
    extra["mask"] = extra.pop("attention_mask")
    emb = model.get_input_embeddings(inputs["input_ids"], inputs["pixel_values"], **extra)
    cache = model.language_model.make_cache()
    out = model.language_model(inputs["input_ids"], inputs_embeds=emb.inputs_embeds, cache=cache)
    return out.logits


def test_mlx_vlm_image_prefill_equals_ours(registered):
    """mlx-vlm's protocol gives the image prompt its M-RoPE positions: the logits are ours."""
    model, processor = vlm_load(str(GOLDEN))
    inputs = _image_prompt_inputs(processor, model.config)
    theirs = _mlx_vlm_prefill(model, inputs)
    ours_model, _ = load(GOLDEN)
    ours = ours_model(
        inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
    )
    assert mx.array_equal(theirs, ours).item(), mx.abs(theirs - ours).max().item()


def test_checkpoint_saved_by_mlx_vlm_loads_in_both(registered, tmp_path):
    """mlx-vlm's converter, through the plugin, writes our names (4-bit language model, vision
    tower left alone): mlx-vlm and our loader load it back to the same logits."""
    from mlx.utils import tree_flatten
    from mlx_vlm.convert import convert

    out = tmp_path / "q4"
    convert(str(GOLDEN), str(out), quantize=True, q_group_size=32, q_bits=4)
    saved = mx.load(str(out / "model.safetensors"))
    theirs, processor = vlm_load(str(out))
    names = {k for k, _ in tree_flatten(theirs.parameters())}
    assert set(saved) == names
    assert not any(k.startswith("model.") for k in names)
    assert any(k.startswith("language_model.") and k.endswith(".scales") for k in names)
    ours = load_model(out)  # weights: the processor files are mlx-vlm's
    assert {k for k, _ in tree_flatten(ours.parameters())} == names
    inputs = _image_prompt_inputs(processor, theirs.config)
    ours_logits = ours(
        inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
    )
    assert mx.array_equal(_mlx_vlm_prefill(theirs, inputs), ours_logits).item()
