"""The conv decode kernel (`gated_delta_decode`'s GPU body), run on the CPU by the lane emulator.

The CUDA source of the conv variants (`cuda.BACKEND.kernel_source(..., conv=True)`: prologue +
the one template with GD_CONV) is wrapped in a C++ function with the parameters MLX generates
and run by tests/kernels/lane_emulator.h, every thread of a block together (the variant stages q
and k in threadgroup memory behind a barrier). Outputs start as NaN, so an element the body fails
to write fails the comparison. Checked against the float64 NumPy step and, tighter, against the
`ref` backend (mx ops with the same roundings): fp32 and bfloat16 activations, masks, Hv/Hk 1
and 2, Dk = Dv = 128 and a small shape with a partial warp, B = 1..3, several layouts.
"""

import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import cuda, gated_delta_decode, source
from tests.conftest import RTOL, rel_err
from tests.kernels.helpers import (
    GXX,
    compile_emulated,
    cpu_device,  # noqa: F401  (fixture)
    gated_delta_decode_np,
    make_decode_inputs,
    packed_np,
    runner_program,
)

pytestmark = [
    pytest.mark.skipif(GXX is None, reason="needs g++"),
    pytest.mark.usefixtures("cpu_device"),
]

CTYPES = {mx.float32: "float", mx.bfloat16: "bf16"}
# Inputs in the activation dtype (the others are fp32, the mask bool).
ACT = ("qkv", "conv_state", "conv_w", "a", "b", "z", "norm_w")

# Compiled instantiations: (mask, Dk, L, activation dtype, K, W, gated norm).
INSTANCES = [
    (mask, Dk, L, dt, 4, W, False)
    for mask in (False, True)
    for dt in (mx.float32, mx.bfloat16)
    for Dk, L, W in ((128, 16, 2), (32, 8, 2), (128, 8, 4))
] + [
    (mask, Dk, L, dt, 4, W, True)
    for mask in (False, True)
    for dt in (mx.float32, mx.bfloat16)
    for Dk, L, W in ((128, 4, 16), (32, 4, 2))  # launch.norm_layout at Dv = 128 and 12
]

# (B, Hk, Hv, Dk, Dv, L, W): Dk = Dv = 128 at the default layout and at 8 lanes x 4 warps;
# Dk = 32 with Dv = 12 (a partial warp and a partial threadgroup); Hv / Hk = 1 and 2.
SHAPES = [
    (1, 1, 1, 128, 128, 16, 2),
    (2, 1, 2, 128, 128, 16, 2),
    (3, 2, 4, 32, 12, 8, 2),
    (2, 2, 2, 128, 128, 8, 4),
]


def _runner(i: int, mask: bool, Dk: int, L: int, dtype, K: int, W: int, norm: bool) -> str:
    names = source.input_names("fused", mask, conv=True, norm=norm)
    yt = CTYPES[dtype]

    def ctype(n):
        return "bool" if n == "mask" else (yt if n in ACT else "float")

    params = [f"const {ctype(n)}* {n}" for n in names]
    params += ["const int* qkv_shape", "const int* a_shape", "const int* state_in_shape"]
    params += ["YT* y", "float* state_out", "YT* conv_state_out"]
    reads = "\n".join(
        f"  const std::vector<char> {n}_v = read(argv[{j}]);" for j, n in enumerate(names)
    )
    args = ", ".join(f"reinterpret_cast<const {ctype(n)}*>({n}_v.data())" for n in names)
    j = len(names)
    return f"""
namespace v{i} {{
template <int Dk, int L, int P, typename YT, int K, int W>
void kernel({", ".join(params)}) {{
{cuda.BACKEND.kernel_source("fused", mask, True, True, norm)}
}}
}}  // namespace v{i}

void run_{i}(char** argv) {{
{reads}
  const int B = std::stoi(argv[{j}]), n_ch = std::stoi(argv[{j + 1}]);
  const int Hv = std::stoi(argv[{j + 2}]), Dv = std::stoi(argv[{j + 3}]);
  const unsigned groups = std::stoi(argv[{j + 4}]);
  const int qkv_shape[2] = {{B, n_ch}}, a_shape[2] = {{B, Hv}};
  const int state_in_shape[4] = {{B, Hv, Dv, {Dk}}};
  std::vector<{yt}> y(size_t(B) * Hv * Dv, {yt}(NAN));
  std::vector<float> s(size_t(B) * Hv * Dv * {Dk}, NAN);
  std::vector<{yt}> cs(size_t(B) * {K - 1} * n_ch, {yt}(NAN));
  run_grid({{unsigned(B * Hv), groups / {W}, 1}}, {W}, [&] {{
    v{i}::kernel<{Dk}, {L}, 0, {yt}, {K}, {W}>({args}, qkv_shape, a_shape, state_in_shape,
        y.data(), s.data(), cs.data());
  }});
  std::ofstream(argv[{j + 5}], std::ios::binary).write((char*)y.data(), y.size() * sizeof(y[0]));
  std::ofstream(argv[{j + 6}], std::ios::binary).write((char*)s.data(), s.size() * 4);
  std::ofstream(argv[{j + 7}], std::ios::binary).write((char*)cs.data(), cs.size() * sizeof(cs[0]));
}}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    """One executable holding every instantiation (one compile): `program I FILES... DIMS...`."""
    runners = "".join(_runner(i, *inst) for i, inst in enumerate(INSTANCES))
    text = runner_program(runners, len(INSTANCES))
    return compile_emulated(text, tmp_path_factory.mktemp("decode_kernel_body"), timeout=900)


def _to_file(x: mx.array, path: Path, as_bf16: bool) -> str:
    if x.dtype == mx.bool_:
        path.write_bytes(np.asarray(x).astype(bool).tobytes())
    elif as_bf16:
        path.write_bytes(np.asarray(x.astype(mx.bfloat16).view(mx.uint16)).tobytes())
    else:
        path.write_bytes(np.asarray(x.astype(mx.float32)).tobytes())
    return str(path)


def _from_file(path: Path, shape, bf16: bool) -> np.ndarray:
    if not bf16:
        return np.fromfile(path, np.float32).reshape(shape)
    bits = np.fromfile(path, np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)


def run_emulated(program, tmp_path, x, mask, dims, L, W, dtype, norm=None):
    """The conv decode body on the emulator; returns (y, state, conv state) as fp32 arrays.
    norm: (z, norm_w, eps) for the gated-norm variant (L, W then as launch.norm_layout)."""
    Hk, Dk, Hv, Dv = dims
    B, C = x["qkv"].shape
    K = x["conv_w"].shape[1]
    inst = INSTANCES.index((mask is not None, Dk, L, dtype, K, W, norm is not None))
    inputs = dict(x, state_in=x["state"], mask=mask)
    if norm is not None:
        inputs.update(z=norm[0], norm_w=norm[1], norm_eps=mx.array([norm[2]]))
    bf16 = dtype == mx.bfloat16
    paths = [
        _to_file(inputs[n], tmp_path / f"{n}.bin", bf16 and n in ACT)
        for n in source.input_names("fused", mask is not None, conv=True, norm=norm is not None)
    ]
    groups = -(-Dv // (32 // L))  # row groups, rounded up to whole threadgroups as launch.py
    groups = -(-groups // min(W, groups)) * min(W, groups)
    assert norm is None or groups == W  # the gated norm: one threadgroup a head
    out = [tmp_path / f"{n}.bin" for n in ("y", "s", "cs")]
    subprocess.run(
        [str(program), str(inst), *paths, *map(str, (B, C, Hv, Dv, groups)), *map(str, out)],
        check=True,
        timeout=600,
    )
    y = _from_file(out[0], (B, Hv, Dv), bf16)
    s = _from_file(out[1], (B, Hv, Dv, Dk), False)
    cs = _from_file(out[2], (B, K - 1, C), bf16)
    return y, s, cs


def _kw(dims):
    Hk, Dk, Hv, Dv = dims
    return dict(num_k_heads=Hk, head_k_dim=Dk, num_v_heads=Hv, head_v_dim=Dv)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Hk{}Hv{}Dk{}Dv{}L{}W{}".format(*s))
def test_conv_decode_body_on_cpu_matches_numpy_and_ref(shape, masked, dtype, program, tmp_path):
    B, Hk, Hv, Dk, Dv, L, W = shape
    dims = (Hk, Dk, Hv, Dv)
    x = make_decode_inputs(B, Hk, Hv, Dk, Dv, dtype=dtype, seed=B + Hv)
    mask = mx.array([b % 2 == 0 for b in range(B)]) if masked else None
    y, s, cs = run_emulated(program, tmp_path, x, mask, dims, L, W, dtype)
    assert np.isfinite(y).all() and np.isfinite(s).all() and np.isfinite(cs).all()

    args = [x[n] for n in ("qkv", "conv_state", "conv_w", "a", "b", "A_log", "dt_bias", "state")]
    y_np, s_np, cs_np = gated_delta_decode_np(*args, mask, Hk=Hk, Dk=Dk, Hv=Hv, Dv=Dv)
    y_ref, s_ref, cs_ref = gated_delta_decode(*args, mask=mask, backend="ref", **_kw(dims))
    # The conv state is a copy: exact.
    assert np.array_equal(cs, np.asarray(cs_ref.astype(mx.float32)))
    assert np.array_equal(cs, cs_np.astype(np.float32)) or dtype == mx.bfloat16
    # Against float64: the dtype's tolerance; against ref (same roundings): fp32's, times 10 for
    # bf16 where one rounding step of q or k may differ.
    assert rel_err(y, y_np) < RTOL[dtype]
    assert rel_err(s, s_np) < RTOL[dtype]
    tight = RTOL[mx.float32] * (1 if dtype == mx.float32 else 10)
    assert rel_err(s, np.asarray(s_ref)) < tight
    assert rel_err(y, np.asarray(y_ref.astype(mx.float32))) < (
        tight if dtype == mx.float32 else RTOL[dtype] / 4
    )
    if masked:
        assert not np.any(y[1::2])
        assert np.array_equal(s[1::2], np.asarray(x["state"])[1::2])


# (B, Hk, Hv, Dk, Dv): the gated-norm variant at launch.norm_layout's layout (4 lanes; 16 warps
# at Dv = 128, 2 at Dv = 12: a partial warp).
NORM_SHAPES = [(1, 1, 1, 128, 128), (3, 2, 4, 32, 12)]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "B{}Hk{}Hv{}Dk{}Dv{}".format(*s))
def test_conv_decode_norm_body_on_cpu_matches_ref(shape, masked, dtype, program, tmp_path):
    """With the gated norm in the kernel: y against `ref` (the same step, then the layer's gated
    norm as mx ops) and float64; the states as without the norm."""
    from qwen35_mlx.kernels.gated_delta.launch import norm_layout

    B, Hk, Hv, Dk, Dv = shape
    dims = (Hk, Dk, Hv, Dv)
    L, W = norm_layout(Dk, Dv)
    x = make_decode_inputs(B, Hk, Hv, Dk, Dv, dtype=dtype, seed=3 * B + Hv)
    kz, kw = mx.random.split(mx.random.key(B + 11))
    z = (2 * mx.random.normal((B, Hv * Dv), key=kz)).astype(dtype)
    w = (1 + 0.3 * mx.random.normal((Dv,), key=kw)).astype(dtype)
    eps = 1e-6
    mask = mx.array([b % 2 == 0 for b in range(B)]) if masked else None
    y, s, cs = run_emulated(program, tmp_path, x, mask, dims, L, W, dtype, (z, w, eps))
    assert np.isfinite(y).all() and np.isfinite(s).all() and np.isfinite(cs).all()

    args = [x[n] for n in ("qkv", "conv_state", "conv_w", "a", "b", "A_log", "dt_bias", "state")]
    kw_ = dict(_kw(dims), mask=mask, backend="ref")
    y_ref, s_ref, cs_ref = gated_delta_decode(*args, z=z, norm_weight=w, norm_eps=eps, **kw_)
    y0, _, _ = gated_delta_decode(*args, **kw_)  # without the norm
    assert not np.allclose(np.asarray(y_ref.astype(mx.float32)), np.asarray(y0.astype(mx.float32)))
    assert np.array_equal(cs, np.asarray(cs_ref.astype(mx.float32)))
    tight = RTOL[mx.float32] * (1 if dtype == mx.float32 else 10)
    assert rel_err(s, np.asarray(s_ref)) < tight
    assert rel_err(y, np.asarray(y_ref.astype(mx.float32))) < (
        tight if dtype == mx.float32 else RTOL[dtype] / 4
    )
    # float64: the step, then norm(y) * w * silu(z).
    y_np, _, _ = gated_delta_decode_np(*args, mask, Hk=Hk, Dk=Dk, Hv=Hv, Dv=Dv)
    zz = np.asarray(z.astype(mx.float32), np.float64).reshape(B, Hv, Dv)
    ww = np.asarray(w.astype(mx.float32), np.float64)
    r = 1 / np.sqrt((y_np**2).mean(-1, keepdims=True) + eps)
    want = y_np * r * ww * zz / (1 + np.exp(-zz))
    assert rel_err(y, want) < RTOL[dtype]
    if masked:
        assert not np.any(y[1::2])


# --- The packed T-token variant (`gated_delta_decode_packed`'s kernel): T = 1..8 tokens a row,
# read in place from the fused in-projection [B * T, qkv | z | b | a], the gated norm per token
# and the (conv, recurrent) state after every token.

# (T, mask, dtype, Dk, W): Dk = 32 at W = 2 (Dv = 12: a partial warp) for every T, masked, in
# bf16; fp32 and no mask at a few T; Dk = Dv = 128 (the 0.8B layer: launch.norm_layout gives 16
# warps); W = 4 (Dv = 32, Hv = Hk).
PACKED_INSTANCES = (
    [(T, True, mx.bfloat16, 32, 2) for T in range(1, 9)]
    + [(T, False, mx.float32, 32, 2) for T in (2, 5)]
    + [(2, True, dt, 128, 16) for dt in (mx.float32, mx.bfloat16)]
    + [(3, False, mx.bfloat16, 32, 4)]
)


def _packed_runner(i: int, T: int, mask: bool, dtype, Dk: int, W: int, K: int = 4) -> str:
    names = source.input_names("fused", mask, conv=True, norm=True, packed=True)
    yt = CTYPES[dtype]
    act = ("proj", "conv_state", "conv_w", "norm_w")

    def ctype(n):
        return "bool" if n == "mask" else (yt if n in act else "float")

    params = [f"const {ctype(n)}* {n}" for n in names]
    params += ["const int* proj_shape", "const int* state_in_shape"]
    params += ["YT* y", "float* state_out", "YT* conv_state_out"]
    if T > 1:
        params += ["float* state_tok", "YT* conv_tok"]
    reads = "\n".join(
        f"  const std::vector<char> {n}_v = read(argv[{j}]);" for j, n in enumerate(names)
    )
    args = ", ".join(f"reinterpret_cast<const {ctype(n)}*>({n}_v.data())" for n in names)
    j = len(names)
    outs = "y.data(), s.data(), cs.data()" + (", st.data(), ct.data()" if T > 1 else "")
    body = cuda.BACKEND.kernel_source("fused", mask, True, True, True, T, True)
    return f"""
namespace p{i} {{
template <int Dk, int L, int P, typename YT, int K, int W>
void kernel({", ".join(params)}) {{
{body}
}}
}}  // namespace p{i}

void run_{i}(char** argv) {{
{reads}
  const int B = std::stoi(argv[{j}]), width = std::stoi(argv[{j + 1}]);
  const int Hv = std::stoi(argv[{j + 2}]), Dv = std::stoi(argv[{j + 3}]);
  const int n_ch = std::stoi(argv[{j + 4}]);
  const unsigned groups = std::stoi(argv[{j + 5}]);
  const int proj_shape[2] = {{B * {T}, width}};
  const int state_in_shape[4] = {{B, Hv, Dv, {Dk}}};
  const size_t S = size_t(B) * Hv * Dv * {Dk}, CS = size_t(B) * {K - 1} * n_ch;
  std::vector<{yt}> y(size_t(B) * {T} * Hv * Dv, {yt}(NAN)), cs(CS, {yt}(NAN));
  std::vector<{yt}> ct(CS * {T - 1}, {yt}(NAN));
  std::vector<float> s(S, NAN), st(S * {T - 1}, NAN);
  run_grid({{unsigned(B * Hv), groups / {W}, 1}}, {W}, [&] {{
    p{i}::kernel<{Dk}, 4, 0, {yt}, {K}, {W}>({args}, proj_shape, state_in_shape, {outs});
  }});
  dump(argv[{j + 6}], y);
  dump(argv[{j + 7}], s);
  dump(argv[{j + 8}], cs);
  dump(argv[{j + 9}], st);
  dump(argv[{j + 10}], ct);
}}
"""


DUMP = """
template <typename X>
void dump(const char* path, const std::vector<X>& x) {
  std::ofstream(path, std::ios::binary).write((const char*)x.data(), x.size() * sizeof(X));
}
"""


@pytest.fixture(scope="module")
def packed_program(tmp_path_factory) -> Path:
    runners = DUMP + "".join(_packed_runner(i, *v) for i, v in enumerate(PACKED_INSTANCES))
    text = runner_program(runners, len(PACKED_INSTANCES))
    return compile_emulated(text, tmp_path_factory.mktemp("packed_kernel_body"), timeout=900)


def make_packed_inputs(B, T, Hk, Hv, Dk, Dv, dtype, seed, K=4):
    """Inputs of the packed step: proj [B * T, qkv | z | b | a], conv_state, conv_w, A_log,
    dt_bias, state, norm_w, from `make_decode_inputs` (its qkv, a, b for token 0; more drawn)."""
    x = make_decode_inputs(B, Hk, Hv, Dk, Dv, K, dtype=dtype, seed=seed)
    C = x["qkv"].shape[1]
    kq, kz, ka, kw = mx.random.split(mx.random.key(seed + 101), 4)
    qkv = 2 * mx.random.normal((B * T, C), key=kq)
    z = 2 * mx.random.normal((B * T, Hv * Dv), key=kz)
    ab = mx.random.normal((B * T, 2 * Hv), key=ka)
    ab = ab * mx.array([1.0] * Hv + [3.0] * Hv)  # b, then a spread wider (strong decays too)
    proj = mx.concatenate([qkv, z, ab], axis=1).astype(dtype)
    norm_w = (1 + 0.3 * mx.random.normal((Dv,), key=kw)).astype(dtype)
    return dict(x, proj=proj, norm_w=norm_w)


def _token_masks(B: int, T: int) -> mx.array:
    """Row 0 all real, row 1 left-padded by min(2, T - 1), row 2 a hole in the middle."""
    m = np.ones((B, T), bool)
    if B > 1:
        m[1, : min(2, T - 1)] = False
    if B > 2 and T > 2:
        m[2, T // 2] = False
    return mx.array(m)


# (B, Hk, Hv, Dk, Dv) per instance's (Dk, W): W = 2 -> Dv = 12; W = 4 -> Dv = 32; W = 16 ->
# Dv = 128 (launch.norm_layout's warps).
PACKED_SHAPES = {2: (3, 2, 4, 32, 12), 4: (2, 2, 2, 32, 32), 16: (1, 1, 2, 128, 128)}


@pytest.mark.parametrize(
    "inst",
    PACKED_INSTANCES,
    ids=lambda v: "T{}-{}-{}-Dk{}-W{}".format(
        v[0], "mask" if v[1] else "nomask", "bf16" if v[2] == mx.bfloat16 else "fp32", *v[3:]
    ),
)
def test_packed_tokens_body_on_cpu_matches_numpy_and_ref(inst, packed_program, tmp_path):
    """Every output of the T-token kernel: y of every token (normed), the recurrent and conv
    states after every token, against float64 and against `ref` (one `gated_delta_decode` a
    token, the ops of the CPU path)."""
    from qwen35_mlx.kernels.gated_delta import gated_delta_decode_packed

    T, masked, dtype, Dk, W = inst
    B, Hk, Hv, _, Dv = PACKED_SHAPES[W]
    dims = (Hk, Dk, Hv, Dv)
    K, eps = 4, 1e-6
    x = make_packed_inputs(B, T, Hk, Hv, Dk, Dv, dtype, seed=7 * T + W)
    mask = _token_masks(B, T) if masked else None
    C = 2 * Hk * Dk + Hv * Dv
    inputs = dict(x, state_in=x["state"], mask=mask, norm_eps=mx.array([eps]))
    bf16 = dtype == mx.bfloat16
    names = source.input_names("fused", masked, conv=True, norm=True, packed=True)
    act = ("proj", "conv_state", "conv_w", "norm_w")
    paths = [_to_file(inputs[n], tmp_path / f"{n}.bin", bf16 and n in act) for n in names]
    out = [tmp_path / f"{n}.bin" for n in ("y", "s", "cs", "st", "ct")]
    dimsv = (B, x["proj"].shape[1], Hv, Dv, C, W)
    subprocess.run(
        [str(packed_program), str(PACKED_INSTANCES.index(inst)), *paths, *map(str, dimsv)]
        + [str(o) for o in out],
        check=True,
        timeout=600,
    )
    y = _from_file(out[0], (B, T, Hv, Dv), bf16)
    s = _from_file(out[1], (B, Hv, Dv, Dk), False)
    cs = _from_file(out[2], (B, K - 1, C), bf16)
    st = _from_file(out[3], (T - 1, B, Hv, Dv, Dk), False)
    ct = _from_file(out[4], (T - 1, B, K - 1, C), bf16)
    states, convs = [*st, s], [*ct, cs]
    for a in (y, *states, *convs):
        assert np.isfinite(a).all()

    y_np, s_np, c_np = packed_np(x, mask, T, dims, eps)
    kw = dict(_kw(dims), tokens=T, mask=mask, norm_eps=eps, backend="ref")
    args = [x[n] for n in ("proj", "conv_state", "conv_w", "A_log", "dt_bias", "state", "norm_w")]
    y_ref, _, _, per_token = gated_delta_decode_packed(*args, **kw)
    per_token = per_token or [(None, None)]
    tight = RTOL[mx.float32] * (1 if dtype == mx.float32 else 10)
    assert rel_err(y, y_np) < RTOL[dtype]
    y_ref = np.asarray(y_ref.astype(mx.float32)).reshape(B, T, Hv, Dv)
    assert rel_err(y, y_ref) < (tight if dtype == mx.float32 else RTOL[dtype] / 4)
    for t in range(T):
        assert rel_err(states[t], s_np[t]) < RTOL[dtype], t
        assert np.array_equal(convs[t], c_np[t].astype(np.float32)) or bf16, t
        if T > 1:
            c_ref, s_ref = per_token[t]
            assert np.array_equal(convs[t], np.asarray(c_ref.astype(mx.float32))), t
            assert rel_err(states[t], np.asarray(s_ref)) < tight, t
    if masked:
        m = np.asarray(mask)
        assert not np.any(y[~m])
        # A padded token leaves the recurrent state as it was.
        before = [np.asarray(x["state"])] + states[:-1]
        for b, t in zip(*np.nonzero(~m), strict=True):
            assert np.array_equal(states[t][b], before[t][b]), (b, t)


# --- Session 16's one GPU failure (test_gpu_decode_tokens.py, T = 1, masked, bf16, B1 Hk16 Hv16
# Dk128 Dv128: y 0.197 off MLX's reference once). The emulator runs blocks one after another,
# each block's threadgroup arrays NaN at its start: a block that reads what another writes, or
# two that write one address, would give outputs that change with the order the blocks run in
# (GD_BLOCK_ORDER), which on a GPU is any; a threadgroup read before its write would give NaN.

# (T, mask, dtype, Dk, W): the failing variant and its unmasked twin.
FAILED_INSTANCES = [(1, True, mx.bfloat16, 128, 16), (1, False, mx.bfloat16, 128, 16)]
FAILED_SHAPE = (1, 16, 16, 128, 128)  # (B, Hk, Hv, Dk, Dv)
BLOCK_ORDERS = ("", "reverse", "shuffle:1", "shuffle:2")


def _failed_program(tmp: Path, sanitize: str | None = None) -> Path:
    runners = DUMP + "".join(_packed_runner(i, *v) for i, v in enumerate(FAILED_INSTANCES))
    text = runner_program(runners, len(FAILED_INSTANCES))
    return compile_emulated(text, tmp, timeout=900, sanitize=sanitize)


@pytest.fixture(scope="module")
def failed_program(tmp_path_factory) -> Path:
    return _failed_program(tmp_path_factory.mktemp("packed_failed_case"))


def _run_failed(program: Path, tmp: Path, x, masked: bool, order: str = "") -> list[np.ndarray]:
    """The emulated packed kernel (T = 1) at FAILED_SHAPE on x, blocks in `order`: [y, state,
    conv state] as fp32 arrays (y [B, Hv * Dv]); fails with the program's stderr (a sanitizer's
    report among it) if it exits nonzero or writes to stderr."""
    B, Hk, Hv, Dk, Dv = FAILED_SHAPE
    C = 2 * Hk * Dk + Hv * Dv
    mask = mx.array(np.ones((B, 1), bool)) if masked else None
    inputs = dict(x, state_in=x["state"], mask=mask, norm_eps=mx.array([1e-6]))
    names = source.input_names("fused", masked, conv=True, norm=True, packed=True)
    act = ("proj", "conv_state", "conv_w", "norm_w")
    paths = [_to_file(inputs[n], tmp / f"{n}.bin", n in act) for n in names]
    out = [tmp / f"{n}.out" for n in ("y", "s", "cs", "st", "ct")]
    inst = FAILED_INSTANCES.index((1, masked, mx.bfloat16, Dk, 16))
    dims = (B, x["proj"].shape[1], Hv, Dv, C, 16)
    run = subprocess.run(
        [str(program), str(inst), *paths, *map(str, dims), *map(str, out)],
        env={**os.environ, "GD_BLOCK_ORDER": order},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr[-4000:]
    return [
        _from_file(out[0], (B, Hv * Dv), True),
        _from_file(out[1], (B, Hv, Dv, Dk), False),
        _from_file(out[2], (B, 3, C), True),
    ]


def _failed_inputs():
    """The GPU test's own inputs of the failing case (its `inputs`, seed T + B = 2)."""
    from tests.kernels.test_gpu_decode_tokens import inputs

    B, Hk, Hv, Dk, Dv = FAILED_SHAPE
    return inputs(B, 1, Hk, Hv, Dk, Dv, mx.bfloat16, seed=2)


def test_packed_failed_case_same_in_any_block_order(failed_program, tmp_path):
    """The failing case's kernel body gives the same bits whatever order its 16 blocks run in,
    masked (an all-True mask) and unmasked alike, within bf16's tolerance of float64 and close to
    `ref` (the same roundings)."""
    from qwen35_mlx.kernels.gated_delta import gated_delta_decode_packed

    B, Hk, Hv, Dk, Dv = FAILED_SHAPE
    x = _failed_inputs()
    runs = {
        (m, o): _run_failed(failed_program, tmp_path, x, m, o)
        for m in (True, False)
        for o in BLOCK_ORDERS
    }
    first = runs[(True, "")]
    for a in first:
        assert np.isfinite(a).all()
    for key, outs in runs.items():
        for a, b in zip(outs, first, strict=True):
            assert a.tobytes() == b.tobytes(), key
    dims = (Hk, Dk, Hv, Dv)
    y_np, s_np, c_np = packed_np(x, None, 1, dims, 1e-6)
    names = ("proj", "conv_state", "conv_w", "A_log", "dt_bias", "state", "norm_w")
    kw = dict(_kw(dims), tokens=1, norm_eps=1e-6, backend="ref")
    y_ref, s_ref, c_ref, _ = gated_delta_decode_packed(*[x[n] for n in names], **kw)
    y, s, cs = first
    assert rel_err(y, y_np.reshape(y.shape)) < RTOL[mx.bfloat16]
    assert rel_err(s, s_np[0]) < RTOL[mx.bfloat16]
    assert np.array_equal(cs, c_np[0].astype(np.float32))
    assert rel_err(y, np.asarray(y_ref.astype(mx.float32))) < RTOL[mx.bfloat16] / 4
    assert rel_err(s, np.asarray(s_ref)) < RTOL[mx.float32] * 10
    assert np.array_equal(cs, np.asarray(c_ref.astype(mx.float32)))


# ThreadSanitizer in CI (a missing barrier inside a block); AddressSanitizer and UBSan (a read or
# write outside the exact-size inputs and outputs) with -m slow.
@pytest.mark.parametrize("sanitize", ["thread", pytest.param("address", marks=pytest.mark.slow)])
def test_packed_failed_case_clean_under_sanitizers(tmp_path, sanitize):
    (tmp_path / "build").mkdir()
    program = _failed_program(tmp_path / "build", sanitize)
    x = _failed_inputs()
    want = _run_failed(program, tmp_path, x, False)
    got = _run_failed(program, tmp_path, x, True, "reverse")
    for a, b in zip(got, want, strict=True):
        assert a.tobytes() == b.tobytes()


# Planted faults the checks above must see: y reading the previous head's y (another block's
# output; NaN until that block has run), and the gated norm reading a partial sum no warp wrote.
PLANTS = {
    "block_reads_another": (
        "        y[vy0 + size_t(t) * vy_step] = static_cast<YT>(out);",
        "        y[vy0 + size_t(t) * vy_step] = static_cast<YT>(\n"
        "            out + (hv > 0 ? 1e-3f * static_cast<float>(y[vy0 - Dv]) : 0.0f));",
    ),
    "threadgroup_read_unwritten": (
        "          ssq += norm_tg[w];",
        "          ssq += norm_tg[w] + (w == 0 ? 0.0f * norm_tg[W] : 0.0f);",
    ),
}


@pytest.mark.parametrize(
    "plant",
    ["block_reads_another", pytest.param("threadgroup_read_unwritten", marks=pytest.mark.slow)],
)
def test_packed_failed_case_checks_can_fail(tmp_path, monkeypatch, plant):
    """A block reading another's output gives finite, plausible values in the default order and
    NaN in reverse (so only comparing orders finds it); an unwritten threadgroup slot reads NaN
    (before session 16 the decode bodies' gd_threadgroup arrays were not poisoned: a zero)."""
    old, new = PLANTS[plant]
    assert source.BODY.count(old) == 1
    monkeypatch.setattr(source, "BODY", source.BODY.replace(old, new))
    (tmp_path / "build").mkdir()
    program = _failed_program(tmp_path / "build")
    x = _failed_inputs()
    y, _, _ = _run_failed(program, tmp_path, x, True)
    y_rev, _, _ = _run_failed(program, tmp_path, x, True, "reverse")
    if plant == "block_reads_another":
        assert np.isfinite(y).all() and not np.isfinite(y_rev).all()
    else:
        assert not np.isfinite(y).any() and not np.isfinite(y_rev).any()
