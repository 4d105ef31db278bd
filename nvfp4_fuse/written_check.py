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
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def gpu_decode() -> str | None:
    """``"cuda"`` where a CUDA GPU is visible, else None (the CPU decode is the slow torch reference:
    not run as shards are written). Torch is imported only on a machine with an NVIDIA driver."""
    if not Path("/dev/nvidiactl").exists():
        return None
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else None


def shard_check(spec: Any, files: Any = None, *, decode: str | None = None, workers: int = 0) -> Callable[[Path, str, str], dict]:
    """``check(out, name, sha256)``: check output shard ``name`` in ``out`` against the source of
    ``spec`` (read through ``files``, source_files.py, when given) and hold its bytes to ``sha256``;
    -> what it found (:func:`shard_summary`). Raises ``CheckFailed`` at the first failed check."""
    from .source_files import local_headers
    from .verify import check_shards

    spec = local_headers(spec, files)
    workers = workers or max(1, min(4, (os.cpu_count() or 2) // 2))
    ready: threading.Event | None = None
    if decode == "cuda":  # load the kernels once, beside the first shards' writing
        from concurrent.futures import Future

        from .decode_lanes import warm_kernels

        ready, plan = threading.Event(), Future()
        plan.set_result(spec)
        threading.Thread(target=warm_kernels, args=(plan, ready), daemon=True).start()

    def check(out: Path, name: str, sha256: str) -> dict:
        res = check_shards(spec, out, [name], sha256={name: sha256}, decode=decode, workers=workers, kernels_ready=ready)
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
