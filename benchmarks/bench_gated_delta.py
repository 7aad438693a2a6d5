"""Benchmark the gated delta rule: every backend of ours against the peers, side by side.

Contenders (whichever run here):
  ours   qwen35_mlx.kernels.gated_delta.gated_delta_update with backend auto / ref / chunked /
         metal / cuda (the GPU ones only where their supports() says yes) / native (the CPU
         primitive of kernels/cpu_ext, where it is built: `auto` on the CPU takes it for decode, and
         for prefill too while MLX runs its reference BLAS)
  peers  mlx-lm's mlx_lm.models.gated_delta.gated_delta_update (ops path; its Metal kernel
         where Metal is present), MLX core's mx.fast.gated_delta_update, and on a CUDA machine
         flash-linear-attention's Triton chunk_gated_delta_rule / fused_recurrent_gated_delta_rule.
  floor  decode's memory floor measured in the same repeats: one elementwise pass over the
         state (read + write once); ours are also printed as multiples of it.

Shape: Hk=16, Hv=32, Dk=Dv=128, bf16 q/k/v, fp32 state [B, Hv, Dv, Dk]; decode B in
{1, 8, 32, 128} with T=1; prefill B=1, T in {128, 512, 2048, 8192}. Every contender starts from
the same raw gate inputs (a, b, A_log, dt_bias; Mamba-style init) and computes its gates inside
the timed region.

Timing: N calls chained through the state, built and evaluated as one graph (MLX) or queued
and synchronised once (torch), so host overhead is amortised the same way for everyone; one
warm-up first; then, shape by shape, the repeats run all contenders in turn (so load from other
processes falls on everyone alike); the median over repeats of (time / N) is reported in ms
per call (the JSON also keeps the minimum).

    python benchmarks/bench_gated_delta.py [--quick] [--out DIR]
    python benchmarks/bench_gated_delta.py --merge A.json B.json --out DIR   # one table and plot
                                       # from runs split to fit a time limit (same device only)

Prints a table (contender x shape: ms, and for ours the speedup over the fastest peer), writes
JSON (device, versions, BLAS in use, date) and a PNG plot into --out (default benchmarks/out).
Set QWEN35_MLX_BLAS=reference to measure with MLX's bundled reference BLAS on Linux.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# qwen35_mlx first: on Linux it swaps in OpenBLAS, which only works before mlx is loaded.
import qwen35_mlx  # noqa: F401  isort: skip
import mlx.core as mx  # noqa: E402

from qwen35_mlx.kernels.gated_delta import gated_delta_update, native_available  # noqa: E402

HK, HV, DK, DV = 16, 32, 128, 128
DECODE_B = (1, 8, 32, 128)
PREFILL_T = (128, 512, 2048, 8192)
QUICK_DECODE_B = (1, 8, 32)
QUICK_PREFILL_T = (128, 512, 2048)


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    Hv: int = HV  # value heads (Hk stays HK)

    @property
    def kind(self) -> str:
        return "decode" if self.T == 1 else "prefill"

    @property
    def label(self) -> str:
        hv = "" if self.Hv == HV else f" Hv={self.Hv}"
        return (f"decode B={self.B}" if self.T == 1 else f"prefill T={self.T}") + hv


@dataclass
class Contender:
    name: str
    group: str  # "ours", "peer", or "floor" (the memory floor: no contender, a yardstick)
    make: object  # Shape -> timer(n) -> seconds for n chained calls
    note: str = ""
    kinds: tuple = ("decode", "prefill")  # shape kinds it runs
    results: dict = field(default_factory=dict)
    skip_kind: dict = field(default_factory=dict)
    max_t: dict = field(default_factory=dict)  # kind -> largest T to run (--max-t)


# ---------------------------------------------------------------------------------------------
# MLX contenders


@functools.lru_cache(maxsize=1)  # shared by every MLX contender of one shape
def _mlx_inputs(shape: Shape, seed: int = 0):
    B, T, HV = shape.B, shape.T, shape.Hv
    key = mx.random.key(seed)
    kq, kk, kv, ka, kb, kA, kd = mx.random.split(key, 7)

    def l2(x):
        return x * mx.rsqrt((x * x).sum(-1, keepdims=True) + 1e-6)

    q = (l2(mx.random.normal((B, T, HK, DK), key=kq)) * DK**-0.5).astype(mx.bfloat16)
    k = l2(mx.random.normal((B, T, HK, DK), key=kk)).astype(mx.bfloat16)
    v = mx.random.normal((B, T, HV, DV), key=kv).astype(mx.bfloat16)
    a = mx.random.normal((B, T, HV), key=ka).astype(mx.bfloat16)
    b = mx.random.normal((B, T, HV), key=kb).astype(mx.bfloat16)
    # Mamba-style gate init: A in [1, 16], softplus(dt_bias) log-uniform in [1e-3, 1e-1].
    A_log = mx.log(mx.random.uniform(1.0, 16.0, (HV,), key=kA))
    dt = mx.exp(mx.random.uniform(math.log(1e-3), math.log(1e-1), (HV,), key=kd))
    dt_bias = dt + mx.log(-mx.expm1(-dt))
    state = mx.zeros((B, HV, DV, DK), dtype=mx.float32)
    mx.eval(q, k, v, a, b, A_log, dt_bias, state)
    return q, k, v, a, b, A_log, dt_bias, state


def _mlx_timer(step):
    """step(q, k, v, a, b, A_log, dt_bias, state) -> (y, state); returns make(shape)."""

    def make(shape: Shape):
        q, k, v, a, b, A_log, dt_bias, state0 = _mlx_inputs(shape)

        def run(n: int) -> float:
            t0 = time.perf_counter()
            state, ys = state0, []
            for _ in range(n):
                y, state = step(q, k, v, a, b, A_log, dt_bias, state)
                ys.append(y)
            mx.eval(ys, state)
            return time.perf_counter() - t0

        return run

    return make


def _ours(backend: str):
    def step(q, k, v, a, b, A_log, dt_bias, state):
        return gated_delta_update(q, k, v, a, b, A_log, dt_bias, state, backend=backend)

    return _mlx_timer(step)


def _mlx_lm(use_kernel: bool):
    from mlx_lm.models.gated_delta import gated_delta_update as peer

    def step(q, k, v, a, b, A_log, dt_bias, state):
        return peer(q, k, v, a, b, A_log, dt_bias, state, use_kernel=use_kernel)

    return _mlx_timer(step)


def _mx_fast():
    # MLX core's op takes decay factor + beta; its state layout is [B, Hv, Dv, Dk] like ours
    # (checked against our ref with Dk != Dv, whatever its docstring says).
    from qwen35_mlx.kernels.gated_delta import compute_gates

    def step(q, k, v, a, b, A_log, dt_bias, state):
        g, beta = compute_gates(a, b, A_log, dt_bias)
        y, state = mx.fast.gated_delta_update(q, k, v, g, beta, state)
        return y, state

    return _mlx_timer(step)


def memory_floor_step(q, k, v, a, b, A_log, dt_bias, state):
    """Decode's memory floor as a step: one elementwise pass over the state, which reads and
    writes it once, as a decode step must at the least."""
    return v, state * 1.0001


def _memory_floor():
    """The memory floor, measured: chained like the contenders."""
    return _mlx_timer(memory_floor_step)


def _our_gpu_backend(name: str) -> bool:
    from qwen35_mlx.kernels.gated_delta import _gpu_backend

    impl = _gpu_backend(name)
    q = mx.zeros((1, 1, HK, DK), mx.bfloat16)
    v = mx.zeros((1, 1, HV, DV), mx.bfloat16)
    g = mx.zeros((1, 1, HV), mx.float32)
    try:
        return bool(impl.supports(q, v, g))
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# flash-linear-attention (torch + Triton), CUDA only


def _fla_contenders() -> list[Contender]:
    """FLA's two kernels on the inputs and timing of bench_fla.py (which runs them without MLX)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_fla

        bench_fla.kernel("chunk")
    except Exception:
        return []

    def make_for(name: str):
        def make(shape: Shape):
            x = bench_fla.make_inputs(shape.T, shape.Hv, shape.B)
            return bench_fla.make_run(bench_fla.make_call(bench_fla.kernel(name), x), x["state0"])

        return make

    ver = bench_fla.fla_version()
    return [Contender(f"fla {n} ({ver})", "peer", make_for(n)) for n in bench_fla.KERNELS]


# ---------------------------------------------------------------------------------------------


def _native_built() -> bool:
    """The optional native CPU primitive, built here first if it is not yet (as the test suite
    does; kernels/cpu_ext): a fresh machine's CPU run then has its row. Where it cannot be built the
    reason is printed and the row is left out."""
    if native_available():
        return True
    from qwen35_mlx.kernels import cpu_ext

    if os.environ.get(cpu_ext.OFF_ENV, "1") == "0":
        return False
    try:
        cpu_ext.build()
    except RuntimeError as e:
        print(f"ours native: not built ({str(e).splitlines()[0]})", flush=True)
        return False
    return native_available()


def contenders() -> list[Contender]:
    out = [
        Contender("ours auto", "ours", _ours("auto")),
        Contender("ours ref", "ours", _ours("ref")),
        Contender("ours chunked", "ours", _ours("chunked")),
    ]
    for name in ("metal", "cuda"):
        if _our_gpu_backend(name):
            out.append(Contender(f"ours {name}", "ours", _ours(name)))
    if mx.default_device() == mx.cpu and _native_built():
        out.append(Contender("ours native", "ours", _ours("native")))
    out.append(Contender("mlx-lm ops", "peer", _mlx_lm(use_kernel=False)))
    if mx.metal.is_available():
        out.append(Contender("mlx-lm kernel", "peer", _mlx_lm(use_kernel=True)))
    if hasattr(mx.fast, "gated_delta_update"):
        out.append(Contender("mx.fast", "peer", _mx_fast()))
    out.extend(_fla_contenders())
    out.append(Contender("memory floor", "floor", _memory_floor(), kinds=("decode",)))
    return out


def bench_shape(cands, shape: Shape, target_s: float, repeats: int, budget_s: float) -> None:
    """Time every contender on one shape, interleaved: each repeat runs all of them in turn, so
    load from other processes on a shared machine falls on everyone alike. Skips a contender
    whose warm-up call exceeds budget_s (and, by the caller, its larger shapes)."""
    runs = {}
    size = shape.B * shape.T * shape.Hv
    for c in cands:
        if shape.kind not in c.kinds:
            c.results[shape] = (None, f"not a {shape.kind} contender")
            continue
        if size >= c.skip_kind.get(shape.kind, math.inf):
            c.results[shape] = (None, f"skipped: over budget at a smaller {shape.kind} shape")
            continue
        # Work grows about linearly with B * T * Hv: skip what would surely blow the budget.
        done = [
            (s.B * s.T * s.Hv, r[0])
            for s, r in c.results.items()
            if s.kind == shape.kind and r[0] and s.B * s.T * s.Hv <= size
        ]
        if done:
            prev_size, prev_ms = max(done)
            guess_s = prev_ms / 1e3 * size / prev_size
            if guess_s > budget_s:
                c.skip_kind[shape.kind] = size
                c.results[shape] = (None, f"skipped: about {guess_s:.0f} s a call > {budget_s:g} s")
                continue
        try:
            limit = c.max_t.get(shape.kind)
            if limit is not None and shape.T > limit:
                c.results[shape] = (None, f"skipped: T > {limit} for this contender (time limit)")
                continue
            run = c.make(shape)
            t1 = run(1)  # warm-up: compile, caches, allocator
            if t1 > budget_s:  # compilation or autotuning may be most of it: once more
                t1 = run(1)
            if t1 > budget_s:
                c.skip_kind[shape.kind] = size
                c.results[shape] = (None, f"skipped: one call took {t1:.1f} s > {budget_s:g} s")
                continue
            t1 = min(t1, run(1))
            runs[c.name] = (c, run, max(1, min(64, int(target_s / max(t1, 1e-6)))))
        except Exception as e:  # a peer that cannot run this shape: say so, go on
            c.results[shape] = (None, f"error: {type(e).__name__}: {e}"[:200])
    per_call = {name: [] for name in runs}
    cpu_per_call = {name: [] for name in runs}  # process CPU time: steadier on a shared machine
    for _ in range(repeats):
        for name, (_, run, n) in runs.items():
            # A short pause first, so that work left behind by the previous contender (BLAS
            # threads still spinning, GPU queues) does not fall on this one.
            time.sleep(0.2)
            c0 = time.process_time()
            per_call[name].append(run(n) / n)
            cpu_per_call[name].append((time.process_time() - c0) / n)
    for name, (c, _, n) in runs.items():
        ms = statistics.median(per_call[name]) * 1e3
        cpu_ms = statistics.median(cpu_per_call[name]) * 1e3
        c.results[shape] = (
            ms,
            f"n={n} x {repeats}, min {min(per_call[name]) * 1e3:.3f} ms, "
            f"process CPU time median {cpu_ms:.3f} ms",
        )
    for c in cands:
        ms, status = c.results[shape]
        shown = f"{ms:.3f} ms ({status})" if ms is not None else status
        print(f"  {c.name:28s} {shape.label:18s} {shown}", flush=True)


def environment() -> dict:
    import mlx_lm

    env = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "default_device": str(mx.default_device()),
        "cpu_count": os.cpu_count(),
    }
    try:
        env["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
    except Exception:
        pass
    try:
        from qwen35_mlx import _blas

        env["blas"] = _blas.blas_status()
    except Exception as e:  # _blas predates blas_status on some checkouts
        env["blas"] = f"unknown ({e})"
    for var in ("OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "QWEN35_MLX_BLAS"):
        if var in os.environ:
            env[var] = os.environ[var]
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["cuda_device"] = torch.cuda.get_device_name()
        import fla

        env["fla"] = getattr(fla, "__version__", "?")
    except Exception:
        pass
    return env


def print_table(cands: list[Contender], shapes: list[Shape]) -> str:
    best_peer = {}
    for s in shapes:
        times = [c.results[s][0] for c in cands if c.group == "peer" and c.results[s][0]]
        best_peer[s] = min(times) if times else None
    w = max(len(c.name) for c in cands) + 2
    head = f"{'':{w}}" + "".join(f"{s.label:>22}" for s in shapes)
    lines = [head, "-" * len(head)]
    for c in cands:
        cells = []
        for s in shapes:
            ms, status = c.results[s]
            if ms is None:
                cells.append(f"{'skipped' if s.kind in c.kinds else '-':>22}")
            elif best_peer[s] and c.group != "floor":
                cells.append(f"{ms:>11.3f} ms {best_peer[s] / ms:>6.2f}x")
            else:
                cells.append(f"{ms:>14.3f} ms")
        lines.append(f"{c.name:{w}}" + "".join(cells))
    lines.append(
        "(x = fastest peer's time / this contender's time: above 1 is faster than every peer)"
    )
    floors = [c for c in cands if c.group == "floor"]
    for s in shapes:
        floor_ms = floors and floors[0].results[s][0]
        for c in cands:
            ms = c.results[s][0]
            if (
                floor_ms
                and ms
                and (c.group == "ours" or (c.group == "peer" and ms == best_peer[s]))
            ):
                ratio = c.results[s][0] / floor_ms
                lines.append(f"  {c.name} @ {s.label}: {ratio:.2f}x the memory floor")
    skipped = [
        (c.name, s.label, c.results[s][1])
        for c in cands
        for s in shapes
        if c.results[s][0] is None and s.kind in c.kinds
    ]
    for name, label, status in skipped:
        lines.append(f"  {name} @ {label}: {status}")
    text = "\n".join(lines)
    print(text)
    return text


def plot(cands: list[Contender], shapes: list[Shape], env: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(s.kind, s.Hv) for s in shapes}, key=lambda p: (p[0] != "decode", p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    for ax, (kind, hv) in zip(axes[0], panels, strict=True):
        sub = [s for s in shapes if s.kind == kind and s.Hv == hv]
        for c in cands:
            pts = [(s.B if kind == "decode" else s.T, c.results[s][0]) for s in sub]
            pts = [(x, y) for x, y in pts if y is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            style = {"ours": "-o", "peer": "--s"}.get(c.group, ":k")
            ax.plot(xs, ys, style, label=c.name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch B (T=1)" if kind == "decode" else "sequence length T (B=1)")
        ax.set_ylabel("ms per call (median)")
        ax.set_title(f"{kind}: Hk={HK}, Hv={hv}, Dk=Dv={DK}, bf16")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    dev = env.get("cuda_device") or env.get("device_info", {}).get("device_name", env["platform"])
    blas = env.get("blas", "")
    blas = blas.get("blas", "") if isinstance(blas, dict) else str(blas)
    fig.suptitle(
        f"gated delta rule on {dev} ({env['default_device']}), BLAS: {blas}, {env['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(cands: list[Contender], shapes: list[Shape], env: dict, out: Path) -> None:
    """Print the table; write gated_delta_<device>_<stamp>.json and .png into out."""
    table = print_table(cands, shapes)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    dev = "cuda" if env.get("cuda_device") else env["default_device"].split("(")[1].split(",")[0]
    base = out / f"gated_delta_{dev}_{stamp}"
    record = {
        "env": env,
        "shape": {"Hk": HK, "Hv": HV, "Dk": DK, "Dv": DV, "dtype": "bfloat16", "state": "float32"},
        "table": table,
        "results": [
            {
                "contender": c.name,
                "group": c.group,
                "B": s.B,
                "T": s.T,
                "Hv": s.Hv,
                "ms": c.results[s][0],
                "status": c.results[s][1],
            }
            for c in cands
            for s in shapes
        ],
    }
    base.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"wrote {base}.json")
    plot(cands, shapes, env, base.with_suffix(".png"))


def merge(paths: list[str], out: Path) -> int:
    """One table, JSON and plot from several runs of this script on one machine (e.g. decode
    and prefill run as two commands to stay under a time limit). A contender missing from a
    run is shown as not run there; the first run's environment is kept, with every date."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    cands: dict[str, Contender] = {}
    shapes: set[Shape] = set()
    for rec in records:
        for r in rec["results"]:
            c = cands.setdefault(
                r["contender"], Contender(r["contender"], r["group"], None, kinds=())
            )
            shape = Shape(r["B"], r["T"], r.get("Hv", HV))
            shapes.add(shape)
            c.results[shape] = (r["ms"], r["status"])
            if not r["status"].startswith("not a ") and shape.kind not in c.kinds:
                c.kinds += (shape.kind,)
    ordered = sorted(shapes, key=lambda s: (s.kind != "decode", s.Hv, s.B * s.T))
    for c in cands.values():
        for shape in ordered:
            c.results.setdefault(shape, (None, "not run in the merged files"))
    env = dict(records[0]["env"])
    env["merged_from"] = [
        {"file": Path(p).name, "date": r["env"]["date"]}
        for p, r in zip(paths, records, strict=True)
    ]
    devices = {r["env"].get("cuda_device") or r["env"]["default_device"] for r in records}
    if len(devices) > 1:
        raise SystemExit(f"--merge: the runs come from different devices: {sorted(devices)}")
    write_outputs(list(cands.values()), ordered, env, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-friendly subset with a time budget")
    p.add_argument("--out", default="benchmarks/out", help="output folder for JSON and PNG")
    p.add_argument("--only", default="", help="comma-separated contender names to run")
    p.add_argument("--decode-b", default="", help="comma-separated decode batch sizes")
    p.add_argument("--prefill-t", default="", help="comma-separated prefill lengths")
    p.add_argument(
        "--hv", default="", help=f"comma-separated value-head counts (Hk={HK}; default {HV})"
    )
    p.add_argument(
        "--max-t",
        default="",
        help='per-contender prefill length limits, e.g. "mx.fast=8192,mlx-lm ops=8192"',
    )
    p.add_argument("--target-s", type=float, default=None, help="seconds per timed repeat")
    p.add_argument("--budget-s", type=float, default=None, help="skip calls slower than this")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per shape")
    p.add_argument(
        "--merge", nargs="+", metavar="JSON", help="combine earlier runs' JSON files; run nothing"
    )
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))

    decode_b = QUICK_DECODE_B if args.quick else DECODE_B
    prefill_t = QUICK_PREFILL_T if args.quick else PREFILL_T
    if args.decode_b or args.prefill_t:
        decode_b = [int(x) for x in args.decode_b.split(",") if x]
        prefill_t = [int(x) for x in args.prefill_t.split(",") if x]
    hvs = [int(x) for x in args.hv.split(",") if x] or [HV]
    shapes = [Shape(b, 1, hv) for hv in hvs for b in decode_b]
    shapes += [Shape(1, t, hv) for hv in hvs for t in prefill_t]
    target_s = args.target_s or (0.3 if args.quick else 1.0)
    budget_s = args.budget_s or (4.0 if args.quick else 60.0)
    repeats = args.repeats or (3 if args.quick else 5)

    cands = contenders()
    if args.only:
        # A name, or a name's start before " (" (e.g. "fla chunk" for "fla chunk (0.4.1)").
        keep = {x.strip() for x in args.only.split(",")}
        cands = [c for c in cands if c.name in keep or c.name.split(" (")[0] in keep]
    for item in filter(None, args.max_t.split(",")):
        name, _, limit = item.rpartition("=")
        for c in cands:
            if c.name == name or c.name.split(" (")[0] == name:
                c.max_t["prefill"] = int(limit)
    env = environment()
    print(
        f"# {env['date']}  mlx {env['mlx']}  mlx-lm {env['mlx_lm']}  device {env['default_device']}"
    )
    print(f"# BLAS: {env['blas']}")
    for s in shapes:
        bench_shape(cands, s, target_s, repeats, budget_s)

    write_outputs(cands, shapes, env, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
