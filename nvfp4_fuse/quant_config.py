"""What the source's quantization configs say, and what the output's say.

Sources come with several spellings of "NVFP4 experts": ModelOpt's (``quant_method: modelopt``,
``quant_algo: NVFP4`` and ``hf_quant_config.json``), DeepSeek-V4's (``quant_method: fp8`` for the rest
of the model with ``moe_quant_algo: NVFP4``, optionally ``quant_algo: MIXED_PRECISION`` with
``quantized_layers`` and ``ignore``, or canada-quant's ``expert_format`` block), compressed-tensors'.
They are accepted as long as they do not contradict the tensors; the tensors decide what each expert
group is (``experts.py``).

The output's configs keep every key of the source's and gain a ``fused_experts`` block. Where the
source has ``quantized_layers`` or an ``ignore`` / ``exclude_modules`` list, they are made to describe
what is now on disk: one ``quantized_layers`` entry per fused module (per-expert entries of the
ModelOpt schema are folded into it), no NVFP4 entry for an expert group that stayed MXFP4, and every
such group covered by the ignore list. A ``weight_scale_encoding`` (compressed block scales, which
the converter decodes: ``encoded_scales.py``) is dropped from every block and entry: the output's
block scales are plain E4M3.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from collections.abc import Iterable
from typing import Any

from .constants import NVFP4_BLOCK
from .errors import InputError

FUSED_BLOCK_KEY = "fused_experts"
NVFP4_ALGO = "NVFP4"
# How a checkpoint says its block scales are compressed (vLLM 0.34's ModelOpt configs): a config
# block's own key (for the whole checkpoint) or a ``quantized_layers`` entry's (for that layer).
SCALE_ENCODING_KEY = "weight_scale_encoding"


def _blocks(configs: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(where, block) for each quantization block: config.json's and hf_quant_config.json's."""
    out = []
    cfg = configs.get("config.json")
    if isinstance(cfg, dict) and isinstance(cfg.get("quantization_config"), dict):
        out.append(("config.json quantization_config", cfg["quantization_config"]))
    hq = configs.get("hf_quant_config.json")
    if isinstance(hq, dict):
        out.append(("hf_quant_config.json", hq))
        if isinstance(hq.get("quantization"), dict):
            out.append(("hf_quant_config.json quantization", hq["quantization"]))
    return out


def check_source_configs(configs: dict[str, dict[str, Any]]) -> None:
    """Refuse configs that say the checkpoint is not NVFP4, or that it is already fused."""
    cfg = configs.get("config.json")
    if cfg is not None and "quantization_config" in cfg and not isinstance(cfg["quantization_config"], dict):
        raise InputError("config.json quantization_config is not an object", file="config.json")
    for where, block in _blocks(configs):
        if FUSED_BLOCK_KEY in block:
            raise InputError(f"{where} has a {FUSED_BLOCK_KEY} block: this checkpoint is already fused")
        file = where.split()[0]
        algo = block.get("quant_algo")
        method = block.get("quant_method")
        if algo is not None and str(algo).upper() not in (NVFP4_ALGO, "MIXED_PRECISION") and method in (None, "modelopt"):
            raise InputError(f"{where} says quant_algo {algo!r}; only NVFP4 is supported", file=file)
        moe = block.get("moe_quant_algo")
        if moe is not None and str(moe).upper() != NVFP4_ALGO:
            raise InputError(f"{where} says moe_quant_algo {moe!r}; only NVFP4 experts are converted", file=file)


def declared_scale_encodings(configs: dict[str, dict[str, Any]]) -> list[tuple[str, Any]]:
    """(where, value) of every ``weight_scale_encoding`` the configs declare: each quantization
    block's own, and each ``quantized_layers`` entry's (where: the block and the layer)."""
    out = []
    for where, block in _blocks(configs):
        if SCALE_ENCODING_KEY in block:
            out.append((where, block[SCALE_ENCODING_KEY]))
        ql = block.get("quantized_layers")
        if isinstance(ql, dict):
            for layer, entry in ql.items():
                if isinstance(entry, dict) and SCALE_ENCODING_KEY in entry:
                    algo = str(entry.get("quant_algo", "")).upper()
                    if algo not in (NVFP4_ALGO, "W4A16_NVFP4"):
                        raise InputError(
                            f"{where} quantized_layers[{layer!r}] declares {SCALE_ENCODING_KEY} for quant_algo "
                            f"{entry.get('quant_algo')!r}; only NVFP4 block scales are compressed",
                            file=where.split()[0],
                        )
                    out.append((f"{where} quantized_layers[{layer!r}]", entry[SCALE_ENCODING_KEY]))
    return out


def _owner(key: str, prefixes: Iterable[str]) -> str | None:
    for p in prefixes:
        if key == p or key.startswith(p + "."):
            return p
    return None


def _ignored_by(patterns: list[Any], module: str) -> str | None:
    for pat in patterns:
        if isinstance(pat, str) and (fnmatch.fnmatchcase(module, pat) or fnmatch.fnmatchcase(module + ".w1", pat)):
            return pat
    return None


def check_against_groups(configs: dict[str, dict[str, Any]], fused: list[str]) -> None:
    """Refuse configs whose ignore list covers an expert group that holds NVFP4 tensors."""
    for where, block in _blocks(configs):
        for key in ("ignore", "exclude_modules"):
            pats = block.get(key)
            if not isinstance(pats, list):
                continue
            for p in fused:
                pat = _ignored_by(pats, p)
                if pat is not None:
                    raise InputError(
                        f"{where} {key} entry {pat!r} excludes {p}, whose tensors are NVFP4 experts", file=where.split()[0]
                    )


def _quantized_layers(ql: dict[str, Any], fused: list[str], copied: list[str], *, fold: bool = True) -> dict[str, Any]:
    """One entry per fused module, where its first entry (module or per-expert) stood; NVFP4 claims
    about groups that stayed MXFP4 dropped; every other entry kept as it is. With ``fold=False`` (the
    per-expert target) an expert group's own entries are kept as they are, and one is added for a
    group that has none."""
    out: dict[str, Any] = {}

    def entry(p: str) -> dict[str, Any]:
        base = ql.get(p)
        if not isinstance(base, dict):
            base = next((v for k, v in ql.items() if _owner(k, [p]) and isinstance(v, dict)), {})
        e = dict(base)
        e["quant_algo"] = NVFP4_ALGO
        if "group_size" not in e:
            e["group_size"] = NVFP4_BLOCK
        return e

    for key, val in ql.items():
        p = _owner(key, fused)
        if p is not None and not fold:
            out[key] = val
            continue
        if p is not None:
            if p not in out:
                out[p] = entry(p)
            continue
        c = _owner(key, copied)
        if c is not None and isinstance(val, dict) and str(val.get("quant_algo", "")).upper() == NVFP4_ALGO:
            continue  # that group is MXFP4 on disk
        out[key] = val
    for p in fused:
        if p not in out and not any(_owner(k, [p]) for k in out):
            out[p] = entry(p)
    return out


def _ignore_list(pats: list[Any], copied: list[str]) -> list[Any]:
    out = list(pats)
    for c in copied:
        if _ignored_by(out, c) is None:
            out.append(c)
    return out


def _describe_disk(block: dict[str, Any], fused: list[str], copied: list[str], *, fold: bool = True) -> None:
    if isinstance(block.get("quantized_layers"), dict):
        block["quantized_layers"] = _quantized_layers(block["quantized_layers"], fused, copied, fold=fold)
    for key in ("ignore", "exclude_modules"):
        if isinstance(block.get(key), list):
            block[key] = _ignore_list(block[key], copied)
    # Compressed block scales are written decoded, as plain E4M3: nothing on disk is compressed.
    block.pop(SCALE_ENCODING_KEY, None)
    ql = block.get("quantized_layers")
    for entry in ql.values() if isinstance(ql, dict) else ():
        if isinstance(entry, dict):
            entry.pop(SCALE_ENCODING_KEY, None)


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


# NVIDIA's DeepSeek-V4 NVFP4 recipe (docs/dsv4-formats.md): what it leaves out of NVFP4. SGLang 0.5.23
# takes a DeepSeek-V4 checkpoint as NVFP4 only with quant_algo MIXED_PRECISION, moe_quant_algo NVFP4
# and a top-level group_size (configs/model_config.py).
DSV4_IGNORE = ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"]


def _is_deepseek_v4(configs: dict[str, dict[str, Any]]) -> bool:
    cfg = configs.get("config.json") or {}
    return cfg.get("model_type") == "deepseek_v4" or "DeepseekV4ForCausalLM" in (cfg.get("architectures") or [])


def _dsv4_recipe_keys(block: dict[str, Any], fused: list[str], copied: list[str]) -> None:
    """The keys NVIDIA's DeepSeek-V4 recipe writes, where the source (canada-quant's) lacks them."""
    block["quant_algo"] = "MIXED_PRECISION"
    block["moe_quant_algo"] = NVFP4_ALGO
    block["group_size"] = NVFP4_BLOCK
    ql = block.get("quantized_layers")
    block["quantized_layers"] = _quantized_layers(ql if isinstance(ql, dict) else {}, fused, copied, fold=False)
    if not isinstance(block.get("ignore"), list):
        block["ignore"] = _ignore_list(DSV4_IGNORE, copied)


def output_configs(
    configs: dict[str, dict[str, Any]],
    block: dict[str, Any],
    fused: list[str],
    copied: list[str],
    *,
    key: str = FUSED_BLOCK_KEY,
    per_expert: bool = False,
    producer: dict[str, str] | None = None,
) -> dict[str, bytes]:
    """config.json and hf_quant_config.json of the output: the source's, with ``block`` under
    ``key`` and their module lists made to describe the output (``fused``: converted expert modules,
    ``copied``: expert groups left as they were).

    A fused output folds per-expert entries of ``quantized_layers`` into one per module. A
    ``per_expert`` output keeps them, and for a DeepSeek-V4 source gains NVIDIA's recipe keys in
    config.json and an hf_quant_config.json as ModelOpt writes it (made from config.json's, with
    ``producer``, where the source has none).
    """
    fold = not per_expert
    recipe = per_expert and _is_deepseek_v4(configs)
    out = {}
    cfg = configs.get("config.json")
    qc: dict[str, Any] | None = None
    if cfg is not None:
        cfg = copy.deepcopy(cfg)
        qc = cfg.setdefault("quantization_config", {})
        if not isinstance(qc, dict):
            raise InputError("config.json quantization_config is not an object", file="config.json")
        _describe_disk(qc, fused, copied, fold=fold)
        if recipe:
            _dsv4_recipe_keys(qc, fused, copied)
        qc[key] = block
        out["config.json"] = _dump(cfg)
    hq = configs.get("hf_quant_config.json")
    if hq is not None:
        hq = copy.deepcopy(hq)
        _describe_disk(hq, fused, copied, fold=fold)
        if isinstance(hq.get("quantization"), dict):
            _describe_disk(hq["quantization"], fused, copied, fold=fold)
    elif recipe and qc is not None:
        hq = {
            "producer": dict(qc.get("producer") or producer or {}),
            "quantization": {
                "quant_algo": "MIXED_PRECISION",
                "kv_cache_quant_algo": qc.get("kv_cache_quant_algo"),
                "group_size": NVFP4_BLOCK,
                "quantized_layers": copy.deepcopy(qc["quantized_layers"]),
                "exclude_modules": list(qc["ignore"]),
            },
        }
    if hq is not None:
        hq[key] = block
        out["hf_quant_config.json"] = _dump(hq)
    return out
