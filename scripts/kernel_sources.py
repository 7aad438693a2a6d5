"""Every GPU kernel's text as MLX receives it, and the chunk passes' launch arguments: to check
that a refactor of the kernel source left them unchanged (issue #14: one copy of each block).

Records each kernel factory call (name, input and output names, source, header) of every
structural variant: the fused gated-delta kernels (source.py through metal.py / cuda.py), the
chunk kernels (chunk_launch._build, every `which`, O2_BODY's and CUDA's switched variants),
the decode attention kernels, the prefill attention kernels (every version, variant and ring
size, with their header), the fused norm kernels, the prefill conv kernel and the few-rows
matmul kernel, for Metal and CUDA; and the arguments of every chunk pass's kernel call
(`chunk_launches`). No GPU is needed: the factories and kernels are replaced by recorders.

    python scripts/kernel_sources.py dump OUT.json            # this tree's package
    python scripts/kernel_sources.py diff --base f4c58fd      # base commit vs working tree

`diff` exports `src/` of the base commit to a temporary folder, dumps both in subprocesses
(PYTHONPATH set to each tree's src) and compares every kernel after folding white space;
it prints each differing kernel with a unified diff and exits 1, or prints the count and
exits 0.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BACKENDS = ("metal", "cuda")


def _record(store: dict, key: str):
    def factory(*, name, input_names, output_names, source, header=""):
        store[key] = {
            "name": name,
            "inputs": list(input_names),
            "outputs": list(output_names),
            "source": source,
            "header": header,
        }
        return object()

    return factory


def dump() -> dict:
    """{kernel key: factory arguments} of every kernel variant of this tree's package."""
    from qwen35_mlx.kernels import fused_norm, rows_matmul

    try:  # a base commit from before the prefill conv kernel has none
        from qwen35_mlx.kernels import conv_qkv
    except ImportError:
        conv_qkv = None
    try:  # nor one from before the prefill attention kernel
        from qwen35_mlx.kernels.attention import prefill
    except ImportError:
        prefill = None
    from qwen35_mlx.kernels.attention import cuda as at_cuda
    from qwen35_mlx.kernels.attention import metal as at_metal
    from qwen35_mlx.kernels.gated_delta import chunk_launch, launch, source
    from qwen35_mlx.kernels.gated_delta import cuda as gd_cuda
    from qwen35_mlx.kernels.gated_delta import metal as gd_metal

    out: dict = {}
    bases = {"metal": gd_metal.BACKEND, "cuda": gd_cuda.BACKEND}
    current = {"key": None}

    def make_kernel(self, name, inputs, outputs, text):
        _record(out, current["key"])(
            name=name, input_names=inputs, output_names=outputs, source=text, header=self.header
        )
        return object()

    launch.GpuBackend.make_kernel = make_kernel
    for be in bases.values():
        be._available = lambda: True
        be._kernels.clear()

    # Fused gated-delta kernels: every argument tuple kernel_name accepts.
    flags = (False, True)
    tokens = range(1, source.MAX_TOKENS + 1)
    every = list(itertools.product(source.GATES, flags, flags, flags, flags, tokens, flags))
    for backend, be in bases.items():
        for args in every:
            try:
                source.kernel_name(*args)
            except ValueError:
                continue
            current["key"] = f"gd/{backend}/{args}"
            be.build(*args)

    # Chunk kernels.
    whichs = ["state", "state_mma", "prep", "prep_fused", "prep_mma", "prep_fused_mma"]
    whichs += ["wy", "wy_fused", "wy2", "wy2_fused", "h", "h2", "o", "o2"]
    # ... the rest of the tree's plain kernels and WY variants (after the first list, whose keys
    # older trees share)
    more = [*getattr(chunk_launch, "_PLAIN", ()), "wy2v", "wy2v_fused", "wy2x", "wy2x_fused"]
    more += ["wy2xp", "wy2xp_fused"] if hasattr(chunk_launch, "WY_P") else []
    whichs += [w for w in more if w not in whichs]
    for backend in BACKENDS:
        chunk_launch._kernels.clear()
        for which in whichs:
            chunk_launch._factory = lambda b, w=which, be=backend: _record(out, f"chunk/{be}/{w}")
            chunk_launch._build(backend, which)
    # ... the stamped builds (CUDA)
    for which in getattr(chunk_launch, "_STAMPED", ()):
        chunk_launch._factory = lambda b, w=which: _record(out, f"chunk/cuda/{w}")
        chunk_launch._build("cuda", which)
    chunk_launch._kernels.clear()
    # ... and their switched variants: O2_BODY's fp32 P and ring of two, CUDA's tf32 products.
    saved = chunk_launch.O2_P16, chunk_launch.O2_RING, chunk_launch.MMA16
    ldsm32 = getattr(chunk_launch, "LDSM32", None)
    for backend, (p16, ring) in itertools.product(BACKENDS, ((False, 3), (True, 2), (False, 2))):
        chunk_launch.O2_P16, chunk_launch.O2_RING = p16, ring
        key = f"chunk/{backend}/o2/p16={p16}/ring={ring}"
        chunk_launch._factory = lambda b, k=key: _record(out, k)
        chunk_launch._build(backend, "o2")
    chunk_launch.O2_P16, chunk_launch.O2_RING, chunk_launch.MMA16 = True, 3, False
    for which in whichs:
        chunk_launch._factory = lambda b, w=which: _record(out, f"chunk/cuda/{w}/t32")
        chunk_launch._build("cuda", which)
    # LDSM32 off: the round-7 builds (_L32) without L32_TILES
    chunk_launch.MMA16, chunk_launch.LDSM32 = True, False
    for which in [w for w in whichs if w in getattr(chunk_launch, "_L32", ())]:
        chunk_launch._factory = lambda b, w=which: _record(out, f"chunk/cuda/{w}/no_l32")
        chunk_launch._build("cuda", which)
    chunk_launch.LDSM32 = ldsm32
    chunk_launch.O2_P16, chunk_launch.O2_RING, chunk_launch.MMA16 = saved
    chunk_launch._kernels.clear()

    # Decode attention kernels.
    for backend, at in (("metal", at_metal.BACKEND), ("cuda", at_cuda.BACKEND)):
        at._kernels.clear()
        for mask in (False, True):
            for causal in (False, True) if not mask else (False,):
                current["key"] = f"attention/{backend}/partial/{mask}/{causal}"
                at.partial(mask, causal)
        for gate in (False, True):
            current["key"] = f"attention/{backend}/combine/{gate}"
            at.combine(gate)

    # Fused norm kernels.
    for backend in BACKENDS:
        for name in fused_norm.KERNELS:
            text = fused_norm.kernel_source(name, backend)
            out[f"fused_norm/{backend}/{name}"] = {"source": text}

    # The prefill conv kernel.
    for backend in BACKENDS if conv_qkv is not None else ():
        out[f"conv_qkv/{backend}"] = {"source": conv_qkv.kernel_source(backend)}

    # The prefill attention kernels: every version, variant and ring size, with the header.
    for backend in BACKENDS if prefill is not None else ():
        head = prefill.header(backend)
        for version, (mask, causal) in itertools.product(
            prefill.src.VERSIONS, prefill.src.variants()
        ):
            for ring in (2, 3, 4) if version != 1 else (None,):
                text = prefill.source(backend, mask, causal, version, ring)
                key = f"prefill/{backend}/v{version}/mask={mask}/causal={causal}/ring={ring}"
                out[key] = {"source": text, "header": head}

    # The few-rows matmul kernel.
    for backend in BACKENDS:
        text, head = rows_matmul.kernel_source(backend), rows_matmul.header(backend)
        out[f"rows_matmul/{backend}"] = {"source": text, "header": head}
    out.update(chunk_launches(chunk_launch))
    return out


def chunk_launches(cl) -> dict:
    """{launch key: arguments} of the chunk passes (wy_pass, h_pass, o_pass, prep_kernel,
    state_pass) over backends, dtypes and their options: each kernel call's input shapes and
    dtypes, template, grid, threadgroup, output shapes and dtypes, init_value (or the error)."""
    import mlx.core as mx

    out: dict = {}
    key = {"call": ""}

    def build(backend, which):
        def kernel(**kw):
            rec = {"which": which}
            for k, v in kw.items():
                shapes = [(tuple(x.shape), str(x.dtype)) for x in v] if k == "inputs" else None
                rec[k] = shapes if shapes is not None else repr(v)
            out[key["call"]] = rec
            return [mx.zeros((1,))] * 6

        return kernel

    cl._build = build
    B, T, Hk, Hv, Dk, Dv, C = 2, 100, 2, 4, 128, 48, cl.CHUNK
    N, BH = -(-T // C), B * Hv
    state = mx.zeros((B, Hv, Dv, Dk))
    mask = mx.ones((B, T), mx.bool_)
    raw = (mx.zeros((B, T, Hv)), mx.zeros((B, T, Hv)), mx.zeros((Hv,)), mx.zeros((Hv,)))

    def call(name, fn, *args, **kw):
        opts = {
            k: type(x).__name__ if isinstance(x, mx.array | tuple) else x for k, x in kw.items()
        }
        key["call"] = f"launch/{name}/{args[0]}/{opts}"
        try:
            fn(*args, **kw)
        except ValueError as e:
            out[key["call"]] = {"error": str(e)}

    for backend, dt in itertools.product(BACKENDS, (mx.float32, mx.bfloat16)):
        q = mx.zeros((B, T, Hk, Dk), dt)
        v = mx.zeros((B, T, Hv, Dv), dt)
        g = mx.zeros((B, T, Hv))
        for m, gates in itertools.product((None, mask), (None, raw)):
            kw = {"raw_gates": gates, "init_value": None if m is None else 0.5}
            call(f"wy/{dt}/{m is None}", cl.wy_pass, backend, q, v, g, g, m, **kw)
            for matrix in (None, False, True):
                kw = {"raw_gates": gates, "matrix": matrix}
                call(f"prep/{dt}/{m is None}", cl.prep_kernel, backend, q, q, v, g, g, m, **kw)
        pieces = [mx.zeros((BH, N * C, w), dt) for w in (Dk, Dv, Dk)]
        gts = mx.zeros((BH, N * C, 4))
        for bv, pf in itertools.product((None, 16, 32, 64), (None, 0, 1)):
            call(f"h/{dt}", cl.h_pass, backend, *pieces, gts, state, bv=bv, prefetch=pf)
        H, Vn = mx.zeros((BH, N, Dv, Dk), dt), mx.zeros((BH, N * C, Dv), dt)
        o2 = cl.O2
        for cl.O2, y_dt in itertools.product((False, True), (dt, mx.float16)):
            call(f"o/{dt}/{y_dt}/{cl.O2}", cl.o_pass, backend, q, q, gts, H, Vn, T, Hv, y_dt)
        cl.O2 = o2
        f32 = [mx.zeros((BH, N * C, w)) for w in (Dk, Dv, Dk, C, Dk)] + [mx.zeros((BH, N, Dk))]
        for matrix, bv, pf in itertools.product((None, False, True), (None, 16, 32), (None, 1)):
            kw = {"bv": bv, "prefetch": pf, "matrix": matrix, "init_value": pf}
            call(f"state/{dt}", cl.state_pass, backend, f32, state, T, dt, **kw)
    return out


def _fold(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _dump_tree(src: Path, path: Path) -> dict:
    # the tree's src first; the rest of PYTHONPATH kept (where mlx may come from, as on the
    # GPU machine)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
    )
    cmd = [sys.executable, os.path.abspath(__file__), "dump", str(path)]
    subprocess.run(cmd, check=True, env=env, cwd=src.parent)
    return json.loads(path.read_text())


def diff(base: str, repo: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", base, "src"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        old = _dump_tree(tmp / "src", tmp / "base.json")
        new = _dump_tree(repo / "src", tmp / "new.json")
    bad = 0
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new:
            print(f"{key}: only in {'base' if key in old else 'working tree'}")
            bad += 1
            continue
        for field in old[key]:
            a, b = old[key][field], new[key].get(field)
            same = _fold(a) == _fold(b) if isinstance(a, str) else a == b
            if not same:
                bad += 1
                print(f"{key} [{field}] differs:")
                # lines with their white space folded, so that only real changes show
                fa, fb = ([_fold(x) for x in str(t).splitlines() if x.strip()] for t in (a, b))
                lines = difflib.unified_diff(fa, fb, "base", "tree", lineterm="", n=1)
                print("\n".join(lines))
    exact = sum(old[k] == new.get(k) for k in old)
    print(f"{len(old)} entries at {base}, {len(new)} in the tree; {exact} identical to the letter;")
    print(f"{bad} differ after folding white space")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out")
    c = sub.add_parser("diff")
    c.add_argument("--base", default="HEAD")
    c.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    args = p.parse_args(argv)
    if args.cmd == "dump":
        Path(args.out).write_text(json.dumps(dump(), indent=1, sort_keys=True))
        return 0
    return diff(args.base, Path(args.repo))


if __name__ == "__main__":
    sys.exit(main())
