"""The output spec: every tensor, shard, config and metadata entry of a conversion, from headers alone.

Built once from a scanned source and typed options (:class:`OutputOptions`): ``convert`` writes it,
``verify`` checks an output folder against it, the dry run prints it. It lists every output tensor in
order (source order; each expert group where its first tensor stood), assigns tensors to shards, and
knows every byte count before a single weight byte is read. The output configs, shard metadata and
index are derived here too, so the writer and the checker cannot disagree about them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__, per_expert
from .errors import InputError
from .experts import INPUT_SCALE_RULE, CopiedGroup, ExpertLayer, group_experts, read_scalars
from .layout import W13Order
from .quant_config import check_against_groups, check_source_configs, output_configs
from .safetensors_header import OutEntry
from .shard_reader import ShardReader
from .source import INDEX_NAME, Source, SourceRef
from .targets import DEFAULT_TARGET, LAYOUT_VERSION, Target, get_target

# Memory budget of the converter (used by convert.py; here so the spec can estimate the peak).
COPY_CHUNK = 16 << 20  # non-expert tensors (embeddings: GBs) are copied in pieces of this size
INFLIGHT_BYTES = 64 << 20  # per shard stream: output bytes taken on and not yet hashed, at most (always one task)
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9

PER_EXPERT_PARTS = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")  # per-expert slices


@dataclass(frozen=True)
class OutputOptions:
    """The options that decide the output bytes (the manifest records them; a rerun must match)."""

    target: Target
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    w13_order: W13Order = W13Order.GATE_UP

    @classmethod
    def parse(
        cls, target: str = DEFAULT_TARGET, w13_order: str = W13Order.GATE_UP, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    ) -> OutputOptions:
        """From the command line's or the API's plain values; ``InputError`` for a bad one."""
        size = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
        if size <= 0:
            raise InputError(f"--max-shard-size must be positive, not {max_shard_size!r}")
        t = get_target(target, w13_order)
        return cls(t, size, W13Order(w13_order))

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target.name, "w13_order": str(self.w13_order), "max_shard_size": self.max_shard_size}

    @classmethod
    def from_json(cls, d: Any, *, file: str) -> OutputOptions:
        if not isinstance(d, dict) or "target" not in d:
            raise InputError("manifest options name no target", file=file)
        return cls.parse(d["target"], d.get("w13_order", W13Order.GATE_UP), d.get("max_shard_size", DEFAULT_MAX_SHARD_SIZE))


@dataclass(frozen=True)
class OutTensor:
    entry: OutEntry
    # "copy" | "decoded" (a compressed block scale, written plain) | "fused" (per-expert slices) | "global"
    # | "expert" (one expert's values or block scales, per-expert target) | "scalar" (one expert's
    # weight_scale_2 or input_scale, per-expert target: the bytes of ``source``)
    kind: str
    source: SourceRef | None = None  # for "copy", "decoded" and "scalar"
    layer: str | None = None  # prefix, for "fused"/"global"/"expert"/"scalar"
    part: str | None = None  # e.g. "w13_weight"; "<role>.<canonical field>" for "expert"/"scalar"
    expert: int | None = None  # for "expert"/"scalar"


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
class OutputSpec:
    source: Source
    options: OutputOptions
    layers: dict[str, ExpertLayer]  # NVFP4 expert groups, converted
    copied_groups: dict[str, CopiedGroup]  # expert groups left as they are (MXFP4), copied per expert
    shards: list[OutShard]
    max_expert_bytes: int

    @property
    def target(self) -> Target:
        return self.options.target

    @property
    def total_size(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {t.entry.name: s.name for s in self.shards for t in s.tensors}

    def decoded_block_scales(self) -> dict[str, int]:
        """How many compressed block scales of each encoding the source has (all written decoded)."""
        counts: dict[str, int] = {}
        for enc in self.source.encoded.values():
            counts[enc.encoding] = counts.get(enc.encoding, 0) + 1
        return counts

    # -- what is written besides the shards --------------------------------------------------------
    def fused_block(self) -> dict[str, Any]:
        """The ``fused_experts`` block of the output configs."""
        block = self.target.describe()
        block["tool"] = f"nvfp4-fuse {__version__}"
        block["modules"] = {
            p: {"num_experts": l.dims.experts, "hidden_size": l.dims.hidden, "intermediate_size": l.dims.inter}
            for p, l in self.layers.items()
        }
        if self.copied_groups:
            block["copied_expert_modules"] = {
                p: {"format": g.format, "num_experts": g.experts} for p, g in self.copied_groups.items()
            }
        repaired = {p: {r: len(v) for r, v in l.repaired_input_scales.items()} for p, l in self.layers.items() if l.repaired_input_scales}
        if repaired:
            block["repaired_input_scales"] = {"rule": INPUT_SCALE_RULE, "modules": repaired}
        return block

    def repair_block(self) -> dict[str, Any]:
        """The ``repaired_experts`` block of a per-expert output's configs."""
        block = per_expert.repair_block(self.layers, f"nvfp4-fuse {__version__}")
        if self.copied_groups:
            block["copied_expert_modules"] = {p: {"format": g.format, "num_experts": g.experts} for p, g in self.copied_groups.items()}
        return block

    def configs(self) -> dict[str, bytes]:
        """config.json and hf_quant_config.json of the output (file name -> bytes)."""
        if self.target.per_expert:
            return output_configs(
                self.source.configs,
                self.repair_block(),
                list(self.layers),
                list(self.copied_groups),
                key=per_expert.REPAIR_BLOCK_KEY,
                per_expert=True,
                producer={"name": "nvfp4-fuse", "version": __version__},
            )
        return output_configs(self.source.configs, self.fused_block(), list(self.layers), list(self.copied_groups))

    def shard_metadata(self) -> dict[str, str]:
        return {"format": "pt", "nvfp4_fuse_layout": LAYOUT_VERSION, "nvfp4_fuse_target": self.target.name}

    def index_bytes(self) -> bytes:
        index = {"metadata": {"total_size": self.total_size, "nvfp4_fuse_target": self.target.name}, "weight_map": self.weight_map()}
        return (json.dumps(index, indent=2) + "\n").encode()

    def summary(self, workers: int, out_dir: Path | None = None, streams: int = 1) -> dict[str, Any]:
        """The plan as plain data (what the dry run prints, as a table or as JSON)."""
        mods = []
        for p, l in self.layers.items():
            m: dict[str, Any] = {"prefix": p, "experts": l.dims.experts, "hidden": l.dims.hidden, "intermediate": l.dims.inter}
            if l.scalars:  # not read for a plan from remote headers
                m |= {
                    "scale_2_mismatches": l.scale_2_mismatches,
                    "rescaled_experts": l.rescaled_experts,
                    "input_scale_spread": l.input_scale_spread,
                    "w2_input_scale_spread": l.w2_input_scale_spread,
                    "repaired_input_scales": {r: len(v) for r, v in l.repaired_input_scales.items()},
                }
            mods.append(m)
        src = self.source
        return {
            "target": self.target.name,
            "description": self.target.description,
            "modules": mods,
            "copied_expert_modules": {p: {"format": g.format, "experts": g.experts} for p, g in self.copied_groups.items()},
            "decoded_block_scales": self.decoded_block_scales(),
            "shards": [{"name": s.name, "tensors": len(s.tensors), "bytes": s.data_bytes} for s in self.shards],
            "total_bytes": self.total_size,
            "source": {"path": str(src.root), "shards": len(src.headers), "tensors": len(src.tensor_file), "other_files": len(src.sidecars)},
            "disk_needed": self.output_bytes_estimate(),
            "disk_free": disk_free(out_dir) if out_dir is not None else None,
            "peak_memory_estimate": self.peak_memory_estimate(streams),
            "workers": workers,
            "shard_streams": streams,
        }

    # -- estimates ---------------------------------------------------------------------------------
    def sidecar_bytes(self) -> int:
        sizes = self.source.remote_sizes
        return sum(sizes[p] if sizes is not None else (self.source.root / p).stat().st_size for p in self.source.sidecars)

    def output_bytes_estimate(self) -> int:
        headers = sum(8 + len(json.dumps({t.entry.name: 0 for t in s.tensors})) * 3 for s in self.shards)
        return self.total_size + headers + self.sidecar_bytes() + (1 << 20)

    def peak_memory_estimate(self, streams: int = 1) -> int:
        """Read-ahead budget (``INFLIGHT_BYTES`` a stream, shared by the shard streams; or one task, if
        larger), each stream's task being written, scale temporaries, and the interpreter with numpy (the
        converter never imports torch). Independent of the number of experts, layers and shard size."""
        return max(streams * INFLIGHT_BYTES, self.max_expert_bytes) + (1 + streams) * self.max_expert_bytes + (64 << 20)


def build_spec(src: Source, options: OutputOptions, *, with_scalars: bool = True, scalar_readers: dict | None = None) -> OutputSpec:
    """The output spec of converting ``src`` with ``options``; ``InputError`` for anything unusable.

    ``with_scalars=False`` (a remote dry run: headers only) skips reading the scalar scales;
    ``scalar_readers`` (``{shard: object with read_small(name)}``, e.g. range requests to the Hub)
    reads them instead of the local files.
    """
    target = options.target
    check_source_configs(src.configs)
    layers, copied = group_experts(src)
    if not layers:
        also = f" (only {', '.join(f'{g.prefix} ({g.format})' for g in copied.values())})" if copied else ""
        raise InputError(f"no routed-expert NVFP4 tensors (<prefix>.experts.<e>.<proj>.<field>) found{also}", file=str(src.root))
    check_against_groups(src.configs, list(layers))
    for layer in layers.values():
        problems = target.problems(layer.dims)
        if problems:
            from .targets import TARGETS

            fits = [n for n, t in TARGETS.items() if n != target.name and not t.problems(layer.dims)]
            hint = f"; --target {' or '.join(fits)} takes these sizes" if fits else ""
            raise InputError(problems[0] + hint, tensor=layer.prefix)
    if with_scalars:
        readers = scalar_readers if scalar_readers is not None else {f: ShardReader(h) for f, h in src.headers.items()}
        try:
            for layer in layers.values():
                read_scalars(layer, readers)
                layer.ratio_gate, layer.ratio_up = target.scale_2.ratios(
                    layer.scalars["gate.weight_scale_2"], layer.scalars["up.weight_scale_2"]
                )
        finally:
            if scalar_readers is None:
                for r in readers.values():
                    r.close()
    out: list[OutTensor] = []
    emitted: set[str] = set()
    max_expert = 0
    owner = {n: prefix for prefix, layer in layers.items() for n in layer.names}  # converted tensors' groups
    for name, ref in src.refs():
        prefix = owner.get(name)
        if prefix is None:  # copied as it is: not an expert, or an expert group left as it was (MXFP4)
            info = ref.info
            if ref.encoded is not None:  # a compressed block scale: written decoded, in one piece
                out.append(OutTensor(OutEntry(name, info.dtype, info.shape), "decoded", source=ref))
                max_expert = max(max_expert, 2 * info.nbytes)
                continue
            out.append(OutTensor(OutEntry(name, info.dtype, info.shape), "copy", source=ref))
            max_expert = max(max_expert, min(info.nbytes, COPY_CHUNK))
            continue
        if prefix in emitted:
            continue
        emitted.add(prefix)
        layer = layers[prefix]
        if target.per_expert:
            for entry, e, role, fld in per_expert.out_entries(layer):
                if fld in per_expert.SCALAR_FIELDS:
                    src_ref = per_expert.scalar_source(layer, e, role, fld) if layer.scalars else None
                    out.append(OutTensor(entry, "scalar", source=src_ref, layer=prefix, part=f"{role}.{fld}", expert=e))
                else:
                    out.append(OutTensor(entry, "expert", layer=prefix, part=f"{role}.{fld}", expert=e))
                    max_expert = max(max_expert, 2 * entry.nbytes)
            continue
        for entry in target.out_entries(prefix, layer.dims):
            part = entry.name[len(prefix) + 1 :]
            kind = "fused" if part in PER_EXPERT_PARTS else "global"
            out.append(OutTensor(entry, kind, layer=prefix, part=part))
            if kind == "fused":
                max_expert = max(max_expert, entry.nbytes // max(1, layer.dims.experts))
    # Shards: greedy fill; a tensor is never split, a tensor larger than the limit gets its own shard.
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in out:
        n = t.entry.nbytes
        if groups[-1] and size + n > options.max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += n
    shards = [OutShard(shard_file_name(i, len(groups)), g) for i, g in enumerate(groups)]
    return OutputSpec(src, options, layers, copied, shards, max_expert)


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


MIN_SHARD_SIZE = 10**3  # below this a shard holds one small tensor: no one means it


def parse_shard_size(s: str) -> int:
    """``--max-shard-size``: a size with a unit (5GB, 500MB, 2GiB), at least 1 KB."""
    try:
        float(s)
        bare = True
    except ValueError:
        bare = False
    if bare:
        raise InputError(f"--max-shard-size {s} needs a unit, e.g. {s}GB or {s}MB (units: KB, MB, GB, KiB, MiB, GiB)")
    n = parse_size(s)
    if n < MIN_SHARD_SIZE:
        raise InputError(f"--max-shard-size {s} is {n} bytes, below 1KB: every tensor would be a shard of its own")
    return n


def shard_file_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


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


__all__ = ["INDEX_NAME", "OutputOptions", "OutputSpec", "OutShard", "OutTensor", "build_spec", "parse_size", "parse_shard_size", "human", "disk_free"]
