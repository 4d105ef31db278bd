"""safetensors I/O: strict header reading, bounded reads by offset, and the streaming shard writer.

Reading: every shard's header is parsed here with the checks safetensors itself makes (contiguous,
non-overlapping byte ranges that cover the whole file, byte counts that match dtype and shape, a
100 MB header cap) plus those it does not (duplicate JSON keys, which safetensors silently resolves to
the last one). The file is then opened once with ``safetensors.safe_open`` too, so the library's own
parser agrees before any byte is used. Tensor bytes are read with ``os.pread`` by offset: one expert
at a time, no mmap, so resident memory stays bounded by what is being converted.

Writing: :class:`StreamingShardWriter` takes the complete list of tensors (name, dtype, shape) first,
writes the header, then accepts each tensor's bytes in order, in as many chunks as the caller likes,
hashing them on the way (on a helper thread, beside the write). Nothing is ever held for a whole shard.
Writeback is started every 32 MiB (``sync_file_range``) so the disk writes while the caller reads, and
the final fsync has little left. The file is written under a temporary name, fsynced, and renamed into
place only when every declared byte has arrived.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
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
HASH_OVERLAP_MIN = 1 << 20  # chunks at least this big are hashed beside the write, not after it
IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
PARTIAL_SUFFIX = ".partial"

# dtype string -> bits per element (safetensors' names)
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip

def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype name, or None (torch is imported here, lazily)."""
    import torch

    return {
        "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "I16": torch.int16, "F16": torch.float16, "BF16": torch.bfloat16,
        "I32": torch.int32, "F32": torch.float32, "I64": torch.int64, "F64": torch.float64, "BOOL": torch.bool,
    }.get(name)  # fmt: skip


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
            if n > MAX_HEADER_SIZE:
                raise InputError(f"header length {n} is over the {MAX_HEADER_SIZE}-byte limit", file=f)
            if 8 + n > size:
                raise InputError(f"header length {n} runs past the end of the {size}-byte file (truncated?)", file=f)
            raw = fh.read(n)
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


class ShardReader:
    """Reads tensors of one shard by offset with pread; keeps one file descriptor open."""

    def __init__(self, header: ShardHeader):
        self.header = header
        self._fd = os.open(header.path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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
        i = 0
        while i < len(views):
            n = os.preadv(self._fd, views[i : i + IOV_MAX], off)
            if n <= 0:
                raise InputError("file ended early while reading (truncated?)", file=str(self.header.path), tensor=name)
            off += n
            while n:  # drop what was filled; a short read leaves the rest of a view for the next call
                if n >= len(views[i]):
                    n -= len(views[i])
                    i += 1
                else:
                    views[i] = views[i][n:]
                    n = 0

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

    def read_into(self, name: str, views: list[memoryview]) -> None:
        """Fill ``views`` (in order) with the whole tensor's bytes: a tensor's bytes can land in scattered
        places of an output buffer without an intermediate copy."""
        t = self.header.tensors[name]
        total = sum(memoryview(v).nbytes for v in views)
        if total != t.nbytes:
            raise ValueError(f"{name}: views hold {total} bytes, the tensor {t.nbytes}")
        self._pread_into(views, self.header.data_start + t.begin, name)

    def read_tensor(self, name: str) -> torch.Tensor:
        import torch

        t = self.header.tensors[name]
        dt = torch_dtype(t.dtype)
        if dt is None:
            raise InputError(f"dtype {t.dtype} cannot be read as a tensor here", file=str(self.header.path), tensor=name)
        return torch.from_numpy(self.read_array(name)).view(dt).reshape(t.shape)


def tensor_bytes(t: torch.Tensor | np.ndarray) -> memoryview:
    """The raw little-endian bytes of a torch tensor or numpy array (any shape, 0-d included), without
    a copy if contiguous."""
    if isinstance(t, np.ndarray):
        return memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8))
    import torch

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


class StreamingShardWriter:
    """Header first, then each declared tensor's bytes in order; sha256 computed while writing.

    ``write(data)`` appends bytes to the current tensor and moves on when it is full, so callers can
    hand over one expert's slice at a time. ``finish()`` checks that every declared byte arrived,
    fsyncs, renames the temporary file into place, fsyncs the folder and returns (size, sha256).
    Anything else (an exception, a crash) leaves only the ``.partial`` file, never a complete-looking
    shard.
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
        self._fh = open(self.tmp, "wb")
        header = build_header(entries, metadata)
        self._size = 0
        self._behind = 0  # writeback has been started up to here
        self._windows: deque[tuple[int, int]] = deque()  # ranges under writeback, oldest first
        self._raw_write(header)
        self._skip_empty()

    def _raw_write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) >= HASH_OVERLAP_MIN:
            # sha256 and write(2) both release the GIL: hash on a helper thread while the bytes go out.
            fut = self._hasher.submit(self._hash.update, data)
            self._fh.write(data)
            fut.result()
        else:
            self._fh.write(data)
            self._hash.update(data)
        self._size += len(data)
        if self._size - self._behind >= WRITE_BEHIND:
            self._write_behind()

    def _write_behind(self) -> None:
        """Write-behind: start writeback of what was just written; wait for the oldest window once
        ``WRITE_BEHIND_DEPTH`` are under way.

        Without it the kernel keeps gigabytes dirty and writes them out at the final fsync, when no reads
        are going on; with it the disk writes while the next experts are read, dirty pages stay at a few
        windows, and the fsync at the end has little left to do."""
        if _SYNC_FILE_RANGE is None:
            return
        self._fh.flush()
        fd = self._fh.fileno()
        start, end = self._behind, self._size
        _SYNC_FILE_RANGE(fd, start, end - start, _SFR_WRITE)
        self._windows.append((start, end))
        while len(self._windows) > WRITE_BEHIND_DEPTH:
            a, b = self._windows.popleft()
            _SYNC_FILE_RANGE(fd, a, b - a, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
        self._behind = end

    def _skip_empty(self) -> None:
        while self._idx < len(self._sizes) and self._left == 0:
            self._idx += 1
            self._left = self._sizes[self._idx] if self._idx < len(self._sizes) else 0

    @property
    def current(self) -> str | None:
        return self.entries[self._idx].name if self._idx < len(self.entries) else None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            if self._idx >= len(self._sizes):
                raise RuntimeError(f"{self.path.name}: {len(mv)} bytes more than the header declares")
            n = min(self._left, len(mv))
            self._raw_write(mv[:n])
            mv = mv[n:]
            self._left -= n
            self._skip_empty()

    def finish(self) -> tuple[int, str]:
        if self._idx < len(self._sizes):
            raise RuntimeError(f"{self.path.name}: tensor {self.current} is missing {self._left} bytes")
        self._hasher.shutdown()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self._size, self._hash.hexdigest()

    def abort(self) -> None:
        self._hasher.shutdown(cancel_futures=True)
        if not self._fh.closed:
            self._fh.close()
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
