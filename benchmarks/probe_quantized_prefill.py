"""Why is the quantized MoE test model's prefill not repeatable on CUDA? (issue #8's
`test_compiled_decode_quantized_moe`: the first token, which the prefill gives, differed between
calls on the H200, 2026-12-02.) Each check runs an operation of that prefill three times on
fresh inputs against a dequantized float32 reference and prints its errors:

    matmul3d   `mx.quantized_matmul` on [B, T, K] inputs (the prefill's shape; [B, 1, K] and
               [R, K] were clean on the H200)
    gather     `mx.gather_qmm` as mlx-lm's SwitchGLU calls it (clean on the H200)
    model      the test's model, 4-bit experts with 8-bit gates, prefilled three times
    sweep      `mx.quantized_matmul` (transpose=True) over bits x group size x input dtype, one
               child process each (a hung kernel is cut by its timeout and named), K x N x M
               rows: prints the wrong (error above 0.01 / 1 (bf16) of an output's typical size) or
               unrepeatable cases, and where one hung

    PYTHONPATH=src:. python benchmarks/probe_quantized_prefill.py [matmul3d gather model sweep]
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np

FORMS = ((4, 32), (4, 64), (8, 32))


def _quantized(N: int, K: int, bits: int, gs: int, lead=()):
    W = mx.random.normal((*lead, N, K)) / K**0.5
    w, s, b = mx.quantize(W, group_size=gs, bits=bits)
    return (w, s, b), mx.dequantize(w, s, b, group_size=gs, bits=bits)


def matmul3d() -> None:
    shapes = (((2, 5, 64), 4), ((2, 5, 64), 5), ((2, 5, 64), 32), ((2, 5, 64), 128),
              ((1, 5, 64), 128), ((2, 5, 1024), 512), ((4, 7, 512), 1024))  # fmt: skip
    for bits, gs in FORMS:
        for shape, N in shapes:
            (w, s, b), Wd = _quantized(N, shape[-1], bits, gs)
            x = mx.random.normal(shape)
            ref = x @ Wd.T
            ys = [mx.quantized_matmul(x, w, s, b, transpose=True, group_size=gs, bits=bits)
                  for _ in range(3)]  # fmt: skip
            errs = " ".join(f"{mx.abs(y - ref).max().item():.2g}" for y in ys)
            print(f"matmul3d bits {bits} group {gs} x {shape} N {N}: max errors {errs}")


def gather() -> None:
    for bits, gs in FORMS:
        for K, N in ((32, 64), (64, 32), (64, 48), (128, 32)):
            if K % gs:
                continue
            (w, s, b), Wd = _quantized(N, K, bits, gs, lead=(4,))
            x = mx.random.normal((2, 5, 1, 1, K))
            inds = mx.random.randint(0, 4, (2, 5, 2))
            ref = np.einsum("btk,btjnk->btjn", np.array(x).reshape(2, 5, K),
                            np.array(Wd)[np.array(inds)])  # fmt: skip
            ys = [mx.gather_qmm(x, w, s, b, rhs_indices=inds, transpose=True, group_size=gs,
                                bits=bits) for _ in range(3)]  # fmt: skip
            errs = " ".join(f"{np.abs(np.array(y).reshape(ref.shape) - ref).max():.2g}" for y in ys)
            print(f"gather bits {bits} group {gs} K {K} N {N}: max errors {errs}")


def model() -> None:
    """The test's model prefilled three times, with every quantizable layer quantized as the
    test does, then with only one part quantized at a time (a bisect of the failing part)."""
    from tests.models.factory import make_moe_config, make_text_model
    from tests.test_fast_decode import TOKENS

    parts = {
        "all": lambda p: True,
        "experts only": lambda p: ".experts." in p,
        "router and shared gate only": lambda p: p.endswith((".mlp.gate", "shared_expert_gate")),
        "shared expert only": lambda p: ".shared_expert." in p,
        "attention and linear layers only": lambda p: ".mlp." not in p,
    }
    for name, part in parts.items():
        m = make_text_model(make_moe_config(shared_expert_intermediate_size=64), seed=10)
        pred = m.quant_predicate
        nn.quantize(m, group_size=32, bits=4, class_predicate=lambda p, x, pred=pred, part=part: (
            hasattr(x, "to_quantized") and not isinstance(x, nn.Embedding) and pred(p, x)
            and part(p)))  # fmt: skip
        prompts = mx.array([TOKENS[:5], TOKENS[7:12]])
        outs = [np.array(m(prompts, cache=m.make_cache())[:, -1]) for _ in range(3)]
        diffs = [float(np.abs(o - outs[0]).max()) for o in outs[1:]]
        print(f"model prefill, {name} quantized: max difference from the first call {diffs}")


SWEEP_K = (64, 128, 512, 2048)
SWEEP_N = (1, 2, 3, 4, 5, 8, 16, 24, 32, 48, 64, 96, 128, 256)
SWEEP_M = (1, 2, 3, 5, 8, 10, 16, 33, 64, 200)


def sweep_one(bits: int, gs: int, dtype_name: str) -> None:
    """One child's share of `sweep`: prints `case K N M` before each case (so that a hang is
    named by the parent), `bad K N M err` / `unrepeatable K N M` for the failures."""
    dtype = getattr(mx, dtype_name)
    for K in SWEEP_K:
        if K % gs:
            continue
        for N in SWEEP_N:
            (w, s, b), _ = _quantized(N, K, bits, gs)
            s, b = s.astype(dtype), b.astype(dtype)
            Wd = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), gs, bits)
            for M in SWEEP_M:
                print(f"case {K} {N} {M}", flush=True)
                x = mx.random.normal((M, K)).astype(dtype)
                ref = x.astype(mx.float32) @ Wd.T
                ys = [mx.quantized_matmul(x, w, s, b, transpose=True, group_size=gs, bits=bits)
                      for _ in range(2)]  # fmt: skip
                # in units of an output's typical size (rms x * rms W * sqrt K): bf16 sums on
                # the CPU reach ~0.5 of it at K 2048, float32 stays within 1e-5
                typical = (x.astype(mx.float32).square().mean() * Wd.square().mean() * K).sqrt()
                err = (mx.abs(ys[0].astype(mx.float32) - ref).max() / typical).item()
                if err > (1e-2 if dtype == mx.float32 else 1.0):
                    print(f"bad {K} {N} {M} {err:.2g}", flush=True)
                elif not mx.array_equal(ys[0], ys[1]).item():
                    print(f"unrepeatable {K} {N} {M}", flush=True)


def sweep() -> None:
    import subprocess

    for dtype_name in ("float32", "bfloat16"):
        for bits in (4, 8):
            for gs in (32, 64, 128):
                cmd = [sys.executable, __file__, "_sweep_one", str(bits), str(gs), dtype_name]
                try:
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=40)
                    lines, hung = r.stdout.splitlines(), None
                except subprocess.TimeoutExpired as e:
                    out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
                    lines = out.splitlines()
                    hung = next((ln[5:] for ln in reversed(lines) if ln.startswith("case ")), "?")
                bad = [ln.split(" ", 1)[1] for ln in lines if not ln.startswith("case ")]
                n = sum(ln.startswith("case ") for ln in lines)
                tail = f" [hung at K N M {hung}]" if hung else ""
                print(f"sweep {dtype_name} bits {bits} group {gs}: {n} cases, {len(bad)} wrong "
                      f"(K N M err): {'; '.join(bad) or '-'}{tail}", flush=True)  # fmt: skip


if __name__ == "__main__":
    mx.random.seed(0)
    if sys.argv[1:2] == ["_sweep_one"]:
        sweep_one(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        sys.exit(0)
    names = {"matmul3d": matmul3d, "gather": gather, "model": model, "sweep": sweep}
    for name in sys.argv[1:] or ["matmul3d", "gather", "model"]:
        names[name]()
