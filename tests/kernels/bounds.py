"""Kernel launches as the host makes them, run on the CPU with every buffer fenced.

`record(fn)` calls a host entry point (chunk_launch's, or a fused GpuBackend's) with its kernel
factory replaced by a recorder: each launch keeps the build's text and names and the call's
inputs, template, grid, threadgroup, output shapes and dtypes; outputs are zero arrays, so a
later launch that takes an earlier one's output is linked to it by identity. `program(launches)`
is one C++ program that replays them in order in the lane emulator (tests/kernels/
lane_emulator.h): each kernel's text in a function with the parameters MLX generates (pointers,
`<input>_shape` where the text names it), the template arguments as MLX instantiates them, the
grid divided into the host's threadgroups, an earlier launch's outputs passed to a later one.

Fences: every input and output, and the dynamic shared memory of a build that asks for it (its
`extern __shared__` array, sized by the host's `shared_memory`), lives in an allocation of
exactly the bytes MLX would allocate ([shape] x itemsize), with FENCE bytes on each side that
AddressSanitizer treats as unaddressable (built with -fsanitize=address,undefined): a read or
write outside any buffer, by any offset up to FENCE, stops the program with a report naming the
kernel line. UndefinedBehaviorSanitizer adds signed index overflows and misaligned 16-byte
accesses. Outputs start as NaN (unwritten elements show), dynamic shared memory as all ones
(NaN) at each threadgroup, as the emulator's static threadgroup arrays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from qwen35_mlx.kernels.gated_delta import chunk_source as cs
from tests.kernels.helpers import EMULATED_IO

FENCE = 1 << 26  # bytes made unaddressable on each side of every buffer

_CTYPE = {
    mx.bfloat16: "bf16",
    mx.float32: "float",
    mx.bool_: "bool",
    mx.int32: "int32_t",
    mx.uint32: "uint32_t",
}
# how a buffer's values travel to the program: the file's NumPy type
_FILE_TYPE = {"bf16": np.float32, "float": np.float32, "bool": np.uint8, "int32_t": np.float32}


@dataclass
class Launch:
    build: dict  # the factory's keyword arguments: name, input_names, output_names, source, ...
    call: dict  # the kernel call's: inputs, template, grid, threadgroup, output_shapes, ...
    outputs: list = field(default_factory=list)  # the zero arrays returned to the host


class Recorder:
    """A kernel factory (both MLX's signature and GpuBackend's) that records every launch."""

    def __init__(self):
        self.launches: list[Launch] = []

    def __call__(self, **build):
        def run(**call):
            outs = [
                mx.zeros(s, d)
                for s, d in zip(call["output_shapes"], call["output_dtypes"], strict=True)
            ]
            self.launches.append(Launch(build, call, outs))
            return outs

        return run


_DYN = re.compile(
    r"#ifdef __CUDA_ARCH__\n\s*extern __shared__ __align__\(16\) unsigned char (\w+)\[\];\n"
    r"(.*?)#else\n.*?#endif\n",
    re.S,
)


def _dynamic_shared(source: str) -> tuple[str, bool]:
    """The text with its CUDA dynamic shared memory array (`extern __shared__ ... x[];`, the
    CUDA branch of its #ifdef) taken from the program's fenced buffer instead of the emulator's
    static array; and whether it had one."""
    text, n = _DYN.subn(r"  unsigned char* \1 = gd_dyn_smem_block();\n\2", source)
    assert "extern __shared__" not in text, "a dynamic shared array the harness does not know"
    return text, n > 0


_PRELUDE = r"""
#include <cstdio>
#include <sanitizer/asan_interface.h>
#include <sys/mman.h>
#include <memory>

// A buffer of n elements in a mapping with FENCE poisoned bytes on each side.
template <typename X>
X* fenced(size_t n) {
  const size_t bytes = n * sizeof(X), fence = FENCE_BYTES;
  const size_t span = fence + ((bytes + 4095) / 4096 + 1) * 4096 + fence;
  void* m = mmap(nullptr, span, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) std::abort();
  char* base = static_cast<char*>(m);
  ASAN_POISON_MEMORY_REGION(base, span);
  ASAN_UNPOISON_MEMORY_REGION(base + fence, bytes);
  return reinterpret_cast<X*>(base + fence);
}
template <typename X>
X* fenced_from(const std::string& path, size_t n) {
  X* p = fenced<X>(n);
  auto f = readf(path);
  if (f.size() != n) std::abort();
  for (size_t i = 0; i < n; ++i) p[i] = X(f[i]);
  return p;
}
bool* fenced_bool(const std::string& path, size_t n) {
  bool* p = fenced<bool>(n);
  std::ifstream f(path, std::ios::binary);
  std::vector<char> raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (raw.size() != n) std::abort();
  for (size_t i = 0; i < n; ++i) p[i] = raw[i] != 0;
  return p;
}
template <typename X>
X* fenced_nan(size_t n) {
  X* p = fenced<X>(n);
  for (size_t i = 0; i < n; ++i) p[i] = X(NAN);
  return p;
}
template <typename X>
void write_n(const std::string& path, const X* p, size_t n) {
  write(path, std::vector<X>(p, p + n));
}
// The launch's dynamic shared memory (fenced, its host's bytes): all ones when a threadgroup
// starts, as the emulator's static threadgroup arrays.
unsigned char* gd_dyn_smem = nullptr;
size_t gd_dyn_bytes = 0;
unsigned long gd_dyn_filled = 0;
unsigned char* gd_dyn_smem_block() {
  const std::lock_guard<std::mutex> lock(gd_tg_mutex);
  if (gd_dyn_filled != gd_tg_block) {
    std::memset(gd_dyn_smem, 0xff, gd_dyn_bytes);
    gd_dyn_filled = gd_tg_block;
  }
  return gd_dyn_smem;
}
// cp.async copies 16 bytes between 16-byte aligned addresses (else "misaligned address").
inline void gd_aligned16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::fprintf(stderr, "misaligned 16-byte copy at %p\n", p);
    std::abort();
  }
}
inline void gd_cp16_cuda(void* s, unsigned off, const void* g) {
  gd_aligned16(static_cast<char*>(s) + off);
  gd_aligned16(g);
  gd_cp16(s, off, g);
}
// CUDA's staged tile copy (chunk_launch's gd_copy_tile and L32_TILES' gd_copy_tile_l32, which
// share chunk_source.COPY_TILE_LOOP): its 16-byte copies at its rows and columns, not the
// emulator's element copies (the same bytes where cmax is a multiple of 8 elements, as the host
// keeps it).
template <int NT, int R, int CL, typename D, typename S>
inline void gd_copy_tile_cuda(D dst, int dld, S src, size_t sld, int rmax, int tid, int cmax = CL) {
  constexpr int V = 16 / int(sizeof(*src));
  static_assert(CL % V == 0, "gd_copy_tile: whole 16-byte copies a row");
  static_assert(sizeof(*src) == sizeof(*dst), "gd_copy_tile: the bytes as they are");
  constexpr int U = R * CL / V;
@COPY_LOOP@    const int cs = c < cmax ? c : cmax - V;
    gd_aligned16(dst + r * dld + c);
    gd_aligned16(src + rs * sld + cs);
    std::memcpy(dst + r * dld + c, src + rs * sld + cs, 16);
  }
}
#define gd_cp16 gd_cp16_cuda
#define gd_copy_tile gd_copy_tile_cuda
"""


def _kind(v) -> str:
    """A template argument's parameter kind, as MLX declares it."""
    return "typename" if isinstance(v, mx.Dtype) else "bool" if isinstance(v, bool) else "int"


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return _CTYPE[v]


def _count(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


class Program:
    """The C++ text replaying `launches` and the files it reads (write_inputs), its outputs'
    names (`results`: the last launch's outputs, by name)."""

    def __init__(self, launches: list[Launch]):
        self.launches = launches
        self.numbers: list[int] = []  # the sizes, shapes and grids, read at run time ("dims")

        def num(v) -> str:
            self.numbers.append(int(v))
            return f"D[{len(self.numbers) - 1}]"

        self.external: dict[int, tuple[str, mx.array]] = {}  # id -> (buffer, array)
        produced: dict[int, str] = {}
        funcs, setup, runs = [], [], []
        for i, ln in enumerate(launches):
            b, c = ln.build, ln.call
            source, dyn = _dynamic_shared(b["source"])
            smem = b.get("shared_memory", 0)
            assert dyn == (smem > 0), (b["name"], smem)
            tparams, targs = [], []
            for name, v in c["template"]:
                tparams.append(f"{_kind(v)} {name}")
                targs.append(_value(v))
            params, args = [], []
            for name, x in zip(b["input_names"], c["inputs"], strict=True):
                key = id(x)
                if key in produced:
                    buf = produced[key]
                else:
                    buf = self.external.setdefault(key, (f"in{len(self.external)}", x))[0]
                ct = _CTYPE[x.dtype]
                params.append(f"const {ct}* {name}")
                args.append(buf)
                if f"{name}_shape" in source:
                    shape = ", ".join(f"int({num(n)})" for n in x.shape)
                    setup.append(f"  const int L{i}_{name}_shape[] = {{{shape}}};")
                    params.append(f"const int* {name}_shape")
                    args.append(f"L{i}_{name}_shape")
                assert f"{name}_strides" not in source and f"{name}_ndim" not in source
            for j, (name, shape, dt) in enumerate(
                zip(b["output_names"], c["output_shapes"], c["output_dtypes"], strict=True)
            ):
                ct = _CTYPE[dt]
                buf = f"out{i}_{j}"
                setup.append(f"  {ct}* {buf} = fenced_nan<{ct}>({num(_count(shape))});")
                produced[id(ln.outputs[j])] = buf
                params.append(f"{ct}* {name}")
                args.append(buf)
            funcs.append(
                f"namespace L{i} {{  // {b['name']}\ntemplate <{', '.join(tparams)}>\n"
                f"void kernel({', '.join(params)}) {{\n{source}\n}}\n}}  // namespace L{i}\n"
            )
            grid, tg = c["grid"], c["threadgroup"]
            assert all(g % t == 0 for g, t in zip(grid, tg, strict=True)), (grid, tg)
            blocks = ", ".join(f"unsigned({num(g // t)})" for g, t in zip(grid, tg, strict=True))
            call = f"L{i}::kernel<{', '.join(targs)}>({', '.join(args)});"
            if smem:
                runs.append(
                    f"  gd_dyn_bytes = {smem}; gd_dyn_smem = fenced<unsigned char>({smem});"
                )
            if tg[1] > 1 or tg[0] == 32 and tg[2] == 1 and "gd_lane" in source:
                # lane mode (the fused kernels): 32 lanes a warp in x, warps in y
                assert tg[0] == 32 and tg[2] == 1, tg
                runs.append(f"  run_grid({{{blocks}}}, {tg[1]}u, [&] {{ {call} }});")
            else:
                assert tg[1] == tg[2] == 1, tg
                runs.append(f"  run_blocks({{{blocks}}}, {tg[0]}u, [&] {{ {call} }});")
        reads = []
        for buf, x in self.external.values():
            ct = _CTYPE[x.dtype]
            if ct == "bool":
                reads.append(f'  const bool* {buf} = fenced_bool(d + "{buf}", {num(x.size)});')
            else:
                reads.append(
                    f'  const {ct}* {buf} = fenced_from<{ct}>(d + "{buf}", {num(x.size)});'
                )
        last = len(launches) - 1
        self.results = {}
        writes = []
        for j, (name, shape) in enumerate(
            zip(launches[-1].build["output_names"], launches[-1].call["output_shapes"], strict=True)
        ):
            self.results[name] = tuple(shape)
            writes.append(f'  write_n(d + "{name}", out{last}_{j}, {num(_count(shape))});')
        self.text = (
            EMULATED_IO
            + _PRELUDE.replace("FENCE_BYTES", str(FENCE)).replace("@COPY_LOOP@", cs.COPY_TILE_LOOP)
            + "".join(funcs)
            + "int main(int argc, char** argv) {\n"
            + '  const std::string d = std::string(argv[1]) + "/";\n'
            + "  std::vector<long long> D;\n"
            + '  { std::ifstream f(d + "dims"); long long x; while (f >> x) D.push_back(x); }\n'
            + "\n".join(reads + setup + runs + writes)
            + "\n  return 0;\n}\n"
        )

    def write_inputs(self, d: Path) -> None:
        """The external inputs' values and the numbers as the program reads them (d: its
        argument)."""
        (d / "dims").write_text(" ".join(map(str, self.numbers)))
        for buf, x in self.external.values():
            t = _FILE_TYPE[_CTYPE[x.dtype]]
            a = np.asarray(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x).astype(t)
            (d / buf).write_bytes(np.ascontiguousarray(a).tobytes())

    def read_results(self, d: Path) -> dict[str, np.ndarray]:
        return {n: np.fromfile(d / n, np.float32).reshape(s) for n, s in self.results.items()}
