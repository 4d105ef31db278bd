"""The project's exceptions. Each maps to one exit code and one clear line on the command line."""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 3


class Nvfp4FuseError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_INTERNAL


class InputError(Nvfp4FuseError):
    """The input (a checkpoint, an option, a folder) is unusable; the message names file and tensor."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        where = ", ".join(p for p in (f"file {file}" if file else "", f"tensor {tensor}" if tensor else "") if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.file = file
        self.tensor = tensor


class CheckFailed(Nvfp4FuseError):
    """``verify`` found a difference; the message names tensor, expert and first bad index."""

    exit_code = EXIT_CHECK_FAILED
