"""Push a finished conversion to the Hub, then check the Hub's copy against the manifest.

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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, PushVerificationFailed
from ..manifest import HASH_CHUNK, MANIFEST_NAME, Manifest, check_files, load_manifest, manifest_bytes, sha256_file
from .download import REPO_ID_RE
from .retry import with_retries

README_NAME = "README.md"
# Never uploaded: the converter's temp files, plus what upload_folder itself always skips.
PUSH_IGNORE_PATTERNS = ["*.partial", "**/*.partial"]
PATHS_INFO_CHUNK = 100  # paths per get_paths_info request


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
    up_to_date: bool = False  # the Hub already held every file: nothing was uploaded
    bytes: int = 0  # bytes of the files pushed (or that a dry run would push)


def with_model_card(manifest: Manifest, card: bytes) -> Manifest:
    """A copy of ``manifest`` that lists ``card`` as its README.md: the card replaces the output's
    README on the Hub, so the Hub's copy matches its manifest (and verify knows this one file is
    ours, not a sidecar)."""
    import copy

    pushed = copy.deepcopy(manifest)
    digest = hashlib.sha256(card).hexdigest()
    pushed.files[README_NAME] = {"size": len(card), "sha256": digest}
    pushed.model_card = digest
    return pushed


def default_commit_message(manifest: Manifest | None) -> str:
    if manifest is None:
        return "Upload with nvfp4-fuse"
    return f"Upload {manifest.target} NVFP4 fused-expert checkpoint (nvfp4-fuse {manifest.tool_version})"


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


def _stage(folder: Path, files: list[str], generated: dict[str, bytes], staging: Path) -> None:
    """Mirror ``files`` into ``staging``: ``folder``'s as symlinks (no data copied), the ``generated``
    ones (the model card, the manifest that lists it) as real files: the push uploads
    what it should without writing a byte into ``folder``."""
    for rel in files:
        dst = staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in generated:
            dst.write_bytes(generated[rel])
        else:
            dst.symlink_to((folder / rel).resolve())


def _lfs_sha(info: Any) -> str | None:
    """The sha256 the Hub holds for an LFS/Xet file (``RepoFile.lfs``), else ``None``."""
    lfs = getattr(info, "lfs", None)
    if not lfs:
        return None
    # BlobLfsInfo (a dict subclass with attributes)
    return getattr(lfs, "sha256", None) or (lfs.get("sha256") if isinstance(lfs, dict) else None)


def _compare_freed(rel: str, info: Any, rec: dict[str, Any], blob_id: str | None) -> str | None:
    """What differs between the Hub's copy of ``rel`` and a file no longer on disk (None: nothing)."""
    if info.size != rec["size"]:
        return f"{rel}: Hub size {info.size} != manifest {rec['size']}"
    lfs_sha = _lfs_sha(info)
    if lfs_sha:
        if str(lfs_sha).lower() != rec["sha256"]:
            return f"{rel}: Hub sha256 {lfs_sha} != expected {rec['sha256']}"
        return None
    if blob_id is None:
        return f"{rel}: stored as a regular file on the Hub, and its local copy is gone"
    if str(info.blob_id).lower() != blob_id:
        return f"{rel}: Hub git blob {info.blob_id} != local {blob_id}"
    return None


def remote_infos(api, repo_id: str, files: list[str], *, revision: str | None, retries: int, backoff: float) -> dict[str, Any]:
    """The Hub's ``RepoFile`` of each of ``files`` that it holds (paths-info, 100 paths a request)."""
    remote: dict[str, Any] = {}
    for i in range(0, len(files), PATHS_INFO_CHUNK):
        chunk = files[i : i + PATHS_INFO_CHUNK]
        infos, _ = with_retries(
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
    return remote


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
    blob_ids: dict[str, str] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Compare the Hub's hashes of ``files`` with the local ones. -> (checked, problems).

    LFS/Xet files: the Hub's ``lfs.sha256`` against the manifest's sha256 when ``trust_manifest``
    (the folder was just checked against it), else against the local file's sha256. Regular files:
    the Hub's git blob id against the git sha1 of the local bytes (and, for manifest files, the local
    sha256 against the manifest). Sizes are compared for all. With ``trust_manifest``, a file no
    longer on disk (``convert --push-to`` frees each shard once uploaded) is compared with its
    manifest record, a regular one with its git blob id in ``blob_ids``.
    """
    folder = Path(folder)
    remote = remote_infos(api, repo_id, files, revision=revision, retries=retries, backoff=backoff)

    recs = manifest.files if manifest is not None else {}
    blob_ids = blob_ids or {}
    checked: dict[str, str] = {}
    problems: list[str] = []
    for rel in files:
        r = remote.get(rel)
        if r is None:
            problems.append(f"{rel}: missing on the Hub after upload")
            continue
        local = folder / rel
        rec = recs.get(rel)
        if not local.is_file() and trust_manifest and rec is not None:
            # Uploaded, then freed (convert --push-to): the manifest's record, and for a regular file
            # the git blob id noted before it was freed, are all there is to compare with.
            problem = _compare_freed(rel, r, rec, blob_ids.get(rel))
            if problem:
                problems.append(problem)
            checked[rel] = "sha256" if _lfs_sha(r) else "git-sha1"
            continue
        size = os.path.getsize(local)
        if r.size != size:
            problems.append(f"{rel}: Hub size {r.size} != local {size}")
            continue
        lfs_sha = _lfs_sha(r)
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
    token: str | None = None,
    dry_run: bool = False,
) -> PushResult:
    """Upload a finished conversion to the Hub and check the Hub's copy against the manifest.

    1. Refuses (``InputError``) a folder without ``nvfp4-fuse-manifest.json`` or whose files do not
       match it, unless ``force``.
    2. Never writes into the folder: when ``card`` is given, the Hub gets it as ``README.md`` and a
       manifest that lists it, through a staging folder of symlinks; a failed push leaves the folder
       as it was. If the Hub already holds exactly these files, nothing is uploaded (``up_to_date``).
       ``dry_run`` stops after the local checks, with no network.
    3. ``create_repo(exist_ok=True)``; ``create_branch(exist_ok=True)`` when ``revision`` is a branch
       other than main.
    4. ``upload_folder`` (everything except ``*.partial``, ``.git``, ``.cache/huggingface``), retried
       on transient failures (HTTP 408/429/5xx, connection errors, timeouts) up to ``retries`` more
       times with exponential backoff ``backoff * 2**n`` seconds (capped; ``Retry-After`` honoured).
       4xx errors (auth, not found, forbidden) are not retried and become ``InputError``; giving up
       raises ``PushFailed``.
    5. Compares the Hub's hashes of every uploaded file with the local ones (see ``verify_remote``);
       any difference raises ``PushVerificationFailed`` (a ``CheckFailed``, exit 3).

    Raises: :class:`InputError` for a folder that is missing, incomplete or does not match its manifest
    (unless ``force``), a bad repo id, and what another try cannot fix (auth, not found, forbidden,
    offline); :class:`PushFailed` when transient failures outlast the retries;
    :class:`PushVerificationFailed` when the Hub's copy differs from the local files.

    ``api`` is an ``HfApi`` (default ``HfApi()``) or any object with the same methods.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    if not REPO_ID_RE.match(repo_id):
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

    generated: dict[str, bytes] = {}
    pushed_manifest = manifest
    if card is not None:
        generated[README_NAME] = card.encode()
        if manifest is not None and trust_manifest:
            pushed_manifest = with_model_card(manifest, generated[README_NAME])
            generated[MANIFEST_NAME] = manifest_bytes(pushed_manifest)
    card_written = card is not None

    files = sorted(set(local_upload_files(folder)) | set(generated))
    if not files:
        raise InputError(f"{folder} has no files to push")
    total = sum(len(generated[f]) if f in generated else os.path.getsize(folder / f) for f in files)
    if dry_run:
        return PushResult(repo_id, revision or "main", None, None, None, files, {}, 0, not trust_manifest, card_written, notes, bytes=total)

    import tempfile

    with tempfile.TemporaryDirectory(prefix="nvfp4-fuse-push-") as tmp:
        staging = Path(tmp)
        _stage(folder, files, generated, staging)
        res = _push_staged(
            staging, repo_id, files, api=api if api is not None else HfApi(token=token), private=private, revision=revision,
            commit_message=commit_message, manifest=pushed_manifest, trust_manifest=trust_manifest, retries=retries, backoff=backoff,
        )  # fmt: skip
    res.forced, res.card_written, res.notes, res.bytes = not trust_manifest, card_written, notes, total
    return res


def _push_staged(
    folder: Path,
    repo_id: str,
    files: list[str],
    *,
    api,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    manifest: Manifest | None,
    trust_manifest: bool,
    retries: int,
    backoff: float,
) -> PushResult:
    """Create the repo (and branch), skip the upload when the Hub already holds ``files`` as they are,
    else upload ``folder`` and check the Hub's hashes."""
    branch = revision if revision and revision != "main" and not revision.startswith("refs/") else None
    if commit_message is None:
        commit_message = default_commit_message(manifest)
    kw = dict(repo_id=repo_id, retries=retries, backoff=backoff, revision=revision)

    repo_url, _ = with_retries(
        "creating the repo",
        lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
        **kw,
    )
    if branch is not None:
        with_retries(
            f"creating branch {branch!r}",
            lambda: api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model"),
            **kw,
        )
    if trust_manifest:  # the shards' hashes are known: asking the Hub first costs one request per 100 files
        try:
            _, before = verify_remote(
                folder, repo_id, files, api=api, revision=revision, manifest=manifest, trust_manifest=True,
                retries=retries, backoff=backoff,
            )  # fmt: skip
        except InputError:  # an empty repo, a new branch: nothing to compare with
            before = ["not there yet"]
        if not before:
            return PushResult(
                repo_id, revision or "main", str(repo_url) if repo_url is not None else None, None, None, [],
                {f: "unchanged" for f in files}, 0, False, False, up_to_date=True,
            )  # fmt: skip
    commit, attempts = with_retries(
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
        forced=False,
        card_written=False,
    )
