"""Can a folder be written? Asked before any work, so that a read-only mount, a folder without
permission or a file in the way is one clear line at once (and ``--dry-run`` predicts it), not an
``OSError`` after minutes of work."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError


def nearest_existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def writable_problem(folder: Path) -> str | None:
    """Why ``folder`` (which may not exist yet) cannot be created or written, or ``None``."""
    p = nearest_existing(folder)
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    try:
        if os.statvfs(p).f_flag & os.ST_RDONLY:
            return f"{p} is on a read-only file system"
    except OSError:
        pass
    # access(2) also answers EROFS for a read-only mount; root passes permission bits, as it would when writing
    if not os.access(p, os.W_OK | os.X_OK):
        return f"no permission to write in {p}"
    return None


def require_writable(folder: Path, what: str) -> None:
    """``InputError`` naming the path when ``folder`` cannot be written (``what``: for the message)."""
    problem = writable_problem(folder)
    if problem:
        raise InputError(f"cannot write the {what}: {problem}")
