"""The native CPU primitive (gated_delta backend "native", kernels/cpu_ext) against the float64
NumPy loop, its dispatch, and the fallback where it is not built."""

import mlx.core as mx
import numpy as np
import pytest

import qwen35_mlx.kernels.gated_delta as gd
from qwen35_mlx.kernels import cpu_ext
from qwen35_mlx.kernels.gated_delta import gated_delta, gated_delta_update
from tests.conftest import NATIVE_BUILD_ERROR, RTOL, rel_err
from tests.kernels.helpers import (
    gated_delta_np,
    gates_np,
    left_pad_mask,
    make_gate_inputs,
    make_inputs,
    np64,
)

needs_native = pytest.mark.skipif(
    mx.default_device() != mx.cpu or not cpu_ext.available(),
    reason=f"native CPU primitive not built or not the default device: {NATIVE_BUILD_ERROR}",
)

# (B, T, Hk, Hv, Dk, Dv, per_key): GQA 1x/2x/4x/8x, Dk != Dv both ways, odd sizes, B 1 and 8.
SHAPES = [
    (1, 1, 1, 1, 32, 32, False),
    (8, 1, 2, 4, 24, 40, False),
    (8, 1, 4, 8, 64, 16, True),
    (1, 1, 16, 32, 128, 128, False),
    (3, 2, 3, 3, 7, 5, False),
    (2, 5, 1, 2, 32, 16, False),
    (1, 7, 2, 8, 16, 32, True),
    (5, 3, 2, 4, 33, 33, True),
]
IDS = ["B{}T{}Hk{}Hv{}Dk{}Dv{}{}".format(*s[:6], "pk" if s[6] else "") for s in SHAPES]


def _mask(B, T):
    """Left padding of 0..T-1 steps plus a hole in the last row, where T allows one."""
    m = np.array(left_pad_mask(B, T, [i % T for i in range(B)]))
    if T > 2:
        m[-1, T // 2] = False
    return mx.array(m)


@needs_native
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_native_matches_numpy(shape, masked):
    B, T, Hk, Hv, Dk, Dv, per_key = shape
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv, per_key=per_key, seed=B + T)
    mask = _mask(B, T) if masked else None
    y, s = gated_delta(q, k, v, g, beta, state, mask, backend="native")
    assert y.shape == (B, T, Hv, Dv) and y.dtype == mx.float32 and s.dtype == mx.float32
    y_np, s_np = gated_delta_np(q, k, v, g, beta, state, mask)
    assert rel_err(y, y_np) < RTOL[mx.float32]
    assert rel_err(s, s_np) < RTOL[mx.float32]
    if masked:  # padded steps write exact zeros
        assert not np.any(np.asarray(y)[~np.asarray(mask)])


@needs_native
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("B", [1, 8])
def test_native_half_inputs(dtype, B):
    q, k, v, g, beta, state = make_inputs(B, 2, 4, 8, 64, 32, dtype=dtype, seed=3)
    mask = _mask(B, 2)
    y, s = gated_delta(q, k, v, g, beta, state, mask, backend="native")
    assert y.dtype == dtype and s.dtype == mx.float32
    y_np, s_np = gated_delta_np(q, k, v, g, beta, state, mask)
    assert rel_err(np64(y), y_np) < RTOL[dtype]
    assert rel_err(s, s_np) < RTOL[mx.float32]


@needs_native
@pytest.mark.parametrize("per_key", [False, True], ids=["scalar", "perkey"])
def test_native_steps_in_one_call_equal_one_call_a_step(per_key):
    """T steps in one call give bit for bit what T calls of one step give (the verify pass
    takes T tokens at once and must equal decoding them one by one)."""
    B, T = 3, 4
    q, k, v, g, beta, state = make_inputs(B, T, 2, 4, 24, 8, per_key=per_key, seed=11)
    mask = _mask(B, T)
    y, s = gated_delta(q, k, v, g, beta, state, mask, backend="native")
    ys, st = [], state
    for t in range(T):
        sl = slice(t, t + 1)
        y_t, st = gated_delta(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], st,
                              mask[:, sl], backend="native")  # fmt: skip
        ys.append(y_t)
    np.testing.assert_array_equal(np.array(y), np.array(mx.concatenate(ys, axis=1)))
    np.testing.assert_array_equal(np.array(s), np.array(st))


@needs_native
def test_native_update_from_raw_gates():
    """gated_delta_update (the layer's entry) through the native primitive."""
    B, T, Hk, Hv, Dk, Dv = 8, 1, 2, 4, 32, 16
    q, k, v, _, _, state = make_inputs(B, T, Hk, Hv, Dk, Dv, dtype=mx.bfloat16)
    a, b, A_log, dt_bias = make_gate_inputs(B, T, Hv, dtype=mx.bfloat16)
    y, s = gated_delta_update(q, k, v, a, b, A_log, dt_bias, state, backend="native")
    g_np, beta_np = gates_np(a, b, A_log, dt_bias)
    y_np, s_np = gated_delta_np(q, k, v, g_np, beta_np, state)
    assert rel_err(np64(y), y_np) < RTOL[mx.bfloat16]
    assert rel_err(s, s_np) < RTOL[mx.float32]


@needs_native
def test_native_strided_and_broadcast_inputs():
    """Views with any strides (transposed, sliced, broadcast) read as their values."""
    B, T, Hk, Hv, Dk, Dv = 2, 3, 2, 4, 16, 8
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv, seed=5)
    qt = mx.swapaxes(mx.swapaxes(q, 0, 1) * 1.0, 0, 1)  # a transposed buffer
    vs = mx.concatenate([v, v], axis=-1)[..., ::2]  # a strided slice
    st = mx.swapaxes(mx.swapaxes(state, -1, -2) * 1.0, -1, -2)  # columns strided
    sb = mx.broadcast_to(state[:1], state.shape)  # stride 0 over the batch
    mx.eval(qt, vs, st, sb)
    for args in ((qt, k, vs, g, beta, st), (q, k, v, g, beta, sb)):
        y, s = gated_delta(*args, backend="native")
        y_np, s_np = gated_delta_np(*args)
        assert rel_err(y, y_np) < RTOL[mx.float32]
        assert rel_err(s, s_np) < RTOL[mx.float32]


@needs_native
def test_native_state_reused_only_when_donated():
    """The new state may take the old one's buffer only when nothing else holds it."""
    q, k, v, g, beta, state = make_inputs(1, 1, 1, 2, 8, 4, seed=7)
    mx.eval(state)
    before = np.array(state)
    _, s1 = gated_delta(q, k, v, g, beta, state, backend="native")
    mx.eval(s1)
    np.testing.assert_array_equal(np.array(state), before)  # still held here: not overwritten
    # Chained without a reference to the middle state: the two steps equal the float64 loop.
    _, s2 = gated_delta(q, k, v, g, beta, s1 * 1.0, backend="native")
    _, s2 = gated_delta(q, k, v, g, beta, s2, backend="native")
    q2, k2, v2 = (mx.concatenate([x, x], axis=1) for x in (q, k, v))
    g2, b2 = (mx.concatenate([x, x], axis=1) for x in (g, beta))
    _, s_np = gated_delta_np(q2, k2, v2, g2, b2, s1)
    assert rel_err(s2, s_np) < RTOL[mx.float32]


@needs_native
def test_native_inside_compile():
    q, k, v, g, beta, state = make_inputs(8, 1, 2, 4, 32, 16, seed=2)
    mask = _mask(8, 1)

    def step(q, k, v, g, beta, state, mask):
        y, s = gated_delta(q, k, v, g, beta, state, mask, backend="native")
        return y * 2.0, s

    yc, sc = mx.compile(step)(q, k, v, g, beta, state, mask)
    y, s = step(q, k, v, g, beta, state, mask)
    np.testing.assert_array_equal(np.array(yc), np.array(y))
    np.testing.assert_array_equal(np.array(sc), np.array(s))
    y_np, s_np = gated_delta_np(q, k, v, g, beta, state, mask)
    assert rel_err(yc, 2.0 * y_np) < RTOL[mx.float32]


@needs_native
def test_native_gradients_are_refs():
    """The primitive has no vjp of its own: gradients through backend "native" are ref's."""
    q, k, v, g, beta, state = make_inputs(2, 3, 1, 2, 16, 8, seed=4)
    mask = _mask(2, 3)

    def loss(backend):
        def f(q, k, v, g, beta, state):
            y, s = gated_delta(q, k, v, g, beta, state, mask, backend=backend)
            return (y * y).sum() + (s * s).sum()

        return mx.grad(f, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, g, beta, state)

    for got, want in zip(loss("native"), loss("ref"), strict=True):
        assert float(mx.abs(want).max()) > 0
        assert rel_err(got, want) < RTOL[mx.float32]


class _Spy:
    """Stands in for the built module and counts its calls."""

    def __init__(self, mod):
        self.mod, self.calls = mod, 0

    def gated_delta(self, *args):
        self.calls += 1
        return self.mod.gated_delta(*args)


@needs_native
@pytest.mark.parametrize("T", [1, 2, 3])
def test_auto_on_cpu_picks_native_for_decode(T, monkeypatch):
    """T <= 2 always; longer where MLX runs its reference BLAS (else chunked)."""
    monkeypatch.delenv(gd._ENV, raising=False)
    spy = _Spy(cpu_ext.load())
    monkeypatch.setattr(cpu_ext, "_loaded", [spy])
    q, k, v, g, beta, state = make_inputs(2, T, 1, 2, 16, 8)
    with mx.stream(mx.cpu):
        y, s = gated_delta(q, k, v, g, beta, state)
    want = 1 if T <= gd._CPU_NATIVE_MAX_T or gd._reference_blas() else 0
    assert spy.calls == want
    assert gd._pick("auto", q, v, g) == ("native" if want else "chunked")
    y_np, s_np = gated_delta_np(q, k, v, g, beta, state)
    assert rel_err(y, y_np) < RTOL[mx.float32]
    assert rel_err(s, s_np) < RTOL[mx.float32]


@needs_native
def test_env_override_selects_native(monkeypatch):
    monkeypatch.setenv(gd._ENV, "native")
    spy = _Spy(cpu_ext.load())
    monkeypatch.setattr(cpu_ext, "_loaded", [spy])
    q, k, v, g, beta, state = make_inputs(2, 4, 1, 2, 16, 8)
    gated_delta(q, k, v, g, beta, state)
    assert spy.calls == 1


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU dispatch")
@pytest.mark.parametrize("T", [1, 4])
def test_native_not_built_falls_back(T, monkeypatch):
    """Without the module (not built, a Mac, switched off) "native" and auto run the ops path,
    no error, and native_available() says so."""
    monkeypatch.setattr(cpu_ext, "_loaded", [None])
    monkeypatch.delenv(gd._ENV, raising=False)
    assert not gd.native_available()
    q, k, v, g, beta, state = make_inputs(2, T, 1, 2, 16, 8)
    assert gd._auto_cpu(T) == ("ref" if T < gd._CPU_CHUNKED_MIN_T else "chunked")
    y_np, s_np = gated_delta_np(q, k, v, g, beta, state)
    for backend in ("native", "auto"):
        y, s = gated_delta(q, k, v, g, beta, state, backend=backend)
        assert rel_err(y, y_np) < RTOL[mx.float32]
        assert rel_err(s, s_np) < RTOL[mx.float32]


@needs_native
@pytest.mark.parametrize("slow", [False, True], ids=["openblas", "reference"])
def test_auto_prefill_follows_the_blas(slow, monkeypatch):
    """Prefill (T >= 3): the native recurrence on the reference BLAS, chunked with a fast one."""
    from qwen35_mlx import kernels

    monkeypatch.delenv(gd._ENV, raising=False)
    monkeypatch.setattr(kernels, "_slow_blas_query", [lambda: slow])
    assert gd._auto_cpu(1) == "native"
    assert gd._auto_cpu(64) == ("native" if slow else "chunked")


def test_switched_off_by_env(monkeypatch):
    monkeypatch.setenv(cpu_ext.OFF_ENV, "0")
    monkeypatch.setattr(cpu_ext, "_loaded", [])
    assert cpu_ext.load() is None


@needs_native
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=str)
def test_native_decode_step_half_inputs(dtype):
    """The whole decode step's primitive (kernels/cpu_ext `gated_delta_decode`; the decode ops
    take it for float32) with half-precision inputs: float32 inside, so y and the conv state are
    the float32 call's rounded once, the state the float32 call's own."""
    B, Hk, Dk, Hv, Dv, K = 2, 2, 16, 4, 8, 4
    C = 2 * Hk * Dk + Hv * Dv
    rng = np.random.default_rng(5)

    def f(*s):
        return mx.array(rng.standard_normal(s).astype(np.float32)).astype(dtype)

    qkv, cs, w, a, b, z, nw = (
        f(B, C),
        f(B, K - 1, C),
        f(C, K),
        f(B, Hv),
        f(B, Hv),
        f(B, Hv * Dv),
        f(Dv),
    )
    A_log, dt, S = f(Hv).astype(mx.float32), f(Hv).astype(mx.float32), f(B, Hv, Dv, Dk) * 0.1
    S = S.astype(mx.float32)
    mod = cpu_ext.load()
    args = (w, a, b, A_log, dt, S, Hk, Dk, Hv, Dv, None)
    y, s, c = mod.gated_delta_decode(qkv, cs, *args, z, nw, 1e-6)
    f32 = [u.astype(mx.float32) for u in (qkv, cs, z, nw)]
    y32, s32, c32 = mod.gated_delta_decode(f32[0], f32[1], *args, f32[2], f32[3], 1e-6)
    assert y.dtype == c.dtype == dtype and s.dtype == mx.float32
    assert mx.array_equal(y, y32.astype(dtype)).item() and mx.array_equal(c, c32.astype(dtype))
    assert mx.array_equal(s, s32).item()
