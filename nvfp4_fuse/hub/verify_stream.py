"""``verify <repo id> <converted>`` with bounded disk: the source fetched as the checks need it.

:class:`HubVerifySource` pins the repo to the commit the conversion recorded (refusing a repo that
moved since, naming both commits), plans from the Hub's headers and scalar scales (as ``convert``
does, :func:`~nvfp4_fuse.hub.stream.remote_source`), and fetches the source files, within
``--max-disk``, into a temporary folder it creates and removes: ``nvfp4-fuse-verify-*`` under
``--work-dir``, by default beside the converted folder (the disk that held the conversion), or the
system's temporary folder when that cannot be written. ``verify`` then checks the output shards one at
a time in file order (:mod:`nvfp4_fuse.verify`), each once its source files are there, and each
source file is deleted once no shard left to check reads it. Blobs the user's HF cache holds at the
commit are read in place, never written or deleted.

A run holds an ``flock`` on its work folder while it lives, which the kernel drops when the process
ends however it ends; a folder left by a run that was killed (SIGKILL, the OOM killer, a lost
machine: no cleanup ran) is held by no one, and the next verify with the same work folder base
removes it before it plans (:func:`remove_stale_work_folders`).
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..folder_lock import folder_lock
from ..spec import disk_free, human
from .fetch import PinnedRepo, pin_repo

WORK_PREFIX = "nvfp4-fuse-verify-"
# A work folder no process holds is stale once it is this old: a run locks its folder right after
# making it, so a younger unlocked one may be another run's, between the two.
STALE_AFTER_S = 60.0


def remove_stale_work_folders(base: Path, *, older_than: float = STALE_AFTER_S) -> list[tuple[Path, int]]:
    """Remove the work folders in ``base`` that earlier verify runs left when they were killed: held by
    no process and last changed over ``older_than`` seconds ago. -> each folder removed and the bytes
    it held. A folder another run holds is left alone."""
    removed = []
    try:
        entries = list(Path(base).glob("." + WORK_PREFIX + "*"))
    except OSError:
        return removed
    for folder in entries:
        try:
            if not folder.is_dir() or folder.is_symlink() or time.time() - folder.stat().st_mtime < older_than:
                continue
            with folder_lock(folder, "removal of a stale verify work folder"):
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
                shutil.rmtree(folder, ignore_errors=True)
        except (InputError, OSError):  # a live run holds it, or it went meanwhile
            continue
        removed.append((folder, size))
    return removed


def pin_recorded(repo_id: str, revision: str | None, recorded: dict[str, Any], converted: Path) -> PinnedRepo:
    """Pin ``repo_id`` at ``revision`` (default ``main``); refuse it when the manifest's ``recorded``
    source is this repo at another commit (the repo moved since the conversion, or another commit was
    asked for)."""
    pinned = pin_repo(repo_id, revision)
    rec_repo, rec_rev = recorded.get("source"), recorded.get("revision")
    if isinstance(rec_rev, str) and rec_repo == repo_id and rec_rev != pinned.sha:
        raise InputError(
            f"{repo_id} is not at the commit this output was converted from: the manifest records commit {rec_rev[:12]}, "
            f"{pinned.revision} is now {pinned.sha[:12]}; pass --revision {rec_rev} to verify against the commit it was converted from",
            file=str(converted),
        )
    return pinned


def work_base(converted: Path, work_dir: Path | None) -> Path:
    """Where the run's temporary folder goes: ``work_dir`` if given (it must exist and be writable),
    else beside the converted folder when that can be written (and is not inside the HF cache), else
    the system's temporary folder (``$TMPDIR``)."""
    from huggingface_hub import constants

    from ..writable import require_writable, writable_problem

    if work_dir is not None:
        if not Path(work_dir).is_dir():
            raise InputError("--work-dir does not exist", file=str(work_dir))
        require_writable(Path(work_dir), "--work-dir folder")
        return Path(work_dir)
    parent = Path(converted).resolve().parent
    cache = Path(constants.HF_HUB_CACHE).resolve()
    if writable_problem(parent) is None and cache != parent and cache not in parent.parents:
        return parent
    return Path(tempfile.gettempdir())


class HubVerifySource:
    """A Hub commit as ``verify``'s source (module doc): :meth:`source` pins and plans, :meth:`start`
    makes the work folder and starts the downloads, :meth:`close` stops them and removes the folder
    (whatever happened; also as a context manager)."""

    def __init__(
        self,
        repo_id: str,
        converted: Path,
        *,
        revision: str | None = None,
        max_disk: int | None = None,
        work_dir: Path | None = None,
        cache_dir: str | None = None,
        **fetch_kw: Any,
    ):
        self.repo_id, self.converted, self.revision = repo_id, Path(converted), revision
        self.max_disk, self.cache_dir, self.fetch_kw = max_disk, cache_dir, fetch_kw
        self.base = work_base(self.converted, work_dir)
        self.pinned: PinnedRepo | None = None
        self.files: Any = None  # HubSourceFiles, once planned
        self.folder: Path | None = None  # the run's temporary folder, once made
        self.limit = 0
        self.on_start: Any = None  # on_start(folder, limit): the work folder is made and fetching begins
        self.removed: list[tuple[Path, int]] = []  # stale work folders removed at the start
        self._held = ExitStack()  # the lock on the work folder

    def source(self, manifest: Any) -> tuple[Any, Any]:
        """(the :class:`~nvfp4_fuse.source.Source` of the pinned commit, its scalar readers)."""
        from .stream import remote_source

        self.pinned = pin_recorded(self.repo_id, self.revision, manifest.source, self.converted)
        src, _, scalars = remote_source(self.pinned)
        return src, scalars

    def plan(self, spec: Any, sidecars: list[str], *, decode: bool, staging: Path, todo: list | None = None) -> Any:
        """The disk plan of checking the shards ``todo`` of ``spec`` (default: every one) and
        ``sidecars``, fetching into ``staging``; refuses a budget below its minimum, or a work folder's
        disk with less free than that. Sets :attr:`limit`."""
        from ..disk_budget import check_steps
        from ..source_files import HubSourceFiles

        assert self.pinned is not None
        steps = functools.partial(check_steps, sidecars=sidecars, decode=decode)
        self.files = HubSourceFiles(
            self.pinned, staging, steps=steps, max_disk=self.max_disk, cache_dir=self.cache_dir, **self.fetch_kw
        )  # fmt: skip
        plan, limit = self.files.plan_for(spec, spec.shards if todo is None else todo)  # refuses a budget below the minimum
        free = disk_free(self.base)
        if free < plan.minimum:
            raise InputError(
                f"verify needs at least {human(plan.minimum)} of working space for {self.repo_id}'s source files "
                f"(those the checks of one output shard read) and {self.base} has {human(free)} free; "
                "pass --work-dir on a disk with room"
            )
        if self.max_disk is None and free < limit:  # the default shrinks to the free disk, down to the minimum
            self.files.max_disk = limit = free
        self.limit = limit
        return plan

    def dry_run(self, *, decode: bool, run: dict[str, Any] | None = None) -> dict[str, Any]:
        """What ``verify --dry-run`` prints: the commit, the shards an earlier run of the same options
        ``run`` (verify_journal.run_options) left checked, the downloads of the others, the working-set
        peak under the budget, the minimum, where the work folder would go. Fetches nothing but headers
        and scalars."""
        from ..verify import checked_plan
        from ..verify_checks import checked_sidecars
        from ..verify_journal import VerifyJournal

        manifest, _, spec = checked_plan(Path(self.repo_id), self.converted, hub=self)
        assert self.pinned is not None
        _, kept = VerifyJournal.resume(self.converted, self.pinned.sha, run, [s.name for s in spec.shards])
        todo = [s for s in spec.shards if s.name not in kept]
        plan = self.plan(spec, checked_sidecars(spec, manifest.model_card), decode=decode, staging=self.base / (WORK_PREFIX + "dry-run"), todo=todo)
        assert self.pinned is not None
        fetched = [it for it in plan.items if it.kind == "file"]
        return {
            "revision": self.pinned.sha,
            "shards": len(spec.shards),
            "resumed_shards": sorted(kept),
            "work_dir": str(self.base),
            "max_disk": self.limit,
            "min_max_disk": plan.minimum,
            "working_set_peak": plan.peak(self.limit),
            "working_set_unbounded": plan.peak(None),
            "source_bytes": sum(f.size for f in self.pinned.files.values()),
            "downloads": [it.name for it in fetched],
            "download_bytes": sum(it.size for it in fetched),
            "reused_from_hf_cache": sorted(self.files.local),
        }

    def start(self, spec: Any, sidecars: list[str], *, decode: bool, todo: list | None = None) -> Any:
        """Make the work folder, plan the checks of the shards ``todo`` (default: every one), start
        fetching; -> the source files (source_files.py). A refused plan leaves the folder to
        :meth:`close`, which removes it."""
        self.removed = remove_stale_work_folders(self.base)  # before the free disk is counted
        self.folder = Path(tempfile.mkdtemp(prefix="." + WORK_PREFIX, dir=self.base))
        self._held.enter_context(folder_lock(self.folder, "verify"))  # while this run lives; the kernel drops it at exit
        todo = spec.shards if todo is None else todo
        self.plan(spec, sidecars, decode=decode, staging=self.folder, todo=todo)
        if self.on_start is not None:
            self.on_start(self.folder, self.limit)
        self.files.start(spec, todo)
        return self.files

    def close(self) -> None:
        if self.files is not None:
            self.files.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        self._held.close()

    def __enter__(self) -> HubVerifySource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def print_dry_run(d: dict[str, Any], echo) -> None:
    echo(f"source: commit {d['revision'][:12]}, {human(d['source_bytes'])}")
    if d["resumed_shards"]:
        n, k = d["shards"], len(d["resumed_shards"])
        echo(f"resumes: {k} of {n} output shard(s) passed in an earlier run and are unchanged; planned: the other {n - k}")
    echo(
        f"downloads: {len(d['downloads'])} file(s), {human(d['download_bytes'])}, one at a time in the order the shards' checks need them"
        + (f"; {len(d['reused_from_hf_cache'])} file(s) read from the HF cache" if d["reused_from_hf_cache"] else "")
    )
    echo(
        f"disk: working set peak {human(d['working_set_peak'])} under --max-disk {human(d['max_disk'])} (minimum "
        f"{human(d['min_max_disk'])}; without a bound {human(d['working_set_unbounded'])}), in a temporary folder under {d['work_dir']}"
    )


__all__ = ["HubVerifySource", "WORK_PREFIX", "pin_recorded", "print_dry_run", "work_base"]
