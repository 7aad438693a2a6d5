"""Property-based checks (hypothesis) of one invariant: a row's tokens do not depend on the other
rows of its batch, on padding, or on how its prompt was split into prefill steps.

Random prompts, paddings, prefill splits and batch compositions on tiny seeded models (a dense
stack L F L L and a sparse-MoE one). Examples are derandomized (the same ones every run) and
bounded so the file runs in well under a minute on two CPU cores.
"""

from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwen35_mlx
from qwen35_mlx import batch_generate, load, stream_generate
from qwen35_mlx.generation import make_batch_cache
from tests.conftest import MODEL_LOGIT_BAR, rel_err
from tests.models.factory import make_moe_config, make_text_config, make_text_model

TINY = Path(qwen35_mlx.__file__).parent / "assets" / "tiny"
# The tiny tokenizer's vocabulary: its pad id (2043), which batch_generate fills padding with,
# must be a valid row of the model's embedding.
VOCAB = 2048

SETTINGS = settings(
    max_examples=10,
    deadline=20_000,  # ms per example: catches a hang, not a slow shared machine
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

prompt = st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=40)


@pytest.fixture(scope="module")
def tok():
    return load(TINY)[1]


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request):
    if request.param == "dense":
        return make_text_model(make_text_config(vocab_size=VOCAB), seed=3)
    return make_text_model(make_moe_config(vocab_size=VOCAB), seed=4)


def solo_tokens(model, tok, ids, n, **kw):
    return [r.token for r in stream_generate(model, tok, ids, max_tokens=n, **kw)]


def splits(draw, n: int) -> list[int]:
    """Random cut points of n tokens into consecutive prefill steps."""
    cuts = draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=min(n - 1, 6))) if n > 1 else set()
    return [0, *sorted(cuts), n]


@SETTINGS
@given(data=st.data())
def test_batch_generate_rows_equal_their_solo_runs(model, tok, data):
    prompts = data.draw(st.lists(prompt, min_size=1, max_size=4), label="prompts")
    limits = data.draw(
        st.lists(st.integers(1, 6), min_size=len(prompts), max_size=len(prompts)), label="limits"
    )
    step = data.draw(st.integers(1, 48), label="prefill_step_size")
    solo = [solo_tokens(model, tok, p, m) for p, m in zip(prompts, limits, strict=True)]
    batch = batch_generate(model, tok, prompts, max_tokens=limits, prefill_step_size=step)
    assert batch.tokens == solo


@SETTINGS
@given(data=st.data())
def test_prefill_split_anywhere_gives_the_one_step_logits(model, tok, data):
    ids = data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=2, max_size=64), label="ids")
    cuts = splits(data.draw, len(ids))
    x = mx.array(ids)[None]
    whole = model(x, cache=model.make_cache())
    cache = model.make_cache()
    parts = [model(x[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:], strict=False)]
    stepped = mx.concatenate(parts, axis=1)
    assert rel_err(stepped, whole) < MODEL_LOGIT_BAR
    # The caches agree too: the next token's logits from either are the same.
    nxt = mx.array([[int(mx.argmax(whole[0, -1]).item())]])
    again = model(nxt, cache=cache)
    ref_cache = model.make_cache()
    model(x, cache=ref_cache)
    assert rel_err(again, model(nxt, cache=ref_cache)) < MODEL_LOGIT_BAR
    # And stream_generate's bounded prefill steps give the same greedy tokens.
    step = data.draw(st.integers(1, len(ids)), label="prefill_step_size")
    assert solo_tokens(model, tok, ids, 4, prefill_step_size=step) == solo_tokens(
        model, tok, ids, 4
    )


@SETTINGS
@given(data=st.data())
def test_left_padded_batch_gives_each_row_its_solo_logits(model, data):
    rows = data.draw(st.lists(prompt, min_size=1, max_size=4), label="rows")
    extra = data.draw(st.integers(0, 5), label="extra padding")  # more than the longest needs
    width = max(len(r) for r in rows) + extra
    pads = [width - len(r) for r in rows]
    # What fills the padding must not matter: random ids, not a pad token.
    fill = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=width, max_size=width))
    grid = mx.array([fill[:p] + r for p, r in zip(pads, rows, strict=True)])  # [B, width]
    cuts = splits(data.draw, width)
    cache = make_batch_cache(model, pads)
    logits = mx.concatenate(
        [model(grid[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:], strict=False)], axis=1
    )
    nxt = data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=len(rows), max_size=len(rows)))
    step = model(mx.array(nxt)[:, None], cache=cache)  # one decode step on the batch cache
    for i, (p, r) in enumerate(zip(pads, rows, strict=True)):
        solo_cache = model.make_cache()
        solo = model(mx.array(r)[None], cache=solo_cache)
        assert rel_err(logits[i, p:], solo[0]) < MODEL_LOGIT_BAR, (i, p)
        solo_step = model(mx.array([[nxt[i]]]), cache=solo_cache)
        assert rel_err(step[i], solo_step[0]) < MODEL_LOGIT_BAR, i


def test_the_properties_can_fail(model, tok):
    # The invariant is not vacuous: padding that reaches the state (a cache told of no padding)
    # changes a row's logits, and a split that drops the carried state changes them too.
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    grid = mx.array([rows[0], [0] * 5 + rows[1]])
    unpadded = model(grid, cache=make_batch_cache(model, [0, 0]))
    solo = model(mx.array(rows[1])[None], cache=model.make_cache())
    assert rel_err(unpadded[1, 5:], solo[0]) > 100 * MODEL_LOGIT_BAR
    x = mx.array(rows[0])[None]
    cold_second_half = model(x[:, 3:], cache=model.make_cache())
    whole = model(x, cache=model.make_cache())
    assert rel_err(cold_second_half, whole[:, 3:]) > 100 * MODEL_LOGIT_BAR
