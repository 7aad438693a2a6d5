"""Prompt-cache reuse across requests: multi-turn chat, repeated system prompts.

`PromptCache` keeps the model cache of the previous prompt + generation and the token ids it
holds. On the next request only the part of the prompt after the longest reusable prefix is
prefilled.

Attention KV caches can be trimmed back to any prefix; the linear-attention layers cannot: their
conv state `[B, K-1, C]` and fp32 recurrent state `[B, Hv, Dv, Dk]` fold every token in. So the
cache keeps snapshots of those two states at prefix boundaries: the end of every prompt, and the
position just before each boundary token (`<|im_start|>` for chat models: where a turn begins),
since a re-rendered chat history usually departs from the generated tokens inside the last
assistant turn. A request reuses

- the whole live cache, when the live tokens are a prefix of the new prompt; else
- the longest snapshot whose tokens are a prefix of the new prompt: linear states restored from
  it, KV caches trimmed to its length; else
- nothing (cold prefill).

Snapshots hold references to the state arrays, not copies: the model replaces those arrays on
every call instead of writing into them, so a snapshot stays valid.

Files (`save` / `load`) are mlx-lm's prompt-cache file (one safetensors file, the layout of
`save_prompt_cache`: arrays `"<layer>.<path in .state>"`, metadata `[metadata, classes, scalars]`),
so mlx-lm's `load_prompt_cache` reads the live cache of ours and ours reads mlx-lm's (given the
token ids under `TOKENS_KEY`). On top of that layout a file of ours holds

- the snapshots, as extra list entries after the layers (entry `n_layers + s` holds snapshot `s`'s
  states of the non-trimmable layers). mlx-lm lists one class per layer and pairs classes with
  entries, so it ignores them;
- the model's fingerprint (`model_fingerprint`): model type, layer types, head counts and dims,
  weight dtypes, the dtypes of the saved states, a hash of the config and a digest of the
  weights (name, dtype, shape and first values of every parameter: it tells apart two
  checkpoints with one config, e.g. a base and an instruct model). `load` refuses another model;
- a vision-language model's M-RoPE shift (the per-row step from the cache offset to the next
  position, which the model keeps on the cache object, not in its state) of the live cache and
  of each snapshot: without it a conversation with an image would go on at plain positions.
  Restoring a snapshot puts back its own shift (none for one taken before the first image);
- a SHA-256 checksum over every array and metadata entry; `load` refuses a file that does not
  match it. The file is written to a temporary file in the same folder and renamed into place.

Files without a fingerprint or checksum (written by mlx-lm) load after a structural check only:
one cache per layer, each layer's state laid out as the model's cache expects, the attention
caches holding as many tokens as the token ids list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .models.cache import MROPE_PROMPT, MROPE_SHIFT, LinearCache, mrope_holder
from .models.config import TEXT_REQUIRED

TOKENS_KEY = "qwen35_mlx_tokens"  # no dots: mlx-lm unflattens metadata keys on "."


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _trimmable(c: Any) -> bool:
    """Trimmable by any number of tokens (a LinearCache rolls back only a few: not that)."""
    return hasattr(c, "is_trimmable") and c.is_trimmable() and not isinstance(c, LinearCache)


def _saved_state(state: Any) -> Any:
    # ArraysCache.state is (list of arrays, left_padding, lengths); the model assigns new arrays
    # into that list, so keep a copy of the containers (the arrays are never written to).
    return _copy_tree(state)


def _size(c: Any) -> int:
    return c.offset if hasattr(c, "offset") and isinstance(c.offset, int) else c.size()


def _mrope_shift(cache: list, n: int) -> np.ndarray | None:
    """The VLM's M-RoPE shift [B] of `cache`, which holds `n` tokens (None: plain positions).

    Inside a multimodal prompt (prefilled in steps, a snapshot point between them) the shift
    recorded for the whole prompt does not hold yet: the next text position is one past the
    highest position so far."""
    holder = mrope_holder(cache)
    shift = getattr(holder, MROPE_SHIFT, None)
    prompt = getattr(holder, MROPE_PROMPT, None)
    if shift is None:
        return None
    if prompt is not None:
        start, positions = prompt
        if start < n < start + positions.shape[-1]:
            done = np.array(positions[..., : n - start])  # [3, B, n - start]
            return done.max(axis=(0, 2)).astype(np.int64) + 1 - n
    return np.array(shift, np.int64)


def _set_mrope_shift(cache: list, shift: Any) -> None:
    """Give `cache` the M-RoPE shift `shift` (None: plain positions) and no multimodal prompt."""
    holder = mrope_holder(cache)
    if holder is None:
        return
    for name in (MROPE_SHIFT, MROPE_PROMPT):
        if hasattr(holder, name):
            delattr(holder, name)
    if shift is not None:
        setattr(holder, MROPE_SHIFT, np.array(shift, np.int64))


def _trim_to(c: Any, n: int) -> None:
    """Trim a trimmable layer cache back to its first `n` tokens."""
    size = _size(c)
    if size > n:
        c.trim(size - n)


class PromptCache:
    """The cache of the last request plus snapshots of the linear-attention states.

    Pass it as `prompt_cache=` to `stream_generate` / `generate`; it is updated after each call.
    `last_reused` / `last_prefilled` tell how many prompt tokens the last request took from the
    cache and how many it had to run through the model.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        boundary_tokens: Iterable[int] = (),
        max_snapshots: int = 8,
    ):
        self.model = model
        self.boundary_tokens = set(boundary_tokens)
        self.max_snapshots = max_snapshots
        self.cache: list | None = None
        self.tokens: list[int] = []
        # (tokens, per-layer saved state or None for trimmable layers), oldest first
        self.snapshots: list[tuple[list[int], list[Any]]] = []
        # A VLM's M-RoPE shift at each snapshot (by its tokens), None for plain positions.
        self.snapshot_shifts: dict[tuple[int, ...], np.ndarray | None] = {}
        self.last_reused = 0
        self.last_prefilled = 0
        self.metadata: dict[str, str] = {}  # what `save(metadata=...)` stored, after `load`

    @classmethod
    def for_tokenizer(cls, model: nn.Module, tokenizer: Any, **kwargs) -> PromptCache:
        """A cache whose boundary tokens are the tokenizer's `<|im_start|>` (chat turns)."""
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        ids = []
        vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
        if "<|im_start|>" in vocab:
            ids.append(vocab["<|im_start|>"])
        return cls(model, boundary_tokens=ids, **kwargs)

    def __len__(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        """Forget everything: the next request prefills cold."""
        self.cache, self.tokens, self.snapshots = None, [], []
        self.snapshot_shifts = {}

    # The three calls stream_generate makes: fetch -> snapshot_points/snapshot -> commit.

    def fetch(self, prompt: Sequence[int], *, keep_last: bool = True) -> tuple[list, list[int]]:
        """A cache holding the longest reusable prefix of `prompt`, and the tokens still to run.

        With `keep_last` at least the last prompt token is left to run (its logits start
        generation).
        """
        prompt = list(prompt)
        limit = len(prompt) - 1 if keep_last else len(prompt)
        n_live = min(_common_prefix(self.tokens, prompt), limit)
        cache, k = None, 0
        if self.cache is not None and n_live > 0:
            if n_live == len(self.tokens):
                cache, k = self.cache, n_live
            elif all(_trimmable(c) for c in self.cache):
                cache, k = self._trim(n_live), n_live
            else:
                fits = [s for s in self.snapshots if 0 < len(s[0]) <= n_live]
                if fits:
                    best = max(fits, key=lambda s: len(s[0]))  # the first longest
                    cache, k = self._restore(*best), len(best[0])
        if cache is None:
            cache, k = self.model.make_cache(), 0
            self.snapshots = []
        self.cache, self.tokens = cache, prompt[:k]
        self.last_reused, self.last_prefilled = k, len(prompt) - k
        return cache, prompt[k:]

    def extend(self, tokens: Sequence[int], *, prefill_step_size: int = 2048) -> None:
        """Run `tokens` into the cache without generating (reusing what it can), e.g. to warm it
        with a system prompt before `save`; a later prompt that starts with `tokens` reuses them
        all, in this process or after `load`."""
        from .generation import prefill

        tokens = list(tokens)
        cache, todo = self.fetch(tokens, keep_last=False)
        start = len(tokens) - len(todo)
        try:
            prefill(
                self.model,
                cache,
                todo,
                prefill_step_size=prefill_step_size,
                stops=[p - start for p in self.snapshot_points(tokens, start)],
                on_stop=lambda n: self.snapshot(cache, tokens[: start + n]),
            )
        except BaseException:
            self.reset()
            raise
        self.commit(cache, tokens)

    def snapshot_points(self, prompt: Sequence[int], start: int) -> list[int]:
        """Prefix lengths in `(start, len(prompt))` where a snapshot is wanted: just before each
        boundary token."""
        return [i for i in range(start + 1, len(prompt)) if prompt[i] in self.boundary_tokens]

    def snapshot(self, cache: list, tokens: Sequence[int]) -> None:
        """Remember the non-trimmable layer states of `cache`, which holds exactly `tokens`."""
        tokens = list(tokens)
        self.snapshots = [s for s in self.snapshots if s[0] != tokens]
        saved = [None if _trimmable(c) else _saved_state(c.state) for c in cache]
        self.snapshots.append((tokens, saved))
        self.snapshot_shifts[tuple(tokens)] = _mrope_shift(cache, len(tokens))
        if len(self.snapshots) > self.max_snapshots:
            self.snapshots.pop(0)
        self._drop_stale_shifts()

    def commit(self, cache: list, tokens: Sequence[int]) -> None:
        """After a request: `cache` holds exactly `tokens`; drop snapshots it no longer extends."""
        self.cache, self.tokens = cache, list(tokens)
        self.snapshots = [
            s for s in self.snapshots if self.tokens[: len(s[0])] == s[0] and len(s[0]) > 0
        ]
        self._drop_stale_shifts()

    def _drop_stale_shifts(self) -> None:
        kept = {tuple(s[0]) for s in self.snapshots}
        self.snapshot_shifts = {k: v for k, v in self.snapshot_shifts.items() if k in kept}

    def _trim(self, n: int) -> list:
        for c in self.cache:
            _trim_to(c, n)
        return self.cache

    def _restore(self, tokens: list[int], saved: list[Any]) -> list:
        for c, s in zip(self.cache, saved, strict=True):
            if s is None:
                _trim_to(c, len(tokens))
            else:
                c.state = _saved_state(s)
        # The live cache's M-RoPE shift belongs to its last prompt: put back the snapshot's.
        _set_mrope_shift(self.cache, self.snapshot_shifts.get(tuple(tokens)))
        return self.cache

    # Files: mlx-lm's prompt-cache layout plus token ids, snapshots, fingerprint and checksum.

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        """Write the live cache, its token ids and the snapshots to one `.safetensors` file.

        The file is written whole to a temporary file next to `path`, then renamed over it: a
        failed save leaves any earlier file at `path` as it was. `metadata` (str -> str, keys
        without dots) is stored with the file.
        """
        if self.cache is None:
            raise ValueError("nothing to save: the prompt cache is empty")
        path = Path(path)
        folder = path.parent
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (saving the prompt cache {path})")
        meta = _user_metadata(metadata)

        keep = [i for i, c in enumerate(self.cache) if not _trimmable(c)]
        snaps, lengths = [], []
        for tokens, saved in self.snapshots:
            if [i for i, s in enumerate(saved) if s is not None] != keep:
                raise ValueError("a snapshot does not match the cache's layers; call reset()")
            snaps.append([saved[i] for i in keep])
            # a prefix of the live tokens is stored as its length
            n = len(tokens)
            lengths.append(n if self.tokens[:n] == tokens else tokens)

        live = [c.state for c in self.cache]
        flat, scalars = _to_arrays(tree_flatten(live + snaps))
        fingerprint = model_fingerprint(self.model)
        fingerprint["state_dtypes"] = _state_dtypes(flat, len(live))
        settings = {
            "format": FORMAT,
            "boundary_tokens": sorted(self.boundary_tokens),
            "max_snapshots": self.max_snapshots,
            "snapshot_layers": keep,
        }
        metas = [_meta_state(c) for c in self.cache]
        if any(metas):
            settings["meta_state"] = metas
        shifts = [_mrope_shift(self.cache, len(self.tokens))]
        shifts += [self.snapshot_shifts.get(tuple(t)) for t, _ in self.snapshots]
        if any(x is not None for x in shifts):
            settings["mrope_shift"] = [None if x is None else x.tolist() for x in shifts]
        meta.update(
            {
                TOKENS_KEY: json.dumps(self.tokens),
                SNAPSHOTS_KEY: json.dumps(lengths),
                SETTINGS_KEY: json.dumps(settings),
                FINGERPRINT_KEY: json.dumps(fingerprint, sort_keys=True),
            }
        )
        classes = [type(c).__name__ for c in self.cache]
        flat_meta = dict(tree_flatten([meta, classes, scalars]))
        flat_meta[_CHECKSUM_FLAT] = _checksum(flat, flat_meta)

        # mx.save_safetensors appends ".safetensors" to other names: give the temporary file one.
        tmp = folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.safetensors"
        try:
            mx.save_safetensors(str(tmp), flat, flat_meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (RuntimeError, OSError) as e:
            raise OSError(f"{path}: could not write the prompt cache: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, **kwargs) -> PromptCache:
        """A PromptCache from a file written by `save` (or by mlx-lm's `save_prompt_cache` with
        the token ids under `TOKENS_KEY` in its metadata), snapshots included.

        Raises `FileNotFoundError` for a missing file and `ValueError`, naming the file, for a
        damaged one (unreadable, truncated, checksum mismatch, inconsistent contents) or one
        saved from another model. `boundary_tokens` / `max_snapshots` default to the saved ones.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such prompt-cache file")
        if path.is_dir():
            raise ValueError(f"{path}: is a folder, not a prompt-cache file")
        try:
            arrays, flat_meta = mx.load(str(path), format="safetensors", return_metadata=True)
        except (RuntimeError, ValueError, OSError) as e:
            raise ValueError(f"{path}: not a readable prompt-cache file (damaged?): {e}") from None
        return cls._from_file(path, arrays, flat_meta, model, kwargs)

    @classmethod
    def _from_file(cls, path, arrays, flat_meta, model, kwargs) -> PromptCache:
        def bad(what: str) -> ValueError:
            return ValueError(f"{path}: {what}")

        try:
            meta, classes, scalars = tree_unflatten(list(flat_meta.items()))
            assert isinstance(meta, dict) and isinstance(classes, list)
            assert isinstance(scalars, list) and all(isinstance(c, str) for c in classes)
        except (AssertionError, ValueError, TypeError):
            raise bad("not a prompt-cache file (no mlx-lm prompt-cache metadata)") from None
        if TOKENS_KEY not in meta:
            raise bad(f"no token ids in this prompt-cache file ({TOKENS_KEY})")

        checksum = flat_meta.get(_CHECKSUM_FLAT)
        if checksum is not None:
            try:
                actual = _checksum(arrays, flat_meta)
            except (RuntimeError, ValueError) as e:
                raise bad(f"the data cannot be read (damaged?): {e}") from None
            if actual != checksum:
                raise bad("checksum mismatch: the file is damaged")

        settings = _json(meta, SETTINGS_KEY, dict, bad) or {}
        version = settings.get("format", FORMAT)
        if not isinstance(version, int) or version > FORMAT:
            raise bad(f"written in another prompt-cache format ({version!r}; this reads {FORMAT})")
        saved_fp = _json(meta, FINGERPRINT_KEY, dict, bad)
        if saved_fp is not None:
            _check_fingerprint(saved_fp, model_fingerprint(model), bad)

        try:
            for key, kind in scalars[1:]:
                a = arrays[key]
                if kind == "scalar":
                    arrays[key] = a.item()
                elif kind == "string":
                    arrays[key] = "".join(chr(i) for i in a.tolist())
                elif kind == "none":
                    arrays[key] = None
                else:
                    raise ValueError(kind)
            tree = tree_unflatten(list(arrays.items())) if arrays else []
            assert isinstance(tree, list)
        except (AssertionError, KeyError, ValueError, TypeError):
            raise bad("the stored arrays do not follow the prompt-cache layout") from None
        if saved_fp is not None and "state_dtypes" in saved_fp:
            if _state_dtypes(arrays, len(classes)) != saved_fp["state_dtypes"]:
                raise bad("the stored state dtypes differ from the ones its fingerprint lists")

        tokens = _json(meta, TOKENS_KEY, list, bad)
        if not all(isinstance(t, int) and t >= 0 for t in tokens):
            raise bad("the token ids are not a list of non-negative integers")

        cache = model.make_cache()
        if len(classes) != len(cache):
            raise bad(f"{len(classes)} layer caches, the model has {len(cache)}")
        layouts = [_layout(c.state) for c in cache]
        for i, c in enumerate(cache):
            state = tree[i] if i < len(tree) else None
            if _layout(state) != layouts[i]:
                raise bad(
                    f"layer {i} holds a {classes[i]} state; the model's {type(c).__name__} "
                    "keeps another layout"
                )
            try:
                c.state = _copy_tree(state)
            except (TypeError, ValueError, RuntimeError) as e:
                raise bad(f"layer {i}'s saved state does not fit the model's cache: {e}") from None
            if _trimmable(c) and _size(c) != len(tokens):
                raise bad(f"layer {i} holds {_size(c)} tokens, the file lists {len(tokens)} ids")
        metas = settings.get("meta_state")
        if metas is not None:
            if not isinstance(metas, list) or len(metas) != len(cache):
                raise bad("meta_state does not list one entry per layer")
            for c, m in zip(cache, metas, strict=True):
                if m:
                    c.meta_state = m

        keep = [i for i, c in enumerate(cache) if not _trimmable(c)]
        lengths = _json(meta, SNAPSHOTS_KEY, list, bad) or []
        if settings.get("snapshot_layers", keep) != keep:
            raise bad("the snapshots were taken of other layers than the model's")
        snapshots = []
        for s, entry in enumerate(lengths):
            if isinstance(entry, int) and 0 < entry <= len(tokens):
                snap_tokens = tokens[:entry]
            elif isinstance(entry, list) and entry and all(isinstance(t, int) for t in entry):
                snap_tokens = entry
            else:
                raise bad(f"snapshot {s} has no valid token ids")
            states = tree[len(cache) + s] if len(cache) + s < len(tree) else []
            if not isinstance(states, list) or len(states) != len(keep):
                raise bad(f"snapshot {s} does not hold one state per linear-attention layer")
            saved: list[Any] = [None] * len(cache)
            for j, st in zip(keep, states, strict=True):
                if _layout(st) != layouts[j]:
                    raise bad(
                        f"snapshot {s}, layer {j}: the state's layout differs from the model's"
                    )
                saved[j] = _copy_tree(st)
            snapshots.append((snap_tokens, saved))

        shifts = settings.get("mrope_shift", [None] * (1 + len(snapshots)))
        if not isinstance(shifts, list) or len(shifts) != 1 + len(snapshots):
            raise bad("mrope_shift does not list one entry for the cache and each snapshot")
        for x in shifts:
            if x is not None and not (isinstance(x, list) and all(type(v) is int for v in x)):
                raise bad("mrope_shift holds an entry that is not a list of integers")
        _set_mrope_shift(cache, shifts[0])

        kwargs.setdefault("boundary_tokens", settings.get("boundary_tokens", ()))
        kwargs.setdefault("max_snapshots", settings.get("max_snapshots", 8))
        out = cls(model, **kwargs)
        out.cache, out.tokens, out.snapshots = cache, tokens, snapshots
        out.snapshot_shifts = {
            tuple(t): None if x is None else np.array(x, np.int64)
            for (t, _), x in zip(snapshots, shifts[1:], strict=True)
        }
        out.metadata = {k: v for k, v in meta.items() if k not in _OURS and isinstance(v, str)}
        return out


# Prompt-cache files

FORMAT = 1
SNAPSHOTS_KEY = "qwen35_mlx_snapshots"  # per snapshot: length (a prefix of the tokens) or ids
SETTINGS_KEY = "qwen35_mlx_prompt_cache"  # format, boundary tokens, snapshot layers, meta_state,
# and a VLM's M-RoPE shifts (the live cache's, then each snapshot's)
FINGERPRINT_KEY = "qwen35_mlx_fingerprint"
CHECKSUM_KEY = "qwen35_mlx_checksum"
_CHECKSUM_FLAT = f"0.{CHECKSUM_KEY}"  # its place in the flat safetensors metadata
_OURS = (TOKENS_KEY, SNAPSHOTS_KEY, SETTINGS_KEY, FINGERPRINT_KEY, CHECKSUM_KEY)
# The configuration fields that shape the caches, shown by name when two models differ: the
# required sizes (the layer count is in layer_types) and the conv kernel, vocab_size last.
_SHAPE_FIELDS = (
    *(f for f in TEXT_REQUIRED if f not in ("vocab_size", "num_hidden_layers")),
    "linear_conv_kernel_dim",
    "vocab_size",
)
_SAMPLE = 256  # values per parameter in the weights digest


def _user_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"prompt-cache metadata must map str to str, got {k!r}: {v!r}")
        if "." in k or k in _OURS:
            raise ValueError(f"prompt-cache metadata key {k!r} is reserved or has a dot")
    return meta


def _to_arrays(items: list[tuple[str, Any]]) -> tuple[dict[str, mx.array], list]:
    """Flat state leaves as arrays, with mlx-lm's record of the non-array leaves."""
    scalars: list = [""]  # mlx-lm's layout: a first empty entry keeps the list in the metadata
    out = {}
    for key, v in items:
        if isinstance(v, mx.array):
            out[key] = v
        elif isinstance(v, (bool, int, float)):
            scalars.append((key, "scalar"))
            out[key] = mx.array(v)
        elif isinstance(v, str):
            scalars.append((key, "string"))
            out[key] = mx.array([ord(ch) for ch in v])
        elif v is None:
            scalars.append((key, "none"))
            out[key] = mx.array([])
        else:
            raise ValueError(f"cannot save a cache state leaf of type {type(v).__name__}")
    return out, scalars


def _bytes(a: mx.array) -> memoryview:
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: hash the same bits as uint16
        a = a.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.asarray(a)))


def _checksum(arrays: dict[str, mx.array], flat_meta: dict[str, str]) -> str:
    """SHA-256 over every metadata entry (but the checksum) and every array's name, dtype,
    shape and bytes."""
    h = hashlib.sha256()
    for k in sorted(flat_meta):
        if k != _CHECKSUM_FLAT:
            h.update(f"{k}={flat_meta[k]}\0".encode())
    for k in sorted(arrays):
        a = arrays[k]
        h.update(f"{k}:{_dtype_name(a.dtype)}:{tuple(a.shape)}\0".encode())
        h.update(_bytes(a))
    return h.hexdigest()


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("mlx.core.")


def _state_dtypes(arrays: dict[str, Any], n_layers: int) -> list[list[str]]:
    """Per layer of the live cache, the dtypes of its state arrays of rank 2 or more, in key
    order (rank 0 and 1 entries stand for scalars, None and strings)."""
    out: list[list[str]] = [[] for _ in range(n_layers)]
    for k in sorted(arrays):
        layer = int(k.split(".", 1)[0])
        a = arrays[k]
        if layer < n_layers and isinstance(a, mx.array) and a.ndim >= 2:
            out[layer].append(_dtype_name(a.dtype))
    return out


def _layout(state: Any) -> list[str]:
    """The tree paths of a cache state: which containers hold its leaves, not their values."""
    if state is None:
        return []
    return [k for k, _ in tree_flatten(state)]


def _copy_tree(state: Any) -> Any:
    # New lists and tuples around the same arrays: a layer cache that assigns into its state
    # list (ArraysCache) then leaves the saved one alone.
    if isinstance(state, list):
        return [_copy_tree(x) for x in state]
    if isinstance(state, tuple):
        return tuple(_copy_tree(x) for x in state)
    if isinstance(state, dict):
        return {k: _copy_tree(v) for k, v in state.items()}
    return state


def _meta_state(c: Any) -> Any:
    m = getattr(c, "meta_state", None)
    return list(m) if isinstance(m, tuple) else m


def _json(meta: dict, key: str, kind: type, bad: Any) -> Any:
    """The JSON value stored under `key`, checked to be a `kind`; None when absent."""
    if key not in meta:
        return None
    try:
        value = json.loads(meta[key])
    except (TypeError, ValueError):
        raise bad(f"the {key} entry is not valid JSON") from None
    if not isinstance(value, kind):
        raise bad(f"the {key} entry is not a JSON {kind.__name__}")
    return value


def _model_and_config(model: Any) -> tuple[Any, Any]:
    # Wrappers (e.g. a counting proxy) that are not modules themselves hold the model as .model.
    while not isinstance(model, nn.Module) and hasattr(model, "model"):
        model = model.model
    for attr in ("config", "args"):
        cfg = getattr(model, attr, None)
        if cfg is not None:
            return model, cfg
    return model, None


def _config_dict(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg) if isinstance(cfg, dict) else dict(vars(cfg))


def _field(cfg: Any, name: str) -> Any:
    # mlx-lm's own model configs keep text_config as a plain dict
    return cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)


def _short_hash(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a prompt cache depends on: model type, layer types, head counts and dims, weight
    dtypes, a hash of the config and a digest of the weights.

    The digest covers every parameter's name, dtype and shape and its first values, so it
    tells apart checkpoints that share a config (fine-tunes, another quantization). It reads
    only the parameters, never runs the model.
    """
    module, cfg = _model_and_config(model)
    text = _field(cfg, "text_config") or cfg
    layer_types = _field(text, "layer_types")
    if layer_types is None:
        layer_types = [type(c).__name__ for c in model.make_cache()]
    fp: dict[str, Any] = {
        "model_type": _field(cfg, "model_type") or type(module).__name__,
        "layer_types": list(layer_types),
    }
    for name in _SHAPE_FIELDS:
        if _field(text, name) is not None:
            fp[name] = _field(text, name)
    fp["config_hash"] = _short_hash(json.dumps(_config_dict(cfg), sort_keys=True, default=str))

    params = sorted(tree_flatten(module.parameters()), key=lambda kv: kv[0])
    samples = [p.reshape(-1)[:_SAMPLE] for _, p in params]
    mx.eval(samples)
    h = hashlib.sha256()
    for (name, p), s in zip(params, samples, strict=True):
        h.update(f"{name}:{_dtype_name(p.dtype)}:{tuple(p.shape)}\0".encode())
        h.update(_bytes(s))
    fp["weight_dtypes"] = sorted({_dtype_name(p.dtype) for _, p in params})
    fp["weights_digest"] = h.hexdigest()[:16]
    return fp


def _check_fingerprint(saved: dict, current: dict, bad: Any) -> None:
    diffs = []
    for key, value in current.items():
        if key in ("config_hash", "weights_digest") or saved.get(key) == value:
            continue
        if key == "layer_types":
            old = saved.get(key) if isinstance(saved.get(key), list) else []
            diffs.append(
                f"layer_types (file: {len(old)} layers {_types_summary(old)}, "
                f"model: {len(value)} layers {_types_summary(value)})"
            )
        else:
            diffs.append(f"{key} (file: {saved.get(key)}, model: {value})")
    # The hashes name no field: report them only when nothing more specific differs.
    if not diffs and saved.get("config_hash") != current["config_hash"]:
        diffs.append("the config (same shapes, other settings)")
    if not diffs and saved.get("weights_digest") != current["weights_digest"]:
        diffs.append("the weights (same config: another checkpoint or quantization)")
    if diffs:
        raise bad("this prompt cache was saved from another model; differs: " + "; ".join(diffs))


def _types_summary(types: list) -> str:
    return "".join(
        "F" if t == "full_attention" else "L" if t == "linear_attention" else "?" for t in types
    )
