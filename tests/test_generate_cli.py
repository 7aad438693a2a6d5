"""`python -m qwen35_mlx.generate` through main([...]): greedy output equals transformers' golden
continuation; every error a user can cause is one line on stderr and exit code 2."""

import io
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from qwen35_mlx.generate import build_parser, build_prompt, default_model, main

GOLDEN = Path(__file__).parent / "data" / "golden" / "generate"
G = json.loads((GOLDEN / "golden.json").read_text())


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, out, err, *needles):
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    assert "Traceback" not in err
    assert err.startswith("python -m qwen35_mlx.generate: error: ")
    for n in needles:
        assert n in err, err


def test_greedy_chat_output_equals_golden(capsys):
    n = len(G["chat"]["tokens"])
    code, out, err = run(
        capsys, "--model", GOLDEN, "--prompt", G["user"], "--system", G["system"],
        "--max-tokens", n, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert out == G["chat"]["text"] + "\n"


def test_no_chat_template_and_stats(capsys):
    n = len(G["raw"]["tokens"])
    code, out, err = run(
        capsys, "--model", GOLDEN, "--prompt", G["raw"]["prompt"], "--no-chat-template",
        "--max-tokens", n, "--prefill-step-size", 3,
    )  # fmt: skip
    assert code == 0, err
    assert G["raw"]["text"] in out
    assert f"Prompt: {len(G['raw']['prompt_ids'])} tokens" in out
    assert f"Generation: {n} tokens" in out and "tokens-per-sec" in out
    assert "Peak memory:" in out


def test_prompt_from_stdin(capsys, monkeypatch):
    n = len(G["raw"]["tokens"])
    monkeypatch.setattr("sys.stdin", io.StringIO(G["raw"]["prompt"]))
    code, out, _ = run(
        capsys, "--model", GOLDEN, "--prompt", "-", "--no-chat-template", "-m", n, "-q"
    )
    assert code == 0
    assert out == G["raw"]["text"] + "\n"


def test_thinking_flags_reach_the_chat_template():
    from qwen35_mlx import load

    _, tok = load(GOLDEN)
    parser = build_parser()
    off = build_prompt(tok, "hi", parser.parse_args(["--disable-thinking"]), 0)
    on = build_prompt(tok, "hi", parser.parse_args(["--enable-thinking"]), 0)
    assert off.endswith("<think>\n\n</think>\n\n") and on.endswith("<think>\n")
    sys_prompt = build_prompt(tok, "hi", parser.parse_args(["--system", "Be brief."]), 0)
    assert sys_prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_default_model_is_the_embedded_one(capsys):
    import qwen35_mlx

    embedded = Path(qwen35_mlx.__file__).parent / "assets" / "tiny"
    assert Path(default_model()) == embedded and (embedded / "model.safetensors").is_file()
    code, out, err = run(capsys, "--prompt", "Hello", "-m", 3, "-q")
    assert code == 0, err
    assert out.strip(), out


def test_missing_embedded_model(capsys, monkeypatch, tmp_path):
    # The CLI module, not the package's generate() function that shares its name.
    cli = sys.modules[main.__module__]
    monkeypatch.setattr(cli, "default_model", lambda: str(tmp_path / "tiny"))
    code, out, err = run(capsys, "--prompt", "Hello", "-m", 3, "-q")
    assert_user_error(code, out, err, "embedded model is missing")


def test_missing_path(capsys, tmp_path):
    assert_user_error(*run(capsys, "--model", tmp_path / "nope"), "nope")


def test_not_a_qwen35_checkpoint(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    shutil.copy(GOLDEN / "model.safetensors", tmp_path)
    assert_user_error(*run(capsys, "--model", tmp_path), "llama")


def test_truncated_safetensors(capsys, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(GOLDEN, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(*run(capsys, "--model", folder), "model.safetensors")


def test_image_for_text_only_model(capsys, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    code, out, err = run(capsys, "--model", GOLDEN, "--image", tmp_path / "red.png")
    assert_user_error(code, out, err, "text-only")


@pytest.mark.parametrize("content", [b"not an image at all", None])
def test_unreadable_image(capsys, tmp_path, content):
    img = tmp_path / "broken.png"
    if content is not None:
        img.write_bytes(content)
    assert_user_error(*run(capsys, "--model", GOLDEN, "--image", img), "cannot read image")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--max-tokens", "0"], "--max-tokens"),
        (["--max-tokens", "-3"], "--max-tokens"),
        (["--max-tokens", "many"], "--max-tokens"),
        (["--prompt", ""], "empty"),
        (["--prompt", "   \n"], "empty"),
    ],
)
def test_bad_arguments(capsys, argv, needle):
    assert_user_error(*run(capsys, "--model", GOLDEN, *argv), needle)


def test_empty_stdin_prompt(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert_user_error(*run(capsys, "--model", GOLDEN, "--prompt", "-"), "empty")


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    """A random model with an MTP head, the golden checkpoint's tokenizer and vocabulary."""
    from qwen35_mlx.convert import save_mlx
    from tests.models.factory import make_text_config, make_text_model

    model = make_text_model(make_text_config(vocab_size=384, mtp_num_hidden_layers=1), seed=4)
    config = {**model.config.to_dict(), "eos_token_id": 2}
    files = [GOLDEN / f for f in ("tokenizer.json", "tokenizer_config.json")]
    return save_mlx(model, config, tmp_path_factory.mktemp("mtp") / "m", extra_files=files)


@pytest.mark.parametrize("native", [True, False], ids=["native-head", "ops-head"])
def test_mtp_default_auto_same_text_and_acceptance_stats(
    capsys, monkeypatch, mtp_checkpoint, native
):
    # No flag: MTP where it was measured to pay (speculative.mtp_pays: greedy, on the CPU, the
    # round's head as the native primitive), off elsewhere; --no-mtp: off. The same text always.
    from qwen35_mlx import load
    from qwen35_mlx.kernels import cpu_ext
    from qwen35_mlx.models import mtp as mtp_lib
    from qwen35_mlx.speculative import greedy_or_sampling, mtp_pays

    monkeypatch.setattr(mtp_lib, "NATIVE_HEAD", native)
    model, _ = load(mtp_checkpoint)
    expect = mtp_pays(model, greedy_or_sampling(None, 0.0, 0.0, 0, 0.0))
    if native and mx.default_device() == mx.cpu and hasattr(cpu_ext.load(), "mtp_head"):
        assert expect  # where the extension is built (CI), "auto" is on: the case is exercised
    if not native:
        assert not expect
    args = ("--model", mtp_checkpoint, "--prompt", "hello there", "--no-chat-template", "-m", 12)
    code, plain, err = run(capsys, *args, "--no-mtp")
    assert code == 0, err
    assert "MTP:" not in plain
    code, auto, err = run(capsys, *args)
    assert code == 0, err
    assert ("MTP:" in auto) == expect
    assert auto.split("=" * 10)[1] == plain.split("=" * 10)[1]  # the same text
    for k in (None, 1, 3):
        code, out, err = run(capsys, *args, *(("--mtp-k", k) if k else ("--mtp",)))
        assert code == 0, err
        assert out.split("=" * 10)[1] == plain.split("=" * 10)[1]  # the same text
        assert "MTP: " in out and "of drafted tokens accepted" in out


def test_mtp_option_errors(capsys, mtp_checkpoint):
    base = ("--model", mtp_checkpoint, "--prompt", "hi", "--no-chat-template", "-m", 2)
    assert_user_error(*run(capsys, *base, "--mtp-k", 0), "--mtp-k must be at least 1")
    assert_user_error(*run(capsys, *base, "--mtp-k", 2, "--no-mtp"), "cannot go with --no-mtp")
    # a checkpoint without the head: --mtp-k is ignored with a note
    code, out, err = run(capsys, "--model", GOLDEN, "--prompt", "hi", "-m", 2, "--mtp-k", 2)
    assert code == 0 and "no multi-token-prediction head" in err and "--mtp-k ignored" in err
