"""What users break (issue 15): every case ends in one line and exit code 2 from the CLI with
nothing on stdout, a clear exception from the library, or correct output."""

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qwen35_mlx import loader
from qwen35_mlx.convert import save_mlx
from qwen35_mlx.generate import main
from qwen35_mlx.generation import batch_generate, generate, stream_generate
from qwen35_mlx.loader import load, load_model
from qwen35_mlx.models.config import ModelConfig
from qwen35_mlx.models.layers import SparseMoeBlock
from qwen35_mlx.sampling import check_sampling
from tests.conftest import RTOL, rel_err
from tests.models.factory import make_moe_config, randomize

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
GEN = GOLDEN / "generate"  # text checkpoint with a tokenizer and a chat template
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
PROG = "python -m qwen35_mlx.generate: error: "


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, out, err, *needles):
    assert code == 2, (code, err)
    assert out == "", out  # nothing on stdout before the error, the header neither
    assert err.startswith(PROG) and err.count("\n") == 1 and err.endswith("\n"), err
    for n in needles:
        assert n in err, err


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the CLI loads the model (the check must come first)."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loader, "load", refuse)


def _copy(tmp_path: Path, src: Path = GEN, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_json(file: Path, edit) -> None:
    d = json.loads(file.read_text())
    edit(d)
    file.write_text(json.dumps(d))


# -- 1. bf16 / fp16 MoE on the CPU ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("T", [1, 2, 13])  # 1-2 tokens: selected experts only; 13: all experts
def test_moe_block_low_precision_on_cpu_matches_fp32(dtype, T):
    config = make_moe_config(num_experts=8, num_experts_per_tok=2)
    block = SparseMoeBlock(config)
    randomize(block, seed=3)
    block.set_dtype(dtype)
    # The reference: the same block with only its experts in fp32 (the same rounded values), so
    # the router sees the same low-precision logits and picks the same experts.
    ref = SparseMoeBlock(config)
    ref.update(block.parameters())
    ref.set_dtype(dtype)
    ref.experts.set_dtype(mx.float32)
    x = mx.random.normal((2, T, config.hidden_size), key=mx.random.key(1)).astype(dtype)
    with mx.stream(mx.cpu):
        y = block(x)
        mx.eval(y)
        want = ref(x)
    assert y.dtype == dtype
    assert block.experts.gate_proj.weight.dtype == dtype  # weights kept as they are
    assert rel_err(y.astype(mx.float32), want) < RTOL[dtype]


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> Path:
    """A tiny MoE checkpoint with the generate golden's tokenizer (vocabulary 384)."""
    from qwen35_mlx.models.text import TextModel

    config = make_moe_config(vocab_size=384, max_position_embeddings=4096)
    model = randomize(TextModel(config), seed=5)
    folder = tmp_path_factory.mktemp("moe") / "ckpt"
    return save_mlx(model, config.to_dict(), folder, extra_files=[GEN / f for f in TOKENIZER_FILES])


def test_cli_dtype_runs_bf16_moe(capsys, moe_checkpoint):
    args = ("--model", moe_checkpoint, "--prompt", "Hello", "-m", 4, "-q", "--temp", 0)
    code, out_fp32, err = run(capsys, *args, "--dtype", "float32")
    assert code == 0, err
    code, out_bf16, err = run(capsys, *args, "--dtype", "bfloat16")
    assert code == 0, err
    assert out_bf16.strip()


def test_cli_dtype_reaches_load(capsys, monkeypatch):
    seen = {}
    real = loader.load

    def spy(path, **kw):
        seen.update(kw)
        return real(path, **kw)

    monkeypatch.setattr(loader, "load", spy)
    code, _, err = run(capsys, "--model", GEN, "-m", 1, "-q", "--dtype", "float16")
    assert code == 0, err
    assert seen["dtype"] == "float16"
    code, out, err = run(capsys, "--model", GEN, "--dtype", "int8")
    assert code == 2 and "--dtype" in err and out == ""


# -- 2. a tokenizer that does not work ------------------------------------------------------------


def test_missing_tokenizer_json_is_refused(capsys, tmp_path):
    folder = _copy(tmp_path)
    (folder / "tokenizer.json").unlink()
    # Qwen's own tokenizer class: transformers then builds an empty tokenizer, silently.
    _edit_json(
        folder / "tokenizer_config.json", lambda d: d.update(tokenizer_class="Qwen2Tokenizer")
    )
    with pytest.raises(ValueError, match="tokenizer") as e:
        load(folder)
    assert str(folder) in str(e.value)
    assert_user_error(*run(capsys, "--model", folder), str(folder), "tokenizer")


def test_unloadable_tokenizer_names_the_checkpoint(tmp_path):
    folder = _copy(tmp_path)
    (folder / "tokenizer.json").unlink()  # its class needs tokenizer.json: transformers raises
    with pytest.raises(ValueError, match="tokenizer") as e:
        load(folder)
    assert str(folder) in str(e.value)


# -- 3. prompts that are not UTF-8 ----------------------------------------------------------------


def test_non_utf8_stdin(capsys, monkeypatch, no_load):
    stdin = io.TextIOWrapper(io.BytesIO(b"Hello \xff\xfe world\n"), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    assert_user_error(*run(capsys, "--model", GEN, "--prompt", "-"), "stdin", "UTF-8")


def test_closed_or_unreadable_stdin(capsys, monkeypatch, no_load):
    monkeypatch.setattr(sys, "stdin", None)  # `--prompt - <&-`
    assert_user_error(*run(capsys, "--prompt", "-"), "stdin is closed")

    class Failing(io.BytesIO):  # a read that fails (EIO from a hung-up terminal, ...)
        def read(self, *a):
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(Failing()))
    assert_user_error(*run(capsys, "--prompt", "-"), "cannot read stdin", "Input/output error")


def test_non_utf8_prompt_argument(capsys, no_load):
    # Python hands argv bytes that are not UTF-8 over as lone surrogates (surrogateescape).
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert_user_error(*run(capsys, "--model", GEN, "--prompt", bad), "--prompt", "UTF-8")
    assert_user_error(*run(capsys, "--model", GEN, "--system", bad), "--system", "UTF-8")


# -- 4. sampling options --------------------------------------------------------------------------

BAD_SAMPLING = [
    ("--temp", "-1"),
    ("--temp", "nan"),
    ("--temp", "inf"),
    ("--top-p", "2"),
    ("--top-p", "-0.1"),
    ("--top-k", "-3"),
    ("--min-p", "2"),
    ("--min-p", "nan"),
]


@pytest.mark.parametrize("flag, value", [*BAD_SAMPLING, ("--seed", "-1"), ("--seed", str(2**64))])
def test_cli_refuses_bad_sampling_before_loading(capsys, no_load, flag, value):
    assert_user_error(*run(capsys, "--model", GEN, flag, value), flag, value)


@pytest.fixture(scope="module")
def gen_loaded():
    return load(GEN)


@pytest.mark.parametrize("flag, value", BAD_SAMPLING)
def test_library_refuses_bad_sampling(gen_loaded, flag, value):
    model, tok = gen_loaded
    name = flag[2:].replace("-", "_")
    kw = {name: int(value) if name == "top_k" else float(value)}
    for call in (
        lambda: generate(model, tok, "Hello", max_tokens=1, **kw),
        lambda: next(stream_generate(model, tok, "Hello", max_tokens=1, **kw)),
        lambda: batch_generate(model, tok, ["Hello"], max_tokens=1, **kw),
    ):
        with pytest.raises(ValueError, match=name):
            call()


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_library_refuses_bad_repetition_penalty(gen_loaded, value):
    # nan went through to mlx-lm's processor and generated "!!!!"
    model, tok = gen_loaded
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(model, tok, "Hello", max_tokens=1, repetition_penalty=value)


@pytest.mark.parametrize("step", [0, -3])
def test_library_refuses_bad_prefill_step_size(gen_loaded, step):
    # 0 hung batch_generate (no progress) and failed inside MLX's gather in generate
    model, tok = gen_loaded
    with pytest.raises(ValueError, match="prefill_step_size"):
        generate(model, tok, "Hello there", max_tokens=1, prefill_step_size=step)
    with pytest.raises(ValueError, match="prefill_step_size"):
        batch_generate(model, tok, ["Hello there"], max_tokens=1, prefill_step_size=step)


def test_check_sampling_bounds():
    check_sampling(0.0, 0.0, 0, 0.0)  # all off: greedy
    check_sampling(0.7, 1.0, 50, 1.0, repetition_penalty=1.1)
    for kw in ({"repetition_penalty": 0.0}, {"repetition_penalty": -1.0}, {"top_k": 2.5}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            check_sampling(**kw)
    with pytest.raises(ValueError, match="--top-k"):
        check_sampling(top_k=-1, cli=True)
    with pytest.raises(ValueError, match="repetition_penalty"):
        check_sampling(repetition_penalty=math.nan)


# -- 5. weights with a wrong dtype ----------------------------------------------------------------


def test_integer_weight_refused_naming_it(capsys, tmp_path):
    folder = _copy(tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors = load_file(folder / "model.safetensors")
    assert name in tensors
    tensors[name] = (tensors[name] * 100).astype(np.int32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="dtype") as e:
        load_model(folder)
    assert "layers.0.mlp.up_proj.weight" in str(e.value) and "int32" in str(e.value)
    assert_user_error(*run(capsys, "--model", folder), "up_proj.weight", "int32")


def test_quantized_uint32_weights_still_load(tmp_path):
    model = load_model(GOLDEN / "dense_untied")
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: p == "lm_head")
    config = json.loads((GOLDEN / "dense_untied" / "config.json").read_text())
    folder = save_mlx(model, config, tmp_path / "q4")
    loaded = load_model(folder)
    assert loaded.lm_head.weight.dtype == mx.uint32


# -- 6. config.json without a required field ------------------------------------------------------


@pytest.mark.parametrize(
    "case, drop, needle",
    [
        ("generate", ["hidden_size"], "hidden_size"),
        ("generate", ["linear_num_value_heads"], "linear_num_value_heads"),
        ("generate", ["layer_types"], "layer_types"),
        ("generate", ["head_dim", "vocab_size"], "vocab_size, head_dim"),
        ("moe_fused", ["num_experts"], "num_experts"),
        ("vlm", ["text_config.linear_num_value_heads"], "text_config.linear_num_value_heads"),
        ("vlm", ["vision_config.out_hidden_size"], "vision_config.out_hidden_size"),
    ],
)
def test_config_missing_required_field_named(capsys, tmp_path, case, drop, needle):
    folder = _copy(tmp_path, GOLDEN / case)

    def edit(d):
        for key in drop:
            *outer, last = key.split(".")
            target = d[outer[0]] if outer else d
            target.pop(last)

    _edit_json(folder / "config.json", edit)
    with pytest.raises(ValueError, match="lacks required") as e:
        load_model(folder)
    assert needle in str(e.value) and "config.json" in str(e.value)
    if case == "generate":
        assert_user_error(*run(capsys, "--model", folder), needle)


def test_config_defaults_where_transformers_has_them():
    d = json.loads((GOLDEN / "moe_fused" / "config.json").read_text())
    assert "intermediate_size" not in d  # an all-MoE model needs no dense MLP size
    config = ModelConfig.from_dict(d)
    d.pop("layer_types")
    d.update(full_attention_interval=2, num_hidden_layers=4)
    d.pop("rms_norm_eps")
    c2 = ModelConfig.from_dict(d).text_config
    assert c2.layer_types[1] == "full_attention" and c2.rms_norm_eps == 1e-6
    assert config.text_config.num_experts == d["num_experts"]
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelConfig.from_dict({**d, "mlp_only_layers": [0]})


# -- 11. smaller ----------------------------------------------------------------------------------

G = json.loads((GEN / "golden.json").read_text())


def test_stdin_trailing_newline_dropped(capsys, monkeypatch):
    n = len(G["raw"]["tokens"])
    args = ("--model", GEN, "--no-chat-template", "-m", n, "-q")
    code, want, _ = run(capsys, *args, "--prompt", G["raw"]["prompt"])
    assert code == 0 and want == G["raw"]["text"] + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(G["raw"]["prompt"] + "\n"))
    code, got, err = run(capsys, *args, "--prompt", "-")
    assert code == 0, err
    assert got == want


def _forced_sampler(ids: list[int]):
    """A sampler that emits `ids` in order (every row the same), then the last one again
    (mlx-lm's BatchGenerator samples one step past the last token it hands out)."""
    it = iter(ids)

    def sample(logprobs):
        t = next(it, ids[-1])
        return mx.array([t] * logprobs.shape[0])

    return sample


@pytest.mark.parametrize("case", ["generate", "vlm"])
def test_generate_text_equals_decode_and_batch(case):
    model, tok = load(GOLDEN / case)
    text_tok = getattr(tok, "tokenizer", tok)
    ids = text_tok.encode(" Hello, world", add_special_tokens=False)
    want = text_tok.decode(ids)
    assert want.startswith(" ")  # the leading space is the point
    one = generate(model, tok, "Hi", max_tokens=len(ids), sampler=_forced_sampler(ids))
    batch = batch_generate(model, tok, ["Hi"], max_tokens=len(ids), sampler=_forced_sampler(ids))
    assert batch.tokens[0] == ids
    assert one == batch.texts[0] == want


def test_image_directory_named(capsys, tmp_path, no_load):
    assert_user_error(
        *run(capsys, "--model", GOLDEN / "vlm", "--image", tmp_path), "it is a directory"
    )


def test_video_directory_named(capsys, tmp_path, no_load):
    assert_user_error(
        *run(capsys, "--model", GOLDEN / "vlm", "--video", tmp_path), "it is a directory"
    )


def test_image_on_text_model_refused_before_loading(capsys, tmp_path, no_load):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    assert_user_error(*run(capsys, "--model", GEN, "--image", tmp_path / "red.png"), "text-only")


def test_prompt_longer_than_max_positions_warns(capsys, tmp_path):
    folder = _copy(tmp_path)
    _edit_json(folder / "config.json", lambda d: d.update(max_position_embeddings=8))
    code, out, err = run(capsys, "--model", folder, "--prompt", "Hello " * 10, "-m", 2, "-q")
    assert code == 0, err
    assert "warning" in err and "max_position_embeddings (8)" in err
    code, out, err = run(capsys, "--model", GEN, "--prompt", "Hello " * 10, "-m", 2, "-q")
    assert code == 0 and "warning" not in err


def test_system_with_no_chat_template_is_an_error(capsys, no_load):
    args = ("--model", GEN, "--system", "Be brief.", "--no-chat-template")
    assert_user_error(*run(capsys, *args), "--system", "--no-chat-template")


def test_system_with_a_model_without_template_is_an_error(capsys, tmp_path):
    folder = _copy(tmp_path)
    (folder / "chat_template.jinja").unlink()
    _edit_json(folder / "tokenizer_config.json", lambda d: d.pop("chat_template", None))
    assert_user_error(*run(capsys, "--model", folder, "--system", "Be brief."), "--system")


_IMPORTS_PROBE = """
import sys
from qwen35_mlx.generate import main
code = main(sys.argv[1:])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"mlx_lm", "transformers"})
print(code, ",".join(heavy))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--temp", "-1"],
        ["--max-tokens", "0"],
        ["--model", str(GEN), "--image", str(GOLDEN / "vlm" / "image0.png")],
    ],
)
def test_cli_checks_before_heavy_imports(argv):
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTS_PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.split("\n")[0] == "2 ", (proc.stdout, proc.stderr)


def test_mlx_vlm_module_without_mlx_vlm(capsys, monkeypatch):
    from qwen35_mlx import mlx_vlm

    monkeypatch.setitem(sys.modules, "mlx_vlm", None)  # as if not installed
    assert mlx_vlm.main(["generate", "--help"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "mlx-vlm is not installed" in err


def test_error_inside_generation_leaves_stdout_empty(capsys):
    # The prompt's own placeholder makes two for one image: the processor refuses it during
    # generation, after the model loaded; the "==========" header must not be out yet.
    vlm = GOLDEN / "vlm"
    argv = ("--model", vlm, "--image", vlm / "image0.png", "--no-chat-template")
    code, out, err = run(capsys, *argv, "--prompt", "<|image_pad|> twice")
    assert_user_error(code, out, err, "placeholder")


def test_closed_stdout_ends_quietly(capsys, monkeypatch):
    # `python -m qwen35_mlx.generate | head -c 5`: the reader goes away mid-stream
    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    code = main(["--prompt", "hi", "-m", "3"])
    assert code == 1 and capsys.readouterr().err == ""


def test_token_ids_outside_the_vocabulary_are_refused(monkeypatch):
    # MLX's embedding lookup does not bounds-check: an id past the table crashed the process
    # (exit 139) in stream_generate, and in batch_generate through a pad id past the table.
    from qwen35_mlx.generate import default_model

    model, tok = load(default_model())
    n = model.config.vocab_size
    for bad in (n, n + 10**8, -1):
        with pytest.raises(ValueError, match=f"token id {bad}.*vocabulary"):
            generate(model, tok, [5, bad, 7], max_tokens=2)
        with pytest.raises(ValueError, match=f"prompt 1 has token id {bad}"):
            batch_generate(model, tok, [[5, 6], [5, bad]], max_tokens=2)
    # A pad id past the table never reaches the embedding; rows still decode as alone.
    monkeypatch.setattr(type(tok._tokenizer), "pad_token_id", n + 5, raising=False)
    assert tok.pad_token_id == n + 5
    seen = []
    table = model.model.embed_tokens

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = table

        def __call__(self, ids):
            seen.append(int(ids.max()))
            return self.table(ids)

        def as_linear(self, h):
            return self.table.as_linear(h)

    model.compiled_decode = False  # the spy evaluates: keep it out of a compiled trace
    model.model.embed_tokens = Spy()
    got = batch_generate(model, tok, [[5, 6, 7], [8]], max_tokens=3).tokens
    assert seen and max(seen) < n
    assert got[1] == batch_generate(model, tok, [[8]], max_tokens=3).tokens[0]


def test_vision_pad_tokens_without_pixels_are_refused(capsys):
    # A VLM given <|image_pad|> / <|video_pad|> text but no image embedded the pad tokens
    # themselves and generated nonsense with no error.
    model, processor = load(GOLDEN / "vlm")
    for pad, kind in (("<|image_pad|>", "image"), ("<|video_pad|>", "video")):
        with pytest.raises(ValueError, match=f"1 {kind}-pad tokens .* no {kind} was given"):
            generate(model, processor, f"Look: {pad} what is it?", max_tokens=2)
        with pytest.raises(ValueError, match=f"prompt 1 has 1 {kind}-pad"):
            batch_generate(model, processor, ["Hello", f"Look: {pad}"], max_tokens=2)
    assert generate(model, processor, "Look: what is it?", max_tokens=2) is not None
    code = main(
        ["--model", str(GOLDEN / "vlm"), "--prompt", "<|image_pad|> hi", "--max-tokens", "2"]
    )
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "image-pad" in err and len(err.strip().splitlines()) == 1
