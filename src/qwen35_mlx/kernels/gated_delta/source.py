"""Fused gated-delta GPU kernel bodies, written once for Metal and CUDA.

Per step t, per value head h (key head h // (Hv // Hk)), per value row i of the state:
    S_i *= g_t;  delta_i = (v_ti - S_i . k_t) * beta_t;  S_i += delta_i k_t;  y_ti = S_i . q_t

Shapes: q, k [B, T, Hk, Dk]; v, y [B, T, Hv, Dv]; g [B, T, Hv] or [B, T, Hv, Dk]; beta, a, b
[B, T, Hv]; A_log, dt_bias [Hv]; state [B, Hv, Dv, Dk] fp32 (Dk contiguous); mask [B, T] bool.

Layout: a group of L lanes of one 32-lane SIMD-group / warp owns one value row of the state and
keeps it in registers for all T steps; a warp holds 32 / L rows, a threadgroup W warps of one
head. Lane `sub` of a row group holds the float4 column chunks sub, sub + L, sub + 2L, ... so each
float4 load of the warp reads whole 32-byte sectors (coalesced); the row sums (g S_i) . k,
(g S_i) . q and k . q are reduced over the L lanes with xor shuffles, all three at once, since
y_ti = (g S_i) . q + delta_i (k . q). Rows past Dv are clamped for loads and never stored, but
still take part in the shuffles. q and k are read from their key head in place.
The next step's inputs are loaded before the current step is computed (software pipelining),
and the step loop has no branch (the last load is clamped), so the compiler can interleave it.
Scalar gates (g, beta, or a, b with the fused gating math, and the mask) are read, and
transformed, once per chunk of 32 steps, one step per lane, then broadcast by shuffles: every
warp of a head needs them, so per-step loads and transcendentals would be repeated 10-100x.

The bodies are plain C++ over these helpers, which `metal.py` / `cuda.py` define:
    gd_lane        lane in the SIMD-group / warp (0..31)     (source prologue)
    gd_row_group   warp index along the value rows           (source prologue)
    gd_head        b * Hv + h                                (source prologue)
    gd_group_sum<W>(x)     sum over W adjacent lanes (W a power of two <= 32)
    gd_shuffle(x, j)       lane j's x (fp32), to every lane
    gd_load_f4(p) / gd_store_f4(p, x, y, z, w)   16-byte fp32 load / store
    gd_exp(x), gd_log(x)   fp32 exp / natural log
    gd_prefetch(p)         hint: bring the line at p towards the cache (may be a no-op)
Compile-time template arguments: Dk, L (lanes per value row), P (prefetch distance), YT (y's
dtype). Hk, Hv, Dv and T are read from the input shapes, so one compiled kernel serves every
head count and length. Decode (T == 1) has its own straight-line variant without the loop.

References: mlx-lm `models/gated_delta.py` (the one-warp-per-row Metal kernel);
flash-linear-attention `fla/ops/gated_delta_rule/fused_recurrent.py`.
"""

from __future__ import annotations

from functools import cache

GATES = ("scalar", "per_key", "fused")


def kernel_name(gate: str, mask: bool, decode: bool = False) -> str:
    """Kernel `name=` with its structural variant, e.g. `gated_delta_step_fused_mask`."""
    kind = "gated_delta_decode" if decode else "gated_delta_step"
    return kind + ("" if gate == "scalar" else f"_{gate}") + ("_mask" if mask else "")


def input_names(gate: str, mask: bool) -> list[str]:
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    gates = ["a", "b", "A_log", "dt_bias"] if gate == "fused" else ["g", "beta"]
    return ["q", "k", "v", *gates, "state_in"] + (["mask"] if mask else [])


OUTPUT_NAMES = ["y", "state_out"]


def _gate_parts(gate: str) -> dict[str, str]:
    """Snippets for one gate variant.

    lane: lane j computes step (t0 + j)'s scalar gates gl, bl once per chunk of 32 steps;
    cur: the gates of step t = t0 + j, broadcast from lane j; load (per-key only): step t_ld's
    per-key decay into g_nx; decay: the factor of state element i.
    """
    if gate == "per_key":
        return {
            "decl": "float g_nx[N];",
            "load": """#pragma unroll
    for (int c = 0; c < C; ++c) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        g_nx[4 * c + e] = static_cast<float>(g[(h_ld * Dk) + col0 + c * 4 * L + e]);
      }
    }""",
            "lane": "bl = static_cast<float>(beta[h_l]);",
            "cur": """float g_cu[N];
      #pragma unroll
      for (int i = 0; i < N; ++i) g_cu[i] = g_nx[i];
      const float b_cu = gd_shuffle(bl, j);""",
            "decay": "g_cu[i]",
            "setup": "",
        }
    cur = "const float g_cu = gd_shuffle(gl, j);\n      const float b_cu = gd_shuffle(bl, j);"
    if gate == "scalar":
        return {
            "decl": "",
            "load": "",
            "lane": "gl = static_cast<float>(g[h_l]);\n      bl = static_cast<float>(beta[h_l]);",
            "cur": cur,
            "decay": "g_cu",
            "setup": "",
        }
    # Fused gating: beta = sigmoid(b), g = exp(-exp(A_log) * softplus(a + dt_bias)) in fp32,
    # softplus(x) = max(x, 0) + log(1 + exp(-|x|)); each lane transforms one step of the chunk.
    return {
        "decl": "",
        "load": "",
        "lane": """const float x = static_cast<float>(a[h_l]) + dt_bias_h;
      const float sp = (x > 0.0f ? x : 0.0f) + gd_log(1.0f + gd_exp(x > 0.0f ? -x : x));
      gl = gd_exp(-A_h * sp);
      bl = 1.0f / (1.0f + gd_exp(-static_cast<float>(b[h_l])));""",
        "cur": cur,
        "decay": "g_cu",
        "setup": """const float A_h = gd_exp(static_cast<float>(A_log[hv]));
  const float dt_bias_h = static_cast<float>(dt_bias[hv]);""",
    }


def kernel_body(gate: str, mask: bool, decode: bool = False) -> str:
    """The kernel body of one structural variant: the recurrent loop over T steps, or the
    single step of decode (T == 1) without the loop's pipelining."""
    input_names(gate, mask)  # validates gate
    p = _gate_parts(gate)
    load = _load(p["load"])
    # y = S_new q = (g S) q + delta (k . q): the three row sums (g S) k, (g S) q and k . q are
    # independent, so their shuffle reductions overlap and each step waits on one reduction
    # instead of two in sequence.
    step = f"""float kv[4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
        float sq[4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
        float kq[4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
        #pragma unroll
        for (int i = 0; i < N; ++i) {{
          s[i] *= {p["decay"]};
          kv[i % 4] += s[i] * k_cu[i];
          sq[i % 4] += s[i] * q_cu[i];
          kq[i % 4] += k_cu[i] * q_cu[i];
        }}
        const float kv_row = gd_group_sum<L>((kv[0] + kv[1]) + (kv[2] + kv[3]));
        const float sq_row = gd_group_sum<L>((sq[0] + sq[1]) + (sq[2] + sq[3]));
        const float kq_row = gd_group_sum<L>((kq[0] + kq[1]) + (kq[2] + kq[3]));
        const float delta = (v_cu - kv_row) * b_cu;
        out = sq_row + delta * kq_row;
        #pragma unroll
        for (int i = 0; i < N; ++i) {{
          s[i] += k_cu[i] * delta;
        }}"""
    if mask:
        # Padding (mask False) skips the step: state unchanged, y = 0. The branch is uniform
        # over the threadgroup (one batch row), so the shuffles inside stay converged.
        step = f"if (gd_shuffle(ml, j) != 0.0f) {{\n        {step}\n      }}"
    mask_lane = "ml = mask[size_t(b_idx) * T + tl] ? 1.0f : 0.0f;" if mask else ""
    head = f"""
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

"""
    tail = """  if (row_ok) {
    #pragma unroll
    for (int c = 0; c < C; ++c) {
      const int j = 4 * c;
      gd_store_f4(state_out + s_off + c * 4 * L, s[j], s[j + 1], s[j + 2], s[j + 3]);
    }
  }
"""
    if decode:
        cur = p["cur"].replace("gd_shuffle(gl, j)", "gl").replace("gd_shuffle(bl, j)", "bl")
        step = step.replace("gd_shuffle(ml, j)", "ml")
        return (
            head
            + f"""
  // Decode: one step, straight-line (the state traffic dominates).
  float k_nx[N];
  float q_nx[N];
  float v_nx;
  {p["decl"]}
  {"float gl;" if gate != "per_key" else ""}
  float bl;
  {"float ml;" if mask else ""}
  {{
    const int t_ld = 0;
    {load}
  }}
  {{
    const int tl = 0;
    const size_t h_l = h0;
    {p["lane"]}
    {mask_lane}
  }}
  {{
    float k_cu[N];
    float q_cu[N];
    #pragma unroll
    for (int i = 0; i < N; ++i) {{
      k_cu[i] = k_nx[i];
      q_cu[i] = q_nx[i];
    }}
    const float v_cu = v_nx;
    {cur}
    float out = 0.0f;
    {step}
    if (sub == 0 && row_ok) {{
      y[vy0] = static_cast<YT>(out);
    }}
  }}
"""
            + tail
        )
    return (
        head
        + f"""  // Registers for the step after the one being computed (software pipelining).
  float k_nx[N];
  float q_nx[N];
  float v_nx;
  {p["decl"]}
  {{
    const int t_ld = 0;
    {load}
  }}
  // The scalar gates of a chunk of 32 steps: lane j holds step t0 + j's, broadcast by shuffles.
  {"float gl = 1.0f;" if gate != "per_key" else ""}
  float bl = 0.0f;
  {"float ml = 1.0f;" if mask else ""}
  for (int t0 = 0; t0 < T; t0 += 32) {{
    {{
      const int tl = t0 + int(gd_lane) < T ? t0 + int(gd_lane) : T - 1;
      const size_t h_l = h0 + size_t(tl) * Hv;
      {p["lane"]}
      {mask_lane}
    }}
    const int n = T - t0 < 32 ? T - t0 : 32;
    for (int j = 0; j < n; ++j) {{
      const int t = t0 + j;
      float k_cu[N];
      float q_cu[N];
      #pragma unroll
      for (int i = 0; i < N; ++i) {{
        k_cu[i] = k_nx[i];
        q_cu[i] = q_nx[i];
      }}
      const float v_cu = v_nx;
      {p["cur"]}
      // Load step t + 1 (clamped: the last step reloads itself, so the loop has no branch).
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
    }}
  }}

"""
        + tail
    )


def _load(gate_load: str) -> str:
    # Reads step t_ld's k, q, v (and per-key decay) into the *_nx registers.
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
      (void)h_ld;
      {gate_load}
    }}"""


def variants() -> list[tuple[str, bool, bool]]:
    """Every structural variant (gate kind, has mask, decode)."""
    return [(gate, mask, dec) for gate in GATES for mask in (False, True) for dec in (False, True)]


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
    """(lanes per value row, warps per threadgroup, prefetch distance) for Dk, T and
    heads = B * Hv: the fastest measured on an H100 at Dk = 128 (benchmarks/NOTES.md); a
    prefetch distance > 0 measured no faster there. Lanes always divide Dk / 4, since Dk is
    a multiple of 32."""
    wide = Dk % 64 == 0  # 16 lanes need Dk / 4 divisible by 16
    if T == 1:
        # Decode is bound by the state's memory traffic; this layout was the steadiest near
        # the floor over four runs (others varied by up to 25% between runs).
        return (16, 2, 0) if wide else (8, 4, 0)
    return (16, 1, 0) if wide else (8, 2, 0)


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
    """Recurrence with precomputed gates through a backend's `build(gate, mask, decode)`."""
    import mlx.core as mx

    inputs = [q, k, v, g, beta, state.astype(mx.float32)]
    if mask is not None:
        inputs.append(mask.astype(mx.bool_))
    kernel = build("per_key" if g.ndim == 4 else "scalar", mask is not None, q.shape[1] == 1)
    return launch(kernel, inputs, q, v, **launch_kw)


def run_fused(build, q, k, v, a, b, A_log, dt_bias, state, mask=None, *, fused=True, **launch_kw):
    """Recurrence from raw gate inputs. fused=True (measured as fast as precomputed gates)
    computes g and beta in fp32 inside the kernel; False computes them first with one compiled
    elementwise kernel and runs the scalar-gate kernel."""
    import mlx.core as mx

    if not fused:
        g, beta = _compiled_gates()(a, b, A_log, dt_bias)
        return run_gates(build, q, k, v, g, beta, state, mask, **launch_kw)
    inputs = [q, k, v, a, b, A_log, dt_bias, state.astype(mx.float32)]
    if mask is not None:
        inputs.append(mask.astype(mx.bool_))
    return launch(build("fused", mask is not None, q.shape[1] == 1), inputs, q, v, **launch_kw)


class GpuBackend:
    """One GPU build of the bodies above: a backend's helpers (`header`), its prologue (the
    gd_lane / gd_row_group / gd_head lines) and the name of MLX's kernel factory in `mx.fast`
    (`metal_kernel` or `cuda_kernel`). `metal.py` and `cuda.py` each make one, their `BACKEND`;
    everything else about building and launching is shared here."""

    def __init__(self, *, header: str, prologue: str, factory: str, available):
        self.header = header
        self.prologue = prologue
        self._factory = factory
        self._available = available
        self._kernels: dict[tuple[str, bool, bool], object] = {}

    def is_available(self) -> bool:
        return self._available()

    def kernel_source(self, gate: str, mask: bool, decode: bool = False) -> str:
        """The full `source=` for one variant: prologue + body."""
        return self.prologue + kernel_body(gate, mask, decode)

    def build(self, gate: str, mask: bool, decode: bool = False):
        """The MLX kernel object of one variant (built once), or None without the backend."""
        if not self.is_available():
            return None
        key = (gate, mask, decode)
        if key not in self._kernels:
            import mlx.core as mx

            self._kernels[key] = getattr(mx.fast, self._factory)(
                name=kernel_name(gate, mask, decode),
                input_names=input_names(gate, mask),
                output_names=OUTPUT_NAMES,
                source=self.kernel_source(gate, mask, decode),
                header=self.header,
            )
        return self._kernels[key]

    def supports(self, q, v, g) -> bool:
        return self.is_available() and shape_supported(q, v, g)

    def gated_delta_kernel(self, q, k, v, g, beta, state, mask=None, **launch_kw):
        """Fused recurrence with precomputed gates; returns (y, state [B, Hv, Dv, Dk] fp32)."""
        return run_gates(self.build, q, k, v, g, beta, state, mask, **launch_kw)

    def gated_delta_update_kernel(self, q, k, v, a, b, A_log, dt_bias, state, mask=None, **kw):
        """Fused gating + recurrence; returns (y, state [B, Hv, Dv, Dk] fp32)."""
        return run_fused(self.build, q, k, v, a, b, A_log, dt_bias, state, mask, **kw)


@cache
def _compiled_gates():
    import mlx.core as mx

    from . import compute_gates

    return mx.compile(compute_gates, shapeless=True)
