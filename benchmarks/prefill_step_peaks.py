"""Per-step peak memory of a prefill in steps: ours, ours with the old attention (MLX's single
call at every length), and mlx-lm's qwen3_5, on the same weights (issue 9, the CPU half).

The model has the 0.8B's attention heads (8 query, 2 key/value heads of 256) and 5 layers
(3 linear, 1 full, 1 linear: the attention output reaches a cache only through a later layer),
small elsewhere, fp32. Each step: clear MLX's buffer cache, reset the peak, run the step,
evaluate the caches; the figure is the peak above what was live before the step.

    PYTHONPATH=src python benchmarks/prefill_step_peaks.py [--step 2048] [--steps 8] [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# isort: off
import qwen35_mlx  # noqa: F401  (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx
from mlx_lm.models import qwen3_5 as mlx_lm_qwen3_5

from qwen35_mlx.models import attention
from qwen35_mlx.models.cache import KVCache
from qwen35_mlx.models.config import TextConfig
from qwen35_mlx.models.text import TextModel

# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.models.factory import random_weights  # noqa: E402

SHAPE = dict(
    model_type="qwen3_5_text",
    vocab_size=256,
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=5,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=256,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    linear_conv_kernel_dim=4,
    full_attention_interval=4,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    max_position_embeddings=1 << 20,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 1e7,
        "partial_rotary_factor": 0.25,
        "mrope_section": [11, 11, 10],
        "mrope_interleaved": True,
    },
)


def step_peaks(model, ids: mx.array, step: int) -> tuple[list[float], float]:
    cache = model.make_cache()
    peaks = []
    for s in range(0, ids.shape[1], step):
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        model(ids[:, s : s + step], cache=cache)
        mx.eval([c.state for c in cache])
        peaks.append((mx.get_peak_memory() - base) / 2**20)
    return peaks, sum(c.nbytes for c in cache if isinstance(c, KVCache)) / 2**20


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    ours = TextModel(TextConfig(**SHAPE))
    w = random_weights(ours, mx.float32)
    ours.load_weights(list(w.items()))
    theirs = mlx_lm_qwen3_5.Model(
        mlx_lm_qwen3_5.ModelArgs.from_dict(dict(SHAPE, model_type="qwen3_5"))
    )
    theirs.load_weights([("language_model." + k, v) for k, v in w.items()])
    ids = mx.random.randint(0, SHAPE["vocab_size"], (1, args.step * args.steps))
    plain = attention.PLAIN_BYTES
    res = {"step": args.step, "steps": args.steps, "dtype": "float32", "peaks_mib": {}}
    for name, model, plain_bytes in (
        ("ours", ours, plain),
        ("ours, old attention", ours, 1 << 60),
        ("mlx-lm", theirs, plain),
    ):
        attention.PLAIN_BYTES = plain_bytes
        peaks, kv = step_peaks(model, ids, args.step)
        attention.PLAIN_BYTES = plain
        res["peaks_mib"][name] = peaks
        res["kv_mib"] = kv
        print(f"{name:>20}: {' '.join(f'{x:7.1f}' for x in peaks)}  (KV {kv:.0f} MiB)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
