"""Qwen3.5 text models (dense and MoE): embeddings, a hybrid stack built from layer_types, norm,
lm_head. model_type qwen3_5_text / qwen3_5_moe_text.

Call: logits [B, T, vocab] = model(inputs [B, T] int, cache=None, input_embeddings=None,
position_ids=None). position_ids [3, B, T] (t, h, w) selects M-RoPE (the VLM passes them); without
them positions continue from the cache offset (per row for a batch cache).

Decode (T == 1 token ids over a filled cache of mlx-lm's KVCache / BatchKVCache / ArraysCache) runs
one `mx.compile`d function: embedding, every layer, final norm and lm_head, with the whole KV
buffers, the conv and recurrent states and the write index (an array) as inputs and outputs (see
cache.py). It is traced once per buffer size and batch shape and replayed for every token after;
everything else (prefill, quantized or rotating KV caches, right-padded prefill, a pipelined
backbone) takes the plain path.
`model.compiled_decode = False` turns it off. Every primitive of the step costs host time per
token on a GPU, so the step is written for few: [B, H] activations through the layers' `step`
methods, and fused, pre-transposed projection weights (`layers.prepare_projections`, checked
before every step and rebuilt when a layer's weight changed).

A few tokens a row (2 to `MAX_STEP_TOKENS`, e.g. a speculative verify pass, also with
`return_hidden`) over such a cache run a second compiled function over the same buffers
(`Qwen35TextBackbone.verify`, the layers' `steps`): keys and values written at the array index,
a mask causal inside the new tokens, the linear layers' conv and recurrence token by token
through the one-token kernel, whose per-token states come out of the step so that a
`LinearCache` rolls back into the call with no recompute. Traced once per token count, buffer
size and batch shape. The MTP head has its own compiled step over its static KV buffer
(`mtp_forward(..., last_only=True)`; its layer in the verify pass's row form over fused decode
projections, `MTP(..., tokens=T)`), and `verify_and_draft` puts a greedy speculative round's
verify pass and MTP pass into one compiled call (on the CPU with the extension built, its head
as one native primitive: `mtp.NATIVE_HEAD`).

`sanitize_text_weights` maps Hugging Face names and layouts to this module's: conv1d [C,1,K] ->
[C,K,1], Qwen3_5RMSNorm weights w -> 1 + w (once, the MTP head's norms included), stacked MoE
experts, tied lm_head dropped. Whether the weights are in Hugging Face's layout is read from the
weights themselves, so calling it twice changes nothing.

MTP: with `mtp_num_hidden_layers: 1` the model has an `mtp` module (models/mtp.py) and keeps the
checkpoint's `mtp.*` weights; a checkpoint without them (mlx-lm's and mlx-community's conversions
drop them) loads with the module removed (`sanitize` pops it), and so does a config without the
field. `model(..., return_hidden=True)` also returns the normed hidden states the MTP head reads.
"""

from __future__ import annotations

import contextlib
import re
import threading

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask, create_ssm_mask, gather_last_axis
from mlx_lm.models.pipeline import PipelineMixin

from . import cache as cache_lib
from . import layers as layers_lib
from . import mtp as mtp_lib
from .cache import BatchKVCache, KVCache, StaticKV, static_causal_mask, static_mask
from .config import TextConfig
from .layers import (
    DecoderLayer,
    add_norm,
    prepare_projections,
    project,
    retake_projections,
    rows_weights,
    using_rows_weights,
)
from .mtp import MTP, MTP_NORMS
from .shard import shard_text_model

# Prefill on a GPU (issue 9). A buffer is freed only once the work that reads it has run, and
# the host queued a whole step (every layer) far ahead of the GPU, so all layers'
# intermediates were alive at once (5.2 GiB above the weights in a 32k prompt, 0.8B shape,
# against 2.9 GiB for mlx-lm's model, whose many small ops keep the host behind the GPU). From
# this many tokens a call, the layers are submitted one at a time (`mx.async_eval`), the host
# never more than QUEUE_AHEAD layers ahead of the GPU (`_LayerQueue`). The arithmetic is
# unchanged in every form below.
LOOKAHEAD_MIN_T = 256
# How many layers may be queued behind the one the host waits for: 1 (the default: two
# layers' intermediates alive, the GPU never idle), 0 (one layer's, a GPU idle gap a layer:
# 21% slower at 128k tokens, `probe_prefill_memory.py --variants qa1,qa0`, session 19), or
# more (more memory alive, fewer idle gaps where the host takes longer to submit a layer than
# the GPU to run one: `benchmarks/profile_prefill.py --prompt` measures both).
QUEUE_AHEAD = 1
# Each layer on a GPU stream of its own, layer i on stream i % (QUEUE_AHEAD + 1), and before
# building layer i the host waits for that stream (`mx.synchronize(stream)`): for layer
# i - QUEUE_AHEAD - 1 to have run and for MLX to have released what it read, while the GPU
# runs the layers queued since on the other streams (a layer waits for the last one on the
# other stream on the GPU, through MLX's events). Why: MLX's CUDA backend releases a finished
# batch's buffers from a thread of the stream's own, after `mx.eval` of its outputs has
# returned; on one stream, waiting for layer i's outputs left its buffers, and now and then a
# few more layers', alive while the next layers allocated, so a long prompt's peak was the KV
# cache plus a step's intermediates plus, at random, a few layers' more (0.8B, 32k -> 128k
# tokens: growth 0.94-1.60 GiB against the KV cache's 1.125 over 54 rounds, 40 within its
# +10%). Over streams: 1.125 in 7 of 8 rounds and 1.129 in the 8th, the 9B's 3.000 in 3 of 3,
# 1-3% slower at 128k tokens (session 20, H200). False: one stream, as before. Streams are
# made once per thread and device (MLX's streams are their thread's own).
QUEUE_STREAMS = True
# Drain before each submit instead (`mx.synchronize()`: the device idle while MLX encodes the
# next layer): one layer's intermediates alive, the smallest peak (0.8B at 128k: the KV cache
# + 0.175 GiB, against + 0.308 over streams), 11-13% slower at 128k tokens and ~25% at 32k
# (session 20, H200). QUEUE_AHEAD and QUEUE_STREAMS do not apply.
DRAIN_LAYERS = False
# In those calls, also submit each layer's mixer on its own before its MLP is built
# (`DecoderLayer.chain`'s `submit`): the mixer's intermediates freed while the MLP runs. Off:
# it changed neither the speed nor the 128k peak's spread queued (session 19, 24 rounds) and
# cost 15% more drained (session 20).
SPLIT_LAYERS = False
_streams = threading.local()


def _queue_streams(n: int) -> list:
    """This thread's first n layer-queue streams on the default device (made on first use)."""
    device = mx.default_device()
    made = _streams.__dict__.setdefault(str(device), [])
    made += [mx.new_stream(device) for _ in range(n - len(made))]
    return made[:n]


class _LayerQueue:
    """How the layers of one long call reach the GPU (`queue_layers`): over streams of their
    own (QUEUE_STREAMS), queued on the caller's stream QUEUE_AHEAD ahead of the one the host
    waits for, or drained before each submit (DRAIN_LAYERS); each layer whole or, with
    SPLIT_LAYERS, its mixer submitted before its MLP is built."""

    def __init__(self) -> None:
        self.drain = DRAIN_LAYERS
        self.streams = _queue_streams(QUEUE_AHEAD + 1) if QUEUE_STREAMS and not self.drain else []
        self.queued: list = []  # submitted layers' outputs, oldest first (one stream)
        self.part = self._submit if SPLIT_LAYERS else None

    @contextlib.contextmanager
    def layer(self, i: int):
        """Build and submit layer i inside: on its stream, once that stream is free."""
        if not self.streams:
            yield
            return
        stream = self.streams[i % len(self.streams)]
        mx.synchronize(stream)
        with mx.stream(stream):
            yield

    def _submit(self, *arrays) -> None:
        if self.drain:
            mx.synchronize()
        mx.async_eval(*arrays)

    def submit(self, outputs: list, state) -> None:
        """Submit a built layer (its outputs and cache state); on one stream, then wait for
        the layer QUEUE_AHEAD back."""
        self._submit(outputs, state)
        if self.drain or self.streams:
            return
        self.queued.append(outputs)
        while len(self.queued) > QUEUE_AHEAD:
            mx.eval(self.queued.pop(0))


def queue_layers(T: int) -> bool:
    """Whether a call of T tokens a row submits its layers one at a time (LOOKAHEAD_MIN_T)."""
    return T >= LOOKAHEAD_MIN_T and mx.default_device() == mx.gpu


# Half-precision decode projections on the CPU from float32 copies made once
# (`layers.prepare_projections(..., fp32=True)`): MLX's CPU multiplies a float16 / bfloat16
# matrix by converting it block by block at every product, which is most of a small model's
# step. Same numbers (the product is rounded back to the input's dtype); the cost is memory, 4
# bytes a copied weight besides the model's own. CPU_FP32_DECODE: "all" (the default): every
# projection of the compiled steps (plain decoding of the shipped tiny model 1.5-1.6x faster;
# MTP then pays less than it costs there: benchmarks/NOTES.md, helper mtpcpu); "head": only the
# MTP head's projections and its output layer, which only speculative decoding runs; False:
# none. Either only while the copies take at most CPU_FP32_MAX_BYTES (a small model: the
# released ones keep their own weights). Read by `_prepare_decode`.
CPU_FP32_DECODE: str | bool = "all"
CPU_FP32_MAX_BYTES = 256 << 20

# Calls of up to this many tokens a row over a filled cache (speculative verify passes, the MTP
# head's) run a compiled step, traced once per token count, buffer size and batch shape; longer
# ones (prefill) take the plain path, whose shapes change with every prompt.
MAX_STEP_TOKENS = 8


class Qwen35TextBackbone(PipelineMixin, nn.Module):
    """embed_tokens -> decoder layers -> norm; returns normed hidden states [B, T, H].

    `pipeline(group)` (mlx-lm's PipelineMixin, which `mlx_lm.utils.sharded_load` calls) keeps
    layers [start_idx, end_idx) on this rank: the last rank runs the first layers, rank 0 the
    last; hidden states go down the ranks by send/recv and rank 0's result is shared with all.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._pipeline_group = None
        self._find_first_layers()

    def _find_first_layers(self) -> None:
        types = [layer.layer_type for layer in self.pipeline_layers]
        self._fa_idx = types.index("full_attention") if "full_attention" in types else None
        self._ssm_idx = types.index("linear_attention") if "linear_attention" in types else None

    @property
    def pipeline_layers(self) -> list:
        """The layers this rank runs: `layers` itself unless pipelined."""
        if self.start_idx == 0 and self.end_idx is None:
            return self.layers
        return self.layers[self.start_idx : self.end_idx]

    def pipeline(self, group, split: list[int] | None = None) -> None:
        super().pipeline(group, split=split)
        self._pipeline_group = group
        self._find_first_layers()

    def __call__(
        self,
        inputs: mx.array | None,
        cache: list | None = None,
        input_embeddings: mx.array | None = None,
        position_ids: mx.array | None = None,
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        layers = self.pipeline_layers
        if cache is None:
            cache = [None] * len(layers)
        fa_mask = ssm_mask = rope = None
        if self._fa_idx is not None:
            fa_mask = create_attention_mask(h, cache[self._fa_idx])
            if position_ids is not None:
                # Every attention layer's Rotary is the same: M-RoPE's cos/sin once per call.
                rope = layers[self._fa_idx].self_attn.rope.cos_sin(position_ids)
        if self._ssm_idx is not None:
            ssm_mask = create_ssm_mask(h, cache[self._ssm_idx])
        rank, size, group = self.pipeline_rank, self.pipeline_size, self._pipeline_group
        if rank < size - 1:
            h = mx.distributed.recv_like(h, rank + 1, group=group)
        bounded = size == 1 and cache[0] is not None and queue_layers(h.shape[1])
        lq = _LayerQueue() if bounded else None
        d = None  # the residual stream is h + d (`layers.ADD_NORM`)
        for i, (layer, c) in enumerate(zip(layers, cache, strict=True)):
            with lq.layer(i) if lq else contextlib.nullcontext():
                part = lq.part if lq else None
                if layer.is_linear:
                    h, d = layer.chain(h, d, ssm_mask, c, submit=part)
                else:
                    h, d = layer.chain(h, d, fa_mask, c, rope, submit=part)
                if lq:
                    lq.submit([a for a in (h, d) if a is not None], c.state)
        if size > 1 and d is not None:
            # Ranks pass one array: the stream, added here (the next rank starts with d None).
            h, d = h + d, None
        if rank != 0:
            h = mx.distributed.send(h, (rank - 1) % size, group=group)
            # Evaluating the cache (as prefill does) must run the send too.
            if cache[-1] is not None:
                if hasattr(cache[-1], "keys"):
                    cache[-1].keys = mx.depends(cache[-1].keys, h)
                else:
                    cache[-1][0] = mx.depends(cache[-1][0], h)
        if size > 1:
            # Rank 0 ran the last layers: every rank continues with its hidden states.
            h = mx.distributed.all_gather(h, group=group)[: h.shape[0]]
        return add_norm(self.norm, h, d)[1]

    def decode(self, tokens, kv, lin, idx, offset, left_padding, ssm_mask, position_ids):
        """One token a row over fixed-size buffers (traced by `TextModel`'s compiled step).

        tokens [B, 1]; kv: per attention layer (keys, values) [B, Hkv, capacity, D]; lin: per
        linear layer (conv state, recurrent state); idx: write index (array); offset: rotary
        position (scalar or [B]); left_padding [B] or None; ssm_mask [B] bool or None;
        position_ids [3, B, 1] or None. Returns (normed hidden [B, H], new kv, new lin).
        Activations are [B, H] throughout (the layers' `step`): on [B, 1, H] every Linear
        is a flatten, matmul and unflatten, and every primitive costs host time per token.
        """
        h = self.embed_tokens(tokens.reshape(-1))
        rope = None
        if position_ids is not None and self._fa_idx is not None:
            rope = self.layers[self._fa_idx].self_attn.rope.cos_sin(position_ids)
        kv, lin, masks = iter(kv), iter(lin), {}
        new_kv, new_lin = [], []
        d = None  # the residual stream is h + d, as in `__call__`
        for layer in self.layers:
            if layer.is_linear:
                c = list(next(lin))
                h, d = layer.step(h, d, ssm_mask, c)
                new_lin.append(tuple(c))
            else:
                keys, values = next(kv)
                C = keys.shape[2]
                if C not in masks:
                    masks[C] = static_mask(C, idx, left_padding)
                c = StaticKV(keys, values, idx, offset, left_padding is not None)
                h, d = layer.step(h, d, masks[C], c, rope)
                new_kv.append((c.keys, c.values))
        return add_norm(self.norm, h, d)[1], new_kv, new_lin

    def verify(self, tokens, kv, lin, idx, offset, left_padding, ssm_mask, position_ids):
        """T tokens a row over the same fixed-size buffers as `decode` (traced by `TextModel`'s
        compiled multi-token step, for a speculative verify pass): tokens [B, T]; kv, lin, idx,
        offset, left_padding as in `decode` (idx, offset: the first new token's); ssm_mask
        [B, T] bool or None; position_ids [3, B, T] or None. The layers' `steps`: projections
        over all T tokens, attention with a mask causal inside the new tokens
        (`static_causal_mask`), the linear layers' conv and recurrence token by token through
        the one-token kernel. Activations are [B*T, H] (row b*T + t) throughout: 2-D, every
        projection is one matmul. Returns (normed hidden [B*T, H], new kv, new lin, per linear
        layer the (conv, recurrent) states after each token, for a rollback)."""
        B, T = tokens.shape
        h = self.embed_tokens(tokens.reshape(-1))  # [B*T, H]: row b*T + t (see `steps`)
        rope = None
        if position_ids is not None and self._fa_idx is not None:
            rope = self.layers[self._fa_idx].self_attn.rope.cos_sin(position_ids)
        kv, lin, masks = iter(kv), iter(lin), {}
        new_kv, new_lin, records = [], [], []
        d = None  # the residual stream is h + d, as in `__call__`
        for layer in self.layers:
            if layer.is_linear:
                c = list(next(lin))
                h, d, states = layer.steps(h, d, T, ssm_mask, c)
                new_lin.append(tuple(c))
                records.append(states)
            else:
                keys, values = next(kv)
                C = keys.shape[2]
                if C not in masks:
                    masks[C] = static_causal_mask(C, idx, T, left_padding)
                c = StaticKV(keys, values, idx, offset, left_padding is not None)
                h, d, _ = layer.steps(h, d, T, masks[C], c, rope)
                new_kv.append((c.keys, c.values))
        return add_norm(self.norm, h, d)[1], new_kv, new_lin, records


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.args = config
        self.model_type = config.model_type
        self.model = Qwen35TextBackbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.mtp_num_hidden_layers:
            self.mtp = MTP(config)
        # Set by `shard` when lm_head holds a slice of the vocabulary: its logits are gathered.
        self.sharding_group = None
        self.compiled_decode = True
        self._traced = False
        object.__setattr__(self, "_decode_checks", [])  # see _retake_decode
        object.__setattr__(self, "_rows_cache", {})  # see _rows
        object.__setattr__(self, "_fp32_rule", None)  # see _prepare_decode
        # The weights are the compiled step's implicit inputs: updates and quantization show.
        self._decode_step = mx.compile(self._decode_impl, inputs=self)
        self._verify_step = mx.compile(self._verify_impl, inputs=self)
        self._mtp_step = mx.compile(self._mtp_impl, inputs=self)
        self._round_step = mx.compile(self._round_impl, inputs=self)

    def _decode_impl(
        self, tokens, kv, lin, idx, offset, left_padding, lin_padding, positions, rows_w=()
    ):
        """The compiled step. A batch's bookkeeping is in it too: the linear layers' mask from
        lin_padding (ArraysCache.make_mask(1)) and the advanced per-row offset and left padding,
        returned once per cache (as distinct arrays: mlx-lm updates them in place). rows_w: as
        in `_verify_impl` (a batch of a few rows on CUDA; none at batch 1)."""
        self._traced = True  # runs only while mx.compile traces
        # ArraysCache.make_mask(1) ([B, 1]: 0 >= left padding), as [B]
        ssm_mask = None if lin_padding is None else lin_padding <= 0
        keys = self._rows_cache[tokens.size][1] if rows_w else []
        with using_rows_weights(keys, rows_w):
            h, kv, lin = self.model.decode(
                tokens, kv, lin, idx, offset, left_padding, ssm_mask, positions
            )
            logits = self.logits(h, step=True)[:, None]
        offsets = [offset + 1] * len(kv) if left_padding is not None else []
        paddings = [lin_padding - 1] * len(lin) if lin_padding is not None else []
        return logits, kv, lin, offsets, paddings

    def _static_caches(self, cache: list, T: int) -> tuple | None:
        """For a compiled step of T tokens a row over `cache`: (attention caches, linear caches,
        idx, offset, left_padding, lin_padding), their KV buffers reserved for T more tokens;
        None when the cache is not one it takes (empty, quantized, rotating, right-padded
        prefill, mixed kinds)."""
        kv_caches, lin_caches = [], []
        for layer, c in zip(self.model.layers, cache, strict=True):
            (lin_caches if layer.is_linear else kv_caches).append(c)
        if any(type(c) not in cache_lib.LINEAR_CACHES or c.lengths is not None for c in lin_caches):
            return None
        if any(c[0] is None or c[1] is None for c in lin_caches):
            return None
        kinds = {type(c) for c in kv_caches}
        if not kinds <= {KVCache, BatchKVCache} or len(kinds) > 1:
            return None
        if any(c.keys is None for c in kv_caches):
            return None
        idxs = {cache_lib.kv_index(c) for c in kv_caches}
        if len(idxs) > 1:
            return None
        for c in kv_caches:
            cache_lib.reserve(c, T)
        self._prepare_decode()
        idx = mx.array(idxs.pop() if idxs else 0)
        offset, left_padding = idx, None
        if kinds == {BatchKVCache}:
            offset, left_padding = kv_caches[0].offset, kv_caches[0].left_padding
        # As the plain path, every layer of a kind reads the first cache's positions and mask.
        lin_padding = lin_caches[0].left_padding if lin_caches else None
        return kv_caches, lin_caches, idx, offset, left_padding, lin_padding

    def _decode(self, inputs: mx.array, cache: list, position_ids: mx.array | None):
        """The compiled decode step over `cache`, updated in place; None when the cache is not
        one it takes (`_static_caches`)."""
        got = self._static_caches(cache, 1)
        if got is None:
            return None
        kv_caches, lin_caches = got[:2]
        rows_w = self._rows(inputs.size) if inputs.size > 1 else ()  # (batch 1: never row-wise)
        logits, kv, lin, offsets, paddings = self._decode_step(
            *_step_args(got, inputs, position_ids), rows_w
        )
        if self._traced:
            self._traced = False
            self._retake_decode()
        for i, (c, (keys, values)) in enumerate(zip(kv_caches, kv, strict=True)):
            cache_lib.advance(c, keys, values, offsets[i] if offsets else None)
        for i, (c, (conv, state)) in enumerate(zip(lin_caches, lin, strict=True)):
            c[0], c[1] = conv, state
            if paddings:  # ArraysCache.advance(1), computed in the step (lengths is None)
                c.left_padding = paddings[i]
            if hasattr(c, "note_advance"):  # a LinearCache's rollback history (cache.py)
                c.note_advance(1)
        return logits

    def _verify_impl(
        self, tokens, kv, lin, idx, offset, left_padding, lin_padding, positions, rows_w
    ):
        """The compiled multi-token step (`Qwen35TextBackbone.verify`): logits [B, T, vocab],
        normed hidden [B, T, H], the new buffers and states, each linear layer's
        per-token states, and as in `_decode_impl` the advanced per-row offsets and left
        paddings. rows_w: the row-wise projections' broadcast matrices (`_rows`)."""
        self._traced = True  # runs only while mx.compile traces
        with using_rows_weights(self._rows_cache[tokens.size][1], rows_w):
            return self._verify_body(tokens, kv, lin, idx, offset, left_padding, lin_padding,
                                     positions)  # fmt: skip

    def _verify_body(self, tokens, kv, lin, idx, offset, left_padding, lin_padding, positions):
        T = tokens.shape[1]
        ssm_mask = None
        if lin_padding is not None:
            ssm_mask = mx.arange(T)[None] >= lin_padding[:, None]
        h, kv, lin, records = self.model.verify(
            tokens, kv, lin, idx, offset, left_padding, ssm_mask, positions
        )
        logits = self.logits(h, step=True).reshape(*tokens.shape, -1)
        h = h.reshape(*tokens.shape, -1)
        offsets = [offset + T] * len(kv) if left_padding is not None else []
        paddings = [lin_padding - T] * len(lin) if lin_padding is not None else []
        return logits, h, kv, lin, records, offsets, paddings

    def _verify(self, inputs: mx.array, cache: list, position_ids: mx.array | None):
        """The compiled multi-token step over `cache`, updated in place as the plain path would
        (a LinearCache records the call, so it can be trimmed into): (logits, hidden), or None
        when the cache is not one it takes."""
        T = inputs.shape[1]
        got = self._static_caches(cache, T)
        if got is None:
            return None
        logits, h, kv, lin, records, offsets, paddings = self._verify_step(
            *_step_args(got, inputs, position_ids), self._rows(inputs.size)
        )
        self._adopt_verify(got, kv, lin, records, offsets, paddings, T)
        return logits, h

    def _adopt_verify(self, got, kv, lin, records, offsets, paddings, T: int) -> None:
        """After a compiled multi-token step: the caches take its buffers and states and count
        its T tokens, as the plain path would (a LinearCache records the per-token states, so
        it can be trimmed into the call)."""
        if self._traced:
            self._traced = False
            self._retake_decode()
        kv_caches, lin_caches = got[:2]
        for i, (c, (keys, values)) in enumerate(zip(kv_caches, kv, strict=True)):
            cache_lib.advance(c, keys, values, offsets[i] if offsets else None, n=T)
        for i, (c, (conv, state), states) in enumerate(zip(lin_caches, lin, records, strict=True)):
            if paddings:
                c.left_padding = paddings[i]
            if isinstance(c, cache_lib.LinearCache):
                c.take_call(conv, state, T, states)
                continue
            c[0], c[1] = conv, state
            if hasattr(c, "record_states"):
                c.record_states(T, states)
            if hasattr(c, "note_advance"):
                c.note_advance(T)

    def _round_impl(self, tokens, kv, lin, idx, offset, left_padding, lin_padding, mtp_kv, rows_w):
        """`_verify_impl`, then the MTP head over every verified position with the main
        model's greedy token there as the next token (`verify_and_draft`): one compiled call."""
        self._traced = True  # runs only while mx.compile traces
        with using_rows_weights(self._rows_cache[tokens.size][1], rows_w):
            logits, h, kv, lin, records, offsets, paddings = self._verify_body(
                tokens, kv, lin, idx, offset, left_padding, lin_padding, None
            )
            target = logits.argmax(-1)
            # The head as one native primitive (`mtp.NATIVE_HEAD`; no left padding), or as ops.
            got, native = None, self.mtp.get("_native_head")
            if native is not None and mtp_kv[4] is None:
                got = mtp_lib.native_head(self, native, h, target, *mtp_kv[:3])
            if got is not None:
                o, drafts, mkeys, mvalues = got
                moffsets = []
            else:
                o, mkeys, mvalues, moffsets = self._mtp_body(h, target, *mtp_kv, None)
                drafts = self.mtp.argmax(o, self._head_logits)
        return (
            logits,
            h,
            kv,
            lin,
            records,
            offsets,
            paddings,
            target,
            o,
            drafts,
            mkeys,
            mvalues,
            moffsets,
        )

    def verify_and_draft(self, tokens: mx.array, cache: list, mtp_cache: list) -> tuple | None:
        """A greedy speculative round's model work in one compiled call: the verify pass of
        tokens [B, T] over `cache` (as `model(tokens, cache, return_hidden=True)`), then the MTP
        head over all T positions with next token argmax(logits) at each, which is the token a
        greedy round emits at every position it accepts, whatever that count turns out to be.
        Returns (logits [B, T, V], hidden [B, T, H], target [B, T] = argmax, MTP hidden
        [B, T, H], MTP drafts [B, T] = the head's argmax at each position), both caches
        advanced by T; the caller trims both by the positions it rejects. None when a cache is
        not one the compiled steps take (the caller then runs the separate calls). Text
        positions only (no M-RoPE)."""
        T = tokens.shape[1]
        c = mtp_cache[0]
        if (
            not self.compiled_decode
            or self.model.pipeline_size != 1
            or T > MAX_STEP_TOKENS
            or type(c) not in (KVCache, BatchKVCache)
            or c.keys is None
        ):
            return None
        got = self._static_caches(cache, T)
        if got is None:
            return None
        kv_caches, lin_caches, idx, offset, left_padding, lin_padding = got
        cache_lib.reserve(c, T)
        midx = mx.array(cache_lib.kv_index(c))
        moffset, mleft = midx, None
        if isinstance(c, BatchKVCache):
            moffset, mleft = c.offset, c.left_padding
        out = self._round_step(
            tokens,
            [(x.keys, x.values) for x in kv_caches],
            [(x[0], x[1]) for x in lin_caches],
            idx,
            offset,
            left_padding,
            lin_padding,
            (c.keys, c.values, midx, moffset, mleft),
            self._rows(tokens.size),
        )
        logits, h, kv, lin, records, offsets, paddings = out[:7]
        target, o, drafts, mkeys, mvalues, moffsets = out[7:]
        self._adopt_verify(got, kv, lin, records, offsets, paddings, T)
        cache_lib.advance(c, mkeys, mvalues, moffsets[0] if moffsets else None, n=T)
        return logits, h, target, o, drafts

    def _decode_groups(self) -> list:
        """(owner, names) of every group of projections the compiled step applies."""
        groups = [g for layer in self.model.layers for g in layer.decode_groups()]
        if self.has_mtp:
            groups += self.mtp.decode_groups()
        if self.config.tie_word_embeddings:
            return groups + [(self.model, ("embed_tokens",))]
        return groups + [(self, ("lm_head",))]

    def _prepare_decode(self) -> None:
        """The decode projections (`layers.prepare_projections`: fused, transposed weights),
        after one identity check per layer weight when nothing changed (and the rule of
        `CPU_FP32_DECODE`, which makes float32 copies, the same)."""
        checks = self._decode_checks
        rule = (CPU_FP32_DECODE, CPU_FP32_MAX_BYTES, mx.default_device(), mtp_lib.NATIVE_HEAD)
        if (
            checks
            and self._fp32_rule == rule
            and all(owner[n].get("weight") is w for owner, n, w in checks)
        ):
            return
        scope = self._fp32_scope()
        head = {id(owner) for owner, _ in self.mtp.decode_groups()} if self.has_mtp else set()
        for owner, names in self._decode_groups():
            fp32 = scope == "all" or (scope == "head" and id(owner) in head)
            prepare_projections(owner, names, fp32=fp32)
        if self.has_mtp:
            # The head's output layer: its own copy where the main model's is not one.
            self.mtp.pop("_decode_lm_head", None)
            if scope == "head" and self.sharding_group is None:
                name = "embed_tokens" if self.config.tie_word_embeddings else "lm_head"
                owner = self.model if self.config.tie_word_embeddings else self
                if layers_lib._cpu_fp32_copy([owner[name]]):
                    w = layers_lib.decode_weight(owner, name)  # [H, V]
                    self.mtp["_decode_lm_head"] = mx.contiguous(w.astype(mx.float32))
                    mx.eval(self.mtp["_decode_lm_head"])
            # The greedy round's native head (`mtp.NATIVE_HEAD`): float32 copies of its weights,
            # under the same memory rule as the projections' copies.
            self.mtp.pop("_native_head", None)
            native = mtp_lib.native_head_weights(self) if scope is not None else None
            if native is not None:
                self.mtp["_native_head"] = native
        object.__setattr__(self, "_fp32_rule", rule)
        self._retake_decode()

    def _fp32_scope(self) -> str | None:
        """Which decode projections run from float32 copies (`CPU_FP32_DECODE`): "head",
        "all" or None."""
        scope = CPU_FP32_DECODE
        if scope not in ("head", "all") or mx.default_device() != mx.cpu:
            return None
        if scope == "head" and not self.has_mtp:
            return None
        if scope == "all":
            n = sum(v.size for _, v in tree_flatten(self.parameters()))
        else:
            n = sum(v.size for _, v in tree_flatten(self.mtp.parameters()))
            n += self.config.vocab_size * self.config.hidden_size
        return scope if 4 * n <= CPU_FP32_MAX_BYTES else None

    def _head_logits(self, h: mx.array) -> mx.array:
        """The output layer as the MTP head's compiled steps apply it: from the float32 copy
        (`CPU_FP32_DECODE` "head"; rounded to h's dtype, the numbers of the half-precision product)
        where one was made, else as the decode step does."""
        if "_decode_lm_head" in self.mtp:
            w = self.mtp["_decode_lm_head"]
            return (h.astype(w.dtype) @ w).astype(h.dtype)
        return self._step_logits(h)

    def _retake_decode(self) -> None:
        """Record the layers' weights as the decode projections' (after they were made, or
        after a trace put them back as new Python objects: `layers.retake_projections`)."""
        groups = self._decode_groups()
        for owner, names in groups:
            retake_projections(owner, names)
        checks = [(owner, n, owner[n].get("weight")) for owner, names in groups for n in names]
        # A plain attribute: in the module's dict it would be part of the step's inputs tree.
        object.__setattr__(self, "_decode_checks", checks)

    def _rows(self, rows: int) -> list:
        """The broadcast matrices of the projections a compiled step over `rows` rows runs
        row-wise (`layers.rows_weights`; none on the CPU), passed into the multi-token steps
        (as inputs: when the weights change, so do they). Made after `_prepare_decode`, and
        again whenever it (or a trace) renewed the decode projections' record, or the rule
        that picks the row-wise projections (`layers.ROWS_GEMV`, `ROWS_KERNEL`, the device)
        changed."""
        rule = (
            layers_lib.ROWS_GEMV,
            layers_lib.ROWS_PREBUILT,
            layers_lib.ROWS_KERNEL,
            mx.default_device(),
        )
        got = self._rows_cache.get(rows)
        if got is None or got[0] is not self._decode_checks or got[3] != rule:
            keys, mats = rows_weights(self._decode_groups(), rows)
            got = self._rows_cache[rows] = (self._decode_checks, keys, mats, rule)
        return got[2]

    def logits(self, h: mx.array, step: bool = False) -> mx.array:
        """step: in the compiled decode step (`layers.project`)."""
        if self.config.tie_word_embeddings:
            if step:
                return project(self.model, ("embed_tokens",), h)[0]
            return self.model.embed_tokens.as_linear(h)
        out = project(self, ("lm_head",), h)[0] if step else self.lm_head(h)
        if self.sharding_group is not None:
            out = gather_last_axis(out, self.sharding_group)
        return out

    def _step_logits(self, h: mx.array) -> mx.array:
        return self.logits(h, step=True)

    def __call__(
        self,
        inputs: mx.array | None,
        cache: list | None = None,
        input_embeddings: mx.array | None = None,
        position_ids: mx.array | None = None,
        return_hidden: bool = False,
    ) -> mx.array | tuple[mx.array, mx.array]:
        """logits [B, T, vocab]; with `return_hidden`, (logits, normed hidden [B, T, H])."""
        if (
            self.compiled_decode
            and self.model.pipeline_size == 1  # the step runs every layer: not pipelined
            and cache is not None
            and input_embeddings is None
            and inputs.shape[1] <= MAX_STEP_TOKENS
        ):
            if inputs.shape[1] == 1 and not return_hidden:
                logits = self._decode(inputs, cache, position_ids)
                if logits is not None:
                    return logits
            else:
                out = self._verify(inputs, cache, position_ids)
                if out is not None:
                    return out if return_hidden else out[0]
        h = self.model(inputs, cache, input_embeddings=input_embeddings, position_ids=position_ids)
        if return_hidden:
            return self.logits(h), h
        return self.logits(h)

    @property
    def has_mtp(self) -> bool:
        return "mtp" in self

    def make_mtp_cache(self, left_padding: list[int] | None = None) -> list:
        """The MTP layer's KV cache (one layer), left-padded like the main cache's."""
        return cache_lib.make_cache(["full_attention"], left_padding=left_padding)

    def mtp_forward(
        self,
        hidden: mx.array,
        next_tokens: mx.array,
        cache: list | None = None,
        position_ids: mx.array | None = None,
        last_only: bool = False,
    ) -> tuple[mx.array, mx.array]:
        """The MTP head (models/mtp.py): hidden [B, T, H] at positions i, next_tokens [B, T]
        (x_{i+1}) -> (logits [B, T, vocab] predicting x_{i+2}, MTP hidden [B, T, H]).

        `cache` is `make_mtp_cache()`'s list (None: positions from 0, no cache, as in training);
        `position_ids` [3, B, T] (M-RoPE) or None (the cache offset gives the positions).
        `last_only`: logits for the last position only ([B, 1, vocab]), all a draft needs."""
        c = cache[0] if cache is not None else None
        if (
            self.compiled_decode
            and last_only
            and type(c) in (KVCache, BatchKVCache)
            and c.keys is not None
            and next_tokens.shape[1] <= MAX_STEP_TOKENS
        ):
            return self._mtp_compiled(hidden, next_tokens, c, position_ids)
        emb = self.model.embed_tokens(next_tokens)
        mask = create_attention_mask(emb, c)
        rope = None
        if position_ids is not None:
            rope = self.mtp.layers[0].self_attn.rope.cos_sin(position_ids)
        o = self.mtp(hidden, emb, mask, c, rope)
        o_out = o[:, -1:] if last_only else o
        return self.mtp.logits(o_out, self.logits, self.config.vocab_size), o

    def _mtp_impl(self, hidden, tokens, keys, values, idx, offset, left_padding, positions, rows_w):
        """The MTP head compiled over its static KV buffer, T tokens a row (the `verify`
        pattern): (logits [B, 1, vocab] at the last position, MTP hidden [B, T, H], new buffers,
        the advanced per-row offset of a batch cache as a list of 0 or 1)."""
        self._traced = True  # runs only while mx.compile traces
        with using_rows_weights(self._rows_cache[tokens.size][1], rows_w):
            o, keys, values, offsets = self._mtp_body(
                hidden, tokens, keys, values, idx, offset, left_padding, positions
            )
            logits = self.mtp.logits(o[:, -1:], self._head_logits, self.config.vocab_size)
        return logits, o, keys, values, offsets

    def _mtp_body(self, hidden, tokens, keys, values, idx, offset, left_padding, positions):
        T = tokens.shape[1]
        mask = static_causal_mask(keys.shape[2], idx, T, left_padding)
        rope = None
        if positions is not None:
            rope = self.mtp.layers[0].self_attn.rope.cos_sin(positions)
        c = StaticKV(keys, values, idx, offset, left_padding is not None)
        B, H = tokens.shape[0], hidden.shape[-1]
        # Rows [B*T, H] through the layer's `steps`, as the verify pass runs the main model.
        emb = self.model.embed_tokens(tokens.reshape(-1))
        o = self.mtp(hidden.reshape(B * T, H), emb, mask, c, rope, T).reshape(B, T, H)
        offsets = [offset + T] if left_padding is not None else []
        return o, c.keys, c.values, offsets

    def _mtp_compiled(self, hidden, next_tokens, c, position_ids):
        T = next_tokens.shape[1]
        cache_lib.reserve(c, T)
        self._prepare_decode()  # (the lm_head's decode form)
        idx = mx.array(cache_lib.kv_index(c))
        offset, left_padding = idx, None
        if isinstance(c, BatchKVCache):
            offset, left_padding = c.offset, c.left_padding
        logits, o, keys, values, offsets = self._mtp_step(
            hidden,
            next_tokens,
            c.keys,
            c.values,
            idx,
            offset,
            left_padding,
            position_ids,
            self._rows(next_tokens.size),
        )
        if self._traced:
            self._traced = False
            self._retake_decode()
        cache_lib.advance(c, keys, values, offsets[0] if offsets else None, n=T)
        return logits, o

    @property
    def layers(self) -> list:
        """The decoder layers this process runs (all of them unless pipelined)."""
        return self.model.pipeline_layers

    def make_cache(self, left_padding: list[int] | None = None) -> list:
        types = [layer.layer_type for layer in self.layers]
        return cache_lib.make_cache(types, left_padding=left_padding)

    def shard(self, group=None) -> None:
        """Tensor parallel: keep this rank's share of every layer (see `models.shard`)."""
        shard_text_model(self, group)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hugging Face names/layouts -> ours (idempotent). Without any `mtp.*` weight the MTP
        module is removed from the model; pass all of a checkpoint's weights at once."""
        if self.has_mtp and not any(_is_mtp_key(k) for k in weights):
            self.pop("mtp")
        return sanitize_text_weights(weights, self.config, keep_mtp=self.has_mtp)

    @property
    def cast_predicate(self):
        # A_log stays fp32 whatever dtype the rest is cast to.
        return lambda path: not path.endswith("A_log")

    @property
    def quant_predicate(self):
        if not self.config.is_moe:
            return None

        def predicate(path, module):
            # Routers and the shared-expert gate are tiny and sensitive: 8 bits.
            if path.endswith("mlp.gate") or path.endswith("shared_expert_gate"):
                return {"group_size": 64, "bits": 8}
            return True

        return predicate


_NORM_SUFFIXES = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
)
_FULL_NORMS = ("model.norm.weight", *MTP_NORMS)
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(.+)$")


def _step_args(got: tuple, inputs: mx.array, position_ids: mx.array | None) -> tuple:
    """A compiled step's arguments from `TextModel._static_caches`' result: tokens, the KV
    buffers, the linear states, idx, offset, left_padding, lin_padding, position_ids."""
    kv_caches, lin_caches, idx, offset, left_padding, lin_padding = got
    kv = [(c.keys, c.values) for c in kv_caches]
    lin = [(c[0], c[1]) for c in lin_caches]
    return inputs, kv, lin, idx, offset, left_padding, lin_padding, position_ids


def is_hf_layout(weights: dict[str, mx.array]) -> bool:
    """True when the weights are in Hugging Face's layout (conv1d stored [C, 1, K], K > 1).

    Decide once for all of a checkpoint's weights (all shards together): a shard without any
    conv1d weight gives no evidence and reads as already sanitized.
    """
    for k, v in weights.items():
        if k.endswith("conv1d.weight") and v.ndim == 3:
            return _is_hf_conv(v)
    return False


def _is_hf_conv(v: mx.array) -> bool:
    """A 3-D conv1d weight in Hugging Face's [C, 1, K] layout (K > 1), not MLX's [C, K, 1]."""
    return v.shape[1] == 1 and v.shape[2] > 1


# Checkpoint prefixes of the vision tower's weights (HF, mlx-vlm, ours): not the text model's.
VISION_PREFIXES = ("model.visual.", "visual.", "vision_tower.")


def _is_mtp_key(key: str) -> bool:
    return key.startswith(("mtp.", "model.mtp.", "language_model.mtp."))


def _strip_prefix(key: str, keep_mtp: bool = False) -> str | None:
    """Map a checkpoint key to this TextModel's name; None to drop it."""
    if _is_mtp_key(key):
        return "mtp." + key.split("mtp.", 1)[1] if keep_mtp else None
    if key.startswith(VISION_PREFIXES):
        return None
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("language_model.model."):
        return "model." + key[len("language_model.model.") :]
    if key.startswith("language_model.lm_head."):
        return key[len("language_model.") :]
    return key


def sanitize_text_weights(
    weights: dict[str, mx.array], config: TextConfig, keep_mtp: bool = False
) -> dict[str, mx.array]:
    """Hugging Face names/layouts -> TextModel's. Idempotent.

    Whether norms still need the +1 shift and conv1d its transpose is read from the weights
    (`is_hf_layout`), so pass all of a checkpoint's weights at once. `mtp.*` weights are kept
    (their norms shifted like the others) when `keep_mtp`, else dropped.
    """
    hf = is_hf_layout(weights)
    out: dict[str, mx.array] = {}
    per_expert: dict[tuple[str, str, str], dict[int, mx.array]] = {}
    for key, v in weights.items():
        key = _strip_prefix(key, keep_mtp)
        if key is None:
            continue
        if config.tie_word_embeddings and key.startswith("lm_head."):
            continue
        key = key.replace(".mlp.switch_mlp.", ".mlp.experts.")
        m = _PER_EXPERT.match(key)
        if m:
            prefix, idx, proj, suffix = m.groups()
            per_expert.setdefault((prefix, proj, suffix), {})[int(idx)] = v
            continue
        if key.endswith("conv1d.weight") and v.ndim == 3 and _is_hf_conv(v):
            v = v.swapaxes(1, 2)
        elif hf and v.ndim == 1 and (key in _FULL_NORMS or key.endswith(_NORM_SUFFIXES)):
            v = (v.astype(mx.float32) + 1.0).astype(v.dtype)
        elif key.endswith("A_log"):
            v = v.astype(mx.float32)
        elif key.endswith(".mlp.experts.gate_up_proj"):
            # Slices and transposes are views; MLX CUDA's gather_mm (SwitchGLU) reads its expert
            # weights as if dense: with a strided view it returned garbage on an H100 (scaled
            # error 1.0 on the moe_fused golden case), so the stacked experts are made dense.
            gate, up = (mx.contiguous(w) for w in _split_gate_up(key, v, config))
            base = key[: -len("gate_up_proj")]
            out[base + "gate_proj.weight"] = gate
            out[base + "up_proj.weight"] = up
            continue
        elif key.endswith(".mlp.experts.down_proj"):
            out[key + ".weight"] = mx.contiguous(_down_layout(key, v, config))
            continue
        out[key] = v
    for (prefix, proj, suffix), experts in per_expert.items():
        n = len(experts)
        if sorted(experts) != list(range(n)):
            raise ValueError(
                f"{prefix}.N.{proj}.{suffix}: expert indices {sorted(experts)} are not 0..{n - 1}"
            )
        out[f"{prefix}.{proj}.{suffix}"] = mx.stack([experts[i] for i in range(n)])
    return out


def _split_gate_up(key: str, v: mx.array, config: TextConfig) -> tuple[mx.array, mx.array]:
    """Fused experts.gate_up_proj -> gate, up [E, I, H] (transformers: [E, 2I, H], gate first)."""
    I, H = config.moe_intermediate_size, config.hidden_size
    if v.ndim == 3 and v.shape[1:] == (2 * I, H):
        return v[:, :I], v[:, I:]
    if v.ndim == 3 and v.shape[1:] == (H, 2 * I):
        # The transposed variant ([E, H, 2I], used by some exporters).
        v = v.swapaxes(1, 2)
        return v[:, :I], v[:, I:]
    raise ValueError(
        f"{key}: shape {tuple(v.shape)}, expected [E, {2 * I}, {H}] or [E, {H}, {2 * I}]"
    )


def _down_layout(key: str, v: mx.array, config: TextConfig) -> mx.array:
    """Fused experts.down_proj -> [E, H, I]."""
    I, H = config.moe_intermediate_size, config.hidden_size
    if v.ndim == 3 and v.shape[1:] == (H, I):
        return v
    if v.ndim == 3 and v.shape[1:] == (I, H):
        return v.swapaxes(1, 2)
    raise ValueError(f"{key}: shape {tuple(v.shape)}, expected [E, {H}, {I}] or [E, {I}, {H}]")
