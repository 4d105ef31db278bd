"""A pinned Hub commit scanned like a local checkpoint folder, without downloading a weight.

Every shard's header is read with range requests (its first 256 KiB, and the rest of the header if it
is longer), so the :class:`~nvfp4_fuse.safetensors_header.ShardHeader` it gives is byte for byte what a
local read of the downloaded file gives (same raw header, data start and file size, hence the same
input fingerprint). The index and the configs are read whole (small files), the other files listed
as sidecars by the rules of a local scan, and the scalar scales (what the plan needs besides the
headers) read with coalesced range requests, a few per shard, by :class:`RemoteScalars`.
"""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..encoded_scales import find_encoded_scales
from ..errors import InputError
from ..safetensors_header import MAX_HEADER_SIZE, ShardHeader, header_from_json, loads_strict_json
from ..source import CONFIG_FILES, INDEX_NAME, Source, index_shards, is_sidecar, parse_config, tensor_files
from .fetch import PinnedRepo
from .ranges import RemoteRangeReader, coalesce

HEADER_PROBE = 256 << 10  # bytes asked for first: the length prefix and, mostly, the whole header
SCALAR_MAX_BYTES = 16  # tensors this small are read with the scalars of their shard
# Scalars further apart than this are asked for apart: the source is downloaded anyway, so reading
# through megabytes of weights to save a request costs more than it saves. (safetensors' save_file
# puts a shard's F32 scalars together: one request a shard.)
SCALAR_MAX_GAP = 64 << 10


def _header(reader: RemoteRangeReader, fname: str, size: int) -> ShardHeader:
    if size < 8:
        raise InputError(f"file is {size} bytes, too short for a safetensors header", file=fname)
    head = reader._get(fname, 0, min(size, HEADER_PROBE))
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_SIZE:
        raise InputError(f"header length {n} is over the {MAX_HEADER_SIZE}-byte limit", file=fname)
    if 8 + n > size:
        raise InputError(f"header length {n} runs past the end of the {size}-byte file (truncated?)", file=fname)
    raw = head[8 : 8 + n]
    if len(raw) < n:
        raw += reader._get(fname, len(head), 8 + n)
    if not raw.lstrip(b" ").startswith(b"{"):
        raise InputError("header does not start with '{'", file=fname)
    obj = loads_strict_json(raw, what="safetensors header", file=fname)
    return header_from_json(Path(fname), obj, data_start=8 + n, file_size=size, raw_header=raw)


def hub_source(pinned: PinnedRepo, reader: RemoteRangeReader) -> Source:
    """The :class:`Source` of a pinned commit (``root`` is the repo id, a label: no file is local)."""
    listing = pinned.files
    had_index = INDEX_NAME in listing
    if had_index:
        raw = reader.get_file(INDEX_NAME)
        if raw is None:
            raise InputError(f"{pinned.repo_id}@{pinned.sha[:12]} lists {INDEX_NAME} but does not serve it")
        wm, files = index_shards(raw, file=INDEX_NAME)
        for f in files:
            if f not in listing:
                raise InputError("index names a shard that does not exist", file=f)
    else:
        files = sorted(p for p in listing if p.endswith(".safetensors") and "/" not in p)
        if not files:
            raise InputError(f"{pinned.repo_id}@{pinned.revision}: no {INDEX_NAME} and no *.safetensors files")
        wm = None
    with ThreadPoolExecutor(reader.workers) as pool:
        headers = dict(zip(files, pool.map(lambda f: _header(reader, f, listing[f].size), files)))
    tensor_file = tensor_files(headers, wm)
    configs = {}
    for c in CONFIG_FILES:
        if c in listing:
            raw = reader.get_file(c)
            if raw is not None:
                configs[c] = parse_config(raw, c, file=c)
    shard_set = set(files)
    sidecars = sorted(p for p in listing if is_sidecar(p, shard_set, had_index, file=p))
    encoded = find_encoded_scales(headers, tensor_file, configs)
    sizes = {p: f.size for p, f in listing.items()}
    return Source(Path(pinned.repo_id), headers, tensor_file, sidecars, configs, had_index, encoded, sizes)


class _ShardScalars:
    def __init__(self, owner: RemoteScalars, fname: str):
        self.owner, self.fname = owner, fname
        self.blobs: dict[str, bytes] | None = None

    def read_small(self, name: str) -> bytes:
        if self.blobs is None:
            self.blobs = self.owner._read_shard(self.fname)
        if name not in self.blobs:  # not among the small tensors: read it alone
            t = self.owner.headers[self.fname].tensors[name]
            start = self.owner.headers[self.fname].data_start
            return self.owner.reader._get(self.fname, start + t.begin, start + t.end)
        return self.blobs[name]


class RemoteScalars(dict):
    """``{shard: reader}`` with ``read_small`` (what the plan's scalar reading calls), backed by range
    requests: the first read in a shard fetches all its tensors of at most 16 bytes, coalesced."""

    def __init__(self, headers: dict[str, ShardHeader], reader: RemoteRangeReader):
        super().__init__()
        self.headers, self.reader = headers, reader
        for f in headers:
            self[f] = _ShardScalars(self, f)

    def _read_shard(self, fname: str) -> dict[str, bytes]:
        h = self.headers[fname]
        small = [t for t in h.tensors.values() if t.nbytes <= SCALAR_MAX_BYTES]
        rngs = [(h.data_start + t.begin, h.data_start + t.end) for t in small]
        out: dict[str, bytes] = {}
        for span in scalar_spans(rngs):
            blob = self.reader._get(fname, span.begin, span.end)
            for i in span.members:
                b, e = rngs[i]
                out[small[i].name] = blob[b - span.begin : e - span.begin]
        return out

    def prefetch(self) -> None:
        """Read every shard's scalars now, several shards at once."""
        with ThreadPoolExecutor(self.reader.workers) as pool:
            blobs = dict(zip(self.headers, pool.map(self._read_shard, self.headers)))
        for f, b in blobs.items():
            self[f].blobs = b


def scalar_spans(rngs: list[tuple[int, int]]):
    """The requests that read these scalar ranges of one shard."""
    return coalesce(rngs, max_gap=SCALAR_MAX_GAP)


def describe_requests(reader: RemoteRangeReader) -> dict[str, int]:
    s = reader.stats
    return {"range_requests": s.requests, "range_bytes": s.bytes, "whole_file_requests": s.file_requests}


__all__ = ["RemoteScalars", "describe_requests", "hub_source"]
