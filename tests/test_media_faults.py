"""The media layer when things go wrong: full disks, killed runs, stuck writes, odd inputs.

Sources and sinks on their own, no model; ffprobe (Debian's ffmpeg) reads what was written as an
independent check. Faults are real where the system gives them without root mounts: a file size
limit (EFBIG), /dev/full (ENOSPC), /sys (refuses new files even to root), SIGKILL, a FIFO, a TCP
server that never answers.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from probe import ffprobe
from rtsp_server import make_test_clip
from test_video_io import decode, pattern, write_clip

from streamgpen.errors import UserError
from streamgpen.media import urls
from streamgpen.media.sinks import open_sink
from streamgpen.media.video import open_source

ROOT = Path(__file__).resolve().parents[1]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial" in p.name)


def probe_frames(path: Path) -> int:
    """Video frames ffprobe decodes (a cut-short file counts up to where it breaks)."""
    out = subprocess.run(
        ["ffprobe", "-v", "quiet", "-count_frames", "-select_streams", "v:0",
         "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return int(out) if out.isdigit() else 0


def run_child(script: str, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


# -- which inputs are live, which outputs are streams -------------------------------------


def test_url_helpers_name_live_inputs_and_published_outputs():
    assert urls.url_scheme("RTSP://cam/1") == "rtsp" and urls.url_scheme("clip.mp4") == ""
    live_inputs = ("rtsp://h/s", "rtsps://h/s", "rtmp://h/a", "srt://h:1", "udp://h:1",
                   "tcp://h:1", "rtp://h:1", "http://h/x.m3u8", "HTTPS://h/x", "webcam:0",
                   "webcam:Logitech")  # fmt: skip
    for live in live_inputs:
        assert urls.is_live_input(live), live
    for not_live in ("clip.mp4", "/data/rtsp.mkv", "C:\\videos\\a.mp4", "ftp://h/a.mp4"):
        assert not urls.is_live_input(not_live), not_live
    assert urls.is_publish_url("rtsp://h/out") and urls.is_publish_url("rtsps://h/out")
    assert not urls.is_publish_url("rtmp://h/out") and not urls.is_publish_url("out.mp4")


def test_unknown_schemes_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="unsupported input URL scheme 'ftp'") as info:
        open_source("ftp://example.invalid/a.mp4")
    assert "\n" not in str(info.value)
    src = tmp_path / "clip.mkv"
    write_clip(src, 2, (32, 24))
    with open_source(str(src)) as source, pytest.raises(UserError) as info:
        open_sink("rtmp://127.0.0.1/live", source)
    assert str(info.value) == (
        "cannot publish to rtmp://127.0.0.1/live: outputs can be rtsp://, rtsps:// streams"
    )


# -- RTSP output timeout ------------------------------------------------------------------


def test_rtsp_publish_to_a_server_that_never_answers_fails_within_the_timeout(tmp_path):
    """A server that accepts the connection and never answers the handshake: the first write
    ends with one error line (measured: 1.1 s with timeout=1); before, it hung forever."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
    url = f"rtsp://127.0.0.1:{server.getsockname()[1]}/silent"
    clip = make_test_clip(tmp_path / "clip.mp4", seconds=0.2, fps=25, size=(64, 48), audio=False)
    outcome: list[BaseException | None] = []

    def publish() -> None:
        with open_source(str(clip)) as source:
            try:
                with open_sink(url, source, preset="ultrafast", timeout=1.0) as sink:
                    for frame in source:
                        sink.write(frame, frame.image)
                outcome.append(None)
            except BaseException as exc:  # handed to the test thread
                outcome.append(exc)

    worker = threading.Thread(target=publish, daemon=True)
    worker.start()
    worker.join(timeout=30)  # generous: the bound under test is 1 s
    hung = worker.is_alive()
    for conn in accepted:
        conn.close()  # lets a hung muxer see the end of the connection
    server.close()
    assert not hung, "writing to a server that never answers hung"
    assert len(outcome) == 1 and isinstance(outcome[0], UserError), outcome
    message = str(outcome[0])
    assert message.startswith(f"cannot write to {url}: no answer within 1 s"), message
    assert "\n" not in message


# -- audio timing when transcoded ---------------------------------------------------------


def write_clip_with_late_audio(path: Path, rate: int) -> None:
    """2 s of ffv1 video at 10 fps and pcm_s16le stereo audio (a 440 Hz tone) that starts at
    0.5 s, stops at 1.2 s and comes back from 1.5 s to 2.0 s: an offset and a gap."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("ffv1", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv444p"
        audio = container.add_stream("pcm_s16le", rate=rate)
        audio.layout = "stereo"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(pattern(i, 64, 48), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 10)
            container.mux(video.encode(frame))
        chunk = rate // 10
        for start_s, end_s in ((0.5, 1.2), (1.5, 2.0)):
            for first in range(round(start_s * rate), round(end_s * rate), chunk):
                t = (first + np.arange(chunk)) / rate
                tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
                frame = av.AudioFrame.from_ndarray(
                    np.repeat(tone[None, :], 2, axis=0).reshape(1, -1), format="s16",
                    layout="stereo",
                )  # fmt: skip
                frame.sample_rate, frame.pts, frame.time_base = rate, first, Fraction(1, rate)
                container.mux(audio.encode(frame))
        container.mux(video.encode(None))
        container.mux(audio.encode(None))


def decoded_audio(path: Path) -> tuple[float, int, np.ndarray]:
    """(start in seconds, sample rate, mono samples) as libav decodes them (edit lists and
    codec delay applied)."""
    with av.open(str(path)) as container:
        frames = list(container.decode(audio=0))
    start = float(frames[0].pts * frames[0].time_base)
    samples = np.concatenate([f.to_ndarray().reshape(f.layout.nb_channels, -1)[0] for f in frames]
                             if frames[0].format.is_planar else
                             [f.to_ndarray().reshape(-1, f.layout.nb_channels)[:, 0]
                              for f in frames])  # fmt: skip
    return start, frames[0].sample_rate, samples.astype(np.float64)


@pytest.mark.parametrize(
    ("ext", "codec", "rate", "out_codec", "out_rate", "frame_samples"),
    [
        (".mp4", "ffv1", 48000, "aac", 48000, 1024),
        (".webm", "libvpx-vp9", 44100, "opus", 48000, 960),
    ],
)
def test_transcoded_audio_keeps_the_source_start_and_gaps(
    tmp_path, ext, codec, rate, out_codec, out_rate, frame_samples
):
    """pcm audio starting at 0.5 s cannot be copied into mp4/webm: the aac/opus it becomes
    starts at 0.5 s too, and the 0.3 s gap stays a gap. Before, it was re-timed from 0."""
    src, out = tmp_path / "late.mkv", tmp_path / f"out{ext}"
    write_clip_with_late_audio(src, rate)
    assert np.float64(ffprobe(src, "a:0", "packet=pts_time")[0]) == pytest.approx(0.5)
    source = open_source(str(src))
    with source, open_sink(str(out), source, codec=codec, crf=40) as sink:
        for frame in source:
            sink.write(frame, frame.image)
    assert ffprobe(out, "a:0", "stream=codec_name") == [out_codec]
    frame_s = frame_samples / out_rate
    # ffprobe (FFmpeg 5.1) shows the first packet, which starts with the encoder's priming
    # (aac: 1024 samples, opus: 312): within one frame of the source's start.
    first_packet = np.float64(ffprobe(out, "a:0", "packet=pts_time")[0])
    assert 0.5 - frame_s - 1e-3 <= first_packet <= 0.5 + 1e-3, first_packet
    # The tone is heard from 0.5 s and again from 1.5 s after the silent gap (measured onsets:
    # 0.499 and 1.499 s in mp4, 0.501 and 1.501 s in webm; levels ~0.17 loud, < 1e-3 silent).
    start, decoded_rate, samples = decoded_audio(out)
    assert decoded_rate == out_rate
    envelope = np.sqrt(np.convolve(samples**2, np.ones(48) / 48, mode="same"))  # 1 ms at 48 kHz

    def at(t: float) -> int:
        return round((t - start) * out_rate)

    loud = float(np.median(envelope[at(0.6) : at(1.1)]))
    assert loud > 0.1
    first_onset = start + np.argmax(envelope > loud / 2) / out_rate
    second_onset = 1.3 + np.argmax(envelope[at(1.3) :] > loud / 2) / out_rate
    assert first_onset == pytest.approx(0.5, abs=3e-3)
    assert second_onset == pytest.approx(1.5, abs=3e-3)
    assert envelope[at(1.22) : at(1.48)].max() < loud / 100
    assert len(samples) / out_rate + start == pytest.approx(2.0, abs=2 * frame_s)


# -- frame size changes mid-stream --------------------------------------------------------


def test_frame_size_change_mid_stream_is_scaled_to_the_output_size(tmp_path, caplog):
    """An RTSP camera that comes back in another resolution: the sink scales to the size it
    started with and warns once (before: ValueError from write)."""
    src, out = tmp_path / "clip.mkv", tmp_path / "out.mkv"
    write_clip(src, 6, (64, 48))
    sizes = [(64, 48), (64, 48), (128, 96), (128, 96), (32, 24), (64, 48)]
    source = open_source(str(src))
    sink = open_sink(str(out), source, codec="ffv1")
    with caplog.at_level(logging.WARNING, logger="streamgpen"), source, sink:
        for frame, (w, h) in zip(source, sizes, strict=True):
            image = np.full((h, w, 3), 10 * frame.index + 50, np.uint8)
            sink.write(frame, image)
    warnings = [r.getMessage() for r in caplog.records if "size changed" in r.getMessage()]
    assert len(warnings) == 1 and "64x48 to 128x96" in warnings[0]
    frames = decode(out)
    assert [f.shape for f in frames] == [(48, 64, 3)] * 6
    # A flat image stays flat at the value written, whatever the scaling (ffv1 yuv444p: exact
    # up to the colour conversion's rounding).
    for index, got in enumerate(frames):
        assert np.abs(got.astype(int) - (10 * index + 50)).max() <= 2


# -- write failures -----------------------------------------------------------------------

FSIZE_CHILD = """
import logging, resource, sys
from streamgpen.errors import UserError
from streamgpen.media.sinks import open_sink
from streamgpen.media.video import open_source

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
src, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
# Python ignores SIGXFSZ, so writing past the limit fails with EFBIG instead of killing us.
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
source = open_source(src)
sink = open_sink(out, source, codec="ffv1")
try:
    with source, sink:
        for frame in source:
            sink.write(frame, frame.image)
except UserError as e:
    sink.close()  # the CLI closes again in a finally: it must not raise a second error
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_a_file_size_limit_mid_write_is_one_line_and_keeps_what_reached_the_disk(tmp_path, ext):
    """EFBIG after ~1.5 MB of 2.5: one error line naming the output and the reason, no
    traceback, no temporary file; the frames on disk stay playable under the final name."""
    src, out = tmp_path / "noise.mkv", tmp_path / f"out{ext}"
    write_clip(src, 60, (160, 120))  # ffv1 noise: ~43 kB a frame, 2.5 MB in all
    run = run_child(FSIZE_CHILD, src, out, 1_500_000)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot write to {out}: File too large"], run.stderr
    assert "is partial" in run.stderr
    assert leftovers(tmp_path) == []
    # Measured: 34 frames decode in both containers (1 s fragments / clusters, flushed per packet).
    kept = probe_frames(out)
    assert 25 <= kept < 60, kept
    with av.open(str(out)) as container:
        first = next(container.decode(video=0))
    assert (first.width, first.height) == (160, 120)


def test_a_full_disk_leaves_no_file_and_says_no_space_left(tmp_path):
    """ENOSPC from the first byte (the temporary file made /dev/full): one line, nothing left."""
    src, out = tmp_path / "noise.mkv", tmp_path / "out.mp4"
    write_clip(src, 20, (160, 120))
    source = open_source(str(src))
    sink = open_sink(str(out), source, codec="ffv1")
    (temp,) = [p for p in tmp_path.iterdir() if ".partial" in p.name]
    temp.unlink()
    temp.symlink_to("/dev/full")
    with pytest.raises(UserError) as info, source, sink:
        for frame in source:
            sink.write(frame, frame.image)
    sink.close()  # closing again after the failure raises nothing more
    assert str(info.value) == f"cannot write to {out}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise.mkv"]


def test_an_output_directory_that_refuses_files_is_one_error_at_open(tmp_path):
    """sysfs refuses new files even to root (chmod does not stop root; /sys is read-only or
    EACCES for everyone). An input with audio used to give two chained tracebacks at the first
    frame; now open_sink says it, before any frame is processed."""
    src = make_test_clip(tmp_path / "av.mp4", seconds=0.4, fps=10, size=(64, 48), audio=True)
    assert os.path.isdir("/sys") and not os.path.exists("/sys/out.mp4")
    with open_source(str(src)) as source:
        assert [t.kind for t in source.tracks] == ["audio"]
        with pytest.raises(UserError) as info:
            open_sink("/sys/out.mp4", source)
    message = str(info.value)
    assert "\n" not in message
    assert message in (
        "cannot write to /sys/out.mp4: Permission denied",
        "cannot write to /sys/out.mp4: Read-only file system",
    ), message
    assert not [n for n in os.listdir("/sys") if "out.mp4" in n]


# -- killed runs --------------------------------------------------------------------------

KILL_CHILD = """
import os, signal, sys
from streamgpen.media.sinks import open_sink
from streamgpen.media.video import open_source

src, out, codec, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
source = open_source(src)
sink = open_sink(out, source, codec=codec, preset="ultrafast")
for frame in source:
    sink.write(frame, frame.image)
    if frame.index + 1 == n:
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize(
    ("ext", "codec"), [(".mp4", "ffv1"), (".mp4", "libx264"), (".mkv", "libx264")]
)
def test_a_killed_run_leaves_a_playable_temp_file_that_the_next_run_removes(tmp_path, ext, codec):
    """SIGKILL after 30 frames (1.2 s at 25 fps): the temporary file plays the frames of the
    complete 1 s fragment / cluster; a new sink for the same output removes it."""
    src, out = tmp_path / "noise.mkv", tmp_path / f"out{ext}"
    write_clip(src, 40, (160, 120))
    run = run_child(KILL_CHILD, src, out, codec, 30)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert not out.exists()
    (temp,) = [tmp_path / n for n in leftovers(tmp_path)]
    assert temp.name.startswith(f".{out.name}.partial-") and temp.suffix == ext
    # Measured: 24 (ffv1) and 25-26 (x264 ultrafast) frames; the fragment in progress is lost.
    assert 24 <= probe_frames(temp) <= 30
    with open_source(str(src)) as source:
        sink = open_sink(str(out), source, codec="ffv1")
        assert not temp.exists(), "the dead run's temporary file is removed"
        sink.close()


# -- inputs that are not what they seem ---------------------------------------------------


def test_a_fifo_as_input_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            open_source(str(fifo)).close()
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # blocked in open(): give it a writer so the thread can end
        os.close(os.open(fifo, os.O_WRONLY))
        worker.join(timeout=20)
        pytest.fail("opening a FIFO as input blocked")
    assert len(outcome) == 1 and isinstance(outcome[0], UserError)
    assert str(outcome[0]) == f"{fifo}: the input is a FIFO (give a regular file)"


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_an_output_that_is_the_input_through_a_link_is_refused(tmp_path, link):
    src, out = tmp_path / "clip.mkv", tmp_path / "alias.mkv"
    write_clip(src, 2, (32, 24))
    out.symlink_to(src) if link == "symlink" else os.link(src, out)
    with open_source(str(src)) as source, pytest.raises(UserError, match="overwrite the input"):
        open_sink(str(out), source, codec="ffv1")
    assert decode(src) and leftovers(tmp_path) == []


def test_a_missing_camera_fails_at_once_without_retrying(caplog):
    assert not os.path.exists("/dev/video97")
    with caplog.at_level(logging.WARNING, logger="streamgpen"), pytest.raises(UserError) as info:
        open_source("webcam:97", reconnect=5)
    assert str(info.value) == "no such camera: /dev/video97"
    assert "retry" not in caplog.text


# -- a write stuck inside libav -----------------------------------------------------------


def test_abort_with_a_timeout_leaves_a_stuck_write_alone(tmp_path, caplog):
    """The watchdog's abort(timeout) while the encoder thread is stuck in a write: it returns
    after the timeout with a warning and leaves the temporary file; once the write comes back,
    close() finishes the file normally."""
    src, out = tmp_path / "clip.mkv", tmp_path / "out.mkv"
    write_clip(src, 4, (32, 24))
    source = open_source(str(src))
    sink = open_sink(str(out), source, codec="ffv1")
    frames = list(source)
    sink.write(frames[0], frames[0].image)
    entered, release = threading.Event(), threading.Event()
    real_mux = sink._mux

    def stuck_mux(packets):  # a write that does not come back until released
        entered.set()
        release.wait(timeout=60)
        real_mux(packets)

    sink._mux = stuck_mux
    writer = threading.Thread(target=sink.write, args=(frames[1], frames[1].image), daemon=True)
    writer.start()
    assert entered.wait(timeout=20)
    with caplog.at_level(logging.WARNING, logger="streamgpen"):
        started = time.monotonic()
        sink.abort(timeout=0.2)
        waited = time.monotonic() - started
    assert waited < 10, "abort(timeout) must not wait for the stuck write"
    assert "a write is stuck after 1 frames; left unfinished" in caplog.text
    assert not out.exists() and len(leftovers(tmp_path)) == 1
    release.set()
    writer.join(timeout=20)
    assert not writer.is_alive()
    sink._mux = real_mux
    sink.close()
    source.close()
    assert len(decode(out)) == 2 and leftovers(tmp_path) == []
