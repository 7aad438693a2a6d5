"""The layers' attention through `kernels.attention` (the decode attention kernel's wiring):
the compiled decode and verify steps and the plain path at T <= 8 over a cache.

On the CPU the kernel does not run, so `kernel_backend` is replaced by a stand-in that computes
the same call with MLX's ops (`decode_attention_ref`: the whole buffer, the array `start`, the
mask, the gate read at its offset of the unsplit q projection). That checks everything the
layers hand the kernel: with it, greedy decoding matches the ops path (DECODE_KERNEL "off") and
the compiled step matches the plain path token for token, and the stand-in is called from every
place it should be. On a GPU with CUDA the same checks run with the real kernel.
The tiny test models elsewhere have head_dim 16, which the kernel does not take; these use 32.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache, KVCache

import qwen35_mlx.kernels.attention as attention_kernel
from qwen35_mlx.kernels.attention import decode_attention_ref, launch
from qwen35_mlx.models import layers

from .models.factory import make_text_config, make_text_model
from .test_fast_decode import TOKENS, greedy

CUDA = mx.cuda.is_available() and mx.default_device() == mx.gpu


class OpsBackend:
    """Stands in for the kernel pair: the same arguments, MLX's ops. Counts its calls by T."""

    def __init__(self):
        self.calls = []
        self.gates = []  # (B, T, the gate's shape, its head stride) a call

    def run(
        self,
        q,
        k,
        v,
        start,
        scale,
        mask=None,
        causal=False,
        gate=None,
        gate_offset=0,
        gate_head_stride=None,
    ):
        self.calls.append(q.shape[2])
        assert start.dtype == mx.int32 and start.size == 1
        assert mask is None or mask.dtype == mx.bool_
        if gate is not None:
            self.gates.append((q.shape[0], q.shape[2], tuple(gate.shape), gate_head_stride))
        m = "causal" if causal else mask
        gates = dict(gate=gate, gate_offset=gate_offset, gate_head_stride=gate_head_stride)
        return decode_attention_ref(q, k, v, scale=scale, mask=m, start=start, **gates)


@pytest.fixture
def backend(monkeypatch):
    """The kernel (CUDA) or its ops stand-in (elsewhere), as `kernel_backend` gives it."""
    monkeypatch.setattr(KVCache, "step", 4)
    monkeypatch.setattr(BatchKVCache, "step", 4)
    if CUDA:
        yield None
        return
    ops = OpsBackend()

    def kernel_backend(q, k, v):
        if attention_kernel.DECODE_KERNEL == "off":
            return None
        return ops if launch.shape_supported(q, k, v) else None

    monkeypatch.setattr(attention_kernel, "kernel_backend", kernel_backend)
    yield ops


@pytest.fixture(scope="module")
def model():
    return make_text_model(make_text_config(head_dim=32, num_attention_heads=8), seed=3)


def _off(monkeypatch, run):
    monkeypatch.setattr(attention_kernel, "DECODE_KERNEL", "off")
    try:
        return run()
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("pads", [None, [2, 0, 1]], ids=["plain", "left-padded"])
def test_decode_through_the_kernel_call(model, backend, monkeypatch, pads):
    B = 1 if pads is None else 3
    prompts = [TOKENS[i : i + 6] for i in range(B)]
    if pads:
        prompts = [[0] * p + row[p:] for p, row in zip(pads, prompts, strict=True)]
    t_plain, l_plain = greedy(model, prompts, 10, False, pads)
    t_comp, l_comp = greedy(model, prompts, 10, True, pads)
    # The compiled step and the plain path: the same tokens (the kernel: the same bits).
    np.testing.assert_array_equal(t_comp, t_plain)
    np.testing.assert_allclose(l_comp, l_plain, atol=2e-5, rtol=1e-4)
    if backend is not None:
        assert 1 in backend.calls  # decode steps (T = 1) went through it
        assert backend.calls.count(6) == 2  # the 6-token prompt's prefill, both runs
    # Against MLX's attention as the layers ran it before (no kernel anywhere).
    monkeypatch.setattr(KVCache, "step", 4)
    monkeypatch.setattr(BatchKVCache, "step", 4)
    t_ops, l_ops = _off(monkeypatch, lambda: greedy(model, prompts, 10, False, pads))
    np.testing.assert_array_equal(t_plain, t_ops)
    # On CUDA MLX's fallback multiplies fp32 in its matmuls' precision (TF32 where cuBLAS
    # allows it: ~1e-3 relative on the scores), the kernel in full fp32 FMAs.
    rtol = 1e-2 if CUDA else 1e-3
    np.testing.assert_allclose(l_plain, l_ops, atol=1e-4, rtol=rtol)


def test_verify_step_through_the_kernel_call(model, backend):
    """A 3-token call over a filled cache is the compiled verify step (the layers' `steps`):
    equal to the plain path's 3-token call."""
    outs = []
    for compiled in (False, True):
        model.compiled_decode = compiled
        try:
            cache = model.make_cache()
            model(mx.array([TOKENS[:9]]), cache=cache)
            outs.append(np.array(model(mx.array([TOKENS[9:12]]), cache=cache).astype(mx.float32)))
        finally:
            model.compiled_decode = True
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-5, rtol=1e-4)
    if backend is not None:
        assert backend.calls.count(3) >= 2  # the verify step and the plain call


@pytest.mark.parametrize("row_wise", [False, True], ids=["matmul", "row-wise"])
def test_gate_read_in_place(backend, monkeypatch, row_wise):
    """The compiled steps over more than one row (a 3-token verify step; decode steps of 3 rows)
    pass the whole fused q|k|v output as the gate (`layers.GATE_IN_PLACE`: rows of N = Hq 2D +
    2 Hkv D, head stride 2D), from the fused matmul and from the row-wise products' columns:
    the same logits, bit for bit, as with the gate's split view. One-row steps keep the view."""
    # Fused projections as on a GPU (the CPU's transposed per-layer weights have no one matrix).
    monkeypatch.setattr(layers, "CPU_TRANSPOSED_WEIGHTS", False)
    monkeypatch.setattr(layers, "ROWS_GEMV", row_wise)
    cfg = make_text_config(head_dim=32, num_attention_heads=8)
    D, Hq, Hkv = 32, 8, cfg.num_key_value_heads
    N = Hq * 2 * D + 2 * Hkv * D
    prompts = [TOKENS[i : i + 6] for i in range(3)]
    out = {}
    for on in (False, True):
        monkeypatch.setattr(layers, "GATE_IN_PLACE", on)
        model = make_text_model(cfg, seed=3)
        if backend is not None:
            backend.gates.clear()
        cache = model.make_cache()
        model(mx.array([TOKENS[:9]]), cache=cache)
        verify = np.array(model(mx.array([TOKENS[9:12]]), cache=cache))
        step = np.array(model(mx.array([TOKENS[12:13]]), cache=cache))  # one row
        toks, logits = greedy(model, prompts, 4, True, [2, 0, 1])
        out[on] = (verify, step, toks, logits)
        if backend is None:
            continue
        steps = {(b, t): (g, s) for b, t, g, s in backend.gates if (b, t) in ((1, 3), (3, 1))}
        assert set(steps) == {(1, 3), (3, 1)}  # the verify step, the batched decode steps
        for (b, t), (shape, stride) in steps.items():
            if on:  # [B*T, N] from the matmul, [B*T, N, 1] the row-wise columns
                assert stride == 2 * D and shape in ((b * t, N), (b * t, N, 1)), (b, t, shape)
            else:
                assert stride is None and shape[-1] == 2 * D, (b, t, shape)
        one_row = [s for b, t, _, s in backend.gates if b * t == 1]
        assert one_row and not any(one_row)  # one row: the view, as before
    for a, b in zip(out[False], out[True], strict=True):
        assert np.array_equal(a, b)


def test_rows_gate_checked_and_read_by_the_ops_path():
    """`kernels.attention.decode_attention` with the gate as rows (gate_head_stride): the same
    values as the dense gate through the ops path (`decode_attention_ref`, the CPU's), in each
    row form; a row too short for the heads, a stride under D or another shape: an error."""
    from tests.kernels.attention_np import make_attention_inputs

    B, Hq, Hkv, T, C, D = 2, 4, 2, 3, 20, 32
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, D, gate=True, seed=2)
    kv = 50.0 * mx.random.normal((B, T, 2 * Hkv * D), key=mx.random.key(5))
    rows = mx.concatenate([g.reshape(B, T, Hq * 2 * D), kv], axis=-1)
    N = rows.shape[-1]
    kw = dict(scale=D**-0.5, mask="causal", gate_offset=D)
    dense = attention_kernel.decode_attention(q, k, v, gate=g, **kw)
    for form in (rows, rows.reshape(B * T, N), rows.reshape(B * T, N, 1)):
        o = attention_kernel.decode_attention(q, k, v, gate=form, gate_head_stride=2 * D, **kw)
        assert mx.array_equal(o, dense).item()
    short = rows[..., : Hq * 2 * D - 1]
    for gate, stride, err in (
        (short, 2 * D, "leave no"),
        (rows, D - 1, "leave no"),
        (rows.reshape(B, T, N, 1), 2 * D, "rows"),
        (rows.reshape(T, B, N), 2 * D, "rows"),  # (B != T)
    ):
        with pytest.raises(ValueError, match=err):
            attention_kernel.decode_attention(q, k, v, gate=gate, gate_head_stride=stride, **kw)
