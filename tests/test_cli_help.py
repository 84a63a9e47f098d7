"""``--help`` and ``weights list`` as a user reads them in an 80-column terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS_HELP = Path(__file__).resolve().parents[1] / "docs" / "cli-help-80.txt"
PANELS = ("Input and output", "Model", "Faces", "Upscaling", "Video and streams", "Performance")
# enhance's options whose default is a plain value, as --help must print it.
PLAIN_DEFAULTS = {
    "--ext": "auto",
    "--model": "GPEN-BFR-512",
    "--detector": "retinaface_resnet50",
    "--det-size": "1280",
    "--det-threshold": "0.9",
    "--min-face": "10",
    "--blend": "1.0",
    "--mask": "parse",
    "--parse-model": "parsenet",
    "--upscale": "1.0",
    "--bg-upsampler": "none",
    "--bg-tile": "400",
    "--detect-every": "5",
    "--temporal": "flow",
    "--codec": "libx264",
    "--crf": "18",
    "--preset": "medium",
    "--reconnect": "5",
    "--rtsp-transport": "tcp",
    "--timeout": "10.0",
    "--batch-size": "8",
    "--device": "auto",
    "--precision": "auto",
}
# The others (no plain value): what their "[default: ...]" says, whitespace collapsed.
DESCRIBED_DEFAULTS = {
    "--output": "beside the input, NAME_enhanced",
    "--suffix": "none; enhanced beside the input",
    "--weights-dir": "$STREAMGPEN_WEIGHTS, else streamgpen/weights in $XDG_CACHE_HOME or ~/.cache",
    "--pix-fmt": "the input's, when the encoder has it",
    "--input-size": "the camera's",
    "--input-fps": "the camera's",
    "--ray": "this process",
    "--preview": "off",
    "--preview-token": "none on loopback, else generated",
}
FLAGS = ("--draw", "--quiet", "--clahe", "--only-center-face", "--aligned", "--realtime",
         "--compile", "--color-match")  # fmt: skip
NO_DEFAULT = ("--save-faces", "--faces-json", "--model-path")  # none: the feature is off


def render(*args: str, columns: int = 80) -> str:
    """``streamgpen ARGS`` in a plain terminal of ``columns`` columns; trailing spaces cut."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGPEN_")}
    env.update(COLUMNS=str(columns), TERM="dumb", NO_COLOR="1")
    env.pop("FORCE_COLOR", None)
    result = subprocess.run(
        [sys.executable, "-m", "streamgpen", *args],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return "\n".join(line.rstrip() for line in result.stdout.splitlines()) + "\n"


@pytest.fixture(scope="module")
def enhance_help() -> str:
    return render("enhance", "--help")


def option_rows(text: str) -> dict[str, str]:
    """Each option's help, its wrapped lines joined: {"--det-size": "PX [x>=64] Detect..."}."""
    rows: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        cell = line.strip("│╭╰─╮╯ ")
        match = re.match(r"(--[\w-]+)\s", cell + " ")
        if match and line.startswith("│"):
            current = match.group(1)
            rows[current] = cell[len(current) :]
        elif current and line.startswith("│") and cell:
            rows[current] += " " + cell
        else:
            current = None
    return {name: " ".join(row.split()) for name, row in rows.items()}


def test_enhance_help_fits_80_columns_in_panels(enhance_help):
    lines = enhance_help.splitlines()
    assert max(len(line) for line in lines) <= 80
    titles = [m.group(1) for line in lines if (m := re.match(r"╭─ (.+?) ─", line))]
    assert titles == ["Arguments", "Options", *PANELS]


def test_enhance_help_shows_every_default(enhance_help):
    rows = option_rows(enhance_help)
    assert rows.keys() == {*PLAIN_DEFAULTS, *DESCRIBED_DEFAULTS, *FLAGS, *NO_DEFAULT, "--help"}
    for option, value in PLAIN_DEFAULTS.items():
        # On one line: a default cut in two by the wrapping is not readable.
        assert any(f"[default: {value}]" in line for line in enhance_help.splitlines()), option
        assert rows[option].endswith(f"[default: {value}]"), rows[option]
    for option, text in DESCRIBED_DEFAULTS.items():
        # The old help lost these to Rich markup: "Output photo, folder, or video file ."
        assert rows[option].endswith(f"[default: {text}]"), rows[option]
    for option in (*FLAGS, *NO_DEFAULT):
        assert "[default:" not in rows[option], rows[option]


def test_enhance_help_lists_the_choices(enhance_help):
    rows = option_rows(enhance_help)
    assert "GPEN-BFR-512, GPEN-BFR-256, GPEN-BFR-1024, GPEN-BFR-2048 or identity" in rows["--model"]
    assert "parse (a face parser's" in rows["--mask"] and "or box" in rows["--mask"]
    assert "parsenet or bisenet" in rows["--parse-model"]
    assert "retinaface_resnet50 or retinaface_mobile0.25" in rows["--detector"]
    assert "auto, fp32, fp16 or bf16" in rows["--precision"]
    assert "tcp or udp" in rows["--rtsp-transport"]


def test_committed_help_is_the_current_one(enhance_help):
    # Regenerate: COLUMNS=80 TERM=dumb NO_COLOR=1 python -m streamgpen enhance --help \
    #   | sed 's/ *$//' > docs/cli-help-80.txt
    assert DOCS_HELP.read_text() == enhance_help


def test_help_answers_without_torch():
    script = (
        "import sys\n"
        "from streamgpen.cli.app import main\n"
        "sys.argv = ['streamgpen', 'enhance', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted({'torch', 'cv2', 'av', 'numpy'} & sys.modules.keys()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.stdout.splitlines()[-1] == "[]"


def test_bench_help_fits_80_columns_with_its_defaults():
    text = render("bench", "--help")
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = option_rows(text)
    assert rows["--model"].startswith("NAME GPEN-BFR-256 and/or GPEN-BFR-512")
    assert rows["--detector"].endswith("[default: retinaface_mobile0.25]")
    assert rows["--device"].endswith("[default: auto]")


def test_weights_list_keeps_urls_whole_at_80_columns(tmp_path):
    from streamgpen.models import weights

    text = render("weights", "list", "--weights-dir", str(tmp_path))
    lines = text.splitlines()
    # The table fits; the URLs follow it, one per line, never cut (the terminal folds them).
    table = [line for line in lines if line[:1] in "┏┃┡│└"]
    assert table and max(len(line) for line in table) <= 80
    for spec in weights.MODELS.values():
        url = weights.source_url(spec) or "none: place the file by hand"
        assert f"  {spec.name}: {url}" in lines
    assert not any(line.startswith("│") and "http" in line for line in lines)


def test_weights_list_is_one_table_when_wide(tmp_path):
    text = render("weights", "list", "--weights-dir", str(tmp_path), columns=250)
    header = next(line for line in text.splitlines() if line.startswith("┃"))
    assert header.split("┃")[1:-1] and [c.strip() for c in header.split("┃")[1:-1]] == [
        "name", "kind", "file", "present", "url",
    ]  # fmt: skip
    assert "URLs:" not in text


def test_serve_help_fits_80_columns_with_the_service_panel_first():
    text = render("serve", "--help")
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    titles = [m.group(1) for line in lines if (m := re.match(r"╭─ (.+?) ─", line))]
    assert titles[:2] == ["Options", "Service"] and "Model" in titles and "Faces" in titles
    rows = option_rows(text)
    assert rows["--host"].endswith("[default: 127.0.0.1]")
    assert rows["--port"].endswith("[default: 8000]")
    assert rows["--batch-window"].endswith("[default: 10.0]")
    # What a request cannot carry is not offered: photos' and files' outputs are the request's.
    assert not {"--output", "--suffix", "--preview", "--draw", "--aligned"} & rows.keys()
