"""Converting straight from a Hub repo: pin it, plan from its headers, fetch only what the output needs.

:func:`hub_plan` pins the revision to a commit, refuses an output folder started from another commit
of the same repo (never mixing two), reads the plan from headers and range requests alone, and hands
back the spec with the :class:`~nvfp4_fuse.source_files.HubSourceFiles` that fetch the source within
``--max-disk`` while ``convert`` writes. :func:`disk_summary` is what ``--dry-run`` prints of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..source import Source
from ..spec import OutputSpec, build_spec, disk_free, human
from .fetch import PinnedRepo, pin_repo
from .ranges import RemoteRangeReader
from .remote_source import HEADER_PROBE, SCALAR_MAX_BYTES, RemoteScalars, hub_source, scalar_spans


def recorded_revision(out: Path) -> tuple[str | None, str | None]:
    """(repo, commit) an output folder's journal or manifest says it was converted from, if any."""
    import json

    from ..convert import PROGRESS_NAME
    from ..manifest import MANIFEST_NAME

    for name, get in (
        (PROGRESS_NAME, lambda d: (d.get("source_repo"), d.get("source_revision"))),
        (MANIFEST_NAME, lambda d: ((d.get("source") or {}).get("source"), (d.get("source") or {}).get("revision"))),
    ):
        p = Path(out) / name
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict):
            repo, rev = get(d)
            if isinstance(rev, str):
                return repo if isinstance(repo, str) else None, rev
    return None, None


def check_same_commit(out: Path, pinned: PinnedRepo) -> None:
    """Refuse to go on in ``out`` when it was started from another commit of the repo."""
    repo, rev = recorded_revision(out)
    if rev is None or rev == pinned.sha or (repo is not None and repo != pinned.repo_id):
        return  # (another repo altogether is told apart by the input fingerprint, as for folders)
    raise InputError(
        f"{pinned.repo_id} changed since this output was started: it was converted from commit {rev[:12]}, "
        f"{pinned.revision} is now {pinned.sha[:12]}; pass --revision {rev} to finish it from the same commit, "
        "or --overwrite to start over from the new one",
        file=str(out),
    )


def remote_source(pinned: PinnedRepo, *, with_scalars: bool = True) -> tuple[Source, RemoteRangeReader, RemoteScalars | None]:
    """The :class:`Source` of a pinned commit from its headers (range requests), the reader they came
    through, and (``with_scalars``) its scalar scales, read now with coalesced range requests."""
    reader = RemoteRangeReader(pinned.repo_id, revision=pinned.sha)
    src = hub_source(pinned, reader)
    scalars = RemoteScalars(src.headers, reader) if with_scalars else None
    if scalars is not None:
        scalars.prefetch()
    return src, reader, scalars


@dataclass
class HubPlan:
    spec: OutputSpec
    pinned: PinnedRepo
    reader: RemoteRangeReader
    files: Any  # HubSourceFiles


def hub_plan(
    repo_id: str,
    out: Path,
    options,
    *,
    revision: str | None = None,
    max_disk: int | None = None,
    overwrite: bool = False,
    with_scalars: bool = True,
    fetchers: int = 1,
    cache_dir: str | None = None,
    **fetch_kw,
) -> HubPlan:
    """Pin ``repo_id``, check ``out`` was not started from another commit (unless ``overwrite``),
    plan from headers (and, ``with_scalars``, the scalar scales by range requests)."""
    from ..source_files import STAGING_NAME, HubSourceFiles

    pinned = pin_repo(repo_id, revision)
    if not overwrite:
        check_same_commit(out, pinned)
    src, reader, scalars = remote_source(pinned, with_scalars=with_scalars)
    spec = build_spec(src, options, with_scalars=with_scalars, scalar_readers=scalars)
    files = HubSourceFiles(pinned, Path(out) / STAGING_NAME, max_disk=max_disk, fetchers=fetchers, cache_dir=cache_dir, **fetch_kw)
    plan, limit = files.plan_for(spec, spec.shards)  # refuses a budget below the minimum
    if max_disk is None:  # the default shrinks to what the disk has beside the output, down to the minimum
        room = disk_free(Path(out)) - spec.output_bytes_estimate()
        if plan.minimum <= room < limit:
            files.max_disk = limit = room
    files.reserve_bytes = limit
    return HubPlan(spec, pinned, reader, files)


def disk_summary(hp: HubPlan, *, bandwidth: float | None = None) -> dict[str, Any]:
    """The disk and requests of converting every shard (what --dry-run prints), and the time at
    ``bandwidth`` bytes/s if given."""
    plan, limit = hp.files.plan_for(hp.spec, hp.spec.shards)
    out_total = hp.spec.output_bytes_estimate()
    source_total = sum(f.size for f in hp.pinned.files.values())
    headers = hp.spec.source.headers
    header_requests = sum(1 + (h.data_start > HEADER_PROBE) for h in headers.values())
    scalar_requests = 0
    for h in headers.values():
        small = [(h.data_start + t.begin, h.data_start + t.end) for t in h.tensors.values() if t.nbytes <= SCALAR_MAX_BYTES]
        scalar_requests += len(scalar_spans(small)) if small else 0
    fetched = [it for it in plan.items if it.kind == "file"]
    d = {
        "revision": hp.pinned.sha,
        "max_disk": limit,
        "min_max_disk": plan.minimum,
        "output_bytes": out_total,
        "source_bytes": source_total,
        "working_set_peak": plan.peak(limit),
        "disk_peak": plan.disk_peak(limit) + out_total - plan.total_out,  # + the configs, index, sidecars
        "disk_peak_unbounded": plan.disk_peak(None) + out_total - plan.total_out,
        "disk_before": out_total + source_total,  # the whole snapshot in the HF cache, then the output
        "reused_from_hf_cache": sorted(hp.files.local),
        "requests": {
            "pin": 2,
            "headers": header_requests,
            "scalar_ranges": scalar_requests,
            "small_files": sum(1 for c in ("model.safetensors.index.json", "config.json", "hf_quant_config.json") if c in hp.pinned.files),
            "downloads": len(fetched),
        },
        "download_bytes": sum(it.size for it in fetched),
    }
    if bandwidth:
        d["bandwidth"] = bandwidth
        d["seconds_at_bandwidth"] = d["download_bytes"] / bandwidth
    return d


def print_disk_summary(d: dict[str, Any], echo) -> None:
    r = d["requests"]
    echo(f"source: commit {d['revision'][:12]}, {human(d['source_bytes'])}; output {human(d['output_bytes'])}")
    echo(
        f"disk: peak {human(d['disk_peak'])} (working set {human(d['working_set_peak'])} under --max-disk "
        f"{human(d['max_disk'])}, minimum {human(d['min_max_disk'])}); without a bound {human(d['disk_peak_unbounded'])}"
    )
    echo(
        f"requests: {r['pin']} to pin the commit, {r['headers']} for headers, {r['scalar_ranges']} for scalar scales, "
        f"{r['small_files']} small files, {r['downloads']} downloads ({human(d['download_bytes'])})"
        + (f"; {len(d['reused_from_hf_cache'])} file(s) read from the HF cache" if d["reused_from_hf_cache"] else "")
    )


__all__ = ["HubPlan", "check_same_commit", "disk_summary", "hub_plan", "print_disk_summary", "recorded_revision", "remote_source"]
