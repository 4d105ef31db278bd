"""A read through a mapping of a source file that shrank: one error line naming the file, not a crash.

The readers see source and converted shards through read-only mappings (:mod:`shard_reader`). If a
file is truncated while it is mapped, touching a page past its new end raises SIGBUS in the thread
that touched it, whatever it was doing (hashing, comparing, decoding); a read by the kernel instead
(``pwritev`` from the mapping) fails with EFAULT, and a file-to-file copy comes up short: those two
are errors the caller sees and names (:func:`changed_file`). SIGBUS cannot become a Python exception
(returning from the handler faults again), so :func:`install` sets a handler that finds the file
whose mapping holds the faulting address, hands ``report`` one line naming it, and ends the process
with ``report``'s exit (the CLI's: exit 2). Nothing is cleaned up then: a conversion's finished
shards are journaled and the shard being written stays under its ``.partial`` name, which the next
run removes, so the same command resumes once the source is whole again.

Linux only (``sigaction`` through ctypes, the faulting address from ``siginfo_t``); elsewhere
:func:`install` does nothing and a fault ends the process as the system does.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mapping:
    path: Path
    size: int  # what the file held when its header was read
    ino: int  # the file's inode when it was opened (a file replaced by another has another)


_mappings: dict[int, tuple[int, Mapping]] = {}  # base address -> (length, mapping)
_bases: list[int] = []  # the mappings' base addresses, sorted (locate)
_lock = threading.Lock()
_report: Callable[[str], None] | None = None
_first = threading.Lock()  # taken by the one faulting thread that reports


def register(base: int, length: int, mapping: Mapping) -> None:
    with _lock:
        if base not in _mappings:
            bisect.insort(_bases, base)
        _mappings[base] = (length, mapping)


def unregister(base: int) -> None:
    with _lock:
        if _mappings.pop(base, None) is not None:
            _bases.remove(base)


def locate(addr: int, nbytes: int) -> tuple[Mapping, int] | None:
    """(the mapped file, file offset) of ``nbytes`` bytes at address ``addr``, when they lie in one
    registered mapping; else None."""
    with _lock:
        i = bisect.bisect_right(_bases, addr) - 1
        if i < 0:
            return None
        base = _bases[i]
        n, m = _mappings[base]
    return (m, addr - base) if addr + nbytes <= base + n else None


def changed_file(
    path: Path, size: int, ino: int | None = None, mtime_ns: int | None = None, *, missing_ok: bool = False
) -> str | None:
    """Why ``path`` is no longer the file that was read (None when it still is): its size differs
    from ``size``, (given ``ino``) the name now holds another file, (given ``mtime_ns``) it was
    written to, or it is gone (unless ``missing_ok``)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None if missing_ok else "the file is gone while being read"
    except OSError as e:
        return f"the file cannot be read any more ({e.strerror})"
    if ino is not None and st.st_ino != ino:
        return f"the file was replaced while being read ({st.st_size} bytes now, {size} when its header was read)"
    if st.st_size != size:
        return f"the file changed size while being read: {st.st_size} bytes now, {size} when its header was read (truncated?)"
    if mtime_ns is not None and st.st_mtime_ns != mtime_ns:
        return "the file was written to while being read (its modification time changed)"
    return None


def fault_line(addr: int | None) -> str:
    """The error line for a SIGBUS at ``addr``: the mapped file holding it, else any mapped file that
    changed, else a line saying a mapped file changed."""
    with _lock:
        items = list(_mappings.items())
    hit = [m for base, (n, m) in items if addr is not None and base <= addr < base + n]
    for m in hit + [m for _, (_, m) in items if m not in hit]:
        why = changed_file(m.path, m.size, m.ino)
        if why is not None or m in hit:
            return f"{why or 'a read through its mapping failed (SIGBUS)'} (file {m.path})"
    return "a mapped source file changed while being read (SIGBUS)"


class _Sigaction(ctypes.Structure):  # glibc's struct sigaction (x86-64 and aarch64 alike)
    _fields_ = [
        ("sa_sigaction", ctypes.c_void_p),
        ("sa_mask", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong)))),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    ]


_SA_SIGINFO = 4
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_SI_ADDR_OFFSET = 16  # siginfo_t: si_signo, si_errno, si_code, padding, then si_addr (64-bit Linux)
_installed: list[object] = []  # keeps the handler alive
_previous = _Sigaction()  # the SIGBUS action before install()
_libc: ctypes.CDLL | None = None


def _on_sigbus(signum: int, info: int | None, context: int | None) -> None:
    """Runs in the faulting thread, with the GIL (ctypes takes it): report and end the process.

    Must not return while the fault stands: the faulting access would run again. An address outside
    every registered mapping is not ours: the handler that was there before (the system's default,
    or faulthandler's) is put back and the access faults again, into it."""
    addr = ctypes.c_void_p.from_address(info + _SI_ADDR_OFFSET).value if info else None
    with _lock:
        ours = any(addr is not None and base <= addr < base + n for base, (n, _) in _mappings.items())
    if not ours or _report is None:
        _libc.sigaction(signal.SIGBUS, ctypes.byref(_previous), None)
        return
    if not _first.acquire(blocking=False):  # another thread faulted too and is reporting: wait for its exit
        threading.Event().wait()
    try:
        _report(fault_line(addr))
    finally:
        os._exit(2)


def install(report: Callable[[str], None]) -> bool:
    """Turn a SIGBUS in a registered mapping into ``report(line)`` and exit status 2 (``report`` may
    exit with its own status first). Returns False where this is not supported."""
    global _report, _libc
    _report = report
    if _installed:
        return True
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        handler = _HANDLER(_on_sigbus)
        act = _Sigaction()
        act.sa_sigaction = ctypes.cast(handler, ctypes.c_void_p).value
        act.sa_flags = _SA_SIGINFO
        if libc.sigaction(signal.SIGBUS, ctypes.byref(act), ctypes.byref(_previous)) != 0:
            return False
        _libc = libc
    except (OSError, AttributeError):
        return False
    _installed.append(handler)
    return True
