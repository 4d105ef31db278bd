"""``nvfp4-fuse inspect``: what an NVFP4 MoE checkpoint holds, from its headers and scalar scales alone.

Unlike the converter, which stops at a checkpoint's first defect, this reports every one: it scans
the expert groups with :func:`~nvfp4_fuse.experts.scan_experts` (the converter's own recognition,
tolerating absent input scales and block scales held as CSF streams), reads every scalar scale
(``weight_scale_2``, ``input_scale``; locally by ``pread``, from the Hub by coalesced range requests),
and describes, per expert group: format, counts and dims, naming, block-scale spelling and encoding,
scalar shapes; gate/up ``weight_scale_2`` pairs that differ; input scales missing, zero, NaN, Inf or
negative, and their spread; plus the config fields serving engines key on. ``engines.py`` then turns
these facts into one verdict per engine and backend.

The report is a plain dict (``--json`` prints it; ``schema`` versions it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .csf import STREAM_ENCODING
from .errors import EXIT_ENGINE_ISSUES, EXIT_OK, InputError
from .experts import ExpertLayer, ExpertScan, GroupScan, _ranges, scalar_value, scan_experts
from .json_out import SCHEMA  # noqa: F401  (the --json schema inspect's report is printed in)
from .naming import FUSED_PARTS, ROLES
from .quant_config import FUSED_BLOCK_KEY
from .source import Source, SourceRef

SCALARS = ("weight_scale_2", "input_scale")
DEFECTS = ("missing", "zero", "nan", "inf", "negative")

ReadScalars = Callable[[list[SourceRef]], dict[str, bytes]]  # tensors -> their bytes


# ------------------------------------------------------------------------------------------------
# configs


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def config_facts(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The config fields engines key on, each with the file it came from (None where absent)."""
    cfg = configs.get("config.json") or {}
    qc = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), dict) else None
    hq = configs.get("hf_quant_config.json")
    hqq = _get(hq, "quantization") if isinstance(_get(hq, "quantization"), dict) else None
    out: dict[str, Any] = {
        "files": sorted(configs),
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        "has_quantization_config": qc is not None,
        "swiglu_limit": cfg.get("swiglu_limit"),
    }
    for key in ("quant_method", "quant_algo", "moe_quant_algo", "group_size", "weight_scale_encoding", "kv_cache_quant_algo"):
        val, where = None, None
        for name, block in (("config.json", qc), ("hf_quant_config.json quantization", hqq), ("hf_quant_config.json", hq)):
            if isinstance(block, dict) and key in block:
                val, where = block[key], name
                break
        out[key] = val
        out[f"{key}_from"] = where
    for key in ("ignore", "exclude_modules"):
        lists = {
            n: b[key]
            for n, b in (("config.json", qc), ("hf_quant_config.json", hqq))
            if isinstance(b, dict) and isinstance(b.get(key), list)
        }
        out[key] = lists or None
    ql = {
        n: len(b["quantized_layers"])
        for n, b in (("config.json", qc), ("hf_quant_config.json", hqq))
        if isinstance(b, dict) and isinstance(b.get("quantized_layers"), dict)
    }
    out["quantized_layers"] = ql or None
    out["producer"] = _get(hq, "producer") or _get(qc, "producer")
    # vLLM's ModelOpt NVFP4 config needs these in hf_quant_config.json's "quantization" block
    out["hf_quant_config_missing"] = (
        [k for k in ("group_size", "kv_cache_quant_algo", "exclude_modules") if k not in hqq]
        if isinstance(hqq, dict) and "NVFP4" in str(hqq.get("quant_algo", "")).upper()
        else []
    )
    out["expert_format"] = _get(qc, "expert_format")
    fused = None
    for block in (qc, hq):
        if isinstance(block, dict) and isinstance(block.get(FUSED_BLOCK_KEY), dict):
            fused = {
                k: block[FUSED_BLOCK_KEY].get(k)
                for k in ("layout", "target", "w13_order", "producer")
                if k in block[FUSED_BLOCK_KEY]
            }
            break
    out["fused_experts"] = fused
    return out


def is_deepseek_v4(cfg: dict[str, Any]) -> bool:
    """DeepSeek-V4 or V4.1 (whose vLLM model subclasses V4's MoE and has its MegaMoE branch)."""
    archs = cfg.get("architectures") or []
    return cfg.get("model_type") in ("deepseek_v4", "deepseek_v41") or any(
        a in archs for a in ("DeepseekV4ForCausalLM", "DeepseekV41ForCausalLM")
    )


# ------------------------------------------------------------------------------------------------
# tensors


def csf_streams(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """Block scales held as CSF streams: ``<base>.<stream>`` -> {base: {encoding: ..., stream: name}}."""
    out: dict[str, dict[str, str]] = {}
    for n in names:
        base, dot, stream = n.rpartition(".")
        enc = STREAM_ENCODING.get(stream) if dot else None
        if enc is not None:
            out.setdefault(base, {})[stream] = n
            out[base].setdefault("__encoding__", enc)
    return out


def _fused_groups(src: Source) -> dict[str, list[str]]:
    """``<prefix>`` -> its stacked tensors, for groups stored fused (``<prefix>.w13_weight`` ...)."""
    out: dict[str, list[str]] = {}
    for name in src.tensor_file:
        prefix, _, part = name.rpartition(".")
        if part in FUSED_PARTS and prefix.endswith("experts"):
            out.setdefault(prefix, []).append(part)
    return out


def layer_key(prefix: str) -> tuple:
    """Sort key that puts groups in layer order (``layers.2`` before ``layers.10``, MTP last)."""
    parts = re.split(r"(\d+)", prefix)
    mtp = 1 if re.search(r"(^|\.)(mtp|model\.mtp)\.", prefix) else 0
    return (mtp, [int(p) if p.isdigit() else p for p in parts])


def layer_label(prefix: str) -> str:
    m = re.search(r"(?:^|\.)(layers|mtp)\.(\d+)\.", prefix + ".")
    if not m:
        return prefix
    return m.group(2) if m.group(1) == "layers" else f"mtp.{m.group(2)}"


@dataclass
class ScalarTable:
    """One scalar field of one role over a layer's experts: canonical values (NaN where absent) and
    each expert's defect ("" when usable)."""

    values: np.ndarray
    defect: list[str]

    def experts(self, kind: str) -> list[int]:
        return [e for e, d in enumerate(self.defect) if d == kind]

    def usable(self) -> np.ndarray:
        return np.array([d == "" for d in self.defect], dtype=bool)


def _classify(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf"
    if v == 0:
        return "zero"
    if v < 0:
        return "negative"
    return ""


def _scalar_tables(layer: ExpertLayer, blobs: dict[str, bytes]) -> dict[str, ScalarTable]:
    n = layer.dims.experts
    out: dict[str, ScalarTable] = {}
    for role in ROLES:
        for fld in SCALARS:
            vals = np.full(n, np.nan)
            defect = ["missing"] * n
            for e in range(n):
                ref = layer.parts.get((e, role, fld))
                if ref is None:
                    continue
                v, _problem = scalar_value(blobs[ref.info.name], fld, ref.reciprocal)
                vals[e] = v
                defect[e] = _classify(v)
            out[f"{role}.{fld}"] = ScalarTable(vals, defect)
    return out


def _spread(v: np.ndarray) -> float | None:
    v = v[np.isfinite(v) & (v > 0)]
    return float(v.max() / v.min()) if v.size else None


def _spelling(g: GroupScan) -> dict[str, Any]:
    projs = {ref.info.name.rsplit(".", 2)[-2] for ref in g.raw.values()}
    fields = {fld for (_, _, fld) in g.raw}
    srcf = {ref.info.name.rsplit(".", 1)[-1] for ref in g.raw.values()}
    ct = bool(srcf & {"weight_packed", "weight_global_scale", "input_global_scale"})
    shapes = {tuple(ref.info.shape) for (_, _, fld), ref in g.raw.items() if fld in SCALARS}
    return {
        "projections": "/".join(p for p in ("gate_proj", "up_proj", "down_proj", "w1", "w3", "w2") if p in projs),
        "fields": "compressed-tensors" if ct else "modelopt",
        "block_scale": "scale" if "scale" in fields else ("weight_scale" if "weight_scale" in fields else None),
        "scalar_shape": "/".join(sorted({"0-d" if s == () else str(list(s)) for s in shapes})) or None,
    }


def _group_report(g: GroupScan, blobs: dict[str, bytes], csf_bases: dict[str, dict[str, str]]) -> dict[str, Any]:
    d: dict[str, Any] = {"prefix": g.prefix, "layer": layer_label(g.prefix), "format": g.format, "problem": None}
    if g.problem is not None:
        d["problem"] = str(g.problem)
    d["experts"] = len({k[0] for k in g.raw})
    d["naming"] = _spelling(g)
    if g.copied is not None:
        d["experts"] = g.copied.experts
    layer = g.layer
    if layer is None:
        return d
    d.update(experts=layer.dims.experts, hidden=layer.dims.hidden, intermediate=layer.dims.inter)
    # block scales held as CSF streams (``<...>.weight_scale.<stream>``): the scan reads each as the
    # E4M3 matrix it decodes to (source.Source.refs); streams with no declared encoding stand in for
    # absent ones
    encodings: set[str] = set()
    encoded = absent = 0
    for (_, _, f), ref in layer.parts.items():
        if f == "weight_scale" and ref.encoded is not None:
            encoded += 1
            encodings.add(ref.encoded.encoding)
    for e, r, f in g.missing:
        if f != "weight_scale":
            continue
        base = layer.parts[(e, r, "weight")].info.name.rsplit(".", 1)[0] + ".weight_scale"
        if base in csf_bases:
            encoded += 1
            encodings.add(csf_bases[base]["__encoding__"])
        else:
            absent += 1
    if encoded:
        d["naming"]["block_scale"] = "weight_scale (CSF streams)"
        d["naming"]["block_scale_encoding"] = "/".join(sorted(encodings))
        d["csf_block_scales"] = encoded
    d["block_scales_missing"] = absent
    t = _scalar_tables(layer, blobs)
    g2, u2 = t["gate.weight_scale_2"], t["up.weight_scale_2"]
    both = g2.usable() & u2.usable()
    differ = both & (g2.values != u2.values)
    ratio = np.where(differ, np.maximum(g2.values, u2.values) / np.where(both, np.minimum(g2.values, u2.values), 1), 1.0)
    worst = int(np.argmax(ratio)) if differ.any() else None
    up_off = both & (u2.values != g2.values)
    d["scale_2"] = {
        "pairs_differ": int(differ.sum()),
        "experts_differ": [int(e) for e in np.flatnonzero(differ)],
        "worst_ratio": float(ratio[worst]) if worst is not None else 1.0,
        "worst_expert": worst,
        # what an engine that keeps the gate's scale does to the up half: up * gate/up, per expert
        "up_factor_max": float((g2.values[up_off] / u2.values[up_off]).max()) if up_off.any() else 1.0,
        "up_factor_min": float((g2.values[up_off] / u2.values[up_off]).min()) if up_off.any() else 1.0,
    }
    for name, roles in (("w13", ("gate", "up")), ("w2", ("down",))):
        s: dict[str, Any] = {}
        for role in roles:
            tab = t[f"{role}.input_scale"]
            s[role] = {k: tab.experts(k) for k in DEFECTS}
        vals = np.concatenate([t[f"{r}.input_scale"].values for r in roles])
        s["spread"] = _spread(vals)
        # per expert: max of its roles' scales, as engines reduce w1/w3 (NaN propagates, absent -> NaN)
        per = np.stack([t[f"{r}.input_scale"].values for r in roles])
        usable = np.stack([t[f"{r}.input_scale"].usable() for r in roles])
        nonfinite = np.stack([np.isin(t[f"{r}.input_scale"].defect, ("nan", "inf")) for r in roles])
        # an expert whose max over its roles is no usable scale (none usable, or a NaN/Inf among them)
        s["experts_unusable"] = [int(e) for e in np.flatnonzero(~usable.any(axis=0) | nonfinite.any(axis=0))]
        s["all_unusable"] = len(s["experts_unusable"]) == layer.dims.experts
        s["values_all_one"] = bool(np.all(per == 1.0))
        d[f"input_scale_{name}"] = s
    d["weight_scale_2_defects"] = {role: {k: t[f"{role}.weight_scale_2"].experts(k) for k in DEFECTS} for role in ROLES}
    return d


@dataclass
class InspectInput:
    src: Source
    label: str  # folder or repo id
    read_scalars: ReadScalars
    stats: Callable[[], dict[str, Any]]  # what the reads cost, after them
    remote: bool = False
    revision: str | None = None


def inspect(inp: InspectInput) -> dict[str, Any]:
    """The full report (engine verdicts included) as a JSON-able dict."""
    from . import __version__
    from .engines import evaluate

    src = inp.src
    csf = csf_streams(src.tensor_file)
    stream_names = frozenset(n for streams in csf.values() for k, n in streams.items() if k != "__encoding__")
    fused = _fused_groups(src)
    scan: ExpertScan = scan_experts(
        src, tolerate_missing=("input_scale", "weight_scale") if csf else ("input_scale",), skip=stream_names
    )
    # read every scalar of every checked NVFP4 group, in one batch
    wanted = [
        ref for g in scan.groups.values() if g.layer is not None for (_, _, f), ref in g.layer.parts.items() if f in SCALARS
    ]
    blobs = inp.read_scalars(wanted) if wanted else {}
    groups = [_group_report(scan.groups[p], blobs, csf) for p in sorted(scan.groups, key=layer_key)]
    for p in sorted(fused, key=layer_key):
        w13 = f"{p}.w13_weight"
        experts = src.headers[src.tensor_file[w13]].tensors[w13].shape[0] if w13 in src.tensor_file else None
        groups.append(
            {
                "prefix": p,
                "layer": layer_label(p),
                "format": "fused",
                "experts": experts,
                "tensors": sorted(fused[p]),
                "problem": None,
            }
        )
    groups.sort(key=lambda g: layer_key(g["prefix"]))
    cfg = config_facts(src.configs)
    global_problems = [str(e) for e in scan.problems if not any(e is g.problem for g in scan.groups.values())]
    # the "already has fused tensors" finding is what a fused group is, not a defect of it
    global_problems = [p for p in global_problems if "already has fused tensors" not in p]
    report: dict[str, Any] = {
        "nvfp4_fuse_version": __version__,
        "source": {
            "path": inp.label,
            "revision": inp.revision,
            "shards": len(src.headers),
            "tensors": len(src.tensor_file),
            "bytes": None if inp.remote else sum(h.file_size for h in src.headers.values()),
        },
        "config": cfg,
        "groups": groups,
        "csf": {
            "streams": len(stream_names),
            "encoded_scales": len(csf),
            "encodings": sorted({s["__encoding__"] for s in csf.values()}),
        },
        "problems": global_problems,
        "scalars_read": len(wanted),
    }
    report["source"]["reads"] = inp.stats()
    report["summary"] = summarize(report)
    report["engines"] = evaluate(report)
    report["exit_code"] = exit_code(report)
    return report


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Totals over the NVFP4 groups: what the engine rules test."""
    nv = [g for g in report["groups"] if g["format"] == "NVFP4" and "scale_2" in g]
    s: dict[str, Any] = {
        "nvfp4_groups": len(nv),
        "mxfp4_groups": sum(g["format"] == "MXFP4" for g in report["groups"]),
        "fused_groups": sum(g["format"] == "fused" for g in report["groups"]),
        "defective_groups": [g["prefix"] for g in report["groups"] if g.get("problem")],
        "scale_2_pairs_differ": sum(g["scale_2"]["pairs_differ"] for g in nv),
        "scale_2_layers": sum(g["scale_2"]["pairs_differ"] > 0 for g in nv),
        "scale_2_worst_ratio": max((g["scale_2"]["worst_ratio"] for g in nv), default=1.0),
        "up_factor_max": max((g["scale_2"]["up_factor_max"] for g in nv), default=1.0),
        "up_factor_min": min((g["scale_2"]["up_factor_min"] for g in nv), default=1.0),
        "block_scale_spellings": sorted({g["naming"]["block_scale"] for g in nv if g["naming"].get("block_scale")}),
        "block_scale_encodings": sorted(
            {g["naming"]["block_scale_encoding"] for g in nv if g["naming"].get("block_scale_encoding")}
        ),
        "block_scales_missing": sum(g.get("block_scales_missing", 0) for g in nv),
        "compressed_tensors": any(g["naming"]["fields"] == "compressed-tensors" for g in nv),
    }
    worst = max(nv, key=lambda g: g["scale_2"]["worst_ratio"], default=None)
    s["scale_2_worst_at"] = (
        {"prefix": worst["prefix"], "expert": worst["scale_2"]["worst_expert"]}
        if worst and worst["scale_2"]["pairs_differ"]
        else None
    )
    for name, roles in (("w13", ("gate", "up")), ("w2", ("down",))):
        for k in DEFECTS:
            s[f"input_{name}_{k}"] = sum(len(g[f"input_scale_{name}"][r][k]) for g in nv for r in roles)
        s[f"input_{name}_experts_unusable"] = sum(len(g[f"input_scale_{name}"]["experts_unusable"]) for g in nv)
        s[f"input_{name}_layers_all_unusable"] = [g["prefix"] for g in nv if g[f"input_scale_{name}"]["all_unusable"]]
        spreads = [g[f"input_scale_{name}"]["spread"] for g in nv if g[f"input_scale_{name}"]["spread"] is not None]
        s[f"input_{name}_spread_max"] = max(spreads, default=None)
    s["input_any_missing"] = s["input_w13_missing"] + s["input_w2_missing"]
    s["input_any_zero"] = s["input_w13_zero"] + s["input_w2_zero"]
    # NaN and Inf survive a max over experts; a zero or negative one does not (unless all are)
    s["input_any_nonfinite"] = sum(s[f"input_{n}_{k}"] for n in ("w13", "w2") for k in ("nan", "inf"))
    s["input_any_negative"] = s["input_w13_negative"] + s["input_w2_negative"]
    s["input_all_one"] = bool(nv) and all(g[f"input_scale_{n}"]["values_all_one"] for g in nv for n in ("w13", "w2"))
    s["weight_scale_2_bad"] = sum(len(v) for g in nv for r in ROLES for k, v in g["weight_scale_2_defects"][r].items())
    return s


def exit_code(report: dict[str, Any], engine: str | None = None) -> int:
    """0 when every engine considered loads the checkpoint as is (or does not apply to it), else 4."""
    rows = [
        r
        for r in report["engines"]
        if engine is None or r["id"] == engine or r["id"].startswith(engine + ":") or r["engine_id"] == engine
    ]
    return EXIT_ENGINE_ISSUES if any(r["verdict"] in ("lossy", "fails") for r in rows) else EXIT_OK


def engine_ids(report: dict[str, Any]) -> list[str]:
    return [r["id"] for r in report["engines"]]


def expert_ranges(experts: list[int]) -> str:
    return _ranges(experts)


# ------------------------------------------------------------------------------------------------
# sources


def local_input(folder: Path, *, trust_root: Path | None = None, label: str | None = None) -> InspectInput:
    from .shard_reader import ShardReader
    from .source import scan_source

    src = scan_source(folder, trust_root=trust_root)
    calls = {"preads": 0}

    def read(refs: list[SourceRef]) -> dict[str, bytes]:
        readers = {f: ShardReader(src.headers[f]) for f in {r.file for r in refs}}
        try:
            out = {r.info.name: readers[r.file].read_small(r.info.name) for r in refs}
        finally:
            for rd in readers.values():
                rd.close()
        calls["preads"] += len(refs)
        return out

    return InspectInput(src, label or str(folder), read, lambda: dict(calls))


def remote_input(repo_id: str, *, revision: str | None = None) -> InspectInput:
    """A Hub repo: shard headers via ``get_safetensors_metadata``, configs by plain GETs, scalars by
    coalesced range requests."""
    from .hub import remote_safetensors_headers
    from .hub.ranges import RemoteRangeReader
    from .safetensors_header import loads_strict_json
    from .source import CONFIG_FILES, source_from_headers

    remote = remote_safetensors_headers(repo_id, revision=revision)
    src = source_from_headers(repo_id, remote.headers, sharded=remote.sharded)
    reader = RemoteRangeReader(repo_id, revision=revision)
    for c in CONFIG_FILES:
        data = reader.get_file(c)
        if data is not None:
            obj = loads_strict_json(data, what=c, file=c)
            if not isinstance(obj, dict):
                raise InputError(f"{c} is not a JSON object", file=c)
            src.configs[c] = obj

    def read(refs: list[SourceRef]) -> dict[str, bytes]:
        return reader.read_tensors([(r.file, r.info.name) for r in refs], remote.headers)

    def stats() -> dict[str, Any]:
        return {
            "header_requests": len(remote.headers) + int(remote.sharded),  # get_safetensors_metadata
            "config_requests": reader.stats.file_requests,
            "range_requests": reader.stats.requests,
            "range_bytes": reader.stats.bytes,
        }

    return InspectInput(src, repo_id, read, stats, remote=True, revision=revision)
