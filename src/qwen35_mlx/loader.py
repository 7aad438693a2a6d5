"""Load Qwen3.5 checkpoints through mlx-lm's loader, with the checks and errors it lacks.

`mlx_lm.utils.load_model` (its `get_model_classes` hook hands it our model) reads the shards,
runs the model's `sanitize` (idempotent: it reads from the weights what still needs rewriting,
so Hugging Face and MLX checkpoints go the same way), quantizes what the checkpoint stores
quantized and calls `load_weights`. Around it we keep what it lacks:
- before it: config.json read and checked (`read_model_config`; the CLI reads it before importing
  mlx-lm and transformers), an unsupported quantization refused, the shards matched against
  model.safetensors.index.json (mlx-lm globs `model*.safetensors`: a stray shard would be read,
  an absent one not named; here either is an error naming the file), each shard's header opened
  with the lazy `mx.load` so that a truncated or corrupt file is named;
- at its `load_weights` call (shadowed on the instance for that call: mlx-lm has no hook between
  quantizing and loading): floating weights cast to `dtype` (A_log stays float32), then
  `check_weights`, one line for what is missing, unexpected, mis-shaped or of the wrong dtype
  (strict `load_weights` lists names one a line, uncounted, and checks no dtype).

Path problems raise `FileNotFoundError`; content problems (wrong model_type, a required config
field missing, truncated or corrupt safetensors, missing or unexpected weights, shape or dtype
mismatches, a tokenizer that cannot encode text) raise `ValueError` with one line that names
what is wrong. A weight's dtype must fit its parameter: floating for a floating parameter (then
cast), uint32 for the packed weight of a quantized module.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
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


def read_model_config(path: Path) -> tuple[dict[str, Any], ModelConfig]:
    """config.json as a dict and as a checked `ModelConfig` (errors name the file)."""
    config_dict = read_config(path)
    try:
        return config_dict, ModelConfig.from_dict(config_dict)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from e


def is_vision_language(config_dict: dict[str, Any]) -> bool:
    """Whether a config.json describes a vision-language model (a qwen3_5 / qwen3_5_moe
    checkpoint without a vision_config, as mlx-lm's text-only conversions write, is text)."""
    return (
        config_dict.get("model_type") not in TEXT_MODEL_TYPES
        and config_dict.get("vision_config") is not None
    )


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, `model*.safetensors` (what mlx-lm's loader reads);
    with model.safetensors.index.json, exactly the files it names: an absent shard, or a
    `model*.safetensors` the index does not name, is an error naming the file."""
    files = sorted(path.glob("model*.safetensors"))
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        if not files:
            raise FileNotFoundError(f"no model*.safetensors weights in {path}")
        return files
    try:
        named = set(json.loads(index.read_text())["weight_map"].values())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({e})") from e
    missing = [name for name in named if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names shards that are absent: {_short(missing)}")
    stray = [f.name for f in files if f.name not in named]
    if stray:
        raise ValueError(
            f"{path}: shards the index does not name (move them away): {_short(stray)}"
        )
    unread = [name for name in named if not re.fullmatch(r"model.*\.safetensors", name)]
    if unread:
        raise ValueError(f"{index}: shards not named model*.safetensors: {_short(unread)}")
    return files


def read_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of the checkpoint, mapped lazily by mx.load (which checks each file's header
    and data offsets); ValueError naming a truncated or corrupt file."""
    weights: dict[str, mx.array] = {}
    for file in weight_files(path):
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError, OSError) as e:  # mlx's messages name no file
            msg = " ".join(str(e).split())
            raise ValueError(f"{file}: truncated or corrupt safetensors file ({msg})") from e
    return weights


def build_model(
    config: ModelConfig, text_model: type | None = None, vlm_model: type | None = None
) -> nn.Module:
    """Our model for `config`: `text_model(config.text_config)` for a text checkpoint, else
    `vlm_model(config)`; TextModel and models.vlm.Model unless a host plugin passes subclasses."""
    if config.model_type in TEXT_MODEL_TYPES:
        if text_model is None:
            from .models.text import TextModel as text_model
        return text_model(config.text_config)
    if vlm_model is None:
        from .models.vlm import Model as vlm_model
    return vlm_model(config)


def _short(items, sep: str = ", ") -> str:
    """Sorted, at most `_LIST_LIMIT` shown, the rest counted."""
    items = sorted(items)
    more = len(items) - _LIST_LIMIT
    return sep.join(items[:_LIST_LIMIT]) + (f"{sep}... and {more} more" if more > 0 else "")


def _quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    q = config.get("quantization")
    if q is None:
        qc = config.get("quantization_config")
        if qc is None:  # mlx-lm takes a vision-language config's block from its text_config
            qc = (config.get("text_config") or {}).get("quantization_config")
        if isinstance(qc, dict) and "bits" in qc and "group_size" in qc:
            q = qc  # mlx-lm writes the same block under both names
        elif qc is not None:
            method = qc.get("quant_method") if isinstance(qc, dict) else qc
            raise ValueError(
                f"quantization_config with quant_method {method!r} is not supported; "
                "convert the checkpoint to MLX format first"
            )
    return q


def _as_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype in ("float16", "bfloat16", "float32"):
        return getattr(mx, dtype)
    raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")


def _cast(weights: dict[str, mx.array], dtype: mx.Dtype | None, keep) -> dict[str, mx.array]:
    """Floating weights to `dtype`, but those the model's cast_predicate `keep` refuses (A_log,
    which sanitize already made fp32); packed quantized weights stay as they are."""
    if dtype is None:
        return weights
    return {
        k: v.astype(dtype) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in weights.items()
    }


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """One ValueError line for missing and unexpected names (counted, the list truncated), then
    for shape mismatches, then for dtypes that do not fit (a floating parameter takes a floating
    weight, cast on load; the packed weight of a quantized module must be uint32)."""
    expected = dict(tree_flatten(model.parameters()))
    missing = expected.keys() - weights.keys()
    unexpected = weights.keys() - expected.keys()
    parts = [
        f"{len(n)} {what}: {_short(n)}"
        for what, n in [("missing", missing), ("unexpected", unexpected)]
        if n
    ]
    if parts:
        raise ValueError("checkpoint weights do not match the model; " + "; ".join(parts))
    params = sorted(expected.items())
    bad = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(p.shape)}"
        for k, p in params
        if weights[k].shape != p.shape
    ]
    if bad:
        raise ValueError("shape mismatch: " + _short(bad, sep="; "))
    bad = [
        f"{k}: checkpoint {weights[k].dtype} vs model {p.dtype}"
        for k, p in params
        if not _dtype_fits(weights[k].dtype, p.dtype)
    ]
    if bad:
        raise ValueError("wrong weight dtype: " + _short(bad, sep="; "))


def _dtype_fits(given: mx.Dtype, wanted: mx.Dtype) -> bool:
    if mx.issubdtype(wanted, mx.floating):
        return mx.issubdtype(given, mx.floating)
    return given == wanted


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
    return _load_model(path, *read_model_config(path), lazy=lazy, dtype=dtype)


def _load_model(
    path: Path, config_dict: dict[str, Any], config: ModelConfig, *, lazy: bool, dtype
) -> nn.Module:
    quantization = _quantization(config_dict)  # an unsupported scheme fails before any I/O
    dtype = _as_dtype(dtype)
    read_weights(path)  # shards as the index says, each file readable: errors name the file
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model = build_model(config)
    load_weights = model.load_weights

    def checked_load_weights(weights, strict: bool = True) -> nn.Module:
        weights = _cast(dict(weights), dtype, model.cast_predicate)
        check_weights(model, weights)  # one line for what strict would list name by name
        return load_weights(list(weights.items()), strict=False)

    model.load_weights = checked_load_weights
    try:
        mlx_lm_load_model(
            path,
            lazy=lazy,
            model_config=None if quantization is None else {"quantization": quantization},
            get_model_classes=lambda config: (lambda _args: model, _Prebuilt),
        )
    except KeyError as e:  # infer_quant_config: a module has scales but no packed weight
        raise ValueError(
            f"{path}: checkpoint weights do not match the model; missing: {e.args[0]}"
        ) from e
    finally:
        del model.load_weights
    return model


class _Prebuilt:
    """The model-args class handed to mlx-lm's loader: the model is built and checked already."""

    @staticmethod
    def from_dict(_config: dict[str, Any]) -> None:
        return None


def load_tokenizer(path: Path, config_dict: dict[str, Any], model_type: str):
    """mlx-lm's TokenizerWrapper for text models; the image-aware processor for the VLM.

    A qwen3_5 / qwen3_5_moe checkpoint without a vision_config (mlx-lm's text-only conversions)
    gets the plain tokenizer.
    """
    if is_vision_language({**config_dict, "model_type": model_type}):
        from .processor import load_processor

        with _tokenizer_errors(path):
            processor = load_processor(path)
        check_tokenizer(processor, path)
        _keep_leading_space(processor.tokenizer)
        return processor
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer files (use load_model for weights only)")
    from mlx_lm.tokenizer_utils import load as load_wrapper

    eos = config_dict.get("eos_token_id")
    with _tokenizer_errors(path):
        tokenizer = load_wrapper(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    check_tokenizer(tokenizer, path)
    _keep_leading_space(tokenizer)
    return tokenizer


def _keep_leading_space(wrapper: Any) -> None:
    """Streamed text equal to `tokenizer.decode(tokens)`, as batch_generate's texts are.

    mlx-lm's byte-level BPE streaming detokenizer drops a space that starts the first token
    (an SPM habit), where the tokenizer's own decode, for Qwen's byte-level BPE, keeps it.
    """
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    det = getattr(wrapper, "_detokenizer", None)
    if type(det) is BPEStreamingDetokenizer:
        det.__class__ = _plain_bpe_detokenizer()


@functools.cache
def _plain_bpe_detokenizer() -> type:
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    class PlainBPEDetokenizer(BPEStreamingDetokenizer):
        def _maybe_trim_space(self, current_text: str) -> str:
            return current_text

    return PlainBPEDetokenizer


@contextlib.contextmanager
def _tokenizer_errors(path: Path):
    """transformers' errors for broken tokenizer files name no folder: add it."""
    try:
        yield
    except (ValueError, OSError, TypeError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot load the tokenizer ({' '.join(str(e).split())})") from e


TOKENIZER_PROBE = "Hello, world"


def check_tokenizer(tokenizer: Any, path: Path) -> None:
    """Raise ValueError naming `path` unless the tokenizer encodes a known string to a non-empty
    id list that decodes back to it.

    transformers builds an empty tokenizer from a folder that has tokenizer_config.json but no
    tokenizer.json (or vocabulary files); every prompt would then encode to []. The known string
    is "Hello, world"; a vocabulary that cannot spell it (a word-level test tokenizer mapping it
    to <unk>) gets a second string, decoded from three of its own ordinary tokens.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)

    def round_trip(text: str) -> tuple[list[int], str]:
        ids = list(tok.encode(text, add_special_tokens=False))
        return ids, (tok.decode(ids) if ids else "")

    try:
        ids, back = round_trip(TOKENIZER_PROBE)
        ok = bool(ids) and back.strip() == TOKENIZER_PROBE
        if ids and not ok:
            special = set(getattr(tok, "all_special_ids", None) or [])
            plain = [i for i in range(len(tok)) if i not in special]
            mid = len(plain) // 2
            text = tok.decode(plain[mid : mid + 3])
            ok = bool(text.strip()) and round_trip(text)[1] == text
    except Exception as e:  # noqa: BLE001  (whatever a broken tokenizer raises)
        raise ValueError(f"{path}: the tokenizer cannot encode text ({e!r})") from e
    if not ok:
        files = sorted(p.name for p in path.iterdir() if "token" in p.name or p.suffix == ".model")
        raise ValueError(
            f"{path}: the tokenizer does not work: {TOKENIZER_PROBE!r} encodes to {ids[:8]} and "
            f"decodes to {back!r} (tokenizer.json or vocabulary files missing or broken? "
            f"tokenizer files present: {', '.join(files) or 'none'})"
        )


def load(
    path_or_repo: str | os.PathLike, *, lazy: bool = False, dtype: mx.Dtype | str | None = None
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local folder or a Hugging Face repo id.

    For text checkpoints the tokenizer is mlx-lm's `TokenizerWrapper`; for vision-language ones
    it is the processor (tokenizer plus image preprocessing, `.tokenizer` for the text part).
    """
    path = resolve_path(path_or_repo)
    config_dict, config = read_model_config(path)  # read once, for the model and the tokenizer
    model = _load_model(path, config_dict, config, lazy=lazy, dtype=dtype)
    return model, load_tokenizer(path, config_dict, config.model_type)
