"""What the source's quantization configs say, and what the output's say.

The source's ``config.json`` ``quantization_config`` and ``hf_quant_config.json`` are checked to
describe an NVFP4 checkpoint that is not fused yet; the output's are the source's with a
``fused_experts`` block added (every other key kept), so a loader and ``verify`` can tell what they read.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import InputError

FUSED_BLOCK_KEY = "fused_experts"


def check_source_configs(configs: dict[str, dict[str, Any]]) -> None:
    """Refuse checkpoints whose configs say they are not NVFP4, or that are already fused."""
    hq = configs.get("hf_quant_config.json")
    cfg = configs.get("config.json", {})
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    for where, block in (("hf_quant_config.json", hq), ("config.json quantization_config", qc)):
        if isinstance(block, dict) and FUSED_BLOCK_KEY in block:
            raise InputError(f"{where} has a {FUSED_BLOCK_KEY} block: this checkpoint is already fused")
    if isinstance(hq, dict):
        algo = (hq.get("quantization") or {}).get("quant_algo")
        if algo not in (None, "NVFP4", "MIXED_PRECISION"):
            raise InputError(f"hf_quant_config.json says quant_algo {algo!r}; only NVFP4 is supported", file="hf_quant_config.json")


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def output_configs(configs: dict[str, dict[str, Any]], block: dict[str, Any]) -> dict[str, bytes]:
    """config.json and hf_quant_config.json (those the source has) with ``block`` added."""
    out = {}
    cfg = configs.get("config.json")
    if cfg is not None:
        cfg = json.loads(json.dumps(cfg))
        qc = cfg.setdefault("quantization_config", {})
        if not isinstance(qc, dict):
            raise InputError("config.json quantization_config is not an object", file="config.json")
        qc[FUSED_BLOCK_KEY] = block
        out["config.json"] = _dump(cfg)
    hq = configs.get("hf_quant_config.json")
    if hq is not None:
        hq = json.loads(json.dumps(hq))
        hq[FUSED_BLOCK_KEY] = block
        out["hf_quant_config.json"] = _dump(hq)
    return out
