"""Shard headers of a Hub repo, read with HTTP range requests (no weights downloaded), as the same
:class:`~nvfp4_fuse.safetensors_header.ShardHeader` a local read gives, with the same checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, PushFailed
from ..safetensors_header import ShardHeader, header_from_json
from .errors import first_line
from .retry import with_retries


@dataclass
class RemoteHeaders:
    headers: dict[str, ShardHeader]  # shard file name -> header (``data_start`` unknown: 0)
    weight_map: dict[str, str]  # tensor -> shard (for an unsharded model.safetensors, every tensor maps to it)
    index_metadata: dict[str, Any] | None  # the index's ``metadata`` (e.g. total_size)
    sharded: bool  # whether the repo has model.safetensors.index.json


def _safe_shard_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name != ""
        and not name.startswith("/")
        and "\\" not in name
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


def remote_safetensors_headers(repo_id: str, *, revision: str | None = None, api=None, retries: int = 3) -> RemoteHeaders:
    """Read every shard header of a Hub safetensors repo with ``HfApi.get_safetensors_metadata``
    (the index, then the first ~100 kB of each shard).

    Shard names must be plain relative paths (no ``..``, no absolute paths); each header gets the
    checks of a local read except the one that needs the file's size. Errors (not found, gated,
    offline, not a safetensors repo, unparsable or invalid header) become :class:`InputError`.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError

    api = api if api is not None else HfApi()
    try:
        meta, _ = with_retries(
            "reading shard headers",
            lambda: api.get_safetensors_metadata(repo_id, revision=revision),
            repo_id=repo_id,
            retries=retries,
            backoff=1.0,
            revision=revision,
        )
    except NotASafetensorsRepoError:
        raise InputError(
            f"{repo_id}@{revision or 'main'}: no model.safetensors or model.safetensors.index.json "
            "(or the repo does not exist, or HF_TOKEN has no access to it)"
        ) from None
    except SafetensorsParsingError as e:
        raise InputError(f"{repo_id}: a shard header could not be parsed: {first_line(e)}") from None
    except PushFailed as e:
        raise InputError(str(e).replace("reading shard headers for", "could not read shard headers of")) from None

    weight_map = dict(meta.weight_map)
    bad = sorted({f for f in list(weight_map.values()) + list(meta.files_metadata) if not _safe_shard_name(f)})
    if bad:
        raise InputError(f"{repo_id}: unsafe shard file name in the index: {bad[0]!r}", file="model.safetensors.index.json")
    headers: dict[str, ShardHeader] = {}
    for fname, fmeta in meta.files_metadata.items():
        obj: dict[str, Any] = {
            name: {"dtype": ti.dtype, "shape": list(ti.shape), "data_offsets": list(ti.data_offsets)}
            for name, ti in fmeta.tensors.items()
        }
        if fmeta.metadata:
            obj["__metadata__"] = dict(fmeta.metadata)
        headers[fname] = header_from_json(Path(fname), obj, data_start=0, file_size=None)
    return RemoteHeaders(headers, weight_map, meta.metadata, bool(meta.sharded))
