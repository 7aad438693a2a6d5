"""A VLM's conversations with images in mlx-lm's BatchGenerator (issue #15).

Each conversation's M-RoPE shift (cache.MROPE_SHIFT) lives on its cache; BatchGenerator merges
the request caches into one batch cache, extends a running batch with new rows, filters out the
rows that finish and extracts a finished row's cache. Every row must keep its own shift through
all of these: a row's greedy tokens equal its solo run.
"""

from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator

from qwen35_mlx import load

from .test_fast_decode import _vlm_prompt

GOLDEN = Path(__file__).parent / "data" / "golden"
IMAGE = GOLDEN / "vlm" / "image0.png"


@pytest.fixture(scope="module")
def vlm():
    return load(GOLDEN / "vlm")


def _inputs(processor, text, image):
    inputs = processor(_vlm_prompt(processor, text, image), images=[IMAGE] if image else None)
    kw = {}
    if image:
        kw = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    return list(mx.array(inputs["input_ids"])[0].tolist()), kw


def _greedy(model, cache, logits, n):
    toks = []
    for _ in range(n):
        y = mx.argmax(logits, axis=-1)
        toks.append(y.item())
        logits = model(y[:, None], cache=cache)[:, -1]
    return toks, cache, logits


def _solo(model, processor, text, image, n):
    ids, kw = _inputs(processor, text, image)
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache=cache, **kw)[:, -1]
    return _greedy(model, cache, logits, n)[0]


def _request(model, processor, text, image):
    """(prompt, cache) for BatchGenerator.insert: an image prompt is prefilled here with its
    pixels up to just after the image, as a server's prompt cache would hold it; its text after
    the image is left to BatchGenerator (right-padded beside the other rows: `prepare`)."""
    ids, kw = _inputs(processor, text, image)
    if not image:
        return ids, None
    cut = max(i for i, t in enumerate(ids) if t == model.config.image_token_id) + 2
    cache = model.make_cache()
    model(mx.array([ids[:cut]]), cache=cache, **kw)
    return ids[cut:], cache


def test_batch_generator_rows_with_images_equal_solo(vlm):
    model, processor = vlm
    convs = [  # (text, image, max_tokens): the short text row finishes first (filter)
        ("What?", True, 12),
        ("Say something long.", False, 4),
        ("Describe it.", True, 10),
    ]
    late = ("Hi there", False, 6)  # joins the running batch (merge, then extend)
    late_img = ("And this?", True, 6)
    n_more = 8  # tokens decoded solo on a finished row's extracted cache

    solo = [_solo(model, processor, t, i, n + n_more) for t, i, n in [*convs, late, late_img]]

    gen = BatchGenerator(model, max_tokens=16)
    requests = [_request(model, processor, t, i) for t, i, _ in convs]
    uids = gen.insert(
        [p for p, _ in requests],
        max_tokens=[n for *_, n in convs],
        caches=[c for _, c in requests],
    )
    out = {u: [] for u in uids}
    extracted = {}
    steps = 0
    while responses := gen.next_generated():
        steps += 1
        if steps == 3:
            joined = [_request(model, processor, t, i) for t, i, _ in (late, late_img)]
            new = gen.insert(
                [p for p, _ in joined],
                max_tokens=[late[2], late_img[2]],
                caches=[c for _, c in joined],
            )
            uids += new
            out.update({u: [] for u in new})
        for r in responses:
            out[r.uid].append(r.token)
            if r.finish_reason is not None:
                extracted[r.uid] = r.prompt_cache
    gen.close()

    limits = [n for *_, n in convs] + [late[2], late_img[2]]
    for u, ref, n in zip(uids, solo, limits, strict=True):
        assert out[u] == ref[:n], f"row {u}"
    # A finished row's extracted cache (it holds the row's last token too) goes on as its solo
    # conversation does, fed the solo run's next token.
    for u, ref, n in zip(uids, solo, limits, strict=True):
        cache = extracted[u]
        logits = model(mx.array([[ref[n]]]), cache=cache)[:, -1]
        assert _greedy(model, cache, logits, n_more - 1)[0] == ref[n + 1 :], f"row {u}"


def test_mlx_lm_prompt_cache_file_reads_a_vlm_cache_back(vlm, tmp_path):
    # mlx-lm's load_prompt_cache looks the saved class names up in its own module: the cache
    # that carries the M-RoPE shift must save under a name it knows.
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    model, _ = vlm
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache=cache)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    back = load_prompt_cache(str(tmp_path / "c.safetensors"))
    assert [type(c).__name__ for c in back] == [type(c).__name__ for c in cache]
    assert all(c.state is not None for c in back)
