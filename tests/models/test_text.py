"""TextModel: stack from layer_types, cache consistency, padding, sanitize, rotary, MoE routing."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from qwen35_mlx.models import layers as layers_lib
from qwen35_mlx.models.layers import (
    MLP,
    Attention,
    GatedDeltaNet,
    Rotary,
    SparseMoeBlock,
    apply_rotate_half,
    route,
)
from qwen35_mlx.models.text import TextModel
from tests.conftest import RTOL, rel_err
from tests.models.factory import make_moe_config, make_text_config, make_text_model

TOL = RTOL[mx.float32]
# Two attention layers, so that pad positions written by one attention layer reach another.
TWO_ATTN = ["full_attention", "linear_attention", "full_attention", "linear_attention"]
TOKENS = [3, 17, 5, 99, 42, 7, 8, 120, 1, 64, 33]


def _np(x):
    return np.array(x.astype(mx.float32))


@pytest.fixture(scope="module")
def dense():
    return make_text_model(make_text_config(layer_types=TWO_ATTN), seed=1)


@pytest.fixture(scope="module")
def moe():
    return make_text_model(make_moe_config(), seed=2)


def test_layers_follow_layer_types():
    types = ["full_attention", "linear_attention", "linear_attention", "full_attention"]
    m = TextModel(make_text_config(layer_types=types))
    for layer, t in zip(m.layers, types, strict=True):
        assert layer.is_linear == (t == "linear_attention")
        mixer = layer.linear_attn if layer.is_linear else layer.self_attn
        assert isinstance(mixer, GatedDeltaNet if layer.is_linear else Attention)
        assert isinstance(layer.mlp, MLP)
    assert all(
        isinstance(layer.mlp, SparseMoeBlock) for layer in TextModel(make_moe_config()).layers
    )
    mixed = TextModel(make_moe_config(mlp_only_layers=[2]))
    assert [type(layer.mlp) for layer in mixed.layers] == [SparseMoeBlock] * 2 + [
        MLP,
        SparseMoeBlock,
    ]
    cache = m.make_cache()
    assert [type(c).__name__ for c in cache] == ["KVCache", "ArraysCache", "ArraysCache", "KVCache"]


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_prefill_then_decode_matches_full_forward(which, request):
    m = request.getfixturevalue(which)
    x = mx.array([TOKENS])
    full = m(x)
    cache = m.make_cache()
    # A 2-token prefill is shorter than the conv window (K - 1 = 3): the conv state must pad.
    steps = [m(x[:, :2], cache=cache)]
    steps += [m(x[:, t : t + 1], cache=cache) for t in range(2, x.shape[1])]
    assert rel_err(_np(mx.concatenate(steps, axis=1)), _np(full)) < TOL


def test_chunked_prefill_matches_one_prefill(dense):
    x = mx.array([TOKENS])
    one = dense(x)
    cache = dense.make_cache()
    chunks = [dense(x[:, :5], cache=cache), dense(x[:, 5:], cache=cache)]
    assert rel_err(_np(mx.concatenate(chunks, axis=1)), _np(one)) < TOL


def test_left_padded_batch_matches_rows(dense):
    rows = [TOKENS, TOKENS[3:7], TOKENS[1:9]]
    T = max(map(len, rows))
    pads = [T - len(r) for r in rows]
    batch = mx.array([[0] * p + r for p, r in zip(pads, rows, strict=True)])
    cache = dense.make_cache(left_padding=pads)
    out = dense(batch, cache=cache)
    nxt = dense(mx.array([[11], [12], [13]]), cache=cache)
    for i, (p, r) in enumerate(zip(pads, rows, strict=True)):
        c = dense.make_cache()
        alone = dense(mx.array([r]), cache=c)
        assert rel_err(_np(out[i, p:]), _np(alone[0])) < TOL
        alone_next = dense(mx.array([[11 + i]]), cache=c)
        assert rel_err(_np(nxt[i]), _np(alone_next[0])) < TOL


def _batch_generator_tokens(model, prompts, step):
    gen = BatchGenerator(model, max_tokens=4, prefill_step_size=step)
    uids = gen.insert(prompts)
    toks = {u: [] for u in uids}
    logprobs = {u: [] for u in uids}
    while responses := gen.next_generated():
        for r in responses:
            toks[r.uid].append(r.token)
            logprobs[r.uid].append(_np(r.logprobs))
    gen.close()
    return [(toks[u], np.stack(logprobs[u])) for u in uids]


def test_mlx_lm_batch_generator_matches_rows(dense):
    # mlx-lm right-pads the prompts (cache.prepare(lengths=...), then finalize) and prefills
    # in steps of 3 here, so the linear layers see the `lengths` path across chunks.
    prompts = [TOKENS, TOKENS[2:6], TOKENS[4:10]]
    batched = _batch_generator_tokens(dense, prompts, step=3)
    for p, (toks, lp) in zip(prompts, batched, strict=True):
        alone_toks, alone_lp = _batch_generator_tokens(dense, [p], step=64)[0]
        assert toks == alone_toks
        assert rel_err(lp, alone_lp) < 1e-4  # log-softmax of logits that agree to 1e-5


def _to_hf(weights: dict, config, fused: bool) -> dict:
    """Undo sanitize: zero-centred norms, conv1d [C,1,K], HF expert forms, VLM prefix, mtp."""
    hf = {}
    norms = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight")
    for k, v in weights.items():
        if k.endswith(norms + ("k_norm.weight",)) or k == "model.norm.weight":
            v = v - 1.0
        if k.endswith("conv1d.weight"):
            v = v.swapaxes(1, 2)
        if ".mlp.experts." in k:
            base, proj = k.rsplit(".mlp.experts.", 1)
            proj = proj.split(".")[0]
            if fused:
                if proj == "gate_proj":
                    up = weights[k.replace("gate_proj", "up_proj")]
                    hf[base + ".mlp.experts.gate_up_proj"] = mx.concatenate([v, up], axis=1)
                elif proj == "down_proj":
                    hf[base + ".mlp.experts.down_proj"] = v
            else:
                for e in range(v.shape[0]):
                    hf[f"{base}.mlp.experts.{e}.{proj}.weight"] = v[e]
            continue
        hf[k.replace("model.", "model.language_model.", 1)] = v
    hf["mtp.fc.weight"] = mx.zeros((4, 4))
    hf["mtp.layers.0.input_layernorm.weight"] = mx.zeros((config.hidden_size,))
    return hf


@pytest.mark.parametrize("fused", [False, True])
def test_sanitize_idempotent_shifts_norms_once(fused, moe):
    ours = dict(tree_flatten(moe.parameters()))
    hf = _to_hf(ours, moe.config, fused)
    once = moe.sanitize(dict(hf))
    assert set(once) == set(ours)
    for k, v in ours.items():
        assert once[k].shape == v.shape, k
        assert rel_err(_np(once[k]), _np(v)) < TOL, k
    twice = moe.sanitize(dict(once))
    assert set(twice) == set(once)
    assert all(mx.array_equal(twice[k], once[k]).item() for k in once)
    # The gated norm is not a Qwen3_5RMSNorm: never shifted.
    k = "model.layers.0.linear_attn.norm.weight"
    assert mx.array_equal(once[k], ours[k]).item()


def test_sanitize_drops_tied_lm_head():
    m = TextModel(make_text_config(tie_word_embeddings=True))
    w = dict(tree_flatten(m.parameters()))
    w["lm_head.weight"] = mx.zeros((128, 64))
    assert "lm_head.weight" not in m.sanitize(w)
    m.load_weights(list(m.sanitize(w).items()), strict=True)


def test_mrope_identical_axes_matches_plain_rope(dense):
    x = mx.array([TOKENS[:7], TOKENS[3:10]])
    B, T = x.shape
    pos = mx.broadcast_to(mx.arange(T)[None, None], (3, B, T))
    assert rel_err(_np(dense(x, position_ids=pos)), _np(dense(x))) < TOL
    # With a cache offset too: positions continue from 5 on both paths.
    rope = Rotary(16, 8, 10000.0, [2, 1, 1])
    q = mx.random.normal((B, 4, T, 16))
    pos5 = mx.broadcast_to((mx.arange(T) + 5)[None, None], (3, B, T))
    cos, sin = rope.cos_sin(pos5)
    assert rel_err(_np(apply_rotate_half(q, cos, sin)), _np(rope(q, 5))) < TOL


@pytest.mark.parametrize("offset", [5, "rows"])
def test_rope_ops_path_equals_fast_rope(monkeypatch, offset):
    """Where MLX's CUDA rope launch would overflow its threadgroup (`rope_block_z`), Rotary
    takes the rotate-half ops path: the same rotation, with an int or a per-row offset."""
    B, T = 3, 2
    rope = Rotary(32, 16, 10000.0, [3, 3, 2])
    q = mx.random.normal((B, 4, T, 32), key=mx.random.key(4))
    off = 5 if offset == 5 else mx.array([0, 7, 30])
    fast = rope(q, off)
    monkeypatch.setattr(layers_lib, "_cuda_rope_block_too_deep", lambda *a: True)
    assert rel_err(_np(rope(q, off)), _np(fast)) < TOL


def test_rope_block_rule():
    """`rope_block_z` follows MLX 0.32's CUDA threadgroup sizing: the shipped tiny model's
    16 rotary dims (4 heads) overflow z from 128 one-token rows on (found on the H200:
    `cudaGraphAddKernelNode ... invalid argument` at batch 128); the released models' 64
    rotary dims never do."""
    z = layers_lib.rope_block_z
    assert z(16, (64, 4, 1, 32)) == 64 and z(16, (128, 4, 1, 32)) == 128
    assert z(4, (128, 4, 1, 16)) == 128  # the test factory's 4 rotary dims
    assert z(16, (1, 4, 1, 32)) == 1  # one row: a 2-D launch
    for B in (1, 2, 64, 128, 256, 1024):
        for heads in (2, 8, 16, 32):  # key / query heads of the released models
            for T in (1, 2, 8):
                assert z(64, (B, heads, T, 256)) <= 64


def _rope_numpy(x, pos, theta, R, section):
    """transformers' recomposition: t everywhere, then h at 1::3 and w at 2::3 within sections."""
    inv = 1.0 / theta ** (np.arange(0, R, 2, dtype=np.float64) / R)
    freqs = pos[..., None].astype(np.float64) * inv  # [3, B, T, R/2]
    f = freqs[0].copy()
    for dim, off in ((1, 1), (2, 2)):
        f[..., off : section[dim] * 3 : 3] = freqs[dim, ..., off : section[dim] * 3 : 3]
    emb = np.concatenate([f, f], -1)[:, None]  # [B, 1, T, R]
    xr, rest = x[..., :R], x[..., R:]
    rot = np.concatenate([-xr[..., R // 2 :], xr[..., : R // 2]], -1)
    return np.concatenate([xr * np.cos(emb) + rot * np.sin(emb), rest], -1)


def test_mrope_sections_match_numpy():
    R, section = 16, [4, 2, 2]  # 8 frequencies: t h w t h w t t (sections end at 6)
    rope = Rotary(20, R, 100.0, section)
    B, T = 2, 5
    pos = np.stack([np.arange(T) + 3, np.arange(T) * 2, 7 - np.arange(T)])
    pos = np.broadcast_to(pos[:, None], (3, B, T)).copy()
    pos[:, 1] += 4
    x = np.random.randn(B, 3, T, 20).astype(np.float32)
    cos, sin = rope.cos_sin(mx.array(pos))
    got = apply_rotate_half(mx.array(x), cos, sin)
    assert rel_err(_np(got), _rope_numpy(x, pos, 100.0, R, section)) < TOL


def test_router_renormalises_top_k():
    logits = np.random.randn(2, 3, 6).astype(np.float32)
    inds, w = route(mx.array(logits), 2, normalize=True)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.sort(np.argsort(-p, -1)[..., :2], -1)
    assert (np.sort(np.array(inds), -1) == top).all()
    ref = np.take_along_axis(p, np.array(inds), -1)
    assert rel_err(np.array(w), ref / ref.sum(-1, keepdims=True)) < TOL
    _, raw = route(mx.array(logits), 2, normalize=False)
    assert rel_err(np.array(raw), ref) < TOL


def test_moe_block_matches_numpy(moe):
    block = moe.layers[0].mlp
    x = np.random.randn(1, 3, 64).astype(np.float32)
    P = {k: _np(v).astype(np.float64) for k, v in tree_flatten(block.parameters())}
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    xs = x.reshape(-1, 64).astype(np.float64)
    ref = np.zeros_like(xs)
    for t, h in enumerate(xs):
        logits = P["gate.weight"] @ h
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[:2]
        w = p[top] / p[top].sum()
        for e, we in zip(top, w, strict=True):
            g = P["experts.gate_proj.weight"][e] @ h
            u = P["experts.up_proj.weight"][e] @ h
            ref[t] += we * (P["experts.down_proj.weight"][e] @ (silu(g) * u))
        s = P["shared_expert.down_proj.weight"] @ (
            silu(P["shared_expert.gate_proj.weight"] @ h) * (P["shared_expert.up_proj.weight"] @ h)
        )
        ref[t] += s / (1 + np.exp(-(P["shared_expert_gate.weight"] @ h)))
    got = _np(block(mx.array(x))).reshape(-1, 64)
    assert rel_err(got, ref) < TOL


def test_mlx_lm_prompt_cache_file_round_trip(dense, tmp_path):
    x = mx.array([TOKENS])
    cache = dense.make_cache()
    dense(x[:, :6], cache=cache)
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    # mlx-lm rebuilds classes by name: our LinearCache comes back as its plain ArraysCache.
    assert [type(c).__name__ for c in loaded] == [type(c).__name__ for c in cache]
    got = dense(x[:, 6:], cache=loaded)
    assert rel_err(_np(got), _np(dense(x)[:, 6:])) < TOL


def _np64(x):
    return np.array(x.astype(mx.float32)).astype(np.float64)


def _conv_qkv_numpy(conv_in, w, T, Hk, Dk, Hv, Dv):
    """Float64 NumPy: causal depthwise conv (tap K-1 on the current token), silu, split into q
    (l2-normalised, times Dk^-0.5), k (l2-normalised) and v, as transformers computes them."""
    B, K = conv_in.shape[0], w.shape[1]
    h = sum(conv_in[:, j : j + T] * w[:, j] for j in range(K))
    h = h / (1.0 + np.exp(-h))

    def l2(a):
        return a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6)

    q = l2(h[..., : Hk * Dk].reshape(B, T, Hk, Dk)) * Dk**-0.5
    k = l2(h[..., Hk * Dk : 2 * Hk * Dk].reshape(B, T, Hk, Dk))
    return q, k, h[..., 2 * Hk * Dk :].reshape(B, T, Hv, Dv)


def _gated_rms_norm_numpy(x, gate, weight, eps):
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight
    return y * gate / (1.0 + np.exp(-gate))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_compiled_decode_pieces_match_plain_ops(dtype):
    """The decode-only compiled conv/q/k/v split and the compiled gated norm against a float64
    NumPy reference (written apart from the model code), and equal to the same functions run
    op by op."""
    from qwen35_mlx.models import layers

    B, K, Hk, Dk, Hv, Dv = 3, 4, 2, 32, 4, 16
    C = 2 * Hk * Dk + Hv * Dv
    conv_in = mx.random.normal((B, K, C)).astype(dtype)
    w = mx.random.normal((C, K))
    # The layer casts the taps to the activation dtype; the reference starts from those values.
    ref = _conv_qkv_numpy(_np64(conv_in), _np64(w.astype(dtype)), 1, Hk, Dk, Hv, Dv)
    for compiled in (True, False):
        conv_qkv = layers._conv_qkv_decode if compiled else layers._conv_qkv
        for got, want in zip(conv_qkv(conv_in, w, 1, Hk, Dk, Hv, Dv), ref, strict=True):
            assert got.dtype == dtype and got.shape == want.shape
            assert rel_err(_np(got), want) < RTOL[dtype], compiled
    for got, want in zip(
        layers._conv_qkv_decode(conv_in, w, 1, Hk, Dk, Hv, Dv),
        layers._conv_qkv(conv_in, w, 1, Hk, Dk, Hv, Dv),
        strict=True,
    ):
        assert got.dtype == want.dtype == dtype
        assert rel_err(_np(got), _np(want)) < RTOL[dtype]
    x, gate, weight = mx.random.normal((2, 5, Hv, Dv)), mx.random.normal((2, 5, Hv, Dv)), w[:Dv, 0]
    x, gate = x.astype(dtype), gate.astype(dtype)
    got = layers._gated_rms_norm(x, gate, weight, 1e-6)
    assert got.dtype == dtype
    want = _gated_rms_norm_numpy(_np64(x), _np64(gate), _np64(weight), 1e-6)
    assert rel_err(_np(got), want) < RTOL[dtype]
    plain = (
        mx.fast.rms_norm(x, weight, 1e-6).astype(mx.float32)
        * mx.sigmoid(gate.astype(mx.float32))
        * gate.astype(mx.float32)
    ).astype(dtype)
    assert rel_err(_np(got), _np(plain)) < RTOL[dtype]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_split_qkv_compiled_norms_equal_the_ops_bit_for_bit(dtype):
    """Issue 9: `_split_qkv`'s l2 norms run compiled (fused elementwise around the sum); on
    strided q / k views of a conv output, at prefill and decode lengths, they equal the ops."""
    Hk, Dk, Hv, Dv = 2, 64, 4, 32
    C = 2 * Hk * Dk + Hv * Dv
    for T in (1, 7, 300):
        h = (mx.random.normal((2, T, C)) * 3).astype(dtype)
        q, k, v = layers_lib._split_qkv(h, Hk, Dk, Hv, Dv)
        hq, hk = h[..., : Hk * Dk], h[..., Hk * Dk : 2 * Hk * Dk]
        want_q = layers_lib._l2norm(hq.reshape(2, T, Hk, Dk)) * (Dk**-0.5)
        want_k = layers_lib._l2norm(hk.reshape(2, T, Hk, Dk))
        for got, want in ((q, want_q), (k, want_k)):
            assert got.dtype == want.dtype == dtype and got.shape == want.shape
            assert mx.array_equal(got, want).item(), (dtype, T)
        assert mx.array_equal(v, h[..., 2 * Hk * Dk :].reshape(2, T, Hv, Dv)).item()


def test_gradients_flow_through_compiled_layers(dense):
    """Training (examples/train_tiny.py) differentiates through the compiled pieces."""
    import mlx.nn as nn

    ids = mx.array([TOKENS])

    def loss(model):
        logits = model(ids[:, :-1])
        return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()

    value, grads = nn.value_and_grad(dense, loss)(dense)
    flat = dict(tree_flatten(grads))
    conv = [g for k, g in flat.items() if k.endswith("linear_attn.conv1d.weight")]
    norm = [g for k, g in flat.items() if k.endswith("linear_attn.norm.weight")]
    assert conv and norm and np.isfinite(value.item())
    assert all(float(mx.abs(g).max()) > 0 for g in conv + norm)


def test_conv_kernel_gradients_are_the_ops(monkeypatch):
    """MLX custom kernels have no vjp: with `layers.CONV_KERNEL` on, training differentiates
    through the conv kernel by the ops' vjp. The kernel is stood in for by the ops behind
    stop_gradient (a kernel without a vjp of its own); the gradients must equal the switch-off
    run's (without the layer's vjp the conv weights' gradients would be zero)."""
    import mlx.nn as nn

    from qwen35_mlx.kernels import conv_qkv

    model = make_text_model(make_text_config(), seed=6)
    ids = mx.array([[(7 * i + 3) % 100 for i in range(21)]])

    def stand_in(qkv, state, w, Hk, Dk, Hv, Dv, eps):
        B, T, C = qkv.shape
        state = mx.zeros((B, w.shape[1] - 1, C), qkv.dtype) if state is None else state
        conv_in = mx.concatenate([state.astype(qkv.dtype), qkv], axis=1)
        out = (*layers_lib._conv_qkv(conv_in, w, T, Hk, Dk, Hv, Dv), conv_in[:, T:])
        return tuple(mx.stop_gradient(a) for a in out)

    def loss(m):
        return nn.losses.cross_entropy(m(ids[:, :-1]), ids[:, 1:]).mean()

    monkeypatch.setattr(conv_qkv, "kernel_available", lambda x: True)
    monkeypatch.setattr(conv_qkv, "conv_qkv", stand_in)
    grads = {}
    for on in (False, True):
        monkeypatch.setattr(layers_lib, "CONV_KERNEL", on)
        value, g = nn.value_and_grad(model, loss)(model)
        grads[on] = (value, dict(tree_flatten(g)))
    assert np.isclose(grads[True][0].item(), grads[False][0].item(), rtol=1e-6)
    conv = [k for k in grads[False][1] if k.endswith("linear_attn.conv1d.weight")]
    assert conv and all(float(mx.abs(grads[False][1][k]).max()) > 0 for k in conv)
    for k, a in grads[False][1].items():
        assert np.allclose(np.array(grads[True][1][k]), np.array(a), rtol=1e-5, atol=1e-7), k


def test_conv_kernel_switch_routes_long_calls_only(monkeypatch):
    """Issue 9: with `layers.CONV_KERNEL` on, a call of more than CONV_KERNEL_MIN_T tokens a row
    takes `kernels.conv_qkv.conv_qkv` (its q, k, v and new conv state), a shorter one the ops.
    The kernel is stood in for by the ops themselves (no GPU here), so logits and caches must
    equal the switch-off run bit for bit: the layer passes the right state, weights and heads
    and stores what the kernel returns (a stand-in returning the state one row early fails
    this). With the switch off the stand-in is never called."""
    from qwen35_mlx.kernels import conv_qkv

    model = make_text_model(make_text_config(), seed=5)
    tokens = mx.array([[(5 * i + 2) % 100 for i in range(27)]])
    calls = []

    def stand_in(qkv, state, w, Hk, Dk, Hv, Dv, eps):
        B, T, C = qkv.shape
        assert eps == layers_lib._L2_EPS and C == 2 * Hk * Dk + Hv * Dv
        calls.append((T, state is None))
        state = mx.zeros((B, w.shape[1] - 1, C), qkv.dtype) if state is None else state
        conv_in = mx.concatenate([state.astype(qkv.dtype), qkv], axis=1)
        return (*layers_lib._conv_qkv(conv_in, w, T, Hk, Dk, Hv, Dv), conv_in[:, T:])

    monkeypatch.setattr(conv_qkv, "kernel_available", lambda x: True)
    monkeypatch.setattr(conv_qkv, "conv_qkv", stand_in)
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(layers_lib, "CONV_KERNEL", on)
        cache = model.make_cache()
        out = [model(tokens[:, s:e], cache=cache) for s, e in ((0, 12), (12, 21), (21, 27))]
        mx.eval(out)
        runs[on] = (mx.concatenate(out, axis=1), [c.state for c in cache])
    n_linear = sum(layer.is_linear for layer in model.layers)
    # with the switch on: the 12- and 9-token calls (the first without a state), not the 6
    assert calls == [(12, True)] * n_linear + [(9, False)] * n_linear
    assert mx.array_equal(runs[True][0], runs[False][0]).item()
    flat = zip(tree_flatten(runs[True][1]), tree_flatten(runs[False][1]), strict=True)
    for (_, a), (_, b) in flat:
        assert mx.array_equal(a, b).item() if isinstance(a, mx.array) else a == b
