"""A byte budget shared by several streams (convert's shard writers, verify's shard readers).

Each stream takes bytes before it reads or writes a piece and gives them back once the piece is hashed.
A stream that holds pieces of its own never waits on the budget: it finishes its oldest piece instead
(``try_acquire`` failing says so). A stream that holds nothing waits (``acquire``) until the others have
given back enough, or until nothing at all is held, so a piece larger than the whole budget still goes
through, alone. The total held never exceeds the limit, except by that one oversized piece.
"""

from __future__ import annotations

import threading


class ByteBudget:
    def __init__(self, limit: int):
        self.limit, self.held, self.peak = limit, 0, 0
        self._cv = threading.Condition()

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` bytes if they fit (or nothing is held at all); never waits."""
        with self._cv:
            if self.held and self.held + n > self.limit:
                return False
            self._take(n)
            return True

    def acquire(self, n: int) -> None:
        """Take ``n`` bytes, waiting until they fit or nothing is held. Only for a stream holding none."""
        with self._cv:
            while self.held and self.held + n > self.limit:
                self._cv.wait()
            self._take(n)

    def release(self, n: int) -> None:
        with self._cv:
            self.held -= n
            self._cv.notify_all()

    def _take(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)
