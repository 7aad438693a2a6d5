"""The split chunk path (chunk_launch.split_chunk_kernel: WY kernel, state pass, output pass) on
a GPU, in one go (< 4 minutes on an H200): build, check against the references, time each pass
and the whole path against our fused recurrent kernel and flash-linear-attention's chunk kernel,
print one table with the predictions of benchmarks/NOTES.md ("Split chunk kernels") beside it.

    python benchmarks/chunk_split_gpu.py [--quick] [--out DIR]
    (on the lent H200: `PYTHONPATH=src python3 benchmarks/chunk_split_gpu.py --quick --out $OUT`)

--quick (< 90 s): the checks at T 2048 only (fp32 against the float64 loop, bf16 against the
fused kernel, bf16 also with unbounded WY / output kernels, the state pass's ring of three "r3"
and its 32 value rows "bv32", fp32 and bf16 with the output pass O2_BODY "o2"), timing at T 2048
and 8192 only (the state pass alone also as "state r3" and "state bv32", the output pass as "out
o2", the whole path as "split o2"). On CUDA every run also times the "unb" variants:
chunk_launch.MIN_BLOCKS = {} (WY and output kernels without the default __launch_bounds__(256,
2): one threadgroup an SM; session 7 measured the bound faster and made it the default).

1. Correctness, B = 2 (row 0 unmasked, row 1 left padding and a hole), a nonzero initial state,
   Hk 16, Dk = Dv = 128: the raw gates (gated_delta_update's path, gates computed in the WY
   kernel) at T 200 / 2048 (Hv 32) fp32 against the float64 loop, at fp32's tolerance; fp32 and
   bf16 at T 2048 / 8192 (Hv 32, 64) against the fused recurrent kernel (the dtype's
   tolerance); the precomputed-gates entry at T 512; the state pass at 32 value rows once.
2. Timing, B = 1, bf16, the benchmarks' gates (bench_gated_delta.py), T 2048 / 8192 / 32768,
   Hv 32: ours fused recurrent ("fused"), the split path ("split": state pass at 16 value rows;
   "split bv32"), its passes alone ("wy" with the gates inside, "state", "state bv32", "out"),
   FLA's chunk_gated_delta_rule ("fla chunk", torch; skipped where it does not import). Each:
   n calls chained through the state in one evaluated graph (torch: queued, then synchronised),
   contenders interleaved, best of 3, ms per call.

--ab (round 4, helper chunk4; < 4 minutes): old against new in one process. "new" is the
default build (WY2_BODY, H2_BODY, O2_BODY with P16, the 16-bit staged products on ldmatrix +
mma.m16n8k16, O2's ring of three); "old" is session 8's (chunk_launch.WY2 = H2 = O2_P16 =
MMA16 = False, O2_RING = 2; only D_ij's reciprocal is new in it); "wy1"
only WY2 off, "h1" only H2 off, "t32" only MMA16 off, "r4" the state pass's ring of four, "w64"
WY2_BODY with slices of 64 (half the output slices and their barriers; 68 B spilled at three
threadgroups an SM), "ob32" O2_BODY at 32 value rows a threadgroup (77 registers: three an SM).
Checks at T 200 and 2048 (fp32 against the float64 loop, bf16 against the fused kernel) for new
and old, in bf16 also wy1, h1, t32, r4, w64, ob32;
timing at T 2048 / 8192 / 32768 (Hv 32, bf16) of fused, split, split old, wy, wy old, state,
state old, state r3 / r4 (H2_BODY, key slices of 64 in a ring of three / four: each copy two /
three slices ahead instead of one), out, out old, FLA's chunk,
and two launch bounds: "wy lb2" (WY2_BODY at two threadgroups an SM instead of three: 83
registers, no spill, against 80 and 12 bytes spilled) and "out lb3" (O2_BODY at three instead
of two: 80 registers, 144 bytes spilled, against 128), "wy ds64" and "out bv32" (w64's and
ob32's passes).

--stamps (round 5, helper chunk5; < 2 minutes, CUDA): the WY2 / O2 passes built with clock stamps
(chunk_source.stamped; their outputs checked equal to the plain builds'), read by
benchmarks/chunk_stamps.py at T 8192 / 32768 (Hv 32, bf16): cycles a threadgroup spends in each
phase, threadgroups in flight an SM, waves; then the plain and stamped passes timed, "wy lb4" /
"wy ds64 lb4" (the WY pass at four threadgroups an SM), "wy v16" / "split v16" (WY2_V16: W and
U written by 16-byte copies), and the split path with BEST3 (round 4's
three few-percent alternatives together) and BEST_LB4 ("split lb4"), predictions beside; each
variant's outputs first checked against the plain build's (bf16 tolerance). Exit status 1 if a
stamped output differs from the plain one or a variant is outside the tolerance.

--ab6 (round 6, helper chunk6; < 3 minutes, CUDA): the 16-byte variants (chunk_launch.WY2_VX:
WY2_V16 plus Kw's stores and the U / W slices' scaling in 16-byte groups; H2_VX: H's stores;
O2_VX: Y's decay and P made in the accumulators, four barriers fewer, 16-byte y stores), each
off by default. Checks first (B 2, row 1 left-padded with a hole, raw gates, Hv 32): at T 200
(fp32) and 2048 (fp32, bf16) each variant's y and state must EQUAL the default build's bit for
bit (same arithmetic), and be within the tolerance of the float64 loop (fp32) / the fused kernel
(bf16); "vx lb4" (the three with round 5's BEST_LB4) and "vx bv32" (the state pass at 32 value
rows) within the tolerance only. Then the state pass H2_BODY stamped (chunk_source.H2_STAMPS:
the phases of one sampled chunk a threadgroup; its H, Vn and state must equal the plain build's)
at T 8192 / 32768, and timings there (B 1, Hv 32, bf16) with FLA's chunk kernel and the
predictions beside; last (after the JSON is written), H2_DYN (the state pass's ring in dynamic
shared memory, three / four whole W / Kw slices, with H2_VX): bit for bit against the default at
T 2048 (bf16), then timed beside the static ring. Exit status 1 if a check fails.

--ab7 (round 7, helper chunk7; < 3 minutes, CUDA): BEST7 (WY2_VX, O2_VX at three threadgroups an
SM, the state pass at 32 value rows: each pass's best --ab6 row, the same arithmetic), the state
pass H3_BODY (chunk_launch.H3: one warp a chain of 16 value rows, the state in its accumulators;
4 or 2 warps a threadgroup, rings of 2 or 3 chunks in dynamic shared memory) and LDSM32 (the
tile layer's threadgroup addresses converted once a call; same outputs). Checks as --ab6's
(T 200 / 2048 fp32 against float64, 2048 bf16 against the fused kernel; "equal to default"
reported: expected for all, H3's only fails on the tolerance), then timings at T 8192 / 32768
beside FLA's chunk kernel with the predictions, then H3's stamped phases (its outputs must equal
the plain build's). Exit status 1 if a check fails.

--ab8 (round 8, helper chunk8; < 3 minutes, CUDA): FUSE_Y (chunk_launch.FUSE_Y: the output
pass's Y = q H[n]^T computed by the state pass H3 from the same Sb as its Xw^T, written fp32 in
place of H; the output pass starts its Y from it and stages only q and k), with the output pass
at four threadgroups an SM and H3 at four warps beside; FUSE_O (chunk_launch.FUSE_O: P = D o q
k^T by a pass of its own, then the state pass makes and writes y: no output pass). Checks at
T 1000 / 2048 (bf16, B 2 masked, raw gates): y and state equal to the default build's bit for
bit and within bf16's tolerance of the fused kernel; at 2048 FUSE_Y's passes alone (Vn, state, y
equal; Yi = q H^T). Then timings at T 8192 / 32768 beside FLA's chunk kernel with the
predictions; last, H3O stamped (one chunk's phases; its outputs must equal the plain build's).
JSON to --out. Exit status 1 if a check fails.

--ab9 (round 9, helper chunk9; < 2 minutes, CUDA): WY_P (chunk_launch.WY_P: FUSE_O's P = D o q
k^T made by the WY pass, q's slices staged beside k's; the P pass goes) and H3O_PRODUCERS (the
state pass's copies issued by producer warps of their own; "prody": y written by them too),
apart and together. Checks at T 1000 / 2048 (bf16, B 2 masked, raw gates): y and state equal to
the default build's bit for bit and within bf16's tolerance of the fused kernel; at 2048 the WY
pass alone (W, U, Kw, gates equal to WY2_VX's, P to O2P's). Then timings at T 8192 / 32768
beside FLA's chunk kernel with the predictions; last, the producer builds stamped (one chunk's
phases on a computing warp's clock; their outputs must equal the plain builds'). JSON to --out.
Exit status 1 if a check fails.

--ab10 (round 10, helper chunk10; < 3 minutes, CUDA): H3O_SPLIT (chunk_launch.H3O_SPLIT: the
state pass's 16 value rows shared by two computing warps, so its products run on all four SM
sub-partitions), with the ring of two beside. Checks at T 1000 / 2048 (bf16, B 2 masked, raw
gates): y and state equal to the default build's bit for bit and within bf16's tolerance of the
fused kernel. Then timings at T 8192 / 32768 (Hv 32) beside FLA's chunk kernel with the
predictions; the split build stamped (one chunk's phases on half 0 of pair 0's clock; its
outputs must equal the plain build's); last, T 32768 at Hv 16 and 64. JSON to --out. Exit status
1 if a check fails.

Ends with what to set: chunk_launch.SPLIT = True if every check passed, and the smallest
measured T from which "split" beats "fused" (kernels/gated_delta/__init__.py
_GPU_CHUNKED_MIN_T). Exit status 1 if a check fails (the timings still print). JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

# bench_gated_delta first: it imports qwen35_mlx before mlx (OpenBLAS on Linux).
from bench_gated_delta import Shape, _fla_contenders, _mlx_inputs  # isort: skip
from chunk_mma_gpu import RTOL, chained, float64_loop, inputs, rel_err, write_result  # isort: skip

import mlx.core as mx
import numpy as np

from qwen35_mlx.kernels.gated_delta import _gpu_backend, compute_gates
from qwen35_mlx.kernels.gated_delta import chunk_launch as cl

# chunk_launch.MIN_BLOCKS of the "unb" rows: WY and output kernels unbounded (the default bounds
# them to 2 threadgroups an SM).
LB: dict = {}

# benchmarks/NOTES.md "Split chunk kernels, round 3": predicted ms per pass, H200, Hv 32, bf16.
# Only the state pass changed in round 3 (its midpoint re-derived for the cp.async ring); wy /
# out (and their "unb" rows) are the H200's 06:39 UTC measurements of the same kernels, the
# split rows the sums. The 32768 row scales 8192's by 4.
PREDICTED = {
    2048: {"wy": 0.204, "state": 0.06, "out": 0.232, "split": 0.50,
           "wy unb": 0.302, "out unb": 0.333, "split unb": 0.70},
    8192: {"wy": 0.729, "state": 0.22, "out": 0.865, "split": 1.81,
           "wy unb": 1.050, "out unb": 1.291, "split unb": 2.56},
    32768: {"wy": 2.9, "state": 0.9, "out": 3.5, "split": 7.3},
}  # fmt: skip


# benchmarks/NOTES.md "Split chunk kernels, round 4": predicted ms (H200, Hv 32, bf16) of the
# --ab rows; the "old" rows are session 8's measurements (10:04 UTC; wy at 2048 session 7's),
# the 32768 rows scale 8192's by 4 (old) or are estimated alike (new).
PREDICTED_AB = {
    2048: {"wy": 0.10, "wy old": 0.204, "state": 0.12, "state old": 0.180, "out": 0.13,
           "out old": 0.176, "split": 0.36, "split old": 0.518},
    8192: {"wy": 0.38, "wy old": 0.730, "state": 0.40, "state old": 0.613, "out": 0.45,
           "out old": 0.627, "split": 1.25, "split old": 1.852},
    32768: {"wy": 1.5, "wy old": 2.9, "state": 1.6, "state old": 2.45, "out": 1.8,
            "out old": 2.5, "split": 5.0, "split old": 7.4},
}  # fmt: skip


def _dt_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _row(name, T, hv, dtype, y, s, refs) -> dict:
    y32, s32 = np.array(y.astype(mx.float32)), np.array(s)
    row = {"check": name, "T": T, "Hv": hv, "dtype": _dt_name(dtype)}
    errs = []
    for ref_name, (ry, rs) in refs.items():
        row[f"vs {ref_name} y"] = rel_err(y32, ry)
        row[f"vs {ref_name} state"] = rel_err(s32, rs)
        errs += [row[f"vs {ref_name} y"], row[f"vs {ref_name} state"]]
    finite = bool(np.isfinite(y32).all() and np.isfinite(s32).all())
    row["ok"] = finite and max(errs) <= RTOL[dtype]
    print(
        f"  {name:10s} T={T:6d} Hv={hv:3d} {row['dtype']:8s} "
        + "  ".join(f"{k} {x:.2e}" for k, x in row.items() if k.startswith("vs"))
        + ("  ok" if row["ok"] else "  FAILED"),
        flush=True,
    )
    return row


def bounded(f, blocks: dict = LB):
    """f with chunk_launch.MIN_BLOCKS = blocks while it builds its graph (the WY / output
    kernels' launch bounds; {}: unbounded)."""

    def g(*args, **kw):
        old = dict(cl.MIN_BLOCKS)
        cl.MIN_BLOCKS.clear()
        cl.MIN_BLOCKS.update(blocks)
        try:
            return f(*args, **kw)
        finally:
            cl.MIN_BLOCKS.clear()
            cl.MIN_BLOCKS.update(old)

    return g


# chunk_launch.H_TILES of the "r3" rows: the state pass with key slices of 64 in a ring of three
# staged slices (the default at Dk 128, bf16: one slice of 128, a ring of two).
R3 = (64, 3)


def patched(f, **attrs):
    """f with chunk_launch's attributes set to attrs while it builds its graph."""

    def g(*args, **kw):
        old = {a: getattr(cl, a) for a in attrs}
        for a, x in attrs.items():
            setattr(cl, a, x)
        try:
            return f(*args, **kw)
        finally:
            for a, x in old.items():
                setattr(cl, a, x)

    return g


# Round 4's switches (--ab): the session-8 build, and each new part off alone.
OLD = {"WY2": False, "H2": False, "O2_P16": False, "O2_RING": 2, "MMA16": False}
AB_VARIANTS = {
    "old": OLD,
    "wy1": {"WY2": False},
    "h1": {"H2": False},
    "t32": {"MMA16": False},
    "r4": {"H_TILES": (64, 4)},
    "w64": {"WY2_TILES": {**cl.WY2_TILES, ("cuda", 2): (64, 2)}},
    "ob32": {
        "O2_TILES": {**cl.O2_TILES, ("cuda", 2): (32, 32)},
        "MIN_BLOCKS": {**cl.MIN_BLOCKS, "o2": 3},
    },
}


def tiles(f, t=R3):
    """f with chunk_launch.H_TILES = t (the state pass's slice / ring)."""
    return patched(f, H_TILES=t)


def check(backend: str, quick: bool = False, ab: bool = False) -> list[dict]:
    fused = _gpu_backend(backend)
    rows = []
    cases = [
        (200, 32, mx.float32, True),
        (2048, 32, mx.float32, True),
        (2048, 32, mx.bfloat16, False),
        (8192, 32, mx.float32, False),
        (8192, 32, mx.bfloat16, False),
        (8192, 64, mx.bfloat16, False),
    ]
    if quick:
        cases = [(2048, 32, mx.float32, True), (2048, 32, mx.bfloat16, False)]
    if ab:
        cases = [(200, 32, mx.float32, True), (2048, 32, mx.float32, True)]
        cases += [(2048, 32, mx.bfloat16, False)]
    for T, hv, dtype, exact in cases:
        q, k, v, a, b, A_log, dt_bias, state, mask = inputs(2, T, hv, dtype)
        refs = {}
        want = fused.gated_delta_update_kernel(q, k, v, a, b, A_log, dt_bias, state, mask)
        mx.eval(want)
        refs["fused"] = (np.array(want[0].astype(mx.float32)), np.array(want[1]))
        if exact:
            with mx.stream(mx.cpu):
                g, beta = compute_gates(a, b, A_log, dt_bias)
                mx.eval(g, beta)
            refs["f64"] = float64_loop(q, k, v, g, beta, state, mask)
        variants = [("split", cl.gated_delta_update_chunk_kernel, {})]
        if ab:
            # every part off alone only where it matters: 16-bit pieces
            variants += [
                (f"split {n}", patched(cl.gated_delta_update_chunk_kernel, **sw), {})
                for n, sw in AB_VARIANTS.items()
                if n == "old" or dtype != mx.float32
            ]
        elif backend == "cuda" and T == 2048 and dtype == mx.bfloat16:
            variants += [
                ("split unb", bounded(cl.gated_delta_update_chunk_kernel), {}),
                ("split r3", tiles(cl.gated_delta_update_chunk_kernel), {}),
                ("split bv32", cl.gated_delta_update_chunk_kernel, {"bv": 32}),
                ("split o2", patched(cl.gated_delta_update_chunk_kernel, O2=True), {}),
            ]
        if not ab and backend == "cuda" and T == 2048 and dtype == mx.float32:
            variants += [("split o2", patched(cl.gated_delta_update_chunk_kernel, O2=True), {})]
        for name, f, kw in variants:
            try:
                y, s = f(
                    q, k, v, a, b, A_log, dt_bias, state, mask, backend=backend, split=True, **kw
                )
                mx.eval(y, s)
                rows.append(_row(name, T, hv, dtype, y, s, refs))
            except Exception as e:  # a kernel that does not build: say so, go on to the timing
                print(f"  {name}: did not build or run: {str(e)[:300]}", flush=True)
                rows.append({"check": name, "T": T, "ok": None, "error": str(e)[:300]})
        if quick or ab:
            continue
        if T == 2048 and dtype == mx.float32 and 32 in cl.H_BV_CHOICES[backend]:
            y, s = cl.gated_delta_update_chunk_kernel(
                q, k, v, a, b, A_log, dt_bias, state, mask, backend=backend, split=True, bv=32
            )
            rows.append(_row("split bv32", T, hv, dtype, y, s, refs))
    if quick or ab:
        return rows
    # The precomputed-gates entry (gated_delta's path: the plain WY kernel).
    q, k, v, a, b, A_log, dt_bias, state, mask = inputs(2, 512, 32, mx.float32)
    g, beta = compute_gates(a, b, A_log, dt_bias)
    with mx.stream(mx.cpu):
        gc, bc = compute_gates(a, b, A_log, dt_bias)
        mx.eval(gc, bc)
    y, s = cl.gated_delta_chunk_kernel(q, k, v, g, beta, state, mask, backend=backend, split=True)
    rows.append(
        _row(
            "gates", 512, 32, mx.float32, y, s, {"f64": float64_loop(q, k, v, gc, bc, state, mask)}
        )
    )
    return rows


def _timers(backend: str, shape: Shape, fla, quick: bool = False, ab: bool = False) -> dict:
    fused = _gpu_backend(backend)
    q, k, v, a, b, A_log, dt_bias, state0 = _mlx_inputs(shape)
    gates = (a, b, A_log, dt_bias)
    W, U, Kw, gts = cl.wy_pass(backend, k, v, None, None, None, raw_gates=gates)
    mx.eval(W, U, Kw, gts)
    try:
        H, Vn, _ = cl.h_pass(backend, W, U, Kw, gts, state0)
        mx.eval(H, Vn)
    except Exception as e:  # the state pass does not build: time "out" on stand-ins
        print(f"  state: did not build or run: {str(e)[:300]}", flush=True)
        H = mx.zeros((W.shape[0], W.shape[1] // cl.CHUNK, U.shape[2], W.shape[2]), W.dtype)
        Vn = mx.zeros_like(U)

    def split(bv=None):
        return lambda s: cl.gated_delta_update_chunk_kernel(
            q, k, v, *gates, s, backend=backend, split=True, bv=bv
        )

    def state(bv=None):
        def f(s):
            H_, Vn_, s2 = cl.h_pass(backend, W, U, Kw, gts, s, bv=bv)
            return (H_, Vn_), s2

        return f

    steps = {
        "fused": lambda s: fused.gated_delta_update_kernel(q, k, v, *gates, s),
        "split": split(),
        "wy": lambda s: (cl.wy_pass(backend, k, v, None, None, None, raw_gates=gates), s),
        "state": state(),
        "out": lambda s: (cl.o_pass(backend, q, k, gts, H, Vn, shape.T, shape.Hv, v.dtype), s),
    }
    if ab:
        old = {n: patched(steps[n], **OLD) for n in ("split", "wy", "state", "out")}
        steps = {
            "fused": steps["fused"],
            "split": steps["split"],
            "split old": old["split"],
            "wy": steps["wy"],
            "wy old": old["wy"],
            "state": steps["state"],
            "state old": old["state"],
            "state r3": tiles(steps["state"]),
            "state r4": tiles(steps["state"], (64, 4)),
            "wy lb2": bounded(steps["wy"], {**cl.MIN_BLOCKS, "wy2": 2}),
            "wy ds64": patched(steps["wy"], **AB_VARIANTS["w64"]),
            "out": steps["out"],
            "out old": old["out"],
            "out lb3": bounded(steps["out"], {**cl.MIN_BLOCKS, "o2": 3}),
            "out bv32": patched(steps["out"], **AB_VARIANTS["ob32"]),
        }
    elif 32 in cl.H_BV_CHOICES[backend]:
        steps["state bv32"] = state(32)
        if not quick:
            steps["split bv32"] = split(32)
    if backend == "cuda" and not ab:
        steps["state r3"] = tiles(state())
        steps["out o2"] = patched(steps["out"], O2=True)
        steps["split o2"] = patched(steps["split"], O2=True)
        steps["split unb"] = bounded(steps["split"])
        steps["wy unb"] = bounded(steps["wy"])
        steps["out unb"] = bounded(steps["out"])
    timers = {name: (lambda n, f=f: chained(f, state0, n)) for name, f in steps.items()}
    for name, c in fla.items():
        timers[name.split(" (")[0]] = c.make(shape)
    return timers


# --stamps (round 5, helper chunk5): the three alternatives round 4 measured a few percent
# faster each, together (state ring of four, WY slices of 64, output at three threadgroups an
# SM).
BEST3 = {
    "H_TILES": (64, 4),
    **AB_VARIANTS["w64"],
    "MIN_BLOCKS": {**cl.MIN_BLOCKS, "o2": 3},
}
# ... and with the WY pass at four threadgroups an SM (ptxas: 64 registers, 56 bytes spilled;
# 4 x 43.5 KB of threadgroup memory) instead of slices of 64.
BEST_LB4 = {"H_TILES": (64, 4), "MIN_BLOCKS": {**cl.MIN_BLOCKS, "o2": 3, "wy2": 4}}
# Predicted ms (benchmarks/NOTES.md "Split chunk kernels, round 5"), H200, Hv 32, bf16.
PREDICTED_STAMPS = {
    8192: {
        "wy lb4": 0.43,
        "wy ds64 lb4": 0.43,
        "wy v16": 0.44,
        "split best3": 1.23,
        "split lb4": 1.22,
        "split v16": 1.28,
    },
    32768: {
        "wy lb4": 1.62,
        "wy ds64 lb4": 1.58,
        "wy v16": 1.66,
        "split best3": 4.91,
        "split lb4": 4.86,
        "split v16": 4.93,
    },
}


def stamps_run(backend: str, ts=(8192, 32768), hv: int = 32) -> list[dict]:
    """--stamps: the stamped WY2 / O2 builds (chunk_source.stamped) at each T (B 1, bf16): their
    outputs against the plain builds' (must be equal: same text but the stamps), the stamps read
    by chunk_stamps.summarize (the last of three runs), then best-of-3 times of the plain and
    stamped passes and of the split path plain and with BEST3."""
    return [_stamps_at(backend, T, hv) for T in ts]


def _stamps_at(backend: str, T: int, hv: int) -> dict:
    """stamps_run at one T."""
    from chunk_stamps import summarize
    from chunk_stamps import table as stamp_table

    from qwen35_mlx.kernels.gated_delta import chunk_source as cs

    q, k, v, a, b, A_log, dt_bias, state0 = _mlx_inputs(Shape(1, T, hv))
    gates = (a, b, A_log, dt_bias)
    plain = cl.wy_pass(backend, k, v, None, None, None, raw_gates=gates)
    mx.eval(plain)
    W, U, Kw, gts = plain
    H, Vn, _ = cl.h_pass(backend, W, U, Kw, gts, state0)
    y = cl.o_pass(backend, q, k, gts, H, Vn, T, hv, v.dtype)
    mx.eval(H, Vn, y)
    row = {"T": T, "Hv": hv, "same": {"wy": None, "out": None}}
    try:
        for _ in range(3):
            wy_st = cl.wy_pass(backend, k, v, None, None, None, raw_gates=gates, stamps=True)
            o_st = cl.o_pass(backend, q, k, gts, H, Vn, T, hv, v.dtype, stamps=True)
            mx.eval(wy_st, o_st)
        row["same"] = {
            "wy": all(
                mx.array_equal(x, z, equal_nan=True).item()
                for x, z in zip(plain, wy_st[:4], strict=True)
            ),
            "out": mx.array_equal(y, o_st[0], equal_nan=True).item(),
        }
        print(f"  T={T} stamped outputs equal to the plain builds': {row['same']}", flush=True)
        for name, st, anchors in (
            ("wy", wy_st[4], cs.WY2_STAMPS),
            ("out", o_st[1], cs.O2_STAMPS),
        ):
            r = summarize(np.array(st), [a[0] for a in anchors])
            print(stamp_table(name, T, r), flush=True)
            row[name] = r
    except Exception as e:  # the timings below still run
        print(f"  stamped builds did not build or run: {str(e)[:500]}", flush=True)

    def split(s):
        return cl.gated_delta_update_chunk_kernel(q, k, v, *gates, s, backend=backend, split=True)

    steps = {
        "wy": lambda s: (cl.wy_pass(backend, k, v, None, None, None, raw_gates=gates), s),
        "wy stamped": lambda s: (
            cl.wy_pass(backend, k, v, None, None, None, raw_gates=gates, stamps=True),
            s,
        ),
        "out": lambda s: (cl.o_pass(backend, q, k, gts, H, Vn, T, hv, v.dtype), s),
        "out stamped": lambda s: (
            cl.o_pass(backend, q, k, gts, H, Vn, T, hv, v.dtype, stamps=True),
            s,
        ),
        "split": split,
        "split best3": patched(split, **BEST3),
        "split lb4": patched(split, **BEST_LB4),
        "split v16": patched(split, WY2_V16=True),
    }
    steps["wy lb4"] = bounded(steps["wy"], {**cl.MIN_BLOCKS, "wy2": 4})
    steps["wy v16"] = patched(steps["wy"], WY2_V16=True)
    steps["wy ds64 lb4"] = patched(
        steps["wy"], **AB_VARIANTS["w64"], MIN_BLOCKS={**cl.MIN_BLOCKS, "wy2": 4}
    )
    # the variants' outputs against the plain builds' (bf16 tolerance; same arithmetic but the
    # state pass's slicing), then timing
    ref = {"wy": steps["wy"](state0)[0][:3], "split": split(state0)}
    mx.eval(ref)
    row["variants_ok"] = {}
    for name in list(steps):
        base = "wy" if name.startswith("wy") else "split" if name.startswith("split") else None
        try:
            got = steps[name](state0)
            mx.eval(got)
            if base and not name.endswith("stamped") and name != base:
                got = got[0][:3] if base == "wy" else got
                pairs = zip(got, ref[base], strict=True)
                errs = [rel_err(np.array(g.astype(mx.float32)), np.array(r.astype(mx.float32)))
                        for g, r in pairs]  # fmt: skip
                row["variants_ok"][name] = bool(max(errs) <= RTOL[mx.bfloat16])
                print(f"  {name}: rel err vs plain {max(errs):.2e}", flush=True)
        except Exception as e:  # a variant that does not build: drop it
            print(f"  {name}: did not build or run: {str(e)[:300]}", flush=True)
            del steps[name]
    n = max(2, min(50, 65536 // T))
    best = {}
    for _ in range(3):
        for name, f in steps.items():
            best[name] = min(best.get(name, float("inf")), chained(f, state0, n) / n * 1e3)
    print(f"  T={T:6d} " + "  ".join(f"{k} {x:.3f}" for k, x in best.items()), flush=True)
    pred = PREDICTED_STAMPS.get(T, {})
    print("  predicted: " + "  ".join(f"{k} {x:.2f}" for k, x in pred.items()), flush=True)
    row["ms"], row["predicted"] = best, pred
    return row


# --ab6 (round 6, helper chunk6): the 16-byte variants, each alone and together; "exact": the
# outputs must equal the default build's bit for bit.
VX = {"WY2_VX": True, "H2_VX": True, "O2_VX": True}
AB6_VARIANTS = {
    "wy vx": ({"WY2_VX": True}, True),
    "h vx": ({"H2_VX": True}, True),
    "o vx": ({"O2_VX": True}, True),
    "vx": (VX, True),
    "vx lb4": ({**VX, **BEST_LB4}, False),
}
# O2_VX at three threadgroups an SM (ptxas, bf16: 80 registers, 20 bytes spilled; the default
# O2_BODY spills 144 there, and was 10% faster at 32k all the same: round 4's "out lb3").
OUT3 = {"MIN_BLOCKS": {**cl.MIN_BLOCKS, "o2": 3}}
# Predicted ms (benchmarks/NOTES.md "Split chunk kernels, round 6"), H200, Hv 32, bf16; "wy v16"
# and the plain rows are the 17:34 UTC --stamps measurements.
PREDICTED_AB6 = {
    8192: {"wy": 0.465, "wy v16": 0.406, "wy vx": 0.33, "state": 0.42, "state vx": 0.37,
           "out": 0.492, "out vx": 0.37, "split": 1.304, "split v16": 1.257, "split vx": 1.07,
           "split vx lb4": 1.06, "out vx lb3": 0.34, "split vx o3": 1.04},
    32768: {"wy": 1.695, "wy v16": 1.442, "wy vx": 1.20, "state": 1.60, "state vx": 1.42,
            "out": 1.819, "out vx": 1.35, "split": 5.004, "split v16": 4.847, "split vx": 4.0,
            "split vx lb4": 3.95, "out vx lb3": 1.22, "split vx o3": 3.87},
}  # fmt: skip


def _check_case(backend: str, T: int, dtype) -> tuple:
    """A check's case (B 2 with a left-padded row and a hole, 32 heads, raw gates, T, dtype):
    (the split path's arguments, the references: fp32 the float64 loop, else the fused
    kernel's, and the default split path's (y, state))."""
    q, k, v, a, b, A_log, dt_bias, state, mask = inputs(2, T, 32, dtype)
    args = (q, k, v, a, b, A_log, dt_bias, state, mask)
    refs = {}
    if dtype == mx.float32:
        with mx.stream(mx.cpu):
            g, beta = compute_gates(a, b, A_log, dt_bias)
            mx.eval(g, beta)
        refs["f64"] = float64_loop(q, k, v, g, beta, state, mask)
    else:
        want = _gpu_backend(backend).gated_delta_update_kernel(*args)
        mx.eval(want)
        refs["fused"] = (np.array(want[0].astype(mx.float32)), np.array(want[1]))
    base = cl.gated_delta_update_chunk_kernel(*args, backend=backend, split=True)
    mx.eval(base)
    return args, refs, base


def _variant_row(name, f, backend, args, refs, base, exact=True, strict=False, **kw) -> dict:
    """A variant f of the split path on a `_check_case`: its `_row` against the references and,
    where `exact`, "equal to default" (y and state bit for bit the default's; `strict`: "ok"
    only then); a variant that does not build or run: a row that says so (ok None)."""
    T, dtype = args[0].shape[1], args[0].dtype
    try:
        y, s = f(*args, backend=backend, split=True, **kw)
        mx.eval(y, s)
        row = _row(name, T, 32, dtype, y, s, refs)
        if exact:
            row["equal to default"] = bool(
                mx.array_equal(y, base[0], equal_nan=True).item()
                and mx.array_equal(s, base[1], equal_nan=True).item()
            )
            if strict:
                row["ok"] = row["ok"] and row["equal to default"]
            print(f"    {name}: y and state equal to the default's: {row['equal to default']}")
        return row
    except Exception as e:  # a variant that does not build: say so, go on
        print(f"  {name}: did not build or run: {str(e)[:300]}", flush=True)
        return {"check": name, "T": T, "ok": None, "error": str(e)[:300]}


def ab6_checks(backend: str) -> list[dict]:
    """--ab6's checks: each AB6_VARIANTS entry (and "vx bv32") against the default build (bit
    for bit where exact) and the references."""
    rows = []
    split = cl.gated_delta_update_chunk_kernel
    for T, dtype in ((200, mx.float32), (2048, mx.float32), (2048, mx.bfloat16)):
        args, refs, base = _check_case(backend, T, dtype)
        rows.append(_row("split", T, 32, dtype, *base, refs))
        # "vx lb4" forces the state pass's ring of four slices of 64: 16-bit pieces only (fp32's
        # would not fit 48 KB)
        variants = [
            (n, patched(split, **sw), ex, {})
            for n, (sw, ex) in AB6_VARIANTS.items()
            if n != "vx lb4" or dtype != mx.float32
        ]
        variants.append(("vx bv32", patched(split, **VX), False, {"bv": 32}))
        for name, f, exact, kw in variants:
            rows.append(_variant_row(name, f, backend, args, refs, base, exact, strict=exact, **kw))
    return rows


def ab6_state_stamps(
    backend: str, ts=(8192, 32768), hv: int = 32, h3: int | None = None
) -> list[dict]:
    """--ab6: the state pass H2_BODY stamped (chunk_source.H2_STAMPS: one sampled chunk a
    threadgroup, n = N / 2) at each T (B 1, bf16): H, Vn and the state against the plain build's
    (must be equal), then the phases of the sampled chunk (chunk_stamps.summarize). h3 (--ab7):
    H3_BODY with that many warps a threadgroup instead (chunk_source.H3_STAMPS)."""
    from qwen35_mlx.kernels.gated_delta import chunk_source as cs

    anchors = cs.H3_STAMPS if h3 else cs.H2_STAMPS
    h_pass = patched(cl.h_pass, H3=h3)
    rows = []
    for T in ts:
        q, k, v, a, b, A_log, dt_bias, state0 = _mlx_inputs(Shape(1, T, hv))
        W, U, Kw, gts = cl.wy_pass(
            backend, k, v, None, None, None, raw_gates=(a, b, A_log, dt_bias)
        )
        plain = h_pass(backend, W, U, Kw, gts, state0)
        stamped = partial(h_pass, backend, W, U, Kw, gts, state0, stamps=True)
        label = "state h3" if h3 else "state"
        span = "U rows .. update"
        rows.append(_stamped_row(T, hv, plain, stamped, anchors, "state pass", label, span))
    return rows


def _stamped_row(T, hv, plain, stamped, anchors, what: str, label: str, span: str) -> dict:
    """A stamped pass at T: `stamped()` (its outputs, then the stamps) run three times, its
    outputs against the plain build's `plain` ("same": must be equal), then the sampled chunk's
    phases (chunk_stamps.summarize; `anchors` the body's stamps) printed: the table as `label`,
    one chunk's cycles (the phases but the first and last, named `span`). `what` names the pass;
    one that does not build or run is printed and the row has no stamps (the timings still
    run)."""
    from chunk_stamps import summarize
    from chunk_stamps import table as stamp_table

    mx.eval(plain)
    row = {"T": T, "Hv": hv, "same": None}
    try:
        for _ in range(3):
            st = stamped()
            mx.eval(st)
        n = len(plain)
        row["same"] = all(
            mx.array_equal(x, z, equal_nan=True).item() for x, z in zip(plain, st[:n], strict=True)
        )
        print(f"  T={T} stamped {what} equal to the plain build: {row['same']}")
        r = summarize(np.array(st[n]), [x[0] for x in anchors])
        per_chunk = sum(r["phases"][x[0]]["median"] for x in anchors[1:-1])
        print(stamp_table(label, T, r), flush=True)
        print(f"    one chunk (medians, {span}): {per_chunk:.0f} cycles", flush=True)
        row["stamps"], row["chunk_cycles"] = r, per_chunk
    except Exception as e:  # the timings still run
        print(f"  stamped {what} did not build or run: {str(e)[:500]}", flush=True)
    return row


# --ab6's last step: the state pass's ring in dynamic shared memory (chunk_launch.H2_DYN), a
# launch path (MLX's cuda_kernel shared_memory= above 48 KB) new here, so it runs after
# everything else has been printed and written.
DYN = {"dyn3": (128, 3), "dyn4": (128, 4)}


def ab6_dyn(backend: str, ts=(8192, 32768), hv: int = 32) -> dict:
    """H2_DYN with H2_VX: y and state against the default build's at T 2048 (bf16, B 2, masked;
    must be equal bit for bit), then the state pass and the split path timed beside the static
    ring's."""
    out = {"same": {}, "times": []}
    split = cl.gated_delta_update_chunk_kernel
    q, k, v, a, b, A_log, dt_bias, state, mask = inputs(2, 2048, hv, mx.bfloat16)
    args = (q, k, v, a, b, A_log, dt_bias, state, mask)
    base = split(*args, backend=backend, split=True)
    mx.eval(base)
    for name, tiles in DYN.items():
        try:
            y, s = patched(split, **VX, H2_DYN=tiles)(*args, backend=backend, split=True)
            mx.eval(y, s)
            same = bool(
                mx.array_equal(y, base[0], equal_nan=True).item()
                and mx.array_equal(s, base[1], equal_nan=True).item()
            )
        except Exception as e:  # MLX without dynamic shared memory past 48 KB: say so
            print(f"  vx {name}: did not build or run: {str(e)[:300]}", flush=True)
            same = None
        out["same"][name] = same
        print(f"  vx {name}: y and state equal to the default build's: {same}", flush=True)
    if not any(out["same"].values()):
        return out
    for T in ts:
        base_t = _timers(backend, Shape(1, T, hv), {})
        timers = {"state vx": patched(base_t["state"], H2_VX=True)}
        timers |= {"split vx": patched(base_t["split"], **VX)}
        for name, tiles in DYN.items():
            if out["same"][name]:
                timers[f"state vx {name}"] = patched(base_t["state"], H2_VX=True, H2_DYN=tiles)
                timers[f"split vx {name}"] = patched(base_t["split"], **VX, H2_DYN=tiles)
        n = max(2, min(50, 65536 // T))
        best = {}
        for r in range(4):
            for name, run in timers.items():
                t = run(n) / n * 1e3
                if r:  # round 0 warms up
                    best[name] = min(best.get(name, float("inf")), t)
        out["times"].append({"T": T, "ms": best})
        print(f"  T={T:6d} " + "  ".join(f"{k} {x:.3f}" for k, x in best.items()), flush=True)
        pred = PREDICTED_DYN.get(T, {})
        print("  predicted: " + "  ".join(f"{k} {x:.2f}" for k, x in pred.items()), flush=True)
    return out


PREDICTED_DYN = {
    8192: {"state vx dyn3": 0.33, "state vx dyn4": 0.33, "split vx dyn3": 1.03},
    32768: {"state vx dyn3": 1.25, "state vx dyn4": 1.22, "split vx dyn3": 3.83},
}


def ab6_times(backend: str, ts=(8192, 32768), hv: int = 32) -> list[dict]:
    """--ab6's timings (B 1, bf16): the passes and the split path, default and with the
    variants, FLA's chunk kernel beside."""
    fla = {c.name: c for c in _fla_contenders() if c.name.startswith("fla chunk")}
    rows = []
    for T in ts:
        # _timers' run(n) functions; patched(run) builds run's graph with the switches set
        base = _timers(backend, Shape(1, T, hv), fla)
        timers = {
            "split": base["split"],
            "split v16": patched(base["split"], WY2_V16=True),
            "split vx": patched(base["split"], **VX),
            "split vx lb4": patched(base["split"], **VX, **BEST_LB4),
            "split vx o3": patched(base["split"], **VX, **OUT3),
            "wy": base["wy"],
            "wy v16": patched(base["wy"], WY2_V16=True),
            "wy vx": patched(base["wy"], WY2_VX=True),
            "state": base["state"],
            "state vx": patched(base["state"], H2_VX=True),
            "state bv32": base.get("state bv32"),
            "out": base["out"],
            "out vx": patched(base["out"], O2_VX=True),
            "out vx lb3": patched(base["out"], O2_VX=True, **OUT3),
            "fla chunk": base.get("fla chunk"),
        }
        rows.append(_predicted_row(timers, T, hv, PREDICTED_AB6))
    return rows


# --ab7 (round 7, helper chunk7): BEST7, the best measured variant of each pass together (the
# 21:01 UTC --ab6 run: wy vx, the state pass at 32 value rows, out vx at three threadgroups an SM;
# the same arithmetic as the defaults, so the same outputs bit for bit), and the state pass as
# H3_BODY (one warp a chain of 16 value rows; H3 warps a threadgroup, a ring of H3_NB chunks).
BEST7 = {"WY2_VX": True, "O2_VX": True, "H_BV": 32, **OUT3}
AB7_VARIANTS = {
    "best7": BEST7,
    "h3": {"H3": 4},
    "h3 w2": {"H3": 2},
    "h3 nb3": {"H3": 4, "H3_NB": 3},
    "best7 h3": {**BEST7, "H3": 4},
    "best7 l32": {**BEST7, "LDSM32": True},
}
# Predicted ms (benchmarks/NOTES.md "Split chunk kernels, round 7"), H200, Hv 32, bf16; the plain
# rows and "state bv32" are the 21:01 UTC --ab6 measurements.
PREDICTED_AB7 = {
    8192: {"split": 1.343, "split best7": 1.24, "split best7 h3": 0.98, "split best7 h3w2": 0.93,
           "split best7 h3w2 l32": 0.88, "wy vx": 0.386, "wy vx l32": 0.365, "out vx lb3": 0.437,
           "out vx lb3 l32": 0.40, "state": 0.433, "state bv32": 0.417, "state bv32 l32": 0.40,
           "state h3": 0.16, "state h3 w2": 0.11, "state h3 nb3": 0.155, "state h3 w2 nb3": 0.105,
           "fla chunk": 0.703},
    32768: {"split": 5.044, "split best7": 4.58, "split best7 h3": 3.62, "split best7 h3w2": 3.45,
            "split best7 h3w2 l32": 3.23, "wy vx": 1.357, "wy vx l32": 1.28, "out vx lb3": 1.693,
            "out vx lb3 l32": 1.55, "state": 1.665, "state bv32": 1.528, "state bv32 l32": 1.47,
            "state h3": 0.57, "state h3 w2": 0.40, "state h3 nb3": 0.55, "state h3 w2 nb3": 0.38,
            "fla chunk": 2.288},
}  # fmt: skip


def ab7_checks(backend: str) -> list[dict]:
    """--ab7's checks: each AB7_VARIANTS entry against the default build and the references, at
    T 200 (fp32), 2048 (fp32, bf16), B 2 with a left-padded row and a hole, raw gates. "equal to
    default": y and state bit for bit the default's (expected for every variant: the same
    arithmetic; H3 computes Xw^T = S W^T, A and B of each product swapped, which the tensor cores
    may sum in another order, so a difference there is reported, and only the tolerance fails)."""
    rows = []
    split = cl.gated_delta_update_chunk_kernel
    for T, dtype in ((200, mx.float32), (2048, mx.float32), (2048, mx.bfloat16)):
        args, refs, base = _check_case(backend, T, dtype)
        rows.append(_row("split", T, 32, dtype, *base, refs))
        for name, sw in AB7_VARIANTS.items():
            rows.append(_variant_row(name, patched(split, **sw), backend, args, refs, base))
    return rows


def ab7_times(backend: str, ts=(8192, 32768), hv: int = 32) -> list[dict]:
    """--ab7's timings (B 1, bf16): the split path and the state pass, default, BEST7 and H3,
    FLA's chunk kernel beside, the predictions printed."""
    fla = {c.name: c for c in _fla_contenders() if c.name.startswith("fla chunk")}
    rows = []
    for T in ts:
        base = _timers(backend, Shape(1, T, hv), fla)
        timers = {
            "split": base["split"],
            "split best7": patched(base["split"], **BEST7),
            "split best7 h3": patched(base["split"], **BEST7, H3=4),
            "split best7 h3w2": patched(base["split"], **BEST7, H3=2),
            "split best7 h3w2 l32": patched(base["split"], **BEST7, H3=2, LDSM32=True),
            "wy vx": patched(base["wy"], WY2_VX=True),
            "wy vx l32": patched(base["wy"], WY2_VX=True, LDSM32=True),
            "out vx lb3": patched(base["out"], O2_VX=True, **OUT3),
            "out vx lb3 l32": patched(base["out"], O2_VX=True, **OUT3, LDSM32=True),
            "state": base["state"],
            "state bv32": base.get("state bv32"),
            "state bv32 l32": patched(base["state bv32"], LDSM32=True)
            if "state bv32" in base
            else None,
            "state h3": patched(base["state"], H3=4),
            "state h3 w2": patched(base["state"], H3=2),
            "state h3 nb3": patched(base["state"], H3=4, H3_NB=3),
            "state h3 w2 nb3": patched(base["state"], H3=2, H3_NB=3),
            "fla chunk": base.get("fla chunk"),
        }
        rows.append(_predicted_row(timers, T, hv, PREDICTED_AB7))
    return rows


# --ab8 (round 8, helper chunk8): FUSE_Y, the output pass's Y = q H[n]^T computed by the state
# pass H3 (h3y: q rows in its ring, Y^T = S q^T from the same Sb as Xw^T, Y written fp32 instead
# of H) and the output pass starting from it (o2y: q and k staged, half its products); FUSE_O,
# one pass over the chunks for the state and y (o2p: P = D o q k^T a chunk and head; h3o: H3Y
# with P and the gates in its ring, y made and written there). The same arithmetic: y and the
# state must equal the default's bit for bit.
AB8_VARIANTS = {
    "fy": {"FUSE_Y": True},
    "fy lb4": {"FUSE_Y": True, "MIN_BLOCKS": {**cl.MIN_BLOCKS, "o2": 4}},
    "fy h3w4": {"FUSE_Y": True, "H3": 4},
    "fo": {"FUSE_O": True},
    "fo h3w4": {"FUSE_O": True, "H3": 4},
    "fo nb3": {"FUSE_O": True, "H3_NB": 3},
    "fo early": {"FUSE_O": True, "H3O_EARLY": True},
}
# Predicted ms (benchmarks/NOTES.md "Split chunk kernels, round 8"), H200, Hv 32, bf16; the
# plain rows are the 2026-12-02 21:59 UTC --ab7 measurements of today's defaults (round 7).
PREDICTED_AB8 = {
    8192: {"split": 0.989, "split fy": 0.91, "split fy lb4": 0.92, "split fy h3w4": 0.94,
           "split fo": 0.81, "split fo h3w4": 0.85, "split fo nb3": 0.80, "split fo early": 0.78,
           "state": 0.242, "state fo early": 0.35,
           "state fy": 0.29, "state fo": 0.38, "out": 0.40, "out fy": 0.27, "out fy lb4": 0.28,
           "p fo": 0.08, "fla chunk": 0.761},
    32768: {"split": 3.770, "split fy": 3.45, "split fy lb4": 3.50, "split fy h3w4": 3.55,
            "split fo": 2.95, "split fo h3w4": 3.1, "split fo nb3": 2.9, "split fo early": 2.85,
            "state": 0.853, "state fo early": 1.25,
            "state fy": 1.03, "state fo": 1.35, "out": 1.55, "out fy": 1.05, "out fy lb4": 1.10,
            "p fo": 0.30, "fla chunk": 2.305},
}  # fmt: skip


def _yi_reference(q, H, Hv: int) -> mx.array:
    """q H[n]^T in fp32 ([B * Hv, N, Dv, C], as FUSE_Y's Yi): q's rows past T are its last row."""
    B, T, Hk, Dk = q.shape
    BH, N, Dv, _ = H.shape
    C = cl.CHUNK
    qp = mx.concatenate([q, mx.repeat(q[:, -1:], N * C - T, axis=1)], axis=1) if N * C > T else q
    qp = qp.astype(mx.float32).reshape(B, N, C, Hk, Dk).transpose(0, 3, 1, 2, 4)
    qp = mx.repeat(qp, Hv // Hk, axis=1).reshape(BH, N, C, Dk)
    return mx.swapaxes(qp @ mx.swapaxes(H.astype(mx.float32), -1, -2), -1, -2)


def ab8_checks(backend: str) -> list[dict]:
    """--ab8's checks (bf16, B 2 with a left-padded row and a hole, raw gates; T 1000: rows past
    T in the last chunk): each AB8_VARIANTS entry's y and state equal to the default build's bit
    for bit ("equal to default") and within bf16's tolerance of the fused kernel; at T 2048 the
    passes alone: h3y's Vn and state equal to the default state pass's, its Yi = q H[n]^T (fp32
    matmul of the default pass's H, fp32's tolerance), o2y's y equal to the default's."""
    rows = []
    split = cl.gated_delta_update_chunk_kernel
    for T in (1000, 2048):
        args, refs, base = _check_case(backend, T, mx.bfloat16)
        q, k, v, a, b, A_log, dt_bias, state, mask = args
        rows.append(_row("split", T, 32, mx.bfloat16, *base, refs))
        for name, sw in AB8_VARIANTS.items():
            f = patched(split, **sw)
            rows.append(_variant_row(name, f, backend, args, refs, base, strict=True))
        if T != 2048:
            continue
        try:
            W, U, Kw, gts = cl.wy_pass(
                backend, k, v, None, None, mask, raw_gates=(a, b, A_log, dt_bias)
            )
            H, Vn, s = cl.h_pass(backend, W, U, Kw, gts, state)
            y = cl.o_pass(backend, q, k, gts, H, Vn, T, 32, v.dtype)
            Yi, Vn2, s2 = cl.h3y_pass(W, U, Kw, gts, state, q, cl.H3)
            y2 = cl.o2y_pass(q, k, gts, Yi, Vn2, T, 32)
            ref = _yi_reference(q, H, 32)
            mx.eval(H, Vn, s, y, Yi, Vn2, s2, y2, ref)
            row = {
                "check": "fy passes",
                "T": T,
                "Vn equal": bool(mx.array_equal(Vn, Vn2).item()),
                "state equal": bool(mx.array_equal(s, s2).item()),
                "y equal": bool(mx.array_equal(y, y2).item()),
                "Yi vs q H^T": rel_err(np.array(Yi), np.array(ref)),
            }
            row["ok"] = (
                row["Vn equal"] and row["state equal"] and row["y equal"]
                and row["Yi vs q H^T"] <= RTOL[mx.float32]
            )  # fmt: skip
            print(
                f"  fy passes T={T}: "
                + "  ".join(f"{k} {x}" for k, x in row.items() if k not in ("check", "T"))
            )
            rows.append(row)
        except Exception as e:
            print(f"  fy passes: did not build or run: {str(e)[:300]}", flush=True)
            rows.append({"check": "fy passes", "T": T, "ok": None, "error": str(e)[:300]})
    return rows


def _fy_timers(backend: str, shape: Shape) -> dict:
    """FUSE_Y's passes alone at shape (B 1, bf16): "state fy" (h3y), "out fy" (o2y on the
    state pass's Yi, Vn; also at four threadgroups an SM); FUSE_O's: "p fo" (o2p), "state fo"
    (h3o on o2p's P)."""
    T, hv = shape.T, shape.Hv
    q, k, v, a, b, A_log, dt_bias, state0 = _mlx_inputs(shape)
    W, U, Kw, gts = cl.wy_pass(backend, k, v, None, None, None, raw_gates=(a, b, A_log, dt_bias))
    Yi, Vn, _ = cl.h3y_pass(W, U, Kw, gts, state0, q, cl.H3)
    mx.eval(W, U, Kw, gts, Yi, Vn)

    def state_fy(s):
        Yi_, Vn_, s2 = cl.h3y_pass(W, U, Kw, gts, s, q, cl.H3)
        return (Yi_, Vn_), s2

    def out_fy(s):
        return cl.o2y_pass(q, k, gts, Yi, Vn, T, hv), s

    def p_fo(s):
        return cl.o2p_pass(q, k, gts, T, hv, U.dtype), s

    fy = {
        "state fy": state_fy,
        "out fy": out_fy,
        "out fy lb4": bounded(out_fy, {**cl.MIN_BLOCKS, "o2": 4}),
    }
    try:
        P = cl.o2p_pass(q, k, gts, T, hv, U.dtype)
        mx.eval(P)

        def state_fo(s):
            return cl.h3o_pass(W, U, Kw, gts, s, q, P, cl.H3)

        fy |= {
            "p fo": p_fo,
            "state fo": state_fo,
            "state fo early": patched(state_fo, H3O_EARLY=True),
        }
    except Exception as e:  # FUSE_O's P pass does not build: FUSE_Y's rows still run
        print(f"  p fo: did not build or run: {str(e)[:300]}", flush=True)
    return {n: (lambda n_, f=f: chained(f, state0, n_)) for n, f in fy.items()}


def ab8_times(backend: str, ts=(8192, 32768), hv: int = 32) -> list[dict]:
    """--ab8's timings (B 1, bf16): the split path default and with FUSE_Y (its variants), the
    state and output passes alone (default: H3 / O2_VX; "fy": h3y / o2y), FLA's chunk kernel
    beside, the predictions printed."""
    fla = {c.name: c for c in _fla_contenders() if c.name.startswith("fla chunk")}
    rows = []
    for T in ts:
        shape = Shape(1, T, hv)
        base = _timers(backend, shape, fla)
        try:
            fy = _fy_timers(backend, shape)
        except Exception as e:  # the passes do not build: the split rows say the rest
            print(f"  state fy / out fy: did not build or run: {str(e)[:300]}", flush=True)
            fy = {}
        timers = {
            "split": base["split"],
            **{f"split {n}": patched(base["split"], **sw) for n, sw in AB8_VARIANTS.items()},
            "state": base["state"],
            "out": base["out"],
            **fy,
            "fla chunk": base.get("fla chunk"),
        }
        rows.append(_predicted_row(timers, T, hv, PREDICTED_AB8))
    return rows


def ab8_h3o_stamps(backend: str, ts=(8192, 32768), hv: int = 32) -> list[dict]:
    """--ab8's last step: H3O (FUSE_O's state pass) stamped (chunk_source.H3O_STAMPS: one
    sampled chunk a threadgroup, n = N / 2) at each T (B 1, bf16): y and the state against the
    plain build's (must be equal), then the phases of the sampled chunk."""
    from qwen35_mlx.kernels.gated_delta import chunk_source as cs

    anchors = cs.H3O_STAMPS
    rows = []
    for T in ts:
        q, k, v, a, b, A_log, dt_bias, state0 = _mlx_inputs(Shape(1, T, hv))
        W, U, Kw, gts = cl.wy_pass(
            backend, k, v, None, None, None, raw_gates=(a, b, A_log, dt_bias)
        )
        P = cl.o2p_pass(q, k, gts, T, hv, U.dtype)
        plain = cl.h3o_pass(W, U, Kw, gts, state0, q, P, cl.H3)
        stamped = partial(cl.h3o_pass, W, U, Kw, gts, state0, q, P, cl.H3, stamps=True)
        span = "wait .. y stores"
        rows.append(_stamped_row(T, hv, plain, stamped, anchors, "H3O", "state fo", span))
    return rows


# --ab9 (round 9, helper chunk9): WY_P, FUSE_O's P = D o q k^T made by the WY pass (wy2p: q's
# slices staged beside k's, q k^T on the k k^T tiles, P written with L's decays), so the P pass
# goes; H3O_PRODUCERS, the state pass's copies issued by producer warps of their own (h3op). The
# same arithmetic: P, y and the state must equal the default's bit for bit.
AB9_VARIANTS = {
    "wyp": {"WY_P": True},
    "prod": {"H3O_PRODUCERS": True},
    "wyp prod": {"WY_P": True, "H3O_PRODUCERS": True},
    "wyp prod nb3": {"WY_P": True, "H3O_PRODUCERS": True, "H3_NB": 3},
    "wyp prody": {"WY_P": True, "H3O_PRODUCERS": 2},
    # the WY pass at four threadgroups an SM (64 registers: WY2P spills 24 bytes there)
    "wyp prody lb4": {"WY_P": True, "H3O_PRODUCERS": 2, "MIN_BLOCKS": {**cl.MIN_BLOCKS, "wy2p": 4}},
}
# Predicted ms (benchmarks/NOTES.md "Split chunk kernels, round 9"), H200, Hv 32, bf16; the
# plain rows are the 2026-12-03 04:07 UTC --ab8 measurements of today's defaults ("split fo
# early", "p fo", "state fo early"; "wy" = split - state - p there).
PREDICTED_AB9 = {
    8192: {"split": 0.873, "split wyp": 0.74, "split prod": 0.77, "split wyp prod": 0.63,
           "split wyp prod nb3": 0.62, "split wyp prody": 0.59, "state fo prody": 0.25,
           "split wyp prody lb4": 0.58,
           "wy": 0.296, "wy p": 0.34, "p fo": 0.18, "state fo": 0.397, "state fo prod": 0.29,
           "fla chunk": 1.236},
    32768: {"split": 3.120, "split wyp": 2.58, "split prod": 2.74, "split wyp prod": 2.20,
            "split wyp prod nb3": 2.15, "split wyp prody": 2.05, "state fo prody": 0.85,
            "split wyp prody lb4": 2.0,
            "wy": 1.044, "wy p": 1.20, "p fo": 0.694, "state fo": 1.382, "state fo prod": 1.00,
            "fla chunk": 2.455},
}  # fmt: skip


def _lower_tiles(P: mx.array) -> mx.array:
    """P's tiles at or below the diagonal ([B * Hv, N, C, C] -> the written elements; the tiles
    above are never written by O2P or WY2P, nor read)."""
    C, t = cl.CHUNK, 16
    lower = np.kron(np.tril(np.ones((C // t, C // t), bool)), np.ones((t, t), bool))
    return P.reshape(*P.shape[:2], C * C)[..., mx.array(np.flatnonzero(lower))]


def ab9_checks(backend: str) -> list[dict]:
    """--ab9's checks (bf16, B 2 with a left-padded row and a hole, raw gates; T 1000: rows past
    T in the last chunk): each AB9_VARIANTS entry's y and state equal to the default build's bit
    for bit and within bf16's tolerance of the fused kernel; at T 2048 the WY pass alone: WY2P's
    W, U, Kw, gates equal to WY2_VX's and its P to O2P's (the written tiles), bit for bit."""
    rows = []
    split = cl.gated_delta_update_chunk_kernel
    for T in (1000, 2048):
        args, refs, base = _check_case(backend, T, mx.bfloat16)
        q, k, v, a, b, A_log, dt_bias, state, mask = args
        rows.append(_row("split", T, 32, mx.bfloat16, *base, refs))
        for name, sw in AB9_VARIANTS.items():
            f = patched(split, **sw)
            rows.append(_variant_row(name, f, backend, args, refs, base, strict=True))
        if T != 2048:
            continue
        try:
            raw = (a, b, A_log, dt_bias)
            want = cl.wy_pass(backend, k, v, None, None, mask, raw_gates=raw)
            P = cl.o2p_pass(q, k, want[3], T, 32, v.dtype)
            got = cl.wy_pass(backend, k, v, None, None, mask, raw_gates=raw, q=q)
            mx.eval(want, P, got)
            row = {"check": "wy p pass", "T": T}
            for name, x, z in zip(("W", "U", "Kw", "gates"), got[:4], want, strict=True):
                row[f"{name} equal"] = bool(mx.array_equal(x, z).item())
            row["P equal"] = bool(mx.array_equal(_lower_tiles(got[4]), _lower_tiles(P)).item())
            row["ok"] = all(x for n, x in row.items() if n.endswith("equal"))
            print(
                f"  wy p pass T={T}: "
                + "  ".join(f"{k} {x}" for k, x in row.items() if k not in ("check", "T"))
            )
            rows.append(row)
        except Exception as e:
            print(f"  wy p pass: did not build or run: {str(e)[:300]}", flush=True)
            rows.append({"check": "wy p pass", "T": T, "ok": None, "error": str(e)[:300]})
    return rows


def _ab9_timers(backend: str, shape: Shape, fla) -> dict:
    """--ab9's timers at shape (B 1, bf16): the split path default and with each AB9_VARIANTS
    entry, the passes alone ("wy": WY2_VX, "wy p": WY2P, "p fo": O2P, "state fo": H3O, "state
    fo prod" / "prody": its producer-warp builds, the second writing y too), FLA's chunk
    kernel."""
    T, hv = shape.T, shape.Hv
    base = _timers(backend, shape, fla)
    q, k, v, a, b, A_log, dt_bias, state0 = _mlx_inputs(shape)
    raw = (a, b, A_log, dt_bias)
    W, U, Kw, gts = cl.wy_pass(backend, k, v, None, None, None, raw_gates=raw)
    P = cl.o2p_pass(q, k, gts, T, hv, U.dtype)
    mx.eval(W, U, Kw, gts, P)
    passes = {
        "wy p": lambda s: (cl.wy_pass(backend, k, v, None, None, None, raw_gates=raw, q=q), s),
        "p fo": lambda s: (cl.o2p_pass(q, k, gts, T, hv, U.dtype), s),
        "state fo": lambda s: cl.h3o_pass(W, U, Kw, gts, s, q, P, cl.H3),
    }
    passes["state fo prod"] = patched(passes["state fo"], H3O_PRODUCERS=True)
    passes["state fo prody"] = patched(passes["state fo"], H3O_PRODUCERS=2)
    return {
        "split": base["split"],
        **{f"split {n}": patched(base["split"], **sw) for n, sw in AB9_VARIANTS.items()},
        "wy": base["wy"],
        **{n: (lambda n_, f=f: chained(f, state0, n_)) for n, f in passes.items()},
        "fla chunk": base.get("fla chunk"),
    }


def ab9_times(backend: str, ts=(8192, 32768), hv: int = 32) -> list[dict]:
    """--ab9's timings (B 1, bf16) at each T (_ab9_timers), the predictions printed."""
    fla = {c.name: c for c in _fla_contenders() if c.name.startswith("fla chunk")}
    return [_predicted_row(_ab9_timers(backend, Shape(1, T, hv), fla), T, hv, PREDICTED_AB9)
            for T in ts]  # fmt: skip


def ab9_producer_stamps(backend: str, ts=(8192, 32768), hv: int = 32) -> list[dict]:
    """--ab9's last step: H3O's producer builds stamped (chunk_source.H3OP_STAMPS /
    H3OPY_STAMPS: one sampled chunk a threadgroup, n = N / 2, a computing warp's clock) at each
    T (B 1, bf16): y and the state against the plain producer build's (must be equal), then the
    phases of the sampled chunk."""
    from qwen35_mlx.kernels.gated_delta import chunk_source as cs

    rows = []
    for T in ts:
        q, k, v, a, b, A_log, dt_bias, state0 = _mlx_inputs(Shape(1, T, hv))
        W, U, Kw, gts = cl.wy_pass(
            backend, k, v, None, None, None, raw_gates=(a, b, A_log, dt_bias)
        )
        P = cl.o2p_pass(q, k, gts, T, hv, U.dtype)
        for level, anchors, label in ((1, cs.H3OP_STAMPS, "state fo prod"),
                                      (2, cs.H3OPY_STAMPS, "state fo prody")):  # fmt: skip
            h3o = patched(cl.h3o_pass, H3O_PRODUCERS=level)
            plain = h3o(W, U, Kw, gts, state0, q, P, cl.H3)
            stamped = partial(h3o, W, U, Kw, gts, state0, q, P, cl.H3, stamps=True)
            row = _stamped_row(T, hv, plain, stamped, anchors, label, label, "wait .. y")
            rows.append(row | {"check": label})
    return rows


# --ab10 (round 10, helper chunk10): H3O_SPLIT, the state pass (H3O_PRODUCERS = 1's build) with
# each 16 value rows shared by two computing warps (h3ops: a warp's two chunk row tiles and half
# of the state's key tiles, one named barrier of the pair a chunk). The same products in the
# same order: y and the state must equal the default's bit for bit.
# (Since session 15 the default is H3O_PRODUCERS = 2 with the WY_P build at four threadgroups an
# SM; H3O_SPLIT varies H3O_PRODUCERS = 1's build, so every variant sets that.)
AB10_VARIANTS = {
    "ps": {"H3O_PRODUCERS": 1, "H3O_SPLIT": True},
    "ps nb2": {"H3O_PRODUCERS": 1, "H3O_SPLIT": True, "H3_NB": 2},
    # beside it, the WY pass (now ~70% of the path) at three threadgroups an SM (round 9's)
    "ps lb3": {"H3O_PRODUCERS": 1, "H3O_SPLIT": True, "MIN_BLOCKS": {**cl.MIN_BLOCKS, "wy2p": 3}},
}
AB10_STATE = ("ps", "ps nb2")  # the variants whose state pass is timed alone
# Predicted ms (benchmarks/NOTES.md "Split chunk kernels, round 10"), H200, bf16. "split" at Hv
# 32 is the 2026-12-03 10:59 UTC --ab9 measurement of round 9's "split wyp prod nb3" (the lead's
# later default, prody lb4, measured 2.489 at 11:38; "ps lb3" predicted from "ps lb4"'s);
# "state" there was measured at a ring of two (1.183 / 0.333 ms, "state fo prod"), the ring of
# three's 0.06 ms off it here.
PREDICTED_AB10 = {
    (8192, 32): {"split": 0.733, "split ps": 0.65, "split ps nb2": 0.66, "split ps lb3": 0.66,
                 "state": 0.32, "state ps": 0.24, "state ps nb2": 0.25, "fla chunk": 1.204},
    (32768, 32): {"split": 2.625, "split ps": 2.30, "split ps nb2": 2.34, "split ps lb3": 2.34,
                  "state": 1.12, "state ps": 0.80, "state ps nb2": 0.83, "fla chunk": 2.420},
    (32768, 16): {"split": 1.8, "split ps": 1.5},
    (32768, 64): {"split": 5.2, "split ps": 4.5},
}  # fmt: skip


def ab10_checks(backend: str) -> list[dict]:
    """--ab10's checks (bf16, B 2 with a left-padded row and a hole, raw gates; T 1000: rows
    past T in the last chunk): each AB10_VARIANTS entry's y and state equal to the default
    build's bit for bit and within bf16's tolerance of the fused kernel."""
    rows = []
    split = cl.gated_delta_update_chunk_kernel
    for T in (1000, 2048):
        args, refs, base = _check_case(backend, T, mx.bfloat16)
        rows.append(_row("split", T, 32, mx.bfloat16, *base, refs))
        for name, sw in AB10_VARIANTS.items():
            f = patched(split, **sw)
            rows.append(_variant_row(name, f, backend, args, refs, base, strict=True))
    return rows


def _ab10_timers(backend: str, shape: Shape, fla, passes: bool = True) -> dict:
    """--ab10's timers at shape (B 1, bf16): the split path default and with each AB10_VARIANTS
    entry, the state pass alone (default "state" and AB10_STATE's; where passes), FLA's chunk
    kernel."""
    base = _timers(backend, shape, fla)
    timers = {
        "split": base["split"],
        **{f"split {n}": patched(base["split"], **sw) for n, sw in AB10_VARIANTS.items()},
    }
    if passes:
        q, k, v, a, b, A_log, dt_bias, state0 = _mlx_inputs(shape)
        raw = (a, b, A_log, dt_bias)
        W, U, Kw, gts, P = cl.wy_pass(backend, k, v, None, None, None, raw_gates=raw, q=q)
        mx.eval(W, U, Kw, gts, P)

        def state(s):
            return cl.h3o_pass(W, U, Kw, gts, s, q, P, cl.H3)

        timers["state"] = lambda n_: chained(state, state0, n_)
        for name in AB10_STATE:
            f = patched(state, **AB10_VARIANTS[name])
            timers[f"state {name}"] = lambda n_, f=f: chained(f, state0, n_)
    return timers | {"fla chunk": base.get("fla chunk")}


def ab10_times(backend: str, shapes=((8192, 32), (32768, 32))) -> list[dict]:
    """--ab10's timings (B 1, bf16) at each (T, Hv) (_ab10_timers; the passes alone at Hv 32),
    the predictions printed."""
    fla = {c.name: c for c in _fla_contenders() if c.name.startswith("fla chunk")}
    rows = []
    for T, hv in shapes:
        timers = _ab10_timers(backend, Shape(1, T, hv), fla, passes=hv == 32)
        pred = {T: PREDICTED_AB10.get((T, hv), {})}
        rows.append(_predicted_row(timers, T, hv, pred))
    return rows


def ab10_split_stamps(backend: str, ts=(8192, 32768), hv: int = 32) -> list[dict]:
    """--ab10's stamps: H3O_SPLIT's build stamped (chunk_source.H3OPS_STAMPS: one sampled chunk
    a threadgroup, n = N / 2, half 0 of pair 0's clock) at each T (B 1, bf16): y and the state
    against the plain split build's (must be equal), then the phases of the sampled chunk."""
    from qwen35_mlx.kernels.gated_delta import chunk_source as cs

    rows = []
    h3o = patched(cl.h3o_pass, H3O_PRODUCERS=1, H3O_SPLIT=True)
    for T in ts:
        q, k, v, a, b, A_log, dt_bias, state0 = _mlx_inputs(Shape(1, T, hv))
        raw = (a, b, A_log, dt_bias)
        W, U, Kw, gts, P = cl.wy_pass(backend, k, v, None, None, None, raw_gates=raw, q=q)
        plain = h3o(W, U, Kw, gts, state0, q, P, cl.H3)
        stamped = partial(h3o, W, U, Kw, gts, state0, q, P, cl.H3, stamps=True)
        label = "state fo ps"
        row = _stamped_row(T, hv, plain, stamped, cs.H3OPS_STAMPS, label, label, "wait .. y")
        rows.append(row | {"check": label})
    return rows


def _ab_round(args, backend: str, tag: str, what: str, checks_of, times_of, last: tuple) -> int:
    """One round's A/B (--ab8, --ab9, --ab10): `checks_of(backend)` (printed, written to the JSON
    at once), then `times_of(backend, ts=(T,))` at T 8192 and 32768 (the JSON rewritten after
    each: a time limit keeps what ran), then each (title, step, key) of `last`: step(backend)'s
    rows under key (a step that fails is printed; what ran before is kept; stamped rows' "same"
    must not be False). Exit status 1 if a check failed."""
    print(f"1. {what} against the default build and the fused kernel", flush=True)
    checks = checks_of(backend)
    path, info = write_result(args.out, tag, backend, {"checks": checks, "times": []})
    print("2. timing (bf16, B=1, Hk=16, Hv=32, Dk=Dv=128)", flush=True)
    for T in (8192, 32768):
        info["times"] += times_of(backend, ts=(T,))
        path.write_text(json.dumps(info, indent=1))
    for i, (title, step, key) in enumerate(last, 3):
        print(f"{i}. {title}", flush=True)
        try:
            info[key] = step(backend)
        except Exception as e:  # everything above is printed and written already
            print(f"  {key} step failed: {str(e)[:500]}", flush=True)
            info[key] = []
        path.write_text(json.dumps(info, indent=1))
    bad = [f"{r['check']} T={r['T']}" for r in checks if not r["ok"]]
    bad += [
        f"{r.get('check', 'state fo')} stamped T={r['T']}"
        for _, _, key in last
        for r in info[key]
        if r.get("same") is False
    ]
    print(f"{tag} checks: {len(checks) - len(bad)} ok" + (f", FAILED: {bad}" if bad else ""))
    return 1 if bad else 0


def time_shapes(backend: str, ts, hv: int, quick: bool = False, ab: bool = False) -> list[dict]:
    fla = {c.name: c for c in _fla_contenders() if c.name.startswith("fla chunk")}
    rows = []
    for T in ts:
        rows.append(_best_of_three(_timers(backend, Shape(1, T, hv), fla, quick, ab), T, hv))
    return rows


def _best_of_three(timers: dict, T: int, hv: int) -> dict:
    """Each timer warmed up once (compile, caches, autotune; one that does not build or run is
    dropped and named), then the best of three rounds of n calls, alternating the contenders:
    the row {"T", "Hv", "n", "ms": {name: ms a call}}, printed."""
    n = max(2, min(50, 65536 // T))
    for name, run in list(timers.items()):
        try:
            run(1)
        except Exception as e:  # an experimental variant that does not build: drop it
            print(f"  {name}: did not build or run: {str(e)[:300]}", flush=True)
            del timers[name]
    best = {}
    for _ in range(3):
        for name, run in timers.items():
            best[name] = min(best.get(name, float("inf")), run(n) / n * 1e3)
    print(f"  T={T:6d} " + "  ".join(f"{k} {x:.3f}" for k, x in best.items()), flush=True)
    return {"T": T, "Hv": hv, "n": n, "ms": best}


def _predicted_row(timers: dict, T: int, hv: int, predicted: dict) -> dict:
    """--ab6 / --ab7 / --ab8's row at T: `_best_of_three` of the timers (None ones left out),
    the split rows over FLA's chunk kernel where it ran, and the predictions for T printed."""
    timers = {name: run for name, run in timers.items() if run is not None}
    row = _best_of_three(timers, T, hv)
    best = row["ms"]
    if "fla chunk" in best:
        ratios = {k: x / best["fla chunk"] for k, x in best.items() if k.startswith("split")}
        print("    / fla chunk: " + "  ".join(f"{k} {x:.2f}x" for k, x in ratios.items()))
    pred = predicted.get(T, {})
    print("  predicted: " + "  ".join(f"{k} {x:.2f}" for k, x in pred.items()), flush=True)
    return row


def table(rows, predicted=None) -> str:
    predicted = PREDICTED if predicted is None else predicted
    names = list(rows[0]["ms"])
    lines = [f"{'ms per call':16s}" + "".join(f"{n:>12s}" for n in names)]
    for r in rows:
        ms = r["ms"]
        lines.append(f"T={r['T']:<6d} Hv={r['Hv']:<3d} " + "".join(f"{ms[n]:12.3f}" for n in names))
        pred = predicted.get(r["T"], {}) if r["Hv"] == 32 else {}
        lines.append(
            f"{'  predicted':16s}"
            + "".join(f"{pred[n]:12.3f}" if n in pred else " " * 12 for n in names)
        )
        if "fla chunk" in ms:
            lines.append(
                f"{'  / fla chunk':16s}"
                + "".join(
                    f"{ms[n] / ms['fla chunk']:11.2f}x"
                    if n in ("fused", "split", "split bv32", "split unb", "split o2", "split old")
                    else " " * 12
                    for n in names
                )
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--no-check", action="store_true", help="timing only")
    p.add_argument(
        "--quick",
        action="store_true",
        help="< 90 s: checks at T 2048 only (fp32 vs float64, bf16 vs fused, bf16 also "
        "unbounded / r3 / bv32), timing at T 2048 and 8192",
    )
    p.add_argument(
        "--ab",
        action="store_true",
        help="< 4 min: round 4's new kernels against session 8's (checks at T 200 / 2048, timing "
        "at T 2048 / 8192 / 32768)",
    )
    p.add_argument(
        "--stamps",
        action="store_true",
        help="< 2 min, CUDA: round 5's stamped WY / output passes at T 8192 / 32768 (where a "
        "threadgroup's cycles go, threadgroups an SM, waves), and the split path with BEST3",
    )
    p.add_argument(
        "--ab6",
        action="store_true",
        help="< 3 min, CUDA: round 6's 16-byte variants (WY2_VX, H2_VX, O2_VX) checked bit for "
        "bit against the default build, then timed at T 8192 / 32768 beside FLA's chunk kernel",
    )
    p.add_argument(
        "--ab7",
        action="store_true",
        help="< 3 min, CUDA: round 7's BEST7 (each pass's best round-6 variant) and the state "
        "pass H3_BODY checked against the default build, then timed at T 8192 / 32768",
    )
    p.add_argument(
        "--ab8",
        action="store_true",
        help="< 3 min, CUDA: round 8's FUSE_Y / FUSE_O (the output pass's work in the state pass) "
        "checked "
        "bit for bit against the default build, then timed at T 8192 / 32768 beside FLA",
    )
    p.add_argument(
        "--ab9",
        action="store_true",
        help="< 2 min, CUDA: round 9's WY_P (FUSE_O's P made by the WY pass) and H3O_PRODUCERS "
        "(the state pass's copies by warps of their own) checked bit for bit against the "
        "default build, then timed at T 8192 / 32768 beside FLA",
    )
    p.add_argument(
        "--ab10",
        action="store_true",
        help="< 3 min, CUDA: round 10's H3O_SPLIT (the state pass's 16 value rows shared by two "
        "computing warps) checked bit for bit against the default build, then timed at T 8192 "
        "/ 32768 beside FLA (and at Hv 16 / 64)",
    )
    args = p.parse_args(argv)
    backend = cl.available_backend()
    if backend is None:
        raise SystemExit("chunk_split_gpu: needs MLX with a Metal or CUDA GPU")
    print(f"device {mx.default_device()} backend {backend} mlx {mx.__version__}", flush=True)
    if args.ab10:
        return _ab_round(
            args, backend, "ab10", "round 10's H3O_SPLIT", ab10_checks,
            lambda b, ts: ab10_times(b, shapes=[(T, 32) for T in ts]),
            (("the split build's phases (stamped, one chunk a threadgroup)", ab10_split_stamps,
              "stamps"),
             ("T 32768 at Hv 16 and 64", lambda b: ab10_times(b, ((32768, 16), (32768, 64))),
              "times_hv")),
        )  # fmt: skip
    if args.ab9:
        return _ab_round(
            args, backend, "ab9", "round 9's WY_P / H3O_PRODUCERS", ab9_checks, ab9_times,
            (("the producer builds' phases (stamped, one chunk a threadgroup)",
              ab9_producer_stamps, "stamps"),),
        )  # fmt: skip
    if args.ab8:
        return _ab_round(
            args, backend, "ab8", "round 8's FUSE_Y / FUSE_O", ab8_checks, ab8_times,
            (("H3O's phases (FUSE_O's state pass stamped, one chunk a threadgroup)",
              ab8_h3o_stamps, "stamps"),),
        )  # fmt: skip
    if args.ab7:
        print("1. round 7's variants against the default build and the references", flush=True)
        checks = ab7_checks(backend)
        print("2. timing (bf16, B=1, Hk=16, Hv=32, Dk=Dv=128)", flush=True)
        times = ab7_times(backend)
        path, info = write_result(args.out, "ab7", backend, {"checks": checks, "times": times})
        print("3. H3_BODY's phases (stamped build, one chunk a threadgroup)", flush=True)
        try:
            stamps = ab6_state_stamps(backend, h3=4)
        except Exception as e:  # the plain H3 build did not run here: the rest is printed
            print(f"  H3 stamps step failed: {str(e)[:500]}", flush=True)
            stamps = []
        info["stamps"] = stamps
        path.write_text(json.dumps(info, indent=1))
        bad = [f"{r['check']} T={r['T']}" for r in checks if not r["ok"]]
        bad += [f"state h3 stamped T={r['T']}" for r in stamps if r["same"] is False]
        diff = [f"{r['check']} T={r['T']}" for r in checks if r.get("equal to default") is False]
        print(f"ab7 checks: {len(checks) - len(bad)} ok" + (f", FAILED: {bad}" if bad else ""))
        print("ab7: not bit for bit the default's: " + (", ".join(diff) if diff else "none"))
        return 1 if bad else 0
    if args.ab6:
        print("1. round 6's variants against the default build and the references", flush=True)
        checks = ab6_checks(backend)
        print("2. the state pass's phases (stamped build, one chunk a threadgroup)", flush=True)
        state_stamps = ab6_state_stamps(backend)
        print("3. timing (bf16, B=1, Hk=16, Hv=32, Dk=Dv=128)", flush=True)
        times = ab6_times(backend)
        bad = [r["check"] for r in checks if not r["ok"]]
        bad += [f"state stamped T={r['T']}" for r in state_stamps if r["same"] is False]
        print(f"ab6 checks: {len(checks) - len(bad)} ok" + (f", FAILED: {bad}" if bad else ""))
        parts = {"checks": checks, "state_stamps": state_stamps, "times": times}
        path, info = write_result(args.out, "ab6", backend, parts)
        print("4. the state pass's ring in dynamic shared memory (H2_DYN, last)", flush=True)
        try:
            info["dyn"] = ab6_dyn(backend)
            path.write_text(json.dumps(info, indent=1))
            print(f"wrote {path}")
            bad += [f"vx {n}" for n, same in info["dyn"]["same"].items() if same is False]
        except Exception as e:  # everything above is printed and written already
            print(f"  H2_DYN step failed: {str(e)[:500]}")
        print(f"ab6: {'FAILED: ' + str(bad) if bad else 'every check passed'}")
        return 1 if bad else 0
    if args.stamps:
        rows = stamps_run(backend)
        write_result(args.out, "stamps", backend, {"stamps": rows})
        ok = all(all(r["same"].values()) and all(r["variants_ok"].values()) for r in rows)
        print("stamps: all outputs as expected" if ok else "stamps: an output differs (see above)")
        return 0 if ok else 1
    checks = []
    if not args.no_check:
        print("1. split path vs float64 loop / fused kernel", flush=True)
        checks = check(backend, args.quick, args.ab)
    print("2. timing (bf16, B=1, Hk=16, Dk=Dv=128)", flush=True)
    ts = (2048, 8192) if args.quick else (2048, 8192, 32768)
    times = time_shapes(backend, ts, 32, args.quick, args.ab)
    print(table(times, PREDICTED_AB if args.ab else None))
    failed = [r for r in checks if r["ok"] is False]
    missing = [r["check"] for r in checks if r["ok"] is None]
    print(
        f"checks: {len(checks) - len(failed) - len(missing)} ok, {len(failed)} failed"
        + (f" ({', '.join(r['check'] for r in failed)})" if failed else "")
        + (f", not built: {', '.join(missing)}" if missing else "")
    )
    print(
        "keep chunk_launch.SPLIT = False (a check failed)"
        if failed
        else "every check passed: chunk_launch.SPLIT = True may be set"
    )
    wins = {
        r["T"]: min(r["ms"].get(n, 1e9) for n in ("split", "split bv32", "split unb", "split o2"))
        < r["ms"]["fused"]
        for r in times
    }
    ok = [T for T in sorted(wins) if all(wins[u] for u in wins if u >= T)]
    print(f"suggested _GPU_CHUNKED_MIN_T: {ok[0] if ok else 'None (the fused kernel wins)'}")
    write_result(args.out, "split", backend, {"checks": checks, "times": times})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
