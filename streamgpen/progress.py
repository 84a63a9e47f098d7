"""The one progress-bar factory (photos, video, weights downloads) and the rate wording.

Bars go to stderr and show what a person waiting wants: done/total, elapsed time, time left
(once there is a rate to estimate it from), and a rate with enough digits to read on a slow CPU
(``0.42 fps``, or ``7.1 s/frame`` below one per second).
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def stderr_console() -> Console:
    """Where progress and summaries go, so stdout stays for results."""
    return Console(stderr=True)


def task_bar(*, console: Console, disable: bool, counted: bool = True) -> Progress:
    """A bar of items done (``counted``: a known total) with elapsed and remaining time, and an
    ``info`` field for the caller's figures; without a total, the elapsed time and figures."""
    columns = [TextColumn("[bold]{task.description}")]
    if counted:
        columns += [BarColumn(bar_width=20), MofNCompleteColumn()]
    columns += [TimeElapsedColumn()]
    if counted:
        columns += [TextColumn("left"), TimeRemainingColumn(compact=True)]
    columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, console=console, disable=disable)


def download_bar(*, console: Console | None = None, disable: bool = False) -> Progress:
    """A bar of bytes transferred, with speed and time left."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=20),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(compact=True),
        console=console or stderr_console(),
        disable=disable,
    )


def rate(count: float, seconds: float, unit: str = "frame") -> str:
    """``12.3 fps`` / ``0.42 fps`` / ``7.1 s/frame``: readable whether fast or slow."""
    if count <= 0 or seconds <= 0:
        return f"- {unit}s/s" if unit != "frame" else "- fps"
    per_second = count / seconds
    if per_second < 1:
        return f"{seconds / count:.1f} s/{unit}"
    name = "fps" if unit == "frame" else f"{unit}s/s"
    return f"{per_second:.2f} {name}" if per_second < 10 else f"{per_second:.1f} {name}"


def duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
