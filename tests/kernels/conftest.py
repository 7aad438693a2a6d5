"""Which cases of the CPU-side kernel grids CI runs (lane emulator, nvcc).

The grids below run every kernel body on the CPU: the lane emulator (g++, one thread a GPU
thread: seconds a case) and nvcc (the CUDA text for sm_90: up to a minute a translation unit).
The Metal-stub compiles (g++ syntax checks, about a second in all) run whole in CI. Of the
others CI keeps one case per kernel and per branch (dtype, mask, norm, packed, T),
so that a broken kernel body still fails it; every other case of a listed test is marked `slow`
(`python -m pytest -m slow tests/kernels` runs them; the GPU machine runs the real kernels).
A test named with `None` is slow as a whole. A kept id that no longer exists is an error, so a
renamed parameter cannot silently take a kernel out of CI.
"""

import pytest

# "file::test" -> the parameter ids CI keeps (None: the whole test is slow).
CI_KEEP: dict[str, set[str] | None] = {
    # -- lane emulator -------------------------------------------------------------------------
    # Every instance (mask, causal, D, rows, split, dtype, gate) against its cheapest case but
    # the masked one, which takes left padding, T = 7 and a partial split; T 1, 2, 5 and 7.
    "test_attention_kernel_on_cpu.py::test_attention_body_matches_numpy": {
        "0-B1Hq4Hkv1T1C5",
        "1-B1Hq2Hkv1T5C64",
        "2-B1Hq4Hkv1T1C5",
        "3-B1Hq8Hkv1T2C33",
        "4-B2Hq4Hkv4T7C29",
        "5-B1Hq4Hkv1T1C5",
        "6-B1Hq8Hkv1T2C33",
        "8-B1Hq4Hkv1T1C5",
    },
    "test_attention_kernel_on_cpu.py::test_qwen_head_dim_with_left_padding_and_gate": {"4"},
    # Prep + state (scalar gates): T = 1 unmasked, and several chunks masked.
    "test_chunk_kernel_on_cpu.py::test_prep_and_state_kernels_match_numpy": {
        "B1T1Hk1Hv1Dk32Dv16-nomask",
        "B3T65Hk1Hv2Dk32Dv16-mask",
    },
    "test_chunk_kernel_on_cpu.py::test_state_kernel_per_key_gates_matches_numpy": {"B2T63Dk32"},
    # The host side: each value of each switch once (prep kernel / ops, simt / mma, per-key).
    "test_chunk_kernel_on_cpu.py::test_host_launch_through_emulator": {
        "scalar-kernel-simt",
        "perkey-ops-mma",
    },
    "test_chunk_kernel_on_cpu.py::test_state_mma_kernel_matches_numpy": {
        "B3T65Hk1Hv2Dk32Dv16-mask",
    },
    "test_chunk_kernel_on_cpu.py::test_prep_mma_kernel_matches_ops_and_numpy": {
        "B2T63Hk1Hv2Dk32Dv20-mask",
    },
    "test_chunk_kernel_on_cpu.py::test_state_mma_kernel_per_key_gates_matches_numpy": {"B2T63Dk32"},
    "test_chunk_kernel_on_cpu.py::"
    "test_state_mma_kernel_g_zero_strong_decay_and_garbage_in_padding": {"prep_mma"},
    "test_chunk_split_on_cpu.py::test_split_kernels_match_numpy": {
        "B1T1Hk1Hv1Dk32Dv16-nomask",
        "B3T65Hk1Hv2Dk32Dv16-mask",
    },
    # The recurrent kernel: each gate kind, mask on and off, prefill and decode.
    "test_kernel_body_on_cpu.py::test_kernel_body_on_cpu_matches_numpy": {
        "scalar-True-True",
        "per_key-False-False",
        "fused-True-False",
    },
    "test_chunk_split_on_cpu.py::test_split_o2_matches_numpy": {
        "B1T1Hk1Hv1Dk32Dv16-nomask",
        "B3T65Hk1Hv2Dk32Dv16-mask",
    },
    "test_chunk_split_on_cpu.py::test_split_o2_metal_tiles": {"T200Dk32Dv20"},
    "test_chunk_split_on_cpu.py::test_split_tile_configurations": {
        "T200Dk32Dv20-metal",
        "T200Dk32Dv20-cuda_bv32",
    },
    # Conv decode: each layout once, each of mask and dtype on two of them.
    "test_decode_kernel_on_cpu.py::test_conv_decode_body_on_cpu_matches_numpy_and_ref": {
        "B1Hk1Hv1Dk128Dv128L16W2-nomask-fp32",
        "B3Hk2Hv4Dk32Dv12L8W2-mask-bf16",
        "B2Hk2Hv2Dk128Dv128L8W4-mask-fp32",
    },
    "test_decode_kernel_on_cpu.py::test_conv_decode_norm_body_on_cpu_matches_ref": {
        "B1Hk1Hv1Dk128Dv128-nomask-bf16",
        "B3Hk2Hv4Dk32Dv12-mask-fp32",
    },
    # Packed T-token decode: T = 1, 2, 3 and 8, both dtypes, mask and not, every layout.
    "test_decode_kernel_on_cpu.py::test_packed_tokens_body_on_cpu_matches_numpy_and_ref": {
        "T1-mask-bf16-Dk32-W2",
        "T8-mask-bf16-Dk32-W2",
        "T2-nomask-fp32-Dk32-W2",
        "T2-mask-fp32-Dk128-W16",
        "T3-nomask-bf16-Dk32-W4",
    },
    # -- nvcc ----------------------------------------------------------------------------------
    # Whole translation units (every variant, minutes under load), their can-fail checks and the
    # register counts (ptxas -v) are slow; CI compiles one unit a family: a few gated-delta
    # variants alone (test_cuda_precompiled.py), one chunk kernel, the attention entries, the
    # fused norm. The emulator runs every body with its CUDA prologue.
    "test_cuda_source.py::test_cuda_sources_compile_with_nvcc": None,
    "test_cuda_source.py::test_norm_layout_fits_the_register_file": None,
    "test_cuda_source.py::test_cuda_norm_source_check_can_fail": None,
    "test_cuda_source.py::test_cuda_source_check_can_fail": None,
    "test_cuda_precompiled.py::test_cuda_kernel_sources_compile_to_ptx_with_entry": {
        "gated_delta_step_fused_mask-bfloat16",
        "gated_delta_decode_per_key-bfloat16",
        "gated_delta_step_mask-float32",
        "gated_delta_decode_conv-bfloat16",
        "gated_delta_decode_conv_norm_mask-float32",
        "gated_delta_decode_conv_packed_norm-bfloat16",
        "gated_delta_decode_conv_packed_t3_norm_mask-float16",
    },
    "test_chunk_cuda_source.py::test_chunk_cuda_sources_compile_for_sm90": {
        "gated_delta_chunk_state",
    },
    "test_chunk_cuda_source.py::test_chunk_cuda_check_can_fail": None,
    "test_chunk_split_sources.py::test_split_cuda_sources_compile_for_sm90": None,
    "test_chunk_split_sources.py::test_split_launch_bounds_header_caps_registers": None,
    "test_attention_sources.py::test_cuda_attention_sources_compile_with_nvcc": None,
    "test_fused_norm_on_cpu.py::test_precompiled_sources_compile_to_ptx": {"add_rms_norm"},
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    seen = set()
    for item in items:
        key = f"{item.path.name}::{item.originalname}"
        if key not in CI_KEEP:
            continue
        keep = CI_KEEP[key]
        callspec = getattr(item, "callspec", None)
        if keep is not None and callspec is not None and callspec.id in keep:
            seen.add((key, callspec.id))
        else:
            item.add_marker(pytest.mark.slow)
    # Only a whole-file or whole-folder run sees every id.
    if any("::" in str(a) for a in config.args):
        return
    names = {f"{item.path.name}::{item.originalname}" for item in items}
    lost = [
        f"{key}[{i}]"
        for key, keep in CI_KEEP.items()
        if keep is not None and key in names
        for i in sorted(keep)
        if (key, i) not in seen
    ]
    if lost:
        raise pytest.UsageError(f"tests/kernels/conftest.py keeps ids that do not exist: {lost}")


@pytest.fixture
def plain_split(monkeypatch):
    """The split chunk path's switches as before session 11 made round 7 the default (H3 and
    LDSM32 off, WY2_VX / O2_VX off, the output pass at two threadgroups an SM): the build the
    older variant and launch tests were written against (round 7's own: test_chunk_h3.py), and
    H3's ring of two chunks (H3_NB 3 since session 15)."""
    from qwen35_mlx.kernels.gated_delta import chunk_launch as cl

    monkeypatch.setattr(cl, "H3_NB", 2)

    monkeypatch.setattr(cl, "H3", None)
    monkeypatch.setattr(cl, "FUSE_O", False)
    monkeypatch.setattr(cl, "LDSM32", False)
    monkeypatch.setattr(cl, "WY2_VX", False)
    monkeypatch.setattr(cl, "O2_VX", False)
    monkeypatch.setattr(cl, "MIN_BLOCKS", {**cl.MIN_BLOCKS, "o2": 2})
