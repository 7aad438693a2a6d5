"""The gated_delta dispatch: input validation, backend choice (auto, explicit, env override) and
fallback of the GPU backends on a machine without them."""

import mlx.core as mx
import numpy as np
import pytest

import qwen35_mlx.kernels.gated_delta as gd
from qwen35_mlx.kernels import cpu_ext
from qwen35_mlx.kernels.gated_delta import chunked as chunked_mod
from qwen35_mlx.kernels.gated_delta import gated_delta, gated_delta_update
from tests.conftest import RTOL, rel_err
from tests.kernels.helpers import make_inputs

ENV = "QWEN35_MLX_GDN_BACKEND"


def _inputs(B=2, T=3, Hk=1, Hv=2, Dk=32, Dv=16):
    return make_inputs(B, T, Hk, Hv, Dk, Dv)


def _raises(match, fn, *args, **kw):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kw)


def test_validation_names_the_argument():
    q, k, v, g, beta, state = _inputs()
    _raises(r"\bq\b.*\(2, 3, 32\)", gated_delta, q[:, :, 0], k, v, g, beta)
    _raises(r"\bk\b.*\(2, 3, 1, 16\)", gated_delta, q, k[..., :16], v, g, beta)
    _raises(r"\bv\b.*\(2, 4, 2, 16\)", gated_delta, q, k, mx.zeros((2, 4, 2, 16)), g, beta)
    _raises(r"\bv\b", gated_delta, q, k, v[0], g, beta)
    _raises(r"\bg\b.*\(2, 3, 3\)", gated_delta, q, k, v, mx.ones((2, 3, 3)), beta)
    _raises(r"\bbeta\b.*\(2, 3\)", gated_delta, q, k, v, g, beta[..., 0])
    _raises(
        r"\bstate\b.*\(2, 2, 32, 16\)", gated_delta, q, k, v, g, beta, mx.swapaxes(state, -1, -2)
    )
    _raises(r"\bmask\b.*\(2, 4\)", gated_delta, q, k, v, g, beta, state, mx.ones((2, 4), mx.bool_))
    _raises(r"\bmask\b", gated_delta, q, k, v, g, beta, state, mx.ones((3,), mx.bool_))


def test_validation_heads_must_divide():
    q, k, v, g, beta, _ = make_inputs(1, 2, 2, 3, 32, 16)
    _raises(r"Hv=3.*Hk=2", gated_delta, q, k, v, g, beta)


@pytest.mark.parametrize("name", ["q", "k", "v", "g", "beta", "state"])
def test_validation_rejects_integer_dtypes(name):
    args = dict(zip(("q", "k", "v", "g", "beta", "state"), _inputs(), strict=True))
    args[name] = args[name].astype(mx.int32)
    _raises(rf"\b{name}\b.*int32", gated_delta, **args)


def test_update_validation_names_gate_inputs():
    q, k, v, _, _, state = _inputs()
    a = mx.zeros((2, 3, 2))
    A_log = mx.zeros((2,))
    _raises(r"\ba\b.*\(2, 3\)", gated_delta_update, q, k, v, a[..., 0], a, A_log, A_log)
    _raises(
        r"\bb\b.*\(2, 3, 4\)", gated_delta_update, q, k, v, a, mx.zeros((2, 3, 4)), A_log, A_log
    )
    _raises(r"\bA_log\b.*\(3,\)", gated_delta_update, q, k, v, a, a, mx.zeros((3,)), A_log)
    _raises(r"\bdt_bias\b", gated_delta_update, q, k, v, a, a, A_log, mx.zeros((2, 1)))
    _raises(r"\bq\b", gated_delta_update, q[0], k, v, a, a, A_log, A_log)
    _raises(r"\bv\b", gated_delta_update, q, k, v[0], a, a, A_log, A_log)
    q0 = mx.zeros((2, 3, 0, 32))
    _raises(r"Hk=0", gated_delta, q0, q0, *_inputs()[2:5])


def test_unknown_backend(monkeypatch):
    q, k, v, g, beta, _ = _inputs()
    _raises(r"unknown backend 'triton'", gated_delta, q, k, v, g, beta, backend="triton")
    monkeypatch.setenv(ENV, "fast")
    _raises(r"unknown backend 'fast'", gated_delta, q, k, v, g, beta)


def _spy(monkeypatch):
    """Record which CPU implementation each call runs."""
    calls = []
    ref, chunked = gd.gated_delta_ref, chunked_mod.gated_delta_chunked

    def spy_ref(*a, **kw):
        calls.append("ref")
        return ref(*a, **kw)

    def spy_chunked(*a, **kw):
        calls.append("chunked")
        return chunked(*a, **kw)

    monkeypatch.setattr(gd, "gated_delta_ref", spy_ref)
    monkeypatch.setattr(chunked_mod, "gated_delta_chunked", spy_chunked)
    native = cpu_ext.load()
    if native is not None:

        class SpyNative:
            def gated_delta(self, *a):
                calls.append("native")
                return native.gated_delta(*a)

        monkeypatch.setattr(cpu_ext, "_loaded", [SpyNative()])
    return calls


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU dispatch")
def test_auto_on_cpu_picks_ref_for_decode_and_chunked_for_prefill(monkeypatch):
    """Decode takes the native primitive where it is built (test_native.py), else ref; prefill
    chunked, or the native primitive where it is built and MLX runs its reference BLAS."""
    monkeypatch.delenv(ENV, raising=False)
    calls = _spy(monkeypatch)
    decode = "native" if gd.native_available() else "ref"
    native_prefill = gd.native_available() and gd._reference_blas()
    prefill = "native" if native_prefill else "chunked"
    gated_delta(*_inputs(T=1))
    long_T = max(64, gd._CPU_CHUNKED_MIN_T)
    gated_delta(*_inputs(T=long_T))
    q, k, v, g, beta, state = _inputs(T=long_T)
    a, b = mx.zeros(beta.shape), mx.zeros(beta.shape)
    gated_delta_update(q, k, v, a, b, mx.zeros((2,)), mx.zeros((2,)), state)
    assert calls == [decode, prefill, prefill]


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU dispatch")
def test_env_override_and_explicit_backend(monkeypatch):
    calls = _spy(monkeypatch)
    x = _inputs(T=80)
    monkeypatch.setenv(ENV, "ref")
    y_env, _ = gated_delta(*x)
    y_chunked, _ = gated_delta(*x, backend="chunked")  # an explicit choice beats the env
    monkeypatch.setenv(ENV, "chunked")
    gated_delta(*_inputs(T=1))
    assert calls == ["ref", "chunked", "chunked"]
    assert rel_err(y_chunked, y_env) < RTOL[mx.float32]


@pytest.mark.parametrize("backend", ["metal", "cuda"])
def test_gpu_backend_falls_back_without_gpu(backend, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    impl = gd._gpu_backend(backend)
    x = _inputs(T=5)
    if impl.supports(x[0], x[2], x[3]):
        pytest.skip(f"{backend} is available here: the GPU kernel tests cover it")
    calls = _spy(monkeypatch)
    q, k, v, g, beta, state = x
    y, s = gated_delta(q, k, v, g, beta, state, backend=backend)
    y_ref, s_ref = gd.gated_delta_ref(q, k, v, g, beta, state)
    assert calls and calls[0] in ("ref", "chunked")
    assert rel_err(y, y_ref) < RTOL[mx.float32] and rel_err(s, s_ref) < RTOL[mx.float32]
    a, b = mx.zeros(beta.shape), mx.zeros(beta.shape)
    y2, s2 = gated_delta_update(
        q, k, v, a, b, mx.zeros((2,)), mx.zeros((2,)), state, backend=backend
    )
    assert np.isfinite(np.asarray(y2)).all() and s2.shape == state.shape


def test_state_none_is_zeros_and_fp32():
    q, k, v, g, beta, _ = _inputs()
    for backend in ("ref", "chunked"):
        y, s = gated_delta(
            q.astype(mx.bfloat16), k, v.astype(mx.bfloat16), g, beta, backend=backend
        )
        y0, s0 = gated_delta(q, k, v, g, beta, mx.zeros(s.shape), backend="ref")
        assert s.dtype == mx.float32 and y.dtype == mx.bfloat16
        assert rel_err(s, s0) < RTOL[mx.bfloat16]
