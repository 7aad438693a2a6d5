"""Write the golden text checkpoints and their Hugging Face reference logits.

Dev-only: needs torch and transformers (the `dev` extra). Tests never import this file; they read
what it writes under `tests/data/golden/<case>/`:

- `config.json` + `model.safetensors` as `save_pretrained` writes them (Hugging Face's own format:
  conv1d `[C, 1, K]`, zero-centred RMSNorm weights, `mtp.*` absent, `model.*` keys);
- `reference.npz`, float32 logits of transformers' own forward:
  - `input_ids` `[1, T]`, `logits` `[1, T, V]` (T > 64 so chunked prefill crosses a chunk);
  - `batch_input_ids` `[B, Tmax]` left-padded with `pad_id`, `batch_attention_mask` `[B, Tmax]`,
    `batch_logits` `[B, Tmax, V]`: row b's logits computed *unpadded* by transformers, written at
    its real positions; NaN at the padded ones.

Every parameter gets fresh noise (norm weights, A_log, dt_bias, conv taps included), so a port
that forgets a `+1`, a transpose or a repeat-interleave cannot pass by luck.

The MoE case is written twice: once as transformers saves it and once with the expert tensors
re-saved in the other on-disk form (per-expert `experts.N.{gate,up,down}_proj` vs fused
`experts.gate_up_proj` / `experts.down_proj`), same weights, same reference.

Run: `python scripts/make_golden.py` (about a minute on CPU).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from _golden import noise_text_param, rope_parameters, save_hf, text_config_dict
from safetensors.torch import load_file, save_file
from transformers import (
    Qwen3_5ForCausalLM,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
)

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden"

# Shared tiny shapes. head_dim 32 with partial rotary 0.25 rotates 8 dims (4 frequencies), so
# mrope_section must sum to 4. Linear attention: Hv = 2 * Hk and Dk != Dv in every case.
COMMON = text_config_dict(
    model_type=None,
    vocab_size=256,
    hidden_size=32,
    head_dim=32,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    rope_parameters=rope_parameters(0.25, [2, 1, 1]),
)

CASES = {
    # Irregular stack (no interval formula gives L F L L), tied embeddings, Dk < Dv.
    "dense_tied": dict(
        kind="dense",
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        tie_word_embeddings=True,
        linear_key_head_dim=8,
        linear_value_head_dim=16,
        intermediate_size=64,
    ),
    # Regular stack (interval 4: L L L F), untied embeddings, Dk > Dv; carries `mtp.*` tensors
    # like the released checkpoints (transformers ignores them; a loader must drop them).
    "dense_untied": dict(
        kind="dense",
        extra_mtp=True,
        layer_types=None,
        tie_word_embeddings=False,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        intermediate_size=64,
    ),
    # MoE: 4 experts, top-2, shared expert with its sigmoid gate, regular stack, untied.
    "moe": dict(
        kind="moe",
        layer_types=None,
        tie_word_embeddings=False,
        linear_key_head_dim=8,
        linear_value_head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
    ),
}

T = 67  # > 64: crosses one chunk of a chunked prefill; odd
BATCH_LENGTHS = (37, 20, 5)  # left-padded to 37


def build(case: dict) -> torch.nn.Module:
    params = dict(COMMON)
    params.update({k: v for k, v in case.items() if k not in ("kind", "extra_mtp")})
    if case["kind"] == "moe":
        del params["intermediate_size"]  # no dense MLP: keep transformers' default
    if case["kind"] == "dense":
        config = Qwen3_5TextConfig(**params)
        model = Qwen3_5ForCausalLM(config)
    else:
        config = Qwen3_5MoeTextConfig(**params)
        model = Qwen3_5MoeForCausalLM(config)
    config._attn_implementation = "eager"
    return model.eval()


@torch.no_grad()
def add_noise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Replace every parameter with non-trivial random values of a sensible scale."""
    for name, p in model.named_parameters():
        noise_text_param(name, p, gen)


@torch.no_grad()
def logits_of(model, ids: np.ndarray) -> np.ndarray:
    out = model(input_ids=torch.from_numpy(ids).long(), use_cache=False)
    return out.logits.float().numpy()


def reference(model, gen: torch.Generator, vocab: int, pad_id: int) -> dict:
    # Token ids avoid the pad id so a padded position is only ever padding.
    ids = torch.randint(3, vocab, (1, T), generator=gen).numpy().astype(np.int32)
    ref = {"input_ids": ids, "logits": logits_of(model, ids)}

    tmax = max(BATCH_LENGTHS)
    b_ids = np.full((len(BATCH_LENGTHS), tmax), pad_id, dtype=np.int32)
    b_mask = np.zeros((len(BATCH_LENGTHS), tmax), dtype=np.int32)
    b_logits = np.full((len(BATCH_LENGTHS), tmax, vocab), np.nan, dtype=np.float32)
    for b, n in enumerate(BATCH_LENGTHS):
        row = torch.randint(3, vocab, (1, n), generator=gen).numpy().astype(np.int32)
        b_ids[b, tmax - n :] = row[0]
        b_mask[b, tmax - n :] = 1
        b_logits[b, tmax - n :] = logits_of(model, row)[0]
    ref.update(
        batch_input_ids=b_ids,
        batch_attention_mask=b_mask,
        batch_logits=b_logits,
        pad_id=np.array(pad_id, dtype=np.int32),
    )
    return ref


_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def to_other_expert_form(tensors: dict[str, torch.Tensor]) -> tuple[dict, str]:
    """Re-save MoE experts in the form transformers did not use; returns (tensors, form name)."""
    out: dict[str, torch.Tensor] = {}
    if any(k.endswith("experts.gate_up_proj") for k in tensors):
        # fused -> per expert: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]
        for k, v in tensors.items():
            if k.endswith("experts.gate_up_proj"):
                base = k[: -len("gate_up_proj")]
                mid = v.shape[1] // 2
                for e in range(v.shape[0]):
                    out[f"{base}{e}.gate_proj.weight"] = v[e, :mid].clone()
                    out[f"{base}{e}.up_proj.weight"] = v[e, mid:].clone()
            elif k.endswith("experts.down_proj"):
                base = k[: -len("down_proj")]
                for e in range(v.shape[0]):
                    out[f"{base}{e}.down_proj.weight"] = v[e].clone()
            else:
                out[k] = v
        return out, "per_expert"

    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for k, v in tensors.items():
        m = _PER_EXPERT.match(k)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = v
        else:
            out[k] = v
    for base, experts in groups.items():
        order = sorted(experts)
        out[f"{base}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], 0) for e in order]
        ).contiguous()
        down = [experts[e]["down_proj"] for e in order]
        out[f"{base}.down_proj"] = torch.stack(down).contiguous()
    return out, "fused"


def expert_form(tensors: dict) -> str:
    if any(k.endswith("experts.gate_up_proj") for k in tensors):
        return "fused"
    if any(_PER_EXPERT.match(k) for k in tensors):
        return "per_expert"
    return "none"


def randn_like_shape(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def write_case(name: str, case: dict, seed: int) -> list[Path]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build(case)
    add_noise(model, gen)
    ref = reference(model, gen, model.config.vocab_size, model.config.pad_token_id)

    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    save_hf(model, folder)
    np.savez_compressed(folder / "reference.npz", **ref)
    written = [folder]

    tensors = load_file(folder / "model.safetensors")
    if case.get("extra_mtp"):
        h = model.config.hidden_size
        tensors["mtp.fc.weight"] = randn_like_shape(gen, (h, 2 * h))
        tensors["mtp.norm.weight"] = randn_like_shape(gen, (h,))
        tensors["mtp.layers.0.mlp.up_proj.weight"] = randn_like_shape(gen, (16, h))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    saved_form = expert_form(tensors)
    if case["kind"] == "moe":
        other, form = to_other_expert_form(tensors)
        other_folder = OUT / f"{name}_{form}"
        shutil.rmtree(other_folder, ignore_errors=True)
        other_folder.mkdir(parents=True)
        shutil.copy(folder / "config.json", other_folder / "config.json")
        shutil.copy(folder / "reference.npz", other_folder / "reference.npz")
        save_file(other, other_folder / "model.safetensors", metadata={"format": "pt"})
        written.append(other_folder)
        # Rename the transformers-saved folder after its form, so both names say what they hold.
        saved_folder = OUT / f"{name}_{saved_form}"
        shutil.rmtree(saved_folder, ignore_errors=True)
        folder.rename(saved_folder)
        written[0] = saved_folder
    scale = float(np.abs(ref["logits"]).max())
    names = [p.name for p in written]
    print(f"{name}: saved form {saved_form}, max|logit| {scale:.3f}, -> {names}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for i, (name, case) in enumerate(CASES.items()):
        for folder in write_case(name, case, args.seed + i):
            manifest[folder.name] = dict(case)
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"total {total / 1e6:.2f} MB under {OUT}")


if __name__ == "__main__":
    main()
