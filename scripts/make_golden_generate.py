"""Write the golden generation checkpoint: tiny tokenizer + tiny random Qwen3.5 text model +
transformers' greedy continuations.

Dev-only: needs torch, transformers and tokenizers. Tests never import this file; they read what it
writes under `tests/data/golden/generate/`:

- `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`: a byte-level BPE trained here,
  offline, on docstrings of a few standard-library modules, with Qwen's special tokens
  (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<think>`, `</think>`) and the tiny model's
  Qwen3.5-style chat template (`examples/chat_template.jinja`) that honours `enable_thinking`;
- `config.json` + `model.safetensors` as `save_pretrained` writes them (`model_type: qwen3_5_text`,
  regular stack L L L F, untied embeddings (tied ones make a random model repeat its input token),
  noise on every parameter, zero lm_head rows for tokens that are not printable on their own);
- `golden.json`: for each case (chat-templated prompt, raw prompt) the prompt text, its token ids
  and the token ids + text of transformers' greedy `generate` (`do_sample=False`).

The seed is chosen so that along every golden path the top-1 logit beats the top-2 by a clear
margin (float32 rounding differences between frameworks cannot flip a greedy choice), the path
uses several distinct tokens, and it decodes to valid UTF-8.

Run: `python scripts/make_golden_generate.py` (a few seconds on CPU).
"""

from __future__ import annotations

import inspect
import json
import shutil

import torch
from _golden import ROOT, noise_text_param, rope_parameters, save_hf, text_config_dict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3_5ForCausalLM, Qwen3_5TextConfig

OUT = ROOT / "tests" / "data" / "golden" / "generate"

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
VOCAB = 384
MAX_NEW = 24
MIN_MARGIN = 1e-3  # smallest allowed top-1 minus top-2 logit gap on the golden paths
MIN_DISTINCT = 6  # a path that repeats one token tests little

# The tiny model's template (examples/), one copy.
CHAT_TEMPLATE = (ROOT / "examples" / "chat_template.jinja").read_text()

PROMPT = "Write a short line about the sea."
SYSTEM = "You are a helpful assistant."


def corpus() -> list[str]:
    import collections
    import functools
    import itertools
    import json as json_mod
    import pathlib
    import textwrap

    texts = []
    for mod in (collections, functools, itertools, json_mod, pathlib, textwrap, inspect):
        texts.append(inspect.getdoc(mod) or "")
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                texts.append(doc)
    return texts


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@torch.no_grad()
def add_noise(model: torch.nn.Module, gen: torch.Generator) -> None:
    for name, p in model.named_parameters():
        noise_text_param(name, p, gen)


def build_model(
    vocab: int, eos_id: int, pad_id: int, seed: int, muted: list[int]
) -> Qwen3_5ForCausalLM:
    config = Qwen3_5TextConfig(
        **text_config_dict(
            model_type=None,
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            layer_types=None,
            head_dim=32,
            linear_key_head_dim=8,
            linear_value_head_dim=16,
            max_position_embeddings=4096,
            pad_token_id=pad_id,
            bos_token_id=None,
            eos_token_id=eos_id,
            rope_parameters=rope_parameters(0.25, [2, 1, 1]),
        )
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(config).eval()
    add_noise(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        # A zero lm_head row gives logit 0, which never beats the best of ~300 random logits:
        # greedy paths avoid tokens that are not printable text on their own.
        model.lm_head.weight[muted] = 0.0
    return model


@torch.no_grad()
def greedy(model, ids: list[int]) -> tuple[list[int], float]:
    """transformers' greedy generate, and the smallest top-1 / top-2 gap along the path."""
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=MAX_NEW,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[0, len(ids) :].tolist()
    margin = min(float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores)
    return new, margin


def unprintable(tokenizer) -> list[int]:
    """Ids whose text alone is a partial UTF-8 sequence or a control character, and the special
    tokens other than the end token."""
    out = [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS if t != "<|im_end|>"]
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if "\ufffd" in text or any(ord(c) < 32 and c != "\n" or ord(c) == 127 for c in text):
            out.append(i)
    return out


def main() -> None:
    tokenizer = build_tokenizer()
    muted = unprintable(tokenizer)
    vocab = len(tokenizer)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompts = {"chat": chat, "raw": PROMPT}

    for seed in range(300):
        model = build_model(vocab, eos_id, pad_id, seed, muted)
        golden, ok = {}, True
        for name, text in prompts.items():
            ids = tokenizer.encode(text, add_special_tokens=False)
            new, margin = greedy(model, ids)
            # A golden path must be long (no early eos) and unambiguous.
            text_new = tokenizer.decode(new)
            if (
                len(new) < MAX_NEW
                or eos_id in new
                or margin < MIN_MARGIN
                or len(set(new)) < MIN_DISTINCT
                or "\ufffd" in text_new
            ):
                ok = False
                break
            golden[name] = {
                "prompt": text,
                "prompt_ids": ids,
                "tokens": new,
                "text": text_new,
                "min_margin": margin,
            }
        if ok:
            break
    else:
        raise RuntimeError("no seed gave unambiguous golden paths")

    golden.update(user=PROMPT, system=SYSTEM, max_new_tokens=MAX_NEW, seed=seed)
    shutil.rmtree(OUT, ignore_errors=True)
    save_hf(model, OUT)
    tokenizer.save_pretrained(OUT)
    (OUT / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    size = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"seed {seed}: wrote {OUT} ({size / 1e3:.0f} kB)")
    for name in prompts:
        print(name, repr(golden[name]["text"]), f"margin {golden[name]['min_margin']:.3g}")


if __name__ == "__main__":
    main()
