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

The layer is a `layers.DecoderLayer` of type full_attention, dense or MoE like the main model's
MLPs. Its KV cache holds one entry per position i, so its rotary offset is the position of h_i
(M-RoPE positions, for the VLM, are passed like the main model's). Norms are mlx's RMSNorm with
the full multiplier: `mtp.norm`, `mtp.pre_fc_norm_*` and the layer's norms are stored
zero-centred in Hugging Face checkpoints and shifted once by the text model's `sanitize`.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig
from .layers import DecoderLayer, add_norm, project

# Checkpoint names of the MTP norms that are Qwen3_5RMSNorm ((1 + w) in Hugging Face's layout),
# besides the decoder layer's own (input/post-attention layernorm, q_norm, k_norm).
MTP_NORMS = ("mtp.norm.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.pre_fc_norm_embedding.weight")


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
