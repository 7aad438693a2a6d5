"""Type-check the Metal kernel sources with the host C++ compiler (no Apple GPU needed).

Each structural variant's Metal `header` + `source` is wrapped into a function with the
signature MLX's `mx.fast.metal_kernel` generates (same parameter names, types, template
parameters and Metal attributes, address spaces stubbed out), explicitly instantiated for a few
template arguments, and compiled with `g++ -fsyntax-only -std=c++17` against metal_stub.h.
A syntax or type error in the body or the Metal prologue fails here.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qwen35_mlx.kernels.gated_delta import metal, source

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="needs g++")
STUB = Path(__file__).with_name("metal_stub.h")

# The Metal attributes MLX scans `source` for, with their types (mlx/fast.cpp).
METAL_ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": "uint",
    "dispatch_simdgroups_per_threadgroup": "uint",
    "dispatch_threads_per_threadgroup": "uint3",
    "grid_origin": "uint3",
    "grid_size": "uint3",
    "quadgroup_index_in_threadgroup": "uint",
    "quadgroups_per_threadgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint",
    "simdgroups_per_threadgroup": "uint",
    "thread_execution_width": "uint",
    "thread_index_in_quadgroup": "uint",
    "thread_index_in_simdgroup": "uint",
    "thread_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
    "threadgroups_per_grid": "uint3",
    "threads_per_grid": "uint3",
    "threads_per_simdgroup": "uint",
    "threads_per_threadgroup": "uint3",
}

# Metal type names of the input dtypes (MLX's get_type_string).
IN_TYPES = {
    "q": "bfloat16_t",
    "k": "bfloat16_t",
    "v": "bfloat16_t",
    "g": "float",
    "beta": "float",
    "a": "bfloat16_t",
    "b": "bfloat16_t",
    "A_log": "float",
    "dt_bias": "float",
    "state_in": "float",
    "mask": "bool",
    "qkv": "bfloat16_t",
    "conv_state": "float",
    "conv_w": "bfloat16_t",
    "z": "bfloat16_t",
    "norm_w": "bfloat16_t",
    "norm_eps": "float",
    "proj": "bfloat16_t",
}
# (Dk, L, P, YT) instantiations: smallest and largest Dk, every lane count the host may pick,
# with and without prefetching.
INSTANTIATIONS = [
    (32, 4, 0, "bfloat16_t"),
    (128, 4, 8, "float16_t"),
    (128, 8, 0, "float"),
    (128, 16, 8, "bfloat16_t"),
    (128, 32, 8, "bfloat16_t"),
    (256, 8, 4, "bfloat16_t"),
    (96, 8, 8, "float"),
]
# The conv variant's (Dk, L, P, YT, K, W) instantiations.
CONV_INSTANTIATIONS = [
    (32, 4, 0, "bfloat16_t", 4, 1),
    (128, 16, 0, "bfloat16_t", 4, 2),
    (128, 8, 0, "float", 2, 8),
    (256, 32, 0, "float16_t", 8, 4),
]


def wrap(
    name: str, input_names: list[str], body: str, header: str, conv: bool = False, tokens=1
) -> str:
    """A translation unit shaped like MLX's generated Metal kernel for `body`."""
    params = []
    for i, n in enumerate(input_names):
        space = "device" if n not in ("A_log", "dt_bias", "norm_eps") else "constant"  # size < 8
        params.append(f"  const {space} {IN_TYPES[n]}* {n} /* buffer({i}) */")
        if f"{n}_shape" in body:
            params.append(f"  const constant int* {n}_shape")
        if f"{n}_strides" in body:
            params.append(f"  const constant size_t* {n}_strides")
        if f"{n}_ndim" in body:
            params.append(f"  const constant int& {n}_ndim")
    params.append("  device YT* y")
    params.append("  device float* state_out")
    if conv:
        params.append("  device YT* conv_state_out")
    if tokens > 1:
        params += ["  device float* state_tok", "  device YT* conv_tok"]
    params += [f"  {t} {a}" for a, t in METAL_ATTRIBUTES.items() if a in body]
    fn = f"custom_kernel_{name}"
    args = [", ".join(map(str, i)) for i in (CONV_INSTANTIATIONS if conv else INSTANTIATIONS)]
    inst = "\n".join(f"template decltype({fn}<{a}>) {fn}<{a}>;" for a in args)
    template = "int Dk, int L, int P, typename YT" + (", int K, int W" if conv else "")
    return (
        f'#include "{STUB}"\n{header}\n'
        f"template <{template}>\nvoid {fn}(\n" + ",\n".join(params) + ") {\n"
        f"{body}\n}}\n\n{inst}\n"
    )


def compile_errors(tu: str, tmp_path: Path) -> str:
    path = tmp_path / "kernel.cpp"
    path.write_text(tu)
    res = subprocess.run(
        [
            GXX,
            "-fsyntax-only",
            "-std=c++17",
            "-Wall",
            "-Wno-unknown-pragmas",
            "-Werror=return-type",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return "" if res.returncode == 0 else res.stderr + f"\n--- source ---\n{tu}"


@pytest.mark.parametrize("gate,mask,decode", source.variants())
def test_metal_source_compiles(gate, mask, decode, tmp_path):
    body = metal.BACKEND.kernel_source(gate, mask, decode)
    # The attributes the prologue reads must be named in `source` for MLX to declare them.
    for attr in ("thread_position_in_grid", "threadgroup_position_in_grid"):
        assert attr in body
    name = source.kernel_name(gate, mask, decode)
    tu = wrap(name, source.input_names(gate, mask), body, metal.HEADER)
    err = compile_errors(tu, tmp_path)
    assert not err, err


@pytest.mark.parametrize("norm", [False, True], ids=["", "norm"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_metal_conv_decode_source_compiles(mask, norm, tmp_path):
    """The conv decode variant (threadgroup memory, barrier, three outputs), with and without
    the gated norm (a second threadgroup array and barrier)."""
    body = metal.BACKEND.kernel_source("fused", mask, True, True, norm)
    for attr in ("thread_position_in_grid", "threadgroup_position_in_grid"):
        assert attr in body
    name = source.kernel_name("fused", mask, True, True, norm)
    names = source.input_names("fused", mask, conv=True, norm=norm)
    tu = wrap(name, names, body, metal.HEADER, conv=True)
    err = compile_errors(tu, tmp_path)
    assert not err, err


def test_metal_source_check_can_fail(tmp_path):
    """The harness catches a type error in a body (a Metal builtin the stub does not declare)."""
    body = metal.BACKEND.kernel_source("scalar", False).replace("gd_exp(", "metal::exp2(", 1)
    body += "\n  float4 bad = simd_shuffle_xor(s[0], 1u, 2u);\n"
    tu = wrap("broken", source.input_names("scalar", False), body, metal.HEADER)
    assert compile_errors(tu, tmp_path)


def preprocessed(text: str, tmp_path: Path) -> str:
    """text after the C preprocessor (the variant switches resolved), whitespace collapsed."""
    path = tmp_path / "body.cpp"
    path.write_text(text)
    res = subprocess.run(
        [GXX, "-E", "-P", "-x", "c++", str(path)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return " ".join(res.stdout.split())


@pytest.mark.parametrize("gate,mask,decode", source.variants())
def test_variant_switches_select_the_variant(gate, mask, decode, tmp_path):
    """Each variant's body, once its #defines are applied, reads only its own inputs and keeps
    the step loop's pipelined load and the gate broadcast only outside decode."""
    code = preprocessed(source.kernel_body(gate, mask, decode), tmp_path)
    reads = {
        name: re.search(rf"\b{name}\[", code) is not None
        for name in ("g", "beta", "a", "b", "A_log", "mask")
    }
    assert reads["mask"] == mask
    assert reads["g"] == (gate != "fused") and reads["beta"] == (gate != "fused")
    assert reads["a"] == reads["b"] == reads["A_log"] == (gate == "fused")
    assert ("g_nx" in code) == (gate == "per_key")
    assert ("constexpr int T = 1;" in code) == decode
    assert ("const int t_ld = t + 1 < T ? t + 1 : t;" in code) == (not decode)
    assert ("gd_shuffle(bl, j)" in code) == (not decode)
    assert "GD_" not in code and "gd_step_gate" not in code
    assert "qkv" not in code and "conv_state" not in code and "qk_tg" not in code


@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_conv_switch_selects_the_conv_variant(mask, tmp_path):
    """The conv variant reads qkv, the conv state and weight instead of q, k, v, stages q and
    k behind one barrier and writes the conv state; its recurrence is the fused decode one."""
    code = preprocessed(source.kernel_body("fused", mask, True, True), tmp_path)
    for name in ("qkv", "conv_state", "conv_w", "a", "b", "A_log"):
        assert re.search(rf"\b{name}\[", code), name
    for name in ("q", "k", "v"):
        assert not re.search(rf"\b{name}\[", code), name
    assert (re.search(r"\bmask\[", code) is not None) == mask
    assert code.count("gd_threadgroup_barrier()") == 1
    assert "conv_state_out[" in code and "constexpr int T = 1;" in code
    assert "GD_" not in code and "gd_conv_silu" not in code
    assert "norm_tg" not in code and not re.search(r"\bz\[", code)
    # The gated norm: reads z, norm_w and norm_eps, a second barrier for the head's sum.
    normed = preprocessed(source.kernel_body("fused", mask, True, True, True), tmp_path)
    for name in ("z", "norm_w", "norm_eps", "norm_tg"):
        assert re.search(rf"\b{name}\[", normed), name
    assert normed.count("gd_threadgroup_barrier()") == 2
    with pytest.raises(ValueError, match="gated norm"):
        source.kernel_body("fused", mask, True, False, True)
    with pytest.raises(ValueError, match="conv variant"):
        source.kernel_body("scalar", mask, True, True)
    with pytest.raises(ValueError, match="conv variant"):
        source.kernel_body("fused", mask, False, True)


@pytest.mark.parametrize("tokens", [1, 2, 8])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_packed_switch_reads_the_fused_projection(tokens, mask, tmp_path):
    """The packed T-token variant reads qkv, z, b and a from `proj` only (no split pieces), T
    is a constant, and for T > 1 the states after the earlier tokens are written (one more
    barrier a token: qk_tg is rewritten)."""
    code = preprocessed(source.kernel_body("fused", mask, True, True, True, tokens, True), tmp_path)
    assert re.search(r"\bproj\[", code) and re.search(r"\bconv_state\[", code)
    for name in ("qkv", "z", "a", "b", "q", "k", "v"):
        assert not re.search(rf"\b{name}\[", code), name
    assert f"constexpr int T = {tokens};" in code
    assert ("state_tok" in code) == ("conv_tok[" in code) == (tokens > 1)
    assert code.count("gd_threadgroup_barrier()") == 2 + (tokens > 1)
    assert (re.search(r"\bmask\[", code) is not None) == mask
    assert "GD_" not in code and "gd_in_" not in code and "gd_conv_dst" not in code
    names = source.input_names("fused", mask, conv=True, norm=True, packed=True)
    assert names[0] == "proj" and "z" not in names and "qkv" not in names
    assert source.output_names(True, tokens)[3:] == (
        ["state_tok", "conv_tok"] if tokens > 1 else []
    )
    with pytest.raises(ValueError, match="tokens"):
        source.kernel_body("fused", mask, True, True, True, 9, True)
    with pytest.raises(ValueError, match="conv decode variants only"):
        source.kernel_body("fused", mask, True, False, False, tokens, True)


@pytest.mark.parametrize("tokens", [1, 2, 3, 8])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_metal_packed_decode_source_compiles(mask, tokens, tmp_path):
    """The packed T-token variant (the fused projection in place, the gated norm, the states
    after each token: five outputs for T > 1)."""
    variant = ("fused", mask, True, True, True, tokens, True)
    body = metal.BACKEND.kernel_source(*variant)
    names = source.input_names("fused", mask, conv=True, norm=True, packed=True)
    tu = wrap(source.kernel_name(*variant), names, body, metal.HEADER, conv=True, tokens=tokens)
    err = compile_errors(tu, tmp_path)
    assert not err, err
