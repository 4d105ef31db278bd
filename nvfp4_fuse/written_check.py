"""Each output shard checked against its source as soon as it is written (``convert --push-to``), with
the checks ``verify`` makes (:func:`nvfp4_fuse.verify.check_shards`: header, copied tensors, scalars,
packed values, block scales and their bound, the shard's sha256, and the end-to-end decode when a GPU
is there), while the source bytes it was made from are still on disk; and the per-shard results
folded into one summary for the model card.

The summary depends only on the shards' results, never on the order they were checked in or on how
many runs it took, so a resumed run's card is the same bytes as an uninterrupted one's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def gpu_decode() -> str | None:
    """``"cuda"`` where a CUDA GPU may be used (an NVIDIA driver's device node, torch installed), else
    None (the CPU decode is the slow torch reference: not run as shards are written). Torch is not
    imported here: the GPU decode process finds out whether CUDA works, and :func:`shard_check` checks
    without the decode if it does not."""
    import importlib.util

    if not Path("/dev/nvidiactl").exists() or importlib.util.find_spec("torch") is None:
        return None
    return "cuda"


def shard_check(spec: Any, files: Any = None, *, decode: str | None = None, workers: int = 0) -> Callable[[Path, str, str], dict]:
    """``check(out, name, sha256)``: check output shard ``name`` in ``out`` against the source of
    ``spec`` (read through ``files``, source_files.py, when given) and hold its bytes to ``sha256``;
    -> what it found (:func:`shard_summary`). Raises ``CheckFailed`` at the first failed check."""
    from .source_files import local_headers
    from .verify import check_shards

    spec = local_headers(spec, files)
    workers = workers or max(1, min(4, (os.cpu_count() or 2) // 2))
    decoder = None
    if decode == "cuda":  # started now: torch's import and the kernel's load overlap the first shards' writing
        from .decode_process import shared

        decoder = shared("cuda")

    def check(out: Path, name: str, sha256: str) -> dict:
        how = decode if decoder is None or decoder.wait_ready() else None  # no usable GPU: checked without the decode
        res = check_shards(spec, out, [name], sha256={name: sha256}, decode=how, workers=workers, decoder=decoder)
        return shard_summary(res)

    return check


def shard_summary(res: Any) -> dict:
    """What one shard's check found, as plain data for the push journal."""
    return {
        "device": res.device,
        "checks": list(res.checks),
        "copied_tensors": res.copied_tensors,
        "layers": {
            l.prefix: {"rescaled": l.rescaled, "max_rel": l.max_rel, "decoded": l.decoded, "max_abs": l.max_abs}
            for l in res.layers
            if l.checked or l.decoded
        },
    }


def card_summary(per_shard: Mapping[str, dict], spec_layers: Mapping[str, Any] | None = None) -> dict | None:
    """The verification section of the model card, from every shard's :func:`shard_summary`: the
    checks run, and per layer the largest rescale error and (with the decode) the parts decoded and
    the largest difference. None when no shard was checked."""
    if not per_shard:
        return None
    checks: list[str] = []
    layers: dict[str, dict] = {}
    copied = 0
    devices = set()
    for name in sorted(per_shard):
        s = per_shard[name] or {}
        devices.add(s.get("device", "cpu"))
        copied += int(s.get("copied_tensors", 0))
        for c in s.get("checks", []):
            if c not in checks:
                checks.append(c)
        for prefix, l in (s.get("layers") or {}).items():
            acc = layers.setdefault(prefix, {"max_rel": 0.0, "decoded": 0, "max_abs": None})
            acc["max_rel"] = max(acc["max_rel"], float(l.get("max_rel") or 0.0))
            acc["decoded"] += int(l.get("decoded") or 0)
            if l.get("max_abs") is not None:
                acc["max_abs"] = max(acc["max_abs"] or 0.0, float(l["max_abs"]))
    rows = []
    for prefix in sorted(layers, key=_layer_key):
        row = {"layer": prefix, "max rescale error": layers[prefix]["max_rel"]}
        if layers[prefix]["decoded"]:
            row |= {"parts decoded": layers[prefix]["decoded"], "max abs diff": layers[prefix]["max_abs"]}
        rows.append(row)
    return {
        "checked": "every output shard, against its source, as it was written and before it was uploaded (nvfp4-fuse verify's checks)",
        "shards_checked": len(per_shard),
        "copied_tensors_identical": copied,
        "device": "+".join(sorted(devices)),
        "checks": "; ".join(checks),
        "layers": rows,
    }


def _layer_key(prefix: str) -> tuple:
    import re

    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", prefix) if t)
