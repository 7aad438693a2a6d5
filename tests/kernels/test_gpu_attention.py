"""The decode attention kernels on a GPU (`kernels.attention.decode_attention`) against the
float64 oracle (tests/kernels/attention_np.py) and MLX's own attention.

Runs only with MLX's CUDA backend (where `DECODE_KERNEL = "auto"` uses the kernel), or on a Mac
with the switch turned "on" here. Covered: Qwen3.5's shapes (D = 256, GQA 4) and others, T 1..8,
key counts in one split and in hundreds, a start before the buffer's end, left padding, causal
masks, a fully masked row, the gate, bf16 and fp32; bit-identical results whatever the buffer's
capacity (what makes the compiled decode step equal the plain path).
"""

import mlx.core as mx
import numpy as np
import pytest

import qwen35_mlx.kernels.attention as attention_kernel
from qwen35_mlx.kernels.attention import decode_attention
from tests.kernels.attention_np import decode_attention_np, make_attention_inputs
from tests.kernels.gpu import GPU_ONLY

pytestmark = GPU_ONLY

TOL = {mx.float32: 2e-5, mx.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch):
    """The kernel on whichever GPU this is (Metal's default is MLX's own attention)."""
    monkeypatch.setattr(attention_kernel, "DECODE_KERNEL", "on")
    with mx.stream(mx.gpu):
        yield


def static_mask(B, T, C, start, pads=None) -> mx.array:
    """As models/cache.static_causal_mask: pos <= start + t and >= the row's left padding."""
    pos = np.arange(C)
    m = pos[None] <= start + np.arange(T)[:, None]
    if pads is None:
        return mx.array(m[None, None])
    return mx.array((m[None] & (pos[None, None] >= np.array(pads)[:, None, None]))[:, None])


def check(o, want, dtype, tol=None):
    o = np.asarray(o.astype(mx.float32))
    assert np.isfinite(o).all()
    scale = max(np.abs(want).max(), 1e-6)
    err = np.abs(o - want).max() / scale
    assert err < (tol or TOL[dtype]), f"max error {err:.3g} relative to {scale:.3g}"


def test_kernel_runs_here():
    q, k, v, _ = make_attention_inputs(1, 8, 2, 1, 16, 256)
    assert attention_kernel.kernel_backend(q, k, v) is not None


# (B, Hq, Hkv, T, C, start, D)
CASES = [
    (1, 8, 2, 1, 1, 0, 256),
    (1, 8, 2, 1, 4096, None, 256),
    (2, 16, 4, 2, 700, 600, 256),
    (3, 8, 2, 4, 333, None, 256),
    (1, 8, 8, 8, 129, 100, 128),
    (4, 4, 1, 3, 2000, 1500, 64),
    (32, 8, 2, 1, 520, 511, 256),
]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["none", "causal", "mask"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}Hq{}Hkv{}T{}C{}s{}D{}".format(*c))
def test_decode_attention_matches_float64(case, kind, dtype):
    B, Hq, Hkv, T, C, start, D = case
    s = C - T if start is None else start
    gated = kind != "causal"
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, D, dtype=dtype, gate=gated, seed=C)
    mask = "causal" if kind == "causal" else None
    if kind == "mask":
        mask = static_mask(B, T, C, s, [(b % 3) * 7 for b in range(B)] if B > 1 else None)
    o = decode_attention(q, k, v, scale=D**-0.5, mask=mask, start=s, gate=g, gate_offset=D)
    arr = mask if isinstance(mask, mx.array) else None
    want = decode_attention_np(q, k, v, D**-0.5, s, arr, kind == "causal", g, D)
    check(o, want, dtype)


@pytest.mark.parametrize("T", [1, 2, 4])
def test_decode_attention_matches_mlx(T):
    """Against MLX's attention (its fallback graph at D = 256) + the gate as ops, bf16. MLX
    rounds q * scale and the scores to bf16 (scores of a few units: ~1-2% on the softmax
    weights), the kernel keeps fp32: 5% of the largest output bounds their difference."""
    B, Hq, Hkv, C, D = 2, 16, 4, 1000, 256
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, D, dtype=mx.bfloat16, gate=True)
    mask = static_mask(B, T, C, C - T, [0, 9])
    o = decode_attention(q, k, v, scale=D**-0.5, mask=mask, gate=g, gate_offset=D)
    attention_kernel.DECODE_KERNEL = "off"
    try:
        ref = decode_attention(q, k, v, scale=D**-0.5, mask=mask, gate=g, gate_offset=D)
    finally:
        attention_kernel.DECODE_KERNEL = "on"
    check(o, np.asarray(ref.astype(mx.float32)).astype(np.float64), mx.bfloat16, tol=5e-2)


def test_buffer_capacity_changes_no_bit():
    """The keys of a 300-position prefix, alone and inside a 4096-position buffer whose tail
    holds garbage (inf, NaN): the same bits, for None / causal / mask."""
    B, Hq, Hkv, T, n, cap, D = 2, 8, 2, 3, 300, 4096, 256
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, cap, D, dtype=mx.bfloat16, gate=True)
    k = mx.concatenate([k[:, :, :n], mx.full((B, Hkv, cap - n, D), mx.inf, k.dtype)], axis=2)
    v = mx.concatenate([v[:, :, :n], mx.full((B, Hkv, cap - n, D), mx.nan, v.dtype)], axis=2)
    s = n - T
    for big_mask, small_mask in (
        (None, None),
        ("causal", "causal"),
        (static_mask(B, T, cap, s, [0, 5]), static_mask(B, T, n, s, [0, 5])),
    ):
        kw = dict(scale=D**-0.5, start=s, gate=g, gate_offset=D)
        big = decode_attention(q, k, v, mask=big_mask, **kw)
        small = decode_attention(q, k[:, :, :n], v[:, :, :n], mask=small_mask, **kw)
        assert np.isfinite(np.asarray(big.astype(mx.float32))).all()
        assert mx.array_equal(big, small).item()


def test_fully_masked_row_is_zero():
    B, Hq, Hkv, T, C, D = 2, 8, 2, 2, 50, 256
    q, k, v, _ = make_attention_inputs(B, Hq, Hkv, T, C, D, dtype=mx.bfloat16)
    m = np.broadcast_to(np.asarray(static_mask(B, T, C, C - T)), (B, 1, T, C)).copy()
    m[1, 0, 0] = False
    mask = mx.array(m)
    o = np.asarray(decode_attention(q, k, v, scale=1 / 16, mask=mask).astype(mx.float32))
    assert np.isfinite(o).all() and not o[1, 0].any()
    check(mx.array(o), decode_attention_np(q, k, v, 1 / 16, C - T, mask), mx.bfloat16)


@pytest.mark.parametrize("shape", ["rows", "flat", "columns"])
@pytest.mark.parametrize("T", [1, 2, 3])
def test_gate_read_in_place_equals_dense_gate(T, shape):
    """The gate as rows of the fused q|k|v output (`layers.GATE_IN_PLACE`: head h's gate at
    h 2D + D of a row of N = Hq 2D + 2 Hkv D, the k|v columns after), in the forms the steps
    pass it ([B, T, N]; [B*T, N]; [B*T, N, 1], the row-wise products' columns): the same bits
    as the gate [B, T, Hq, 2D] passed dense, and the oracle's."""
    B, Hq, Hkv, C, D = 3, 8, 2, 300, 256
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, D, dtype=mx.bfloat16, gate=True, seed=T)
    kv = (50.0 * mx.random.normal((B, T, 2 * Hkv * D), key=mx.random.key(1))).astype(g.dtype)
    rows = mx.concatenate([g.reshape(B, T, Hq * 2 * D), kv], axis=-1)
    N = rows.shape[-1]
    rows = {"rows": rows, "flat": rows.reshape(B * T, N), "columns": rows.reshape(B * T, N, 1)}
    mask = static_mask(B, T, C, C - T, [0, 4, 30])
    kw = dict(scale=D**-0.5, mask=mask, gate_offset=D)
    dense = decode_attention(q, k, v, gate=g, **kw)
    in_place = decode_attention(q, k, v, gate=rows[shape], gate_head_stride=2 * D, **kw)
    assert mx.array_equal(dense, in_place).item()
    check(in_place, decode_attention_np(q, k, v, D**-0.5, C - T, mask, False, g, D), mx.bfloat16)
