"""Generate samples/solvay_pan.mp4: a short, degraded pan across the 1927 Solvay photo.

A slow pan and zoom moves the faces and changes their scale; blur, noise, blockiness,
faded contrast and flicker make it look like old footage; a structured tone-and-crackle
track gives the audio path something to copy. The rendered frames and the audio packets are
the same every run; the H.264 bytes can differ between runs (x264 is not bit-reproducible here),
so the committed clip is the reference the tests use. Run from anywhere:
``python samples/make_sample.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import av
import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGE = HERE.parent.parent / "shared" / "media" / "Solvay_conference_1927.png"
DEFAULT_OUTPUT = HERE / "solvay_pan.mp4"

WIDTH, HEIGHT, FPS, SECONDS = 960, 540, 25, 4
SAMPLE_RATE = 48000
SEED = 1927

# Crop windows (centre x, centre y, width) in source pixels at the start and end of the pan.
# Source faces are 20-40 px; crops no wider than ~700 px keep them >= ~27 px at 960 wide,
# large enough for stable landmarks (the tracker test compares them to 5% of the eye distance).
START_VIEW = (360.0, 200.0, 700.0)
END_VIEW = (960.0, 170.0, 480.0)


def ease(t: float) -> float:
    """Smoothstep, so the camera starts and stops gently."""
    return t * t * (3 - 2 * t)


def render_view(photo: np.ndarray, t: float) -> np.ndarray:
    """The camera's view at time fraction ``t`` in [0, 1], as a WIDTHxHEIGHT RGB image."""
    s = ease(t)
    cx, cy, crop_w = (a + (b - a) * s for a, b in zip(START_VIEW, END_VIEW, strict=True))
    scale = WIDTH / crop_w
    # An affine warp gives sub-pixel motion; integer crops would judder.
    matrix = np.array(
        [[scale, 0, WIDTH / 2 - scale * cx], [0, scale, HEIGHT / 2 - scale * cy]], np.float64
    )
    return cv2.warpAffine(
        photo, matrix, (WIDTH, HEIGHT), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT
    )


def degrade(image: np.ndarray, rng: np.random.Generator, index: int) -> np.ndarray:
    """Make a clean frame look like worn film transferred to video."""
    # Lose detail the way a low-resolution transfer does: blur, shrink, blow back up.
    img = cv2.GaussianBlur(image, (0, 0), sigmaX=1.2)
    small = cv2.resize(img, (WIDTH * 3 // 5, HEIGHT * 3 // 5), interpolation=cv2.INTER_AREA)
    img = cv2.resize(small, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    flicker = 1.0 + 0.05 * np.sin(index * 1.7) + rng.normal(0, 0.02)
    img = (img - 128.0) * 0.75 * flicker + 128.0 + 10.0  # faded, lifted blacks
    img += rng.normal(0, 7.0, img.shape[:2])[..., None]  # film grain is mostly luminance
    img = np.clip(img, 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 30])
    assert ok
    return cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1]


def soundtrack(rng: np.random.Generator) -> np.ndarray:
    """A little melody of decaying tones over hiss and crackle, mono float32 in [-1, 1]."""
    n = SECONDS * SAMPLE_RATE
    t = np.arange(n) / SAMPLE_RATE
    notes = [262, 330, 392, 523, 392, 330, 294, 262]  # C major arpeggio and back
    note_len = n // len(notes)
    audio = np.zeros(n, np.float32)
    for k, freq in enumerate(notes):
        span = slice(k * note_len, (k + 1) * note_len)
        local = t[span] - t[span][0]
        envelope = np.exp(-3.0 * local)
        audio[span] = 0.3 * envelope * np.sin(2 * np.pi * freq * t[span])
    audio += rng.normal(0, 0.01, n).astype(np.float32)
    clicks = rng.choice(n, size=40, replace=False)
    audio[clicks] += rng.uniform(-0.5, 0.5, clicks.size).astype(np.float32)
    return np.clip(audio, -1, 1)


def write_video(photo: np.ndarray, output: Path) -> None:
    """Encode the degraded pan (H.264) and the soundtrack (AAC) into ``output``."""
    rng = np.random.default_rng(SEED)
    audio = soundtrack(rng)
    frames = FPS * SECONDS
    with av.open(str(output), "w", options={"movflags": "+faststart"}) as container:
        video = container.add_stream("libx264", rate=FPS, options={"crf": "26", "preset": "slow"})
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.codec_context.color_range = 1  # limited range, BT.709: what players assume
        video.codec_context.colorspace = 1
        sound = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        sound.bit_rate = 64000
        samples_per_frame = SAMPLE_RATE // FPS
        for i in range(frames):
            image = degrade(render_view(photo, i / (frames - 1)), rng, i)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG"
            )
            frame.pts = i
            container.mux(video.encode(frame))
            chunk = audio[i * samples_per_frame : (i + 1) * samples_per_frame]
            audio_frame = av.AudioFrame.from_ndarray(chunk[None], format="flt", layout="mono")
            audio_frame.sample_rate = SAMPLE_RATE
            audio_frame.pts = i * samples_per_frame
            container.mux(sound.encode(audio_frame))
        container.mux(video.encode(None))
        container.mux(sound.encode(None))


def main() -> None:
    """Parse arguments and write the sample."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    photo = cv2.imread(str(args.image), cv2.IMREAD_COLOR)
    if photo is None:
        raise SystemExit(f"cannot read {args.image}")
    write_video(np.ascontiguousarray(photo[..., ::-1]), args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
