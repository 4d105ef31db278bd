"""A source checkpoint as read from disk (or from the Hub's shard headers): shards, index, configs.

Scanning a folder reads the index (or the lone ``model.safetensors``) and cross-checks it with every
shard header, reads ``config.json`` / ``hf_quant_config.json`` strictly, and lists every other file
(sidecars, copied as they are). Symlinks may not lead out of the folder (or, for a Hub cache snapshot,
out of the repo's cache folder). Compressed block scales (``encoded_scales.py``) are found here, so
every reader sees them as the E4M3 matrices they decode to (:meth:`Source.refs`). Nothing here knows
about experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .encoded_scales import EncodedScale, find_encoded_scales
from .errors import InputError
from .manifest import MANIFEST_NAME, fingerprint
from .safetensors_header import ShardHeader, TensorInfo, loads_strict_json, read_header
from .shard_writer import PARTIAL_SUFFIX

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_FILES = ("config.json", "hf_quant_config.json")


@dataclass(frozen=True)
class SourceRef:
    file: str  # shard file name, relative to the source folder
    info: TensorInfo
    reciprocal: bool = False  # compressed-tensors global scale
    encoded: EncodedScale | None = None  # a compressed block scale: ``info`` is what it decodes to


@dataclass
class Source:
    """A scanned source checkpoint folder."""

    root: Path
    headers: dict[str, ShardHeader]  # shard file name -> header
    tensor_file: dict[str, str]  # tensor name -> shard file name, in source order
    sidecars: list[str]  # relative paths of every other file to copy
    configs: dict[str, dict[str, Any]]  # parsed config.json / hf_quant_config.json (if present)
    had_index: bool
    encoded: dict[str, EncodedScale] = field(default_factory=dict)  # compressed block scales, by name
    remote_sizes: dict[str, int] | None = None  # a Hub source: every file's size (no file is local)

    def refs(self) -> Iterator[tuple[str, SourceRef]]:
        """Every tensor as the converter reads it, in source order: a compressed block scale once, as
        the E4M3 matrix it decodes to, where its first stream stands; its streams not on their own."""
        first = {enc.first: enc for enc in self.encoded.values()}
        streams = {i.name for enc in self.encoded.values() for _, i in enc.streams.values()}
        for name, fname in self.tensor_file.items():
            enc = first.get(name)
            if enc is not None:
                yield enc.name, SourceRef(fname, enc.info, encoded=enc)
            elif name not in streams:
                yield name, SourceRef(fname, self.headers[fname].tensors[name])

    def fingerprint(self) -> str:
        """Fingerprint of every shard header and config: a rerun on other input is told apart."""
        return fingerprint(
            {
                "headers": {n: h.raw_header.decode("utf-8", "replace") for n, h in sorted(self.headers.items())},
                "sizes": {n: h.file_size for n, h in sorted(self.headers.items())},
                "configs": self.configs,
            }
        )


def _inside(root: Path, p: Path, what: str) -> Path:
    """Resolve p (following symlinks) and make sure it stays under root."""
    try:
        real = p.resolve(strict=True)
    except FileNotFoundError:
        raise InputError(f"{what} does not exist", file=str(p)) from None
    except (OSError, RuntimeError) as e:  # symlink loops and the like
        raise InputError(f"{what} cannot be resolved: {e}", file=str(p)) from None
    if not real.is_relative_to(root):
        raise InputError(f"{what} leads outside the source folder (to {real})", file=str(p))
    return real


def _safe_relpath(name: Any, *, file: str) -> str:
    if not isinstance(name, str) or not name:
        raise InputError(f"index names a shard that is not a file name: {name!r}", file=file)
    pp = Path(name)
    if pp.is_absolute() or ".." in pp.parts or name.startswith("/") or "\\" in name:
        raise InputError(f"index names a shard path outside the folder: {name!r}", file=file)
    return name


def index_shards(raw: bytes, *, file: str) -> tuple[dict[str, str], list[str]]:
    """An index file's weight map and the shard files it names (sorted), checked to be plain paths."""
    idx = loads_strict_json(raw, what="index", file=file)
    wm = idx.get("weight_map") if isinstance(idx, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise InputError("index has no weight_map", file=file)
    for v in wm.values():
        if not isinstance(v, str):
            _safe_relpath(v, file=file)  # raises
    return wm, sorted({_safe_relpath(f, file=file) for f in set(wm.values())})


def tensor_files(headers: dict[str, ShardHeader], wm: dict[str, str] | None) -> dict[str, str]:
    """tensor -> shard file, in source order, checking the index (if any) against the headers."""
    tensor_file: dict[str, str] = {}
    order = sorted(
        ((fname, t) for fname, h in headers.items() for t in h.tensors.values()), key=lambda x: (x[0], x[1].begin)
    )
    for fname, t in order:
        if t.name in tensor_file:
            raise InputError(f"tensor is defined in both {tensor_file[t.name]} and {fname}", tensor=t.name)
        if wm is not None:
            listed = wm.get(t.name)
            if listed is None:
                raise InputError("shard holds a tensor that the index does not list", file=fname, tensor=t.name)
            if listed != fname:
                raise InputError(f"index says the tensor is in {listed}, but it is in {fname}", tensor=t.name)
        tensor_file[t.name] = fname
    if wm is not None:
        for t, fname in wm.items():
            if t not in tensor_file:
                raise InputError(f"index lists a tensor that {fname} does not hold", file=fname, tensor=t)
    return tensor_file


def parse_config(raw: bytes, name: str, *, file: str) -> dict[str, Any]:
    obj = loads_strict_json(raw, what=name, file=file)
    if not isinstance(obj, dict):
        raise InputError(f"{name} is not a JSON object", file=file)
    return obj


def is_sidecar(rel: str, shard_set: set[str], had_index: bool, *, file: str) -> bool:
    """Whether the file at ``rel`` (posix, relative to the checkpoint) is copied as it is: every file
    but the shards, the index, hidden ones (.cache/, .git/), a manifest and partial files. A
    safetensors file the index does not name is refused."""
    if any(part.startswith(".") for part in rel.split("/")):
        return False  # .cache/, .git/, editor files: not part of the checkpoint
    if rel in shard_set or rel == INDEX_NAME:
        return False
    if rel.endswith(".safetensors") and had_index:
        raise InputError("safetensors file that the index does not name", file=file)
    return not (rel == MANIFEST_NAME or rel.endswith(PARTIAL_SUFFIX))


def scan_source(root: Path, *, trust_root: Path | None = None) -> Source:
    """Read the index, every shard header and the configs of a local checkpoint folder.

    ``trust_root`` is the folder symlinks may point into (a Hub cache's repo folder, whose snapshot
    files are links to its blobs); for a plain folder it is the folder itself.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("source is not a folder", file=str(root))
    trust = (trust_root or root).resolve()
    index_path = root / INDEX_NAME
    had_index = index_path.exists()
    if had_index:
        _inside(trust, index_path, "index")
        wm, files = index_shards(index_path.read_bytes(), file=str(index_path))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            raise InputError(f"no {INDEX_NAME} and no *.safetensors files", file=str(root))
        wm = None
    headers: dict[str, ShardHeader] = {}
    for fname in files:
        p = root / fname
        if not p.exists() and not p.is_symlink():
            raise InputError("index names a shard that does not exist", file=str(p))
        _inside(trust, p, "shard")
        headers[fname] = read_header(p)
    tensor_file = tensor_files(headers, wm)
    configs: dict[str, dict[str, Any]] = {}
    for c in CONFIG_FILES:
        p = root / c
        if p.exists():
            _inside(trust, p, c)
            configs[c] = parse_config(p.read_bytes(), c, file=str(p))
    sidecars = []
    shard_set = set(files)
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_dir() and not p.is_symlink():
            continue
        if not is_sidecar(rel.as_posix(), shard_set, had_index, file=str(p)):
            continue
        real = _inside(trust, p, "file")
        if real.is_dir():
            raise InputError("symlink to a folder inside the checkpoint is not supported", file=str(p))
        sidecars.append(rel.as_posix())
    return Source(root, headers, tensor_file, sidecars, configs, had_index, find_encoded_scales(headers, tensor_file, configs))


def source_from_headers(label: str, headers: dict[str, ShardHeader], *, sharded: bool) -> Source:
    """A Source from shard headers alone (the Hub's, read by range requests), for a dry-run plan:
    no configs, no sidecars (compressed block scales are then known by their stream names alone)."""
    order = sorted(((f, t) for f, h in headers.items() for t in h.tensors.values()), key=lambda x: (x[0], x[1].begin))
    tensor_file = {t.name: f for f, t in order}
    return Source(Path(label), headers, tensor_file, [], {}, sharded, find_encoded_scales(headers, tensor_file, {}, configs_read=False))
