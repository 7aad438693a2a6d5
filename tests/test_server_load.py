"""A bounded load test of mlx-lm's server running a qwen35_mlx model through the plugin
(`python -m qwen35_mlx.mlx_lm server`), on 127.0.0.1 only, on a free port.

32 chat-completion requests of mixed prompt and answer lengths, streaming and not, sent at once:
every one is answered, the temperature-0 answers equal those of the same requests sent one at a
time (the server batches concurrent requests and reuses cached prompt prefixes, so this checks
rows independent of their batch and of the cache), and the server still answers afterwards.
Every wait has a timeout and the server is killed at the end whatever happens.
"""

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import qwen35_mlx
from tests.server import mlx_lm_server

TINY = Path(qwen35_mlx.__file__).parent / "assets" / "tiny"
N_REQUESTS = 32
START_TIMEOUT = 90  # seconds for the server to come up
TEST_TIMEOUT = 300  # seconds for everything after that
TOPICS = ["lists", "tuples", "dicts", "sets", "generators", "decorators", "classes", "modules"]


def _requests() -> list[dict]:
    """Mixed lengths: short and long (a repeated paragraph) prompts, answers of 1 to 16 tokens,
    with and without a shared system prompt, every other one streamed."""
    out = []
    for i in range(N_REQUESTS):
        topic = TOPICS[i % len(TOPICS)]
        user = f"Explain {topic}."
        if i % 3 == 1:
            user = f"Read this and tell me about {topic}. " + "Python is a language. " * (2 + i)
        msgs = [{"role": "user", "content": user}]
        if i % 2 == 0:
            msgs.insert(0, {"role": "system", "content": "You answer questions about Python."})
        out.append(
            {
                "messages": msgs,
                "max_tokens": (1, 2, 4, 8, 16)[i % 5],
                "temperature": 0.0,
                "stream": i % 4 in (1, 2),
            }
        )
    return out


def _post(url: str, body: dict, timeout: float) -> dict:
    """The answer's text (reasoning + content), finish reason and, unless streamed, token count.

    No retries: mlx-lm's server is a ThreadingHTTPServer, whose standard listen backlog of 5
    reset some connections of a 32-request burst; `python -m qwen35_mlx.mlx_lm server` raises
    it, and a reset here fails the test.
    """
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read().decode()
    if not body["stream"]:
        reply = json.loads(raw)
        choice = reply["choices"][0]
        msg = choice["message"]
        text = (msg.get("reasoning") or "") + (msg.get("content") or "")
        return {
            "text": text,
            "finish": choice["finish_reason"],
            "tokens": reply["usage"]["completion_tokens"],
        }
    text, finish, done = [], None, False
    for line in raw.splitlines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            for choice in json.loads(line[6:]).get("choices", []):
                delta = choice.get("delta", {})
                text.append((delta.get("reasoning") or "") + (delta.get("content") or ""))
                finish = choice.get("finish_reason") or finish
    assert done, raw[-500:]
    return {"text": "".join(text), "finish": finish}


# 24 s on the 2-core CPU machine when quiet, about 70 s under the load of eight sessions
# (2026-12-01, ~22 s of CPU either way); every wait below is bounded.
def test_server_answers_32_concurrent_requests_like_sequential_ones(tmp_path):
    start_by = time.monotonic() + START_TIMEOUT
    with mlx_lm_server(TINY, tmp_path / "server.log", start_by) as (base, proc):
        deadline = time.monotonic() + TEST_TIMEOUT
        url = f"{base}/v1/chat/completions"
        bodies = _requests()

        def left() -> float:
            return max(deadline - time.monotonic(), 1.0)

        t0 = time.monotonic()
        with ThreadPoolExecutor(N_REQUESTS) as pool:
            futures = [pool.submit(_post, url, b, left()) for b in bodies]
            concurrent = [f.result(timeout=left()) for f in futures]
        t1 = time.monotonic()
        sequential = [_post(url, b, left()) for b in bodies]
        print(f"concurrent {t1 - t0:.1f} s, sequential {time.monotonic() - t1:.1f} s")

        assert len(concurrent) == N_REQUESTS
        for i, (c, s, b) in enumerate(zip(concurrent, sequential, bodies, strict=True)):
            assert c == s, (i, b["stream"], c, s)
            assert c["finish"] in ("stop", "length"), (i, c)
            if "tokens" in c:
                assert 1 <= c["tokens"] <= b["max_tokens"]
        assert any(c["finish"] == "length" and c["text"] for c in concurrent)

        # Still healthy: the health check and one more request.
        with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
            assert r.status == 200
        again = _post(url, bodies[5], left())
        assert again == sequential[5]
        assert proc.poll() is None
