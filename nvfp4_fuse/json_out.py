"""``--json``: one object on stdout per run, for every command, success or failure.

Schema ``nvfp4-fuse/1`` (README, "JSON output"): ``{"schema": "nvfp4-fuse/1", "command": ..., "ok":
true, ...the command's fields}``, or on failure ``{"schema": ..., "command": ..., "ok": false,
"error": {"code": <exit code>, "kind": ..., "message": <the error line>}}``. Sizes are bytes, times
seconds, ratios fractions (0.055, not 5.5%). Expert modules are listed as ``modules`` in layer order,
with the same key for the same quantity in every command.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_HUB_UNAVAILABLE, EXIT_INTERNAL, EXIT_INTERRUPTED

SCHEMA = "nvfp4-fuse/1"
ERROR_KINDS = {
    EXIT_INTERNAL: "internal",
    EXIT_BAD_INPUT: "input",
    EXIT_CHECK_FAILED: "check_failed",
    EXIT_HUB_UNAVAILABLE: "hub_unavailable",
    EXIT_INTERRUPTED: "interrupted",
}


def error_body(code: int, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "kind": ERROR_KINDS.get(code, "internal"), "message": message}}


def envelope(command: str, body: dict[str, Any], *, ok: bool = True) -> dict[str, Any]:
    return {"schema": SCHEMA, "command": command, "ok": ok, **body}


def emit(command: str, body: dict[str, Any], *, ok: bool = True) -> None:
    sys.stdout.write(json.dumps(envelope(command, body, ok=ok), indent=1) + "\n")
    sys.stdout.flush()
