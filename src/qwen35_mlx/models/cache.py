"""Per-layer caches for the hybrid stack: mlx-lm's cache classes, plus what the compiled decode
step needs to run over them with fixed shapes.

One cache per layer in `layer_types` order:
    linear_attention -> mlx-lm ArraysCache(size=2): [conv state [B, K-1, C] (last K-1 pre-conv
                        inputs), recurrent state [B, Hv, Dv, Dk] fp32]
    full_attention   -> mlx-lm KVCache (or BatchKVCache for a left-padded batch)
Batches follow mlx-lm's protocol: ArraysCache.left_padding / .lengths give the linear layers their
mask, BatchKVCache carries left padding and per-row offsets for the attention layers. Keeping
mlx-lm's own classes keeps its `save_prompt_cache` / `load_prompt_cache`, `BatchGenerator`
(merge, extend, filter, extract, prepare/finalize) and `maybe_quantize_kv_cache` (KVCache ->
QuantizedKVCache; the ArraysCache has no `to_quantized` and passes through unchanged) working.

Decode (one token a row; a few for a verify pass) runs a compiled function over these caches
(`TextModel`): mlx-lm's KV caches already preallocate their buffers in blocks of `step` (256)
positions; the step writes the new keys and values at an array index (`mx.slice_update`) and
attends over the whole block with a mask, so its shapes change only when `reserve` grows a
buffer by a block. The Python-int
`offset` / `_idx` that mlx-lm reads are advanced after the step, as `update_and_fetch` would.

A VLM conversation's M-RoPE state lives on its first linear-attention cache (`MROPE_SHIFT`,
`MROPE_PROMPT`; KV quantization replaces the attention caches but keeps that one), not on the
model: two conversations on one model object do not mix. A VLM's first linear cache is an
`MRopeArraysCache`, a LinearCache whose batch operations (filter, extend, merge, extract) carry
each row's shift along (0 for a row without one), so BatchGenerator's batches of conversations
with images keep their positions.

Rollback (speculative decoding). The linear-attention caches `make_cache` builds are
`LinearCache`s: mlx-lm's ArraysCache that can also be trimmed by up to `history` tokens, so that a
verify pass of k + 1 tokens can be undone to its last accepted token without running the model
again (our MTP loop in speculative.py, and mlx-lm's `speculative_generate_step` with a draft
model, which trims through `trim_prompt_cache`). A LinearCache keeps references to its states at
the boundaries of its last multi-token calls (free: the arrays exist anyway; the cost is that the
last `history` states stay alive; a one-token step, i.e. plain decoding, drops them all) and,
for a multi-token call of at most `RECORD_LIMIT` tokens, either the states after each of its
tokens (the compiled verify step's outputs, text.py: `record_states`) or that plain call's
recurrence inputs (post-conv q, k, v, the gate inputs a, b, the mask, the conv input).
`trim(n)` goes back to the newest boundary at or before the target and, inside a multi-token
call, takes the recorded state after the last kept token, or recomputes only the recurrence over
the kept tokens (`gated_delta_update`, the same function the layer calls) and takes the conv
state from the saved conv input. It raises ValueError when
asked for more than it kept.

mlx-lm reads `is_trimmable()` as "trimmable by any number of tokens": its server's prompt-cache
store trims stored caches back to a shared prefix. So a LinearCache says True only when it is
fresh or right after a short multi-token call (a verify pass) that no trim has followed yet:
`speculative_generate_step` checks a fresh cache and trims once after each verify pass, while a
cache handed to the server's store after plain decoding (or after that last trim) says False and
is never trimmed there. One consequence: mlx-lm does not roll back a draft model's cache of ours
(its last call is one token), which keeps the rejected draft tokens in the draft's context: that
costs acceptance, never correctness (the main model verifies every token).

Anything that replaces the states from outside (`state =`, filter, extend, merge,
prepare/finalize for mlx-lm's right-padded batches) starts the history afresh.
Beyond `history` tokens the recurrent state still cannot be trimmed: `PromptCache`
(prompt_cache.py) keeps references to the linear states at prefix boundaries instead, and treats
a LinearCache as not trimmable.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache, BatchKVCache, KVCache

from ..kernels.gated_delta import gated_delta_update

__all__ = [
    "make_cache",
    "mrope_holder",
    "ArraysCache",
    "LinearCache",
    "MRopeArraysCache",
    "KVCache",
    "BatchKVCache",
]

# Tokens a LinearCache can roll back by default: mlx-lm's `--num-draft-tokens` default (3) needs
# 3 after its 4-token verify call; the MTP loop raises it to its k (`set_history`).
DEFAULT_HISTORY = 3
# Multi-token calls up to this long keep their recurrence inputs, so that the last one can be
# trimmed into (a verify pass of up to RECORD_LIMIT - 1 drafts); longer ones (prefill) do not.
RECORD_LIMIT = 64

# A trim into a verify pass (or of the whole of it) by the short path (`LinearCache.trim`), the
# kept part's per-token states left as they are until a later trim takes one
# (`_TokenStates.head`). False: the general walk, and every kept token's states taken apart at
# the trim (views made, then mostly dropped), as before session 14: probe_verify.py's A/B.
LEAN_TRIM = True

# Attribute names of the VLM's per-conversation M-RoPE state on a cache object (vlm.py):
# MROPE_SHIFT [B] int32: the next position of a row is (cache offset + shift); MROPE_PROMPT:
# (cache length at the prompt's start, positions [3, B, T]) of the last multimodal prompt.
MROPE_SHIFT = "mrope_shift"
MROPE_PROMPT = "mrope_prompt"


def mrope_holder(cache: list) -> Any:
    """The layer cache that holds the M-RoPE state: the first linear-attention cache (mlx-lm's
    `maybe_quantize_kv_cache` replaces every KVCache with a new object but keeps it), else the
    first attention cache; None when there is neither."""
    for c in cache:
        if isinstance(c, ArraysCache):
            return c
    for c in cache:
        if c is not None and hasattr(c, "offset"):
            return c
    return None


class LinearCache(ArraysCache):
    """mlx-lm's ArraysCache [conv state, recurrent state] that can be trimmed by up to `history`
    tokens (module docstring). Its class name reads "ArraysCache" so that prompt-cache files
    name a class mlx-lm's `load_prompt_cache` knows (it gives back a plain ArraysCache)."""

    history = DEFAULT_HISTORY  # (a class default too: mlx-lm's from_state skips __init__)

    def __init__(self, size: int = 2, left_padding: list[int] | None = None, history: int = -1):
        super().__init__(size, left_padding=left_padding)
        self.history = DEFAULT_HISTORY if history < 0 else history
        self._reset_history()

    def _reset_history(self) -> None:
        # _states[i] is the state before _calls[i]; _states[-1] the current one.
        self._states = [tuple(self.cache)]
        self._calls: list[tuple[int, tuple | None]] = []
        self._pending = None
        self._armed = False

    def is_trimmable(self) -> bool:
        """Fresh, or just after a short multi-token call not yet trimmed (module docstring)."""
        fresh = all(c is None for c in self.cache)
        return fresh or self._armed

    def record_inputs(self, T: int, inputs: tuple) -> None:
        """Called by the linear-attention layer before `advance(T)`: (conv_in [B, K-1+T, C],
        q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], a, b [B, T, Hv], A_log, dt_bias, mask [B, T] or
        None). Kept only for a call short enough to be trimmed into."""
        self._pending = inputs if 1 < T <= RECORD_LIMIT else None

    def record_states(self, T: int, states: list) -> None:
        """Called by the compiled verify step (text.py) after it set the cache's states and
        before `note_advance(T)`: the states after each of its T tokens, which the decode kernel
        gives for free, either as a list of T (conv state, recurrent state) or as the T-token
        kernel's (state_tok, conv_tok) [T-1, ...] arrays (the states after all but the last
        token, which is the cache's now); a trim into the call takes one, with no recompute."""
        if not 1 < T <= RECORD_LIMIT:
            self._pending = None
        elif isinstance(states[0], mx.array):
            self._pending = _TokenStates(states, final=tuple(self.cache), n=T)
        else:
            self._pending = _TokenStates(states)

    def advance(self, N: int) -> None:
        super().advance(N)
        self.note_advance(N)

    def take_call(self, conv: mx.array, state: mx.array, T: int, states) -> None:
        """After a compiled multi-token step of T tokens (text.py): its (conv, recurrent) states,
        and the states after each token (`record_states`), counted (`note_advance`). The same
        bookkeeping as those, with the T-token kernel's arrays in one pass of Python: a verify
        pass adopts a cache a linear layer (18 at 0.8B), host time the one-token step has not."""
        cache = self.cache
        cache[0] = conv
        cache[1] = state
        if not (
            1 < T <= RECORD_LIMIT
            and self.history > 0
            and self.lengths is None
            and isinstance(states[0], mx.array)
        ):
            self.record_states(T, states)
            self.note_advance(T)
            return
        self._pending = None
        self._armed = True
        calls, kept = self._calls, self._states
        calls.append((T, _TokenStates(states, (conv, state), T)))
        kept.append((conv, state))
        if len(calls) > 1:
            covered = sum(t for t, _ in calls)
            while len(calls) > 1 and covered - calls[0][0] >= self.history:
                covered -= calls.pop(0)[0]
                kept.pop(0)

    def note_advance(self, N: int) -> None:
        """The states moved on by N tokens: by `advance`, or by the compiled decode step, which
        updates the left padding itself (text.py)."""
        pending, self._pending = self._pending, None
        self._armed = pending is not None
        if self.history <= 0 or self.lengths is not None or (N == 1 and pending is None):
            # A one-token step (plain decoding) keeps no history: no rollback goes back across
            # one (`is_trimmable` is False after it), and each kept state is a whole recurrent
            # state alive per layer (2.4 GB for the 0.8B shape at batch 128).
            self._reset_history()
            return
        self._calls.append((N, pending))
        self._states.append(tuple(self.cache))
        covered = sum(t for t, _ in self._calls)
        while len(self._calls) > 1 and covered - self._calls[0][0] >= self.history:
            covered -= self._calls.pop(0)[0]
            self._states.pop(0)

    def trimmable_tokens(self) -> int:
        """How many tokens `trim` can take back now."""
        n = 0
        for t, inputs in reversed(self._calls):
            if inputs is None and t > 1:
                return n  # only as a whole: counted once reached
            n += t
        return n

    def trim(self, n: int) -> int:
        self._armed = False
        if n <= 0:
            return 0
        calls = self._calls
        if LEAN_TRIM and calls and self.left_padding is None:
            # A speculative round's trim: into the last call (its recorded states), or the
            # whole of it. The general walk below does the same in more Python (a verify
            # pass's host time: 18 caches at 0.8B, after every rejected draft).
            t, inputs = calls[-1]
            if n < t and inputs is not None:
                keep = t - n
                state = _rewind(inputs, keep, self._states[-2])
                calls[-1] = (keep, _head(inputs, keep, state))
                self._states[-1] = state
                self.cache = list(state)
                return n
            if n == t:
                calls.pop()
                self._states.pop()
                self.cache = list(self._states[-1])
                return n
        # Check first, then change: an impossible trim leaves the cache as it was.
        remaining, i = n, len(self._calls)
        while remaining > 0 and i > 0:
            t, inputs = self._calls[i - 1]
            if t <= remaining:
                remaining -= t
                i -= 1
            elif inputs is None:
                break
            else:
                remaining = 0
        if remaining > 0:
            raise ValueError(
                f"a linear-attention cache can roll back {self._reachable(n)} of the {n} tokens "
                f"asked (it keeps the states of its last {self.history} tokens, and trims into "
                f"a multi-token call only if it was at most {RECORD_LIMIT} tokens long)"
            )
        remaining = n
        while remaining > 0:
            t, inputs = self._calls[-1]
            if t <= remaining:
                self._calls.pop()
                self._states.pop()
                remaining -= t
                self.cache = list(self._states[-1])
            else:
                keep = t - remaining
                state = _rewind(inputs, keep, self._states[-2])
                self._calls[-1] = (keep, _head(inputs, keep, state))
                self._states[-1] = state
                self.cache = list(state)
                remaining = 0
        if self.left_padding is not None:
            self.left_padding = self.left_padding + n
        return n

    def _reachable(self, n: int) -> int:
        got = 0
        for t, inputs in reversed(self._calls):
            if got + t <= n:
                got += t
            elif inputs is not None:
                return n
            else:
                break
        return got

    @property
    def state(self):
        return self.cache, self.left_padding, self.lengths

    @state.setter
    def state(self, v):
        self.cache, self.left_padding, self.lengths = v
        self._reset_history()

    def filter(self, batch_indices):
        super().filter(batch_indices)
        self._reset_history()

    def extend(self, other):
        super().extend(other)
        self._reset_history()

    def prepare(self, lengths=None, **kwargs):
        super().prepare(lengths=lengths, **kwargs)
        self._reset_history()

    def finalize(self):
        super().finalize()
        self._reset_history()

    def extract(self, idx):
        out = LinearCache(len(self.cache), history=self.history)
        out.cache = [c[idx : idx + 1] for c in self.cache]
        out._reset_history()
        return out

    @classmethod
    def merge(cls, caches):
        out = super().merge(caches)
        out._reset_history()
        return out


LinearCache.__name__ = LinearCache.__qualname__ = "ArraysCache"


class MRopeArraysCache(LinearCache):
    """mlx-lm's ArraysCache whose batch operations keep the per-row M-RoPE state of the rows
    they keep (`MROPE_SHIFT` [B]; `MROPE_PROMPT`'s positions [3, B, T] where the rows stay in
    place). Without any state it is ArraysCache. Named ArraysCache, so that mlx-lm's
    `save_prompt_cache` / `load_prompt_cache` (which look classes up by name in their module)
    read it back."""

    def filter(self, batch_indices) -> None:
        rows = np.array(batch_indices).reshape(-1)
        super().filter(batch_indices)
        if hasattr(self, MROPE_SHIFT):
            setattr(self, MROPE_SHIFT, np.asarray(getattr(self, MROPE_SHIFT))[rows])
        prompt = getattr(self, MROPE_PROMPT, None)
        if prompt is not None:
            setattr(self, MROPE_PROMPT, (prompt[0], prompt[1][:, mx.array(rows)]))

    def extend(self, other: ArraysCache) -> None:
        a, b = self.batch_size, other.batch_size
        has = hasattr(self, MROPE_SHIFT) or hasattr(other, MROPE_SHIFT)
        shift = np.concatenate([_row_shift(self, a), _row_shift(other, b)])
        super().extend(other)
        if has:
            setattr(self, MROPE_SHIFT, shift)
        if hasattr(self, MROPE_PROMPT):  # its rows and start no longer fit the batch
            delattr(self, MROPE_PROMPT)

    def extract(self, idx: int) -> MRopeArraysCache:
        out = MRopeArraysCache(len(self.cache), history=self.history)
        out.cache = [c[idx : idx + 1] for c in self.cache]
        out._reset_history()
        if hasattr(self, MROPE_SHIFT):
            setattr(out, MROPE_SHIFT, np.asarray(getattr(self, MROPE_SHIFT))[idx : idx + 1])
        return out

    @classmethod
    def merge(cls, caches: list) -> MRopeArraysCache:
        out = super().merge(caches)
        if any(hasattr(c, MROPE_SHIFT) for c in caches):
            setattr(out, MROPE_SHIFT, np.concatenate([_row_shift(c, c.batch_size) for c in caches]))
        return out


MRopeArraysCache.__name__ = MRopeArraysCache.__qualname__ = "ArraysCache"
LINEAR_CACHES = (ArraysCache, LinearCache, MRopeArraysCache)  # linear-attention cache kinds


def _row_shift(c: Any, batch: int) -> np.ndarray:
    """The M-RoPE shift of each of a cache's `batch` rows, 0 for rows without one."""
    shift = getattr(c, MROPE_SHIFT, None)
    return np.zeros(batch, np.int64) if shift is None else np.asarray(shift, np.int64)


def make_cache(
    layer_types: list[str], left_padding: list[int] | None = None, mrope: bool = False
) -> list:
    """One cache per layer, in layer_types order.

    left_padding: per-row pad counts of a left-padded batch; gives LinearCache(left_padding) and
    BatchKVCache(left_padding) so that the masks and rotary positions count real tokens only.
    mrope: a VLM's cache; its first linear-attention cache (`mrope_holder`) is an
    MRopeArraysCache.
    """
    caches = []
    for t in layer_types:
        if t == "linear_attention":
            holder = mrope and not any(isinstance(c, ArraysCache) for c in caches)
            kind = MRopeArraysCache if holder else LinearCache
            caches.append(kind(size=2, left_padding=left_padding))
        elif left_padding is not None:
            caches.append(BatchKVCache(left_padding))
        else:
            caches.append(KVCache())
    return caches


def kv_index(c: KVCache | BatchKVCache) -> int:
    """Where the next token's key goes in the buffer (pads included)."""
    return c._idx if isinstance(c, BatchKVCache) else c.offset


def reserve(c: KVCache | BatchKVCache, n: int = 1) -> None:
    """Make room in the preallocated KV buffer for `n` more tokens, a block (`c.step`) at a
    time, as `update_and_fetch` would; a step traced for one buffer size replays until the next
    block."""
    idx = kv_index(c)
    if idx + n > c.keys.shape[2]:
        _regrow(c, idx, idx + -(-n // c.step) * c.step)


def _regrow(c: KVCache | BatchKVCache, idx: int, cap: int) -> None:
    """Replace c's buffers by ones of `cap` positions holding its first `idx`. The filled prefix
    is written into a fresh zero buffer (`slice_update` updates its input in place), not
    concatenated with a block of zeros: that held the zeros and the result at once, the new
    capacity twice (issue 9: +1.5 GiB at a 128k prompt)."""
    for name in ("keys", "values"):
        old = getattr(c, name)
        B, H, _, D = old.shape
        new = mx.zeros((B, H, cap, D), old.dtype)
        setattr(c, name, mx.slice_update(new, old[..., :idx, :], mx.array(0), axes=(2,)))


def advance(
    c: KVCache | BatchKVCache,
    keys: mx.array,
    values: mx.array,
    offset: mx.array | None = None,
    n: int = 1,
) -> None:
    """After a compiled step wrote `n` tokens into (keys, values): adopt them, count the tokens.
    offset: a batch cache's per-row offsets after them, when the step computed them."""
    c.keys, c.values = keys, values
    if isinstance(c, BatchKVCache):
        c._idx += n
        c.offset = c.offset + n if offset is None else offset
    else:
        c.offset += n


class StaticKV:
    """Inside the compiled step, an attention layer's cache: a whole preallocated buffer written
    at an array index. `offset` (scalar or [B]) is the rotary position of the new token."""

    def __init__(
        self,
        keys: mx.array,
        values: mx.array,
        idx: mx.array,
        offset: mx.array,
        padded: bool = True,
    ):
        self.keys, self.values, self.idx, self.offset = keys, values, idx, offset
        self.padded = padded  # False: no row has left padding

    def kernel_mask(self, mask: mx.array, T: int) -> mx.array | str | None:
        """The mask to give the decode attention kernel for T new tokens: without left padding
        the keys each query may see are those up to its own position, which the kernel bounds
        by itself from `idx` (None at T = 1: every key up to idx; "causal" above), so the mask
        array (`static_mask` / `static_causal_mask`, the same keys) is not read and its ops
        drop out of the compiled step; with left padding, the array."""
        if self.padded:
            return mask
        return None if T == 1 else "causal"

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, k.astype(self.keys.dtype), self.idx, axes=(2,))
        self.values = mx.slice_update(self.values, v.astype(self.values.dtype), self.idx, axes=(2,))
        return self.keys, self.values


def static_mask(capacity: int, idx: mx.array, left_padding: mx.array | None) -> mx.array:
    """Keys a one-token query may see in a buffer of `capacity`: positions up to `idx` (the new
    token), and from each row's left padding on. [1 or B, 1, 1, capacity] bool."""
    pos = mx.arange(capacity)
    mask = pos <= idx
    if left_padding is not None:
        mask = mask & (pos[None] >= left_padding[:, None])
        return mask[:, None, None, :]
    return mask[None, None, None, :]


def static_causal_mask(
    capacity: int, idx: mx.array, T: int, left_padding: mx.array | None
) -> mx.array:
    """Keys each of T new tokens (written at idx .. idx + T - 1) may see in a buffer of
    `capacity`: positions up to its own (`pos <= idx + t`, causal inside the new tokens), and
    from each row's left padding on. [1 or B, 1, T, capacity] bool."""
    pos = mx.arange(capacity)
    mask = pos[None] <= idx + mx.arange(T)[:, None]  # [T, capacity]
    if left_padding is not None:
        mask = mask[None] & (pos[None, None] >= left_padding[:, None, None])
        return mask[:, None]
    return mask[None, None]


def reserve_kv(cache: list, n: int) -> None:
    """Grow every filled KVCache / BatchKVCache of `cache` so that `n` more positions fit.

    mlx-lm's caches grow by just what a step needs, so a prompt fed in steps copies the whole
    cache at every step, and the old and the new buffers are alive together: the peak holds the
    cache twice. A prefill that knows its length reserves once (after its first step, when the
    buffers' shapes are known) and its later steps write in place. Capacity is rounded up to
    the cache's `step` as mlx-lm does; the buffers are not evaluated here.
    """
    for c in cache:
        if type(c) not in (KVCache, BatchKVCache) or c.keys is None:
            continue
        idx = kv_index(c)
        cap = -(-(idx + n) // c.step) * c.step
        if cap > c.keys.shape[2]:
            _regrow(c, idx, cap)


def set_history(cache: list, n: int) -> None:
    """Let every LinearCache of `cache` roll back up to `n` tokens (at least its current)."""
    for c in cache:
        if isinstance(c, LinearCache) and c.history < n:
            c.history = n


class _TokenStates:
    """A recorded call as the states after each of its tokens (`LinearCache.record_states`):
    a list of (conv, recurrent) pairs, or the T-token kernel's (state_tok, conv_tok) arrays
    (rows [(T-1) B, ...], token t's at rows t B .. t B + B - 1, or stacked [T-1, B, ...]) with
    the `final` pair, the states after the last of the `n` tokens it covers; the arrays are
    taken apart only where a trim takes a state (`at`), and a trim that keeps part of the call
    only lowers `n` (`head`)."""

    __slots__ = ("states", "final", "n")

    def __init__(self, states, final: tuple | None = None, n: int = 0):
        self.states, self.final = states, final
        self.n = len(states) if final is None else n

    def at(self, i: int) -> tuple:
        """(conv state, recurrent state) after token i."""
        if self.final is None:
            return tuple(self.states[i])
        if i == self.n - 1:
            return self.final
        state_tok, conv_tok = self.states
        rows = self.final[1].shape[0]
        if state_tok.ndim == self.final[1].ndim:  # rows: token i's B rows (T = 2: all of them)
            if state_tok.shape[0] == rows:
                return conv_tok, state_tok
            return conv_tok[i * rows : (i + 1) * rows], state_tok[i * rows : (i + 1) * rows]
        return _entry(conv_tok, i), _entry(state_tok, i)

    def head(self, keep: int, last: tuple) -> _TokenStates:
        """The first `keep` tokens; `last`: the states after token keep - 1 (`at`)."""
        if self.final is None:
            return _TokenStates(self.states[:keep])
        if not LEAN_TRIM:  # as before session 14: each kept token's states taken apart now
            return _TokenStates([self.at(i) for i in range(keep)])
        return _TokenStates(self.states, last, keep)


def _entry(x: mx.array, i: int) -> mx.array:
    """x[i] of a stacked [T-1, ...] array as views (a Reshape, and a Slice when x has more than
    one entry): `x[i]` is a Gather, a kernel copying the state, and each primitive costs the
    next step host time."""
    if x.shape[0] > 1:
        x = x[i : i + 1]
    return x.reshape(x.shape[1:])


def _head(inputs: tuple | _TokenStates, keep: int, last: tuple) -> tuple | _TokenStates:
    """A recorded call's inputs cut to its first `keep` tokens (last: the states after them)."""
    if isinstance(inputs, _TokenStates):
        return inputs.head(keep, last)
    conv_in, q, k, v, a, b, A_log, dt_bias, mask = inputs
    n_keep = conv_in.shape[1] - q.shape[1]
    cut = (x[:, :keep] for x in (q, k, v, a, b))
    m = None if mask is None else mask[:, :keep]
    return (conv_in[:, : n_keep + keep], *cut, A_log, dt_bias, m)


def _rewind(inputs: tuple | _TokenStates, keep: int, before: tuple) -> tuple:
    """(conv state, recurrent state) after the first `keep` tokens of a recorded call that
    started from `before`."""
    if isinstance(inputs, _TokenStates):
        return inputs.at(keep - 1)
    conv_in, q, k, v, a, b, A_log, dt_bias, mask = inputs
    T = q.shape[1]
    n_keep = conv_in.shape[1] - T  # K - 1
    conv = mx.contiguous(conv_in[:, keep : keep + n_keep])
    m = None if mask is None else mask[:, :keep]
    _, state = gated_delta_update(
        q[:, :keep], k[:, :keep], v[:, :keep], a[:, :keep], b[:, :keep], A_log, dt_bias,
        before[1], m,
    )  # fmt: skip
    return conv, state
