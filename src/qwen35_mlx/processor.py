"""Text + image preprocessing for Qwen3.5 vision-language checkpoints.

`load_processor(path)` reads the checkpoint's tokenizer (through mlx-lm's `TokenizerWrapper`, so
generation can stream-detokenize) and its `preprocessor_config.json` (through transformers' image
processor for Qwen2-VL / Qwen3-VL, the class the checkpoint names: resize to multiples of
patch * merge within the configured pixel range, rescale, normalise, patchify in 2x2 merge-block
order). Calling the processor expands each image placeholder token into
`t * h * w / merge^2` copies, one per merged vision row the model will scatter into.

Videos (`videos=`: file paths, or uint8 frame arrays [T, H, W, 3]) follow transformers' Qwen3-VL
video processor without needing torch or torchvision: files are decoded with PyAV (the `video`
extra); frames are sampled at `fps` (2) clamped to [min_frames, max_frames] (4, 768) and to the
frame count, at `linspace(0, total - 1, n).round()`; every frame is resized (PIL bicubic, as the
image path) to the size `smart_resize` picks for the whole clip; rescale, normalise, pad to a
multiple of the temporal patch (2) with the last frame, patchify in merge-block order. Each
`<|video_pad|>` expands to, per temporal patch, `<{t:.1f} seconds>` + vision_start +
`h * w / merge^2` video tokens + vision_end, `t` the mean time of the patch's frames. An array is
taken as already sampled frames at 24 fps (transformers' default when it knows no rate).
Settings come from `video_preprocessor_config.json`, else `preprocessor_config.json`'s patch,
merge, mean and std with transformers' video defaults for the rest.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
DEFAULT_VIDEO_FPS = 24.0  # transformers' assumption for frames of unknown rate


@dataclass
class VideoSettings:
    """transformers' Qwen3VLVideoProcessor defaults; `from_folder` reads a checkpoint's."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 32 * 32  # size.shortest_edge
    max_pixels: int = 32 * 32 * 768  # size.longest_edge
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    rescale_factor: float = 1 / 255

    @classmethod
    def from_folder(cls, path: Path) -> VideoSettings:
        d = _read_json(path / "video_preprocessor_config.json")
        if not d:
            image = _read_json(path / "preprocessor_config.json")
            keys = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
            d = {k: image[k] for k in keys if k in image}
        size = d.get("size") or {}
        out = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "fps"})
        if d.get("fps") is not None:
            out.fps = float(d["fps"])
        out.min_pixels = int(size.get("shortest_edge", out.min_pixels))
        out.max_pixels = int(size.get("longest_edge", out.max_pixels))
        return out


def sample_frame_indices(total: int, video_fps: float, s: VideoSettings) -> np.ndarray:
    """Indices of the frames to keep, as transformers' Qwen3-VL `sample_frames` picks them."""
    n = int(total / video_fps * s.fps)
    n = min(max(n, s.min_frames), s.max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int)


def smart_resize_video(t: int, height: int, width: int, s: VideoSettings) -> tuple[int, int]:
    """(height, width) for every frame: multiples of patch * merge, t * h * w within the pixel
    range, aspect kept (transformers' video `smart_resize`)."""
    factor = s.patch_size * s.merge_size
    if t < s.temporal_patch_size:
        raise ValueError(f"a video needs at least {s.temporal_patch_size} frames, got {t}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"video aspect ratio above 200: {width}x{height}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    t_bar = round(t / s.temporal_patch_size) * s.temporal_patch_size
    if t_bar * h * w > s.max_pixels:
        beta = math.sqrt((t * height * width) / s.max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h * w < s.min_pixels:
        beta = math.sqrt(s.min_pixels / (t * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def read_video(path, s: VideoSettings) -> tuple[np.ndarray, np.ndarray, float]:
    """Decode a video file with PyAV -> (sampled frames [T, H, W, 3] uint8, their indices, fps)."""
    try:
        import av
    except ImportError as e:
        raise ImportError(
            "reading video files needs PyAV: pip install 'qwen35_mlx[video]' (or pip install av)"
        ) from e
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            video_fps = float(rate) if rate else DEFAULT_VIDEO_FPS
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (OSError, ValueError, IndexError, av.error.FFmpegError) as e:
        raise ValueError(f"cannot read video {str(path)!r}: {e}") from e
    if not frames:
        raise ValueError(f"cannot read video {str(path)!r}: no frames")
    indices = sample_frame_indices(len(frames), video_fps, s)
    return np.stack([frames[i] for i in indices]), indices, video_fps


def preprocess_video(frames: np.ndarray, s: VideoSettings) -> tuple[np.ndarray, tuple]:
    """Frames [T, H, W, 3] uint8 -> (pixel_values [t*h*w, C*Tp*P*P] float32, grid (t, h, w))."""
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video frames must be [T, H, W, 3], got shape {frames.shape}")
    T, H, W, _ = frames.shape
    rh, rw = smart_resize_video(T, H, W, s)
    if (rh, rw) != (H, W):
        resample = Image.Resampling.BICUBIC
        frames = np.stack(
            [np.asarray(Image.fromarray(f).resize((rw, rh), resample)) for f in frames]
        )
    x = frames.astype(np.float32) * np.float32(s.rescale_factor)
    x = (x - np.asarray(s.image_mean, np.float32)) / np.asarray(s.image_std, np.float32)
    x = x.transpose(0, 3, 1, 2)  # [T, C, H, W]
    Tp, P, m = s.temporal_patch_size, s.patch_size, s.merge_size
    if pad := -T % Tp:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    gt, gh, gw = x.shape[0] // Tp, rh // P, rw // P
    C = x.shape[1]
    x = x.reshape(gt, Tp, C, gh // m, m, P, gw // m, m, P)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, C * Tp * P * P)), (gt, gh, gw)


def frame_timestamps(indices, video_fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds for each temporal patch: the mean time of its first and last frame."""
    idx = [int(i) for i in indices]
    if len(idx) % temporal_patch_size:
        idx += [idx[-1]] * (temporal_patch_size - len(idx) % temporal_patch_size)
    t = [i / video_fps for i in idx]
    return [
        (t[i] + t[i + temporal_patch_size - 1]) / 2 for i in range(0, len(t), temporal_patch_size)
    ]


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
    """Tokenizer + image and video processing. `__call__(text, images, videos)` -> model
    inputs as mx arrays."""

    def __init__(
        self,
        tokenizer,
        image_processor=None,
        image_token: str = IMAGE_TOKEN,
        video_settings: VideoSettings | None = None,
        video_token: str = VIDEO_TOKEN,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.merge_size = getattr(image_processor, "merge_size", 2)
        self.video_settings = video_settings
        self.video_token = video_token

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

    def preprocess_videos(self, videos) -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
        """Videos (paths or frame arrays) -> (pixel_values_videos, video_grid_thw [n, 3],
        per-video timestamps of each temporal patch)."""
        if self.video_settings is None:
            raise ValueError("this checkpoint has no image/video processor settings: no videos")
        s = self.video_settings
        pixels, grids, stamps = [], [], []
        for v in videos:
            if isinstance(v, np.ndarray):
                frames, indices, fps = v, np.arange(len(v)), DEFAULT_VIDEO_FPS
            else:
                frames, indices, fps = read_video(v, s)
            p, grid = preprocess_video(frames, s)
            pixels.append(p)
            grids.append(grid)
            stamps.append(frame_timestamps(indices, fps, s.temporal_patch_size))
        return np.concatenate(pixels), np.asarray(grids), stamps

    def _video_text(self, grid, stamps: list[float]) -> str:
        per_frame = int(grid[1] * grid[2]) // self.video_settings.merge_size**2
        slot = VISION_START + self.video_token * per_frame + VISION_END
        return "".join(f"<{t:.1f} seconds>" + slot for t in stamps[: int(grid[0])])

    def __call__(
        self, text: str | list[str], images=None, videos=None, add_special_tokens: bool = False
    ):
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, list | tuple):
            images = [images]
        images = list(images or [])
        if videos is not None and not isinstance(videos, list | tuple):
            videos = [videos]
        videos = list(videos or [])
        result: dict[str, mx.array] = {}
        if videos:
            # Counted before decoding: a mismatch is refused without reading any video.
            slots = sum(t.count(self.video_token) for t in texts)
            if slots != len(videos):
                raise ValueError(
                    f"{len(videos)} video(s) given but the text has {slots} "
                    f"{self.video_token} placeholder(s)"
                )
            pixel_values, grid, stamps = self.preprocess_videos(videos)
            result["pixel_values_videos"] = mx.array(pixel_values)
            result["video_grid_thw"] = mx.array(grid)
            it = iter(self._video_text(g, st) for g, st in zip(grid, stamps, strict=True))
            texts = ["".join(p + next(it) for p in t.split(self.video_token)[:-1])
                     + t.split(self.video_token)[-1] for t in texts]  # fmt: skip
        elif any(self.video_token in t for t in texts):
            raise ValueError(f"the text has {self.video_token} placeholders but no videos")
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
    video_token = VIDEO_TOKEN
    if "video_token_id" in config:
        video_token = tokenizer.convert_ids_to_tokens(int(config["video_token_id"]))
    video_settings = None
    if image_processor is not None or (path / "video_preprocessor_config.json").is_file():
        video_settings = VideoSettings.from_folder(path)
    return Processor(
        tokenizer,
        image_processor,
        image_token=image_token,
        video_settings=video_settings,
        video_token=video_token,
    )
