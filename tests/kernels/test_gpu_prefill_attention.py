"""The prefill attention kernel on a GPU (`kernels/attention/prefill.py`) against the float64
attention (tests/kernels/attention_np.py) and the blocked ops path it would replace
(models/attention.py `_blocked`).

The bound is the CPU test's (test_prefill_attention_on_cpu.py: the weights' and the output's
rounding, 1.05 u (2 vmax + |o64|) + 1e-5 vmax per element); on the GPU the exponential is
CUDA's expf (2 ulp of fp32: inside the 1e-5 term). The blocked path rounds its
scores to the dtype as well, so it is no closer to float64 than the kernel: its largest error
bounds the kernel's. Shapes: the 0.8B layer (Hq 8, Hkv 2, D 256) at T = S, T < S (a prompt fed
in steps) and T = 1; GQA 1 at D 128; left padding; fp16.
"""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.attention import prefill
from qwen35_mlx.models import attention as model_attention
from tests.kernels.attention_np import make_attention_inputs
from tests.kernels.gpu import GPU_ONLY
from tests.kernels.test_prefill_attention_on_cpu import (
    check,
    left_pad_mask,
    reference,
    rising_inputs,
)

pytestmark = GPU_ONLY


@pytest.fixture(autouse=True)
def on_gpu():
    with mx.stream(mx.gpu):
        yield


def test_kernel_runs_here():
    q, k, v, _ = make_attention_inputs(1, 8, 2, 32, 64, 256, dtype=mx.bfloat16)
    assert prefill.backend_name() is not None
    assert model_attention.prefill_kernel_takes(q, k, v, "causal")


# (B, Hq, Hkv, T, S, D, dtype, mask kind)
CASES = [
    (1, 8, 2, 2048, 2048, 256, mx.bfloat16, "causal"),
    (1, 8, 2, 512, 4096, 256, mx.bfloat16, "causal"),
    (1, 8, 2, 1, 3000, 256, mx.bfloat16, "causal"),
    (1, 8, 2, 17, 17, 256, mx.float16, "causal"),
    (2, 8, 2, 300, 300, 256, mx.bfloat16, "pad"),
    (2, 4, 4, 130, 700, 128, mx.float16, "pad"),
    (1, 8, 2, 200, 1000, 256, mx.bfloat16, None),
]


# (body version, tiles, ring): the default, version 3 (session 12: the softmax in registers)
# with its tiles, version 2 with BK 16, with slices of 128 columns (a ring of 3), with 8 warps
# (128 query rows a threadgroup: half the key / value traffic), version 1, and version 3 with 8
# warps and with slices of 64 columns (the A/B builds)
BUILDS = [
    (None, None, None),
    (3, None, None),
    (2, (16, 64, 4), None),
    (2, (32, 128, 4), 3),
    (2, (16, 128, 8), 2),
    (1, None, None),
    (3, (16, 256, 8), None),
    (3, (16, 64, 4), None),
]


# every case with the default build and version 3; the A/B builds with the first three (0.8B
# shape, causal)
PAIRS = [(c, b) for b in BUILDS[:2] for c in CASES] + [
    (c, b) for b in BUILDS[2:] for c in CASES[:3]
]


def _pair_id(pair) -> str:
    (B, Hq, _, T, S, D, _, kind), (version, tiles, ring) = pair
    build = f"v{version or 'default'}" + ("-{}-{}-{}".format(*tiles) + f"-r{ring}" if tiles else "")
    return f"B{B}Hq{Hq}T{T}S{S}D{D}{kind}-{build}"


@pytest.mark.parametrize("case,build", PAIRS, ids=[_pair_id(p) for p in PAIRS])
def test_prefill_kernel_matches_float64_and_the_blocked_path(case, build):
    B, Hq, Hkv, T, S, D, dtype, kind = case
    q, k, v, _ = make_attention_inputs(B, Hq, Hkv, T, S, D, dtype=dtype, seed=T + S)
    scale = D**-0.5
    causal = kind == "causal"
    if kind == "pad":
        mask = left_pad_mask(B, T, S, [0, 37][:B], causal_too=False)
    else:
        mask = "causal" if causal else None
    version, tiles, ring = build
    o = prefill.prefill_attention(q, k, v, scale=scale, mask=mask, version=version,
                                  tiles_=tiles, ring_=ring)  # fmt: skip
    blocked = model_attention._blocked(q, k, v, scale, mask)
    mx.eval(o, blocked)
    want = reference(q, k, v, scale, None if causal else mask, causal)
    got = np.asarray(o.astype(mx.float32), np.float64)
    check(got, want, v, dtype, Hq)
    # rows that see a key: the blocked path (mean of the values elsewhere) is no closer
    seen = np.abs(want).max(-1) > 0
    b = np.asarray(blocked.astype(mx.float32), np.float64)
    err_kernel = np.abs(got - want).max(-1)[seen].max()
    err_blocked = np.abs(b - want).max(-1)[seen].max()
    print(f"max error: kernel {err_kernel:.3g}, blocked {err_blocked:.3g}")
    assert err_kernel <= err_blocked * 1.5 + 1e-6


def test_switch_routes_model_attention(monkeypatch):
    """PREFILL_KERNEL on: models.attention.attention gives the kernel's result exactly."""
    q, k, v, _ = make_attention_inputs(1, 8, 2, 600, 2000, 256, dtype=mx.bfloat16, seed=4)
    monkeypatch.setattr(model_attention, "PREFILL_KERNEL", True)
    monkeypatch.setattr(model_attention, "PREFILL_KERNEL_MIN_T", 1)
    got = model_attention.attention(q, k, v, None, 1 / 16, "causal")
    want = prefill.prefill_attention(q, k, v, scale=1 / 16, mask="causal")
    assert mx.array_equal(got, want).item()


@pytest.mark.parametrize("version", [None, 3], ids=["default", "v3"])
def test_rising_scores_on_the_gpu(version):
    """Scores rising along the keys (tests/kernels/test_prefill_attention_on_cpu.rising_inputs:
    by 30 over the 4096 keys, ~43 log2 units; the fp32 scores' own error stays ~1e-5 of a unit):
    a row's maximum moves past version 3's lazy margin (8 log2 units) every ~48 blocks of 16
    keys, so its rescaling runs ~5 times a row; 0.8B shape at T 2048 over 4096 keys, causal."""
    q, k, v = rising_inputs(1, 8, 2, 2048, 4096, 256, mx.bfloat16, seed=7, total=30.0)
    o = prefill.prefill_attention(q, k, v, scale=1 / 16, mask="causal", version=version)
    got = np.asarray(o.astype(mx.float32), np.float64)
    check(got, reference(q, k, v, 1 / 16, None, True), v, mx.bfloat16, 8)


@pytest.mark.parametrize("version", [None, 2, 1], ids=["default", "v2", "v1"])
@pytest.mark.parametrize("kind", ["causal", "pad"])
def test_kernel_reads_the_first_kv_len_keys_of_a_buffer(version, kind):
    """k, v a KV cache's buffers (NaN past the filled keys) with kv_len: bit for bit the kernel
    over the filled slice alone, and within the bound of float64."""
    B, Hq, Hkv, T, S, SC, D = 2, 8, 2, 300, 1000, 1280, 256
    q, k, v, _ = make_attention_inputs(B, Hq, Hkv, T, S, D, dtype=mx.bfloat16, seed=11)
    nan = mx.full((B, Hkv, SC - S, D), float("nan"), mx.bfloat16)
    kb, vb = mx.concatenate([k, nan], axis=2), mx.concatenate([v, nan], axis=2)
    mask = "causal" if kind == "causal" else left_pad_mask(B, T, S, [0, 37], causal_too=True)
    got = prefill.prefill_attention(q, kb, vb, scale=1 / 16, mask=mask, version=version, kv_len=S)
    want = prefill.prefill_attention(q, k, v, scale=1 / 16, mask=mask, version=version)
    assert mx.array_equal(got, want).item()
    ref = reference(q, k, v, 1 / 16, None if kind == "causal" else mask, kind == "causal")
    check(np.asarray(got.astype(mx.float32), np.float64), ref, v, mx.bfloat16, Hq)


def test_model_attention_reads_the_cache_in_place(monkeypatch):
    """Through a KVCache with room to spare (a reserved prompt), models.attention.attention
    hands the kernel the cache's buffers and the filled length: the same output, bit for bit,
    as with the filled slice (PREFILL_IN_PLACE off)."""
    from qwen35_mlx.models.cache import KVCache, reserve

    monkeypatch.setattr(model_attention, "PREFILL_KERNEL_MIN_T", 1)
    q, k, v, _ = make_attention_inputs(1, 8, 2, 600, 1600, 256, dtype=mx.bfloat16, seed=5)
    cache = KVCache()
    cache.update_and_fetch(k[:, :, :1000], v[:, :, :1000])
    reserve(cache, 2000)
    ks, vs = cache.update_and_fetch(k[:, :, 1000:], v[:, :, 1000:])
    assert cache.keys.shape[2] > ks.shape[2] == 1600
    outs = {}
    for in_place in (True, False):
        monkeypatch.setattr(model_attention, "PREFILL_IN_PLACE", in_place)
        outs[in_place] = model_attention.attention(q, ks, vs, cache, 1 / 16, "causal")
    assert mx.array_equal(outs[True], outs[False]).item()
    want = prefill.prefill_attention(q, k, v, scale=1 / 16, mask="causal")
    assert mx.array_equal(outs[True], want).item()
