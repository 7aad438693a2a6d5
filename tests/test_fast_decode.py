"""The compiled decode step (TextModel._decode) against the plain path, token for token.

Every case runs twice on the same backend: `model.compiled_decode = False` (the plain path:
mlx-lm's cache update, attention over the filled slice) and True (the compiled step over the
whole preallocated block). Greedy tokens must be equal and the logits close. `traces` checks the
compiled step really ran (and was traced once a block, not once a token).
"""

import collections
import io
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator, generate_step, maybe_quantize_kv_cache
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache

from qwen35_mlx import batch_generate, load, stream_generate
from qwen35_mlx.prompt_cache import PromptCache

from .conftest import assert_parameters_kept, prepare_decode_measured
from .models.factory import make_moe_config, make_text_config, make_text_model

GOLDEN = Path(__file__).parent / "data" / "golden"
TOKENS = [5, 17, 99, 3, 64, 23, 7, 120, 41, 8, 77, 2, 90, 31, 12, 55, 6, 101, 44, 19]


@pytest.fixture(scope="module")
def dense():
    return make_text_model(make_text_config(), seed=1)


@pytest.fixture(scope="module")
def moe():
    return make_text_model(make_moe_config(), seed=2)


@pytest.fixture
def gpu_layout(monkeypatch):
    """The GPU's decode weights (fused, transposed views) on the CPU too: without it, float32
    Linear layers on the CPU get their own transposed storage (`layers.CPU_TRANSPOSED_WEIGHTS`,
    tested in tests/test_cpu_decode.py), unfused."""
    from qwen35_mlx.models import layers

    monkeypatch.setattr(layers, "CPU_TRANSPOSED_WEIGHTS", False)


@pytest.fixture
def small_blocks(monkeypatch):
    """KV buffers grow 4 positions at a time: decode crosses block boundaries every 4 tokens."""
    monkeypatch.setattr(KVCache, "step", 4)
    monkeypatch.setattr(BatchKVCache, "step", 4)


class Traces:
    """Counts how often the compiled step's function is traced (it runs only when tracing)."""

    def __init__(self, model, monkeypatch):
        self.n = 0
        backbone = model.language_model.model if hasattr(model, "language_model") else model.model
        orig = backbone.decode

        def counting(*args):
            self.n += 1
            return orig(*args)

        monkeypatch.setattr(backbone, "decode", counting)
        text = model.language_model if hasattr(model, "language_model") else model
        # A fresh compiled function, so earlier tests' traces do not hide this one's.
        monkeypatch.setattr(text, "_decode_step", mx.compile(text._decode_impl, inputs=text))


def greedy(model, prompts, n, compiled, pads=None, force=None):
    """Prefill `prompts` [B, P] (left-padded by `pads`), decode n greedy tokens a row; with
    `force` [B, n], feed those tokens instead of the argmax (teacher forcing)."""
    text = model.language_model if hasattr(model, "language_model") else model
    text.compiled_decode = compiled
    try:
        cache = model.make_cache(left_padding=pads) if pads else model.make_cache()
        logits = model(mx.array(prompts), cache=cache)[:, -1]
        toks, outs = [], []
        for i in range(n):
            y = mx.argmax(logits, axis=-1) if force is None else mx.array(force[:, i])
            toks.append(y.tolist())
            outs.append(np.array(logits.astype(mx.float32)))
            logits = model(y[:, None], cache=cache)[:, -1]
        return np.array(toks).T, np.stack(outs, 1)
    finally:
        text.compiled_decode = True


def fused_rounding(model) -> bool:
    """Whether compiled and plain may round differently: a half-precision model on a GPU, where
    `mx.compile` fuses element-wise chains into generated kernels (measured on CUDA: bf16 MoE
    logits 0.07-0.15 apart after a few steps, the tokens equal; on the CPU the two are equal)."""
    text = model.language_model if hasattr(model, "language_model") else model
    dtype = text.model.embed_tokens.weight.dtype
    return mx.default_device() == mx.gpu and dtype in (mx.bfloat16, mx.float16)


def fp32_copy(model):
    """A float32 text model with `model`'s (already rounded) weights, on the plain path."""
    from mlx.utils import tree_map

    text = model.language_model if hasattr(model, "language_model") else model
    ref = make_text_model(text.config)
    ref.update(tree_map(lambda x: x.astype(mx.float32), text.parameters()))
    ref.compiled_decode = False
    return ref


def teacher_forced_fp32(model, prompts, toks, pads=None):
    """The plain path of a float32 copy of `model` (`fp32_copy`), fed `toks` [B, n]: the
    logits before each token, [B, n, V] fp32."""
    ref = fp32_copy(model)
    cache = ref.make_cache(left_padding=pads) if pads else ref.make_cache()
    logits = ref(mx.array(prompts), cache=cache)[:, -1]
    outs = []
    for i in range(toks.shape[1]):
        outs.append(np.array(logits))
        logits = ref(mx.array(toks[:, i : i + 1]), cache=cache)[:, -1]
    return np.stack(outs, 1)


def assert_as_accurate(plain, compiled, exact, slack=1.25):
    """The compiled step's logits are no further from the float32 evaluation `exact` than the
    plain path's (root mean square, within `slack`): rounding, not a wrong position or state,
    which would put them a logit scale away."""
    err = [float(np.sqrt(np.mean((x - exact) ** 2))) for x in (plain, compiled)]
    assert err[1] <= slack * err[0] + 1e-6, f"compiled rms error {err[1]:.4g}, plain {err[0]:.4g}"


def assert_same_decisions(compiled, exact, plain):
    """The compiled step's greedy token is the float32 evaluation's wherever that choice is
    beyond the plain path's rounding: where the float32 top-two margin exceeds twice the largest
    logit error the plain path made at that position (the plain token is then the exact one,
    and the compiled one is too unless it rounds worse there). Near-ties may go either way; at
    least a third of the positions must be decided, or the check says nothing."""
    top2 = np.sort(exact, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 2 * np.abs(plain - exact).max(-1)
    assert decided.mean() >= 1 / 3, f"only {decided.mean():.0%} of positions beyond rounding"
    np.testing.assert_array_equal(compiled.argmax(-1)[decided], exact.argmax(-1)[decided])


def assert_same(model, prompts, n, pads=None):
    """Greedy tokens and logits equal up to float32 reassociation; where compiled and plain
    round differently (`fused_rounding`: a half-precision model on a GPU), the compiled step,
    fed the plain path's tokens, as accurate as the plain path against a float32 evaluation of
    the same weights, and its tokens the same wherever the choice is beyond rounding (a random
    tiny model has near-ties that either rounding may flip, after which free-running greedy
    sequences part for good)."""
    t0, l0 = greedy(model, prompts, n, False, pads)
    if fused_rounding(model):
        _, l1 = greedy(model, prompts, n, True, pads, force=t0)
        exact = teacher_forced_fp32(model, prompts, t0, pads)
        assert_as_accurate(l0, l1, exact)
        text = model.language_model if hasattr(model, "language_model") else model
        # Not for MoE: top-k routing is discontinuous, so a router near-tie at any earlier token
        # may move every later logit by more than rounding (seen on the H200: one token of 36).
        if not text.config.num_experts:
            assert_same_decisions(l1, exact, l0)
        t1 = t0
    else:
        t1, l1 = greedy(model, prompts, n, True, pads)
        np.testing.assert_array_equal(t1, t0)
        np.testing.assert_allclose(l1, l0, atol=2e-5, rtol=1e-4)
    return t1


def test_accuracy_check_can_fail():
    """`assert_as_accurate` sees a compiled step that is off by more than rounding."""
    rng = np.random.default_rng(0)
    exact = rng.normal(size=(2, 6, 64))
    plain = exact + 0.01 * rng.normal(size=exact.shape)
    assert_as_accurate(plain, exact + 0.01 * rng.normal(size=exact.shape), exact)
    wrong = exact.copy()
    wrong[:, 3:] = exact[:, 2:-1]  # one position behind from the fourth step
    with pytest.raises(AssertionError, match="compiled rms error"):
        assert_as_accurate(plain, wrong, exact)


def test_decision_check_can_fail():
    """`assert_same_decisions` sees a token flipped where the float32 margin is wide, and
    forgives one flipped at a near-tie."""
    rng = np.random.default_rng(1)
    exact = rng.normal(size=(2, 6, 64))
    plain = exact + 0.001 * rng.normal(size=exact.shape)
    top = exact.argmax(-1)
    flipped = exact.copy()
    second = np.argsort(exact[0, 2])[-2]
    flipped[0, 2, second] = exact[0, 2, top[0, 2]] + 0.5  # a wide margin overturned
    with pytest.raises(AssertionError, match="not equal"):
        assert_same_decisions(flipped, exact, plain)
    tie = exact.copy()
    tie[0, 2, second] = exact[0, 2, top[0, 2]] - 1e-4  # a near-tie, either way is rounding
    tied = tie.copy()
    tied[0, 2, second] += 2e-4
    assert_same_decisions(tied, tie, tie + 0.001 * rng.normal(size=tie.shape))


@pytest.mark.parametrize("B", [1, 3, 5])
@pytest.mark.parametrize("P", [1, 2, 5, 11])
def test_compiled_decode_equals_plain(dense, small_blocks, monkeypatch, B, P):
    traces = Traces(dense, monkeypatch)
    prompts = [TOKENS[i : i + P] for i in range(B)]
    assert_same(dense, prompts, 14)
    # 14 steps over blocks of 4 positions: a trace per buffer size, never one per token.
    assert 1 <= traces.n <= 6


def test_compiled_decode_traces_once_within_a_block(dense, monkeypatch):
    traces = Traces(dense, monkeypatch)
    greedy(dense, [TOKENS[:6]], 30, True)
    assert traces.n == 1


def test_compiled_decode_left_padded_batch(dense, small_blocks):
    prompts = [[0, 0, 0] + TOKENS[:5], TOKENS[3:11], [0] + TOKENS[9:16]]
    assert_same(dense, prompts, 12, pads=[3, 0, 1])
    # The step advances the caches' per-row offsets and left padding itself: as the plain
    # path (mlx-lm's update_and_fetch / ArraysCache.advance) does, into one array per cache.
    books = []
    for compiled in (False, True):
        dense.compiled_decode = compiled
        cache = dense.make_cache(left_padding=[3, 0, 1])
        y = mx.argmax(dense(mx.array(prompts), cache=cache)[:, -1], axis=-1)
        for _ in range(5):
            y = mx.argmax(dense(y[:, None], cache=cache)[:, -1], axis=-1)
        arrays = [c.offset if isinstance(c, BatchKVCache) else c.left_padding for c in cache]
        assert len({id(a) for a in arrays}) == len(arrays)
        books.append([np.array(a).tolist() for a in arrays])
    dense.compiled_decode = True
    assert books[1] == books[0]


def test_compiled_decode_moe(moe, small_blocks):
    assert_same(moe, [TOKENS[:7], TOKENS[5:12]], 10)


def test_batch_generate_and_stream_generate_compiled_equal_plain(small_blocks):
    model, tok = load(GOLDEN / "generate")
    prompts = ["Hello there", "The quick brown fox jumps", "1 2 3"]
    runs = []
    for compiled in (False, True):
        model.compiled_decode = compiled
        b = batch_generate(model, tok, prompts, max_tokens=10)
        s = [r.token for r in stream_generate(model, tok, prompts[1], max_tokens=10)]
        runs.append((b.tokens, s))
    model.compiled_decode = True
    assert runs[0] == runs[1]


def test_resumed_prompt_cache_compiled_equals_plain(small_blocks):
    model, tok = load(GOLDEN / "generate")
    first = tok.encode("Hello, how are you today?")
    runs = []
    for compiled in (False, True):
        model.compiled_decode = compiled
        pc = PromptCache(model)
        a = list(stream_generate(model, tok, first, max_tokens=7, prompt_cache=pc))
        nxt = pc.tokens + tok.encode(" And then?", add_special_tokens=False)
        b = list(stream_generate(model, tok, nxt, max_tokens=7, prompt_cache=pc))
        assert pc.last_reused > 0
        runs.append([(r.token, np.array(r.logprobs)) for r in a + b])
    model.compiled_decode = True
    assert [t for t, _ in runs[0]] == [t for t, _ in runs[1]]
    np.testing.assert_allclose(
        np.stack([lp for _, lp in runs[1]]), np.stack([lp for _, lp in runs[0]]), atol=1e-4
    )


def test_mlx_lm_batch_generator_compiled_equals_plain(small_blocks):
    model, tok = load(GOLDEN / "generate")
    prompts = [tok.encode(p) for p in ("Hi", "Tell me a story about", "One two three four five")]
    runs = []
    for compiled in (False, True):
        model.compiled_decode = compiled
        gen = BatchGenerator(model, max_tokens=9)
        uids = gen.insert(prompts[:2])
        out = {u: [] for u in uids}
        steps = 0
        while responses := gen.next_generated():
            steps += 1
            if steps == 3:  # a late arrival: extend the running batch
                out.update({u: [] for u in gen.insert(prompts[2:])})
            for r in responses:
                out[r.uid].append(r.token)
        gen.close()
        runs.append(out)
    model.compiled_decode = True
    assert runs[0] == runs[1] and all(len(v) == 9 for v in runs[1].values())


def _vlm_prompt(processor, text, image):
    content = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image"})
    msgs = [{"role": "user", "content": content}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def _vlm_start(model, processor, text, image):
    """A conversation's cache and first logits after its prompt."""
    img = GOLDEN / "vlm" / "image0.png"
    inputs = processor(_vlm_prompt(processor, text, image), images=[img] if image else None)
    cache = model.make_cache()
    kw = {}
    if image:
        kw = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    logits = model(mx.array(inputs["input_ids"]), cache=cache, **kw)[:, -1]
    return cache, logits


def test_vlm_compiled_decode_after_an_image_equals_plain(monkeypatch):
    model, processor = load(GOLDEN / "vlm")
    traces = Traces(model, monkeypatch)
    runs = []
    for compiled in (False, True):
        model.language_model.compiled_decode = compiled
        cache, logits = _vlm_start(model, processor, "What?", True)
        toks, outs = [], []
        for _ in range(10):
            y = mx.argmax(logits, axis=-1)
            toks.append(y.item())
            outs.append(np.array(logits.astype(mx.float32)))
            logits = model(y[:, None], cache=cache)[:, -1]
        runs.append((toks, np.stack(outs)))
    model.language_model.compiled_decode = True
    assert traces.n >= 1  # the M-RoPE positions went through the compiled step
    assert runs[0][0] == runs[1][0]
    np.testing.assert_allclose(runs[1][1], runs[0][1], atol=1e-4)


def test_vlm_interleaved_conversations_equal_solo():
    # Issue #15 item 9: the M-RoPE state is the conversation's (its cache's), not the model's.
    model, processor = load(GOLDEN / "vlm")

    def solo(text, image):
        cache, logits = _vlm_start(model, processor, text, image)
        toks = []
        for _ in range(12):
            y = mx.argmax(logits, axis=-1)
            toks.append(y.item())
            logits = model(y[:, None], cache=cache)[:, -1]
        return toks

    ref_img, ref_txt = solo("What?", True), solo("Say something long.", False)
    a = _vlm_start(model, processor, "What?", True)
    b = _vlm_start(model, processor, "Say something long.", False)
    convs = [list(a), list(b)]
    got = [[], []]
    for _ in range(12):
        for i, conv in enumerate(convs):  # stepped in turn, as a server does
            y = mx.argmax(conv[1], axis=-1)
            got[i].append(y.item())
            conv[1] = model(y[:, None], cache=conv[0])[:, -1]
    assert got == [ref_img, ref_txt]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mlx_lm_kv_quantization_on_the_hybrid_cache(dtype):
    # Issue #15 item 10: the attention layers' caches quantize, the linear states pass through.
    # head_dim 64 and groups of 64 (mlx-lm's default kv_group_size): MLX CUDA's quantized_matmul
    # has no kernel for a 32-wide head in groups of 32 (seen on an H200, 2026-12-01), nor for
    # float32 activations (attention.dequantize_kv, 2026-12-02).
    model = make_text_model(make_text_config(head_dim=64), seed=3)
    model.set_dtype(getattr(mx, dtype))
    prompt = mx.array(TOKENS * 2)
    cache = model.make_cache()
    model(prompt[None], cache=cache)
    linear = [c for c in cache if not isinstance(c, KVCache)]
    maybe_quantize_kv_cache(cache, quantized_kv_start=0, kv_group_size=64, kv_bits=8)
    assert sum(isinstance(c, QuantizedKVCache) for c in cache) == 1
    assert [c for c in cache if not isinstance(c, QuantizedKVCache)] == linear

    def run(**kw):
        out = list(generate_step(prompt, model, max_tokens=8, **kw))
        return [t for t, _ in out], np.stack([np.array(lp.astype(mx.float32)) for _, lp in out])

    plain, plain_lp = run()
    quant, quant_lp = run(kv_bits=8, kv_group_size=64, quantized_kv_start=0)
    # 8-bit keys and values move the logits a little; the greedy choices of this model stay
    # for the first tokens. Logits compare while both runs have fed the same tokens (after a
    # differing token they are another context's: on the H200, bf16, step 8 differed by 4).
    assert quant[:4] == plain[:4]
    differ = [i for i, (a, b) in enumerate(zip(quant, plain, strict=True)) if a != b]
    n = (differ[0] if differ else len(plain)) + 1
    assert np.abs(quant_lp[:n] - plain_lp[:n]).max() < (0.5 if dtype == "float32" else 1.0)


def test_kv_quantization_dequantized_fallback_equals_quantized_attention(monkeypatch):
    # Where MLX has no quantized matmul (CUDA, float32), attention dequantizes the cache's keys
    # and values: the same attention as the quantized kernels compute where they exist.
    from qwen35_mlx.models import attention as attention_mod

    model = make_text_model(make_text_config(head_dim=64), seed=3)
    prompt = mx.array(TOKENS * 2)

    def run():
        kw = dict(max_tokens=6, kv_bits=8, kv_group_size=64, quantized_kv_start=0)
        out = list(generate_step(prompt, model, **kw))
        return [t for t, _ in out], np.stack([np.array(lp) for _, lp in out])

    quant, quant_lp = run()
    calls = []
    monkeypatch.setattr(attention_mod, "dequantize_kv", lambda q: calls.append(1) or True)
    deq, deq_lp = run()
    assert calls  # the fallback ran
    assert deq == quant
    np.testing.assert_allclose(deq_lp, quant_lp, atol=2e-4)


@pytest.mark.parametrize("kind", ["bfloat16", "quantized"])
def test_compiled_decode_bf16_and_quantized_weights(small_blocks, kind):
    # The weights are the compiled step's implicit inputs: a cast or nn.quantize after the
    # model was built (and its step created) must show in the step.
    import mlx.nn as nn

    model = make_text_model(make_text_config(), seed=4)
    greedy(model, [TOKENS[:7]], 3, True)  # traced with the fp32 weights first
    if kind == "bfloat16":
        model.set_dtype(mx.bfloat16)
    else:
        nn.quantize(
            model, group_size=32, bits=4, class_predicate=lambda _p, m: isinstance(m, nn.Linear)
        )
    assert_same(model, [TOKENS[:7], TOKENS[2:9]], 10)


@pytest.mark.parametrize("fold", [False, True], ids=["", "fold"])
@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_compiled_decode_from_float32_copies_same_numbers(dtype, tied, fold, monkeypatch):
    """`text.CPU_FP32_DECODE` "all" on the CPU: every half-precision projection of the compiled
    steps (the tied output layer included) from a float32 copy; the one-token steps' and a
    verify pass's logits are bit for bit those without copies (MLX's CPU multiplies
    half-precision matrices in float32 and rounds), and equal the plain path's. `fold`: the
    residual adds folded into the projections (`layers.FOLD_RESIDUAL`), in float32 too."""
    from qwen35_mlx.models import layers
    from qwen35_mlx.models import text as text_mod

    if mx.default_device() != mx.cpu:
        pytest.skip("the float32 copies are made on the CPU only")
    if fold:
        monkeypatch.setattr(layers, "FOLD_RESIDUAL", True)
        monkeypatch.setattr(layers, "ADD_NORM", False)
    model = make_text_model(make_text_config(tie_word_embeddings=tied), seed=4)
    model.set_dtype(dtype)
    prompts = [TOKENS[:7], TOKENS[2:9]]

    def run(mode):
        monkeypatch.setattr(text_mod, "CPU_FP32_DECODE", mode)
        toks, logits = greedy(model, prompts, 6, True)
        cache = model.make_cache()
        model(mx.array([TOKENS[:7]]), cache=cache)
        verify = model(mx.array([TOKENS[7:10]]), cache=cache)
        mlp = layers._made(model.model.layers[0].mlp, ("gate_proj", "up_proj"))
        tied = model.config.tie_word_embeddings
        head = layers._made(*((model.model, ("embed_tokens",)) if tied else (model, ("lm_head",))))
        return toks, logits, np.array(verify.astype(mx.float32)), mlp.fp32, head.fp32

    t0, l0, v0, *f0 = run(False)
    t1, l1, v1, *f1 = run("all")
    assert f0 == [False, False] and f1 == [True, True]
    np.testing.assert_array_equal(t1, t0)
    assert np.array_equal(l1, l0) and np.array_equal(v1, v0)
    t2, l2 = greedy(model, prompts, 6, False)  # the plain path (its own half weights)
    np.testing.assert_array_equal(t2, t0)
    assert np.array_equal(l2, l0)


def test_vlm_positions_survive_kv_quantization():
    # mlx-lm's `maybe_quantize_kv_cache` (--kv-bits) replaces each KVCache with a new
    # QuantizedKVCache: the M-RoPE state must not be lost with the replaced object.
    model, processor = load(GOLDEN / "vlm")
    cache, _ = _vlm_start(model, processor, "What?", True)
    before = np.array(model._decode_positions(cache, 1, 1))
    maybe_quantize_kv_cache(cache, quantized_kv_start=0, kv_group_size=32, kv_bits=8)
    assert any(isinstance(c, QuantizedKVCache) for c in cache)
    np.testing.assert_array_equal(np.array(model._decode_positions(cache, 1, 1)), before)


# --- The compiled step's primitives (issue #8: each costs host time per token on a GPU) ---

_NODE = re.compile(r'\[label ="([^"]+)", shape=rectangle\]')


def step_primitives(model, compiled: bool) -> collections.Counter:
    """Primitives by kind of one decode step of `model` (graph of the logits and every cache
    array the step wrote, as `mx.export_to_dot` lists them; evaluated inputs not counted)."""
    model.compiled_decode = compiled
    try:
        cache = model.make_cache()
        logits = model(mx.array([TOKENS[:5]]), cache=cache)
        mx.eval(logits, [c.state for c in cache])
        y = mx.argmax(logits[:, -1], axis=-1)[:, None]
        mx.eval(y)
        outs = [model(y, cache=cache)]
        for c in cache:  # the buffers themselves (KVCache.state would slice them)
            outs += [c.keys, c.values] if isinstance(c, KVCache) else list(c.cache)
        buf = io.StringIO()
        mx.export_to_dot(buf, *outs)
    finally:
        model.compiled_decode = True
    labels = _NODE.findall(buf.getvalue())
    return collections.Counter("Compiled" if x.startswith("Compiled") else x for x in labels)


def linear_decode_primitives(model) -> int:
    """Primitives of one call of `layers.gated_delta_decode` (the linear layers' conv, norms
    and recurrence, compiled alone), at the shapes of `model`'s first linear layer."""
    from qwen35_mlx.models import layers

    la = next(x.linear_attn for x in model.model.layers if x.is_linear)
    C, K, Hv = la.conv_dim, la.conv_kernel_size, la.num_v_heads
    args = [mx.zeros((1, C)), mx.zeros((1, K - 1, C)), mx.zeros((C, K))]
    args += [mx.zeros((1, Hv)), mx.zeros((1, Hv)), mx.zeros((Hv,)), mx.zeros((Hv,))]
    args.append(mx.zeros((1, Hv, la.head_v_dim, la.head_k_dim)))
    mx.eval(args)
    heads = dict(num_k_heads=la.num_k_heads, head_k_dim=la.head_k_dim)
    heads.update(num_v_heads=Hv, head_v_dim=la.head_v_dim)
    outs = mx.compile(lambda *a: layers.gated_delta_decode(*a, **heads))(*args)
    buf = io.StringIO()
    mx.export_to_dot(buf, *outs)
    return len(_NODE.findall(buf.getvalue()))


# Measured 2026-12-01 on the CPU (MLX 0.32.4) for `dense` (4 layers: 3 linear, 1 attention,
# fp32): the compiled step has 316 primitives (435 before [B, H] activations and fused
# projections; the plain path 587), of which 3 x 60 are `gated_delta_decode`'s (its mx ops on
# the CPU; one launch for a fused kernel). The bound is on the rest, the step's own ops, so it
# holds whichever implementation of `gated_delta_decode` is plugged in (checked with the kernel
# module's: 334 = 136 + 3 x 66). A GPU runs rms_norm, rope and attention as one primitive each
# where the CPU runs their fallback graphs, so its count is lower.
STEP_MAX_PRIMITIVES_BESIDES_LINEAR_DECODE = 136


def test_compiled_decode_primitive_count(gpu_layout):
    dense = make_text_model(make_text_config(), seed=1)  # fresh: prepared in the GPU layout
    kinds = step_primitives(dense, True)
    n_linear = sum(x.is_linear for x in dense.model.layers)
    n = sum(kinds.values()) - n_linear * linear_decode_primitives(dense)
    bound = STEP_MAX_PRIMITIVES_BESIDES_LINEAR_DECODE
    assert n <= bound, (
        f"the compiled decode step of the tiny model has {n} primitives besides its "
        f"{n_linear} gated_delta_decode calls, more than the {bound} measured (the whole step "
        f"by kind: {dict(kinds.most_common())}). Each costs ~10 us a token on a GPU. "
        "Re-measure with `python -m pytest -q tests/test_fast_decode.py -k primitive_count` "
        "and the real shapes with `python benchmarks/count_decode_ops.py --by-kind`; raise the "
        "bound only for ops the step needs, and say why in benchmarks/NOTES.md."
    )


# --- Fused decode projections (layers.prepare_projections) ---


def _fused_groups(model):
    """(owner, names) of every group the compiled step applies as one matmul."""
    out = []
    for layer in model.model.layers:
        for owner in (layer.linear_attn if layer.is_linear else layer.self_attn, layer.mlp):
            for names in owner.DECODE_GROUPS:
                made = getattr(owner, "_decode_" + names[0] + "_made", None)
                if made is not None and made.fused and len(names) > 1:
                    out.append((owner, names, made))
    return out


def test_fused_projections_share_memory_and_keep_the_parameters(tmp_path, gpu_layout):
    model = make_text_model(make_text_config(hidden_size=128, intermediate_size=256), seed=5)
    params, grown = prepare_decode_measured(model)
    groups = _fused_groups(model)
    # in_proj_qkv/z/b/a of 3 linear layers, q/k/v of 1 attention layer, gate/up of 4 MLPs
    assert len(groups) == 8
    fused_bytes = sum(owner[n].weight.nbytes for owner, names, _ in groups for n in names)
    # The layers' weights are now views of the fused buffers: no second copy is kept.
    assert grown < fused_bytes / 10, (grown, fused_bytes)
    assert_parameters_kept(model, params, tmp_path / "w.safetensors")
    # Built once: later steps (and the trace) keep the same fused buffers.
    greedy(model, [TOKENS[:4]], 2, True)
    made = [m for _, _, m in _fused_groups(model)]
    greedy(model, [TOKENS[:4]], 6, True)
    assert [m for _, _, m in _fused_groups(model)] == made


@pytest.mark.parametrize("fuse", [True, False])
def test_decode_projections_bf16_equal_plain(small_blocks, monkeypatch, fuse):
    # layers.FUSE_DECODE_PROJECTIONS = False: one transposed view per layer, no fused matrix.
    from qwen35_mlx.models import layers

    monkeypatch.setattr(layers, "FUSE_DECODE_PROJECTIONS", fuse)
    model = make_text_model(make_text_config(), seed=11)
    model.set_dtype(mx.bfloat16)
    assert_same(model, [TOKENS[:7], TOKENS[2:9], TOKENS[5:12]], 10)
    assert bool(_fused_groups(model)) == fuse
    la = model.model.layers[0].linear_attn
    made = la._decode_in_proj_qkv_made
    entry = la["_decode_in_proj_qkv"]
    assert made.fused == fuse
    assert isinstance(entry, mx.array) if fuse else len(entry) == 4


def test_fused_projections_follow_new_weights(small_blocks, gpu_layout):
    model = make_text_model(make_text_config(), seed=7)
    first = greedy(model, [TOKENS[:6]], 8, True)[0]
    assert _fused_groups(model)
    other = make_text_model(make_text_config(), seed=8)
    model.load_weights(list(tree_flatten(other.parameters())), strict=True)
    # Same shapes and dtypes: the compiled step is not retraced, its fused weights are rebuilt.
    toks = assert_same(model, [TOKENS[:6], TOKENS[3:9]], 8)
    np.testing.assert_array_equal(toks, greedy(other, [TOKENS[:6], TOKENS[3:9]], 8, False)[0])
    assert not np.array_equal(toks[:1], first)


def test_fused_projections_skip_lora_layers(small_blocks, gpu_layout):
    from mlx_lm.tuner.lora import LoRALinear

    model = make_text_model(make_text_config(), seed=9)
    greedy(model, [TOKENS[:5]], 2, True)
    la, attn = model.model.layers[0].linear_attn, model.model.layers[1].self_attn
    la.in_proj_z = LoRALinear.from_base(la.in_proj_z, r=4)
    attn.q_proj = LoRALinear.from_base(attn.q_proj, r=4)
    for lora in (la.in_proj_z, attn.q_proj):
        lora.lora_b = mx.random.normal(lora.lora_b.shape, key=mx.random.key(3)) * 0.1
    assert_same(model, [TOKENS[:5], TOKENS[7:12]], 8)
    fused = [(owner, names[0]) for owner, names, _ in _fused_groups(model)]
    assert not any(o is la or o is attn for o, _ in fused)  # the groups with a LoRA layer
    assert len(fused) == 6  # the others still are: 2 in_proj, 4 gate/up


def test_compiled_decode_quantized_moe(small_blocks):
    # Router and shared-expert gate at 8 bits (the model's quant_predicate), the rest 4: the
    # gates fuse with each other, the experts stay mlx-lm's SwitchGLU. Hidden 128, wider than
    # the gates' group of 64: MLX 0.32's Hopper quantized matmul (taken for several rows where
    # one group spans the whole input, group_size >= K) gave wrong, changing results on the
    # H200 (benchmarks/probe_quantized_prefill.py sweep; NOTES, session 10).
    import mlx.nn as nn

    config = make_moe_config(shared_expert_intermediate_size=64, hidden_size=128)
    model = make_text_model(config, seed=10)
    greedy(model, [TOKENS[:5]], 2, True)
    pred = model.quant_predicate
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda p, m: (
            hasattr(m, "to_quantized") and not isinstance(m, nn.Embedding) and pred(p, m)
        ),
    )
    moe = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    assert isinstance(moe.gate, nn.QuantizedLinear) and moe.gate.bits == 8
    assert_same(model, [TOKENS[:5], TOKENS[7:12]], 8)
    assert moe._decode_gate_made.quant["bits"] == 8


# The compiled multi-token step (TextModel._verify: a speculative verify pass, T = 2..8 tokens a
# row) and the MTP head's compiled step (TextModel._mtp_compiled), against the plain path.


class VerifyTraces:
    """Counts how often the compiled multi-token step (and the MTP head's) is traced."""

    def __init__(self, model, monkeypatch):
        self.n = 0
        self.mtp = 0
        orig = model.model.verify

        def counting(*args):
            self.n += 1
            return orig(*args)

        monkeypatch.setattr(model.model, "verify", counting)
        monkeypatch.setattr(model, "_verify_step", mx.compile(model._verify_impl, inputs=model))
        if model.has_mtp:
            cls = type(model.mtp)
            orig_mtp = cls.__call__

            def counting_mtp(*args):
                self.mtp += 1
                return orig_mtp(*args)

            monkeypatch.setattr(cls, "__call__", counting_mtp)
            monkeypatch.setattr(model, "_mtp_step", mx.compile(model._mtp_impl, inputs=model))


# (tokens fed, tokens trimmed back after): multi-token passes with partial and full
# acceptance, a whole rejection, and one-token steps between them.
ROUNDS = [(2, 1), (3, 0), (1, 0), (4, 2), (2, 0), (3, 2), (1, 0), (2, 1), (4, 0), (3, 1)]


def verify_rounds(model, prompts, compiled, pads=None, rounds=ROUNDS):
    """Prefill, then feed `rounds` of T tokens a row (return_hidden) and trim back as a
    speculative round does; the logits and hidden states of every pass and the final states."""
    model.compiled_decode = compiled
    try:
        cache = model.make_cache(left_padding=pads) if pads else model.make_cache()
        model(mx.array(prompts), cache=cache)
        B, outs, j = len(prompts), [], 0
        for T, back in rounds:
            toks = mx.array([[TOKENS[(j + 3 * b + t) % len(TOKENS)] for t in range(T)]
                             for b in range(B)])  # fmt: skip
            j += T - back
            logits, h = model(toks, cache=cache, return_hidden=True)
            outs.append((np.array(logits), np.array(h)))
            for c in cache:
                assert c.trim(back) == back
        last = model(mx.array([[TOKENS[0]]] * B), cache=cache)
        outs.append((np.array(last), None))
        states = [np.array(c[1]) for c in cache if not hasattr(c, "keys")]
        return outs, states, cache
    finally:
        model.compiled_decode = True


def assert_verify_same(model, prompts, pads=None):
    plain, s0, _ = verify_rounds(model, prompts, False, pads)
    comp, s1, cache = verify_rounds(model, prompts, True, pads)
    for (l0, h0), (l1, h1) in zip(plain, comp, strict=True):
        np.testing.assert_allclose(l1, l0, atol=2e-5, rtol=1e-4)
        if h0 is not None:
            np.testing.assert_allclose(h1, h0, atol=2e-5, rtol=1e-4)
    for a, b in zip(s0, s1, strict=True):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4)
    return cache


def test_compiled_verify_equals_plain_across_blocks(dense, small_blocks, monkeypatch):
    """Blocks of 4 positions: passes of 2-4 tokens start and end on both sides of a block
    boundary; rollbacks after partial acceptance trim into the last pass."""
    traces = VerifyTraces(dense, monkeypatch)
    assert_verify_same(dense, [TOKENS[:5]])
    assert traces.n >= 3  # T = 2, 3, 4 went through the compiled step


@pytest.mark.parametrize("P", [1, 6])
def test_compiled_verify_left_padded_batch(dense, small_blocks, P):
    prompts = [[0, 0, 0] + TOKENS[:P], TOKENS[3 : 6 + P], [0, 0] + TOKENS[9 : 10 + P]]
    cache = assert_verify_same(dense, prompts, pads=[3, 0, 2])
    # Per-row offsets and left padding advanced into one array per cache, as the plain path.
    arrays = [c.offset if isinstance(c, BatchKVCache) else c.left_padding for c in cache]
    assert len({id(a) for a in arrays}) == len(arrays)


def test_compiled_verify_moe(moe, small_blocks):
    assert_verify_same(moe, [TOKENS[:7], TOKENS[5:12]])


def test_compiled_verify_traces_once_per_T_within_a_block(dense, monkeypatch):
    traces = VerifyTraces(dense, monkeypatch)
    rounds = [(2, 1), (2, 0), (2, 1), (2, 1), (2, 0), (2, 1)] * 4
    verify_rounds(dense, [TOKENS[:6]], True, rounds=rounds)
    assert traces.n == 1
    verify_rounds(dense, [TOKENS[:6]], True, rounds=rounds + [(3, 2), (3, 1), (3, 0)])
    assert traces.n == 2


@pytest.fixture(scope="module")
def with_mtp():
    return make_text_model(make_text_config(mtp_num_hidden_layers=1), seed=3)


def mtp_rounds(model, compiled, pads=None):
    """The MTP head over its own cache as the speculator drives it: a prefill, then calls of
    1-3 positions (last position's logits) with trims of the draft chain between them."""
    model.compiled_decode = compiled
    try:
        B = 1 if pads is None else len(pads)
        H = model.config.hidden_size
        hidden = mx.random.normal((B, 40, H), key=mx.random.key(7))
        toks = mx.array([[TOKENS[(i + b) % len(TOKENS)] for i in range(40)] for b in range(B)])
        cache = model.make_mtp_cache(left_padding=pads)
        model.mtp_forward(hidden[:, :5], toks[:, :5], cache)
        outs, i = [], 5
        for T, back in [(1, 0), (1, 1), (2, 0), (1, 0), (3, 1), (1, 0), (2, 1), (2, 0)] * 2:
            logits, o = model.mtp_forward(hidden[:, i : i + T], toks[:, i : i + T], cache,
                                          last_only=True)  # fmt: skip
            outs.append((np.array(logits), np.array(o)))
            i += T - back
            cache[0].trim(back)
        return outs
    finally:
        model.compiled_decode = True


@pytest.mark.parametrize("pads", [None, [2, 0, 1]])
def test_compiled_mtp_equals_plain(with_mtp, small_blocks, monkeypatch, pads):
    traces = VerifyTraces(with_mtp, monkeypatch)
    plain = mtp_rounds(with_mtp, False, pads)
    assert traces.mtp > 0 and traces.n == 0
    n_plain = traces.mtp
    comp = mtp_rounds(with_mtp, True, pads)
    for (l0, h0), (l1, h1) in zip(plain, comp, strict=True):
        np.testing.assert_allclose(l1, l0, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(h1, h0, atol=2e-5, rtol=1e-4)
    # The compiled run traced (T = 1, 2, 3 per buffer size), it did not run the head per call.
    assert 3 <= traces.mtp - n_plain - 1 < len(comp)


def test_compiled_mtp_traces_once_per_T_within_a_block(with_mtp, monkeypatch):
    traces = VerifyTraces(with_mtp, monkeypatch)
    mtp_rounds(with_mtp, True)
    assert traces.mtp == 1 + 3  # the plain prefill, then one trace for each of T = 1, 2, 3


def test_large_batch_decodes_as_rows_alone():
    """160 rows, compiled and plain: on CUDA this is where MLX's rope launch overflowed its
    threadgroup for small rotary dimensions (`layers.rope_block_z`; the factory model has 4),
    which failed every step from batch 128 on. Each row's tokens equal the row decoded alone."""
    model = make_text_model(make_text_config(), seed=12)
    prompts = [(TOKENS * 2)[i % 14 : i % 14 + 6] for i in range(160)]
    toks = assert_same(model, prompts, 4)
    for i in (0, 13, 159):
        alone, _ = greedy(model, [prompts[i]], 4, True)
        np.testing.assert_array_equal(alone[0], toks[i])
