"""Hub failures: which ones are worth another try, and the one translation of each into a clear line.

Every module of this package sends what huggingface_hub raises through :func:`classify` and
:func:`hub_error_line`, so a missing repo, a gated one, a bad token or a 503 reads the same whether it
came from a download, a header read or a push.
"""

from __future__ import annotations

from collections.abc import Iterator

# Statuses worth another try. 408/429/5xx is also what huggingface_hub's own http_backoff retries.
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(seen) < 10:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def status_of(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    code = getattr(resp, "status_code", None)
    return code if isinstance(code, int) else None


# A name that does not resolve, or nothing listening: no retry brings the Hub back (a 5xx, a reset or
# a timeout may pass; these mean no network, a wrong HF_ENDPOINT or a proxy in the way).
UNREACHABLE_TEXT = (
    "name or service not known",
    "temporary failure in name resolution",
    "nodename nor servname",
    "no address associated",
    "name resolution",
    "connection refused",
    "network is unreachable",
)


def unreachable_reason(exc: BaseException) -> str | None:
    """'the name does not resolve' / 'connection refused' / ... when ``exc`` says the Hub's host cannot be
    reached at all, else ``None``."""
    import socket

    for e in _chain(exc):
        if isinstance(e, socket.gaierror):
            return "its name does not resolve"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        text = str(e).lower()
        for t in UNREACHABLE_TEXT:
            if t in text:
                return "connection refused" if "refused" in t else ("network unreachable" if "unreachable" in t else "its name does not resolve")
    return None


def classify(exc: BaseException) -> tuple[str, BaseException]:
    """-> (kind, the exception that decided it). kind: offline | unreachable | transient | input | other."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if unreachable_reason(exc) is not None:
        return "unreachable", exc
    for e in _chain(exc):
        if isinstance(e, OfflineModeIsEnabled):
            return "offline", e
        if isinstance(e, HfHubHTTPError):
            code = status_of(e)
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


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    for line in s.splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return type(e).__name__


def hub_error_line(what: str, repo_id: str, e: BaseException, revision: str | None = None) -> str:
    """One line for a Hub error met while doing ``what`` to ``repo_id``."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    code = status_of(e)
    server = getattr(e, "server_message", None)
    detail = f": {first_line(Exception(server))}" if server else ""
    rev = revision or "main"
    if isinstance(e, OfflineModeIsEnabled):
        return f"{what}: HF_HUB_OFFLINE is set and this needs the network (unset it)"
    reason = unreachable_reason(e)
    if reason is not None:
        from huggingface_hub import constants

        return (
            f"{what}: cannot reach the Hub at {constants.ENDPOINT} ({reason}); "
            "check the network connection, a proxy, or HF_ENDPOINT"
        )
    if isinstance(e, HFValidationError):
        return f"{repo_id!r} is not a valid Hub repo id: {first_line(e)}"
    if isinstance(e, GatedRepoError):
        return f"{repo_id} is gated: accept its terms on the Hub and use a token that has access (HF_TOKEN)"
    if isinstance(e, RevisionNotFoundError):
        return f"revision {rev!r} not found in {repo_id}"
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
        return f"{what}: the Hub refused the request ({code}){detail or ': ' + first_line(e)}"
    return f"{what}: {first_line(e)}"
