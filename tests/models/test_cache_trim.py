"""Rolling back the hybrid cache (models/cache.py LinearCache.trim, mlx-lm's KV trim): a cache fed
tokens then trimmed by n holds what a cache fed only the kept tokens holds, and continues the
same; mlx-lm's speculative decoding with our model drafting for itself."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import speculative_generate_step
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from qwen35_mlx import mlx_lm_plugin
from qwen35_mlx.models.cache import LinearCache
from tests.conftest import RTOL, rel_err
from tests.models.factory import make_moe_config, make_text_config, make_text_model

TOL = RTOL[mx.float32]
PROMPT = [3, 17, 5, 99, 42, 7, 8, 120, 1]
MORE = [64, 33, 12, 90, 4, 71]
TWO_ATTN = ["full_attention", "linear_attention", "full_attention", "linear_attention"]


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request):
    if request.param == "dense":
        return make_text_model(make_text_config(layer_types=TWO_ATTN), seed=1)
    return make_text_model(make_moe_config(), seed=2)


def _feed(model, cache, tokens, calls):
    """Feed `tokens` in calls of the given sizes; returns the last call's logits."""
    out, i = None, 0
    rows = tokens if isinstance(tokens[0], list) else [tokens]
    for n in calls:
        out = model(mx.array([r[i : i + n] for r in rows]), cache=cache)
        i += n
    mx.eval(out)
    return out


def _assert_same_state(a, b):
    for ca, cb in zip(a, b, strict=True):
        if isinstance(ca, LinearCache):
            for x, y in zip(ca.cache, cb.cache, strict=True):
                assert rel_err(np.array(x), np.array(y)) < TOL
        else:
            assert np.array_equal(np.array(ca.offset), np.array(cb.offset))


@pytest.mark.parametrize(
    "calls, n",
    [
        ([4], 1), ([4], 3), ([5], 2),  # inside one verify-sized call
        ([2, 2], 3), ([1, 3], 2), ([1, 1, 4], 3),  # across calls, after one-token steps
    ],
)  # fmt: skip
def test_trim_matches_feeding_only_the_kept_tokens(model, calls, n):
    toks = PROMPT + MORE
    fed = len(PROMPT) + sum(calls)
    trimmed = model.make_cache()
    _feed(model, trimmed, toks, [len(PROMPT), *calls])
    assert [c.trim(n) for c in trimmed] == [n] * len(trimmed)
    kept = model.make_cache()
    _feed(model, kept, toks, [len(PROMPT), fed - n - len(PROMPT)])
    _assert_same_state(trimmed, kept)
    # and both continue the same, token by token and in one multi-token call
    nxt = toks[fed - n : fed - n + 3]
    a, b = _feed(model, trimmed, nxt, [3]), _feed(model, kept, nxt, [3])
    assert rel_err(np.array(a), np.array(b)) < TOL


def test_trim_batch_left_padded(model):
    rows = [[0, 0, 0] + PROMPT[:6] + MORE, PROMPT + MORE]
    pads = [3, 0]
    width = len(rows[1])
    trimmed = model.make_cache(left_padding=pads)
    _feed(model, trimmed, rows, [9, 4])
    for c in trimmed:
        c.trim(3)
    kept = model.make_cache(left_padding=pads)
    _feed(model, kept, rows, [9, 1])
    _assert_same_state(trimmed, kept)
    a = _feed(model, trimmed, [r[10:13] for r in rows], [3])
    b = _feed(model, kept, [r[10:13] for r in rows], [3])
    assert rel_err(np.array(a), np.array(b)) < TOL
    assert width == 15


def test_trim_beyond_history_raises_and_changes_nothing(model):
    cache = model.make_cache()
    _feed(model, cache, PROMPT + MORE, [len(PROMPT), 2, 2, 2])
    lin = next(c for c in cache if isinstance(c, LinearCache))
    before = [np.array(x) for x in lin.cache]
    with pytest.raises(ValueError, match="can roll back 4 of the 5 tokens"):
        lin.trim(5)
    for x, y in zip(before, lin.cache, strict=True):
        assert np.array_equal(x, np.array(y))
    # One-token steps (plain decoding) keep no history: a whole recurrent state per layer and
    # step would stay alive for a rollback nothing asks for.
    cache = model.make_cache()
    _feed(model, cache, PROMPT + MORE, [len(PROMPT), 3, 1, 1])
    lin = next(c for c in cache if isinstance(c, LinearCache))
    assert len(lin._states) == 1
    before = [np.array(x) for x in lin.cache]
    with pytest.raises(ValueError, match="can roll back 0 of the 1 tokens"):
        lin.trim(1)
    for x, y in zip(before, lin.cache, strict=True):
        assert np.array_equal(x, np.array(y))
    prefill = model.make_cache()
    _feed(model, prefill, PROMPT + MORE, [len(PROMPT) + 6])
    if len(PROMPT) + 6 > 64:
        with pytest.raises(ValueError):
            next(c for c in prefill if isinstance(c, LinearCache)).trim(1)


def test_is_trimmable_only_fresh_or_after_a_verify_pass(model):
    """mlx-lm reads is_trimmable as "any number of tokens" (its server trims stored caches to a
    shared prefix): a LinearCache says so only when fresh or right after a short multi-token call
    that no trim has followed."""
    cache = model.make_cache()
    assert can_trim_prompt_cache(cache)
    _feed(model, cache, PROMPT + MORE, [len(PROMPT), 1])
    assert not can_trim_prompt_cache(cache)
    _feed(model, cache, MORE, [3])
    assert can_trim_prompt_cache(cache)
    assert trim_prompt_cache(cache, 2) == 2
    assert not can_trim_prompt_cache(cache)


def _greedy(model, prompt, n):
    cache = model.make_cache()
    model(mx.array(prompt[:-1])[None], cache=cache)
    y, out = prompt[-1], []
    for _ in range(n):
        y = model(mx.array([[y]]), cache=cache)[0, -1].argmax().item()
        out.append(y)
    return out


@pytest.mark.parametrize("num_draft", [1, 3, 6])
def test_mlx_lm_speculative_self_draft_equals_greedy(model, num_draft):
    """mlx-lm's speculative_generate_step (which refused hybrid caches) with the model drafting
    for itself: every draft is accepted and the tokens are plain greedy's."""
    n = 12
    want = _greedy(model, PROMPT, n)
    got = [
        (t, draft)
        for t, _, draft in speculative_generate_step(
            mx.array(PROMPT), model, model, num_draft_tokens=num_draft, max_tokens=n
        )
    ]
    assert [t for t, _ in got] == want
    assert sum(d for _, d in got) >= n // 2  # the draft is the model itself


def test_mlx_lm_speculative_other_draft_equals_greedy(model):
    """A draft that disagrees often (another random model): rejections roll the main cache back."""
    draft = make_text_model(make_text_config(), seed=9)
    n = 12
    want = _greedy(model, PROMPT, n)
    got = list(speculative_generate_step(mx.array(PROMPT), model, draft, max_tokens=n))
    assert [t for t, _, _ in got] == want
    assert not all(d for _, _, d in got)  # some drafts were rejected


def test_mlx_lm_stream_generate_draft_model_through_plugin():
    """`mlx_lm.stream_generate(..., draft_model=...)` on a checkpoint loaded through the plugin."""
    from pathlib import Path

    golden = Path(__file__).parents[1] / "data" / "golden" / "generate"
    mlx_lm_plugin.register()
    try:
        m, tok = mlx_lm.load(str(golden))
        ids = tok.encode("Hello there, how are you")
        plain = [r.token for r in mlx_lm.stream_generate(m, tok, ids, max_tokens=10)]
        spec = list(mlx_lm.stream_generate(m, tok, ids, max_tokens=10, draft_model=m))
    finally:
        mlx_lm_plugin.unregister()
    assert [r.token for r in spec] == plain
    assert any(r.from_draft for r in spec)
