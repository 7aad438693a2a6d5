"""Tensor and pipeline parallel (`model.shard`, `model.model.pipeline`) across two processes.

One `mlx.launch --backend ring -n 2` run on 127.0.0.1 (free ports, bounded time) executes
tests/shard_worker.py on both ranks: dense, MoE and VLM checkpoints sharded, pipelined, the CLI
with --sharded and mlx-lm's own `sharded_load`; this process runs the same cases unsharded as the
reference. The checks below compare the two.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from qwen35_mlx.convert import save_mlx
from qwen35_mlx.loader import build_model
from qwen35_mlx.models.config import ModelConfig

from .conftest import RTOL, rel_err
from .models.factory import make_moe_config, make_text_config, make_text_model, randomize
from .shard_worker import run_cases

HERE = Path(__file__).parent
GOLDEN = HERE / "data" / "golden"
N = 2
LAUNCH_TIMEOUT_S = 240
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
WIDE = {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 1024}


def _save(model, config: dict, path: Path) -> str:
    extra = [GOLDEN / "generate" / f for f in TOKENIZER_FILES]
    save_mlx(model, config, path, extra_files=extra)
    return str(path)


def _text_checkpoint(path: Path, quantize: int | None = None, **overrides) -> str:
    config = json.loads((GOLDEN / "generate" / "config.json").read_text())
    config.update(overrides)
    model = randomize(build_model(ModelConfig.from_dict(config)), seed=1)
    if quantize is not None:
        nn.quantize(model, group_size=quantize, bits=4)
    return _save(model, config, path)


def _free_ports(n: int) -> int:
    """A first port p with p .. p+n-1 free (mlx.launch's ring takes consecutive ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free consecutive ports on 127.0.0.1")


def _launch(workdir: Path) -> subprocess.Popen:
    """Start both ranks; they run while this process computes the reference."""
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    env = dict(os.environ)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (src, str(HERE.parent), env.get("PYTHONPATH")) if p
    )
    cmd = [
        launcher,
        "--backend", "ring",
        "-n", str(N),
        "--starting-port", str(_free_ports(N)),
        "--", sys.executable, str(HERE / "shard_worker.py"), str(workdir),
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip


def _wait(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
        out, _ = proc.communicate()
        pytest.fail(f"mlx.launch did not finish in {LAUNCH_TIMEOUT_S} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """(reference, [rank 0, rank 1]): each a (arrays, values) pair."""
    workdir = tmp_path_factory.mktemp("shard")
    moe = json.loads((GOLDEN / "moe_fused" / "config.json").read_text())
    cases = {
        "dense": str(GOLDEN / "generate"),
        "moe": _text_checkpoint(workdir / "moe", **{**moe, "vocab_size": 384}),
        "vlm": str(GOLDEN / "vlm"),
        # Layers much larger than the embeddings: the 1/N resident-weight check.
        "wide": _text_checkpoint(workdir / "wide", **WIDE),
        # 4-bit, groups of 32: every split keeps whole groups.
        "quantized": _text_checkpoint(workdir / "quantized", quantize=32, **WIDE),
    }
    (workdir / "cases.json").write_text(json.dumps(cases))
    launched = _launch(workdir)
    try:
        ref = run_cases(workdir, None)
    except BaseException:
        os.killpg(launched.pid, signal.SIGKILL)
        launched.communicate()
        raise
    proc = _wait(launched)
    # mlx.launch exits 0 even when a rank fails: a rank's missing result file is the failure.
    missing = [r for r in range(N) if not (workdir / f"rank{r}.json").is_file()]
    assert proc.returncode == 0 and not missing, f"ranks {missing} failed:\n{proc.stdout[-6000:]}"
    ranks = []
    for r in range(N):
        arrays = dict(np.load(workdir / f"rank{r}.npz"))
        ranks.append((arrays, json.loads((workdir / f"rank{r}.json").read_text())))
    return ref, ranks


@pytest.mark.parametrize(
    "key",
    ["dense/logits", "moe/logits", "vlm/logits", "dense/batch_logits", "moe/batch_logits",
     "dense_pp/logits", "moe_pp/logits", "mlx_lm/logits", "quantized/logits"],
)  # fmt: skip
def test_sharded_logits_equal_single_process(results, key):
    (ref_arrays, _), ranks = results
    ref_key = key.replace("_pp/", "/").replace("mlx_lm/", "dense/")
    for arrays, _ in ranks:
        assert arrays[key].shape == ref_arrays[ref_key].shape
        assert rel_err(arrays[key], ref_arrays[ref_key]) < RTOL[mx.float32]


@pytest.mark.parametrize(
    "key",
    ["dense/greedy", "moe/greedy", "dense_pp/greedy", "moe_pp/greedy", "vlm/greedy",
     "quantized/greedy",
     "vlm/text_greedy", "dense/resume", "moe/resume", "dense/batch", "moe/batch"],
)  # fmt: skip
def test_sharded_generation_same_tokens(results, key):
    (_, ref), ranks = results
    ref_key = key.replace("_pp/", "/")
    assert len(ref[ref_key]) > 0
    for _, values in ranks:
        assert values[key] == ref[ref_key]


def test_tensor_parallel_decode_runs_the_compiled_step(results):
    # Tensor-parallel layers run inside the compiled decode step; a pipelined backbone (each
    # rank runs some layers) takes the plain path.
    for _, out in results[1]:
        assert out["dense/decode_traces"] > 0 and out["moe/decode_traces"] > 0
        assert out["dense_pp/decode_traces"] == 0 and out["moe_pp/decode_traces"] == 0


def test_prompt_cache_resumes_on_every_rank(results):
    (_, ref), ranks = results
    for name in ("dense", "moe"):
        assert ref[f"{name}/resume_reused"] > 0
        for _, values in ranks:
            assert values[f"{name}/resume_reused"] == ref[f"{name}/resume_reused"]
            # Each rank's caches hold only its heads: recurrent states and KV alike.
            assert values[f"{name}/cache_heads"] == [h // N for h in ref[f"{name}/cache_heads"]]


@pytest.mark.parametrize("name", ["wide", "dense", "moe"])
def test_each_rank_holds_about_a_share_of_the_weights(results, name):
    (_, ref), ranks = results
    total = ref[f"{name}/mem"]["param_bytes"]
    shares = [values[f"{name}/mem"]["param_bytes"] / total for _, values in ranks]
    # Replicated: embeddings, norms, routers; the wide model's layers dominate its weights.
    bound = {"wide": 1 / N + 0.06, "dense": 1 / N + 0.2, "moe": 1 / N + 0.2}[name]
    for share in shares:
        assert share < bound, shares
    if name == "wide":
        # What the process holds after loading, not only what its parameters say.
        for _, values in ranks:
            assert values["wide/mem"]["active_bytes"] < total * bound


def test_cli_prints_once(results):
    (_, ref), ranks = results
    assert ref["cli"].strip()
    assert ranks[0][1]["cli"] == ref["cli"]
    assert ranks[1][1]["cli"] == ""


class FakeGroup:
    """A stand-in for a group of `n` processes: sharding talks to none before the forward."""

    def __init__(self, n: int, rank: int = 0):
        self.n, self.r = n, rank

    def size(self):
        return self.n

    def rank(self):
        return self.r


def test_shard_keeps_each_ranks_heads_and_refuses_twice():
    model = make_text_model(make_text_config())  # Hk 2, Hv 4, H 4, KV 2
    model.shard(FakeGroup(2, 1))
    gdn, attn = model.layers[0].linear_attn, model.layers[1].self_attn
    assert (gdn.num_k_heads, gdn.num_v_heads, attn.num_heads, attn.num_kv_heads) == (1, 2, 2, 1)
    assert gdn.in_proj_qkv.weight.shape[0] == gdn.conv_dim == 2 * 16 + 2 * 8
    assert attn.q_proj.weight.shape[0] == 2 * 2 * 16  # two heads of [query | gate]
    with pytest.raises(ValueError, match="already sharded across 2 processes"):
        model.shard(FakeGroup(2, 1))


def test_heads_not_divisible_raise_naming_the_counts():
    model = make_text_model(make_text_config())
    with pytest.raises(ValueError) as e:
        model.shard(FakeGroup(3))
    msg = str(e.value)
    assert "3 processes" in msg
    assert "num_attention_heads = 4" in msg and "linear_num_value_heads = 4" in msg
    assert "num_key_value_heads" in msg and "linear_num_key_heads" in msg
    moe = make_text_model(make_moe_config(moe_intermediate_size=32))
    with pytest.raises(ValueError, match="moe_intermediate_size = 32"):
        moe.shard(FakeGroup(3))


def test_quantized_groups_cut_by_the_split_raise():
    # o_proj has 4 heads x 16 = 64 inputs: two halves of 32 are not whole groups of 64.
    model = make_text_model(make_text_config(hidden_size=64))
    nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: p.endswith("o_proj"))
    with pytest.raises(ValueError, match="o_proj has 64 quantized inputs in groups of 64"):
        model.shard(FakeGroup(2))


def test_shard_on_one_process_changes_nothing():
    model = make_text_model(make_text_config())
    ids = mx.array([[3, 5, 7, 9]])
    before = model(ids)
    model.shard(mx.distributed.init())
    assert mx.array_equal(model(ids), before)


def test_cli_sharded_needs_several_processes(capsys):
    from qwen35_mlx.generate import main

    assert main(["--sharded", "--max-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mlx.launch" in err
