"""mlx-lm's server with our plugin (`python -m qwen35_mlx.mlx_lm server`) for the tests that talk
to it: on 127.0.0.1, a free port, bounded start, killed on the way out."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlx_lm_server(model: Path, log_path: Path, deadline: float) -> Iterator[tuple[str, object]]:
    """Start the server on `model` and wait for /health until `deadline` (time.monotonic());
    yields (base URL, process). The server's output goes to `log_path`, shown if it dies."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qwen35_mlx.mlx_lm", "server", "--model", str(model),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        try:
            while True:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "server did not start in time"
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            yield base, proc
        finally:
            proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired as e:
                raise AssertionError("the server did not exit after kill") from e
