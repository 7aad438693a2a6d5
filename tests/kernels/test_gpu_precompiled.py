"""On an NVIDIA GPU: the precompiled CUDA path (`precompiled.cuda_kernel`: NVRTC + disk cache +
`mx.fast.precompiled_cuda_kernel`) gives the same bits as MLX's `mx.fast.cuda_kernel` path for
every recurrence variant and the conv decode variants, first when it compiles and then when it
loads the binary from the disk cache. Outputs are poisoned with NaN, so an unwritten element
shows. Skipped without CUDA (tests/kernels/test_cuda_precompiled.py covers the host side on the
CPU).
"""

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import cuda, launch, nvrtc, precompiled, source
from tests.kernels.helpers import left_pad_mask, make_decode_inputs, make_gate_inputs, make_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX with a CUDA GPU"),
]

NAN = float("nan")
B, T, HK, HV, DK, DV = 2, 5, 2, 4, 128, 64


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv(nvrtc.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(precompiled.ENV, "1")


def _backend(factory):
    return launch.GpuBackend(
        header=cuda.HEADER, prologue=cuda.PROLOGUE, factory=factory, available=lambda: True
    )


def _same_bits(a, b):
    a, b = np.asarray(a.astype(mx.float32)), np.asarray(b.astype(mx.float32))
    assert a.shape == b.shape
    assert not np.isnan(a).any()
    np.testing.assert_array_equal(a, b)


def _recurrence(backend, gate, mask, decode, dt):
    t = 1 if decode else T
    q, k, v, g, beta, state = make_inputs(B, t, HK, HV, DK, DV, per_key=gate == "per_key", dtype=dt)
    m = left_pad_mask(B, t, [0, 1]) if mask else None  # at T = 1: row 1 is all padding
    if gate == "fused":
        a, b, A_log, dt_bias = make_gate_inputs(B, t, HV, dtype=dt)
        out = backend.gated_delta_update_kernel(
            q, k, v, a, b, A_log, dt_bias, state, m, init_value=NAN
        )
    else:
        out = backend.gated_delta_kernel(q, k, v, g, beta, state, m, init_value=NAN)
    mx.eval(out)
    return out, backend.build(gate, mask, decode)


def _conv(backend, mask, dt, norm=False):
    x = make_decode_inputs(B, HK, HV, DK, DV, dtype=dt)
    m = mx.array([True, False]) if mask else None
    args = [x[n] for n in ("qkv", "conv_state", "conv_w", "a", "b", "A_log", "dt_bias", "state")]
    kw = {}
    if norm:  # the gated norm inside the kernel
        z = mx.random.normal((B, HV * DV), key=mx.random.key(3)).astype(dt)
        kw = dict(z=z, norm_w=(1 + 0.1 * mx.arange(DV) / DV).astype(dt), norm_eps=1e-6)
    out = backend.gated_delta_decode_kernel(*args, m, init_value=NAN, **kw)
    mx.eval(out)
    return out, backend.build("fused", mask, True, True, norm)


CASES = [("rec", *v, dt) for v in source.variants() for dt in (mx.float32, mx.bfloat16)]
CASES += [("conv", "fused", m, True, dt) for m in (False, True) for dt in (mx.float32, mx.bfloat16)]
CASES += [("conv", "fused", True, True, mx.float16)]
CASES += [("norm", "fused", m, True, mx.bfloat16) for m in (False, True)]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "-".join(str(x) for x in c).replace("mlx.core.", "")
)
def test_precompiled_cuda_kernels_equal_cuda_kernel(case):
    kind, gate, mask, decode, dt = case

    def run(backend):
        if kind in ("conv", "norm"):
            return _conv(backend, mask, dt, kind == "norm")
        return _recurrence(backend, gate, mask, decode, dt)

    want, _ = run(_backend("cuda_kernel"))
    got, kern = run(_backend(precompiled.cuda_kernel))
    assert isinstance(kern, precompiled.CachedCudaKernel) and kern.last == "compiled"
    again, kern2 = run(_backend(precompiled.cuda_kernel))  # a new object: from the disk cache
    assert kern2.last == "disk"
    for w, g, a in zip(want, got, again, strict=True):
        _same_bits(g, w)
        _same_bits(a, w)


def test_cuda_backend_uses_the_precompiled_path():
    """The shipped backend (`cuda.BACKEND`) runs its kernels precompiled on this machine: NVRTC
    is found and compiles (a fallback here would mean a cold start as slow as before)."""
    y, kern = _conv(cuda.BACKEND, False, mx.bfloat16)
    assert isinstance(kern, precompiled.CachedCudaKernel)
    assert kern.last in ("compiled", "disk"), kern.last
