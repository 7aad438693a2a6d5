"""CUDA kernels compiled once per machine: `cuda_kernel(...)` is a drop-in for
`mx.fast.cuda_kernel(...)` whose kernels are compiled by NVRTC into a disk cache (`nvrtc.py`)
and run through `mx.fast.precompiled_cuda_kernel`, so a new process loads them instead of
compiling them again (MLX recompiles `mx.fast.cuda_kernel` sources in every process).

What `mx.fast.cuda_kernel` wraps around a body (MLX 0.32, custom_kernel.cpp `build_kernel`),
and what this module generates instead, so that the source needs none of MLX's headers:
- MLX: `#include mlx/backend/cuda/device/utils.cuh` (cuda_bf16.h, cuda_fp16.h, cuda::std),
  cooperative_groups, then `__global__ void custom_kernel_<name><template args>(...)` inside
  `namespace mlx::core::cu`. Here: two small value types for bf16 and fp16 (`qm_bfloat16`,
  `qm_half`: storage plus round-to-nearest-even conversions to and from float, the same
  instructions cuda_bf16.h / cuda_fp16.h use; the bodies only convert, never compute in them),
  then `extern "C" __global__ void qm_<name><template args>(...)`. Skipping MLX's headers also
  makes the first compile faster.
- Parameters, in the order `precompiled_cuda_kernel` passes them (CustomKernel::eval_gpu): one
  pointer per input, one per output, then the scalars. MLX passes `<input>_shape` (and
  `_strides`, `_ndim`) where the body names them; the precompiled path passes no shapes, so here
  each such input's dims travel as int scalars and the entry rebuilds `const int
  <input>_shape[ndim]` and `<input>_ndim` in front of the body. (A body naming `_strides` stays on
  `mx.fast.cuda_kernel`: scalars are 32-bit.) Shapes are read when the kernel is called, so a
  caller under `mx.compile(shapeless=True)` must not use this path.
- Template arguments become `constexpr int` / `constexpr bool` / `using` lines at the top of the
  body, as in MLX; `grid` is in threads and the block is `threadgroup`, as in MLX.
- Inputs are made row-contiguous first (`ensure_row_contiguous=True`, `cuda_kernel`'s default;
  a kernel made with False gets them as they are).

Off switch: QWEN35_MLX_CUDA_PRECOMPILED=0 uses `mx.fast.cuda_kernel` as before. If NVRTC is
missing, the GPU's architecture cannot be read, or a source does not compile, the kernel falls
back to `mx.fast.cuda_kernel` with one warning per process.
"""

from __future__ import annotations

import os
import re
import time
import warnings

import mlx.core as mx

from . import nvrtc

ENV = "QWEN35_MLX_CUDA_PRECOMPILED"
# Bumped when the generated source's conventions change (it is part of every cache key).
FORMAT = "1"

# Minimal bf16 / fp16 storage types with the conversions of cuda_bf16.hpp / cuda_fp16.hpp:
# cvt.rn.* from float and cvt.f32.* to float (bf16 before sm_90: widened by a shift; before
# sm_80: rounded in integer arithmetic, NaN to the canonical 0x7fff), so values match the
# cuda_kernel path bit for bit.
TYPES = r"""
struct qm_bfloat16 {
  unsigned short bits;
  qm_bfloat16() = default;
  __device__ qm_bfloat16(float f) {
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(f));
#else
    unsigned int u = __float_as_uint(f);
    bits = (u & 0x7fffffffu) > 0x7f800000u
        ? (unsigned short)0x7fffu
        : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
  }
  __device__ operator float() const {
#if __CUDA_ARCH__ >= 900
    float f;
    asm("cvt.f32.bf16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
#else
    return __uint_as_float((unsigned int)bits << 16);
#endif
  }
};
struct qm_half {
  unsigned short bits;
  qm_half() = default;
  __device__ qm_half(float f) {
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(f));
  }
  __device__ operator float() const {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
  }
};
"""

CTYPES = {
    mx.bool_: "bool",
    mx.int8: "signed char",
    mx.uint8: "unsigned char",
    mx.int16: "short",
    mx.uint16: "unsigned short",
    mx.int32: "int",
    mx.uint32: "unsigned int",
    mx.int64: "long long",
    mx.uint64: "unsigned long long",
    mx.float16: "qm_half",
    mx.bfloat16: "qm_bfloat16",
    mx.float32: "float",
    mx.float64: "double",
}
OPTIONS = ["--std=c++17", "--device-as-default-execution-space"]

_warned = False


def enabled() -> bool:
    """The switch (QWEN35_MLX_CUDA_PRECOMPILED, on by default), and an MLX that has
    `mx.fast.precompiled_cuda_kernel` (0.30 and later)."""
    off = os.environ.get(ENV, "1").strip().lower() in ("0", "false", "off", "no")
    return not off and hasattr(mx.fast, "precompiled_cuda_kernel")


def _dtype_name(dt) -> str:
    return str(dt).rsplit(".", 1)[-1]


def entry_name(name: str, template) -> str:
    """`qm_<name>` plus the template values, as MLX names its kernels (`_128_16_0_bfloat16`)."""
    parts = []
    for _, v in template:
        if isinstance(v, bool):
            parts.append("t" if v else "f")
        elif isinstance(v, int):
            parts.append(str(v))
        else:
            parts.append(_dtype_name(v))
    return re.sub(r"\W", "_", "_".join([f"qm_{name}", *parts]))


def uses(source: str, input_names) -> dict[str, tuple[bool, bool, bool]]:
    """Per input: whether the body names `<input>_shape`, `_strides`, `_ndim` (as MLX checks)."""
    return {
        n: tuple(f"{n}_{s}" in source for s in ("shape", "strides", "ndim")) for n in input_names
    }


def entry_source(
    name: str,
    header: str,
    source: str,
    input_names,
    input_dtypes,
    input_ndims,
    output_names,
    output_dtypes,
    template,
) -> str:
    """The full, self-contained CUDA source of one kernel: types, header, an `extern "C"` entry
    with explicit parameters (input pointers, output pointers, then one int per dim of every
    input whose shape the body reads), the template arguments and the body."""
    flags = uses(source, input_names)
    params, scalars, lines = [], [], []
    for n, dt, nd in zip(input_names, input_dtypes, input_ndims, strict=True):
        params.append(f"    const {CTYPES[dt]}* {n}")
        shape, strides, ndim = flags[n]
        if strides:
            raise ValueError(f"precompiled CUDA kernels pass no strides ({n}_strides)")
        if shape:
            scalars += [f"    const int {n}_shape_{i}" for i in range(nd)]
            dims = ", ".join(f"{n}_shape_{i}" for i in range(nd))
            lines.append(f"  const int {n}_shape[{max(nd, 1)}] = {{{dims}}};")
        if ndim:
            lines.append(f"  constexpr int {n}_ndim = {nd};")
    params += [f"    {CTYPES[dt]}* {n}" for n, dt in zip(output_names, output_dtypes, strict=True)]
    for k, v in template:
        if isinstance(v, bool):
            lines.append(f"  constexpr bool {k} = {'true' if v else 'false'};")
        elif isinstance(v, int):
            lines.append(f"  constexpr int {k} = {v};")
        else:
            lines.append(f"  using {k} = {CTYPES[v]};")
    entry = entry_name(name, template)
    # A template argument MAX_THREADS (threads a block) also bounds the entry's registers.
    bound = dict(template).get("MAX_THREADS")
    bounds = f"__launch_bounds__({bound}) " if bound else ""
    return (
        f"// {entry}: generated by qwen35_mlx (kernels/gated_delta/precompiled.py)\n"
        + TYPES
        + header
        + f'\nextern "C" __global__ void {bounds}{entry}(\n'
        + ",\n".join(params + scalars)
        + ") {\n"
        + "\n".join(lines)
        + "\n"
        + source
        + "\n}\n"
    )


def _warn_once(msg: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


class CachedCudaKernel:
    """A kernel object called like `mx.fast.cuda_kernel`'s: each call's signature (input
    dtypes and ranks, output dtypes, template) is compiled once per process, its binary read
    from the disk cache or compiled with NVRTC and stored there. `last` says how the last new
    signature was obtained: "disk", "compiled" or "fallback"; `compile_s` the NVRTC seconds."""

    def __init__(
        self, name, input_names, output_names, source, header="", ensure_row_contiguous=True
    ):
        self.name = name
        self.ensure_row_contiguous = ensure_row_contiguous
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self._shape_inputs = [i for i, n in enumerate(self.input_names) if f"{n}_shape" in source]
        self._binaries: dict[tuple, tuple[str, bytes]] = {}
        self._fallback = None
        self._target = None
        self.last = None
        self.compile_s = 0.0

    def fallback(self):
        """The `mx.fast.cuda_kernel` object of the same kernel (built on first use)."""
        if self._fallback is None:
            self._fallback = mx.fast.cuda_kernel(
                name=self.name,
                input_names=self.input_names,
                output_names=self.output_names,
                source=self.source,
                header=self.header,
                ensure_row_contiguous=self.ensure_row_contiguous,
            )
        return self._fallback

    def source_for(self, input_dtypes, input_ndims, output_dtypes, template) -> str:
        return entry_source(
            self.name,
            self.header,
            self.source,
            self.input_names,
            input_dtypes,
            input_ndims,
            self.output_names,
            output_dtypes,
            template,
        )

    def binary(self, input_dtypes, input_ndims, output_dtypes, template) -> tuple[str, bytes]:
        """(entry name, cubin or PTX bytes) of one signature, from the disk cache or NVRTC."""
        if self._target is None:
            major, minor = nvrtc.version()
            arch, kind = nvrtc.target(nvrtc.device_arch())
            self._target = (arch, kind, f"{major}.{minor}")
        arch, kind, nvrtc_version = self._target
        src = self.source_for(input_dtypes, input_ndims, output_dtypes, template)
        options = [*OPTIONS, f"--gpu-architecture={arch}"]
        key = nvrtc.cache_key(FORMAT, src, " ".join(options), nvrtc_version, mx.__version__)
        entry = entry_name(self.name, template)
        path = nvrtc.cache_dir() / f"{entry}-{key}.{kind}"
        t0 = time.perf_counter()
        data, how = nvrtc.load_or_compile(
            path, lambda: nvrtc.compile_source(src, options, kind, name=f"{entry}.cu")
        )
        if how == "compiled":
            self.compile_s += time.perf_counter() - t0
        self.last = how
        return entry, data

    def __call__(
        self,
        *,
        inputs,
        template=(),
        grid,
        threadgroup,
        output_shapes,
        output_dtypes,
        init_value=None,
        verbose=False,
        stream=None,
    ):
        inputs = list(inputs)
        template = list(template)
        if self._fallback is not None:
            return self._run_fallback(inputs, template, grid, threadgroup, output_shapes,
                                      output_dtypes, init_value, stream)  # fmt: skip
        sig = (
            tuple(x.dtype for x in inputs),
            tuple(x.ndim for x in inputs),
            tuple(output_dtypes),
            tuple(template),
        )
        found = self._binaries.get(sig)
        if found is None:
            try:
                found = self.binary(*sig)
            except (RuntimeError, OSError, ValueError, KeyError, AttributeError) as e:
                _warn_once(
                    f"qwen35_mlx: CUDA kernels are compiled by MLX in every process instead of "
                    f"once per machine ({type(e).__name__}: {str(e)[:500]}); set {ENV}=0 to "
                    f"silence this"
                )
                self.last = "fallback"
                self.fallback()
                return self._run_fallback(inputs, template, grid, threadgroup, output_shapes,
                                          output_dtypes, init_value, stream)  # fmt: skip
            self._binaries[sig] = found
        entry, data = found
        scalars = [int(d) for i in self._shape_inputs for d in inputs[i].shape]
        return mx.fast.precompiled_cuda_kernel(
            name=entry,
            compiled_source=data,
            inputs=inputs,
            output_shapes=output_shapes,
            output_dtypes=output_dtypes,
            scalars=scalars,
            grid=grid,
            threadgroup=threadgroup,
            init_value=init_value,
            ensure_row_contiguous=self.ensure_row_contiguous,
            stream=stream,
        )

    def _run_fallback(self, inputs, template, grid, threadgroup, shapes, dtypes, init, stream):
        kw = {} if stream is None else {"stream": stream}
        return self._fallback(
            inputs=inputs,
            template=template,
            grid=grid,
            threadgroup=threadgroup,
            output_shapes=shapes,
            output_dtypes=dtypes,
            init_value=init,
            **kw,
        )


def cuda_kernel(*, name, input_names, output_names, source, header="", ensure_row_contiguous=True):
    """`mx.fast.cuda_kernel`'s factory with the disk cache (or MLX's own, when switched off).
    ensure_row_contiguous False: inputs passed as they are (views included), as MLX's option."""
    kernel = CachedCudaKernel(
        name, input_names, output_names, source, header, ensure_row_contiguous
    )
    return kernel if enabled() else kernel.fallback()
