"""Triton's cache key, computed by Triton in a process of its own, for the GPU decode's first launch.

Before Triton loads a compiled kernel from its cache it computes ``triton_key()`` once a process: a
sha256 of its own sources and of its ~500 MB ``libtriton.so``, read in 1 MiB chunks. Each chunk's
hash hands the GIL over and takes it back, and while verify's check workers run, taking it back
waits for the switch interval: the key that takes about 1 s in an idle process took 31.7 s beside
four busy Python threads on the 2-vCPU dev machine (the H200 host's first verify call spent 2.1-2.6 s
before its kernel was loaded). A child process computes the same key with Triton's own function,
away from this process's GIL, and this process takes it as Triton hands it to its own compile
workers (``triton.runtime.cache.triton_key = lambda: key``, triton/_compile_warmup_pool.py).

The child runs the interpreter and the environment of this process, so it imports the same Triton;
it also prints the file it imported Triton from, and a key from another installation is not taken.
Anything unexpected (no child, a failure, a timeout, another Triton) leaves Triton to compute its
key itself, as without this module: a lost second, never a wrong key.
"""

from __future__ import annotations

import subprocess
import sys

_CHILD = (
    "import triton, triton.runtime.cache as c, sys\n"
    "sys.stdout.write(triton.__file__ + '\\n' + c.triton_key())\n"
)


class TritonKey:
    """The key, computed by a child process started at construction; :meth:`install` waits for it
    (at most ``timeout`` seconds) and hands it to Triton."""

    def __init__(self, timeout: float = 120.0):
        self.timeout = timeout
        self.key: str | None = None
        self.why_not: str | None = None  # why the key was not taken, for tests and debugging
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                [sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        except OSError as e:
            self._proc, self.why_not = None, f"could not start: {e}"

    def _wait(self) -> tuple[str, str] | None:
        if self._proc is None:
            return None
        try:
            out, _ = self._proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            self.why_not = f"no key within {self.timeout:g} s"
            return None
        if self._proc.returncode != 0:
            self.why_not = f"the child exited {self._proc.returncode}"
            return None
        path, sep, key = out.partition("\n")
        if not sep or not key:
            self.why_not = "the child printed no key"
            return None
        return path, key

    def install(self) -> bool:
        """Wait for the child's key and make ``triton.runtime.cache.triton_key`` return it; True if
        taken. Not taken when Triton computed its own already in this process (nothing to save), or
        when the child imported Triton from another file than this process did."""
        import triton
        import triton.runtime.cache as cache

        got = self._wait()
        if got is None:
            return False
        path, key = got
        if path != triton.__file__:
            self.why_not = f"the child imported Triton from {path}, this process from {triton.__file__}"
            return False
        own = cache.triton_key
        info = getattr(own, "cache_info", None)
        if info is not None and info().currsize:
            self.why_not = "Triton had its key already"
            return False
        self.key = key
        cache.triton_key = lambda: key
        return True
