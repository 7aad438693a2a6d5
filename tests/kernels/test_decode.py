"""gated_delta_decode (the linear-attention decode step from the raw in-projection): its `ref`
backend against the float64 NumPy step and against today's layer path (the model's `_conv_qkv`
then `gated_delta_update`), validation, and backend choice without a GPU."""

import mlx.core as mx
import numpy as np
import pytest

import qwen35_mlx.kernels.gated_delta as gd
from qwen35_mlx.kernels.gated_delta import gated_delta_decode, gated_delta_update
from qwen35_mlx.models.cache import _TokenStates
from qwen35_mlx.models.layers import _conv_qkv_decode
from tests.conftest import RTOL, rel_err
from tests.kernels.helpers import gated_delta_decode_np, make_decode_inputs, np64

NAMES = ("qkv", "conv_state", "conv_w", "a", "b", "A_log", "dt_bias", "state")

# (B, Hk, Hv, Dk, Dv, K): Hv / Hk = 1, 2, 4; Dk != Dv both ways; K = 4 (Qwen3.5), 2 and 3.
SHAPES = [
    (1, 1, 1, 32, 32, 4),
    (3, 2, 4, 16, 24, 4),
    (2, 1, 4, 24, 8, 2),
    (4, 2, 2, 128, 128, 4),
    (2, 3, 6, 8, 5, 3),
]


def _kw(Hk, Dk, Hv, Dv):
    return dict(num_k_heads=Hk, head_k_dim=Dk, num_v_heads=Hv, head_v_dim=Dv)


def _args(x):
    return [x[n] for n in NAMES]


def _mask(B):
    return mx.array([b % 2 == 1 or B == 1 for b in range(B)])


# The ops, and the ops with the native CPU primitive's recurrence (kernels/cpu_ext) where it is
# built.
OPS_BACKENDS = [
    "ref",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(
            mx.default_device() != mx.cpu or not gd.native_available(),
            reason="native CPU primitive not built, or a GPU default device",
        ),
    ),
]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Hk{}Hv{}Dk{}Dv{}K{}".format(*s))
@pytest.mark.parametrize("backend", OPS_BACKENDS)
def test_decode_ref_matches_numpy(shape, masked, backend):
    B, Hk, Hv, Dk, Dv, K = shape
    x = make_decode_inputs(B, Hk, Hv, Dk, Dv, K, seed=B * K)
    mask = _mask(B) if masked else None
    y, s, cs = gated_delta_decode(*_args(x), mask=mask, backend=backend, **_kw(Hk, Dk, Hv, Dv))
    y_np, s_np, cs_np = gated_delta_decode_np(*_args(x), mask, Hk=Hk, Dk=Dk, Hv=Hv, Dv=Dv)
    assert (
        y.shape == (B, Hv, Dv)
        and s.shape == (B, Hv, Dv, Dk)
        and cs.shape == (B, K - 1, 2 * Hk * Dk + Hv * Dv)
    )
    assert y.dtype == mx.float32 and s.dtype == mx.float32 and cs.dtype == mx.float32
    assert rel_err(y, y_np) < RTOL[mx.float32]
    assert rel_err(s, s_np) < RTOL[mx.float32]
    assert np.array_equal(np.asarray(cs), cs_np.astype(np.float32))
    if masked:
        off = ~np.asarray(mask)
        assert not np.any(np.asarray(y)[off])
        assert np.array_equal(np.asarray(s)[off], np.asarray(x["state"])[off])


def _layer_path(x, mask, Hk, Dk, Hv, Dv):
    """What GatedDeltaNet does at T = 1 today: concatenate, the compiled _conv_qkv, then
    gated_delta_update (ref backend); the new conv state is the last K-1 rows."""
    qkv = x["qkv"]
    conv_in = mx.concatenate([x["conv_state"].astype(qkv.dtype), qkv[:, None]], axis=1)
    q, k, v = _conv_qkv_decode(conv_in, x["conv_w"], 1, Hk, Dk, Hv, Dv)
    y, s = gated_delta_update(
        q,
        k,
        v,
        x["a"][:, None],
        x["b"][:, None],
        x["A_log"],
        x["dt_bias"],
        x["state"],
        None if mask is None else mask[:, None],
        backend="ref",
    )
    return y[:, 0], s, conv_in[:, 1:]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=lambda s: "B{}Hk{}Hv{}Dk{}Dv{}K{}".format(*s))
def test_decode_ref_equals_the_layer_path(shape, masked, dtype):
    B, Hk, Hv, Dk, Dv, K = shape
    x = make_decode_inputs(B, Hk, Hv, Dk, Dv, K, dtype=dtype, seed=5)
    mask = _mask(B) if masked else None
    y, s, cs = gated_delta_decode(*_args(x), mask=mask, backend="ref", **_kw(Hk, Dk, Hv, Dv))
    y_l, s_l, cs_l = _layer_path(x, mask, Hk, Dk, Hv, Dv)
    assert y.dtype == y_l.dtype == dtype and cs.dtype == cs_l.dtype == dtype
    assert np.array_equal(np.asarray(cs.astype(mx.float32)), np.asarray(cs_l.astype(mx.float32)))
    if mx.default_device() == mx.cpu:
        # Same ops in the same dtypes: bit for bit on the CPU (checked 2026-12-01, MLX 0.32.4).
        assert np.array_equal(np.asarray(s), np.asarray(s_l))
        assert np.array_equal(np.asarray(y.astype(mx.float32)), np.asarray(y_l.astype(mx.float32)))
    # Elsewhere to fp32 rounding: here the gates and the step are compiled into one function
    # with the conv, and a GPU's fused kernels may contract or reorder fp32 arithmetic.
    assert rel_err(s, s_l) < RTOL[mx.float32]
    assert rel_err(y.astype(mx.float32), y_l.astype(mx.float32)) < RTOL[mx.float32] * (
        1 if dtype == mx.float32 else 1e3  # one ulp of the low-precision y
    )


def test_decode_ref_chained_steps_match_numpy():
    """Eight steps in a row, each feeding its conv state and recurrent state to the next."""
    B, Hk, Hv, Dk, Dv, K = 2, 1, 2, 32, 16, 4
    x = make_decode_inputs(B, Hk, Hv, Dk, Dv, K, seed=11)
    want = dict(x)
    tokens = mx.random.normal((8, B, x["qkv"].shape[1]), key=mx.random.key(3))
    for t in range(8):
        x["qkv"] = want["qkv"] = tokens[t]
        y, x["state"], x["conv_state"] = gated_delta_decode(
            *_args(x), backend="ref", **_kw(Hk, Dk, Hv, Dv)
        )
        y_np, want["state"], want["conv_state"] = gated_delta_decode_np(
            *_args(want), Hk=Hk, Dk=Dk, Hv=Hv, Dv=Dv
        )
    assert rel_err(y, y_np) < RTOL[mx.float32]
    assert rel_err(x["state"], want["state"]) < RTOL[mx.float32]
    assert rel_err(x["conv_state"], want["conv_state"]) == 0.0


def test_decode_none_states_are_zeros():
    """A fresh cache (conv_state and state None) is the same as zeros."""
    B, Hk, Hv, Dk, Dv, K = 2, 1, 2, 32, 16, 4
    x = make_decode_inputs(B, Hk, Hv, Dk, Dv, K, dtype=mx.bfloat16)
    args = _args(x)
    got = gated_delta_decode(*args[:1], None, *args[2:7], None, **_kw(Hk, Dk, Hv, Dv))
    x["conv_state"] = mx.zeros_like(x["conv_state"])
    x["state"] = mx.zeros_like(x["state"])
    want = gated_delta_decode(*_args(x), **_kw(Hk, Dk, Hv, Dv))
    assert got[0].dtype == mx.bfloat16 and got[2].dtype == mx.bfloat16
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(np.asarray(g.astype(mx.float32)), np.asarray(w.astype(mx.float32)))


def _raises(match, **changes):
    B, Hk, Hv, Dk, Dv, K = 2, 1, 2, 32, 16, 4
    x = make_decode_inputs(B, Hk, Hv, Dk, Dv, K)
    kw = _kw(Hk, Dk, Hv, Dv) | {"mask": None}
    for name, value in changes.items():
        (x if name in NAMES else kw)[name] = value
    with pytest.raises(ValueError, match=match):
        gated_delta_decode(*_args(x), **kw)


def test_decode_validation_names_the_argument():
    _raises(r"\bqkv\b.*\(2, 1, 96\)", qkv=mx.zeros((2, 1, 96)))
    _raises(r"\bqkv\b.*\(2, 95\).*\[B, 96\]", qkv=mx.zeros((2, 95)))
    _raises(r"\bconv_state\b.*\(2, 4, 96\)", conv_state=mx.zeros((2, 4, 96)))
    _raises(r"\bconv_state\b.*\(3, 3, 96\)", conv_state=mx.zeros((3, 3, 96)))
    _raises(r"\bconv_w\b.*\(96, 4, 1\)", conv_w=mx.zeros((96, 4, 1)))
    _raises(r"\bconv_w\b.*\(4, 96\)", conv_w=mx.zeros((4, 96)))
    _raises(r"\ba\b.*\(2, 1, 2\)", a=mx.zeros((2, 1, 2)))
    _raises(r"\bb\b.*\(2, 3\)", b=mx.zeros((2, 3)))
    _raises(r"\bA_log\b.*\(3,\)", A_log=mx.zeros((3,)))
    _raises(r"\bdt_bias\b", dt_bias=mx.zeros((2, 1)))
    _raises(r"\bstate\b.*\(2, 2, 32, 16\)", state=mx.zeros((2, 2, 32, 16)))
    _raises(r"\bmask\b.*\(2, 1\)", mask=mx.ones((2, 1), mx.bool_))
    _raises(r"\bqkv\b.*int32", qkv=mx.zeros((2, 96), mx.int32))
    _raises(r"\bstate\b.*int32", state=mx.zeros((2, 2, 16, 32), mx.int32))
    _raises(r"num_v_heads=3.*num_k_heads=2", num_k_heads=2, num_v_heads=3)
    _raises(r"head_k_dim must be >= 1", head_k_dim=0)
    _raises(r"unknown backend 'triton'", backend="triton")


@pytest.mark.parametrize("backend", ["auto", "metal", "cuda"])
def test_decode_without_gpu_runs_ref(backend, monkeypatch):
    """On the CPU (or for a GPU backend that is absent) the result is ref's."""
    monkeypatch.delenv("QWEN35_MLX_GDN_BACKEND", raising=False)
    if backend != "auto" and gd._gpu_backend(backend).is_available():
        pytest.skip(f"{backend} is available here: the GPU kernel tests cover it")
    if backend == "auto" and mx.default_device() != mx.cpu:
        pytest.skip("auto picks the GPU kernel here")
    calls = []
    import qwen35_mlx.kernels.gated_delta.decode as decode_mod

    real = decode_mod.gated_delta_decode_ref

    def spy(*a, **kw):
        calls.append("ref")
        return real(*a, **kw)

    monkeypatch.setattr(decode_mod, "gated_delta_decode_ref", spy)
    x = make_decode_inputs(2, 1, 2, 32, 16)
    got = gated_delta_decode(*_args(x), backend=backend, **_kw(1, 32, 2, 16))
    # On the CPU, auto's ops run their recurrence through the native primitive where it is
    # built (test_native.py); the ops around it are these.
    want = real(*_args(x), None, dims=(1, 32, 2, 16), native=gd._decode_native(backend))
    assert calls == ["ref"]
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(np.asarray(g), np.asarray(w))


# --- T tokens a row through the ops (`gated_delta_decode_packed` on the CPU: the conv, norms and
# gates once for all tokens, the recurrence token by token; decode.py `_tokens`) ---


def _packed_inputs(B, T, Hk, Hv, Dk, Dv, K, dtype, seed):
    """The packed call's inputs: proj [B*T, qkv | z | b | a] (row b*T + t), the decode step's
    states and weights (`make_decode_inputs`), a gated norm weight [Dv]."""
    x = make_decode_inputs(B, Hk, Hv, Dk, Dv, K, dtype=dtype, seed=seed)
    C = 2 * Hk * Dk + Hv * Dv
    kp, kn = mx.random.split(mx.random.key(seed + 3))
    proj = mx.random.normal((B * T, C + Hv * Dv + 2 * Hv), key=kp).astype(dtype)
    norm_w = (1.0 + 0.1 * mx.random.normal((Dv,), key=kn)).astype(dtype)
    return proj, x, norm_w


def _packed(proj, x, norm_w, T, mask, dims, backend="ref"):
    """The packed call; the states after each token as a list of T (conv, state) pairs, also
    where the call gives the recorded arrays (the native recurrence's one call, the GPU
    kernel's): taken apart as the cache's rollback takes them (`cache._TokenStates.at`)."""
    Hk, Dk, Hv, Dv = dims
    y, s, cs, per = gd.gated_delta_decode_packed(
        proj, x["conv_state"], x["conv_w"], x["A_log"], x["dt_bias"], x["state"], norm_w,
        tokens=T, mask=mask, backend=backend, **_kw(Hk, Dk, Hv, Dv),
    )  # fmt: skip
    if per is not None and isinstance(per[0], mx.array):
        rec = _TokenStates(per, final=(cs, s), n=T)
        per = [rec.at(t) for t in range(T)]
    return y, s, cs, per


def _token_masks(B, T):
    return mx.array([[(b + t) % 3 != 1 for t in range(T)] for b in range(B)])


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=lambda s: "B{}Hk{}Hv{}Dk{}Dv{}K{}".format(*s))
@pytest.mark.parametrize("backend", OPS_BACKENDS)
def test_packed_tokens_ops_equal_one_call_a_token(shape, T, masked, dtype, backend):
    """Bit for bit what T calls of `gated_delta_decode` (same backend) with the gated norm give
    (z and the norm weight passed, as the layers' decode step passes them): y, the last states
    and the states after every token (the rollback's)."""
    B, Hk, Hv, Dk, Dv, K = shape
    dims = (Hk, Dk, Hv, Dv)
    proj, x, norm_w = _packed_inputs(B, T, Hk, Hv, Dk, Dv, K, dtype, seed=T + B)
    mask = _token_masks(B, T) if masked else None
    y, s, cs, per = _packed(proj, x, norm_w, T, mask, dims, backend)
    C = 2 * Hk * Dk + Hv * Dv
    qkv, z, b, a = mx.split(proj, [C, C + Hv * Dv, C + Hv * Dv + Hv], axis=-1)
    conv, state, ys, want = x["conv_state"], x["state"], [], []
    for t in range(T):
        yt, state, conv = gated_delta_decode(
            qkv[t::T], conv, x["conv_w"], a[t::T], b[t::T], x["A_log"], x["dt_bias"], state,
            mask=None if mask is None else mask[:, t], backend=backend, **_kw(*dims),
            z=z[t::T], norm_weight=norm_w, norm_eps=1e-6,
        )  # fmt: skip
        ys.append(yt)
        want.append((conv, state))
    y_want = mx.stack(ys, axis=1).reshape(B * T, -1)

    def same(u, w):
        return u.dtype == w.dtype and np.array_equal(
            np.asarray(u.astype(mx.float32)), np.asarray(w.astype(mx.float32))
        )

    assert y.shape == (B * T, Hv * Dv) and same(y, y_want)
    assert same(s, state) and same(cs, conv)
    assert len(per) == T
    assert all(same(c, wc) and same(st, ws) for (c, st), (wc, ws) in zip(per, want, strict=True))


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("backend", OPS_BACKENDS)
def test_packed_tokens_take_columns(T, backend):
    """proj as columns [B*T, N, 1] (the same memory): y comes back as columns [B*T, Hv*Dv, 1],
    every output the rows form's bit for bit; [B*T, N, 2] is refused."""
    B, Hk, Hv, Dk, Dv, K = SHAPES[2]
    dims = (Hk, Dk, Hv, Dv)
    proj, x, norm_w = _packed_inputs(B, T, Hk, Hv, Dk, Dv, K, mx.float32, seed=5)
    mask = _token_masks(B, T)
    rows = _packed(proj, x, norm_w, T, mask, dims, backend)
    cols = _packed(proj[..., None], x, norm_w, T, mask, dims, backend)
    assert rows[0].shape == (B * T, Hv * Dv) and cols[0].shape == (B * T, Hv * Dv, 1)
    assert np.array_equal(np.asarray(rows[0]), np.asarray(cols[0])[..., 0])
    flat = [rows[1], rows[2], *[a for pair in rows[3] or [] for a in pair]]
    flat_c = [cols[1], cols[2], *[a for pair in cols[3] or [] for a in pair]]
    assert len(flat) == len(flat_c) == 2 + (2 * T if T > 1 else 0)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(flat, flat_c, strict=True)
    )
    with pytest.raises(ValueError, match="proj"):
        _packed(mx.stack([proj, proj], axis=-1), x, norm_w, T, mask, dims, backend)


def _gated_norm_np(y, z, w, eps=1e-6):
    y, z = np64(y), np64(z)
    y = y / np.sqrt((y * y).mean(-1, keepdims=True) + eps) * np64(w)
    return y * z / (1.0 + np.exp(-z))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Hk{}Hv{}Dk{}Dv{}K{}".format(*s))
@pytest.mark.parametrize("backend", OPS_BACKENDS)
def test_packed_tokens_ops_match_numpy(shape, masked, backend):
    """fp32 against T float64 NumPy steps and the gated norm."""
    B, Hk, Hv, Dk, Dv, K = shape
    T = 4
    proj, x, norm_w = _packed_inputs(B, T, Hk, Hv, Dk, Dv, K, mx.float32, seed=B * K)
    mask = _token_masks(B, T) if masked else None
    y, s, cs, per = _packed(proj, x, norm_w, T, mask, (Hk, Dk, Hv, Dv), backend)
    C = 2 * Hk * Dk + Hv * Dv
    p = np64(proj).reshape(B, T, -1)
    conv, state = x["conv_state"], x["state"]
    for t in range(T):
        m = None if mask is None else np.asarray(mask)[:, t]
        y_np, state, conv = gated_delta_decode_np(
            p[:, t, :C], conv, x["conv_w"], p[:, t, C + Hv * Dv + Hv :],
            p[:, t, C + Hv * Dv : C + Hv * Dv + Hv], x["A_log"], x["dt_bias"], state, m,
            Hk=Hk, Dk=Dk, Hv=Hv, Dv=Dv,
        )  # fmt: skip
        y_np = _gated_norm_np(y_np, p[:, t, C : C + Hv * Dv].reshape(B, Hv, Dv), norm_w)
        got = np.asarray(y).reshape(B, T, Hv, Dv)[:, t]
        assert rel_err(got, y_np) < RTOL[mx.float32]
        assert rel_err(per[t][1], state) < RTOL[mx.float32]
        assert rel_err(per[t][0], conv) == 0.0
    assert rel_err(s, state) < RTOL[mx.float32] and rel_err(cs, conv) == 0.0
