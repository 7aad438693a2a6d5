"""Our models against mlx-lm's own qwen3_5 / qwen3_5_moe on the same Hugging Face checkpoints.

mlx-lm 0.32 does not know the text-only model types transformers writes (`qwen3_5_text`,
`qwen3_5_moe_text`), so its copy of each checkpoint gets the config's model_type rewritten to the
one it supports (`qwen3_5` / `qwen3_5_moe`, which mlx-lm reads as a flat text config). Cases
mlx-lm cannot represent are left out: an irregular layer_types (mlx-lm builds the stack from
`full_attention_interval`) and per-expert MoE tensors (its sanitize reads only the fused form).
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen35_mlx.loader import load_model
from tests.conftest import MODEL_LOGIT_BAR, RTOL, rel_err

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
MLX_LM_TYPE = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe"}


def _mlx_lm_copy(case: str, dst: Path) -> Path:
    folder = dst / case
    shutil.copytree(GOLDEN / case, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = MLX_LM_TYPE[config["model_type"]]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_mlx_lm_rejects_text_model_type():
    """Why the copy is needed (if mlx-lm learns these types, this test says so)."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    with pytest.raises(ValueError, match="not supported"):
        mlx_lm_load_model(GOLDEN / "dense_untied")


@pytest.mark.parametrize("case", ["dense_untied", "moe_fused"])
def test_logits_match_mlx_lm(case, tmp_path):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    theirs, _ = mlx_lm_load_model(_mlx_lm_copy(case, tmp_path))
    if mx.default_device() != mx.cpu:
        # mlx-lm's sanitize splits fused experts into strided views, which MLX CUDA's gather_mm
        # misreads (its logits were noise on an H100; ours come out dense, see
        # models/text.py). Dense copies of the same weights keep this a comparison of the math.
        theirs.load_weights([(k, mx.contiguous(v)) for k, v in tree_flatten(theirs.parameters())])
    ours = load_model(GOLDEN / case)
    ref = np.load(GOLDEN / case / "reference.npz")
    ids = mx.array(ref["input_ids"])

    a, b = ours(ids), theirs(ids)
    assert a.shape == b.shape and a.dtype == b.dtype == mx.float32
    assert rel_err(a, b) < RTOL[mx.float32], rel_err(a, b)

    # Prefill then decode through each side's own caches.
    cache_a, cache_b = ours.make_cache(), theirs.make_cache()
    a = [ours(ids[:, :30], cache=cache_a)]
    b = [theirs(ids[:, :30], cache=cache_b)]
    for t in range(30, 36):
        a.append(ours(ids[:, t : t + 1], cache=cache_a))
        b.append(theirs(ids[:, t : t + 1], cache=cache_b))
    err = rel_err(mx.concatenate(a, axis=1), mx.concatenate(b, axis=1))
    assert err < RTOL[mx.float32], err


@pytest.mark.parametrize("case", ["dense_untied", "moe_fused"])
def test_reads_mlx_lm_quantized_checkpoint(case, tmp_path):
    """A 4-bit MLX checkpoint written by mlx-lm (its names, its quantization block, an 8-bit
    per-module override) loads quantized and gives mlx-lm's logits."""
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from mlx_lm.utils import quantize_model, save_config, save_model

    theirs, config = mlx_lm_load_model(_mlx_lm_copy(case, tmp_path))

    def predicate(path, module):
        return {"group_size": 32, "bits": 8} if path.endswith("mlp.gate") else True

    theirs, qconfig = quantize_model(
        theirs, config, group_size=32, bits=4, quant_predicate=predicate
    )
    out = tmp_path / "mlx_lm_q4"
    save_model(out, theirs)
    save_config(qconfig, out / "config.json")

    ours = load_model(out)
    bits = {n: m.bits for n, m in ours.named_modules() if hasattr(m, "bits")}
    assert bits and set(bits.values()) <= {4, 8}
    assert any(n.endswith("mlp.gate") and b == 8 for n, b in bits.items()) == (case == "moe_fused")

    ids = mx.array(np.load(GOLDEN / case / "reference.npz")["input_ids"])
    a, b = ours(ids), theirs(ids)
    # Issue 3's bar for model logits (1e-4 of the logit scale), not the kernel table: through
    # 4-bit weights two implementations differ by ~2e-5 relative (measured with both our ref
    # and chunked backends, with either BLAS); unquantized they agree within RTOL above.
    assert rel_err(a, b) < MODEL_LOGIT_BAR, rel_err(a, b)
