"""Routed-expert groups: which tensors are one layer's experts, in which format, complete and sane.

Routed-expert tensors are grouped per ``<prefix>.experts``, and each group is recognised by its
tensors' dtypes and shapes, never by name alone:

- NVFP4 (what is converted): packed E2M1 values (U8 or I8 ``[out, in/2]``), an E4M3 block scale
  ``[out, in/16]`` (``weight_scale``, or ``scale`` as canada-quant stores it), ``weight_scale_2`` and
  ``input_scale`` (F32, 0-d or ``[1]``). Checked for completeness (experts 0..E-1, gate/up/down, every
  field), dtypes and shapes; its scalar scales are read and checked (finite, > 0). A compressed block
  scale (``encoded_scales.py``) is its decoded E4M3 matrix here, like a plain one.
- MXFP4 (DeepSeek-V4's native experts, which both published NVFP4 recipes keep in their MTP layer):
  I8 (or U8) values ``[out, in/2]`` and an E8M0 ``scale`` ``[out, in/32]``, nothing else. Left per
  expert and copied byte for byte.

A group that is neither clearly, or mixes the two, is refused. Every problem is an
:class:`InputError` naming file and tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .constants import MXFP4_BLOCK
from .errors import InputError
from .naming import CANON_FIELDS, ROLES, UnknownExpertPart, parse_expert_name
from .shard_reader import ShardReader
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
    # input scales missing or zero in the source, replaced by INPUT_SCALE_RULE: role -> experts, and
    # role -> the source tensor whose value they were given (the role's largest present input scale)
    repaired_input_scales: dict[str, list[int]] = field(default_factory=dict)
    repair_source: dict[str, SourceRef] = field(default_factory=dict)

    def ref(self, e: int, role: str, fld: str) -> SourceRef:
        return self.parts[(e, role, fld)]

    def scalar_ref(self, e: int, role: str, fld: str) -> SourceRef:
        """The source tensor that holds expert ``e``'s ``fld`` as the layer's scalars have it: its own,
        or for a repaired input scale the one whose value it was given."""
        if fld == "input_scale" and e in self.repaired_input_scales.get(role, ()):
            return self.repair_source[role]
        return self.parts[(e, role, fld)]

    @property
    def repaired_count(self) -> int:
        return sum(len(v) for v in self.repaired_input_scales.values())

    @property
    def names(self) -> list[str]:
        """Its source tensors."""
        return [r.info.name for r in self.parts.values()]

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
        """max/min of the gate and up input scales over the layer's experts."""
        v = np.concatenate([self.scalars[f"{r}.input_scale"] for r in ("gate", "up")])
        return float(v.max() / v.min())

    @property
    def w2_input_scale_spread(self) -> float:
        """max/min of the down input scales (a loader that takes their max quantizes with it)."""
        v = self.scalars["down.input_scale"]
        return float(v.max() / v.min())


@dataclass(frozen=True)
class CopiedGroup:
    """An expert group that is not converted (MXFP4): its tensors are copied per expert, as they are."""

    prefix: str
    format: str
    experts: int
    tensors: int
    names: frozenset[str] = frozenset()  # its tensors


_WANT_DTYPE = {"weight": ("U8", "I8"), "weight_scale": ("F8_E4M3",), "weight_scale_2": ("F32",), "input_scale": ("F32",)}
NVFP4_ONLY_FIELDS = ("weight_scale", "weight_scale_2", "input_scale")
Parts = dict[tuple[int, str, str], SourceRef]  # (expert, role, field) -> source tensor


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


@dataclass
class GroupScan:
    """One ``<prefix>.experts`` group as the scan found it: its format and, unless ``problem``, its
    checked layer (NVFP4) or copied group (MXFP4)."""

    prefix: str
    format: str  # "NVFP4", "MXFP4" or "unknown" (neither, or a mix)
    raw: Parts  # (expert, role, source field) -> tensor, as named in the source
    layer: ExpertLayer | None = None
    copied: CopiedGroup | None = None
    problem: InputError | None = None  # the first defect found in this group
    missing: list[tuple[int, str, str]] = field(default_factory=list)  # tolerated absent fields


@dataclass
class ExpertScan:
    """Every routed-expert group of a source and every defect found, in the order the strict path
    meets them (its first one is the error ``group_experts`` raises)."""

    groups: dict[str, GroupScan]
    problems: list[InputError]

    @property
    def layers(self) -> dict[str, ExpertLayer]:
        return {p: g.layer for p, g in self.groups.items() if g.layer is not None}

    @property
    def copied(self) -> dict[str, CopiedGroup]:
        return {p: g.copied for p, g in self.groups.items() if g.copied is not None}


def scan_experts(src: Source, *, tolerate_missing: tuple[str, ...] = (), skip: frozenset[str] = frozenset()) -> ExpertScan:
    """Group routed-expert tensors per prefix, recognise each group's format and check it, recording
    every defect instead of stopping at the first (one per group: a defective group is not checked
    further). ``tolerate_missing``: NVFP4 fields an expert may lack (recorded in ``missing``);
    ``skip``: tensor names to leave out (e.g. a block-scale encoding's streams)."""
    problems: list[InputError] = []
    raw: dict[str, Parts] = {}
    projs: dict[tuple[str, int, str], set[str]] = {}
    for name, ref in src.refs():
        fname = ref.file
        if name in skip:
            continue
        try:
            p = parse_expert_name(name)
        except UnknownExpertPart as e:
            problems.append(InputError(str(e), file=fname, tensor=name))
            continue
        if p is None:
            continue
        key = (p.expert, p.role, p.field)
        grp = raw.setdefault(p.prefix, {})
        if key in grp:
            problems.append(
                InputError(f"expert {p.expert} {p.role} {p.field} is given twice (also as {grp[key].info.name})", file=fname, tensor=name)
            )
            continue
        grp[key] = SourceRef(fname, ref.info, p.reciprocal, ref.encoded)
        projs.setdefault((p.prefix, p.expert, p.role), set()).add(p.proj)
    for (prefix, e, role), names in projs.items():
        if len(names) > 1:
            problems.append(InputError(f"{prefix}.{e}: {role} is named both {' and '.join(sorted(names))}"))
    groups: dict[str, GroupScan] = {}
    for prefix, parts in raw.items():
        g = groups[prefix] = GroupScan(prefix, "unknown", parts)
        try:
            g.format = _group_format(prefix, parts)
            if g.format == "MXFP4":
                g.copied = _check_mxfp4_group(prefix, parts)
            else:
                fields = _nvfp4_fields(parts)
                g.missing = _missing(fields, tolerate_missing)
                g.layer = _check_layer(prefix, fields, optional=tolerate_missing)
        except InputError as e:
            g.problem = e
            problems.append(e)
    existing = set(src.tensor_file)
    for prefix, g in groups.items():
        if g.layer is None:
            continue
        for part in ("w13_weight", "w2_weight", "w13_input_scale"):
            if f"{prefix}.{part}" in existing:
                problems.append(
                    InputError(f"{prefix} already has fused tensors; is this checkpoint already converted?", tensor=f"{prefix}.{part}")
                )
                break
    return ExpertScan(groups, problems)


def group_experts(src: Source) -> tuple[dict[str, ExpertLayer], dict[str, CopiedGroup]]:
    """Group routed-expert tensors per prefix and recognise each group's format.

    Returns (NVFP4 layers to convert, groups left as they are), each in source order; raises the
    first defect :func:`scan_experts` finds.
    """
    # An expert calibration never routed to may have no input_scale: read_scalars repairs it.
    scan = scan_experts(src, tolerate_missing=("input_scale",))
    if scan.problems:
        raise scan.problems[0]
    return scan.layers, scan.copied


def _missing(parts: Parts, fields: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """(expert, role, field) of ``fields`` that experts 0..max lack."""
    if not fields or not parts:
        return []
    n = max(k[0] for k in parts) + 1
    present = {k[0] for k in parts}
    return [(e, r, f) for e in range(n) if e in present for r in ROLES for f in fields if (e, r, f) not in parts]


def _part_format(fields: dict[str, SourceRef]) -> str | None:
    """One expert projection's format from its tensors: "MXFP4", "NVFP4", or None (cannot tell)."""
    scale = fields.get("scale")
    if scale is not None and scale.info.dtype not in ("F8_E4M3", "F8_E8M0"):
        raise InputError(
            f"a routed expert's .scale must be F8_E4M3 (an NVFP4 block scale, [out, in/16]) or F8_E8M0 "
            f"(MXFP4, [out, in/32]), not {scale.info.dtype}",
            file=scale.file,
            tensor=scale.info.name,
        )
    if scale is not None and scale.info.dtype == "F8_E8M0":
        return "MXFP4"
    if scale is not None or any(f in fields for f in NVFP4_ONLY_FIELDS):
        return "NVFP4"
    return None


def _group_format(prefix: str, parts: Parts) -> str:
    """The group's format; every projection of every expert must agree (``InputError`` naming the first
    tensor that does not)."""
    by_part: dict[tuple[int, str], dict[str, SourceRef]] = {}
    for (e, role, fld), ref in parts.items():
        by_part.setdefault((e, role), {})[fld] = ref
    formats = {k: _part_format(v) for k, v in by_part.items()}
    known = [f for f in formats.values() if f]
    if not known:
        ref = next(iter(parts.values()))
        raise InputError(
            f"{prefix}: routed experts with no scale tensors are neither NVFP4 nor MXFP4", file=ref.file, tensor=ref.info.name
        )
    first = known[0]
    for (e, role), fmt in sorted(formats.items()):
        if fmt != first:
            fields = by_part[(e, role)]
            ref = fields.get("scale") or next(iter(fields.values()))
            raise InputError(
                f"{prefix} mixes MXFP4 and NVFP4 experts: expert {e} {role} is {fmt or 'neither'}, "
                f"others are {first}",
                file=ref.file,
                tensor=ref.info.name,
            )
    return first


def _nvfp4_fields(parts: Parts) -> Parts:
    """An NVFP4 group's parts with canada-quant's ``scale`` read as the ``weight_scale`` it is."""
    out: Parts = {}
    for (e, role, fld), ref in parts.items():
        canon = "weight_scale" if fld == "scale" else fld
        if (e, role, canon) in out or (fld == "weight_scale" and (e, role, "scale") in parts):
            other = parts[(e, role, "scale")] if fld == "weight_scale" else out[(e, role, canon)]
            raise InputError(
                f"expert {e} {role} has two block scales (also {other.info.name})", file=ref.file, tensor=ref.info.name
            )
        out[(e, role, canon)] = ref
    return out


def _check_complete(prefix: str, parts: Parts, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> int:
    """Experts 0..E-1, each with gate, up and down and every field; returns E."""
    experts = sorted({k[0] for k in parts})
    n = experts[-1] + 1
    if experts != list(range(n)):
        missing = sorted(set(range(n)) - set(experts))
        raise InputError(f"{prefix}: expert indices have gaps: missing {_ranges(missing)} (found {_ranges(experts)})")
    for e in range(n):
        for role in ROLES:
            for fld in fields:
                if (e, role, fld) not in parts and fld not in optional:
                    have = [f for (ee, r, f) in parts if ee == e and r == role]
                    what = f"{prefix}.{e} {role}"
                    raise InputError(
                        f"{what}: missing {fld}" + (f" (has {', '.join(sorted(have))})" if have else " (no tensors at all)")
                    )
    return n


def _check_mxfp4_group(prefix: str, parts: Parts) -> CopiedGroup:
    n = _check_complete(prefix, parts, ("weight", "scale"))
    for (_, _, fld), ref in parts.items():
        if fld not in ("weight", "scale"):
            raise InputError(f"an MXFP4 expert has no {fld}", file=ref.file, tensor=ref.info.name)
        if fld == "weight" and ref.info.dtype not in ("I8", "U8"):
            raise InputError(f"MXFP4 packed values must be I8 or U8, not {ref.info.dtype}", file=ref.file, tensor=ref.info.name)
        if len(ref.info.shape) != 2:
            raise InputError(f"{fld} must be 2-D, not {list(ref.info.shape)}", file=ref.file, tensor=ref.info.name)
    for e in range(n):
        for role in ROLES:
            w, s = parts[(e, role, "weight")], parts[(e, role, "scale")]
            rows, half = w.info.shape
            if (2 * half) % MXFP4_BLOCK or s.info.shape != (rows, 2 * half // MXFP4_BLOCK):
                raise InputError(
                    f"MXFP4 scale is {list(s.info.shape)}, expected [{rows}, {2 * half // MXFP4_BLOCK}] for values "
                    f"{list(w.info.shape)} (one E8M0 scale per {MXFP4_BLOCK} values)",
                    file=s.file,
                    tensor=s.info.name,
                )
    return CopiedGroup(prefix, "MXFP4", n, len(parts), frozenset(r.info.name for r in parts.values()))


def _check_layer(prefix: str, parts: Parts, optional: tuple[str, ...] = ()) -> ExpertLayer:
    n = _check_complete(prefix, parts, CANON_FIELDS, optional)
    # dtypes and scalar shapes
    for (_, _, fld), ref in parts.items():
        want = _WANT_DTYPE[fld]
        if ref.info.dtype not in want:
            raise InputError(f"{fld} must be {' or '.join(want)}, not {ref.info.dtype}", file=ref.file, tensor=ref.info.name)
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
                ref = parts.get((e, role, fld))
                if ref is None:  # an absent field the caller tolerates (``optional``)
                    continue
                if ref.info.shape != shape:
                    other = parts[(e, "gate", fld)] if role == "up" else g0
                    raise InputError(
                        f"shape {list(ref.info.shape)} differs from expected {list(shape)} "
                        f"(from {other.info.name} {list(other.info.shape)})",
                        file=ref.file,
                        tensor=ref.info.name,
                    )
    return ExpertLayer(prefix, LayerDims(n, h, i_rows), parts)


INPUT_SCALE_RULE = (
    "an input_scale missing or zero in the source is replaced by the largest input_scale present in "
    "the same layer for the same projection (gate, up or down)"
)


def scalar_value(raw: bytes, fld: str, reciprocal: bool) -> tuple[float, str | None]:
    """A stored scalar scale's canonical value (``1/x`` for a compressed-tensors global scale) and
    why it is unusable (None when it is finite and > 0): the one check the strict path and
    ``inspect`` share."""
    v = np.frombuffer(raw[:4], dtype="<f4")[0]
    x = float(v)
    if not math.isfinite(x) or x <= 0:
        return x, f"{fld} is {x}; it must be finite and > 0"
    if reciprocal:
        with np.errstate(over="ignore", divide="ignore"):
            v = np.float32(1) / v
        if not math.isfinite(float(v)) or float(v) <= 0:
            return float(v), f"1/{fld} is not a usable scale"
    return float(v), None


def read_scalars(layer: ExpertLayer, readers: dict[str, ShardReader]) -> None:
    """Read and check every scalar scale of a layer; fills layer.scalars (fp32 [E]).

    NaN, Inf and negative values are refused; an ``input_scale`` that is missing or zero (an expert
    calibration never routed to) is repaired by :data:`INPUT_SCALE_RULE` and recorded in
    ``layer.repaired_input_scales``; a projection with no input scale at all is refused."""
    n = layer.dims.experts
    for role in ROLES:
        for fld in ("weight_scale_2", "input_scale"):
            vals = np.empty(n, dtype=np.float32)
            missing: list[int] = []
            for e in range(n):
                ref = layer.parts.get((e, role, fld))
                if ref is None:  # tolerated by group_experts: repaired below
                    missing.append(e)
                    continue
                v, problem = scalar_value(readers[ref.file].read_small(ref.info.name), fld, ref.reciprocal)
                if problem is not None and fld == "input_scale" and v == 0:
                    missing.append(e)
                    continue
                if problem is not None:
                    raise InputError(problem, file=ref.file, tensor=ref.info.name)
                vals[e] = v
            if missing:
                present = [e for e in range(n) if e not in set(missing)]
                if not present:
                    raise InputError(
                        f"{layer.prefix}: no expert's {role} has a nonzero input_scale, so none can be derived "
                        "(weight-only NVFP4 experts are not supported)"
                    )
                best = max(present, key=lambda e: (float(vals[e]), -e))
                vals[missing] = vals[best]
                layer.repaired_input_scales[role] = missing
                layer.repair_source[role] = layer.parts[(best, role, fld)]
            layer.scalars[f"{role}.{fld}"] = vals
