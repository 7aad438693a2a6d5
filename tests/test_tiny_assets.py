"""The tiny model shipped in src/qwen35_mlx/assets/tiny (trained by examples/train_tiny.py)."""

import importlib.util
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import qwen35_mlx
from qwen35_mlx.loader import load
from qwen35_mlx.models.config import ModelConfig

from .conftest import MODEL_LOGIT_BAR, RTOL, rel_err

TINY = Path(qwen35_mlx.__file__).parent / "assets" / "tiny"
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_tiny.py"
# transformers' float32 logits on the shipped weights (scripts/make_tiny_reference.py).
REFERENCE = Path(__file__).parent / "data" / "tiny_reference.npz"


@pytest.fixture(scope="module")
def loaded():
    return load(TINY)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_config_parses_with_both_layer_types():
    d = json.loads((TINY / "config.json").read_text())
    assert d["model_type"] == "qwen3_5_text"
    cfg = ModelConfig.from_dict(d).text_config
    assert set(cfg.layer_types) == {"linear_attention", "full_attention"}
    assert len(cfg.layer_types) == cfg.num_hidden_layers


def test_tiny_files_are_small_mlx_checkpoint():
    total = sum(f.stat().st_size for f in TINY.iterdir() if f.is_file())
    assert total < 6 * 2**20
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (TINY / name).is_file()
    _, metadata = mx.load(str(TINY / "model.safetensors"), return_metadata=True)
    assert metadata.get("format") == "mlx"


def test_tiny_loads(loaded):
    model, tokenizer = loaded
    p = dict(tree_flatten(model.parameters()))
    assert p["model.embed_tokens.weight"].dtype in (mx.float16, mx.bfloat16)
    assert all(v.dtype == mx.float32 for k, v in p.items() if k.endswith("A_log"))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tokenizer.eos_token_ids


def test_tiny_chat_template(loaded):
    _, tokenizer = loaded
    msgs = [{"role": "user", "content": "What is a list?"}]
    on = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    off = tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    head = "<|im_start|>user\nWhat is a list?<|im_end|>\n<|im_start|>assistant\n"
    assert on == head + "<think>\n"
    assert off == head + "<think>\n\n</think>\n\n"
    for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        assert len(tokenizer.encode(s, add_special_tokens=False)) == 1, s


@pytest.fixture(scope="module")
def reference():
    ref = np.load(REFERENCE)
    return mx.array(ref["input_ids"]), ref["logits"]


def test_tiny_logits_match_transformers(loaded, reference):
    """As shipped (float16 weights and activations) against transformers' float32 forward."""
    model, _ = loaded
    ids, ref = reference
    dtype = model.model.embed_tokens.weight.dtype
    logits = model(ids)
    assert logits.shape == ref.shape
    assert rel_err(logits.astype(mx.float32), ref) < RTOL[dtype]


def test_tiny_logits_in_float32_match_transformers(reference):
    """The same weights cast to float32: full forward, then prefill + token-by-token decode."""
    model, _ = load(TINY)
    model.set_dtype(mx.float32)
    ids, ref = reference
    assert rel_err(model(ids), ref) < MODEL_LOGIT_BAR
    cache = model.make_cache()
    n = 40
    steps = [model(ids[:, :n], cache=cache)]
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(n, ids.shape[1])]
    assert rel_err(mx.concatenate(steps, axis=1), ref) < MODEL_LOGIT_BAR


def test_tiny_greedy_generation_is_printable(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode('The "if" statement is used for', add_special_tokens=False)
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache=cache)
    out = []
    for _ in range(12):
        nxt = int(mx.argmax(logits[0, -1]).item())
        out.append(nxt)
        logits = model(mx.array([[nxt]]), cache=cache)
    text = tokenizer.decode(out)
    assert text.strip(), out
    assert text.replace("\n", " ").isprintable(), repr(text)
    assert any(c.isalpha() for c in text), repr(text)


def _mean_nll(model, ids: list[int], T: int = 128) -> float:
    """Mean next-token loss (nats) over all whole windows of T + 1 tokens in ids."""
    n = (len(ids) - 1) // T
    assert n >= 8, len(ids)
    x = mx.array(np.array(ids[: n * T + 1]))
    windows = mx.stack([x[i * T : (i + 1) * T + 1] for i in range(n)])
    total = 0.0
    for i in range(0, n, 16):
        w = windows[i : i + 16]
        logits = model(w[:, :-1]).astype(mx.float32)
        target = mx.take_along_axis(logits, w[:, 1:, None], axis=-1)[..., 0]
        total += (mx.logsumexp(logits, axis=-1) - target).sum().item()
    return total / (n * T)


def test_tiny_held_out_perplexity_far_below_uniform(loaded, script):
    model, tokenizer = loaded
    seed = json.loads((TINY / "training_log.json").read_text())["seed"]
    train_docs, held_docs = script.build_corpus(seed)
    assert held_docs and not set(held_docs) & set(train_docs)
    uniform = math.log(model.config.vocab_size)
    held = _mean_nll(model, tokenizer.encode(script.held_out_text(seed), add_special_tokens=False))
    # Unseen documents: the shipped model sits near 5.4 nats against 7.6 for uniform (it is
    # overfitted: several epochs); an untrained or mis-loaded model is near or above uniform.
    assert held < 0.8 * uniform, (held, uniform)
    # Chats it was trained on (answers repeated, several epochs): near 1 nat, which small
    # loading errors (a norm shifted twice, a transposed conv) would break.
    chats = [d for d in train_docs if not isinstance(d, str)][:100]
    text = script.EOT.join("".join(d) for d in chats)
    seen = _mean_nll(model, tokenizer.encode(text, add_special_tokens=False))
    assert seen < 0.3 * uniform, (seen, uniform)


def test_tiny_has_a_trained_mtp_head(loaded):
    """The shipped MTP head (examples/train_tiny.py --mtp): greedy tokens with it are the plain
    ones, and it drafts well enough to be accepted much more often than chance (a random head:
    about 0 of 100; the trained one near the rate in training_log.json)."""
    from qwen35_mlx import stream_generate

    model, tokenizer = loaded
    assert model.has_mtp
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is a list?"}], add_generation_prompt=True,
        tokenize=False,
    )  # fmt: skip
    plain = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=48, mtp=False)]
    spec = list(stream_generate(model, tokenizer, prompt, max_tokens=48, mtp=True, mtp_k=2))
    assert [r.token for r in spec] == plain
    assert spec[-1].mtp_acceptance > 0.25, spec[-1].mtp_acceptance
