"""A prefill that knows its length reserves the KV buffers once (`cache.reserve_kv`); the new
buffer must not be built with the capacity alive twice (issue 9: a zeros block concatenated
to the prefix held the zeros and the result together, +1.5 GiB at a 128k prompt on the H200)."""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.models.cache import BatchKVCache, KVCache, reserve, reserve_kv


def _filled(kind, idx: int, B=1, H=2, D=64):
    c = BatchKVCache([0] * B) if kind == "batch" else KVCache()
    k = mx.random.normal((B, H, idx, D), key=mx.random.key(1))
    v = mx.random.normal((B, H, idx, D + 8), key=mx.random.key(2))
    c.update_and_fetch(k, v)
    mx.eval(c.keys, c.values)
    return c, np.array(k), np.array(v)


@pytest.mark.parametrize("kind", ["plain", "batch"])
@pytest.mark.parametrize("how", ["reserve_kv", "reserve"])
def test_reserve_holds_the_new_capacity_once_and_keeps_the_prefix(kind, how):
    idx, n = 16, 1 << 15
    c, k, v = _filled(kind, idx)
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    if how == "reserve_kv":
        reserve_kv([c], n)
    else:
        reserve(c, n)
    mx.eval(c.keys, c.values)
    cap = c.keys.shape[2]
    assert cap >= idx + n
    new_bytes = c.keys.nbytes + c.values.nbytes
    assert mx.get_peak_memory() - base < 1.25 * new_bytes
    np.testing.assert_array_equal(np.array(c.keys[..., :idx, :]), k)
    np.testing.assert_array_equal(np.array(c.values[..., :idx, :]), v)
    assert not np.array(c.keys[..., idx:, :]).any()
