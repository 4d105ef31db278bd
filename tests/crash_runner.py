"""Run the nvfp4-fuse CLI and SIGKILL it at a chosen point (used by test_crash_resume.py).

    python tests/crash_runner.py <point> <cli args...>

<point> is one of:
  shard:N   after the N-th shard this run wrote is renamed and journaled
  bytes:N   once this run has handed N tensor bytes to shard writers (mid-shard)
  index     just before the index is written
  manifest  just before the manifest is written
  fetch:N   once this run has downloaded N bytes of source files from the Hub (mid-file)

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


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = ["nvfp4-fuse", *sys.argv[2:]]
    cli.main()
