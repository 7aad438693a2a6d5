"""`benchmarks/probe_prefill_memory.py` on the CPU, small shape: the code the GPU runs for issue
9's memory figures, with the layer queue forced on (it is the GPU's only), so that the A/B of
text.py settings and the per-layer breakdown measure what they name."""

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def test_probe_variants_and_per_layer_on_a_small_shape(monkeypatch):
    import probe_prefill_memory

    from qwen35_mlx.models import text

    monkeypatch.setattr(text, "queue_layers", lambda T: T >= 256)
    monkeypatch.setattr(probe_prefill_memory, "STEP", 512)  # (2048 on the GPU)
    before = (text.QUEUE_AHEAD, text.SPLIT_LAYERS, text.DRAIN_LAYERS, text.QUEUE_STREAMS)
    variants = "qa1+whole+onestream,drain+split,qa0+onestream+sync,streams+nodrain"
    out = probe_prefill_memory.main(["--shape", "small", "--lengths", "512,1024", "--per-step",
                                     "0", "--rounds", "2", "--variants", variants,
                                     "--per-layer", "256"])  # fmt: skip
    assert (text.QUEUE_AHEAD, text.SPLIT_LAYERS, text.DRAIN_LAYERS, text.QUEUE_STREAMS) == before
    assert set(out["variants"]) == set(variants.split(","))
    for rounds in out["variants"].values():
        assert len(rounds) == 2
        for r in rounds:  # the KV cache doubles with the prompt; the peak is above it
            assert r["long"]["kv_gib"] == pytest.approx(2 * r["short"]["kv_gib"], rel=0.01)
            assert r["long"]["peak_gib"] >= r["long"]["kv_gib"] > 0
    n = 8  # layers of the small shape: three linear-attention layers, then one attention
    whole, split = out["per_layer"]["whole"], out["per_layer"]["split"]
    assert [r["layer"] for r in whole] == list(range(n))
    assert [(r["layer"], r["part"]) for r in split] == [
        (i, p) for i in range(n) for p in ("mixer", "mlp")
    ]
    assert [r["kind"] for r in whole] == (["linear"] * 3 + ["attention"]) * 2
    assert all(r["transient_gib"] > 0 for r in whole + split)


def test_probe_rejects_an_unknown_setting():
    import probe_prefill_memory

    with pytest.raises(SystemExit, match=r"unknown setting .qb1. \(qa<N>, split, whole, drain"):
        probe_prefill_memory._settings("qa1+qb1")
