"""Write the golden vision-language checkpoint and its Hugging Face reference.

Dev-only: needs torch and transformers (the `dev` extra). Tests never import this file; they read
what it writes under `tests/data/golden/vlm/`:

- `config.json` + `model.safetensors` from `Qwen3_5ForConditionalGeneration.save_pretrained`
  (keys `model.language_model.*`, `model.visual.*`, `lm_head.*`; 5-D Conv3d patch weight;
  zero-centred RMSNorm weights), plus `mtp.*` tensors as the released checkpoints carry;
- a tiny byte-level tokenizer (`tokenizer.json`, 256 byte tokens + Qwen's special tokens at the
  config's ids) and `preprocessor_config.json`, so the folder loads as a whole checkpoint;
- `image0.png`, `image1.png`: the synthetic images the reference was computed from;
- `reference.npz` (float32 logits of transformers' own forward):
  - `input_ids` [1, T]: text, image 0 (4x6 patches -> 2x3 merged = 6 pad tokens), text,
    image 1 (2x4 -> 1x2 = 2 pad tokens), text; `pixel_values`, `image_grid_thw` from
    transformers' image processor; `logits` [1, T, V]; `position_ids` [3, 1, T] and
    `rope_deltas` [1, 1] from transformers' `get_rope_index`; `prefill_len`: the first
    position after the last image (prefill up to there, then decode token by token);
  - `video_*`: the same for a 2-frame-group video (grid (2, 4, 4), random pixels), each frame
    wrapped in vision start/end as Qwen3.5's template does;
  - `batch_*`: a left-padded batch of two image prompts with its attention mask, transformers'
    position ids and rope deltas for it, and each row's logits computed unpadded (NaN at pads).

Run: `python scripts/make_golden_vlm.py` (a few seconds on CPU).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from _golden import noise_text_param, rope_parameters, save_hf, text_config_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessorPil,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
)

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden" / "vlm"

SPECIALS = [
    "<|endoftext|>",  # 256
    "<|im_start|>",  # 257
    "<|im_end|>",  # 258
    "<|vision_start|>",  # 259
    "<|vision_end|>",  # 260
    "<|image_pad|>",  # 261
    "<|video_pad|>",  # 262
]
PAD, VSTART, VEND, IMAGE, VIDEO = 256, 259, 260, 261, 262
VOCAB = 272

CHAT_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.content is string %}{{ m.content }}{%- else %}"
    "{%- for c in m.content %}{%- if c.type == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif c.type == 'text' %}{{ c.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{ '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

TEXT = text_config_dict(
    model_type=None,
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    # Irregular: no interval formula gives F L L F.
    layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
    # head_dim 64 * 0.25 rotates 16 dims = 8 frequencies: interleaved sections [3, 3, 2] give
    # t at 0, 3, 6; h at 1, 4, 7; w at 2, 5 (every axis used more than once).
    head_dim=64,
    linear_key_head_dim=8,
    linear_value_head_dim=16,
    max_position_embeddings=4096,
    pad_token_id=PAD,
    eos_token_id=258,
    rope_parameters=rope_parameters(0.25, [3, 3, 2]),
)

VISION = dict(
    depth=2,
    hidden_size=32,
    hidden_act="gelu_pytorch_tanh",
    intermediate_size=64,
    num_heads=2,
    in_channels=3,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=32,
    num_position_embeddings=16,  # a 4x4 table, resampled to 4x6 and 2x4 grids
)

PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen3VLProcessor",
    "size": {"shortest_edge": 1024, "longest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def byte_symbols() -> list[str]:
    """GPT-2's byte -> printable character map, in byte order (token id = byte value)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def build_tokenizer(folder: Path) -> None:
    vocab = {c: i for i, c in enumerate(byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(folder)


def synthetic_image(h: int, w: int, seed: int) -> Image.Image:
    """Smooth gradients plus a few hard-edged blocks: deterministic, compresses well."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 127 + 100 * np.sin((x + 2 * y + 7 * seed) / 9.0)
    img = np.stack([r, g, b], -1)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[y0 : y0 + 8, x0 : x0 + 8] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@torch.no_grad()
def add_noise(model: torch.nn.Module, gen: torch.Generator) -> None:
    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    for name, p in model.named_parameters():
        if name.startswith("model.visual."):
            if name.endswith(("norm1.weight", "norm2.weight", "merger.norm.weight")):
                p.copy_(1.0 + 0.2 * randn(p.shape))  # LayerNorm: applied as w
            elif p.ndim == 1:
                p.copy_(0.1 * randn(p.shape))  # biases
            elif name.endswith("pos_embed.weight"):
                p.copy_(0.5 * randn(p.shape))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(randn(p.shape) / np.sqrt(fan_in))
        else:
            noise_text_param(name, p, gen)


def text_ids(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=gen).tolist()


def type_ids(ids: np.ndarray) -> np.ndarray:
    return (ids == IMAGE).astype(np.int64) + 2 * (ids == VIDEO).astype(np.int64)


@torch.no_grad()
def forward(model, ids: np.ndarray, **vision) -> np.ndarray:
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in vision.items()}
    out = model(
        input_ids=torch.from_numpy(ids).long(),
        mm_token_type_ids=torch.from_numpy(type_ids(ids)),
        use_cache=False,
        **t,
    )
    return out.logits.float().numpy()


def rope_index(model, ids, mask=None, **grids):
    g = {k: torch.from_numpy(np.asarray(v)) for k, v in grids.items()}
    pos, deltas = model.model.get_rope_index(
        torch.from_numpy(ids).long(),
        mm_token_type_ids=torch.from_numpy(type_ids(ids)),
        attention_mask=None if mask is None else torch.from_numpy(mask),
        **g,
    )
    return pos.numpy().astype(np.int32), deltas.numpy().astype(np.int32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=4321)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    config = Qwen3_5Config(
        text_config=TEXT,
        vision_config=VISION,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
        tie_word_embeddings=False,
    )
    model = Qwen3_5ForConditionalGeneration(config).float().eval()
    model.set_attn_implementation("eager")
    add_noise(model, gen)

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    save_hf(model, OUT)
    tensors = load_file(OUT / "model.safetensors")
    h = TEXT["hidden_size"]
    tensors["mtp.fc.weight"] = torch.randn((h, 2 * h), generator=gen)
    tensors["mtp.norm.weight"] = torch.randn((h,), generator=gen)
    save_file(tensors, OUT / "model.safetensors", metadata={"format": "pt"})
    build_tokenizer(OUT)
    (OUT / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")

    images = [synthetic_image(64, 96, 0), synthetic_image(32, 64, 1)]
    for i, im in enumerate(images):
        im.save(OUT / f"image{i}.png", optimize=True)
    images = [Image.open(OUT / f"image{i}.png").convert("RGB") for i in range(2)]
    proc = Qwen2VLImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items() if "_type" not in k})
    pv = proc(images=images, return_tensors="np")
    pixel_values = pv["pixel_values"].astype(np.float32)
    grid = pv["image_grid_thw"].astype(np.int64)
    assert grid.tolist() == [[1, 4, 6], [1, 2, 4]], grid

    # text, image 0, text, image 1, text: the prefill ends 3 tokens after the last image.
    seq = text_ids(gen, 9) + [VSTART] + [IMAGE] * 6 + [VEND] + text_ids(gen, 4)
    seq += [VSTART] + [IMAGE] * 2 + [VEND] + text_ids(gen, 3)
    prefill_len = len(seq)
    seq += text_ids(gen, 9)
    ids = np.array([seq], dtype=np.int32)
    ref = dict(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid.astype(np.int32))
    ref["logits"] = forward(model, ids, pixel_values=pixel_values, image_grid_thw=grid)
    ref["position_ids"], ref["rope_deltas"] = rope_index(model, ids, image_grid_thw=grid)
    ref["prefill_len"] = np.array(prefill_len, dtype=np.int32)

    # Video: grid (2, 4, 4) = 2 temporal groups of 2x2 merged tokens, one group per frame wrap.
    vgrid = np.array([[2, 4, 4]], dtype=np.int64)
    vpix = torch.randn((32, 3 * 2 * 16 * 16), generator=gen).numpy().astype(np.float32)
    vseq = text_ids(gen, 5)
    for _ in range(2):
        vseq += text_ids(gen, 2) + [VSTART] + [VIDEO] * 4 + [VEND]
    vseq += text_ids(gen, 6)
    vids = np.array([vseq], dtype=np.int32)
    ref["video_input_ids"] = vids
    ref["video_pixel_values"] = vpix
    ref["video_grid_thw"] = vgrid.astype(np.int32)
    ref["video_logits"] = forward(model, vids, pixel_values_videos=vpix, video_grid_thw=vgrid)
    ref["video_position_ids"], ref["video_rope_deltas"] = rope_index(
        model, vids, video_grid_thw=vgrid
    )

    # Left-padded batch: row 0 holds image 1 only (short), row 1 holds image 0 (long).
    rows = [
        text_ids(gen, 2) + [VSTART] + [IMAGE] * 2 + [VEND] + text_ids(gen, 3),
        text_ids(gen, 4) + [VSTART] + [IMAGE] * 6 + [VEND] + text_ids(gen, 5),
    ]
    pix_rows = [pixel_values[24:32], pixel_values[:24]]
    grid_rows = [grid[1:2], grid[0:1]]
    tmax = max(len(r) for r in rows)
    b_ids = np.full((2, tmax), PAD, dtype=np.int32)
    b_mask = np.zeros((2, tmax), dtype=np.int32)
    b_logits = np.full((2, tmax, VOCAB), np.nan, dtype=np.float32)
    for b, r in enumerate(rows):
        b_ids[b, tmax - len(r) :] = r
        b_mask[b, tmax - len(r) :] = 1
        row = np.array([r], dtype=np.int32)
        out = forward(model, row, pixel_values=pix_rows[b], image_grid_thw=grid_rows[b])
        b_logits[b, tmax - len(r) :] = out[0]
    b_grid = np.concatenate(grid_rows)
    ref["batch_input_ids"] = b_ids
    ref["batch_attention_mask"] = b_mask
    ref["batch_pixel_values"] = np.concatenate(pix_rows)
    ref["batch_image_grid_thw"] = b_grid.astype(np.int32)
    ref["batch_logits"] = b_logits
    ref["batch_position_ids"], ref["batch_rope_deltas"] = rope_index(
        model, b_ids, mask=b_mask, image_grid_thw=b_grid
    )
    np.savez_compressed(OUT / "reference.npz", **ref)

    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    scale = float(np.abs(ref["logits"]).max())
    print(f"vlm: T={ids.shape[1]}, max|logit| {scale:.3f}, total {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
