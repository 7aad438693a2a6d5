"""Speculative decoding with the MTP head (speculative.py) through stream_generate: at
temperature 0 the tokens are plain greedy decoding's, for random MTP weights (drafts mostly
rejected), a perfect draft (all accepted) and a noisy one (every acceptance count), text dense
and MoE, with a prompt cache; with sampling the token distribution is the model's."""

import random
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx import generation
from qwen35_mlx.generation import stream_generate
from qwen35_mlx.loader import load_tokenizer, read_config
from qwen35_mlx.prompt_cache import PromptCache
from qwen35_mlx.speculative import MTPSpeculator
from tests.drafts import counting_native_head, forced_drafts
from tests.models.factory import make_moe_config, make_text_config, make_text_model

GOLDEN = Path(__file__).parent / "data" / "golden" / "generate"
PROMPT = [5, 17, 99, 42, 7, 8, 120, 1, 64, 33, 250, 300]
N = 24


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GOLDEN, read_config(GOLDEN), "qwen3_5_text")


def _model(kind: str, seed: int = 4):
    make = make_text_config if kind == "dense" else make_moe_config
    return make_text_model(make(vocab_size=384, mtp_num_hidden_layers=1), seed=seed)


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request):
    return _model(request.param)


def _tokens(model, tok, prompt=PROMPT, **kw):
    """Greedy tokens; plain decoding (mtp=False) unless kw says otherwise."""
    kw.setdefault("mtp", False)
    return [r.token for r in stream_generate(model, tok, prompt, max_tokens=N, **kw)]


def _oracle(want: list[int], p_right: float, seed: int = 0, V: int = 384):
    """Drafts that are the plain greedy tokens, each right with p_right (tests/drafts.py)."""
    return forced_drafts(want, p_right, V, seed)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_random_mtp_same_tokens_as_greedy(model, tok, k):
    want = _tokens(model, tok, mtp=False)
    responses = list(stream_generate(model, tok, PROMPT, max_tokens=N, mtp=True, mtp_k=k))
    assert [r.token for r in responses] == want
    assert responses[-1].mtp_acceptance is not None
    assert all(r.mtp_acceptance is None for r in stream_generate(model, tok, PROMPT, mtp=False))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("p_right", [1.0, 0.6])
def test_oracle_draft_same_tokens_as_greedy(model, tok, k, p_right, monkeypatch):
    want = _tokens(model, tok, mtp=False)
    monkeypatch.setattr(generation, "MTPSpeculator", _oracle(want, p_right))
    responses = list(stream_generate(model, tok, PROMPT, max_tokens=N, mtp=True, mtp_k=k))
    assert [r.token for r in responses] == want
    if p_right == 1.0:
        assert responses[-1].mtp_acceptance == 1.0
        assert sum(r.from_draft for r in responses) >= (N - 1) * k // (k + 1) - 1
    else:
        assert 0 < responses[-1].mtp_acceptance < 1


def test_mtp_with_prompt_cache_same_tokens(model, tok, monkeypatch):
    """A managed prompt cache: the second turn reuses the first's cache (trimmed at the end of a
    round that stopped early) and gives the tokens it gives without MTP."""
    want1 = _tokens(model, tok, mtp=False)
    turn2 = PROMPT + want1 + [11, 12, 13]
    want2 = _tokens(model, tok, turn2, mtp=False)
    plain1 = _tokens(model, tok, mtp=False)
    assert plain1 == want1
    monkeypatch.setattr(generation, "MTPSpeculator", _oracle(want1, 1.0))
    pc = PromptCache(model)
    got1 = [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=N, mtp=True, mtp_k=3,
                                             prompt_cache=pc)]  # fmt: skip
    assert got1 == want1
    assert pc.tokens == PROMPT + want1[:-1]
    monkeypatch.undo()
    got2 = [r.token for r in stream_generate(model, tok, turn2, max_tokens=N, prompt_cache=pc)]
    assert pc.last_reused > len(PROMPT)
    assert got2 == want2


@pytest.mark.parametrize("native", [True, False], ids=["native-head", "ops-head"])
def test_mtp_auto_is_on_where_it_pays(monkeypatch, tok, native):
    # stream_generate's default mtp="auto": on for a greedy text model whose round takes the
    # native head (speculative.mtp_pays), off with sampling and without the native head; the
    # tokens are greedy decoding's either way.
    from qwen35_mlx.kernels import cpu_ext
    from qwen35_mlx.models import mtp as mtp_lib
    from qwen35_mlx.speculative import greedy_or_sampling, mtp_pays

    monkeypatch.setattr(mtp_lib, "NATIVE_HEAD", native)
    model = _model("dense")
    built = mx.default_device() == mx.cpu and hasattr(cpu_ext.load(), "mtp_head")
    assert mtp_pays(model, greedy_or_sampling(None, 0.0, 0.0, 0, 0.0)) == (native and built)
    assert not mtp_pays(model, greedy_or_sampling(None, 0.7, 0.0, 0, 0.0))
    auto = list(stream_generate(model, tok, PROMPT, max_tokens=12))
    off = list(stream_generate(model, tok, PROMPT, max_tokens=12, mtp=False))
    assert [r.token for r in auto] == [r.token for r in off]
    assert off[-1].mtp_acceptance is None
    assert (auto[-1].mtp_acceptance is not None) == (native and built)
    sampled = list(stream_generate(model, tok, PROMPT, max_tokens=4, temp=0.7))
    assert sampled[-1].mtp_acceptance is None


def test_mtp_k_checked(model, tok):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="mtp_k"):
            list(stream_generate(model, tok, PROMPT, max_tokens=2, mtp=True, mtp_k=bad))
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match='mtp must be True, False or "auto"'):
            list(stream_generate(model, tok, PROMPT, max_tokens=2, mtp=bad))
        with pytest.raises(ValueError, match='mtp must be True, False or "auto"'):
            generation.batch_generate(model, tok, [PROMPT], max_tokens=2, mtp=bad)
    plain = make_text_model(make_text_config(vocab_size=384), seed=1)
    # No MTP head: mtp and mtp_k are accepted and ignored.
    out = list(stream_generate(plain, tok, PROMPT, max_tokens=3, mtp=True, mtp_k=2))
    assert out[-1].mtp_acceptance is None


def _tile(cache, B):
    """Copy a one-row cache's states to B rows."""
    for c in cache:
        if hasattr(c, "keys"):
            c.keys, c.values = (mx.repeat(x, B, axis=0) for x in (c.keys, c.values))
        else:
            c.state = ([mx.repeat(x, B, axis=0) for x in c.cache], None, None)


def _joint(first, second, V):
    h = np.zeros((V, V))
    np.add.at(h, (np.array(first), np.array(second)), 1)
    return h.reshape(-1)


@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("opts", [dict(temp=1.0, top_k=4), dict(temp=0.7, top_p=0.9)])
def test_sampling_distribution_is_the_models(opts, subset):
    """With sampling, the speculative tokens follow the main model's distribution: over B rows
    of one prompt (one batch), the joint histogram of the first two generated tokens (the second
    one drafted, then accepted or resampled by the rejection rule) matches plain sampling's.
    `subset`: the head drafts over a random half of the vocabulary (models/mtp.py: its
    distribution is zero elsewhere), the output is still the main model's."""
    from mlx_lm.sample_utils import make_sampler

    from qwen35_mlx.models.mtp import use_draft_vocab
    from qwen35_mlx.speculative import Sampling

    V = 384
    m = make_text_model(make_text_config(vocab_size=V, mtp_num_hidden_layers=1), seed=7)
    if subset:
        use_draft_vocab(m, np.random.default_rng(3).permutation(V)[: V // 2].tolist())
    B = 2000
    one = mx.array([PROMPT])
    mx.random.seed(1)
    # The prompt once, its caches then copied to B rows (prefilling B rows is slow on the CPU).
    cache = m.make_cache()
    spec = MTPSpeculator(m, cache, 2, Sampling(**opts))
    _, h = m(one[:, :-1], cache=cache, return_hidden=True)
    spec.on_prefill(one[:, :-1], h)
    _tile(cache + spec.mtp_cache, B)
    spec._pending_h = mx.repeat(spec._pending_h, B, axis=0)
    y, _ = spec.start(mx.repeat(one[:, -1:], B, axis=0))
    rows, _ = spec.round()
    got = _joint(y.tolist(), [r[0] for r in rows], V)

    sampler = make_sampler(**opts)
    cache = m.make_cache()
    m(one[:, :-1], cache=cache)
    _tile(cache, B)
    lp = m(mx.repeat(one[:, -1:], B, axis=0), cache=cache)[:, -1]
    y = sampler(lp - mx.logsumexp(lp, -1, keepdims=True))
    lp = m(y[:, None], cache=cache)[:, -1]
    y2 = sampler(lp - mx.logsumexp(lp, -1, keepdims=True))
    want = _joint(y.tolist(), y2.tolist(), V)

    keep = (got + want) >= 10
    assert keep.sum() >= 5  # enough cells to compare
    chi2 = (((got - want)[keep] ** 2) / (got + want)[keep]).sum()
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)
    assert spec.stats.accepted < spec.stats.drafted  # the rejection path ran
    if subset:  # every draft from the subset
        assert set(np.array(spec._drafts).ravel().tolist()) <= set(m.mtp.draft_vocab)


def _batch_oracle(wants: list[list[int]], p_right: float, seed: int = 0):
    """A batch MTPSpeculator drafting each row's plain tokens, each right with p_right, so that
    rows accept different counts."""
    rng = random.Random(seed)

    class Oracle(MTPSpeculator):
        emitted = 0
        rows = None

        def _draft(self, hidden, tokens):
            super()._draft(hidden, tokens)
            self.rows = self.rows or list(range(len(wants)))
            self.emitted += tokens.shape[1]
            drafts = []
            for r in self.rows:
                row = []
                for j in range(self.k):
                    i = self.emitted + j
                    t = wants[r][i] if i < len(wants[r]) else 0
                    row.append(t if rng.random() < p_right else (t + 1) % 384)
                drafts.append(row)
            self._drafts = mx.array(drafts)

        def filter(self, rows):
            super().filter(rows)
            self.rows = [self.rows[j] for j in rows.tolist()]

    return Oracle


BATCH = [PROMPT, PROMPT[3:7], [9, 8, 7, 6, 5, 4, 3, 2, 200, 201, 202, 203, 204, 205, 206]]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("draft", ["random", "oracle"])
def test_batch_same_tokens_as_greedy(model, tok, k, draft, monkeypatch):
    """Left-padded rows of different lengths and limits, rows accepting different counts (the
    smallest wins), rows leaving the batch: each row's tokens are plain greedy's."""
    limits = [N, 9, 17]
    want = generation.batch_generate(model, tok, BATCH, max_tokens=limits, mtp=False).tokens
    if draft == "oracle":
        monkeypatch.setattr(generation, "MTPSpeculator", _batch_oracle(want, 0.7))
    got = generation.batch_generate(model, tok, BATCH, max_tokens=limits, mtp=True, mtp_k=k)
    assert got.tokens == want
    assert got.mtp_acceptance is not None
    if draft == "oracle":
        assert got.mtp_acceptance > 0


def test_vlm_after_an_image_same_tokens_as_greedy(monkeypatch):
    """The VLM with an MTP head (random weights on the golden VLM): after an image, M-RoPE
    positions continue through verify passes and rollbacks; the tokens are plain greedy's."""
    from qwen35_mlx import load
    from qwen35_mlx.models.mtp import MTP
    from tests.models.factory import random_weights

    vlm_dir = GOLDEN.parent / "vlm"
    model, processor = load(vlm_dir)
    text = model.language_model
    text.mtp = MTP(text.config)
    text.mtp.load_weights(list(random_weights(text.mtp, seed=3).items()))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    image = vlm_dir / "image0.png"

    def tokens(**kw):
        return [
            r.token
            for r in stream_generate(model, processor, prompt, images=[image], max_tokens=16, **kw)
        ]

    want = tokens(mtp=False)
    assert len(want) >= 8
    assert tokens(mtp=True, mtp_k=2) == want
    monkeypatch.setattr(generation, "MTPSpeculator", _oracle(want, 0.7, V=text.config.vocab_size))
    assert tokens(mtp=True, mtp_k=3) == want


def test_fused_greedy_round_equals_separate_calls(monkeypatch):
    """At temperature 0 a round is one compiled call (`TextModel.verify_and_draft`: verify, then
    the MTP head over every position). The shipped tiny model (trained head, so drafts are often
    right): the same drafts, round by round, and tokens as with the verify pass and the MTP
    calls run separately."""
    from qwen35_mlx import load
    from qwen35_mlx.models import mtp as mtp_mod
    from qwen35_mlx.models.text import TextModel

    # The exact head's drafts (the native round head has its own tests, test_native_head_*).
    monkeypatch.setattr(mtp_mod, "NATIVE_HEAD", False)
    model, tok = load(Path(generation.__file__).parent / "assets" / "tiny")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is a list?"}], add_generation_prompt=True, tokenize=False
    )
    fused_calls = []
    orig = TextModel.verify_and_draft

    def counting(self, *args):
        out = orig(self, *args)
        fused_calls.append(out is not None)
        return out

    def run(k, fused):
        seen = []

        class Recording(MTPSpeculator):
            def _draft(self, hidden, tokens):
                super()._draft(hidden, tokens)
                seen.append(np.array(self._drafts).tolist())

        with monkeypatch.context() as m:
            m.setattr(generation, "MTPSpeculator", Recording)
            m.setattr(TextModel, "verify_and_draft", counting if fused else lambda *a: None)
            rs = list(stream_generate(model, tok, prompt, max_tokens=40, mtp=True, mtp_k=k))
        return [r.token for r in rs], seen, rs[-1].mtp_acceptance

    want = [r.token for r in stream_generate(model, tok, prompt, max_tokens=40, mtp=False)]
    for k in (1, 2):
        fused = run(k, True)
        assert fused_calls and all(fused_calls)
        fused_calls.clear()
        assert fused == run(k, False)
        assert fused[0] == want
        assert fused[2] > 0.3  # the trained head's drafts are often accepted


def _native_head_built() -> bool:
    from qwen35_mlx.kernels import cpu_ext

    return mx.default_device() == mx.cpu and hasattr(cpu_ext.load(), "mtp_head")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_native_head_same_tokens_as_greedy(tok, k, monkeypatch):
    """Greedy MTP with the round's native head (`mtp.NATIVE_HEAD`, float32 drafts), random
    dense weights, batch 1 and a left-padded batch of 2 (which takes MLX's head): plain greedy
    decoding's tokens."""
    if not _native_head_built():
        pytest.skip("the native head needs the CPU extension, built, on the CPU")
    calls = counting_native_head(monkeypatch)
    model = _model("dense", seed=7)
    want = _tokens(model, tok)
    assert _tokens(model, tok, mtp=True, mtp_k=k) == want
    assert calls and all(calls)
    prompts = [PROMPT, PROMPT[3:]]
    want = [
        [r.token for r in stream_generate(model, tok, p, max_tokens=N, mtp=False)] for p in prompts
    ]
    calls.clear()
    got = generation.batch_generate(model, tok, prompts, max_tokens=N, mtp=True, mtp_k=k)
    assert [list(t) for t in got.tokens] == want
    assert not calls  # (left padding: the native head is not traced)


def test_native_head_on_the_tiny_model(monkeypatch):
    """The shipped tiny model (trained head): with the native round head the tokens are plain
    greedy decoding's and the drafts are accepted as often as MLX's head's (within 2 points)."""
    from qwen35_mlx import load
    from qwen35_mlx.models import mtp as mtp_mod

    if not _native_head_built():
        pytest.skip("the native head needs the CPU extension, built, on the CPU")
    model, tok = load(Path(generation.__file__).parent / "assets" / "tiny")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is a list?"}], add_generation_prompt=True, tokenize=False
    )
    want = [r.token for r in stream_generate(model, tok, prompt, max_tokens=64, mtp=False)]
    calls = counting_native_head(monkeypatch)
    got = {}
    for on in (False, True):
        monkeypatch.setattr(mtp_mod, "NATIVE_HEAD", on)
        rs = list(stream_generate(model, tok, prompt, max_tokens=64, mtp=True, mtp_k=1))
        assert [r.token for r in rs] == want
        got[on] = rs[-1].mtp_acceptance
    assert calls and all(calls)
    assert got[True] >= got[False] - 0.02 and got[False] > 0.5


def test_rows_matmul_is_one_matrix_vector_product_a_row():
    """`layers.rows_matmul` (a verify pass's projections on CUDA): each row's result is the
    one-row product's, bit for bit (the same gemv on a GPU), in any leading shape."""
    from qwen35_mlx.models import layers

    for dtype in (mx.float32, mx.bfloat16):
        W = (mx.random.normal((300, 128), key=mx.random.key(1)) * 0.1).astype(dtype)
        w = W.T  # the step's decode weight: the transposed view
        x = mx.random.normal((2, 3, 128), key=mx.random.key(2)).astype(dtype)
        got = layers.rows_matmul(x, w)
        assert got.shape == (2, 3, 300)
        rows = x.reshape(6, 128)
        want = mx.concatenate([rows[i : i + 1] @ w for i in range(6)]).reshape(2, 3, 300)
        assert mx.array_equal(got, want).item()


def test_rows_gemv_is_off_on_the_cpu_and_for_one_row(monkeypatch):
    from qwen35_mlx.models import layers

    w = mx.zeros((64, 32)).T
    assert not layers._rows_gemv(mx.zeros((1, 64)), w)  # one row: MLX's gemv already
    monkeypatch.setattr(layers, "ROWS_GEMV", True)
    assert layers._rows_gemv(mx.zeros((3, 64)), w)
    monkeypatch.setattr(layers, "ROWS_GEMV", "auto")
    if mx.default_device() == mx.cpu:
        assert not layers._rows_gemv(mx.zeros((3, 64)), w)
    else:  # on a GPU: (rows - 1) x W's bytes over the limit keeps the GEMM (never evaluated)
        big = mx.zeros((1 << 20, 64)).T
        monkeypatch.setattr(layers, "ROWS_KERNEL", False)
        assert not layers._rows_gemv(mx.zeros((3, 64)), big)
        monkeypatch.setattr(layers, "ROWS_KERNEL", True)  # ... unless the kernel reads W once
        assert layers._rows_gemv(mx.zeros((3, 64)), big)


def _verify_and_steps(model, toks):
    """Logits of one verify pass of `toks` after PROMPT, and of one-token steps over them."""
    cache = model.make_cache()
    model(mx.array([PROMPT]), cache=cache)
    multi = model(mx.array([toks]), cache=cache, return_hidden=True)[0]
    cache = model.make_cache()
    model(mx.array([PROMPT]), cache=cache)
    singles = mx.concatenate([model(mx.array([[t]]), cache=cache) for t in toks], axis=1)
    return np.array(multi), np.array(singles)


def test_verify_rows_weights_follow_new_weights(monkeypatch):
    """The verify pass's row-wise projections read broadcast matrices made outside the step
    (`layers.rows_weights`, passed in as inputs): after new weights are loaded they are made
    again, so the pass still equals the one-token steps (stale matrices would give the old
    weights' logits). A new trace is not needed for that (the shapes did not change)."""
    from mlx.utils import tree_flatten

    from qwen35_mlx.models import layers

    monkeypatch.setattr(layers, "CPU_TRANSPOSED_WEIGHTS", False)
    monkeypatch.setattr(layers, "ROWS_GEMV", True)
    model = _model("dense")
    toks = [7, 42, 99]
    multi, singles = _verify_and_steps(model, toks)
    np.testing.assert_allclose(multi, singles, atol=1e-5, rtol=1e-5)
    before = multi
    new = [(k, v * 1.5) for k, v in tree_flatten(model.parameters()) if k.endswith("proj.weight")]
    model.load_weights(new, strict=False)
    multi, singles = _verify_and_steps(model, toks)
    np.testing.assert_allclose(multi, singles, atol=1e-5, rtol=1e-5)
    assert np.abs(multi - before).max() > 1e-2  # the new weights changed the logits


@pytest.mark.parametrize("k", [1, 3])
def test_verify_rows_as_gemv_same_tokens_and_logits_as_the_step(tok, monkeypatch, k):
    """The verify pass with every projection as one matrix-vector product a row (`ROWS_GEMV`,
    as on CUDA; here with the GPU's fused decode weights): its logits at every position are
    the one-token step's, and greedy MTP gives plain decoding's tokens."""
    from qwen35_mlx.models import layers

    monkeypatch.setattr(layers, "CPU_TRANSPOSED_WEIGHTS", False)
    monkeypatch.setattr(layers, "ROWS_GEMV", True)
    monkeypatch.setattr(layers, "ROWS_KERNEL", False)  # the broadcast form (the kernel: GPU tests)
    calls = []
    orig = layers._rows_product
    monkeypatch.setattr(layers, "_rows_product", lambda *a: calls.append(a[-1].shape) or orig(*a))
    model = _model("dense")  # fresh: its compiled steps trace with the setting above
    want = _tokens(model, tok, mtp=False)
    assert not calls  # one-token steps keep MLX's own gemv
    assert _tokens(model, tok, mtp=True, mtp_k=k) == want
    assert calls  # the verify pass (and the MTP head's lm_head) took the row-wise form

    # The logits of a verify pass of 3 tokens against three one-token steps.
    multi, singles = _verify_and_steps(model, [7, 42, 99])
    np.testing.assert_allclose(multi, singles, atol=1e-5, rtol=1e-5)


def _verify_primitives(model, T: int = 3):
    """Primitives by kind of one compiled verify pass of T tokens over a filled cache."""
    import collections
    import io
    import re

    cache = model.make_cache()
    mx.eval(model(mx.array([PROMPT]), cache=cache), [c.state for c in cache])
    logits = model(mx.array([PROMPT[:T]]), cache=cache)
    outs = [logits]
    for c in cache:
        outs += [c.keys, c.values] if hasattr(c, "keys") else c.cache
    buf = io.StringIO()
    mx.export_to_dot(buf, *outs)
    labels = re.findall(r'\[label ="([^"]+)", shape=rectangle\]', buf.getvalue())
    return collections.Counter("Compiled" if x.startswith("Compiled") else x for x in labels)


def test_verify_rows_as_gemv_add_only_reshapes(monkeypatch):
    """The row-wise projections of the compiled verify pass (`ROWS_GEMV`, CUDA's form) cost the
    graph no view of a weight (its broadcast matrices are inputs: `layers.rows_weights`) and
    at most two Reshapes a projection group (rows in as columns, out as rows; the MLP's chain
    and the attention's o_proj fewer): every primitive costs host time per call on a GPU."""
    from qwen35_mlx.models import layers

    monkeypatch.setattr(layers, "CPU_TRANSPOSED_WEIGHTS", False)
    monkeypatch.setattr(layers, "ROWS_KERNEL", False)  # the broadcast form (the GPU's kernel: none)
    counts = {}
    for rows in (False, True):
        monkeypatch.setattr(layers, "ROWS_GEMV", rows)
        counts[rows] = _verify_primitives(_model("dense"))  # fresh: traced with the setting
    off, on = counts[False], counts[True]
    assert on["Matmul"] == off["Matmul"]
    model = _model("dense")
    groups = sum(len(layer.decode_groups()) for layer in model.model.layers) - len(
        [1 for layer in model.model.layers if layer.is_linear]  # (conv1d: not a matmul)
    )
    extra = on - off
    assert set(extra) <= {"Reshape"}, dict(extra)  # no Transpose / Broadcast of a weight
    assert extra["Reshape"] <= 2 * groups, (dict(extra), groups)


def test_decode_batch_rows_as_gemv_equals_plain(monkeypatch):
    """A batch of a few rows decoding one token each takes the row-wise projections too (as on
    CUDA), with their broadcast matrices passed into the compiled step (`layers.rows_weights`):
    the same tokens and logits as the plain path."""
    from qwen35_mlx.models import layers
    from tests.test_fast_decode import TOKENS, greedy

    monkeypatch.setattr(layers, "CPU_TRANSPOSED_WEIGHTS", False)
    monkeypatch.setattr(layers, "ROWS_GEMV", True)
    monkeypatch.setattr(layers, "ROWS_KERNEL", False)  # the broadcast form (the kernel: GPU tests)
    seen = []
    orig = layers._rows_product
    monkeypatch.setattr(layers, "_rows_product", lambda *a: seen.append(a[-1].shape) or orig(*a))
    model = _model("dense")
    prompts = [[0, 0] + TOKENS[:4], TOKENS[4:10], [0] + TOKENS[10:15]]
    t_plain, l_plain = greedy(model, prompts, 6, False, [2, 0, 1])
    t_comp, l_comp = greedy(model, prompts, 6, True, [2, 0, 1])
    np.testing.assert_array_equal(t_comp, t_plain)
    np.testing.assert_allclose(l_comp, l_plain, atol=2e-5, rtol=1e-4)
    assert (3, model.config.hidden_size, 1) in seen  # the batch's rows took the row-wise form
    assert model._rows_cache[3][2]  # ... with matrices passed in


@pytest.mark.parametrize("rule", [True, "wide"], ids=["every", "wide"])
def test_verify_rows_through_the_kernel_entry(tok, monkeypatch, rule):
    """Where the few-rows kernel runs (`layers.ROWS_KERNEL`: a GPU), the verify pass's row-wise
    products call `rows_matmul.rows_matmul_t` with the decode weights' transposed views [K, N],
    rows out (no reshape around them), and the compiled steps get no broadcast matrices ("wide":
    only the products with N >= 2K, the lm_head among them; the others keep theirs); greedy
    MTP gives plain decoding's tokens. On the CPU no kernel runs: its entry is stood in by
    MLX's product, so this checks the call sites (the kernel itself: tests/kernels)."""
    from qwen35_mlx.kernels import rows_matmul as rk
    from qwen35_mlx.models import layers

    monkeypatch.setattr(layers, "CPU_TRANSPOSED_WEIGHTS", False)
    monkeypatch.setattr(layers, "ROWS_GEMV", True)
    monkeypatch.setattr(layers, "ROWS_KERNEL", rule)  # (off by default)
    monkeypatch.setattr(rk, "kernel_available", lambda dtype: True)
    seen = []

    def stand_in(x, w_t, out_shape=None):
        K, N = w_t.shape
        assert x.shape[-1] == K or x.shape[1:] == (K, 1), (x.shape, w_t.shape)
        seen.append((x.shape, w_t.shape, out_shape))
        y = x.reshape(-1, K) @ w_t
        return y.reshape(out_shape or rk._out_shape(x, K, N))

    monkeypatch.setattr(rk, "rows_matmul_t", stand_in)
    model = _model("dense")
    want = _tokens(model, tok, mtp=False)
    assert not seen  # one row: MLX's gemv
    assert _tokens(model, tok, mtp=True, mtp_k=2) == want
    assert seen
    H, V = model.config.hidden_size, model.config.vocab_size
    assert all(s[-1] != 1 or o is not None for s, _, o in seen)  # columns in: rows out
    assert any(w == (H, V) for _, w, _ in seen)  # the lm_head too
    broadcast = any(got[2] for got in model._rows_cache.values())
    if rule == "wide":
        assert all(w[1] >= 2 * w[0] for _, w, _ in seen)
        assert model._rows_cache and broadcast  # the others: the broadcast form, as before
        return
    assert any(s == (3, H) and o == (3, w[1]) for s, w, o in seen)  # chains in rows (3 rows)
    assert model._rows_cache and not broadcast


def test_rows_kernel_rule(monkeypatch):
    """`layers.ROWS_KERNEL`: True takes the kernel for every row-wise product of 1..8 rows of
    the weight's dtype, "large" only where the broadcast form would be over
    ROWS_GEMV_MAX_BYTES (a cuBLAS GEMM otherwise), "wide" only where the weight has at least
    twice as many outputs as inputs, False never; never where no kernel runs."""
    from qwen35_mlx.kernels import rows_matmul as rk
    from qwen35_mlx.models import layers

    small, big = mx.zeros((64, 32)).T, mx.zeros((1 << 20, 64)).T  # (never evaluated)
    if mx.default_device() == mx.cpu:
        assert not layers._rows_kernel(3, small, mx.float32)  # no kernel runs
    monkeypatch.setattr(rk, "kernel_available", lambda dtype: True)
    monkeypatch.setattr(layers, "ROWS_KERNEL", True)
    assert layers._rows_kernel(3, small, mx.float32) and layers._rows_kernel(8, big, mx.float32)
    assert not layers._rows_kernel(9, small, mx.float32)
    assert not layers._rows_kernel(3, small, mx.bfloat16)  # activations of another dtype
    monkeypatch.setattr(layers, "ROWS_KERNEL", "large")
    assert not layers._rows_kernel(3, small, mx.float32)
    assert layers._rows_kernel(3, big, mx.float32)
    monkeypatch.setattr(layers, "ROWS_KERNEL", "wide")  # w [K, N]: N >= 2K
    assert layers._rows_kernel(3, small, mx.float32) and layers._rows_kernel(8, big, mx.float32)
    assert not layers._rows_kernel(3, mx.zeros((127, 64)).T, mx.float32)  # N 127 < 2K
    assert not layers._rows_kernel(3, mx.zeros((32, 64)).T, mx.float32)  # down_proj-like
    assert not layers._rows_kernel(9, small, mx.float32)
    monkeypatch.setattr(layers, "ROWS_KERNEL", False)
    assert not layers._rows_kernel(3, big, mx.float32)
