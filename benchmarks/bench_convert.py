"""Conversion speed: `qwen35_mlx.convert` vs mlx-lm's converter, same input, 4-bit.

The input is the Qwen3.5-0.8B-shaped random checkpoint of `bench_model.py` written once in
Hugging Face layout (model_type `qwen3_5` with a text_config and no vision tower, the type stock
mlx-lm converts; `model.language_model.*` names, conv1d [C, 1, K], zero-centred norms, bf16,
tied embeddings). Each conversion runs in its own process (`python -m qwen35_mlx.convert` /
`python -m mlx_lm convert`, both `-q` with 4 bits in groups of 64), alternating who goes first;
every figure is the best of `--repeats`, wall-clock and CPU seconds of the child process (the
CPU is shared: the best run is the least disturbed one, and CPU time moves less).

    python benchmarks/bench_convert.py [--repeats 2] [--work /tmp/qwen35_bench_convert]

Prints a table; writes benchmarks/results/bench_convert_<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results"


def write_input(folder: Path) -> None:
    """The 0.8B-shaped random checkpoint, Hugging Face layout, with a tokenizer."""
    sys.path.insert(0, str(HERE))
    # isort: off
    import qwen35_mlx  # noqa: F401  (BLAS preload before mlx)
    import mlx.core as mx
    from bench_model import SHAPE_0_8B, random_weights
    from qwen35_mlx.models.config import TextConfig
    from qwen35_mlx.models.text import TextModel

    # isort: on

    model = TextModel(TextConfig(**SHAPE_0_8B))
    weights = random_weights(model, mx.bfloat16)
    shifted = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight",
               "k_norm.weight", "model.norm.weight")  # fmt: skip
    hf = {}
    for k, v in weights.items():
        if k.endswith("conv1d.weight"):
            v = mx.swapaxes(v, 1, 2)  # [C, K, 1] -> [C, 1, K]
        elif k.endswith(shifted):
            v = v - 1
        hf[k.replace("model.", "model.language_model.", 1)] = v
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), hf, metadata={"format": "pt"})
    text = dict(SHAPE_0_8B, dtype="bfloat16")
    config = {"model_type": "qwen3_5", "text_config": text, "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    golden = ROOT / "tests" / "data" / "golden" / "vlm"
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(golden / f, folder / f)


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", default="/tmp/qwen35_bench_convert")
    args = p.parse_args()
    work = Path(args.work)
    src = work / "hf"
    if not (src / "model.safetensors").is_file():
        shutil.rmtree(work, ignore_errors=True)
        write_input(src)
    py = sys.executable
    cmds = {
        "qwen35_mlx": lambda dst: [py, "-m", "qwen35_mlx.convert", "--hf-path", str(src),
                                   "--mlx-path", str(dst), "-q", "--q-bits", "4",
                                   "--q-group-size", "64", "--no-progress"],
        "mlx-lm": lambda dst: [py, "-m", "mlx_lm", "convert", "--hf-path", str(src),
                               "--mlx-path", str(dst), "-q", "--q-bits", "4",
                               "--q-group-size", "64"],
    }  # fmt: skip
    names = list(cmds)
    runs: dict[str, list] = {n: [] for n in names}
    sizes = {}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            dst = work / f"out_{name}"
            shutil.rmtree(dst, ignore_errors=True)
            runs[name].append(run(cmds[name](dst)))
            sizes[name] = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
            print(f"{name}: {runs[name][-1][0]:.1f} s wall, {runs[name][-1][1]:.1f} s CPU")

    import mlx.core as mx
    import mlx_lm

    best = {n: (min(w for w, _ in v), min(c for _, c in v)) for n, v in runs.items()}
    print("\n| converter | best wall s | best CPU s | output MB |\n|---|---|---|---|")
    for n in names:
        print(f"| {n} | {best[n][0]:.1f} | {best[n][1]:.1f} | {sizes[n] / 1e6:.0f} |")
    ratio = best["mlx-lm"][0] / best["qwen35_mlx"][0]
    print(f"mlx-lm wall / ours: {ratio:.2f} (above 1: ours faster)")
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor()} {os.cpu_count()} cores",
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "runs": runs,
        "best": best,
        "output_bytes": sizes,
    }
    OUT.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    (OUT / f"bench_convert_{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
