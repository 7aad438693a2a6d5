"""Cold start of our CUDA gated-delta kernels and of a whole first prompt, fresh processes only.

One command runs everything, each measurement in a new process:
1. Kernels (0.8B layer: Hk=16, Hv=16, Dk=Dv=128, bf16, B=1; prefill T=512, decode T=1, conv
   decode): the first and a steady call of each, and how its binary was obtained: "compiled"
   (NVRTC, then written to the disk cache), "disk" (read from it) or "cuda_kernel" (MLX's
   `mx.fast.cuda_kernel`, compiled by MLX in every process). Three processes: an empty kernel
   cache, the same cache again (must read "disk" and cost about a steady call), and the
   precompiled path switched off (QWEN35_MLX_CUDA_PRECOMPILED=0: the old behaviour).
2. First 512-token prompt + 16 tokens of the 0.8B shape (random bf16 weights) through mlx-lm's
   generate_step, via `bench_decode.py --cold-child` (model built before the clock starts):
   mlx-lm first (it also fills MLX's own PTX cache, which both share), then ours with an empty
   kernel cache, ours with that cache filled, mlx-lm, ours (filled), and ours with the
   precompiled path off.

    python benchmarks/cold_kernels.py --out "$OUT"      # on the GPU machine, ~3-5 minutes

`--child kernels` runs step 1 in this process only (what the orchestrator calls). Prints a
table and writes cold_kernels.json under --out. Kernel caches go to a temporary folder, so the
user's ~/.cache/qwen35_mlx/cuda is neither read nor changed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import qwen35_mlx  # noqa: F401  isort: skip
import mlx.core as mx  # noqa: E402

HK, HV, D, K = 16, 16, 128, 4
HERE = Path(__file__).resolve().parent


def _timed(fn) -> float:
    t0 = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - t0


def kernels_child() -> None:
    """In this process: first call, steady call and binary source of each kernel (JSON line)."""
    from qwen35_mlx.kernels.gated_delta import cuda, gated_delta_decode, gated_delta_update
    from qwen35_mlx.kernels.gated_delta.precompiled import CachedCudaKernel

    bf = mx.bfloat16
    B, T = 1, 512
    C = 2 * HK * D + HV * D

    def update(t):
        q = mx.zeros((B, t, HK, D), bf)
        v = mx.zeros((B, t, HV, D), bf)
        a = mx.zeros((B, t, HV), bf)
        return lambda: gated_delta_update(q, q, v, a, a, mx.zeros((HV,)), mx.zeros((HV,)))

    def conv_decode():
        st = mx.zeros((B, HV, D, D))
        return gated_delta_decode(
            mx.zeros((B, C), bf), mx.zeros((B, K - 1, C), bf), mx.zeros((C, K), bf),
            mx.zeros((B, HV), bf), mx.zeros((B, HV), bf), mx.zeros((HV,)), mx.zeros((HV,)), st,
            num_k_heads=HK, head_k_dim=D, num_v_heads=HV, head_v_dim=D,
        )  # fmt: skip

    rows = []
    t_start = time.perf_counter()
    for name, fn, variant in (
        ("prefill T=512", update(T), ("fused", False, False, False)),
        ("decode T=1", update(1), ("fused", False, True, False)),
        ("conv decode", conv_decode, ("fused", False, True, True)),
    ):
        first = _timed(fn)
        steady = statistics.median(_timed(fn) for _ in range(20))
        kern = cuda.BACKEND.build(*variant)
        how = kern.last if isinstance(kern, CachedCudaKernel) else "cuda_kernel"
        how = "no CUDA kernel (CPU)" if kern is None else how
        compile_s = kern.compile_s if isinstance(kern, CachedCudaKernel) else None
        rows.append(
            dict(kernel=name, first_s=first, steady_s=steady, binary=how, nvrtc_s=compile_s)
        )
    total = time.perf_counter() - t_start
    print(json.dumps({"kernels": rows, "total_s": total}))


def _child(args: list[str], env: dict, timeout: float) -> dict:
    cmd = [sys.executable, *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout} s"}
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr or p.stdout)[-3000:]}
    out = json.loads(lines[-1])
    warn = [x for x in p.stderr.splitlines() if "QWEN35_MLX_CUDA_PRECOMPILED" in x]
    if warn:
        out["warning"] = warn[0][-400:]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="cold start of our CUDA kernels, fresh processes")
    p.add_argument("--child", choices=["kernels"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=HERE / "out")
    p.add_argument("--no-e2e", action="store_true", help="kernels only, no model runs")
    p.add_argument("--reps", type=int, default=2, help="warm-cache ours / mlx-lm pairs")
    p.add_argument("--shape", default="0.8b", help="bench_decode.py shape (small: a CPU check)")
    a = p.parse_args(argv)
    if a.child:
        kernels_child()
        return 0

    a.out.mkdir(parents=True, exist_ok=True)
    log_file = (a.out / "cold_kernels.log").open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    import mlx_lm

    log(f"cold_kernels {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
    log(f"device {mx.device_info()}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}")
    base = dict(os.environ)
    base["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent / "src"), *filter(None, [base.get("PYTHONPATH")])]
    )
    result: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory(prefix="qwen35_cold_") as tmp:
        kcache, ecache = Path(tmp) / "kernels", Path(tmp) / "e2e"
        runs = (
            ("empty kernel cache", {"QWEN35_MLX_CUDA_CACHE": str(kcache)}),
            ("filled kernel cache", {"QWEN35_MLX_CUDA_CACHE": str(kcache)}),
            ("precompiled off", {"QWEN35_MLX_CUDA_PRECOMPILED": "0"}),
        )
        result["kernels"] = []
        log("\nkernels (0.8B layer, bf16, B=1), each run a fresh process:")
        log(f"{'run':<20} {'kernel':<14} {'first call':>11} {'steady':>9} {'NVRTC':>8}  binary")
        for label, extra in runs:
            r = _child([__file__, "--child", "kernels"], {**base, **extra}, 300)
            r["run"] = label
            result["kernels"].append(r)
            if "error" in r:
                log(f"{label:<20} failed: {r['error']}")
                continue
            for k in r["kernels"]:
                nv = "" if k["nvrtc_s"] is None else f"{k['nvrtc_s'] * 1e3:6.0f}ms"
                log(
                    f"{label:<20} {k['kernel']:<14} {k['first_s'] * 1e3:9.1f}ms "
                    f"{k['steady_s'] * 1e3:7.2f}ms {nv:>8}  {k['binary']}"
                )
            if "warning" in r:
                log(f"{'':<20} warning: {r['warning']}")
        files = sorted(kcache.rglob("*")) if kcache.is_dir() else []
        log(f"kernel cache after the runs: {[f.name for f in files if f.is_file()]}")

        if not a.no_e2e:
            order = [("mlx-lm", {}), ("qwen35_mlx", {"cache": "empty"})]
            for _ in range(a.reps):
                order += [("qwen35_mlx", {"cache": "filled"}), ("mlx-lm", {})]
            order += [("qwen35_mlx", {"precompiled": "off"})]
            result["e2e"] = []
            log(f"\nfirst 512-token prompt + 16 tokens, {a.shape} shape, bf16, fresh processes:")
            for which, how in order:
                env = {**base, "QWEN35_MLX_CUDA_CACHE": str(ecache)}
                if how.get("cache") == "empty" and ecache.exists():
                    raise RuntimeError("the e2e kernel cache should start empty")
                if how.get("precompiled") == "off":
                    env["QWEN35_MLX_CUDA_PRECOMPILED"] = "0"
                args = [str(HERE / "bench_decode.py"), "--cold-child", which, "--shapes", a.shape]
                args += ["--dtype", "bfloat16", "--prompt", "512", "--gen", "16"]
                r = _child(args, env, 400)
                label = which + "".join(f", {k} {v}" for k, v in how.items())
                r["run"] = label
                result["e2e"].append(r)
                if "error" in r:
                    log(f"{label:<38} failed: {r['error']}")
                    continue
                log(
                    f"{label:<38} prompt {r['prompt_s']:6.2f} s + {r['n']} tokens "
                    f"{r['gen_s']:5.2f} s = {r['prompt_s'] + r['gen_s']:6.2f} s"
                )
    path = a.out / "cold_kernels.json"
    path.write_text(json.dumps(result, indent=1))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
