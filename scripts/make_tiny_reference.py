"""Write transformers' logits for the shipped tiny model (src/qwen35_mlx/assets/tiny).

Dev-only: needs torch and transformers (the `dev` extra). Tests never import this file; they read
what it writes, `tests/data/tiny_reference.npz`:

- `input_ids` [1, T]: a fixed chat-templated prompt and a continuation (T > 64, so a chunked
  prefill crosses a chunk), tokenized by the shipped tokenizer;
- `logits` [1, T, V]: float32 logits of transformers' own `Qwen3_5ForCausalLM`, in float32, on
  the shipped weights (float16, upcast exactly), eager attention.

The shipped checkpoint is in MLX layout; this script maps it back to Hugging Face's by hand
(RMSNorm weights zero-centred, conv1d [C, 1, K]), independently of qwen35_mlx's sanitize, so a
bug there cannot hide in the reference.

Run: `python scripts/make_tiny_reference.py` (a few seconds on CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import PreTrainedTokenizerFast, Qwen3_5ForCausalLM, Qwen3_5TextConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src" / "qwen35_mlx" / "assets" / "tiny"
OUT = ROOT / "tests" / "data" / "tiny_reference.npz"

MESSAGES = [
    {"role": "user", "content": "What is a list comprehension?"},
]
CONTINUATION = (
    "A list comprehension builds a new list from an iterable in one expression, "
    'for example [x * x for x in range(10) if x % 2 == 0]. The "for" clause runs first, '
    "then the condition filters the items."
)

# Hugging Face stores these RMSNorm weights zero-centred (applied as 1 + w); MLX layout stores
# them as applied. The gated norm inside linear attention is stored as applied in both.
ZERO_CENTRED = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight",
                "k_norm.weight")  # fmt: skip


def hf_state_dict(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in weights.items():
        v = v.astype(np.float32)
        if k == "model.norm.weight" or k.endswith(ZERO_CENTRED):
            v = v - 1.0
        elif k.endswith("conv1d.weight"):
            v = v.transpose(0, 2, 1)  # MLX [C, K, 1] -> HF [C, 1, K]
        out[k] = torch.from_numpy(np.ascontiguousarray(v))
    return out


def main() -> None:
    torch.set_grad_enabled(False)
    config = json.loads((TINY / "config.json").read_text())
    config.pop("dtype", None)
    hf_config = Qwen3_5TextConfig(**config)
    hf_config._attn_implementation = "eager"
    model = Qwen3_5ForCausalLM(hf_config).float().eval()
    state = hf_state_dict(load_file(TINY / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings: lm_head.weight is the embedding, not a stored tensor.
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tok = PreTrainedTokenizerFast.from_pretrained(TINY)
    prompt = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt + CONTINUATION, add_special_tokens=False)
    assert len(ids) > 64, len(ids)
    input_ids = np.array([ids], dtype=np.int32)
    logits = model(input_ids=torch.from_numpy(input_ids).long(), use_cache=False).logits
    logits = logits.float().numpy()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, input_ids=input_ids, logits=logits)
    print(f"T={len(ids)}, max|logit| {np.abs(logits).max():.3f} -> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
