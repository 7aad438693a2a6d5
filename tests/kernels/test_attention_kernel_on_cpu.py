"""The decode attention kernels (`kernels/attention/source.py`: split pass + combine), run on the
CPU by the lane emulator against the float64 NumPy oracle (tests/kernels/attention_np.py).

The CUDA sources (`cuda.BACKEND.partial_source` / `combine_source`: prologue + body) are wrapped
in C++ functions with the parameters MLX generates and run by tests/kernels/lane_emulator.h,
every thread of a block together (the warps meet in threadgroup memory behind barriers). The
partials start as NaN, so an element the split pass fails to write (of a split that holds keys)
poisons the result. Covered: T 1..8, GQA groups 1/2/4/8, key counts inside one split and across
several, a start before the buffer's end (a preallocated buffer), left padding, causal masks
inside the new tokens, a fully masked query row (0, finite), the gate on and off, fp32 and bf16,
D 64 and 256, and the bit-for-bit independence of the buffer's capacity.
"""

import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.attention import cuda, launch
from tests.kernels.attention_np import decode_attention_np, make_attention_inputs
from tests.kernels.helpers import (
    GXX,
    compile_emulated,
    cpu_device,  # noqa: F401  (fixture)
    runner_program,
    to_file,
)

pytestmark = [
    pytest.mark.skipif(GXX is None, reason="needs g++"),
    pytest.mark.usefixtures("cpu_device"),
]

CTYPES = {mx.float32: "float", mx.bfloat16: "bf16"}
# (mask, causal, D, R, S, W, U, dtype, gate): every variant, R 4 and 8 (U 4 and 2), splits of
# 16..64 keys, gate on and off, both dtypes; the last two at Qwen3.5's head_dim.
INSTANCES = [
    (False, False, 64, 4, 16, 4, 4, mx.float32, False),
    (False, False, 64, 8, 32, 4, 2, mx.bfloat16, True),
    (False, True, 64, 4, 16, 4, 4, mx.bfloat16, False),
    (False, True, 64, 8, 32, 4, 2, mx.float32, True),
    (True, False, 64, 4, 16, 4, 4, mx.float32, True),
    (True, False, 64, 8, 32, 4, 2, mx.bfloat16, False),
    (True, False, 64, 8, 16, 4, 2, mx.float32, False),
    (True, False, 256, 4, 64, 4, 4, mx.bfloat16, True),
    (False, False, 256, 8, 64, 4, 2, mx.float32, False),
]


def _runner(i, mask, causal, D, R, S, W, U, dtype, gate) -> str:
    t = CTYPES[dtype]
    names = ["q", "k", "v", "start", "scale"] + (["mask"] if mask else [])
    ctype = {"q": t, "k": t, "v": t, "start": "int", "scale": "float", "mask": "bool"}
    p_params = [f"const {ctype[n]}* {n}" for n in names]
    p_params += ["const int* q_shape", "const int* k_shape"]
    p_params += ["const int* mask_shape"] if mask else []
    p_params += ["float* part_acc", "float* part_ml"]
    c_params = ["const float* part_acc", "const float* part_ml", "const int* start"]
    c_params += [f"const {t}* gate", "const int GR"] if gate else []
    c_params += ["const int* part_ml_shape", f"{t}* out"]
    reads = "\n".join(
        f"  const std::vector<char> {n}_v = read(argv[{j}]);" for j, n in enumerate(names)
    )
    args = ", ".join(f"reinterpret_cast<const {ctype[n]}*>({n}_v.data())" for n in names)
    j = len(names)
    # The gate's row (GR, a template argument in the backends, a parameter here so that one
    # build takes every case): argv after the gate's file, else Hq * 2D ([B, T, Hq, 2D]).
    gate_read = (
        f"  const std::vector<char> gate_v = read(argv[{j + 8}]);\n"
        f"  const int GR = argv[{j + 9}] ? std::stoi(argv[{j + 9}]) : Hq * {2 * D};"
        if gate
        else ""
    )
    gate_arg = f"reinterpret_cast<const {t}*>(gate_v.data()), GR, " if gate else ""
    c_template = f"{D}, {S}, {t}" + (f", {2 * D}, {D}" if gate else "")
    c_tparams = "int D, int S, typename OT" + (", int GS, int GO" if gate else "")
    return f"""
namespace p{i} {{
template <int D, int R, int S, int W, int U>
void kernel({", ".join(p_params)}) {{
{cuda.BACKEND.partial_source(mask, causal)}
}}
}}  // namespace p{i}
namespace c{i} {{
template <{c_tparams}>
void kernel({", ".join(c_params)}) {{
{cuda.BACKEND.combine_source(gate)}
}}
}}  // namespace c{i}

void run_{i}(char** argv) {{
{reads}
  const int B = std::stoi(argv[{j}]), Hq = std::stoi(argv[{j + 1}]);
  const int T = std::stoi(argv[{j + 2}]), Hkv = std::stoi(argv[{j + 3}]);
  const int Ck = std::stoi(argv[{j + 4}]), Bm = std::stoi(argv[{j + 5}]);
  const int Cm = std::stoi(argv[{j + 6}]);
  const char* out_path = argv[{j + 7}];
{gate_read}
  const int q_shape[4] = {{B, Hq, T, {D}}}, k_shape[4] = {{B, Hkv, Ck, {D}}};
  const int mask_shape[4] = {{Bm, 1, T, Cm}};
  (void)mask_shape;
  const int NS = (Ck + {S} - 1) / {S}, G = Hq / Hkv, NC = (G * T + {R} - 1) / {R};
  std::vector<float> acc(size_t(B) * Hq * T * NS * {D}, NAN), ml(size_t(B) * Hq * T * NS * 2, NAN);
  run_grid({{unsigned(NS), unsigned(B * Hkv * NC), 1}}, {W}, [&] {{
    p{i}::kernel<{D}, {R}, {S}, {W}, {U}>({args}, q_shape, k_shape,
        {"mask_shape, " if mask else ""}acc.data(), ml.data());
  }});
  const int ml_shape[5] = {{B, Hq, T, NS, 2}};
  std::vector<{t}> out(size_t(B) * T * Hq * {D}, {t}(NAN));
  run_grid({{unsigned(B * Hq * T), 1, 1}}, {D // 32}, [&] {{
    c{i}::kernel<{c_template}>(acc.data(), ml.data(),
        reinterpret_cast<const int*>(start_v.data()), {gate_arg}ml_shape, out.data());
  }});
  std::ofstream(out_path, std::ios::binary).write((char*)out.data(), out.size() * sizeof(out[0]));
}}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    runners = "".join(_runner(i, *inst) for i, inst in enumerate(INSTANCES))
    text = runner_program(runners, len(INSTANCES))
    return compile_emulated(text, tmp_path_factory.mktemp("attention_kernel"), timeout=900)


def run_emulated(program, tmp_path, inst, q, k, v, scale, start, mask=None, gate=None, row=None):
    """Both kernels on the emulator; returns out [B, T, Hq * D] as fp32. gate [B, T, Hq, 2D],
    or rows of `row` elements a token (head h's gate at h 2D + D)."""
    B, Hq, T, D = q.shape
    Hkv, Ck = k.shape[1], k.shape[2]
    i = INSTANCES.index(inst)
    ins = dict(q=q, k=k, v=v, start=mx.array([start], mx.int32), scale=mx.array([scale]))
    if mask is not None:
        ins["mask"] = mask
    paths = [to_file(x, tmp_path / f"{n}.bin") for n, x in ins.items()]
    Bm, Cm = (mask.shape[0], mask.shape[3]) if mask is not None else (1, 1)
    out = tmp_path / "out.bin"
    extra = [to_file(gate, tmp_path / "gate.bin")] if gate is not None else []
    extra += [str(row)] if row is not None else []
    dims = (B, Hq, T, Hkv, Ck, Bm, Cm)
    subprocess.run([str(program), str(i), *paths, *map(str, dims), str(out), *extra],
                   check=True, timeout=600)  # fmt: skip
    if inst[7] == mx.bfloat16:
        bits = np.fromfile(out, np.uint16).astype(np.uint32) << 16
        o = bits.view(np.float32)
    else:
        o = np.fromfile(out, np.float32)
    return o.reshape(B, T, Hq * D)


TOL = {mx.float32: 2e-5, mx.bfloat16: 1e-2}


def _check(o, want, dtype):
    assert np.isfinite(o).all()
    scale = max(np.abs(want).max(), 1e-6)
    err = np.abs(o - want).max() / scale
    assert err < TOL[dtype], f"max error {err:.3g} relative to {scale:.3g}"


def _causal_mask(B, T, C, start, pads=None) -> mx.array:
    """static_causal_mask's [B or 1, 1, T, C]: pos <= start + t, and >= each row's padding."""
    pos = np.arange(C)
    m = pos[None] <= start + np.arange(T)[:, None]
    if pads is None:
        return mx.array(m[None, None])
    m = m[None] & (pos[None, None] >= np.array(pads)[:, None, None])
    return mx.array(m[:, None])


# (B, Hq, Hkv, T, C, start): one split, several, a partial last one, start before the end.
CASES = [
    (1, 4, 1, 1, 5, None),
    (2, 8, 2, 1, 70, None),
    (1, 8, 1, 2, 33, 20),
    (2, 2, 2, 3, 100, 90),
    (1, 16, 2, 4, 47, None),
    (1, 2, 1, 5, 64, 40),
    (2, 4, 4, 7, 29, None),
    (1, 8, 8, 8, 130, 100),
]


# Each instance (but the Qwen-shape one, tested below) against three of the cases, so that every
# case meets three variants (the emulator spawns a thread a lane: a few seconds a case).
PAIRS = [
    (inst, CASES[(3 * i + j) % len(CASES)])
    for i, inst in enumerate(INSTANCES)
    if i != 7
    for j in range(3)
]


@pytest.mark.parametrize(
    "inst,case",
    PAIRS,
    ids=[f"{INSTANCES.index(i)}-B{c[0]}Hq{c[1]}Hkv{c[2]}T{c[3]}C{c[4]}" for i, c in PAIRS],
)
def test_attention_body_matches_numpy(inst, case, program, tmp_path):
    mask_kind, causal, D, dtype, gated = inst[0], inst[1], inst[2], inst[7], inst[8]
    B, Hq, Hkv, T, C, start = case
    s = C - T if start is None else start
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, D, dtype=dtype, gate=gated, seed=C + T)
    scale = D**-0.5
    mask = None
    if mask_kind:  # left padding on odd rows, causal inside the new tokens
        pads = [(b % 2) * 3 for b in range(B)]
        mask = _causal_mask(B, T, C, s, pads if B > 1 else None)
    o = run_emulated(program, tmp_path, inst, q, k, v, scale, s, mask, g)
    want = decode_attention_np(q, k, v, scale, s, mask, causal, g, D if gated else 0)
    _check(o, want, dtype)


@pytest.mark.parametrize("T", [1, 4])
def test_qwen_head_dim_with_left_padding_and_gate(T, program, tmp_path):
    """D = 256, G = 4 (the 0.8B layer), bf16, gate, left-padded rows over several splits."""
    inst = INSTANCES[7]
    B, Hq, Hkv, C, s = 3, 8, 2, 150, 140
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, 256, dtype=mx.bfloat16, gate=True)
    mask = _causal_mask(B, T, C, s, [0, 5, 70])
    o = run_emulated(program, tmp_path, inst, q, k, v, 1 / 16, s, mask, g)
    _check(o, decode_attention_np(q, k, v, 1 / 16, s, mask, False, g, 256), mx.bfloat16)


@pytest.mark.parametrize("i,T", [(7, 2), (4, 3)])
def test_gate_read_in_place_from_the_fused_projection(i, T, program, tmp_path):
    """The gate as rows of the fused q|k|v output (a row of N = Hq 2D + 2 Hkv D a token, head h's
    gate at h 2D + D: `layers.GATE_IN_PLACE`): the same bits as the gate [B, T, Hq, 2D] passed
    dense, and the oracle's. The k|v columns hold large values, so a head read at the dense
    row's stride (Hq 2D) would show."""
    inst = INSTANCES[i]  # gated, masked: D 256 bf16 (the 0.8B layer), D 64 fp32
    D, dtype = inst[2], inst[7]
    B, Hq, Hkv, C, s = 2, 8, 2, 100, 90
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, D, dtype=dtype, gate=True, seed=3)
    kv = (50.0 * mx.random.normal((B, T, 2 * Hkv * D), key=mx.random.key(4))).astype(dtype)
    rows = mx.concatenate([g.reshape(B, T, Hq * 2 * D), kv], axis=-1)
    mask = _causal_mask(B, T, C, s, [0, 5])
    dense = run_emulated(program, tmp_path, inst, q, k, v, D**-0.5, s, mask, g)
    in_place = run_emulated(
        program, tmp_path, inst, q, k, v, D**-0.5, s, mask, rows, rows.shape[-1]
    )
    assert np.array_equal(dense, in_place)
    _check(in_place, decode_attention_np(q, k, v, D**-0.5, s, mask, False, g, D), dtype)


def test_fully_masked_row_is_zero_not_nan(program, tmp_path):
    """A query row that sees no key (a padded position: every key before its padding ends) gives
    0, finite; the other rows are unaffected."""
    inst = INSTANCES[4]  # mask, gate, fp32
    B, Hq, Hkv, T, C = 2, 4, 2, 2, 40
    q, k, v, g = make_attention_inputs(B, Hq, Hkv, T, C, 64, gate=True, seed=5)
    m = np.array(_causal_mask(B, T, C, C - T))
    m = np.broadcast_to(m, (B, 1, T, C)).copy()
    m[1, 0, 0, :] = False  # row 1, token 0: nothing visible
    mask = mx.array(m)
    o = run_emulated(program, tmp_path, inst, q, k, v, 0.125, C - T, mask, g)
    assert np.isfinite(o).all()
    assert not o[1, 0].any()
    want = decode_attention_np(q, k, v, 0.125, C - T, mask, False, g, 64)
    _check(o, want, mx.float32)


def test_capacity_does_not_change_a_bit(program, tmp_path):
    """The same keys in a larger buffer (a preallocated cache: garbage after the keys, more
    splits) give bit-identical outputs: split boundaries are positions, skipped keys do nothing."""
    inst = INSTANCES[5]  # mask, bf16, S = 32
    B, Hq, Hkv, T, n = 2, 8, 2, 3, 75
    q, k, v, _ = make_attention_inputs(B, Hq, Hkv, T, 200, 64, dtype=mx.bfloat16, seed=9)
    k = mx.concatenate([k[:, :, :n], mx.full((B, Hkv, 125, 64), 1e4, mx.bfloat16)], axis=2)
    v = mx.concatenate([v[:, :, :n], mx.full((B, Hkv, 125, 64), mx.nan, mx.bfloat16)], axis=2)
    s = n - T
    big = run_emulated(
        program, tmp_path, inst, q, k, v, 0.125, s, _causal_mask(B, T, 200, s, [0, 4])
    )
    kn, vn = k[:, :, :n], v[:, :, :n]
    small = run_emulated(
        program, tmp_path, inst, q, kn, vn, 0.125, s, _causal_mask(B, T, n, s, [0, 4])
    )
    assert np.isfinite(big).all()
    assert np.array_equal(big, small)


def test_launch_layout():
    """The host's geometry: R <= 8 rows, S a multiple of W * U, S independent of the keys."""
    for B, Hq, Hkv, T in [(1, 8, 2, 1), (32, 16, 4, 4), (1, 8, 1, 8), (256, 8, 2, 2)]:
        R, NC, S, W, U = launch.layout(B, Hq, Hkv, T)
        assert 1 <= R <= launch.MAX_ROWS and NC * R >= (Hq // Hkv) * T > (NC - 1) * R
        assert S % (W * U) == 0
