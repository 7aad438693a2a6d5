"""Text + image preprocessing for Qwen3.5 vision-language checkpoints.

`load_processor(path)` reads the checkpoint's tokenizer (through mlx-lm's `TokenizerWrapper`, so
generation can stream-detokenize) and its `preprocessor_config.json` (through transformers' image
processor for Qwen2-VL / Qwen3-VL, the class the checkpoint names: resize to multiples of
patch * merge within the configured pixel range, rescale, normalise, patchify in 2x2 merge-block
order). Calling the processor expands each image placeholder token into
`t * h * w / merge^2` copies, one per merged vision row the model will scatter into.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

IMAGE_TOKEN = "<|image_pad|>"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _open_image(image):
    """A path, PIL image or HWC uint8 array -> RGB PIL image; ValueError naming a bad file."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {str(image)!r}: {e}") from e


class Processor:
    """Tokenizer + image processor. `__call__(text, images)` -> model inputs as mx arrays."""

    def __init__(self, tokenizer, image_processor=None, image_token: str = IMAGE_TOKEN):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.merge_size = getattr(image_processor, "merge_size", 2)

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def preprocess_images(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (pixel_values [N, C*Tp*P*P] float32, image_grid_thw [n, 3] int)."""
        if self.image_processor is None:
            raise ValueError("this checkpoint has no preprocessor_config.json: it takes no images")
        pil = [_open_image(im) for im in images]
        out = self.image_processor(images=pil, return_tensors="np")
        return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"])

    def __call__(self, text: str | list[str], images=None, add_special_tokens: bool = False):
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, list | tuple):
            images = [images]
        images = list(images or [])
        result: dict[str, mx.array] = {}
        if images:
            pixel_values, grid = self.preprocess_images(images)
            result["pixel_values"] = mx.array(pixel_values)
            result["image_grid_thw"] = mx.array(grid)
            counts = self._slot_counts(grid, sum(t.count(self.image_token) for t in texts))
            texts = self._expand(texts, counts)
        elif any(self.image_token in t for t in texts):
            raise ValueError(f"the text has {self.image_token} placeholders but no images")

        ids = [self.tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        T = max(len(r) for r in ids)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else 0
        # Left padding: every row ends at the last column, where generation continues.
        input_ids = np.full((len(ids), T), pad, dtype=np.int32)
        mask = np.zeros((len(ids), T), dtype=np.int32)
        for b, r in enumerate(ids):
            if r:
                input_ids[b, T - len(r) :] = r
                mask[b, T - len(r) :] = 1
        result["input_ids"] = mx.array(input_ids)
        result["attention_mask"] = mx.array(mask)
        return result

    def mlx_lm_inputs(self, text: str, images) -> tuple[str, list[mx.array]]:
        """mlx-lm's processor protocol: (text with placeholders expanded, one pixel array per
        image shaped `[t, h, w, C*Tp*P*P]`, the grid in the shape) for `Model.embed_inputs`."""
        pixel_values, grid = self.preprocess_images(images)
        counts = self._slot_counts(grid, text.count(self.image_token))
        splits = np.cumsum([int(np.prod(g)) for g in grid])[:-1]
        per_image = [
            mx.array(p.reshape(*[int(x) for x in g], -1))
            for p, g in zip(np.split(pixel_values, splits), grid, strict=True)
        ]
        return self._expand([text], counts)[0], per_image

    def _slot_counts(self, grid, n_slots: int) -> list[int]:
        """Image tokens each image expands to (one per merged row); the text must hold one
        placeholder per image."""
        counts = [int(np.prod(g)) // self.merge_size**2 for g in grid]
        if n_slots != len(counts):
            raise ValueError(
                f"{len(counts)} image(s) given but the text has {n_slots} "
                f"{self.image_token} placeholder(s)"
            )
        return counts

    def _expand(self, texts: list[str], counts: list[int]) -> list[str]:
        it = iter(counts)
        out = []
        for t in texts:
            parts = t.split(self.image_token)
            s = parts[0]
            for p in parts[1:]:
                s += self.image_token * next(it) + p
            out.append(s)
        return out


def load_processor(path: str | Path, eos_token_ids=None) -> Processor:
    """The processor of a local checkpoint folder (tokenizer files, preprocessor_config.json)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path = Path(path)
    if eos_token_ids is None:
        eos_token_ids = _read_json(path / "generation_config.json").get("eos_token_id")
    tokenizer = load_tokenizer(path, eos_token_ids=eos_token_ids)
    image_processor = None
    if (path / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        # The PIL backend, so that pixels do not depend on whether torchvision is installed:
        # transformers' torchvision processor differs from it at about 1e-5.
        image_processor = AutoImageProcessor.from_pretrained(str(path), backend="pil")
    config = _read_json(path / "config.json")
    image_token = IMAGE_TOKEN
    if "image_token_id" in config:
        image_token = tokenizer.convert_ids_to_tokens(int(config["image_token_id"]))
    return Processor(tokenizer, image_processor, image_token=image_token)
