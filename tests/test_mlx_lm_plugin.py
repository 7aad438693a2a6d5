"""mlx-lm's own tools on qwen35_mlx models through `qwen35_mlx.mlx_lm_plugin`."""

import json
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import batch_generate as mlx_lm_batch_generate
from mlx_lm.utils import load_model as mlx_lm_load_model

from qwen35_mlx import mlx_lm_plugin, stream_generate
from qwen35_mlx.models.text import TextModel
from tests.server import mlx_lm_server

DATA = Path(__file__).parent / "data" / "golden"
GOLDEN = DATA / "generate"
G = json.loads((GOLDEN / "golden.json").read_text())
SERVER_TIMEOUT = 90  # seconds for the whole server test, start included


@pytest.fixture(scope="module")
def registered():
    mlx_lm_plugin.register()
    yield
    mlx_lm_plugin.unregister()


@pytest.fixture(scope="module")
def loaded(registered):
    return mlx_lm.load(str(GOLDEN))


def test_register_makes_mlx_lm_load_qwen3_5_text(registered):
    mlx_lm_plugin.unregister()
    try:
        with pytest.raises(ValueError, match="not supported"):
            mlx_lm_load_model(GOLDEN)
    finally:
        mlx_lm_plugin.register()
    assert mlx_lm_plugin.is_registered()
    model, config = mlx_lm_load_model(GOLDEN)
    assert isinstance(model, TextModel) and config["model_type"] == "qwen3_5_text"
    # mlx-lm's own qwen3_5 module is untouched
    import mlx_lm.models.qwen3_5 as theirs

    assert theirs.Model is not mlx_lm_plugin.Model


def test_mlx_lm_stream_generate_same_tokens_as_ours(loaded):
    model, tok = loaded
    ids = G["chat"]["prompt_ids"]
    n = len(G["chat"]["tokens"])
    theirs = [r.token for r in mlx_lm.stream_generate(model, tok, ids, max_tokens=n)]
    ours = [r.token for r in stream_generate(model, tok, ids, max_tokens=n)]
    assert theirs == ours == G["chat"]["tokens"]


def test_mlx_lm_batch_generate_rows_equal_ours(loaded):
    model, tok = loaded
    prompts = [G["chat"]["prompt_ids"], G["raw"]["prompt_ids"], [5, 6]]
    res = mlx_lm_batch_generate(model, tok, prompts, max_tokens=8)
    ours = ["".join(r.text for r in stream_generate(model, tok, p, max_tokens=8)) for p in prompts]
    assert res.texts == ours


def test_mlx_lm_builds_the_stack_from_layer_types(registered):
    # dense_tied has layer_types L F L L, which no interval formula gives.
    config = json.loads((DATA / "dense_tied" / "config.json").read_text())
    model, _ = mlx_lm_load_model(DATA / "dense_tied")
    assert [layer.is_linear for layer in model.layers] == [
        t == "linear_attention" for t in config["layer_types"]
    ]
    ref = np.load(DATA / "dense_tied" / "reference.npz")
    logits = model(mx.array(ref["input_ids"]))
    scale = np.abs(ref["logits"]).max()
    assert np.abs(np.array(logits) - ref["logits"]).max() < 1e-4 * scale


def _post(url: str, body: dict, timeout: float) -> bytes:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def test_mlx_lm_server_chat_completions(tmp_path):
    deadline = time.monotonic() + SERVER_TIMEOUT
    with mlx_lm_server(GOLDEN, tmp_path / "server.log", deadline) as (base, _):
        n = len(G["chat"]["tokens"])
        body = {
            "messages": [
                {"role": "system", "content": G["system"]},
                {"role": "user", "content": G["user"]},
            ],
            "max_tokens": n,
            "temperature": 0.0,
        }
        left = max(deadline - time.monotonic(), 1)
        reply = json.loads(_post(f"{base}/v1/chat/completions", body, timeout=left))
        msg = reply["choices"][0]["message"]
        # The template opens a <think> block, so mlx-lm reports the text as reasoning.
        text = (msg.get("reasoning") or "") + (msg.get("content") or "")
        assert text == G["chat"]["text"]
        assert reply["usage"]["completion_tokens"] == n
        assert reply["usage"]["prompt_tokens"] == len(G["chat"]["prompt_ids"])

        left = max(deadline - time.monotonic(), 1)
        raw = _post(f"{base}/v1/chat/completions", {**body, "stream": True}, timeout=left)
        pieces = []
        for line in raw.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    delta = choice.get("delta", {})
                    pieces.append((delta.get("reasoning") or "") + (delta.get("content") or ""))
        assert len(pieces) > 1 and "".join(pieces) == G["chat"]["text"]


def test_python_m_qwen35_mlx_mlx_lm_generate(registered, capsys, monkeypatch):
    from qwen35_mlx.mlx_lm import main

    monkeypatch.setattr("sys.argv", ["qwen35_mlx.mlx_lm"])
    n = len(G["chat"]["tokens"])
    main(["generate", "--model", str(GOLDEN), "--prompt", G["user"],
          "--system-prompt", G["system"], "--max-tokens", str(n)])  # fmt: skip
    out = capsys.readouterr().out
    assert G["chat"]["text"] in out and f"Generation: {n} tokens" in out


def test_mlx_lm_loads_a_4bit_mlx_checkpoint(registered, tmp_path):
    import mlx.nn as nn

    from qwen35_mlx import load
    from qwen35_mlx.convert import save_mlx
    from qwen35_mlx.loader import read_config

    model, _ = load(GOLDEN)
    nn.quantize(model, group_size=32, bits=4)
    extra = [GOLDEN / f for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")]
    save_mlx(model, read_config(GOLDEN), tmp_path / "q4", extra_files=extra)

    ours_model, ours_tok = load(tmp_path / "q4")
    theirs_model, theirs_tok = mlx_lm.load(str(tmp_path / "q4"))
    assert isinstance(theirs_model, TextModel)
    n_quantized = sum(isinstance(m, nn.QuantizedLinear) for _, m in theirs_model.named_modules())
    assert n_quantized == sum(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    ids = G["chat"]["prompt_ids"]
    ours = [r.token for r in stream_generate(ours_model, ours_tok, ids, max_tokens=12)]
    theirs = [r.token for r in mlx_lm.stream_generate(theirs_model, theirs_tok, ids, max_tokens=12)]
    assert ours == theirs
