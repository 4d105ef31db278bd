"""A small but real-format ModelOpt NVFP4 MoE checkpoint, for the demo, the tests and the benchmark.

Weights are random bf16 values quantized with ModelOpt's NVFP4 recipe (``nvfp4.quantize``), written
as sharded safetensors with an index, ``config.json``, ``hf_quant_config.json`` and a few sidecars,
in any of the naming schemes the converter reads. Options make gate/up ``weight_scale_2`` unequal
(as in pre-0.43 exports and some re-exports) and give every expert its own input scale; experts of
one layer are spread over several shards. ``scale_encoding`` stores every block scale compressed
(``csf`` or ``csf_32x2_v1``, declared in both configs), as vLLM 0.34 reads them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .constants import E2M1_MAX, E4M3_MAX
from .csf import ENCODINGS, encode
from .nvfp4 import quantize
from .safetensors_header import OutEntry
from .shard_writer import StreamingShardWriter, tensor_bytes

SCHEMES = ("hf", "mixtral", "deepseek", "compressed-tensors")


@dataclass
class SampleSpec:
    scheme: str = "deepseek"
    layers: int = 2
    experts: int = 8
    hidden: int = 256
    inter: int = 128
    shards: int = 3
    unequal_scale_2: bool = False
    unequal_input_scales: bool = True
    gate_up_input_scales_differ: bool = False  # odd experts: up's input scale above gate's; even: below
    dense_first_layer: bool = True  # DeepSeek-style: layer 0 is a dense MLP
    shared_experts: bool = True
    seed: int | None = None
    fast: bool = False  # random codes and scales instead of quantizing random weights (for big benchmarks)
    scale_encoding: str | None = None  # "csf" / "csf_32x2_v1": every block scale stored compressed (csf.py)
    # (layer, expert, role) -> "missing" | "zero" | "nan" | "inf" | "negative": a defective input scale,
    # as exports leave them for experts calibration never routed to
    input_scale_defects: dict[tuple[int, int, str], str] = field(default_factory=dict)


INPUT_SCALE_DEFECTS = {"zero": 0.0, "nan": float("nan"), "inf": float("inf"), "negative": -0.02}


def _names(scheme: str, layer: int) -> tuple[str, str, dict[str, str]]:
    """(expert prefix, block prefix, projection names) of one layer in a naming scheme."""
    if scheme == "deepseek":
        return f"layers.{layer}.ffn.experts", f"layers.{layer}", {"gate": "w1", "up": "w3", "down": "w2"}
    if scheme == "mixtral":
        return (
            f"model.layers.{layer}.block_sparse_moe.experts",
            f"model.layers.{layer}",
            {"gate": "w1", "up": "w3", "down": "w2"},
        )
    return f"model.layers.{layer}.mlp.experts", f"model.layers.{layer}", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _block_scale(name: str, scale: torch.Tensor, encoding: str | None) -> Iterator[tuple[str, torch.Tensor]]:
    """``name`` as it is, or the streams of its compressed encoding, as vLLM 0.34 reads them."""
    if encoding is None:
        yield name, scale
        return
    for stream, data in encode(encoding, scale.view(torch.uint8).numpy()).items():
        yield f"{name}.{stream}", torch.from_numpy(np.ascontiguousarray(data))


def _nvfp4_linear(
    name: str,
    rows: int,
    cols: int,
    gen: torch.Generator,
    *,
    scale_2: float | None,
    input_scale: float | None,
    ct: bool,
    fast: bool,
    encoding: str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """One NVFP4 Linear's tensors; ``input_scale`` None leaves its input scale out."""
    if fast:
        packed = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen)
        # positive normal E4M3 bytes (exponent 1..14): never NaN, never negative
        scale = torch.randint(0x08, 0x78, (rows, cols // 16), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
        s2 = scale_2 if scale_2 is not None else 1e-4
    else:
        w = torch.randn(rows, cols, generator=gen) * 0.02
        # heavier tails on a few rows, like real weights
        w[:: max(1, rows // 7)] *= 4
        packed, scale, s2 = quantize(w, scale_2)
    s2t = torch.tensor(s2, dtype=torch.float32)
    ist = torch.tensor(input_scale if input_scale is not None else 1.0, dtype=torch.float32)
    if ct:
        yield f"{name}.weight_packed", packed
        yield f"{name}.weight_scale", scale
        yield f"{name}.weight_global_scale", torch.reciprocal(s2t).reshape(1)
        if input_scale is not None:
            yield f"{name}.input_global_scale", torch.reciprocal(ist).reshape(1)
    else:
        yield f"{name}.weight", packed
        yield from _block_scale(f"{name}.weight_scale", scale, encoding)
        yield f"{name}.weight_scale_2", s2t
        if input_scale is not None:
            yield f"{name}.input_scale", ist


def _layer_tensors(spec: SampleSpec, layer: int, gen: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    h, i = spec.hidden, spec.inter
    ct = spec.scheme == "compressed-tensors"
    kw = {"ct": ct, "fast": spec.fast, "encoding": spec.scale_encoding}
    prefix, block, proj = _names(spec.scheme, layer)
    yield f"{block}.input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
    yield f"{block}.self_attn.o_proj.weight", (torch.randn(h, h, generator=gen) * 0.02).to(torch.bfloat16)
    if spec.dense_first_layer and layer == 0:
        mlp = prefix.rsplit(".", 1)[0]
        for role, rows, cols in (("gate", i, h), ("up", i, h), ("down", h, i)):
            yield from _nvfp4_linear(f"{mlp}.{proj[role]}", rows, cols, gen, scale_2=None, input_scale=0.01, **kw)
        return
    mlp = prefix.rsplit(".", 1)[0]
    yield f"{mlp}.gate.weight", (torch.randn(spec.experts, h, generator=gen) * 0.02).to(torch.bfloat16)
    if spec.shared_experts:
        for role, rows, cols in (("gate", i, h), ("up", i, h), ("down", h, i)):
            yield from _nvfp4_linear(
                f"{mlp}.shared_experts.{proj[role]}", rows, cols, gen, scale_2=None, input_scale=0.02, **kw
            )
    for e in range(spec.experts):
        amax = float(torch.empty(()).uniform_(0.05, 0.2, generator=gen))
        shared_s2 = amax / (E2M1_MAX * E4M3_MAX)
        if spec.unequal_scale_2:
            s2_gate = shared_s2 * float(torch.empty(()).uniform_(0.3, 1.0, generator=gen))
            s2_up = shared_s2 * float(torch.empty(()).uniform_(0.3, 1.0, generator=gen))
        else:
            s2_gate = s2_up = shared_s2
        if spec.unequal_input_scales:
            in_gu = float(torch.empty(()).uniform_(0.005, 0.05, generator=gen))
            in_down = float(torch.empty(()).uniform_(0.005, 0.05, generator=gen))
        else:
            in_gu = in_down = 0.02
        in_up = in_gu * (1.25 if e % 2 else 0.8) if spec.gate_up_input_scales_differ else in_gu
        ins = {"gate": in_gu, "up": in_up, "down": in_down}
        for role, kind in ((r, spec.input_scale_defects.get((layer, e, r))) for r in ins):
            if kind is not None:
                ins[role] = None if kind == "missing" else INPUT_SCALE_DEFECTS[kind]
        yield from _nvfp4_linear(f"{prefix}.{e}.{proj['gate']}", i, h, gen, scale_2=s2_gate, input_scale=ins["gate"], **kw)
        yield from _nvfp4_linear(f"{prefix}.{e}.{proj['up']}", i, h, gen, scale_2=s2_up, input_scale=ins["up"], **kw)
        yield from _nvfp4_linear(f"{prefix}.{e}.{proj['down']}", h, i, gen, scale_2=None, input_scale=ins["down"], **kw)


_DTYPE_NAME = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e8m0fnu: "F8_E8M0",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.uint16: "U16",
    torch.uint32: "U32",
}


def _configs(spec: SampleSpec) -> dict[str, dict]:
    h, i = spec.hidden, spec.inter
    cfg: dict = {
        "architectures": ["DeepseekV3ForCausalLM" if spec.scheme == "deepseek" else "MixtralForCausalLM" if spec.scheme == "mixtral" else "Qwen3MoeForCausalLM"],
        "model_type": "deepseek_v3" if spec.scheme == "deepseek" else "mixtral" if spec.scheme == "mixtral" else "qwen3_moe",
        "hidden_size": h,
        "moe_intermediate_size": i,
        "num_hidden_layers": spec.layers,
        "n_routed_experts": spec.experts,
        "num_experts": spec.experts,
        "torch_dtype": "bfloat16",
    }
    group = {"num_bits": 4, "type": "float", "group_size": 16}
    if spec.scheme == "compressed-tensors":
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {**group, "strategy": "tensor_group", "symmetric": True, "dynamic": False},
                    "input_activations": {**group, "strategy": "tensor_group", "symmetric": True, "dynamic": "local"},
                }
            },
            "ignore": ["lm_head", "re:.*mlp.gate$"],
        }
        return {"config.json": cfg}
    exclude = ["lm_head", "*.mlp.gate", "*.ffn.gate", "*.block_sparse_moe.gate", "*self_attn*"]
    cfg["quantization_config"] = {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "producer": {"name": "modelopt", "version": "0.45.0"},
        "config_groups": {
            "group_0": {"input_activations": {**group, "dynamic": False}, "weights": {**group, "dynamic": False}, "targets": ["Linear"]}
        },
        "ignore": exclude,
    }
    hq = {
        "producer": {"name": "modelopt", "version": "0.45.0"},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": exclude},
    }
    if spec.scale_encoding is not None:
        cfg["quantization_config"]["weight_scale_encoding"] = spec.scale_encoding
        hq["quantization"]["weight_scale_encoding"] = spec.scale_encoding
    return {"config.json": cfg, "hf_quant_config.json": hq}


def make_sample_checkpoint(out: Path, spec: SampleSpec | None = None) -> Path:
    """Write a sample checkpoint into ``out`` (created); returns ``out``."""
    spec = spec or SampleSpec()
    if spec.scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}")
    if spec.scale_encoding is not None and (spec.scale_encoding not in ENCODINGS or spec.scheme == "compressed-tensors"):
        raise ValueError(f"--scale-encoding must be one of {', '.join(ENCODINGS)}, for a ModelOpt scheme")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(spec.seed if spec.seed is not None else int(torch.randint(0, 2**31, ()).item()))
    h = spec.hidden
    # Materialise lazily, layer by layer, shard by shard: big benchmark checkpoints stay within memory.
    def all_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield "model.embed_tokens.weight" if spec.scheme != "deepseek" else "embed.weight", (
            torch.randn(64, h, generator=gen) * 0.02
        ).to(torch.bfloat16)
        for layer in range(spec.layers):
            yield from _layer_tensors(spec, layer, gen)
        yield "lm_head.weight" if spec.scheme != "deepseek" else "head.weight", (torch.randn(64, h, generator=gen) * 0.02).to(torch.bfloat16)

    configs = _configs(spec)
    readme = f"Sample NVFP4 MoE checkpoint ({spec.scheme} names), made by nvfp4-fuse.\n"
    return write_sharded(out, all_tensors(), _estimate_bytes(spec), spec.shards, configs, readme)


def write_sharded(
    out: Path, tensors: Iterator[tuple[str, torch.Tensor]], total: int, shards: int, configs: dict[str, dict], readme: str
) -> Path:
    """Write ``tensors`` (made lazily, in order) into about ``shards`` shards of ``total / shards`` bytes
    each, with an index, the configs and a few sidecars. Returns ``out``."""
    per_shard = math.ceil(total / shards)
    weight_map: dict[str, str] = {}
    shard_names = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0
    k = 0

    def flush(items: list[tuple[str, torch.Tensor]], name: str) -> None:
        entries = [OutEntry(n, _DTYPE_NAME[t.dtype], tuple(t.shape)) for n, t in items]
        w = StreamingShardWriter(out / name, entries, {"format": "pt"})
        for _, t in items:
            w.write(tensor_bytes(t))
        w.finish()
        for n, _ in items:
            weight_map[n] = name

    for name, t in tensors:
        pending.append((name, t))
        size += t.numel() * t.element_size()
        if size >= per_shard and k < shards - 1:
            flush(pending, shard_names[k])
            pending, size, k = [], 0, k + 1
    if pending:
        flush(pending, shard_names[k])
        k += 1
    n_real = k  # an empty last shard is never written
    if n_real < shards:  # fewer shards filled than asked: rename so the names stay consistent
        renamed = {}
        for j in range(n_real):
            new = f"model-{j + 1:05d}-of-{n_real:05d}.safetensors"
            (out / shard_names[j]).rename(out / new)
            renamed[shard_names[j]] = new
        weight_map = {t: renamed[f] for t, f in weight_map.items()}
    total_size = sum((out / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name, obj in configs.items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}) + "\n")
    (out / "README.md").write_text(readme)
    return out


def _estimate_bytes(spec: SampleSpec) -> int:
    h, i = spec.hidden, spec.inter
    lin = lambda r, c: r * c // 2 + r * c // 16 + 8  # noqa: E731
    per_expert = 2 * lin(i, h) + lin(h, i)
    moe_layers = spec.layers - (1 if spec.dense_first_layer else 0)
    total = moe_layers * (spec.experts + (1 if spec.shared_experts else 0)) * per_expert
    total += spec.layers * (h * h * 2 + h * 2) + 2 * 64 * h * 2
    return total
