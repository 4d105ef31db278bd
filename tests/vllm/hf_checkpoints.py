"""Tiny complete NVFP4 MoE checkpoints of non-DeepSeek models, in NVIDIA ModelOpt's export format.

``write_source`` writes every tensor vLLM's model class loads (vLLM refuses a quantized checkpoint
that leaves a parameter unset), for:

- ``qwen3_moe`` (``Qwen3MoeForCausalLM``): the HF naming scheme,
  ``model.layers.N.mlp.experts.X.{gate,up,down}_proj``;
- ``mixtral`` (``MixtralForCausalLM``): ``model.layers.N.block_sparse_moe.experts.X.{w1,w3,w2}``.

Routed experts are NVFP4 as ModelOpt exports them: ``.weight`` U8 (two E2M1 codes a byte),
``.weight_scale`` E4M3 (one per 16 values), ``.weight_scale_2`` and ``.input_scale`` 0-d F32.
Attention, the router, norms, embeddings and the head are BF16 and excluded in the quantization
config (``ignore`` in config.json, ``exclude_modules`` in hf_quant_config.json). Packed values are
random bytes, block scales random positive finite E4M3 bytes; with ``unequal_scale_2`` the up half's
``weight_scale_2`` is 0.5 to 1.5 times the gate's, as exports before ModelOpt 0.43 have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import checkpoints
import repair_proof
import torch

MODELS = {
    "qwen3_moe": ("Qwen3MoeForCausalLM", "mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "mixtral": ("MixtralForCausalLM", "block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}),
}
PRODUCER = {"name": "modelopt", "version": "0.39.0"}


@dataclass(frozen=True)
class Dims:
    hidden: int = 256
    inter: int = 256
    experts: int = 8
    layers: int = 2
    top_k: int = 2
    vocab: int = 256
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64


def names(model: str) -> repair_proof.ExpertNames:
    _, moe, proj = MODELS[model]
    return repair_proof.ExpertNames(linear=lambda n, x, role: f"model.layers.{n}.{moe}.experts.{x}.{proj[role]}")


def _config(model: str, d: Dims) -> dict:
    arch, moe, _ = MODELS[model]
    exclude = ["lm_head", f"*.{moe}.gate", "*self_attn*"]
    cfg = {
        "architectures": [arch],
        "model_type": model,
        "vocab_size": d.vocab,
        "hidden_size": d.hidden,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "num_experts_per_tok": d.top_k,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "modelopt",
            "quant_algo": "NVFP4",
            "producer": dict(PRODUCER),
            "group_size": 16,
            "kv_cache_scheme": None,
            "ignore": exclude,
        },
    }
    if model == "qwen3_moe":
        cfg |= {
            "num_experts": d.experts,
            "moe_intermediate_size": d.inter,
            "intermediate_size": d.inter,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
        }
    else:
        cfg |= {"num_local_experts": d.experts, "intermediate_size": d.inter, "sliding_window": None}
    return cfg


def _tensors(model: str, d: Dims, seed: int, unequal_scale_2: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    _, moe, _ = MODELS[model]
    where = names(model)
    h, i = d.hidden, d.inter

    def bf16(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    out = {"model.embed_tokens.weight": bf16(d.vocab, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    out["lm_head.weight"] = bf16(d.vocab, h)
    for n in range(d.layers):
        p = f"model.layers.{n}"
        out[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        out[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
        for proj, rows, cols in (("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q)):
            out[f"{p}.self_attn.{proj}.weight"] = bf16(rows, cols)
        if model == "qwen3_moe":
            out[f"{p}.self_attn.q_norm.weight"] = torch.ones(d.head_dim, dtype=torch.bfloat16)
            out[f"{p}.self_attn.k_norm.weight"] = torch.ones(d.head_dim, dtype=torch.bfloat16)
        out[f"{p}.{moe}.gate.weight"] = bf16(d.experts, h)
        for x in range(d.experts):
            for w, (packed, block_scale, scale_2, input_scale) in checkpoints.expert_draws(g, h, i, unequal_scale_2).items():
                name = where.linear(n, x, {"w1": "gate", "w3": "up", "w2": "down"}[w])
                out[f"{name}.weight"] = packed
                out[f"{name}.weight_scale"] = block_scale.view(torch.float8_e4m3fn)
                out[f"{name}.weight_scale_2"] = scale_2
                out[f"{name}.input_scale"] = input_scale
    return out


def write_source(folder: Path, model: str, *, dims: Dims = Dims(), seed: int, unequal_scale_2: bool = False) -> Path:
    """A complete per-expert NVFP4 checkpoint of ``model`` ("qwen3_moe" or "mixtral") in ``folder``:
    config.json, hf_quant_config.json and two shards with an index."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = _config(model, dims)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    qc = cfg["quantization_config"]
    hq = {
        "producer": qc["producer"],
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": qc["ignore"]},
    }
    (folder / "hf_quant_config.json").write_text(json.dumps(hq, indent=2))
    checkpoints.write_shards(folder, _tensors(model, dims, seed, unequal_scale_2))
    return folder
