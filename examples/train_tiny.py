"""Train the tiny Qwen3.5-architecture model shipped in `src/qwen35_mlx/assets/tiny/`.

Everything comes from text that ships with Python itself, so this runs offline:
the language reference in `pydoc_data.topics` and the docstrings of builtins and of a fixed
list of standard-library modules. Part of it is wrapped in the Qwen3.5 chat template
(a user asks about a topic, the assistant answers with the topic's text) so chat prompts
get on-topic replies.

Steps, all seeded: build the corpus, train a byte-level BPE tokenizer, train the model
(AdamW, warmup + cosine, compiled step) for `--minutes`, write the assets:

    nice -n 5 python examples/train_tiny.py --minutes 10

`--mtp` trains only a multi-token-prediction head (`mtp.*`, the draft model of speculative
decoding) on top of the model already at `--out`, whose weights it keeps bit for bit: the head
reads the frozen model's final hidden state at t and the token at t + 1 and learns the token at
t + 2, on the same corpus (the first shipped head: `--mtp --minutes 6`).

`--mtp --distill` trains the head (warm-started from the one at `--out`) by self-distillation:
what speculative decoding needs is agreement with the MAIN model's own next tokens, not with the
corpus, so the targets are the model's greedy continuations (`batch_generate`, the model as
shipped) of chat questions on the training topics and of openings of training texts; the bench's
questions (EVAL_QUESTIONS) and held-out subjects are never used, and 1/16 of the continuations
is held out to measure the k = 1 acceptance before and after (training_log.json, "distill").
The shipped head: `--mtp --distill --steps 160 --lr 2e-3`. `--draft-vocab N` writes
draft_vocab.json (models/mtp.py: the head drafts over the corpus's N most frequent tokens).

The corpus depends on the Python version's documentation (the shipped model was trained
on CPython 3.11). `held_out_text()` gives the validation documents, which training never sees.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import importlib
import inspect
import json
import math
import random
import re
import sys
import time
from functools import partial
from pathlib import Path

# isort: off
# qwen35_mlx first: on Linux its import swaps MLX's reference BLAS for OpenBLAS.
import qwen35_mlx  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
# isort: on

ASSETS = Path(__file__).resolve().parents[1] / "src" / "qwen35_mlx" / "assets" / "tiny"

EOT, IM_START, IM_END, THINK, END_THINK = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
)
SPECIAL_TOKENS = [EOT, IM_START, IM_END, THINK, END_THINK]

# Modules whose import is quick and has no side effects; their docstrings are the second source.
STDLIB_MODULES = (
    "abc argparse array ast asyncio base64 bisect calendar cmath collections colorsys "
    "contextlib copy csv dataclasses datetime decimal difflib enum fnmatch fractions "
    "functools glob gzip hashlib heapq hmac html inspect io ipaddress itertools json "
    "keyword logging math operator os os.path pathlib pickle platform pprint queue random "
    "re secrets shlex shutil socket sqlite3 statistics string struct subprocess tempfile "
    "textwrap threading time timeit tomllib traceback types typing unittest urllib.parse "
    "uuid warnings weakref zipfile zlib"
).split()

# Qwen3.5's chat format (one copy, shared with scripts/make_golden_generate.py).
CHAT_TEMPLATE = (Path(__file__).resolve().parent / "chat_template.jinja").read_text()

QA_FORMS = {
    "topic": (
        "topic",
        (
            "What is {}?",
            "Explain {}.",
            "Tell me about {}.",
            "Describe {}.",
            "What do you know about {}?",
            "Can you explain {} in Python?",
        ),
    ),
    "class": (
        "class",
        (
            "What is a {}?",
            "What is the {} type?",
            "Explain {} objects.",
            "Tell me about {}.",
            "What is {} in Python?",
        ),
    ),
    "function": (
        "function",
        (
            "What does {}() do?",
            "What does {} do?",
            "How do I use {}?",
            "Explain the {} function.",
        ),
    ),
    "module": (
        "module",
        (
            "What is the {} module?",
            "Explain the {} module.",
            "What does the {} module do?",
            "Tell me about the {} module.",
        ),
    ),
    "member": (
        "member",
        (
            "What does {} do?",
            "Explain {}.",
            "How do I use {}?",
            "What is {} for?",
            "Describe {} in Python.",
        ),
    ),
}
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a tiny assistant that knows the Python documentation.",
    "Answer briefly.",
)
GREETINGS = (
    ("Hello!", "Hello! I am a tiny Qwen3.5 model trained on Python's documentation."),
    ("Hi", "Hi! Ask me about Python: statements, types, builtins or modules."),
    (
        "Who are you?",
        "I am a tiny Qwen3.5-architecture model shipped with qwen35_mlx. I learned from "
        "the Python documentation, so ask me about Python.",
    ),
    (
        "What can you do?",
        "I can talk about Python: its statements, built-in types, functions and modules. "
        "I am very small, so my answers are short and sometimes wrong.",
    ),
)


def _reflow(block: str) -> str:
    """Join a prose paragraph's lines; keep indented (code, grammar) blocks as they are."""
    lines = block.splitlines()
    if all(line.startswith("   ") for line in lines):
        return "\n".join(line[3:] if line.startswith("   ") else line for line in lines)
    return " ".join(line.strip() for line in lines)


def _paragraphs(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        block = block.rstrip()
        if not block.strip() or re.fullmatch(r"[*=\-~^]+", block.strip()):
            continue
        out.append(_reflow(block))
    return out


def _topic_sections(name: str, text: str) -> list[tuple[str, str]]:
    """Split one pydoc topic into (title, body) sections at its underlined headings."""
    lines = text.splitlines()
    sections, title, body = [], None, []
    i = 0
    while i < len(lines):
        is_heading = (
            i + 1 < len(lines)
            and lines[i].strip()
            and re.fullmatch(r"[*=\-~^]{3,}", lines[i + 1].strip() or "x")
        )
        if is_heading:
            if title is not None or any(s.strip() for s in body):
                sections.append((title or name, "\n".join(body)))
            title, body = lines[i].strip(), []
            i += 2
            continue
        body.append(lines[i])
        i += 1
    sections.append((title or name, "\n".join(body)))
    return [(t, b) for t, b in sections if b.strip()]


def _doc_items() -> list[tuple[str, str, str]]:
    """(kind, name, docstring) for builtins and the fixed list of stdlib modules.

    kind: "class" or "function" (builtins), "module", "member" (methods, module members).
    """
    items = []
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or not (inspect.isbuiltin(obj) or inspect.isclass(obj)):
            continue
        kind = "class" if inspect.isclass(obj) else "function"
        items.append((kind, name, inspect.getdoc(obj) or ""))
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and callable(member):
                    items.append(("member", f"{name}.{attr}", inspect.getdoc(member) or ""))
    for modname in STDLIB_MODULES:
        mod = importlib.import_module(modname)
        items.append(("module", modname, inspect.getdoc(mod) or ""))
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            member = getattr(mod, attr, None)
            if attr.startswith("_") or member is None:
                continue
            if not (inspect.isfunction(member) or inspect.isclass(member)):
                continue
            if getattr(member, "__module__", "").split(".")[0] != modname.split(".")[0]:
                continue
            items.append(("member", f"{modname}.{attr}", inspect.getdoc(member) or ""))
    return [(k, n, d) for k, n, d in items if len(d) >= 40]


def _summary(doc: str, limit: int = 400) -> str:
    """The first prose paragraphs of a docstring, skipping a leading signature line."""
    paras = [p for p in _paragraphs(doc) if not re.match(r"^[\w.]+\(.*\)", p)]
    out = ""
    for p in paras:
        if out and len(out) + len(p) > limit:
            break
        out = f"{out}\n\n{p}" if out else p
    if len(out) > limit:
        # Cut a long paragraph after its last full sentence within the limit.
        cut = out.rfind(". ", 0, limit)
        out = out[: cut + 1] if cut > 0 else out[:limit]
    return out


def _subject(title: str) -> str:
    """'The "assert" statement' -> 'the "assert" statement'; 'Coroutines' -> 'coroutines'."""
    if len(title) > 1 and title[0].isupper() and not title[1].isupper():
        return title[0].lower() + title[1:]
    return title


def render_chat(messages: list[dict], enable_thinking: bool = False) -> tuple[str, str]:
    """A finished conversation as (prompt, completion): the prompt is what the chat template
    renders up to its generation prompt, the completion is the last assistant turn after it.

    The completion opens with a one-line thought when thinking is on. Prompt and completion are
    tokenized apart, as at inference: byte-level BPE splits a trailing "\n\n" differently from
    one that a word follows.
    """
    *history, last = messages
    prompt = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in history)
    prompt += f"{IM_START}assistant\n"
    if enable_thinking:
        prompt += f"{THINK}\n"
        completion = f"{last.get('reasoning', '')}\n{END_THINK}\n\n{last['content']}{IM_END}\n"
    else:
        prompt += f"{THINK}\n\n{END_THINK}\n\n"
        completion = f"{last['content']}{IM_END}\n"
    return prompt, completion


def chat_prompt(question: str, enable_thinking: bool = False) -> str:
    """What the chat template renders for one user question with the generation prompt."""
    think = f"{THINK}\n" if enable_thinking else f"{THINK}\n\n{END_THINK}\n\n"
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n{think}"


def _is_held_out(key: str) -> bool:
    # A stable split by name (not by position), about one document in 25.
    return hashlib.sha1(key.encode()).digest()[0] < 10


def build_corpus(seed: int = 0) -> tuple[list[str | tuple[str, str]], list[str]]:
    """(train documents, held-out documents). A document is one text, or for a chat a
    (prompt, completion) pair; held-out documents are plain text only."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    train, held = [], []
    qa: list[tuple[str, str, tuple[str, tuple[str, ...]]]] = []
    for name in sorted(topics):
        for title, body in _topic_sections(name, topics[name]):
            paras = _paragraphs(body)
            if not paras:
                continue
            key = f"topic:{name}:{title}"
            text = f"{title}\n\n" + "\n\n".join(paras)
            (held if _is_held_out(key) else train).append(text)
            answer = _summary(body)
            if answer and not _is_held_out(key):
                qa.append((_subject(title), answer, QA_FORMS["topic"]))
    for kind, name, doc in _doc_items():
        key = f"doc:{name}"
        text = f"{name}\n\n" + "\n\n".join(_paragraphs(doc))
        (held if _is_held_out(key) else train).append(text)
        answer = _summary(doc)
        if answer and not _is_held_out(key):
            qa.append((name, answer, QA_FORMS[kind]))

    # Builtins and modules are what people ask about first: they get more repeats.
    repeats = {"topic": 2, "class": 4, "function": 4, "module": 3, "member": 1}
    chats = []
    for subject, answer, (kind, forms) in qa:
        for _ in range(repeats[kind]):
            messages = []
            if rng.random() < 0.3:
                messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            messages.append({"role": "user", "content": rng.choice(forms).format(subject)})
            messages.append(
                {
                    "role": "assistant",
                    "content": answer,
                    "reasoning": f"The user asks about {subject}.",
                }
            )
            chats.append(render_chat(messages, enable_thinking=rng.random() < 0.5))
    for _ in range(8):
        for question, answer in GREETINGS:
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            chats.append(render_chat(messages, enable_thinking=rng.random() < 0.5))
    train += chats
    rng.shuffle(train)
    # A few sections appear word for word under two names; such copies are not held out.
    seen = set(train)
    held = [d for d in dict.fromkeys(held) if d not in seen]
    return train, held


def held_out_text(seed: int = 0) -> str:
    """The held-out documents joined as the training stream joins them (for tests)."""
    return EOT.join(build_corpus(seed)[1]) + EOT


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenizer) with the Qwen special tokens after the merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Chat markers are special (dropped by decode(skip_special_tokens=True)); think tags are
    # ordinary added tokens, as in Qwen's vocabulary, so they stay visible in decoded text.
    tok.add_special_tokens([EOT, IM_START, IM_END])
    tok.add_tokens([THINK, END_THINK])
    return tok


def tokenizer_config(tok) -> dict:
    added = {}
    for s in SPECIAL_TOKENS:
        added[str(tok.token_to_id(s))] = {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": s in (EOT, IM_START, IM_END),
        }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": EOT,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }


def model_config(vocab_size: int, tok, size: str = "default") -> dict:
    """A Hugging Face style `qwen3_5_text` config: 3 linear-attention layers, then 1 full."""
    hidden, layers, ffn = {"default": (160, 4, 448), "small": (128, 4, 352)}[size]
    layer_types = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
    return {
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_text",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "layer_types": (layer_types * layers)[:layers],
        "full_attention_interval": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "attn_output_gate": True,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "linear_conv_kernel_dim": 4,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "max_position_embeddings": 2048,
        # Half of each head rotates (Qwen3.5 rotates a quarter of 256); with 32-dim heads a
        # quarter would leave only four frequencies.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [3, 3, 2],
            "mrope_interleaved": True,
        },
        "bos_token_id": None,
        "eos_token_id": tok.token_to_id(IM_END),
        "pad_token_id": tok.token_to_id(EOT),
        "dtype": "float16",
    }


def build_model(config: dict) -> nn.Module:
    """The package's own model class, built the way its loader builds it."""
    from qwen35_mlx.loader import build_model as build
    from qwen35_mlx.models.config import ModelConfig

    return build(ModelConfig.from_dict(config))


def init_weights(model: nn.Module, seed: int) -> None:
    """Normal(0, 0.02) for matrices (embedding included), residual outputs scaled by depth."""
    mx.random.seed(seed)
    std = 0.02
    out_std = std / math.sqrt(2 * len(model.layers))
    params = []
    for path, p in tree_flatten(model.parameters()):
        if p.ndim == 2:
            s = (
                out_std
                if path.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight"))
                else std
            )
            p = mx.random.normal(p.shape, scale=s)
        params.append((path, p))
    model.update(tree_unflatten(params))


class Stream:
    """The training documents as one token stream; batches start at document boundaries."""

    def __init__(self, docs: list[str], tok, seed: int):
        eot = tok.token_to_id(EOT)
        ids, starts = [], []
        for doc in docs:
            starts.append(len(ids))
            for part in (doc,) if isinstance(doc, str) else doc:
                ids.extend(tok.encode(part).ids)
            ids.append(eot)
        self.tokens = np.array(ids, dtype=np.int32)
        self.starts = np.array(starts)
        self.rng = np.random.default_rng(seed)

    def batch(self, B: int, T: int) -> mx.array:
        valid = self.starts[self.starts + T + 1 <= len(self.tokens)]
        s = self.rng.choice(valid, size=B)
        return mx.array(np.stack([self.tokens[i : i + T + 1] for i in s]))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def loss_fn(model, batch):
    logits = model(batch[:, :-1])
    return nn.losses.cross_entropy(logits.astype(mx.float32), batch[:, 1:], reduction="mean")


def eval_loss(model, tok, text: str, T: int) -> float:
    """Mean next-token loss (nats) over `text` cut into windows of T+1 tokens."""
    ids = tok.encode(text).ids
    n = (len(ids) - 1) // T
    x = mx.array(np.array(ids[: n * T + 1], dtype=np.int32))
    windows = mx.stack([x[i * T : i * T + T + 1] for i in range(n)])
    total = 0.0
    for i in range(0, n, 16):
        chunk = windows[i : i + 16]
        total += loss_fn(model, chunk).item() * chunk.shape[0]
    return total / n


def train(model: nn.Module, stream: Stream, args, held_text: str, tok) -> dict:
    optimizer = optim.AdamW(learning_rate=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        loss, grads = value_and_grad(model, batch)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    total, t0 = args.steps, time.time()
    losses, log, marks = [], {"loss": []}, {}
    i = 0
    while total is None or i < total:
        # Warmup does not depend on `total`, so the timing steps below are real training steps.
        optimizer.learning_rate = lr_at(i, total or 10**9, args.lr, args.warmup)
        loss = step(stream.batch(args.batch, args.context))
        mx.eval(state, loss)
        losses.append(loss.item())
        i += 1
        marks[i] = time.time()
        if total is None and i == 8:
            # Size the run from steps 3..8 (the first ones include compilation).
            per_step = (marks[8] - marks[2]) / 6
            total = 8 + int((args.minutes * 60 - (marks[8] - t0)) / per_step)
            total = max(args.warmup + 1, total)
            print(f"{per_step:.2f} s/step -> {total} steps (pass --steps {total} to repeat)")
        if i % 25 == 0 or i == total:
            mean = sum(losses[-25:]) / len(losses[-25:])
            print(f"step {i}/{total}  loss {mean:.3f}  {time.time() - t0:.0f}s", flush=True)
            log["loss"].append([i, round(mean, 4)])
    log["steps"] = total
    log["seconds"] = round(time.time() - t0, 1)
    held = eval_loss(model, tok, held_text, args.context)
    log["held_out_loss"] = round(held, 4)
    print(f"held-out loss {held:.3f} nats/token (uniform {math.log(tok.get_vocab_size()):.3f})")
    return log


def mtp_loss_fn(model, batch):
    """Cross-entropy of the MTP head's prediction of token t + 2 from the (frozen) model's
    hidden state at t and the token at t + 1."""
    _, h = model(batch[:, :-1], return_hidden=True)
    logits, _ = model.mtp_forward(mx.stop_gradient(h[:, :-1]), batch[:, 1:-1])
    return nn.losses.cross_entropy(logits.astype(mx.float32), batch[:, 2:], reduction="mean")


# The chat prompts `benchmarks/bench_mtp.py --cpu-tiny` measures with: never distilled on.
EVAL_QUESTIONS = ("What is a list?", "Explain the with statement.", "Tell me about dict.")


def distill_prompts(seed: int, n_chat: int, n_text: int) -> list[str]:
    """Prompts for the MTP head's self-distillation: chat questions on the training topics (not
    those of EVAL_QUESTIONS: their subjects are left out), half of them with thinking on, and
    the openings of training texts."""
    rng = random.Random(seed + 7)
    skip = {"list", "with", "dict"}
    subjects = []
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for title, body in _topic_sections(name, topics[name]):
            subject = _subject(title)
            key = f"topic:{name}:{title}"
            words = set(re.findall(r"\w+", subject))
            if _paragraphs(body) and not _is_held_out(key) and not skip & words:
                subjects.append((subject, QA_FORMS["topic"][1]))
    for kind, name, _ in _doc_items():
        if not _is_held_out(f"doc:{name}") and not skip & set(re.findall(r"\w+", name)):
            subjects.append((name, QA_FORMS[kind][1]))
    rng.shuffle(subjects)
    # Thinking on and off, as in training (the chat template's default is on).
    chats = [chat_prompt(rng.choice(forms).format(s), enable_thinking=rng.random() < 0.5)
             for s, forms in subjects[:n_chat]]  # fmt: skip
    texts = [d for d in build_corpus(seed)[0] if isinstance(d, str) and not d.startswith(IM_START)]
    rng.shuffle(texts)
    return chats + [t[: rng.randint(40, 160)] for t in texts[:n_text]]


def greedy_sequences(args, prompts: list[str]) -> list[tuple[list[int], int]]:
    """(prompt + the shipped model's greedy continuation, prompt length) per prompt: the model
    as it decodes (its stored dtype), so the targets are the tokens speculative decoding must
    match."""
    from qwen35_mlx import batch_generate, load

    model, tok = load(args.out)
    out = []
    for i in range(0, len(prompts), 64):
        chunk = [tok.encode(p, add_special_tokens=False) for p in prompts[i : i + 64]]
        got = batch_generate(model, tok, chunk, max_tokens=args.distill_tokens)
        for ids, g in zip(chunk, got.tokens, strict=True):
            out.append((ids + list(g), len(ids)))
        print(f"distill: {len(out)}/{len(prompts)} continuations", flush=True)
    return out


class DistillStream:
    """Batches of (sequence, loss mask) from `greedy_sequences`: the mask keeps the positions
    whose MTP target (token t + 2) is a generated token, right padding masked out."""

    def __init__(self, seqs: list[tuple[list[int], int]], pad: int, seed: int):
        T = max(len(s) for s, _ in seqs)
        self.x = np.full((len(seqs), T), pad, dtype=np.int32)
        self.m = np.zeros((len(seqs), T - 2), dtype=np.float32)
        for i, (s, n) in enumerate(seqs):
            self.x[i, : len(s)] = s
            self.m[i, max(0, n - 2) : len(s) - 2] = 1.0
        self.rng = np.random.default_rng(seed)

    def batch(self, B: int, T: int) -> mx.array:
        rows = self.rng.choice(len(self.x), size=B)
        return mx.array(self.x[rows]), mx.array(self.m[rows])


def mtp_distill_loss_fn(model, batch, mask):
    """`mtp_loss_fn` over the positions of the model's own greedy tokens only."""
    _, h = model(batch[:, :-1], return_hidden=True)
    logits, _ = model.mtp_forward(mx.stop_gradient(h[:, :-1]), batch[:, 1:-1])
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), batch[:, 2:], reduction="none")
    return (ce * mask).sum() / mx.maximum(mask.sum(), 1.0)


def mtp_acceptance(model, seqs: list[tuple[list[int], int]]) -> float:
    """Share of positions of the model's greedy continuations where the MTP head's argmax
    (from the model's hidden state at t and token t + 1) is token t + 2: k = 1 acceptance."""
    hit = total = 0
    for s, n in seqs:
        x = mx.array([s])
        _, h = model(x[:, :-1], return_hidden=True)
        logits, _ = model.mtp_forward(h[:, :-1], x[:, 1:-1])
        pred = np.array(logits.argmax(-1)[0])
        tgt = np.array(s[2:])
        lo = max(0, n - 2)
        hit += int((pred[lo:] == tgt[lo:]).sum())
        total += len(tgt) - lo
    return hit / max(total, 1)


def train_mtp(args) -> None:
    """Add an MTP head to the model at `args.out` and train only the head (module docstring)."""
    from tokenizers import Tokenizer

    from qwen35_mlx.loader import load_model

    config = json.loads((args.out / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    config["mtp_num_hidden_layers"] = 1
    base = load_model(args.out)
    model = build_model(config)
    mx.random.seed(args.seed)
    for path, p in tree_flatten(model.mtp.parameters()):
        if p.ndim == 2:
            model.mtp.update(tree_unflatten([(path, mx.random.normal(p.shape, scale=0.02))]))
    weights = dict(tree_flatten(base.parameters()))
    model.load_weights(list(weights.items()), strict=False)
    model.set_dtype(mx.float32)
    model.freeze()
    model.mtp.unfreeze()
    tok = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    log = {"mtp_loss": []}
    if args.distill:
        seqs = greedy_sequences(args, distill_prompts(args.seed, args.distill_chats,
                                                      args.distill_texts))  # fmt: skip
        rng = random.Random(args.seed)
        rng.shuffle(seqs)
        held, seqs = seqs[: len(seqs) // 16], seqs[len(seqs) // 16 :]
        stream = DistillStream(seqs, tok.token_to_id(EOT), args.seed + 1)
        loss_fn_ = mtp_distill_loss_fn
        before = mtp_acceptance(model, held)
        print(f"distill: k=1 acceptance on {len(held)} held-out continuations {before:.3f}")
        log["distill"] = {"sequences": len(seqs), "held_out": len(held), "before": before}
    else:
        train_docs, _ = build_corpus(args.seed)
        stream = Stream(train_docs, tok, args.seed + 1)
        loss_fn_ = mtp_loss_fn

    optimizer = optim.AdamW(learning_rate=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    value_and_grad = nn.value_and_grad(model, loss_fn_)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch):
        loss, grads = value_and_grad(model, *batch)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    t0, i, total, losses = time.time(), 0, args.steps, []
    while total is None or i < total:
        optimizer.learning_rate = lr_at(i, total or 10**9, args.lr, args.warmup)
        b = stream.batch(args.batch, args.context)
        loss = step(*(b if isinstance(b, tuple) else (b,)))
        mx.eval(state, loss)
        losses.append(loss.item())
        i += 1
        if total is None and i == 8:
            per_step = (time.time() - t0) / 8
            total = max(args.warmup + 1, int(args.minutes * 60 / per_step))
            print(f"{per_step:.2f} s/step -> {total} steps")
        if i % 25 == 0 or i == total:
            mean = sum(losses[-25:]) / len(losses[-25:])
            print(f"mtp step {i}/{total}  loss {mean:.3f}  {time.time() - t0:.0f}s", flush=True)
            log["mtp_loss"].append([i, round(mean, 4)])
    if args.distill:
        after = mtp_acceptance(model, held)
        print(f"distill: k=1 acceptance on the held-out continuations {after:.3f}")
        log["distill"]["after"] = after
    # The main weights go back exactly as loaded (float16 -> float32 -> float16 is exact); the
    # head is the trained one (`weights` holds the old head when the model had one).
    dtype = getattr(mx, config.get("dtype", "float16"))
    model.update(
        tree_unflatten(
            [
                (k, weights[k] if k in weights and not k.startswith("mtp.") else v.astype(dtype))
                for k, v in tree_flatten(model.parameters())
            ]
        )
    )
    from qwen35_mlx.convert import save_mlx

    old = json.loads((args.out / "training_log.json").read_text())
    old["mtp"] = log | {"steps": total, "seconds": round(time.time() - t0, 1), "args": {
        k: v for k, v in vars(args).items() if k != "out"}}  # fmt: skip
    extra = [args.out / n for n in ("tokenizer.json", "tokenizer_config.json",
                                     "generation_config.json")]  # fmt: skip
    tmp = args.out.parent / (args.out.name + ".mtp")
    save_mlx(model, config, tmp, extra_files=extra, overwrite=True)
    (tmp / "training_log.json").write_text(json.dumps(old, indent=2) + "\n")
    import shutil

    shutil.rmtree(args.out)
    tmp.rename(args.out)
    print(f"wrote {args.out}")


def write_draft_vocab(out: Path, n: int, seed: int = 0) -> list[int]:
    """`draft_vocab.json` in `out`: the n most frequent tokens of the training corpus (the
    special tokens first), which the MTP head then drafts over (models/mtp.py)."""
    from tokenizers import Tokenizer

    from qwen35_mlx.models.mtp import DRAFT_VOCAB_FILE

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    counts = np.bincount(Stream(build_corpus(seed)[0], tok, seed).tokens,
                         minlength=tok.get_vocab_size())  # fmt: skip
    special = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    by_count = [int(i) for i in np.argsort(-counts, kind="stable") if i not in special]
    ids = (special + by_count)[:n]
    share = counts[ids].sum() / counts.sum()
    (out / DRAFT_VOCAB_FILE).write_text(json.dumps({
        "token_ids": ids,
        "source": f"the {n} most frequent tokens of the training corpus (train_tiny.py "
                  f"--draft-vocab {n}): {share:.1%} of its tokens",
    }) + "\n")  # fmt: skip
    print(f"wrote {out / DRAFT_VOCAB_FILE}: {n} tokens, {share:.1%} of the corpus")
    return ids


def save_assets(model: nn.Module, config: dict, tok, out: Path, log: dict) -> None:
    """config.json, model.safetensors (float16, A_log fp32, metadata format=mlx), tokenizer."""
    from qwen35_mlx.convert import save_mlx

    dtype = getattr(mx, config["dtype"])
    model.update(
        tree_unflatten(
            [
                (k, v if k.endswith("A_log") else v.astype(dtype))
                for k, v in tree_flatten(model.parameters())
            ]
        )
    )
    save_mlx(model, config, out, overwrite=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2) + "\n")
    generation = {
        "eos_token_id": [tok.token_to_id(IM_END), tok.token_to_id(EOT)],
        "pad_token_id": tok.token_to_id(EOT),
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.9,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")


def sample(model: nn.Module, tok, prompt: str, max_tokens: int = 60) -> str:
    """Greedy continuation without a cache (enough for a look at the result)."""
    ids = tok.encode(prompt).ids
    stop = {tok.token_to_id(IM_END), tok.token_to_id(EOT)}
    out = []
    for _ in range(max_tokens):
        logits = model(mx.array([ids + out]))[0, -1]
        nxt = int(mx.argmax(logits).item())
        if nxt in stop:
            break
        out.append(nxt)
    return tok.decode(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="training budget (default 10)")
    p.add_argument("--steps", type=int, default=None, help="fixed step count (overrides --minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--size", choices=("default", "small"), default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument(
        "--mtp", action="store_true", help="train only an MTP head on the model at --out"
    )
    p.add_argument(
        "--distill",
        action="store_true",
        help="--mtp: train the head on the model's own greedy continuations (self-distillation)",
    )
    p.add_argument("--distill-chats", type=int, default=512, help="--distill: chat prompts")
    p.add_argument("--distill-texts", type=int, default=256, help="--distill: text prompts")
    p.add_argument("--distill-tokens", type=int, default=96, help="--distill: tokens each")
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        help="write draft_vocab.json (this many of the corpus's most frequent tokens) at --out",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    random.seed(args.seed)
    if args.mtp:
        train_mtp(args)
    if args.draft_vocab:
        write_draft_vocab(args.out, args.draft_vocab, args.seed)
    if args.mtp or args.draft_vocab:
        return
    train_docs, held_docs = build_corpus(args.seed)
    tok = train_tokenizer(
        [d if isinstance(d, str) else "".join(d) for d in train_docs], args.vocab_size
    )
    stream = Stream(train_docs, tok, args.seed)
    print(
        f"corpus: {len(train_docs)} documents, {len(stream.tokens)} tokens, "
        f"{len(held_docs)} held out"
    )

    config = model_config(tok.get_vocab_size(), tok, args.size)
    model = build_model(config)
    init_weights(model, args.seed)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model: {n_params / 1e6:.2f}M parameters, layer_types {config['layer_types']}")

    log = train(model, stream, args, held_out_text(args.seed), tok)
    log.update(
        seed=args.seed,
        python=sys.version.split()[0],
        params=n_params,
        args=vars(args) | {"out": str(args.out)},
    )
    save_assets(model, config, tok, args.out, log)
    for prompt in ('The "assert" statement', chat_prompt("What is a list?")):
        print(repr(prompt), "->", repr(sample(model, tok, prompt)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
