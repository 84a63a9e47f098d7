"""Photo runs as a user sees them: output names (``--suffix``, ``--ext``) and the faces bar."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamgpen.config import ImageFormat

SOLVAY = "Solvay_conference_1927.png"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def solvay(shared_dir) -> Path:
    return shared_dir / "media" / SOLVAY


def enhance(*args, weights_dir: Path, **env: str) -> subprocess.CompletedProcess:
    """``streamgpen enhance ARGS`` with the identity model and the mobilenet detector on the CPU."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGPEN_")}
    environ.update({"COLUMNS": "250", **env})
    cmd = [sys.executable, "-m", "streamgpen", "enhance", *map(str, args), "--model", "identity",
           "--detector", "retinaface_mobile0.25", "--weights-dir", str(weights_dir),
           "--device", "cpu", "--mask", "box"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamgpen: error: "), result.stderr
    return lines[0]


def test_ext_choices_are_the_extensions_written():
    from streamgpen.media.images import IMAGE_EXTENSIONS

    written = {f".{e.value}" for e in ImageFormat if e is not ImageFormat.AUTO}
    assert written == IMAGE_EXTENSIONS


def test_folder_run_names_outputs_stem_suffix_ext(solvay, weights_dir, tmp_path):
    source = tmp_path / "in"
    (source / "sub").mkdir(parents=True)
    faces = cv2.imread(str(solvay))[:200, :400]  # the top left: 5 faces
    cv2.imwrite(str(source / "group.png"), faces)
    plain = np.full((64, 96, 3), 90, np.uint8)  # no face: written as it decodes
    cv2.imwrite(str(source / "sub" / "wall.jpg"), plain)
    out = tmp_path / "out"
    result = enhance(source, "-o", out, "--suffix", "restored", "--ext", "png",
                     weights_dir=weights_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["group_restored.png", "sub/wall_restored.png"]
    # The faceless JPEG is re-encoded as a PNG (not its JPEG bytes under a .png name).
    wall = out / "sub" / "wall_restored.png"
    assert wall.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(cv2.imread(str(wall)), cv2.imread(str(source / "sub" / "wall.jpg")))
    assert cv2.imread(str(out / "group_restored.png")).shape == faces.shape
    assert f"written to {out}" in result.stderr


def test_single_photo_names(tmp_path):
    from streamgpen.apps.photos import plan_outputs
    from streamgpen.config import NamingConfig
    from streamgpen.errors import UserError

    photo = tmp_path / "wall.png"
    cv2.imwrite(str(photo), np.full((8, 8, 3), 90, np.uint8))
    jpg, sfx = NamingConfig(ext=ImageFormat.JPG), NamingConfig(suffix="x")
    assert plan_outputs(photo, None, jpg) == [(photo, tmp_path / "wall_enhanced.jpg")]
    assert plan_outputs(photo, None, sfx) == [(photo, tmp_path / "wall_x.png")]
    assert plan_outputs(photo, "out/", sfx) == [(photo, Path("out/wall_x.png"))]
    assert plan_outputs(photo, "out/", NamingConfig()) == [(photo, Path("out/wall.png"))]
    with pytest.raises(UserError, match="names the output file: --suffix and --ext name"):
        plan_outputs(photo, tmp_path / "b.png", sfx)


def test_two_inputs_to_one_output_are_refused_before_writing(tmp_path, weights_dir):
    photos = tmp_path / "in"
    photos.mkdir()
    for name in ("a.jpg", "a.png"):
        cv2.imwrite(str(photos / name), np.full((32, 32, 3), 50, np.uint8))
    line = one_line_error(enhance(photos, "-o", tmp_path / "out", "--ext", "png",
                                  weights_dir=weights_dir))  # fmt: skip
    assert f"{photos / 'a.jpg'} and {photos / 'a.png'} would both be written to" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ext", "gif"], "unknown output extension 'gif' (use auto, jpg, jpeg, png, bmp, tif, "
                           "tiff, webp, jp2)"),
        (["--suffix", "a/b"], "--suffix 'a/b': a part of a file name (no / or \\, not empty)"),
        (["--suffix", ""], "a part of a file name"),
    ],
)  # fmt: skip
def test_bad_naming_values_are_refused_before_heavy_imports(tmp_path, args, message):
    script = (
        "import sys\n"
        "from streamgpen.cli.app import main\n"
        f"sys.argv = ['streamgpen', 'enhance', 'in.png', *{args!r}]\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    print('heavy:', sorted({'torch', 'cv2', 'av'} & sys.modules.keys()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)  # fmt: skip
    assert message in one_line_error(result)
    assert result.stdout.strip() == "heavy: []"


def bar_states(stderr: str) -> list[str]:
    """Each state of the bar as the terminal drew it (rich redraws a line after ``\\r``)."""
    lines = (ANSI.sub("", s).rstrip() for s in re.split(r"[\r\n]", stderr))
    return [line for line in lines if line.startswith("faces ")]


def test_one_photo_bar_counts_its_faces_batch_by_batch(solvay, weights_dir, tmp_path):
    photo = tmp_path / SOLVAY
    photo.write_bytes(solvay.read_bytes())
    # A terminal 80 columns wide: rich draws the bar as it would for a person.
    result = enhance(photo, "--suffix", "x", "--ext", "jpg", "--batch-size", "8",
                     weights_dir=weights_dir, TTY_COMPATIBLE="1", TERM="xterm", COLUMNS="80",
                     NO_COLOR="1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    output = tmp_path / "Solvay_conference_1927_x.jpg"  # beside the input: STEM_SUFFIX.EXT
    assert output.read_bytes()[:2] == b"\xff\xd8"  # a JPEG
    states = bar_states(result.stderr)
    assert states and max(len(s) for s in states) <= 80, states
    counts = [m.group(0) for s in states if (m := re.search(r"\d+/(\d+|\?)", s))]
    # No total until detection, then the 29 faces restored 8 at a time: every batch is shown.
    shown = list(dict.fromkeys(counts))  # each state once, in order
    assert shown == ["0/?", "0/29", "8/29", "16/29", "24/29", "29/29"], shown
    assert re.search(r"\d+\.\d+ faces/s|\d+\.\d s/face", states[-1]), states[-1]
    summary = ANSI.sub("", result.stderr).splitlines()[-1]
    assert summary.startswith("1 image(s), 29 face(s) in "), summary
    assert summary.endswith(f"written to {output}"), summary
