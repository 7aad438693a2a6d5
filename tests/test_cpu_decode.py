"""The CPU's decode weights (`layers.CPU_TRANSPOSED_WEIGHTS`): float32 Linear layers store their
weight transposed ([in, out] contiguous, the layer's `weight` a transposed view of it), so that
BLAS runs `x @ W^T` in its fast form. Checked here: the parameters keep their names, shapes and
values (memory, saving), every decode group gets the layout, and the compiled step still equals
the plain path token for token, with logits equal to the GPU layout's.
"""

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels import cpu_blas_is_slow, cpu_ext
from qwen35_mlx.models import layers

from .conftest import assert_parameters_kept, prepare_decode_measured
from .models.factory import make_moe_config, make_text_config, make_text_model
from .test_fast_decode import TOKENS, assert_same, greedy, small_blocks  # noqa: F401

pytestmark = pytest.mark.skipif(
    mx.default_device() != mx.cpu, reason="the CPU's layout (a GPU keeps the fused views)"
)


def _groups(model):
    """(owner, names, made, entry) of every decode group of Linear layers (not the conv)."""
    out = []
    for layer in model.model.layers:
        for owner in (layer.linear_attn if layer.is_linear else layer.self_attn, layer.mlp):
            for names in owner.DECODE_GROUPS:
                if names == ("conv1d",):
                    continue
                made = getattr(owner, "_decode_" + names[0] + "_made", None)
                out.append((owner, names, made, owner.get("_decode_" + names[0])))
    return out


def test_cpu_transposed_weights_keep_the_parameters_and_memory(tmp_path):
    model = make_text_model(make_text_config(hidden_size=128, intermediate_size=256), seed=5)
    params, grown = prepare_decode_measured(model)
    groups = _groups(model)
    # in_proj_qkv/z/b/a and out_proj of 3 linear layers, q/k/v and o of 1 attention layer,
    # gate/up and down of 4 MLPs: every one in the CPU layout, one [in, out] buffer per layer.
    assert len(groups) == 6 + 2 + 8
    moved = 0
    for owner, names, made, entry in groups:
        assert made is not None and not made.fused, names
        assert len(entry) == len(names)
        for n, w_t in zip(names, entry, strict=True):
            assert w_t.shape == owner[n].weight.shape[::-1]
            moved += w_t.nbytes
    # The layers' weights are views of the new buffers: no second copy is kept.
    assert grown < moved / 10, (grown, moved)
    assert_parameters_kept(model, params, tmp_path / "w.safetensors")
    # Made once: later steps keep the same buffers.
    greedy(model, [TOKENS[:4]], 2, True)
    first = [e for *_, e in _groups(model)]
    greedy(model, [TOKENS[:4]], 4, True)
    assert all(
        all(a is b for a, b in zip(x, y, strict=True))
        for x, y in zip(first, [e for *_, e in _groups(model)], strict=True)
    )


@pytest.mark.parametrize("B", [1, 3])
def test_cpu_transposed_weights_compiled_equals_plain(small_blocks, B):  # noqa: F811
    model = make_text_model(make_text_config(), seed=21)
    prompts = [TOKENS[i : i + 6] for i in range(B)]
    toks = assert_same(model, prompts, 10)
    assert all(not made.fused for *_, made, _ in _groups(model))
    # The GPU layout (fused transposed views) on the same weights: same tokens, logits within
    # float32 rounding (other BLAS loops, other summation order at most).
    other = make_text_model(make_text_config(), seed=21)
    layers_flag = layers.CPU_TRANSPOSED_WEIGHTS
    try:
        layers.CPU_TRANSPOSED_WEIGHTS = False
        t_gpu, l_gpu = greedy(other, prompts, 10, True)
        assert any(made.fused for *_, made, _ in _groups(other))
    finally:
        layers.CPU_TRANSPOSED_WEIGHTS = layers_flag
    t_cpu, l_cpu = greedy(model, prompts, 10, True)
    np.testing.assert_array_equal(t_cpu, toks)
    np.testing.assert_array_equal(t_cpu, t_gpu)
    np.testing.assert_allclose(l_cpu, l_gpu, atol=2e-5, rtol=1e-4)


def test_cpu_transposed_weights_moe_and_bf16(small_blocks):  # noqa: F811
    moe = make_text_model(make_moe_config(), seed=22)
    assert_same(moe, [TOKENS[:5], TOKENS[4:9]], 8)
    # The router and shared-expert gate (float32 Linear layers) take the CPU layout too.
    mlp = moe.model.layers[0].mlp
    made = getattr(mlp, "_decode_" + mlp.DECODE_GROUPS[0][0] + "_made")
    assert made is not None and not made.fused
    # bf16 weights keep the fused views: MLX's bf16 CPU matmul is not BLAS, and x @ W.T is its
    # faster form (NOTES).
    dense = make_text_model(make_text_config(), seed=23)
    dense.set_dtype(mx.bfloat16)
    assert_same(dense, [TOKENS[:5]], 6)
    assert any(made.fused for *_, made, _ in _groups(dense))


def test_cpu_transposed_tied_output_layer(tmp_path, small_blocks):  # noqa: F811
    """A tied lm_head (the Embedding as the output layer) takes the CPU layout too: the step's
    logits are x @ E^T with E^T stored [hidden, vocab] contiguous, the Embedding's weight the
    transposed view of it (lookups read strided rows); names, values and memory kept."""
    cfg = make_text_config(hidden_size=128, intermediate_size=256, tie_word_embeddings=True)
    model = make_text_model(cfg, seed=7)
    params, grown = prepare_decode_measured(model)
    owner = model.model
    made = owner._decode_embed_tokens_made
    assert made is not None and not made.fused
    (w_t,) = owner["_decode_embed_tokens"]
    assert w_t.shape == (cfg.hidden_size, cfg.vocab_size)
    np.testing.assert_array_equal(np.array(w_t), params["model.embed_tokens.weight"].T)
    assert grown < w_t.nbytes / 10, (grown, w_t.nbytes)
    assert_parameters_kept(model, params, tmp_path / "w.safetensors")
    # Compiled step against the plain path (which looks rows up in the transposed view), and
    # against an untouched copy of the model on the plain path: same tokens.
    toks = assert_same(model, [TOKENS[:6], TOKENS[5:11]], 8)
    fresh = make_text_model(cfg, seed=7)
    t_ref, l_ref = greedy(fresh, [TOKENS[:6], TOKENS[5:11]], 8, False)
    np.testing.assert_array_equal(toks, t_ref)
    t_cpu, l_cpu = greedy(model, [TOKENS[:6], TOKENS[5:11]], 8, True)
    np.testing.assert_allclose(l_cpu, l_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(
    not cpu_ext.available() or not cpu_blas_is_slow(),
    reason="the native extension is not built, or MLX runs another BLAS than its reference one",
)
@pytest.mark.parametrize("B", [1, 3])
def test_cpu_native_matmul_same_bits_as_blas(small_blocks, monkeypatch, B):  # noqa: F811
    """The decode projections through the native few-rows matmul (`layers.CPU_NATIVE_MATMUL`)
    on MLX's reference BLAS: every group of a step in one call of it (its residual add too), and
    the step's logits the same bits as the plain path's (MLX's matmul) and as a compiled step
    that keeps MLX's matmul (a second model object: a step is traced once)."""
    calls = []

    def spy(x, weights, adds=None):
        calls.append((len(weights), adds is not None))
        return matmul_rows(x, weights, adds)

    matmul_rows = cpu_ext.matmul_rows
    monkeypatch.setattr(cpu_ext, "matmul_rows", spy)
    cfg = make_text_config()
    prompts = [TOKENS[i : i + 6] for i in range(B)]
    model = make_text_model(cfg, seed=31)
    t_plain, l_plain = greedy(model, prompts, 8, False)
    t_nat, l_nat = greedy(model, prompts, 8, True)
    # Each trace (one a block of KV positions): per linear layer in_proj (4 layers) and out_proj
    # + residual, per attention layer q/k/v (3) and o_proj + residual, per MLP gate/up (2) and
    # down_proj + residual, the lm_head.
    n_lin = sum(layer.is_linear for layer in model.model.layers)
    n_att = cfg.num_hidden_layers - n_lin
    want = [(4, False), (1, True)] * n_lin + [(3, False), (1, True)] * n_att
    want += [(2, False), (1, True)] * cfg.num_hidden_layers + [(1, False)]
    traces = len(calls) // len(want)
    assert traces >= 1 and Counter(calls) == Counter(
        {k: v * traces for k, v in Counter(want).items()}
    )
    np.testing.assert_array_equal(l_nat, l_plain)
    np.testing.assert_array_equal(t_nat, t_plain)
    monkeypatch.setattr(layers, "CPU_NATIVE_MATMUL", False)
    calls.clear()
    blas = make_text_model(cfg, seed=31)
    t_blas, l_blas = greedy(blas, prompts, 8, True)
    assert not calls
    np.testing.assert_array_equal(l_nat, l_blas)
