"""safetensors headers: strict parsing of a shard's header, and building the header of a shard to write.

Every shard's header is parsed here with the checks safetensors itself makes (contiguous,
non-overlapping byte ranges that cover the whole file, byte counts that match dtype and shape, a
100 MB header cap) plus those it does not (duplicate JSON keys, which safetensors silently resolves to
the last one). The file is then opened once with ``safetensors.safe_open`` too, so the library's own
parser agrees before any byte is used. :func:`header_from_json` makes the same checks on a header
fetched by other means (a range request to the Hub). :func:`build_header` lays out the header of an
output shard from its tensors' names, dtypes and shapes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

MAX_HEADER_SIZE = 100_000_000

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

