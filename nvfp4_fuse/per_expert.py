"""The ``per-expert`` target: one Linear per expert as the source had it, repaired for every engine.

Nothing is stacked. Each expert's projection is written under the spelling of its naming scheme:

- ModelOpt sources (and DeepSeek-V4's two NVFP4 recipes): ``.weight`` (the packed values as they are),
  ``.weight_scale`` E4M3 ``[out, in/16]`` (canada-quant's ``.scale`` is renamed to it: SGLang maps
  ``.scale`` to FP8's ``weight_scale_inv``), ``.weight_scale_2`` and ``.input_scale`` 0-d F32, as
  NVIDIA's ModelOpt exporter writes them;
- compressed-tensors sources keep that scheme's own spelling (``weight_packed``, ``weight_scale``,
  ``weight_global_scale``, ``input_global_scale``, as the source shapes them): their config is
  compressed-tensors', which every engine reads with its own loader, and renaming the tensors would
  need a ModelOpt config in its place, a second change nobody asked for.

Every scalar written is the 4 bytes of one source scalar: gate and up both get the ``weight_scale_2``
of the half whose value is larger (the other half's block scales are rescaled, RNE, as the fused
targets do it), and both get the larger of their two ``input_scale``; a missing or zero input scale is
first replaced by the rule in ``experts.INPUT_SCALE_RULE``. For compressed-tensors, whose fields hold
reciprocals, "larger" is that of the value they stand for, so the smaller global scale is written.
"""

from __future__ import annotations

from typing import Any

from .experts import INPUT_SCALE_RULE, ExpertLayer
from .naming import ROLES
from .safetensors_header import OutEntry
from .source import SourceRef

EXPERT_FIELDS = ("weight", "weight_scale", "weight_scale_2", "input_scale")
SCALAR_FIELDS = ("weight_scale_2", "input_scale")
# compressed-tensors' names of the canonical fields
CT_FIELDS = {"weight": "weight_packed", "weight_scale": "weight_scale", "weight_scale_2": "weight_global_scale", "input_scale": "input_global_scale"}
REPAIR_BLOCK_KEY = "repaired_experts"
SCALE_2_RULE = "gate and up weight_scale_2 made equal: the larger, the other half's E4M3 block scales multiplied by their ratio (RNE)"
GATE_UP_INPUT_RULE = "gate and up input_scale made equal: the larger of the two"


def is_compressed_tensors(layer: ExpertLayer) -> bool:
    return layer.ref(0, "gate", "weight_scale_2").reciprocal


def out_name(layer: ExpertLayer, e: int, role: str, fld: str) -> str:
    """The output tensor of expert ``e``'s ``role`` projection's canonical field ``fld``."""
    base = layer.ref(e, role, "weight").info.name.rsplit(".", 1)[0]  # <prefix>.<e>.<proj>
    return f"{base}.{CT_FIELDS[fld] if is_compressed_tensors(layer) else fld}"


def scalar_source(layer: ExpertLayer, e: int, role: str, fld: str) -> SourceRef:
    """The source scalar whose 4 bytes expert ``e``'s ``role`` ``fld`` is written as (see the module notes)."""
    if role == "down":
        return layer.scalar_ref(e, role, fld)
    sc = layer.scalars
    winner = "gate" if sc[f"gate.{fld}"][e] >= sc[f"up.{fld}"][e] else "up"
    return layer.scalar_ref(e, winner, fld)


def out_entries(layer: ExpertLayer) -> list[tuple[OutEntry, int, str, str]]:
    """(entry, expert, role, canonical field) of every output tensor of the layer, expert by expert."""
    ct = is_compressed_tensors(layer)
    out = []
    for e in range(layer.dims.experts):
        for role in ROLES:
            w, s = layer.ref(e, role, "weight"), layer.ref(e, role, "weight_scale")
            for fld in EXPERT_FIELDS:
                if fld == "weight":
                    dtype, shape = w.info.dtype, w.info.shape
                elif fld == "weight_scale":
                    dtype, shape = "F8_E4M3", s.info.shape
                else:
                    dtype, shape = "F32", (layer.ref(e, role, "weight_scale_2").info.shape if ct else ())
                out.append((OutEntry(out_name(layer, e, role, fld), dtype, shape), e, role, fld))
    return out


def repair_block(layers: dict[str, ExpertLayer], tool: str) -> dict[str, Any]:
    """The ``repaired_experts`` block of the output configs: what the repair did, per layer."""
    return {
        "target": "per-expert",
        "tool": tool,
        "rules": {"weight_scale_2": SCALE_2_RULE, "gate_up_input_scale": GATE_UP_INPUT_RULE, "missing_input_scale": INPUT_SCALE_RULE},
        "modules": {
            p: {
                "num_experts": l.dims.experts,
                "scale_2_rescaled_experts": l.rescaled_experts,
                "gate_up_input_scale_merged_experts": int((l.scalars["gate.input_scale"] != l.scalars["up.input_scale"]).sum()),
                "repaired_input_scales": {r: len(v) for r, v in l.repaired_input_scales.items()},
            }
            for p, l in layers.items()
        },
    }
