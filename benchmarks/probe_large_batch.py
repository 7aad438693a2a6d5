"""Which operation fails at a large batch on CUDA? (issue #13's speculative sampling test:
`cudaGraphAddKernelNode ... invalid argument` from batch 256 on, in the first step over caches
tiled to B rows; its tiny model runs none of our kernels, head sizes 16 being below their 32.)

Each case runs the one operation, or the model step, at B rows in its own process (a failed CUDA
graph poisons the process) and prints "<case> <B> ok" or "<case> <B> FAIL <error>":

    PYTHONPATH=src:. python3 benchmarks/probe_large_batch.py [B]   # every case, B = 256
"""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx

CASES = (
    "sdpa", "sdpa3", "sdpabf", "argpart", "categorical", "sort", "topk", "topp",
    "model", "tiled", "start",
)  # fmt: skip


def run(case: str, B: int) -> None:
    mx.random.seed(0)
    x = mx.random.normal((B, 384))
    if case.startswith("sdpa"):
        T = 3 if case == "sdpa3" else 1
        dt = mx.bfloat16 if case == "sdpabf" else mx.float32
        q = mx.random.normal((B, 4, T, 16)).astype(dt)
        k = mx.random.normal((B, 2, 20, 16)).astype(dt)
        mask = "causal" if T > 1 else None
        out = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.25, mask=mask)
    elif case == "argpart":
        out = mx.argpartition(x, kth=380, axis=-1)
    elif case == "categorical":
        out = mx.random.categorical(x)
    elif case == "sort":
        out = mx.sort(x, axis=-1)
    elif case in ("topk", "topp"):
        from qwen35_mlx.speculative import Sampling

        opts = dict(temp=1.0, top_k=4) if case == "topk" else dict(temp=0.7, top_p=0.9)
        out = Sampling(**opts).probs(x - mx.logsumexp(x, axis=-1, keepdims=True))
    else:
        from tests.models.factory import make_text_config, make_text_model
        from tests.test_speculative import PROMPT, _tile

        m = make_text_model(make_text_config(vocab_size=384, mtp_num_hidden_layers=1), seed=7)
        cache = m.make_cache()
        if case == "model":  # B rows prefilled, no tiling
            mx.eval(m(mx.random.randint(0, 384, (B, 5)), cache=cache))
            out = m(mx.ones((B, 1), mx.int32), cache=cache)
        elif case == "tiled":  # one row prefilled, the caches tiled to B rows (the test's way)
            mx.eval(m(mx.array([PROMPT[:-1]]), cache=cache))
            _tile(cache, B)
            out = m(mx.ones((B, 1), mx.int32), cache=cache)
        else:  # the test's own start(): the MTP speculator over tiled caches
            from qwen35_mlx.speculative import MTPSpeculator, Sampling

            spec = MTPSpeculator(m, cache, 2, Sampling(temp=1.0, top_k=4))
            one = mx.array([PROMPT])
            _, h = m(one[:, :-1], cache=cache, return_hidden=True)
            spec.on_prefill(one[:, :-1], h)
            _tile(cache + spec.mtp_cache, B)
            spec._pending_h = mx.repeat(spec._pending_h, B, axis=0)
            out = spec.start(mx.repeat(one[:, -1:], B, axis=0))[0]
    mx.eval(out)


def main() -> None:
    if len(sys.argv) > 2:  # a child: one case
        case, B = sys.argv[1], int(sys.argv[2])
        try:
            run(case, B)
            print(case, B, "ok", flush=True)
        except Exception as e:  # the point: name it and go on
            print(case, B, "FAIL", str(e)[:120], flush=True)
        return
    B = sys.argv[1] if len(sys.argv) > 1 else "256"
    for case in CASES:
        try:
            subprocess.run([sys.executable, __file__, case, B], timeout=120, check=False)
        except subprocess.TimeoutExpired:
            print(case, B, "TIMEOUT (120 s)", flush=True)


if __name__ == "__main__":
    main()
