"""All Hugging Face Hub access: resolve a source, read remote shard headers, push a conversion.

Everything that talks to the Hub goes through ``huggingface_hub`` (2.x), so ``HF_TOKEN``,
``HF_HOME``/``HF_HUB_CACHE``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` behave as users expect. Note that
the library reads those variables once, when it is imported.

``push`` owns its retry loop: in huggingface_hub 2.4.0 the Xet upload pipeline retries its own
commits, but the legacy (no ``hf_xet``) commit POST is not retried at all, and neither path retries a
failed ``create_repo``. Re-running ``upload_folder`` is safe: files the Hub already has are skipped
(and with ``hf_xet`` the upload resumes at chunk level).

After the upload, ``push`` asks the Hub for each file's hashes (``get_paths_info``) and compares them
with what was meant to be uploaded: the LFS/Xet sha256 against the manifest's sha256 (no re-read of
the shards), the git blob sha1 of small regular files against the local bytes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import EXIT_INTERNAL, CheckFailed, InputError, Nvfp4FuseError
from .manifest import HASH_CHUNK, MANIFEST_NAME, Manifest, check_files, load_manifest, save_manifest, sha256_file

log = logging.getLogger("nvfp4_fuse.hub")

T = TypeVar("T")

README_NAME = "README.md"
# Never uploaded: the converter's temp files, plus what upload_folder itself always skips.
PUSH_IGNORE_PATTERNS = ["*.partial", "**/*.partial"]
_HF_ALWAYS_IGNORED = (".git", ".cache/huggingface")
# Statuses worth another try. 408/429/5xx is also what huggingface_hub's own http_backoff retries.
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 120.0
PATHS_INFO_CHUNK = 100  # paths per get_paths_info request
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

_sleep = time.sleep  # tests patch this to record the backoff delays


class PushFailed(Nvfp4FuseError):
    """The Hub kept failing (transient errors) after every retry."""

    exit_code = EXIT_INTERNAL


class PushVerificationFailed(CheckFailed):
    """After upload, the Hub's copy of some file differs from (or lacks) what was pushed."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


@dataclass
class PushResult:
    repo_id: str
    revision: str
    repo_url: str | None
    commit_oid: str | None
    commit_url: str | None
    uploaded: list[str]  # repo paths sent to upload_folder (posix, relative)
    checked: dict[str, str]  # repo path -> how it was checked: "sha256" (LFS/Xet) or "git-sha1" (regular)
    attempts: int  # upload_folder calls made (1 = no retry needed)
    forced: bool  # True when the manifest check was skipped or failed and force=True pushed anyway
    card_written: bool
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# errors: classify, and turn into one clear line
# ------------------------------------------------------------------------------------------------


def _chain(exc: BaseException):
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(seen) < 10:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    code = getattr(resp, "status_code", None)
    return code if isinstance(code, int) else None


def _classify(exc: BaseException) -> tuple[str, BaseException]:
    """-> (kind, the exception that decided it). kind: offline | transient | input | other."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    for e in _chain(exc):
        if isinstance(e, OfflineModeIsEnabled):
            return "offline", e
        if isinstance(e, HfHubHTTPError):
            code = _status(e)
            if code is None:
                return "other", e
            if code in TRANSIENT_STATUS or code >= 500:
                return "transient", e
            return "input", e  # 4xx: auth, not found, bad request, conflict, too large...
        if isinstance(e, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)):
            return "transient", e
        if type(e).__name__ == "XetAuthenticationError":
            return "input", e
        if type(e).__name__ == "XetObjectNotFoundError":
            return "other", e
        if isinstance(e, (ConnectionError, TimeoutError)):
            return "transient", e
        if type(e).__module__.split(".")[0] == "hf_xet":
            # Xet transfer errors carry no HTTP status; re-running upload_folder resumes, so retry.
            return "transient", e
    if isinstance(exc, ValueError):  # invalid repo id, invalid README metadata, malformed input
        return "input", exc
    return "other", exc


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    for line in s.splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return type(e).__name__


def _http_line(what: str, repo_id: str, e: BaseException, revision: str | None = None) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    code = _status(e)
    server = getattr(e, "server_message", None)
    detail = f": {_first_line(Exception(server))}" if server else ""
    if isinstance(e, GatedRepoError):
        return f"{repo_id} is gated: accept its terms on the Hub and use a token that has access (HF_TOKEN)"
    if isinstance(e, RevisionNotFoundError):
        return f"revision {revision or 'main'!r} not found in {repo_id}"
    if code == 401 and not isinstance(e, RepositoryNotFoundError):
        return f"{what}: the Hub rejected the credentials (401); set HF_TOKEN or run `hf auth login`"
    if isinstance(e, RepositoryNotFoundError) or code == 404:
        return (
            f"{what}: {repo_id} not found, or not visible with this token ({code}); "
            "check the repo id and that HF_TOKEN has access"
        )
    if code == 403:
        return f"{what}: no write access to {repo_id} (403){detail}; use a token with write permission"
    if code is not None:
        return f"{what}: the Hub refused the request ({code}){detail or ': ' + _first_line(e)}"
    return f"{what}: {_first_line(e)}"


def _delay(attempt: int, backoff: float, e: BaseException) -> float:
    d = min(backoff * (2**attempt), MAX_BACKOFF_S)
    resp = getattr(e, "response", None)
    ra = getattr(resp, "headers", {}).get("Retry-After") if resp is not None else None
    if ra is not None:
        try:
            d = max(d, min(float(ra), 300.0))
        except ValueError:
            pass
    return d


def _with_retries(
    what: str, fn: Callable[[], T], *, repo_id: str, retries: int, backoff: float, revision: str | None = None
) -> tuple[T, int]:
    """Call ``fn``; retry transient failures up to ``retries`` times. -> (result, attempts made)."""
    attempt = 0
    while True:
        try:
            return fn(), attempt + 1
        except Exception as exc:  # noqa: BLE001 - classified below, unknown errors re-raised
            kind, e = _classify(exc)
            if kind == "offline":
                raise InputError(f"{what}: HF_HUB_OFFLINE is set; pushing needs the network (unset it)") from exc
            if kind == "input":
                raise InputError(_http_line(what, repo_id, e, revision)) from exc
            if kind != "transient":
                raise
            if attempt >= retries:
                raise PushFailed(
                    f"{what} for {repo_id} failed after {attempt + 1} attempts; last error: {_first_line(e)}"
                ) from exc
            d = _delay(attempt, backoff, e)
            log.warning("%s: %s; retry %d/%d in %.1f s", what, _first_line(e), attempt + 1, retries, d)
            _sleep(d)
            attempt += 1


# ------------------------------------------------------------------------------------------------
# resolve a source (local folder or Hub repo id)
# ------------------------------------------------------------------------------------------------


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
    (offline: the cached snapshot is used if complete). Every failure is an ``InputError``.
    """
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{source} is a file; pass the checkpoint folder (or a Hub repo id org/name)")
        return p
    if _looks_like_path(source) or not _REPO_ID_RE.match(source):
        raise InputError(f"{source!r} is neither an existing folder nor a Hub repo id (org/name)")

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    try:
        return Path(
            snapshot_download(repo_id=source, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns)
        )
    except HFValidationError as e:
        raise InputError(f"{source!r} is not a valid Hub repo id: {_first_line(e)}") from None
    except GatedRepoError:
        raise InputError(
            f"{source} is gated: accept its terms on the Hub and set HF_TOKEN to a token with access"
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{source} not found on the Hub, or private and HF_TOKEN has no access to it"
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"revision {rev!r} not found in {source}") from None
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
        raise InputError(
            f"could not reach the Hub for {source}@{rev} and it is not cached: {_first_line(e.__cause__ or e)}"
        ) from None
    except HfHubHTTPError as e:
        raise InputError(_http_line("download", source, e, revision)) from None
    except OSError as e:  # disk full, permissions in the cache...
        raise InputError(f"downloading {source}@{rev} failed: {_first_line(e)}") from None


# ------------------------------------------------------------------------------------------------
# remote headers for a dry-run plan
# ------------------------------------------------------------------------------------------------


def _safe_shard_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name != ""
        and not name.startswith("/")
        and "\\" not in name
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


def remote_safetensors_headers(
    repo_id: str, *, revision: str | None = None, api=None, retries: int = 3
) -> dict[str, dict]:
    """Shard headers of a Hub safetensors repo, read with HTTP range requests (no weights downloaded).

    Uses ``HfApi.get_safetensors_metadata`` (the index, then the first ~100 kB of each shard).

    Returns ``{"headers": ..., "weight_map": ..., "index_metadata": ..., "sharded": ...}``:

    - ``headers``: shard file name -> the parsed header, in the on-disk JSON shape::

          {"<tensor>": {"dtype": "U8", "shape": [256, 3584], "data_offsets": [begin, end]},
           ...,
           "__metadata__": {...}}        # only when the shard has metadata

      (``data_offsets`` are relative to the end of the header, as in the file.)
    - ``weight_map``: tensor name -> shard file name (the index's map; for an unsharded
      ``model.safetensors`` every tensor maps to it).
    - ``index_metadata``: the index's ``metadata`` (e.g. ``{"total_size": ...}``) or ``None``.
    - ``sharded``: whether the repo has ``model.safetensors.index.json``.

    Shard names are checked to be plain relative paths (no ``..``, no absolute paths). Errors
    (not found, gated, offline, not a safetensors repo, unparsable header) become ``InputError``.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError

    api = api if api is not None else HfApi()

    def fetch():
        return api.get_safetensors_metadata(repo_id, revision=revision)

    try:
        meta, _ = _with_retries(
            "reading shard headers", fetch, repo_id=repo_id, retries=retries, backoff=1.0, revision=revision
        )
    except NotASafetensorsRepoError:
        raise InputError(
            f"{repo_id}@{revision or 'main'}: no model.safetensors or model.safetensors.index.json "
            "(or the repo does not exist, or HF_TOKEN has no access to it)"
        ) from None
    except SafetensorsParsingError as e:
        raise InputError(f"{repo_id}: a shard header could not be parsed: {_first_line(e)}") from None
    except PushFailed as e:
        raise InputError(str(e).replace("reading shard headers for", "could not read shard headers of")) from None

    weight_map = dict(meta.weight_map)
    bad = sorted({f for f in list(weight_map.values()) + list(meta.files_metadata) if not _safe_shard_name(f)})
    if bad:
        raise InputError(
            f"{repo_id}: unsafe shard file name in the index: {bad[0]!r}", file="model.safetensors.index.json"
        )
    headers: dict[str, dict] = {}
    for fname, fmeta in meta.files_metadata.items():
        h: dict[str, Any] = {
            name: {"dtype": ti.dtype, "shape": list(ti.shape), "data_offsets": list(ti.data_offsets)}
            for name, ti in fmeta.tensors.items()
        }
        if fmeta.metadata:
            h["__metadata__"] = dict(fmeta.metadata)
        headers[fname] = h
    return {
        "headers": headers,
        "weight_map": weight_map,
        "index_metadata": meta.metadata,
        "sharded": bool(meta.sharded),
    }


# ------------------------------------------------------------------------------------------------
# push
# ------------------------------------------------------------------------------------------------


def _ignored(rel: str) -> bool:
    parts = rel.split("/")
    if ".git" in parts:
        return True
    if any(parts[i : i + 2] == [".cache", "huggingface"] for i in range(len(parts) - 1)):
        return True
    return any(fnmatch.fnmatch(rel, pat) for pat in PUSH_IGNORE_PATTERNS)


def local_upload_files(folder: Path) -> list[str]:
    """Repo paths (posix, relative) of the files ``push`` uploads from ``folder``."""
    folder = Path(folder)
    out = []
    for p in folder.rglob("*"):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            if not _ignored(rel):
                out.append(rel)
    return sorted(out)


def _hash_both(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one read."""
    size = os.path.getsize(path)
    s256 = hashlib.sha256()
    s1 = hashlib.sha1()
    s1.update(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            s256.update(chunk)
            s1.update(chunk)
    return s256.hexdigest(), s1.hexdigest()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify_remote(
    folder: Path,
    repo_id: str,
    files: list[str],
    *,
    api,
    revision: str | None,
    manifest: Manifest | None,
    trust_manifest: bool,
    retries: int = 5,
    backoff: float = 2.0,
) -> tuple[dict[str, str], list[str]]:
    """Compare the Hub's hashes of ``files`` with the local ones. -> (checked, problems).

    LFS/Xet files: the Hub's ``lfs.sha256`` against the manifest's sha256 when ``trust_manifest``
    (the folder was just checked against it), else against the local file's sha256. Regular files:
    the Hub's git blob id against the git sha1 of the local bytes (and, for manifest files, the local
    sha256 against the manifest). Sizes are compared for all.
    """
    folder = Path(folder)
    remote: dict[str, Any] = {}
    for i in range(0, len(files), PATHS_INFO_CHUNK):
        chunk = files[i : i + PATHS_INFO_CHUNK]
        infos, _ = _with_retries(
            "checking the uploaded files",
            lambda chunk=chunk: api.get_paths_info(repo_id, chunk, revision=revision, repo_type="model"),
            repo_id=repo_id,
            retries=retries,
            backoff=backoff,
            revision=revision,
        )
        for info in infos:
            if hasattr(info, "blob_id"):  # RepoFile (RepoFolder has tree_id)
                remote[info.path] = info

    recs = manifest.files if manifest is not None else {}
    checked: dict[str, str] = {}
    problems: list[str] = []
    for rel in files:
        r = remote.get(rel)
        if r is None:
            problems.append(f"{rel}: missing on the Hub after upload")
            continue
        local = folder / rel
        size = os.path.getsize(local)
        if r.size != size:
            problems.append(f"{rel}: Hub size {r.size} != local {size}")
            continue
        rec = recs.get(rel)
        lfs = getattr(r, "lfs", None)
        lfs_sha = None
        if lfs:  # BlobLfsInfo (a dict subclass with attributes)
            lfs_sha = getattr(lfs, "sha256", None) or (lfs.get("sha256") if isinstance(lfs, dict) else None)
        if lfs_sha:
            expected = rec["sha256"] if (rec is not None and trust_manifest) else sha256_file(local)
            if str(lfs_sha).lower() != expected:
                problems.append(f"{rel}: Hub sha256 {lfs_sha} != expected {expected}")
            checked[rel] = "sha256"
        else:
            s256, gsha = _hash_both(local)
            if rec is not None and trust_manifest and s256 != rec["sha256"]:
                problems.append(f"{rel}: local file changed during the push (sha256 differs from manifest)")
            elif str(r.blob_id).lower() != gsha:
                problems.append(f"{rel}: Hub git blob {r.blob_id} != local {gsha}")
            checked[rel] = "git-sha1"
    return checked, problems


def push(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    force: bool = False,
    api=None,
    retries: int = 5,
    backoff: float = 2.0,
    card: str | None = None,
) -> PushResult:
    """Upload a finished conversion to the Hub and check the Hub's copy against the manifest.

    1. Refuses (``InputError``) a folder without ``nvfp4-fuse-manifest.json`` or whose files do not
       match it, unless ``force``.
    2. Writes ``card`` to ``README.md`` in the folder if given (else leaves any README alone).
    3. ``create_repo(exist_ok=True)``; ``create_branch(exist_ok=True)`` when ``revision`` is a branch
       other than main.
    4. ``upload_folder`` (everything except ``*.partial``, ``.git``, ``.cache/huggingface``), retried
       on transient failures (HTTP 408/429/5xx, connection errors, timeouts) up to ``retries`` more
       times with exponential backoff ``backoff * 2**n`` seconds (capped; ``Retry-After`` honoured).
       4xx errors (auth, not found, forbidden) are not retried and become ``InputError``; giving up
       raises ``PushFailed``.
    5. Compares the Hub's hashes of every uploaded file with the local ones (see ``verify_remote``);
       any difference raises ``PushVerificationFailed`` (a ``CheckFailed``, exit 3).

    ``api`` is an ``HfApi`` (default ``HfApi()``) or any object with the same methods.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    if not _REPO_ID_RE.match(repo_id):
        raise InputError(f"{repo_id!r} is not a Hub repo id (org/name)")
    if retries < 0:
        raise InputError("--retries must be >= 0")

    notes: list[str] = []
    manifest = load_manifest(folder)
    trust_manifest = False
    if manifest is None:
        if not force:
            raise InputError(
                f"{folder} has no {MANIFEST_NAME}: not a complete nvfp4-fuse conversion "
                "(finish `nvfp4-fuse convert`, or pass --force to push anyway)"
            )
        notes.append(f"no {MANIFEST_NAME}: pushed because of --force")
    else:
        problems = check_files(folder, manifest)
        if problems:
            if not force:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise InputError(
                    f"{folder} does not match its manifest: {problems[0]}{more}; "
                    "rerun `nvfp4-fuse convert` to finish it, or pass --force",
                    file=MANIFEST_NAME,
                )
            notes.append(f"{len(problems)} file(s) differ from the manifest: pushed because of --force")
        else:
            trust_manifest = True
    forced = not trust_manifest

    card_written = False
    if card is not None:
        _write_text_atomic(folder / README_NAME, card)
        card_written = True
        if manifest is not None and trust_manifest:
            # The card replaces the source's README: record it so the folder still matches its manifest
            # (and verify knows this one file is ours, not a copied sidecar).
            data = (folder / README_NAME).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            manifest.files[README_NAME] = {"size": len(data), "sha256": digest}
            manifest.model_card = digest
            save_manifest(folder, manifest)

    files = local_upload_files(folder)
    if not files:
        raise InputError(f"{folder} has no files to push")

    api = api if api is not None else HfApi()
    branch = revision if revision and revision != "main" and not revision.startswith("refs/") else None
    if commit_message is None:
        if manifest is not None:
            commit_message = (
                f"Upload {manifest.target} NVFP4 fused-expert checkpoint (nvfp4-fuse {manifest.tool_version})"
            )
        else:
            commit_message = "Upload with nvfp4-fuse"
    kw = dict(repo_id=repo_id, retries=retries, backoff=backoff, revision=revision)

    repo_url, _ = _with_retries(
        "creating the repo",
        lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
        **kw,
    )
    if branch is not None:
        _with_retries(
            f"creating branch {branch!r}",
            lambda: api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model"),
            **kw,
        )
    commit, attempts = _with_retries(
        "uploading",
        lambda: api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=list(PUSH_IGNORE_PATTERNS),
        ),
        **kw,
    )

    checked, problems = verify_remote(
        folder,
        repo_id,
        files,
        api=api,
        revision=revision,
        manifest=manifest,
        trust_manifest=trust_manifest,
        retries=retries,
        backoff=backoff,
    )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PushVerificationFailed(
            f"the Hub's copy of {repo_id} does not match the local files: {problems[0]}{more}", problems
        )
    return PushResult(
        repo_id=repo_id,
        revision=revision or "main",
        repo_url=str(repo_url) if repo_url is not None else None,
        commit_oid=getattr(commit, "oid", None),
        commit_url=getattr(commit, "commit_url", None),
        uploaded=files,
        checked=checked,
        attempts=attempts,
        forced=forced,
        card_written=card_written,
        notes=notes,
    )


# ------------------------------------------------------------------------------------------------
# model card (pure)
# ------------------------------------------------------------------------------------------------

# library_name: "transformers". On the Hub, vLLM is a *local app*, not a library id: its "Use this
# model -> vLLM" snippet is shown for text-generation repos that carry the `transformers` tag
# (huggingface.js packages/tasks/src/local-apps.ts, isVllmModel), which library_name: transformers
# gives. Community NVFP4 repos and mergekit use the same value; NVIDIA's own FP4 cards use
# "Model Optimizer", which no local-app snippet recognises. The fused layout itself needs a loader
# that understands it (see "How to serve").
CARD_LIBRARY_NAME = "transformers"
CARD_TAGS = ("nvfp4", "modelopt", "fused-moe")

_PLAIN_YAML = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


def _yaml_scalar(s: str) -> str:
    import json

    plain = _PLAIN_YAML.match(s) and s.lower() not in ("yes", "no", "true", "false", "null", "on", "off", "~")
    return s if plain else json.dumps(s)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        s = f"{v:.6g}"
    elif isinstance(v, (dict, list, tuple)):
        import json

        s = json.dumps(v, sort_keys=True)
    else:
        s = str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
    return out


def default_serve_hint(target: str, repo_id: str) -> str:
    """The vLLM command line for a pushed checkpoint of ``target``."""
    if target == "mega-moe":
        return f"vllm serve {repo_id} --moe-backend deep_gemm_mega_moe"
    return (
        f"# target {target}: needs a vLLM build whose NVFP4 fused-MoE loader reads the fused\n"
        f"# w13_*/w2_* expert tensors described in config.json (fused_experts)\n"
        f"vllm serve {repo_id}"
    )


def _source_text(source: dict[str, Any]) -> str | None:
    for key in ("repo_id", "repo", "id", "path"):
        if source.get(key):
            rev = source.get("revision")
            return f"{source[key]}" + (f" (revision {rev})" if rev else "")
    return None


def render_model_card(
    *,
    base_model: str | None,
    repo_id: str,
    manifest: dict,
    verify_summary: dict | None,
    serve_hint: str,
) -> str:
    """README.md text for a pushed conversion. Pure: no I/O.

    ``manifest`` is the manifest JSON (``Manifest.to_json()``). ``verify_summary`` (optional) is a dict;
    its ``layers`` entry (a list of per-layer dicts, or a dict layer -> dict) becomes a table and its
    other scalar entries a list. ``serve_hint`` is the shell snippet for serving ("" -> the default
    for the manifest's target, see ``default_serve_hint``).
    """
    target = str(manifest.get("target", "?"))
    layout = str(manifest.get("layout", "?"))
    tool_version = str(manifest.get("tool_version", "?"))
    options = manifest.get("options") or {}
    source = manifest.get("source") or {}
    files = manifest.get("files") or {}
    name = repo_id.split("/")[-1]

    fm = ["---"]
    if base_model:
        fm.append(f"base_model: {_yaml_scalar(base_model)}")
        fm.append("base_model_relation: quantized")
    fm.append(f"library_name: {CARD_LIBRARY_NAME}")
    fm.append("tags:")
    fm.extend(f"- {t}" for t in CARD_TAGS)
    fm.append("---")

    body: list[str] = ["", f"# {name}", "", "## What this is", ""]
    base_txt = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a ModelOpt NVFP4 checkpoint"
    body.append(
        f"An NVFP4 (ModelOpt) mixture-of-experts checkpoint converted from {base_txt} by "
        f"nvfp4-fuse from one tensor set per expert into fused-expert tensors "
        f"(`w13_*` = gate+up, `w2_*` = down, one tensor per layer stacked over experts), laid out for "
        f"target `{target}`. Nothing is re-quantized from higher precision: the 4-bit codes are copied, the "
        f"FP8 block scales are re-laid out for the target (targets that merge the gate/up global scales also "
        f"rescale one half's block scales; the `fused_experts` block in config.json records which)."
    )
    body += ["", "## Layout", "", "| | |", "|---|---|"]
    body.append(f"| target | `{target}` |")
    body.append(f"| layout version | `{layout}` |")
    total = sum(int(r.get("size", 0)) for r in files.values()) if isinstance(files, dict) else 0
    if files:
        body.append(f"| files | {len(files)} ({total / 2**30:.2f} GiB) |")
    body += ["", "Options:", ""]
    if options:
        body += ["| option | value |", "|---|---|"]
        body += [f"| `{_cell(k)}` | `{_cell(v)}` |" for k, v in sorted(options.items())]
    else:
        body.append("(defaults)")

    if verify_summary:
        body += ["", "## Verification", ""]
        layers = verify_summary.get("layers")
        for k, v in verify_summary.items():
            if k != "layers" and not isinstance(v, (dict, list)):
                body.append(f"- {k}: {_cell(v)}")
        if isinstance(layers, dict):
            layers = [{"layer": k, **(v if isinstance(v, dict) else {"result": v})} for k, v in layers.items()]
        if isinstance(layers, list) and layers:
            body.append("")
            body += _table([r if isinstance(r, dict) else {"result": r} for r in layers])

    hint = serve_hint or default_serve_hint(target, repo_id)
    body += ["", "## How to serve", "", "```bash", hint.rstrip(), "```"]

    body += ["", "## How it was produced", ""]
    cmd = source.get("command") if isinstance(source, dict) else None
    if not cmd:
        src = _source_text(source) if isinstance(source, dict) else None
        cmd = f"nvfp4-fuse convert {src.split(' ')[0] if src else '<source>'} <out> --target {target}"
    body += ["```bash", str(cmd), f"nvfp4-fuse push <out> {repo_id}", "```", ""]
    src_txt = _source_text(source) if isinstance(source, dict) else None
    if src_txt:
        body.append(f"- source: `{src_txt}`")
    body.append(f"- tool: nvfp4-fuse {tool_version}")
    for k in ("input_fingerprint", "options_fingerprint"):
        if manifest.get(k):
            body.append(f"- {k.replace('_', ' ')}: `{manifest[k]}`")
    body.append(
        f"- `{MANIFEST_NAME}` lists every file with its size and sha256; `nvfp4-fuse push` checked the "
        "Hub's copies against it after uploading."
    )
    return "\n".join(fm + body) + "\n"
