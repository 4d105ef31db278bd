"""Real NVFP4 exports of a tiny MoE, made by the exporters themselves, as test inputs.

Usage (in .venv-exporters, see scripts/make_real_exports.sh):
    python scripts/make_real_exports.py OUT_DIR [--seed N]

A tiny Qwen3-MoE (transformers' own ``Qwen3MoeForCausalLM`` from a config, random weights: 2 layers,
8 experts, H=512, I=512, sizes every target takes) is calibrated on random tokens and exported three
ways into OUT_DIR:

- ``modelopt``: NVIDIA ModelOpt, ``mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)`` then
  ``export_hf_checkpoint``; gate/up ``weight_scale_2`` are made equal by the exporter.
- ``modelopt-unsynced``: an older-style export, each half its own ``weight_scale_2``: the experts as
  transformers 4 held them (one ``nn.Linear`` per projection, ``PerExpertLinears``, so gate and up get
  their own quantizers) and the exporter's gate/up sync turned off
  (``requantize_resmooth_fused_llm_layers`` and the ``sync_moe_gate_up_amax`` safety net), which is
  what exports before ModelOpt 0.43 wrote.
- ``llmcompressor``: llm-compressor's ``oneshot`` with ``QuantizationModifier(scheme="NVFP4")``,
  saved compressed (compressed-tensors' ``nvfp4-pack-quantized``).

Prints one line per export with the versions used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from importlib.metadata import version
from pathlib import Path
from unittest import mock

import torch

TOKENS, SEQ, BATCHES = 64, 32, 8


def tiny_qwen3_moe(seed: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=TOKENS * 4, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False,
        architectures=["Qwen3MoeForCausalLM"],
    )
    model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


class _ExpertMLP(torch.nn.Module):
    def __init__(self, hidden: int, inter: int, act):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PerExpertLinears(torch.nn.ModuleList):
    """transformers 4's layout of MoE experts, one ``nn.Linear`` per projection (transformers 5 keeps
    them stacked, ``gate_up_proj`` [E, 2I, H], which ModelOpt quantizes with one quantizer for both
    halves); the same weights and routing (``Qwen3MoeExperts.forward``)."""

    def __init__(self, fused):
        e, two_i, h = fused.gate_up_proj.shape
        i = two_i // 2
        super().__init__(_ExpertMLP(h, i, fused.act_fn) for _ in range(e))
        with torch.no_grad():
            for x, mlp in enumerate(self):
                mlp.gate_proj.weight.copy_(fused.gate_up_proj[x, :i])
                mlp.up_proj.weight.copy_(fused.gate_up_proj[x, i:])
                mlp.down_proj.weight.copy_(fused.down_proj[x])
        self.to(fused.gate_up_proj.dtype)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for x, mlp in enumerate(self):
            token, pos = torch.where(top_k_index == x)
            if token.numel():
                y = mlp(hidden_states[token]) * top_k_weights[token, pos, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def per_expert_linears(model):
    for layer in model.model.layers:
        layer.mlp.experts = PerExpertLinears(layer.mlp.experts)
    return model


def calibration(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, TOKENS * 4, (1, SEQ), generator=g) for _ in range(BATCHES)]


def export_modelopt(out: Path, seed: int, *, sync_gate_up: bool) -> None:
    import modelopt.torch.export.unified_export_hf as ue
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    model = tiny_qwen3_moe(seed)
    if not sync_gate_up:
        model = per_expert_linears(model)
    data = calibration(seed)

    def forward_loop(m):
        for ids in data:
            m(ids)

    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
    ctx = contextlib.ExitStack()
    if not sync_gate_up:
        ctx.enter_context(mock.patch.object(ue, "requantize_resmooth_fused_llm_layers", lambda model: None))
        ctx.enter_context(mock.patch.object(ue, "sync_moe_gate_up_amax", lambda model: 0))
    with ctx, torch.inference_mode():
        export_hf_checkpoint(model, export_dir=str(out))


def word_tokenizer():
    """A tokenizer over the tiny vocabulary, made here (oneshot wants one with a dataset, and nothing
    is downloaded); the calibration data is already token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(TOKENS * 4 - 2)} | {"[UNK]": TOKENS * 4 - 2, "[PAD]": TOKENS * 4 - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def export_llmcompressor(out: Path, seed: int) -> None:
    import tempfile

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    # oneshot reads the model's config back from disk (model.config.name_or_path)
    base = Path(tempfile.mkdtemp(prefix="tiny-qwen3-moe-"))
    tiny_qwen3_moe(seed).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    ids = [t[0].tolist() for t in calibration(seed)]
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    recipe = QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head", "re:.*mlp.gate$"])
    oneshot(model=model, processor=word_tokenizer(), dataset=ds, recipe=recipe, max_seq_length=SEQ, num_calibration_samples=len(ids))
    model.save_pretrained(out, save_compressed=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("modelopt", "modelopt-unsynced", "llmcompressor"), action="append")
    a = ap.parse_args()
    kinds = a.only or ["modelopt", "modelopt-unsynced", "llmcompressor"]
    a.out.mkdir(parents=True, exist_ok=True)
    versions = {p: version(p) for p in ("torch", "transformers", "nvidia-modelopt", "llmcompressor", "compressed-tensors")}
    for kind in kinds:
        dst = a.out / kind
        if kind == "modelopt":
            export_modelopt(dst, a.seed, sync_gate_up=True)
        elif kind == "modelopt-unsynced":
            export_modelopt(dst, a.seed, sync_gate_up=False)
        else:
            export_llmcompressor(dst, a.seed)
        (dst / "EXPORTED_WITH.json").write_text(json.dumps({"kind": kind, "seed": a.seed, **versions}, indent=2) + "\n")
        print(f"{kind}: {dst} ({', '.join(f'{k} {v}' for k, v in versions.items())})")


if __name__ == "__main__":
    main()
