"""qwen35_mlx._blas: OpenBLAS swapped in before mlx loads (Linux), opt-out, warning when late.

Each case runs in a fresh interpreter, since the BLAS can only be chosen before mlx loads.
"""

import ctypes
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the BLAS swap is Linux-only")

_PROBE = """
import json, os, sys, time, warnings
if {mlx_first}:
    import mlx.core
import qwen35_mlx
from qwen35_mlx import _blas
import mlx.core as mx
from qwen35_mlx.kernels.gated_delta import gated_delta
mx.set_default_device(mx.cpu)  # the BLAS in question is the CPU's, also on a GPU machine

n = 1024
a = mx.random.normal((n, n))
mx.eval(a, a @ a)
t = time.perf_counter()
mx.eval(a @ a)
gflops = 2 * n**3 / (time.perf_counter() - t) / 1e9
x = mx.zeros((1, 4, 1, 32))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        gated_delta(x, x, x, mx.ones((1, 4, 1)), mx.ones((1, 4, 1)), backend="chunked")
msgs = [str(w.message) for w in caught if "reference BLAS" in str(w.message)]
coretype = os.environ.get("OPENBLAS_CORETYPE")
print(json.dumps({{"status": _blas.blas_status(), "gflops": gflops, "warnings": msgs,
                  "coretype_env": coretype}}))
"""


def _probe(mlx_first=False, **env):
    full_env = dict(os.environ)
    full_env.pop("OPENBLAS_CORETYPE", None)
    full_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(mlx_first=mlx_first)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _openblas_installed() -> bool:
    try:
        ctypes.CDLL("libopenblas.so.0")
        return True
    except OSError:
        return False


def test_opt_out_keeps_reference_and_stays_quiet():
    r = _probe(QWEN35_MLX_BLAS="reference")
    assert r["status"]["blas"] == "reference" and r["status"].get("opt_out")
    assert r["warnings"] == []


def test_mlx_imported_first_warns_once():
    r = _probe(mlx_first=True, LD_PRELOAD="")
    assert r["status"]["blas"] == "reference"
    assert "imported before" in r["status"]["reason"]
    assert len(r["warnings"]) == 1 and "libopenblas0-pthread" in r["warnings"][0]


@pytest.mark.skipif(not _openblas_installed(), reason="no libopenblas.so.0 on this machine")
def test_openblas_is_interposed_and_faster():
    fast = _probe()
    if fast["status"]["blas"] == "mlx default":
        # e.g. MLX's CUDA build, which links a real BLAS itself: nothing to swap.
        pytest.skip(f"nothing to swap in this MLX build: {fast['status']}")
    slow = _probe(QWEN35_MLX_BLAS="reference")
    assert fast["status"]["blas"] == "openblas", fast["status"]
    assert fast["warnings"] == []
    # The reference BLAS runs a 1024^2 sgemm at a few GFLOP/s, OpenBLAS at tens or more: a
    # ratio this large only shows if mlx's matmul really calls OpenBLAS.
    assert fast["gflops"] > 3 * slow["gflops"], (fast["gflops"], slow["gflops"])
    # The kernel choice is scoped to the load: the variable is not left behind.
    assert fast["coretype_env"] is None
