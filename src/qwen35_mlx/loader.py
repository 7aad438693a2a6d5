"""Load Qwen3.5 checkpoints: find the files, read safetensors, sanitize, quantize, update.

Two checkpoint kinds, told apart by the safetensors metadata, never by guessing from names:

- Hugging Face (metadata `format: pt`, or none): conv1d `[C, 1, K]`, zero-centred RMSNorm weights,
  `model.language_model.*` / `model.*` prefixes, MoE experts per expert or fused, `mtp.*`. The
  model's own `sanitize` rewrites these (it lives next to the names it rewrites, on the model).
- MLX (metadata `format: mlx`, as mlx-lm and `save_mlx` write it): already sanitized, maybe
  quantized by a `quantization` block in config.json (`group_size`, `bits`, `mode`, and per-module
  overrides keyed by module path).

The loader only does I/O, quantization and `load_weights`. Path problems raise
`FileNotFoundError`; content problems (wrong model_type, corrupt file, missing or unexpected
weights, shape mismatches) raise `ValueError` with a message that names what is wrong.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .models.config import TEXT_MODEL_TYPES, ModelConfig

# Files a checkpoint needs: config, weights, tokenizer, chat template, image/video processor.
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.txt",
    "tokenizer.model",
    "*.tiktoken",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LIST_LIMIT = 12


def resolve_path(path_or_repo: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a Hugging Face repo id downloaded (or found in the cache).

    Downloads show huggingface_hub's progress bar; `HF_HUB_OFFLINE=1` restricts the lookup to the
    local cache. A path that does not exist and is not a repo id raises `FileNotFoundError`.
    """
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file; expected a checkpoint folder")
        return path
    name = str(path_or_repo)
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such checkpoint folder: {name}")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{name}: not a local folder, and not in the Hugging Face cache "
            f"(offline, or the Hub could not be reached): {e}"
        ) from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{name}: not a local folder, and the Hub refused it: {e}") from e


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict; `eos_token_id` from generation_config.json when it has one."""
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a model checkpoint folder")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object")
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        try:
            eos = json.loads(gen_file.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            eos = None
        if eos is not None:
            config["eos_token_id"] = eos
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint: the index's files when there is an index."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are absent: {_short(missing)}")
        return files
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


def _check_safetensors(file: Path) -> None:
    """Raise ValueError naming the file if its header is unreadable or its data is cut short.

    mx.load maps tensors lazily, so a truncated file would otherwise fail much later, inside an
    unrelated eval, with an error that does not name the file.
    """
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except ValueError as e:
        raise ValueError(f"{file}: corrupt safetensors file ({e})") from e
    except (KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: corrupt safetensors header ({e!r})") from e
    if 8 + n + end > size:
        raise ValueError(
            f"{file}: truncated safetensors file ({size} bytes, its header needs {8 + n + end})"
        )


def read_weights(path: Path) -> tuple[dict[str, mx.array], bool]:
    """All tensors of the checkpoint (lazy, mapped by mx.load) and whether it is MLX format."""
    weights: dict[str, mx.array] = {}
    formats = []
    for file in weight_files(path):
        _check_safetensors(file)
        try:
            arrays, metadata = mx.load(str(file), return_metadata=True)
        except Exception as e:  # mlx raises RuntimeError / ValueError with no file name
            raise ValueError(f"{file}: cannot read safetensors file ({e})") from e
        formats.append((metadata or {}).get("format"))
        weights.update(arrays)
    is_mlx = all(f == "mlx" for f in formats)
    if not is_mlx and any(f == "mlx" for f in formats):
        raise ValueError(f"{path}: some shards are MLX format and some are not ({formats})")
    return weights, is_mlx


def model_class(model_type: str):
    """The class for a model_type, imported only when needed."""
    if model_type in TEXT_MODEL_TYPES:
        from .models.text import TextModel

        return TextModel
    from .models.vlm import Model

    return Model


def build_model(config: ModelConfig) -> nn.Module:
    cls = model_class(config.model_type)
    return cls(config.text_config) if config.model_type in TEXT_MODEL_TYPES else cls(config)


def _names_match(model: nn.Module, weights: dict[str, mx.array]) -> bool:
    """Whether the checkpoint names are the model's own (quantization's scales/biases aside)."""
    expected = {k for k, _ in tree_flatten(model.parameters())}
    given = {k for k in weights if not k.endswith((".scales", ".biases"))}
    return given == expected


def _short(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_LIST_LIMIT])
    more = len(names) - _LIST_LIMIT
    return shown + (f", ... and {more} more" if more > 0 else "")


def _quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    q = config.get("quantization")
    if q is None:
        qc = config.get("quantization_config")
        if isinstance(qc, dict) and "bits" in qc and "group_size" in qc:
            q = qc  # mlx-lm writes the same block under both names
        elif qc is not None:
            method = qc.get("quant_method") if isinstance(qc, dict) else qc
            raise ValueError(
                f"quantization_config with quant_method {method!r} is not supported; "
                "convert the checkpoint to MLX format first"
            )
    return q


def apply_quantization(
    model: nn.Module, quantization: dict[str, Any], weights: dict[str, mx.array]
) -> None:
    """Quantize the modules the checkpoint stores quantized (those with `<path>.scales`)."""
    default = {
        "group_size": quantization["group_size"],
        "bits": quantization["bits"],
        "mode": quantization.get("mode", "affine"),
    }

    def predicate(path: str, module: nn.Module):
        override = quantization.get(path)
        if isinstance(override, bool):
            return override
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        if isinstance(override, dict):
            return {**default, **override}
        # No entry for this path (or one keyed by another naming): read group size, bits and
        # mode off the stored shapes, as mlx-lm does, rather than trusting the default.
        try:
            return _infer_quant_params(path, module, weights)
        except (KeyError, ValueError):
            return True

    nn.quantize(model, class_predicate=predicate, **default)


def _infer_quant_params(path: str, module: nn.Module, weights: dict[str, mx.array]) -> dict:
    from mlx_lm.utils import infer_quant_config

    return infer_quant_config(path, module, weights)


def _as_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype in ("float16", "bfloat16", "float32"):
        return getattr(mx, dtype)
    raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")


def _cast(
    weights: dict[str, mx.array], dtype: mx.Dtype | None, cast_predicate
) -> dict[str, mx.array]:
    """Floating weights to `dtype`; those the model's cast_predicate refuses go to fp32."""
    out = {}
    for k, v in weights.items():
        if not mx.issubdtype(v.dtype, mx.floating):
            out[k] = v  # packed quantized weights, integer buffers
        elif not cast_predicate(k):
            out[k] = v.astype(mx.float32)
        elif dtype is not None:
            out[k] = v.astype(dtype)
        else:
            out[k] = v
    return out


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Raise one ValueError listing missing and unexpected names, or naming shape mismatches."""
    expected = dict(tree_flatten(model.parameters()))
    missing = expected.keys() - weights.keys()
    unexpected = weights.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_short(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_short(unexpected)}")
        raise ValueError("checkpoint weights do not match the model; " + "; ".join(parts))
    bad = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in sorted(expected.items())
        if tuple(weights[k].shape) != tuple(v.shape)
    ]
    if bad:
        more = f"; ... and {len(bad) - _LIST_LIMIT} more" if len(bad) > _LIST_LIMIT else ""
        raise ValueError("shape mismatch: " + "; ".join(bad[:_LIST_LIMIT]) + more)


def load_model(
    path: str | os.PathLike, *, lazy: bool = False, dtype: mx.Dtype | str | None = None
) -> nn.Module:
    """Build the model a local checkpoint folder describes and load its weights.

    `dtype` (an mx dtype or its name) casts floating weights (A_log stays float32); None keeps
    the checkpoint's dtypes.
    `lazy=True` leaves the weights mapped and unevaluated until first use.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no such checkpoint folder: {path}")
    config_dict = read_config(path)
    config = ModelConfig.from_dict(config_dict)
    quantization = _quantization(config_dict)  # an unsupported scheme fails before any I/O
    weights, is_mlx = read_weights(path)

    model = build_model(config)
    # MLX checkpoints are already sanitized. One written under another MLX port's names
    # (mlx-lm's `switch_mlp`, say) still goes through sanitize, which then only renames: the
    # layout (conv [C, K, 1], shifted norms) is read from the weights, so nothing shifts twice.
    if not is_mlx or not _names_match(model, weights):
        weights = model.sanitize(weights)
    if quantization is not None:
        apply_quantization(model, quantization, weights)
    weights = _cast(weights, _as_dtype(dtype), model.cast_predicate)
    check_weights(model, weights)
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    return model


def load_tokenizer(path: Path, config_dict: dict[str, Any], model_type: str):
    """mlx-lm's TokenizerWrapper for text models; the image-aware processor for the VLM.

    A qwen3_5 / qwen3_5_moe checkpoint without a vision_config (mlx-lm's text-only conversions)
    gets the plain tokenizer.
    """
    if model_type not in TEXT_MODEL_TYPES and config_dict.get("vision_config") is not None:
        from .processor import load_processor

        return load_processor(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer files (use load_model for weights only)")
    from mlx_lm.tokenizer_utils import load as load_wrapper

    eos = config_dict.get("eos_token_id")
    return load_wrapper(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)


def load(
    path_or_repo: str | os.PathLike, *, lazy: bool = False, dtype: mx.Dtype | str | None = None
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local folder or a Hugging Face repo id.

    For text checkpoints the tokenizer is mlx-lm's `TokenizerWrapper`; for vision-language ones
    it is the processor (tokenizer plus image preprocessing, `.tokenizer` for the text part).
    """
    path = resolve_path(path_or_repo)
    model = load_model(path, lazy=lazy, dtype=dtype)
    config_dict = read_config(path)
    return model, load_tokenizer(path, config_dict, config_dict["model_type"])
