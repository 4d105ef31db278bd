"""The project's exceptions. Each maps to one exit code and one clear line on the command line.

Who raises what:

- pure math (``nvfp4.py``, ``swizzle.py``, ``mega_moe.py``, ``host_layout.py``, ``layout.py``) raises
  the builtin ``ValueError`` / ``TypeError`` for a caller's mistake: it knows no files or tensors;
- input and plan code (``safetensors_header``, ``shard_reader``, ``source``, ``experts``, ``spec``, the CLI options, the Hub)
  raises :class:`InputError`, naming the file and tensor; it also is a ``ValueError``;
- ``verify`` raises :class:`CheckFailed`; ``push`` raises :class:`PushFailed` when the Hub keeps failing
  and :class:`PushVerificationFailed` when the Hub's copy differs from the local files.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: the traceback is printed
EXIT_BAD_INPUT = 2  # bad input, a bad option, an OS error (permissions, read-only, no space), a busy folder
EXIT_CHECK_FAILED = 3  # verify found a difference, or the Hub's copy differs after a push
EXIT_HUB_UNAVAILABLE = 4  # the Hub kept failing with transient errors (5xx, 429, resets, timeouts)
EXIT_ENGINE_ISSUES = 5  # inspect: some engine loses accuracy or fails on the checkpoint
EXIT_INTERRUPTED = 130  # Ctrl-C; rerun the same command to resume


class Nvfp4FuseError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_INTERNAL


class InputError(Nvfp4FuseError, ValueError):
    """The input (a checkpoint, an option, a folder, a Hub repo) is unusable; the message names file and
    tensor."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        where = ", ".join(p for p in (f"file {file}" if file else "", f"tensor {tensor}" if tensor else "") if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.file = file
        self.tensor = tensor


class CheckFailed(Nvfp4FuseError):
    """``verify`` found a difference; the message names tensor, expert and first bad index."""

    exit_code = EXIT_CHECK_FAILED


class DecodeFailed(Nvfp4FuseError):
    """The GPU decode could not run (its process failed: no CUDA, a CUDA error, it was killed): not a
    finding about the checkpoint. ``--device cpu`` checks without it."""

    exit_code = EXIT_BAD_INPUT


class PushFailed(Nvfp4FuseError, ConnectionError):
    """The Hub kept failing with transient errors after every retry."""

    exit_code = EXIT_HUB_UNAVAILABLE


class PushVerificationFailed(CheckFailed):
    """After the upload, the Hub's copy of some file differs from (or lacks) what was pushed."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems
