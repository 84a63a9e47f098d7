"""Video sources and sinks on their own: real media written with PyAV, no model involved.

Each test decodes with ``open_source`` and hands the decoded image straight to a sink from
``open_sink``; ffprobe (Debian's ffmpeg) reads the outputs as an independent check.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from probe import ffprobe
from rtsp_server import RtspServer, free_port, make_test_clip

from streamgpen.errors import UserError
from streamgpen.media.sinks import ImageDirSink, NullSink, open_sink
from streamgpen.media.video import open_source


def probe_streams(path: Path) -> list[dict]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out)["streams"]


def pattern(index: int, width: int, height: int, *, smooth: bool = False) -> np.ndarray:
    """RGB noise with a flat corner (any lossy step shows), or a smooth gradient."""
    if smooth:
        xs, ys = np.arange(width)[None, :], np.arange(height)[:, None]
        image = np.empty((height, width, 3), np.uint8)
        image[..., 0] = (2 * xs + 3 * index) % 256
        image[..., 1] = (2 * ys + index) % 256
        image[..., 2] = (xs + ys + 5 * index) % 256
        return image
    rng = np.random.default_rng(index)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[: height // 2, : width // 2] = (index * 7 % 256, 40, 200)
    return image


def write_clip(
    path: Path,
    n: int = 10,
    size: tuple[int, int] = (64, 48),
    *,
    codec: str = "ffv1",
    pix_fmt: str = "yuv444p",
    pts: list[int] | None = None,
    time_base: Fraction = Fraction(1, 25),
    rate: int = 25,
    rotation: int | None = None,
    options: dict[str, str] | None = None,
    smooth: bool = False,
) -> list[np.ndarray]:
    """Write ``n`` pattern frames with the given pts; return the RGB images written."""
    width, height = size
    pts = list(range(n)) if pts is None else pts
    images = [pattern(i, width, height, smooth=smooth) for i in range(n)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for image, p in zip(images, pts, strict=True):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = p, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def decode(path: Path, fmt: str = "rgb24") -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format=fmt) for f in container.decode(video=0)]


def copy_through(source, sink, limit: int | None = None) -> int:
    """Hand every decoded image straight to the sink, as the pipeline does without a model."""
    n = 0
    with source, sink:
        for frame in source:
            sink.write(frame, frame.image)
            n += 1
            if limit is not None and n == limit:
                break
    return n


# -- timing and pixels ---------------------------------------------------------------------


def test_variable_frame_rate_keeps_every_pts(tmp_path):
    src, out = tmp_path / "vfr.mkv", tmp_path / "out.mkv"
    pts_ms = [0, 40, 120, 160, 280, 300, 440, 480, 520, 800]
    write_clip(src, len(pts_ms), pts=pts_ms, time_base=Fraction(1, 1000))
    expected = ffprobe(src, "v:0", "frame=pts_time")
    assert np.allclose(np.float64(expected), np.array(pts_ms) / 1000)

    source = open_source(str(src))
    frames = copy_through(source, open_sink(str(out), source, codec="ffv1"))
    assert frames == len(pts_ms)
    assert ffprobe(out, "v:0", "frame=pts_time") == expected


def test_ffv1_rgb_round_trip_is_pixel_exact_in_bgr0(tmp_path):
    """ffv1 holds 8-bit RGB as bgr0 (it has no 8-bit gbrp): --pix-fmt bgr0 is lossless."""
    src, out = tmp_path / "yuv.mkv", tmp_path / "out.mkv"
    write_clip(src, 6, (40, 30), pix_fmt="yuv444p")
    source = open_source(str(src))
    decoded = []
    with source, open_sink(str(out), source, codec="ffv1", pix_fmt="bgr0") as sink:
        for frame in source:
            decoded.append(frame.image)
            sink.write(frame, frame.image)
    assert probe_streams(out)[0]["pix_fmt"] == "bgr0"
    written = decode(out)
    assert len(written) == len(decoded) == 6
    for a, b in zip(decoded, written, strict=True):
        np.testing.assert_array_equal(a, b)


def test_ffv1_default_pix_fmt_follows_an_rgb_source_exactly(tmp_path):
    """Without --pix-fmt the sink takes the source's bgr0, so the copy stays lossless."""
    src, out = tmp_path / "rgb.mkv", tmp_path / "out.mkv"
    images = write_clip(src, 4, (40, 30), pix_fmt="bgr0")
    source = open_source(str(src))
    assert source.pix_fmt == "bgr0"
    copy_through(source, open_sink(str(out), source, codec="ffv1"))
    assert probe_streams(out)[0]["pix_fmt"] == "bgr0"
    written = decode(out)
    assert len(written) == len(images)
    for a, b in zip(images, written, strict=True):
        np.testing.assert_array_equal(a, b)


def test_ffv1_has_no_8_bit_gbrp(tmp_path):
    src = tmp_path / "clip.mkv"
    write_clip(src, 2, (32, 24))
    message = r"ffv1 cannot encode gbrp; it takes .*bgr0"
    with open_source(str(src)) as source, pytest.raises(UserError, match=message):
        open_sink(str(tmp_path / "out.mkv"), source, codec="ffv1", pix_fmt="gbrp")


def test_odd_size_with_yuv420p_is_padded_by_one_edge_pixel(tmp_path, caplog):
    """x264 in yuv420p needs even sizes: the sink pads 41x31 to 42x32 by repeating the edge.

    Nothing is cropped: every source pixel is in the output at its place, the extra row and
    column repeat their neighbours, and a warning says so. (Without ``pix_fmt`` x264 would
    take the yuv444p of this source, which needs no padding.)
    """
    src, out = tmp_path / "odd.mkv", tmp_path / "out.mp4"
    images = write_clip(src, 8, (41, 31), smooth=True)
    source = open_source(str(src))
    assert (source.width, source.height) == (41, 31)
    with caplog.at_level(logging.WARNING, logger="streamgpen"):
        sink = open_sink(str(out), source, codec="libx264", pix_fmt="yuv420p", preset="ultrafast")
        copy_through(source, sink)
    assert "padding 41x31 to 42x32" in caplog.text
    stream = probe_streams(out)[0]
    assert (stream["width"], stream["height"], stream["pix_fmt"]) == (42, 32, "yuv420p")
    assert len(ffprobe(out, "v:0", "frame=pts_time")) == len(images)
    written = decode(out)
    assert len(written) == len(images)
    for image, got in zip(images, written, strict=True):
        assert got.shape == (32, 42, 3)
        assert psnr(got[:31, :41], image) > 30
        assert psnr(got[31, :41], got[30, :41]) > 30, "the added row repeats the last one"
        assert psnr(got[:31, 41], got[:31, 40]) > 30, "the added column repeats the last one"


def test_odd_size_with_ffv1_yuv444p_is_kept_exactly(tmp_path):
    src, out = tmp_path / "odd.mkv", tmp_path / "out.mkv"
    write_clip(src, 5, (41, 31))
    source = open_source(str(src))
    copy_through(source, open_sink(str(out), source, codec="ffv1", pix_fmt="yuv444p"))
    stream = probe_streams(out)[0]
    assert (stream["width"], stream["height"], stream["pix_fmt"]) == (41, 31, "yuv444p")
    assert len(decode(out)) == 5


def test_10_bit_input_decodes_and_stays_10_bit_with_ffv1(tmp_path):
    src, out = tmp_path / "ten.mkv", tmp_path / "out.mkv"
    write_clip(src, 5, (48, 32), pix_fmt="yuv420p10le", smooth=True)
    source = open_source(str(src))
    assert source.pix_fmt == "yuv420p10le"
    decoded = []
    with source, open_sink(str(out), source, codec="ffv1") as sink:
        for frame in source:
            assert frame.image.dtype == np.uint8 and frame.image.shape == (32, 48, 3)
            decoded.append(frame.image)
            sink.write(frame, frame.image)
    assert probe_streams(out)[0]["pix_fmt"] == "yuv420p10le"
    written = decode(out)
    assert len(written) == len(decoded) == 5
    for a, b in zip(decoded, written, strict=True):
        assert psnr(a, b) > 40


def test_rotation_metadata_gives_upright_frames(tmp_path):
    src = tmp_path / "rotated.mp4"
    images = write_clip(src, 4, (64, 48), codec="libx264", pix_fmt="yuv444p", rotation=90,
                        options={"qp": "0", "preset": "ultrafast"})  # fmt: skip
    stream = probe_streams(src)[0]
    assert (stream["width"], stream["height"]) == (64, 48)
    with open_source(str(src)) as source:
        assert source.rotation == 90
        assert (source.width, source.height) == (48, 64)
        frames = list(source)
    assert len(frames) == 4
    for image, frame in zip(images, frames, strict=True):
        assert frame.image.shape == (64, 48, 3) and frame.image.flags.c_contiguous
        # 90 degrees counter-clockwise: the coded top-right corner ends up top-left.
        upright = np.rot90(image)
        assert np.abs(frame.image.astype(int) - upright).mean() < 3


def corrupt_packets(path: Path, first: int, last: int) -> None:
    """Scramble the middle half of the payload of video packets ``first``..``last``."""
    with av.open(str(path)) as container:
        spans = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(path.read_bytes())
    for pos, size in spans[first : last + 1]:
        for offset in range(pos + size // 4, pos + size * 3 // 4, 7):
            data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_corrupt_packets_mid_stream_are_skipped_and_counted(tmp_path, caplog):
    """ffv1 checks each slice's CRC: the decoder rejects a corrupt packet, the source skips it."""
    src = tmp_path / "corrupt.mkv"
    write_clip(src, 40, (64, 48), options={"level": "3", "slicecrc": "1"})
    corrupt_packets(src, 15, 20)
    with caplog.at_level(logging.WARNING, logger="streamgpen"), open_source(str(src)) as source:
        frames = list(source)
        assert 0 < source.skipped_packets <= 6
        assert len(frames) + source.skipped_packets == 40
        assert not source.truncated, "skipped packets are not a truncated file"
        assert source.exhausted
    assert "truncated" not in caplog.text
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(np.diff([f.pts for f in frames]) > 0)


def test_corrupt_h264_mid_stream_is_concealed(tmp_path):
    """H.264 conceals damaged slices: every frame still comes out, nothing raises."""
    src = tmp_path / "corrupt.mp4"
    write_clip(src, 40, (64, 48), codec="libx264", pix_fmt="yuv420p",
               options={"preset": "ultrafast", "g": "10"})  # fmt: skip
    corrupt_packets(src, 15, 20)
    with open_source(str(src)) as source:
        frames = list(source)
        assert source.skipped_packets == 0 and not source.truncated
    assert len(frames) == 40


# -- sinks ---------------------------------------------------------------------------------


def test_directory_sink_writes_pngs_in_order(tmp_path):
    import cv2

    src, out = tmp_path / "clip.mkv", tmp_path / "frames"
    images = write_clip(src, 5, (32, 24))
    source = open_source(str(src))
    sink = open_sink(str(out) + "/", source)
    assert isinstance(sink, ImageDirSink)
    copy_through(source, sink)
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:06d}.png" for i in range(5)]
    for name, image in zip(names, images, strict=True):
        got = cv2.cvtColor(cv2.imread(str(out / name)), cv2.COLOR_BGR2RGB)
        assert np.abs(got.astype(int) - image).mean() < 3


def test_null_sink_accepts_frames(tmp_path):
    src = tmp_path / "clip.mkv"
    write_clip(src, 3, (32, 24))
    source = open_source(str(src))
    sink = open_sink("null", source)
    assert isinstance(sink, NullSink)
    copy_through(source, sink)
    assert sink.frames_written == 3


def test_webm_with_aac_source_transcodes_audio_to_opus(tmp_path, caplog):
    src = make_test_clip(tmp_path / "av.mp4", seconds=1.0, fps=10, size=(64, 48), audio=True)
    out = tmp_path / "out.webm"
    source = open_source(str(src))
    assert [t.kind for t in source.tracks] == ["audio"]
    with caplog.at_level(logging.WARNING, logger="streamgpen"):
        copy_through(source, open_sink(str(out), source, codec="libvpx-vp9", crf=40))
    notices = [r.getMessage() for r in caplog.records if "audio" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "aac" in notices[0] and "libopus" in notices[0]
    streams = probe_streams(out)
    assert [(s["codec_type"], s["codec_name"]) for s in streams] == [
        ("video", "vp9"),
        ("audio", "opus"),
    ]
    assert len(decode(out)) == 10
    with av.open(str(out)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
    assert samples >= 0.8 * 48000


def test_ffv1_in_mp4_is_written_and_playable(tmp_path):
    """FFmpeg's mp4 muxer takes FFV1 (ISO BMFF mapping), so this is not an error."""
    src, out = tmp_path / "clip.mkv", tmp_path / "out.mp4"
    images = write_clip(src, 4, (32, 24), pix_fmt="bgr0")
    source = open_source(str(src))
    copy_through(source, open_sink(str(out), source, codec="ffv1"))
    assert probe_streams(out)[0]["codec_name"] == "ffv1"
    assert len(ffprobe(out, "v:0", "frame=pts_time")) == 4
    for a, b in zip(images, decode(out), strict=True):
        np.testing.assert_array_equal(a, b)


def test_container_that_cannot_hold_the_codec_is_a_user_error(tmp_path):
    src = tmp_path / "clip.mkv"
    write_clip(src, 2, (32, 24))
    message = "libx264 video cannot be stored in webm"
    with open_source(str(src)) as source, pytest.raises(UserError, match=message) as info:
        open_sink(str(tmp_path / "out.webm"), source, codec="libx264")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == [src], "no output or temporary file is left"


def test_unknown_codec_and_bad_outputs_are_user_errors(tmp_path):
    src = tmp_path / "clip.mkv"
    write_clip(src, 2, (32, 24))
    with open_source(str(src)) as source:
        with pytest.raises(UserError, match="no-such-codec"):
            open_sink(str(tmp_path / "out.mkv"), source, codec="no-such-codec")
        with pytest.raises(UserError, match="does not exist"):
            open_sink(str(tmp_path / "missing" / "out.mkv"), source)
        with pytest.raises(UserError, match="cannot tell"):
            open_sink(str(tmp_path / "out.xyz"), source)
        with pytest.raises(UserError, match="overwrite"):
            open_sink(str(src), source)
        with pytest.raises(UserError, match="cannot encode"):
            open_sink(str(tmp_path / "out.mkv"), source, codec="libx264", pix_fmt="gbrp")
    assert list(tmp_path.iterdir()) == [src]


def test_interrupted_sink_leaves_a_playable_file_of_the_frames_written(tmp_path):
    """Ctrl-C after 7 of 25 frames: the final name holds 7 frames and the audio up to them."""
    src = make_test_clip(tmp_path / "clip.mp4", seconds=1.0, fps=25, size=(64, 48), audio=True)
    out = tmp_path / "out.mkv"
    source = open_source(str(src))
    sink = open_sink(str(out), source, preset="ultrafast")
    with pytest.raises(KeyboardInterrupt), source, sink:
        for frame in source:
            sink.write(frame, frame.image)
            if frame.index == 6:
                raise KeyboardInterrupt
    sink.close()  # a second close after the context manager's abort() is harmless
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "out.mkv"]
    assert len(decode(out)) == 7
    assert len(ffprobe(out, "v:0", "frame=pts_time")) == 7
    audio_end = max(np.float64(ffprobe(out, "a:0", "packet=pts_time")))
    assert 0.1 < audio_end <= 7 / 25 + 0.05, "audio is cut where the video stops"


def test_fragmented_mp4_keeps_every_video_and_audio_timestamp(tmp_path):
    """x264 with B-frames (edit list for the video's delay) and copied AAC (priming, pts < 0):
    ffprobe reads the source's frame and packet times exactly in the fragmented output."""
    src, out = tmp_path / "av.mp4", tmp_path / "out.mp4"
    make_test_clip(src, seconds=1.0, fps=25, size=(64, 48), audio=True)
    source = open_source(str(src))
    with source, open_sink(str(out), source, preset="veryfast") as sink:
        for frame in source:
            sink.write(frame, frame.image)
    assert b"moof" in out.read_bytes()[:200_000], "the output is fragmented"
    assert ffprobe(out, "v:0", "frame=pts_time") == ffprobe(src, "v:0", "frame=pts_time")
    assert ffprobe(out, "a:0", "packet=pts_time") == ffprobe(src, "a:0", "packet=pts_time")
    assert ffprobe(src, "a:0", "packet=pts_time")[0] == "-0.021333"
    assert int(ffprobe(out, "v:0", "stream=has_b_frames")[0]) > 0


def test_fragmented_mp4_keeps_variable_frame_rate_pts(tmp_path):
    src, out = tmp_path / "vfr.mkv", tmp_path / "out.mp4"
    pts_ms = [0, 40, 120, 160, 280, 300, 440, 480, 520, 800]
    write_clip(src, len(pts_ms), pts=pts_ms, time_base=Fraction(1, 1000))
    source = open_source(str(src))
    with source, open_sink(str(out), source, codec="ffv1") as sink:
        for frame in source:
            sink.write(frame, frame.image)
    assert ffprobe(out, "v:0", "frame=pts_time") == ffprobe(src, "v:0", "frame=pts_time")


def test_sink_closed_without_frames_leaves_nothing(tmp_path):
    src = tmp_path / "clip.mkv"
    write_clip(src, 2, (32, 24))
    with open_source(str(src)) as source:
        open_sink(str(tmp_path / "out.mkv"), source, codec="ffv1").close()
    assert list(tmp_path.iterdir()) == [src]


# -- RTSP ----------------------------------------------------------------------------------


def test_rtsp_publish_records_every_frame(tmp_path):
    """A file pushed faster than real time: big lossless frames all arrive (interleaved TCP)."""
    clip = tmp_path / "noise.mkv"
    images = write_clip(clip, 25, (640, 360), codec="libx264", pix_fmt="yuv444p",
                        options={"qp": "0", "preset": "ultrafast"})  # fmt: skip
    with RtspServer(make_test_clip(tmp_path / "clip.mp4", 0.2, 25, (64, 48), False),
                    record_dir=tmp_path / "rec") as server:  # fmt: skip
        source = open_source(str(clip))
        sink = open_sink(server.publish_url, source, crf=0, preset="ultrafast")
        assert copy_through(source, sink) == 25
        deadline, size = time.monotonic() + 30, -1
        while time.monotonic() < deadline:  # the server writes the recording as it goes
            recordings = server.recordings()
            # Done when all 25 decode and the file stopped growing: on a loaded machine the
            # last packet can be half-written when the 25th frame first decodes.
            with contextlib.suppress(av.error.FFmpegError):
                if recordings and len(decode(recordings[0])) == 25:
                    if recordings[0].stat().st_size == size:
                        break
                    size = recordings[0].stat().st_size
            time.sleep(0.3)
    assert len(recordings) == 1
    frames = decode(recordings[0])
    assert len(frames) == 25
    # yuv444p at crf 0 is lossless up to the RGB<->YUV rounding; frames arrive in order.
    assert all(psnr(a, b) > 35 for a, b in zip(images, frames, strict=True))


def test_rtsp_publish_to_no_server_is_a_user_error(tmp_path):
    clip = make_test_clip(tmp_path / "clip.mp4", seconds=0.2, fps=25, size=(64, 48), audio=False)
    source = open_source(str(clip))
    sink = open_sink(f"rtsp://127.0.0.1:{free_port()}/nobody", source, preset="ultrafast")
    frame = next(source)
    with pytest.raises(UserError, match="cannot write to rtsp://"):
        sink.write(frame, frame.image)
    sink.close()
    sink.close()  # closing twice (a context manager, then a finally) is harmless
    source.close()


def test_live_source_reconnects_after_a_server_restart(tmp_path):
    clip = make_test_clip(tmp_path / "clip.mp4", seconds=2.0, fps=25, size=(320, 240), audio=False)
    with RtspServer(clip) as server:
        source = open_source(server.url, reconnect=3, timeout=3)
        assert source.is_live and source.frame_count is None
        pts: list[int | None] = []
        after = 0  # frames read since the reconnection
        with source:
            for frame in source:
                pts.append(frame.pts)
                assert frame.image.shape == (240, 320, 3)
                if len(pts) == 15:
                    # While the reader is held here the server goes away and comes back: the
                    # source sees the old connection end and must connect again by itself.
                    server.restart()
                after += source.reconnects >= 1
                if after == 30:
                    break
                assert len(pts) < 600, "the stream should have come back by now"
        assert source.reconnects == 1
        assert after == 30
    # An RTSP connection's first frame has no timestamp; the source places the one after the
    # reconnection where the next frame is due, so only the very first stays without.
    assert None not in pts[1:]
    assert np.all(np.diff(pts[1:]) > 0), "pts stay strictly increasing across the reconnection"


def test_live_source_without_reconnect_ends_cleanly_when_the_server_stops(tmp_path):
    clip = make_test_clip(tmp_path / "clip.mp4", seconds=2.0, fps=25, size=(320, 240), audio=False)
    with RtspServer(clip) as server:
        source = open_source(server.url, reconnect=None, timeout=3)
        count, failed = 0, False
        started = time.monotonic()
        try:
            for _ in source:
                count += 1
                if count == 10:
                    server.stop()
        except UserError:
            failed = True  # acceptable too: one clear error, not a hang or a traceback
        finally:
            source.close()
    assert count >= 10
    assert source.reconnects == 0
    assert failed or source.exhausted
    assert time.monotonic() - started < 20


# -- bad inputs ----------------------------------------------------------------------------


def test_missing_file_directory_and_text_file_are_user_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 10)
    cases = {
        str(tmp_path / "missing.mp4"): "not found",
        str(tmp_path): "directory",
        str(text): "not a readable media file",
    }
    for spec, message in cases.items():
        with pytest.raises(UserError, match=message) as info:
            open_source(spec)
        assert "\n" not in str(info.value)


def test_realtime_file_is_paced_at_its_frame_rate_and_live(tmp_path):
    src = tmp_path / "clip.mkv"
    write_clip(src, n=10)  # 25 fps: the last frame is due 0.36 s after the first
    with open_source(str(src), realtime=True) as source:
        assert source.is_live
        start = time.monotonic()
        frames = list(source)
    assert len(frames) == 10
    assert time.monotonic() - start >= 9 / 25 - 0.02
