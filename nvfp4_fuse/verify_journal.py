"""A ``verify`` against a Hub repo, resumable: each output shard's result kept as soon as it is checked.

Verifying DeepSeek-V4-Pro against its repo downloads 865 GB of source; a run stopped at 90% (Ctrl-C, a
lost connection past its retries, a reboot) would download and check it all again. Here each shard's
result is written, once its checks passed, to a journal in the user's cache
(``<cache>/verify-progress/<key>.json``, the cache of :mod:`~nvfp4_fuse.verify_record`), and the next run
with the same key checks only the other shards and fetches only their source files. The key covers
what the results depend on: the converted folder, the sha256 of its manifest, the source commit, and
the options that change what is checked (the sample drawn and its seed, the end-to-end decode and
where it runs, hashing). A shard counts as checked only while its file is the one that was checked:
same size, modification time and inode (a shard rewritten since is checked again). A passed run
removes its journal (its result is then recorded as every passed verify's is); a failed one keeps what
passed before the failure.

Nothing here is needed for a run to work: a cache that cannot be written leaves runs as they were,
not resumable.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .shard_writer import write_file_atomic
from .verify_record import _manifest_digest, cache_dir
from .verify_result import VerifyResult

FORMAT = 1
FOLDER = "verify-progress"


def run_options(sample: int | None, seed: int | None, decode: str | None, hash_files: bool) -> dict[str, Any] | None:
    """The options of a verify that change what it checks, as its journal's key holds them (``decode``:
    where the end-to-end decode runs, None for none); None when the run cannot resume (a sample drawn
    without a seed: each run draws another)."""
    if sample and seed is None:
        return None
    return dict(sample=sample, seed=seed if sample else None, decode=decode, hash_files=hash_files)


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class VerifyJournal:
    """The checked shards of one verify (module doc): :meth:`kept` those still valid, :meth:`record`
    one more, :meth:`remove` at the end of a passed run."""

    def __init__(self, path: Path, key: str, conv_dir: Path):
        self.path, self.key, self.conv_dir = path, key, conv_dir
        self.entries: dict[str, dict[str, Any]] = {}
        try:
            d = json.loads(path.read_text())
            if d.get("format") == FORMAT and d.get("key") == key and isinstance(d.get("shards"), dict):
                self.entries = d["shards"]
        except (OSError, ValueError, AttributeError):
            pass

    @classmethod
    def open(cls, conv_dir: Path, commit: str, run: dict[str, Any]) -> VerifyJournal | None:
        """The journal of verifying ``conv_dir`` against source commit ``commit`` with options ``run``;
        None when the folder has no manifest."""
        conv_dir = Path(conv_dir).resolve()
        digest = _manifest_digest(conv_dir)
        if digest is None:
            return None
        what = json.dumps({"converted": str(conv_dir), "manifest": digest, "commit": commit, "run": run}, sort_keys=True)
        key = hashlib.sha256(what.encode()).hexdigest()
        return cls(cache_dir() / FOLDER / f"{key[:32]}.json", key, conv_dir)

    @classmethod
    def resume(cls, conv_dir: Path, commit: str, run: dict[str, Any] | None, names: list[str]) -> tuple[VerifyJournal | None, dict[str, VerifyResult]]:
        """(the journal of this run, or None where it cannot resume: ``run`` None, no manifest; the
        results of the shards among ``names`` it holds as passed, see :meth:`kept`)."""
        journal = cls.open(conv_dir, commit, run) if run is not None else None
        return journal, journal.kept(names) if journal is not None else {}

    def kept(self, names: list[str]) -> dict[str, VerifyResult]:
        """The results of the shards among ``names`` an earlier run checked, whose files are unchanged."""
        out = {}
        for name in names:
            e = self.entries.get(name)
            if e is not None and e.get("stat") == _stat(self.conv_dir / name):
                try:
                    out[name] = VerifyResult.from_json(e["result"])
                except (KeyError, TypeError, ValueError):
                    continue
        return out

    def record(self, name: str, result: VerifyResult) -> None:
        """Keep shard ``name``'s result (written whole under a temporary name, then renamed in)."""
        self.entries[name] = {"stat": _stat(self.conv_dir / name), "result": result.to_json()}
        data = json.dumps({"format": FORMAT, "key": self.key, "shards": self.entries}).encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomic(self.path, data, shared=True)
        except OSError:
            pass

    def remove(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass
