"""Load Qwen3.5 checkpoints through mlx-lm's loader, with the checks and errors it lacks.

`mlx_lm.utils.load_model` (its `get_model_classes` hook hands it our model) reads the shards,
runs the model's `sanitize` (idempotent: it reads from the weights what still needs rewriting,
so Hugging Face and MLX checkpoints go the same way), quantizes what the checkpoint stores
quantized and calls `load_weights`. Around it we keep what it lacks:
- before it: config.json read and checked (`read_model_config`; the CLI reads it before importing
  mlx-lm and transformers), an unsupported quantization refused, the shards matched against
  model.safetensors.index.json (mlx-lm globs `model*.safetensors`: a stray shard would be read,
  an absent one not named; here either is an error naming the file), each shard's header opened
  with the lazy `mx.load` that mlx-lm reads it with (it raises on a truncated or corrupt file, as
  safetensors' `safe_open` does, but neither names the file: we catch and name it);
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
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS  # what its loader and tokenizer read

    try:
        return Path(snapshot_download(name, allow_patterns=DEFAULT_ALLOW_PATTERNS))
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


def read_weights(path: Path) -> dict[str, mx.array]:
    """All tensors of the `model*.safetensors` shards (the files mlx-lm's loader reads), mapped
    lazily by mx.load, which checks each file's header and data offsets; its errors name no file,
    so a truncated or corrupt one is named here. With model.safetensors.index.json, an absent
    shard, or a stray one the index does not name (mlx-lm would read it too), is named as well."""
    files = sorted(path.glob("model*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from e
        if missing := [name for name in named if not (path / name).is_file()]:
            raise FileNotFoundError(f"{index} names shards that are absent: {_short(missing)}")
        if stray := [f.name for f in files if f.name not in named]:
            raise ValueError(f"{path}: shards the index does not name: {_short(stray)}")
    if not files:
        raise FileNotFoundError(f"no model*.safetensors weights in {path}")
    weights: dict[str, mx.array] = {}
    for file in files:
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
    """The MLX quantization block, None when unquantized. mlx-lm writes it as `quantization` and
    as `quantization_config` (a vision-language config may hold it in its text_config only, where
    mlx-lm's loader takes the second for a scheme such as fp8 or AWQ): our sanitize reads no
    such scheme, so one is refused here, before any I/O."""
    q = config.get("quantization") or config.get("quantization_config")
    q = q or (config.get("text_config") or {}).get("quantization_config")
    if q is None or (isinstance(q, dict) and "bits" in q and "group_size" in q):
        return q
    method = q.get("quant_method") if isinstance(q, dict) else q
    raise ValueError(
        f"quantization_config with quant_method {method!r} is not supported; "
        "convert the checkpoint to MLX format first"
    )


def _as_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype in ("float16", "bfloat16", "float32"):
        return getattr(mx, dtype)
    raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """One ValueError line for missing and unexpected names (counted, the list truncated), else
    for weights whose shape or dtype does not fit (a floating parameter takes a floating weight,
    cast on load; the packed weight of a quantized module must be uint32). mlx's strict
    `load_weights` stops at the first kind, lists names one a line and checks no dtype."""
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
    bad = [
        f"{k}: checkpoint {tuple(w.shape)} {w.dtype} vs model {tuple(p.shape)} {p.dtype}"
        for k, p in expected.items()
        if (w := weights[k]).shape != p.shape or not _dtype_fits(w.dtype, p.dtype)
    ]
    if bad:
        raise ValueError("weights whose shape or dtype do not fit the model: " + _short(bad, "; "))


def _dtype_fits(given: mx.Dtype, wanted: mx.Dtype) -> bool:
    floating = mx.issubdtype(wanted, mx.floating)
    return mx.issubdtype(given, mx.floating) if floating else given == wanted


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
        weights = dict(weights)
        if dtype is not None:  # floating weights but A_log (cast_predicate); packed ones stay
            for k, v in weights.items():
                if model.cast_predicate(k) and mx.issubdtype(v.dtype, mx.floating):
                    weights[k] = v.astype(dtype)
        check_weights(model, weights)
        return load_weights(list(weights.items()), strict=False)

    model.load_weights = checked_load_weights
    try:
        mlx_lm_load_model(
            path,
            lazy=lazy,
            model_config=None if quantization is None else {"quantization": quantization},
            # The model is built: its args class (ModelConfig) only parses the config again.
            get_model_classes=lambda config: (lambda _args: model, ModelConfig),
        )
    except KeyError as e:  # infer_quant_config: a module has scales but no packed weight
        raise ValueError(
            f"{path}: checkpoint weights do not match the model; missing: {e.args[0]}"
        ) from e
    finally:
        del model.load_weights
    from .models.mtp import read_draft_vocab, use_draft_vocab  # (models: after the CLI's checks)

    draft_vocab = read_draft_vocab(path)
    if draft_vocab is not None and "mtp" in getattr(model, "language_model", model):
        use_draft_vocab(model, draft_vocab)  # the MTP head drafts over these tokens only
    return model


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

    eos = config_dict.get("eos_token_id")  # an int or a list, as mlx-lm takes it
    with _tokenizer_errors(path):
        tokenizer = load_wrapper(path, eos_token_ids=eos)
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
