"""The shared GPU kernel body, run on the CPU: every structural variant (loop and decode; scalar,
per-key and fused gates; with and without a mask) against the float64 NumPy loop.

The body and the CUDA prologue (`cuda.BACKEND.kernel_source`, the same text the CUDA and, with
the Metal prologue, the Metal build compile) are wrapped in a C++ function with the parameters
MLX generates and run by tests/kernels/lane_emulator.h: one thread per lane, the 32 lanes of a
warp in lockstep at each shuffle. Outputs start as NaN, so an element the body fails to write
fails the comparison. The GPU tests run the same text on the device; this one runs in CI.
"""

import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qwen35_mlx.kernels.gated_delta import compute_gates, cuda, source
from tests.conftest import RTOL, rel_err
from tests.kernels.helpers import (
    GXX,
    compile_emulated,
    cpu_device,  # noqa: F401  (fixture)
    gated_delta_np,
    left_pad_mask,
    make_gate_inputs,
    make_inputs,
    runner_program,
)

pytestmark = [
    pytest.mark.skipif(GXX is None, reason="needs g++"),
    pytest.mark.usefixtures("cpu_device"),
]

# (B, T, Hk, Hv, Dk, Dv, lanes, warps): Hv = 2 Hk, Dv not a multiple of the rows per warp
# (a partial warp and a partial threadgroup), T over one chunk of 32 steps.
SHAPE = (2, 35, 1, 2, 32, 12, 8, 2)


def _runner(i: int, gate: str, mask: bool, decode: bool, Dk: int, L: int) -> str:
    """run_<i>(argv): variant i's kernel on the input files argv[0..], shapes after them."""
    names = source.input_names(gate, mask)
    params = [f"const {'bool' if n == 'mask' else 'float'}* {n}" for n in names]
    params += ["const int* q_shape", "const int* v_shape", "YT* y", "float* state_out"]
    reads = "\n".join(
        f"  const std::vector<char> {n}_v = read(argv[{j}]);" for j, n in enumerate(names)
    )
    args = ", ".join(
        f"reinterpret_cast<const {'bool' if n == 'mask' else 'float'}*>({n}_v.data())"
        for n in names
    )
    j = len(names)
    return f"""
namespace v{i} {{
template <int Dk, int L, int P, typename YT>
void kernel({", ".join(params)}) {{
{cuda.BACKEND.kernel_source(gate, mask, decode)}
}}
}}  // namespace v{i}

void run_{i}(char** argv) {{
{reads}
  int q_shape[4], v_shape[4];
  for (int i = 0; i < 4; ++i) q_shape[i] = std::stoi(argv[{j} + i]);
  for (int i = 0; i < 4; ++i) v_shape[i] = std::stoi(argv[{j + 4} + i]);
  const unsigned warps = std::stoi(argv[{j + 8}]), groups = std::stoi(argv[{j + 9}]);
  const int B = q_shape[0], T = q_shape[1], Hv = v_shape[2], Dv = v_shape[3];
  std::vector<float> y(size_t(B) * T * Hv * Dv, NAN), s(size_t(B) * Hv * Dv * {Dk}, NAN);
  run_grid({{unsigned(B * Hv), groups / warps, 1}}, warps, [&] {{
    v{i}::kernel<{Dk}, {L}, 0, float>({args}, q_shape, v_shape, y.data(), s.data());
  }});
  std::ofstream(argv[{j + 10}], std::ios::binary).write((char*)y.data(), y.size() * 4);
  std::ofstream(argv[{j + 11}], std::ios::binary).write((char*)s.data(), s.size() * 4);
}}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    """One executable holding every variant (one compile): `program I FILES... SHAPES...`."""
    Dk, L = SHAPE[4], SHAPE[6]
    variants = source.variants()
    runners = "".join(_runner(i, *v, Dk, L) for i, v in enumerate(variants))
    text = runner_program(runners, len(variants))
    return compile_emulated(text, tmp_path_factory.mktemp("kernel_body"), timeout=600)


@pytest.mark.parametrize("gate,mask,decode", source.variants())
def test_kernel_body_on_cpu_matches_numpy(gate, mask, decode, program, tmp_path):
    B, T, Hk, Hv, Dk, Dv, L, W = SHAPE
    T = 1 if decode else T
    q, k, v, g, beta, state = make_inputs(B, T, Hk, Hv, Dk, Dv, per_key=gate == "per_key")
    a, b, A_log, dt_bias = make_gate_inputs(B, T, Hv)
    if gate == "fused":
        g, beta = compute_gates(a, b, A_log, dt_bias)
    m = left_pad_mask(B, T, [0, 1] if decode else [0, 4]) if mask else None
    inputs = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "a": a, "b": b, "A_log": A_log}
    inputs |= {"dt_bias": dt_bias, "state_in": state, "mask": m}
    paths = []
    for n in source.input_names(gate, mask):
        p = tmp_path / f"{n}.bin"
        x = np.asarray(inputs[n]).astype(bool if n == "mask" else np.float32)
        p.write_bytes(x.tobytes())
        paths.append(str(p))
    rows = 32 // L
    groups = -(-Dv // rows)
    warps = min(W, groups)
    groups = -(-groups // warps) * warps
    dims = [B, T, Hk, Dk, B, T, Hv, Dv, warps, groups]
    out = [str(tmp_path / "y.bin"), str(tmp_path / "s.bin")]
    index = source.variants().index((gate, mask, decode))
    subprocess.run(
        [str(program), str(index), *paths, *map(str, dims), *out], check=True, timeout=300
    )
    y = np.fromfile(out[0], np.float32).reshape(B, T, Hv, Dv)
    s = np.fromfile(out[1], np.float32).reshape(B, Hv, Dv, Dk)
    y_np, s_np = gated_delta_np(q, k, v, g, beta, state, m)
    assert np.isfinite(y).all() and np.isfinite(s).all()
    assert rel_err(y, y_np) < RTOL[mx.float32]
    assert rel_err(s, s_np) < RTOL[mx.float32]
