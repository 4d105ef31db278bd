"""Where a conversion's source bytes come from: a local folder, or a Hub commit fetched as needed.

The converter asks for a source file's local path when it first reads it (:meth:`path`, which waits
until the file is entirely there and checked) and says when it will not read it again
(:meth:`done`); it brackets each output shard it writes with :meth:`begin_shard` / :meth:`end_shard`
(the shard is then safe: renamed into place and journaled). It knows nothing else about the source.

- :class:`LocalSourceFiles`: a folder; every call is immediate and frees nothing.
- :class:`HubSourceFiles`: a pinned Hub commit. A background fetcher downloads the files in the order
  the steps need them (:mod:`.disk_budget`: ``convert``'s output shards and sidecars, or the shards
  ``verify`` checks), running ahead of the reader as far as the budget lets it, one file at a time
  by default (on one link the file needed next then arrives first, and the work left after the last
  byte is the least), into a folder the run owns (``convert``: the output folder's hidden
  ``.nvfp4-fuse-source/``; ``verify``: a temporary folder), as resumable ``.incomplete`` files until
  their hash matches, within ``--max-disk``; a file the user's HF cache already holds at that commit
  is read from there, never written or deleted. :meth:`done` deletes the run's own copy.
  :meth:`finish` removes the folder; after a failure ``convert`` keeps what arrived, and the same
  command resumes from it.

``verify`` reads the source's shard headers through :func:`local_headers`, which gives each header
with the path the source files have the file at (waiting for its download).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from .disk_budget import BudgetClosed, DiskPlan, OrderedBudget, Steps, check_budget, convert_steps, default_budget, plan_steps
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


class SourceUsers:
    """How many output shards, of those still to write or check, read each source file: built from each
    shard's files; :meth:`end` (a shard done) returns the files no shard left reads, in its order."""

    def __init__(self, needs: Iterable[list[str]]):
        self._left: dict[str, int] = {}
        for files in needs:
            for f in files:
                self._left[f] = self._left.get(f, 0) + 1

    def end(self, files: list[str]) -> list[str]:
        freed = []
        for f in files:
            self._left[f] -= 1
            if self._left[f] == 0:
                freed.append(f)
        return freed


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
    """A pinned Hub commit, fetched into ``staging`` (a folder the run owns) as the steps need it
    (module doc).

    ``steps(spec, todo)`` gives the steps and the outputs they write (default: ``convert``'s,
    :func:`~nvfp4_fuse.disk_budget.convert_steps`). ``max_disk`` bounds the working set
    (:mod:`.disk_budget`); ``None`` takes the default (twice the minimum). ``fetchers`` files download
    at once (1: in order, each with the whole link). ``cache_dir`` is the HF cache to reuse blobs from
    (default: the user's).
    """

    ordered = True  # shards are written in file order, so downloads can run ahead in that order
    remote = True

    def __init__(
        self,
        pinned,
        staging: Path,
        *,
        steps: Callable[[OutputSpec, list[OutShard]], tuple[Steps, dict[str, int]]] = convert_steps,
        max_disk: int | None = None,
        fetchers: int = 1,
        cache_dir: str | None = None,
        retries: int | None = None,
        backoff: float = 1.0,
        timeout: float | None = None,
    ):
        from .hub import fetch

        self.pinned = pinned
        self.staging = Path(staging)
        self.steps = steps
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
        self.download_bytes: int | None = None  # what this run has to download, once started (progress)

    # -- planning -----------------------------------------------------------------------------
    def plan_for(self, spec: OutputSpec, todo: list[OutShard]) -> tuple[DiskPlan, int]:
        """The disk plan of writing ``todo`` and the budget it runs under (refused if too small)."""
        from .hub.fetch import cached_blob

        sizes = {p: f.size for p, f in self.pinned.files.items()}
        steps, out_sizes = self.steps(spec, todo)
        needed = {f for _, files in steps for f in files}
        self.local = {}
        for f in sorted(needed):
            if f in sizes:
                p = cached_blob(self.pinned, f, self.cache_dir)
                if p is not None:
                    self.local[f] = p
        plan = plan_steps(steps, out_sizes, sizes, local=set(self.local))
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
        staged = self._tidy(wanted)
        self.download_bytes = sum(self.pinned.files[f].size for f in wanted if f not in self.local) - staged
        self._pool = ThreadPoolExecutor(self.fetchers, thread_name_prefix="nvfp4-fetch")
        self._thread = threading.Thread(target=self._fetch_all, name="nvfp4-fetcher", daemon=True)
        self._thread.start()

    def _tidy(self, wanted: set[str]) -> int:
        """Keep an earlier run's downloads (whole or partial) that the plan's first reservations
        cover; delete the rest, so the working set is within the budget from the first moment.
        -> the bytes kept (what this run need not download)."""
        from .hub.fetch import INCOMPLETE_SUFFIX

        if not self.staging.is_dir():
            return 0
        assert self.plan is not None and self.budget is not None
        keep: set[str] = set()
        total = 0
        for it in self.plan.items:  # the prefix of reservations that fits, as the run will make them
            total += it.size
            if total > self.budget.limit:
                break
            if it.kind == "file":
                keep.add(it.name)
        kept = 0
        for p in sorted(self.staging.rglob("*")):
            if p.is_dir():
                continue
            rel = p.relative_to(self.staging).as_posix()
            base = rel[: -len(INCOMPLETE_SUFFIX)] if rel.endswith(INCOMPLETE_SUFFIX) else rel
            if base not in keep or base not in wanted:
                p.unlink()
            else:
                kept += p.stat().st_size
        return kept

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
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # a write on a descriptor (ENOSPC...)
            e = OSError(e.errno, e.strerror, str(self.staging))
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


class _LocalHeaders(Mapping):
    """The source's shard headers with each path where the source files have the file now (a Hub
    source's own download, or the HF cache), asked for only when a check opens it."""

    def __init__(self, headers: Mapping[str, Any], files: SourceFiles):
        self._headers, self._files = headers, files

    def __getitem__(self, f: str) -> Any:
        h = self._headers[f]
        path = self._files.path(f)
        return h if h.path == path else dataclasses.replace(h, path=path)

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers)

    def __len__(self) -> int:
        return len(self._headers)


def local_headers(spec: OutputSpec, files: SourceFiles | None) -> OutputSpec:
    """``spec`` with its source's shard headers read at the paths ``files`` gives (a Hub source's: each
    waits for its download when first opened); ``spec`` itself for a local source."""
    if files is None or not files.remote:
        return spec
    return dataclasses.replace(spec, source=dataclasses.replace(spec.source, headers=_LocalHeaders(spec.source.headers, files)))


__all__ = ["HubSourceFiles", "InputError", "LocalSourceFiles", "STAGING_NAME", "SourceFiles", "local_headers"]
