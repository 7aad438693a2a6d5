"""flash-linear-attention's gated delta rule kernels, timed in a process that never loads MLX.

Issue 9's kernel table sets ours beside FLA's `chunk_gated_delta_rule` and
`fused_recurrent_gated_delta_rule`. Until session 17 this bench called both as (q, k, v, g, beta,
...); FLA 0.6.0's fused-recurrent kernel takes (q, k, v, g, gk, gv, beta, ...), so beta went in
as the per-key gate gk, read K times past its end: on the H200 "an illegal memory access" at its
first call (torch alone, T 512, Hv 16), and, CUDA's error being sticky, reported by the chunk
kernel's next call in a process that ran both (sessions 15-16 blamed the chunk kernel, then
MLX's presence). Figures of FLA's fused-recurrent kernel before session 17 are of that wrong
call. The arguments now go by keyword. `--kernels` runs one kernel a process; `--with-mlx` loads
MLX's CUDA backend and runs one op first.

Same problem and timing as `bench_gated_delta.py` (which takes its FLA contenders from here):
Hk = 16, Dk = Dv = 128, bf16 q / k / v, fp32 state, B = 1; the gates made from the same raw
inputs inside the timed region; N calls chained through the state, queued and synchronised once;
repeats interleave the kernels; the median over repeats of time / N in ms per call. With both
kernels in one process, each row also says how far the chunk kernel's output is from the
fused-recurrent one's (max |diff| / max |y|), so a kernel that runs but computes something else
shows.

    python benchmarks/bench_fla.py --hv 16,32 --t 512,2048,8192 [--kernels chunk] [--out DIR]
        [--with-mlx]

Writes gated_delta_cuda_fla_<stamp>.json in bench_gated_delta's format (merge it with ours:
`bench_gated_delta.py --merge ours.json fla.json --out DIR`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HK, DK, DV = 16, 128, 128
KERNELS = ("chunk", "fused_recurrent")


def make_inputs(T: int, Hv: int, B: int = 1, seed: int = 0) -> dict:
    """q, k (l2-normed, q scaled by Dk^-1/2) with Hk heads, v with Hv heads, the raw gate
    inputs (a, b, A_log, dt_bias: Mamba-style init) and a zero state [B, Hv, Dk, Dv] (FLA's
    layout, transposed against ours)."""
    import torch
    import torch.nn.functional as F

    dev = "cuda"
    torch.manual_seed(seed)
    q = F.normalize(torch.randn(B, T, HK, DK, device=dev), dim=-1) * DK**-0.5
    k = F.normalize(torch.randn(B, T, HK, DK, device=dev), dim=-1)
    dt = torch.empty(Hv, device=dev).uniform_(math.log(1e-3), math.log(1e-1)).exp()
    return dict(
        q=q.bfloat16(),
        k=k.bfloat16(),
        v=torch.randn(B, T, Hv, DV, device=dev, dtype=torch.bfloat16),
        a=torch.randn(B, T, Hv, device=dev, dtype=torch.bfloat16),
        b=torch.randn(B, T, Hv, device=dev, dtype=torch.bfloat16),
        A_log=torch.log(torch.empty(Hv, device=dev).uniform_(1.0, 16.0)),
        dt_bias=dt + torch.log(-torch.expm1(-dt)),
        state0=torch.zeros(B, Hv, DK, DV, device=dev, dtype=torch.float32),
    )


def kernel(name: str):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    return {"chunk": chunk_gated_delta_rule, "fused_recurrent": fused_recurrent_gated_delta_rule}[
        name
    ]


def make_call(fn, x: dict):
    """call(state) -> (y, new state): the gates from the raw inputs, then FLA's kernel (log-decay
    g, scale 1: q is scaled already). q / k keep their Hk heads when this FLA takes grouped value
    heads, else they are repeated to Hv."""
    import torch.nn.functional as F

    v, a, b, A_log, dt_bias = x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"]

    def with_qk(q, k):
        def call(state):
            g = -A_log.exp() * F.softplus(a.float() + dt_bias)
            beta = b.float().sigmoid()
            # By keyword: FLA 0.6.0's fused_recurrent_gated_delta_rule takes (q, k, v, g, gk, gv,
            # beta, ...), so a positional beta lands in gk, read as [B, T, HV, K].
            return fn(
                q, k, v, g=g, beta=beta, scale=1.0, initial_state=state, output_final_state=True
            )

        return call

    call = with_qk(x["q"], x["k"])
    try:
        call(x["state0"])
    except Exception:
        r = v.shape[2] // HK
        call = with_qk(x["q"].repeat_interleave(r, dim=2), x["k"].repeat_interleave(r, dim=2))
    return call


def make_run(call, state0):
    """run(n) -> seconds for n calls chained through the state, synchronised once."""
    import torch

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        state, ys = state0, []
        for _ in range(n):
            y, state = call(state)
            ys.append(y)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    return run


def bench_shape(
    T: int, Hv: int, target_s: float, repeats: int, kernels: tuple[str, ...] = KERNELS
) -> list[dict]:
    import torch

    x = make_inputs(T, Hv)
    rows, runs, outs = [], {}, {}
    for name in kernels:
        row = dict(contender=f"fla {name} ({fla_version()})", group="peer", B=1, T=T, Hv=Hv)
        try:
            call = make_call(kernel(name), x)
            outs[name] = call(x["state0"])[0].float()
            run = make_run(call, x["state0"])
            t1 = min(run(1), run(1))
            runs[name] = (row, run, max(1, min(64, int(target_s / max(t1, 1e-6)))))
        except Exception as e:
            row.update(ms=None, status=f"error: {type(e).__name__}: {e}"[:200])
        rows.append(row)
    per_call = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (_, run, n) in runs.items():
            time.sleep(0.2)
            per_call[name].append(run(n) / n)
    diff = ""
    if len(outs) == 2:
        y0, y1 = outs.values()
        rel = float((y0 - y1).abs().max() / y1.abs().max())
        diff = f", chunk vs fused_recurrent max|diff|/max|y| {rel:.1e}"
        if not bool(torch.isfinite(y0).all()):
            diff += ", chunk output not finite"
    for name, (row, _, n) in runs.items():
        ts = per_call[name]
        row.update(
            ms=statistics.median(ts) * 1e3,
            status=f"n={n} x {repeats}, min {min(ts) * 1e3:.3f} ms{diff}",
        )
    for row in rows:
        shown = f"{row['ms']:.3f} ms" if row.get("ms") else ""
        print(
            f"  {row['contender']:28s} Hv {Hv:3d} T {T:6d}  {shown} ({row['status']})", flush=True
        )
    return rows


def fla_version() -> str:
    import fla

    return getattr(fla, "__version__", "?")


def environment() -> dict:
    import torch
    import triton

    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "default_device": "Device(gpu, 0)",
        "cuda_device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": fla_version(),
        "blas": "n/a (torch + Triton only)",
        "mlx_loaded": "mlx.core" in sys.modules,
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hv", default="32", help="comma-separated value-head counts (Hk 16)")
    p.add_argument("--t", default="512,2048,8192", help="comma-separated prompt lengths")
    p.add_argument("--target-s", type=float, default=0.1, help="seconds per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernels", default=",".join(KERNELS), help="which of FLA's kernels")
    p.add_argument("--with-mlx", action="store_true", help="load MLX's CUDA backend first")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    kernels = tuple(args.kernels.split(","))
    if not set(kernels) <= set(KERNELS):
        p.error(f"--kernels: choose from {', '.join(KERNELS)}")
    if args.with_mlx:
        import mlx.core as mx

        mx.eval(mx.zeros(4) + 1)
    try:
        import fla  # noqa: F401
        import torch
    except ImportError as e:
        print(f"bench_fla: needs torch and flash-linear-attention ({e})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_fla: no CUDA device for torch here", file=sys.stderr)
        return 2
    env = environment()
    print(
        f"# {env['date']}  {env['cuda_device']}  torch {env['torch']}  triton "
        f"{env['triton']}  fla {env['fla']}  MLX loaded: {env['mlx_loaded']}",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    shape = {"Hk": HK, "Dk": DK, "Dv": DV, "dtype": "bfloat16", "state": "float32"}
    path = args.out / f"gated_delta_cuda_fla_{stamp}.json"
    rows = []
    for hv in [int(h) for h in args.hv.split(",")]:
        for t in [int(t) for t in args.t.split(",")]:
            rows += bench_shape(t, hv, args.target_s, args.repeats, kernels)
            # After every shape: a CUDA fault ends the process, and the shapes done stay.
            record = {"env": env, "shape": shape, "table": "", "results": rows}
            path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
