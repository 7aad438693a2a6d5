# ruff: noqa: I001
"""Runs every sharding case on one process; tests/test_shard.py starts it twice under
`mlx.launch --backend ring -n 2` (sharded) and calls `run_cases` itself once (the reference).

Usage: python tests/shard_worker.py WORKDIR. WORKDIR holds the checkpoints (cases.json names
them); each rank writes WORKDIR/rank<r>.npz (arrays) and rank<r>.json (tokens, sizes, text).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

# qwen35_mlx first: its import sets up the BLAS before mlx loads.
import qwen35_mlx  # noqa: F401
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from qwen35_mlx import batch_generate, load, stream_generate
from qwen35_mlx.prompt_cache import PromptCache

PROMPT = "The json module encodes"
SECOND = " and decodes it again"


def _param_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _load(path: str, mode: str, group):
    """mode: "single" (no group), "tensor" (model.shard) or "pipeline" (model.model.pipeline)."""
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model, tok = load(path, lazy=True)
    if mode == "tensor":
        model.shard(group)
    elif mode == "pipeline":
        model.model.pipeline(group)
    mx.eval(model.parameters())
    mx.synchronize()
    mem = {
        "param_bytes": _param_bytes(model),
        "active_bytes": mx.get_active_memory() - before,
        "peak_bytes": mx.get_peak_memory() - before,
    }
    return model, tok, mem


def _tokens(model, tok, prompt, **kw) -> list[int]:
    return [r.token for r in stream_generate(model, tok, prompt, **kw)]


def _count_decode_traces(model) -> list[int]:
    """[n]: how often the compiled decode step is traced (its function runs only then)."""
    n, orig = [0], model.model.decode

    def counting(*args):
        n[0] += 1
        return orig(*args)

    model.model.decode = counting
    return n


def _text_case(path: str, mode: str, group, arrays: dict, out: dict, name: str, full=True):
    model, tok, mem = _load(path, mode, group)
    out[f"{name}/mem"] = mem
    traces = _count_decode_traces(model)
    ids = tok.encode(PROMPT)
    arrays[f"{name}/logits"] = np.array(model(mx.array(ids)[None]).astype(mx.float32))
    out[f"{name}/greedy"] = _tokens(model, tok, ids, max_tokens=8)
    out[f"{name}/decode_traces"] = traces[0]
    if not full:
        return
    # Prompt-cache resume: the second turn reuses the first turn's cache.
    pc = PromptCache(model)
    first = _tokens(model, tok, ids, max_tokens=4, prompt_cache=pc)
    second = pc.tokens + [first[-1]] + tok.encode(SECOND, add_special_tokens=False)
    out[f"{name}/resume"] = _tokens(model, tok, second, max_tokens=6, prompt_cache=pc)
    out[f"{name}/resume_reused"] = pc.last_reused
    # Heads each rank's cache holds: recurrent state [B, Hv, Dv, Dk], attention keys [B, KV, T, D].
    out[f"{name}/cache_heads"] = [
        int(c[1].shape[1]) if hasattr(c, "cache") else int(c.keys.shape[1]) for c in pc.cache
    ]
    # A left-padded batch: per-row tokens, and the padded forward's last logits.
    rows = [ids, tok.encode("Lists", add_special_tokens=False), second]
    out[f"{name}/batch"] = batch_generate(model, tok, rows, max_tokens=5).tokens
    width = max(len(r) for r in rows)
    pads = [width - len(r) for r in rows]
    grid = mx.array([[0] * p + r for p, r in zip(pads, rows, strict=True)])
    logits = model(grid, cache=model.make_cache(left_padding=pads))[:, -1]
    arrays[f"{name}/batch_logits"] = np.array(logits.astype(mx.float32))


def _vlm_case(path: str, mode: str, group, arrays: dict, out: dict) -> None:
    model, processor, mem = _load(path, mode, group)
    out["vlm/mem"] = mem
    image = str(Path(path) / "image0.png")
    prompt = "<|vision_start|><|image_pad|><|vision_end|>Describe this."
    inputs = processor(prompt, images=[image])
    logits = model(
        mx.array(inputs["input_ids"]),
        pixel_values=mx.array(inputs["pixel_values"]),
        image_grid_thw=mx.array(inputs["image_grid_thw"]),
    )
    arrays["vlm/logits"] = np.array(logits.astype(mx.float32))
    out["vlm/greedy"] = _tokens(model, processor, prompt, images=[image], max_tokens=8)
    out["vlm/text_greedy"] = _tokens(model, processor, "Describe the sea.", max_tokens=8)


def _cli_case(path: str, sharded: bool) -> str:
    from qwen35_mlx.generate import main

    buf = io.StringIO()
    argv = ["--model", path, "--prompt", PROMPT, "--max-tokens", "6", "--quiet"]
    with contextlib.redirect_stdout(buf):
        rc = main(argv + (["--sharded"] if sharded else []))
    assert rc == 0, rc
    return buf.getvalue()


def _mlx_lm_sharded_load(path: str, arrays: dict, out: dict) -> None:
    """mlx-lm's own sharded_load on our model through the plugin."""
    from mlx_lm.utils import sharded_load

    from qwen35_mlx import mlx_lm_plugin

    mlx_lm_plugin.register()
    try:
        model, tok = sharded_load(path)
        ids = tok.encode(PROMPT)
        arrays["mlx_lm/logits"] = np.array(model(mx.array(ids)[None]).astype(mx.float32))
        out["mlx_lm/param_bytes"] = _param_bytes(model)
    finally:
        mlx_lm_plugin.unregister()


def run_cases(workdir: Path, group=None) -> tuple[dict, dict]:
    """All cases; `group` None: single process (the reference)."""
    cases = json.loads((workdir / "cases.json").read_text())
    arrays: dict = {}
    out: dict = {}
    modes = ["tensor", "pipeline"] if group is not None else ["single"]
    for mode in modes:
        for name in ("dense", "moe"):
            key = name if mode != "pipeline" else f"{name}_pp"
            _text_case(cases[name], mode, group, arrays, out, key, full=mode != "pipeline")
    tensor = "tensor" if group is not None else "single"
    _text_case(cases["quantized"], tensor, group, arrays, out, "quantized", full=False)
    _vlm_case(cases["vlm"], tensor, group, arrays, out)
    _, _, out["wide/mem"] = _load(cases["wide"], tensor, group)
    out["cli"] = _cli_case(cases["dense"], sharded=group is not None)
    if group is not None:
        _mlx_lm_sharded_load(cases["dense"], arrays, out)
    return arrays, out


def main() -> int:
    workdir = Path(sys.argv[1])
    group = mx.distributed.init(strict=True)
    if group.size() < 2:
        raise SystemExit("run me under mlx.launch with at least 2 processes")
    arrays, out = run_cases(workdir, group)
    out["size"] = group.size()
    r = group.rank()
    np.savez(workdir / f"rank{r}.npz", **arrays)
    (workdir / f"rank{r}.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
