"""Run the nvfp4-fuse CLI and SIGKILL it at a chosen point (used by test_crash_resume.py).

    python tests/crash_runner.py <point> <cli args...>

<point> is one of:
  shard:N   after the N-th shard this run wrote is renamed and journaled
  bytes:N   once this run has handed N tensor bytes to shard writers (mid-shard)
  index     just before the index is written
  manifest  just before the manifest is written
  fetch:N   once this run has downloaded N bytes of source files from the Hub (mid-file)

and, with --push-to (hub/stream_upload.py):
  upload:N     while the N-th LFS PUT of this run is sending its bytes (the Hub stores nothing)
  uploaded:N   once the N-th shard's upload returned, before the push journal records it
  journaled:N  once the push journal records the N-th upload, before the shard is deleted
  commit       just before the final commit is sent
  committed    once the final commit returned, before the journal records it and the folder is emptied

The hooks wrap the converter's own functions from outside, so the production code carries no test
switch; the kill itself is a real SIGKILL of this process, with no chance to clean up.
"""

from __future__ import annotations

import os
import signal
import sys

import nvfp4_fuse.convert as conv
from nvfp4_fuse import cli
from nvfp4_fuse.source import INDEX_NAME


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    phase, _, n = point.partition(":")
    count = int(n or 0)
    state = {"seen": 0}
    if phase == "shard":
        orig_progress = conv._write_progress

        def progress(*a, **kw):
            orig_progress(*a, **kw)
            state["seen"] += 1  # the first journal is written before any shard
            if state["seen"] > count:
                die()

        conv._write_progress = progress
    elif phase == "bytes":
        orig_put = conv.StreamingShardWriter.put  # every byte a shard writer writes goes through put

        def put(self, pieces, *a, **kw):
            before = self.written
            fut = orig_put(self, pieces, *a, **kw)
            state["seen"] += self.written - before
            if state["seen"] >= count:
                die()
            return fut

        conv.StreamingShardWriter.put = put
    elif phase == "index":
        orig_atomic = conv.write_file_atomic

        def atomic(path, data):
            if os.path.basename(path) == INDEX_NAME:
                die()
            return orig_atomic(path, data)

        conv.write_file_atomic = atomic
    elif phase == "manifest":
        conv.save_manifest = lambda *a, **kw: die()
    elif phase in ("upload", "uploaded", "journaled", "commit", "committed"):
        _install_push(phase, count, state)
    elif phase == "fetch":
        from nvfp4_fuse.hub import fetch

        orig_add = fetch.FetchStats.add  # every piece written to an .incomplete file is counted here

        def add(self, *a, nbytes: int = 0, **kw):
            orig_add(self, *a, nbytes=nbytes, **kw)
            state["seen"] += nbytes
            if state["seen"] >= count:
                die()

        fetch.FetchStats.add = add
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def _install_push(phase: str, count: int, state: dict) -> None:
    from huggingface_hub import HfApi, lfs

    from nvfp4_fuse.hub import stream_upload as su

    if phase == "upload":
        orig_backoff = lfs.http_backoff

        def backoff(method, url, *a, **kw):
            if method == "PUT":
                state["seen"] += 1
                if state["seen"] >= count and "data" in kw:
                    kw["data"] = _DyingReader(kw["data"])
            return orig_backoff(method, url, *a, **kw)

        lfs.http_backoff = backoff
    elif phase in ("uploaded", "journaled"):
        target = "_preupload" if phase == "uploaded" else "_journal_uploaded"
        orig = getattr(su, target)

        def after(*a, **kw):
            r = orig(*a, **kw)
            with lock:
                state["seen"] += 1
                if state["seen"] >= count:
                    die()
            return r

        import threading

        lock = threading.Lock()
        setattr(su, target, after)
    else:
        orig_commit = HfApi.create_commit

        def create_commit(self, *a, **kw):
            if phase == "commit":
                die()
            r = orig_commit(self, *a, **kw)
            die()
            return r

        HfApi.create_commit = create_commit


class _DyingReader:
    """A file object that SIGKILLs the process once half of its bytes have been read."""

    def __init__(self, f):
        self.f = f
        pos = f.tell()
        f.seek(0, os.SEEK_END)
        self.half = max(1, (f.tell() - pos) // 2)
        f.seek(pos)
        self.read_n = 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.read_n += len(data)
        if self.read_n >= self.half:
            die()
        return data

    def __iter__(self):
        while chunk := self.read(1 << 16):
            yield chunk

    def __getattr__(self, name):
        return getattr(self.f, name)


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = ["nvfp4-fuse", *sys.argv[2:]]
    cli.main()
