"""The shard reader: a source shard's tensors read by offset (``pread``), or seen in place through a
read-only mapping of the file.

:meth:`ShardReader.view` and :meth:`ShardReader.span` hand out the mapped bytes: the converter writes
and hashes packed values from there without copying them through a buffer of its own, and drops each
range from the mapping once it is done with it (:meth:`ShardReader.release`, see
:mod:`~nvfp4_fuse.page_release`). A :class:`SourceSpan` is such a range with its file offset, which the
writer copies file to file.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import mapped_faults
from .errors import InputError
from .page_release import FAULT_AROUND, release_window, unheld_gaps
from .safetensors_header import ShardHeader

IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


@dataclass(frozen=True)
class SourceSpan:
    """Bytes ``[offset, offset + len(view))`` of an open file, and the same bytes mapped (``view``).

    :func:`write_pieces` copies them file to file (``copy_file_range``: no pass through user space);
    the view is what they are hashed from, and written from where that call is not supported."""

    fd: int
    offset: int
    view: memoryview

    def __len__(self) -> int:
        return len(self.view)


class ShardReader:
    """Reads tensors of one shard by offset with pread, or hands out views of a read-only mapping of
    the file; keeps one file descriptor open, and maps the file on first use."""

    def __init__(self, header: ShardHeader):
        self.header = header
        self._fd = os.open(header.path, os.O_RDONLY)
        st = os.fstat(self._fd)
        self._ino, self._mtime_ns = st.st_ino, st.st_mtime_ns
        self._map: mmap.mmap | None = None
        self._base = 0  # where the mapping starts in the address space
        self._skew = 0
        self._map_lock = threading.Lock()
        self._held: dict[tuple[int, int], int] = {}  # (begin, end) -> holders: see held_array
        self._held_lock = threading.Lock()

    @property
    def fd(self) -> int:
        return self._fd

    def changed(self, *, missing_ok: bool = False) -> str | None:
        """Why the file at this shard's path is no longer the one whose header was read (None when it
        still is): another size, another file under the name, written to since it was opened, or
        gone (unless ``missing_ok``: a file deleted once read reads on from the open descriptor)."""
        return mapped_faults.changed_file(
            self.header.path, self.header.file_size, self._ino, self._mtime_ns, missing_ok=missing_ok
        )

    def close(self) -> None:
        if self._map is not None:
            mapped_faults.unregister(self._base)
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still alive somewhere: the mapping goes when the last one does
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _mapped(self) -> mmap.mmap:
        with self._map_lock:
            if self._map is None:
                # A file shorter than its header says would fault (SIGBUS) on access instead of failing a
                # read: check before mapping. (A file truncated while it is being converted still can.)
                size = os.fstat(self._fd).st_size
                if size != self.header.file_size:
                    raise InputError(
                        f"file is {size} bytes now, {self.header.file_size} when its header was read (changed?)",
                        file=str(self.header.path),
                    )
                self._map = mmap.mmap(self._fd, size, access=mmap.ACCESS_READ)
                first = np.frombuffer(self._map, dtype=np.uint8, count=1)
                self._base = first.ctypes.data
                self._skew = self._base % FAULT_AROUND  # where the mapping starts in its window
                del first
                mapped_faults.register(self._base, size, mapped_faults.Mapping(self.header.path, size, self._ino))
            return self._map

    def view(self, name: str, start: int = 0, length: int | None = None) -> memoryview:
        """Bytes ``[start, start + length)`` of a tensor, in place: a read-only view of the mapped file."""
        off, length = self._range(name, start, length)
        return memoryview(self._mapped())[off : off + length]

    def mapped_array(self, name: str, start: int = 0, length: int | None = None) -> np.ndarray:
        """Like :meth:`view`, as a read-only uint8 numpy array (compared and hashed in place)."""
        return np.frombuffer(self.view(name, start, length), dtype=np.uint8)

    def held_array(self, name: str, start: int = 0, length: int | None = None) -> np.ndarray:
        """Like :meth:`mapped_array`, with the range marked in use until a :meth:`release_tensor` of
        the same range: a release of a neighbour leaves its pages mapped instead of dropping them
        under a reader (which would map them again at once). Each call needs its own release."""
        off, n = self._range(name, start, length)
        with self._held_lock:
            self._held[(off, off + n)] = self._held.get((off, off + n), 0) + 1
        return np.frombuffer(memoryview(self._mapped())[off : off + n], dtype=np.uint8)

    def release_tensor(self, name: str, start: int = 0, length: int | None = None) -> None:
        """:meth:`release` of bytes ``[start, start + length)`` of a tensor."""
        off, length = self._range(name, start, length)
        self.release(off, off + length)

    def span(self, name: str, start: int = 0, length: int | None = None) -> SourceSpan:
        """Like :meth:`view`, with the file offset, for a file-to-file copy."""
        off, length = self._range(name, start, length)
        return SourceSpan(self._fd, off, memoryview(self._mapped())[off : off + length])

    def file_range(self, name: str, start: int = 0, length: int | None = None) -> tuple[int, int]:
        """(file offset, length) of bytes ``[start, start + length)`` of a tensor."""
        return self._range(name, start, length)

    def release(self, begin: int, end: int) -> None:
        """Drop file bytes ``[begin, end)`` from this process's mapping (``MADV_DONTNEED``), widened to
        all that reading them may have mapped: the :data:`FAULT_AROUND` windows they touch, and the
        folios touching those (:data:`LARGEST_FOLIO`). The page cache keeps the pages, and a later
        access maps them again: this only keeps the process's resident set to what is in use, not the
        whole file once it is read.

        Widened because a read fault maps more than its own page: reading one tensor maps parts of its
        neighbours, and if a neighbour was already dropped (pieces finish out of order) or is never
        read through the mapping (the scalars beside the block scales), those pages would stay mapped,
        from tens of KiB to 2 MiB a tensor: gigabytes over a large model. Every page a read maps lies
        in the widened range of what it read, so dropping that range once the read is done leaves
        nothing behind.

        Ranges still held (:meth:`held_array`; this release ends one hold of ``[begin, end)``) are
        left out: their pages stay mapped for their readers, and each is dropped, widened in turn,
        when its own last hold ends. Anything else in the widened range goes; a reader that did not
        hold its range maps its pages again with a minor fault (the bytes never change: the mapping
        is read-only)."""
        if self._map is None or end <= begin:
            return
        a, b = release_window(begin, end, self._skew, len(self._map))
        with self._held_lock:
            n = self._held.pop((begin, end), 0)
            if n > 1:
                self._held[(begin, end)] = n - 1
            kept = sorted(r for r in self._held if r[0] < b and r[1] > a)
        for lo, hi in unheld_gaps(a, b, kept):
            try:
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError, AttributeError):
                return  # only a hint

    def _range(self, name: str, start: int, length: int | None) -> tuple[int, int]:
        t = self.header.tensors[name]
        if length is None:
            length = t.nbytes - start
        if start < 0 or length < 0 or start + length > t.nbytes:
            raise ValueError(f"{name}: bytes [{start}, {start + length}) are outside the tensor's {t.nbytes}")
        return self.header.data_start + t.begin + start, length

    def _pread_into(self, views: list[memoryview], off: int, name: str) -> None:
        """Fill ``views`` in order from file offset ``off`` with vectored preads (short reads resumed)."""
        views = [v.cast("B") for v in views if len(v)]
        if vectored_transfer(os.preadv, self._fd, views, off) < 0:
            raise InputError("file ended early while reading (truncated?)", file=str(self.header.path), tensor=name)

    def read_small(self, name: str) -> bytes:
        """A small tensor's bytes (a scalar scale) with one plain pread."""
        off, length = self._range(name, 0, None)
        data = os.pread(self._fd, length, off)
        if len(data) != length:
            raise InputError("file ended early while reading (truncated?)", file=str(self.header.path), tensor=name)
        return data

    def read_bytes(self, name: str, start: int = 0, length: int | None = None) -> bytearray:
        off, length = self._range(name, start, length)
        buf = bytearray(length)
        self._pread_into([memoryview(buf)], off, name)
        return buf

    def read_array(self, name: str, start: int = 0, length: int | None = None, *, out: np.ndarray | None = None) -> np.ndarray:
        """Like :meth:`read_bytes`, into a uint8 numpy array: ``out`` (1-D, contiguous, ``length`` bytes)
        or a new uninitialised one (no zero-fill of a fresh buffer)."""
        off, length = self._range(name, start, length)
        if out is None:
            buf = np.empty(length, dtype=np.uint8)
        elif out.dtype != np.uint8 or out.ndim != 1 or out.size != length or not out.flags.c_contiguous:
            raise ValueError(f"{name}: out must be a contiguous uint8 array of {length} bytes")
        else:
            buf = out
        if length:
            self._pread_into([memoryview(buf)], off, name)
        return buf


def vectored_transfer(call: Any, fd: int, views: list[memoryview], off: int) -> int:
    """Transfer ``views`` in order from/to file offset ``off`` with ``os.preadv`` or ``os.pwritev``, at
    most ``IOV_MAX`` views a call, resuming after short transfers. Returns the offset after the last
    byte, or -1 when a call transferred nothing (the file ended, or the disk refused)."""
    views = [v for v in views if len(v)]
    i = 0
    while i < len(views):
        n = call(fd, views[i : i + IOV_MAX], off)
        if n <= 0:
            return -1
        off += n
        while n:  # drop what was transferred; a short call leaves the rest of a view for the next
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0
    return off

