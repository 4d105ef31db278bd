"""Naming schemes: which tensors are routed-expert NVFP4 parts, and what the fused outputs are called.

A routed-expert tensor is ``<prefix>.experts.<e>.<proj>.<field>`` whatever the model calls its blocks:
HF (``model.layers.1.mlp.experts.0.gate_proj.weight``), Mixtral
(``model.layers.1.block_sparse_moe.experts.0.w1.weight``), DeepSeek-native
(``layers.0.ffn.experts.0.w1.weight``). ``w1`` is gate, ``w3`` up, ``w2`` down. Shared experts
(``shared_experts.*``, no index) do not match and are copied like any other tensor.

ModelOpt fields are ``weight``, ``weight_scale``, ``weight_scale_2`` and ``input_scale``;
compressed-tensors NVFP4 uses ``weight_packed``, ``weight_global_scale`` (= 1/weight_scale_2) and
``input_global_scale`` (= 1/input_scale). DeepSeek-V4 checkpoints have a ``scale`` field, which is
either an NVFP4 block scale (F8_E4M3 ``[out, in/16]``, canada-quant's recipe) or the native MXFP4 scale
(F8_E8M0 ``[out, in/32]``): the name alone does not tell, so it stays ``scale`` here and
``experts.py`` decides by dtype and shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROLES = ("gate", "up", "down")
PROJ_ROLE = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
# source field -> (canonical field, stored as reciprocal)
FIELD_CANON = {
    "weight": ("weight", False),
    "weight_scale": ("weight_scale", False),
    "weight_scale_2": ("weight_scale_2", False),
    "input_scale": ("input_scale", False),
    "weight_packed": ("weight", False),
    "weight_global_scale": ("weight_scale_2", True),
    "input_global_scale": ("input_scale", True),
    "scale": ("scale", False),  # NVFP4 block scale or MXFP4 scale, by dtype and shape (experts.py)
}
CANON_FIELDS = ("weight", "weight_scale", "weight_scale_2", "input_scale")  # an NVFP4 expert's fields

_EXPERT_RE = re.compile(r"^(?P<prefix>.+\.experts|experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.(?P<field>[A-Za-z0-9_]+)$")


@dataclass(frozen=True)
class ExpertTensorName:
    prefix: str  # "<...>.experts"
    expert: int
    proj: str  # as in the source: gate_proj / w1 / ...
    role: str  # gate / up / down
    field: str  # canonical field
    reciprocal: bool  # compressed-tensors global scale: value is 1/canonical
    source_field: str


class UnknownExpertPart(ValueError):
    """A name that looks like a routed-expert tensor but has a projection or field we do not know."""


def parse_expert_name(name: str) -> ExpertTensorName | None:
    """Parse a routed-expert tensor name; None for any other tensor.

    Raises UnknownExpertPart for ``...experts.<e>.<proj>.<field>`` names whose projection or field is
    not an NVFP4 expert part (so such a checkpoint is refused instead of silently half-converted).
    """
    m = _EXPERT_RE.match(name)
    if not m:
        return None
    proj, fld = m["proj"], m["field"]
    if proj not in PROJ_ROLE:
        raise UnknownExpertPart(f"unknown expert projection {proj!r} (expected gate_proj/up_proj/down_proj or w1/w3/w2)")
    if fld not in FIELD_CANON:
        raise UnknownExpertPart(f"unknown NVFP4 expert field {fld!r} (expected one of {', '.join(FIELD_CANON)})")
    canon, recip = FIELD_CANON[fld]
    expert = m["expert"]
    if len(expert) > 1 and expert.startswith("0"):
        raise UnknownExpertPart(f"expert index {expert!r} has a leading zero")
    return ExpertTensorName(m["prefix"], int(expert), proj, PROJ_ROLE[proj], canon, recip, fld)


def fused_name(prefix: str, part: str) -> str:
    """Fused output name, e.g. fused_name("layers.0.ffn.experts", "w13_input_scale")."""
    return f"{prefix}.{part}"


# The stacked tensors every target writes per ``<prefix>.experts`` (targets.py gives their shapes).
FUSED_PARTS = (
    "w13_weight",
    "w13_weight_scale",
    "w13_weight_scale_2",
    "w13_input_scale",
    "w2_weight",
    "w2_weight_scale",
    "w2_weight_scale_2",
    "w2_input_scale",
)
