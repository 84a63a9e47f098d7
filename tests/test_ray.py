"""Archives on Ray (issue #13): segments cut at key frames, warm workers, lossless joins, resume.

Ray runs on this machine inside the test process (``ray.init(num_cpus=2)``, loopback only). The
model is the identity, the detector the real mobilenet RetinaFace, the codec ffv1 (lossless): a
segmented run must then equal the single-process run frame for frame, pts for pts and audio
packet for audio packet. ffprobe reads every output as the independent check.

The clips are windows of the Solvay photo, 160x120 (faces ~40x50 px): a face costs ~35 ms on this
CPU at the identity's 512 px crops, a frame without one ~6 ms, so faces are shown only where the
segment boundaries need them.
"""

from __future__ import annotations

import _thread
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import ray
import torch
from probe import ffprobe
from rich.console import Console

from streamgpen.apps.enhance import load_enhancer
from streamgpen.apps.videos import enhance_video
from streamgpen.config import (
    DetectorConfig,
    EnhancerConfig,
    FaceConfig,
    ModelConfig,
    RunConfig,
    SinkConfig,
    VideoConfig,
)
from streamgpen.errors import UserError
from streamgpen.scale.archive import run_archive
from streamgpen.scale.manifest import MANIFEST, job_folder
from streamgpen.scale.segments import SegmentPolicy, index_video, plan_segments

# The module's tests share one Ray cluster and one set of clips (with --dist loadgroup).
pytestmark = pytest.mark.xdist_group("ray")

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "media" / "Solvay_conference_1927.png"
SIZE = (160, 120)
FACES_AT = (440, 200)  # a window of the photo with two faces in it
EMPTY_AT = (400, 450)  # the photo's lower part: suits, no face
TIME_BASE = Fraction(1, 12800)
# 150-frame segments (the long clip's 600 frames make 4), warmed up 3 s (75 frames) early: the
# default warm-up, with which a fresh tracker merged bit for bit with the single run's within
# 51-67 frames on these clips (docs/scale.md).
POLICY = SegmentPolicy(min_seconds=6.0, warmup_seconds=3.0)
LONG_FRAMES = 600
# Faces from frame 205: the segment starting at 300 is warmed up from 220, when the single run's
# tracker has followed them for 15 frames, so its smoothing state differs from a fresh one's and
# must converge before 300; the faces stay until 330, past that boundary.
LONG_FACES = range(205, 330)


def write_clip(path: Path, frames: int, *, faces: range = range(0), audio: bool = True,
               gop: int = 50) -> Path:  # fmt: skip
    """``frames`` frames at 25 fps (H.264 with B-frames, a key frame every ``gop``), a slowly
    panning window of the photo showing faces on the frames in ``faces``; AAC audio."""
    photo = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    width, height = SIZE
    rng = np.random.default_rng(13)
    with av.open(str(path), "w") as out:
        options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "crf": "20"}
        video = out.add_stream("libx264", rate=25, options=options)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.time_base = TIME_BASE
        sound = out.add_stream("aac", rate=48000) if audio else None
        for i in range(frames):
            cx, cy = FACES_AT if i in faces else EMPTY_AT
            x = cx - width // 2 + round(20 * np.sin(2 * np.pi * i / 240))
            y = cy - height // 2 + round(8 * np.sin(2 * np.pi * i / 170))
            noise = rng.integers(-3, 4, (height, width, 3))
            image = np.clip(photo[y : y + height, x : x + width] + noise, 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i * 512, TIME_BASE
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if sound is not None:
            _write_tone(out, sound, frames / 25)
    return path


def _write_tone(out, stream, seconds: float) -> None:
    samples = np.arange(int(seconds * 48000) // 1024 * 1024) / 48000
    tone = (0.2 * np.sin(2 * np.pi * 440 * samples)).astype(np.float32)
    for start in range(0, len(tone), 1024):
        chunk = np.ascontiguousarray(np.stack([tone[start : start + 1024]] * 2))
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = 48000, start, Fraction(1, 48000)
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def run_config(weights_dir: Path, codec: str = "ffv1") -> RunConfig:
    return RunConfig(
        input="(the pairs)",
        ray="local",
        quiet=True,
        enhancer=EnhancerConfig(
            model=ModelConfig(name="identity"),
            detector=DetectorConfig(name="retinaface_mobile0.25"),
            faces=FaceConfig(mask="box"),
            device="cpu",
            weights_dir=weights_dir,
        ),
        video=VideoConfig(sink=SinkConfig(codec=codec)),
    )


@pytest.fixture(scope="module")
def cluster():
    """Ray on this machine: two CPU slots, so two workers."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """The archive: one long clip with faces across a segment boundary, three short ones (one
    segment each: one without audio, one of 43 frames)."""
    folder = tmp_path_factory.mktemp("archive")
    return {
        "long": write_clip(folder / "long.mp4", LONG_FRAMES, faces=LONG_FACES),
        "short": write_clip(folder / "short.mp4", 40),
        "silent": write_clip(folder / "silent.mp4", 40, audio=False),
        "odd": write_clip(folder / "odd.mp4", 43),
    }


@pytest.fixture(scope="module")
def reference(clips, weights_dir, tmp_path_factory) -> dict[str, Path]:
    """Each clip through a single-process run (``enhance_video``), as the workers run: one
    thread (the workers have one CPU each)."""
    folder = tmp_path_factory.mktemp("single")
    config = run_config(weights_dir)
    enhancer = load_enhancer(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outputs = {}
        for name, clip in clips.items():
            outputs[name] = folder / f"{name}.mkv"
            one = replace(config, input=str(clip), output=str(outputs[name]))
            enhance_video(one, enhancer, console=Console(file=io.StringIO()))
    finally:
        torch.set_num_threads(threads)
    return outputs


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def audio_packets(path: Path) -> list[tuple]:
    """Every audio packet's pts, dts, duration, size and SHA-256, as ffprobe reads them."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_data_hash", "sha256",
         "-show_entries", "packet=pts,dts,duration,size,data_hash", "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    keys = ("pts", "dts", "duration", "size", "data_hash")
    return [tuple(p.get(k) for k in keys) for p in json.loads(out).get("packets", [])]


def assert_same_as_single(output: Path, single: Path, *, audio: bool) -> None:
    """Equal frames (PSNR inf), equal video pts, equal audio packets."""
    got, want = decoded(output), decoded(single)
    assert len(got) == len(want) > 0
    differing = [
        i for i, (a, b) in enumerate(zip(got, want, strict=True)) if not np.array_equal(a, b)
    ]
    assert not differing, f"{output.name}: frames {differing[:10]} differ from the single run"
    assert ffprobe(output, "v:0", "frame=pts") == ffprobe(single, "v:0", "frame=pts")
    packets = audio_packets(output)
    assert packets == audio_packets(single)
    assert (len(packets) > 0) == audio


def finished(manifest: Path) -> dict:
    try:
        return json.loads(manifest.read_text())["finished"]
    except (OSError, ValueError, KeyError):
        return {}


def test_segments_are_cut_at_key_frames_and_warmed_up_on_the_cadence(clips):
    index = index_video(str(clips["long"]))
    assert len(index.pts) == LONG_FRAMES and index.keyframes == tuple(range(0, 600, 50))
    segments = plan_segments(index, POLICY, cadence=20, chunk=4)
    assert [(s.start, s.end) for s in segments] == [(i, i + 150) for i in range(0, 600, 150)]
    for segment in segments[1:]:
        assert segment.warm % 20 == 0 and segment.start - segment.warm >= 75
        assert segment.span.seek_pts == index.pts[segment.warm // 50 * 50]
    # Read from the warm-up's start (60, 220, 360) to the end of the last chunk of 4 frames
    # (150 -> 152, 450 -> 452).
    assert [s.span.frames for s in segments] == [152, 240, 232, 240]
    # A short video is one segment, read from its start.
    (only,) = plan_segments(index_video(str(clips["odd"])), POLICY, cadence=20, chunk=4)
    assert (only.start, only.end, only.span.seek_pts) == (0, 43, None)


def test_archive_on_ray_equals_single_process_runs(cluster, clips, reference, weights_dir,
                                                   tmp_path):  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    pairs = [(str(clip), str(out / f"{name}.mkv")) for name, clip in clips.items()]
    console = Console(file=io.StringIO(), width=300)
    config = replace(run_config(weights_dir), quiet=False)
    assert run_archive(config, pairs, console=console, policy=POLICY) == 0
    for name in clips:
        assert_same_as_single(out / f"{name}.mkv", reference[name], audio=name != "silent")
    assert sorted(os.listdir(out)) == sorted(f"{name}.mkv" for name in clips)  # job folder gone
    assert "4 videos, 7 segments, 723 frames; enhanced 723 frames" in console.file.getvalue()


def test_an_interrupted_job_resumes_and_a_killed_worker_is_replaced(cluster, weights_dir,
                                                                    tmp_path):  # fmt: skip
    # The fault paths on a clip without faces (the faces across segment boundaries are the test
    # above's): 600 frames in six segments of 100, ~1 s each here.
    clip = write_clip(tmp_path / "plain.mp4", LONG_FRAMES)
    output, single = tmp_path / "plain.mkv", tmp_path / "single.mkv"
    config = run_config(weights_dir)
    one = replace(config, input=str(clip), output=str(single))
    enhance_video(one, load_enhancer(config), console=Console(file=io.StringIO()))
    pairs, policy = [(str(clip), str(output))], SegmentPolicy(min_seconds=4.0)
    manifest = job_folder(str(output)) / MANIFEST

    # Ctrl-C once the first segment is recorded: the finished segments stay on disk.
    watcher = threading.Thread(target=_interrupt_when_finished, args=(manifest,), daemon=True)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        run_archive(config, pairs, console=Console(file=io.StringIO()), policy=policy)
    kept = finished(manifest)
    # Stopped within a segment or two of the first: three or more are left for two workers, so
    # the worker that finishes first in the next run goes on to another one, and is killed there.
    assert 1 <= len(kept) <= 3 and not output.exists()

    # The same command again; a worker of this run is killed (SIGKILL) in the middle of a segment.
    killed: list[int] = []
    earlier = {record["worker"] for record in kept.values()}
    killer = threading.Thread(
        target=_kill_a_busy_worker, args=(manifest, earlier, killed), daemon=True
    )
    killer.start()
    console = Console(file=io.StringIO(), width=300)
    assert run_archive(replace(config, quiet=False), pairs, console=console, policy=policy) == 0
    killer.join(timeout=1)
    assert killed, "no worker was seen running a segment"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)
    assert_same_as_single(output, single, audio=True)
    reused = sum(record["frames"] for record in kept.values())
    assert f"enhanced {LONG_FRAMES - reused} frames" in console.file.getvalue()


def _interrupt_when_finished(manifest: Path) -> None:
    deadline = time.monotonic() + 120
    while not finished(manifest) and time.monotonic() < deadline:
        time.sleep(0.02)
    _thread.interrupt_main()  # what Ctrl-C does: KeyboardInterrupt in the main thread


def _kill_a_busy_worker(manifest: Path, earlier: set[int], killed: list[int]) -> None:
    """The worker that records this run's first segment, killed once it is on its next one
    (its process title, set by Ray, names the method it runs)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        workers = {record["worker"] for record in finished(manifest).values()} - earlier
        for pid in workers:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::SegmentWorker.run"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.01)


def test_a_lossy_h264_archive_joins_into_one_playable_file(cluster, weights_dir, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 100, gop=25)
    single, joined = tmp_path / "single.mp4", tmp_path / "joined.mp4"
    config = run_config(weights_dir, codec="libx264")
    one = replace(config, input=str(clip), output=str(single))
    enhance_video(one, load_enhancer(config), console=Console(file=io.StringIO()))
    policy = SegmentPolicy(min_seconds=1.0, warmup_seconds=0.5)  # 4 segments of 25 frames
    assert (
        run_archive(
            config, [(str(clip), str(joined))], console=Console(file=io.StringIO()), policy=policy
        )
        == 0
    )
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
         "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(joined)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert probe.stdout.split() == ["100"] and probe.stderr == ""  # decodes without an error
    assert ffprobe(joined, "v:0", "frame=pts") == ffprobe(single, "v:0", "frame=pts")
    assert audio_packets(joined) == audio_packets(single)
    # Each segment is its own crf 18 encode (a key frame at each start); against the single
    # run's encode of the same (noisy) frames: measured 41.1-45.3 dB, median 42.4.
    for a, b in zip(decoded(joined), decoded(single), strict=True):
        mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
        assert mse == 0 or 10 * np.log10(255**2 / mse) > 38


def test_the_command_line_sends_an_archive_folder_to_a_running_cluster(
    cluster, clips, weights_dir, tmp_path
):
    archive, out = tmp_path / "archive", tmp_path / "out"
    (archive / "day2").mkdir(parents=True)
    source = archive / "day2" / "short.mp4"
    source.write_bytes(clips["short"].read_bytes())
    address = ray.get_runtime_context().gcs_address  # this test's cluster, over loopback
    run = subprocess.run(
        [sys.executable, "-m", "streamgpen", "enhance", str(archive), "-o", f"{out}/",
         "--ray", address, "--model", "identity", "--detector", "retinaface_mobile0.25",
         "--weights-dir", str(weights_dir), "--device", "cpu", "--mask", "box",
         "--codec", "ffv1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "1 video, 1 segment, 40 frames; enhanced 40 frames" in run.stderr
    result = out / "day2" / "short.mp4"  # the folder's layout, the input's container
    assert sorted(p.name for p in out.rglob("*")) == ["day2", "short.mp4"]  # no job folder left
    assert ffprobe(result, "v:0", "frame=pts") == ffprobe(source, "v:0", "frame=pts")
    # The source's audio, packet for packet, as a single run copies it (1.6 s of 48 kHz AAC:
    # 75 packets and the priming one).
    assert len(audio_packets(result)) == 76 and audio_packets(result) == audio_packets(source)


def test_without_ray_installed_ray_is_one_clear_line(monkeypatch, weights_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the package
    with pytest.raises(UserError, match=r"pip install streamgpen\[ray\]"):
        run_archive(run_config(weights_dir), [], console=Console(file=io.StringIO()))
