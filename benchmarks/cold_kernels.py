"""Cold start of our fused gated-delta kernels: in a fresh process, the first and second call of
each kernel variant a Qwen3.5 model uses (prefill, decode, conv decode), and which compiled
modules MLX left in its on-disk cache ($MLX_PTX_CACHE_DIR, default $TMPDIR/mlx/<version>/ptx).

Run it twice in a row (two fresh processes); on a machine where our kernels were cached, the
second process's first calls would cost about as much as its second calls:

    MLX_PTX_CACHE_DIR=/tmp/mlx_ptx python benchmarks/cold_kernels.py
    MLX_PTX_CACHE_DIR=/tmp/mlx_ptx python benchmarks/cold_kernels.py

Shapes: the 0.8B layer (Hk=16, Hv=16, Dk=Dv=128), bf16, B=1; prefill T=512.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import qwen35_mlx  # noqa: F401  isort: skip
import mlx.core as mx  # noqa: E402

from qwen35_mlx.kernels.gated_delta import gated_delta_decode, gated_delta_update  # noqa: E402

HK, HV, D = 16, 16, 128


def _timed(fn) -> float:
    t0 = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - t0


def main() -> int:
    bf = mx.bfloat16
    B, T, K = 1, 512, 4
    C = 2 * HK * D + HV * D

    def update(T):
        q = mx.zeros((B, T, HK, D), bf)
        v = mx.zeros((B, T, HV, D), bf)
        a = mx.zeros((B, T, HV), bf)
        return lambda: gated_delta_update(q, q, v, a, a, mx.zeros((HV,)), mx.zeros((HV,)))

    def conv_decode():
        st = mx.zeros((B, HV, D, D))
        return gated_delta_decode(
            mx.zeros((B, C), bf), mx.zeros((B, K - 1, C), bf), mx.zeros((C, K), bf),
            mx.zeros((B, HV), bf), mx.zeros((B, HV), bf), mx.zeros((HV,)), mx.zeros((HV,)), st,
            num_k_heads=HK, head_k_dim=D, num_v_heads=HV, head_v_dim=D,
        )  # fmt: skip

    print(f"device {mx.default_device()}, mlx {mx.__version__}")
    for name, fn in (
        ("prefill T=512", update(T)),
        ("decode", update(1)),
        ("conv decode", conv_decode),
    ):
        first, second = _timed(fn), _timed(fn)
        print(f"{name:>14}: first call {first * 1e3:8.1f} ms, second {second * 1e3:6.2f} ms")
    cache = os.environ.get("MLX_PTX_CACHE_DIR") or str(
        Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "ptx"
    )
    files = sorted(p.name for p in Path(cache).glob("*.ptx")) if Path(cache).is_dir() else []
    ours = [f for f in files if f.startswith("custom_kernel_")]
    print(f"cache {cache}: {len(files)} modules, {len(ours)} of them custom kernels {ours[:4]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
