"""The linear layers' packed decode path (`GatedDeltaNet.step` / `steps` / the plain call at one
token, fed by the fused in-projection through `gated_delta_decode_packed`) on the CPU.

On the CPU the fp32 test models keep separate, transposed projections (`CPU_TRANSPOSED_WEIGHTS`),
so the tests elsewhere never take this path; here the in-projections are fused as on a GPU, and
the per-token states come back in the T-token kernel's stacked form ((state_tok, conv_tok)
[T-1, ...]), so the CPU runs what a GPU's compiled decode and verify steps run, ops in place of
the kernel: greedy tokens of the compiled step equal the plain path's, speculative decoding's
equal greedy's, and a trim into a verify pass takes the right per-token state.
"""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx import generation
from qwen35_mlx.generation import stream_generate
from qwen35_mlx.models import layers
from tests.conftest import RTOL, rel_err
from tests.drafts import forced_drafts
from tests.models.factory import make_moe_config, make_text_config, make_text_model
from tests.test_speculative import PROMPT, N, tok  # noqa: F401  (tok: a fixture)

TWO_ATTN = ["full_attention", "linear_attention", "full_attention", "linear_attention"]


@pytest.fixture
def packed(monkeypatch):
    """Fused in-projections on the CPU, and the packed decode's per-token states stacked as the
    GPU kernel gives them; returns the T of each multi-token call seen."""
    monkeypatch.setattr(layers, "CPU_TRANSPOSED_WEIGHTS", False)
    real = layers.gated_delta_decode_packed
    seen = []

    def stacked(*args, **kw):
        y, s, c, per = real(*args, **kw)
        seen.append(kw["tokens"])
        if per is not None:
            assert len(per) == kw["tokens"]
            per = (mx.stack([p[1] for p in per[:-1]]), mx.stack([p[0] for p in per[:-1]]))
        return y, s, c, per

    monkeypatch.setattr(layers, "gated_delta_decode_packed", stacked)
    return seen


def _model(kind: str):
    make = make_text_config if kind == "dense" else make_moe_config
    return make_text_model(make(vocab_size=384, mtp_num_hidden_layers=1), seed=4)


def _tokens(model, tokenizer, **kw):
    return [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=N, **kw)]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_compiled_step_and_plain_path_same_tokens(packed, tok, kind):  # noqa: F811
    model = _model(kind)  # fresh: traced with the packed path
    want = _tokens(model, tok, mtp=False)
    assert 1 in packed  # the compiled step took the packed decode (when traced)
    model.compiled_decode = False
    packed.clear()
    assert _tokens(model, tok, mtp=False) == want
    assert packed.count(1) >= N - 1  # so did the plain path, every token


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("k", [1, 3])
def test_speculative_same_tokens_as_greedy(packed, tok, kind, k, monkeypatch):  # noqa: F811
    model = _model(kind)
    want = _tokens(model, tok, mtp=False)
    monkeypatch.setattr(generation, "MTPSpeculator", forced_drafts(want, 0.6, 384, 0))
    got = list(stream_generate(model, tok, PROMPT, max_tokens=N, mtp=True, mtp_k=k))
    assert [r.token for r in got] == want
    assert k + 1 in packed  # verify passes of k + 1 tokens took the packed decode
    assert 0 < got[-1].mtp_acceptance < 1  # rejections: trims into the stacked states


def _feed(model, cache, tokens, calls):
    out, i = None, 0
    for n in calls:
        out = model(mx.array([tokens[i : i + n]]), cache=cache)
        i += n
    mx.eval(out)
    return out


@pytest.mark.parametrize("calls, n", [([4], 1), ([4], 3), ([1, 3], 2), ([2, 2], 3)])
def test_trim_into_the_stacked_token_states(packed, calls, n):
    """A trim into a verify pass whose states came stacked gives the states of feeding only
    the kept tokens."""
    from qwen35_mlx.models.cache import LinearCache

    # vocab 384: PROMPT holds ids up to 300 (an id past the embedding reads outside it)
    model = make_text_model(make_text_config(layer_types=TWO_ATTN, vocab_size=384), seed=1)
    toks = PROMPT + [64, 33, 12, 90, 4, 71]
    fed = len(PROMPT) + sum(calls)
    trimmed = model.make_cache()
    _feed(model, trimmed, toks, [len(PROMPT), *calls])
    assert any(t > 1 for t in packed)
    assert [c.trim(n) for c in trimmed] == [n] * len(trimmed)
    kept = model.make_cache()
    _feed(model, kept, toks, [len(PROMPT), fed - n - len(PROMPT)])
    for a, b in zip(trimmed, kept, strict=True):
        if isinstance(a, LinearCache):
            for x, y in zip(a.cache, b.cache, strict=True):
                # (as test_cache_trim: the two feeds' matmuls differ in rows, so in the last bits)
                assert rel_err(np.array(x), np.array(y)) < RTOL[mx.float32]


@pytest.mark.parametrize("T, n", [(2, 1), (4, 1), (4, 3)])
def test_trim_into_the_stacked_token_states_takes_views(packed, T, n):
    """The state a trim picks from the stacked per-token states is a view of them (a Slice
    and a Reshape), not a Gather: no copy, and only views for the next step's host to walk."""
    import io
    import re

    from qwen35_mlx.models.cache import LinearCache

    model = make_text_model(make_text_config(layer_types=TWO_ATTN, vocab_size=384), seed=1)
    cache = model.make_cache()
    _feed(model, cache, PROMPT + [64, 33, 12, 90], [len(PROMPT), T])
    assert T in packed
    linear = [c for c in cache if isinstance(c, LinearCache)]
    # The recorded states evaluated, as the kernel's outputs are (here they are stacked ops).
    mx.eval([getattr(rec, "states", []) for c in linear for _, rec in c._calls])
    for c in cache:
        c.trim(n)
    states = [x for c in linear for x in c.cache]
    buf = io.StringIO()
    mx.export_to_dot(buf, *states)
    kinds = set(re.findall(r'\[label ="([^"]+)", shape=rectangle\]', buf.getvalue()))
    assert kinds == ({"Reshape"} if T == 2 else {"Slice", "Reshape"}), kinds
