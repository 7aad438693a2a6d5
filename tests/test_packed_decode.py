"""The linear layers' packed decode path (`GatedDeltaNet.step` / `steps` / the plain call at one
token, fed by the fused in-projection through `gated_delta_decode_packed`) on the CPU.

On the CPU the fp32 test models keep separate, transposed projections (`CPU_TRANSPOSED_WEIGHTS`),
so the tests elsewhere never take this path; here the in-projections are fused as on a GPU, and
the per-token states come back in the T-token kernel's form ((state_tok, conv_tok) as
[(T-1) B, ...] rows, or stacked [T-1, B, ...]), so the CPU runs what a GPU's compiled decode and
verify steps run, ops in place of
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
    """Fused in-projections on the CPU, and the packed decode's per-token states in the
    GPU kernel's form: [(T-1) B, ...] rows (`layers.TOKEN_STATES_AS_ROWS`), or stacked
    [T-1, B, ...] where the caller asks; returns the T of each multi-token call seen."""
    monkeypatch.setattr(layers, "CPU_TRANSPOSED_WEIGHTS", False)
    real = layers.gated_delta_decode_packed
    seen = []

    def kernel_form(*args, **kw):
        y, s, c, per = real(*args, **kw)
        seen.append(kw["tokens"])
        if isinstance(per, list):  # the ops' pairs (a GPU kernel's arrays pass as they are)
            assert len(per) == kw["tokens"]
            join = mx.stack if kw.get("stacked") else mx.concatenate
            per = (join([p[1] for p in per[:-1]]), join([p[0] for p in per[:-1]]))
        return y, s, c, per

    monkeypatch.setattr(layers, "gated_delta_decode_packed", kernel_form)
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
    """tokens: one row's ids, or a list of rows (a batch)."""
    rows = tokens if isinstance(tokens[0], list) else [tokens]
    out, i = None, 0
    for n in calls:
        out = model(mx.array([r[i : i + n] for r in rows]), cache=cache)
        i += n
    mx.eval(out)
    return out


@pytest.mark.parametrize("rows", [True, False], ids=["rows", "stacked"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(
    "calls, n", [([4], 1), ([4], 3), ([1, 3], 2), ([2, 2], 3), ([2], 1), ([2, 2], 2)]
)
def test_trim_into_the_stacked_token_states(packed, calls, n, batch, rows, monkeypatch):
    """A trim into a verify pass whose states came in the kernel's form (rows or stacked, one
    or two batch rows) gives the states of feeding only the kept tokens."""
    from qwen35_mlx.models.cache import LinearCache

    monkeypatch.setattr(layers, "TOKEN_STATES_AS_ROWS", rows)
    # vocab 384: PROMPT holds ids up to 300 (an id past the embedding reads outside it)
    model = make_text_model(make_text_config(layer_types=TWO_ATTN, vocab_size=384), seed=1)
    toks = PROMPT + [64, 33, 12, 90, 4, 71]
    # batch 2: the second row the same tokens shifted by one id (rows differ, no padding)
    toks = [toks, [t + 1 for t in toks]][:batch]
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
                assert x.shape == y.shape
                # (as test_cache_trim: the two feeds' matmuls differ in rows, so in the last bits)
                assert rel_err(np.array(x), np.array(y)) < RTOL[mx.float32]


@pytest.mark.parametrize("rows", [True, False], ids=["rows", "stacked"])
@pytest.mark.parametrize("T, n", [(2, 1), (4, 1), (4, 3)])
def test_trim_into_the_stacked_token_states_takes_views(packed, T, n, rows, monkeypatch):
    """The state a trim picks from the per-token states is the kernel's output itself (rows,
    T = 2: no op at all), or views of it (rows: a Slice; stacked: a Slice and a Reshape), never
    a Gather: no copy, and nothing or only views for the next step's host to walk."""
    import io
    import re

    from qwen35_mlx.models.cache import LinearCache

    monkeypatch.setattr(layers, "TOKEN_STATES_AS_ROWS", rows)
    model = make_text_model(make_text_config(layer_types=TWO_ATTN, vocab_size=384), seed=1)
    cache = model.make_cache()
    _feed(model, cache, PROMPT + [64, 33, 12, 90], [len(PROMPT), T])
    assert T in packed
    linear = [c for c in cache if isinstance(c, LinearCache)]
    # The recorded states evaluated, as the kernel's outputs are (here they are stacked ops).
    recorded = [getattr(rec, "states", []) for c in linear for _, rec in c._calls]
    mx.eval(recorded)
    for c in cache:
        c.trim(n)
    states = [x for c in linear for x in c.cache]
    if rows and T == 2:  # the recorded arrays themselves
        ids = {id(x) for rec in recorded for x in rec}
        assert all(id(x) in ids for x in states)
    buf = io.StringIO()
    mx.export_to_dot(buf, *states)
    kinds = set(re.findall(r'\[label ="([^"]+)", shape=rectangle\]', buf.getvalue()))
    want = {"Slice"} if rows else {"Slice", "Reshape"}
    assert kinds == (want - {"Slice"} if T == 2 else want), kinds


@pytest.mark.parametrize("heads_first", [True, False])
def test_verify_norms_take_heads_first(packed, heads_first, monkeypatch):
    """The verify pass's q and k reach their RMSNorms as [B, heads, T, D] (so the norms' outputs
    are row-contiguous in the layout rope and the attention kernel read: on CUDA the transposed
    view after the norm cost a copy a layer), and the logits are those of the other order, bit
    for bit (`layers.VERIFY_HEADS_FIRST`)."""
    from mlx import nn

    monkeypatch.setattr(layers, "VERIFY_HEADS_FIRST", heads_first)
    model = make_text_model(make_text_config(layer_types=TWO_ATTN, vocab_size=384), seed=1)
    attn = model.model.layers[0].self_attn
    norms = {id(attn.q_norm): "q", id(attn.k_norm): "k"}
    seen = {}
    real = nn.RMSNorm.__call__

    def record(self, x):
        if id(self) in norms:
            seen.setdefault(norms[id(self)], []).append(tuple(x.shape))
        return real(self, x)

    monkeypatch.setattr(nn.RMSNorm, "__call__", record)
    T = 3
    cache = model.make_cache()
    _feed(model, cache, PROMPT, [len(PROMPT)])
    seen.clear()  # the prompt's (plain path) calls; now the verify pass of T tokens, traced
    out = model(mx.array([[64, 33, 12]]), cache=cache)
    mx.eval(out)
    assert T in packed
    Hq, Hkv = attn.num_heads, attn.num_kv_heads
    assert Hq != T and Hkv != T
    want = {"q": (1, Hq, T, attn.head_dim), "k": (1, Hkv, T, attn.head_dim)}
    if not heads_first:
        want = {n: (s[0], s[2], s[1], s[3]) for n, s in want.items()}
    assert {n: set(v) for n, v in seen.items()} == {n: {s} for n, s in want.items()}
    monkeypatch.setattr(layers, "VERIFY_HEADS_FIRST", not heads_first)
    other = make_text_model(make_text_config(layer_types=TWO_ATTN, vocab_size=384), seed=1)
    c2 = other.make_cache()
    _feed(other, c2, PROMPT, [len(PROMPT)])
    out2 = other(mx.array([[64, 33, 12]]), cache=c2)
    assert np.array_equal(np.array(out), np.array(out2))


@pytest.mark.parametrize("dims", [None, (32, 32)], ids=["tiny", "Dk32"])
@pytest.mark.parametrize("batch", [1, 2])
def test_verify_packed_columns(packed, batch, dims, monkeypatch):
    """`layers.PACKED_COLUMNS` with the row-wise products (`ROWS_GEMV`, CUDA's form): the
    verify pass's linear layers hand the fused in-projection to the T-token decode as columns
    [B*T, N, 1] and get y back as columns [B*T, Hv*Dv, 1]; the logits are those of the rows form
    bit for bit (one and two batch rows), with Reshapes fewer: one a linear layer where the ops
    run (they turn the columns back into rows), two where the GPU kernel reads them as they
    are (head dims 32: the kernel's shapes)."""
    from tests.test_speculative import _verify_primitives

    monkeypatch.setattr(layers, "ROWS_GEMV", True)
    monkeypatch.setattr(layers, "ROWS_KERNEL", False)
    seen = []
    inner = layers.gated_delta_decode_packed  # the fixture's kernel form

    def record(proj, *args, **kw):
        out = inner(proj, *args, **kw)
        seen.append((kw["tokens"], proj.shape, out[0].shape))
        return out

    monkeypatch.setattr(layers, "gated_delta_decode_packed", record)
    toks = [[64, 33, 12], [65, 34, 13]][:batch]
    outs, counts = {}, {}
    for on in (True, False):
        monkeypatch.setattr(layers, "PACKED_COLUMNS", on)
        heads = {} if dims is None else dict(linear_key_head_dim=32, linear_value_head_dim=32)
        cfg = make_text_config(layer_types=TWO_ATTN, vocab_size=384, **heads)
        model = make_text_model(cfg, seed=1)
        cache = model.make_cache()
        _feed(model, cache, [PROMPT[:9], PROMPT[1:10]][:batch], [9])
        seen.clear()
        outs[on] = model(mx.array(toks), cache=cache)
        mx.eval(outs[on])
        la = model.model.layers[1].linear_attn
        N = sum(la[n].weight.shape[0] for n in la.IN_PROJ)
        R, V = 3 * batch, la.value_dim
        want = [(3, (R, N, 1), (R, V, 1))] if on else [(3, (R, N), (R, V))]
        assert seen == want * 2  # the two linear layers, traced
        counts[on] = _verify_primitives(model)
    assert np.array_equal(np.array(outs[True]), np.array(outs[False]))
    # Two linear layers: one Reshape fewer each where the ops run (the tiny model's head_k_dim
    # 16 on any device; the CPU), two where the kernel reads the columns (Dk 32 on a GPU).
    fewer = 2 * (2 if dims is not None and mx.default_device() != mx.cpu else 1)
    assert counts[False]["Reshape"] - counts[True]["Reshape"] == fewer
    assert sum(counts[False].values()) - sum(counts[True].values()) == fewer


def test_speculative_with_packed_columns_same_tokens_as_greedy(packed, tok, monkeypatch):  # noqa: F811
    """Greedy MTP (k = 1 and 3) with `PACKED_COLUMNS` and the row-wise products gives plain
    decoding's tokens, rejections included (trims into the kernel's per-token states)."""
    monkeypatch.setattr(layers, "ROWS_GEMV", True)
    monkeypatch.setattr(layers, "ROWS_KERNEL", False)
    monkeypatch.setattr(layers, "PACKED_COLUMNS", True)
    model = _model("dense")
    want = _tokens(model, tok, mtp=False)
    for k in (1, 3):
        monkeypatch.setattr(generation, "MTPSpeculator", forced_drafts(want, 0.6, 384, 0))
        got = list(stream_generate(model, tok, PROMPT, max_tokens=N, mtp=True, mtp_k=k))
        assert [r.token for r in got] == want
        assert k + 1 in packed
        assert 0 < got[-1].mtp_acceptance < 1
