"""Calling the Hub with retries: transient failures (HTTP 408/429/5xx, connection resets, timeouts)
are tried again with exponential backoff (``Retry-After`` honoured); the rest (no network, a name that
does not resolve, a refused connection, 401/403/404) become one clear error at once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from ..errors import InputError, PushFailed
from .errors import classify, first_line, hub_error_line

log = logging.getLogger("nvfp4_fuse.hub")

T = TypeVar("T")
MAX_BACKOFF_S = 120.0

_sleep = time.sleep  # tests patch this to record the backoff delays


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


def with_retries(
    what: str, fn: Callable[[], T], *, repo_id: str, retries: int, backoff: float, revision: str | None = None
) -> tuple[T, int]:
    """Call ``fn``; retry transient failures up to ``retries`` times. -> (result, attempts made).

    Raises :class:`InputError` for what another try cannot fix (offline, 4xx) and :class:`PushFailed`
    once the retries are spent; anything unrecognised is re-raised as it is.
    """
    attempt = 0
    while True:
        try:
            return fn(), attempt + 1
        except Exception as exc:  # noqa: BLE001 - classified below, unknown errors re-raised
            kind, e = classify(exc)
            if kind in ("offline", "unreachable", "input"):
                raise InputError(hub_error_line(what, repo_id, e, revision)) from exc
            if kind != "transient":
                raise
            if attempt >= retries:
                raise PushFailed(
                    f"{what} for {repo_id} failed after {attempt + 1} attempts; last error: {first_line(e)}"
                ) from exc
            d = _delay(attempt, backoff, e)
            log.warning("%s: %s; retry %d/%d in %.1f s", what, first_line(e), attempt + 1, retries, d)
            _sleep(d)
            attempt += 1
