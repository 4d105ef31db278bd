"""Tiny DeepSeek-V4 checkpoints in the real published formats, and the fused form of them.

``write_source`` writes a per-expert NVFP4 checkpoint with DeepSeek-V4's native names (no ``model.``
prefix) in one of the two published recipes:

- ``nvidia`` (``nvidia/DeepSeek-V4-*-NVFP4``, ModelOpt): ``.weight`` U8, ``.weight_scale`` E4M3,
  ``.weight_scale_2`` and ``.input_scale`` 0-d F32; ``quant_algo: MIXED_PRECISION``,
  ``quantized_layers``, ``ignore`` (MTP excluded) in config.json, and hf_quant_config.json;
- ``canada`` (``canada-quant/DeepSeek-V4-Pro-NVFP4-FP8-MTP``): the E4M3 block scale under ``.scale``,
  ``[1]`` F32 scalars, an ``expert_format`` block, no hf_quant_config.json. Its packed values are
  written I8 here (the published files are U8) so that the two recipes cover both dtypes.

Both carry FP8 shared experts (E8M0 128x128 ``.scale``), the router (``gate.weight``, ``tid2eid`` on
hash layers, ``gate.bias`` elsewhere) and an MXFP4 MTP layer (``mtp.0.ffn.experts.E.w*.{weight I8,
scale E8M0}``). Packed values are random bytes; E4M3 block scales random positive finite bytes; w1
and w3 share ``weight_scale_2`` and ``input_scale`` per expert, which differ from expert to expert.

``make_fused_checkpoint`` is the one place the tests get a fused (``nvfp4-fuse/v2``, ``mega-moe``)
checkpoint from: ``nvfp4-fuse convert``. ``fused_by_vllm_loader`` computes the same tensors with vLLM's
own ``DeepGemmMegaMoEExperts.weight_loader``, to check the converter against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nvfp4_fuse.sample_dsv4 import CANADA_EXPERT_FORMAT, NATIVE_QUANT_CONFIG, NVIDIA_IGNORE, NVIDIA_PRODUCER, v41_config

FUSED_LAYOUT = "nvfp4-fuse/v2"


@dataclass(frozen=True)
class Dims:
    hidden: int = 512
    inter: int = 512
    experts: int = 8
    layers: int = 2
    top_k: int = 2
    vocab: int = 256
    hash_layers: int = 1


def _config(recipe: str, d: Dims) -> dict:
    qc: dict = {**NATIVE_QUANT_CONFIG, "moe_quant_algo": "NVFP4"}
    if recipe == "nvidia":
        qc |= {
            "producer": dict(NVIDIA_PRODUCER),
            "quant_algo": "MIXED_PRECISION",
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "quantized_layers": {
                f"layers.{n}.ffn.experts": {"quant_algo": "NVFP4", "group_size": 16} for n in range(d.layers)
            },
            "exclude_modules": list(NVIDIA_IGNORE),
            "ignore": list(NVIDIA_IGNORE),
        }
    elif recipe == "canada":
        qc |= {
            "expert_format": dict(CANADA_EXPERT_FORMAT),
            "mtp_e_proj_h_proj_dequant": "bf16",
        }
    else:
        raise ValueError(recipe)
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": d.vocab,
        "hidden_size": d.hidden,
        "moe_intermediate_size": d.inter,
        "num_hidden_layers": d.layers,
        "num_hash_layers": d.hash_layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 128,
        "q_lora_rank": 128,
        "num_experts_per_tok": d.top_k,
        "n_routed_experts": d.experts,
        "n_shared_experts": 1,
        "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "topk_method": "noaux_tc",
        "hc_mult": 4,
        "swiglu_limit": 10.0,
        "index_topk": 64,
        "num_nextn_predict_layers": 1,
        "hidden_act": "silu",
        "expert_dtype": "fp4",
        "torch_dtype": "bfloat16",
        "max_position_embeddings": 4096,
        "quantization_config": qc,
    }


def _rand_bytes(g: torch.Generator, shape, lo: int, hi: int) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.uint8)


def expert_draws(g: torch.Generator, h: int, i: int, unequal_scale_2: bool) -> dict[str, tuple[torch.Tensor, ...]]:
    """One routed expert of hidden size ``h`` and intermediate size ``i``, drawn from ``g``: for each
    projection ("w1" gate, "w3" up, "w2" down) its packed E2M1 codes (uint8 [rows, cols / 2]), block
    scales (positive finite E4M3 bytes, uint8 [rows, cols / 16]), ``weight_scale_2`` and
    ``input_scale`` (float32 scalars; w1 and w3 share theirs, as ModelOpt exports them, unless
    ``unequal_scale_2`` gives w3 a ``weight_scale_2`` of its own, 0.5 to 1.5 times w1's, as exports
    before ModelOpt 0.43 have)."""
    l1_scale_2 = torch.rand((), generator=g) * 1e-3 + 1e-4
    l1_input = torch.rand((), generator=g) * 0.1 + 0.01
    out = {}
    for w, (rows, cols) in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
        packed = _rand_bytes(g, (rows, cols // 2), 0, 255)
        block_scale = _rand_bytes(g, (rows, cols // 16), 0x01, 0x7E)
        scale_2 = torch.rand((), generator=g) * 1e-3 + 1e-4 if w == "w2" else l1_scale_2
        if unequal_scale_2 and w == "w3":
            scale_2 = l1_scale_2 * (0.5 + torch.rand((), generator=g))
        input_scale = torch.rand((), generator=g) * 0.1 + 0.01 if w == "w2" else l1_input
        out[w] = packed, block_scale, scale_2.reshape(()).float(), input_scale.reshape(()).float()
    return out


def source_content(d: Dims, seed: int, *, unequal_scale_2: bool = False) -> dict[str, torch.Tensor]:
    """Recipe-neutral content: ``<expert>.w*.{packed, block_scale, scale_2, input_scale}`` and the
    other tensors under their checkpoint names. ``unequal_scale_2`` gives w3 a ``weight_scale_2`` of
    its own (0.5 to 1.5 times w1's), as exports before ModelOpt 0.43 have."""
    g = torch.Generator().manual_seed(seed)
    h, i, e = d.hidden, d.inter, d.experts
    out: dict[str, torch.Tensor] = {}
    for n in range(d.layers):
        for x in range(e):
            for w, tensors in expert_draws(g, h, i, unequal_scale_2).items():
                p = f"layers.{n}.ffn.experts.{x}.{w}"
                for field, t in zip(("packed", "block_scale", "scale_2", "input_scale"), tensors):
                    out[f"{p}.{field}"] = t
        s = f"layers.{n}.ffn.shared_experts"
        for w, (rows, cols) in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
            out[f"{s}.{w}.weight"] = _rand_bytes(g, (rows, cols), 0, 0x7E).view(torch.float8_e4m3fn)
            out[f"{s}.{w}.scale"] = _rand_bytes(g, (rows // 128, cols // 128), 120, 130).view(torch.float8_e8m0fnu)
        out[f"layers.{n}.ffn.gate.weight"] = torch.randn(e, h, generator=g).to(torch.bfloat16)
        if n < d.hash_layers:
            out[f"layers.{n}.ffn.gate.tid2eid"] = torch.randint(0, e, (d.vocab, d.top_k), generator=g, dtype=torch.int32)
        else:
            out[f"layers.{n}.ffn.gate.bias"] = torch.randn(e, generator=g)
    for x in range(e):
        for w, (rows, cols) in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
            p = f"mtp.0.ffn.experts.{x}.{w}"
            out[f"{p}.weight"] = _rand_bytes(g, (rows, cols // 2), 0, 255).view(torch.int8)
            out[f"{p}.scale"] = _rand_bytes(g, (rows, cols // 32), 118, 127).view(torch.float8_e8m0fnu)
    return out


def _recipe_tensors(content: dict[str, torch.Tensor], recipe: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in content.items():
        base, _, field = name.rpartition(".")
        if field == "packed":
            out[f"{base}.weight"] = t if recipe == "nvidia" else t.view(torch.int8)
        elif field == "block_scale":
            out[f"{base}.{'weight_scale' if recipe == 'nvidia' else 'scale'}"] = t.view(torch.float8_e4m3fn)
        elif field in ("scale_2", "input_scale"):
            key = "weight_scale_2" if field == "scale_2" else "input_scale"
            out[f"{base}.{key}"] = t.reshape(()) if recipe == "nvidia" else t.reshape(1)
        else:
            out[name] = t
    return out


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 2) -> None:
    names = sorted(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous().clone() for n in names[k * per : (k + 1) * per]}
        save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


V41_DIMS = Dims(hash_layers=0)


def write_source(
    folder: Path, recipe: str, *, dims: Dims = Dims(), seed: int, unequal_scale_2: bool = False, v41: bool = False
) -> Path:
    """A per-expert NVFP4 DeepSeek-V4 checkpoint of ``recipe`` ("nvidia" or "canada"); with ``v41``
    a DeepSeek-V4.1 one (``sample_dsv4.v41_config``'s config; ``dims`` should have no hash
    layers, as ``V41_DIMS``)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = _config(recipe, dims)
    (folder / "config.json").write_text(json.dumps(v41_config(cfg) if v41 else cfg, indent=2))
    if recipe == "nvidia":
        qc = cfg["quantization_config"]
        hq = {
            "producer": qc["producer"],
            "quantization": {
                k: qc[k] for k in ("quant_algo", "kv_cache_quant_algo", "group_size", "quantized_layers", "exclude_modules")
            },
        }
        (folder / "hf_quant_config.json").write_text(json.dumps(hq, indent=2))
    write_shards(folder, _recipe_tensors(source_content(dims, seed, unequal_scale_2=unequal_scale_2), recipe))
    return folder


def _merge_scale_2(items: list[tuple[int, str, str, torch.Tensor]]) -> list[tuple[int, str, str, torch.Tensor]]:
    """Per expert: w1 and w3 get max(weight_scale_2); the smaller half's block scales are rescaled."""
    from nvfp4_fuse.nvfp4 import rescale_block_scales

    s2 = {(x, w): t.float().reshape(()) for x, w, f, t in items if f == "weight_scale_2"}
    out = []
    for x, w, f, t in items:
        if w != "w2" and (x, "w1") in s2:
            c = torch.maximum(s2[(x, "w1")], s2[(x, "w3")])
            mine = s2[(x, w)]
            if f == "weight_scale_2":
                t = c.reshape(t.shape).to(t.dtype)
            elif f in ("weight_scale", "scale") and t.dtype == torch.float8_e4m3fn and bool(mine != c):
                t = rescale_block_scales(t, float(mine / c))
        out.append((x, w, f, t))
    return out


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(idx["weight_map"].values())):
        with safe_open(folder / f, "pt") as h:
            out |= {n: h.get_tensor(n) for n in h.keys()}
    return out


def make_fused_checkpoint(src_dir: Path, out_dir: Path, target: str = "mega-moe", w13_order: str = "gate-up") -> Path:
    """The fused (layout ``nvfp4-fuse/v2``) form of per-expert checkpoint ``src_dir`` in ``target``
    (default: ``mega-moe``, the converter's own default), written to ``out_dir`` by
    ``nvfp4-fuse convert``."""
    from nvfp4_fuse.convert import ConvertOptions, convert

    convert(src_dir, out_dir, ConvertOptions(target=target, w13_order=w13_order))
    return out_dir


def split_routed_experts(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, list[tuple[int, str, str, torch.Tensor]]]]:
    """A checkpoint's tensors split into the trunk's routed-expert ones, per layer as (expert, w1/w3/w2,
    field, tensor), and all the others, by name."""
    import re

    expert_re = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.(\w+)$")
    per_layer: dict[str, list[tuple[int, str, str, torch.Tensor]]] = {}
    others: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = expert_re.match(name)
        if m is None:
            others[name] = t
        else:
            per_layer.setdefault(m[1], []).append((int(m[2]), m[3], m[4], t))
    return others, per_layer


def write_merged_source(src_dir: Path, out_dir: Path) -> Path:
    """``src_dir`` with each expert's w1/w3 ``weight_scale_2`` merged as the converter merges them
    (both get the max; the smaller half's block scales rescaled, the torch reference) and nothing
    else changed: the per-expert checkpoint a fused one stands for."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in src_dir.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out_dir / f.name)
    out, per_layer = split_routed_experts(read_all(src_dir))
    for prefix, items in per_layer.items():
        for x, w, field, t in _merge_scale_2(items):
            out[f"{prefix}.{x}.{w}.{field}"] = t
    write_shards(out_dir, out)
    return out_dir


def fused_by_vllm_loader(src_dir: Path, rescale: bool = False) -> dict[str, torch.Tensor]:
    """The fused expert tensors of per-expert checkpoint ``src_dir`` as the installed vLLM itself lays them
    out: each layer's per-expert tensors go through ``DeepGemmMegaMoEExperts.weight_loader`` into an
    NVFP4 experts module holding all experts, whose parameters' storage is taken as it lies
    (``w13_weight_scale`` is the MN-major parameter's storage, ``[E, H/64, 2I]``). ``w13_input_scale``
    is max(w1, w3) per expert.

    vLLM refuses an expert whose w1 and w3 ``weight_scale_2`` differ; with ``rescale`` the smaller
    half's block scales are first multiplied by ``s2 / max`` and rounded to E4M3 (the torch
    reference, ``nvfp4.rescale_block_scales``) and both get the max, which is what the converter does.
    """
    from unittest import mock

    import harness
    import vllm.model_executor.layers.fused_moe.deep_gemm_mega_moe as dg
    from vllm.config import VllmConfig, set_current_vllm_config

    cfg = json.loads((src_dir / "config.json").read_text())
    h, i, e = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    out, per_layer = split_routed_experts(read_all(src_dir))

    if rescale:
        per_layer = {prefix: _merge_scale_2(items) for prefix, items in per_layer.items()}
    for prefix, items in per_layer.items():
        with harness.config_stand_ins():
            vcfg = VllmConfig()
        with set_current_vllm_config(vcfg), mock.patch.object(dg, "check_deep_gemm_mega_moe_supported", lambda *a, **k: None):
            experts = dg.DeepGemmMegaMoEExperts(
                vcfg, num_experts=e, num_local_experts=e, experts_start_idx=0, top_k=cfg["num_experts_per_tok"],
                hidden_size=h, intermediate_size=i, activation=dg.MegaMoEActivation("swiglu"),
                weight_format=dg.MEGA_MOE_NVFP4, prefix=f"model.{prefix}",
            )
        params = dict(experts.named_parameters())
        l1_input = torch.zeros(e, dtype=torch.float32)
        for x, w, field, t in items:
            if field == "input_scale" and w != "w2":
                l1_input[x] = torch.maximum(l1_input[x], t.float().reshape(()))
                continue
            field = "weight_scale" if field == "scale" else field
            pname = f"{'w2' if w == 'w2' else 'w13'}_{field}"
            experts.weight_loader(params[pname], t, f"{prefix}.{pname}", w, x)
        for pname, p in params.items():
            data = p.data.transpose(-1, -2) if pname.endswith("_weight_scale") else p.data
            out[f"{prefix}.{pname}"] = data.contiguous().clone()
        out[f"{prefix}.w13_input_scale"] = l1_input

    return out
