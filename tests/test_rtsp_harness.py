"""The RTSP test harness (tests/rtsp_server.py) works: live reads, drops, restarts, publishing."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import av
import numpy as np
import pytest
import rtsp_server
from rtsp_server import (
    APT_HINT,
    RtspServer,
    RtspServerError,
    frame_index_of,
    make_test_clip,
)

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "solvay_pan.mp4"
OPEN_OPTIONS = {"rtsp_transport": "tcp"}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated 4 s clip (640x360, 25 fps, H.264 + AAC) whose frames carry their index."""
    return make_test_clip(tmp_path_factory.mktemp("rtsp") / "clip.mp4")


@pytest.fixture(scope="module")
def server(clip: Path):
    with RtspServer(clip) as srv:
        yield srv


def open_reader(url: str, read_timeout: float = 5.0) -> av.container.InputContainer:
    return av.open(url, options=OPEN_OPTIONS, timeout=(5.0, read_timeout))


def test_reads_frames_live_and_loops(server: RtspServer) -> None:
    with open_reader(server.url) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert [s.codec_context.name for s in container.streams.audio] == ["aac"]
        started = time.monotonic()
        frames = []
        for frame in container.decode(video=0):
            frames.append((frame.pts, frame_index_of(frame.to_ndarray(format="rgb24"))))
            if len(frames) == 120:  # past the 4 s clip's end: it loops
                break
        elapsed = time.monotonic() - started
    assert len(frames) >= 50
    assert frames[0][1] == 0  # every client starts at the first frame
    assert [i for _, i in frames] == [n % 100 for n in range(120)]
    # FFmpeg's RTSP demuxer gives the first frame no pts (before RTCP sync): the product must
    # cope with that; the rest go on increasing across the loops.
    pts = [p for p, _ in frames[1:]]
    assert all(b > a for a, b in itertools.pairwise(pts)), "timestamps go on across loops"
    assert elapsed > 3.0, f"120 frames in {elapsed:.2f}s: not served at real-time pace"


def test_sample_clip_is_served_when_present(tmp_path: Path) -> None:
    video = SAMPLE if SAMPLE.is_file() else make_test_clip(tmp_path / "clip.mp4", seconds=2)
    with RtspServer(video) as srv, open_reader(srv.url) as container:
        frames = [f for _, f in zip(range(30), container.decode(video=0), strict=False)]
    assert len(frames) == 30
    assert frames[0].width > 0 and frames[0].height > 0


def test_stop_drops_readers_and_start_serves_again(clip: Path) -> None:
    srv = RtspServer(clip)
    try:
        url = srv.start().url
        container = open_reader(url)
        frames = container.decode(video=0)
        for _ in range(10):
            next(frames)

        srv.stop()
        assert not srv.running
        dropped = time.monotonic()
        with pytest.raises((av.error.FFmpegError, OSError, EOFError, StopIteration)):
            for _ in range(1000):  # an EOF ends the iteration (StopIteration), or an error
                next(frames)
        assert time.monotonic() - dropped < 5.0
        container.close()
        with pytest.raises((av.error.FFmpegError, OSError)):
            open_reader(url).close()

        srv.start()
        assert srv.url == url
        with open_reader(url) as again:
            got = [f for _, f in zip(range(25), again.decode(video=0), strict=False)]
        assert len(got) == 25
        assert frame_index_of(got[0].to_ndarray(format="rgb24")) == 0
    finally:
        srv.stop()


def test_restart_keeps_port_and_path(server: RtspServer) -> None:
    url = server.url
    server.restart()
    assert server.url == url and server.running
    with open_reader(url) as container:
        assert len([f for _, f in zip(range(10), container.decode(video=0), strict=False)]) == 10


def test_frozen_server_makes_reads_time_out(clip: Path) -> None:
    with RtspServer(clip) as srv:
        container = open_reader(srv.url, read_timeout=1.0)
        frames = container.decode(video=0)
        next(frames)
        srv.freeze()
        frozen = time.monotonic()
        with pytest.raises(av.error.FFmpegError):
            for _ in range(1000):
                next(frames)
        assert time.monotonic() - frozen < 4.0
        srv.thaw()
        container.close()


@pytest.mark.parametrize("with_audio", [False, True], ids=["video", "video+audio"])
def test_pyav_can_publish_to_it(clip: Path, tmp_path: Path, with_audio: bool) -> None:
    with RtspServer(clip, record_dir=tmp_path / "rec") as srv:
        url = srv.publish_av_url if with_audio else srv.publish_url
        out = av.open(url, "w", format="rtsp", options=OPEN_OPTIONS, timeout=(5.0, 5.0))
        vstream = out.add_stream("libx264", rate=25)
        vstream.width, vstream.height, vstream.pix_fmt = 320, 180, "yuv420p"
        vstream.options = {"preset": "ultrafast", "tune": "zerolatency"}  # several slices
        astream = out.add_stream("aac", rate=48000) if with_audio else None
        for i in range(50):
            img = np.zeros((180, 320, 3), np.uint8)
            rtsp_server._draw_frame_index(img, i)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            out.mux(vstream.encode(frame))
            if astream is not None and i % 2 == 0:
                pcm = np.zeros((2, 1920), np.float32)
                aframe = av.AudioFrame.from_ndarray(pcm, format="fltp", layout="stereo")
                aframe.sample_rate, aframe.pts = 48000, i * 960
                out.mux(astream.encode(aframe))
        out.mux(vstream.encode(None))
        if astream is not None:
            out.mux(astream.encode(None))
        out.close()
        deadline = time.monotonic() + 5.0
        while not srv.recordings() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the server's EOS shutdown writes the tail
    (recording,) = srv.recordings()
    with av.open(str(recording)) as rec:
        kinds = sorted(s.type for s in rec.streams)
        got = [frame_index_of(f.to_ndarray(format="rgb24")) for f in rec.decode(video=0)]
    assert kinds == (["audio", "video"] if with_audio else ["video"])
    assert got == list(range(50))


def test_missing_packages_fail_with_the_apt_line(
    clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rtsp_server, "SYSTEM_PYTHON", "/nonexistent/python3")
    with pytest.raises(RtspServerError, match=r"gir1\.2-gst-rtsp-server-1\.0"):
        RtspServer(clip).start()
    assert "gir1.2-gst-rtsp-server-1.0" in APT_HINT
