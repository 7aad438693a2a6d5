"""`qwen35_mlx.convert`: round trips on tiny dense, MoE and vision-language checkpoints through
qwen35_mlx, mlx-lm (stock where it supports the type, with our plugin otherwise) and mlx-vlm
(stock and with our plugin; skipped when mlx-vlm, an optional extra, is absent); layout,
quantization choices, atomic writes and CLI errors."""

import itertools
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qwen35_mlx import convert as convert_mod
from qwen35_mlx.convert import convert, main
from qwen35_mlx.loader import load, load_model
from tests.conftest import MODEL_LOGIT_BAR, rel_err
from tests.models.factory import make_text_config, randomize

GOLDEN = Path(__file__).parent / "data" / "golden"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
PROMPT = [1, 5, 9, 17, 33, 65, 100, 7, 3, 200]
N = 8
REGULAR = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]


def _hf_text(tmp: Path, golden: str) -> Path:
    """A Hugging Face text checkpoint: a golden one plus the `generate` golden's tokenizer."""
    out = tmp / golden
    shutil.copytree(GOLDEN / golden, out, ignore=shutil.ignore_patterns("reference.npz"))
    for f in TOKENIZER_FILES:
        shutil.copy(GOLDEN / "generate" / f, out / f)
    return out


def _hf_wrapped(tmp: Path, golden: str, model_type: str) -> Path:
    """The text golden as a Qwen3.5 `model_type` with a text_config and no vision tower, weights
    under `model.language_model.` (the types stock mlx-lm knows)."""
    src = _hf_text(tmp / "text", golden)
    out = tmp / f"{golden}_{model_type}"
    shutil.copytree(src, out)
    text = json.loads((src / "config.json").read_text())
    config = {"model_type": model_type, "text_config": text, "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(src / "model.safetensors"))
    renamed = {
        (k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v
        for k, v in weights.items()
    }
    mx.save_safetensors(str(out / "model.safetensors"), renamed)
    return out


def _regular_vlm(tmp: Path, moe: bool = False) -> Path:
    """A VLM whose layer_types follow full_attention_interval (stock mlx-lm, mlx-vlm and Swift
    build layers from the interval): the golden VLM's vision tower (Hugging Face layout) and a
    random text model of its shapes (with `moe`, a `qwen3_5_moe` one)."""
    from qwen35_mlx.models.text import TextModel

    out = tmp / ("vlm_moe" if moe else "vlm_regular")
    shutil.copytree(GOLDEN / "vlm", out, ignore=shutil.ignore_patterns("*.npz", "*.safetensors"))
    config = json.loads((GOLDEN / "vlm" / "config.json").read_text())
    config["text_config"]["layer_types"] = REGULAR
    config["text_config"]["full_attention_interval"] = 4
    if moe:
        config["model_type"] = "qwen3_5_moe"
        config["text_config"].update(
            model_type="qwen3_5_moe_text", num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=True,
        )  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    text = {k: v for k, v in config["text_config"].items() if k not in ("dtype",)}
    fields = set(make_text_config().__dataclass_fields__)
    text_model = randomize(
        TextModel(make_text_config(**{k: v for k, v in text.items() if k in fields})), seed=3
    )
    weights = {k: v for k, v in mx.load(str(GOLDEN / "vlm" / "model.safetensors")).items()}
    weights = {k: v for k, v in weights.items() if k.startswith("model.visual.")}
    weights.update(dict(tree_flatten(text_model.parameters())))
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    return {
        "dense": _hf_text(tmp, "dense_untied"),  # carries mtp.* weights
        "moe": _hf_text(tmp, "moe_per_expert"),  # per-expert Hugging Face layout
        "vlm": GOLDEN / "vlm",
        "vlm_regular": _regular_vlm(tmp),
        "vlm_moe": _regular_vlm(tmp, moe=True),
        "dense_qwen3_5": _hf_wrapped(tmp, "dense_untied", "qwen3_5"),
        "moe_qwen3_5_moe": _hf_wrapped(tmp, "moe_per_expert", "qwen3_5_moe"),
    }


MODES = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "q8": {"quantize": True, "q_bits": 8, "q_group_size": 32},
    "q4": {"quantize": True, "q_bits": 4, "q_group_size": 32},
}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlx")
    cache = {}

    def get(kind: str, mode: str) -> Path:
        if (kind, mode) not in cache:
            out = tmp / f"{kind}_{mode}"
            cache[kind, mode] = convert(sources[kind], out, progress=False, **MODES[mode])
        return cache[kind, mode]

    return get


def greedy(model, n: int = N, prompt=PROMPT) -> list[int]:
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(prompt), model, max_tokens=n)
    return [int(t) for t, _ in itertools.islice(steps, n)]


def logits(model, prompt=PROMPT) -> np.ndarray:
    out = model(mx.array([prompt]))
    out = getattr(out, "logits", out)
    return np.array(out.astype(mx.float32))


def _reference(src: Path, mode: str):
    """The source checkpoint loaded by qwen35_mlx and brought to `mode` in memory."""
    opts = MODES[mode]
    model = load_model(src, dtype=opts.get("dtype"))
    if opts.get("quantize"):
        from mlx_lm.utils import quantize_model

        predicate = convert_mod.quant_predicate(model, group_size=opts["q_group_size"])
        quantize_model(model, {}, opts["q_group_size"], opts["q_bits"], quant_predicate=predicate)
    return model


# -- qwen35_mlx.load ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", ["dense", "moe", "vlm", "vlm_moe"])
def test_convert_round_trip_in_qwen35_mlx(converted, sources, kind, mode):
    """The converted folder gives the logits of the source brought to the same dtype or
    quantization in memory (exactly), hence the same greedy tokens. A quantized one drifts from
    the fp32 source by exactly quantization's rounding: its logits are those of the fp32 model
    whose weights are the dequantized ones (the error against fp32 is printed, not bounded:
    these tiny random models amplify weight noise, 8-bit gives ~0.3 relative on `dense`)."""
    out = converted(kind, mode)
    model, tokenizer = load(out)
    ref = _reference(sources[kind], mode)
    np.testing.assert_array_equal(logits(model), logits(ref))
    assert greedy(model) == greedy(ref)
    if MODES[mode].get("quantize"):
        from mlx_lm.utils import dequantize_model

        fake = dequantize_model(_reference(sources[kind], mode))
        assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fake.named_modules())
        assert rel_err(logits(model), logits(fake)) < MODEL_LOGIT_BAR
        fp32 = load_model(sources[kind])
        err = rel_err(logits(model), logits(fp32))
        same = sum(a == b for a, b in zip(greedy(model), greedy(fp32), strict=True))
        print(f"\n{kind} {mode}: logit error vs fp32 {err:.2e}, greedy tokens equal {same}/{N}")
        assert err > 0


def test_convert_layout(converted):
    out = converted("vlm", "q4")
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "chat_template.jinja",
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    _, metadata = mx.load(str(out / "model.safetensors"), return_metadata=True)
    assert metadata == {"format": "mlx"}
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"]
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert "vision_config" in config
    for f in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (out / f).read_bytes() == (GOLDEN / "vlm" / f).read_bytes()


def test_convert_shards(converted, sources, tmp_path, monkeypatch):
    """Past the shard size: model-0000x-of-0000y files, an index naming them, and it loads."""
    import mlx_lm.utils

    def small_shards(weights):
        items = list(weights.items())
        return [dict(items[i : i + 20]) for i in range(0, len(items), 20)]

    monkeypatch.setattr(mlx_lm.utils, "make_shards", small_shards)
    out = convert(sources["moe"], tmp_path / "sharded", dtype="float32", progress=False)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    one = load_model(converted("moe", "fp32"))
    np.testing.assert_array_equal(logits(load_model(out)), logits(one))


def test_convert_quantization_choices(converted):
    """Routers and the shared-expert gate at 8 bits, the vision tower unquantized, A_log fp32,
    mtp.* dropped, conv1d in MLX layout."""
    moe = json.loads((converted("moe", "q4") / "config.json").read_text())["quantization"]
    gates = {k: v for k, v in moe.items() if k.endswith(("mlp.gate", "shared_expert_gate"))}
    assert len(gates) == 8 and all(v["bits"] == 8 for v in gates.values())
    names = mx.load(str(converted("moe", "q4") / "model.safetensors")).keys()
    experts = [k for k in names if ".mlp.switch_mlp." in k]
    assert len(experts) == 4 * 3 * 3 and not any(".mlp.experts." in k for k in names)
    model = load_model(converted("moe", "q4"))
    assert model.layers[0].mlp.gate.bits == 8
    assert model.layers[0].mlp.experts.gate_proj.bits == 4

    vlm = load_model(converted("vlm", "q4"))
    kinds = {type(m).__name__ for n, m in vlm.named_modules() if n.startswith("vision_tower")}
    assert "QuantizedLinear" not in kinds and "Linear" in kinds
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in vlm.language_model.named_modules())

    weights = mx.load(str(converted("dense", "bf16") / "model.safetensors"))
    assert not any("mtp." in k for k in weights)
    for k, v in weights.items():
        assert v.dtype == (mx.float32 if k.endswith("A_log") else mx.bfloat16), k
        if k.endswith("conv1d.weight"):
            assert v.shape[-1] == 1


def test_convert_quantize_vision_and_mixed(sources, tmp_path):
    out = convert(
        sources["vlm"],
        tmp_path / "mixed",
        mixed="mixed_4_6",
        q_group_size=32,
        quantize_vision=True,
        progress=False,
    )
    block = json.loads((out / "config.json").read_text())["quantization"]
    names = mx.load(str(out / "model.safetensors")).keys()
    assert any(k.startswith("vision_tower") and k.endswith(".scales") for k in names)
    assert {v["bits"] for k, v in block.items() if isinstance(v, dict)} == {4, 6}
    model, _ = load(out)
    vision = [m for n, m in model.named_modules() if n.startswith("vision_tower")]
    assert any(isinstance(m, nn.QuantizedLinear) for m in vision)
    assert greedy(model)


# -- errors and atomic writes ---------------------------------------------------------------------


def test_convert_failure_leaves_nothing(sources, tmp_path, monkeypatch):
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise OSError("disk full")

    monkeypatch.setattr(convert_mod, "write_weights", boom)
    with pytest.raises(OSError, match="disk full"):
        convert(sources["dense"], tmp_path / "out", progress=False)
    assert calls and list(tmp_path.iterdir()) == []


def test_convert_cli(sources, tmp_path, capsys):
    main(["--hf-path", str(sources["dense"]), "--mlx-path", str(tmp_path / "o"), "-q",
          "--q-group-size", "32", "--no-progress"])  # fmt: skip
    assert (tmp_path / "o" / "config.json").is_file()
    capsys.readouterr()
    cases = [
        ["--hf-path", str(tmp_path / "absent"), "--mlx-path", str(tmp_path / "x")],
        ["--hf-path", str(sources["dense"]), "--mlx-path", str(tmp_path / "o")],
        ["--hf-path", str(sources["dense"]), "--mlx-path", str(tmp_path / "y"), "--q-bits", "7"],
        ["--hf-path", str(tmp_path / "o"), "--mlx-path", str(tmp_path / "z")],
        ["--hf-path", str(GOLDEN / "dense_tied"), "--mlx-path", str(tmp_path / "w")],
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "error:" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_overwrite_replaces_a_file_and_leaves_nothing_else(tmp_path):
    (tmp_path / "out").write_text("not a checkpoint")
    convert_mod.atomic_folder(
        tmp_path / "out", lambda tmp: (tmp / "a").write_text("x"), overwrite=True
    )
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "a").read_text() == "x"


def test_convert_cli_refuses_a_config_that_is_not_an_object(tmp_path, capsys):
    src = _hf_text(tmp_path, "dense_untied")
    (src / "config.json").write_text("[1, 2]")
    with pytest.raises(SystemExit) as e:
        main(["--hf-path", str(src), "--mlx-path", str(tmp_path / "o"), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "config.json" in err and "JSON object" in err, err
    assert not (tmp_path / "o").exists()


def test_convert_warns_when_swift_would_misbuild_layers(tmp_path):
    with pytest.warns(UserWarning, match="full_attention_interval"):
        convert(GOLDEN / "vlm", tmp_path / "v", progress=False)
    regular = {"num_hidden_layers": 4, "layer_types": REGULAR}
    assert convert_mod.swift_layout_warning(regular) is None


def test_convert_cli_prints_a_warning_as_one_line(tmp_path, capsys):
    main(["--hf-path", str(GOLDEN / "vlm"), "--mlx-path", str(tmp_path / "v"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m qwen35_mlx.convert: warning: layer_types"), err
    assert err.count("\n") == 0, err


# -- mlx-lm ---------------------------------------------------------------------------------------


@pytest.fixture
def plugin():
    from qwen35_mlx import mlx_lm_plugin

    mlx_lm_plugin.register()
    yield
    mlx_lm_plugin.unregister()


@pytest.mark.parametrize("mode", ["bf16", "q4"])
@pytest.mark.parametrize("kind", ["dense", "moe", "vlm"])
def test_convert_round_trip_in_mlx_lm_with_plugin(converted, plugin, kind, mode):
    import mlx_lm

    out = converted(kind, mode)
    theirs, _ = mlx_lm.load(str(out))
    ours, _ = load(out)
    assert greedy(theirs) == greedy(ours)


@pytest.mark.parametrize("mode", ["fp32", "q8", "q4"])
@pytest.mark.parametrize("kind", ["dense_qwen3_5", "moe_qwen3_5_moe", "vlm_regular", "vlm_moe"])
def test_convert_round_trip_in_stock_mlx_lm(converted, kind, mode):
    """mlx-lm's own qwen3_5 / qwen3_5_moe models (no plugin) load what we write."""
    import mlx_lm
    from mlx_lm.utils import MODEL_REMAPPING

    assert MODEL_REMAPPING.get("qwen3_5") != "qwen35_mlx"
    out = converted(kind, mode)
    theirs, _ = mlx_lm.load(str(out))
    assert type(theirs).__module__.startswith("mlx_lm.models.qwen3_5")
    ours, _ = load(out)
    assert greedy(theirs) == greedy(ours)
    err = rel_err(logits(theirs), logits(ours))
    assert err < (1e-5 if mode == "fp32" else 1e-3), err


def test_mlx_lm_convert_command_still_works(sources, tmp_path, capsys):
    """`python -m qwen35_mlx.mlx_lm convert` (mlx-lm's converter over our models) still writes
    a checkpoint that qwen35_mlx loads."""
    from qwen35_mlx import mlx_lm_plugin
    from qwen35_mlx.mlx_lm import main as mlx_lm_main

    try:
        mlx_lm_main(["convert", "--hf-path", str(sources["dense"]), "--mlx-path",
                     str(tmp_path / "m"), "-q", "--q-group-size", "32"])  # fmt: skip
    finally:
        mlx_lm_plugin.unregister()
    model, _ = load(tmp_path / "m")
    np.testing.assert_array_equal(logits(model), logits(_reference(sources["dense"], "q4")))


# -- mlx-vlm --------------------------------------------------------------------------------------


def _vlm_greedy(model, n: int = N) -> list[int]:
    from mlx_vlm.generate import generate_step

    steps = generate_step(mx.array([PROMPT]), model, None, None, max_tokens=n, temperature=0.0)
    return [int(t) for t, _ in itertools.islice(steps, n)]


@pytest.mark.parametrize("mode", ["bf16", "q4"])
def test_convert_round_trip_in_mlx_vlm_with_plugin(converted, mode):
    pytest.importorskip("mlx_vlm", reason="mlx-vlm (the `vlm` extra) is not installed")
    from mlx_vlm import load as vlm_load

    from qwen35_mlx import mlx_vlm_plugin

    out = converted("vlm", mode)
    mlx_vlm_plugin.register()
    try:
        theirs, _ = vlm_load(str(out))
        assert isinstance(theirs, mlx_vlm_plugin.VisionLanguageModel)
        ours, _ = load(out)
        assert _vlm_greedy(theirs) == greedy(ours)
    finally:
        mlx_vlm_plugin.unregister()


@pytest.mark.parametrize("mode", ["fp32", "q4"])
@pytest.mark.parametrize("kind", ["vlm_regular", "vlm_moe"])
def test_convert_round_trip_in_stock_mlx_vlm(converted, kind, mode):
    pytest.importorskip("mlx_vlm", reason="mlx-vlm (the `vlm` extra) is not installed")
    from mlx_vlm import load as vlm_load

    out = converted(kind, mode)
    theirs, _ = vlm_load(str(out))
    assert type(theirs).__module__.startswith("mlx_vlm.models.qwen3_5")
    ours, _ = load(out)
    assert _vlm_greedy(theirs) == greedy(ours)


# -- mlx-swift-lm (tests/data/mlx_swift_lm/qwen35.json: what it reads, at a noted commit) ----------

SWIFT = json.loads((Path(__file__).parent / "data" / "mlx_swift_lm" / "qwen35.json").read_text())


def _swift_env(text: dict, vision: dict | None) -> dict:
    env = {k: text.get(k, default) for k, default in SWIFT["config_keys"]["text"].items()}
    env["head_dim"] = env["head_dim"] or env["hidden_size"] // env["num_attention_heads"]
    env["key_dim"] = env["linear_key_head_dim"] * env["linear_num_key_heads"]
    env["value_dim"] = env["linear_value_head_dim"] * env["linear_num_value_heads"]
    env["conv_dim"] = 2 * env["key_dim"] + env["value_dim"]
    if vision is not None:
        v = {k: vision.get(k, default) for k, default in SWIFT["config_keys"]["vision"].items()}
        v["merge_hidden"] = v["hidden_size"] * v["spatial_merge_size"] ** 2
        env["vision"] = v
    return env


def _shape(exprs: list, env: dict) -> tuple:
    return tuple(e if isinstance(e, int) else int(eval(e, {}, dict(env))) for e in exprs)  # noqa: S307


def swift_expected(config: dict, runtime: str) -> dict[str, tuple]:
    """{name: shape} of every parameter mlx-swift-lm's model for this config holds."""
    kind, model_type = runtime.split(":")
    tree = SWIFT["trees"][runtime]
    text = config.get("text_config") or config
    env = _swift_env(text, config.get("vision_config"))
    p = SWIFT["text_params"]
    out = {}
    groups = [p["model"]] + ([] if env["tie_word_embeddings"] else [p["untied"]])
    for g in groups:
        out.update({tree["text"] + k: _shape(s, env) for k, s in g.items()})
    for i in range(env["num_hidden_layers"]):
        linear = (i + 1) % env["full_attention_interval"] != 0
        mlp = p["moe_mlp"] if env["num_experts"] > 0 else p["dense_mlp"]
        for g in (p["layer"], p["linear_attention" if linear else "full_attention"], mlp):
            prefix = f"{tree['text']}model.layers.{i}."
            out.update({prefix + k: _shape(s, env) for k, s in g.items()})
    if tree.get("vision", "dropped") != "dropped":
        v, vp, pre = env["vision"], SWIFT["vision_params"], tree["vision"]
        out.update({pre + k: _shape(s, v) for k, s in vp["tower"].items()})
        for j in range(v["depth"]):
            out.update({f"{pre}blocks.{j}.{k}": _shape(s, v) for k, s in vp["block"].items()})
        for j in range(len(v["deepstack_visual_indexes"])):
            d = f"{pre}deepstack_merger_list.{j}."
            out.update({d + k: _shape(s, v) for k, s in vp["deepstack"].items()})
    return out


def swift_llm_sanitize(weights: dict, config: dict, model_type: str) -> tuple[dict, bool]:
    """mlx-swift-lm's LLM sanitize, from the fixture's rules; returns (weights, norms shifted)."""
    rules = SWIFT["sanitize"]["llm"]
    assert not any("experts.gate_up_proj" in k for k in weights)  # no MoE split needed
    if model_type != "qwen3_5_text":
        pre = rules["prefixes"]
        out = {}
        for k, v in weights.items():
            if k.startswith(tuple(pre["drop_key_prefixes"])):
                continue
            for old, new in pre["replace"].items():
                if k.startswith(old):
                    k = k.replace(old, new, 1)
            if not k.startswith(pre["prepend_unless_prefixed"]):
                k = pre["prepend_unless_prefixed"] + k
            out[k] = v
        weights = out
    shift = any("mtp." in k for k in weights) or any(
        "conv1d.weight" in k and v.shape[-1] != 1 for k, v in weights.items()
    )
    weights = {k: v for k, v in weights.items() if "mtp." not in k}
    text = config.get("text_config") or config
    if text.get("tie_word_embeddings", False):
        weights = {k: v for k, v in weights.items() if "lm_head" not in k.split(".")}
    suffixes = tuple(rules["text"]["norm_shift"]["suffixes"])
    out = {}
    for k, v in weights.items():
        if "conv1d.weight" in k and v.shape[-1] != 1:
            v = mx.moveaxis(v, 2, 1)
        elif shift and k.endswith(suffixes) and v.ndim == 1:
            v = v + 1
        out[k] = v
    return out, shift


def _check_against_swift(weights: dict, expected: dict, quantization: dict | None, where: str):
    """Every name Swift expects is there with its shape (packed as the config's quantization
    says for the modules stored quantized), and nothing else is."""
    q = quantization or {}
    seen = set()
    for name, shape in expected.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{module}.scales" in weights:
            params = q.get(module) or q  # Swift: the exact path's entry, else the default
            assert isinstance(params, dict) and "bits" in params, f"{where}: {module} has no params"
            gs, bits = params["group_size"], params["bits"]
            assert weights[name].shape == (*shape[:-1], shape[-1] * bits // 32), (where, name)
            assert weights[f"{module}.scales"].shape == (*shape[:-1], shape[-1] // gs), name
            assert weights[f"{module}.biases"].shape == (*shape[:-1], shape[-1] // gs), name
            seen |= {f"{module}.scales", f"{module}.biases"}
        else:
            assert name in weights, f"{where}: Swift expects {name}, missing"
            assert tuple(weights[name].shape) == shape, (where, name, weights[name].shape, shape)
        seen.add(name)
    assert set(weights) == seen, f"{where}: keys Swift does not know: {sorted(set(weights) - seen)}"


SWIFT_CASES = {
    "dense": ["llm:qwen3_5_text"],
    "dense_qwen3_5": ["llm:qwen3_5"],
    "moe_qwen3_5_moe": ["llm:qwen3_5_moe"],
    "vlm_regular": ["llm:qwen3_5", "vlm:qwen3_5"],
    "vlm_moe": ["llm:qwen3_5_moe", "vlm:qwen3_5_moe"],
}


@pytest.mark.parametrize("mode", ["fp32", "q4"])
@pytest.mark.parametrize("kind", list(SWIFT_CASES))
def test_converted_checkpoint_matches_mlx_swift_lm(converted, sources, kind, mode):
    """What we write loads in mlx-swift-lm as its sources (the fixture) read it: every key it
    expects with its shape, none it does not know, per-module quantization under its paths,
    norms shifted once (its shift trigger stays off: no mtp.*, conv1d already [C, K, 1]), and
    the config keys it reads carried over."""
    out = converted(kind, mode)
    config = json.loads((out / "config.json").read_text())
    weights, metadata = {}, {}
    for f in sorted(out.glob("*.safetensors")):
        w, m = mx.load(str(f), return_metadata=True)
        weights.update(w)
        metadata = metadata or m
    ours = dict(tree_flatten(load_model(out).parameters()))
    for runtime in SWIFT_CASES[kind]:
        model_type = runtime.split(":")[1]
        assert config["model_type"] == model_type
        if runtime.startswith("vlm:"):
            assert metadata.get("format", "").lower() == "mlx"  # Swift then keeps names as-is
            seen = weights
        else:
            seen, shifted = swift_llm_sanitize(weights, config, model_type)
            assert not shifted, "mlx-swift-lm would shift our norms a second time"
            prefix = SWIFT["trees"][runtime]["text"]
            norms = [k for k in seen if k.endswith("model.norm.weight")]
            assert norms
            for k in norms:  # the values Swift ends with are the ones our model runs
                np.testing.assert_array_equal(np.array(seen[k]), np.array(ours[k]))
            assert prefix in ("", "language_model.")
        _check_against_swift(seen, swift_expected(config, runtime), config.get("quantization"),
                             f"{kind}/{mode}/{runtime}")  # fmt: skip

    source = json.loads((sources[kind] / "config.json").read_text())
    for part in ("text_config", None):
        src = source.get(part) if part else source
        dst = config.get(part) if part else config
        for key in SWIFT["config_keys"]["text"]:
            if src and key in src:
                assert dst[key] == src[key], (part, key)


def test_swift_fixture_records_its_source():
    assert len(SWIFT["source"]["commit"]) == 40
    assert "qwen3_5_moe_text" in SWIFT["model_types"]["not_registered"]
    names = [a["name"] for a in SWIFT["gated_delta"]["arguments"]]
    assert names == ["q", "k", "v", "a", "b", "aLog", "dtBias", "state", "mask"]


def test_swift_check_catches_mtp_and_double_shift(converted):
    """The Swift check fails on a checkpoint that keeps mtp.* (Swift would shift twice) or
    misses a key."""
    out = converted("dense", "fp32")
    weights = dict(mx.load(str(out / "model.safetensors")))
    config = json.loads((out / "config.json").read_text())
    _, shifted = swift_llm_sanitize(
        {**weights, "mtp.fc.weight": mx.zeros((2, 2))}, config, "qwen3_5_text"
    )
    assert shifted
    missing = {k: v for k, v in weights.items() if not k.endswith("q_norm.weight")}
    with pytest.raises(AssertionError, match="q_norm"):
        _check_against_swift(missing, swift_expected(config, "llm:qwen3_5_text"), None, "x")
