"""The residual stream passed between layers as (x, d) pairs, each add inside the next norm
(`layers.ADD_NORM`, `kernels.fused_norm.add_rms_norm`).

The pair structure is opt-in (the default keeps the old one: layers.py says why), so these
tests force it. On the CPU no kernel runs: `add_rms_norm` is the same add and
`mx.fast.rms_norm` as before, so the logits must be bit-identical to the old structure's, in
the plain path, the compiled decode step and the compiled verify step; and compiled == plain.
The kernel itself is tested in
tests/kernels/test_fused_norm_on_cpu.py (emulated) and test_gpu_fused_norm.py (on a GPU).
"""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels import fused_norm
from qwen35_mlx.models import layers

from .models.factory import make_moe_config, make_text_config, make_text_model
from .test_fast_decode import (
    TOKENS,
    assert_as_accurate,
    assert_same,
    fp32_copy,
    fused_rounding,
    greedy,
)


def test_the_default_keeps_the_old_structure():
    x = mx.zeros((1, 1, 8), mx.bfloat16)
    assert layers.ADD_NORM is False and not layers.add_norm_on(x)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("B", [1, 3])
def test_pairs_equal_the_old_structure_and_compiled_equals_plain(monkeypatch, moe, B):
    prompts = [TOKENS[i : i + 6] for i in range(B)]
    out = {}
    for mode in (False, True):
        monkeypatch.setattr(layers, "ADD_NORM", mode)
        model = make_text_model(make_moe_config() if moe else make_text_config(), seed=41)
        model.set_dtype(mx.bfloat16)
        out[mode] = greedy(model, prompts, 8, False), greedy(model, prompts, 8, True)
        assert_same(model, prompts, 8)
    if fused_norm.kernel_available(mx.zeros((1,), mx.bfloat16)):
        return  # a GPU: the kernel rounds unlike add + rms_norm; compiled == plain checked above
    for (t0, l0), (t1, l1) in zip(out[False], out[True], strict=True):
        np.testing.assert_array_equal(t1, t0)
        np.testing.assert_array_equal(l1, l0)


def test_pairs_in_the_verify_step(monkeypatch):
    """A few tokens a row over a filled cache (the compiled verify step, `steps`) against the
    plain call, in the pair structure."""
    monkeypatch.setattr(layers, "ADD_NORM", True)
    model = make_text_model(make_text_config(), seed=42)
    model.set_dtype(mx.bfloat16)
    outs = []
    for compiled in (False, True):
        model.compiled_decode = compiled
        cache = model.make_cache()
        mx.eval(model(mx.array([TOKENS[:7]]), cache=cache))
        outs.append(np.array(model(mx.array([TOKENS[7:11]]), cache=cache).astype(mx.float32)))
    model.compiled_decode = True
    if not fused_rounding(model):
        np.testing.assert_array_equal(outs[1], outs[0])
        return
    # A GPU: compiled and plain round differently (test_fast_decode.fused_rounding).
    ref = fp32_copy(model)
    cache = ref.make_cache()
    mx.eval(ref(mx.array([TOKENS[:7]]), cache=cache))
    assert_as_accurate(outs[0], outs[1], np.array(ref(mx.array([TOKENS[7:11]]), cache=cache)))


def test_pairs_check_can_fail(monkeypatch):
    """The check above sees a wrong stream: dropping the mixer's output from the sum."""
    monkeypatch.setattr(layers, "ADD_NORM", True)
    real = layers.add_norm
    calls = []

    def broken(norm, x, d):
        calls.append(1)
        return real(norm, x, None if len(calls) == 2 else d)

    model = make_text_model(make_text_config(), seed=43)
    model.set_dtype(mx.bfloat16)
    want = greedy(model, [TOKENS[:6]], 3, False)[1]
    monkeypatch.setattr(layers, "add_norm", broken)
    got = greedy(model, [TOKENS[:6]], 3, False)[1]
    assert not np.array_equal(got, want)
