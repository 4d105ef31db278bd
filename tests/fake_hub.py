"""A loopback fake of the few Hugging Face Hub endpoints huggingface_hub 2.4.0 uses with Xet disabled.

Start it, point ``HfApi(endpoint=hub.endpoint, token=hub.token)`` at it, and set
``HF_HUB_DISABLE_XET=1`` (and patch ``huggingface_hub.constants.HF_HUB_DISABLE_XET``: the library
reads the variable once, at import). It speaks, on 127.0.0.1 only:

upload (``create_repo``, ``create_branch``, ``upload_folder``)
  POST /api/repos/create                              -> {"url"}; 409 (same body) if it exists
  POST /api/models/{repo}/branch/{rev}                -> 200; 409 if it exists
  POST /api/validate-yaml                             -> README front matter parsed with PyYAML
  POST /api/models/{repo}/preupload/{rev}             -> uploadMode "lfs" for *.safetensors/*.bin or
                                                         >= lfs_min_size bytes, else "regular"; "oid"
                                                         of the file already there, if any
  POST /{repo}.git/info/lfs/objects/batch             -> basic transfer: upload + verify actions
  PUT  /__lfs/{sha256}                                -> stores the bytes (chunked or not)
  POST /__lfs/verify                                  -> 422 unless sha256(stored bytes) == oid
  POST /api/models/{repo}/commit/{rev}                -> NDJSON: header, file (base64), lfsFile
                                                         (oid must have been PUT), deletedFile

reading back (``get_paths_info``, ``list_repo_tree``, ``model_info``, ``snapshot_download``,
``get_safetensors_metadata``)
  POST /api/models/{repo}/paths-info/{rev}            -> size, git blob oid, lfs {oid, size,
                                                         pointerSize}, all computed from the bytes
                                                         the fake actually stored
  GET  /api/models/{repo}/tree/{rev}[/{path}]         -> same entries (recursive or not)
  GET  /api/models/{repo}[/revision/{rev}]            -> {"id", "sha", "siblings"}
  HEAD/GET /{repo}/resolve/{rev}/{path}               -> X-Repo-Commit, ETag, Range (206)

Errors carry the Hub's ``X-Error-Code`` headers (RepoNotFound, RevisionNotFound, EntryNotFound) so
huggingface_hub raises its usual exception classes. Wrong bearer token -> 401; write without token
-> 401. Fault injection: ``fail_next("commit", 503)`` answers the next commit with 503 (queue per
endpoint name: create, branch, validate-yaml, preupload, lfs-batch, lfs-upload, lfs-verify, commit,
paths-info, tree, info, resolve; ``download`` is the GET of a file alone, not its HEAD).
``corrupt_paths`` flips the first byte of those files when they are committed (to test the post-upload
check). Everything received is recorded.

Throttling and download faults: ``FakeHub(download_rate=..., upload_rate=...)`` (bytes/s, ``None`` =
unthrottled) sends every file body (whole or a Range) and reads every request body through one
:class:`TokenBucket` per direction, shared by all connections, like one link. ``fault_download(...)``
arms a fault for the next GET of a file (or of the files matching a glob): ``reset_after=N`` sends N
body bytes then resets the connection (TCP RST); ``stall_after=N, stall_s=S`` sends N bytes, goes
silent S seconds, then closes. ``range_log`` holds (path, Range header or None) of every file GET,
``bytes_served``/``bytes_received`` count body bytes each way.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes, sha256: str | None = None) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256 or hashlib.sha256(data).hexdigest()}\n"
        f"size {len(data)}\n"
    ).encode()


class TokenBucket:
    """A shared rate limit: ``take(n)`` returns once ``n`` more bytes fit under ``rate`` bytes/s.

    Every caller (every connection thread of one direction) draws on the same bucket, so the total
    through it is ``rate``, whatever the number of parallel requests. Up to ``burst`` bytes may pass at
    once after an idle spell. ``rate=None`` never waits.
    """

    def __init__(self, rate: float | None, burst: int = 64 << 10):
        self.rate = rate
        self.burst = burst
        self._t = 0.0  # the moment the bytes taken so far have all "passed"
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        if not self.rate or n <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._t, now - self.burst / self.rate)
            self._t = start + n / self.rate
            wait = self._t - now
        if wait > 0:
            time.sleep(wait)


# body bytes go through the buckets in pieces of this size, so parallel transfers share the rate
THROTTLE_CHUNK = 64 << 10


@dataclass
class DownloadFault:
    """A fault armed for the next GET of a file whose path matches ``pattern``."""

    pattern: str = "*"
    reset_after: int | None = None  # body bytes sent before a TCP reset
    stall_after: int | None = None  # body bytes sent before going silent
    stall_s: float = 30.0  # how long the silence lasts (then the connection is closed)


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @functools.cached_property
    def sha256(self) -> str:  # hashed once: a served Range must not cost a hash of the whole file
        return hashlib.sha256(self.data).hexdigest()

    @functools.cached_property
    def git_sha1(self) -> str:
        return git_blob_sha1(self.data)

    def entry(self, path: str) -> dict:
        d = {"type": "file", "path": path, "size": len(self.data)}
        if self.lfs:
            ptr = lfs_pointer(self.data, self.sha256)
            d["oid"] = git_blob_sha1(ptr)
            d["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(ptr)}
        else:
            d["oid"] = self.git_sha1
        return d

    def remote_oid(self) -> str:
        # what preupload reports and CommitOperationAdd._local_oid compares with
        return self.sha256 if self.lfs else self.git_sha1


@dataclass
class Commit:
    oid: str
    parent: str | None
    summary: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        return self.commits.get(rev)


class FakeHub:
    def __init__(
        self,
        *,
        token: str = "fake",
        lfs_patterns=("*.safetensors", "*.bin"),
        lfs_min_size: int = 10 << 20,
        download_rate: float | None = None,
        upload_rate: float | None = None,
    ):
        self.token = token
        self.lfs_patterns = tuple(lfs_patterns)
        self.lfs_min_size = lfs_min_size
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}  # claimed oid -> bytes received
        self.log: list[tuple[str, str, str, int]] = []  # (method, endpoint name, path, status)
        self.commit_payloads: list[list[dict]] = []
        self.faults: dict[str, list[int]] = {}
        self.corrupt_paths: set[str] = set()
        self.download_bucket = TokenBucket(download_rate)
        self.upload_bucket = TokenBucket(upload_rate)
        self.download_faults: list[DownloadFault] = []
        self.fired_faults: list[tuple[str, DownloadFault]] = []  # (path, fault) as they happened
        self.range_log: list[tuple[str, str | None]] = []  # (path, Range header) of every file GET
        self.bytes_served = 0  # file body bytes sent
        self.bytes_received = 0  # request body bytes read
        self._stopping = threading.Event()  # ends stalls early when the fake stops
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- test helpers -------------------------------------------------------------------------
    def fail_next(self, name: str, *statuses: int) -> None:
        with self.lock:
            self.faults.setdefault(name, []).extend(statuses)

    def fault_download(
        self,
        pattern: str = "*",
        *,
        reset_after: int | None = None,
        stall_after: int | None = None,
        stall_s: float = 30.0,
    ) -> None:
        """Arm one fault for the next GET of a file matching ``pattern`` (see the module doc)."""
        if (reset_after is None) == (stall_after is None):
            raise ValueError("give exactly one of reset_after, stall_after")
        with self.lock:
            self.download_faults.append(DownloadFault(pattern, reset_after, stall_after, stall_s))

    def set_rates(self, *, download_rate: float | None = None, upload_rate: float | None = None) -> None:
        """Change the throttles (``None`` = unthrottled) for the requests that start from now on."""
        self.download_bucket = TokenBucket(download_rate)
        self.upload_bucket = TokenBucket(upload_rate)

    def ranged_gets(self, path: str) -> list[str | None]:
        """The Range headers of every GET of ``path`` (``None`` for a whole-file GET), in order."""
        return [r for p, r in self.range_log if p == path]

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        with self.lock:
            c = self.repos[repo_id].resolve(rev)
            return {p: f.data for p, f in c.files.items()} if c else {}

    def calls(self, name: str) -> list[int]:
        """Statuses answered for an endpoint name, in order."""
        return [status for _, n, _, status in self.log if n == name]

    def create(self, repo_id: str, files: dict[str, bytes] | None = None, *, private: bool = False) -> str:
        """Create a repo directly (for download tests). -> head commit oid."""
        with self.lock:
            repo = self._new_repo(repo_id, private)
            if files:
                head = repo.resolve("main")
                new = dict(head.files)
                for p, data in files.items():
                    new[p] = StoredFile(data, self._is_lfs(p, len(data)))
                self._commit(repo, "main", "add files", new)
            return repo.branches["main"]

    # -- internals ----------------------------------------------------------------------------
    def _is_lfs(self, path: str, size: int) -> bool:
        return size >= self.lfs_min_size or any(fnmatch(path, p) for p in self.lfs_patterns)

    def _new_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        self.repos[repo_id] = repo
        ga = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
        self._commit(repo, "main", "initial commit", {".gitattributes": StoredFile(ga, False)})
        return repo

    def _commit(self, repo: Repo, branch: str, summary: str, files: dict[str, StoredFile]) -> Commit:
        parent = repo.branches.get(branch)
        h = hashlib.sha1(f"{parent}:{summary}:{len(repo.commits)}".encode())
        for p in sorted(files):
            h.update(p.encode() + files[p].remote_oid().encode())
        c = Commit(h.hexdigest(), parent, summary, files)
        repo.commits[c.oid] = c
        repo.branches[branch] = c.oid
        return c


_ROUTES = [
    ("create", "POST", re.compile(r"^/api/repos/create$")),
    ("validate-yaml", "POST", re.compile(r"^/api/validate-yaml$")),
    ("lfs-verify", "POST", re.compile(r"^/__lfs/verify$")),
    ("lfs-upload", "PUT", re.compile(r"^/__lfs/(?P<oid>[0-9a-f]{64})$")),
    ("lfs-batch", "POST", re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")),
    ("tree", "GET", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")),
    ("info", "GET", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$")),
    ("info", "GET", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)$")),
    (None, "POST", re.compile(
        r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|paths-info|branch)/(?P<rev>[^/]+)$"
    )),
    ("resolve", "GET", re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
    ("resolve", "HEAD", re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
]
# need a token; the LFS PUT and verify go to "S3" (presigned URLs) and carry none
_WRITES = {"create", "branch", "preupload", "lfs-batch", "commit", "validate-yaml"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # -- plumbing -----------------------------------------------------------------------------
    def _read(self, n: int) -> bytes:
        """``n`` body bytes, drawn through the upload throttle."""
        out = bytearray()
        while len(out) < n:
            piece = self.rfile.read(min(THROTTLE_CHUNK, n - len(out)))
            if not piece:
                break
            self.fake.upload_bucket.take(len(piece))
            out += piece
        self.fake.bytes_received += len(out)
        return bytes(out)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self._read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self._read(n) if n else b""

    def _send_file(self, status: int, body: bytes, headers: dict, path: str) -> None:
        """Send a file's bytes through the download throttle, firing an armed fault if one matches."""
        fault = None
        with self.fake.lock:
            self.fake.range_log.append((path, self.headers.get("Range")))
            for i, f in enumerate(self.fake.download_faults):
                if fnmatch(path, f.pattern):
                    fault = self.fake.download_faults.pop(i)
                    self.fake.fired_faults.append((path, fault))
                    break
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.fake.log.append((self.command, self._name, self.path, status))
        limit = len(body)
        if fault is not None:
            limit = min(limit, fault.reset_after if fault.reset_after is not None else fault.stall_after)
        view = memoryview(body)
        sent = 0
        try:
            while sent < limit:
                n = min(THROTTLE_CHUNK, limit - sent)
                self.fake.download_bucket.take(n)
                self.wfile.write(view[sent : sent + n])
                sent += n
                self.fake.bytes_served += n
            if fault is None:
                return
            self.wfile.flush()
            if fault.stall_after is not None:
                self.fake._stopping.wait(fault.stall_s)
                self.connection.shutdown(socket.SHUT_RDWR)
            else:  # an abortive close: the client reads ECONNRESET, not a clean end of stream
                time.sleep(0.2)  # once it had the time to read the N bytes (a reset drops unread ones)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
        except OSError:  # the client went away (it timed out on a stall, or was killed)
            pass
        self.close_connection = True

    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None) -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.fake.log.append((self.command, self._name, self.path, status))

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        h = {"X-Error-Message": message}
        if code:
            h["X-Error-Code"] = code
        self._send(status, {"error": message}, h)

    def _dispatch(self) -> None:
        self._name = "?"
        url = urlsplit(self.path)
        self._query = parse_qs(url.query)
        for name, method, rx in _ROUTES:
            m = rx.match(url.path)
            if m and method == self.command:
                g = {k: (unquote(v) if v is not None else None) for k, v in m.groupdict().items()}
                self._name = name or g.pop("op")
                g.pop("op", None)
                break
        else:
            self._body()
            return self._error(404, f"no route for {self.command} {url.path}")
        body = self._body() if self.command in ("POST", "PUT") else b""

        auth = self.headers.get("Authorization")
        if auth is not None and auth != f"Bearer {self.fake.token}":
            return self._error(401, "Invalid credentials in Authorization header")
        if auth is None and self._name in _WRITES:
            return self._error(401, "You must be authenticated to write", "RepoNotFound" if "repo" in g else None)

        with self.fake.lock:
            names = [self._name] + (["download"] if self._name == "resolve" and self.command == "GET" else [])
            for name in names:
                queue = self.fake.faults.get(name)
                if queue:
                    status = queue.pop(0)
                    return self._error(status, f"injected {status} on {name}")
            if self._name != "resolve":
                return getattr(self, "h_" + self._name.replace("-", "_"))(body=body, **g)
        # file bytes are sent outside the lock: a throttled download must not hold up other requests
        return self.h_resolve(body=body, **g)

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
        return repo

    def _rev(self, repo: Repo, rev: str) -> Commit | None:
        c = repo.resolve(rev)
        if c is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return c

    # -- endpoints ----------------------------------------------------------------------------
    def h_create(self, body: bytes) -> None:
        d = json.loads(body)
        repo_id = f"{d.get('organization') or 'user'}/{d['name']}"
        url = {"url": f"{self.fake.endpoint}/{repo_id}", "name": repo_id}
        if repo_id in self.fake.repos:
            return self._send(409, {"error": "You already created this model repo", **url})
        self.fake._new_repo(repo_id, d.get("visibility") == "private" or bool(d.get("private")))
        self._send(200, url)

    def h_branch(self, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo)
        if r is None:
            return
        if rev in r.branches:
            return self._error(409, "Reference already exists")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        c = self._rev(r, start)
        if c is None:
            return
        r.branches[rev] = c.oid
        self._send(200, {})

    def h_validate_yaml(self, body: bytes) -> None:
        import yaml

        content = json.loads(body)["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
                if not isinstance(meta, dict):
                    raise ValueError("metadata is not a mapping")
            except Exception as e:  # noqa: BLE001
                return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
        self._send(200, {"errors": [], "warnings": []})

    def h_preupload(self, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo)
        if r is None:
            return
        c = self._rev(r, rev)
        if c is None:
            return
        files = []
        for f in json.loads(body)["files"]:
            entry = {
                "path": f["path"],
                "uploadMode": "lfs" if self.fake._is_lfs(f["path"], f["size"]) else "regular",
                "shouldIgnore": False,
            }
            if f["path"] in c.files:
                entry["oid"] = c.files[f["path"]].remote_oid()
            files.append(entry)
        self._send(200, {"files": files, "commitOid": c.oid})

    def h_lfs_batch(self, body: bytes, repo: str) -> None:
        if self._repo(repo) is None:
            return
        d = json.loads(body)
        objs = []
        for o in d["objects"]:
            obj = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.fake.lfs_store:
                obj["actions"] = {
                    "upload": {"href": f"{self.fake.endpoint}/__lfs/{o['oid']}"},
                    "verify": {"href": f"{self.fake.endpoint}/__lfs/verify"},
                }
            objs.append(obj)
        self._send(200, {"transfer": "basic", "objects": objs})

    def h_lfs_upload(self, body: bytes, oid: str) -> None:
        self.fake.lfs_store[oid] = body
        self._send(200, b"")

    def h_lfs_verify(self, body: bytes) -> None:
        d = json.loads(body)
        data = self.fake.lfs_store.get(d["oid"])
        if data is None or hashlib.sha256(data).hexdigest() != d["oid"] or len(data) != d["size"]:
            return self._error(422, f"LFS object {d['oid']} does not match what was uploaded")
        self._send(200, {})

    def h_commit(self, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo)
        if r is None:
            return
        c = self._rev(r, rev)
        if c is None:
            return
        if rev not in r.branches:
            return self._error(400, f"cannot commit to {rev}: not a branch")
        items = [json.loads(line) for line in body.splitlines() if line.strip()]
        self.fake.commit_payloads.append(items)
        files = dict(c.files)
        summary = ""
        for it in items:
            k, v = it["key"], it["value"]
            if k == "header":
                summary = v.get("summary", "")
                if v.get("parentCommit") and v["parentCommit"] != c.oid:
                    return self._error(412, "parent commit is not the head")
            elif k == "file":
                data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                files[v["path"]] = StoredFile(data, False)
            elif k == "lfsFile":
                data = self.fake.lfs_store.get(v["oid"])
                if data is None:
                    return self._error(400, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                files[v["path"]] = StoredFile(data, True)
            elif k in ("deletedFile", "deletedFolder"):
                p = v["path"].rstrip("/")
                for q in [q for q in files if q == p or q.startswith(p + "/")]:
                    del files[q]
            else:
                return self._error(400, f"unknown commit item {k}")
        for p in self.fake.corrupt_paths & set(files):
            f = files[p]
            files[p] = StoredFile(bytes([f.data[0] ^ 0xFF]) + f.data[1:], f.lfs)
        new = self.fake._commit(r, rev, summary, files)
        self._send(200, {"commitOid": new.oid, "commitUrl": f"{self.fake.endpoint}/{repo}/commit/{new.oid}"})

    def h_paths_info(self, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo)
        if r is None:
            return
        c = self._rev(r, rev)
        if c is None:
            return
        form = parse_qs(body.decode())
        out = []
        for p in form.get("paths", []):
            if p in c.files:
                out.append(c.files[p].entry(p))
            elif any(q.startswith(p.rstrip("/") + "/") for q in c.files):
                out.append({"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest()})
        self._send(200, out)

    def h_tree(self, body: bytes, repo: str, rev: str, path: str | None) -> None:
        r = self._repo(repo)
        if r is None:
            return
        c = self._rev(r, rev)
        if c is None:
            return
        recursive = self._query.get("recursive", ["False"])[0].lower() in ("1", "true")
        base = (path.rstrip("/") + "/") if path else ""
        out, dirs = [], set()
        for p in sorted(c.files):
            if not p.startswith(base):
                continue
            rest = p[len(base) :]
            if "/" in rest and not recursive:
                dirs.add(base + rest.split("/")[0])
                continue
            if "/" in rest:
                parts = rest.split("/")
                for i in range(1, len(parts)):
                    dirs.add(base + "/".join(parts[:i]))
            out.append(c.files[p].entry(p))
        if base and not out and not dirs:
            return self._error(404, f"{path} not found", "EntryNotFound")
        out += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(dirs)]
        self._send(200, out)

    def h_info(self, body: bytes, repo: str, rev: str = "main") -> None:
        r = self._repo(repo)
        if r is None:
            return
        c = self._rev(r, rev)
        if c is None:
            return
        self._send(
            200,
            {"id": repo, "sha": c.oid, "private": r.private, "siblings": [{"rfilename": p} for p in sorted(c.files)]},
        )

    def h_resolve(self, body: bytes, repo: str, rev: str, path: str) -> None:
        r = self._repo(repo)
        if r is None:
            return
        c = self._rev(r, rev)
        if c is None:
            return
        f = c.files.get(path)
        if f is None:
            return self._error(404, f"{path} not found", "EntryNotFound")
        etag = f.remote_oid()
        h = {"X-Repo-Commit": c.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            h["X-Linked-Etag"] = f'"{etag}"'
            h["X-Linked-Size"] = str(len(f.data))
        rng = self.headers.get("Range")
        m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else len(f.data) - 1, len(f.data) - 1)
            if start >= len(f.data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(f.data)}"})
            h["Content-Range"] = f"bytes {start}-{end}/{len(f.data)}"
            return self._file(206, f.data[start : end + 1], h, path)
        self._file(200, f.data, h, path)

    def _file(self, status: int, body: bytes, headers: dict, path: str) -> None:
        if self.command == "HEAD":
            return self._send(status, body, headers)
        self._send_file(status, body, headers, path)
