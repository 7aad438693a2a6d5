"""Count the primitives of one decode step, by kind: ours compiled, ours plain, mlx-lm's qwen3_5.

Each primitive of a step is one entry in MLX's graph, and on MLX's CUDA backend each costs about
10 us of host time per token whatever it computes (benchmarks/NOTES.md, "H200"), so the count
is the figure to cut. Nothing is evaluated: every weight is a broadcast view of one scalar
(shapes and dtypes are all a trace needs), the caches are built filled to `--offset` positions,
one token a row is run through the model, and `mx.export_to_dot` lists the graph behind the
logits and every cache array the step wrote. Graph leaves (weights, caches, tokens) are not
counted; the few ops that build the step's small inputs outside the compiled function (the
write index, the mask of a batch) are.

This runs on the CPU, where MLX replaces some `mx.fast` primitives by their fallback graphs
(rms_norm: a Sum and a fused elementwise op or two; scaled_dot_product_attention: matmuls and a
softmax); on a GPU each of those is one primitive. So on the CPU the count is by default a GPU
estimate: those ops, our fused gated-delta kernel and the MoE experts are replaced by stand-ins
of one primitive each (`GpuStandIns`); `--raw` counts the CPU's own graph. On a GPU the count is
the device's own graph.

    python benchmarks/count_decode_ops.py                 # 0.8b, 9b, moe; batch 1
    python benchmarks/count_decode_ops.py --shapes small --batch 4 --by-kind
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import re
import sys
from pathlib import Path

# isort: off
import qwen35_mlx  # (first: its BLAS preload must precede mlx's first use)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

import qwen35_mlx.models.layers
from qwen35_mlx.models.cache import make_cache
from qwen35_mlx.models.config import TextConfig
from qwen35_mlx.models.text import TextModel

# isort: on

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import SHAPE_9B, SHAPE_SMALL  # noqa: E402
from bench_model import SHAPE_0_8B  # noqa: E402

# A 35B-A3B-like MoE shape (layer count cut: the count is per layer kind, times layers).
SHAPE_MOE = dict(
    SHAPE_0_8B,
    model_type="qwen3_5_moe_text",
    hidden_size=2048,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=2,
    linear_num_value_heads=32,
    num_experts=256,
    num_experts_per_tok=8,
    moe_intermediate_size=512,
    shared_expert_intermediate_size=512,
    norm_topk_prob=True,
    tie_word_embeddings=False,
)
SHAPES = {"0.8b": SHAPE_0_8B, "9b": SHAPE_9B, "moe": SHAPE_MOE, "small": SHAPE_SMALL}
# The graph's primitives depend on the layer structure, not on the widths: a model built with
# these narrower widths (`narrow`) has the same count, without gigabytes of fused weights.
_NARROW = dict(
    hidden_size=256,
    intermediate_size=384,
    head_dim=32,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
)


def narrow(shape: dict) -> dict:
    """`shape` with the widths of `_NARROW` (head counts, layers and layer kinds kept)."""
    return dict(shape, **{k: v for k, v in _NARROW.items() if k in shape})


_NODE = re.compile(r'\[label ="([^"]+)", shape=rectangle\]')


def _placeholder_weights(model: nn.Module, dtype: mx.Dtype) -> None:
    """Every parameter an evaluated broadcast of one scalar: its shape, no memory."""
    params = []
    for name, p in tree_flatten(model.parameters()):
        dt = mx.float32 if name.endswith("A_log") or p.dtype != mx.float32 else dtype
        if p.dtype in (mx.uint32, mx.int32):
            dt = p.dtype
        params.append((name, mx.broadcast_to(mx.zeros((), dt), p.shape)))
    mx.eval([p for _, p in params])
    model.update(tree_unflatten(params))


def build(shape: dict, which: str, dtype: mx.Dtype, vocab: int) -> nn.Module:
    shape = dict(shape, vocab_size=vocab)
    if which == "mlx-lm":
        from mlx_lm.models import qwen3_5, qwen3_5_moe

        mod = qwen3_5_moe if "moe" in shape["model_type"] else qwen3_5
        mt = "qwen3_5_moe" if "moe" in shape["model_type"] else "qwen3_5"
        model = mod.Model(mod.ModelArgs.from_dict(dict(shape, model_type=mt)))
    else:
        model = TextModel(TextConfig(**shape))
    _placeholder_weights(model, dtype)
    return model.eval()


def filled_cache(model: nn.Module, batch: int, offset: int, dtype: mx.Dtype) -> list:
    """The model's own cache, as after a prefill of `offset` tokens a row (left-padded by one
    on all rows but the first when batch > 1)."""
    pads = [0] + [1] * (batch - 1) if batch > 1 else None
    layers = model.layers
    kinds = ["linear_attention" if hasattr(x, "linear_attn") else "full_attention" for x in layers]
    cache = make_cache(kinds, left_padding=pads)  # mlx-lm's classes, for both models
    for layer, c in zip(layers, cache, strict=True):
        if hasattr(c, "keys"):  # KVCache / BatchKVCache: one block of `step` positions
            attn = layer.self_attn
            hkv = getattr(attn, "num_kv_heads", None) or attn.num_key_value_heads
            d = attn.head_dim
            cap = ((offset + c.step - 1) // c.step) * c.step
            c.keys = mx.zeros((batch, hkv, cap, d), dtype)
            c.values = mx.zeros((batch, hkv, cap, d), dtype)
            c.offset = offset
            if hasattr(c, "_idx"):
                c._idx = offset
                c.offset = mx.array([offset] * batch) - c.left_padding
        else:  # ArraysCache: conv state, recurrent state
            la = layer.linear_attn
            conv_dim = la.conv_dim
            k = la.conv_kernel_size
            hv, dv, dk = la.num_v_heads, la.head_v_dim, la.head_k_dim
            c[0] = mx.zeros((batch, k - 1, conv_dim), dtype)
            c[1] = mx.zeros((batch, hv, dv, dk), mx.float32)
            c.advance(offset)  # as the prefill did
    mx.eval([x for c in cache for x in _cache_arrays(c)])
    return cache


def _cache_arrays(c) -> list:
    if hasattr(c, "keys"):
        out = [c.keys, c.values]
        if isinstance(getattr(c, "offset", None), mx.array):
            out.append(c.offset)
        return out
    return [x for x in c.cache + [c.left_padding] if x is not None]


def count_step(model, batch: int = 1, offset: int = 10, dtype=mx.bfloat16) -> collections.Counter:
    """Primitives by kind of one decode step (one token a row) of `model` over a filled cache."""
    cache = filled_cache(model, batch, offset, dtype)
    tokens = mx.zeros((batch, 1), mx.int32)
    mx.eval(tokens)
    logits = model(tokens, cache=cache)
    outs = [logits] + [x for c in cache for x in _cache_arrays(c)]
    buf = io.StringIO()
    mx.export_to_dot(buf, *outs)
    kinds = collections.Counter()
    for label in _NODE.findall(buf.getvalue()):
        kinds["Compiled (fused elementwise)" if label.startswith("Compiled") else label] += 1
    return kinds


_UNARY = {"RMSNorm": lambda x: mx.cumsum(x, axis=-1), "RoPE": lambda x: mx.sort(x, axis=-1)}
_UNARY_LABEL = {"RMSNorm": "CumSum", "RoPE": "Sort"}


class GpuStandIns:
    """On the CPU, stand in for what a GPU runs as one primitive each: mx.fast.rms_norm, rope and
    scaled_dot_product_attention (the CPU runs their fallback graphs) and our fused gated-delta
    kernel (the CPU runs the reference ops); MoE experts take the GPU's path (SwitchGLU in the
    weights' dtype, not the CPU's float32 gather). Each stand-in is one `Depends` primitive on
    the real op's array inputs with the output's shape, so everything upstream is still counted
    and no fusion crosses it, as none crosses the GPU's primitive (without array inputs to
    depend on, a unary op of a kind no decode step has). mlx-lm's gated delta runs ops on CUDA
    (its kernel is Metal only) and is left alone. Counts the calls by name."""

    def __init__(self):
        self.calls = collections.Counter()
        self._saved = []

    def _stand_in(self, name, outs, deps):
        deps = [d for d in deps if isinstance(d, mx.array)]
        if not deps:
            # A unary primitive of its own kind (CumSum, Sort: in no decode step), counted from the
            # graph: a shapeless compiled function (the gated norm) keeps its first trace.
            return [_UNARY[name](o) for o in outs]
        self.calls[name] += 1
        return mx.depends(outs, deps)

    def __enter__(self):
        import qwen35_mlx.models.layers as layers

        fast = mx.fast
        si = self._stand_in

        def rms_norm(x, weight, eps, **kw):
            # The weight is a leaf: nothing upstream to keep (and Depends has no shape rule
            # for the shapeless compiled functions that call rms_norm).
            return si("RMSNorm", [x], [])[0]

        def rope(x, dims, *, offset=0, freqs=None, **kw):
            return si("RoPE", [x], [offset, freqs])[0]

        def sdpa(q, k, v, *, scale, mask=None, sinks=None, **kw):
            return si("ScaledDotProductAttention", [q], [k, v, mask])[0]

        def gdu(q, k, v, a, b, A_log, dt_bias, state=None, mask=None, **kw):
            B, T, _, Dk = q.shape
            Hv, Dv = v.shape[2:]
            if state is None:
                state = mx.zeros((B, Hv, Dv, Dk), mx.float32)
            y, st = si("gated_delta (fused kernel)", [v, state], [q, k, a, b, A_log, dt_bias, mask])
            return y, st

        for obj, attr, fn in (
            (fast, "rms_norm", rms_norm),
            (fast, "rope", rope),
            (fast, "scaled_dot_product_attention", sdpa),
            (layers, "gated_delta_update", gdu),
            # MoE experts: the GPU runs SwitchGLU's gather_mm in the weights' dtype.
            (layers, "_cpu_needs_fp32", lambda experts: False),
        ):
            self._saved.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, fn)
        return self

    def __exit__(self, *exc):
        for obj, attr, fn in reversed(self._saved):
            setattr(obj, attr, fn)
        self._saved.clear()


def relabel(kinds: collections.Counter, calls: collections.Counter) -> collections.Counter:
    """The nodes made by `GpuStandIns` counted under the primitive they stand for."""
    kinds = collections.Counter(kinds)
    for name, label in _UNARY_LABEL.items():
        kinds[name] += kinds.pop(label, 0)
    for name, n in calls.items():
        kinds["Depends"] -= n
        kinds[name] += n
    return +kinds


def count_all(
    shape: dict,
    which: str,
    batch=1,
    offset=10,
    dtype=mx.bfloat16,
    vocab=1024,
    stand_ins: bool | None = None,
) -> collections.Counter:
    """`count_step` of a fresh model: which is "compiled", "plain" (ours) or "mlx-lm".
    stand_ins (default: on the CPU) counts the GPU's single primitives as one (`GpuStandIns`)."""
    if stand_ins is None:
        stand_ins = mx.default_device() == mx.cpu
    model = build(shape, "mlx-lm" if which == "mlx-lm" else "ours", dtype, vocab)
    if which == "plain":
        model.compiled_decode = False
    if not stand_ins:
        return count_step(model, batch, offset, dtype)
    with GpuStandIns() as s:
        kinds = count_step(model, batch, offset, dtype)
    return relabel(kinds, s.calls)


def linear_decode_ops(shape: dict, batch: int = 1, dtype=mx.bfloat16, stand_ins=None) -> int:
    """Primitives of `layers.gated_delta_decode` alone (compiled, GPU stand-ins on the CPU): what
    a fused kernel of its signature would replace by one, per linear-attention layer."""
    import qwen35_mlx.models.layers as layers

    la = layers.GatedDeltaNet(TextConfig(**shape))
    C, K = la.conv_dim, la.conv_kernel_size
    Hv, Dv, Dk = la.num_v_heads, la.head_v_dim, la.head_k_dim
    args = [
        mx.zeros((batch, C), dtype),
        mx.zeros((batch, K - 1, C), dtype),
        mx.zeros((C, K), dtype),
        mx.zeros((batch, Hv), dtype),
        mx.zeros((batch, Hv), dtype),
        mx.zeros((Hv,), mx.float32),
        mx.zeros((Hv,), dtype),
        mx.zeros((batch, Hv, Dv, Dk), mx.float32),
    ]
    mx.eval(args)
    heads = dict(num_k_heads=la.num_k_heads, head_k_dim=Dk, num_v_heads=Hv, head_v_dim=Dv)
    step = mx.compile(lambda *a: layers.gated_delta_decode(*a, **heads))
    if stand_ins is None:
        stand_ins = mx.default_device() == mx.cpu
    with GpuStandIns() if stand_ins else contextlib.nullcontext():
        outs = step(*args)
    buf = io.StringIO()
    mx.export_to_dot(buf, *outs)
    return len(_NODE.findall(buf.getvalue()))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="primitives of one decode step, by kind")
    p.add_argument("--shapes", default="0.8b,9b,moe")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--offset", type=int, default=10, help="tokens already in the cache")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary (the count ignores it)")
    p.add_argument("--which", default="compiled,plain,mlx-lm")
    p.add_argument("--by-kind", action="store_true", help="print every kind's count")
    p.add_argument("--full-width", action="store_true", help="the real widths (see _NARROW)")
    p.add_argument("--cpu", action="store_true", help="count on the CPU (default: default device)")
    p.add_argument(
        "--raw", action="store_true", help="on the CPU, count the fallbacks as the CPU runs them"
    )
    a = p.parse_args(argv)
    if a.cpu:
        mx.set_default_device(mx.cpu)
    dtype = getattr(mx, a.dtype)
    on_cpu = mx.default_device() == mx.cpu
    how = "CPU graph" if a.raw and on_cpu else ("GPU estimate" if on_cpu else "device graph")
    result = {}
    for name in a.shapes.split(","):
        shape = SHAPES[name] if a.full_width else narrow(SHAPES[name])
        counts = {}
        for which in a.which.split(","):
            counts[which] = count_all(
                shape, which, a.batch, a.offset, dtype, a.vocab, on_cpu and not a.raw
            )
        result[name] = {w: dict(c) for w, c in counts.items()}
        n_layers = shape["num_hidden_layers"]
        print(f"{name} (layers {n_layers}, batch {a.batch}, {a.dtype}, {how}):", flush=True)
        for which, k in counts.items():
            print(f"  {which:>9}: {sum(k.values()):5d} primitives")
        if "compiled" in counts and hasattr(qwen35_mlx.models.layers, "gated_delta_decode"):
            n_lin = sum(t == "linear_attention" for t in TextConfig(**shape).layer_types)
            per = linear_decode_ops(shape, a.batch, dtype, on_cpu and not a.raw)
            fused = sum(counts["compiled"].values()) - n_lin * (per - 1)
            print(
                f"  compiled, with a one-launch gated_delta_decode kernel (its {per} primitives "
                f"now, x {n_lin} linear layers): {fused}"
            )
        if a.by_kind:
            kinds = sorted(
                set().union(*counts.values()), key=lambda x: -max(c[x] for c in counts.values())
            )
            print("  " + f"{'kind':<30}" + "".join(f"{w:>10}" for w in counts))
            for kind in kinds:
                print(
                    "  " + f"{kind:<30}" + "".join(f"{c.get(kind, 0):>10}" for c in counts.values())
                )
    return result


if __name__ == "__main__":
    main()
