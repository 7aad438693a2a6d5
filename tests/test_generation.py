"""stream_generate / generate / batch_generate / PromptCache on the golden generation checkpoint
(tests/data/golden/generate, written by scripts/make_golden_generate.py with transformers)."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx import batch_generate, generate, load, stream_generate
from qwen35_mlx.prompt_cache import PromptCache
from tests.conftest import rel_err

GOLDEN = Path(__file__).parent / "data" / "golden" / "generate"


class Counting:
    """The model, counting the tokens each call runs (to check prefill sizes)."""

    def __init__(self, model):
        self.model = model
        self.calls: list[int] = []

    def __call__(self, inputs, cache=None, **kwargs):
        self.calls.append(inputs.shape[1])
        return self.model(inputs, cache=cache, **kwargs)

    def make_cache(self, **kwargs):
        return self.model.make_cache(**kwargs)


@pytest.fixture(scope="module")
def golden():
    return json.loads((GOLDEN / "golden.json").read_text())


@pytest.fixture(scope="module")
def loaded():
    return load(GOLDEN)


def tokens_of(model, tok, prompt, **kw):
    return [r.token for r in stream_generate(model, tok, prompt, **kw)]


def run(model, tok, prompt, **kw):
    """Tokens and their log-probabilities [n, V] (a stale state shows in these even when the
    greedy choices survive it)."""
    rs = list(stream_generate(model, tok, prompt, **kw))
    return [r.token for r in rs], np.stack([np.array(r.logprobs) for r in rs])


def assert_same_run(a, b):
    assert a[0] == b[0]
    np.testing.assert_allclose(a[1], b[1], atol=1e-4)


@pytest.mark.parametrize("case", ["chat", "raw"])
def test_stream_generate_matches_transformers(loaded, golden, case):
    model, tok = loaded
    ref = golden[case]
    responses = list(stream_generate(model, tok, ref["prompt_ids"], max_tokens=len(ref["tokens"])))
    assert [r.token for r in responses] == ref["tokens"]
    assert "".join(r.text for r in responses) == ref["text"]
    assert responses[-1].finish_reason == "length"
    assert all(r.finish_reason is None for r in responses[:-1])
    assert responses[-1].prompt_tokens == len(ref["prompt_ids"])
    assert responses[-1].generation_tokens == len(ref["tokens"])
    # A string prompt tokenizes to the same ids.
    assert tokens_of(model, tok, ref["prompt"], max_tokens=6) == ref["tokens"][:6]


def test_generate_equals_stream_text(loaded, golden):
    model, tok = loaded
    prompt = golden["raw"]["prompt"]
    text = generate(model, tok, prompt, max_tokens=10)
    assert text == "".join(r.text for r in stream_generate(model, tok, prompt, max_tokens=10))
    assert text == tok.decode(golden["raw"]["tokens"][:10])


def test_logprobs_are_normalised_and_greedy_picks_argmax(loaded, golden):
    model, tok = loaded
    for r in stream_generate(model, tok, golden["chat"]["prompt_ids"], max_tokens=4):
        assert r.logprobs.shape == (model.config.vocab_size,)
        assert abs(mx.logsumexp(r.logprobs).item()) < 1e-4
        assert r.token == mx.argmax(r.logprobs).item()


def test_prefill_step_size_same_tokens_bounded_steps(loaded, golden):
    model, tok = loaded
    ids = golden["chat"]["prompt_ids"]
    one_shot = run(model, tok, ids, max_tokens=8)
    counting = Counting(model)
    stepped = run(counting, tok, ids, max_tokens=8, prefill_step_size=7)
    assert_same_run(stepped, one_shot)
    assert one_shot[0] == golden["chat"]["tokens"][:8]
    prefill_calls = counting.calls[: -(8 - 1) - 1]  # minus the last prompt token and 7 decode steps
    assert max(prefill_calls) == 7 and sum(prefill_calls) == len(ids) - 1


def test_sampling_is_seeded(loaded, golden):
    model, tok = loaded
    ids = golden["raw"]["prompt_ids"]
    runs = []
    for _ in range(2):
        mx.random.seed(7)
        runs.append(tokens_of(model, tok, ids, max_tokens=12, temp=1.5, top_p=0.95))
    assert runs[0] == runs[1]
    assert runs[0] != golden["raw"]["tokens"][:12]  # temperature 1.5 departs from greedy


def test_batch_generate_rows_equal_solo(loaded, golden):
    model, tok = loaded
    rng = np.random.default_rng(0)
    long_ids = rng.integers(10, 300, size=150).tolist()
    prompts = [golden["chat"]["prompt_ids"], [42], golden["raw"]["prompt"], long_ids]
    limits = [10, 3, 8, 6]
    solo = [tokens_of(model, tok, p, max_tokens=m) for p, m in zip(prompts, limits, strict=True)]
    res = batch_generate(model, tok, prompts, max_tokens=limits, prefill_step_size=16)
    assert res.tokens == solo
    assert res.finish_reasons == ["length"] * 4
    assert res.texts[2] == tok.decode(solo[2])


def test_batch_generate_rows_stop_independently(loaded, golden):
    model, tok = loaded
    prompts = [golden["chat"]["prompt_ids"], golden["raw"]["prompt_ids"]]
    stop_token = golden["chat"]["tokens"][3]  # row 0 ends on it at step 4
    old = set(tok.eos_token_ids)
    tok.eos_token_ids = old | {stop_token}
    try:
        solo = [tokens_of(model, tok, p, max_tokens=12) for p in prompts]
        res = batch_generate(model, tok, prompts, max_tokens=12)
    finally:
        tok.eos_token_ids = old
    assert res.tokens == solo
    assert res.tokens[0] == golden["chat"]["tokens"][:4]
    assert res.finish_reasons[0] == "stop"
    assert len(res.tokens[1]) > 4


def test_errors(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, [], max_tokens=3)
    with pytest.raises(ValueError, match="max_tokens"):
        generate(model, tok, "hi", max_tokens=0)


def chat(tok, turns):
    msgs = [{"role": "system", "content": "You are a helpful assistant."}]
    for user, answer in turns:
        msgs.append({"role": "user", "content": user})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
    return tok.apply_chat_template(msgs, add_generation_prompt=True)


def test_prompt_cache_second_turn_prefills_only_new_suffix(loaded):
    model, tok = loaded
    counting = Counting(model)
    pc = PromptCache.for_tokenizer(counting, tok)
    p1 = chat(tok, [("Write a line about the sea.", None)])
    answer = generate(counting, tok, p1, max_tokens=6, prompt_cache=pc)
    assert pc.last_reused == 0 and pc.last_prefilled == len(p1)

    # Turn 2: the re-rendered history drops "<think>\n" from the answer, so the reusable prefix
    # ends where the assistant turn starts (a snapshot before its <|im_start|>).
    p2 = chat(tok, [("Write a line about the sea.", answer), ("And the sky?", None)])
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    turn_start = max(i for i, t in enumerate(p1) if t == im_start)
    shared = next(i for i, (a, b) in enumerate(zip(p1, p2, strict=False)) if a != b)
    assert turn_start < shared < len(p1)  # the prompts part inside the assistant turn
    counting.calls.clear()
    warm = run(counting, tok, p2, max_tokens=8, prompt_cache=pc)
    assert pc.last_reused == turn_start
    assert sum(counting.calls) == len(p2) - turn_start + 8 - 1  # suffix + decode steps
    assert_same_run(warm, run(model, tok, p2, max_tokens=8))

    # Turn 3 continues the live cache token for token: only the new tokens run.
    p3 = pc.tokens + tok.encode(" Tell me more.", add_special_tokens=False)
    n_new = len(p3) - len(pc.tokens)
    counting.calls.clear()
    warm = run(counting, tok, p3, max_tokens=5, prompt_cache=pc)
    assert pc.last_prefilled == n_new and sum(counting.calls) == n_new + 5 - 1
    assert_same_run(warm, run(model, tok, p3, max_tokens=5))

    # A prompt sharing only the system turn restores the snapshot taken at its end.
    p4 = chat(tok, [("Something else entirely.", None)])
    system_end = p1.index(im_start, 1)
    warm = run(model, tok, p4, max_tokens=5, prompt_cache=pc)
    assert pc.last_reused == system_end
    assert_same_run(warm, run(model, tok, p4, max_tokens=5))


def test_prompt_cache_save_load(loaded, golden, tmp_path):
    model, tok = loaded
    pc = PromptCache.for_tokenizer(model, tok)
    ids = golden["raw"]["prompt_ids"]
    first = tokens_of(model, tok, ids, max_tokens=5, prompt_cache=pc)
    file = tmp_path / "cache.safetensors"
    pc.save(file)
    restored = PromptCache.load(file, model)
    assert restored.tokens == pc.tokens == ids + first[:-1]
    nxt = restored.tokens + [first[-1]] + tok.encode(" again", add_special_tokens=False)
    warm = run(model, tok, nxt, max_tokens=6, prompt_cache=restored)
    assert restored.last_reused == len(pc.tokens)
    assert_same_run(warm, run(model, tok, nxt, max_tokens=6))


def test_stream_generate_with_image_equals_full_recompute():
    # Greedy decoding that recomputes the whole sequence (no cache) each step is the reference
    # for prefill in steps + cached decode with M-RoPE positions continuing after the image.
    vlm_dir = GOLDEN.parent / "vlm"
    model, processor = load(vlm_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    image = vlm_dir / "image0.png"
    inputs = processor(prompt, images=[image])
    ids = inputs["input_ids"]
    ref = []
    for _ in range(6):
        logits = model(
            ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        )
        ref.append(mx.argmax(logits[0, -1]).item())
        ids = mx.concatenate([ids, mx.array([[ref[-1]]])], axis=1)
    for step in (2048, 5):
        got = tokens_of(
            model, processor, prompt, images=[image], max_tokens=6, prefill_step_size=step
        )
        assert got == ref[: len(got)] and len(got) >= 3


def test_prefill_in_steps_bounds_peak_memory():
    from qwen35_mlx.loader import build_model
    from qwen35_mlx.models.config import ModelConfig

    cfg = json.loads((GOLDEN / "config.json").read_text())
    cfg.update(vocab_size=8192, hidden_size=128, intermediate_size=256)
    model = build_model(ModelConfig.from_dict(cfg))
    mx.eval(model.parameters())
    _, tok = load(GOLDEN)
    ids = np.random.default_rng(0).integers(0, 300, 2048).tolist()

    def peak(step):
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        out = tokens_of(model, tok, ids, max_tokens=2, prefill_step_size=step)
        return mx.get_peak_memory() - base, out

    one_shot, a = peak(2048)
    stepped, b = peak(128)
    assert a == b
    assert stepped * 3 < one_shot, (stepped, one_shot)


@pytest.mark.parametrize(
    "ahead, split, form",
    [(0, False, "queue"), (1, False, "queue"), (2, False, "queue"), (4, False, "queue")]
    + [(0, True, "queue"), (1, True, "queue"), (1, False, "drain"), (1, True, "drain")]
    + [(1, False, "streams"), (2, False, "streams"), (1, True, "streams")],
)
def test_prefill_queues_layers_one_ahead_same_result(loaded, monkeypatch, ahead, split, form):
    # Issue 9: on a GPU a long call submits its layers one at a time (text.queue_layers), the
    # host a bounded number of layers ahead, so that not every layer's intermediates are
    # alive at once. Here (CPU) it is forced on: it must submit each layer and change nothing,
    # at any depth (text.QUEUE_AHEAD: the host waits for layer i - ahead once it submitted
    # layer i; 0: for each layer before the next), whole or in two parts (text.SPLIT_LAYERS:
    # the mixer submitted before the MLP is built), queued ahead, drained before each submit
    # (text.DRAIN_LAYERS: no waits for queued layers, a device drain per part instead), or
    # queued over ahead + 1 streams of their own (text.QUEUE_STREAMS: before layer i the host
    # drains layer i's stream, the one layer i - ahead - 1 ran on, and no other wait).
    from qwen35_mlx.models import text

    monkeypatch.setattr(text, "QUEUE_AHEAD", ahead)
    monkeypatch.setattr(text, "SPLIT_LAYERS", split)
    monkeypatch.setattr(text, "DRAIN_LAYERS", form == "drain")
    monkeypatch.setattr(text, "QUEUE_STREAMS", form == "streams")

    model, _ = loaded
    ids = mx.array(np.random.default_rng(2).integers(0, 300, (2, 300)))

    def run():
        cache = model.make_cache()
        logits = model(ids, cache=cache)
        mx.eval(logits, [c.state for c in cache])
        return logits, cache

    plain, plain_cache = run()
    submitted = []
    async_eval = mx.async_eval
    monkeypatch.setattr(text, "queue_layers", lambda T: T >= 256)
    waited, drained = [], []
    evaluate, synchronize = mx.eval, mx.synchronize
    monkeypatch.setattr(mx, "async_eval", lambda *a: submitted.append(1) or async_eval(*a))
    monkeypatch.setattr(mx, "eval", lambda *a: waited.append(1) or evaluate(*a))
    monkeypatch.setattr(mx, "synchronize", lambda *a: drained.append(a) or synchronize(*a))
    queued, queued_cache = run()
    monkeypatch.setattr(mx, "eval", evaluate)
    n = len(model.layers)
    assert len(submitted) == n * (2 if split else 1)
    if form == "drain":  # a drain before every submit, no other wait but run()'s own eval
        assert (len(drained), len(waited)) == (len(submitted), 1)
        assert all(a == () for a in drained)  # the device's default stream
    elif form == "streams":  # each layer's stream drained before it, nothing else waited for
        assert (len(drained), len(waited)) == (n, 1)
        streams = text._queue_streams(ahead + 1)
        assert [a for (a,) in drained] == [streams[i % (ahead + 1)] for i in range(n)]
        own = [*streams, mx.default_stream(mx.default_device())]
        assert all(a != b for i, a in enumerate(own) for b in own[i + 1 :])
    else:  # one wait per layer once `ahead` are queued, plus run()'s own eval
        assert (len(drained), len(waited)) == (0, n - ahead + 1)
    assert mx.array_equal(plain, queued).item()
    from mlx.utils import tree_flatten

    for a, b in zip(plain_cache, queued_cache, strict=True):
        for (_, x), (_, y) in zip(tree_flatten(a.state), tree_flatten(b.state), strict=True):
            assert (x is None and y is None) or mx.array_equal(x, y).item()


@pytest.mark.parametrize("when", ["step", "end"])
def test_prefill_clears_the_buffer_cache_per_step_or_at_the_end(loaded, monkeypatch, when):
    # Issue 9: generation.PREFILL_CLEAR_CACHE "end" keeps MLX's buffer cache through the prompt
    # (a step reuses the last step's buffers) and empties it once: same cache state as "step".
    from qwen35_mlx import generation

    model, _ = loaded
    ids = np.random.default_rng(3).integers(0, 300, 700).tolist()

    def run():
        cache = model.make_cache()
        generation.prefill(model, cache, ids, prefill_step_size=128)
        mx.eval([c.state for c in cache])
        return cache

    monkeypatch.setattr(generation, "PREFILL_CLEAR_CACHE", "step" if when == "end" else "end")
    ref = run()
    calls = []
    clear = mx.clear_cache
    monkeypatch.setattr(generation, "PREFILL_CLEAR_CACHE", when)
    monkeypatch.setattr(mx, "clear_cache", lambda: calls.append(1) or clear())
    got = run()
    assert len(calls) == (6 if when == "step" else 1)  # 700 tokens in steps of 128
    from mlx.utils import tree_flatten

    for a, b in zip(ref, got, strict=True):
        for (_, x), (_, y) in zip(tree_flatten(a.state), tree_flatten(b.state), strict=True):
            assert (x is None and y is None) or mx.array_equal(x, y).item()


def test_prefill_reserves_the_kv_cache_once(loaded):
    # Issue 9: mlx-lm's KVCache grows by each step, copying the whole cache while the old copy
    # is alive. prefill() reserves room for the whole prompt after its first step: the later
    # steps write in place (same buffer size throughout) and the result is unchanged.
    from qwen35_mlx.generation import prefill
    from qwen35_mlx.models.cache import KVCache

    model, _ = loaded
    ids = np.random.default_rng(1).integers(0, 300, 700).tolist()
    cache = model.make_cache()
    sizes = []

    def seen(done, total):
        sizes.append({c.keys.shape[2] for c in cache if isinstance(c, KVCache)})

    prefill(model, cache, ids, prefill_step_size=128, progress=seen)
    assert sizes[0] == sizes[-1] and len(sizes[0]) == 1 and min(sizes[0]) >= 700, sizes
    ref = model.make_cache()
    model(mx.array(ids)[None], cache=ref)
    for c, r in zip(cache, ref, strict=True):
        if isinstance(c, KVCache):
            assert c.offset == r.offset == 700
            assert rel_err(c.state[0], r.state[0]) < 1e-5
    x = mx.array([[5]])
    assert rel_err(model(x, cache=cache), model(x, cache=ref)) < 1e-5


def test_prompt_cache_starts_cold_after_a_failed_prefill(loaded, golden):
    model, tok = loaded

    class Failing(Counting):
        def __call__(self, inputs, cache=None, **kwargs):
            super().__call__(inputs, cache=cache, **kwargs)  # the cache advances, then it fails
            raise RuntimeError("interrupted")

    pc = PromptCache.for_tokenizer(model, tok)
    ids = golden["raw"]["prompt_ids"]
    generate(model, tok, ids, max_tokens=3, prompt_cache=pc)
    longer = pc.tokens + [5, 6, 7, 8]
    with pytest.raises(RuntimeError):
        generate(Failing(model), tok, longer, max_tokens=3, prompt_cache=pc, prefill_step_size=1)
    assert len(pc) == 0
    warm = run(model, tok, longer, max_tokens=5, prompt_cache=pc)
    assert pc.last_reused == 0
    assert_same_run(warm, run(model, tok, longer, max_tokens=5))


@pytest.mark.parametrize("case", ["dense_tied", "moe_fused"])
def test_batch_generate_rows_equal_solo_other_stacks(loaded, case):
    # dense_tied: irregular stack L F L L; moe_fused: sparse MoE layers (token ids < 256 decode
    # with the generation checkpoint's tokenizer).
    from qwen35_mlx.loader import load_model

    _, tok = loaded
    model = load_model(GOLDEN.parent / case)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 250, n).tolist() for n in (70, 1, 9, 33)]
    solo = [tokens_of(model, tok, p, max_tokens=8) for p in prompts]
    assert batch_generate(model, tok, prompts, max_tokens=8, prefill_step_size=16).tokens == solo


def test_prompt_cache_warmed_with_a_system_prompt_and_saved(loaded, tmp_path):
    model, tok = loaded
    system = tok.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."}], tokenize=True
    )
    pc = PromptCache.for_tokenizer(model, tok)
    pc.extend(system, prefill_step_size=5)
    assert pc.tokens == system and pc.last_prefilled == len(system)
    pc.save(tmp_path / "system.safetensors")

    for question in ("Write a line about the sea.", "Name a colour."):
        restored = PromptCache.load(tmp_path / "system.safetensors", model)
        prompt = chat(tok, [(question, None)])
        assert prompt[: len(system)] == system
        counting = Counting(model)
        warm = run(counting, tok, prompt, max_tokens=5, prompt_cache=restored)
        assert restored.last_reused == len(system)
        assert sum(counting.calls) == len(prompt) - len(system) + 5 - 1
        assert_same_run(warm, run(model, tok, prompt, max_tokens=5))
