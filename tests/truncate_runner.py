"""Run the nvfp4-fuse CLI and truncate one source shard while it is being read (used by
test_truncated_source.py).

    python tests/truncate_runner.py <point> <file> <cli args...>

The file is cut back to its header (or, for replace, replaced by a copy of itself), at a chosen moment of the read of its tensors: always after the
reader has handed the bytes out (mapped, or about to be copied), before anything has read them, so
the moment is the same on every run:

  span:N    after the N-th source span of the file is handed to the writer: its copy_file_range
            comes up short
  view:N    after the N-th mapped view of the file is handed out: whoever reads it first faults (a
            pool thread checking block scales: SIGBUS; the writer's pwritev of gate/up rows: EFAULT)
  copied:N  after the N-th span of the file is copied, before it is hashed from its mapping: the
            hashing thread faults (SIGBUS)
  held:N    after verify's N-th held array of the file is handed out: its comparison faults (SIGBUS)
  small:N   before the N-th small read (pread) of the file: it comes up short
  replace:N after the N-th source span of the file is handed out, a copy of it renamed over it: every
            read still succeeds (the old file stays open), the change is caught before the shard
            is journaled

The hooks wrap the reader's and the writer's functions from outside, so the production code carries
no test switch.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import threading
from pathlib import Path

from nvfp4_fuse import cli, shard_reader, shard_writer


def install(point: str, target: Path) -> None:
    phase, _, n = point.partition(":")
    count = int(n)
    seen = {"n": 0}
    lock = threading.Lock()
    target = target.resolve()
    with open(target, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))

    def due(path: str | Path) -> bool:
        if Path(path).resolve() != target:
            return False
        with lock:
            seen["n"] += 1
            return seen["n"] == count

    def cut() -> None:
        if phase == "replace":
            tmp = target.with_name(target.name + ".new")
            shutil.copyfile(target, tmp)
            os.replace(tmp, target)
        else:
            os.truncate(target, 8 + header_len)

    reader = shard_reader.ShardReader
    if phase in ("span", "view", "held", "small", "replace"):
        method = {"span": "span", "view": "view", "held": "held_array", "small": "read_small", "replace": "span"}[phase]
        orig = getattr(reader, method)

        def hooked(self, *a, **kw):
            if phase == "small" and due(self.header.path):
                cut()
                return orig(self, *a, **kw)
            out = orig(self, *a, **kw)
            if phase != "small" and due(self.header.path):
                cut()
            return out

        setattr(reader, method, hooked)
    elif phase == "copied":
        orig_copy = shard_writer._copy_span

        def copied(fd, off, span):
            end = orig_copy(fd, off, span)
            if due(os.readlink(f"/proc/self/fd/{span.fd}")):
                cut()
            return end

        shard_writer._copy_span = copied
    else:
        raise SystemExit(f"unknown truncation point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1], Path(sys.argv[2]))
    sys.argv = ["nvfp4-fuse", *sys.argv[3:]]
    cli.main()
