"""The live progress line of ``convert`` and ``verify``, on stderr: what it is on, bytes, rate, time left.

Shown only when stderr is a terminal (``NVFP4_FUSE_PROGRESS=1`` forces it, ``=0`` turns it off), and
never with ``--json`` or ``--quiet``. The rate and time left are the average since the work began,
over the bytes this run processed (bytes a resume kept are not counted as speed): they keep moving
while the disk catches up (an fsync, writeback) instead of freezing on the last sample.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.text import Text


def progress_enabled(console: Console, quiet: bool = False) -> bool:
    forced = os.environ.get("NVFP4_FUSE_PROGRESS")
    if quiet or forced == "0":
        return False
    return forced == "1" or console.is_terminal


def _rate(task: Task) -> float | None:
    elapsed = task.elapsed
    done = task.completed - task.fields.get("kept", 0)
    if not elapsed or elapsed < 0.5 or done <= 0:
        return None
    return done / elapsed


class AverageRateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        r = _rate(task)
        if r is None:
            return Text("?/s", style="progress.data.speed")
        for unit in ("B", "kB", "MB", "GB", "TB"):
            if r < 1000 or unit == "TB":
                return Text(f"{r:.1f} {unit}/s" if unit != "B" else f"{r:.0f} B/s", style="progress.data.speed")
            r /= 1000
        raise AssertionError


class TimeLeftColumn(ProgressColumn):
    max_refresh = None

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text(f"done in {timedelta(seconds=int(task.finished_time or task.elapsed or 0))}", style="progress.elapsed")
        r = _rate(task)
        if r is None or task.total is None:
            return Text("-:--:-- left", style="progress.remaining")
        left = max(0.0, (task.total - task.completed) / r)
        return Text(f"{timedelta(seconds=int(left))} left", style="progress.remaining")


def byte_progress(console: Console, enabled: bool) -> Progress:
    """A progress display of bytes on ``console``; a no-op when not ``enabled``."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        DownloadColumn(),
        AverageRateColumn(),
        TimeLeftColumn(),
        console=console,
        transient=False,
        disable=not enabled,
        refresh_per_second=4,
    )


@contextmanager
def download_line(prog: Progress, files: Callable[[], Any] | None, interval: float = 0.25) -> Iterator[None]:
    """A second line under ``prog`` while a Hub source is fetched (``files()``: its
    :class:`~nvfp4_fuse.source_files.HubSourceFiles` once planned, else None; ``files`` None for a local
    source): the bytes this run has downloaded, of those it has to, and their rate, read from the
    fetcher's counters every ``interval`` seconds. The main line moves as shards are written or
    checked, which waits on the downloads: without this one it can stand still for as long as a shard
    takes to arrive."""
    if files is None or prog.disable:
        yield
        return
    task = prog.add_task("download", total=None, kept=0)
    stop = threading.Event()

    def poll() -> None:
        while True:
            done = stop.wait(interval)
            f = files()
            if f is not None:
                prog.update(task, completed=f.stats.bytes, total=f.download_bytes)
            if done:
                return

    t = threading.Thread(target=poll, name="nvfp4-download-line", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
