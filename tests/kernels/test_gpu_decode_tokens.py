"""The packed T-token decode kernel (`gated_delta_decode_packed` on a GPU) against the ops path.

Runs only where MLX has a CUDA or Metal GPU. Checks, for T = 1..8 tokens a row, with and without
masks, at the 0.8B layer shape (Hk = Hv = 16, Dk = Dv = 128) and a GQA one (Hv = 2 Hk), bf16 and
fp32: y of every token and the (conv, recurrent) state after every token against `ref` (the ops
of the CPU path, one `gated_delta_decode` a token, on the CPU stream, from host copies of the
inputs; a failure also reports both against the float64 loop); and that one launch of T tokens
gives bit for bit what T launches of the one-token packed kernel give (the speculative verify
step against plain decoding). Outputs start as NaN, so a value the kernel fails to write fails.
(Against float64 alone bf16's tolerance is too close: the ops path itself is up to 0.014 off it
on these inputs and 0.022 with 1% of them an ulp away; the CPU tests hold the kernel body to
both: test_decode_kernel_on_cpu.py.) `test_time_packed_tokens` prints a table: one launch of T
tokens against T one-token launches and against the one-token step (run with -s):

    python -m pytest -q -s tests/kernels/test_gpu_decode_tokens.py
"""

import time

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import gated_delta_decode_packed
from tests.conftest import RTOL, rel_err
from tests.kernels.gpu import BACKEND, GPU_ONLY, NAN
from tests.kernels.helpers import np64, packed_np

pytestmark = GPU_ONLY

NAMES = ("proj", "conv_state", "conv_w", "A_log", "dt_bias", "state", "norm_w")


def _impl():
    from qwen35_mlx.kernels.gated_delta import _gpu_backend

    return _gpu_backend(BACKEND)


def inputs(B, T, Hk, Hv, Dk, Dv, dtype, seed=0, K=4):
    """proj [B * T, qkv | z | b | a] and the layer's other inputs (fp32 state)."""
    C = 2 * Hk * Dk + Hv * Dv
    ks = mx.random.split(mx.random.key(seed), 8)
    proj = mx.concatenate(
        [
            2 * mx.random.normal((B * T, C), key=ks[0]),
            2 * mx.random.normal((B * T, Hv * Dv), key=ks[1]),
            mx.random.normal((B * T, Hv), key=ks[2]),
            3 * mx.random.normal((B * T, Hv), key=ks[3]),
        ],
        axis=1,
    ).astype(dtype)
    x = {
        "proj": proj,
        "conv_state": mx.random.normal((B, K - 1, C), key=ks[4]).astype(dtype),
        "conv_w": (0.5 * mx.random.normal((C, K), key=ks[5])).astype(dtype),
        "A_log": mx.log(mx.random.uniform(1.0, 16.0, (Hv,), key=ks[6])),
        "dt_bias": mx.ones((Hv,)),
        "state": 0.1 * mx.random.normal((B, Hv, Dv, Dk), key=ks[7]),
        "norm_w": (1 + 0.3 * mx.random.normal((Dv,), key=ks[0])).astype(dtype),
    }
    mx.eval(x)
    return x


def masks(B, T):
    """Row 0 all real, row 1 left-padded, row 2 a hole in the middle."""
    m = np.ones((B, T), bool)
    if B > 1:
        m[1, : min(2, T - 1)] = False
    if B > 2 and T > 2:
        m[2, T // 2] = False
    return mx.array(m)


def kernel(x, T, mask, dims, stacked=False):
    """The packed kernel (NaN-poisoned outputs): (y, [(conv, state) after each token]); the
    per-token states as rows [(T-1) B, ...] (token t's: rows t B .. t B + B - 1), or stacked
    [T-1, B, ...]."""
    args = [x[n] for n in NAMES[:-1]]
    out = _impl().gated_delta_decode_packed_kernel(
        *args, mask, tokens=T, norm_w=x["norm_w"], norm_eps=1e-6, init_value=NAN, stacked=stacked
    )
    mx.eval(out)
    y, s, cs, tok = out
    B = s.shape[0]
    per = []
    if tok is not None and stacked:
        assert tok[0].shape == (T - 1, *s.shape) and tok[1].shape == (T - 1, *cs.shape)
        per = [(tok[1][t], tok[0][t]) for t in range(T - 1)]
    elif tok is not None:
        assert tok[0].shape == ((T - 1) * B, *s.shape[1:])
        assert tok[1].shape == ((T - 1) * B, *cs.shape[1:])
        per = [(tok[1][t * B : (t + 1) * B], tok[0][t * B : (t + 1) * B]) for t in range(T - 1)]
    return y, per + [(cs, s)]


def _kw(Hk, Dk, Hv, Dv):
    return dict(num_k_heads=Hk, head_k_dim=Dk, num_v_heads=Hv, head_v_dim=Dv, norm_eps=1e-6)


def host_copy(a: mx.array) -> mx.array:
    """`a` rebuilt on the CPU stream from a NumPy copy: the same values in a buffer the GPU never
    wrote (the copy is read here, on this thread)."""
    h = np.array(a) if a.dtype == mx.bool_ else np.array(a.astype(mx.float32))
    with mx.stream(mx.cpu):
        c = mx.array(h).astype(a.dtype)
        mx.eval(c)
    return c


def reference(x, T, mask, dims):
    """MLX's ops (`ref`: one `gated_delta_decode` a token, the kernel's roundings) on the CPU
    stream: (y [B * T, Hv * Dv], [(conv, state) after each token]).

    From host copies of the inputs: until session 16 this test fed the CPU stream the arrays the
    GPU had just made, as the chunk kernels' tests did when, in parallel GPU test processes,
    their MLX reference came out wrong about once a process with the kernel right (NOTES
    sessions 10-11); MLX 0.32's CUDA allocator moves such a buffer to unified memory on its first
    CPU use with no lock (allocator.cpp `move_to_unified_memory`), while the CPU stream's encoder
    (this thread) and its worker thread may both be first. This test's one failure (session 16:
    T = 1, masked, bf16, y 0.197 off) compared kernel and reference only with each other; a
    failure now also says which of the two float64 finds off (`_which`; NOTES "packrace")."""
    Hk, Dk, Hv, Dv = dims
    xh = {n: host_copy(x[n]) for n in NAMES}
    mh = None if mask is None else host_copy(mask)
    with mx.stream(mx.cpu):
        y, s, cs, per = gated_delta_decode_packed(
            *[xh[n] for n in NAMES], tokens=T, mask=mh, backend="ref", **_kw(*dims)
        )
        mx.eval(y, s, cs, per)
    return y, (per or [(cs, s)])


def _which(x, T, mask, dims, got, want, t=None) -> str:
    """A failed comparison's message: kernel (got) and reference (want) against the float64
    loop (`helpers.packed_np`), y or (t given) the state after token t, and where got and want
    differ most."""
    m = None if mask is None else np.array(mask)
    y64, states, _ = packed_np({n: np64(x[n]) for n in NAMES}, m, T, dims, 1e-6)
    exact = y64.reshape(got.shape) if t is None else states[t]
    d = np.abs(got - want)
    i = np.unravel_index(int(np.argmax(d)), d.shape)
    return (
        f"against float64: kernel {rel_err(got, exact):.3g}, reference {rel_err(want, exact):.3g}"
        f"; worst at {i}: kernel {got[i]}, reference {want[i]}, float64 {exact[i]:.6g}; "
        f"{int((d > 0.01 * np.abs(want).max()).sum())} of {d.size} off by > 1% of the scale"
    )


SHAPES = [(1, 16, 16, 128, 128), (3, 2, 4, 128, 128), (2, 2, 4, 64, 32)]


# bf16 at every shape and T (each (Dk, W, T, mask) is one NVRTC compile, a few seconds); fp32
# at the 0.8B layer.
CASES = [(s, T, m, mx.bfloat16) for s in SHAPES for T in (1, 2, 3, 8) for m in (False, True)]
CASES += [(SHAPES[0], T, True, mx.float32) for T in (1, 2)]


@pytest.mark.parametrize(
    "shape, T, masked, dtype",
    CASES,
    ids=lambda v: str(v) if not isinstance(v, tuple) else "B{}Hk{}Hv{}Dk{}Dv{}".format(*v),
)
def test_packed_tokens_match_ref(shape, T, masked, dtype):
    B, Hk, Hv, Dk, Dv = shape
    dims = (Hk, Dk, Hv, Dv)
    x = inputs(B, T, Hk, Hv, Dk, Dv, dtype, seed=T + B)
    mask = masks(B, T) if masked else None
    y, per = kernel(x, T, mask, dims)
    y_ref, per_ref = reference(x, T, mask, dims)
    assert y.shape == (B * T, Hv * Dv) and len(per) == len(per_ref) == T
    y32 = np.array(y.astype(mx.float32))
    assert np.isfinite(y32).all()
    yr = np.array(y_ref.astype(mx.float32))
    assert rel_err(y32, yr) <= RTOL[dtype], _which(x, T, mask, dims, y32, yr)
    for t, ((cs, s), (cs_ref, s_ref)) in enumerate(zip(per, per_ref, strict=True)):
        s, s_ref = np.array(s), np.array(s_ref)
        assert np.isfinite(s).all(), t
        assert np.array_equal(np.array(cs.astype(mx.float32)), np.array(cs_ref.astype(mx.float32)))
        assert rel_err(s, s_ref) <= RTOL[dtype], (t, _which(x, T, mask, dims, s, s_ref, t))
    if masked:
        off = ~np.array(mask).reshape(-1)
        assert not np.any(y32[off])


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("T", [2, 8])
def test_tokens_in_one_launch_equal_one_launch_a_token(T, dtype):
    """The verify step's launch against plain decoding's: bit for bit, every output."""
    B, Hk, Hv, Dk, Dv = 3, 16, 16, 128, 128
    dims = (Hk, Dk, Hv, Dv)
    x = inputs(B, T, Hk, Hv, Dk, Dv, dtype, seed=T)
    mask = masks(B, T)
    y, per = kernel(x, T, mask, dims)
    rows = x["proj"].reshape(B, T, -1)
    one = dict(x)
    for t in range(T):
        one["proj"] = mx.contiguous(rows[:, t])
        y1, ((cs1, s1),) = kernel(one, 1, mask[:, t : t + 1], dims)
        got = y.reshape(B, T, -1)[:, t]
        assert np.array_equal(np.array(got.astype(mx.float32)), np.array(y1.astype(mx.float32)))
        assert np.array_equal(np.array(per[t][1]), np.array(s1)), t
        assert np.array_equal(
            np.array(per[t][0].astype(mx.float32)), np.array(cs1.astype(mx.float32))
        )
        one["state"], one["conv_state"] = s1, cs1


def _time(fn, iters=200) -> float:
    """Median of 5 runs of `iters` calls, us a call (each call evaluated)."""
    runs = []
    for _ in range(5):
        mx.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            mx.eval(fn())
        mx.synchronize()
        runs.append((time.perf_counter() - t0) / iters * 1e6)
    return sorted(runs)[2]


def test_time_packed_tokens():
    """The 0.8B layer at batch 1, bf16: one launch of T tokens against T launches of one token
    (each evaluated: host and device time together). Prints a table (pytest -s)."""
    B, Hk, Hv, Dk, Dv = 1, 16, 16, 128, 128
    dims = (Hk, Dk, Hv, Dv)
    rows = []
    x1 = inputs(B, 1, Hk, Hv, Dk, Dv, mx.bfloat16)
    one = _time(lambda: kernel_call(x1, 1, dims))
    for T in (2, 3, 4):
        x = inputs(B, T, Hk, Hv, Dk, Dv, mx.bfloat16)
        packed = _time(lambda x=x, T=T: kernel_call(x, T, dims))
        rows.append((T, packed, T * one))
    print(f"\npacked decode kernel, 0.8B layer, B=1 bf16 ({BACKEND}); one token: {one:.1f} us")
    print(f"{'T':>3} {'one launch us':>14} {'T launches us':>14} {'ratio':>6} {'vs 1 token':>10}")
    for T, p, t in rows:
        print(f"{T:>3} {p:>14.1f} {t:>14.1f} {p / t:>6.2f} {p / one:>10.2f}")
    for T, p, t in rows:
        assert p < t, (T, p, t)  # one launch of T tokens beats T launches


def kernel_call(x, T, dims):
    args = [x[n] for n in NAMES[:-1]]
    return _impl().gated_delta_decode_packed_kernel(
        *args, None, tokens=T, norm_w=x["norm_w"], norm_eps=1e-6
    )


@pytest.mark.parametrize("T", [2, 3])
def test_packed_token_states_rows_equal_stacked(T):
    """The per-token states as rows (the default) and stacked: the same bits (one memory, two
    shapes), at three batch rows."""
    B, Hk, Hv, Dk, Dv = SHAPES[1]
    x = inputs(B, T, Hk, Hv, Dk, Dv, mx.bfloat16, seed=7)
    mask = masks(B, T)
    _, rows = kernel(x, T, mask, (Hk, Dk, Hv, Dv))
    _, stacked = kernel(x, T, mask, (Hk, Dk, Hv, Dv), stacked=True)
    for (c1, s1), (c2, s2) in zip(rows, stacked, strict=True):
        assert np.array_equal(np.array(s1), np.array(s2))
        assert np.array_equal(np.array(c1.astype(mx.float32)), np.array(c2.astype(mx.float32)))


@pytest.mark.parametrize("T", [2, 3])
def test_packed_columns_equal_rows(T):
    """proj as columns [B*T, N, 1] (the verify pass's row-wise in-projection as it comes out,
    `layers.PACKED_COLUMNS`): y as columns [B*T, Hv*Dv, 1], every output the rows form's bit for
    bit, through the public entry (the kernel reads proj's first two dims), masked, B 3."""
    B, Hk, Hv, Dk, Dv = SHAPES[1]
    x = inputs(B, T, Hk, Hv, Dk, Dv, mx.bfloat16, seed=11)
    mask = masks(B, T)
    args = [x[n] for n in NAMES]
    kw = dict(tokens=T, mask=mask, **_kw(Hk, Dk, Hv, Dv))
    rows = gated_delta_decode_packed(*args, **kw)
    cols = gated_delta_decode_packed(x["proj"][..., None], *args[1:], **kw)
    mx.eval(rows, cols)
    assert rows[0].shape == (B * T, Hv * Dv) and cols[0].shape == (B * T, Hv * Dv, 1)
    assert np.array_equal(np.array(rows[0].astype(mx.float32)).reshape(-1),
                          np.array(cols[0].astype(mx.float32)).reshape(-1))  # fmt: skip
    for a, b in zip([rows[1], rows[2], *rows[3]], [cols[1], cols[2], *cols[3]], strict=True):
        assert np.array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))
