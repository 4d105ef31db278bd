"""``convert --push-to``: each output shard checked and uploaded as soon as it is written, then freed;
the model made visible on the Hub by one final commit.

How a shard travels: the converter writes it (``.partial``, fsynced, renamed, journaled), hands it to
:meth:`HubSink.written`; an upload worker checks it against its source (when a check is given), sends
it to the Hub's object store with ``preupload_lfs_files`` (LFS here, Xet where ``hf_xet`` is
installed and the Hub offers it), records it in the push journal (:data:`PUSH_JOURNAL`) and deletes the
local file. Before a shard is written the converter reserves its bytes in a disk budget (output shards
on disk and not yet uploaded): conversion waits only when uploads fall that far behind.

Why one final commit, not a branch merged at the end: a preuploaded object is stored but belongs to no
commit, so nothing of the model can be seen in the repo (or downloaded by name) until the one commit
that lists every file, shards by their sha256 and the small files inline, is accepted; the Hub applies
a commit whole or not at all. A branch would show a half-uploaded model on that branch, and the Hub
has no branch merge through its API (only pull requests, merged by hand or by a second call that can
fail on its own). The commit carries no file bytes for the shards (an LFS pointer each), so it is small
whatever the model's size.

Resume: the push journal records each shard's size and sha256 once its upload returned. A rerun keeps a
shard whose local file is gone when the journal records it and the Hub's LFS batch endpoint confirms it
holds the object (no bytes sent), so a finished shard is neither converted nor uploaded again; a shard
still on disk is uploaded, and the Hub answers "already there" without a byte sent if an earlier run
got it up. After the commit the Hub's hashes are checked against the manifest as ``push`` checks them,
the journal records the commit and the git blob ids of the small files, and the work folder is emptied
down to the manifest and the journal. A rerun then finds the Hub holding the manifest's files and does
nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..manifest import MANIFEST_NAME, Manifest, save_manifest
from .card import push_card
from .download import REPO_ID_RE
from .retry import with_retries
from .upload import README_NAME, _lfs_sha, default_commit_message, remote_infos, verify_remote, with_model_card

log = logging.getLogger("nvfp4_fuse.hub")

PUSH_JOURNAL = ".nvfp4-fuse-push.json"
LFS_BATCH_CHUNK = 256  # objects per LFS batch request (huggingface_hub's UPLOAD_BATCH_MAX_NUM_FILES)
DEFAULT_UPLOADERS = 2
STALL_S_ENV = "NVFP4_FUSE_HUB_STALL_S"
DEFAULT_STALL_S = 120.0


def set_stall_timeout(seconds: float | None = None) -> float:
    """Make huggingface_hub's HTTP client give up on a connection that sends or receives nothing for
    ``seconds`` (default ``$NVFP4_FUSE_HUB_STALL_S`` or 120): the library's own client waits forever,
    so a stalled upload would hang the run instead of being retried. -> the timeout set."""
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import hf_request_event_hook

    s = float(seconds if seconds is not None else os.environ.get(STALL_S_ENV) or DEFAULT_STALL_S)

    def factory() -> httpx2.Client:
        return httpx2.Client(
            event_hooks={"request": [hf_request_event_hook]},
            follow_redirects=True,
            timeout=httpx2.Timeout(connect=min(s, 30.0), read=s, write=s, pool=None),
        )

    set_client_factory(factory)
    return s


class DiskBudget:
    """Bytes of output shards on the work folder's disk and not yet uploaded. A writer reserves a
    shard's bytes before writing it and waits while they do not fit (unless nothing is held: a shard
    larger than the budget goes alone); an upload gives them back. ``abort`` wakes every waiter with
    the error that stopped the uploads."""

    def __init__(self, limit: int):
        self.limit, self.held, self.peak = limit, 0, 0
        self._cv = threading.Condition()
        self._error: BaseException | None = None

    def acquire(self, n: int, stop: threading.Event | None = None) -> bool:
        """Take ``n`` bytes once they fit; False (nothing taken) if ``stop`` is set meanwhile."""
        with self._cv:
            while self._error is None and self.held and self.held + n > self.limit:
                if stop is not None and stop.is_set():
                    return False
                self._cv.wait(0.1)
            if self._error is not None:
                raise self._error
            self.take(n)
            return True

    def take(self, n: int) -> None:
        """Count ``n`` bytes without waiting (shards an earlier run left on disk)."""
        with self._cv:
            self.held += n
            self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        with self._cv:
            self.held -= n
            self._cv.notify_all()

    def abort(self, error: BaseException) -> None:
        with self._cv:
            self._error = error
            self._cv.notify_all()


def git_blob_id(path: Path) -> str:
    """The git blob sha1 of a file (what the Hub reports for a regular file)."""
    h = hashlib.sha1()
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class PushOutcome:
    """What the push part of a run did (``convert --push-to``)."""

    repo_id: str
    revision: str
    commit: str | None = None  # the final commit's oid (None: the Hub already held everything)
    commit_url: str | None = None
    uploaded: list[str] = field(default_factory=list)  # shards this run sent to the Hub's object store
    reused: list[str] = field(default_factory=list)  # shards an earlier run uploaded, confirmed on the Hub
    checked: dict[str, str] = field(default_factory=dict)  # file -> how the Hub's copy was checked
    already_on_hub: bool = False  # the Hub held every file of the manifest: nothing done
    peak_disk_budget: int = 0  # most bytes of output shards held on disk at once (the budget's count)
    disk_budget: int = 0


class HubSink:
    """The Hub side of ``convert --push-to``; ``convert`` calls, in order: :meth:`complete` (when the
    work folder holds a manifest), :meth:`confirm` (journaled shards no longer on disk),
    :meth:`begin`, then :meth:`reserve` / :meth:`written` per shard, then :meth:`finish`.
    :meth:`close` (or the ``with`` block) stops the workers however the run ends.

    ``check(out, shard name, sha256) -> dict | None`` runs in the upload workers before a shard is
    uploaded (:func:`nvfp4_fuse.written_check.shard_check`: verify's checks); its result is journaled,
    so a rerun does not check a shard again, and it raises to stop the run.
    Errors: :class:`InputError` for what a retry cannot fix (auth, not found, quota, no write access),
    :class:`PushFailed` when the Hub keeps failing, :class:`PushVerificationFailed` when the Hub's copy
    differs after the commit.
    """

    def __init__(
        self,
        out: Path,
        repo_id: str,
        *,
        api=None,
        token: str | None = None,
        revision: str | None = None,
        private: bool = False,
        commit_message: str | None = None,
        base_model: str | None = None,
        max_disk: int | None = None,
        uploaders: int = DEFAULT_UPLOADERS,
        retries: int = 5,
        backoff: float = 2.0,
        check: Callable[[Path, str, str], dict | None] | None = None,
        check_decodes: bool = False,
        on_uploaded: Callable[[int], None] | None = None,
        source_remote: bool = False,
    ):
        if not REPO_ID_RE.match(repo_id):
            raise InputError(f"--push-to {repo_id!r} is not a Hub repo id (org/name)")
        if uploaders < 1:
            raise InputError("--uploads must be at least 1")
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        self.out, self.repo_id, self.api = Path(out), repo_id, api
        self.revision = revision
        self.private, self.commit_message, self.base_model = private, commit_message, base_model
        self.max_disk, self.uploaders = max_disk, uploaders
        self.retries, self.backoff = retries, backoff
        self.check, self.on_uploaded = check, on_uploaded
        self.check_decodes = check_decodes  # ``check`` runs the end-to-end decode (convert keeps its files)
        self.source_remote = source_remote  # a Hub source, fetched as the output needs it
        self.outcome = PushOutcome(repo_id, revision or "main")
        self.budget: DiskBudget | None = None
        self._lock = threading.Lock()  # the journal
        self._queue: queue.Queue = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._error: BaseException | None = None
        self._held: dict[str, int] = {}
        self._closed = False
        self._source: Any = None
        self.journal = self._load_journal()

    # -- the journal ---------------------------------------------------------------------------
    def _load_journal(self) -> dict[str, Any]:
        fresh = {"repo_id": self.repo_id, "revision": self.revision or "main", "uploaded": {}, "checked": {}, "commit": None, "blob_ids": {}}
        p = self.out / PUSH_JOURNAL
        try:
            j = json.loads(p.read_text())
        except (OSError, ValueError):
            return fresh  # absent or torn: nothing is taken as uploaded, the Hub says what it has
        if not isinstance(j, dict) or j.get("repo_id") != self.repo_id or j.get("revision") != (self.revision or "main"):
            return fresh  # uploads to another repo or branch are no use here
        for k, v in fresh.items():
            if not isinstance(j.get(k), type(v)) and v is not None:
                j[k] = v
        return j

    def _save_journal(self) -> None:
        from ..shard_writer import write_file_atomic

        with self._lock:  # one writer at a time: they share the temporary name
            if self._closed:  # an upload that returned after the run stopped: the next run asks the Hub
                return
            write_file_atomic(self.out / PUSH_JOURNAL, json.dumps(self.journal, indent=1, sort_keys=True).encode())

    # -- calls with retries --------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        return with_retries(what, fn, repo_id=self.repo_id, retries=self.retries, backoff=self.backoff, revision=self.revision)[0]

    def _absent_ok(self, fn: Callable[[], Any], empty: Any) -> Callable[[], Any]:
        """``fn``, answering ``empty`` when the repo or the branch does not exist (yet)."""
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        def call() -> Any:
            try:
                return fn()
            except (RepositoryNotFoundError, RevisionNotFoundError):
                return empty

        return call

    # -- called by convert ---------------------------------------------------------------------
    def complete(self, manifest: Manifest) -> bool:
        """Whether the Hub already holds every file of ``manifest`` (the work folder's, written by an
        earlier run of this command): LFS files by sha256, small ones by git blob id (journaled, or of
        the local copy). Then the work folder is emptied down to the manifest and the journal."""
        files = sorted(manifest.files) + [MANIFEST_NAME]
        remote = self._call(
            "checking the Hub's copy",
            self._absent_ok(lambda: remote_infos(self.api, self.repo_id, files, revision=self.revision, retries=0, backoff=0), {}),
        )
        blob_ids = dict(self.journal.get("blob_ids") or {})
        for rel in files:
            info, local = remote.get(rel), self.out / rel
            rec = manifest.files.get(rel) or {"size": local.stat().st_size, "sha256": None}  # the manifest itself
            if info is None or info.size != rec["size"]:
                return False
            lfs_sha = _lfs_sha(info)
            if lfs_sha:
                if str(lfs_sha).lower() != rec["sha256"]:
                    return False
                continue
            want = blob_ids.get(rel) or (git_blob_id(local) if local.is_file() else None)
            if want is None or str(info.blob_id).lower() != want:
                return False
        self.outcome.already_on_hub = True
        self.outcome.checked = {f: "unchanged" for f in files}
        self._free_work_folder()
        return True

    def confirm(self, records: dict[str, dict[str, Any]]) -> set[str]:
        """Of the shards in ``records`` (name -> size, sha256), those an earlier run uploaded (the
        journal says so) and the Hub still holds (its LFS batch endpoint asks for no upload)."""
        up = self.journal.get("uploaded") or {}
        cand = {
            n: r
            for n, r in records.items()
            if isinstance(up.get(n), dict) and up[n].get("sha256") == r.get("sha256") and up[n].get("size") == r.get("size")
        }
        if not cand:
            return set()
        held = self._objects_held({r["sha256"]: r["size"] for r in cand.values()})
        ok = {n for n, r in cand.items() if r["sha256"] in held}
        self.outcome.reused = sorted(ok)
        return ok

    def keeps(self, name: str) -> bool:
        """Whether an earlier run's shard still on disk is kept: yes from a local folder (it is checked
        against the source before its upload, if it was not yet); from a Hub source only once it was
        checked, since its source files are fetched for the shards still to write, not for it."""
        return not self.source_remote or name in (self.journal.get("checked") or {})

    def _objects_held(self, objects: dict[str, int]) -> set[str]:
        """The sha256s of ``objects`` (sha256 -> size) the Hub's object store holds for this repo."""
        from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info
        from huggingface_hub.utils import build_hf_headers

        headers = build_hf_headers(token=getattr(self.api, "token", None))
        items = sorted(objects.items())
        held: set[str] = set()
        for i in range(0, len(items), LFS_BATCH_CHUNK):
            chunk = items[i : i + LFS_BATCH_CHUNK]
            infos = [UploadInfo(size=size, sample=b"", sha256=bytes.fromhex(sha)) for sha, size in chunk]

            def ask(infos=infos) -> list[dict]:
                actions, errors, _ = post_lfs_batch_info(
                    upload_infos=infos, token=None, repo_type="model", repo_id=self.repo_id, revision=self.revision,
                    endpoint=self.api.endpoint, headers=headers, transfers=["basic", "multipart"],
                )  # fmt: skip
                return actions

            actions = self._call("asking the Hub which shards it holds", self._absent_ok(ask, []))
            held |= {a["oid"] for a in actions if not a.get("actions")}
        return held

    def default_budget(self, spec: Any, streams: int) -> int:
        """The disk budget: ``max_disk``, or enough for each stream's shard and the uploads'."""
        if self.max_disk is not None:
            return self.max_disk
        largest = max((s.data_bytes for s in spec.shards), default=0)
        return (streams + self.uploaders) * largest

    def begin(self, spec: Any, keep: dict[str, dict[str, Any]], streams: int, source: Any = None) -> None:
        """Create the repo (and branch), start the upload workers, and queue the shards an earlier run
        left on disk (``keep``: name -> size, sha256).

        The disk budget: a Hub source (``source.remote``, source_files.py) already counts each output
        shard in its ``--max-disk`` working set until the converter says the shard is safe, which
        under ``--push-to`` is once it is uploaded (:meth:`written`'s ``after``), so the sink adds
        no budget of its own; from a local folder the sink's :class:`DiskBudget` bounds the output
        shards on disk (``--max-disk``, or :meth:`default_budget`)."""
        from ..spec import disk_free, human

        remote = bool(getattr(source, "remote", False))
        self._source = source  # closed when an upload fails, so that nothing waits on its budget
        limit = source.reserve_bytes if remote else self.default_budget(spec, streams)
        self.budget = DiskBudget(1 << 62 if remote else limit)
        self.outcome.disk_budget = limit
        local = {n: r for n, r in keep.items() if (self.out / n).is_file()}
        need = min(limit, spec.output_bytes_estimate()) - sum(r["size"] for r in local.values())
        free = disk_free(self.out)
        if need > free:
            raise InputError(
                f"not enough free disk: converting while uploading needs {human(need)} (the disk budget), {human(free)} is free",
                file=str(self.out),
            )
        self._call("creating the repo", lambda: self.api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model"))
        branch = self.revision if self.revision and self.revision != "main" and not self.revision.startswith("refs/") else None
        if branch is not None:
            self._call(f"creating branch {branch!r}", lambda: self.api.create_branch(self.repo_id, branch=branch, exist_ok=True, repo_type="model"))
        self._save_journal()
        for i in range(self.uploaders):
            t = threading.Thread(target=self._work, name=f"nvfp4-upload-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        for name, rec in sorted(local.items()):
            self.budget.take(rec["size"])
            self._held[name] = rec["size"]
            self._queue.put((name, rec["size"], rec["sha256"], None))

    def reserve(self, shard: Any, stop: threading.Event | None = None) -> bool:
        """Before writing ``shard``: wait until its bytes fit the disk budget. Raises the uploads'
        error; False when ``stop`` (the converter's) is set while waiting."""
        assert self.budget is not None
        self._raise()
        n = shard.data_bytes
        if not self.budget.acquire(n, stop):
            return False
        with self._lock:
            self._held[shard.name] = n
        return True

    def written(self, name: str, size: int, sha256: str, after: Callable[[], None] | None = None) -> None:
        """``name`` is complete on disk: queue it for checking and upload; ``after()`` runs once it is
        uploaded and freed (the converter then frees the source files only it read)."""
        self._raise()
        self._queue.put((name, size, sha256, after))

    def finish(self, out: Path, manifest: Manifest) -> None:
        """Once every file is written: wait for the uploads, write push's card and the manifest that
        lists it, make the one commit, check the Hub's hashes, then empty the work folder down to the
        manifest and the journal."""
        self._drain()
        card = push_card(manifest.to_json(), self.repo_id, base_model=self.base_model, verify_summary=self.check_summary()).encode()
        pushed = with_model_card(manifest, card)
        from ..shard_writer import write_file_atomic

        write_file_atomic(out / README_NAME, card)
        save_manifest(out, pushed)
        files = sorted(pushed.files) + [MANIFEST_NAME]  # the manifest goes up too, as with push
        commit = self._commit(out, pushed, files)
        self.outcome.commit = getattr(commit, "oid", None)
        self.outcome.commit_url = getattr(commit, "commit_url", None)
        checked, problems = verify_remote(
            out, self.repo_id, files, api=self.api, revision=self.revision, manifest=pushed, trust_manifest=True,
            retries=self.retries, backoff=self.backoff, blob_ids=self.journal.get("blob_ids") or {},
        )  # fmt: skip
        if problems:
            from ..errors import PushVerificationFailed

            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise PushVerificationFailed(f"the Hub's copy of {self.repo_id} does not match the manifest: {problems[0]}{more}", problems)
        self.outcome.checked = checked
        with self._lock:
            self.journal["commit"] = self.outcome.commit
        self._save_journal()
        self._free_work_folder()

    def check_summary(self) -> dict | None:
        """What the checks made as the shards were written, for the model card (None: none ran)."""
        from ..written_check import card_summary

        return card_summary(self.journal.get("checked") or {})

    # -- the final commit ----------------------------------------------------------------------
    def _commit(self, out: Path, manifest: Manifest, files: list[str]) -> Any:
        """One commit of every file: small ones (and any shard still on disk) from the folder, the
        uploaded shards by their sha256. The git blob ids of the small files are journaled first, so
        that a rerun after the folder is emptied can still compare the Hub's copy."""
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.lfs import UploadInfo

        uploaded = self.journal.get("uploaded") or {}
        local = [rel for rel in files if (out / rel).is_file()]
        with self._lock:
            self.journal["blob_ids"] = {rel: git_blob_id(out / rel) for rel in local if rel not in uploaded}
        self._save_journal()

        def operations() -> list:
            ops = []
            for rel in files:
                if rel in local:
                    ops.append(CommitOperationAdd(rel, str(out / rel)))
                    continue
                rec, up = manifest.files[rel], uploaded.get(rel)
                if not up or up.get("sha256") != rec["sha256"]:
                    raise InputError(f"{rel} is neither in the work folder nor recorded as uploaded; rerun to convert it again", file=str(out / rel))
                op = CommitOperationAdd(rel, b"")  # its bytes are in the Hub's object store already
                op.upload_info = UploadInfo(size=rec["size"], sample=b"", sha256=bytes.fromhex(rec["sha256"]))
                op._upload_mode, op._is_uploaded = "lfs", True
                ops.append(op)
            return ops

        message = self.commit_message or default_commit_message(manifest)
        return self._call(
            "committing",
            lambda: self.api.create_commit(self.repo_id, operations=operations(), commit_message=message, revision=self.revision, repo_type="model"),
        )

    # -- the upload workers --------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._upload(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the converter's thread
                self._fail(e)
            finally:
                self._queue.task_done()

    def _upload(self, name: str, size: int, sha256: str, after: Callable[[], None] | None) -> None:
        path = self.out / name
        checked = self.journal.get("checked") or {}
        if self.check is not None and name not in checked:
            summary = self.check(self.out, name, sha256)
            with self._lock:
                self.journal.setdefault("checked", {})[name] = summary or {}
        mode = _preupload(self, name, path, sha256)
        with self._lock:
            self.journal.setdefault("uploaded", {})[name] = {"size": size, "sha256": sha256}
            self.outcome.uploaded.append(name)
        _journal_uploaded(self)
        with self._lock:
            if mode == "lfs" and not self._closed:
                path.unlink()
            held = self._held.pop(name, size)
        assert self.budget is not None
        self.budget.release(held)
        if after is not None:
            after()
        if self.on_uploaded:
            self.on_uploaded(size)

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = e
        if self.budget is not None:
            self.budget.abort(self._error)
        if self._source is not None and getattr(self._source, "remote", False):
            self._source.close()  # a shard waiting for the source's disk budget would wait forever

    def reraise(self, stopped_by: BaseException) -> None:
        """Raise the uploads' error, if one is why the converter stopped (``stopped_by``)."""
        with self._lock:
            err = self._error if not self._closed else None
        if err is not None and err is not stopped_by:
            raise err from stopped_by

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        """Wait until every queued shard is uploaded (or one failed: raised)."""
        self._queue.join()
        self._raise()
        if self.budget is not None:
            self.outcome.peak_disk_budget = self.budget.peak

    def close(self) -> None:
        """Stop the workers: at once after a failure or an interrupt (an upload in flight is left to
        die with the process; the journal never names a shard whose upload did not return)."""
        with self._lock:
            self._closed = True
        if self._workers and (self._error is not None or not self._queue.empty() or self._queue.unfinished_tasks):
            # An upload still in flight dies with the process (its connection closed under it at exit):
            # what the library and the retries would log about it is not news, the run's one line is.
            for name in ("huggingface_hub", "nvfp4_fuse.hub"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        if self._error is None and self.budget is not None:
            self._error = InputError("the run stopped")
            self.budget.abort(self._error)
        for _ in self._workers:
            self._queue.put(None)
        self._workers.clear()

    def __enter__(self) -> HubSink:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _free_work_folder(self) -> None:
        """Delete everything in the work folder but the manifest and the push journal."""
        keep = {MANIFEST_NAME, PUSH_JOURNAL}
        for p in sorted(self.out.rglob("*"), key=lambda p: -len(p.parts)):
            rel = p.relative_to(self.out).as_posix()
            if rel in keep:
                continue
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()


def _preupload(sink: HubSink, name: str, path: Path, sha256: str) -> str:
    """Send one shard to the Hub's object store (retried); -> its upload mode, ``lfs`` or ``regular``
    (a Hub that stores it as a regular file gets its bytes in the commit: it stays on disk till then)."""
    from huggingface_hub import CommitOperationAdd

    def attempt() -> Any:
        op = CommitOperationAdd(name, str(path))
        op.upload_info.sha256 = bytes.fromhex(sha256)  # hashed as it was written: no second read
        sink.api.preupload_lfs_files(sink.repo_id, [op], revision=sink.revision, repo_type="model", num_threads=1)
        return op

    op = sink._call(f"uploading {name}", attempt)
    if op._should_ignore:
        raise InputError(f"{sink.repo_id}'s .gitignore excludes {name}; it cannot be committed", file=name)
    return "lfs" if op._upload_mode == "lfs" else "regular"


def _journal_uploaded(sink: HubSink) -> None:
    """Record the uploads so far (a module function, so the crash tests can stop the run around it)."""
    sink._save_journal()


def push_plan(spec: Any, repo_id: str, *, streams: int, revision: str | None = None, max_disk: int | None = None,
              uploaders: int = DEFAULT_UPLOADERS) -> dict[str, Any]:  # fmt: skip
    """What ``convert --push-to`` adds to a dry run's plan: the uploads, the one commit and the disk
    budget (output shards held at once, none of the whole output)."""
    sink_budget = max_disk if max_disk is not None else (streams + uploaders) * max((s.data_bytes for s in spec.shards), default=0)
    try:
        configs = spec.configs()
    except Exception:  # noqa: BLE001 - a plan from remote headers reads no configs
        configs = {}
    small = set(configs) | {s for s in spec.source.sidecars if s != README_NAME} | {"model.safetensors.index.json", README_NAME, MANIFEST_NAME}
    return {
        "repo_id": repo_id,
        "revision": revision or "main",
        "uploads": len(spec.shards),
        "upload_bytes": spec.total_size,
        "commits": 1,
        "files_in_commit": len(spec.shards) + len(small),
        "visible": "at the final commit, all files at once",
        "disk_budget": sink_budget,
        "uploaders": uploaders,
    }
