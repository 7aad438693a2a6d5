"""Kernel test helpers: seeded inputs and a float64 NumPy loop of the gated delta rule (the
true oracle).

Per step t, value head h (key head h // (Hv // Hk)), state S [Dv, Dk]:
    S = S * g_t (per row for scalar g, per column for per-key g); delta = (v_t - S k_t) beta_t
    S += delta k_t^T;  y_t = S q_t.   mask False: state unchanged, y = 0.
"""

import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

GXX = shutil.which("g++")
EMULATOR = Path(__file__).with_name("lane_emulator.h")  # runs CUDA-style bodies on the CPU
# The start of an emulator program (test_chunk_h3.py, test_chunk_fuse_y.py): the lane emulator
# and files of float32 values: readf(path) reads one, read_as<X>(path) converted to X,
# write(path, x) writes x as float32.
EMULATED_IO = (
    f'\n#include "{EMULATOR}"\n'
    + r"""#include <fstream>
#include <iterator>
#include <string>

std::vector<float> readf(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<float> x(raw.size() / 4);
  std::memcpy(x.data(), raw.data(), raw.size());
  return x;
}
template <typename X>
std::vector<X> read_as(const std::string& path) {
  auto f = readf(path);
  return std::vector<X>(f.begin(), f.end());
}
template <typename X>
void write(const std::string& path, const std::vector<X>& x) {
  std::vector<float> f(x.begin(), x.end());
  std::ofstream(path, std::ios::binary).write((const char*)f.data(), f.size() * 4);
}
"""
)


def make_inputs(
    B, T, Hk, Hv, Dk, Dv, *, per_key=False, dtype=mx.float32, g_range=(0.7, 1.0), seed=0
):
    """Realistic inputs: l2-normalised q (scaled by Dk^-0.5) and k, v ~ N(0, 1), g in g_range,
    beta in (0, 1), a random nonzero initial state. Returns (q, k, v, g, beta, state)."""
    key = mx.random.key(seed)
    kq, kk, kv, kg, kb, ks = mx.random.split(key, 6)
    q = mx.random.normal((B, T, Hk, Dk), key=kq)
    k = mx.random.normal((B, T, Hk, Dk), key=kk)
    q = q * mx.rsqrt((q * q).sum(-1, keepdims=True) + 1e-6) * Dk**-0.5
    k = k * mx.rsqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    v = mx.random.normal((B, T, Hv, Dv), key=kv)
    g_shape = (B, T, Hv, Dk) if per_key else (B, T, Hv)
    g = mx.random.uniform(*g_range, g_shape, key=kg)
    beta = mx.random.uniform(0.0, 1.0, (B, T, Hv), key=kb)
    state = 0.1 * mx.random.normal((B, Hv, Dv, Dk), key=ks)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta, state


def left_pad_mask(B, T, pads):
    """[B, T] bool, row b False for its first pads[b] steps."""
    return mx.arange(T)[None, :] >= mx.array(pads)[:, None]


def np64(x) -> np.ndarray:
    """float64 NumPy copy of an mx array of any float dtype (NumPy cannot read bfloat16)."""
    if isinstance(x, mx.array):
        x = x.astype(mx.float32)
    return np.asarray(x, dtype=np.float64)


def gated_delta_np(q, k, v, g, beta, state=None, mask=None):
    """All arguments array-likes (mx arrays are fine); returns (y, state) as float64 arrays.
    One step at a time, every batch row and value head at once."""
    q, k, v, g, beta = (np64(x) for x in (q, k, v, g, beta))
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    q, k = (np.repeat(x, Hv // Hk, axis=2) for x in (q, k))  # key head h // (Hv // Hk)
    S = np.zeros((B, Hv, Dv, Dk)) if state is None else np64(state).copy()
    m = np.ones((B, T), bool) if mask is None else np.asarray(mask, dtype=bool)
    y = np.zeros((B, T, Hv, Dv))
    for t in range(T):
        decay = g[:, t, :, None, :] if g.ndim == 4 else g[:, t, :, None, None]
        s = S * decay  # [B, Hv, Dv, Dk]
        delta = (v[:, t] - (s @ k[:, t, :, :, None])[..., 0]) * beta[:, t, :, None]
        s = s + delta[..., None] * k[:, t, :, None, :]
        keep = m[:, t, None, None]
        y[:, t] = np.where(keep, (s @ q[:, t, :, :, None])[..., 0], 0.0)
        S = np.where(keep[..., None], s, S)
    return y, S


def gates_np(a, b, A_log, dt_bias):
    """float64 gates of gated_delta_update: g = exp(-exp(A_log) softplus(a + dt_bias)),
    beta = sigmoid(b)."""
    a, b, A_log, dt_bias = (np64(x) for x in (a, b, A_log, dt_bias))
    return np.exp(-np.exp(A_log) * np.logaddexp(a + dt_bias, 0.0)), 1.0 / (1.0 + np.exp(-b))


def make_gate_inputs(B, T, Hv, *, dtype=mx.float32, seed=0):
    """Raw gate inputs of gated_delta_update: a, b ~ N(0, 1) [B, T, Hv] in dtype; A_log in
    (-2, 1) and dt_bias in (-1, 1) [Hv], fp32. Returns (a, b, A_log, dt_bias)."""
    ka, kb, kA, kd = mx.random.split(mx.random.key(seed + 1), 4)
    a = mx.random.normal((B, T, Hv), key=ka).astype(dtype)
    b = mx.random.normal((B, T, Hv), key=kb).astype(dtype)
    A_log = mx.random.uniform(-2.0, 1.0, (Hv,), key=kA)
    dt_bias = mx.random.uniform(-1.0, 1.0, (Hv,), key=kd)
    return a, b, A_log, dt_bias


def make_decode_inputs(B, Hk, Hv, Dk, Dv, K=4, *, dtype=mx.float32, seed=0):
    """Inputs of gated_delta_decode as a dict: qkv [B, C] and conv_state [B, K-1, C] ~ N(0, 1),
    conv_w [C, K] ~ N(0, 0.5) (all in dtype), the raw gates of make_gate_inputs ([B, Hv]) and a
    random nonzero state [B, Hv, Dv, Dk] fp32."""
    C = 2 * Hk * Dk + Hv * Dv
    kx, kc, kw, ks = mx.random.split(mx.random.key(seed + 7), 4)
    a, b, A_log, dt_bias = make_gate_inputs(B, 1, Hv, dtype=dtype, seed=seed)
    return {
        "qkv": mx.random.normal((B, C), key=kx).astype(dtype),
        "conv_state": mx.random.normal((B, K - 1, C), key=kc).astype(dtype),
        "conv_w": (0.5 * mx.random.normal((C, K), key=kw)).astype(dtype),
        "a": a[:, 0],
        "b": b[:, 0],
        "A_log": A_log,
        "dt_bias": dt_bias,
        "state": 0.1 * mx.random.normal((B, Hv, Dv, Dk), key=ks),
    }


def gated_delta_decode_np(
    qkv, conv_state, conv_w, a, b, A_log, dt_bias, state, mask=None, *, Hk, Dk, Hv, Dv
):
    """float64 decode step from the raw in-projection: causal depthwise conv over
    [conv_state | qkv], silu, l2-normalised q (times Dk^-0.5) and k (eps 1e-6 inside the sqrt),
    g = exp(-exp(A_log) softplus(a + dt_bias)), beta = sigmoid(b), one gated delta step.
    Returns (y [B, Hv, Dv], state [B, Hv, Dv, Dk], new conv state [B, K-1, C])."""
    x = np.concatenate([np64(conv_state), np64(qkv)[:, None]], axis=1)  # [B, K, C]
    h = np.einsum("bkc,ck->bc", x, np64(conv_w))
    h = h / (1.0 + np.exp(-h))
    B, kd = h.shape[0], Hk * Dk

    def l2(u):
        return u / np.sqrt((u * u).sum(-1, keepdims=True) + 1e-6)

    q = l2(h[:, :kd].reshape(B, 1, Hk, Dk)) * Dk**-0.5
    k = l2(h[:, kd : 2 * kd].reshape(B, 1, Hk, Dk))
    v = h[:, 2 * kd :].reshape(B, 1, Hv, Dv)
    g = np.exp(-np.exp(np64(A_log)) * np.logaddexp(0.0, np64(a) + np64(dt_bias)))
    beta = 1.0 / (1.0 + np.exp(-np64(b)))
    m = None if mask is None else np.asarray(mask, dtype=bool)[:, None]
    y, S = gated_delta_np(q, k, v, g[:, None], beta[:, None], state, m)
    return y[:, 0], S, x[:, 1:]


def packed_np(x, mask, T, dims, eps):
    """float64 reference of the packed T-token decode (`gated_delta_decode_packed`): T calls of
    `gated_delta_decode_np` on the tokens of x["proj"] [B * T, qkv | z | b | a], each then
    through the gated norm (x: "proj", "conv_state", "conv_w", "A_log", "dt_bias", "state",
    "norm_w", mx or NumPy arrays; mask [B, T] bool or None; dims (Hk, Dk, Hv, Dv)). Returns
    (y [B, T, Hv, Dv], [state after token t], [conv state after token t])."""
    Hk, Dk, Hv, Dv = dims
    C = 2 * Hk * Dk + Hv * Dv
    B = x["proj"].shape[0] // T
    p = np64(x["proj"]).reshape(B, T, -1)
    ww = np64(x["norm_w"])
    conv, state, ys, states, convs = x["conv_state"], x["state"], [], [], []
    for t in range(T):
        qkv, z = p[:, t, :C], p[:, t, C : C + Hv * Dv].reshape(B, Hv, Dv)
        b, a = p[:, t, C + Hv * Dv : C + Hv * Dv + Hv], p[:, t, C + Hv * Dv + Hv :]
        m = None if mask is None else np.asarray(mask)[:, t]
        args = (qkv, conv, x["conv_w"], a, b, x["A_log"], x["dt_bias"], state)
        y, state, conv = gated_delta_decode_np(*args, m, Hk=Hk, Dk=Dk, Hv=Hv, Dv=Dv)
        r = 1 / np.sqrt((y**2).mean(-1, keepdims=True) + eps)
        ys.append(y * r * ww * z / (1 + np.exp(-z)))
        states.append(state)
        convs.append(conv)
    return np.stack(ys, 1), states, convs


def runner_program(runners: str, n: int) -> str:
    """C++ text of one executable, `program I ARGS...`, that calls `run_I(ARGS)` of `runners`
    (n of them), with the lane emulator and a `read(path)` helper in scope."""
    calls = "\n".join(f"  if (i == {i}) run_{i}(argv + 2);" for i in range(n))
    return f"""#include "{EMULATOR}"
#include <fstream>
#include <iterator>
#include <string>

std::vector<char> read(const char* path) {{
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}}
{runners}
int main(int argc, char** argv) {{
  const int i = std::stoi(argv[1]);
{calls}
}}
"""


# A threadgroup array's declaration in a kernel body (GD_TG / GD_TG16 / gd_threadgroup TYPE
# NAME[SIZE];).
_TG_ARRAY = re.compile(
    r"^(\s*(?:GD_TG(?:16)?|gd_threadgroup) [^;]*?\b(\w+)\[[^;]*\];)", re.MULTILINE
)


def poison_threadgroup_memory(text: str) -> str:
    """`text` with gd_tg_poison(x) after each threadgroup array x's declaration (lane_emulator.h:
    every block's threadgroup memory starts as NaN)."""
    return _TG_ARRAY.sub(r"\1 gd_tg_poison(\2);", text)


# What sanitize= of compile_emulated adds to the compile: ThreadSanitizer (a read and a write,
# or two writes, of one address by two threads with no barrier between them), or AddressSanitizer
# with UndefinedBehaviorSanitizer (reads and writes outside the inputs and outputs, overflows).
SANITIZE = {
    "thread": ["-fsanitize=thread"],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}


def compile_emulated(text: str, tmp: Path, timeout: int, sanitize: str | None = None) -> Path:
    """Compile C++20 `text` (lane-emulated kernel bodies) into an executable in `tmp`, every
    threadgroup array poisoned (poison_threadgroup_memory); sanitize ("thread", "address"): with
    that sanitizer (SANITIZE), its reports on stderr and a nonzero exit status. Skips the test
    where g++ lacks C++20's <barrier>, which the emulator needs, or the sanitizer."""
    probe = tmp / "probe.cpp"
    probe.write_text(
        "#include <barrier>\nint main() { std::barrier<> b{1}; b.arrive_and_wait(); }\n"
    )
    cmd = [GXX, "-std=c++20", "-pthread", str(probe), "-o", str(tmp / "probe")]
    if subprocess.run(cmd, capture_output=True, timeout=120).returncode != 0:
        pytest.skip("needs a g++ with C++20 <barrier>")
    flags = [*SANITIZE[sanitize], "-g"] if sanitize else []
    if sanitize:
        # the sanitizer's runtime must also start here (some kernels' address layouts stop it)
        cmd = [GXX, "-std=c++20", "-pthread", *flags, str(probe), "-o", str(tmp / "probe")]
        if subprocess.run(cmd, capture_output=True, timeout=120).returncode != 0:
            pytest.skip(f"needs a g++ with -fsanitize={sanitize}")
        run = subprocess.run([str(tmp / "probe")], capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            pytest.skip(f"-fsanitize={sanitize} does not run here: {run.stderr.strip()[:200]}")
    cpp, exe = tmp / "k.cpp", tmp / "k"
    cpp.write_text(poison_threadgroup_memory(text))
    cc = subprocess.run(
        [GXX, "-std=c++20", "-O1", "-pthread", "-Wno-unknown-pragmas", *flags, str(cpp)]
        + ["-o", str(exe)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert cc.returncode == 0, cc.stderr
    return exe


def nvcc_ptx(src: str, tmp: Path, name: str = "k", timeout: int = 600) -> str:
    """PTX of CUDA `src` (compute_90, C++17) compiled by nvcc in `tmp`; asserts it compiles."""
    path, ptx = tmp / f"{name}.cu", tmp / f"{name}.ptx"
    path.write_text(src)
    nvcc = shutil.which("nvcc")
    cmd = [nvcc, "-arch=compute_90", "-std=c++17", "-ptx", str(path), "-o", str(ptx)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return ptx.read_text()


@pytest.fixture
def cpu_device():
    """The emulator tests hold the kernel body, built for the CPU, to `ref` and the ops path
    with the CPU's roundings (which the body follows): on a GPU machine those run on the CPU
    too (`pytest.mark.usefixtures("cpu_device")`)."""
    prev = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(prev)


def to_file(x: mx.array, path: Path) -> str:
    """`x`'s elements as the emulated kernels read them (bool, int32, bf16 as its 16 bits, fp16;
    anything else as fp32), written to `path`; returns the path as a string."""
    if x.dtype == mx.bool_:
        path.write_bytes(np.asarray(x).astype(bool).tobytes())
    elif x.dtype == mx.int32:
        path.write_bytes(np.asarray(x).astype(np.int32).tobytes())
    elif x.dtype == mx.bfloat16:
        path.write_bytes(np.asarray(x.view(mx.uint16)).tobytes())
    elif x.dtype == mx.float16:
        path.write_bytes(np.asarray(x).astype(np.float16).tobytes())
    else:
        path.write_bytes(np.asarray(x.astype(mx.float32)).tobytes())
    return str(path)
