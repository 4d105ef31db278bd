"""Resolve a source: a local checkpoint folder, or a Hub repo id downloaded into the HF cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InputError
from .errors import first_line, hub_error_line, unreachable_reason

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", "."))
        or "\\" in source
        or source.count("/") != 1
        or os.path.isabs(source)
    )


def resolve_source(
    source: str,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    allow_patterns: list[str] | str | None = None,
) -> Path:
    """A local checkpoint folder, or a Hub repo id (``org/name``) downloaded to the HF cache.

    An existing local path is used as is (it must be a folder). Otherwise ``source`` must be a repo id;
    it is fetched with ``huggingface_hub.snapshot_download`` (``revision``, ``cache_dir`` and
    ``allow_patterns`` passed through), which honours HF_TOKEN, HF_HOME/HF_HUB_CACHE and HF_HUB_OFFLINE
    (offline: the cached snapshot is used if complete). Every failure is an :class:`InputError`.
    """
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{source} is a file; pass the checkpoint folder (or a Hub repo id org/name)")
        return p
    if _looks_like_path(source) or not REPO_ID_RE.match(source):
        raise InputError(f"{source!r} is neither an existing folder nor a Hub repo id (org/name)")

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    rev = revision or "main"
    try:
        return Path(
            snapshot_download(repo_id=source, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns)
        )
    except (HFValidationError, HfHubHTTPError) as e:
        raise InputError(hub_error_line("download", source, e, revision)) from None
    except IncompleteSnapshotError:
        raise InputError(
            f"the cached snapshot of {source}@{rev} is incomplete and the Hub cannot be reached; "
            "rerun with network access"
        ) from None
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise InputError(
                f"HF_HUB_OFFLINE is set and {source}@{rev} is not in the cache ({cache_dir or constants.HF_HUB_CACHE})"
            ) from None
        reason = unreachable_reason(e)
        if reason is not None:
            raise InputError(
                f"cannot reach the Hub at {constants.ENDPOINT} ({reason}) and {source}@{rev} is not in the cache; "
                "check the network connection, a proxy, or HF_ENDPOINT"
            ) from None
        raise InputError(
            f"could not reach the Hub for {source}@{rev} and it is not cached: {first_line(e.__cause__ or e)}"
        ) from None
    except OSError as e:  # disk full, permissions in the cache...
        raise InputError(f"downloading {source}@{rev} failed: {first_line(e)}") from None
