"""Tiny DeepSeek-V4 NVFP4 checkpoints in the two published recipes' real formats.

What is written, per the recipes' own code (facts and sources in docs/dsv4-formats.md):

- native DeepSeek-V4 names, no ``model.`` prefix: ``embed``/``head``/``norm`` (BF16), ``hc_*`` (F32),
  per layer the attention and shared-expert FP8 weights with their E8M0 ``.scale`` (``F8_E8M0`` in
  the header, one per 128x128 block), the router ``ffn.gate.weight`` with ``ffn.gate.tid2eid`` (I64,
  hash routing) on the first ``num_hash_layers`` layers and ``ffn.gate.bias`` (F32) on the others;
- routed experts ``layers.L.ffn.experts.E.w{1,3,2}`` in NVFP4, really quantized from random weights
  with ModelOpt's recipe, w1 and w3 sharing one ``weight_scale_2`` and one ``input_scale``:
  - ``nvidia`` (NVIDIA/Model-Optimizer ``quantize_to_nvfp4.py``): ``weight`` U8, ``weight_scale``
    F8_E4M3 ``[out, in/16]``, 0-d F32 ``weight_scale_2`` and ``input_scale``, input scales calibrated
    per expert (here: drawn per expert); ``quantization_config`` with ``quant_method: fp8``,
    ``quant_algo: MIXED_PRECISION``, ``moe_quant_algo: NVFP4``, ``quantized_layers`` per layer and
    ``ignore``; ``hf_quant_config.json`` from producer ``modelopt/dsv4-nvfp4-experts``;
  - ``canada`` (canada-quant ``convert_v4_pro_mxfp4_to_nvfp4.py`` v12): ``weight`` U8, the E4M3 block
    scale under ``.scale``, ``[1]``-shaped F32 ``weight_scale_2`` and ``input_scale`` (always 1.0),
    the native ``quantization_config`` plus ``moe_quant_algo`` and ``expert_format``; no
    ``hf_quant_config.json``;
- the MTP layer ``mtp.0.*`` as the native release has it in both recipes: its routed experts MXFP4
  (``weight`` I8 ``[out, in/2]``, ``scale`` F8_E8M0 ``[out, in/32]``).

With ``v41`` the checkpoint is DeepSeek-V4.1's (``nvidia/DeepSeek-V4.1-Flash-NVFP4``, NVIDIA's
recipe): the same tensors with every layer score-routed (``gate.bias``, no ``tid2eid``) and
:func:`v41_config`'s ``config.json``.

H and I default to 512, so the mega-moe target (multiples of 512) accepts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .constants import E2M1_MAX, E4M3_MAX, MXFP4_BLOCK
from .nvfp4 import quantize

RECIPES = ("nvidia", "canada")
HC_MULT = 4

# Config blocks as the recipes write them (docs/dsv4-formats.md).
NATIVE_QUANT_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128],
}
CANADA_EXPERT_FORMAT = {
    "name": "nvfp4",
    "weight_dtype": "fp4_e2m1",
    "weight_packing": "uint8_2_per_byte",
    "group_size": 16,
    "scale_dtype": "fp8_e4m3",
    "weight_scale_2_dtype": "fp32",
}
NVIDIA_PRODUCER = {"name": "modelopt", "version": "dsv4-nvfp4-experts"}
NVIDIA_IGNORE = ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"]


@dataclass
class DSv4SampleSpec:
    recipe: str = "nvidia"
    layers: int = 4
    hash_layers: int = 3
    experts: int = 8
    hidden: int = 512
    inter: int = 512
    shards: int = 3
    values: str = "U8"  # dtype of the NVFP4 experts' packed values: U8 (both recipes) or I8
    mtp: bool = True
    topk: int = 2
    vocab: int = 64
    seed: int | None = None
    v41: bool = False  # DeepSeek-V4.1 (nvidia/DeepSeek-V4.1-Flash-NVFP4's format; no hash layers)


Maker = Callable[[], torch.Tensor]


def _e8m0(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Positive power-of-two scales 2^-9 .. 2^3 (E8M0 bytes 118..130)."""
    return torch.randint(118, 131, (rows, cols), dtype=torch.uint8, generator=gen).view(torch.float8_e8m0fnu)


def _fp8_block_linear(name: str, rows: int, cols: int, gen: torch.Generator) -> Iterator[tuple[str, Maker]]:
    """DeepSeek-V4's FP8 linear: E4M3 weight and one E8M0 scale per 128x128 block."""

    def weight() -> torch.Tensor:
        b = torch.randint(0, 0x7F, (rows, cols), dtype=torch.uint8, generator=gen)  # finite, positive
        return (b | (torch.randint(0, 2, (rows, cols), dtype=torch.uint8, generator=gen) << 7)).view(torch.float8_e4m3fn)

    yield f"{name}.weight", weight
    yield f"{name}.scale", lambda: _e8m0(math.ceil(rows / 128), math.ceil(cols / 128), gen)


def _bf16(shape: tuple[int, ...], gen: torch.Generator, scale: float = 0.02) -> Maker:
    return lambda: (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16)


def _f32(shape: tuple[int, ...], gen: torch.Generator) -> Maker:
    return lambda: torch.randn(shape, generator=gen)


def _mxfp4_experts(prefix: str, spec: DSv4SampleSpec, gen: torch.Generator) -> Iterator[tuple[str, Maker]]:
    h, i = spec.hidden, spec.inter
    for e in range(spec.experts):
        for proj, rows, cols in (("w1", i, h), ("w3", i, h), ("w2", h, i)):
            yield f"{prefix}.{e}.{proj}.weight", (
                lambda r=rows, c=cols: torch.randint(-128, 128, (r, c // 2), dtype=torch.int8, generator=gen)
            )
            yield f"{prefix}.{e}.{proj}.scale", (lambda r=rows, c=cols: _e8m0(r, c // MXFP4_BLOCK, gen))


def _nvfp4_experts(prefix: str, spec: DSv4SampleSpec, gen: torch.Generator) -> Iterator[tuple[str, Maker]]:
    """One layer's routed experts, quantized per the recipe; made one expert at a time."""
    h, i = spec.hidden, spec.inter
    canada = spec.recipe == "canada"
    for e in range(spec.experts):
        cache: dict[str, torch.Tensor] = {}

        def expert(e: int = e, cache: dict = cache) -> dict[str, torch.Tensor]:
            if cache:
                return cache
            w = {p: torch.randn(r, c, generator=gen) * 0.02 for p, r, c in (("w1", i, h), ("w3", i, h), ("w2", h, i))}
            for x in w.values():
                x[:: max(1, x.shape[0] // 7)] *= 4  # heavier tails on a few rows, like real weights
            s2_13 = float(max(w["w1"].abs().max(), w["w3"].abs().max())) / (E2M1_MAX * E4M3_MAX)
            in13 = 1.0 if canada else float(torch.empty(()).uniform_(0.005, 0.05, generator=gen))
            in2 = 1.0 if canada else float(torch.empty(()).uniform_(0.005, 0.05, generator=gen))
            scalar = (lambda v: torch.tensor([v], dtype=torch.float32)) if canada else (lambda v: torch.tensor(v, dtype=torch.float32))
            for p in ("w1", "w3", "w2"):
                packed, block, s2 = quantize(w[p], s2_13 if p != "w2" else None)
                cache[f"{p}.weight"] = packed.view(torch.int8) if spec.values == "I8" else packed
                cache[f"{p}.{'scale' if canada else 'weight_scale'}"] = block
                cache[f"{p}.weight_scale_2"] = scalar(s2)
                cache[f"{p}.input_scale"] = scalar(in2 if p == "w2" else in13)
            return cache

        for p in ("w1", "w3", "w2"):
            for f in ("weight", "scale" if canada else "weight_scale", "weight_scale_2", "input_scale"):
                yield f"{prefix}.{e}.{p}.{f}", (lambda key=f"{p}.{f}", ex=expert: ex().pop(key))


def _block(prefix: str, spec: DSv4SampleSpec, gen: torch.Generator, *, hash_routed: bool, nvfp4: bool) -> Iterator[tuple[str, Maker]]:
    h, i, n = spec.hidden, spec.inter, spec.experts
    yield f"{prefix}.attn_norm.weight", lambda: torch.ones(h, dtype=torch.bfloat16)
    yield f"{prefix}.attn.attn_sink", _f32((4,), gen)
    yield from _fp8_block_linear(f"{prefix}.attn.wq_a", 256, h, gen)
    yield from _fp8_block_linear(f"{prefix}.attn.wkv", 128, h, gen)
    yield from _fp8_block_linear(f"{prefix}.attn.wo_b", h, 256, gen)
    yield f"{prefix}.ffn_norm.weight", lambda: torch.ones(h, dtype=torch.bfloat16)
    yield f"{prefix}.ffn.gate.weight", _bf16((n, h), gen)
    if hash_routed:
        yield f"{prefix}.ffn.gate.tid2eid", lambda: torch.randint(0, n, (spec.vocab, spec.topk), dtype=torch.int64, generator=gen)
    else:
        yield f"{prefix}.ffn.gate.bias", _f32((n,), gen)
    experts = f"{prefix}.ffn.experts"
    yield from (_nvfp4_experts(experts, spec, gen) if nvfp4 else _mxfp4_experts(experts, spec, gen))
    yield from _fp8_block_linear(f"{prefix}.ffn.shared_experts.w1", i, h, gen)
    yield from _fp8_block_linear(f"{prefix}.ffn.shared_experts.w3", i, h, gen)
    yield from _fp8_block_linear(f"{prefix}.ffn.shared_experts.w2", h, i, gen)
    hc = (2 + HC_MULT) * HC_MULT
    for which in ("attn", "ffn"):
        yield f"{prefix}.hc_{which}_fn", _f32((hc, HC_MULT * h), gen)
        yield f"{prefix}.hc_{which}_base", _f32((hc,), gen)
        yield f"{prefix}.hc_{which}_scale", _f32((3,), gen)


def _tensors(spec: DSv4SampleSpec, gen: torch.Generator) -> Iterator[tuple[str, Maker]]:
    h = spec.hidden
    yield "embed.weight", _bf16((spec.vocab, h), gen)
    for layer in range(spec.layers):
        yield from _block(f"layers.{layer}", spec, gen, hash_routed=layer < spec.hash_layers, nvfp4=True)
    yield "norm.weight", lambda: torch.ones(h, dtype=torch.bfloat16)
    yield "head.weight", _bf16((spec.vocab, h), gen)
    yield "hc_head_fn", _f32((HC_MULT, HC_MULT * h), gen)
    yield "hc_head_base", _f32((HC_MULT,), gen)
    yield "hc_head_scale", _f32((1,), gen)
    if spec.mtp:
        yield from _fp8_block_linear("mtp.0.e_proj", h, h, gen)
        yield from _fp8_block_linear("mtp.0.h_proj", h, h, gen)
        for n in ("enorm", "hnorm", "norm"):
            yield f"mtp.0.{n}.weight", lambda: torch.ones(h, dtype=torch.bfloat16)
        yield from _block("mtp.0", spec, gen, hash_routed=False, nvfp4=False)
        yield "mtp.0.hc_head_fn", _f32((HC_MULT, HC_MULT * h), gen)
        yield "mtp.0.hc_head_base", _f32((HC_MULT,), gen)
        yield "mtp.0.hc_head_scale", _f32((1,), gen)


def _configs(spec: DSv4SampleSpec) -> dict[str, dict[str, Any]]:
    cfg: dict[str, Any] = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "hidden_size": spec.hidden,
        "moe_intermediate_size": spec.inter,
        "n_routed_experts": spec.experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": spec.topk,
        "num_hidden_layers": spec.layers,
        "num_hash_layers": spec.hash_layers,
        "num_nextn_predict_layers": 1 if spec.mtp else 0,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 128,
        "q_lora_rank": 256,
        "o_lora_rank": 256,
        "o_groups": 1,
        "hc_mult": HC_MULT,
        "hc_eps": 1e-06,
        "hidden_act": "silu",
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0,
        "expert_dtype": "fp4",
        "vocab_size": spec.vocab,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    native = dict(NATIVE_QUANT_CONFIG)
    if spec.recipe == "canada":
        cfg["quantization_config"] = {
            **native,
            "moe_quant_algo": "NVFP4",
            "expert_format": dict(CANADA_EXPERT_FORMAT),
            "mtp_e_proj_h_proj_dequant": "bf16",
            "mtp_experts_dequant": "bf16",
        }
        return {"config.json": cfg}
    producer = dict(NVIDIA_PRODUCER)
    ignore = list(NVIDIA_IGNORE)
    layers = {f"layers.{n}.ffn.experts": {"group_size": 16, "quant_algo": "NVFP4"} for n in range(spec.layers)}
    group = {"dynamic": False, "group_size": 16, "num_bits": 4, "type": "float"}
    cfg["quantization_config"] = dict(
        sorted(
            {
                **native,
                "config_groups": {"group_0": {"input_activations": group, "targets": ["Linear"], "weights": group}},
                "group_size": 16,
                "ignore": ignore,
                "kv_cache_quant_algo": None,
                "moe_quant_algo": "NVFP4",
                "producer": producer,
                "quant_algo": "MIXED_PRECISION",
                "quantized_layers": dict(sorted(layers.items())),
            }.items()
        )
    )
    hq = {
        "producer": producer,
        "quantization": {
            "quant_algo": "MIXED_PRECISION",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "quantized_layers": dict(sorted(layers.items())),
            "exclude_modules": ignore,
        },
    }
    return {"config.json": v41_config(cfg) if spec.v41 else cfg, "hf_quant_config.json": hq}


# What a DeepSeek-V4.1 config has on top of V4's text fields (the V4 model code reads its defaults
# from transformers' DeepseekV4Config, which V4.1's flattened config does not fall back to).
V41_TEXT_DEFAULTS: dict[str, Any] = {
    "hc_eps": 1e-06,
    "hc_sinkhorn_iters": 20,
    "rms_norm_eps": 1e-06,
    "sliding_window": 128,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
}


def v41_config(v4: dict[str, Any]) -> dict[str, Any]:
    """The DeepSeek-V4.1 ``config.json`` (``nvidia/DeepSeek-V4.1-Flash-NVFP4``'s layout) of a flat
    DeepSeek-V4 one: ``model_type: deepseek_v41``, ``architectures: [DeepseekV41ForCausalLM]``, the
    text model's fields under ``text_config`` and the vision tower's under ``vision_config`` (here
    none: no tower weights are written), ``quantization_config`` at the top, where vLLM reads it.
    V4.1 routes every layer by score (no hash layers) and its attention topology is per layer:
    ``compress_ratios`` (one per layer, MTP included; 0 = sliding window, as written here) and
    the ``kv_source_layer_ids`` / ``index_source_layer_ids`` layers."""
    text = {k: v for k, v in v4.items() if k not in ("architectures", "model_type", "quantization_config", "torch_dtype")}
    text.pop("num_hash_layers", None)
    n = text["num_hidden_layers"]
    text = {**V41_TEXT_DEFAULTS, **text}
    text |= {
        "compress_ratios": [0] * (n + int(text.get("num_nextn_predict_layers") or 0)),
        "kv_source_layer_ids": [n - 1],
        "index_source_layer_ids": [n - 1],
    }
    out: dict[str, Any] = {
        "architectures": ["DeepseekV41ForCausalLM"],
        "model_type": "deepseek_v41",
        "text_config": text,
        "vision_config": {"num_hidden_layers": 0},
        "torch_dtype": v4.get("torch_dtype", "bfloat16"),
    }
    if "quantization_config" in v4:
        out["quantization_config"] = v4["quantization_config"]
    return out


def make_dsv4_sample(out: Path, spec: DSv4SampleSpec | None = None) -> Path:
    """Write a DeepSeek-V4 NVFP4 sample checkpoint of ``spec.recipe`` into ``out`` (created)."""
    from .sample import write_sharded

    spec = spec or DSv4SampleSpec()
    if spec.recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}")
    if spec.values not in ("U8", "I8"):
        raise ValueError("values must be U8 or I8")
    if spec.v41 and (spec.recipe != "nvidia" or spec.hash_layers):
        raise ValueError("DeepSeek-V4.1 samples are NVIDIA's recipe (nvidia/DeepSeek-V4.1-Flash-NVFP4), with no hash layers")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed = spec.seed if spec.seed is not None else int(torch.randint(0, 2**31, ()).item())
    gen = torch.Generator().manual_seed(seed)
    tensors = ((name, make()) for name, make in _tensors(spec, gen))
    readme = f"Sample DeepSeek-V4{'.1' if spec.v41 else ''} NVFP4 checkpoint ({spec.recipe} recipe), made by nvfp4-fuse.\n"
    return write_sharded(out, tensors, _estimate_bytes(spec), spec.shards, _configs(spec), readme)


def _estimate_bytes(spec: DSv4SampleSpec) -> int:
    """About the bytes written (the shards are cut at total / shards)."""
    h, i, n = spec.hidden, spec.inter, spec.experts
    nvfp4 = lambda r, c: r * c // 2 + r * c // 16 + 8  # noqa: E731
    mxfp4 = lambda r, c: r * c // 2 + r * c // MXFP4_BLOCK  # noqa: E731
    block = (256 + 128) * h + 256 * h + 3 * i * h + n * h * 2 + 2 * 24 * HC_MULT * h * 4
    total = spec.layers * (block + n * (2 * nvfp4(i, h) + nvfp4(h, i)))
    if spec.mtp:
        total += block + 2 * h * h + n * (2 * mxfp4(i, h) + mxfp4(h, i))
    return total + 2 * spec.vocab * h * 2
