"""Where a passed ``verify`` leaves its result: never in the folder it checked (a read-only model
store, the Hub cache), but on stdout, in ``--report PATH`` when asked, and in the user's cache keyed by
the sha256 of the checked manifest, where ``push`` finds it for the model card.

The cache is ``$NVFP4_FUSE_CACHE``, else ``$XDG_CACHE_HOME/nvfp4-fuse``, else ``~/.cache/nvfp4-fuse``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InputError
from .manifest import MANIFEST_NAME, sha256_file


def cache_dir() -> Path:
    if os.environ.get("NVFP4_FUSE_CACHE"):
        return Path(os.environ["NVFP4_FUSE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nvfp4-fuse"


def _manifest_digest(folder: Path) -> str | None:
    p = Path(folder) / MANIFEST_NAME
    return sha256_file(p) if p.is_file() else None


def write_report(path: Path, body: dict) -> None:
    """``--report PATH``: the result as JSON, written atomically; an OS error is an ``InputError``."""
    from .shard_writer import write_file_atomic

    try:
        write_file_atomic(Path(path), (json.dumps(body, indent=1) + "\n").encode())
    except OSError as e:
        raise InputError(f"cannot write the --report file: {e.strerror}", file=str(path)) from None


def record_verified(folder: Path, body: dict) -> Path | None:
    """Record a passed verify of ``folder``'s manifest in the cache; the path, or ``None`` when the cache
    cannot be written (a warning for the caller, not a failure)."""
    from .shard_writer import write_file_atomic

    digest = _manifest_digest(folder)
    if digest is None:
        return None
    p = cache_dir() / "verified" / f"{digest}.json"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(p, (json.dumps(dict(body, manifest_sha256=digest), indent=1) + "\n").encode(), shared=True)
    except OSError:
        return None
    return p


def read_verified(folder: Path) -> dict | None:
    """The last passed verify's result for ``folder``'s manifest as it is now, if one was recorded."""
    digest = _manifest_digest(folder)
    if digest is None:
        return None
    p = cache_dir() / "verified" / f"{digest}.json"
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict) or d.get("manifest_sha256") != digest:
        return None
    d.pop("manifest_sha256", None)
    return d
