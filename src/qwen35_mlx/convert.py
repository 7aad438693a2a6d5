"""Hugging Face Qwen3.5 checkpoint -> MLX checkpoint that loads in every runtime.

`python -m qwen35_mlx.convert --hf-path SRC --mlx-path DST [-q] [--q-bits 4|8]
[--q-group-size 32|64|128] [--dtype bfloat16|float16|float32] [--mixed RECIPE]`

Works for text dense, text MoE and vision-language checkpoints. The steps reuse what exists:
our loader reads and sanitizes (conv1d [C, 1, K] -> [C, K, 1], norm weights w -> 1 + w once,
MoE experts stacked under `switch_mlp`, `mtp.*` dropped unless `keep_mtp`), mlx-lm quantizes
(`quantize_model`, its mixed recipes, `make_shards`, `save_config`). What this module adds:

- the models' `quant_predicate` (routers and the shared-expert gate at 8 bits, the vision tower
  unquantized unless `quantize_vision`) combined with a mixed recipe;
- `A_log` kept in fp32 whatever `dtype` (the models' `cast_predicate`);
- the layout mlx-community publishes: `model-0000x-of-0000y.safetensors` (`format: mlx`)
  plus `model.safetensors.index.json`, config.json with the `quantization` block, tokenizer
  files, chat template and, for the VLM, `preprocessor_config.json`, copied byte for byte;
- a progress bar over the bytes written, and no half-written output: everything goes to a
  temporary folder next to DST that is renamed into place at the end.

`mtp.*` (multi-token prediction) weights are dropped by default: mlx-swift-lm shifts every norm
by one whenever a checkpoint holds any `mtp.` weight, so keeping them would shift our already
shifted norms twice in Swift apps (see tests/data/mlx_swift_lm/qwen35.json). `keep_mtp=True`
(`--keep-mtp`) keeps them (sanitized, norms shifted once, quantized with the rest) for this
package's speculative decoding; such a checkpoint is not for Swift apps, and says so in a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .loader import is_vision_language, load_model, read_config, resolve_path

DTYPES = ("bfloat16", "float16", "float32")
Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
# Files besides the weights and config.json that a checkpoint carries: tokenizer, chat
# template, generation settings, image/video processor settings.
EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)
_EVAL_BYTES = 1 << 28  # evaluate this much at a time under the progress bar
# Our MoE experts live at `mlp.experts.*`; mlx-lm, mlx-vlm and mlx-swift-lm name the same
# stacked [E, out, in] weights `mlp.switch_mlp.*`, so that is what a checkpoint carries.
_EXPERTS = re.compile(r"(\.mlp)\.experts\.(gate_proj|up_proj|down_proj)(\.|$)")


def export_name(name: str) -> str:
    """A parameter or module path of ours -> its name in a published MLX checkpoint."""
    return _EXPERTS.sub(r"\1.switch_mlp.\2\3", name)


def mixed_recipes() -> list[str]:
    from mlx_lm.convert import QUANT_RECIPES

    return list(QUANT_RECIPES)


def quant_predicate(
    model: nn.Module,
    *,
    group_size: int,
    mixed: str | None = None,
    quantize_vision: bool = False,
) -> Callable[[str, nn.Module], bool | dict]:
    """The model's own predicate (8-bit routers and shared-expert gate, vision tower left alone)
    over mlx-lm's mixed recipe, if one is named. `quantize_vision` quantizes the tower too
    (with the default or recipe settings; layers whose width is not a multiple of the group
    size stay unquantized, as mlx-lm decides)."""
    from mlx_lm.convert import mixed_quant_predicate_builder

    recipe = mixed_quant_predicate_builder(mixed, model, group_size) if mixed else None
    own = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path.startswith("vision_tower"):
            # mlx-lm's recipes key on the text layer index; the tower takes the defaults.
            return quantize_vision
        decision = True if own is None else own(path, module)
        if decision is True and recipe is not None:
            return recipe(path, module)
        if isinstance(decision, dict):
            # The models ask 8 bits in groups of 64 for routers; a width 64 does not divide
            # (tiny models) takes the run's group size instead, or stays unquantized.
            width = module.weight.shape[-1]
            sizes = [s for s in (decision.get("group_size", group_size), group_size) if s]
            fits = [s for s in sizes if width % s == 0]
            if not fits:
                return False
            return {"mode": "affine", **decision, "group_size": fits[0]}
        return decision

    return predicate


def _layer_types_from_interval(n: int, interval: int) -> list[str]:
    return ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n)]


def swift_layout_warning(config: dict[str, Any]) -> str | None:
    """A warning when mlx-swift-lm would build other layers than `layer_types` says.

    mlx-swift-lm reads only `full_attention_interval` (default 4), never `layer_types`.
    """
    text = config.get("text_config") or config
    types = text.get("layer_types")
    n = text.get("num_hidden_layers")
    if not types or not n:
        return None
    interval = text.get("full_attention_interval", 4)
    if list(types) != _layer_types_from_interval(n, interval):
        return (
            f"layer_types is not the pattern full_attention_interval={interval} gives; "
            "mlx-swift-lm builds its layers from full_attention_interval and will not load "
            "this checkpoint"
        )
    return None


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="converting", file=sys.stderr)


def write_weights(
    folder: Path, weights: dict[str, mx.array], *, index: bool = True, progress: bool = False
) -> None:
    """Safetensors shards (`format: mlx`) in `folder`, evaluating lazily computed weights in
    batches under a progress bar. One shard is `model.safetensors`; several are
    `model-0000x-of-0000y.safetensors`. `index` writes `model.safetensors.index.json` always
    (mlx-community's layout), otherwise only for several shards."""
    from mlx_lm.utils import make_shards

    shards = make_shards(weights)
    n = len(shards)
    names = (
        [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        if n > 1
        else ["model.safetensors"]
    )
    total = sum(v.nbytes for v in weights.values())
    bar = _progress(total, progress)
    weight_map = {}
    try:
        for i, name in enumerate(names):
            shard, shards[i] = shards[i], None
            batch, size = [], 0
            for v in shard.values():
                batch.append(v)
                size += v.nbytes
                if size >= _EVAL_BYTES:
                    mx.eval(batch)
                    if bar is not None:
                        bar.update(size)
                    batch, size = [], 0
            mx.eval(batch)
            if bar is not None:
                bar.update(size)
            mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
            weight_map.update(dict.fromkeys(shard, name))
            del shard, batch
    finally:
        if bar is not None:
            bar.close()
    if index or n > 1:
        data = {
            "metadata": {"total_size": total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(data, indent=4) + "\n")


def atomic_folder(path: Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call `write(tmp)` on a temporary folder next to `path`, then rename it to `path`.

    On any error the temporary folder is removed and `path` is left as it was.
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (--overwrite / overwrite=True replaces it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            old.rmdir()
            path.rename(old)
            tmp.rename(path)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def quantization_block(model: nn.Module) -> dict[str, Any] | None:
    """mlx-lm style `quantization` block describing the model's quantized modules, or None.

    The most common (group_size, bits, mode) is the default; modules that differ get a
    per-module entry keyed by module path.
    """
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "scales") and hasattr(module, "bits"):
            found[name] = (module.group_size, module.bits, getattr(module, "mode", "affine"))
    if not found:
        return None
    (gs, bits, mode), _ = Counter(found.values()).most_common(1)[0]
    block: dict[str, Any] = {"group_size": gs, "bits": bits, "mode": mode}
    for name, params in sorted(found.items()):
        if params != (gs, bits, mode):
            block[name] = dict(zip(("group_size", "bits", "mode"), params, strict=True))
    return block


def save_mlx(
    model: nn.Module,
    config_dict: dict[str, Any],
    path: str | os.PathLike,
    *,
    extra_files: list[str | os.PathLike] = (),
    overwrite: bool = False,
) -> Path:
    """Write an MLX-format checkpoint (already sanitized): safetensors + config.json.

    Safetensors carry `format: mlx`; config.json gets a `quantization` block when the model has
    quantized modules (and loses a stale one when it has none). `extra_files` (tokenizer,
    processor settings) are copied alongside. Everything is written to a temporary folder next
    to `path` and renamed into place, so an error leaves no half-written checkpoint.
    """
    config = {k: v for k, v in config_dict.items() if k not in ("quantization_config",)}
    config.pop("quantization", None)
    if (block := quantization_block(model)) is not None:
        config["quantization"] = block
        config["quantization_config"] = block

    def write(tmp: Path) -> None:
        write_weights(tmp, dict(tree_flatten(model.parameters())), index=False)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in extra_files:
            shutil.copy(f, tmp / Path(f).name)

    return atomic_folder(Path(path), write, overwrite=overwrite)


def _source_dtype(config: dict[str, Any]) -> str | None:
    dtype = config.get("torch_dtype") or config.get("dtype")
    if dtype is None:
        dtype = (config.get("text_config") or {}).get("dtype")
    return dtype if dtype in DTYPES else None


def convert(
    hf_path: str | os.PathLike,
    mlx_path: str | os.PathLike,
    *,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str | None = None,
    mixed: str | None = None,
    quantize_vision: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    keep_mtp: bool = False,
) -> Path:
    """Convert a Hugging Face Qwen3.5 checkpoint (folder or repo id) into an MLX one at
    `mlx_path`; returns the path.

    `dtype` defaults to the checkpoint's own (`torch_dtype` / `dtype`); `A_log` stays fp32.
    `quantize` uses `q_bits` / `q_group_size` (affine); `mixed` names one of mlx-lm's mixed
    recipes (`mixed_4_6`, ...) and implies `quantize`. Raises FileNotFoundError / ValueError /
    FileExistsError with a message naming the problem, before anything is written at `mlx_path`.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if mixed is not None and mixed not in mixed_recipes():
        raise ValueError(f"mixed must be one of {', '.join(mixed_recipes())}, got {mixed!r}")
    quantize = quantize or mixed is not None
    if quantize and q_bits not in Q_BITS:
        raise ValueError(f"q_bits must be one of {Q_BITS}, got {q_bits}")
    if quantize and q_group_size not in Q_GROUP_SIZES:
        raise ValueError(f"q_group_size must be one of {Q_GROUP_SIZES}, got {q_group_size}")
    mlx_path = Path(mlx_path).expanduser()
    if mlx_path.exists() and not overwrite:
        raise FileExistsError(f"{mlx_path} exists (--overwrite / overwrite=True replaces it)")

    src = resolve_path(hf_path)
    config = read_config(src)
    if config.get("quantization") or config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized; convert from the unquantized checkpoint")
    is_vlm = is_vision_language(config)
    extra = [src / name for name in EXTRA_FILES if (src / name).is_file()]
    if is_vlm and not (src / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"{src} is a vision-language checkpoint without preprocessor_config.json"
        )
    if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in extra):
        raise FileNotFoundError(f"{src} has no tokenizer files (tokenizer.json)")
    if (message := swift_layout_warning(config)) is not None:
        warnings.warn(message, stacklevel=2)

    dtype = dtype or _source_dtype(config)
    model = load_model(src, lazy=True, dtype=dtype)
    if is_vlm and "vision_tower" not in model:
        raise ValueError(f"{src} has a vision_config but no vision weights")
    text_model = model.language_model if "language_model" in model else model
    if text_model.has_mtp and not keep_mtp:
        text_model.pop("mtp")
    elif keep_mtp and not text_model.has_mtp:
        raise ValueError(
            f"{src} has no multi-token-prediction weights (mtp.*, with mtp_num_hidden_layers "
            "in config.json) to keep"
        )
    elif keep_mtp:
        warnings.warn(
            "keeping mtp.* weights: mlx-swift-lm would shift every norm a second time, so this "
            "checkpoint is not for Swift apps",
            stacklevel=2,
        )
    config.pop("quantization_config", None)
    if quantize:
        from mlx_lm.utils import quantize_model

        predicate = quant_predicate(
            model, group_size=q_group_size, mixed=mixed, quantize_vision=quantize_vision
        )
        model, config = quantize_model(
            model, config, q_group_size, q_bits, quant_predicate=predicate
        )
        config["quantization"] = {export_name(k): v for k, v in config["quantization"].items()}
        config.pop("quantization_config")  # save_config writes it as a copy of `quantization`
    weights = {export_name(k): v for k, v in tree_flatten(model.parameters())}

    def write(tmp: Path) -> None:
        from mlx_lm.utils import save_config

        write_weights(tmp, weights, progress=progress)
        save_config(config, tmp / "config.json", keep_vision_config=is_vlm)
        for f in extra:
            shutil.copy(f, tmp / f.name)

    return atomic_folder(mlx_path, write, overwrite=overwrite)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m qwen35_mlx.convert",
        description="Convert a Hugging Face Qwen3.5 checkpoint (text, MoE or vision-language) "
        "to MLX: loads in qwen35_mlx, mlx-lm, mlx-vlm and mlx-swift-lm.",
    )
    p.add_argument("--hf-path", required=True, help="Hugging Face checkpoint folder or repo id")
    p.add_argument("--mlx-path", required=True, help="output folder (must not exist)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize (affine)")
    p.add_argument("--q-bits", type=int, default=4, choices=Q_BITS, help="bits (default 4)")
    p.add_argument("--q-group-size", type=int, default=64, choices=Q_GROUP_SIZES, help="group size")
    p.add_argument("--dtype", choices=DTYPES, help="float dtype (default: the checkpoint's)")
    p.add_argument(
        "--mixed", choices=mixed_recipes(), help="mlx-lm mixed-precision recipe (implies -q)"
    )
    p.add_argument("--quantize-vision", action="store_true", help="quantize the vision tower too")
    p.add_argument(
        "--keep-mtp",
        action="store_true",
        help="keep the multi-token-prediction head (speculative decoding here; not for Swift)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --mlx-path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    prog = "python -m qwen35_mlx.convert"
    try:
        with warnings.catch_warnings():
            # A warning (mlx-swift-lm layout, slow BLAS) is one line, like the errors.
            warnings.showwarning = lambda message, *_, **__: print(
                f"{prog}: warning: {message}", file=sys.stderr
            )
            out = convert(
                args.hf_path,
                args.mlx_path,
                quantize=args.quantize,
                q_bits=args.q_bits,
                q_group_size=args.q_group_size,
                dtype=args.dtype,
                mixed=args.mixed,
                quantize_vision=args.quantize_vision,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                keep_mtp=args.keep_mtp,
            )
    except (FileNotFoundError, FileExistsError, ValueError, OSError) as e:
        print(f"python -m qwen35_mlx.convert: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
