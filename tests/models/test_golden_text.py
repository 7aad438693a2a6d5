"""Text models against transformers' own logits on tiny random Hugging Face checkpoints.

The checkpoints and reference logits come from `scripts/make_golden.py` (transformers + torch,
not needed here). Bar from the issue: max abs error < 1e-4 * max|reference logit|, in fp32.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.loader import load_model

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
CASES = ["dense_tied", "dense_untied", "moe_per_expert", "moe_fused"]
BAR = 1e-4


def _scaled_err(ours, ref) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=CASES)
def case(request):
    folder = GOLDEN / request.param
    model = load_model(folder)
    ref = dict(np.load(folder / "reference.npz"))
    return request.param, model, ref


def test_golden_logits(case):
    name, model, ref = case
    logits = model(mx.array(ref["input_ids"]))
    assert logits.dtype == mx.float32
    assert logits.shape == ref["logits"].shape
    err = _scaled_err(logits, ref["logits"])
    assert err < BAR, f"{name}: scaled error {err:.2e}"


def test_golden_prefill_then_decode(case):
    """Prefill in two chunks, then one token at a time; every step equals HF's full forward."""
    name, model, ref = case
    ids = mx.array(ref["input_ids"])
    T = ids.shape[1]
    cache = model.make_cache()
    steps = [model(ids[:, :20], cache=cache), model(ids[:, 20:45], cache=cache)]
    for t in range(45, T):
        steps.append(model(ids[:, t : t + 1], cache=cache))
    logits = mx.concatenate(steps, axis=1)
    err = _scaled_err(logits, ref["logits"])
    assert err < BAR, f"{name}: scaled error {err:.2e}"


def test_golden_left_padded_batch(case):
    """Each row of a left-padded batch gets the logits HF computes for it unpadded."""
    name, model, ref = case
    mask = ref["batch_attention_mask"].astype(bool)
    pads = [int(n) for n in (~mask).sum(axis=1)]
    assert min(pads) == 0 and max(pads) > 0
    ids = mx.array(ref["batch_input_ids"])
    cache = model.make_cache(left_padding=pads)
    logits = np.array(model(ids, cache=cache))
    for b in range(ids.shape[0]):
        err = _scaled_err(logits[b][mask[b]], ref["batch_logits"][b][mask[b]])
        assert err < BAR, f"{name} row {b} (pad {pads[b]}): scaled error {err:.2e}"


def test_golden_padded_batch_decodes_like_single_rows(case):
    """After a left-padded prefill, one decode step per row matches that row run alone."""
    name, model, ref = case
    mask = ref["batch_attention_mask"].astype(bool)
    pads = [int(n) for n in (~mask).sum(axis=1)]
    ids = ref["batch_input_ids"]
    nxt = np.array([[5], [6], [7]], dtype=np.int32)
    cache = model.make_cache(left_padding=pads)
    model(mx.array(ids), cache=cache)
    batch_step = np.array(model(mx.array(nxt), cache=cache))[:, 0]
    for b in range(ids.shape[0]):
        row = np.concatenate([ids[b][mask[b]], nxt[b]])[None]
        alone = np.array(model(mx.array(row)))[0, -1]
        err = _scaled_err(batch_step[b], alone)
        assert err < BAR, f"{name} row {b}: scaled error {err:.2e}"
