"""The MTP benchmarks' CPU smoke runs (`bench_mtp.py --device-run --tiny`,
`probe_greedy_margin.py --shapes tiny`): the code the GPU runs, on a tiny shape, with the checks
the GPU figures rely on (greedy MTP equal to plain decoding in every mode; the conditioning
report)."""

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def test_bench_mtp_device_run_on_a_tiny_shape(tmp_path):
    import bench_mtp

    bench_mtp.main(["--device-run", "--tiny", "--variants", "auto", "--repeats", "1",
                    "--gen", "16", "--iters", "2", "--out", str(tmp_path)])  # fmt: skip
    (path,) = tmp_path.glob("bench_mtp_tiny_*.json")
    r = json.loads(path.read_text())["shapes"]["tiny"]
    assert r["tied"] is True  # the default: sharp random logits
    gen = r["auto"]["generation"]
    assert gen["plain"]["parts_from_itself_at"] is None
    assert len(gen) == 1 + len(bench_mtp.KS) * len(bench_mtp.RATES)
    assert all(g["same_tokens"] for g in gen.values())
    assert all(0 < g["acceptance"] <= 1 for m, g in gen.items() if m != "plain")
    assert r["auto"]["V_over_S"]["2"] > 0


def test_probe_greedy_margin_on_a_tiny_shape():
    import probe_greedy_margin

    out = probe_greedy_margin.main(["--shapes", "tiny", "--tokens", "12"])["tiny"]
    assert len(out["positions"]) == 4
    for row in out["positions"]:  # float32 on the CPU: the verify pass is the steps' to 1e-4
        assert row["same_argmax"] and row["max_diff"] < 1e-4 * row["std"], row
        assert row["top2_gap"] > 0
    assert out["parts_split"] is None and out["parts_packed"] is None
