"""Video input for the VLM: frame sampling and pixels as transformers' Qwen3-VL video processor,
PyAV decoding of a video the test writes itself, prompt expansion, `videos=` and `--video`."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.processor import (
    VideoSettings,
    frame_timestamps,
    load_processor,
    preprocess_video,
    sample_frame_indices,
    smart_resize_video,
)

av = pytest.importorskip("av", reason="PyAV (the `video` extra) is not installed")

GOLDEN = Path(__file__).parent / "data" / "golden" / "vlm"


def _frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def write_video(path: Path, frames: np.ndarray, fps: int = 10) -> Path:
    """A lossless (PNG codec) AVI, so decoded frames equal the written ones."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("png", rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "rgb24"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_sample_frame_indices_follow_transformers():
    s = VideoSettings()
    # 20 frames at 10 fps = 2 s -> 2 fps gives 4 frames, at linspace(0, 19, 4).round()
    assert sample_frame_indices(20, 10.0, s).tolist() == [0, 6, 13, 19]
    # 0.5 s -> 1 frame, raised to min_frames (4)
    assert sample_frame_indices(5, 10.0, s).tolist() == [0, 1, 3, 4]
    # fewer frames than min_frames: all of them
    assert sample_frame_indices(3, 10.0, s).tolist() == [0, 1, 2]
    # 10 min at 30 fps -> 1200 frames, capped at max_frames
    assert len(sample_frame_indices(18000, 30.0, s)) == 768
    assert sample_frame_indices(18000, 30.0, VideoSettings(fps=1.0)).tolist()[:3] == [0, 30, 60]


def test_smart_resize_video_follows_transformers():
    s = VideoSettings()
    # below min_pixels (131072 for the clip): scaled up to multiples of 32
    h, w = smart_resize_video(4, 64, 96, s)
    assert (h % 32, w % 32) == (0, 0) and 4 * h * w >= s.min_pixels
    assert (h, w) == (160, 224)
    # above max_pixels (786432): scaled down
    h, w = smart_resize_video(8, 720, 1280, s)
    assert 8 * h * w <= s.max_pixels and (h, w) == (224, 416)
    with pytest.raises(ValueError, match="at least 2 frames"):
        smart_resize_video(1, 64, 64, s)


def test_timestamps_average_each_temporal_patch():
    assert frame_timestamps([0, 6, 13, 19], 10.0, 2) == pytest.approx([0.3, 1.6])
    assert frame_timestamps([0, 6, 13], 10.0, 2) == pytest.approx([0.3, 1.3])


def test_read_video_decodes_the_sampled_frames(tmp_path):
    from qwen35_mlx.processor import read_video

    frames = _frames(20, 64, 96)
    path = write_video(tmp_path / "clip.avi", frames)
    got, indices, fps = read_video(path, VideoSettings())
    assert fps == 10.0 and indices.tolist() == [0, 6, 13, 19]
    np.testing.assert_array_equal(got, frames[indices])
    (tmp_path / "bad.avi").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot read video"):
        read_video(tmp_path / "bad.avi", VideoSettings())


def _reference_patches(frames: np.ndarray, s: VideoSettings) -> np.ndarray:
    """transformers' video pixel pipeline written out plainly for frames needing no resize:
    rescale, normalise, pad with the last frame, then per (t, h-block, w-block, h-in-merge,
    w-in-merge) patch a row of C x Tp x P x P values."""
    x = (frames.astype(np.float64) / 255 - np.array(s.image_mean)) / np.array(s.image_std)
    if len(x) % s.temporal_patch_size:
        x = np.concatenate([x, x[-1:]])
    P, m, Tp = s.patch_size, s.merge_size, s.temporal_patch_size
    T, H, W, C = x.shape
    rows = []
    for t in range(T // Tp):
        for bh in range(H // P // m):
            for bw in range(W // P // m):
                for ih in range(m):
                    for iw in range(m):
                        y, xx = (bh * m + ih) * P, (bw * m + iw) * P
                        patch = x[t * Tp : (t + 1) * Tp, y : y + P, xx : xx + P, :]  # Tp,P,P,C
                        rows.append(patch.transpose(3, 0, 1, 2).reshape(-1))
    return np.stack(rows)


def test_preprocess_video_matches_reference_layout():
    s = VideoSettings(min_pixels=1024)
    frames = _frames(5, 64, 96, seed=1)  # odd T: padded with the last frame
    pixels, grid = preprocess_video(frames, s)
    assert grid == (3, 4, 6)
    ref = _reference_patches(frames, s)
    assert pixels.dtype == np.float32 and pixels.shape == ref.shape
    np.testing.assert_allclose(pixels, ref, rtol=0, atol=1e-6)


def test_preprocess_video_equals_image_processor_on_a_still():
    """Two identical frames are what transformers' image processor makes of one image (it
    repeats an image over the temporal patch): the pixel rows agree within 1e-6."""
    processor = load_processor(GOLDEN)
    image = _frames(1, 64, 96, seed=2)[0]
    img_pixels, img_grid = processor.preprocess_images([image])
    s = VideoSettings.from_folder(GOLDEN)
    s.min_pixels = 1024  # both sides keep 64 x 96
    pixels, grid = preprocess_video(np.stack([image, image]), s)
    assert tuple(img_grid[0]) == grid
    np.testing.assert_allclose(pixels, img_pixels, rtol=0, atol=1e-6)


def test_preprocess_video_matches_transformers_video_processor():
    """Where torch and torchvision exist (not on the CPU box): transformers' own processor."""
    pytest.importorskip("torchvision", reason="transformers' video processor needs torchvision")
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    frames = _frames(6, 64, 96, seed=3)
    theirs = Qwen3VLVideoProcessor(size={"shortest_edge": 1024, "longest_edge": 1 << 20})
    out = theirs(
        videos=[frames], do_sample_frames=False, cap_pixels_per_frame=False, return_tensors="np"
    )
    s = VideoSettings(min_pixels=1024, max_pixels=1 << 20)
    pixels, grid = preprocess_video(frames, s)
    assert out["video_grid_thw"].tolist() == [list(grid)]
    np.testing.assert_allclose(pixels, out["pixel_values_videos"], rtol=0, atol=1e-5)


def test_processor_expands_video_placeholders(tmp_path):
    processor = load_processor(GOLDEN)
    path = write_video(tmp_path / "clip.avi", _frames(20, 64, 96))
    text = "<|vision_start|><|video_pad|><|vision_end|>What happens?"
    out = processor(text, videos=[path])
    grid = out["video_grid_thw"].tolist()
    assert grid == [[2, 10, 14]]  # 4 frames -> 2 temporal patches of 160 x 224 pixels
    assert out["pixel_values_videos"].shape == (2 * 10 * 14, 3 * 2 * 16 * 16)
    video_id = json.loads((GOLDEN / "config.json").read_text())["video_token_id"]
    ids = out["input_ids"][0].tolist()
    assert ids.count(video_id) == 2 * 10 * 14 // 4
    decoded = processor.tokenizer.decode(ids)
    assert "<0.3 seconds>" in decoded and "<1.6 seconds>" in decoded
    with pytest.raises(ValueError, match="placeholder"):
        processor("no slot", videos=[path])
    with pytest.raises(ValueError, match="placeholder"):  # counted before any decoding
        processor("no slot", videos=[tmp_path / "absent.mp4"])
    with pytest.raises(ValueError, match="no videos"):
        processor(text)


def test_stream_generate_with_video_is_the_model_on_the_processor_inputs(tmp_path):
    from qwen35_mlx import load, stream_generate

    model, processor = load(GOLDEN)
    path = write_video(tmp_path / "clip.avi", _frames(20, 64, 96))
    prompt = "<|vision_start|><|video_pad|><|vision_end|>Describe."
    tokens = [
        r.token for r in stream_generate(model, processor, prompt, videos=[path], max_tokens=4)
    ]
    inputs = processor(prompt, videos=[path])
    logits = model(
        inputs["input_ids"],
        pixel_values_videos=inputs["pixel_values_videos"],
        video_grid_thw=inputs["video_grid_thw"],
    )
    assert tokens[0] == int(mx.argmax(logits[0, -1]))
    # the video reaches the model: without it the first token's logits differ
    plain = model(inputs["input_ids"])
    assert not np.allclose(np.array(plain[0, -1]), np.array(logits[0, -1]))


def test_cli_video(tmp_path, capsys):
    from qwen35_mlx.generate import main

    path = write_video(tmp_path / "clip.avi", _frames(20, 64, 96))
    assert main(["--model", str(GOLDEN), "--video", str(path), "--max-tokens", "3", "--quiet"]) == 0
    assert capsys.readouterr().out.strip()
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    text_model = GOLDEN.parent / "generate"
    for argv, msg in [
        (["--model", str(GOLDEN), "--video", str(tmp_path / "absent.mp4")], "no such file"),
        (["--model", str(GOLDEN), "--video", str(tmp_path / "bad.mp4")], "cannot read video"),
        (["--model", str(text_model), "--video", str(path)], "text-only"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err


def _transformers_functions() -> dict:
    """transformers' own Qwen3-VL video code (`smart_resize`, `sample_frames`, `patchify`), read
    from the installed package and run over NumPy: its module cannot be imported without torch,
    so the functions are taken from its source and `torch` ops get a small NumPy stand-in."""
    import ast
    import importlib.util
    import math
    import textwrap

    spec = importlib.util.find_spec("transformers")
    path = Path(spec.origin).parent / "models" / "qwen3_vl" / "video_processing_qwen3_vl.py"
    tree = ast.parse(path.read_text())
    wanted = {"smart_resize", "sample_frames", "patchify"}
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            found[node.name] = textwrap.dedent(ast.get_source_segment(path.read_text(), node))
    assert set(found) == wanted, f"transformers changed: {sorted(wanted - set(found))}"

    class Arr(np.ndarray):
        def expand(self, *sizes):
            shape = [s if n == -1 else n for s, n in zip(self.shape, sizes, strict=True)]
            return np.broadcast_to(self, shape).view(Arr)

        def view(self, *shape):
            if shape and isinstance(shape[0], int):
                return np.reshape(self, shape).view(Arr)
            return np.ndarray.view(self, *shape)

        def permute(self, *axes):
            return np.transpose(self, axes).view(Arr)

    class Torch:
        @staticmethod
        def cat(arrays, dim=0):
            return np.concatenate(arrays, axis=dim).view(Arr)

    from transformers.video_utils import VideoMetadata

    ns = {"math": math, "np": np, "torch": Torch, "logger": None, "VideoMetadata": VideoMetadata}
    for src in found.values():
        exec(compile(src, str(path), "exec"), ns)  # noqa: S102
    ns["Arr"] = Arr
    return ns


def test_matches_transformers_own_video_code():
    """Frame sampling, resize targets and patch layout as transformers' source computes them
    (run here without torch), on frames this test decodes."""
    from transformers.video_utils import VideoMetadata

    t = _transformers_functions()
    s = VideoSettings()
    owner = type("P", (), {"fps": s.fps, "min_frames": s.min_frames, "max_frames": s.max_frames})()
    for total, fps in [(20, 10.0), (5, 10.0), (3, 25.0), (18000, 30.0), (301, 29.97), (7, 1.0)]:
        theirs = t["sample_frames"](owner, VideoMetadata(total_num_frames=total, fps=fps))
        assert sample_frame_indices(total, fps, s).tolist() == list(theirs), (total, fps)
    factor = s.patch_size * s.merge_size
    cases = [(4, 64, 96), (8, 720, 1280), (2, 31, 500), (6, 480, 640), (16, 1080, 1920)]
    for n, h, w in cases + [(2, 500, 700), (2, 250, 620)]:
        theirs = t["smart_resize"](n, h, w, temporal_factor=2, factor=factor,
                                   min_pixels=s.min_pixels, max_pixels=s.max_pixels)  # fmt: skip
        assert smart_resize_video(n, h, w, s) == tuple(theirs), (n, h, w)

    s = VideoSettings(min_pixels=1024)
    frames = _frames(5, 64, 96, seed=4)
    x = (frames.astype(np.float32) * np.float32(1 / 255) - 0.5) / 0.5
    x = x.transpose(0, 3, 1, 2)[None].view(t["Arr"])  # [1, T, C, H, W], as torch holds it
    theirs, gt, gh, gw = t["patchify"](None, x, patch_size=16, merge_size=2, temporal_patch_size=2)
    pixels, grid = preprocess_video(frames, s)
    assert grid == (gt, gh, gw)
    np.testing.assert_allclose(pixels, np.asarray(theirs)[0], rtol=0, atol=1e-6)
