"""The conversion plan, built from shard headers alone (plus the scalar scales).

Scanning a source folder: the index (or the lone ``model.safetensors``) is read and cross-checked with
every shard header; routed-expert tensors are grouped per ``<prefix>.experts``; each group is checked
for completeness (experts 0..E-1, gate/up/down, all four NVFP4 fields), dtypes and shapes; the scalar
scales are read and checked (finite, > 0). The plan then lists every output tensor in order, assigns
tensors to output shards, and knows every byte count before a single weight byte is read.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .manifest import MANIFEST_NAME, fingerprint
from .naming import CANON_FIELDS, ROLES, UnknownExpertPart, parse_expert_name
from .safetensors_io import PARTIAL_SUFFIX, OutEntry, ShardHeader, ShardReader, TensorInfo, loads_strict_json, read_header
from .targets import LayerDims, Target

# Memory budget of the converter (used by convert.py; here so the plan can estimate the peak).
COPY_CHUNK = 16 << 20  # non-expert tensors (embeddings: GBs) are copied in pieces of this size
INFLIGHT_BYTES = 128 << 20  # output bytes read ahead of the writer, at most (always at least one task)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_FILES = ("config.json", "hf_quant_config.json")


@dataclass(frozen=True)
class SourceRef:
    file: str  # shard file name, relative to the source folder
    info: TensorInfo
    reciprocal: bool = False  # compressed-tensors global scale


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


@dataclass(frozen=True)
class OutTensor:
    entry: OutEntry
    kind: str  # "copy" | "fused" | "global"
    source: SourceRef | None = None  # for "copy"
    layer: str | None = None  # prefix, for "fused"/"global"
    part: str | None = None  # e.g. "w13_weight"


@dataclass
class OutShard:
    name: str
    tensors: list[OutTensor]

    @property
    def entries(self) -> list[OutEntry]:
        return [t.entry for t in self.tensors]

    @property
    def data_bytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)


@dataclass
class Source:
    """A scanned source checkpoint folder."""

    root: Path
    headers: dict[str, ShardHeader]  # shard file name -> header
    tensor_file: dict[str, str]  # tensor name -> shard file name, in source order
    sidecars: list[str]  # relative paths of every other file to copy
    configs: dict[str, dict[str, Any]]  # parsed config.json / hf_quant_config.json (if present)
    had_index: bool

    def fingerprint(self) -> str:
        """Fingerprint of every shard header and config: a rerun on other input is told apart."""
        return fingerprint(
            {
                "headers": {n: h.raw_header.decode("utf-8", "replace") for n, h in sorted(self.headers.items())},
                "sizes": {n: h.file_size for n, h in sorted(self.headers.items())},
                "configs": self.configs,
            }
        )


@dataclass
class Plan:
    source: Source
    target: Target
    options: dict[str, Any]
    layers: dict[str, ExpertLayer]
    shards: list[OutShard]
    max_expert_bytes: int

    @property
    def total_size(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {t.entry.name: s.name for s in self.shards for t in s.tensors}

    def sidecar_bytes(self) -> int:
        return sum((self.source.root / p).stat().st_size for p in self.source.sidecars)

    def output_bytes_estimate(self) -> int:
        headers = sum(8 + len(json.dumps({t.entry.name: 0 for t in s.tensors})) * 3 for s in self.shards)
        return self.total_size + headers + self.sidecar_bytes() + (1 << 20)

    def peak_memory_estimate(self, workers: int) -> int:
        """Read-ahead budget (or one task, if larger), the task being written, scale temporaries, and
        the interpreter with numpy (the converter never imports torch). Independent of the number of
        experts, layers and shard size."""
        return max(INFLIGHT_BYTES, self.max_expert_bytes) + 2 * self.max_expert_bytes + (64 << 20)


# ---------------------------------------------------------------------------------------------------
# scanning


def _inside(root: Path, p: Path, what: str) -> Path:
    """Resolve p (following symlinks) and make sure it stays under root."""
    try:
        real = p.resolve(strict=True)
    except FileNotFoundError:
        raise InputError(f"{what} does not exist", file=str(p)) from None
    except (OSError, RuntimeError) as e:  # symlink loops and the like
        raise InputError(f"{what} cannot be resolved: {e}", file=str(p)) from None
    if not real.is_relative_to(root):
        raise InputError(f"{what} leads outside the source folder (to {real})", file=str(p))
    return real


def _safe_relpath(name: Any, *, file: str) -> str:
    if not isinstance(name, str) or not name:
        raise InputError(f"index names a shard that is not a file name: {name!r}", file=file)
    pp = Path(name)
    if pp.is_absolute() or ".." in pp.parts or name.startswith("/") or "\\" in name:
        raise InputError(f"index names a shard path outside the folder: {name!r}", file=file)
    return name


def scan_source(root: Path, *, trust_root: Path | None = None) -> Source:
    """Read the index, every shard header and the configs of a local checkpoint folder.

    ``trust_root`` is the folder symlinks may point into (a Hub cache's repo folder, whose snapshot
    files are links to its blobs); for a plain folder it is the folder itself.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("source is not a folder", file=str(root))
    trust = (trust_root or root).resolve()
    index_path = root / INDEX_NAME
    had_index = index_path.exists()
    if had_index:
        _inside(trust, index_path, "index")
        idx = loads_strict_json(index_path.read_bytes(), what="index", file=str(index_path))
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise InputError("index has no weight_map", file=str(index_path))
        for t, fname in wm.items():
            _safe_relpath(fname, file=str(index_path))
        files = sorted(set(wm.values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            raise InputError(f"no {INDEX_NAME} and no *.safetensors files", file=str(root))
        wm = None
    headers: dict[str, ShardHeader] = {}
    for fname in files:
        p = root / fname
        if not p.exists() and not p.is_symlink():
            raise InputError("index names a shard that does not exist", file=str(p))
        _inside(trust, p, "shard")
        headers[fname] = read_header(p)
    # tensor -> file, checking the index against the headers
    tensor_file: dict[str, str] = {}
    order = sorted(
        ((fname, t) for fname, h in headers.items() for t in h.tensors.values()), key=lambda x: (x[0], x[1].begin)
    )
    for fname, t in order:
        if t.name in tensor_file:
            raise InputError(f"tensor is defined in both {tensor_file[t.name]} and {fname}", tensor=t.name)
        if wm is not None:
            listed = wm.get(t.name)
            if listed is None:
                raise InputError("shard holds a tensor that the index does not list", file=fname, tensor=t.name)
            if listed != fname:
                raise InputError(f"index says the tensor is in {listed}, but it is in {fname}", tensor=t.name)
        tensor_file[t.name] = fname
    if wm is not None:
        for t, fname in wm.items():
            if t not in tensor_file:
                raise InputError(f"index lists a tensor that {fname} does not hold", file=fname, tensor=t)
    configs: dict[str, dict[str, Any]] = {}
    for c in CONFIG_FILES:
        p = root / c
        if p.exists():
            _inside(trust, p, c)
            obj = loads_strict_json(p.read_bytes(), what=c, file=str(p))
            if not isinstance(obj, dict):
                raise InputError(f"{c} is not a JSON object", file=str(p))
            configs[c] = obj
    sidecars = []
    shard_set = set(files)
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue  # .cache/, .git/, editor files: not part of the checkpoint
        if p.is_dir() and not p.is_symlink():
            continue
        rel_s = rel.as_posix()
        if rel_s in shard_set or rel_s == INDEX_NAME:
            continue
        if rel_s.endswith(".safetensors") and had_index:
            raise InputError("safetensors file that the index does not name", file=str(p))
        if rel_s == MANIFEST_NAME or rel_s.endswith(PARTIAL_SUFFIX):
            continue
        real = _inside(trust, p, "file")
        if real.is_dir():
            raise InputError("symlink to a folder inside the checkpoint is not supported", file=str(p))
        sidecars.append(rel_s)
    return Source(root, headers, tensor_file, sidecars, configs, had_index)


def check_quant_config(src: Source) -> None:
    """Refuse checkpoints whose configs say they are not NVFP4, or that are already fused."""
    hq = src.configs.get("hf_quant_config.json")
    cfg = src.configs.get("config.json", {})
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    for where, block in (("hf_quant_config.json", hq), ("config.json quantization_config", qc)):
        if isinstance(block, dict) and "fused_experts" in block:
            raise InputError(f"{where} has a fused_experts block: this checkpoint is already fused")
    if isinstance(hq, dict):
        algo = (hq.get("quantization") or {}).get("quant_algo")
        if algo not in (None, "NVFP4", "MIXED_PRECISION"):
            raise InputError(f"hf_quant_config.json says quant_algo {algo!r}; only NVFP4 is supported", file="hf_quant_config.json")


# ---------------------------------------------------------------------------------------------------
# expert groups

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


def group_experts(src: Source) -> tuple[dict[str, ExpertLayer], list[str]]:
    """Group routed-expert tensors per prefix; returns (layers in source order, other tensor names)."""
    raw: dict[str, dict[tuple[int, str, str], SourceRef]] = {}
    projs: dict[tuple[str, int, str], set[str]] = {}
    others: list[str] = []
    for name, fname in src.tensor_file.items():
        try:
            p = parse_expert_name(name)
        except UnknownExpertPart as e:
            raise InputError(str(e), file=fname, tensor=name) from None
        if p is None:
            others.append(name)
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
    return layers, others


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
    for (e, role, fld), ref in parts.items():
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


def read_scalars(src: Source, layer: ExpertLayer, readers: dict[str, ShardReader]) -> None:
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


# ---------------------------------------------------------------------------------------------------
# the plan

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(s: str) -> int:
    t = s.strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    unit = t[len(num) :]
    if unit not in SIZE_UNITS:
        raise InputError(f"cannot read size {s!r} (examples: 5GB, 500MB, 2GiB)")
    try:
        v = float(num)
    except ValueError:
        raise InputError(f"cannot read size {s!r} (examples: 5GB, 500MB, 2GiB)") from None
    if v <= 0:
        raise InputError(f"size must be positive: {s!r}")
    return int(v * SIZE_UNITS[unit])


def shard_file_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def source_from_remote_headers(label: str, remote: dict[str, Any]) -> Source:
    """A Source built from Hub headers alone (``hub.remote_safetensors_headers``), for a dry-run plan."""
    headers: dict[str, ShardHeader] = {}
    for fname, hdr in remote["headers"].items():
        tensors = {}
        for name, spec in hdr.items():
            if name == "__metadata__":
                continue
            b, e = spec["data_offsets"]
            tensors[name] = TensorInfo(name, spec["dtype"], tuple(spec["shape"]), b, e)
        headers[fname] = ShardHeader(Path(fname), 0, tensors, hdr.get("__metadata__"), 0)
    order = sorted(((f, t) for f, h in headers.items() for t in h.tensors.values()), key=lambda x: (x[0], x[1].begin))
    return Source(Path(label), headers, {t.name: f for f, t in order}, [], {}, remote.get("sharded", True))


def build_plan(src: Source, target: Target, options: dict[str, Any], max_shard_size: int, *, with_scalars: bool = True) -> Plan:
    """The plan; ``with_scalars=False`` (a remote dry run) skips reading the scalar scales."""
    check_quant_config(src)
    layers, _others = group_experts(src)
    if not layers:
        raise InputError("no routed-expert NVFP4 tensors (<prefix>.experts.<e>.<proj>.<field>) found", file=str(src.root))
    readers = {f: ShardReader(h) for f, h in src.headers.items()} if with_scalars else {}
    try:
        for layer in layers.values():
            target.check_dims(layer.prefix, layer.dims)
            if not with_scalars:
                continue
            read_scalars(src, layer, readers)
            layer.ratio_gate, layer.ratio_up = target.rescale_ratios(
                layer.scalars["gate.weight_scale_2"], layer.scalars["up.weight_scale_2"]
            )
    finally:
        for r in readers.values():
            r.close()
    # Output order: source order, each expert group emitted where its first tensor stood.
    out: list[OutTensor] = []
    emitted: set[str] = set()
    max_expert = 0
    for name, fname in src.tensor_file.items():
        p = parse_expert_name(name)
        if p is None:
            info = src.headers[fname].tensors[name]
            out.append(OutTensor(OutEntry(name, info.dtype, info.shape), "copy", source=SourceRef(fname, info)))
            continue
        if p.prefix in emitted:
            continue
        emitted.add(p.prefix)
        layer = layers[p.prefix]
        for entry in target.out_entries(p.prefix, layer.dims):
            part = entry.name[len(p.prefix) + 1 :]
            kind = "fused" if part in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale") else "global"
            out.append(OutTensor(entry, kind, layer=p.prefix, part=part))
            if kind == "fused":
                max_expert = max(max_expert, entry.nbytes // max(1, layer.dims.experts))
    for t in out:
        if t.kind == "copy":
            max_expert = max(max_expert, min(t.entry.nbytes, COPY_CHUNK))
    # Shards: greedy fill; a tensor is never split, a tensor larger than the limit gets its own shard.
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in out:
        n = t.entry.nbytes
        if groups[-1] and size + n > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += n
    shards = [OutShard(shard_file_name(i, len(groups)), g) for i, g in enumerate(groups)]
    return Plan(src, target, options, layers, shards, max_expert)


def disk_free(path: Path) -> int:
    p = Path(path)
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"
