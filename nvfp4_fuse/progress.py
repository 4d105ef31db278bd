"""The live progress line of ``convert`` and ``verify``, on stderr: what it is on, bytes, rate, time left.

Shown only when stderr is a terminal (``NVFP4_FUSE_PROGRESS=1`` forces it, ``=0`` turns it off), and
never with ``--json`` or ``--quiet``. The rate and time left are the average since the work began,
over the bytes this run processed (bytes a resume kept are not counted as speed): they keep moving
while the disk catches up (an fsync, writeback) instead of freezing on the last sample.
"""

from __future__ import annotations

import os
from datetime import timedelta

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
