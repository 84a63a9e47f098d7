"""docs/progress-80.txt and docs/bench-80.txt are what the code prints now, and fit 80 columns."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def render_text():
    """docs/render_text.py, the script that writes the files (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("render_text", DOCS / "render_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["progress-80.txt", "bench-80.txt"])
def test_committed_rendering_is_the_current_one(render_text, name):
    # Regenerate: python docs/render_text.py
    text = render_text.RENDERINGS[name]()
    assert (DOCS / name).read_text() == text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_progress_rendering_shows_the_faces_and_the_slow_rates(render_text):
    text = render_text.progress_text()
    lines = text.splitlines()
    faces = next(line for line in lines if line.startswith("faces "))
    # 3 batches of 4 of the 29 faces; 1.5 s of detection and 84 s of restoring for 12 faces.
    assert " 12/29 " in faces and faces.endswith(" 7.1 s/face")
    video = [line for line in lines if line.startswith("video ")]
    assert len(video) == 2 and " 40/100 " in video[0] and " 24.6 fps, " in video[0]
    assert " 30/100 " in video[1] and " 7.1 s/frame, " in video[1]
    assert "1 image(s), 29 face(s) in 3 min 27 s (7.1 s/face); written to pho" in text
