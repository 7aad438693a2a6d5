"""Speculative decoding with the checkpoint's own multi-token-prediction head (models/mtp.py).

One round, with y the last emitted token (not yet run through the model) and k drafts:
    draft   d_1 .. d_k from the MTP head (d_1 from the main model's hidden state at the last
            position and y; d_{j+1} from the head's own output and d_j)
    verify  one call of the main model on [y, d_1, .., d_k] (`model(tokens [B, k+1], cache)`)
            -> its k + 1 next-token distributions p_0 .. p_k
    accept  greedy: the longest prefix with d_{j+1} == argmax p_j, then argmax p_m (the bonus
            token); sampling: the standard rejection rule, d_{j+1} kept with probability
            min(1, p_j(d)/q_j(d)), else a token drawn from norm(max(0, p_j - q_j)) ends the
            round; all kept: one more token drawn from p_k. The emitted tokens are distributed
            exactly as plain sampling from the main model (Leviathan et al. 2023, Chen et al. 2023).
    rollback the main cache is trimmed by the k - m rejected tokens without running the model
            again (attention: mlx-lm's KV trim; linear attention: `LinearCache.trim`, which
            takes the state it recorded after the last kept token); the MTP layer's KV cache
            drops its k - 1 draft-chain entries and takes the m + 1 verified positions instead.
The verify pass and the MTP head run compiled (models/text.py). At temperature 0 a round is one
compiled call (`TextModel.verify_and_draft`): the token a greedy round emits at any position it
accepts is the main model's argmax there, so the head runs over all k + 1 positions before the
acceptance is known, and loses the entries past it in the same trim as the main cache.
At temperature 0 the tokens are plain greedy decoding's whatever the drafts are (tests hold this
for random MTP weights, for a perfect draft, in batches and after an image).

Batches (left-padded): every row takes the same number m of drafts, the smallest any row accepted
(a row that accepted more emits its own verified token at m, which is its draft d_{m+1}), so the
caches stay one rectangle and trim uniformly. This is exact; it only costs acceptance when rows
disagree.

Sampling filters (top-p, min-p, top-k) are mlx-lm's `apply_*` functions applied to both p and q
before the temperature, as its `make_sampler` does; a custom `sampler` callable or logits
processors have no distribution to compare and turn MTP off (generation.py decides).
Shape letters: B rows, K drafts per round, V vocabulary, H hidden size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from .models import mtp as mtp_lib
from .models.cache import MROPE_PROMPT, MROPE_SHIFT, LinearCache, mrope_holder, set_history


def text_model(model: nn.Module) -> nn.Module:
    """The text model of a text or vision-language model."""
    return getattr(model, "language_model", model)


def has_mtp(model: nn.Module) -> bool:
    return bool(getattr(text_model(model), "has_mtp", False))


def mtp_pays(model: nn.Module, sampling: Sampling | None) -> bool:
    """`mtp="auto"` (the default of `stream_generate` and the CLI): whether MTP is on for this
    call, i.e. where it was measured to pay. That is a greedy round (temperature 0) of a text
    model whose round runs its head as the native CPU primitive (`mtp.native_head_takes`): the
    shipped tiny model decodes 1.39-1.49x faster that way at k = 1 (benchmarks/RESULTS.md,
    session 17), against 1.13x with MLX's ops for the head. Elsewhere (sampling, a
    vision-language model, no native extension) MTP was not measured to pay and stays off unless
    asked for (`mtp=True`). On a GPU it was (H200, session 18): it pays only above a break-even
    acceptance (k = 1: about 51% of drafts at the 0.8B shape, 71% at the 9B), and acceptance
    depends on the text, so "auto" leaves it off there too."""
    text = text_model(model)
    if sampling is None or not sampling.greedy or text is not model:
        return False
    return bool(getattr(text, "compiled_decode", False)) and mtp_lib.native_head_takes(text)


def can_roll_back(cache: list) -> bool:
    """Whether every layer cache can take back a verify pass's rejected tokens: our
    LinearCache, or a trimmable KV cache (a plain ArraysCache, e.g. from mlx-lm's
    `load_prompt_cache`, cannot)."""
    return all(
        isinstance(c, LinearCache) or (hasattr(c, "trim") and c.is_trimmable()) for c in cache
    )


@dataclass
class Sampling:
    """How tokens are drawn: temp 0 is greedy; the filters follow mlx-lm's make_sampler."""

    temp: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def probs(self, logprobs: mx.array) -> mx.array:
        """The distribution mlx-lm's sampler draws from, [..., V] fp32."""
        x = logprobs.astype(mx.float32)
        if 0 < self.top_p < 1.0:
            x = apply_top_p(x, self.top_p)
        if self.min_p != 0.0:
            x = apply_min_p(x, self.min_p)
        if self.top_k > 0:
            x = apply_top_k(x, self.top_k)
        return mx.softmax(x * (1 / self.temp), axis=-1)


def _logprobs(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _leading_matches(drafts: list[int], target: list[int]) -> int:
    """How many of the drafts lead with the target's tokens (the greedy acceptance)."""
    n = 0
    while n < len(drafts) and drafts[n] == target[n]:
        n += 1
    return n


@dataclass
class RoundStats:
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class MTPSpeculator:
    """Draft with the MTP head, verify in one call of the main model, roll back (module doc).

    `cache` is the main model's cache (it must be `make_cache()`'s, whose linear layers can roll
    back); the MTP layer gets its own KV cache, left-padded like it. Use: `start` after the
    prompt (but its last token) is in `cache`, then `round()` as often as needed; `unfeed(n)`
    takes back the last n tokens a round ran through the model (when the caller stops early).
    """

    def __init__(
        self,
        model: nn.Module,
        cache: list,
        k: int,
        sampling: Sampling,
        left_padding: Sequence[int] | None = None,
    ):
        if k < 1:
            raise ValueError(f"mtp_k (drafted tokens per step) must be at least 1, got {k}")
        self.model = model
        self.text = text_model(model)
        if not self.text.has_mtp:
            raise ValueError("this checkpoint has no multi-token-prediction head (mtp.*)")
        self.cache = cache
        self.k = k
        self.sampling = sampling
        self.mtp_cache = self.text.make_mtp_cache(
            left_padding=list(left_padding) if left_padding is not None else None
        )
        set_history(cache, k)
        self.stats = RoundStats()
        self._pending_h: mx.array | None = None  # [B, 1, H] hidden of the last fed position
        self._y: mx.array | None = None  # [B] last emitted token, not yet fed
        self._drafts: mx.array | None = None  # [B, K]
        self._q: mx.array | None = None  # [B, K, V] draft distributions (sampling)
        self._ready: tuple | None = None  # (first drafts [B], MTP hidden [B, 1, H]) for _draft
        self._next: mx.array | None = None  # [B, 2] the next greedy k = 1 round's input
        self._ready_drafts: mx.array | None = None  # the drafts [B, 1] a k = 1 round made

    # MTP positions: for the VLM, those the main model used (M-RoPE); otherwise None, and the
    # MTP cache offset (one entry per position) gives them.
    def _positions(self, T: int) -> mx.array | None:
        holder = mrope_holder(self.cache)
        shift = getattr(holder, MROPE_SHIFT, None)
        if shift is None:
            return None
        c = self.mtp_cache[0]
        start = c.offset if isinstance(c.offset, int) else c._idx
        prompt = getattr(holder, MROPE_PROMPT, None)
        if prompt is not None:
            p0, positions = prompt
            if p0 <= start and start + T <= p0 + positions.shape[-1]:
                return positions[..., start - p0 : start - p0 + T]
        B = len(shift)
        if isinstance(c.offset, int):
            base = mx.array(np.asarray(c.offset + shift, dtype=np.int32))
        else:
            base = c.offset.astype(mx.int32) + mx.array(np.asarray(shift, dtype=np.int32))
        base = base.reshape(B, 1) + mx.arange(T, dtype=mx.int32)[None]
        return mx.broadcast_to(base[None], (3, B, T))

    def _mtp(self, hidden: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """(logits [B, 1, V] at the last position, MTP hidden [B, T, H])."""
        positions = self._positions(T=tokens.shape[1])
        return self.text.mtp_forward(hidden, tokens, self.mtp_cache, positions, last_only=True)

    def on_prefill(self, tokens: mx.array, hidden: mx.array) -> None:
        """A prefill chunk's tokens [B, T] and the main model's hidden states [B, T, H]: the MTP
        layer's entries for the positions before them (their next tokens are now known)."""
        if self._pending_h is not None:
            hidden_in = mx.concatenate([self._pending_h, hidden[:, :-1]], axis=1)
            nxt = tokens
        else:
            hidden_in, nxt = hidden[:, :-1], tokens[:, 1:]
        if nxt.shape[1] > 0:
            self._mtp(hidden_in, nxt)
        self._pending_h = hidden[:, -1:]

    def mtp_state(self) -> list:
        return [c.state for c in self.mtp_cache]

    def _draw(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        """Tokens [...] from logits [..., V], and the distribution drawn from (sampling)."""
        if self.sampling.greedy:
            return logits.argmax(-1), None
        p = self.sampling.probs(_logprobs(logits))
        return mx.random.categorical(mx.log(p)), p

    def start(self, last: mx.array) -> tuple[mx.array, mx.array]:
        """Run the prompt's last tokens `last` [B, T] (the rest already in the cache, its hidden
        states given to `on_prefill`); returns (first tokens [B], logprobs [B, V]) and drafts."""
        logits, h = self.model(last, cache=self.cache, return_hidden=True)
        logprobs = _logprobs(logits[:, -1, :])
        y, _ = self._draw(logits[:, -1, :])
        self.on_prefill(last, h)
        self._draft(self._pending_h, y[:, None])
        self._y = y
        return y, logprobs

    def _draft(self, hidden: mx.array, tokens: mx.array) -> None:
        """MTP over the verified positions (hidden [B, T, H], next tokens [B, T]), then the
        chain of k drafts; the chain's own k - 1 entries leave the MTP cache again (the next
        round's verified positions take their place). After a fused greedy round the head has
        already run over the verified positions (`_ready`: its first draft and hidden; at k = 1
        the drafts [B, 1] alone)."""
        ready, self._ready = self._ready, None
        self._ready_drafts = None
        if ready is not None and ready[0].ndim == 2:  # k = 1: the drafts [B, 1] themselves
            self._drafts = self._ready_drafts = ready[0]
            self._q = self._pending_h = None
            return
        if ready is None:
            logits, o = self._mtp(hidden, tokens)
        else:
            first, o = ready
        drafts, qs = [], []
        for j in range(self.k):
            if j == 0 and ready is not None:
                d, q = first, None
            else:
                d, q = self._draw(logits[:, -1, :])
            drafts.append(d)
            qs.append(q)
            if j + 1 < self.k:
                logits, o = self._mtp(o[:, -1:], d[:, None])
        if self.k > 1:
            self.mtp_cache[0].trim(self.k - 1)
        self._drafts = mx.stack(drafts, axis=1)  # [B, K]
        self._q = None if self.sampling.greedy else mx.stack(qs, axis=1)  # [B, K, V]
        self._pending_h = None

    def round(self) -> tuple[list[list[int]], mx.array]:
        """One verify pass. Returns per row the m + 1 emitted tokens, and their logprobs
        [B, m + 1, V]. The main cache then holds y and the m accepted drafts."""
        B, K = self._drafts.shape
        if self._next is not None:  # a greedy k = 1 round's tokens, on the host already
            inp, self._next = self._next, None
        else:
            inp = mx.concatenate([self._y[:, None], self._drafts], axis=1)  # [B, K+1]
        if self.sampling.greedy and self.model is self.text:
            fused = self.text.verify_and_draft(inp, self.cache, self.mtp_cache)
            if fused is not None:
                return self._greedy_round(*fused, inp.dtype)
        logits, g = self.model(inp, cache=self.cache, return_hidden=True)
        logprobs = _logprobs(logits)  # [B, K+1, V]
        drafts = self._drafts
        if self.sampling.greedy:
            target = logits.argmax(-1)  # [B, K+1]
            ok = drafts == target[:, :K]
            fix = target
        else:
            p = self.sampling.probs(logprobs)  # [B, K+1, V]
            pd = mx.take_along_axis(p[:, :K], drafts[..., None], axis=-1)[..., 0]
            qd = mx.take_along_axis(self._q, drafts[..., None], axis=-1)[..., 0]
            ok = mx.random.uniform(shape=pd.shape) * qd < pd  # u < p/q, no division by 0
            resid = mx.maximum(p[:, :K] - self._q, 0.0)
            # p == q on the support leaves nothing to resample: p itself then (never reached
            # with probability > 0, but keeps categorical well defined).
            norm = resid.sum(-1, keepdims=True)
            resid = mx.where(norm > 0, resid / mx.maximum(norm, 1e-30), p[:, :K])
            fixes = mx.random.categorical(mx.log(resid))  # [B, K]
            bonus = mx.random.categorical(mx.log(p[:, K]))  # [B]
            fix = mx.concatenate([fixes, bonus[:, None]], axis=1)  # [B, K+1]
        # accepted per row: leading run of ok; m: the smallest over rows
        run = mx.cumprod(ok.astype(mx.int32), axis=1).sum(axis=1)  # [B]
        mx.eval(run, fix, drafts)
        m = int(run.min().item())
        run_l, fix_l, drafts_l = run.tolist(), fix.tolist(), drafts.tolist()
        rows = []
        for b in range(B):
            last = drafts_l[b][m] if run_l[b] > m else fix_l[b][m]
            rows.append(drafts_l[b][:m] + [last])
        self.stats.drafted += K * B
        self.stats.accepted += m * B
        # roll back: main keeps y + m drafts; the MTP drops its draft chain
        n_back = K - m
        if n_back:
            for c in self.cache:
                c.trim(n_back)
        emitted = mx.array([r for r in rows])  # [B, m+1]
        self._draft(g[:, : m + 1], emitted)
        self._y = emitted[:, -1]
        return rows, logprobs[:, : m + 1]

    def _greedy_round(self, logits, g, target, o, mtp_drafts, dtype):
        """`round` at temperature 0 from `TextModel.verify_and_draft`'s one compiled call: the
        MTP head already ran over all k + 1 positions with the greedy tokens (those a greedy
        round emits wherever it accepts), so its entries past the accepted ones are trimmed
        like the main cache's, and its draft at the last accepted position starts the chain."""
        B, K = self._drafts.shape
        # The acceptance on the host: the round's tokens are read there anyway, and no graph
        # ops (compare, cumprod, a second sync for the count) run between the rounds.
        mx.eval(target, mtp_drafts)
        t, drafts = target.tolist(), self._drafts.tolist()
        m = min(_leading_matches(d, r) for d, r in zip(drafts, t, strict=True))
        # A row that accepted more emits its draft at m, which is its greedy token there.
        rows = [r[: m + 1] for r in t]
        self.stats.drafted += K * B
        self.stats.accepted += m * B
        n_back = K - m
        if n_back:
            for c in self.cache + self.mtp_cache:
                c.trim(n_back)
        if self.k == 1:
            # The head's draft at m is the whole chain: it and the next round's input [y, d_1]
            # made on the host (no slices, stack or concatenate in the next round's graph).
            first = [d[m] for d in mtp_drafts.tolist()]
            self._ready = (mx.array([[d] for d in first], dtype=mtp_drafts.dtype), None)
            self._draft(g[:, : m + 1], target[:, : m + 1])
            self._y = mx.array([r[m] for r in t], dtype=target.dtype)
            if self._drafts is self._ready_drafts:  # (not replaced by a subclass's _draft)
                self._next = mx.array([[r[m], d] for r, d in zip(t, first, strict=True)],
                                      dtype=dtype)  # fmt: skip
            return rows, _logprobs(logits[:, : m + 1])
        self._ready = (mtp_drafts[:, m], o[:, m : m + 1])
        self._draft(g[:, : m + 1], target[:, : m + 1])
        self._y = target[:, m]
        return rows, _logprobs(logits[:, : m + 1])

    def filter(self, rows: mx.array) -> None:
        """Keep only `rows` (indices) of the batch, in the main and MTP caches alike."""
        for c in self.cache + self.mtp_cache:
            c.filter(rows)
        self._y = self._y[rows]
        self._drafts = self._drafts[rows]
        self._next = self._ready_drafts = None
        if self._q is not None:
            self._q = self._q[rows]

    def unfeed(self, n: int) -> None:
        """Take the last `n` tokens back out of the main cache (the caller stopped early)."""
        if n > 0:
            for c in self.cache:
                c.trim(n)


def greedy_or_sampling(
    sampler: Callable | None, temp: float, top_p: float, top_k: int, min_p: float
) -> Sampling | None:
    """The Sampling MTP can verify against, or None when the caller passed its own sampler."""
    if sampler is not None:
        return None
    return Sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
