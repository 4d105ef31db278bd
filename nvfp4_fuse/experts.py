"""Routed-expert groups: which tensors are one layer's experts, and whether they are complete and sane.

Routed-expert tensors are grouped per ``<prefix>.experts``; each group is checked for completeness
(experts 0..E-1, gate/up/down, all four NVFP4 fields), dtypes and shapes, and its scalar scales are
read and checked (finite, > 0). Every problem is an :class:`InputError` naming file and tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .naming import CANON_FIELDS, ROLES, UnknownExpertPart, parse_expert_name
from .safetensors_io import ShardReader
from .source import Source, SourceRef
from .targets import LayerDims


@dataclass
class ExpertLayer:
    prefix: str
    dims: LayerDims
    parts: dict[tuple[int, str, str], SourceRef]  # (expert, role, canonical field) -> source tensor
    scalars: dict[str, np.ndarray] = field(default_factory=dict)  # "gate.weight_scale_2" -> float32 [E]
    ratio_gate: np.ndarray | None = None
    ratio_up: np.ndarray | None = None

    def ref(self, e: int, role: str, fld: str) -> SourceRef:
        return self.parts[(e, role, fld)]

    @property
    def rescaled_experts(self) -> int:
        assert self.ratio_gate is not None and self.ratio_up is not None
        return int(((self.ratio_gate != 1) | (self.ratio_up != 1)).sum())

    @property
    def scale_2_mismatches(self) -> int:
        """Experts whose gate and up weight_scale_2 differ (compared exactly)."""
        return int((self.scalars["gate.weight_scale_2"] != self.scalars["up.weight_scale_2"]).sum())

    @property
    def input_scale_spread(self) -> float:
        v = np.concatenate([self.scalars[f"{r}.input_scale"] for r in ("gate", "up")])
        return float(v.max() / v.min())


_WANT_DTYPE = {"weight": "U8", "weight_scale": "F8_E4M3", "weight_scale_2": "F32", "input_scale": "F32"}


def _ranges(nums: list[int]) -> str:
    out, start, prev = [], None, None
    for n in sorted(nums):
        if start is None:
            start = prev = n
        elif n == prev + 1:
            prev = n
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = n
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return ", ".join(out)


def group_experts(src: Source) -> dict[str, ExpertLayer]:
    """Group routed-expert tensors per prefix (layers in source order); other tensors are not experts."""
    raw: dict[str, dict[tuple[int, str, str], SourceRef]] = {}
    projs: dict[tuple[str, int, str], set[str]] = {}
    for name, fname in src.tensor_file.items():
        try:
            p = parse_expert_name(name)
        except UnknownExpertPart as e:
            raise InputError(str(e), file=fname, tensor=name) from None
        if p is None:
            continue
        key = (p.expert, p.role, p.field)
        grp = raw.setdefault(p.prefix, {})
        if key in grp:
            raise InputError(
                f"expert {p.expert} {p.role} {p.field} is given twice (also as {grp[key].info.name})", file=fname, tensor=name
            )
        info = src.headers[fname].tensors[name]
        grp[key] = SourceRef(fname, info, p.reciprocal)
        projs.setdefault((p.prefix, p.expert, p.role), set()).add(p.proj)
    for (prefix, e, role), names in projs.items():
        if len(names) > 1:
            raise InputError(f"{prefix}.{e}: {role} is named both {' and '.join(sorted(names))}")
    layers = {}
    for prefix, parts in raw.items():
        layers[prefix] = _check_layer(prefix, parts)
    existing = set(src.tensor_file)
    for prefix in layers:
        for part in ("w13_weight", "w2_weight", "w13_input_scale"):
            if f"{prefix}.{part}" in existing:
                raise InputError(f"{prefix} already has fused tensors; is this checkpoint already converted?", tensor=f"{prefix}.{part}")
    return layers


def _check_layer(prefix: str, parts: dict[tuple[int, str, str], SourceRef]) -> ExpertLayer:
    experts = sorted({k[0] for k in parts})
    n = experts[-1] + 1
    if experts != list(range(n)):
        missing = sorted(set(range(n)) - set(experts))
        raise InputError(f"{prefix}: expert indices have gaps: missing {_ranges(missing)} (found {_ranges(experts)})")
    for e in range(n):
        for role in ROLES:
            for fld in CANON_FIELDS:
                if (e, role, fld) not in parts:
                    have = [f for (ee, r, f) in parts if ee == e and r == role]
                    what = f"{prefix}.{e} {role}"
                    raise InputError(
                        f"{what}: missing {fld}" + (f" (has {', '.join(sorted(have))})" if have else " (no tensors at all)")
                    )
    # dtypes and scalar shapes
    for (_, _, fld), ref in parts.items():
        want = _WANT_DTYPE[fld]
        if ref.info.dtype != want:
            raise InputError(f"{fld} must be {want}, not {ref.info.dtype}", file=ref.file, tensor=ref.info.name)
        if fld in ("weight_scale_2", "input_scale") and ref.info.shape not in ((), (1,)):
            raise InputError(f"{fld} must be a scalar ([] or [1]), not {list(ref.info.shape)}", file=ref.file, tensor=ref.info.name)
        if fld in ("weight", "weight_scale") and len(ref.info.shape) != 2:
            raise InputError(f"{fld} must be 2-D, not {list(ref.info.shape)}", file=ref.file, tensor=ref.info.name)
    # shapes: gate/up [I, H/2] and [I, H/16], down [H, I/2] and [H, I/16]; the same for every expert
    g0 = parts[(0, "gate", "weight")]
    i_rows, h_half = g0.info.shape
    h = 2 * h_half
    d0 = parts[(0, "down", "weight")]
    if h % 16:
        raise InputError(f"gate/up have {h} columns, not a multiple of 16", file=g0.file, tensor=g0.info.name)
    want = {
        "gate": {"weight": (i_rows, h // 2), "weight_scale": (i_rows, h // 16)},
        "up": {"weight": (i_rows, h // 2), "weight_scale": (i_rows, h // 16)},
        "down": {"weight": (h, i_rows // 2), "weight_scale": (h, i_rows // 16)},
    }
    if (2 * d0.info.shape[1]) % 16 or d0.info.shape[0] != h or 2 * d0.info.shape[1] != i_rows:
        raise InputError(
            f"down is {list(d0.info.shape)} but gate is {list(g0.info.shape)}: expected down [{h}, {i_rows // 2}]"
            + (" (down columns must be a multiple of 16)" if (2 * d0.info.shape[1]) % 16 else ""),
            file=d0.file,
            tensor=d0.info.name,
        )
    for e in range(n):
        for role in ROLES:
            for fld, shape in want[role].items():
                ref = parts[(e, role, fld)]
                if ref.info.shape != shape:
                    other = parts[(e, "gate", fld)] if role == "up" else g0
                    raise InputError(
                        f"shape {list(ref.info.shape)} differs from expected {list(shape)} "
                        f"(from {other.info.name} {list(other.info.shape)})",
                        file=ref.file,
                        tensor=ref.info.name,
                    )
    return ExpertLayer(prefix, LayerDims(n, h, i_rows), parts)


def read_scalars(layer: ExpertLayer, readers: dict[str, ShardReader]) -> None:
    """Read and check every scalar scale of a layer; fills layer.scalars (fp32 [E])."""
    n = layer.dims.experts
    for role in ROLES:
        for fld in ("weight_scale_2", "input_scale"):
            vals = np.empty(n, dtype=np.float32)
            for e in range(n):
                ref = layer.ref(e, role, fld)
                v = np.frombuffer(readers[ref.file].read_bytes(ref.info.name), dtype="<f4")[0]
                x = float(v)
                if not math.isfinite(x) or x <= 0:
                    raise InputError(f"{fld} is {x}; it must be finite and > 0", file=ref.file, tensor=ref.info.name)
                if ref.reciprocal:
                    with np.errstate(over="ignore", divide="ignore"):
                        v = np.float32(1) / v
                    if not math.isfinite(float(v)) or float(v) <= 0:
                        raise InputError(f"1/{fld} is not a usable scale", file=ref.file, tensor=ref.info.name)
                vals[e] = v
            layer.scalars[f"{role}.{fld}"] = vals
