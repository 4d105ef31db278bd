"""safetensors I/O: strict header reading, reads and mapped views by offset, and the streaming shard writer.

Reading: every shard's header is parsed here with the checks safetensors itself makes (contiguous,
non-overlapping byte ranges that cover the whole file, byte counts that match dtype and shape, a
100 MB header cap) plus those it does not (duplicate JSON keys, which safetensors silently resolves to
the last one). The file is then opened once with ``safetensors.safe_open`` too, so the library's own
parser agrees before any byte is used. Tensor bytes are read with ``os.pread`` by offset, or seen in
place through a read-only mapping of the file (:meth:`ShardReader.view`, :meth:`ShardReader.span`):
the converter writes and hashes packed values from there without copying them through a buffer of
its own, and drops each range from the mapping once it is done with it.

Writing: :class:`StreamingShardWriter` takes the complete list of tensors (name, dtype, shape) first,
writes the header, then accepts each tensor's bytes in order, as pieces (mapped views, source spans,
computed arrays) that :func:`write_pieces` writes with ``pwritev`` and ``copy_file_range``; a helper
thread hashes the same bytes beside the writes: large pieces in place, many small ones (row runs of a
few KiB) read back from the page cache in large reads, since hashing them one by one costs a GIL
hand-over each. Nothing is ever held for a whole shard. Writeback is started every 32 MiB
(``sync_file_range``) so the disk writes while the caller reads, and the final fsync has little left.
The file is written under a temporary name, fsynced, and renamed into place only when every declared
byte has arrived.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import struct
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    import torch

MAX_HEADER_SIZE = 100_000_000
WRITE_BEHIND = 32 << 20  # start writeback of every this many bytes at once
WRITE_BEHIND_DEPTH = 8  # windows under writeback before the writer waits for the oldest (256 MiB)
# A put of more pieces than this (the 8-row gate/up interleave: hundreds of a few KiB each) is hashed
# from the file in reads of HASH_READ bytes, not piece by piece: each hashed piece is a GIL hand-over,
# and with several streams and the task pool wanting the GIL those held a stream to half the hash rate.
HASH_VIEWS_MAX = 16
HASH_READ = 8 << 20
IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
PARTIAL_SUFFIX = ".partial"
# What a read fault on a file mapping maps besides its own page (ShardReader.release drops all of it):
# Linux maps the cached pages of a window this large around the fault (fault_around_bytes, 64 KiB by
# default), aligned in the address space, not in the file; and since 6.18 it maps every page-cache
# folio touching that window whole. Folios are aligned to their size in the file, and with 4 KiB
# pages at most 2 MiB (PMD) large.
FAULT_AROUND = max(64 << 10, mmap.PAGESIZE)
LARGEST_FOLIO = max(2 << 20, mmap.PAGESIZE)

# dtype string -> bits per element (safetensors' names)
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip

def tensor_nbytes(dtype: str, shape: list[int] | tuple[int, ...]) -> int:
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    if bits % 8:
        raise ValueError(f"{dtype}{list(shape)} does not end on a byte boundary")
    return bits // 8


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class ShardHeader:
    path: Path
    data_start: int  # absolute offset of the data section
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    file_size: int
    raw_header: bytes = field(repr=False, default=b"")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):  # the slow search only when there is something to find
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return d


class _DuplicateKey(Exception):
    pass


def loads_strict_json(text: str | bytes, *, what: str, file: str) -> Any:
    """json.loads that rejects duplicate keys and reports errors as InputError."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise InputError(f"{what} is not valid UTF-8", file=file) from None
    except _DuplicateKey as e:
        raise InputError(f"{what} has the key {e.args[0]!r} twice", file=file) from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} is not valid JSON ({e.msg} at char {e.pos})", file=file) from None


def _what_file(head: bytes) -> str:
    """What a file that is not safetensors looks like, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive (a PyTorch .bin/.pt checkpoint?)"
    if head[:1] == b"\x80":
        return "it is a Python pickle (a PyTorch .bin checkpoint?)"
    if head.lstrip()[:1] in (b"{", b"["):
        return "it is JSON"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer (run `git lfs pull`)"
    if all(32 <= c < 127 or c in (9, 10, 13) for c in head[:16]):
        return f"it is text ({head[:16].decode()!r}...)"
    return f"its first bytes are {head[:9].hex(' ')}, not an 8-byte header length and a JSON header"


def read_header(path: Path) -> ShardHeader:
    """Parse and validate one safetensors file's header; raise InputError naming file and tensor."""
    path = Path(path)
    f = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"file is {size} bytes, too short for a safetensors header", file=f)
            (n,) = struct.unpack("<Q", head)
            first = fh.read(1)
            if first not in (b"{", b" ") and (n > MAX_HEADER_SIZE or 8 + n > size):
                fh.seek(0)
                raise InputError(f"not a safetensors file: {_what_file(fh.read(64))}", file=f)
            if n > MAX_HEADER_SIZE:
                raise InputError(f"header length {n} is over the {MAX_HEADER_SIZE}-byte limit", file=f)
            if 8 + n > size:
                raise InputError(f"header length {n} runs past the end of the {size}-byte file (truncated?)", file=f)
            raw = first + fh.read(n - 1) if n else b""
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", file=f) from None
    if not raw.lstrip(b" ").startswith(b"{"):
        raise InputError("header does not start with '{'", file=f)
    obj = loads_strict_json(raw, what="safetensors header", file=f)
    header = header_from_json(path, obj, data_start=8 + n, file_size=size, raw_header=raw)
    _check_with_safetensors(path)
    return header


_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _uints(xs: Any, bound: int) -> bool:
    """A list of non-negative integers below ``bound`` (bools are not integers here)."""
    return type(xs) is list and all(type(d) is int and 0 <= d < bound for d in xs)


def header_from_json(
    path: Path, obj: Any, *, data_start: int, file_size: int | None, raw_header: bytes = b""
) -> ShardHeader:
    """A :class:`ShardHeader` from a parsed header object, with every check of :func:`read_header`.

    ``file_size`` None (a remote shard whose size is not known) skips the check that the tensors end
    exactly where the file does; every other check still runs.
    """
    f = str(path)
    if not isinstance(obj, dict):
        raise InputError("header is not a JSON object", file=f)
    obj = dict(obj)
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise InputError("__metadata__ must map strings to strings", file=f)
    tensors: dict[str, TensorInfo] = {}
    for name, spec in obj.items():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"tensor name {name!r} is not valid Unicode (a lone surrogate escape)", file=f) from None
        if type(spec) is not dict or spec.keys() != _ENTRY_KEYS:
            raise InputError("tensor entry must have exactly dtype, shape and data_offsets", file=f, tensor=name)
        dtype, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in DTYPE_BITS:
            raise InputError(f"unknown dtype {dtype!r}", file=f, tensor=name)
        if not _uints(shape, 2**63):
            # (a dimension must also fit a signed 64-bit integer, as torch and numpy need it to)
            raise InputError(f"shape {shape!r} is not a list of non-negative 64-bit integers", file=f, tensor=name)
        if not _uints(offs, 2**64) or len(offs) != 2 or offs[0] > offs[1]:
            raise InputError(f"data_offsets {offs!r} are not [begin, end] with begin <= end", file=f, tensor=name)
        try:
            want = tensor_nbytes(dtype, shape)
        except ValueError as e:
            raise InputError(str(e), file=f, tensor=name) from None
        if offs[1] - offs[0] != want:
            raise InputError(
                f"{dtype}{shape} needs {want} bytes but data_offsets {offs} hold {offs[1] - offs[0]}", file=f, tensor=name
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), offs[0], offs[1])
    # Contiguous, non-overlapping cover of the data section, as safetensors requires.
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin < pos:
            raise InputError(f"byte range [{t.begin}, {t.end}) overlaps the previous tensor", file=f, tensor=t.name)
        if t.begin > pos:
            raise InputError(f"hole in the data section before byte {t.begin}", file=f, tensor=t.name)
        pos = t.end
    if file_size is not None:
        data_len = file_size - data_start
        if pos > data_len:
            raise InputError(f"tensors end at data byte {pos} but the file holds only {data_len} (truncated?)", file=f)
        if pos < data_len:
            raise InputError(f"{data_len - pos} bytes after the last tensor are not covered by the header", file=f)
    return ShardHeader(path, data_start, tensors, metadata, file_size if file_size is not None else data_start + pos, raw_header)


def _check_with_safetensors(path: Path) -> None:
    """Let safetensors' own parser confirm the layout (it reads only the header)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            fh.keys()
    except Exception as e:  # safetensors raises its own SafetensorError and friends
        raise InputError(f"safetensors rejects the file: {e}", file=str(path)) from None


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
        self._map: mmap.mmap | None = None
        self._skew = 0
        self._map_lock = threading.Lock()
        self._held: dict[tuple[int, int], int] = {}  # (begin, end) -> holders: see held_array
        self._held_lock = threading.Lock()

    @property
    def fd(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._map is not None:
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
                self._skew = first.ctypes.data % FAULT_AROUND  # where the mapping starts in its window
                del first
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
        a = begin - (begin + self._skew) % FAULT_AROUND
        b = end + (-(end + self._skew)) % FAULT_AROUND
        a = max(0, a - a % LARGEST_FOLIO)
        b = min(b + (-b) % LARGEST_FOLIO, len(self._map))
        with self._held_lock:
            n = self._held.pop((begin, end), 0)
            if n > 1:
                self._held[(begin, end)] = n - 1
            kept = sorted(r for r in self._held if r[0] < b and r[1] > a)
        for lo, hi in _gaps(a, b, kept):
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
        if _vectored(os.preadv, self._fd, views, off) < 0:
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



def tensor_bytes(t: torch.Tensor | np.ndarray) -> memoryview:
    """The raw little-endian bytes of a torch tensor or numpy array (any shape, 0-d included), without
    a copy if contiguous."""
    if isinstance(t, np.ndarray):
        return memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8))
    import torch

    if t.numel() == 0:  # torch will not view an empty tensor of wider elements as bytes
        return memoryview(b"")
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class OutEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def build_header(entries: list[OutEntry], metadata: dict[str, str] | None) -> bytes:
    """8-byte length + JSON header padded with spaces to a multiple of 8; tensors laid out in order."""
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = metadata
    pos = 0
    for e in entries:
        n = e.nbytes
        obj[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + n]}
        pos += n
    js = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gaps(a: int, b: int, kept: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
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


_SYNC_FILE_RANGE = _load_sync_file_range()
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4

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


def _vectored(call: Any, fd: int, views: list[memoryview], off: int) -> int:
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


def _pwrite_all(fd: int, views: list[memoryview], off: int) -> int:
    """Write ``views`` in order at file offset ``off`` with vectored pwrites (short writes resumed)."""
    end = _vectored(os.pwritev, fd, views, off)
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
        if _SYNC_FILE_RANGE is None:
            return
        start, end = self._behind, self._size
        _SYNC_FILE_RANGE(self._fd, start, end - start, _SFR_WRITE)
        self._windows.append((start, end))
        while len(self._windows) > WRITE_BEHIND_DEPTH:
            a, b = self._windows.popleft()
            _SYNC_FILE_RANGE(self._fd, a, b - a, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
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


def write_file_atomic(path: Path, data: bytes) -> tuple[int, str]:
    """Write a small file under a temporary name, fsync, rename; returns (size, sha256)."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return len(data), hashlib.sha256(data).hexdigest()
