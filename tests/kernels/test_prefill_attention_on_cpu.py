"""The prefill attention kernel (`kernels/attention/prefill_source.py`), run on the CPU by the
lane emulator against the float64 NumPy attention (tests/kernels/attention_np.py).

The CUDA source (prologue + body) is wrapped in a C++ function with the parameters MLX
generates and run by tests/kernels/lane_emulator.h, every thread of a threadgroup together (the
tile layer with CUDA's fragment layout, threadgroup memory poisoned with NaN, copies as the
stubs'). The output starts as NaN, so an element the kernel fails to write shows. Covered: both
backends' tiles (CUDA's BK 32 / DS 64, Metal's BK 16 / DS 16), D 64 and 256, T 1, 17, 64, 130
with S = T and S > T, GQA ratios 1, 2 and 4, no mask, causal, a bool mask with left padding
(per row [B, 1, T, S] and broadcast [1, 1, 1, S]), mask and causal together, bf16 and fp16, and
a row that sees no key (0).

Tolerance (not a guess): with q, k, v exact in their dtype, the kernel's only rounding of note
is that of the softmax weights p to the dtype (unit roundoff u: 2^-8 bf16, 2^-11 fp16) before
P V, and the output's. Weights p_j (1 + d_j), |d_j| <= u, move the weighted mean
o = sum p v / sum p by at most u / (1 - u) * 2 max_j |v_j| (numerator and denominator use the
same rounded weights); the output's rounding adds u |o|. The fp32 scores, exponentials and sums
add relative errors near 1e-6. So |o - o64| <= 1.05 u (2 vmax + |o64|) + 1e-5 vmax, vmax the
largest |v[b, kv head, j, d]| over the keys of that column.
"""

import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.attention import prefill
from qwen35_mlx.kernels.attention import prefill_source as ps
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

CTYPES = {mx.bfloat16: "bf16", mx.float16: "_Float16"}
U = {mx.bfloat16: 2.0**-8, mx.float16: 2.0**-11}
CUDA_TILES, METAL_TILES = prefill.TILES["cuda"], prefill.TILES["metal"]
CUDA_MASK_TILES, V1_TILES = prefill.MASK_TILES["cuda"], prefill.TILES_V1["cuda"]
# (mask, causal, D, (BK, DS, W), dtype, body version, ring slots or None: the tiles' backend's)
# version 2 with CUDA's tiles (BK 32), its bool-mask tiles (BK 16) and Metal's, also a mask at
# BK 32, no mask at BK 16, 8 warps and DS 128 with a ring of 3 (the bench's tiles_); version 1
# (kept for A/B timings) with its own; version 3 with CUDA's tiles (whole rows a slice, a ring of
# 4 whose slots rotate from block to block), Metal's, 8 warps (the query rows staged 16 columns
# at a time), BK 32 (2 score tiles), and a ring of 3
V3_256, V3_64 = prefill.tiles("cuda", 3, D=256), prefill.tiles("cuda", 3, D=64)
INSTANCES = [
    (False, True, 256, CUDA_TILES, mx.bfloat16, 2, None),
    (True, False, 256, CUDA_MASK_TILES, mx.bfloat16, 2, None),
    (False, False, 64, CUDA_TILES, mx.float16, 2, None),
    (False, True, 64, METAL_TILES, mx.float16, 2, None),
    (True, False, 64, METAL_TILES, mx.bfloat16, 2, None),
    (True, True, 64, CUDA_MASK_TILES, mx.bfloat16, 2, None),
    (False, True, 256, METAL_TILES, mx.bfloat16, 2, None),
    (True, True, 256, CUDA_TILES, mx.bfloat16, 2, None),
    (False, True, 256, CUDA_MASK_TILES, mx.bfloat16, 2, None),
    (True, True, 64, (16, 64, 8), mx.float16, 2, None),
    (False, True, 256, (32, 128, 4), mx.bfloat16, 2, 3),
    (False, True, 256, V1_TILES, mx.bfloat16, 1, None),
    (True, True, 64, V1_TILES, mx.float16, 1, None),
    (False, True, 256, V3_256, mx.bfloat16, 3, None),
    (True, False, 256, V3_256, mx.bfloat16, 3, None),
    (False, False, 64, V3_64, mx.float16, 3, None),
    (True, True, 64, V3_64, mx.bfloat16, 3, None),
    (False, True, 64, METAL_TILES, mx.float16, 3, prefill.RING_V3["metal"]),
    (True, True, 64, (16, 64, 8), mx.float16, 3, None),
    (False, True, 256, (32, 64, 4), mx.bfloat16, 3, None),
    (False, True, 64, (16, 64, 4), mx.bfloat16, 3, 3),
]


def _ring(tiles, version, ring) -> int:
    """The ring slots of an instance: its own, else its tiles' backend's for its version."""
    if ring is not None:
        return ring
    return prefill.rings("metal" if tiles == METAL_TILES else "cuda", version)


def _runner(i, mask, causal, D, tiles, dtype, version, ring) -> str:
    BK, DS, W = tiles
    t = CTYPES[dtype]
    ring = _ring(tiles, version, ring)
    names = ["q", "k", "v", "scale", "kv_len"] + (["mask"] if mask else [])
    ctype = {"q": t, "k": t, "v": t, "scale": "float", "kv_len": "int", "mask": "bool"}
    params = [f"const {ctype[n]}* {n}" for n in names]
    params += ["const int* q_shape", "const int* k_shape"]
    params += ["const int* mask_shape"] if mask else []
    params += [f"{t}* out"]
    reads = "\n".join(
        f"  const std::vector<char> {n}_v = read(argv[{j}]);" for j, n in enumerate(names)
    )
    args = ", ".join(f"reinterpret_cast<const {ctype[n]}*>({n}_v.data())" for n in names)
    j = len(names)
    return f"""
namespace k{i} {{
template <int D, int BK, int DS, int W, int MP, typename OT>
void kernel({", ".join(params)}) {{
{prefill.source("cuda", mask, causal, version, ring)}
}}
}}  // namespace k{i}

void run_{i}(char** argv) {{
{reads}
  const int B = std::stoi(argv[{j}]), Hq = std::stoi(argv[{j + 1}]);
  const int T = std::stoi(argv[{j + 2}]), Hkv = std::stoi(argv[{j + 3}]);
  const int SC = std::stoi(argv[{j + 4}]), Bm = std::stoi(argv[{j + 5}]);
  const int Tm = std::stoi(argv[{j + 6}]);
  const unsigned gx = std::stoi(argv[{j + 7}]);
  const char* out_path = argv[{j + 8}];
  const int S = *reinterpret_cast<const int*>(kv_len_v.data());
  const int q_shape[4] = {{B, Hq, T, {D}}}, k_shape[4] = {{B, Hkv, SC, {D}}};
  const int mask_shape[4] = {{Bm, 1, Tm, S}};
  (void)mask_shape;
  std::vector<{t}> out(size_t(B) * Hq * T * {D}, {t}(NAN));
  run_blocks({{gx, unsigned(B * Hkv), 1}}, {32 * W}, [&] {{
    k{i}::kernel<{D}, {BK}, {DS}, {W}, {prefill.MP}, {t}>({args}, q_shape, k_shape,
        {"mask_shape, " if mask else ""}out.data());
  }});
  std::ofstream(out_path, std::ios::binary).write((char*)out.data(), out.size() * sizeof(out[0]));
}}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    runners = "".join(_runner(i, *inst) for i, inst in enumerate(INSTANCES))
    text = runner_program(runners, len(INSTANCES))
    return compile_emulated(text, tmp_path_factory.mktemp("prefill_attention"), timeout=1500)


def run_emulated(program, tmp_path, inst, q, k, v, scale, mask=None, kv_len=None) -> np.ndarray:
    """The kernel on the emulator over the first `kv_len` keys of k, v (all if None); out
    [B, Hq, T, D] as fp32."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    i = INSTANCES.index(inst)
    ins = dict(q=q, k=k, v=v, scale=mx.array([scale], mx.float32))
    ins["kv_len"] = mx.array([S if kv_len is None else kv_len], mx.int32)
    if mask is not None:
        ins["mask"] = mask
    paths = [to_file(x, tmp_path / f"{n}.bin") for n, x in ins.items()]
    Bm, Tm = (mask.shape[0], mask.shape[2]) if mask is not None else (1, 1)
    gx = prefill.grid(B, Hq, Hkv, T, inst[3][2])[0]
    out = tmp_path / "out.bin"
    dims = (B, Hq, T, Hkv, S, Bm, Tm, gx)
    subprocess.run([str(program), str(i), *paths, *map(str, dims), str(out)],
                   check=True, timeout=900)  # fmt: skip
    if inst[4] == mx.bfloat16:
        o = (np.fromfile(out, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        o = np.fromfile(out, np.float16).astype(np.float32)
    return o.reshape(B, Hq, T, D)


def reference(q, k, v, scale, mask, causal) -> np.ndarray:
    """float64 [B, Hq, T, D] (0 where a row sees no key)."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    want = decode_attention_np(q, k, v, scale, S - T, mask, causal)
    return want.reshape(B, T, Hq, D).transpose(0, 2, 1, 3)


def check(o, want, v, dtype, Hq):
    """The argued bound (module docstring), element by element."""
    assert np.isfinite(o).all()
    vm = np.abs(np.asarray(v.astype(mx.float32), np.float64)).max(axis=2)  # [B, Hkv, D]
    vm = np.repeat(vm, Hq // vm.shape[1], axis=1)[:, :, None]  # [B, Hq, 1, D]
    u = U[dtype]
    tol = 1.05 * u * (2 * vm + np.abs(want)) + 1e-5 * vm
    bad = np.abs(o - want) > tol
    assert not bad.any(), (
        f"{bad.sum()} elements off; worst {np.abs(o - want).max():.3g}, tol {tol.min():.3g}"
    )


def left_pad_mask(B, T, S, pads, causal_too, broadcast=False) -> mx.array:
    """bool [B, 1, T, S]: key j >= the row's padding (and j <= S - T + t unless causal is the
    kernel's); broadcast: [1, 1, 1, S] (pads[0] only)."""
    pos = np.arange(S)
    if broadcast:
        return mx.array((pos >= pads[0])[None, None, None])
    m = pos[None, None] >= np.array(pads)[:, None, None]  # [B, 1, S]
    m = np.broadcast_to(m, (B, T, S)).copy()
    if not causal_too:
        m &= pos[None, None] <= (S - T + np.arange(T))[None, :, None]
    return mx.array(m[:, None])


# (B, Hq, Hkv, T, S): T 1 / 17 / 64 / 130, S = T and S > T, GQA 1, 2, 4.
CASES = [
    (1, 4, 1, 1, 1),
    (2, 2, 2, 17, 17),
    (1, 8, 2, 17, 50),
    (1, 4, 1, 64, 64),
    (2, 4, 4, 1, 37),
    (1, 2, 1, 130, 130),
    (1, 4, 4, 64, 131),
    (2, 8, 2, 130, 161),
]


def _pairs():
    out = []
    for i, inst in enumerate(INSTANCES):
        # D 256 on the emulator is slow: the 130-token cases only at D 64
        cases = CASES if inst[2] == 64 else [c for c in CASES if c[3] < 130]
        for j in range(3):
            out.append((inst, cases[(2 * i + j) % len(cases)]))
    return out


PAIRS = _pairs()


@pytest.mark.parametrize(
    "inst,case",
    PAIRS,
    ids=[f"{INSTANCES.index(i)}-B{c[0]}Hq{c[1]}Hkv{c[2]}T{c[3]}S{c[4]}" for i, c in PAIRS],
)
def test_prefill_body_matches_numpy(inst, case, program, tmp_path):
    mask_kind, causal, D, tiles, dtype, *_ = inst
    B, Hq, Hkv, T, S = case
    q, k, v, _ = make_attention_inputs(B, Hq, Hkv, T, S, D, dtype=dtype, seed=S + T)
    scale = D**-0.5
    mask = None
    if mask_kind:
        pads = [(3 * b) % (S // 2 + 1) for b in range(B)]
        mask = left_pad_mask(B, T, S, pads, causal, broadcast=(B == 1 and T % 2 == 1))
    o = run_emulated(program, tmp_path, inst, q, k, v, scale, mask)
    check(o, reference(q, k, v, scale, mask, causal), v, dtype, Hq)


@pytest.mark.parametrize("idx", [5, 16], ids=["v2", "v3"])
def test_row_seeing_no_key_is_zero(idx, program, tmp_path):
    """Left padding past a query's own position: its row sees no key and gives 0 (finite); the
    other rows match the reference."""
    inst = INSTANCES[idx]  # mask and causal, D 64, bf16
    B, Hq, Hkv, T, S = 2, 4, 2, 20, 20
    q, k, v, _ = make_attention_inputs(B, Hq, Hkv, T, S, 64, dtype=mx.bfloat16, seed=3)
    mask = left_pad_mask(B, T, S, [0, 7], causal_too=True)
    o = run_emulated(program, tmp_path, inst, q, k, v, 0.125, mask)
    assert not o[1, :, :7].any()  # tokens 0..6 of row 1 are padding: no key visible
    check(o, reference(q, k, v, 0.125, mask, True), v, mx.bfloat16, Hq)


@pytest.mark.parametrize("idx", [12, 5, 3, 16, 17], ids=["v1", "v2", "v2-metal", "v3", "v3-metal"])
def test_reads_the_first_kv_len_keys_of_a_buffer(idx, program, tmp_path):
    """A KV cache's buffers read in place: k, v [B, Hkv, SC, D] whose keys past kv_len are NaN
    give the output of the first kv_len keys alone (the mask, if any, has kv_len columns)."""
    inst = INSTANCES[idx]
    mask_kind, causal, D, _, dtype, *_ = inst
    B, Hq, Hkv, T, S, SC = 2, 4, 2, 20, 37, 64
    q, k, v, _ = make_attention_inputs(B, Hq, Hkv, T, S, D, dtype=dtype, seed=4)
    nan = mx.full((B, Hkv, SC - S, D), float("nan"), dtype)
    kb, vb = mx.concatenate([k, nan], axis=2), mx.concatenate([v, nan], axis=2)
    mask = left_pad_mask(B, T, S, [0, 5], causal) if mask_kind else None
    o = run_emulated(program, tmp_path, inst, q, kb, vb, D**-0.5, mask, kv_len=S)
    check(o, reference(q, k, v, D**-0.5, mask, causal), v, dtype, Hq)


def test_tolerance_can_fail(program, tmp_path):
    """The bound is tight enough to see a wrong key set: the kernel's causal output against a
    reference whose last query sees only the second half of the keys fails."""
    inst = INSTANCES[0]
    B, Hq, Hkv, T, S = 1, 4, 1, 17, 40
    q, k, v, _ = make_attention_inputs(B, Hq, Hkv, T, S, 256, dtype=mx.bfloat16, seed=1)
    o = run_emulated(program, tmp_path, inst, q, k, v, 1 / 16, None)
    want = reference(q, k, v, 1 / 16, None, True)
    check(o, want, v, mx.bfloat16, Hq)
    wrong = want.copy()
    h = S // 2
    wrong[:, :, -1] = reference(q[:, :, -1:], k[:, :, h:], v[:, :, h:], 1 / 16, None, True)[:, :, 0]
    with pytest.raises(AssertionError):
        check(o, wrong, v, mx.bfloat16, Hq)


def test_grid_covers_every_head_and_token():
    """grid(): head groups x query blocks x 16-token warps cover each (head, token) once."""
    for Hq, Hkv, T, W in [(8, 2, 130, 4), (4, 4, 17, 4), (8, 1, 1, 4), (6, 2, 64, 4)]:
        gx, gy = prefill.grid(1, Hq, Hkv, T, W)
        G = Hq // Hkv
        WG = np.gcd(G, W)
        TQ = 16 * (W // WG)
        assert gy == Hkv and gx == (G // WG) * (-(-T // TQ))


def test_variants_have_names():
    assert len({ps.name(m, c) for m, c in ps.variants()}) == 4


@pytest.mark.parametrize(
    "idx",
    [5, 3, 16, 17],
    ids=["cuda-tiles-mask-causal", "metal-tiles-causal", "v3-mask-causal", "v3-metal-tiles-causal"],
)
def test_no_race_under_thread_sanitizer(idx, tmp_path):
    """Every threadgroup-memory access is ordered by a barrier: the kernel built with
    ThreadSanitizer (helpers.compile_emulated) runs clean (a report exits nonzero) and still
    matches the reference."""
    inst = INSTANCES[idx]
    text = runner_program(_runner(idx, *inst).replace(f"run_{idx}(", "run_0("), 1)
    exe = compile_emulated(text, tmp_path, timeout=900, sanitize="thread")
    B, Hq, Hkv, T, S = 2, 4, 2, 20, 37
    q, k, v, _ = make_attention_inputs(B, Hq, Hkv, T, S, 64, dtype=inst[4], seed=2)
    mask = left_pad_mask(B, T, S, [0, 5], inst[1]) if inst[0] else None
    paths = [to_file(x, tmp_path / f"{n}.bin") for n, x in
             dict(q=q, k=k, v=v, scale=mx.array([0.125], mx.float32),
                  kv_len=mx.array([S], mx.int32)).items()]  # fmt: skip
    paths += [to_file(mask, tmp_path / "mask.bin")] if mask is not None else []
    Bm, Tm = (mask.shape[0], mask.shape[2]) if mask is not None else (1, 1)
    gx = prefill.grid(B, Hq, Hkv, T, inst[3][2])[0]
    out = tmp_path / "out.bin"
    dims = (B, Hq, T, Hkv, S, Bm, Tm, gx)
    run = subprocess.run([str(exe), "0", *paths, *map(str, dims), str(out)],
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    if inst[4] == mx.bfloat16:
        o = (np.fromfile(out, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        o = np.fromfile(out, np.float16).astype(np.float32)
    o = o.reshape(B, Hq, T, 64)
    check(o, reference(q, k, v, 0.125, mask, inst[1]), v, inst[4], Hq)


def rising_inputs(B, Hq, Hkv, T, S, D, dtype, seed, total=60.0):
    """q, k, v whose scores (at scale D^-1/2) rise along the keys by `total` over the S keys
    (about 60 / S a key: 0.6 at S 100, a range that keeps fp32 scores exact to ~1e-5): every
    query along one unit vector u (norm 16), key j along u with weight (total / S) j sqrt(D) /
    16, both plus N(0, 0.05^2) noise; v ~ N(0, 1)."""
    _, _, v, _ = make_attention_inputs(B, Hq, Hkv, T, S, D, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(D)
    u /= np.linalg.norm(u)
    qn = np.broadcast_to(16.0 * u, (B, Hq, T, D)) + 0.05 * rng.standard_normal((B, Hq, T, D))
    rise = (total / S) * np.arange(S) * np.sqrt(D) / 16.0
    kn = rise[None, None, :, None] * u + 0.05 * rng.standard_normal((B, Hkv, S, D))
    return mx.array(qn).astype(dtype), mx.array(kn).astype(dtype), v


@pytest.mark.parametrize("idx", [15, 16, 2], ids=["v3", "v3-mask-causal", "v2"])
def test_rising_scores_rescale_the_output(idx, program, tmp_path):
    """Scores that rise along the keys (each key's ~0.6 above the last: a 16-key block's maximum
    ~14 log2 units above the one before): every block moves the rows' maxima past version 3's
    lazy margin (AT_LAZY, 8), so the output's rescaling runs block after block; the weights
    of the early keys vanish against the late ones, as in float64."""
    inst = INSTANCES[idx]
    mask_kind, causal, D, tiles, dtype, *_ = inst
    B, Hq, Hkv, T, S = 1, 4, 2, 33, 100
    q, k, v = rising_inputs(B, Hq, Hkv, T, S, D, dtype, seed=5)
    scale = D**-0.5
    mask = left_pad_mask(B, T, S, [4], causal) if mask_kind else None
    o = run_emulated(program, tmp_path, inst, q, k, v, scale, mask)
    want = reference(q, k, v, scale, mask, causal)
    check(o, want, v, dtype, Hq)
    # the rise is as argued: a late query's last 16 keys span > 8 log2 units of score
    s = (
        np.asarray(q.astype(mx.float32), np.float64)[0, 0, -1]
        @ np.asarray(k.astype(mx.float32), np.float64)[0, 0, -16:].T
    )
    assert (s.max() - s.min()) * scale / np.log(2) > 8
