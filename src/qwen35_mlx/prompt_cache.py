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
every call instead of writing into them, so a snapshot stays valid. Save / load use mlx-lm's
prompt-cache file (`save_prompt_cache` / `load_prompt_cache`: one safetensors file) for the live
cache, with the token ids in its metadata; snapshots are not saved.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

TOKENS_KEY = "qwen35_mlx_tokens"  # no dots: mlx-lm unflattens metadata keys on "."


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _trimmable(c: Any) -> bool:
    return hasattr(c, "is_trimmable") and c.is_trimmable()


def _saved_state(state: Any) -> Any:
    # ArraysCache.state is (list of arrays, left_padding, lengths); the model assigns new arrays
    # into that list, so keep a copy of the list (the arrays themselves are never written to).
    if isinstance(state, tuple) and state and isinstance(state[0], list):
        return (list(state[0]), *state[1:])
    return state


def _trim_to(c: Any, n: int) -> None:
    """Trim a trimmable layer cache back to its first `n` tokens."""
    size = c.offset if hasattr(c, "offset") and isinstance(c.offset, int) else c.size()
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
        self.last_reused = 0
        self.last_prefilled = 0

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
        if len(self.snapshots) > self.max_snapshots:
            self.snapshots.pop(0)

    def commit(self, cache: list, tokens: Sequence[int]) -> None:
        """After a request: `cache` holds exactly `tokens`; drop snapshots it no longer extends."""
        self.cache, self.tokens = cache, list(tokens)
        self.snapshots = [
            s for s in self.snapshots if self.tokens[: len(s[0])] == s[0] and len(s[0]) > 0
        ]

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
        return self.cache

    # Files: mlx-lm's prompt-cache format plus the token ids.

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        """Write the live cache and its token ids to one `.safetensors` file."""
        if self.cache is None:
            raise ValueError("nothing to save: the prompt cache is empty")
        meta = dict(metadata or {})
        meta[TOKENS_KEY] = json.dumps(self.tokens)
        save_prompt_cache(str(path), self.cache, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module, **kwargs) -> PromptCache:
        """A PromptCache from a file written by `save` (or by mlx-lm with our metadata key)."""
        cache, meta = load_prompt_cache(str(path), return_metadata=True)
        if TOKENS_KEY not in meta:
            raise ValueError(f"{path}: no token ids in this prompt-cache file ({TOKENS_KEY})")
        n_layers = len(model.make_cache())
        if len(cache) != n_layers:
            raise ValueError(f"{path}: {len(cache)} layer caches, the model has {n_layers}")
        out = cls(model, **kwargs)
        out.cache, out.tokens = cache, json.loads(meta[TOKENS_KEY])
        return out
