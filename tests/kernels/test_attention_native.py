"""The native CPU decode attention (`kernels.attention.decode_attention` on the CPU where the
extension is built: kernels/cpu_ext `attention`) against the float64 oracle
(tests/kernels/attention_np.py): Qwen3.5's shapes and others, T 1..8, a start before the
buffer's end, left padding, causal masks, a fully masked row (0), the gate in both layouts,
strided q; bit-identical whatever the buffer's capacity (what makes the compiled decode step
equal the plain path); inside `mx.compile`; the ops where it is not built or switched off."""

import mlx.core as mx
import numpy as np
import pytest

import qwen35_mlx.kernels.attention as attention_kernel
from qwen35_mlx.kernels import cpu_ext
from qwen35_mlx.kernels.attention import decode_attention
from tests.conftest import NATIVE_BUILD_ERROR
from tests.kernels.attention_np import decode_attention_np, make_attention_inputs

pytestmark = pytest.mark.skipif(
    mx.default_device() != mx.cpu or not cpu_ext.available(),
    reason=f"native CPU extension not built or not the default device: {NATIVE_BUILD_ERROR}",
)

TOL = 2e-5


def static_mask(B, T, C, start, pads=None) -> mx.array:
    """As models/cache.static_causal_mask: pos <= start + t and >= the row's left padding."""
    pos = np.arange(C)
    m = pos[None] <= start + np.arange(T)[:, None]
    if pads is None:
        return mx.array(m[None, None])
    return mx.array((m[None] & (pos[None, None] >= np.array(pads)[:, None, None]))[:, None])


def check(o, want):
    o = np.asarray(o)
    assert o.dtype == np.float32 and np.isfinite(o).all()
    scale = max(np.abs(want).max(), 1e-6)
    assert np.abs(o - want).max() / scale < TOL


def test_native_backend_runs_on_cpu(monkeypatch):
    q, k, v, _ = make_attention_inputs(1, 8, 2, 1, 16, 256)
    assert attention_kernel.kernel_backend(q, k, v) is attention_kernel._NativeCPU
    monkeypatch.setattr(attention_kernel, "CPU_NATIVE", False)
    assert attention_kernel.kernel_backend(q, k, v) is None
    monkeypatch.setattr(attention_kernel, "CPU_NATIVE", True)
    assert attention_kernel.kernel_backend(q.astype(mx.bfloat16), k, v) is not None
    monkeypatch.setattr(cpu_ext, "_loaded", [None])
    assert attention_kernel.kernel_backend(q, k, v) is None


# (B, Hq, Hkv, T, C, start, D)
CASES = [
    (1, 8, 2, 1, 1, 0, 256),
    (1, 8, 2, 1, 700, None, 256),
    (2, 16, 4, 2, 300, 200, 256),
    (3, 8, 2, 4, 33, None, 64),
    (1, 8, 8, 8, 129, 100, 128),
    (4, 4, 1, 3, 200, 150, 48),
]


@pytest.mark.parametrize("kind", ["none", "causal", "mask"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}Hq{}Hkv{}T{}C{}s{}D{}".format(*c))
def test_native_decode_attention_matches_float64(case, kind):
    B, Hq, Hkv, T, C, start, D = case
    s = C - T if start is None else start
    gated = kind != "causal"
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, D, gate=gated, seed=C)
    mask = "causal" if kind == "causal" else None
    if kind == "mask":
        mask = static_mask(B, T, C, s, [(b % 3) * 7 for b in range(B)] if B > 1 else None)
    o = decode_attention(q, k, v, scale=D**-0.5, mask=mask, start=s, gate=g, gate_offset=D)
    arr = mask if isinstance(mask, mx.array) else None
    check(o, decode_attention_np(q, k, v, D**-0.5, s, arr, kind == "causal", g, D))
    # start as an array (traced steps) and as None (every key) where it means the same.
    o2 = decode_attention(
        q, k, v, scale=D**-0.5, mask=mask, start=mx.array(s, mx.int32), gate=g, gate_offset=D
    )
    assert mx.array_equal(o, o2).item()


def test_native_gate_layouts_and_strided_q():
    """One token: the gate as [B, Hq, 1, G] (the same memory as [B, 1, Hq, G]); q a transposed
    view of [B, T, Hq, D] (as the layer makes it)."""
    B, Hq, Hkv, T, C, D = 2, 4, 2, 1, 40, 32
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, D, gate=True, seed=3)
    a = decode_attention(q, k, v, scale=0.2, gate=g, gate_offset=D)
    b = decode_attention(q, k, v, scale=0.2, gate=g.reshape(B, Hq, 1, 2 * D), gate_offset=D)
    assert mx.array_equal(a, b).item()
    check(a, decode_attention_np(q, k, v, 0.2, None, None, False, g, D))
    T = 3
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, D, gate=True, seed=4)
    qt = mx.contiguous(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # strided [B, Hq, T, D]
    o = decode_attention(qt, k, v, scale=0.2, mask="causal", gate=g, gate_offset=0)
    check(o, decode_attention_np(q, k, v, 0.2, None, None, True, g, 0))


def test_native_gate_as_rows_of_the_fused_projection():
    """The gate as rows of a fused q|k|v output (gate_head_stride, as the verify pass passes it
    with `layers.GATE_IN_PLACE`): the same bits as the dense [B, T, Hq, 2D] gate it holds."""
    B, Hq, Hkv, T, C, D = 2, 4, 2, 3, 40, 32
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, D, gate=True, seed=5)
    extra = mx.random.normal((B, T, 3 * D), key=mx.random.key(6))  # the k, v columns after it
    rows = mx.concatenate([g.reshape(B, T, Hq * 2 * D), extra], axis=-1)
    kw = dict(scale=0.2, mask="causal", start=C - T - 4)
    dense = decode_attention(q, k, v, gate=g, gate_offset=D, **kw)
    for form in (rows, rows.reshape(B * T, -1), rows.reshape(B * T, -1, 1)):
        got = decode_attention(q, k, v, gate=form, gate_offset=D, gate_head_stride=2 * D, **kw)
        assert mx.array_equal(got, dense).item()
    check(dense, decode_attention_np(q, k, v, 0.2, C - T - 4, None, True, g, D))


def test_native_buffer_capacity_changes_no_bit():
    """The keys of a 300-position prefix, alone and inside a 1024-position buffer whose tail
    holds garbage (inf, NaN): the same bits, for None / causal / mask."""
    B, Hq, Hkv, T, n, cap, D = 2, 8, 2, 3, 300, 1024, 256
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, cap, D, gate=True)
    k = mx.concatenate([k[:, :, :n], mx.full((B, Hkv, cap - n, D), mx.inf)], axis=2)
    v = mx.concatenate([v[:, :, :n], mx.full((B, Hkv, cap - n, D), mx.nan)], axis=2)
    s = n - T
    for big_mask, small_mask in (
        (None, None),
        ("causal", "causal"),
        (static_mask(B, T, cap, s, [0, 5]), static_mask(B, T, n, s, [0, 5])),
    ):
        kw = dict(scale=D**-0.5, start=s, gate=g, gate_offset=D)
        big = decode_attention(q, k, v, mask=big_mask, **kw)
        small = decode_attention(q, k[:, :, :n], v[:, :, :n], mask=small_mask, **kw)
        assert np.isfinite(np.asarray(big)).all()
        assert mx.array_equal(big, small).item()


def test_native_fully_masked_row_is_zero():
    B, Hq, Hkv, T, C, D = 2, 8, 2, 2, 50, 64
    q, k, v, _ = make_attention_inputs(B, Hq, Hkv, T, C, D)
    m = np.broadcast_to(np.asarray(static_mask(B, T, C, C - T)), (B, 1, T, C)).copy()
    m[1, 0, 0] = False
    mask = mx.array(m)
    o = np.asarray(decode_attention(q, k, v, scale=1 / 8, mask=mask))
    assert np.isfinite(o).all() and not o[1, 0].any()
    check(mx.array(o), decode_attention_np(q, k, v, 1 / 8, C - T, mask))


def test_native_attention_inside_compile():
    B, Hq, Hkv, T, C, D = 1, 4, 2, 2, 20, 32
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, D, gate=True, seed=9)

    def f(q, k, v, g, start):
        return decode_attention(q, k, v, scale=0.3, mask="causal", start=start, gate=g)

    start = mx.array(C - T - 4, mx.int32)
    got = mx.compile(f)(q, k, v, g, start)
    assert mx.array_equal(got, f(q, k, v, g, start)).item()
    check(got, decode_attention_np(q, k, v, 0.3, C - T - 4, None, True, g, 0))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "f16"])
def test_native_half_inputs(dtype):
    """Half-precision q, k, v and gate read as float32; the output in q's dtype, within its
    rounding of the float64 oracle."""
    B, Hq, Hkv, T, C, D = 2, 8, 2, 3, 77, 64
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, D, dtype=dtype, gate=True, seed=11)
    o = decode_attention(q, k, v, scale=D**-0.5, mask="causal", start=C - T - 5, gate=g)
    assert o.dtype == dtype
    want = decode_attention_np(q, k, v, D**-0.5, C - T - 5, None, True, g, 0)
    err = np.abs(np.asarray(o.astype(mx.float32)) - want).max() / np.abs(want).max()
    assert err < 1e-2
