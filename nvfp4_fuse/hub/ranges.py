"""Small tensors of a Hub repo's shards, read with HTTP range requests, nearby ones in one request.

``inspect`` needs every scalar scale of a checkpoint (DeepSeek-V4-Pro has ~140k of them) without
downloading the weights. Each shard's length prefix is read once (8 bytes: where its data section
starts), then the wanted byte ranges are sorted and coalesced (:func:`coalesce`): two ranges go in one
request when the gap between them is at most ``max_gap`` bytes and the request stays within
``max_span`` bytes. Writers that sort tensors by dtype (safetensors' own ``save_file`` does) keep all
F32 scalars of a shard next to each other, so a shard's scalars take one request or a few.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import InputError
from ..safetensors_header import ShardHeader
from .retry import with_retries

DEFAULT_MAX_GAP = 1 << 20  # bytes between two wanted ranges read through rather than asked for apart
DEFAULT_MAX_SPAN = 32 << 20  # bytes one request may cover


@dataclass(frozen=True)
class Span:
    begin: int  # absolute offset in the file
    end: int  # exclusive
    members: tuple[int, ...]  # indices of the wanted ranges it covers


def coalesce(ranges: list[tuple[int, int]], *, max_gap: int = DEFAULT_MAX_GAP, max_span: int = DEFAULT_MAX_SPAN) -> list[Span]:
    """Group ``[begin, end)`` ranges of one file into requests: sorted by offset, a range joins the
    previous request when it starts at most ``max_gap`` bytes after that request's end and the
    request then covers at most ``max_span`` bytes (a single range longer than that is its own)."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    out: list[Span] = []
    cur: list[int] = []
    b = e = 0
    for i in order:
        rb, re_ = ranges[i]
        if cur and rb - e <= max_gap and max(e, re_) - b <= max_span:
            cur.append(i)
            e = max(e, re_)
            continue
        if cur:
            out.append(Span(b, e, tuple(cur)))
        cur, b, e = [i], rb, re_
    if cur:
        out.append(Span(b, e, tuple(cur)))
    return out


@dataclass
class RangeStats:
    requests: int = 0  # HTTP range requests made (length prefixes included)
    bytes: int = 0  # bytes they returned
    file_requests: int = 0  # whole small files fetched (configs)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self.lock:
            self.requests += 1
            self.bytes += n


class RemoteRangeReader:
    """Reads byte ranges of a repo's files with ``Range`` requests through huggingface_hub's session
    (its token, endpoint and proxies), with the Hub retries of :mod:`.retry`."""

    def __init__(self, repo_id: str, *, revision: str | None = None, workers: int = 8, retries: int = 3, backoff: float = 1.0):
        self.repo_id = repo_id
        self.revision = revision
        self.workers = workers
        self.retries = retries
        self.backoff = backoff
        self.stats = RangeStats()

    def _get(self, filename: str, begin: int, end: int) -> bytes:
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo_id, filename, revision=self.revision, endpoint=constants.ENDPOINT)
        headers = build_hf_headers()
        headers["Range"] = f"bytes={begin}-{end - 1}"

        def call() -> bytes:
            r = get_session().get(url, headers=headers, follow_redirects=True)
            hf_raise_for_status(r)
            return r.content

        data, _ = with_retries(
            f"reading {filename}", call, repo_id=self.repo_id, retries=self.retries, backoff=self.backoff, revision=self.revision
        )
        self.stats.add(len(data))
        if len(data) != end - begin:
            raise InputError(f"asked the Hub for bytes {begin}-{end - 1}, got {len(data)} bytes back", file=filename)
        return data

    def get_file(self, filename: str) -> bytes | None:
        """A whole small file (a config), or None when the repo has no such file."""
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo_id, filename, revision=self.revision, endpoint=constants.ENDPOINT)

        def call() -> bytes | None:
            r = get_session().get(url, headers=build_hf_headers(), follow_redirects=True)
            if r.status_code == 404:
                return None
            hf_raise_for_status(r)
            return r.content

        data, _ = with_retries(
            f"reading {filename}", call, repo_id=self.repo_id, retries=self.retries, backoff=self.backoff, revision=self.revision
        )
        self.stats.file_requests += 1
        return data

    def data_start(self, filename: str) -> int:
        """Where a shard's data section starts: 8 + its header length (one 8-byte request)."""
        (n,) = struct.unpack("<Q", self._get(filename, 0, 8))
        return 8 + n

    def read_tensors(self, wanted: Iterable[tuple[str, str]], headers: dict[str, ShardHeader]) -> dict[str, bytes]:
        """The bytes of each (file, tensor name) in ``wanted``, coalesced per file."""
        by_file: dict[str, list[str]] = {}
        for f, name in wanted:
            by_file.setdefault(f, []).append(name)
        jobs: list[tuple[str, Span, list[tuple[str, int, int]]]] = []
        with ThreadPoolExecutor(self.workers) as pool:
            starts = dict(zip(by_file, pool.map(self.data_start, by_file)))
            for f, names in by_file.items():
                infos = [headers[f].tensors[n] for n in names]
                rngs = [(starts[f] + t.begin, starts[f] + t.end) for t in infos]
                for span in coalesce(rngs):
                    jobs.append((f, span, [(names[i], *rngs[i]) for i in span.members]))
            blobs = list(pool.map(lambda j: self._get(j[0], j[1].begin, j[1].end), jobs))
        out: dict[str, bytes] = {}
        for (_, span, members), blob in zip(jobs, blobs):
            for name, b, e in members:
                out[name] = blob[b - span.begin : e - span.begin]
        return out
