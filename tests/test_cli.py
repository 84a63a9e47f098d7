"""The ``streamgpen`` command line, run as a real subprocess."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from streamgpen import __version__
from streamgpen.config import (
    DetectorName,
    ImageFormat,
    MaskKind,
    ModelName,
    ParserName,
    Precision,
    PreviewConfig,
    RtspTransport,
    RunConfig,
    TemporalMode,
)
from streamgpen.errors import UserError

MOBILENET = "detection_mobilenet0.25_Final.pth"


@pytest.fixture
def weights_dir(tmp_path) -> Path:
    return tmp_path / "weights"


def cli_env(weights_dir: Path, **env: str) -> dict[str, str]:
    """The environment for a CLI run: a private weights directory, no mirror, a wide terminal."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGPEN_")}
    environ.update(STREAMGPEN_WEIGHTS=str(weights_dir), COLUMNS="250", **env)
    return environ


@pytest.fixture
def run(weights_dir):
    """Run ``python -m streamgpen ARGS`` to completion."""

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "streamgpen", *args],
            capture_output=True,
            text=True,
            env=cli_env(weights_dir, **env),
            timeout=120,
        )

    return run


@pytest.fixture
def run_popen(weights_dir):
    """Start ``python -m streamgpen ARGS``; the test waits for it."""
    processes = []

    def start(*args: str, **env: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamgpen", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(weights_dir, **env),
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def mirror(shared_dir):
    """A local HTTP server serving shared/weights/ (no Range support: a plain mirror)."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=shared_dir / "weights")
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("streamgpen: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_version(run):
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"streamgpen {__version__}"


def test_help(run):
    result = run("--help")
    assert result.returncode == 0
    assert "weights" in result.stdout
    result = run("weights", "--help")
    assert result.returncode == 0
    for command in ("list", "download", "verify"):
        assert command in result.stdout


def test_weights_list_shows_presence(run, weights_dir, shared_dir):
    weights_dir.mkdir()
    shutil.copy(shared_dir / "weights" / MOBILENET, weights_dir / MOBILENET)
    result = run("weights", "list")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if "│" in line}
    assert " yes " in rows["retinaface_mobile0.25"]
    assert " no " in rows["GPEN-BFR-512"]
    assert "public-vigen-video" in rows["GPEN-BFR-512"]
    assert "modelscope.cn" in rows["GPEN-BFR-2048"]


def test_weights_verify_good_files(run, shared_dir):
    result = run("weights", "verify", str(shared_dir / "weights" / MOBILENET))
    assert result.returncode == 0, result.stderr
    assert "RetinaFace mobile0.25" in result.stdout
    result = run("weights", "verify", str(shared_dir / "fixtures" / "gpen" / "tiny_state_dict.pt"))
    assert result.returncode == 0, result.stderr
    assert "GPEN size=64 style_dim=128" in result.stdout


def test_weights_verify_refuses_pickled_code(run, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, path)
    result = run("weights", "verify", str(path))
    assert_one_line_error(result, str(path), "refused: it contains pickled code")
    assert not marker.exists()


def test_weights_verify_truncated_file(run, tmp_path, shared_dir):
    path = tmp_path / "truncated.pth"
    path.write_bytes((shared_dir / "weights" / MOBILENET).read_bytes()[:50_000])
    assert_one_line_error(run("weights", "verify", str(path)), str(path), "truncated or corrupt")


def test_weights_download_from_mirror(run, mirror, tmp_path):
    target = tmp_path / "elsewhere"
    result = run(
        "weights", "download", "retinaface_mobile0.25", "--weights-dir", str(target),
        STREAMGPEN_WEIGHTS_URL=mirror,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target / MOBILENET)
    assert (target / MOBILENET).is_file()
    assert "downloading" in result.stderr


def test_weights_download_offline(run, weights_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = run("weights", "download", "GPEN-BFR-256", STREAMGPEN_WEIGHTS_URL=url)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error = result.stderr.splitlines()[-1]
    assert error.startswith("streamgpen: error: could not download GPEN-BFR-256.pth")
    assert f"{url}/GPEN-BFR-256.pth" in error and str(weights_dir) in error


def test_bench_without_detector_weights_fails_before_timing_anything(run, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    report = tmp_path / "report.json"
    result = run("bench", "--device", "cpu", "--quick", "--weights-dir", str(tmp_path),
                 "--json", str(report), STREAMGPEN_WEIGHTS_URL=url)  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == "", "no model was timed"
    error = result.stderr.splitlines()[-1]
    assert error.startswith("streamgpen: error: could not download detection_mobilenet0.25")
    assert not report.exists()


class StallingHandler(BaseHTTPRequestHandler):
    """Sends the headers and a few bytes of a large file, then waits until the test ends."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(10**9))
        self.end_headers()
        self.wfile.write(b"x" * 1000)
        self.wfile.flush()
        self.server.release.wait(60)

    def log_message(self, *args):
        pass


def test_ctrl_c_during_download_exits_130(run_popen, weights_dir):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StallingHandler)
    httpd.release = threading.Event()
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        process = run_popen(
            "weights", "download", "GPEN-BFR-256",
            STREAMGPEN_WEIGHTS_URL=f"http://127.0.0.1:{httpd.server_port}",
        )  # fmt: skip
        part = weights_dir / "GPEN-BFR-256.pth.part"
        deadline = time.monotonic() + 60
        while not part.exists() and process.poll() is None:
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        httpd.release.set()
        httpd.shutdown()
        httpd.server_close()
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert part.exists()


# --- enhance's options, parsed by the real CLI into the RunConfig (in-process, no torch run) ---


@pytest.fixture
def parse(monkeypatch):
    """``parse(*args)``: run ``streamgpen enhance ARGS`` in-process with apps.enhance.run
    replaced, and return the RunConfig the command built."""
    from typer.testing import CliRunner

    from streamgpen.apps import enhance as enhance_app
    from streamgpen.cli.app import app

    configs = []
    monkeypatch.setattr(enhance_app, "run", lambda config: configs.append(config) or 0)

    def parse(*args: str) -> RunConfig:
        result = CliRunner().invoke(app, ["enhance", *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert len(configs) == 1
        return configs.pop()

    return parse


def test_output_stays_the_string_typed(parse):
    # The old CLI typed -o as a Path: "rtsp://127.0.0.1:8554/x" became "rtsp:/127.0.0.1:8554/x"
    # and "frames/" lost the slash that makes it a folder.
    assert parse("in.mp4", "-o", "rtsp://127.0.0.1:8554/x").output == "rtsp://127.0.0.1:8554/x"
    assert parse("in.mp4", "--output", "frames/").output == "frames/"
    assert parse("rtsp://cam:554/live?a=1", "-o", "out.mp4").input == "rtsp://cam:554/live?a=1"
    assert parse("photo.png").output is None


def test_defaults_are_the_config_defaults(parse):
    assert parse("in.png") == RunConfig(input="in.png")


OPTION_CASES = {
    "output": (["-o", "x/"], lambda c: c.output, "x/"),
    "suffix": (["--suffix", "x"], lambda c: c.naming.suffix, "x"),
    "ext": (["--ext", "png"], lambda c: c.naming.ext, ImageFormat.PNG),
    "save_faces": (["--save-faces", "crops"], lambda c: c.extras.save_faces, Path("crops")),
    "faces_json": (["--faces-json", "f.jsonl"], lambda c: c.extras.faces_json, Path("f.jsonl")),
    "draw": (["--draw"], lambda c: c.extras.draw, True),
    "quiet": (["-q"], lambda c: c.quiet, True),
    "model": (["--model", "GPEN-BFR-256"], lambda c: c.enhancer.model.name,
              ModelName.GPEN_BFR_256),
    "model_path": (["--model-path", "g.pth"], lambda c: c.enhancer.model.path, Path("g.pth")),
    "detector": (["--detector", "retinaface_mobile0.25"], lambda c: c.enhancer.detector.name,
                 DetectorName.RETINAFACE_MOBILE),
    "weights_dir": (["--weights-dir", "w"], lambda c: c.enhancer.weights_dir, Path("w")),
    "det_size": (["--det-size", "640"], lambda c: c.enhancer.detector.det_size, 640),
    "det_threshold": (["--det-threshold", "0.5"], lambda c: c.enhancer.detector.threshold, 0.5),
    "min_face": (["--min-face", "20"], lambda c: c.enhancer.detector.min_face, 20),
    "blend": (["--blend", "0.25"], lambda c: c.enhancer.faces.blend, 0.25),
    "clahe": (["--clahe"], lambda c: c.enhancer.faces.clahe, True),
    "only_center_face": (["--only-center-face"], lambda c: c.enhancer.faces.only_center_face,
                         True),
    "aligned": (["--aligned"], lambda c: c.enhancer.faces.aligned, True),
    "mask": (["--mask", "box"], lambda c: c.enhancer.faces.mask, MaskKind.BOX),
    "parse_model": (["--parse-model", "bisenet"], lambda c: c.enhancer.faces.parse_model,
                    ParserName.BISENET),
    "color_match": (["--color-match"], lambda c: c.enhancer.faces.color_match, True),
    "upscale": (["--upscale", "2"], lambda c: c.enhancer.upscale.factor, 2.0),
    "bg_upsampler": (["--upscale", "2", "--bg-upsampler", "RealESRGAN_x2plus"],
                     lambda c: c.enhancer.upscale.bg_upsampler, "RealESRGAN_x2plus"),
    "bg_tile": (["--bg-tile", "256"], lambda c: c.enhancer.upscale.bg_tile, 256),
    "detect_every": (["--detect-every", "2"], lambda c: c.video.detect_every, 2),
    "temporal": (["--temporal", "ema"], lambda c: c.enhancer.faces.temporal, TemporalMode.EMA),
    "ray": (["--ray", "local"], lambda c: c.ray, "local"),
    "codec": (["--codec", "ffv1"], lambda c: c.video.sink.codec, "ffv1"),
    "crf": (["--crf", "23"], lambda c: c.video.sink.crf, 23),
    "preset": (["--preset", "fast"], lambda c: c.video.sink.preset, "fast"),
    "pix_fmt": (["--pix-fmt", "yuv444p"], lambda c: c.video.sink.pix_fmt, "yuv444p"),
    "realtime": (["--realtime"], lambda c: c.video.source.realtime, True),
    "reconnect": (["--reconnect", "forever"], lambda c: c.video.source.reconnect, -1),
    "rtsp_transport": (["--rtsp-transport", "udp"], lambda c: c.video.source.rtsp_transport,
                       RtspTransport.UDP),
    "timeout": (["--timeout", "3"], lambda c: c.video.source.timeout, 3.0),
    "input_size": (["--input-size", "1280x720"], lambda c: c.video.source.input_size,
                   (1280, 720)),
    "input_fps": (["--input-fps", "30"], lambda c: c.video.source.input_fps, 30.0),
    "preview": (["--preview", "0.0.0.0:9000", "--preview-token", "t0k"], lambda c: c.preview,
                PreviewConfig(host="0.0.0.0", port=9000, token="t0k")),
    "preview_token": (["--preview", "9000", "--preview-token", "t"], lambda c: c.preview,
                      PreviewConfig(host="127.0.0.1", port=9000, token="t")),
    "batch_size": (["--batch-size", "3"], lambda c: c.enhancer.model.batch_size, 3),
    "device": (["--device", "cpu"], lambda c: c.enhancer.device, "cpu"),
    "precision": (["--precision", "fp16"], lambda c: c.enhancer.model.precision,
                  Precision.FP16),
    "compile_": (["--compile"], lambda c: c.enhancer.model.compile, True),
}  # fmt: skip


def test_every_enhance_option_has_a_case():
    import typer.main

    from streamgpen.cli.app import app

    command = typer.main.get_command(app).commands["enhance"]
    assert {p.name for p in command.params} - {"source", "help"} == OPTION_CASES.keys()


@pytest.mark.parametrize("name", OPTION_CASES)
def test_option_reaches_its_config_field(parse, name):
    args, field, expected = OPTION_CASES[name]
    assert field(parse("in.mp4", *args)) == expected


def test_reconnect_counts_and_preview_default_host(parse):
    assert parse("in.mp4", "--reconnect", "0").video.source.reconnect == 0
    assert parse("in.mp4", "--reconnect", "12").video.source.reconnect == 12
    assert parse("in.mp4", "--preview", "8765").preview == PreviewConfig()


BAD_VALUES = [
    (["--model", "GPEN-BFR-128"],
     "unknown model 'GPEN-BFR-128' (use GPEN-BFR-512, GPEN-BFR-256, GPEN-BFR-1024, "
     "GPEN-BFR-2048, identity)"),
    (["--mask", "oval"], "unknown mask 'oval' (use parse, box)"),
    (["--parse-model", "segformer"], "unknown face parser 'segformer' (use parsenet, bisenet)"),
    (["--upscale", "2", "--bg-upsampler", "ESRGAN9"],
     "--bg-upsampler ESRGAN9: not a file, nor one of none, RealESRGAN_x2plus"),
    (["--detector", "yolo"],
     "unknown detector 'yolo' (use retinaface_resnet50, retinaface_mobile0.25)"),
    (["--precision", "fp8"], "unknown precision 'fp8' (use auto, fp32, fp16, bf16)"),
    (["--rtsp-transport", "http"], "unknown RTSP transport 'http' (use tcp, udp)"),
    (["--reconnect", "often"], "--reconnect takes a number or 'forever', not 'often'"),
    (["--reconnect", "-1"], "--reconnect must be >= 0 (or 'forever')"),
    (["--input-size", "1280"], "--input-size takes WIDTHxHEIGHT"),
    (["--input-size", "0x720"], "--input-size needs a positive width and height"),
    (["--preview", "[::1:80"], "--preview [::1:80: bad bind address"),
    (["--preview-token", "t"], "--preview-token needs --preview"),
]  # fmt: skip


@pytest.mark.parametrize("args, message", BAD_VALUES)
def test_bad_value_is_one_line_before_heavy_imports(tmp_path, args, message):
    # The value is refused while the options are parsed: neither torch nor cv2 nor PyAV is
    # imported by then (measured: `enhance --help` imports none of them either), nor by checking
    # --preview's address (streamgpen.web.server's parse_bind).
    script = (
        "import sys\n"
        "from streamgpen.cli.app import main\n"
        f"sys.argv = ['streamgpen', 'enhance', 'in.mp4', *{args!r}]\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    heavy = sorted({'torch', 'cv2', 'av'} & sys.modules.keys())\n"
        "    print('heavy:', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
        env=cli_env(tmp_path), timeout=60,
    )  # fmt: skip
    assert_one_line_error(result, message)
    assert result.stdout.strip() == "heavy: []"


def test_bench_unknown_model_is_one_line_usage_error(run):
    # It was a ValueError traceback from run_bench, after torch was imported.
    result = run("bench", "--device", "cpu", "--model", "GPEN-BFR-128")
    assert_one_line_error(result, "unknown model 'GPEN-BFR-128' (use GPEN-BFR-256, GPEN-BFR-512)")
    assert result.stdout == ""


def test_bench_models_and_detector_reach_run_bench(monkeypatch):
    from typer.testing import CliRunner

    from streamgpen.apps import bench as bench_app
    from streamgpen.cli.app import app

    calls = []

    def fake_run_bench(*args, **kwargs):
        calls.append((args, kwargs))
        raise UserError("stop here")

    monkeypatch.setattr(bench_app, "run_bench", fake_run_bench)
    args = ["bench", "--model", "GPEN-BFR-512", "--model", "GPEN-BFR-256", "--batch-size", "2"]
    with pytest.raises(UserError, match="stop here"):
        CliRunner().invoke(app, args, catch_exceptions=False)
    ((positional, keywords),) = calls
    assert positional[1] == ["GPEN-BFR-512", "GPEN-BFR-256"] and positional[2] == [2]
    assert positional[6] == "retinaface_mobile0.25" and type(positional[6]) is str
    assert keywords == {"compiled": False, "profile": None}


def test_quiet_silences_the_download_bar(run, mirror, tmp_path, shared_dir):
    # End to end (needs apps.enhance.run): the detector is downloaded from the mirror. Without
    # --quiet the bar's last frame is a line like "detection_mobilenet0.25_Final.pth ━━━━ 1.8/1.8
    # MB 696.5 MB/s 0:00:00" on stderr (measured with `weights download`, below).
    out = tmp_path / "out.png"
    result = run(
        "enhance", str(shared_dir / "media" / "Solvay_conference_1927.png"), "-o", str(out),
        "--model", "identity", "--detector", "retinaface_mobile0.25", "--device", "cpu",
        "--quiet", "--mask", "box", STREAMGPEN_WEIGHTS_URL=mirror,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    assert "━" not in result.stderr and "MB/s" not in result.stderr, result.stderr


def test_weights_download_keeps_its_bar(run, mirror, tmp_path):
    result = run("weights", "download", "retinaface_mobile0.25", "--weights-dir",
                 str(tmp_path / "w"), STREAMGPEN_WEIGHTS_URL=mirror)  # fmt: skip
    assert result.returncode == 0, result.stderr
    bar = [line for line in result.stderr.splitlines() if "━" in line]
    assert len(bar) == 1 and MOBILENET in bar[0] and "1.8/1.8 MB" in bar[0], result.stderr
