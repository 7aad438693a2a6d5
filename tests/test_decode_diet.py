"""Residual adds folded into the projection before them (`layers.linear_add` / `project_add`).

`layers.FOLD_RESIDUAL` "auto" folds on a GPU only (on CUDA from two rows: see layers.py), so on
the CPU these tests force it on: the plain path and the compiled step must still agree token for
token (both fold), the step must really hold AddMM primitives in place of matmul + add, and the
models must still match transformers (the golden bar, fp32).
"""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.loader import load_model
from qwen35_mlx.models import layers

from .models.factory import make_moe_config, make_text_config, make_text_model
from .models.test_golden_text import BAR, GOLDEN, _scaled_err
from .test_fast_decode import TOKENS, assert_same, step_primitives


@pytest.fixture
def fold(monkeypatch):
    monkeypatch.setattr(layers, "FOLD_RESIDUAL", True)
    # The fold is the structure without the fused add + norm kernel (`layers.ADD_NORM`), which
    # a GPU takes by default (tested in tests/test_add_norm.py).
    monkeypatch.setattr(layers, "ADD_NORM", False)


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("B", [1, 3])
def test_folded_residual_compiled_equals_plain_bf16(fold, moe, B):
    config = make_moe_config() if moe else make_text_config()
    model = make_text_model(config, seed=21)
    model.set_dtype(mx.bfloat16)
    assert_same(model, [TOKENS[i : i + 6] for i in range(B)], 10)


def test_folded_residual_is_one_addmm_per_projection(monkeypatch):
    counts = {}
    monkeypatch.setattr(layers, "ADD_NORM", False)  # (see `fold`)
    # MLX's Matmul and Add, which the fold replaces (the native CPU matmul takes the add itself).
    monkeypatch.setattr(layers, "CPU_NATIVE_MATMUL", False)
    for mode in (False, True, "auto"):
        monkeypatch.setattr(layers, "FOLD_RESIDUAL", mode)
        model = make_text_model(make_text_config(), seed=22)  # (a trace keeps its mode)
        counts[mode] = step_primitives(model, True)
    n_layers = len(model.model.layers)
    # Two residual adds a layer (mixer, MLP), each now the AddMM of out_proj/o_proj, down_proj.
    assert counts[True]["AddMM"] == 2 * n_layers
    assert counts[True]["Add"] == counts[False]["Add"] - 2 * n_layers
    assert counts[True]["Matmul"] == counts[False]["Matmul"] - 2 * n_layers
    assert "AddMM" not in counts[False]
    # "auto": not on the CPU (bound by its matmuls there), nor for one row on CUDA (MLX's CUDA
    # AddMM never takes the gemv kernel); on Metal folded.
    assert counts["auto"] == counts[layers._fold_auto(1)]
    assert layers._fold_auto(1) == (mx.default_device() != mx.cpu and not mx.cuda.is_available())


@pytest.mark.parametrize("name", ["dense_tied", "moe_fused"])
def test_folded_residual_keeps_the_golden_bar(fold, name):
    folder = GOLDEN / name
    model = load_model(folder)
    ref = dict(np.load(folder / "reference.npz"))
    ids = mx.array(ref["input_ids"])
    cache = model.make_cache()
    steps = [model(ids[:, :40], cache=cache)]
    for t in range(40, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], cache=cache))  # the compiled step
    err = _scaled_err(mx.concatenate(steps, axis=1), ref["logits"])
    assert err < BAR, f"{name}: scaled error {err:.2e}"
