"""Count the primitives of one decode step, by kind: ours compiled, ours plain, mlx-lm's qwen3_5.

Each primitive of a step is one entry in MLX's graph, and on MLX's CUDA backend each costs
1.5-10 us of host time per token whatever it computes (benchmarks/NOTES.md, "H200"), so the
count is the figure to cut. Nothing is evaluated: every weight is a broadcast view of one scalar
(shapes and dtypes are all a trace needs), the caches are built filled to `--offset` positions,
one token a row is run through the model, and `mx.export_to_dot` lists the graph behind the
logits and every cache array the step wrote. Graph leaves (weights, caches, tokens) are not
counted; the few ops that build the step's small inputs outside the compiled function (the
write index, the mask of a batch) are.

This runs on the CPU, where MLX replaces some `mx.fast` primitives by their fallback graphs
(rms_norm: a Sum and a fused elementwise op or two; scaled_dot_product_attention: matmuls and a
softmax); on a GPU each of those is one primitive. So on the CPU the count is by default a GPU
estimate: those ops, our fused gated-delta kernel and the MoE experts are replaced by stand-ins
of one primitive each (`GpuStandIns`), following MLX 0.32's rules for CUDA (`--target cuda`, the
default: its fused attention takes no array mask and head dims 64/96/128 only, so the step's
attention with head_dim 256 is MLX's fallback graph there) or Metal; `--raw` counts the CPU's own
graph. On a GPU the count is the device's own graph.

With the counts comes an estimate of the host time a token (`host_cost`): primitives by cost
class (view, one-kernel, copy, gemv, cuBLAS gemm) x MLX's host time per primitive of that class,
measured on the H200 by `probe_host_cost.py` (`COSTS_US`; `--costs <probe JSON>` for others).

    python benchmarks/count_decode_ops.py                 # 0.8b, 9b, moe; batch 1
    python benchmarks/count_decode_ops.py --shapes small --batch 4 --by-kind
"""

from __future__ import annotations

import argparse
import collections
import io
import re
import sys
from pathlib import Path

# isort: off
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

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
# these narrower widths (`narrow`) has the same count, without gigabytes of fused weights. The
# attention head_dim stays: it decides whether MLX's fused attention takes the shape.
_NARROW = dict(
    hidden_size=256,
    intermediate_size=384,
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


def count_step(
    model, batch: int = 1, offset: int = 10, dtype=mx.bfloat16, tokens: int = 1
) -> collections.Counter:
    """Primitives by kind of one decode step of `model` over a filled cache: one token a row,
    or with tokens = T > 1 the multi-token (speculative verify) step of T tokens a row."""
    cache = filled_cache(model, batch, offset, dtype)
    tokens = mx.zeros((batch, tokens), mx.int32)
    mx.eval(tokens)
    logits = model(tokens, cache=cache)
    outs = [logits] + [x for c in cache for x in _cache_arrays(c)]
    buf = io.StringIO()
    mx.export_to_dot(buf, *outs)
    kinds = collections.Counter()
    for label in _NODE.findall(buf.getvalue()):
        kinds["Compiled (fused elementwise)" if label.startswith("Compiled") else label] += 1
    return kinds


# A stand-in call counted under this suffix is a Matmul node (GpuStandIns' rows_matmul_t).
_AS_MATMUL = " [as Matmul]"
_UNARY = {"RMSNorm": lambda x: mx.cumsum(x, axis=-1), "RoPE": lambda x: mx.sort(x, axis=-1)}
_UNARY_LABEL = {"RMSNorm": "CumSum", "RoPE": "Sort"}


# head dims of MLX 0.32's fused attention kernels at decode (sdpa_vector): CUDA
# (backend/cuda/scaled_dot_product_attention.cu `supports_sdpa_vector`) takes no array mask; its
# cuDNN path takes a one-token query only without an array mask, D <= 128, >= 256 evaluated keys
# (never inside a compiled step). Metal's vector kernel takes masks and D = 256.
_SDPA_VECTOR_D = {"cuda": (64, 96, 128), "metal": (64, 96, 128, 256)}


def sdpa_fused(target: str, q, k, v, mask) -> bool:
    """Whether `mx.fast.scaled_dot_product_attention` is one primitive on `target` for these
    inputs (else MLX builds its fallback graph: scale, matmul, mask, softmax, matmul)."""
    D = q.shape[-1]
    if D != v.shape[-1] or D not in _SDPA_VECTOR_D[target]:
        return False
    if target == "cuda":
        return q.shape[2] < 4 and not isinstance(mask, mx.array)
    return q.shape[2] <= 8


class GpuStandIns:
    """On the CPU, stand in for what a GPU runs as one primitive each: mx.fast.rms_norm, rope and
    scaled_dot_product_attention where `target` (cuda or metal) runs it fused (`sdpa_fused`; the CPU
    runs their fallback graphs), our fused gated-delta kernels (the CPU runs the reference ops;
    `gated_delta_decode` as the GPU's `auto` picks); MoE experts take the GPU's path (SwitchGLU in
    the weights' dtype, not the CPU's float32 gather). Each stand-in is one `Depends` primitive on
    the real op's array inputs with the output's shape, so everything upstream is still counted and
    no fusion crosses it, as none crosses the GPU's primitive (without array inputs to depend on, a
    unary op of a kind no decode step has). mlx-lm's gated delta runs ops on CUDA (its kernel is
    Metal only) and is left alone. Counts the calls by name."""

    def __init__(self, target: str = "cuda", stand_in: bool = True, vocab: int | None = None):
        self.calls = collections.Counter()
        self._saved = []
        self.target = target
        self.stand_in = stand_in  # False: only count the attention calls MLX runs as fallbacks
        self.fallbacks = 0
        # The lm_head's decode weight has the vocabulary as a dimension (`_rows_gemv` below).
        self.vocab = vocab
        self.gemms = 0  # projections of 2+ rows left to cuBLAS (a GEMM: `host_cost`)

    def _stand_in(self, name, outs, deps):
        deps = [d for d in deps if isinstance(d, mx.array)]
        if not deps:
            # A unary primitive of its own kind (CumSum, Sort: in no decode step), counted from the
            # graph: a shapeless compiled function (the gated norm) keeps its first trace.
            return [_UNARY[name](o) for o in outs]
        self.calls[name] += 1
        return mx.depends(outs, deps)

    def __enter__(self):
        import qwen35_mlx.kernels.attention as attention_kernel
        import qwen35_mlx.kernels.attention.launch as attention_launch
        import qwen35_mlx.kernels.gated_delta as gd_kernels
        import qwen35_mlx.models.layers as layers
        import qwen35_mlx.models.text as text_lib
        from qwen35_mlx.kernels import rows_matmul as rows_kernel

        try:
            from qwen35_mlx.kernels import fused_norm
        except ImportError:  # an older tree
            fused_norm = None

        fast = mx.fast
        si = self._stand_in

        def rms_norm(x, weight, eps, **kw):
            # The weight is a leaf: nothing upstream to keep (and Depends has no shape rule
            # for the shapeless compiled functions that call rms_norm).
            return si("RMSNorm", [x], [])[0]

        def rope(x, dims, *, offset=0, freqs=None, **kw):
            return si("RoPE", [x], [offset, freqs])[0]

        def sdpa(q, k, v, *, scale, mask=None, sinks=None, **kw):
            if not sdpa_fused(self.target, q, k, v, mask):
                # MLX runs its fallback graph there; the CPU runs the same one.
                self.fallbacks += 1
                return real["sdpa"](q, k, v, scale=scale, mask=mask, sinks=sinks, **kw)
            return si("ScaledDotProductAttention", [q], [k, v, mask])[0]

        def gdd(qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, **kw):
            # The one-launch decode kernel up to _CONV_KERNEL_MAX_B rows; above, the conv in
            # ops and the recurrent kernel (stood in by `gdu` below).
            if qkv.shape[0] > gd_kernels._CONV_KERNEL_MAX_B:
                return real["gdd"](qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, **kw)
            B, Hv = a.shape
            Dv, Dk = kw["head_v_dim"], kw["head_k_dim"]
            if state is None:
                state = mx.zeros((B, Hv, Dv, Dk), mx.float32)
            if conv_state is None:
                conv_state = mx.zeros((B, conv_w.shape[1] - 1, qkv.shape[1]), qkv.dtype)
            y = mx.zeros((B, Hv, Dv), qkv.dtype)
            deps = [qkv, conv_w, a, b, A_log, dt_bias, kw.get("mask"), kw.get("z")]
            deps.append(kw.get("norm_weight"))
            return tuple(si("gated_delta_decode (kernel)", [y, state, conv_state], deps))

        def gdp(proj, conv_state, conv_w, A_log, dt_bias, state, norm_weight, *, tokens, **kw):
            # The packed T-token decode kernel (the fused in-projection read in place): one
            # launch with its per-token states; the ops path above _CONV_KERNEL_MAX_B rows.
            B = proj.shape[0] // tokens
            if B > gd_kernels._CONV_KERNEL_MAX_B:
                args = (proj, conv_state, conv_w, A_log, dt_bias, state, norm_weight)
                return real["gdp"](*args, tokens=tokens, **kw)
            Hv, Dv, Dk = kw["num_v_heads"], kw["head_v_dim"], kw["head_k_dim"]
            C = proj.shape[1] - Hv * Dv - 2 * Hv
            if state is None:
                state = mx.zeros((B, Hv, Dv, Dk), mx.float32)
            if conv_state is None:
                conv_state = mx.zeros((B, conv_w.shape[1] - 1, C), proj.dtype)
            # (proj as columns [B*T, N, 1]: y as columns, as the kernel gives it)
            outs = [mx.zeros((B * tokens, Hv * Dv, *proj.shape[2:]), proj.dtype), state, conv_state]
            if tokens > 1:  # per-token states: [(T-1) B, ...] rows, or stacked [T-1, B, ...]
                lead = (tokens - 1, B) if kw.get("stacked") else ((tokens - 1) * B,)
                outs += [mx.zeros((*lead, *state.shape[1:]), mx.float32)]
                outs += [mx.zeros((*lead, *conv_state.shape[1:]), proj.dtype)]
            deps = [proj, conv_w, A_log, dt_bias, norm_weight, kw.get("mask")]
            outs = si("gated_delta_decode (kernel)", outs, deps)
            return outs[0], outs[1], outs[2], (tuple(outs[3:]) if tokens > 1 else None)

        def gdu(q, k, v, a, b, A_log, dt_bias, state=None, mask=None, **kw):
            B, T, _, Dk = q.shape
            Hv, Dv = v.shape[2:]
            if state is None:
                state = mx.zeros((B, Hv, Dv, Dk), mx.float32)
            y, st = si("gated_delta (fused kernel)", [v, state], [q, k, a, b, A_log, dt_bias, mask])
            return y, st

        def add_rms_norm(x, d, w, eps):
            # One kernel (kernels/fused_norm.py) returning the sum and its norm (x and d stand
            # for both: no placeholder arrays, which would add a Full and a Broadcast).
            return tuple(si("add_rms_norm (kernel)", [x, d], [x, d, w]))

        def swiglu(gu):
            # (its placeholder output adds a Full and a Broadcast the device has not: 2 in all)
            out = mx.zeros((*gu.shape[:-1], gu.shape[-1] // 2), gu.dtype)
            return si("swiglu (kernel)", [out], [gu])[0]

        class AttentionKernel:
            """Our decode attention kernel pair (kernels/attention): a split pass and a combine,
            one primitive each."""

            def run(self, q, k, v, start, scale, mask=None, causal=False, gate=None, **gate_at):
                # (gate_at: gate_offset, gate_head_stride: where the combine reads the gate)
                B, Hq, T, D = q.shape
                part = mx.zeros((B * Hq * T, 1, D), mx.float32)
                part = si("attention decode split pass (kernel)", [part], [q, k, v, start, mask])
                out = mx.zeros((B, T, Hq * D), q.dtype)
                return si("attention decode combine (kernel)", [out], [part[0], gate])[0]

        def kernel_backend(q, k, v):
            # As the real rule: the kernel on CUDA (DECODE_KERNEL "auto"/"on"), on Metal only
            # when switched "on", where the shape is one it takes.
            on = attention_kernel.DECODE_KERNEL
            use = on == "on" or (on == "auto" and self.target == "cuda")
            return AttentionKernel() if use and attention_launch.shape_supported(q, k, v) else None

        def rows_take(rows, w):
            # A few rows (a verify pass) as one gemv a row (`layers.ROWS_GEMV` "auto") on CUDA:
            # the 0.8B rule at these narrow widths, every dense projection but the lm_head
            # ((R - 1) x its 508 MB is over ROWS_GEMV_MAX_BYTES); the others are cuBLAS GEMMs.
            if rows < 2 or w.ndim != 2:
                return False
            if layers.ROWS_GEMV != "auto":
                return bool(layers.ROWS_GEMV)
            take = self.target == "cuda" and rows <= layers.ROWS_GEMV_MAX_ROWS
            return take and self.vocab not in w.shape

        def rows_gemv(x, w):
            # (a matmul of the step: the ones of 2+ rows not taken row-wise are counted)
            rows = x.size // x.shape[-1] if x.ndim else 0
            take = rows_take(rows, w)
            self.gemms += rows > 1 and not take
            return take

        def rows_kernel_available(dtype):
            # The few-rows kernel (`layers.ROWS_KERNEL`) exists on both targets.
            return dtype in (mx.bfloat16, mx.float16, mx.float32)

        def rows_matmul_t(x, w_t, out_shape=None):
            # One launch: rows in, rows out. x @ w_t is one primitive of that shape (no
            # placeholder: a product a projection, so none would add 2 x 96 nodes to a pass).
            K, N = w_t.shape
            R = x.size // K
            if x.ndim == 2 and out_shape in (None, (R, N)):
                self.calls["rows_matmul (kernel)" + _AS_MATMUL] += 1
                return x @ w_t
            shape = out_shape or (*x.shape[:-2], R, N) if x.shape[-1] == 1 else (R, N)
            out = mx.zeros(shape, x.dtype)
            return si("rows_matmul (kernel)", [out], [x, w_t])[0]

        real = {"sdpa": fast.scaled_dot_product_attention, "gdd": layers.gated_delta_decode}
        real["gdp"] = getattr(layers, "gated_delta_decode_packed", None)
        if not self.stand_in:

            def counting_sdpa(q, k, v, *, mask=None, **kw):
                self.fallbacks += not sdpa_fused(self.target, q, k, v, mask)
                return real["sdpa"](q, k, v, mask=mask, **kw)

            self._saved.append((fast, "scaled_dot_product_attention", real["sdpa"]))
            fast.scaled_dot_product_attention = counting_sdpa
            return self
        for obj, attr, fn in (
            (fast, "rms_norm", rms_norm),
            (fast, "rope", rope),
            (fast, "scaled_dot_product_attention", sdpa),
            (layers, "gated_delta_update", gdu),
            (gd_kernels, "gated_delta_update", gdu),
            (layers, "gated_delta_decode", gdd),
            # Decode attention: our kernel pair where the target runs it (else MLX's sdpa above).
            (attention_kernel, "kernel_backend", kernel_backend),
            (layers, "gated_delta_decode_packed", gdp),
            # MoE experts: the GPU runs SwitchGLU's gather_mm in the weights' dtype.
            (layers, "_cpu_needs_fp32", lambda experts: False),
            # Residual adds folded into AddMM as on the target (layers.FOLD_RESIDUAL "auto").
            (layers, "_fold_auto", lambda rows: rows > 1 or self.target != "cuda"),
            # A verify pass's projections as the target runs them (ROWS_GEMV "auto").
            (layers, "_rows_gemv", rows_gemv),
            (layers, "_rows_take", rows_take),
            # The GPU's weight layout and products: no CPU-only transposed storage, native
            # row products or float32 copies (`text.CPU_FP32_DECODE`), each of which changes
            # the step's graph (a verify pass's row-wise products are the GPU's only so).
            (layers, "CPU_TRANSPOSED_WEIGHTS", False),
            (layers, "CPU_NATIVE_MATMUL", False),
            (text_lib, "CPU_FP32_DECODE", None),
            (rows_kernel, "kernel_available", rows_kernel_available),
            (rows_kernel, "rows_matmul_t", rows_matmul_t),
            # The fused add + RMSNorm and swiglu kernels run on both targets.
            (fused_norm, "kernel_available", lambda x: True),
            (fused_norm, "add_rms_norm", add_rms_norm),
            (fused_norm, "swiglu", swiglu),
        ):
            if hasattr(obj, attr):  # (an older tree may lack one: counted as it is)
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
        if name.endswith(_AS_MATMUL):  # stood in by a Matmul, not a Depends
            kinds["Matmul"] -= n
            kinds[name[: -len(_AS_MATMUL)]] += n
            continue
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
    target: str = "cuda",
    tokens: int = 1,
) -> collections.Counter:
    """`count_step` of a fresh model: which is "compiled", "plain" (ours) or "mlx-lm".
    stand_ins (default: on the CPU) counts the GPU's single primitives as one (`GpuStandIns`,
    for `target`). With stand-ins the result also holds "(attention fallbacks)": how many
    attention calls took MLX's fallback graph (not a primitive: `host_cost` reads it)."""
    if stand_ins is None:
        stand_ins = mx.default_device() == mx.cpu
    model = build(shape, "mlx-lm" if which == "mlx-lm" else "ours", dtype, vocab)
    if which == "plain":
        model.compiled_decode = False
    if not stand_ins:  # the device's own graph; only the attention fallbacks are counted
        with GpuStandIns(target, stand_in=False) as s:
            kinds = count_step(model, batch, offset, dtype, tokens)
        kinds[FALLBACKS] = s.fallbacks
        return +kinds
    with GpuStandIns(target, vocab=vocab) as s:
        kinds = count_step(model, batch, offset, dtype, tokens)
    kinds = relabel(kinds, s.calls)
    kinds[FALLBACKS] = s.fallbacks
    kinds[GEMMS] = s.gemms
    return +kinds


def _mlp_as_identity():
    """A context in which the MLP / MoE blocks of the compiled steps compute nothing (their
    input, plus the residual where they would add it): the count without them."""
    import contextlib

    import qwen35_mlx.models.layers as layers

    def identity(self, x, residual=None):
        return x if residual is None else residual + x

    @contextlib.contextmanager
    def ctx():
        saved = [(c, c.step) for c in (layers.MLP, layers.SparseMoeBlock)]
        try:
            for c, _ in saved:
                c.step = identity
            yield
        finally:
            for c, f in saved:
                c.step = f

    return ctx()


def count_parts(shape: dict, tokens: int = 1, **kw) -> dict:
    """Primitives of the compiled step (one token, or the verify step of `tokens`) by part:
    "linear layer" (the gated-delta mixer, its norms and residual adds), "attention layer" (the
    same for full attention), "MLP / MoE" (a layer's), "embedding, head, fixed" (the rest:
    embedding, the attention mask all layers share, final norm, lm_head, the step's inputs).
    Counted by differences of small stacks of the shape's layer kinds: [linear], [linear,
    linear], [linear, attention], [linear, attention, attention], the first two also without
    the MLP blocks."""

    def n(types: list[str], mlp: bool = True) -> collections.Counter:
        s = dict(shape, num_hidden_layers=len(types), layer_types=types)
        s.pop("full_attention_interval", None)
        if mlp:
            return count_all(s, "compiled", tokens=tokens, **kw)
        with _mlp_as_identity():
            return count_all(s, "compiled", tokens=tokens, **kw)

    lin, full = "linear_attention", "full_attention"
    one, two, mixed, mixed2 = n([lin]), n([lin, lin]), n([lin, full]), n([lin, full, full])
    one_bare, two_bare = n([lin], False), n([lin, lin], False)
    layer_lin = two - one
    mlp = layer_lin - (two_bare - one_bare)
    layer_attn = mixed2 - mixed
    parts = {
        "linear layer": layer_lin - mlp,
        "attention layer": layer_attn - mlp,
        "MLP / MoE": mlp,
        "embedding, head, fixed": mixed - layer_lin - layer_attn,
    }
    return {k: +collections.Counter({x: y for x, y in v.items() if x not in _PSEUDO})
            for k, v in parts.items()}  # fmt: skip


def parts_lines(shape: dict, by_tokens: dict) -> list[str]:
    """A table of `count_parts` results ({label: parts}), per part and for the whole stack."""
    types = shape.get("layer_types") or TextConfig(**dict(shape, vocab_size=8)).layer_types
    n_lin = sum(t == "linear_attention" for t in types)
    times = {"linear layer": n_lin, "attention layer": len(types) - n_lin}
    times.update({"MLP / MoE": len(types), "embedding, head, fixed": 1})
    lines = ["  " + f"{'part (x count)':<28}" + "".join(f"{w:>12}" for w in by_tokens)]
    totals = collections.Counter()
    for part, k in times.items():
        cells = []
        for label, parts in by_tokens.items():
            c = sum(parts[part].values())
            totals[label] += c * k
            cells.append(f"{c:>5} x{k:<2} ")
        lines.append("  " + f"{part:<28}" + "".join(f"{x:>12}" for x in cells))
    lines.append("  " + f"{'total':<28}" + "".join(f"{totals[w]:>12}" for w in by_tokens))
    for part in times:
        kinds = set().union(*(p[part] for p in by_tokens.values()))
        diff = {x: [p[part].get(x, 0) for p in by_tokens.values()] for x in sorted(kinds)}
        diff = {x: v for x, v in diff.items() if len(set(v)) > 1}
        if diff:
            lines.append(f"    {part}, kinds that differ: " + ", ".join(
                f"{x} {'/'.join(map(str, v))}" for x, v in diff.items()))  # fmt: skip
    return lines


# --- Host cost model: primitives by kind x MLX's host time per primitive of that class ---
#
# Classes and their host cost per primitive in us, on the H200 (MLX 0.32.4 CUDA, 2026-12-01,
# `probe_host_cost.py`, results/probe_host_cost_h200_20261201.json) where measured:
#   view    1.5  reshape (measured): no kernel, a new array sharing its input's buffer
#   kernel  2.6  mx.fast.rms_norm (measured): one kernel node in MLX's CUDA graph; assumed the
#                same for every one-kernel primitive (elementwise, fused `Compiled`, reductions,
#                softmax, rope, our custom kernels, gather)
#   copy    6.8  half of slice + concatenate (measured 13.6 a pair): MLX's copy dispatch
#                (concatenate, contiguous, slice updates, casts)
#   gemv    2.6  a matmul with one row and a transposed weight (MLX's own gemv kernel, one
#                kernel node; not measured: assumed `kernel`)
#   gemm   10.0  a cuBLAS matmul (measured: [1, 256] @ [256, 256], not transposed): cuBLAS is
#                captured into a child graph per call. Every matmul at batch > 1, an AddMM at
#                any batch (MLX's CUDA AddMM never takes gemv), the attention fallback's
#                scores @ values at batch 1 (its values are not transposed).
# `probe_host_cost.py` measures every class (`--costs` reads its JSON).
FALLBACKS = "(attention fallbacks)"
GEMMS = "(cuBLAS matmuls of 2+ rows)"  # at batch 1, a verify pass's matmuls not taken row-wise
_PSEUDO = (FALLBACKS, GEMMS)  # counts about primitives, not primitives
COSTS_US = {"view": 1.5, "kernel": 2.6, "copy": 6.8, "gemv": 2.6, "gemm": 10.0}
_VIEWS = {
    "Reshape", "Slice", "Squeeze", "ExpandDims", "Transpose", "Broadcast", "Split",
    "Unflatten", "Flatten", "AsStrided", "Depends", "StopGradient", "BroadcastAxes",
}  # fmt: skip
_COPIES = {"Concatenate", "Contiguous", "SliceUpdate", "DynamicSliceUpdate", "AsType", "Copy"}
_MATMULS = {"Matmul", "AddMM", "GatherMM", "QuantizedMatmul", "GatherQMM"}


def cost_class(kind: str, batch: int) -> str:
    if kind in _VIEWS:
        return "view"
    if kind in _COPIES:
        return "copy"
    if kind == "Matmul" and batch == 1:
        return "gemv"
    if kind in _MATMULS:
        return "gemm"
    return "kernel"


def host_cost(kinds: dict, batch: int, costs: dict | None = None) -> dict:
    """{class: (primitives, us)} and "total" of one step's `kinds` (from `count_all`). At batch 1
    one matmul of each attention fallback is cuBLAS (`gemm`), the others gemv."""
    costs = dict(COSTS_US, **(costs or {}))
    out = collections.defaultdict(int)
    for kind, n in kinds.items():
        if kind not in _PSEUDO:
            out[cost_class(kind, batch)] += n
    if batch == 1:
        moved = min(kinds.get(FALLBACKS, 0) + kinds.get(GEMMS, 0), out["gemv"])
        out["gemv"] -= moved
        out["gemm"] += moved
    table = {c: (n, n * costs[c]) for c, n in out.items() if n}
    table["total"] = (sum(n for n, _ in table.values()), sum(u for _, u in table.values()))
    return table


def load_costs(path: Path) -> dict:
    """Per-class costs from a `probe_host_cost.py` JSON (rows with a `class` and `us_per_op`)."""
    import json

    rows = json.loads(Path(path).read_text()).get("rows")
    if not rows:
        raise SystemExit(f"{path}: no per-kind rows (run probe_host_cost.py with --kinds or none)")
    by_class = collections.defaultdict(list)
    for r in rows:
        if r.get("class") in COSTS_US:
            by_class[r["class"]].append(r["us_per_op"])
    return {c: sum(v) / len(v) for c, v in by_class.items()}  # the mean of the class's kinds


def cost_lines(counts: dict, batch: int, costs: dict | None = None) -> list[str]:
    """The cost table of `counts` ({which: kinds}) as text lines."""
    tables = {w: host_cost(k, batch, costs) for w, k in counts.items()}
    c = dict(COSTS_US, **(costs or {}))
    lines = ["  " + f"{'class (us each)':<18}" + "".join(f"{w:>18}" for w in tables)]
    for cls in [*COSTS_US, "total"]:
        label = f"{cls} ({c[cls]:.3g})" if cls in c else "total"
        cells = []
        for t in tables.values():
            n, us = t.get(cls, (0, 0.0))
            cells.append(f"{n:>6} {us:>8.0f} us")
        lines.append("  " + f"{label:<18}" + "".join(f"{x:>18}" for x in cells))
    return lines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="primitives of one decode step, by kind")
    p.add_argument("--shapes", default="0.8b,9b,moe")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--offset", type=int, default=10, help="tokens already in the cache")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary (the count ignores it)")
    p.add_argument("--which", default="compiled,plain,mlx-lm")
    p.add_argument(
        "--tokens", type=int, default=1, help="tokens a row: > 1 counts the verify step (MTP)"
    )
    p.add_argument("--by-kind", action="store_true", help="print every kind's count")
    p.add_argument(
        "--rows-views",
        action="store_true",
        help="the verify pass's row-wise products with their views made in the step "
        "(layers.ROWS_PREBUILT False: as before session 8)",
    )
    p.add_argument(
        "--packed-columns",
        action="store_true",
        help="the verify pass's linear layers with layers.PACKED_COLUMNS (the in-projection to "
        "the kernel and y back as columns)",
    )
    p.add_argument(
        "--parts",
        action="store_true",
        help="the compiled step and the verify step of --tokens (default 2) by part: linear "
        "layer, attention layer, MLP / MoE, embedding and head",
    )
    p.add_argument("--full-width", action="store_true", help="the real widths (see _NARROW)")
    p.add_argument("--cpu", action="store_true", help="count on the CPU (default: default device)")
    p.add_argument(
        "--raw", action="store_true", help="on the CPU, count the fallbacks as the CPU runs them"
    )
    p.add_argument(
        "--target",
        default="cuda",
        choices=["cuda", "metal"],
        help="the GPU whose fused attention rules the CPU estimate follows",
    )
    p.add_argument(
        "--costs",
        type=Path,
        default=None,
        help="per-class host costs from a probe_host_cost.py JSON (default: COSTS_US)",
    )
    a = p.parse_args(argv)
    if a.rows_views:
        import qwen35_mlx.models.layers as layers

        layers.ROWS_PREBUILT = False
    if a.packed_columns:
        import qwen35_mlx.models.layers as layers

        layers.PACKED_COLUMNS = True
    if a.cpu:
        mx.set_default_device(mx.cpu)
    dtype = getattr(mx, a.dtype)
    on_cpu = mx.default_device() == mx.cpu
    how = "device graph" if not on_cpu else ("CPU graph" if a.raw else f"{a.target} estimate")
    costs = load_costs(a.costs) if a.costs else None
    result = {}
    if a.parts:
        T = a.tokens if a.tokens > 1 else 2
        for name in a.shapes.split(","):
            shape = SHAPES[name] if a.full_width else narrow(SHAPES[name])
            kw = dict(batch=a.batch, offset=a.offset, dtype=dtype, vocab=a.vocab)
            kw.update(stand_ins=on_cpu and not a.raw, target=a.target)
            by = {"step": count_parts(shape, 1, **kw), f"verify T={T}": count_parts(shape, T, **kw)}
            print(f"{name} (batch {a.batch}, {a.dtype}, {how}), primitives by part:")
            for line in parts_lines(shape, by):
                print(line)
            result[name] = {w: {k: dict(v) for k, v in p.items()} for w, p in by.items()}
        return result
    for name in a.shapes.split(","):
        shape = SHAPES[name] if a.full_width else narrow(SHAPES[name])
        counts = {}
        for which in a.which.split(","):
            stand = on_cpu and not a.raw
            counts[which] = count_all(
                shape, which, a.batch, a.offset, dtype, a.vocab, stand, a.target, a.tokens
            )
        result[name] = {
            w: {"kinds": dict(c), "host_us": host_cost(c, a.batch, costs)}
            for w, c in counts.items()
        }
        n_layers = shape["num_hidden_layers"]
        step = f"{a.tokens} tokens a row, " if a.tokens > 1 else ""
        print(f"{name} (layers {n_layers}, batch {a.batch}, {step}{a.dtype}, {how}):", flush=True)
        for which, k in counts.items():
            n = sum(v for kind, v in k.items() if kind not in _PSEUDO)
            print(f"  {which:>9}: {n:5d} primitives")
        print("  estimated host time a token (primitives x cost per class):")
        for line in cost_lines(counts, a.batch, costs):
            print(line)
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
