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
    assert result.returncode == 2
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
    assert "place the file by hand" in rows["GPEN-BFR-1024"]


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
