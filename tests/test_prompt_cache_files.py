"""PromptCache.save / PromptCache.load (issue 15, items 7 and 8): a reloaded cache reuses as much
of the next chat turn as the live one, and a file of another model or a damaged file is refused
with one clear error naming it."""

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

import qwen35_mlx
from qwen35_mlx import generate, load, stream_generate
from qwen35_mlx.prompt_cache import TOKENS_KEY, PromptCache
from tests.conftest import RTOL, rel_err
from tests.models.factory import make_text_config, make_text_model

TINY = Path(qwen35_mlx.__file__).parent / "assets" / "tiny"
SYSTEM = "You are a helpful assistant who answers questions about Python. " * 4


@pytest.fixture(scope="module")
def tiny():
    return load(TINY)


def chat(tok, turns):
    msgs = [{"role": "system", "content": SYSTEM}]
    for user, answer in turns:
        msgs.append({"role": "user", "content": user})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
    return tok.apply_chat_template(msgs, add_generation_prompt=True)


def run(model, tok, prompt, **kw):
    rs = list(stream_generate(model, tok, prompt, **kw))
    return [r.token for r in rs], np.stack([np.array(r.logprobs) for r in rs])


def assert_same_run(a, b):
    """The same computation (a cache restored from a file against the live one): equal up to
    rounding noise."""
    assert a[0] == b[0]
    np.testing.assert_allclose(a[1], b[1], atol=1e-4)


def assert_same_as_cold(warm, cold, dtype):
    """A warm run (prefix from the cache) against a cold prefill of the whole prompt: other
    shapes, so on a GPU other kernels and summation orders; the tiny model is fp16 and its
    logprobs differed by one fp16 ulp (0.016 at 19) on an H200. Same tokens, logprobs within
    the dtype's tolerance from the conftest table."""
    assert warm[0] == cold[0]
    assert rel_err(warm[1], cold[1]) < RTOL[dtype]


def test_reloaded_prompt_cache_reuses_the_next_chat_turn_like_the_live_one(tiny, tmp_path):
    model, tok = tiny
    live = PromptCache.for_tokenizer(model, tok)
    turns = []
    p1 = chat(tok, [("What is a list?", None)])
    turns.append(("What is a list?", generate(model, tok, p1, max_tokens=24, prompt_cache=live)))
    file = tmp_path / "chat.safetensors"
    live.save(file)
    loaded = PromptCache.load(file, model)  # no tokenizer: the boundary tokens come from the file

    for question in ("And a tuple?", "How do I sort a dict?"):
        prompt = chat(tok, [*turns, (question, None)])
        # The re-rendered history drops the answer's <think> block: the live tokens are not a
        # prefix of the new prompt, so only a snapshot (the assistant turn's start) is reusable.
        assert live.tokens != prompt[: len(live.tokens)]
        warm_live = run(model, tok, prompt, max_tokens=12, prompt_cache=live)
        warm_loaded = run(model, tok, prompt, max_tokens=12, prompt_cache=loaded)
        assert loaded.last_reused == live.last_reused > len(p1) // 2
        assert_same_run(warm_loaded, warm_live)
        cold = run(model, tok, prompt, max_tokens=12)
        assert_same_as_cold(warm_loaded, cold, model.model.embed_tokens.weight.dtype)
        turns.append((question, tok.decode(warm_live[0])))
        loaded.save(file)  # the next turn starts from the file again
        loaded = PromptCache.load(file, model)


def test_save_load_keeps_tokens_snapshots_settings_and_metadata(tiny, tmp_path):
    model, tok = tiny
    pc = PromptCache.for_tokenizer(model, tok, max_snapshots=5)
    prompt = chat(tok, [("What is a list?", "A sequence."), ("And a tuple?", None)])
    generate(model, tok, prompt, max_tokens=4, prompt_cache=pc)
    file = tmp_path / "cache.bin"  # any name: the file is written exactly there
    pc.save(file, metadata={"model": "tiny"})
    assert os.listdir(tmp_path) == ["cache.bin"]  # no temporary file left behind
    back = PromptCache.load(file, model)
    assert back.tokens == pc.tokens
    assert [s[0] for s in back.snapshots] == [s[0] for s in pc.snapshots]
    assert len(back.snapshots) >= 3  # system turn, user turn, assistant turn, whole prompt
    assert back.boundary_tokens == pc.boundary_tokens and back.max_snapshots == 5
    assert back.metadata == {"model": "tiny"}
    for (_, a), (_, b) in zip(back.snapshots, pc.snapshots, strict=True):
        for x, y in zip(a, b, strict=True):
            assert (x is None) == (y is None)
            if x is not None:
                for (_, u), (_, v) in zip(tree_flatten(x), tree_flatten(y), strict=True):
                    assert (u is None and v is None) or np.array_equal(np.array(u), np.array(v))


def test_mlx_lm_reads_our_file_and_we_read_mlx_lms(tiny, tmp_path):
    model, tok = tiny
    pc = PromptCache.for_tokenizer(model, tok)
    prompt = chat(tok, [("What is a list?", None)])
    generate(model, tok, prompt, max_tokens=5, prompt_cache=pc)
    ours = tmp_path / "ours.safetensors"
    pc.save(ours)
    theirs_cache, meta = load_prompt_cache(str(ours), return_metadata=True)
    assert len(theirs_cache) == len(pc.cache) and json.loads(meta[TOKENS_KEY]) == pc.tokens
    for a, b in zip(theirs_cache, pc.cache, strict=True):
        # mlx-lm rebuilds classes by name: our LinearCache comes back as its plain ArraysCache.
        assert type(a).__name__ == type(b).__name__ and isinstance(b, type(a))
        for (_, u), (_, v) in zip(tree_flatten(a.state), tree_flatten(b.state), strict=True):
            assert (u is None and v is None) or np.array_equal(np.array(u), np.array(v))

    # A file written by mlx-lm with our token key: no snapshots, fingerprint or checksum.
    theirs = tmp_path / "theirs.safetensors"
    save_prompt_cache(str(theirs), pc.cache, {TOKENS_KEY: json.dumps(pc.tokens)})
    back = PromptCache.load(theirs, model)
    assert back.tokens == pc.tokens and back.snapshots == []
    nxt = pc.tokens + tok.encode(" More, please.", add_special_tokens=False)
    warm = run(model, tok, nxt, max_tokens=6, prompt_cache=back)
    assert back.last_reused == len(pc.tokens)
    assert_same_as_cold(
        warm, run(model, tok, nxt, max_tokens=6), model.model.embed_tokens.weight.dtype
    )


# Another model: same layer count, each differing in one thing the cache depends on.

LLLF = ["linear_attention"] * 3 + ["full_attention"]


def _saved_from(model, tmp_path, name="m.safetensors"):
    pc = PromptCache(model)
    pc.extend(list(range(3, 40)))
    pc.save(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    "other, what",
    [
        (lambda: make_text_model(make_text_config(num_key_value_heads=4)), "num_key_value_heads"),
        (lambda: make_text_model(make_text_config(linear_value_head_dim=16)), "linear_value_head"),
        (lambda: make_text_model(make_text_config(layer_types=LLLF)), "layer_types"),
        (lambda: make_text_model(seed=1), "weights"),
        (lambda: make_text_model(make_text_config(rms_norm_eps=1e-5)), "config"),
        (lambda: make_text_model().set_dtype(mx.bfloat16) or None, "weight_dtypes"),
    ],
    ids=["kv_heads", "linear_dims", "layer_types", "weights", "config", "dtype"],
)  # fmt: skip
def test_load_refuses_a_cache_of_another_model(tmp_path, other, what):
    file = _saved_from(make_text_model(), tmp_path)
    model = other()
    if model is None:  # set_dtype works in place and returns None
        model = make_text_model()
        model.set_dtype(mx.bfloat16)
    with pytest.raises(ValueError, match="another model") as err:
        PromptCache.load(file, model)
    assert str(file) in str(err.value) and what in str(err.value)
    assert PromptCache.load(file, make_text_model()).tokens == list(range(3, 40))


# Damaged files: each gives one ValueError naming the file, never a raw MLX RuntimeError.


def _damage(data: bytes, how: str) -> bytes:
    header = 8 + int.from_bytes(data[:8], "little")
    if how == "truncated":
        return data[: len(data) - 1000]
    if how == "header_cut":
        return data[: header // 2]
    if how == "empty":
        return b""
    if how == "zeroed_data":  # a block of real data (the KV buffers' unused tail is zeros)
        start = next(i for i in range(header, len(data)) if data[i])
        return data[:start] + bytes(256) + data[start + 256 :]
    if how == "zeroed_start":
        return bytes(64) + data[64:]
    if how == "one_bit":  # a flipped bit in the last array's data
        return data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]
    if how == "token_id_edited":  # same length, one digit of the token ids changed
        text = data[:header].decode("latin-1")
        i = text.index(TOKENS_KEY)
        j = i + text[i:].index("[") + 1
        digit = text[j]
        changed = text[:j] + ("4" if digit != "4" else "5") + text[j + 1 :]
        return changed.encode("latin-1") + data[header:]
    raise AssertionError(how)


DAMAGE = ["truncated", "header_cut", "empty", "zeroed_data", "zeroed_start", "one_bit"]


@pytest.mark.parametrize("how", [*DAMAGE, "token_id_edited"])
def test_load_refuses_a_damaged_file(tmp_path, how):
    model = make_text_model()
    file = _saved_from(model, tmp_path)
    file.write_bytes(_damage(file.read_bytes(), how))
    with pytest.raises(ValueError) as err:
        PromptCache.load(file, model)
    assert str(file) in str(err.value)


def test_load_names_a_missing_file_and_refuses_other_files(tmp_path):
    model = make_text_model()
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        PromptCache.load(tmp_path / "nope.safetensors", model)
    with pytest.raises(ValueError, match="folder"):
        PromptCache.load(tmp_path, model)
    weights = tmp_path / "model.safetensors"  # a safetensors file, but not a prompt cache
    mx.save_safetensors(str(weights), {"w": mx.ones((2, 2))}, {"format": "mlx"})
    with pytest.raises(ValueError, match="not a prompt-cache file"):
        PromptCache.load(weights, model)
    no_tokens = tmp_path / "mlx_lm.safetensors"  # mlx-lm's file without our token ids
    pc = PromptCache(model)
    pc.extend([5, 6, 7])
    save_prompt_cache(str(no_tokens), pc.cache)
    with pytest.raises(ValueError, match="no token ids"):
        PromptCache.load(no_tokens, model)
    # token ids that disagree with what the attention caches hold
    save_prompt_cache(str(no_tokens), pc.cache, {TOKENS_KEY: json.dumps([5, 6])})
    with pytest.raises(ValueError, match="holds 3 tokens"):
        PromptCache.load(no_tokens, model)


def test_a_failed_save_leaves_the_earlier_file_as_it_was(tmp_path, monkeypatch):
    model = make_text_model()
    file = _saved_from(model, tmp_path)
    before = file.read_bytes()
    pc = PromptCache(model)
    pc.extend(list(range(50, 90)))

    def fails_half_way(name, arrays, metadata=None):
        Path(name).write_bytes(b"partial")
        raise RuntimeError("[save_safetensors] disk full")

    monkeypatch.setattr(mx, "save_safetensors", fails_half_way)
    with pytest.raises(OSError, match="could not write") as err:
        pc.save(file)
    assert str(file) in str(err.value)
    monkeypatch.undo()
    assert file.read_bytes() == before and os.listdir(tmp_path) == [file.name]
    assert PromptCache.load(file, model).tokens == list(range(3, 40))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        pc.save(tmp_path / "missing" / "c.safetensors")
    with pytest.raises(ValueError, match="empty"):
        PromptCache(model).save(tmp_path / "empty.safetensors")


GOLDEN_VLM = Path(__file__).parent / "data" / "golden" / "vlm"
IMAGE = 261  # the golden VLM's image pad token


@pytest.fixture(scope="module")
def vlm():
    return load(GOLDEN_VLM)[0], dict(np.load(GOLDEN_VLM / "reference.npz"))


def assert_vlm_logits(out, expected):
    # The golden tolerance of tests/models/test_golden_vlm.py: 1e-4 of the logit scale.
    out = np.asarray(out, dtype=np.float64)
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() < 1e-4 * np.abs(expected).max()


def test_reloaded_vlm_cache_decodes_at_the_image_prompts_positions(vlm, tmp_path):
    # The M-RoPE shift an image leaves in the cache goes into the file: decoding from the
    # loaded cache gives the logits of the live conversation (transformers' reference).
    model, ref = vlm
    ids, P = ref["input_ids"], int(ref["prefill_len"])
    pc = PromptCache(model)
    pc.cache, pc.tokens = model.make_cache(), ids[0, :P].tolist()
    pix = dict(pixel_values=mx.array(ref["pixel_values"]), image_grid_thw=ref["image_grid_thw"])
    model(mx.array(ids[:, :P]), pc.cache, **pix)
    pc.save(tmp_path / "vlm.safetensors")
    back = PromptCache.load(tmp_path / "vlm.safetensors", model)
    assert back.tokens == pc.tokens
    for cache in (back.cache, pc.cache):
        outs = [model(mx.array(ids[:, i : i + 1]), cache) for i in range(P, P + 3)]
        assert_vlm_logits(mx.concatenate(outs, axis=1), ref["logits"][:, P : P + 3])


def test_vlm_snapshots_keep_the_shift_of_their_own_prefix(vlm, tmp_path):
    # Snapshot A before image 0, B after it (turn 2 brings image 1). Going back to A must drop
    # the images' M-RoPE shift, going back to B must keep image 0's: in this process and
    # after save and load.
    model, ref = vlm
    ids, P = ref["input_ids"], int(ref["prefill_len"])
    a = int(np.flatnonzero(ids[0] == IMAGE)[0]) - 2  # text only before it
    split = int(np.flatnonzero(ids[0] == IMAGE)[6]) - 3  # between the images
    pix, grid = ref["pixel_values"], ref["image_grid_thw"]
    images = {
        a: dict(pixel_values=mx.array(pix), image_grid_thw=grid),
        split: dict(pixel_values=mx.array(pix[24:]), image_grid_thw=grid[1:]),
    }
    pc = PromptCache(model)
    cache, _ = pc.fetch(ids[0, :a].tolist(), keep_last=False)
    model(mx.array(ids[:, :a]), cache)
    pc.snapshot(cache, ids[0, :a].tolist())
    model(
        mx.array(ids[:, a:split]), cache, pixel_values=mx.array(pix[:24]), image_grid_thw=grid[:1]
    )
    pc.snapshot(cache, ids[0, :split].tolist())
    model(mx.array(ids[:, split:P]), cache, **images[split])
    pc.commit(cache, ids[0, :P].tolist())
    pc.save(tmp_path / "vlm.safetensors")
    back = PromptCache.load(tmp_path / "vlm.safetensors", model)
    for p in (pc, back):
        for n in (a, split):
            # A prompt that departs from the live tokens right after the snapshot.
            cache, _ = p.fetch(ids[0, :n].tolist() + [0, 0])
            assert p.last_reused == n
            outs = [
                model(mx.array(ids[:, n:P]), cache, **images[n]),
                model(mx.array(ids[:, P : P + 2]), cache),
            ]
            assert_vlm_logits(mx.concatenate(outs, axis=1), ref["logits"][:, n : P + 2])
            p.commit(cache, ids[0, : P + 2].tolist())


def test_vlm_snapshot_inside_a_prompt_prefilled_in_steps(vlm, tmp_path):
    # An image prompt prefilled in embedding slices (as mlx-lm's generate_step does) with a
    # snapshot between slices, before the image: the snapshot's shift is that of its own prefix
    # (none yet), not the whole prompt's.
    model, ref = vlm
    ids, P = ref["input_ids"], int(ref["prefill_len"])
    a = int(np.flatnonzero(ids[0] == IMAGE)[0]) - 2
    pix = dict(pixel_values=mx.array(ref["pixel_values"]), image_grid_thw=ref["image_grid_thw"])
    pc = PromptCache(model)
    cache, _ = pc.fetch(ids[0, :P].tolist(), keep_last=False)
    embeds, _ = model.get_input_embeddings(mx.array(ids[:, :P]), cache=cache, **pix)
    model(mx.array(ids[:, :a]), cache, input_embeddings=embeds[:, :a])
    pc.snapshot(cache, ids[0, :a].tolist())
    model(mx.array(ids[:, a:P]), cache, input_embeddings=embeds[:, a:P])
    pc.commit(cache, ids[0, :P].tolist())
    pc.save(tmp_path / "vlm.safetensors")
    back = PromptCache.load(tmp_path / "vlm.safetensors", model)
    for p in (pc, back):
        cache, _ = p.fetch(ids[0, :a].tolist() + [0, 0])
        assert p.last_reused == a
        outs = [
            model(mx.array(ids[:, a:P]), cache, **pix),
            model(mx.array(ids[:, P : P + 2]), cache),
        ]
        assert_vlm_logits(mx.concatenate(outs, axis=1), ref["logits"][:, a : P + 2])
        p.commit(cache, ids[0, : P + 2].tolist())
