"""The live preview served by a real enhancement run of the sample clip, seen in Chromium."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from browser import APT_PACKAGES, BrowserError, HeadlessChromium, find_chromium
from rtsp_server import free_port

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "solvay_pan.mp4"
MOBILENET = "detection_mobilenet0.25_Final.pth"
TOKEN = "preview-test-token"


def stderr_lines(process: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in process.stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_url(lines: queue.Queue, process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            assert process.poll() is None, "".join(seen)
            continue
        seen.append(line)
        if line.startswith("preview: "):
            return line.split(" ", 1)[1].strip()
    pytest.fail("no preview URL printed:\n" + "".join(seen))


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def region(shot: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    return shot[y : y + h, x : x + w].astype(np.float32)


def changed(shots: list[np.ndarray], box: tuple[int, int, int, int]) -> bool:
    return len(shots) == 2 and np.abs(region(shots[0], box) - region(shots[1], box)).mean() > 1


def looped_clip(path: Path, loops: int = 3) -> Path:
    """The sample at half size, played ``loops`` times (12 s at 25 fps): long enough that the run
    is still going while the browser takes its screenshots, even on a loaded 2-core machine
    (the 4-second sample at full size could end first, with the page's server)."""
    import av

    with av.open(str(SAMPLE)) as src:
        frames = [f.reformat(width=480, height=270, format="yuv420p") for f in src.decode(video=0)]
    with av.open(str(path), "w") as dst:
        stream = dst.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 480, 270, "yuv420p"
        for i, frame in enumerate(frames * loops):
            # Timed at 25 fps (pts None would give every frame pts 0).
            frame.pts, frame.time_base = i, Fraction(1, 25)
            dst.mux(stream.encode(frame))
        dst.mux(stream.encode(None))
    return path


def test_preview_of_a_realtime_run(shared_dir, tmp_path):
    try:
        find_chromium()
    except BrowserError as error:
        pytest.fail(f"{error} -- the browser test needs the Debian package(s) {APT_PACKAGES}")
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(shared_dir / "weights" / MOBILENET, weights / MOBILENET)
    clip = looped_clip(tmp_path / "looped.mp4")
    port = free_port()
    # Started first: Chromium takes seconds, and the clip plays for twelve.
    with HeadlessChromium(width=1400, height=700, timeout_s=30) as browser:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamgpen", "enhance", str(clip), "--realtime",
             "--preview", f"0.0.0.0:{port}", "--preview-token", TOKEN, "--only-center-face",
             "--model", "identity", "--detector", "retinaface_mobile0.25",
             "--weights-dir", str(weights), "--device", "cpu", "--quiet", "--mask", "box"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            url = wait_for_url(stderr_lines(process), process, timeout=120)
            local = f"http://127.0.0.1:{port}"
            assert TOKEN in url
            assert get(f"{local}/stats")[0] == 401, "beyond loopback a request needs the token"
            browser.navigate(f"{local}/?token={TOKEN}")
            browser.wait_for(
                "['original', 'enhanced'].every(id => document.getElementById(id).naturalWidth)"
            )
            boxes = {pane: browser.element_box(f"#{pane}") for pane in ("original", "enhanced")}
            shots = [browser.screenshot()]
            # Screenshots a second apart, until both panes moved on (the run may be slow to
            # start on a loaded 2-core machine: up to 8 tries).
            while len(shots) < 8 and not all(changed(shots[-2:], box) for box in boxes.values()):
                time.sleep(1.0)
                shots.append(browser.screenshot())
            status, body = get(f"{local}/stats?token={TOKEN}")
        finally:
            process.terminate()
            process.wait(timeout=60)
    for pane, box in boxes.items():
        a, b = region(shots[-2], box), region(shots[-1], box)
        assert a.std() > 20 and b.std() > 20, f"the {pane} pane is blank"
        assert changed(shots[-2:], box), f"the {pane} pane did not change in a second"
    assert status == 200
    stats = json.loads(body)
    assert stats["latency_ms_p95"] is not None and stats["latency_ms_p95"] > 0
    assert stats["model"] == "identity" and stats["device"] == "cpu"
