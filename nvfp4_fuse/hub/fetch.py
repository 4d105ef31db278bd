"""One Hub file onto local disk: resumable, retried, checked against the Hub's own hash.

A repo is first pinned (:func:`pin_repo`): the commit its revision points to now, and every file's size
and oid at that commit (the LFS sha256 for large files, the git blob sha1 for the others), so that
every later request reads that commit and nothing else. :func:`fetch_file` then downloads one file
into ``<dest>.incomplete`` (never the final name), resuming with an HTTP ``Range`` request from
whatever an earlier attempt or an earlier run left, hashes it as it arrives, and renames it into place
(after an fsync) only once its hash matches the oid. Transient faults (408/429/5xx, resets, a stall
longer than ``timeout`` seconds) are retried with the backoff of :mod:`.retry`, the count starting
again whenever an attempt made progress; what no retry fixes (401, 403, 404, a full disk) stops at
once: :class:`~nvfp4_fuse.errors.InputError` with one line, or the ``OSError``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, PushFailed
from ..shard_writer import fsync_dir
from . import retry as _retry
from .errors import classify, first_line, hub_error_line

log = logging.getLogger("nvfp4_fuse.hub")

INCOMPLETE_SUFFIX = ".incomplete"  # a download in progress (resumable); never the final name
READ_PIECE = 1 << 20
DEFAULT_TIMEOUT_S = 60.0  # no byte for this long: the connection is given up and the download resumed
DEFAULT_RETRIES = 6  # attempts in a row without progress before giving up


@dataclass(frozen=True)
class RemoteFile:
    """One file of a pinned commit: its size and the hash the Hub publishes for it."""

    path: str
    size: int
    sha256: str | None  # LFS oid (large files)
    git_sha1: str  # git blob oid (for an LFS file: of its pointer)

    @property
    def oid(self) -> str:
        """The oid its bytes are checked against (and that the journal records)."""
        return self.sha256 or self.git_sha1


@dataclass(frozen=True)
class PinnedRepo:
    repo_id: str
    revision: str  # what was asked for (branch, tag or commit)
    sha: str  # the commit it pointed to when pinned
    files: dict[str, RemoteFile]


class HubUnreachable(InputError):
    """The Hub cannot be reached at all (no network, a name that does not resolve): a cached snapshot
    may still serve, as ``snapshot_download`` would use it."""


def _call(what: str, repo_id: str, revision: str | None, fn: Callable, retries: int, backoff: float):
    from .errors import unreachable_reason

    try:
        return _retry.with_retries(what, fn, repo_id=repo_id, retries=retries, backoff=backoff, revision=revision)[0]
    except PushFailed as e:
        raise PushFailed(str(e)) from None
    except InputError as e:
        if e.__cause__ is not None and unreachable_reason(e.__cause__) is not None:
            raise HubUnreachable(str(e)) from e.__cause__
        raise


def pin_repo(repo_id: str, revision: str | None = None, *, api=None, retries: int = 3, backoff: float = 1.0) -> PinnedRepo:
    """The commit ``revision`` (default ``main``) of ``repo_id`` points to, and its files (2 requests).
    ``InputError`` for a missing repo or revision, no access, or offline mode."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = api if api is not None else HfApi()
    info = _call("resolving the revision", repo_id, revision, lambda: api.model_info(repo_id, revision=revision), retries, backoff)
    sha = info.sha
    if not sha:
        raise InputError(f"the Hub did not say which commit {repo_id}@{revision or 'main'} is")
    entries = _call(
        "listing files", repo_id, revision, lambda: list(api.list_repo_tree(repo_id, revision=sha, recursive=True)), retries, backoff
    )
    files = {
        e.path: RemoteFile(e.path, int(e.size), e.lfs.sha256 if e.lfs else None, e.blob_id)
        for e in entries
        if isinstance(e, RepoFile)
    }
    return PinnedRepo(repo_id, revision or "main", sha, files)


def cached_blob(pinned: PinnedRepo, rel: str, cache_dir: str | None = None) -> Path | None:
    """The user's HF cache copy of ``rel`` at the pinned commit, if it holds the right bytes (an LFS
    blob is named by its sha256, so the check costs nothing; a small file is hashed). Read only."""
    from huggingface_hub import try_to_load_from_cache

    rf = pinned.files[rel]
    try:
        p = try_to_load_from_cache(pinned.repo_id, rel, cache_dir=cache_dir, revision=pinned.sha)
    except Exception:  # noqa: BLE001 - a cache we cannot read is a cache we do not use
        return None
    if not isinstance(p, str):
        return None
    path = Path(p)
    try:
        real = path.resolve(strict=True)
        if real.stat().st_size != rf.size:
            return None
    except OSError:
        return None
    if rf.sha256 is not None:
        return path if real.name == rf.sha256 else None
    return path if _git_sha1(real.read_bytes()) == rf.git_sha1 else None


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Incomplete(ConnectionError):
    """The server ended the body before the file's last byte: resumed like a reset."""


@dataclass
class FetchStats:
    requests: int = 0  # GETs of file bodies (resumes included)
    resumed: int = 0  # of which with a Range header
    bytes: int = 0  # body bytes received
    lock: threading.Lock | None = None

    def add(self, *, requests: int = 0, resumed: int = 0, nbytes: int = 0) -> None:
        if self.lock is None:
            self.lock = threading.Lock()
        with self.lock:
            self.requests += requests
            self.resumed += resumed
            self.bytes += nbytes


def _hash_existing(part: Path, have: int, h) -> None:
    with open(part, "rb") as f:
        left = have
        while left:
            b = f.read(min(READ_PIECE, left))
            if not b:
                raise OSError(f"{part} shrank while it was read back")
            h.update(b)
            left -= len(b)


def fetch_file(
    pinned: PinnedRepo,
    rel: str,
    dest: Path,
    *,
    retries: int = DEFAULT_RETRIES,
    backoff: float = 1.0,
    timeout: float = DEFAULT_TIMEOUT_S,
    stats: FetchStats | None = None,
    on_bytes: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> Path:
    """Download ``rel`` of the pinned commit to ``dest`` (see the module doc). -> ``dest``.

    A ``dest`` already there with the right size was renamed into place by an earlier call only after
    its hash matched, and is kept. ``stop`` (set by the caller) ends the download between pieces with
    ``InterruptedError``, leaving the ``.incomplete`` file to resume from.
    """
    import httpx2
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    rf = pinned.files[rel]
    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size == rf.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + INCOMPLETE_SUFFIX)
    url = hf_hub_url(pinned.repo_id, rel, revision=pinned.sha, endpoint=constants.ENDPOINT)
    stats = stats or FetchStats()
    failures = 0
    restarts = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > rf.size:
            os.truncate(part, 0)
            have = 0
        h = hashlib.sha256() if rf.sha256 else hashlib.sha1(b"blob %d\0" % rf.size)
        if have:
            _hash_existing(part, have, h)
        start = have
        try:
            if have < rf.size:
                headers = build_hf_headers()
                if have:
                    headers["Range"] = f"bytes={have}-"
                stats.add(requests=1, resumed=1 if have else 0)
                with get_session().stream(
                    "GET", url, headers=headers, follow_redirects=True, timeout=httpx2.Timeout(timeout)
                ) as r:
                    hf_raise_for_status(r)
                    if have and r.status_code != 206:  # the server ignored the range: start over
                        have = 0
                        h = hashlib.sha256() if rf.sha256 else hashlib.sha1(b"blob %d\0" % rf.size)
                    with open(part, "r+b" if have else "wb") as f:
                        f.seek(have)
                        f.truncate()
                        for piece in r.iter_bytes():  # as it arrives
                            if stop is not None and stop.is_set():
                                raise InterruptedError(f"download of {rel} stopped")
                            if have + len(piece) > rf.size:
                                raise InputError(f"the Hub sent more than the {rf.size} bytes it lists", file=rel)
                            f.write(piece)
                            h.update(piece)
                            have += len(piece)
                            stats.add(nbytes=len(piece))
                            if on_bytes is not None:
                                on_bytes(len(piece))
                        f.flush()
                        os.fsync(f.fileno())
                if have < rf.size:
                    raise _Incomplete(f"the connection ended at byte {have} of {rf.size}")
            got = h.hexdigest()
            if got != rf.oid:
                part.unlink(missing_ok=True)
                restarts += 1
                if restarts > 1:
                    raise InputError(
                        f"downloaded twice, and the bytes do not hash to the Hub's oid {rf.oid} (got {got})", file=rel
                    )
                log.warning("%s: hash mismatch after download; downloading it again", rel)
                continue
            os.replace(part, dest)
            fsync_dir(dest.parent)
            return dest
        except (InputError, InterruptedError, PushFailed):
            raise
        except Exception as exc:  # noqa: BLE001 - classified: transient ones retried, the rest raised
            kind, e = classify(exc)
            if kind in ("offline", "unreachable", "input"):
                raise InputError(hub_error_line(f"downloading {rel}", pinned.repo_id, e, pinned.sha)) from None
            if kind != "transient":
                raise
            progressed = (part.stat().st_size if part.exists() else 0) > start
            failures = 1 if progressed else failures + 1
            if failures > retries:
                raise PushFailed(
                    f"downloading {rel} of {pinned.repo_id} failed {failures} times in a row; last error: {first_line(e)}; "
                    "rerun the same command to resume"
                ) from None
            d = _retry._delay(failures - 1, backoff, e)
            log.warning("downloading %s: %s; resuming in %.1f s (try %d/%d)", rel, first_line(e), d, failures, retries)
            _retry._sleep(d)
