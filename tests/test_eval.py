"""``streamgpen eval``: each figure against a hand-computed value on small synthetic inputs, the
photo metrics against an independent reading of the files, the command end to end on tiny
lossless videos and photo folders, and the sample clip against itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import assert_one_line_error
from torchmetrics.functional.image import (
    learned_perceptual_image_patch_similarity,
    structural_similarity_index_measure,
)

from streamgpen.apps.evaluate import evaluate_photos, evaluate_video, read_face_log
from streamgpen.config import DetectorConfig
from streamgpen.errors import UserError
from streamgpen.faces.types import Face
from streamgpen.media.facelog import FaceLog
from streamgpen.quality import images as metrics
from streamgpen.quality.temporal import TemporalMeter, source_motion, spread, track_jitter

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "solvay_pan.mp4"
MOBILE = DetectorConfig(name="retinaface_mobile0.25")
SHIFT = 3  # pixels a frame, to the left: the content moves by -3 in x
FLICKER = 10  # levels added to the output's even frames, taken from its odd ones
HEIGHT, WIDTH = 64, 96
FACE_BOX = (24.0, 16.0, 72.0, 48.0)  # the face region of the synthetic clips


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 texture the optical flow can lock on to: blurred noise, contrast
    stretched into [30, 225] (so that +-FLICKER never clips)."""
    noise = np.random.default_rng(seed).uniform(0, 255, (height, width, 3)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), 2.0)
    return np.clip((blurred - blurred.mean()) * 4 + 128, 30, 225).astype(np.uint8)


def panned(frames: int, shift: int = SHIFT) -> list[np.ndarray]:
    """A pan: windows of one large texture, ``shift`` more pixels to the right each frame."""
    large = texture(HEIGHT + 40, WIDTH + 40 + shift * frames)
    return [large[20 : 20 + HEIGHT, 20 + shift * t : 20 + shift * t + WIDTH] for t in range(frames)]


def flickered(frames: list[np.ndarray]) -> list[np.ndarray]:
    """The frames with +FLICKER on even and -FLICKER on odd ones: a warping error of exactly
    2 * FLICKER wherever the flow is exact."""
    signs = [1 if t % 2 == 0 else -1 for t in range(len(frames))]
    return [
        (f.astype(np.int16) + s * FLICKER).astype(np.uint8)
        for f, s in zip(frames, signs, strict=True)
    ]


def write_clip(path: Path, frames: list[np.ndarray]) -> Path:
    """RGB frames as a lossless clip (FFV1, bgr0: decoded back bit for bit), 25 fps."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def face(box, landmarks) -> Face:
    return Face(
        box=np.asarray(box, np.float32), landmarks=np.asarray(landmarks, np.float32), score=0.99
    )


# Eyes 20 px apart: the IOD. A face at (x, y) moving by VELOCITY each frame.
PATTERN = np.array([[0, 0], [20, 0], [10, 10], [3, 20], [17, 20]], dtype=np.float64)
VELOCITY = np.array([2.0, 1.0])
NOSE_KICK = np.array([3.0, 4.0])  # |kick| = 5 px, added to the nose at frame 2


def hand_made_track(frames: int = 5) -> dict[int, np.ndarray]:
    """Landmarks moving at constant velocity, the nose kicked by NOSE_KICK at frame 2."""
    track = {t: PATTERN + [30, 20] + t * VELOCITY for t in range(frames)}
    track[2] = track[2].copy()
    track[2][2] += NOSE_KICK
    return track


def cli_env(**env: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGPEN_")}
    environ.update(COLUMNS="200", **env)
    return environ


def run_in_process(*args: str) -> tuple[str, str]:
    """``streamgpen eval ARGS`` through the typer app in this process (no torch import to pay
    for): its stdout and stderr; the log's lines go to pytest's caplog."""
    from typer.testing import CliRunner

    from streamgpen.cli.app import app

    result = CliRunner().invoke(app, ["eval", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


def cli_together(*runs: tuple[str, ...], **env: str) -> list[subprocess.CompletedProcess]:
    """Several ``streamgpen eval`` runs at once (each spends most of its time importing torch)."""
    started = [
        subprocess.Popen(
            [sys.executable, "-m", "streamgpen", "eval", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(**env),
        )
        for args in runs
    ]
    results = []
    for process, args in zip(started, runs, strict=True):
        stdout, stderr = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
    return results


# --- temporal figures, by hand ---------------------------------------------------------------


def test_a_static_clip_has_zero_warping_error():
    still = texture(HEIGHT, WIDTH)
    meter = TemporalMeter()
    boxes = np.array([FACE_BOX])
    assert meter.add(still, still, boxes).warp_output is None  # no previous frame
    figures = meter.add(still, still, boxes)
    # Identical frames: DIS returns a zero flow, the warp samples exact pixels.
    assert figures.warp_output == 0.0 and figures.warp_source == 0.0
    assert figures.mask_change is None  # output == source: nothing pasted


def test_flow_recovers_a_known_shift_and_the_flicker_it_adds():
    frames = panned(4)
    motion = source_motion(
        cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM),
        cv2.cvtColor(frames[0], cv2.COLOR_RGB2GRAY),
        cv2.cvtColor(frames[1], cv2.COLOR_RGB2GRAY),
    )
    # frame_1(p) = frame_0(p + (3, 0)): the backward flow is +3 in x, 0 in y. Measured: median
    # 3.0004, 0.0066; 94.0% of the pixels trusted (the 3 columns that enter on the right, 3.1%,
    # come from outside frame 0; the rest are near the borders, where DIS is less sure).
    valid = motion.backward[motion.valid]
    assert np.median(valid[:, 0]) == pytest.approx(SHIFT, abs=0.02)
    assert np.median(valid[:, 1]) == pytest.approx(0, abs=0.02)
    assert not motion.valid[:, -SHIFT:].any()  # sampled from outside frame 0
    assert 0.9 < motion.valid.mean() < 1 - SHIFT / WIDTH + 1e-9
    meter = TemporalMeter()
    rows = [
        meter.add(s, o, np.array([FACE_BOX]))
        for s, o in zip(frames, flickered(frames), strict=True)
    ]
    for row in rows[1:]:
        # Measured: source 0.12-0.13 levels (the flow is 3.00x, not 3: bilinear residue),
        # output 19.99-20.01.
        assert row.warp_source < 0.5
        assert row.warp_output == pytest.approx(2 * FLICKER, abs=0.5)


def test_mask_change_of_a_patch_that_moves_against_the_picture():
    still = texture(HEIGHT, WIDTH)
    side, step = 20, 4

    def pasted(x: int) -> np.ndarray:
        out = still.copy()
        out[20 : 20 + side, x : x + side] = 250  # differs from the texture (<= 225) by > 10
        return out

    meter = TemporalMeter()
    boxes = np.array([FACE_BOX])  # paste region x2: 0..96 x 0..64, the whole frame
    meter.add(still, pasted(30), boxes)
    same = meter.add(still, pasted(30), boxes)
    moved = meter.add(still, pasted(30 + step), boxes)
    assert same.mask_change == 0.0
    # Two side x side squares `step` apart in x: IoU = side (side - step) / (side (side + step)),
    # 1 - IoU = 2 step / (side + step) = 8 / 24 (the texture never differs from itself by > 10).
    assert moved.mask_change == pytest.approx(2 * step / (side + step), abs=1e-12)


def test_landmark_jitter_is_the_hand_computed_one(tmp_path):
    track = hand_made_track()
    # Second differences: the nose's is the kick at t=1 and t=3, -2 kicks at t=2; the others 0.
    # Mean over 5 landmarks of |.| / 2, over the IOD (20): 5/5/2/20, 10/5/2/20, 5/5/2/20.
    expected = [0.025, 0.05, 0.025]
    assert track_jitter(track) == pytest.approx(expected, abs=1e-12)
    gap = {t: v for t, v in track.items() if t != 2}  # no frame has both neighbours
    assert track_jitter(gap).size == 0
    figures = spread(track_jitter(track))
    # p95 of [0.025, 0.025, 0.05], linear: 0.025 + 0.9 * 0.025.
    assert figures.mean == pytest.approx(0.1 / 3) and figures.p95 == pytest.approx(0.0475)
    # The same track through the face log enhance writes (2 decimals: exact here) and eval reads.
    log = tmp_path / "faces.jsonl"
    with FaceLog(log) as writer:
        for t, landmarks in track.items():
            writer.write(face(FACE_BOX, landmarks), frame=t, pts=t * 512, track=7)
    faces = read_face_log(log)
    read = {t: records[0].landmarks for t, records in faces.items()}
    assert [r.track for records in faces.values() for r in records] == [7] * 5
    assert track_jitter(read) == pytest.approx(expected, abs=1e-9)


def test_a_bad_face_log_is_one_line_naming_the_line(tmp_path):
    log = tmp_path / "faces.jsonl"
    log.write_text('{"frame": 0, "track": 1, "box": [1, 2, 3, 4], "landmarks": [[1, 2]]}\n')
    with pytest.raises(UserError, match=r"faces.jsonl:1: not a face record"):
        read_face_log(log)
    log.write_text('{"file": "a.png", "frame": 0, "box": [], "landmarks": []}\n')
    with pytest.raises(UserError, match="photo face log"):
        read_face_log(log)


# --- photo metrics ---------------------------------------------------------------------------


def _photo_pair(directory: Path) -> tuple[Path, Path]:
    """An 8-bit RGB output and its reference (noise added), with a colour cast so that swapping
    R and B would change LPIPS."""
    reference = texture(48, 64, seed=1)
    reference[..., 0] //= 2  # less red than blue
    noise = np.random.default_rng(2).normal(0, 8, reference.shape)
    output = np.clip(reference + noise, 0, 255).astype(np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    out, ref = directory / "out.png", directory / "ref.png"
    Image.fromarray(output).save(out)
    Image.fromarray(reference).save(ref)
    return out, ref


def _pil_rgb(path: Path) -> np.ndarray:
    """The file read by another decoder (Pillow): HxWx3 float64 RGB in [0, 255]."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_psnr_and_ssim_agree_with_an_independent_reading_of_the_files(tmp_path):
    out, ref = _photo_pair(tmp_path)
    report = evaluate_photos(out, ref, device="cpu", quiet=True)
    row = report["images"][0]
    a, b = _pil_rgb(out), _pil_rgb(ref)
    psnr = 10 * np.log10(255.0**2 / np.mean((a - b) ** 2))  # numpy, float64
    assert row["psnr"] == pytest.approx(psnr, abs=1e-3)  # measured: 30.03 dB
    to_tensor = lambda x: torch.from_numpy(x / 255).permute(2, 0, 1)[None]  # noqa: E731
    ssim = float(structural_similarity_index_measure(to_tensor(a), to_tensor(b), data_range=1.0))
    assert row["ssim"] == pytest.approx(ssim, abs=1e-5)
    assert 0.5 < row["ssim"] < 0.99  # noise of sigma 8: measured 0.899
    # Depth and gray handling: a 16-bit copy of the reference is the same picture (x257 = exact),
    # a gray file is its three equal channels.
    ref16 = tmp_path / "ref16.png"
    cv2.imwrite(str(ref16), cv2.imread(str(ref)).astype(np.uint16) * 257)
    same = evaluate_photos(ref, ref16, device="cpu", quiet=True)["images"][0]
    assert same["identical"] and same["psnr"] is None and same["ssim"] == pytest.approx(1.0)
    gray, gray3 = tmp_path / "gray.png", tmp_path / "gray3.png"
    cv2.imwrite(str(gray), cv2.imread(str(ref), cv2.IMREAD_GRAYSCALE))
    cv2.imwrite(str(gray3), cv2.imread(str(gray), cv2.IMREAD_COLOR))  # gray to BGR, by cv2
    assert evaluate_photos(gray, gray3, device="cpu", quiet=True)["images"][0]["identical"]


def test_lpips_runs_on_weights_in_torch_hubs_cache_and_is_one_line_without(
    tmp_path, monkeypatch, caplog
):
    out, ref = _photo_pair(tmp_path / "photos")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    report = evaluate_photos(out, ref, lpips_net="squeeze", device="cpu", quiet=True)
    assert report["lpips"]["available"] is False and report["images"][0]["lpips"] is None
    reason = report["lpips"]["reason"]
    assert "squeezenet1_1-b8a52dc0.pth" in reason and str(tmp_path / "torch") in reason
    assert [r.getMessage() for r in caplog.records] == [reason]
    # SqueezeNet's backbone (5 MB) with random weights stands in for the ImageNet one: what is
    # checked is that the cached file is used, offline, on the pictures as read (RGB order).
    path, _ = metrics.backbone_file("squeeze")
    path.parent.mkdir(parents=True)
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    row = evaluate_photos(out, ref, lpips_net="squeeze", device="cpu", quiet=True)["images"][0]
    a, b = (torch.from_numpy(_pil_rgb(p) / 255).permute(2, 0, 1)[None].float() for p in (out, ref))
    expected = learned_perceptual_image_patch_similarity(a, b, "squeeze", normalize=True)
    swapped = learned_perceptual_image_patch_similarity(
        a.flip(1), b.flip(1), "squeeze", normalize=True
    )
    assert row["lpips"] == pytest.approx(float(expected), abs=1e-5)
    assert abs(float(swapped) - float(expected)) > 1e-4  # the check can tell RGB from BGR
    path.write_bytes(b"not a checkpoint")
    broken = evaluate_photos(out, ref, lpips_net="squeeze", device="cpu", quiet=True)["lpips"]
    assert not broken["available"] and "does not load" in broken["reason"]


# --- the command, end to end -----------------------------------------------------------------


def test_eval_photos_matches_folders_by_name_and_reports_the_rest(tmp_path, monkeypatch, caplog):
    outputs, references = tmp_path / "enhanced", tmp_path / "hq"
    for name, seed in (("a", 1), ("sub/b", 2), ("only_out", 3), ("small", 4)):
        picture = texture(32, 40, seed)
        (outputs / name).parent.mkdir(parents=True, exist_ok=True)
        (references / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(outputs / f"{name}_x.png"), picture)
        if name == "small":
            picture = picture[:16]
        if name != "only_out":
            cv2.imwrite(str(references / f"{name}.{'jpg' if name == 'sub/b' else 'png'}"), picture)
    cv2.imwrite(str(references / "only_ref.png"), texture(32, 40, 5))
    report_path = tmp_path / "report.json"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    stdout, _ = run_in_process(
        str(outputs), "--reference", str(references), "--suffix", "x",
        "--json", str(report_path), "--device", "cpu",
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    rows = {row["name"]: row for row in report["images"]}
    assert set(rows) == {"a", "sub/b"}
    assert rows["a"]["identical"] and rows["a"]["ssim"] == pytest.approx(1.0)
    assert 25 < rows["sub/b"]["psnr"] < 60  # a JPEG of it (cv2's quality 95): measured 32.7 dB
    assert report["outputs_without_reference"] == ["only_out"]
    assert report["references_without_output"] == ["only_ref"]
    assert [s["name"] for s in report["skipped"]] == ["small"]
    assert "40x32" in report["skipped"][0]["reason"] and "40x16" in report["skipped"][0]["reason"]
    lines = [record.getMessage() for record in caplog.records]
    assert "1 output(s) without a reference: only_out" in lines
    assert "1 reference(s) without an output: only_ref" in lines
    assert sum("sizes differ" in line and "skipped" in line for line in lines) == 1
    assert sum("LPIPS not available" in line for line in lines) == 1 and len(lines) == 4
    assert "mean of 2" in stdout and "sub/b" in stdout


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    out, ref = _photo_pair(tmp_path)
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), cv2.imread(str(ref))[:20])
    missing, mismatched, neither = cli_together(
        (str(out), "--reference", str(tmp_path / "missing")),
        (str(out), "--reference", str(small)),
        (str(out),),
        TORCH_HOME=str(tmp_path / "torch"),
    )
    assert_one_line_error(missing, "reference not found")
    assert_one_line_error(mismatched, "sizes differ", "64x48", "64x20")
    assert_one_line_error(neither, "--reference", "--source")
    # libav would read a PNG as a clip of one frame (and the detector would be fetched for it).
    with pytest.raises(UserError, match="is a photo"):
        evaluate_video(str(out), str(ref), device="cpu", quiet=True)


def test_eval_video_end_to_end_on_tiny_lossless_clips(tmp_path):
    frames = panned(6)
    source = write_clip(tmp_path / "in.mkv", frames)
    output = write_clip(tmp_path / "out.mkv", flickered(frames))
    log = tmp_path / "faces.jsonl"
    with FaceLog(log) as writer:
        for t, landmarks in hand_made_track(6).items():
            writer.write(face(FACE_BOX, landmarks), frame=t, pts=t, track=0)
    report_path = tmp_path / "report.json"
    stdout, _ = run_in_process(
        str(output), "--source", str(source), "--faces-json", str(log),
        "--json", str(report_path), "--device", "cpu",
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    warp = report["warping_error"]
    assert report["frames"] == 6 and warp["output"]["count"] == 5
    assert warp["output"]["mean"] == pytest.approx(2 * FLICKER, abs=0.5)  # measured 20.005
    assert warp["source"]["mean"] < 0.5  # measured 0.133
    assert warp["ratio"] > 40
    jitter = report["landmark_jitter"]
    # The hand-made track: 0.025, 0.05, 0.025 at frames 1-3, 0 at frame 4.
    assert jitter["count"] == 4 and jitter["mean"] == pytest.approx(0.1 / 4, abs=1e-6)
    # The flicker moves every pixel by 10 levels, which is not > MASK_THRESHOLD (10): no paste.
    assert report["mask_change"]["count"] == 0
    assert f"{warp['output']['mean']:.3f}" in stdout  # the table shows the JSON's figure


def test_an_upscaled_output_is_measured_at_the_sources_size(tmp_path):
    frames = panned(3)
    source = write_clip(tmp_path / "in.mkv", frames)
    big = [cv2.resize(f, (2 * WIDTH, 2 * HEIGHT), interpolation=cv2.INTER_NEAREST) for f in frames]
    output = write_clip(tmp_path / "out.mkv", flickered(big))
    log = tmp_path / "faces.jsonl"
    with FaceLog(log) as writer:
        for t in range(3):
            writer.write(face(FACE_BOX, PATTERN + 30), frame=t, pts=t, track=0)
    report = evaluate_video(str(output), str(source), faces_json=log, device="cpu", quiet=True)
    # 2x2 blocks of one value averaged back (area filter): the source-sized output exactly.
    assert report["warping_error"]["output"]["mean"] == pytest.approx(2 * FLICKER, abs=0.5)
    short = write_clip(tmp_path / "short.mkv", flickered(frames)[:2])
    with pytest.raises(UserError, match="frames"):
        evaluate_video(str(short), str(source), faces_json=log, device="cpu", quiet=True)


def test_the_sample_against_itself_has_the_sources_own_figures(shared_dir):
    """Real media: the sample's first 12 frames, faces tracked as enhance tracks them (12: the
    tracker's detector is most of the test's time, 0.15-0.5 s a frame on the 2-core machine)."""
    report = evaluate_video(
        str(SAMPLE),
        str(SAMPLE),
        frames=12,
        detector=MOBILE,
        weights_dir=shared_dir / "weights",
        device="cpu",
        quiet=True,
    )
    warp = report["warping_error"]
    assert report["frames"] == 12 and warp["output"]["count"] == 11
    assert warp["output"] == warp["source"] and warp["ratio"] == 1.0
    # Measured: 2.34 levels (the sample's film grain, sigma 7, re-drawn every frame, and x264).
    assert 0.5 < warp["source"]["mean"] < 6
    assert all(row["faces"] >= 10 for row in report["per_frame"])  # measured 13-14 of the 29
    # Measured: 130 triples over 13 tracks, mean 3.45% of the IOD, p95 7.8% (the grain moves the
    # detector's landmarks; the tracker's One-Euro filter keeps part of it out). 20 frames: 3.97%.
    jitter = report["landmark_jitter"]
    assert jitter["count"] > 100 and 0.005 < jitter["mean"] < 0.08
    assert report["mask_change"]["count"] == 0  # output == source: nothing pasted
