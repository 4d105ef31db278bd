"""Where a conversion's source bytes come from: a local folder, or a Hub commit fetched as needed.

The converter asks for a source file's local path when it first reads it (:meth:`path`, which waits
until the file is entirely there and checked) and says when it will not read it again
(:meth:`done`); it brackets each output shard it writes with :meth:`begin_shard` / :meth:`end_shard`
(the shard is then safe: renamed into place and journaled). It knows nothing else about the source.

- :class:`LocalSourceFiles`: a folder; every call is immediate and frees nothing.
- :class:`HubSourceFiles`: a pinned Hub commit. A background fetcher downloads the files in the order
  the output needs them (:mod:`.disk_budget`), running ahead of the converter as far as the budget
  lets it, one file at a time by default (on one link the file needed next then arrives first, and
  the conversion left after the last byte is the least), into the output folder's hidden
  ``.nvfp4-fuse-source/`` (resumable ``.incomplete`` files until their hash matches), within
  ``--max-disk``; a file the user's HF cache already holds at that commit is read from there, never
  written or deleted. :meth:`done` deletes the run's own copy. On success the folder is removed; after
  a failure it keeps what arrived, and the same command resumes from it.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from .disk_budget import BudgetClosed, DiskPlan, OrderedBudget, check_budget, default_budget, plan_disk
from .errors import InputError
from .spec import OutputSpec, OutShard

log = logging.getLogger("nvfp4_fuse.hub")

STAGING_NAME = ".nvfp4-fuse-source"  # inside the output folder: the run's downloads


class SourceFiles(Protocol):
    """What the converter asks of its source (module doc)."""

    ordered: bool  # shards must be written in file order
    remote: bool
    reserve_bytes: int  # disk to keep free for the working set besides the output

    def start(self, spec: OutputSpec, todo: list[OutShard]) -> None: ...
    def path(self, rel: str) -> Path: ...
    def done(self, rel: str) -> None: ...
    def begin_shard(self, name: str) -> None: ...
    def end_shard(self, name: str) -> None: ...
    def journal(self) -> dict: ...
    def close(self) -> None: ...
    def finish(self) -> None: ...


class LocalSourceFiles:
    """A local checkpoint folder: paths are there already, nothing is freed."""

    ordered = False  # the converter may write shards in any order
    remote = False
    reserve_bytes = 0

    def __init__(self, root: Path):
        self.root = Path(root)

    def start(self, spec: OutputSpec, todo: list[OutShard]) -> None:
        pass

    def path(self, rel: str) -> Path:
        return self.root / rel

    def done(self, rel: str) -> None:
        pass

    def begin_shard(self, name: str) -> None:
        pass

    def end_shard(self, name: str) -> None:
        pass

    def journal(self) -> dict:
        return {}

    def close(self) -> None:
        pass

    def finish(self) -> None:
        pass


class HubSourceFiles:
    """A pinned Hub commit, fetched into ``out/.nvfp4-fuse-source`` as the output needs it (module doc).

    ``max_disk`` bounds the working set (:mod:`.disk_budget`); ``None`` takes the default (twice the
    minimum). ``fetchers`` files download at once (1: in order, each with the whole link). ``cache_dir`` is the HF cache to reuse blobs from
    (default: the user's).
    """

    ordered = True  # shards are written in file order, so downloads can run ahead in that order
    remote = True

    def __init__(
        self,
        pinned,
        out: Path,
        *,
        max_disk: int | None = None,
        fetchers: int = 1,
        cache_dir: str | None = None,
        retries: int | None = None,
        backoff: float = 1.0,
        timeout: float | None = None,
    ):
        from .hub import fetch

        self.pinned = pinned
        self.staging = Path(out) / STAGING_NAME
        self.max_disk = max_disk
        self.fetchers = max(1, fetchers)
        self.cache_dir = cache_dir
        self.retries = fetch.DEFAULT_RETRIES if retries is None else retries
        self.backoff = backoff
        self.timeout = fetch.DEFAULT_TIMEOUT_S if timeout is None else timeout
        self.stats = fetch.FetchStats()
        self.plan: DiskPlan | None = None
        self.budget: OrderedBudget | None = None
        self.local: dict[str, Path] = {}  # files read from the user's HF cache
        self._ready: dict[str, threading.Event] = {}
        self._failed: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.reserve_bytes = 0

    # -- planning -----------------------------------------------------------------------------
    def plan_for(self, spec: OutputSpec, todo: list[OutShard]) -> tuple[DiskPlan, int]:
        """The disk plan of writing ``todo`` and the budget it runs under (refused if too small)."""
        from .hub.fetch import cached_blob

        sizes = {p: f.size for p, f in self.pinned.files.items()}
        needed = {f for s in todo for f in _files(spec, s)} | set(spec.source.sidecars) - set(spec.configs())
        self.local = {}
        for f in sorted(needed):
            if f in sizes:
                p = cached_blob(self.pinned, f, self.cache_dir)
                if p is not None:
                    self.local[f] = p
        plan = plan_disk(spec, todo, sizes, local=set(self.local))
        limit = self.max_disk if self.max_disk is not None else default_budget(plan)
        check_budget(plan, limit)
        return plan, limit

    def start(self, spec: OutputSpec, todo: list[OutShard]) -> None:
        """Plan, drop what an earlier run fetched that is no longer needed, start the fetcher."""
        self.plan, limit = self.plan_for(spec, todo)
        self.budget = OrderedBudget(limit)
        wanted = {it.name for it in self.plan.items if it.kind == "file"}
        self._ready = {f: threading.Event() for f in wanted}
        for f in self.local:
            self._ready[f] = threading.Event()
            self._ready[f].set()
        self._tidy(wanted)
        self._pool = ThreadPoolExecutor(self.fetchers, thread_name_prefix="nvfp4-fetch")
        self._thread = threading.Thread(target=self._fetch_all, name="nvfp4-fetcher", daemon=True)
        self._thread.start()

    def _tidy(self, wanted: set[str]) -> None:
        """Keep an earlier run's downloads (whole or partial) that the plan's first reservations
        cover; delete the rest, so the working set is within the budget from the first moment."""
        from .hub.fetch import INCOMPLETE_SUFFIX

        if not self.staging.is_dir():
            return
        assert self.plan is not None and self.budget is not None
        keep: set[str] = set()
        total = 0
        for it in self.plan.items:  # the prefix of reservations that fits, as the run will make them
            total += it.size
            if total > self.budget.limit:
                break
            if it.kind == "file":
                keep.add(it.name)
        for p in sorted(self.staging.rglob("*")):
            if p.is_dir():
                continue
            rel = p.relative_to(self.staging).as_posix()
            base = rel[: -len(INCOMPLETE_SUFFIX)] if rel.endswith(INCOMPLETE_SUFFIX) else rel
            if base not in keep or base not in wanted:
                p.unlink()

    # -- the fetcher --------------------------------------------------------------------------
    def _fetch_all(self) -> None:
        assert self.plan is not None and self.budget is not None and self._pool is not None
        try:
            for i, it in enumerate(self.plan.items):
                if it.kind != "file":
                    continue
                self.budget.acquire(i, it.size)
                self._pool.submit(self._fetch_one, it.name)
                # the ticket of an output shard is taken by the converter (begin_shard)
        except BudgetClosed:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on a file
            self._fail(e)

    def _fetch_one(self, rel: str) -> None:
        from .hub.fetch import fetch_file

        if self._stop.is_set():
            return
        try:
            fetch_file(
                self.pinned,
                rel,
                self.staging / rel,
                retries=self.retries,
                backoff=self.backoff,
                timeout=self.timeout,
                stats=self.stats,
                stop=self._stop,
            )
            self._ready[rel].set()
        except BaseException as e:  # noqa: BLE001
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            if self._failed is None and not self._stop.is_set():
                self._failed = e
        self._stop.set()
        if self.budget is not None:
            self.budget.close()

    # -- what the converter calls -------------------------------------------------------------
    def path(self, rel: str) -> Path:
        if rel in self.local:
            return self.local[rel]
        ev = self._ready.get(rel)
        if ev is None:
            raise AssertionError(f"{rel} is read but was not planned")
        while not ev.wait(0.2):
            if self._failed is not None:
                raise self._failed
            if self._stop.is_set():
                raise InterruptedError("the source fetcher stopped")
        return self.staging / rel

    def done(self, rel: str) -> None:
        if rel in self.local or self.plan is None or self.budget is None or rel not in self._ready:
            return  # read in place, or never fetched (a sidecar the output does not copy)
        (self.staging / rel).unlink(missing_ok=True)
        self.budget.release(self.plan.sizes[rel])

    def begin_shard(self, name: str) -> None:
        assert self.plan is not None and self.budget is not None
        try:
            self.budget.acquire(self.plan.ticket("out", name), self.plan.sizes[name])
        except BudgetClosed:
            if self._failed is not None:
                raise self._failed from None
            raise InterruptedError("the source fetcher stopped") from None

    def end_shard(self, name: str) -> None:
        assert self.plan is not None and self.budget is not None
        self.budget.release(self.plan.sizes[name])

    def journal(self) -> dict:
        """What the progress journal records: the commit, and the oid of every source file."""
        return {
            "source_repo": self.pinned.repo_id,
            "source_revision": self.pinned.sha,
            "source_oids": {p: f.oid for p, f in sorted(self.pinned.files.items())},
        }

    def owned_bytes(self) -> int:
        """Bytes of the run's own downloads on disk now (complete and arriving)."""
        n = 0
        for root, _, names in os.walk(self.staging):
            for name in names:
                try:
                    n += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    pass
        return n

    def close(self) -> None:
        """Stop fetching (partial downloads stay, to resume from)."""
        self._stop.set()
        if self.budget is not None:
            self.budget.close()
        if self._thread is not None:
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def finish(self) -> None:
        """After a complete conversion: stop and remove the run's download folder."""
        self.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def _files(spec: OutputSpec, shard: OutShard) -> list[str]:
    from .disk_budget import shard_source_files

    return shard_source_files(spec, shard)


__all__ = ["HubSourceFiles", "InputError", "LocalSourceFiles", "STAGING_NAME", "SourceFiles"]
