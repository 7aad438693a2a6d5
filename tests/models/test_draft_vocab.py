"""The MTP head's draft vocabulary (models/mtp.py `use_draft_vocab`): its logits are the full
head's at the subset's ids and -inf elsewhere, its greedy draft is the subset id of the largest
of them (in a shuffled subset, so a position in the subset is not a token id), in the plain,
compiled and fused-round paths; speculative decoding with it gives plain greedy's tokens; the
loader reads `draft_vocab.json`."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx import generation
from qwen35_mlx.generation import stream_generate
from qwen35_mlx.loader import load_model
from qwen35_mlx.models.mtp import DRAFT_VOCAB_FILE, use_draft_vocab
from tests.conftest import RTOL, rel_err
from tests.models.factory import make_moe_config, make_text_config, make_text_model

TOL = RTOL[mx.float32]
TOKENS = [3, 17, 5, 99, 42, 7, 8, 120, 1, 64, 33]
V = 384
TINY = Path(generation.__file__).parent / "assets" / "tiny"


def _subset(seed: int = 0, n: int = 150) -> list[int]:
    """n distinct ids in a shuffled order (never sorted: a position is not an id)."""
    ids = np.random.default_rng(seed).permutation(V)[:n].tolist()
    assert ids != sorted(ids)
    return ids


def _model(kind="dense", tied=False, seed=4):
    make = make_text_config if kind == "dense" else make_moe_config
    cfg = make(vocab_size=V, mtp_num_hidden_layers=1, tie_word_embeddings=tied)
    return make_text_model(cfg, seed=seed)


def _head_logits(model, compiled: bool):
    """MTP logits at every position of TOKENS (plain: one call; compiled: last_only calls of
    one position after a prefill of the first three), [P, V]."""
    ids = mx.array(TOKENS)[None]
    _, h = model(ids, return_hidden=True)
    cache = model.make_mtp_cache()
    if not compiled:
        return np.array(model.mtp_forward(h[:, :-1], ids[:, 1:], cache)[0][0])
    outs = [np.array(model.mtp_forward(h[:, :3], ids[:, 1:4], cache)[0][0])]
    for i in range(3, len(TOKENS) - 1):
        logits, _ = model.mtp_forward(h[:, i : i + 1], ids[:, i + 1 : i + 2], cache, last_only=True)
        outs.append(np.array(logits[0]))
    return np.concatenate([outs[0], *outs[1:]])


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_draft_vocab_logits_are_the_heads_on_the_subset(tied, compiled):
    model = _model(tied=tied)
    full = _head_logits(model, compiled)
    ids = _subset()
    use_draft_vocab(model, ids)
    assert model.mtp.draft_vocab == ids
    sub = _head_logits(model, compiled)
    out = np.setdiff1d(np.arange(V), ids)
    assert np.isneginf(sub[:, out]).all()
    assert rel_err(sub[:, ids], full[:, ids]) < 10 * TOL
    # the greedy draft: the subset's best token, by id
    assert (sub.argmax(-1) == np.array(ids)[full[:, ids].argmax(-1)]).all()
    use_draft_vocab(model, None)  # back to the whole vocabulary (the compiled step retraces)
    assert model.mtp.draft_vocab is None
    back = _head_logits(model, compiled)
    if mx.default_device() == mx.cpu:
        np.testing.assert_array_equal(back, full)
    else:  # a GPU's matmuls may round the retraced step's products differently (H200)
        assert rel_err(back, full) < TOL


def test_draft_vocab_argmax_maps_positions_to_ids():
    """`MTP.argmax` (the fused greedy round's drafts) against the full head restricted to the
    subset, over random hidden states."""
    model = _model()
    ids = _subset(1)
    o = mx.random.normal((2, 5, model.config.hidden_size), key=mx.random.key(0))
    full = np.array(model.logits(o))
    use_draft_vocab(model, ids)
    got = np.array(model.mtp.argmax(o, model.logits))
    want = np.array(ids)[full[..., ids].argmax(-1)]
    np.testing.assert_array_equal(got, want)


def test_draft_vocab_checked():
    model = _model()
    for bad in ([], [1, 1], [-1, 2], [V]):
        with pytest.raises(ValueError, match="distinct token ids"):
            use_draft_vocab(model, bad)
    plain = make_text_model(make_text_config(vocab_size=V), seed=1)
    with pytest.raises(ValueError, match="no multi-token-prediction head"):
        use_draft_vocab(plain, [1, 2])


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("k", [1, 3])
def test_draft_vocab_same_tokens_as_greedy(kind, k):
    """Random MTP weights drafting over a subset: plain greedy's tokens, alone and in a batch."""
    from qwen35_mlx.loader import load_tokenizer, read_config
    from tests.test_speculative import BATCH, PROMPT, N

    golden = Path(__file__).parent.parent / "data" / "golden" / "generate"
    tk = load_tokenizer(golden, read_config(golden), "qwen3_5_text")
    model = _model(kind)
    want = [r.token for r in stream_generate(model, tk, PROMPT, max_tokens=N)]
    limits = [N, 9, 17]
    want_b = generation.batch_generate(model, tk, BATCH, max_tokens=limits).tokens
    use_draft_vocab(model, list(dict.fromkeys(_subset(2, 100) + want[:3])))
    got = [r.token for r in stream_generate(model, tk, PROMPT, max_tokens=N, mtp=True, mtp_k=k)]
    assert got == want
    got_b = generation.batch_generate(model, tk, BATCH, max_tokens=limits, mtp=True, mtp_k=k)
    assert got_b.tokens == want_b


def test_draft_vocab_keeps_the_trained_heads_acceptance():
    """The shipped tiny model (trained head) drafting over a shuffled subset that holds every
    token plain greedy decoding emits here: plain greedy's tokens, and at least the acceptance
    of the whole-vocabulary head (where its argmax is the right token, that token is in the
    subset and wins there too). A subset whose positions were taken for ids, or ids mapped back
    through the wrong order, drafts nonsense: acceptance near 0."""
    from qwen35_mlx import load

    model, tok = load(TINY)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Explain the with statement."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    use_draft_vocab(model, None)
    want = [r.token for r in stream_generate(model, tok, prompt, max_tokens=48)]

    def run(k):
        rs = list(stream_generate(model, tok, prompt, max_tokens=48, mtp=True, mtp_k=k))
        return [r.token for r in rs], rs[-1].mtp_acceptance

    whole = {k: run(k) for k in (1, 2)}
    rng = np.random.default_rng(5)
    others = rng.permutation(model.config.vocab_size)[:300].tolist()
    ids = list(dict.fromkeys(others[:150] + want + others[150:]))
    use_draft_vocab(model, ids)
    sub = {k: run(k) for k in (1, 2)}
    for k in (1, 2):
        assert sub[k][0] == want == whole[k][0]
        assert whole[k][1] > 0.3  # the trained head
        assert sub[k][1] >= whole[k][1], (k, sub[k][1], whole[k][1])


def test_loader_reads_draft_vocab(tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(TINY, folder)
    (folder / DRAFT_VOCAB_FILE).unlink(missing_ok=True)
    assert load_model(folder).mtp.draft_vocab is None
    (folder / DRAFT_VOCAB_FILE).write_text(json.dumps({"token_ids": [5, 3, 9]}))
    assert load_model(folder).mtp.draft_vocab == [5, 3, 9]
    (folder / DRAFT_VOCAB_FILE).write_text(json.dumps({"ids": [5]}))
    with pytest.raises(ValueError, match="not a draft vocabulary"):
        load_model(folder)
    (folder / DRAFT_VOCAB_FILE).write_text(json.dumps({"token_ids": [5, 5]}))
    with pytest.raises(ValueError, match="distinct token ids"):
        load_model(folder)


@pytest.mark.parametrize("tied", [False, True])
def test_draft_vocab_of_a_quantized_head(tied):
    """The subset's rows of a quantized lm_head / embedding are its dequantized rows: the
    subset's logits equal the quantized head's there."""
    import mlx.nn as nn

    model = _model(tied=tied, seed=8)
    nn.quantize(model, group_size=32, bits=8)
    full = _head_logits(model, compiled=False)
    ids = _subset(4)
    use_draft_vocab(model, ids)
    sub = _head_logits(model, compiled=False)
    assert rel_err(sub[:, ids], full[:, ids]) < 10 * TOL
