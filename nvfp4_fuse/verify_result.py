"""What ``verify`` reports: the checks that ran, in words, and the result objects, per layer and whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHECK_STRUCTURE = "structure: index, shard headers and metadata, configs and sidecars as convert writes them"
CHECK_HASHES = "manifest: every file's size and sha256 (each file read once)"
CHECK_SIZES = "manifest: every file's size (sha256 not computed: --skip-hashes)"
CHECK_COPIED = "copied tensors (MXFP4 expert groups included): byte-identical to the source"
CHECK_VALUES = "packed values: byte-identical to the source's after undoing the row order"
CHECK_SCALES = "block scales: the source's after undoing the layout, or for rescaled halves their RNE rescale"
CHECK_BOUND = "rescale bound: every block of every checked expert, from the scales, exactly"
CHECK_GLOBALS = "per-layer scale_2 and input-scale tensors: as the source's scalars give them"
CHECK_SCALARS = (
    "per-expert weight_scale_2 and input_scale: the bytes of the source scalar the rules pick (gate/up the larger; "
    "a missing or zero input scale the layer's largest of its projection)"
)
CHECK_DECODED = "compressed block scales: decoded from the source's streams (every check of vLLM's decoder), then held to the above as plain E4M3"


@dataclass
class LayerResult:
    prefix: str
    experts: int
    checked: int = 0
    rescaled: int = 0
    max_rel: float = 0.0  # largest relative error of a value, over every block of the checked experts
    decoded: int = 0  # experts dequantized end to end
    max_abs: float | None = None  # largest |difference| of a dequantized value (end to end only)
    sampled: list[int] | None = None  # the experts checked, when --sample drew some

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VerifyResult:
    source: str
    converted: str
    target: str
    device: str
    layers: list[LayerResult] = field(default_factory=list)
    files_hashed: int = 0
    copied_tensors: int = 0
    decoded_block_scales: int = 0  # compressed source block scales outside the expert groups, checked decoded
    copied_groups: list[dict[str, Any]] = field(default_factory=list)  # expert groups left as they were
    checks: list[str] = field(default_factory=list)
    peak_read_ahead: int = 0  # most output bytes held at once by the pass
    seconds: float = 0.0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["layers"] = [l.to_json() for l in self.layers]
        d["ok"] = True
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VerifyResult:
        """The result :meth:`to_json` wrote (a resumed verify's earlier shards, verify_journal.py)."""
        d = {k: v for k, v in d.items() if k != "ok"}
        layers = [LayerResult(**l) for l in d.pop("layers", [])]
        return cls(**d, layers=layers)



def merge_results(parts: list[VerifyResult]) -> VerifyResult:
    """One result of checks run over several calls, each on some of a conversion's output shards
    (``check_shards`` decodes each expert part in exactly one of them): per layer the experts checked
    and decoded add up, the largest errors are the largest of the parts; the counters add up."""
    first = parts[0]
    out = VerifyResult(first.source, first.converted, first.target, first.device, checks=list(first.checks))
    layers: dict[str, LayerResult] = {}
    for part in parts:
        out.files_hashed += part.files_hashed
        out.copied_tensors += part.copied_tensors
        out.decoded_block_scales += part.decoded_block_scales
        out.peak_read_ahead = max(out.peak_read_ahead, part.peak_read_ahead)
        for lr in part.layers:
            acc = layers.setdefault(lr.prefix, LayerResult(lr.prefix, lr.experts, rescaled=lr.rescaled))
            acc.checked += lr.checked
            acc.max_rel = max(acc.max_rel, lr.max_rel)
            acc.decoded += lr.decoded
            if lr.max_abs is not None:
                acc.max_abs = lr.max_abs if acc.max_abs is None else max(acc.max_abs, lr.max_abs)
    out.layers = list(layers.values())
    return out
