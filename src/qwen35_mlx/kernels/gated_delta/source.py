"""Fused gated-delta GPU kernel bodies, written once for Metal and CUDA.

Per step t, per value head h (key head h // (Hv // Hk)), per value row i of the state:
    S_i *= g_t;  delta_i = (v_ti - S_i . k_t) * beta_t;  S_i += delta_i k_t;  y_ti = S_i . q_t

Shapes: q, k [B, T, Hk, Dk]; v, y [B, T, Hv, Dv]; g [B, T, Hv] or [B, T, Hv, Dk]; beta, a, b
[B, T, Hv]; A_log, dt_bias [Hv]; state [B, Hv, Dv, Dk] fp32 (Dk contiguous); mask [B, T] bool.

Layout: a group of L lanes of one 32-lane SIMD-group / warp owns one value row of the state and
keeps it in registers for all T steps; a warp holds 32 / L rows, a threadgroup W warps of one
head. Lane `sub` of a row group holds the float4 column chunks sub, sub + L, sub + 2L, ... so each
float4 load of the warp reads whole 32-byte sectors (coalesced); the row sums S_i . k and S_i . q
are reduced over the L lanes with xor shuffles. Rows past Dv are clamped for loads and never
stored, but still take part in the shuffles. q and k are read from their key head in place.
The next step's inputs are loaded before the current step is computed (software pipelining),
and the step loop has no branch (the last load is clamped), so the compiler can interleave it.

The bodies are plain C++ over these helpers, which `metal.py` / `cuda.py` define:
    gd_lane        lane in the SIMD-group / warp (0..31)     (source prologue)
    gd_row_group   warp index along the value rows           (source prologue)
    gd_head        b * Hv + h                                (source prologue)
    gd_group_sum<W>(x)     sum over W adjacent lanes (W a power of two <= 32)
    gd_load_f4(p) / gd_store_f4(p, x, y, z, w)   16-byte fp32 load / store
    gd_exp(x), gd_log(x)   fp32 exp / natural log
    gd_prefetch(p)         hint: bring the line at p towards the cache (may be a no-op)
Compile-time template arguments: Dk, L (lanes per value row), P (prefetch distance), YT (y's
dtype). Hk, Hv, Dv and T
are read from the input shapes, so one compiled kernel serves every head count and length.

References: mlx-lm `models/gated_delta.py` (the one-warp-per-row Metal kernel);
flash-linear-attention `fla/ops/gated_delta_rule/fused_recurrent.py`.
"""

from __future__ import annotations

from functools import cache

GATES = ("scalar", "per_key", "fused")


def kernel_name(gate: str, mask: bool) -> str:
    """Kernel `name=` with its structural variant, e.g. `gated_delta_step_fused_mask`."""
    return "gated_delta_step" + ("" if gate == "scalar" else f"_{gate}") + ("_mask" if mask else "")


def input_names(gate: str, mask: bool) -> list[str]:
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    gates = ["a", "b", "A_log", "dt_bias"] if gate == "fused" else ["g", "beta"]
    return ["q", "k", "v", *gates, "state_in"] + (["mask"] if mask else [])


OUTPUT_NAMES = ["y", "state_out"]


def _gate_parts(gate: str) -> dict[str, str]:
    """Snippets for one gate variant.

    decl: the *_nx registers; load: read step t_ld's raw gate inputs into them; finish: turn
    raw inputs into the decay g and beta (fused gating only); cur: copy to the step being
    computed; decay: the factor of state element i.
    """
    if gate == "per_key":
        return {
            "decl": "float g_nx[N];\n  float b_nx;",
            "load": """#pragma unroll
    for (int c = 0; c < C; ++c) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        g_nx[4 * c + e] = static_cast<float>(g[(h_ld * Dk) + col0 + c * 4 * L + e]);
      }
    }
    b_nx = static_cast<float>(beta[h_ld]);""",
            "finish": "",
            "cur": "float g_cu[N];\n    #pragma unroll\n"
            "    for (int i = 0; i < N; ++i) g_cu[i] = g_nx[i];\n    const float b_cu = b_nx;",
            "decay": "g_cu[i]",
            "setup": "",
        }
    if gate == "scalar":
        return {
            "decl": "float g_nx;\n  float b_nx;",
            "load": "g_nx = static_cast<float>(g[h_ld]);\n"
            "    b_nx = static_cast<float>(beta[h_ld]);",
            "finish": "",
            "cur": "const float g_cu = g_nx;\n    const float b_cu = b_nx;",
            "decay": "g_cu",
            "setup": "",
        }
    # Fused gating: beta = sigmoid(b), g = exp(-exp(A_log) * softplus(a + dt_bias)) in fp32,
    # softplus(x) = max(x, 0) + log(1 + exp(-|x|)). The raw inputs of step t + 1 are loaded
    # before step t is computed and transformed after it, off the state's dependency chain.
    return {
        "decl": "float g_nx;\n  float b_nx;",
        "load": "g_nx = static_cast<float>(a[h_ld]) + dt_bias_h;\n"
        "    b_nx = static_cast<float>(b[h_ld]);",
        "finish": """{
      const float sp = (g_nx > 0.0f ? g_nx : 0.0f) +
          gd_log(1.0f + gd_exp(g_nx > 0.0f ? -g_nx : g_nx));
      g_nx = gd_exp(-A_h * sp);
      b_nx = 1.0f / (1.0f + gd_exp(-b_nx));
    }""",
        "cur": "const float g_cu = g_nx;\n    const float b_cu = b_nx;",
        "decay": "g_cu",
        "setup": """const float A_h = gd_exp(static_cast<float>(A_log[hv]));
  const float dt_bias_h = static_cast<float>(dt_bias[hv]);""",
    }


def recurrent_body(gate: str, mask: bool) -> str:
    """The recurrent kernel body (decode T=1 and prefill) for one structural variant."""
    input_names(gate, mask)  # validates gate
    p = _gate_parts(gate)
    load = _load(p["load"], "m_nx = mask[size_t(b_idx) * T + t_ld];" if mask else "")
    step = f"""float kv[4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
      #pragma unroll
      for (int i = 0; i < N; ++i) {{
        s[i] *= {p["decay"]};
        kv[i % 4] += s[i] * k_cu[i];
      }}
      const float kv_row = gd_group_sum<L>((kv[0] + kv[1]) + (kv[2] + kv[3]));
      const float delta = (v_cu - kv_row) * b_cu;
      float o[4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
      #pragma unroll
      for (int i = 0; i < N; ++i) {{
        s[i] += k_cu[i] * delta;
        o[i % 4] += s[i] * q_cu[i];
      }}
      out = gd_group_sum<L>((o[0] + o[1]) + (o[2] + o[3]));"""
    if mask:
        # Padding (mask False) skips the step: state unchanged, y = 0. The branch is uniform
        # over the threadgroup (one batch row), so the shuffles inside stay converged.
        step = f"if (m_cu) {{\n      {step}\n    }}"
    return f"""
  // Template: Dk (multiple of 4 * L), L (lanes per value row), P (prefetch distance in steps,
  // 0 = none), YT (y dtype). Hk, Hv, Dv and T come from the input shapes.
  constexpr int R = 32 / L;        // value rows per SIMD-group / warp
  constexpr int C = Dk / (4 * L);  // float4 column chunks per lane
  constexpr int N = 4 * C;         // state elements per lane
  const int T = q_shape[1];
  const int Hk = q_shape[2];
  const int Hv = v_shape[2];
  const int Dv = v_shape[3];

  const unsigned head = gd_head;  // b * Hv + hv
  const unsigned b_idx = head / Hv;
  const unsigned hv = head % Hv;
  const unsigned hk = hv / (Hv / Hk);
  const unsigned sub = gd_lane % L;
  const unsigned row = gd_row_group * R + gd_lane / L;
  const bool row_ok = row < unsigned(Dv);
  const unsigned dv = row_ok ? row : unsigned(Dv - 1);
  const unsigned col0 = sub * 4;  // first column of this lane; chunk c adds c * 4 * L
  {p["setup"]}

  // state_in, state_out: [B, Hv, Dv, Dk]
  const size_t s_off = (size_t(head) * Dv + dv) * Dk + col0;
  float s[N];
  #pragma unroll
  for (int c = 0; c < C; ++c) {{
    const float4 x = gd_load_f4(state_in + s_off + c * 4 * L);
    s[4 * c] = x.x;
    s[4 * c + 1] = x.y;
    s[4 * c + 2] = x.z;
    s[4 * c + 3] = x.w;
  }}

  // q, k: [B, T, Hk, Dk]; v, y: [B, T, Hv, Dv]; g, beta, a, b: [B, T, Hv(, Dk)]; mask: [B, T]
  const size_t qk_step = size_t(Hk) * Dk;
  const size_t vy_step = size_t(Hv) * Dv;
  const size_t qk0 = (size_t(b_idx) * T * Hk + hk) * Dk + col0;
  const size_t vy0 = (size_t(b_idx) * T * Hv + hv) * Dv + dv;
  const size_t h0 = size_t(b_idx) * T * Hv + hv;

  // Registers for the step after the one being computed (software pipelining).
  float k_nx[N];
  float q_nx[N];
  float v_nx;
  {p["decl"]}
  {"bool m_nx;" if mask else ""}
  {{
    const int t_ld = 0;
    {load}
    {p["finish"]}
  }}
  for (int t = 0; t < T; ++t) {{
    float k_cu[N];
    float q_cu[N];
    #pragma unroll
    for (int i = 0; i < N; ++i) {{
      k_cu[i] = k_nx[i];
      q_cu[i] = q_nx[i];
    }}
    const float v_cu = v_nx;
    {p["cur"]}
    {"const bool m_cu = m_nx;" if mask else ""}
    // Load step t + 1 (clamped: the last iteration reloads step t, so the body needs no branch).
    const int t_ld = t + 1 < T ? t + 1 : t;
    {load}
    if (P > 0 && t + P < T) {{
      // Pull step t + P's k, q and v towards the cache (a no-op where unsupported).
      #pragma unroll
      for (int c = 0; c < C; ++c) {{
        gd_prefetch(k + qk0 + size_t(t + P) * qk_step + c * 4 * L);
        gd_prefetch(q + qk0 + size_t(t + P) * qk_step + c * 4 * L);
      }}
      gd_prefetch(v + vy0 + size_t(t + P) * vy_step);
    }}

    float out = 0.0f;
    {step}
    if (sub == 0 && row_ok) {{
      y[vy0 + size_t(t) * vy_step] = static_cast<YT>(out);
    }}
    {p["finish"]}
  }}

  if (row_ok) {{
    #pragma unroll
    for (int c = 0; c < C; ++c) {{
      const int j = 4 * c;
      gd_store_f4(state_out + s_off + c * 4 * L, s[j], s[j + 1], s[j + 2], s[j + 3]);
    }}
  }}
"""


def _load(gate_load: str, mask_load: str) -> str:
    # Reads step t_ld's inputs into the *_nx registers.
    return f"""{{
    const size_t qk_ld = qk0 + size_t(t_ld) * qk_step;
    const size_t h_ld = h0 + size_t(t_ld) * Hv;
    #pragma unroll
    for (int c = 0; c < C; ++c) {{
      #pragma unroll
      for (int e = 0; e < 4; ++e) {{
        k_nx[4 * c + e] = static_cast<float>(k[qk_ld + c * 4 * L + e]);
        q_nx[4 * c + e] = static_cast<float>(q[qk_ld + c * 4 * L + e]);
      }}
    }}
    v_nx = static_cast<float>(v[vy0 + size_t(t_ld) * vy_step]);
    {gate_load}
    {mask_load}
    }}"""


def variants() -> list[tuple[str, bool]]:
    """Every structural variant (gate kind, has mask)."""
    return [(gate, mask) for gate in GATES for mask in (False, True)]


# Host side: shapes the kernels take and the launch geometry the bodies assume.

MAX_DK = 256


def shape_supported(q, v, g) -> bool:
    """Valid shapes the kernels run: Dk a multiple of 32 up to 256, T >= 1, float inputs."""
    import mlx.core as mx

    if q.ndim != 4 or v.ndim != 4:
        return False
    B, T, _, Dk = q.shape
    if T < 1 or B < 1 or v.shape[3] < 1 or Dk % 32 or not 32 <= Dk <= MAX_DK:
        return False
    return all(mx.issubdtype(x.dtype, mx.floating) for x in (q, v, g))


def default_layout(Dk: int, T: int, heads: int) -> tuple[int, int, int]:
    """(lanes per value row, warps per threadgroup, prefetch distance) for Dk and T, with
    heads = B * Hv: the fastest measured on an H100 at Dk = 128 (benchmarks/NOTES.md).
    Lanes always divide Dk / 4, since Dk is a multiple of 32."""
    wide = Dk % 64 == 0
    if T == 1:
        return (8 if heads > 256 or not wide else 16), 4, 0
    return (16 if wide else 8), 1, 0


# Above this T, gated_delta_update computes the gates with one fused elementwise kernel and runs
# the scalar-gate kernel: the in-kernel gate math, repeated by every warp of a head, costs more
# than that extra dispatch (benchmarks/NOTES.md).
FUSED_GATES_MAX_T = 64


def launch(kernel, inputs, q, v, *, lanes=None, warps=None, prefetch=None, init_value=None):
    """Run one built kernel; returns (y [B, T, Hv, Dv] in v's dtype, state [B, Hv, Dv, Dk] fp32)."""
    import mlx.core as mx

    B, T, _, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    L0, W0, P0 = default_layout(Dk, T, B * Hv)
    L = lanes or L0
    P = P0 if prefetch is None else prefetch
    if 32 % L or Dk % (4 * L):
        raise ValueError(f"gated_delta kernel: lanes={L} does not divide Dk={Dk} into float4s")
    rows_per_warp = 32 // L
    groups = -(-Dv // rows_per_warp)
    W = min(warps or W0, groups)
    groups = -(-groups // W) * W
    return kernel(
        inputs=inputs,
        template=[("Dk", Dk), ("L", L), ("P", P), ("YT", v.dtype)],
        # x: one 32-lane threadgroup column per (b, hv); y: warps along the value rows.
        grid=(32 * B * Hv, groups, 1),
        threadgroup=(32, W, 1),
        output_shapes=[(B, T, Hv, Dv), (B, Hv, Dv, Dk)],
        output_dtypes=[v.dtype, mx.float32],
        init_value=init_value,
    )


def run_gates(build, q, k, v, g, beta, state, mask=None, **launch_kw):
    """Recurrence with precomputed gates through `build(gate, has_mask)` (a backend's builder)."""
    import mlx.core as mx

    inputs = [q, k, v, g, beta, state.astype(mx.float32)]
    if mask is not None:
        inputs.append(mask.astype(mx.bool_))
    kernel = build("per_key" if g.ndim == 4 else "scalar", mask is not None)
    return launch(kernel, inputs, q, v, **launch_kw)


def run_fused(build, q, k, v, a, b, A_log, dt_bias, state, mask=None, *, fused=None, **launch_kw):
    """Recurrence from raw gate inputs. fused=True computes g and beta in fp32 inside the kernel;
    False computes them first (one compiled elementwise kernel) and runs the scalar-gate kernel;
    None picks by T (FUSED_GATES_MAX_T)."""
    import mlx.core as mx

    if fused is None:
        fused = q.shape[1] <= FUSED_GATES_MAX_T
    if not fused:
        g, beta = _compiled_gates()(a, b, A_log, dt_bias)
        return run_gates(build, q, k, v, g, beta, state, mask, **launch_kw)
    inputs = [q, k, v, a, b, A_log, dt_bias, state.astype(mx.float32)]
    if mask is not None:
        inputs.append(mask.astype(mx.bool_))
    return launch(build("fused", mask is not None), inputs, q, v, **launch_kw)


@cache
def _compiled_gates():
    import mlx.core as mx

    from . import compute_gates

    return mx.compile(compute_gates, shapeless=True)
