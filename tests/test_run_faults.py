"""Runs as a user starts them, when things go wrong: signals, failing files, reruns, options that
used to be dropped on the way (issue 10's bugs 2, 3 and 10)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from PIL import Image

from streamgpen.config import EnhancerConfig, FaceConfig, PreviewConfig, RunConfig
from streamgpen.faces.track import Tracker
from streamgpen.media.video import open_source
from streamgpen.pipeline.packet import FramePacket
from streamgpen.pipeline.stages import StageClock, TrackStage
from streamgpen.progress import stderr_console

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "solvay_pan.mp4"


@pytest.fixture(scope="module")
def solvay(shared_dir) -> Path:
    return shared_dir / "media" / "Solvay_conference_1927.png"


def _folder(solvay: Path, folder: Path, count: int) -> Path:
    photo = Image.open(solvay).convert("RGB").crop((0, 0, 332, 200))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo.save(folder / f"{i:02d}.png")
    return folder


def _enhance(*args, weights_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "streamgpen", "enhance", *map(str, args), "--model", "identity",
        "--detector", "retinaface_mobile0.25", "--device", "cpu", "--weights-dir", str(weights_dir),
        "--mask", "box",
    ]  # fmt: skip


def _wait_for_first_output(process: subprocess.Popen, out: Path, pattern: str) -> None:
    deadline = time.monotonic() + 180
    while not list(out.glob(pattern)) and process.poll() is None:
        assert time.monotonic() < deadline, "no output was ever written"
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be interrupted"


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]])
def test_signals_during_a_folder_stop_it_cleanly_with_130(solvay, weights_dir, tmp_path, signals):
    # Before: SIGTERM killed the process by the signal (no clean stop); a second Ctrl-C during
    # the clean stop did too.
    src, out = _folder(solvay, tmp_path / "in", 40), tmp_path / "out"
    process = subprocess.Popen(
        _enhance(src, "-o", out, weights_dir=weights_dir), stderr=subprocess.PIPE, text=True
    )
    _wait_for_first_output(process, out, "*.png")
    for sig in signals:
        process.send_signal(sig)
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    assert 0 < len(list(out.glob("*.png"))) < 40


def test_a_folder_goes_on_after_a_file_it_cannot_write(solvay, weights_dir, tmp_path):
    src, out = _folder(solvay, tmp_path / "in", 4), tmp_path / "out"
    (out / "01.png").mkdir(parents=True)  # a folder where the output file should go
    result = subprocess.run(
        _enhance(src, "-o", out, weights_dir=weights_dir), capture_output=True, text=True
    )
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("streamgpen: error")]
    assert len(errors) == 1 and "01.png" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.glob("*.png") if p.is_file()) == [
        "00.png",
        "02.png",
        "03.png",
    ]


def test_an_output_folder_inside_the_input_is_not_read_again(solvay, weights_dir, tmp_path):
    # Before: each rerun also enhanced the previous run's outputs (in/out/00.png -> in/out/out/...).
    src = _folder(solvay, tmp_path / "in", 2)
    for _ in range(2):
        result = subprocess.run(
            _enhance(src, "-o", src / "out", weights_dir=weights_dir),
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*.png")) == [
        "00.png", "01.png", "out/00.png", "out/01.png"
    ]  # fmt: skip


def test_only_center_face_holds_for_video(detector):
    # Before: the tracker bypassed Enhancer.detect, so video restored every face.
    stage = TrackStage(Tracker(detector), StageClock(), only_center_face=True)
    every = TrackStage(Tracker(detector), StageClock())
    with open_source(str(SAMPLE)) as source:
        for frame, _ in zip(source, range(6), strict=False):
            image = torch.from_numpy(frame.image).permute(2, 0, 1).float() / 255
            one = FramePacket(frame=frame, seconds=frame.time, image=image)
            all_faces = FramePacket(frame=frame, seconds=frame.time, image=image)
            stage.process([one])
            every.process([all_faces])
            assert len(all_faces.faces) > 1 and len(one.faces) == 1


def test_blend_reaches_the_preview_controls():
    # Before: --blend 0.3 --preview PORT ran at blend 1.0 (the page's defaults won).
    from streamgpen.apps.enhance import _preview

    config = RunConfig(
        input=str(SAMPLE),
        enhancer=EnhancerConfig(faces=FaceConfig(blend=0.3)),
        preview=PreviewConfig(host="127.0.0.1", port=0),
    )
    with ExitStack() as stack:
        server = _preview(config, stack, stderr_console())
        assert server.controls.blend == 0.3


def test_outputs_typed_as_urls_and_folders_work_from_the_cli(weights_dir, tmp_path):
    # Before: the CLI made -o a Path: rtsp://host:port/x became rtsp:/host:port/x ("cannot tell
    # what kind of output") and frames/ lost its slash (refused unless the folder existed).
    import av
    from rtsp_server import RtspServer, make_test_clip

    clip = make_test_clip(tmp_path / "clip.mp4", seconds=1.0, fps=25, size=(160, 120), audio=False)
    frames = tmp_path / "frames"
    run = subprocess.run(
        _enhance(clip, "-o", f"{frames}/", "--quiet", weights_dir=weights_dir),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert len(list(frames.glob("*.png"))) == 25
    with RtspServer(clip, record_dir=tmp_path / "rec") as server:
        run = subprocess.run(
            # Not --realtime: a live source may drop frames when the CPU falls behind, and
            # every frame must arrive here.
            _enhance(clip, "-o", server.publish_url, "--quiet", weights_dir=weights_dir),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        deadline = time.monotonic() + 20
        count = 0
        while time.monotonic() < deadline and count < 25:  # written as it arrives
            for recording in server.recordings():
                try:
                    with av.open(str(recording)) as container:
                        count = sum(1 for _ in container.decode(video=0))
                except av.error.FFmpegError:
                    pass
            time.sleep(0.2)
    assert count == 25


def test_a_cpu_run_says_what_runs_and_what_a_face_costs(shared_dir, weights_dir, tmp_path):
    # Before: --device auto fell back to the CPU without a word, at ~14 s per face (issue 16.1).
    photo = tmp_path / "in.png"
    Image.open(shared_dir / "media" / "Solvay_conference_1927.png").crop((0, 0, 332, 200)).save(
        photo
    )
    cmd = _enhance(photo, "-o", tmp_path / "out.png", weights_dir=weights_dir)
    shutil.copy(shared_dir / "fixtures" / "gpen" / "tiny_state_dict.pt", tmp_path / "tiny.pt")
    cmd[cmd.index("--model") : cmd.index("--model") + 2] = [
        "--model-path",
        str(tmp_path / "tiny.pt"),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "on cpu, detector retinaface_mobile0.25" in run.stderr
    assert "s per face on this CPU" in run.stderr and "--model GPEN-BFR-256" in run.stderr
    quiet = subprocess.run([*cmd, "--quiet"], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


@pytest.mark.parametrize("name", ["missing.mp4", "missing.jpg", "missing_folder"])
def test_a_missing_input_is_refused_before_the_heavy_imports(tmp_path, name):
    # Before: 17-66 s of importing torch, facexlib and PyAV before "no such file" (issue 16.8).
    script = (
        "import sys\n"
        "from streamgpen.cli.app import main\n"
        f"sys.argv = ['streamgpen', 'enhance', {name!r}]\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    print('heavy:', sorted({'torch', 'cv2', 'av'} & sys.modules.keys()))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert run.returncode == 2 and run.stdout.strip() == "heavy: []", run.stdout + run.stderr
    assert (
        run.stderr == f"streamgpen: error: input file not found: {name} (no such file or folder)\n"
    )


def test_a_photo_into_a_new_folder_with_normal_permissions(solvay, weights_dir, tmp_path):
    # Before: -o DIR/ for one photo was refused ("unsupported output image extension"), and
    # photos were written 0600 whatever the umask (issue 16.5, 16.7).
    photo = tmp_path / "in.png"
    Image.open(solvay).convert("RGB").crop((0, 0, 332, 200)).save(photo)
    cmd = _enhance(photo, "-o", f"{tmp_path / 'new'}/", "--quiet", weights_dir=weights_dir)
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o022)
    )
    assert run.returncode == 0, run.stderr
    out = tmp_path / "new" / "in.png"
    assert out.is_file() and out.stat().st_mode & 0o777 == 0o644
    bad = subprocess.run(
        _enhance(photo, "-o", tmp_path / "out.xyz", weights_dir=weights_dir),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and ".png" in bad.stderr and ".jpg" in bad.stderr, bad.stderr
