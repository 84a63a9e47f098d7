"""Several inputs in one process: `enhance IN1 IN2 ... -o OUT_DIR/`, one device worker.

Clips are the sample's first frames (tests/test_video.sample_head): every assertion holds frame
by frame on any length, and the whole sample costs minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from probe import ffprobe
from test_video import decoded_frames, sample_head, streamgpen_cmd

from streamgpen.apps.inputs import plan_videos
from streamgpen.errors import UserError


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Path:
    return sample_head(tmp_path_factory.mktemp("many") / "head.mp4", 12)


def run(*args, weights_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        streamgpen_cmd(*args, weights_dir=weights_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def copies(head: Path, folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(head, folder / f"{name}.mp4")) for name in names]


def test_three_realtime_copies_share_batches_and_account_for_every_frame(
    head, tmp_path, weights_dir
):
    inputs = copies(head, tmp_path / "in", ["cam1", "cam2", "cam3"])
    out, faces = tmp_path / "out", tmp_path / "faces"
    result = run(
        *inputs, "-o", f"{out}/", "--faces-json", f"{faces}/", "--realtime",
        "--codec", "libx264", "--preset", "ultrafast", weights_dir=weights_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    batches = {}
    for clip in inputs:
        line = next(x for x in result.stderr.splitlines() if x.startswith(f"{clip}:"))
        dropped = int(re.search(r"dropped (\d+)", line).group(1))
        written = len(ffprobe(out / clip.name, "v:0", "frame=pts"))
        assert written + dropped == 12, line  # every frame written or counted as dropped
        log = [json.loads(x) for x in (faces / f"{clip.stem}.jsonl").read_text().splitlines()]
        assert len({r["frame"] for r in log}) == written  # the sample shows faces on every frame
        batches[clip.stem] = {r["batch"] for r in log}
    # Faces of different cameras went through the restorer in the same device batches.
    shared = (batches["cam1"] & batches["cam2"]) | (batches["cam2"] & batches["cam3"])
    assert shared, batches


def test_several_files_each_equal_its_own_run(head, tmp_path, weights_dir):
    # A file is never dropped, and sharing the device changes nothing in an output: each equals
    # the single-input run frame for frame (identity model: no batch-size effect either).
    inputs = copies(head, tmp_path / "in", ["a", "b"])
    flipped = tmp_path / "in" / "b.mp4"  # another picture: the pan mirrored, same timing
    _mirror(head, flipped)
    args = ("--codec", "libx264rgb", "--crf", "0", "--preset", "ultrafast")
    result = run(*inputs, "-o", f"{tmp_path / 'out'}/", *args, weights_dir=weights_dir)
    assert result.returncode == 0, result.stderr
    for clip in inputs:
        alone = tmp_path / f"{clip.stem}_alone.mp4"
        single = run(clip, "-o", alone, *args, weights_dir=weights_dir)
        assert single.returncode == 0, single.stderr
        together = tmp_path / "out" / clip.name
        assert ffprobe(together, "v:0", "frame=pts") == ffprobe(alone, "v:0", "frame=pts")
        for a, b in zip(decoded_frames(together), decoded_frames(alone), strict=True):
            assert np.array_equal(a, b)


def test_an_input_that_fails_ends_alone(head, tmp_path, weights_dir):
    good = copies(head, tmp_path / "in", ["good"])[0]
    broken = tmp_path / "in" / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    result = run(
        good, broken, "rtsp://127.0.0.1:9/nobody", "-o", f"{tmp_path / 'out'}/",
        "--reconnect", "0", "--timeout", "2", "--preset", "ultrafast", weights_dir=weights_dir,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert any(x.startswith(f"{broken}:") for x in lines), result.stderr
    assert any(x.startswith("rtsp://127.0.0.1:9/nobody:") for x in lines), result.stderr
    assert len(ffprobe(tmp_path / "out" / "good.mp4", "v:0", "frame=pts")) == 12


def test_plans_name_every_output_and_refuse_clashes(tmp_path):
    (tmp_path / "a" / "day1").mkdir(parents=True)
    (tmp_path / "a" / "day1" / "x.mkv").write_bytes(b"")
    (tmp_path / "a" / "y.avi").write_bytes(b"")
    (tmp_path / "a" / ".y.partial-1-ab.mp4").write_bytes(b"")  # an interrupted run's leftovers
    plans = plan_videos(
        (str(tmp_path / "a"), "rtsp://user:pw@cam.local/live/cam3?x=1", "webcam:0"),
        f"{tmp_path / 'out'}/",
    )
    assert [Path(p.output).relative_to(tmp_path / "out").as_posix() for p in plans] == [
        "day1/x.mkv", "y.mp4", "cam3.mp4", "webcam0.mp4",
    ]  # fmt: skip
    assert "pw" not in plans[2].name  # names are printed: no password
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "y.mp4").write_bytes(b"")
    with pytest.raises(UserError, match="would both be written to"):
        plan_videos((str(tmp_path / "a"), str(tmp_path / "b")), f"{tmp_path / 'o2'}/")
    with pytest.raises(UserError, match="go into a folder"):
        plan_videos((str(tmp_path / "b" / "y.mp4"), "webcam:0"), str(tmp_path / "f.mp4"))
    with pytest.raises(UserError, match="needs -o"):
        plan_videos((str(tmp_path / "b" / "y.mp4"), "webcam:0"), None)


def _mirror(source: Path, target: Path) -> None:
    """``source`` flipped left to right, frame for frame with its pts and audio packets."""
    import av

    with av.open(str(source)) as src, av.open(str(target), "w") as dst:
        video_in = src.streams.video[0]
        video = dst.add_stream("libx264", rate=video_in.average_rate, options={"crf": "12"})
        video.width, video.height, video.pix_fmt = video_in.width, video_in.height, "yuv420p"
        video.time_base = video_in.time_base
        for frame in src.decode(video=0):
            image = frame.to_ndarray(format="rgb24")[:, ::-1].copy()
            out = av.VideoFrame.from_ndarray(image, format="rgb24")
            out.pts, out.time_base = frame.pts, frame.time_base
            dst.mux(video.encode(out))
        dst.mux(video.encode(None))


def test_the_live_page_picks_an_input_and_shows_its_figures(shared_dir, tmp_path, weights_dir):
    from browser import HeadlessChromium
    from rtsp_server import free_port
    from test_preview_live import get, looped_clip, stderr_lines, wait_for_url

    # 12 s: with two loops (8 s) a loaded machine once ended the run before /stats was read.
    looped = looped_clip(tmp_path / "looped.mp4", loops=3)
    clips = copies(looped, tmp_path / "in", ["left", "right"])
    port = free_port()
    with HeadlessChromium(width=1200, height=600, timeout_s=30) as browser:
        process = subprocess.Popen(
            streamgpen_cmd(*clips, "-o", "null", "--realtime", "--preview", str(port), "--quiet",
                           weights_dir=weights_dir),
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            url = wait_for_url(stderr_lines(process), process, timeout=120)
            browser.navigate(url)
            # The picker lists both inputs, each with its own figures as they come.
            names = browser.wait_for(
                "(() => { const rows = [...document.querySelectorAll('#inputs tr')];"
                " return rows.length === 2 && rows.every(r => r.cells[2].textContent !== '–')"
                " && rows.map(r => r.cells[0].textContent); })()",
                timeout_s=60,
            )
            browser.evaluate("document.querySelectorAll('#inputs a')[1].click()")
            browser.wait_for("document.getElementById('enhanced').naturalWidth > 0", timeout_s=30)
            page = browser.evaluate("location.pathname")
            status, body = get(f"http://127.0.0.1:{port}/stats")
            _, second = get(f"http://127.0.0.1:{port}/inputs/1/stats")
        finally:
            process.terminate()
            process.wait(timeout=60)
    assert names == [str(c) for c in clips]
    assert page == "/inputs/1/"
    assert status == 200
    listed = json.loads(body)["inputs"]
    assert [x["name"] for x in listed] == names and all(x["published"] > 0 for x in listed)
    assert json.loads(second)["published"] > 0
