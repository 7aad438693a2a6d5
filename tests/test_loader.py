"""Loader: paths, errors a user can cause, HF vs MLX checkpoints, save_mlx, quantized and lazy."""

import gc
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

from qwen35_mlx import loader
from qwen35_mlx.convert import save_mlx
from qwen35_mlx.loader import load, load_model, resolve_path

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


@pytest.fixture(scope="module")
def golden_model():
    return load_model(GOLDEN / "dense_tied")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(GOLDEN / "dense_tied" / "reference.npz"))


def _copy_golden(tmp_path: Path, case: str = "dense_tied") -> Path:
    dst = tmp_path / case
    shutil.copytree(GOLDEN / case, dst)
    return dst


def _rewrite_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# -- paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["does/not/exist/here", "./nope", "/abs/nope"])
def test_resolve_path_missing_local(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        resolve_path(name)


def test_resolve_path_file_is_not_a_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file"):
        resolve_path(f)


def _fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


def test_resolve_path_repo_id_offline(tmp_path, monkeypatch):
    """A repo id resolves from the Hugging Face cache with HF_HUB_OFFLINE; absent, a clear error."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    snap = _fake_hub_cache(tmp_path, "someone/tiny-qwen35", {"config.json": b"{}"})
    assert resolve_path("someone/tiny-qwen35").resolve() == snap.resolve()
    with pytest.raises(FileNotFoundError, match="someone/absent"):
        resolve_path("someone/absent")


# -- errors in the checkpoint ---------------------------------------------------------------------


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_folder_without_weights(tmp_path):
    folder = _copy_golden(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(folder)


def test_not_qwen35_model_type(tmp_path):
    folder = _copy_golden(tmp_path)
    config = _config(folder)
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="llama"):
        load_model(folder)


def test_invalid_config_json(tmp_path):
    folder = _copy_golden(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_model(folder)


def test_unsupported_quantization_config(tmp_path):
    folder = _copy_golden(tmp_path)
    config = _config(folder)
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="fp8"):
        load_model(folder)


def test_missing_and_unexpected_weights_listed(tmp_path):
    folder = _copy_golden(tmp_path)

    def edit(t):
        del t["model.layers.2.mlp.up_proj.weight"]
        del t["model.layers.1.self_attn.k_norm.weight"]
        t["model.layers.0.mlp.extra_proj.weight"] = np.zeros((4, 4), np.float32)

    _rewrite_weights(folder, edit)
    with pytest.raises(ValueError) as e:
        load_model(folder)
    msg = str(e.value)
    assert "2 missing" in msg and "1 unexpected" in msg
    assert "layers.2.mlp.up_proj.weight" in msg
    assert "layers.1.self_attn.k_norm.weight" in msg
    assert "layers.0.mlp.extra_proj.weight" in msg


def test_long_weight_lists_are_truncated(tmp_path):
    folder = _copy_golden(tmp_path)

    def edit(t):
        for i in range(40):
            t[f"model.extra.{i:02d}.weight"] = np.zeros((2,), np.float32)

    _rewrite_weights(folder, edit)
    with pytest.raises(ValueError, match=r"40 unexpected: .*\.\.\. and 28 more"):
        load_model(folder)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    folder = _copy_golden(tmp_path)

    def edit(t):
        t["model.layers.3.mlp.down_proj.weight"] = np.zeros((32, 63), np.float32)

    _rewrite_weights(folder, edit)
    with pytest.raises(
        ValueError, match=r"layers\.3\.mlp\.down_proj\.weight.*\(32, 63\).*\(32, 64\)"
    ):
        load_model(folder)


def test_truncated_safetensors_names_the_file(tmp_path):
    folder = _copy_golden(tmp_path)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        load_model(folder)


@pytest.mark.parametrize(
    "content", [b"", b"\x07", b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!"]
)
def test_corrupt_safetensors_names_the_file(tmp_path, content):
    folder = _copy_golden(tmp_path)
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_model(folder)


def test_sharded_checkpoint_through_index(tmp_path, ref):
    """Shards named by model.safetensors.index.json load together; an absent shard, or a stray
    one the index does not name, is named."""
    folder = _copy_golden(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # A stray shard the index does not name is named (mlx-lm's loader would read it too).
    stray = folder / "model-old.safetensors"
    save_file({"junk": np.zeros(3, np.float32)}, stray)
    with pytest.raises(ValueError, match="index does not name.*model-old.safetensors"):
        load_model(folder)
    stray.unlink()

    ids = mx.array(ref["input_ids"])
    expected = np.array(load_model(GOLDEN / "dense_tied")(ids))
    np.testing.assert_array_equal(np.array(load_model(folder)(ids)), expected)

    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_model(folder)


# -- HF vs MLX, save_mlx round trip ---------------------------------------------------------------


def test_save_mlx_writes_mlx_format(tmp_path, golden_model):
    out = save_mlx(golden_model, _config(GOLDEN / "dense_tied"), tmp_path / "mlx")
    _, metadata = mx.load(str(out / "model.safetensors"), return_metadata=True)
    assert metadata["format"] == "mlx"


def test_save_mlx_round_trip(tmp_path, golden_model, ref):
    """An MLX checkpoint loads to the model it was saved from: identical logits (sanitize runs
    on it as on every checkpoint, and leaves it as it is: test_sanitize_is_idempotent)."""
    out = save_mlx(golden_model, _config(GOLDEN / "dense_tied"), tmp_path / "mlx")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(out)
    ids = mx.array(ref["input_ids"])
    np.testing.assert_array_equal(np.array(loaded(ids)), np.array(golden_model(ids)))


def _checkpoint(kind: str, case: str, tmp_path: Path) -> Path:
    """A checkpoint folder: the golden case as Hugging Face wrote it, saved by `save_mlx`, or
    quantized to 4 bits and saved; `mtp`: a tiny model with an MTP head."""
    if case == "mtp":
        from tests.models.factory import make_text_config, make_text_model
        from tests.models.test_mtp import _write_hf

        model = make_text_model(make_text_config(mtp_num_hidden_layers=1), seed=4)
        hf = _write_hf(model, tmp_path / "hf")
    else:
        hf = GOLDEN / case
    if kind == "hf":
        return hf
    model = load_model(hf)
    if kind == "q4":
        _quantize_like_mlx_lm(model)
    return save_mlx(model, _config(hf), tmp_path / kind)


CASES = ["dense_tied", "dense_untied", "moe_fused", "moe_per_expert", "vlm", "mtp"]


@pytest.mark.parametrize("kind", ["hf", "mlx", "q4"])
@pytest.mark.parametrize("case", CASES)
def test_sanitize_is_idempotent(tmp_path, case, kind):
    """Every checkpoint is sanitized on load, so sanitize must leave sanitized weights as they
    are: sanitize(sanitize(w)) == sanitize(w), name for name, bit for bit."""
    folder = _checkpoint(kind, case, tmp_path)
    config = loader.ModelConfig.from_dict(_config(folder))
    once = loader.build_model(config).sanitize(loader.read_weights(folder))
    twice = loader.build_model(config).sanitize(dict(once))
    assert sorted(twice) == sorted(once)
    for k, v in once.items():
        assert twice[k].dtype == v.dtype, k
        np.testing.assert_array_equal(np.array(twice[k]), np.array(v), err_msg=k)
    if kind != "hf":  # a saved checkpoint's names and layouts are the model's already
        weights = loader.read_weights(folder)
        assert sorted(once) == sorted(weights)
        for k, v in weights.items():
            np.testing.assert_array_equal(np.array(once[k]), np.array(v), err_msg=k)


def test_save_mlx_is_atomic(tmp_path, golden_model):
    """A failure while writing leaves neither the checkpoint nor a temporary folder behind."""

    class Boom(Exception):
        pass

    config = _config(GOLDEN / "dense_tied")
    config["unserializable"] = Boom  # json.dumps fails after the weights are written
    with pytest.raises(TypeError):
        save_mlx(golden_model, config, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []

    out = save_mlx(golden_model, _config(GOLDEN / "dense_tied"), tmp_path / "ckpt")
    with pytest.raises(FileExistsError):
        save_mlx(golden_model, _config(GOLDEN / "dense_tied"), out)
    save_mlx(golden_model, _config(GOLDEN / "dense_tied"), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_dtype_cast_keeps_A_log_fp32(tmp_path, ref):
    model = load_model(GOLDEN / "dense_tied", dtype=mx.bfloat16)
    params = dict(tree_flatten(model.parameters()))
    a_logs = [k for k in params if k.endswith("A_log")]
    assert a_logs
    for k, v in params.items():
        assert v.dtype == (mx.float32 if k.endswith("A_log") else mx.bfloat16), k

    # A bf16 MLX checkpoint keeps bf16 without dtype=, and A_log is brought back to fp32.
    folder = save_mlx(model, _config(GOLDEN / "dense_tied"), tmp_path / "bf16")
    weights = mx.load(str(folder / "model.safetensors"))
    weights = {k: v.astype(mx.bfloat16) for k, v in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    again = dict(tree_flatten(load_model(folder).parameters()))
    for k, v in again.items():
        assert v.dtype == (mx.float32 if k.endswith("A_log") else mx.bfloat16), k

    fp32 = dict(tree_flatten(load_model(GOLDEN / "dense_tied").parameters()))
    assert all(v.dtype == mx.float32 for v in fp32.values())

    by_name = dict(tree_flatten(load_model(GOLDEN / "dense_tied", dtype="float16").parameters()))
    assert {v.dtype for k, v in by_name.items() if not k.endswith("A_log")} == {mx.float16}
    with pytest.raises(ValueError, match="int8"):
        load_model(GOLDEN / "dense_tied", dtype="int8")


# -- quantized ------------------------------------------------------------------------------------


def _quantize_like_mlx_lm(model, group_size=32, bits=4, overrides=None):
    overrides = overrides or {}

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        return overrides.get(path, True)

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return model


def _dequantized_twin(quantized: nn.Module, folder: Path) -> nn.Module:
    """The full-precision model whose weights are the quantized model's, dequantized."""
    twin = load_model(folder)
    modules = dict(twin.named_modules())
    for name, q in quantized.named_modules():
        if isinstance(q, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits, mode=q.mode)
            modules[name].weight = w
    return twin


def test_quantized_checkpoint_loads_quantized(tmp_path, ref):
    folder = GOLDEN / "dense_untied"
    model = load_model(folder)
    ids = mx.array(ref["input_ids"])
    full = np.array(model(ids))

    # lm_head at 8 bits: a per-module override in the quantization block.
    _quantize_like_mlx_lm(model, overrides={"lm_head": {"group_size": 32, "bits": 8}})
    quant_logits = np.array(model(ids))
    out = save_mlx(model, _config(folder), tmp_path / "q4")
    block = _config(out)["quantization"]
    assert (block["group_size"], block["bits"], block["mode"]) == (32, 4, "affine")
    assert block["lm_head"] == {"group_size": 32, "bits": 8, "mode": "affine"}

    loaded = load_model(out)
    qlinears = {n: m for n, m in loaded.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert "lm_head" in qlinears and qlinears["lm_head"].bits == 8
    assert sum(m.bits == 4 for m in qlinears.values()) >= 10
    assert isinstance(loaded.model.embed_tokens, nn.QuantizedEmbedding)
    # Same packed weights as the model it was saved from: same logits, exactly.
    loaded_logits = np.array(loaded(ids))
    np.testing.assert_array_equal(loaded_logits, quant_logits)
    # The quantized layers compute what the full-precision model with the rounded weights does.
    twin = np.array(_dequantized_twin(loaded, folder)(ids))
    err = np.abs(loaded_logits - twin).max() / np.abs(twin).max()
    assert err < 1e-4, err
    # And it is still the same model as the unquantized one. This tiny random model is chaotic
    # (4-bit rounding of Gaussian weights moves its logits a lot: correlation ~0.87 measured),
    # so this only rules out a garbage load (correlation ~0).
    corr = np.corrcoef(loaded_logits.ravel(), full.ravel())[0, 1]
    assert corr > 0.8, corr


def test_quantized_module_without_its_packed_weight_is_named(tmp_path):
    """Scales without the packed weight (mlx-lm's quantizer reads the weight's shape): one
    ValueError line naming it; the packed weight without its scales (the module stays
    unquantized): one line naming the biases left over."""
    folder = _checkpoint("q4", "dense_tied", tmp_path)
    file = folder / "model.safetensors"
    weights = mx.load(str(file))
    name = "model.layers.3.mlp.up_proj"
    assert f"{name}.scales" in weights
    for drop, match in [
        (f"{name}.weight", rf"missing: [^;]*{name}\.weight"),
        (f"{name}.scales", rf"unexpected: [^;]*{name}\.biases"),
    ]:
        broken = {k: v for k, v in weights.items() if k != drop}
        mx.save_safetensors(str(file), broken, metadata={"format": "mlx"})
        with pytest.raises(ValueError, match=match):
            load_model(folder)


# -- lazy -----------------------------------------------------------------------------------------


def test_lazy_load_does_not_materialize(tmp_path):
    """lazy=True maps the weights; memory grows only when the parameters are evaluated."""
    config = _config(GOLDEN / "dense_untied")
    config["vocab_size"] = 16384  # ~4 MiB of fp32 embeddings + lm_head, enough to measure
    model = loader.build_model(loader.ModelConfig.from_dict(config))
    mx.eval(model.parameters())
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    folder = save_mlx(model, config, tmp_path / "big")
    del model
    gc.collect()

    before = mx.get_active_memory()
    lazy = load_model(folder, lazy=True)
    lazy_delta = mx.get_active_memory() - before
    mx.eval(lazy.parameters())
    evaluated_delta = mx.get_active_memory() - before
    del lazy
    gc.collect()

    before = mx.get_active_memory()
    eager = load_model(folder)
    eager_delta = mx.get_active_memory() - before
    del eager

    assert lazy_delta < 0.1 * nbytes, (lazy_delta, nbytes)
    assert evaluated_delta >= 0.9 * nbytes, (evaluated_delta, nbytes)
    assert eager_delta >= 0.9 * nbytes, (eager_delta, nbytes)


# -- load() with a tokenizer ----------------------------------------------------------------------


def _write_tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)


def test_load_returns_model_and_tokenizer(tmp_path, ref):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    folder = _copy_golden(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load(folder)
    _write_tiny_tokenizer(folder, _config(folder)["vocab_size"])
    model, tokenizer = load(str(folder))
    assert isinstance(tokenizer, TokenizerWrapper)
    assert tokenizer.encode("w0 w5 w7", add_special_tokens=False) == [4, 9, 11]
    assert 2 in tokenizer.eos_token_ids
    ids = mx.array(ref["input_ids"])
    expected = np.array(load_model(GOLDEN / "dense_tied")(ids))
    np.testing.assert_array_equal(np.array(model(ids)), expected)
