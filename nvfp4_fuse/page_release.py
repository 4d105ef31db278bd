"""Page release: what a read through a file mapping leaves mapped, what to drop once it is done, and
libc's ``sync_file_range`` for starting writeback early.

A converter that reads hundreds of gigabytes through mappings must not keep them mapped: its resident
set would grow to the whole model. :class:`~nvfp4_fuse.shard_reader.ShardReader` drops each range once
it is done with it, widened by :func:`release_window` to all that reading it may have mapped, minus the
ranges still in use (:func:`unheld_gaps`). The writer starts writeback of what it wrote with
:data:`SYNC_FILE_RANGE` so the disk writes while the next bytes are read.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Iterator
from typing import Any

# What a read fault on a file mapping maps besides its own page (ShardReader.release drops all of it):
# Linux maps the cached pages of a window this large around the fault (fault_around_bytes, 64 KiB by
# default), aligned in the address space, not in the file; and since 6.18 it maps every page-cache
# folio touching that window whole. Folios are aligned to their size in the file, and with 4 KiB
# pages at most 2 MiB (PMD) large.
FAULT_AROUND = max(64 << 10, mmap.PAGESIZE)
LARGEST_FOLIO = max(2 << 20, mmap.PAGESIZE)


def release_window(begin: int, end: int, skew: int, size: int) -> tuple[int, int]:
    """File bytes ``[a, b)`` that reading ``[begin, end)`` through a mapping of a ``size``-byte file,
    starting ``skew`` bytes into its :data:`FAULT_AROUND` window, may have mapped: the windows they
    touch, widened to the folios touching those (:data:`LARGEST_FOLIO`)."""
    a = begin - (begin + skew) % FAULT_AROUND
    b = end + (-(end + skew)) % FAULT_AROUND
    a = max(0, a - a % LARGEST_FOLIO)
    b = min(b + (-b) % LARGEST_FOLIO, size)
    return a, b


def unheld_gaps(a: int, b: int, kept: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The page-aligned parts of ``[a, b)`` (page-aligned) outside the sorted ranges ``kept``, whose
    partly covered pages are kept whole."""
    page = mmap.PAGESIZE
    for lo, hi in kept:
        lo, hi = lo - lo % page, hi + (-hi) % page
        if lo > a:
            yield a, min(lo, b)
        a = max(a, hi)
        if a >= b:
            return
    if a < b:
        yield a, b


def _load_sync_file_range() -> Any:
    """libc's sync_file_range (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


SYNC_FILE_RANGE = _load_sync_file_range()
SFR_WAIT_BEFORE, SFR_WRITE, SFR_WAIT_AFTER = 1, 2, 4
