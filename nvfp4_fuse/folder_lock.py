"""One writer per output folder: an exclusive ``flock`` on the folder itself (``verify`` takes a
shared one: it may run beside another verify, not beside a writer).

The lock is taken on an ``O_RDONLY`` descriptor of the folder, so it needs no write access and leaves
no file behind, and the kernel drops it when the holder exits however it ends (SIGKILL, a crash, a
lost terminal): a crashed run never blocks the next one. A second ``convert`` or ``push`` of the same
folder is refused at once, naming the process that holds it (read from ``/proc/locks`` on Linux).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


def lock_holders(folder: Path) -> list[int]:
    """PIDs holding a ``flock`` on ``folder`` (Linux ``/proc/locks``; empty where it cannot tell)."""
    try:
        st = os.stat(folder)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 12345 08:01:393220 0 EOF" (a blocked waiter adds "->" after "1:")
        if "->" in parts:
            continue
        try:
            i = parts.index("FLOCK")
            pid, ident = int(parts[i + 3]), parts[i + 4]
            major, minor, inode = ident.split(":")
        except (ValueError, IndexError):
            continue
        if int(inode) == st.st_ino and os.makedev(int(major, 16), int(minor, 16)) == st.st_dev:
            pids.append(pid)
    return pids


def _command_of(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    args = [" ".join(a.decode(errors="replace").split()) for a in raw.split(b"\0") if a]
    # "python -m nvfp4_fuse.cli convert ..." or ".../bin/nvfp4-fuse convert ...": show from the command on
    for i, a in enumerate(args):
        if a in ("convert", "push", "verify", "sample"):
            return "nvfp4-fuse " + " ".join(args[i:])[:200]
    return " ".join(args)[:200]


@contextmanager
def folder_lock(folder: Path, what: str, *, shared: bool = False) -> Iterator[None]:
    """Hold the folder's lock for ``what`` (``convert``, ``push``; ``shared`` for ``verify``, which only
    reads: several may run at once, but not beside a writer); ``InputError`` at once if another process
    holds it in a way that excludes this one. ``folder`` must exist."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holders = [p for p in lock_holders(folder) if p != os.getpid()]
            who = ", ".join(f"process {p}" + (f" ({c})" if (c := _command_of(p)) else "") for p in holders) or "another process"
            raise InputError(
                f"{folder} is in use by {who}; wait for it to finish (or stop it) before the {what}",
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock
