"""The streaming shard writer: an output shard written piece by piece, hashed as it goes, renamed into
place whole.

:class:`StreamingShardWriter` takes the complete list of tensors (name, dtype, shape) first, writes the
header, then accepts each tensor's bytes in order, as pieces (mapped views, source spans, computed
arrays) that :func:`write_pieces` writes with ``pwritev`` and ``copy_file_range``; a helper thread
hashes the same bytes beside the writes: large pieces in place, many small ones (row runs of a few KiB)
read back from the page cache in large reads, since hashing them one by one costs a GIL hand-over each.
Nothing is ever held for a whole shard. Writeback is started every 32 MiB (``sync_file_range``) so the
disk writes while the caller reads, and the final fsync has little left. The file is written under a
temporary name, fsynced, and renamed into place only when every declared byte has arrived.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .page_release import SFR_WAIT_AFTER, SFR_WAIT_BEFORE, SFR_WRITE, SYNC_FILE_RANGE
from .safetensors_header import OutEntry, build_header
from .shard_reader import SourceSpan, vectored_transfer

if TYPE_CHECKING:
    import torch

WRITE_BEHIND = 32 << 20  # start writeback of every this many bytes at once
WRITE_BEHIND_DEPTH = 8  # windows under writeback before the writer waits for the oldest (256 MiB)
# A put of more pieces than this (the 8-row gate/up interleave: hundreds of a few KiB each) is hashed
# from the file in reads of HASH_READ bytes, not piece by piece: each hashed piece is a GIL hand-over,
# and with several streams and the task pool wanting the GIL those held a stream to half the hash rate.
HASH_VIEWS_MAX = 16
HASH_READ = 8 << 20
PARTIAL_SUFFIX = ".partial"


def tensor_bytes(t: torch.Tensor | np.ndarray) -> memoryview:
    """The raw little-endian bytes of a torch tensor or numpy array (any shape, 0-d included), without
    a copy if contiguous."""
    if isinstance(t, np.ndarray):
        return memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8))
    import torch

    if t.numel() == 0:  # torch will not view an empty tensor of wider elements as bytes
        return memoryview(b"")
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What a piece of output is: bytes to write as they are (a mapped view, an array's bytes) or a span of
# a source file.
Piece = memoryview | bytes | bytearray | SourceSpan

# copy_file_range is refused on some file systems and kernels: EXDEV (source and output on two file
# systems, before Linux 5.3 and again since 5.19 unless both are of the same type), ENOSYS (no such call),
# EPERM (a seccomp filter in some containers), EINVAL / EOPNOTSUPP (file systems that do not implement it,
# e.g. some FUSE and network ones). The first refusal switches this process to plain writes from the
# mapped view, which are always correct; any other error is a real one and is raised.
_COPY_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
_copy_file_range_ok = hasattr(os, "copy_file_range")


def _pwrite_all(fd: int, views: list[memoryview], off: int) -> int:
    """Write ``views`` in order at file offset ``off`` with vectored pwrites (short writes resumed)."""
    end = vectored_transfer(os.pwritev, fd, views, off)
    if end < 0:
        raise OSError(errno.EIO, "pwritev wrote nothing")
    return end


def _copy_span(fd: int, off: int, span: SourceSpan) -> int:
    """Copy a source span to file offset ``off``: ``copy_file_range``, else a write from its view."""
    global _copy_file_range_ok
    done, n = 0, len(span)
    while done < n and _copy_file_range_ok:
        try:
            k = os.copy_file_range(span.fd, fd, n - done, span.offset + done, off + done)
        except OSError as e:
            if e.errno not in _COPY_FALLBACK_ERRNOS:
                raise
            _copy_file_range_ok = False  # see _COPY_FALLBACK_ERRNOS; what is left goes the plain way
            break
        if k <= 0:  # the source ends before the span does: it changed since its header was read
            raise OSError(errno.EIO, "source file ended early (truncated while converting?)")
        done += k
    if done < n:
        _pwrite_all(fd, [span.view[done:]], off + done)
    return off + n


def piece_views(pieces: Sequence[Piece]) -> list[memoryview]:
    """The bytes of ``pieces`` as flat byte views, in order: what is written and hashed."""
    out = []
    for p in pieces:
        v = p.view if isinstance(p, SourceSpan) else memoryview(p)
        out.append(v if v.format == "B" and v.ndim == 1 else v.cast("B"))
    return out


def write_pieces(fd: int, off: int, pieces: Sequence[Piece], views: list[memoryview] | None = None) -> int:
    """Write ``pieces`` one after the other from file offset ``off``; returns the offset after them.

    Source spans are copied file to file with ``copy_file_range``, runs of other pieces go out with
    ``pwritev`` (up to ``IOV_MAX`` at a time): bytes that need no transform never pass through a
    buffer of ours. ``views`` is ``piece_views(pieces)`` where the caller has it already."""
    if views is None:
        views = piece_views(pieces)
    run: list[memoryview] = []
    run_off = off
    for p, v in zip(pieces, views):
        if isinstance(p, SourceSpan):
            if run:
                _pwrite_all(fd, run, run_off)
                run = []
            off = _copy_span(fd, off, p)
            run_off = off
        else:
            run.append(v)
            off += len(v)
    if run:
        _pwrite_all(fd, run, run_off)
    return off


class StreamingShardWriter:
    """Header first, then each declared tensor's bytes in order; sha256 computed while writing.

    ``put(pieces)`` writes pieces (mapped views, source spans, array bytes) one after the other at the
    end of what was handed over so far, moving on to the next tensor when one is full, and hashes the
    same bytes on a helper thread (a few large pieces in place, many small ones read back from the page
    cache): the caller goes on writing while they are hashed. ``write(data)`` is ``put`` for one
    buffer, returning once it is hashed too.
    ``finish()`` checks that every declared byte arrived, waits for the hash, fsyncs, renames the
    temporary file into place, fsyncs the folder and returns (size, sha256). Anything else (an
    exception, a crash) leaves only the ``.partial`` file, never a complete-looking shard.
    """

    def __init__(self, path: Path, entries: list[OutEntry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.entries = entries
        self._sizes = [e.nbytes for e in entries]
        self._idx = 0
        self._left = self._sizes[0] if self._sizes else 0
        self._hash = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="nvfp4-sha256")
        self._hash_buf = memoryview(bytearray(HASH_READ))
        header = build_header(entries, metadata)
        self.file_size = len(header) + sum(self._sizes)
        # read and write: the hash reads back what was written
        self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        self._size = 0  # bytes written and handed to the hasher
        self._behind = 0  # writeback has been started up to here
        self._windows: deque[tuple[int, int]] = deque()  # ranges under writeback, oldest first
        try:
            self._put([memoryview(header)], None)
        except BaseException:
            self.abort()
            raise
        self._skip_empty()

    @property
    def written(self) -> int:
        """Bytes of the file written so far, header included."""
        return self._size

    def put(self, pieces: Sequence[Piece], after: Callable[[], None] | None = None) -> Future:
        """Write ``pieces`` next. They are hashed on the helper thread, then ``after()`` runs there; the
        returned future is done when both are, and the pieces must stay unchanged until then."""
        views = piece_views(pieces)
        n = sum(len(v) for v in views)
        if self._size + n > self.file_size:
            raise RuntimeError(f"{self.path.name}: {self._size + n - self.file_size} bytes more than the header declares")
        fut = self._put(pieces, after, views)
        left = n
        while left:
            k = min(self._left, left)
            left -= k
            self._left -= k
            self._skip_empty()
        return fut

    def _put(self, pieces: Sequence[Piece], after: Callable[[], None] | None, views: list[memoryview] | None = None) -> Future:
        views = piece_views(pieces) if views is None else views
        start = self._size
        end = write_pieces(self._fd, start, pieces, views)
        if len(views) > HASH_VIEWS_MAX:
            fut = self._hasher.submit(self._hash_range, start, end, after)
        else:
            fut = self._hasher.submit(self._hash_views, views, after)
        self._size = end
        if self._size - self._behind >= WRITE_BEHIND:
            self._write_behind()
        return fut

    def _hash_views(self, views: list[memoryview], after: Callable[[], None] | None) -> None:
        """Hash a few large pieces in place (mapped views, arrays): no copy."""
        for v in views:
            self._hash.update(v)  # releases the GIL
        if after is not None:
            after()

    def _hash_range(self, start: int, end: int, after: Callable[[], None] | None) -> None:
        """Hash file bytes ``[start, end)`` (just written, so in the page cache) in large reads: two GIL
        hand-overs per ``HASH_READ`` bytes, however many pieces wrote them."""
        buf = self._hash_buf
        while start < end:
            n = os.preadv(self._fd, [buf[: min(len(buf), end - start)]], start)
            if n <= 0:
                raise OSError(errno.EIO, f"{self.tmp.name}: read back {n} bytes at {start} of what was written")
            self._hash.update(buf[:n])  # releases the GIL
            start += n
        if after is not None:
            after()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` next (it may run over several tensors) and return once it is hashed too."""
        self.put([memoryview(data).cast("B")]).result()

    def _write_behind(self) -> None:
        """Write-behind: start writeback of what was just written; wait for the oldest window once
        ``WRITE_BEHIND_DEPTH`` are under way.

        Without it the kernel keeps gigabytes dirty and writes them out at the final fsync, when no reads
        are going on; with it the disk writes while the next experts are read, dirty pages stay at a few
        windows, and the fsync at the end has little left to do."""
        if SYNC_FILE_RANGE is None:
            return
        start, end = self._behind, self._size
        SYNC_FILE_RANGE(self._fd, start, end - start, SFR_WRITE)
        self._windows.append((start, end))
        while len(self._windows) > WRITE_BEHIND_DEPTH:
            a, b = self._windows.popleft()
            SYNC_FILE_RANGE(self._fd, a, b - a, SFR_WAIT_BEFORE | SFR_WRITE | SFR_WAIT_AFTER)
        self._behind = end

    def _skip_empty(self) -> None:
        while self._idx < len(self._sizes) and self._left == 0:
            self._idx += 1
            self._left = self._sizes[self._idx] if self._idx < len(self._sizes) else 0

    @property
    def current(self) -> str | None:
        """The tensor the next byte belongs to."""
        return self.entries[self._idx].name if self._idx < len(self.entries) else None

    def finish(self) -> tuple[int, str]:
        if self._idx < len(self._sizes):
            raise RuntimeError(f"{self.path.name}: tensor {self.current} is missing {self._left} bytes")
        self._hasher.shutdown()  # waits for the last hashes
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self._size, self._hash.hexdigest()

    def abort(self) -> None:
        """Drop the temporary file."""
        self._hasher.shutdown(cancel_futures=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.tmp.unlink(missing_ok=True)


def write_file_atomic(path: Path, data: bytes, *, shared: bool = False) -> tuple[int, str]:
    """Write a small file under a temporary name, fsync, rename; returns (size, sha256). The temporary
    name is ``<name>.partial``; with ``shared`` (a file of the user's cache, which other runs may write
    at the same moment) it is this write's own, ``.<name>.<random>.partial``, so two writers never
    write into one file and the last rename wins whole."""
    path = Path(path)
    if shared:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
        tmp, fh = Path(name), os.fdopen(fd, "wb")
    else:
        tmp = path.with_name(path.name + PARTIAL_SUFFIX)
        fh = open(tmp, "wb")
    try:
        with fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if shared:
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return len(data), hashlib.sha256(data).hexdigest()
