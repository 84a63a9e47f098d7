"""ffprobe, the tests' independent reader of the media streamgpen writes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def ffprobe(path: Path, stream: str, entries: str) -> list[str]:
    """One value per frame, packet or stream of ``stream`` (e.g. 'v:0'), as ffprobe reads it."""
    if shutil.which("ffprobe") is None:
        pytest.fail("ffprobe is missing: install Debian's ffmpeg package (.ci/run does)")
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", stream, "-show_entries", entries,
         "-of", "csv=p=0", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [line.strip(",") for line in out.split()]
