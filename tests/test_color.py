"""Frames to the device and back: YUV 4:2:0 converted in torch against libswscale, uploads and
downloads on the CPU path (the same code as on CUDA, without streams), and a whole clip through
the pipeline with device-side colour conversion forced on."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from av.video.reformatter import ColorRange, Colorspace

from streamgpen.enhancer import Enhancer
from streamgpen.faces.track import Tracker
from streamgpen.media.planes import host_planes
from streamgpen.media.sinks import open_sink
from streamgpen.media.video import open_source
from streamgpen.pipeline.build import video_pipeline
from streamgpen.runtime.color import is_full_range, yuv420_to_rgb
from streamgpen.runtime.restorer import Identity, Restorer
from streamgpen.runtime.transfer import Downloader, Uploader

CPU = torch.device("cpu")
SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "solvay_pan.mp4"
# libav colour-space value -> swscale's name for it
SPACES = {1: Colorspace.ITU709, 5: Colorspace.ITU601, 9: Colorspace.BT2020}


def colour_pattern(width: int = 480, height: int = 270) -> np.ndarray:
    """Smooth, saturated colours: random 10 px cells interpolated (HxWx3 uint8 RGB)."""
    cells = np.random.default_rng(0).integers(0, 256, (height // 10, width // 10, 3), np.uint8)
    return np.ascontiguousarray(cv2.resize(cells, (width, height), interpolation=cv2.INTER_CUBIC))


def to_float(rgb: torch.Tensor) -> np.ndarray:
    # [3, H, W] float in [0, 1] -> HxWx3 float in 0..255, rounded as the 8-bit output is
    return (rgb.permute(1, 2, 0) * 255).round().numpy()


def swscale_round_trip(rgb: np.ndarray, space: int, full: bool) -> tuple[av.VideoFrame, np.ndarray]:
    """``rgb`` to YUV 4:2:0 by libswscale, and that back to RGB by libswscale."""
    swscale_range = ColorRange.JPEG if full else ColorRange.MPEG
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    yuv = frame.reformat(
        format="yuv420p", dst_colorspace=SPACES[space], dst_color_range=swscale_range
    )
    back = yuv.reformat(format="rgb24", src_colorspace=SPACES[space], src_color_range=swscale_range)
    return yuv, back.to_ndarray()


@pytest.mark.parametrize("full", [False, True], ids=["mpeg-range", "jpeg-range"])
@pytest.mark.parametrize("space", sorted(SPACES))
def test_yuv420_to_rgb_is_closer_to_the_original_than_swscale(space, full):
    original = colour_pattern()
    yuv, by_swscale = swscale_round_trip(original, space, full)
    ours = to_float(yuv420_to_rgb(torch.from_numpy(yuv.to_ndarray()), space, full))
    error = np.abs(ours - original).mean()
    swscale_error = np.abs(by_swscale.astype(float) - original).mean()
    # Measured: ours 1.83-1.97 levels, swscale 5.2-5.4 (it repeats chroma samples).
    assert error < 2.5 and error < swscale_error
    # Both read the same matrix: on a flat colour, where upsampling plays no part, they agree
    # but for rounding: swscale's fixed-point, and limited range's coarser steps (1-2 levels).
    for colour in ([200, 40, 90], [20, 180, 60]):
        flat = np.full((16, 16, 3), colour, np.uint8)
        yuv, by_swscale = swscale_round_trip(flat, space, full)
        ours = to_float(yuv420_to_rgb(torch.from_numpy(yuv.to_ndarray()), space, full))
        assert np.abs(ours - by_swscale).max() <= 2 and np.abs(ours - flat).max() <= 2


def test_full_range_comes_from_the_format_or_the_tag():
    assert is_full_range("yuvj420p", 0) and is_full_range("yuv420p", 2)
    assert not is_full_range("yuv420p", 1) and not is_full_range("yuv420p", 0)


def write_clip(path: Path, image: np.ndarray, pix_fmt: str, rotation: int = 0) -> None:
    # FFV1 (lossless) takes odd sizes, which H.264 in 4:2:0 refuses.
    codec, options = ("ffv1", {}) if path.suffix == ".mkv" else ("libx264", {"qp": "0"})
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25, options=options)
        stream.height, stream.width = image.shape[:2]
        stream.pix_fmt = pix_fmt
        if rotation:
            stream.set_display_rotation(rotation)
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


@pytest.mark.parametrize(
    ("pix_fmt", "size", "rotation", "on_device"),
    [
        ("yuv420p", (96, 64), 0, True),
        ("yuv420p", (96, 64), 90, True),  # rotated on the device like np.rot90
        ("yuvj420p", (96, 64), 270, True),  # full range by its format
        ("yuv420p", (95, 63), 0, False),  # odd size: converted by swscale
        ("yuv444p", (96, 64), 0, False),  # not 4:2:0: converted by swscale
    ],
)
def test_uploaded_frames_equal_the_swscale_image(tmp_path, pix_fmt, size, rotation, on_device):
    path = tmp_path / ("clip.mkv" if size[0] % 2 else "clip.mp4")
    original = colour_pattern(*size)
    write_clip(path, original, pix_fmt, rotation)
    upright = np.rot90(original, rotation // 90).astype(float)
    upload = Uploader(CPU, yuv_on_device=True)
    with open_source(str(path)) as source:
        for frame in source:
            pixels = upload(host_planes(frame, yuv=upload.yuv_on_device))
            assert pixels.yuv == on_device and pixels.ready is None
            ours, by_swscale = to_float(pixels.rgb()), frame.image.astype(float)
            assert ours.shape == by_swscale.shape == upright.shape
            if on_device:
                # Upright like swscale's image, and nearer the original: measured means of
                # ours 1.3-1.5 levels, swscale's 4.5.
                assert np.abs(ours - upright).mean() < np.abs(by_swscale - upright).mean() < 8
            else:
                assert np.array_equal(ours, by_swscale)


def test_downloads_are_rounded_uint8_rgb():
    frames = torch.rand(2, 3, 5, 7)
    images = [image.get() for image in Downloader(CPU)(frames)]
    assert [image.shape for image in images] == [(5, 7, 3), (5, 7, 3)]
    expected = (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert all(np.array_equal(a, b) for a, b in zip(images, expected, strict=True))


def tinted_sample_clip(path: Path, frames: int = 10) -> None:
    """The sample's first frames in sepia (the photograph itself is grey), 4:2:0, lossless."""
    with av.open(str(SAMPLE)) as sample, av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = 960, 540, "yuv420p"
        for i, frame in enumerate(sample.decode(video=0)):
            if i == frames:
                break
            sepia = frame.to_ndarray(format="rgb24") * np.float32([1.0, 0.8, 0.6])
            tinted = av.VideoFrame.from_ndarray(sepia.astype(np.uint8), format="rgb24")
            container.mux(stream.encode(tinted))
        container.mux(stream.encode(None))


def test_clip_through_the_pipeline_with_colour_on_the_device(detector, tmp_path):
    # Identity restorer: the output is the input as the device converted it, but for the faces,
    # which are cropped and pasted back (resampled twice).
    clip, out = tmp_path / "sepia.mp4", tmp_path / "frames"
    tinted_sample_clip(clip)
    enhancer = Enhancer(
        restorer=Restorer(Identity(), CPU), face_detector=detector, device=CPU, mask="box"
    )
    with open_source(str(clip)) as source:
        pipeline = video_pipeline(
            source=source,
            sink=open_sink(f"{out}/", source),
            enhancer=enhancer,
            tracker=Tracker(detector),
            yuv_on_device=True,
        )
        stats = pipeline.run()
    assert stats.frames_out == 10 and stats.faces >= 10 * 10
    written = sorted(out.glob("*.png"))
    assert len(written) == 10
    with av.open(str(clip)) as container:
        for frame, png in zip(container.decode(video=0), written, strict=True):
            expected = frame.to_ndarray(format="rgb24").astype(int)
            got = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB).astype(int)
            difference = np.abs(got - expected)
            assert np.mean(difference <= 2) > 0.9
            assert 10 * np.log10(255**2 / np.mean(difference**2)) > 40
