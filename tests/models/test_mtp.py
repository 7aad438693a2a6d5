"""The MTP head (models/mtp.py): against a float64 NumPy reference written from vLLM's
`qwen3_5_mtp.py` definition, and its weights through Hugging Face layout -> load -> save_mlx /
convert -> load."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen35_mlx.convert import convert, save_mlx
from qwen35_mlx.loader import load_model
from qwen35_mlx.models.text import TextModel
from tests.conftest import RTOL, rel_err
from tests.drafts import counting_native_head
from tests.models.factory import make_moe_config, make_text_config, make_text_model

TOL = RTOL[mx.float32]
GOLDEN = Path(__file__).parent.parent / "data" / "golden"
TOKENS = [3, 17, 5, 99, 42, 7, 8, 120, 1, 64, 33]


def _w(weights, name):
    return np.asarray(weights[name], dtype=np.float64)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _layer_ref(x, W, p, cfg, positions):
    """One full-attention decoder layer (dense MLP), float64. x [T, H]."""
    T = x.shape[0]
    nh, nkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    h = _rms(x, _w(W, p + "input_layernorm.weight"), eps)
    q = (h @ _w(W, p + "self_attn.q_proj.weight").T).reshape(T, nh, 2 * D)
    q, gate = q[..., :D], q[..., D:].reshape(T, nh * D)
    q = _rms(q, _w(W, p + "self_attn.q_norm.weight"), eps)
    k = (h @ _w(W, p + "self_attn.k_proj.weight").T).reshape(T, nkv, D)
    k = _rms(k, _w(W, p + "self_attn.k_norm.weight"), eps)
    v = (h @ _w(W, p + "self_attn.v_proj.weight").T).reshape(T, nkv, D)
    R = cfg.rotary_dim
    inv = cfg.rope_theta ** (-np.arange(0, R, 2) / R)
    ang = positions[:, None] * inv[None]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None]

    def rot(t):
        r = t[..., :R]
        half = np.concatenate([-r[..., R // 2 :], r[..., : R // 2]], -1)
        return np.concatenate([r * cos + half * sin, t[..., R:]], -1)

    q, k = rot(q), rot(k)
    out = np.zeros((T, nh, D))
    for head in range(nh):
        kh = head // (nh // nkv)
        s = q[:, head] @ k[:, kh].T * D**-0.5
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        out[:, head] = a @ v[:, kh]
    o = out.reshape(T, nh * D) * (1 / (1 + np.exp(-gate)))
    x = x + o @ _w(W, p + "self_attn.o_proj.weight").T
    h = _rms(x, _w(W, p + "post_attention_layernorm.weight"), eps)
    m = _silu(h @ _w(W, p + "mlp.gate_proj.weight").T) * (h @ _w(W, p + "mlp.up_proj.weight").T)
    return x + m @ _w(W, p + "mlp.down_proj.weight").T


def mtp_reference(weights, cfg, hidden, next_tokens, return_o=False):
    """logits [T, V] of the MTP head from its definition: fc([norm(embed(x_{i+1})) | norm(h_i)]),
    a full-attention layer at positions 0..T-1, norm, lm_head. Norm weights as applied.
    `return_o`: (logits, the head's output o [T, H])."""
    eps = cfg.rms_norm_eps
    emb = _w(weights, "model.embed_tokens.weight")[next_tokens]
    e = _rms(emb, _w(weights, "mtp.pre_fc_norm_embedding.weight"), eps)
    h = _rms(np.asarray(hidden, np.float64), _w(weights, "mtp.pre_fc_norm_hidden.weight"), eps)
    u = np.concatenate([e, h], -1) @ _w(weights, "mtp.fc.weight").T
    u = _layer_ref(u, weights, "mtp.layers.0.", cfg, np.arange(len(next_tokens), dtype=np.float64))
    o = _rms(u, _w(weights, "mtp.norm.weight"), eps)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return (o @ _w(weights, head).T, o) if return_o else o @ _w(weights, head).T


@pytest.fixture(scope="module")
def dense():
    return make_text_model(make_text_config(mtp_num_hidden_layers=1), seed=4)


def _mtp_logits(model, tokens=TOKENS):
    """MTP logits over a prompt: hidden h_i of the backbone, next tokens x_{i+1}."""
    ids = mx.array(tokens)[None]
    _, h = model(ids, return_hidden=True)
    logits, _ = model.mtp_forward(h[:, :-1], ids[:, 1:], model.make_mtp_cache())
    return np.array(logits[0]), np.array(h[0, :-1])


@pytest.mark.parametrize("tied", [False, True])
def test_mtp_forward_matches_numpy_reference(tied):
    model = make_text_model(
        make_text_config(mtp_num_hidden_layers=1, tie_word_embeddings=tied), seed=5
    )
    assert model.has_mtp
    logits, hidden = _mtp_logits(model)
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    ref = mtp_reference(weights, model.config, hidden, np.array(TOKENS[1:]))
    assert rel_err(logits, ref) < 10 * TOL


def test_mtp_cache_matches_one_call(dense):
    """The MTP layer over a prompt in one call == over it in pieces (its KV cache, offsets)."""
    ids = mx.array(TOKENS)[None]
    _, h = dense(ids, return_hidden=True)
    whole, _ = dense.mtp_forward(h[:, :-1], ids[:, 1:], dense.make_mtp_cache())
    cache = dense.make_mtp_cache()
    parts = [dense.mtp_forward(h[:, a:b], ids[:, a + 1 : b + 1], cache)[0] for a, b in
             ((0, 4), (4, 5), (5, 10))]  # fmt: skip
    assert rel_err(np.array(mx.concatenate(parts, 1)), np.array(whole)) < TOL


def _to_hf(model: TextModel) -> dict:
    """Our weights in Hugging Face's layout: zero-centred norms, conv1d [C, 1, K],
    `model.language_model.` prefix for the backbone, `mtp.*` top level."""
    hf = {}
    for k, v in tree_flatten(model.parameters()):
        shifted = (
            k.endswith(("layernorm.weight", "q_norm.weight", "k_norm.weight"))
            or k in ("model.norm.weight", "mtp.norm.weight")
            or ".pre_fc_norm_" in k
        )
        if shifted:
            v = v - 1.0
        if k.endswith("conv1d.weight"):
            v = v.swapaxes(1, 2)
        if ".mlp.experts." in k:
            base, proj = k.rsplit(".mlp.experts.", 1)
            proj = proj.split(".")[0]
            for e in range(v.shape[0]):
                hf[f"{base}.mlp.experts.{e}.{proj}.weight"] = v[e]
            continue
        if k.startswith("model."):
            k = k.replace("model.", "model.language_model.", 1)
        hf[k] = v
    return hf


def _write_hf(model: TextModel, path: Path, *, drop_mtp: bool = False) -> Path:
    path.mkdir(parents=True)
    cfg = model.config.to_dict()
    (path / "config.json").write_text(json.dumps(cfg))
    weights = _to_hf(model)
    if drop_mtp:
        weights = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(GOLDEN / "generate" / f, path / f)
    return path


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_mtp_round_trip_hf_mlx(kind, tmp_path):
    cfg = make_text_config if kind == "dense" else make_moe_config
    model = make_text_model(cfg(mtp_num_hidden_layers=1), seed=6)
    want, _ = _mtp_logits(model)
    hf = _write_hf(model, tmp_path / "hf")

    loaded = load_model(hf)
    assert loaded.has_mtp
    got, _ = _mtp_logits(loaded)
    assert rel_err(got, want) < TOL  # norms shifted exactly once

    saved = save_mlx(loaded, json.loads((hf / "config.json").read_text()), tmp_path / "saved")
    again = load_model(saved)
    assert again.has_mtp
    assert rel_err(_mtp_logits(again)[0], want) < TOL

    kept = convert(hf, tmp_path / "kept", keep_mtp=True, progress=False)
    assert any(k.startswith("mtp.") for k in mx.load(str(kept / "model.safetensors")))
    assert rel_err(_mtp_logits(load_model(kept))[0], want) < TOL

    # The default conversion drops mtp.* (mlx-swift-lm would shift the norms twice); the
    # config still says mtp_num_hidden_layers: 1 and the model loads without the head.
    dropped = convert(hf, tmp_path / "dropped", progress=False)
    assert not any("mtp" in k for k in mx.load(str(dropped / "model.safetensors")))
    plain = load_model(dropped)
    assert not plain.has_mtp
    ids = mx.array(TOKENS)[None]
    assert rel_err(np.array(plain(ids)), np.array(model(ids))) < TOL


def test_mtp_config_without_weights_loads_without_head(dense, tmp_path):
    hf = _write_hf(dense, tmp_path / "hf", drop_mtp=True)
    model = load_model(hf)
    assert not model.has_mtp
    with pytest.raises(ValueError, match="no multi-token-prediction weights"):
        convert(hf, tmp_path / "out", keep_mtp=True, progress=False)


def test_sanitize_with_mtp_idempotent(dense):
    hf = _to_hf(dense)
    once = dense.sanitize(dict(hf))
    ours = dict(tree_flatten(dense.parameters()))
    assert set(once) == set(ours)
    for k in ("mtp.norm.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.fc.weight"):
        assert rel_err(np.array(once[k]), np.array(ours[k])) < TOL, k
    twice = dense.sanitize(dict(once))
    for k, v in once.items():
        assert rel_err(np.array(twice[k]), np.array(v)) < TOL, k


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_compiled_mtp_fused_projections_equal_plain(kind, monkeypatch):
    """The compiled MTP head runs its layer in the verify pass's row form (`MTP(..., tokens=T)`:
    `DecoderLayer.steps` over the fused decode projections, fc through `layers.project`); with
    the GPU's fused layout (here on the CPU too), its logits and hidden states over calls of 1
    to 3 positions equal the plain head's."""
    from qwen35_mlx.models import layers

    monkeypatch.setattr(layers, "CPU_TRANSPOSED_WEIGHTS", False)
    make = make_text_config if kind == "dense" else make_moe_config
    model = make_text_model(make(mtp_num_hidden_layers=1), seed=6)
    ids = mx.array(TOKENS)[None]
    _, h = model(ids, return_hidden=True)

    def run(compiled):
        model.compiled_decode = compiled
        try:
            cache = model.make_mtp_cache()
            model.mtp_forward(h[:, :3], ids[:, 1:4], cache)
            outs, i = [], 3
            for T in (1, 2, 3, 1):
                logits, o = model.mtp_forward(h[:, i : i + T], ids[:, i + 1 : i + 1 + T], cache,
                                              last_only=True)  # fmt: skip
                outs.append((np.array(logits), np.array(o)))
                i += T
            return outs
        finally:
            model.compiled_decode = True

    plain = run(False)
    comp = run(True)
    assert layers._made(model.mtp, ("fc",)) is not None  # the compiled head fused its weights
    for (l0, o0), (l1, o1) in zip(plain, comp, strict=True):
        np.testing.assert_allclose(l1, l0, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(o1, o0, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_compiled_mtp_head_from_float32_copies_same_numbers(dtype, monkeypatch):
    """On the CPU a half-precision head's compiled steps run their projections and output layer
    from float32 copies (`text.CPU_FP32_DECODE` "head"); MLX's CPU multiplies half-precision
    matrices in float32 and rounds, so the logits, hidden states and the fused round's drafts
    are those of the half-precision weights, bit for bit. Over the byte limit no copies."""
    from qwen35_mlx.models import layers
    from qwen35_mlx.models import mtp as mtp_mod
    from qwen35_mlx.models import text as text_mod

    if mx.default_device() != mx.cpu:
        pytest.skip("the float32 copies are made on the CPU only")
    # The exact head's bits (the native round head, `mtp.NATIVE_HEAD`, is float32 throughout
    # and has its own test: test_native_head_*).
    monkeypatch.setattr(mtp_mod, "NATIVE_HEAD", False)
    model = make_text_model(make_text_config(mtp_num_hidden_layers=1), seed=6)
    model.set_dtype(dtype)
    ids = mx.array(TOKENS)[None]
    _, h = model(ids, return_hidden=True)

    def run(mode):
        monkeypatch.setattr(text_mod, "CPU_FP32_DECODE", mode)
        cache = model.make_mtp_cache()
        model.mtp_forward(h[:, :3], ids[:, 1:4], cache)
        outs, i = [], 3
        for T in (1, 2, 3):
            logits, o = model.mtp_forward(h[:, i : i + T], ids[:, i + 1 : i + 1 + T], cache,
                                          last_only=True)  # fmt: skip
            outs += [logits, o]
            i += T
        main, mtp = model.make_cache(), model.make_mtp_cache()
        _, g = model(ids[:, :6], cache=main, return_hidden=True)
        model.mtp_forward(g[:, :-1], ids[:, 1:6], mtp)
        outs += list(model.verify_and_draft(ids[:, 6:8], main, mtp))
        made = layers._made(model.mtp, ("fc",))
        return outs, made.fp32, "_decode_lm_head" in model.mtp

    half, f0, l0 = run(False)
    copies, f1, l1 = run("head")
    assert (f0, l0, f1, l1) == (False, False, True, True)
    # the main model's projections are never copied
    assert not layers._made(model.model.layers[0].mlp, ("gate_proj", "up_proj")).fp32
    for a, b in zip(half, copies, strict=True):
        assert a.dtype == b.dtype and mx.array_equal(a, b).item()
    monkeypatch.setattr(text_mod, "CPU_FP32_MAX_BYTES", 0)
    _, f2, l2 = run("head")
    assert (f2, l2) == (False, False)


ROWS = [TOKENS, [9, 4, 77, 23, 5, 110, 2, 61, 30, 8, 15]]


def _native_inputs(model, B: int, T: int):
    """B rows of the backbone's hidden states and next tokens over 10 positions, and an MTP
    cache filled by MLX's head over the first 10 - T (the native head's are the last T)."""
    from qwen35_mlx.models import cache as cache_lib

    ids = mx.array(ROWS[:B])
    _, h = model(ids, return_hidden=True)
    n0 = 10 - T
    cache = model.make_mtp_cache()
    model.mtp_forward(h[:, :n0], ids[:, 1 : n0 + 1], cache)
    c = cache[0]
    cache_lib.reserve(c, T)
    idx = mx.array(cache_lib.kv_index(c))
    return ids, h, n0, c.keys, c.values, idx


def _native_weights(model):
    from qwen35_mlx.kernels import cpu_ext
    from qwen35_mlx.models import mtp as mtp_mod

    if mx.default_device() != mx.cpu or not hasattr(cpu_ext.load(), "mtp_head"):
        pytest.skip("the native head needs the CPU extension, built, on the CPU")
    return mtp_mod.native_head_weights(model)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("B, T", [(1, 1), (1, 2), (2, 2), (1, 3), (2, 5)])
def test_native_head_matches_float64_reference(tied, B, T):
    """`cpu_ext.mtp_head` (float32 throughout) over T new positions a row after a cache of
    10 - T: its output o, drafts and the keys/values it writes. The bar is the one MLX's own
    float32 head meets against the same float64 reference (10 x the fp32 tolerance,
    test_mtp_forward_matches_numpy_reference): float32 sums over at most 2H terms."""
    from qwen35_mlx.models import mtp as mtp_mod

    model = make_text_model(
        make_text_config(mtp_num_hidden_layers=1, tie_word_embeddings=tied), seed=5
    )
    weights = _native_weights(model)
    ids, h, n0, keys, values, idx = _native_inputs(model, B, T)
    o, drafts, k2, v2 = mtp_mod.native_head(
        model, weights, h[:, n0:10], ids[:, n0 + 1 : 11], keys, values, idx
    )
    assert o.shape == (B, T, h.shape[-1]) and o.dtype == h.dtype and drafts.dtype == mx.uint32
    params = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    for b in range(B):
        logits, o_ref = mtp_reference(
            params, model.config, np.array(h[b, :10]), np.array(ids[b, 1:11]), return_o=True
        )
        assert rel_err(np.array(o[b]), o_ref[n0:]) < 10 * TOL
        for t, d in enumerate(np.array(drafts[b]).tolist()):
            row = logits[n0 + t]
            # the reference's argmax, or a token tied with it within the bar
            assert row[d] >= row.max() - 10 * TOL * np.abs(row).max()
    # The buffers: MLX's head over all 10 positions writes the same keys and values (within
    # float32), and the native call leaves every other position as it was.
    ref_cache = model.make_mtp_cache()
    model.mtp_forward(h[:, :10], ids[:, 1:11], ref_cache)
    for got, before, want in ((k2, keys, ref_cache[0].keys), (v2, values, ref_cache[0].values)):
        assert rel_err(np.array(got[:, :, n0:10]), np.array(want[:, :, n0:10])) < 10 * TOL
        assert mx.array_equal(got[:, :, :n0], before[:, :, :n0]).item()
        assert mx.array_equal(got[:, :, 10:], before[:, :, 10:]).item()


def test_native_head_float16_near_mlx_head():
    """A float16 model: the native head (float32 inside, o rounded to float16 once) against
    MLX's float16 head over the same cache, within the fp16 tolerance; the drafts agree."""
    from qwen35_mlx.models import mtp as mtp_mod

    model = make_text_model(make_text_config(mtp_num_hidden_layers=1), seed=5)
    model.set_dtype(mx.float16)
    weights = _native_weights(model)
    ids, h, n0, keys, values, idx = _native_inputs(model, 2, 2)
    o, drafts, k2, v2 = mtp_mod.native_head(
        model, weights, h[:, n0:10], ids[:, n0 + 1 : 11], keys, values, idx
    )
    assert o.dtype == mx.float16 and k2.dtype == mx.float16
    ref_cache = model.make_mtp_cache()
    logits, o_ref = model.mtp_forward(h[:, :10], ids[:, 1:11], ref_cache)
    tol = RTOL[mx.float16]
    assert rel_err(np.array(o), np.array(o_ref[:, n0:])) < tol
    assert rel_err(np.array(k2[:, :, :10]), np.array(ref_cache[0].keys[:, :, :10])) < tol
    assert np.array(drafts).tolist() == np.array(logits[:, n0:].argmax(-1)).tolist()


def test_native_head_in_the_fused_round(monkeypatch):
    """`verify_and_draft` takes the native head where `mtp.NATIVE_HEAD` and the extension allow
    (and no left padding): the verify pass's outputs are unchanged bit for bit, the head's
    output and drafts near MLX's head's. Off: no float32 copies, MLX's ops."""
    from qwen35_mlx.models import mtp as mtp_mod

    model = make_text_model(make_text_config(mtp_num_hidden_layers=1), seed=6)
    _native_weights(model)
    calls = counting_native_head(monkeypatch)
    ids = mx.array(TOKENS)[None]

    def run(on):
        monkeypatch.setattr(mtp_mod, "NATIVE_HEAD", on)
        main, mtp = model.make_cache(), model.make_mtp_cache()
        _, g = model(ids[:, :6], cache=main, return_hidden=True)
        model.mtp_forward(g[:, :-1], ids[:, 1:6], mtp)
        outs = []
        for a in (6, 8):  # two rounds: the second reads the first's native entries
            outs.append(model.verify_and_draft(ids[:, a : a + 2], main, mtp))
        return outs, "_native_head" in model.mtp, mtp[0]

    ops, had_ops, c_ops = run(False)
    assert not had_ops and not calls
    native, had, c_nat = run(True)
    assert had and calls == [True]  # traced once, replayed for the second round
    for (lo, ho, to, oo, do), (ln, hn, tn, on, dn) in zip(ops, native, strict=True):
        for a, b in ((lo, ln), (ho, hn), (to, tn)):
            assert mx.array_equal(a, b).item()
        assert rel_err(np.array(on), np.array(oo)) < 10 * TOL
        assert np.array(dn).tolist() == np.array(do).tolist()
    assert c_nat.offset == c_ops.offset == 9
    assert rel_err(np.array(c_nat.keys[:, :, :9]), np.array(c_ops.keys[:, :, :9])) < 10 * TOL


def test_native_head_refuses_positions_past_the_buffer():
    """The primitive never writes past its KV buffers (the caller reserves them): idx + T beyond
    the capacity raises at evaluation."""
    from qwen35_mlx.models import mtp as mtp_mod

    model = make_text_model(make_text_config(mtp_num_hidden_layers=1), seed=5)
    weights = _native_weights(model)
    cfg = model.config
    h = mx.zeros((1, 2, cfg.hidden_size))
    tokens = mx.zeros((1, 2), dtype=mx.int32)
    keys = mx.zeros((1, cfg.num_key_value_heads, 16, cfg.head_dim))
    mx.eval(mtp_mod.native_head(model, weights, h, tokens, keys, keys, mx.array(14)))
    with pytest.raises(RuntimeError, match="past the KV buffer"):
        mx.eval(mtp_mod.native_head(model, weights, h, tokens, keys, keys, mx.array(15)))


def test_native_head_follows_new_weights(monkeypatch):
    """New head weights set after a first round reach the native head: a norm alone (read from
    the module at each trace), then fc (its float32 copy made again): its round output is MLX's
    head's with the new weights (a twin model runs MLX's head, so `NATIVE_HEAD` never changes
    for the native one, which would remake its copies by itself)."""
    from qwen35_mlx.models import mtp as mtp_mod

    native = make_text_model(make_text_config(mtp_num_hidden_layers=1), seed=6)
    ops = make_text_model(make_text_config(mtp_num_hidden_layers=1), seed=6)
    _native_weights(native)
    ids = mx.array(TOKENS)[None]

    def round_o(model, on):
        monkeypatch.setattr(mtp_mod, "NATIVE_HEAD", on)
        main, mtp = model.make_cache(), model.make_mtp_cache()
        _, g = model(ids[:, :6], cache=main, return_hidden=True)
        model.mtp_forward(g[:, :-1], ids[:, 1:6], mtp)
        return np.array(model.verify_and_draft(ids[:, 6:8], main, mtp)[3])

    before = round_o(native, True)
    assert rel_err(before, round_o(ops, False)) < 10 * TOL
    for name in ("norm", "fc"):
        for model in (native, ops):
            model.mtp[name].weight = model.mtp[name].weight * 1.5
        new_native, new_ops = round_o(native, True), round_o(ops, False)
        assert rel_err(new_native, new_ops) < 10 * TOL, name
        assert rel_err(before, new_ops) > 0.1, name
        before = new_ops
