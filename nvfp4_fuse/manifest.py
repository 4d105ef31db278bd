"""The conversion manifest, ``nvfp4-fuse-manifest.json``: written last, it is what marks an output complete.

It records the tool version, the layout and options, a fingerprint of the input headers and of the
options, and for every file written, its size and sha256 (computed while writing). An output folder
without a manifest, or whose files do not match it, is not a complete conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

MANIFEST_NAME = "nvfp4-fuse-manifest.json"
MANIFEST_FORMAT = "nvfp4-fuse-manifest/1"
HASH_CHUNK = 16 << 20


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    tool_version: str
    layout: str
    target: str
    options: dict[str, Any]
    input_fingerprint: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"size", "sha256"}
    source: dict[str, Any] = field(default_factory=dict)
    model_card: str | None = None  # sha256 of the README.md that `push` wrote over the source's

    @property
    def options_fingerprint(self) -> str:
        return fingerprint(self.options)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "tool": "nvfp4-fuse",
            "tool_version": self.tool_version,
            "layout": self.layout,
            "target": self.target,
            "options": self.options,
            "options_fingerprint": self.options_fingerprint,
            "input_fingerprint": self.input_fingerprint,
            "source": self.source,
            "files": dict(sorted(self.files.items())),
            "model_card": self.model_card,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != MANIFEST_FORMAT:
            raise InputError(f"not an nvfp4-fuse manifest (format {d.get('format')!r})", file=MANIFEST_NAME)
        try:
            return cls(
                tool_version=d["tool_version"],
                layout=d["layout"],
                target=d["target"],
                options=d["options"],
                input_fingerprint=d["input_fingerprint"],
                files=d["files"],
                source=d.get("source", {}),
                model_card=d.get("model_card"),
            )
        except (KeyError, TypeError) as e:
            raise InputError(f"manifest is missing field {e}", file=MANIFEST_NAME) from None


def load_manifest(folder: Path) -> Manifest | None:
    p = Path(folder) / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        return Manifest.from_json(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise InputError(f"manifest is not valid JSON: {e}", file=str(p)) from None


def manifest_bytes(manifest: Manifest) -> bytes:
    """The manifest file's bytes (what :func:`save_manifest` writes and ``push`` uploads)."""
    return (json.dumps(manifest.to_json(), indent=1) + "\n").encode()


def save_manifest(folder: Path, manifest: Manifest) -> None:
    from .shard_writer import write_file_atomic

    write_file_atomic(Path(folder) / MANIFEST_NAME, manifest_bytes(manifest))


def check_files(folder: Path, manifest: Manifest, *, hash_files: bool = True) -> list[str]:
    """Problems found comparing the folder's files with the manifest (empty list: all match)."""
    problems = []
    for name, rec in manifest.files.items():
        p = Path(folder) / name
        if not p.is_file():
            problems.append(f"{name}: missing")
            continue
        size = os.path.getsize(p)
        if size != rec["size"]:
            problems.append(f"{name}: size {size} != manifest {rec['size']}")
            continue
        if hash_files and sha256_file(p) != rec["sha256"]:
            problems.append(f"{name}: sha256 differs from manifest")
    return problems
