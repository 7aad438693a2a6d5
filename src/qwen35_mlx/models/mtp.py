"""Qwen3.5's multi-token-prediction (MTP) head: drafts the token after next for speculative
decoding (speculative.py).

For position i, with h_i the backbone's hidden state there and x_{i+1} the token that follows:
    u_i = fc([pre_fc_norm_embedding(embed(x_{i+1})) | pre_fc_norm_hidden(h_i)])    # [B, T, H]
    o_i = norm(layer(u_i))                         # one full-attention decoder layer, own KV cache
    logits_i = lm_head(o_i)                        # the main model's lm_head (or tied embedding)
and logits_i predicts x_{i+2}. `fc` is a 2H -> H linear without bias; the embedding is the main
model's. The concatenation puts the embedding first and the hidden state second, and h_i is the
backbone's output after its final norm (the hidden state the main lm_head reads), as vLLM's
`qwen3_5_mtp.py` feeds the target model's returned (normed) hidden states; transformers 5.24 has
no MTP module (it ignores `mtp.*` on load). Drafting a second token feeds o_i itself as the
next hidden state (vLLM does the same).

Draft vocabulary (optional; FR-Spec, EAGLE-3): with `use_draft_vocab(model, ids)` the head's
logits are those of the lm_head's rows for the N tokens `ids` only (a [N, H] matrix instead of
[V, H]: the head's lm_head is most of its cost on a small model), and -inf for every other token.
A greedy draft is then ids[argmax over the N]; a sampled one comes from a distribution that is
zero outside the subset, which the rejection rule takes as any other draft distribution: the
emitted tokens stay the main model's either way, only the acceptance changes. A checkpoint
folder carries its subset in `draft_vocab.json` ({"token_ids": [...]}, read by the loader).

The layer is a `layers.DecoderLayer` of type full_attention, dense or MoE like the main model's
MLPs. Its KV cache holds one entry per position i, so its rotary offset is the position of h_i
(M-RoPE positions, for the VLM, are passed like the main model's). Norms are mlx's RMSNorm with
the full multiplier: `mtp.norm`, `mtp.pre_fc_norm_*` and the layer's norms are stored
zero-centred in Hugging Face checkpoints and shifted once by the text model's `sanitize`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..kernels import cpu_ext
from .config import TextConfig
from .layers import MLP, DecoderLayer, add_norm, decode_weight, project

# Checkpoint names of the MTP norms that are Qwen3_5RMSNorm ((1 + w) in Hugging Face's layout),
# besides the decoder layer's own (input/post-attention layernorm, q_norm, k_norm).
MTP_NORMS = ("mtp.norm.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.pre_fc_norm_embedding.weight")

# The draft vocabulary of a checkpoint folder (module doc).
DRAFT_VOCAB_FILE = "draft_vocab.json"

# A greedy round's head (`TextModel.verify_and_draft`) on the CPU as one native primitive
# (`cpu_ext.mtp_head`, kernels/cpu_ext/src/mtp_head_cpu.cpp) where the extension is built, in
# place of the ~73 MLX primitives of the compiled head (host time per primitive is most of the
# head's cost on a small model: benchmarks/NOTES.md, "Session 17, helper mtphead"). It computes
# in float32 throughout where MLX's ops round each result to the model's float16, so its drafts
# are approximate (the verify pass is exact: the emitted tokens cannot change, only the
# acceptance could). False: MLX's ops (the exact head). Read by `native_head_weights`.
NATIVE_HEAD = True


def mtp_layer_config(config: TextConfig) -> TextConfig:
    """The config of the MTP decoder layer: one full-attention layer, MoE iff the model is."""
    return dataclasses.replace(
        config,
        num_hidden_layers=1,
        layer_types=["full_attention"],
        mlp_only_layers=[],
        decoder_sparse_step=1,
        mtp_num_hidden_layers=0,
    )


class MTP(nn.Module):
    """fc over [normed embedding | normed hidden], one decoder layer, norm (see module doc)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        H = config.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = nn.RMSNorm(H, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(H, eps=config.rms_norm_eps)
        self.layers = [DecoderLayer(mtp_layer_config(config), 0)]
        self.norm = nn.RMSNorm(H, eps=config.rms_norm_eps)

    def __call__(
        self,
        hidden: mx.array,
        embeddings: mx.array,
        mask=None,
        cache=None,
        rope: tuple[mx.array, mx.array] | None = None,
        tokens: int | None = None,
    ) -> mx.array:
        """hidden [B, T, H] (h_i), embeddings [B, T, H] (embed(x_{i+1})) -> o [B, T, H] (normed).

        mask: the attention mask for the layer (mlx-lm's create_attention_mask); cache: the
        layer's KV cache; rope: M-RoPE (cos, sin), or None for positions from the cache offset.
        `tokens` T (the compiled steps, text.py): hidden and embeddings are rows [B*T, H] (row
        b*T + t) and so is o; cache a `cache.StaticKV`, mask [1 or B, 1, T, capacity]; the layer
        runs as the verify pass runs the main model's (`DecoderLayer.steps`: the fused decode
        projections, `layers.project`), with the same arithmetic.
        """
        e = self.pre_fc_norm_embedding(embeddings)
        h = self.pre_fc_norm_hidden(hidden.astype(e.dtype))
        eh = mx.concatenate([e, h], axis=-1)
        if tokens is None:
            u = self.layers[0](self.fc(eh), mask, cache, rope)
            return self.norm(u)
        u = project(self, ("fc",), eh)[0]
        x, d, _ = self.layers[0].steps(u, None, tokens, mask, cache, rope)
        return add_norm(self.norm, x, d)[1]

    def decode_groups(self) -> list:
        """(owner, names) of the projection groups the compiled steps apply (`layers.project`)."""
        return [(self, ("fc",)), *self.layers[0].decode_groups()]

    @property
    def draft_vocab(self) -> list[int] | None:
        """The draft vocabulary's token ids (`use_draft_vocab`), or None: the whole vocabulary."""
        return self["_draft_ids"].tolist() if "_draft_ids" in self else None

    # Logits of the head's output o [..., H]. The arrays live under "_"-names: kept out of
    # parameters() (not saved, not loaded) but, as entries of the module, inputs of the
    # compiled steps (`mx.compile(..., inputs=model)`), so setting or clearing them retraces.
    def logits(self, o: mx.array, lm_head: Callable, vocab: int) -> mx.array:
        """[..., V]: lm_head(o), or over the draft vocabulary with -inf elsewhere."""
        if "_draft_ids" not in self:
            return lm_head(o)
        sub = o @ self["_draft_rows_t"]  # [..., N]
        full = mx.full((*sub.shape[:-1], vocab), -mx.inf, dtype=sub.dtype)
        ids = mx.broadcast_to(self["_draft_ids"], sub.shape)
        return mx.put_along_axis(full, ids, sub, axis=-1)

    def argmax(self, o: mx.array, lm_head: Callable) -> mx.array:
        """The greedy draft [...] at each position of o [..., H]."""
        if "_draft_ids" not in self:
            return lm_head(o).argmax(-1)
        return self["_draft_ids"][(o @ self["_draft_rows_t"]).argmax(-1)]


def native_head_takes(text: nn.Module) -> bool:
    """Whether a greedy round of text model `text` runs its head as the native primitive
    (`NATIVE_HEAD`): on the CPU with the extension built, a dense MTP layer of plain float16 /
    float32 Linears without biases, no draft vocabulary, not sharded. (A left-padded batch still
    takes MLX's ops, round by round.)"""
    if not NATIVE_HEAD or not getattr(text, "has_mtp", False):
        return False
    if mx.default_device() != mx.cpu or not hasattr(cpu_ext.load(), "mtp_head"):
        return False
    mtp = text.mtp
    layer = mtp.layers[0]
    attn = layer.self_attn
    if not isinstance(layer.mlp, MLP):
        return False
    linears = [mtp.fc, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
    linears += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    out = text.model.embed_tokens if text.config.tie_word_embeddings else text.lm_head
    if "_draft_ids" in mtp or getattr(text, "sharding_group", None) is not None:
        return False
    if any(type(m) is not nn.Linear or "bias" in m for m in linears):
        return False
    if type(out) not in (nn.Linear, nn.Embedding) or "bias" in out:
        return False
    return all(m.weight.dtype in (mx.float16, mx.float32) for m in [out, *linears])


def native_head_weights(text: nn.Module) -> list[mx.array] | None:
    """The float32 matrices [in, out] `cpu_ext.mtp_head` takes for text model `text`'s head: fc
    [2H, H], q|k|v [H, n], o [n, H], gate|up [H, 2I], down [I, H], lm_head [H, V] (the main
    model's float32 decode copy where there is one), or None where the native head does not
    apply: `NATIVE_HEAD` off, not the CPU, the extension not built, a draft vocabulary, an MoE
    or quantized layer, biases, a sharded model. Copies of the decode groups' weights, so
    `TextModel._prepare_decode` makes them again when those change; the norms are read from the
    modules at each trace (`native_head`)."""
    if not native_head_takes(text):
        return None
    mtp = text.mtp
    layer = mtp.layers[0]
    attn = layer.self_attn
    out = text.model.embed_tokens if text.config.tie_word_embeddings else text.lm_head

    def t(m: nn.Module) -> mx.array:  # [in, out]
        return m.weight.T.astype(mx.float32)

    mats = [
        t(mtp.fc),
        mx.concatenate([t(attn.q_proj), t(attn.k_proj), t(attn.v_proj)], axis=1),
        t(attn.o_proj),
        mx.concatenate([t(layer.mlp.gate_proj), t(layer.mlp.up_proj)], axis=1),
        t(layer.mlp.down_proj),
        t(out),
    ]
    mats = [mx.contiguous(w) for w in mats]
    # The output layer: the main model's decode copy where it is one (float32 [H, V]): the
    # verify pass reads it just before, and the copy is 4 V H bytes.
    owner, name = (
        (text.model, "embed_tokens") if text.config.tie_word_embeddings else (text, "lm_head")
    )
    main = decode_weight(owner, name)
    if isinstance(main, mx.array) and main.dtype == mx.float32 and main.shape == mats[-1].shape:
        mats[-1] = main
    mx.eval(mats)
    return mats


def native_head(text: nn.Module, mats: list, hidden, tokens, keys, values, idx) -> tuple | None:
    """The head over T positions a row as one native primitive (`NATIVE_HEAD`): hidden [B, T, H]
    (h_i), tokens [B, T] (x_{i+1}), the layer's KV buffers [B, Hkv, capacity, D] with positions
    idx .. idx + T - 1 to fill (no left padding; plain positions from idx), the matrices of
    `native_head_weights` -> (o [B, T, H], greedy drafts [B, T] uint32, keys, values). float32
    arithmetic: near the exact head, not equal. None for dtypes the primitive does not take
    (bfloat16: the caller runs MLX's ops)."""
    B, T, H = hidden.shape
    mtp = text.mtp
    layer = mtp.layers[0]
    attn = layer.self_attn
    emb = text.model.embed_tokens(tokens.reshape(-1))
    fc, qkv, o_proj, gate_up, down, lm_head = mats
    # In the primitive's order; the vectors (norms, rotary frequencies) as the modules hold them.
    weights = [
        mtp.pre_fc_norm_embedding.weight,
        mtp.pre_fc_norm_hidden.weight,
        fc,
        layer.input_layernorm.weight,
        qkv,
        attn.q_norm.weight,
        attn.k_norm.weight,
        o_proj,
        layer.post_attention_layernorm.weight,
        gate_up,
        down,
        mtp.norm.weight,
        lm_head,
        attn.rope._inv_freq,
    ]
    if not all(a.dtype in (mx.float16, mx.float32) for a in (hidden, emb, keys, *weights)):
        return None
    o, drafts, keys, values = cpu_ext.load().mtp_head(
        hidden.reshape(B * T, H),
        emb,
        keys,
        values,
        idx,
        weights,
        T,
        attn.num_heads,
        attn.num_kv_heads,
        attn.rope.rotary_dim,
        text.config.rms_norm_eps,
        attn.output_gate,
    )
    return o.reshape(B, T, H), drafts.reshape(B, T), keys, values


def lm_head_rows(text: nn.Module, ids: mx.array) -> mx.array:
    """The rows [N, H] of a text model's output layer for token ids [N], dequantized."""
    if text.config.tie_word_embeddings:
        return text.model.embed_tokens(ids)  # (a QuantizedEmbedding dequantizes its rows)
    head = text.lm_head
    if isinstance(head, nn.QuantizedLinear):
        biases = head.get("biases")
        return mx.dequantize(
            head.weight[ids],
            head.scales[ids],
            None if biases is None else biases[ids],
            group_size=head.group_size,
            bits=head.bits,
            mode=head.mode,
        )
    return head.weight[ids]


def use_draft_vocab(model: nn.Module, ids: Sequence[int] | None) -> None:
    """Draft over the token ids `ids` only (module doc), or over the whole vocabulary (None).
    Call it after the weights are final (loaded, cast, quantized): it copies the lm_head's
    rows."""
    text = getattr(model, "language_model", model)
    if "mtp" not in text:
        raise ValueError("this model has no multi-token-prediction head (mtp.*)")
    mtp = text.mtp
    if ids is None:
        for key in ("_draft_ids", "_draft_rows_t"):
            mtp.pop(key, None)
        return
    ids = [int(i) for i in ids]
    V = text.config.vocab_size
    if not ids or len(set(ids)) != len(ids) or not all(0 <= i < V for i in ids):
        raise ValueError(f"a draft vocabulary needs distinct token ids in [0, {V})")
    if getattr(text, "sharding_group", None) is not None:
        raise ValueError("a draft vocabulary needs the whole lm_head (this model's is sharded)")
    idx = mx.array(ids, dtype=mx.int32)
    mtp["_draft_ids"] = idx
    mtp["_draft_rows_t"] = mx.contiguous(lm_head_rows(text, idx).T)  # [H, N]


def read_draft_vocab(path: str | Path) -> list[int] | None:
    """The token ids of a checkpoint folder's `draft_vocab.json`, or None without one."""
    f = Path(path) / DRAFT_VOCAB_FILE
    if not f.is_file():
        return None
    try:
        ids = json.loads(f.read_text())["token_ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{f}: not a draft vocabulary ({{"token_ids": [...]}}): {e}') from e
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"{f}: token_ids must be a list of integers")
    return ids
