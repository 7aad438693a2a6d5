"""What the GPU kernel tests (test_gpu_kernels.py, test_gpu_chunk_kernel.py) share: the backend
this machine has, the skip mark, the inputs as one dict, the exact reference, the comparison, the
shape grid, and one way to call a kernel (either gating) with NaN-poisoned outputs.

The reference is the float64 NumPy loop, exact whatever the GPU's matmul precision.
State layout everywhere: [B, Hv, Dv, Dk] fp32.
"""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import gated_delta, gated_delta_update
from tests.conftest import RTOL, rel_err
from tests.kernels.helpers import (
    gated_delta_np,
    gates_np,
    left_pad_mask,
    make_gate_inputs,
    make_inputs,
)

if mx.metal.is_available():
    BACKEND = "metal"
elif mx.cuda.is_available():
    BACKEND = "cuda"
else:
    BACKEND = None

GPU_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(BACKEND is None, reason="needs MLX with a Metal or CUDA GPU"),
]

NAN = float("nan")


def kernel_inputs(B, T, Hk, Hv, Dk, Dv, *, dtype=mx.float32, per_key=False, seed=0, pad=None):
    """The shared helpers' inputs as one dict: q, k, v, g, beta, state (make_inputs), the raw
    gates a, b, A_log, dt_bias (make_gate_inputs) and mask (pad: left padding per batch row, or
    None for no mask)."""
    x = make_inputs(B, T, Hk, Hv, Dk, Dv, per_key=per_key, dtype=dtype, seed=seed)
    x = dict(zip(("q", "k", "v", "g", "beta", "state"), x, strict=True))
    gates = make_gate_inputs(B, T, Hv, dtype=dtype, seed=seed)
    x.update(zip(("a", "b", "A_log", "dt_bias"), gates, strict=True))
    x["mask"] = None if pad is None else left_pad_mask(B, T, pad)
    return x


def split_at(x, t):
    """`x` cut along time at step `t`: (the first t steps, the rest); state and gate parameters
    go to both."""
    T = x["q"].shape[1]

    def part(sl):
        return {
            n: (a[:, sl] if a is not None and a.ndim >= 2 and a.shape[1] == T else a)
            for n, a in x.items()
        }

    return part(slice(None, t)), part(slice(t, None))


def ref(x, g=None, beta=None, state=None):
    """The float64 NumPy loop (helpers.gated_delta_np) as (y in v's dtype, state fp32).

    Not MLX's own reference on the CPU stream: on the H200, in several GPU test processes at
    once, that reference (fed arrays the GPU had just made, evaluated and synchronised) computed
    from wrong inputs about once a process, on the first call of a shape, while the kernel was
    within 3e-7 of float64 (benchmarks/probe_chunk_repeat.py; NOTES sessions 10-11). The
    product never hands GPU arrays to the CPU stream; the tests no longer do either."""
    g = x["g"] if g is None else g
    beta = x["beta"] if beta is None else beta
    state = x["state"] if state is None else state
    mask = None if x["mask"] is None else np.array(x["mask"])
    y, s = gated_delta_np(x["q"], x["k"], x["v"], g, beta, state, mask)
    return mx.array(y, mx.float32).astype(x["v"].dtype), mx.array(s, mx.float32)


def ref_fused(x):
    """`ref` with the gates computed in float64 from the raw a, b, A_log, dt_bias."""
    return ref(x, *gates_np(x["a"], x["b"], x["A_log"], x["dt_bias"]))


def run_kernel(kernel, x, *, fused=False, **kw):
    """`kernel` on `x` with its gates (g, beta) or, `fused`, the raw gates (a, b, A_log,
    dt_bias), outputs poisoned with NaN (an element it fails to write fails the comparison);
    evaluated (y, state)."""
    gates = ("a", "b", "A_log", "dt_bias") if fused else ("g", "beta")
    names = ("q", "k", "v", *gates, "state", "mask")
    y, s = kernel(*(x[n] for n in names), init_value=NAN, **kw)
    mx.eval(y, s)
    return y, s


def mismatch(name: str, got: np.ndarray, want: np.ndarray, tol: float) -> str:
    """What a comparison of `got` with `want` found, for an assertion message: the relative
    error against `tol`, the non-finite elements of got (how many, NaN among them, the first),
    the worst element (index, got, want) and how many elements are off by more than
    tol * max|want|, with their index range per axis."""
    got64, want64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.abs(want64).max()) if want64.size else 0.0, 1e-30)
    lines = [f"{name} {got64.shape}: rel_err {rel_err(got64, want64):.3e} (tol {tol:.0e})"]
    bad = ~np.isfinite(got64)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        nan = int(np.isnan(got64).sum())
        lines.append(f"  {int(bad.sum())} non-finite ({nan} NaN), the first at {first}")
    if got64.size:
        diff = np.where(bad, np.inf, np.abs(got64 - want64))
        at = np.unravel_index(int(np.argmax(diff)), diff.shape)
        where = tuple(int(i) for i in at)
        lines.append(
            f"  worst at {where}: got {float(got64[at]):.9g}, want {float(want64[at]):.9g}"
            f" (max|want| {scale:.6g})"
        )
        off = np.argwhere(diff > tol * scale)
        if len(off):
            span = ", ".join(f"{a}..{b}" for a, b in zip(off.min(0), off.max(0), strict=True))
            lines.append(f"  {len(off)} of {diff.size} elements off by more than tol, in [{span}]")
    return "\n".join(lines)


def check(got, want, dtype):
    """(y, state) against the reference's: dtypes, shapes, every element finite, and the
    relative errors within RTOL[dtype]; a failure says what it found (`mismatch`)."""
    (y, s), (y_ref, s_ref) = got, want
    assert y.dtype == y_ref.dtype and s.dtype == mx.float32
    assert y.shape == y_ref.shape and s.shape == s_ref.shape
    y32, s32 = np.array(y.astype(mx.float32)), np.array(s)
    y_ref32, s_ref32 = np.array(y_ref.astype(mx.float32)), np.array(s_ref)
    tol = RTOL[dtype]
    ok_y = np.isfinite(y32).all() and rel_err(y32, y_ref32) <= tol
    ok_s = np.isfinite(s32).all() and rel_err(s32, s_ref32) <= tol
    pairs = (("y", y32, y_ref32), ("state", s32, s_ref32))
    assert ok_y and ok_s, "\n".join(mismatch(n, a, b, tol) for n, a, b in pairs)


def check_public_api(x, backend):
    """Both public entry points, with `backend`, against the reference."""
    y, s = gated_delta(
        x["q"], x["k"], x["v"], x["g"], x["beta"], x["state"], x["mask"], backend=backend
    )
    check((y, s), ref(x), mx.float32)
    gates = (x["a"], x["b"], x["A_log"], x["dt_bias"])
    y, s = gated_delta_update(
        x["q"], x["k"], x["v"], *gates, x["state"], x["mask"], backend=backend
    )
    check((y, s), ref_fused(x), mx.float32)


# (B, T, Hk, Hv, Dk, Dv): every Hv/Hk in {1, 2, 4}, Dk in {32, 64, 128, 192, 256},
# Dv in {32, 64, 128} and odd Dv, Dk != Dv both ways, T in {1, 2, 63, 64, 65, 300}, B in {1, 3}.
SHAPES = [
    (1, 1, 1, 1, 32, 32),
    (3, 1, 2, 4, 128, 128),
    (3, 2, 2, 4, 64, 32),
    (1, 63, 1, 4, 128, 64),
    (3, 64, 2, 2, 192, 128),
    (1, 65, 1, 2, 256, 64),
    (1, 65, 2, 2, 32, 128),
    (3, 300, 2, 4, 128, 128),
    (2, 7, 4, 4, 256, 32),
    (2, 5, 1, 2, 64, 20),
    (1, 3, 1, 1, 96, 1),
    (2, 9, 16, 32, 128, 128),
]


def pads(B, T):
    """Left padding per batch row: T // 3, none, all of it, in turn."""
    return [(T // 3, 0, T)[i % 3] for i in range(B)]
