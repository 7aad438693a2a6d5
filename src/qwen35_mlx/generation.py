"""Text generation: streaming, one-shot and batched, over Qwen3.5's hybrid cache.

The model consumes token ids `[B, T]` and returns logits `[B, T, V]`; its cache (`make_cache()`)
holds, per layer in `layer_types` order, a KV cache (full attention, trimmable) or an
`ArraysCache(size=2)` (linear attention: conv state and the fp32 recurrent state `[B, Hv, Dv, Dk]`,
not trimmable). Batches are left-padded: `BatchKVCache(left_padding)` masks padded keys and
`ArraysCache(left_padding=...)` gives the linear layers a mask, so a padded position never enters a
recurrent or conv state and every row decodes as it would alone.

Sampling, logits processors and streaming detokenization are mlx-lm's (`make_sampler`,
`make_logits_processors`, `TokenizerWrapper.detokenizer`), and so is `batch_generate`'s loop:
mlx-lm's `BatchGenerator` with every row in one batch (it prefills right-padded, and the caches'
`prepare`/`finalize` turn that into left padding). It samples one step past each row's last
token, so a stateful `sampler` is called once more than there are tokens.
`stream_generate`'s loop is not `mlx_lm.generate.generate_step`: that runs one step ahead,
feeding each token to the cache before yielding it, so its cache always holds the last token (an
end token included) and never the prompt alone, where a hybrid cache cannot trim its linear
layers back: a `PromptCache` here keeps the prompt's snapshot and exactly prompt + reply minus
its last token (the next turn re-feeds that one). Its logits processors also see only the
tokens it prefilled itself. MTP's loops (stream and batch) are ours: mlx-lm has no MTP.

Multi-token prediction (speculative.py) for a checkpoint with an MTP head: `mtp=True` turns it
on, `mtp=False` off, and the default `mtp="auto"` turns it on where it was measured to pay
(`speculative.mtp_pays`): greedy decoding of a text model on the CPU with the native extension
built, whose round runs the MTP head as one native primitive (`models.mtp.NATIVE_HEAD`): the
shipped tiny model then decodes 1.39-1.49x faster at k = 1 (87% accepted; benchmarks/RESULTS.md,
2026-12-03). Elsewhere "auto" leaves it off: on an H200 (0.8B shape) a verify pass of 2 tokens
costs 1.13-1.14x a one-token step, but generation with MTP has not been measured on the current
code (0.70-0.95x plain on session 5's). The verify pass and the MTP head run compiled
(models/text.py; at temperature 0 a round is one compiled call). The head drafts `mtp_k` tokens
(default 1) per step and one call of the model verifies them, with the same tokens as without
it at temperature 0 and the same distribution when sampling.
It stays off, silently, for a checkpoint without the head, a custom `sampler` callable or logits
processors (repetition penalty), which give no distribution to verify against, and a
`prompt_cache` list whose linear layers cannot roll back (mlx-lm's plain ArraysCache).
`mtp_k` is checked (an integer >= 1) either way. With a prompt cache, the MTP layer sees only
this call's new tokens (its own KV cache is not kept between calls): that lowers acceptance,
never changes the tokens.
`GenerationResponse.mtp_acceptance` is the share of drafts accepted so far (None without MTP).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import maybe_set_recommended_wired_limit

from .models.cache import reserve_kv
from .sampling import check_sampling
from .speculative import MTPSpeculator, can_roll_back, greedy_or_sampling, has_mtp, mtp_pays

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class GenerationResponse:
    """One step of `stream_generate`.

    `text` is the new piece of decoded text (may be empty while a multi-byte character is
    incomplete); `token` the sampled id; `logprobs` the log-probabilities over the vocabulary `[V]`.
    `prompt_tokens` counts the whole prompt, `cached_tokens` the part reused from a prompt cache
    (not prefilled again); `prompt_tps` is prefilled tokens per second. `peak_memory` is in GB.
    `finish_reason` is None until the last response: "stop" (an end token) or "length".
    """

    text: str
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    cached_tokens: int = 0
    from_draft: bool = False
    mtp_acceptance: float | None = None


@dataclass
class BatchResponse:
    """Result of `batch_generate`: per prompt, its text, token ids and why it stopped."""

    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    mtp_acceptance: float | None = None


def _wrap_tokenizer(tokenizer: Any) -> Any:
    """The text tokenizer: a processor's `.tokenizer`, wrapped for mlx-lm's detokenizer."""
    tok = getattr(tokenizer, "tokenizer", None)
    if tok is not None and not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = tok
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    return tokenizer


def _make_sampler(sampler, temp, top_p, top_k, min_p) -> Sampler:
    check_sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    if sampler is not None:
        return sampler
    return make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)


def _encode(tokenizer: Any, prompt: str | Sequence[int] | mx.array) -> list[int]:
    if isinstance(prompt, mx.array):
        return prompt.reshape(-1).tolist()
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
        return list(tokenizer.encode(prompt, add_special_tokens=add_special))
    return [int(t) for t in prompt]


def _vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", config)
    return getattr(config, "vocab_size", None)


def _check_ids(model: nn.Module, ids: Sequence[int], what: str = "the prompt") -> None:
    """Token ids outside the embedding table: MLX's embedding lookup does not check its indices
    (an id past the table crashed the process), so refuse them here, naming the first."""
    n = _vocab_size(model)
    bad = [t for t in ids if t < 0 or (n is not None and t >= n)]
    if bad:
        raise ValueError(f"{what} has token id {bad[0]}, outside the model's vocabulary [0, {n})")


def _check_step(prefill_step_size: int) -> None:
    # 0 hung batch_generate (no progress) and broke stream_generate inside MLX
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be at least 1, got {prefill_step_size}")


def _check_no_vision_slots(model: nn.Module, ids: Sequence[int], what: str = "the prompt") -> None:
    """A vision-language model given image/video pad tokens but no pixels would embed the pad
    tokens themselves and generate nonsense without a word: refuse it."""
    if getattr(model, "vision_tower", None) is None:
        return
    config = model.config
    for kind, tok in (("image", config.image_token_id), ("video", config.video_token_id)):
        n = sum(1 for t in ids if t == tok)
        if n:
            raise ValueError(
                f"{what} has {n} {kind}-pad tokens ({tok}) but no {kind} was given: pass "
                f"{kind}s= (the processor inserts these tokens itself)"
            )


@contextlib.contextmanager
def wired_limit():
    """On Metal, wire the recommended working set while generating (as mlx-lm does); no-op
    elsewhere. Prints nothing."""
    old = maybe_set_recommended_wired_limit()
    try:
        yield
    finally:
        if old is not None:
            mx.synchronize()
            mx.set_wired_limit(old)


def _cache_state(cache: list) -> list:
    return [c.state for c in cache]


# When `prefill` empties MLX's buffer cache (`mx.clear_cache`): "end" (once, after the last
# step; the default) or "step" (after every step, as mlx-lm's generate_step does, and as this
# loop did before session 10). Freed buffers wait in the cache for reuse and do not count in
# `mx.get_peak_memory`. A step's buffers have the same sizes as the last step's (the KV cache is
# reserved once), so with "end" each step reuses them; with "step" every step allocates them
# again, which on CUDA is a cudaMallocAsync per buffer from a pool MLX leaves at its default
# release threshold (memory handed back to the driver at every synchronization). The cost of
# "end": the cache holds up to one step's activations until the prompt is in. Same results
# either way (tests/test_generation.py); issue 9, `benchmarks/profile_prefill.py --prompt`
# measures both on the GPU.
PREFILL_CLEAR_CACHE = "end"


def prefill(
    model: nn.Module,
    cache: list,
    tokens: Sequence[int],
    *,
    prefill_step_size: int = 2048,
    stops: Sequence[int] = (),
    on_stop: Callable[[int], None] | None = None,
    first_call_kwargs: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_hidden: Callable[[mx.array, mx.array], list] | None = None,
) -> None:
    """Run `tokens` through `model` into `cache` in steps of at most `prefill_step_size`.

    Only cache states are evaluated, never the logits, so peak memory stays bounded by one step.
    `stops` are token counts (relative to `tokens`) at which a step must end; `on_stop(n)` runs
    there with the cache holding exactly the first `n` tokens (prompt-cache snapshots).
    `first_call_kwargs` go to the first model call only and make it cover all of `tokens`
    (a vision-language prompt: the image features must arrive with the image tokens).
    `on_hidden(tokens [1, T], hidden [1, T, H])`, when given, receives every step's normed
    hidden states (the MTP head's input, speculative.py) and returns arrays to evaluate too.
    """
    n_total = len(tokens)
    if n_total == 0:
        return
    marks = {s for s in stops if 0 < s <= n_total}
    ends = sorted(marks | {n_total})
    kwargs = first_call_kwargs or {}
    done = 0
    while done < n_total:
        if kwargs:
            step_end = n_total
        else:
            step_end = min(done + prefill_step_size, next(e for e in ends if e > done))
        chunk = mx.array(tokens[done:step_end])[None]
        extra = []
        if on_hidden is None:
            model(chunk, cache=cache, **kwargs)
        else:
            _, hidden = model(chunk, cache=cache, return_hidden=True, **kwargs)
            extra = on_hidden(chunk, hidden)
        if done == 0 and step_end < n_total:
            # Room for the whole prompt at once: later steps write the KV cache in place.
            reserve_kv(cache, n_total - step_end)
        mx.eval(_cache_state(cache), extra)
        kwargs = {}
        done = step_end
        if on_stop is not None and done in marks:
            on_stop(done)
        if progress is not None:
            progress(done, n_total)
        if PREFILL_CLEAR_CACHE == "step":
            mx.clear_cache()
    if PREFILL_CLEAR_CACHE == "end":
        mx.clear_cache()


def _vlm_inputs(
    tokenizer: Any, prompt: Any, images: Sequence[Any] | None, videos: Sequence[Any] | None = None
) -> tuple[list, dict]:
    """Token ids and image/video tensors for a vision-language prompt (processor call)."""
    if not isinstance(prompt, str):
        raise ValueError("a prompt with images or videos must be text (the processor adds tokens)")
    if videos:
        out = tokenizer(prompt, images=list(images or []), videos=list(videos))
    else:
        out = tokenizer(prompt, images=list(images))
    ids = out["input_ids"]
    ids = ids.reshape(-1).tolist() if hasattr(ids, "reshape") else list(ids)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    extra = {}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if out.get(key) is not None:
            extra[key] = mx.array(out[key])
    return ids, extra


def stream_generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int] | mx.array,
    *,
    images: Sequence[Any] | None = None,
    videos: Sequence[Any] | None = None,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    prefill_step_size: int = 2048,
    prompt_cache: Any = None,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    mtp: bool | str = "auto",
    mtp_k: int = 1,
) -> Generator[GenerationResponse, None, None]:
    """Generate from `prompt` (text or token ids), yielding a `GenerationResponse` per token.

    `images` and `videos` (VLM only) go through the processor passed as `tokenizer`. `sampler`
    defaults to mlx-lm's `make_sampler(temp, top_p, min_p, top_k)` (temp 0: greedy).

    `prompt_cache` is either a list of per-layer caches (mlx-lm style: it already holds a prefix,
    the whole `prompt` is new and the list is updated in place) or a
    `qwen35_mlx.prompt_cache.PromptCache`, which reuses the longest cached prefix of `prompt` and
    keeps this prompt + generation for the next call.

    `mtp` / `mtp_k`: speculative decoding with the checkpoint's MTP head (module docstring).
    """
    with wired_limit():
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        check_mtp_k(mtp_k)
        check_mtp(mtp)
        user_sampler = sampler
        _check_step(prefill_step_size)
        first_kwargs: dict = {}
        if images or videos:
            if not hasattr(tokenizer, "tokenizer") or not callable(tokenizer):
                raise ValueError("images and videos need a vision-language model and its processor")
            ids, first_kwargs = _vlm_inputs(tokenizer, prompt, images, videos)
            if prompt_cache is not None:
                raise ValueError("prompt_cache is not supported with images or videos")
        text_tok = _wrap_tokenizer(tokenizer)
        if not images and not videos:
            ids = _encode(text_tok, prompt)
            _check_no_vision_slots(model, ids)
        if len(ids) == 0:
            raise ValueError("the prompt is empty")
        _check_ids(model, ids)

        sampler = _make_sampler(sampler, temp, top_p, top_k, min_p)
        processors = list(logits_processors or [])
        if repetition_penalty:  # None or 0: off
            check_sampling(repetition_penalty=repetition_penalty)
            processors += make_logits_processors(repetition_penalty=repetition_penalty)

        # Which tokens must run through the model, and into which cache.
        managed = None
        if prompt_cache is None:
            cache = model.make_cache()
            todo, n_cached = ids, 0
        elif isinstance(prompt_cache, list):
            cache, todo, n_cached = prompt_cache, ids, 0
        else:
            managed = prompt_cache
            cache, todo = managed.fetch(ids)
            n_cached = len(ids) - len(todo)

        history = mx.array(ids) if processors else None
        spec_sampling = None
        if mtp and not processors and has_mtp(model) and can_roll_back(cache):
            spec_sampling = greedy_or_sampling(user_sampler, temp, top_p, top_k, min_p)
            if mtp == "auto" and not mtp_pays(model, spec_sampling):
                spec_sampling = None
        if spec_sampling is not None:
            yield from _stream_speculative(
                model, text_tok, ids, todo, cache, managed, n_cached, first_kwargs,
                MTPSpeculator(model, cache, mtp_k, spec_sampling),
                max_tokens=max_tokens, prefill_step_size=prefill_step_size,
                progress=prompt_progress_callback,
            )  # fmt: skip
            return

        def step(tok: mx.array) -> tuple[mx.array, mx.array]:
            logits = _apply(processors, history, model(tok[None], cache=cache)[:, -1, :])
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            return sampler(logprobs), logprobs[0]

        y, logprobs, prompt_tps = _run_prompt(
            model, cache, ids, todo, managed, n_cached, first_kwargs, step,
            prefill_step_size=prefill_step_size, progress=prompt_progress_callback,
        )  # fmt: skip
        fed = list(ids)  # tokens the cache holds, in order

        def tokens() -> Generator[tuple[Any, mx.array, dict]]:
            nonlocal history, y, logprobs
            while True:
                yield y, logprobs, {}
                # resumed: the token goes on (its response is not out yet: the step overlaps)
                if processors:
                    history = mx.concatenate([history, y.reshape(-1)])
                fed.append(y.item())
                y, logprobs = step(y.reshape(-1))
                mx.async_eval(y, logprobs)

        yield from _responses(
            tokens(), text_tok, max_tokens, (len(ids), prompt_tps, n_cached), managed, cache, fed
        )


def _responses(
    tokens: Generator[tuple[Any, mx.array, dict]],
    text_tok: Any,
    max_tokens: int,
    prompt: tuple[int, float, int],
    managed: Any,
    cache: list,
    fed: list[int],
) -> Generator[GenerationResponse, None, None]:
    """stream_generate's loop, with or without MTP: `tokens` yields (token, an int or a lazy
    [1] array; logprobs [V]; extra response fields) and is resumed only when generation goes
    on past that token, which is before its response goes out (the next step overlaps with the
    caller); at a finish it is closed instead. The managed prompt cache gets `fed` (what the
    cache holds) at the end, however the caller leaves."""
    detok = text_tok.detokenizer
    eos = set(text_tok.eos_token_ids)
    tic = time.perf_counter()
    n = 0
    try:
        y, logprobs, extra = next(tokens)
        while True:
            token = y if isinstance(y, int) else y.item()
            n += 1
            finish = "stop" if token in eos else "length" if n >= max_tokens else None
            if finish is None:
                following = next(tokens)
            else:
                tokens.close()
            yield _response(detok, token, logprobs, finish, n, tic, *prompt, **extra)
            if finish is not None:
                break
            if n % 256 == 0:
                mx.clear_cache()
            y, logprobs, extra = following
    finally:
        if managed is not None:
            managed.commit(cache, fed)


def _response(
    detok: Any,
    token: int,
    logprobs: mx.array,
    finish: str | None,
    n: int,
    tic: float,
    prompt_tokens: int,
    prompt_tps: float,
    n_cached: int,
    **extra: Any,
) -> GenerationResponse:
    """The response for generated token number `n` (decoding since `tic`); `finish` "stop" keeps
    the token out of the text, any finish flushes the detokenizer."""
    if finish != "stop":
        detok.add_token(token)
    if finish is not None:
        detok.finalize()
    return GenerationResponse(
        text=detok.last_segment,
        token=token,
        logprobs=logprobs,
        prompt_tokens=prompt_tokens,
        prompt_tps=prompt_tps,
        generation_tokens=n,
        generation_tps=n / max(time.perf_counter() - tic, 1e-9),
        peak_memory=mx.get_peak_memory() / 1e9,
        finish_reason=finish,
        cached_tokens=n_cached,
        **extra,
    )


def _run_prompt(
    model: nn.Module,
    cache: list,
    ids: list[int],
    todo: list[int],
    managed: Any,
    n_cached: int,
    first_kwargs: dict,
    first_step: Callable[[mx.array], tuple[mx.array, mx.array]],
    *,
    prefill_step_size: int,
    progress: Callable[[int, int], None] | None,
    on_hidden: Callable[[mx.array, mx.array], list] | None = None,
) -> tuple[mx.array, mx.array, float]:
    """The prompt phase of `stream_generate` (with or without MTP): prefill `todo[:-1]` with the
    prompt cache's snapshots, then `first_step(last token [1])` -> (token, logprobs), evaluated.
    Returns (token, logprobs, prompt tokens/s); the managed cache is snapshotted after the whole
    prompt, or reset when this fails part-way."""
    tic = time.perf_counter()
    stops, on_stop = [], None
    if managed is not None:
        stops = [s - n_cached for s in managed.snapshot_points(ids, n_cached)]
        on_stop = lambda n: managed.snapshot(cache, ids[: n_cached + n])  # noqa: E731
    try:
        prefill(
            model, cache, todo[:-1], prefill_step_size=prefill_step_size, stops=stops,
            on_stop=on_stop, first_call_kwargs=first_kwargs, progress=progress,
            on_hidden=on_hidden,
        )  # fmt: skip
        y, logprobs = first_step(mx.array(todo[-1:]))
        mx.eval(y, logprobs)
    except BaseException:
        if managed is not None:
            managed.reset()  # the cache may hold part of the prompt: start cold next time
        raise
    prompt_tps = len(todo) / max(time.perf_counter() - tic, 1e-9)
    if managed is not None:
        # the state after the whole prompt: the prefix the next turn most often shares
        managed.snapshot(cache, ids)
    return y, logprobs, prompt_tps


def check_mtp(mtp: Any) -> None:
    if not (mtp is True or mtp is False or mtp == "auto"):
        raise ValueError(f'mtp must be True, False or "auto", got {mtp!r}')


def check_mtp_k(mtp_k: Any, flag: str = "mtp_k") -> None:
    if not isinstance(mtp_k, int) or isinstance(mtp_k, bool) or mtp_k < 1:
        raise ValueError(f"{flag} (tokens drafted per step) must be an integer >= 1, got {mtp_k!r}")


def _stream_speculative(
    model: nn.Module,
    text_tok: Any,
    ids: list[int],
    todo: list[int],
    cache: list,
    managed: Any,
    n_cached: int,
    first_kwargs: dict,
    spec: MTPSpeculator,
    *,
    max_tokens: int,
    prefill_step_size: int,
    progress: Callable[[int, int], None] | None,
) -> Generator[GenerationResponse, None, None]:
    """stream_generate's loop with MTP drafts (speculative.py): the same responses, a round's
    tokens handed out one by one; the cache ends holding exactly `fed`, as without MTP."""

    def on_hidden(chunk: mx.array, hidden: mx.array) -> list:
        spec.on_prefill(chunk, hidden)
        return spec.mtp_state()

    y, logprobs, prompt_tps = _run_prompt(
        model, cache, ids, todo, managed, n_cached, first_kwargs, lambda t: spec.start(t[None]),
        prefill_step_size=prefill_step_size, progress=progress, on_hidden=on_hidden,
    )  # fmt: skip
    fed = list(ids)

    def tokens() -> Generator[tuple[Any, mx.array, dict]]:
        token = y.item()
        queue = [(token, logprobs[0], False)]  # this round's tokens not yet handed out
        try:
            while True:
                if not queue:
                    rows, lps = spec.round()
                    toks = rows[0]
                    # the cache now holds the last round's final token and this round's drafts
                    fed.append(token)  # the previous round's last token
                    fed.extend(toks[:-1])
                    queue = [(t, lps[0, j], j < len(toks) - 1) for j, t in enumerate(toks)]
                token, cur_logprobs, from_draft = queue.pop(0)
                extra = {"from_draft": from_draft, "mtp_acceptance": spec.stats.acceptance}
                yield token, cur_logprobs, extra
        except GeneratorExit:
            if queue:
                # stopped inside a round: the cache holds tokens past this one; take them back
                spec.unfeed(len(queue))
                del fed[len(fed) - len(queue) :]
            raise

    yield from _responses(
        tokens(), text_tok, max_tokens, (len(ids), prompt_tps, n_cached), managed, cache, fed
    )


def generate(model: nn.Module, tokenizer: Any, prompt: Any, **kwargs) -> str:
    """The whole response text of `stream_generate` (same arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


def make_batch_cache(model: nn.Module, left_padding: Sequence[int]) -> list:
    """A batch cache for `model`: BatchKVCache for attention, ArraysCache with left padding for
    the linear layers (their mask keeps padding out of the conv and recurrent states)."""
    return model.make_cache(left_padding=list(left_padding))


def batch_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_tokens: int | Sequence[int] = 256,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    prefill_step_size: int = 2048,
    mtp: bool | str = False,
    mtp_k: int = 1,
) -> BatchResponse:
    """Generate for several prompts of different lengths in one left-padded batch.

    `max_tokens` is one limit for all rows or one per prompt. Each row stops on its own (end
    token or its limit); finished rows leave the batch. At temperature 0 each row yields exactly
    the tokens it yields alone. `mtp` / `mtp_k` as in `stream_generate` ("auto" by the same
    rule), but off by default here: MTP over batches was not measured to pay (a left-padded batch
    runs the head as MLX's ops). Every row of a step takes as many drafts as the row that
    accepted fewest (speculative.py).
    """
    with wired_limit():
        text_tok = _wrap_tokenizer(tokenizer)
        rows = [_encode(text_tok, p) for p in prompts]
        if not rows:
            return BatchResponse([], [], [])
        if any(len(r) == 0 for r in rows):
            raise ValueError("a prompt is empty")
        limits = [max_tokens] * len(rows) if isinstance(max_tokens, int) else list(max_tokens)
        if len(limits) != len(rows) or min(limits) < 1:
            raise ValueError("max_tokens must be >= 1 for every prompt")
        _check_step(prefill_step_size)
        check_mtp_k(mtp_k)
        check_mtp(mtp)
        spec_sampling = None
        if mtp and not logits_processors and has_mtp(model):
            spec_sampling = greedy_or_sampling(sampler, temp, top_p, top_k, min_p)
            if mtp == "auto" and not mtp_pays(model, spec_sampling):
                spec_sampling = None
        sampler = _make_sampler(sampler, temp, top_p, top_k, min_p)
        processors = list(logits_processors or [])
        eos = set(text_tok.eos_token_ids)

        for i, r in enumerate(rows):
            _check_ids(model, r, f"prompt {i}")
            _check_no_vision_slots(model, r, f"prompt {i}")
        lengths = [len(r) for r in rows]
        if spec_sampling is not None:
            width = max(lengths)
            pad = [width - n for n in lengths]
            pad_id = getattr(text_tok, "pad_token_id", None) or 0
            n_vocab = _vocab_size(model)
            if n_vocab is not None and not 0 <= pad_id < n_vocab:
                pad_id = 0  # padded positions are masked out: any id in the table will do
            grid = mx.array([[pad_id] * p + r for p, r in zip(pad, rows, strict=True)])
            cache = make_batch_cache(model, pad)
            spec = MTPSpeculator(model, cache, mtp_k, spec_sampling, left_padding=pad)
            return _batch_speculative(
                model, text_tok, spec, grid, limits, eos, lengths, prefill_step_size
            )

        # mlx-lm's BatchGenerator, all rows in one batch: it prefills them right-padded (the
        # caches turn that into left padding) and drops each row as it stops.
        gen = BatchGenerator(
            model,
            stop_tokens=[[t] for t in eos],
            sampler=sampler,
            logits_processors=processors,
            prefill_step_size=prefill_step_size,
            prefill_batch_size=len(rows),
            completion_batch_size=len(rows),
        )
        try:
            with gen.stats() as stats:
                uids = gen.insert(rows, limits)
                out: dict[int, list[int]] = {uid: [] for uid in uids}
                reasons: dict[int, str] = {}
                while responses := gen.next_generated():
                    for r in responses:
                        out[r.uid].append(r.token)
                        if r.finish_reason is not None:
                            reasons[r.uid] = r.finish_reason
        finally:
            # It samples one step past the last token, on its own stream: let that finish
            # before anything else runs (a sharded model's collectives must not interleave).
            mx.synchronize(gen.stream)
            gen.close()
        return _batch_response(
            text_tok, [out[u] for u in uids], [reasons[u] for u in uids], lengths,
            stats.prompt_time, stats.generation_tokens, stats.generation_time,
        )  # fmt: skip


def _batch_speculative(
    model: nn.Module,
    text_tok: Any,
    spec: MTPSpeculator,
    grid: mx.array,
    limits: list[int],
    eos: set[int],
    lengths: list[int],
    prefill_step_size: int,
) -> BatchResponse:
    """batch_generate's loop with MTP drafts: each round gives every active row m + 1 tokens;
    a row that finishes inside a round drops the rest and leaves the batch."""
    cache = spec.cache
    width = grid.shape[1]
    tic = time.perf_counter()
    done = 0
    while done < width - 1:
        end = min(done + prefill_step_size, width - 1)
        _, hidden = model(grid[:, done:end], cache=cache, return_hidden=True)
        spec.on_prefill(grid[:, done:end], hidden)
        mx.eval(_cache_state(cache), spec.mtp_state())
        if PREFILL_CLEAR_CACHE == "step":
            mx.clear_cache()
        done = end
    if PREFILL_CLEAR_CACHE == "end":
        mx.clear_cache()
    y, _ = spec.start(grid[:, -1:])
    mx.eval(y)
    prompt_time = time.perf_counter() - tic
    tic = time.perf_counter()

    B = grid.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    active = list(range(B))
    step_tokens = [[t] for t in y.tolist()]
    n_gen = 0
    while True:
        keep = []
        for j, i in enumerate(active):
            for t in step_tokens[j]:
                out[i].append(t)
                n_gen += 1
                if t in eos:
                    reasons[i] = "stop"
                elif len(out[i]) >= limits[i]:
                    reasons[i] = "length"
                if reasons[i] is not None:
                    break
            if reasons[i] is None:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(active):
            spec.filter(mx.array(keep))
            active = [active[j] for j in keep]
        step_tokens, _ = spec.round()

    return _batch_response(
        text_tok, out, reasons, lengths, prompt_time, n_gen, time.perf_counter() - tic,
        spec.stats.acceptance,
    )  # fmt: skip


def _batch_response(
    text_tok: Any,
    out: list[list[int]],
    reasons: list[str | None],
    lengths: list[int],
    prompt_time: float,
    n_gen: int,
    gen_time: float,
    acceptance: float | None = None,
) -> BatchResponse:
    """batch_generate's result: each row's text (without its stop token), the counts and rates."""
    texts = []
    for i, toks in enumerate(out):
        body = toks[:-1] if reasons[i] == "stop" else toks
        texts.append(text_tok.decode(body))
    return BatchResponse(
        texts=texts,
        tokens=out,
        finish_reasons=reasons,
        prompt_tokens=sum(lengths),
        prompt_tps=sum(lengths) / max(prompt_time, 1e-9),
        generation_tokens=n_gen,
        generation_tps=n_gen / max(gen_time, 1e-9),
        peak_memory=mx.get_peak_memory() / 1e9,
        mtp_acceptance=acceptance,
    )


def _apply(processors: list[LogitsProcessor], history: mx.array, logits: mx.array) -> mx.array:
    for proc in processors:
        logits = proc(history, logits)
    return logits
