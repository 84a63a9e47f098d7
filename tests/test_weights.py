"""Model registry, downloads (against a real local HTTP server) and safe checkpoint loading."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import threading
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from streamgpen.errors import UserError
from streamgpen.models import weights
from streamgpen.models.gpen import GPENConfig, expected_shapes
from streamgpen.models.weights import ModelSpec

TINY_SPEC = ModelSpec(
    "tiny-gpen",
    "gpen",
    "tiny-gpen.pth",
    None,
    config=GPENConfig(64, style_dim=128, n_mlp=8, channel_multiplier=1, narrow=0.25),
)
MOBILENET = "detection_mobilenet0.25_Final.pth"
CUT = 100_000


@dataclass
class ServerState:
    """What the test server serves and what it saw."""

    base_url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    ranges: list[str | None] = field(default_factory=list)
    honour_range: bool = True
    # Send only this many body bytes of the next response, then drop the connection.
    cut_after: int | None = None


class RangeHandler(BaseHTTPRequestHandler):
    """GET with optional ``Range: bytes=N-`` (206 + Content-Range), and a one-shot cut."""

    def do_GET(self):
        state: ServerState = self.server.state
        data = state.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        requested = self.headers.get("Range")
        state.ranges.append(requested)
        start = 0
        if requested and state.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut, state.cut_after = state.cut_after, None
        self.wfile.write(body if cut is None else body[:cut])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.state = ServerState(base_url=f"http://127.0.0.1:{httpd.server_port}")
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch):
    for name in (weights.ENV_URL, weights.ENV_DIR):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_bytes(tmp_path_factory, tiny_state_dict) -> bytes:
    path = tmp_path_factory.mktemp("tiny") / "tiny.pth"
    torch.save(tiny_state_dict, path)
    return path.read_bytes()


@pytest.fixture(scope="session")
def mobilenet_path(shared_dir) -> Path:
    return shared_dir / "weights" / MOBILENET


class Payload:
    """Pickles as a call to open(marker, 'w'): loading it unsafely creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled_code_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, path)
    return path


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# Registry and weights directory


@pytest.mark.parametrize("name", ["GPEN-BFR-256", "GPEN-BFR-512", "GPEN-BFR-1024"])
def test_gpen_configs_match_official_manifests(name, shared_dir):
    manifest = json.loads((shared_dir / "fixtures" / "gpen" / f"manifest_{name}.json").read_text())
    spec = weights.MODELS[name]
    assert spec.filename == f"{name}.pth"
    for key, value in manifest["config"].items():
        assert getattr(spec.config, key) == value
    expected = {k: list(v) for k, v in expected_shapes(spec.config).items()}
    assert expected == manifest["keys"]


def test_registry_urls():
    for name, modelscope_file in (("GPEN-BFR-1024", "pytorch_model.pt"),
                                  ("GPEN-BFR-2048", "pytorch_model-2048.pt")):  # fmt: skip
        url = weights.MODELS[name].url
        assert "damo/cv_gpen_image-portrait-enhancement-hires" in url
        assert url.endswith(f"FilePath={modelscope_file}")
        assert weights.MODELS[name].filename == f"{name}.pth"
    assert weights.MODELS["parsenet"].url.endswith("/v0.2.2/parsing_parsenet.pth")
    assert weights.MODELS["RealESRGAN_x4plus"].url.endswith("/v0.1.0/RealESRGAN_x4plus.pth")
    assert weights.MODELS["GPEN-BFR-512"].url.endswith("/robin/models/GPEN-BFR-512.pth")
    assert weights.MODELS["retinaface_mobile0.25"].url.endswith(f"/v0.1.0/{MOBILENET}")


def test_weights_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert weights.weights_dir(None) == tmp_path / "home" / ".cache" / "streamgpen" / "weights"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.weights_dir(None) == tmp_path / "xdg" / "streamgpen" / "weights"
    monkeypatch.setenv(weights.ENV_DIR, str(tmp_path / "env"))
    assert weights.weights_dir(None) == tmp_path / "env"
    assert weights.weights_dir(tmp_path / "option") == tmp_path / "option"


# Downloads


def test_download_checks_and_installs(server, tiny_bytes, tiny_state_dict, tmp_path):
    server.files[TINY_SPEC.filename] = tiny_bytes
    path = weights.download(TINY_SPEC, tmp_path / "w", base_url=server.base_url, progress=False)
    assert path == tmp_path / "w" / TINY_SPEC.filename
    assert os.listdir(tmp_path / "w") == [TINY_SPEC.filename]
    assert_tensors_equal(weights.load_state_dict(path), tiny_state_dict)


def test_interrupted_download_resumes(server, tiny_bytes, tmp_path):
    server.files[TINY_SPEC.filename] = tiny_bytes
    server.cut_after = CUT
    directory = tmp_path / "w"
    with pytest.raises(UserError) as failed:
        weights.download(TINY_SPEC, directory, base_url=server.base_url, progress=False)
    message = str(failed.value)
    assert (
        TINY_SPEC.filename in message and server.base_url in message and str(directory) in message
    )
    part = directory / f"{TINY_SPEC.filename}.part"
    assert part.stat().st_size == CUT
    assert not (directory / TINY_SPEC.filename).exists()

    path = weights.download(TINY_SPEC, directory, base_url=server.base_url, progress=False)
    assert server.ranges == [None, f"bytes={CUT}-"]
    assert path.read_bytes() == tiny_bytes
    assert not part.exists()
    assert weights.load_gpen(path).config == TINY_SPEC.config


def test_resume_restarts_when_server_ignores_range(server, tiny_bytes, tmp_path):
    server.files[TINY_SPEC.filename] = tiny_bytes
    server.honour_range = False
    server.cut_after = CUT
    with pytest.raises(UserError):
        weights.download(TINY_SPEC, tmp_path, base_url=server.base_url, progress=False)
    path = weights.download(TINY_SPEC, tmp_path, base_url=server.base_url, progress=False)
    assert server.ranges == [None, f"bytes={CUT}-"]
    assert path.read_bytes() == tiny_bytes


def test_complete_part_file_is_checked_and_installed(server, tiny_bytes, tmp_path):
    # An earlier run got every byte but stopped before the rename: the server answers 416.
    server.files[TINY_SPEC.filename] = tiny_bytes
    (tmp_path / f"{TINY_SPEC.filename}.part").write_bytes(tiny_bytes)
    path = weights.download(TINY_SPEC, tmp_path, base_url=server.base_url, progress=False)
    assert path.read_bytes() == tiny_bytes


def wrong_shapes(tiny_state_dict, tmp_path) -> bytes:
    sd = dict(tiny_state_dict)
    sd["final_linear.0.bias"] = torch.zeros(7)
    torch.save(sd, tmp_path / "wrong.pth")
    return (tmp_path / "wrong.pth").read_bytes()


def other_architecture(tiny_state_dict, tmp_path) -> bytes:
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    return (tmp_path / "other.pth").read_bytes()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tiny, sd, tmp: random.Random(0).randbytes(len(tiny)), "PyTorch checkpoint"),
        (lambda tiny, sd, tmp: tiny[: len(tiny) // 2], "truncated or corrupt"),
        (lambda tiny, sd, tmp: wrong_shapes(sd, tmp), "final_linear.0.bias has shape [7]"),
        (lambda tiny, sd, tmp: other_architecture(sd, tmp), "missing keys"),
    ],
    ids=["random-bytes", "truncated", "wrong-shapes", "other-architecture"],
)
def test_bad_download_is_rejected_and_removed(
    make, reason, server, tiny_bytes, tiny_state_dict, tmp_path
):
    server.files[TINY_SPEC.filename] = make(tiny_bytes, tiny_state_dict, tmp_path)
    directory = tmp_path / "w"
    with pytest.raises(UserError, match=re.escape(reason)) as rejected:
        weights.download(TINY_SPEC, directory, base_url=server.base_url, progress=False)
    assert "rejected and deleted" in str(rejected.value)
    assert os.listdir(directory) == []


def test_sha256_mismatch_is_rejected(server, tiny_bytes, tmp_path):
    server.files[TINY_SPEC.filename] = tiny_bytes
    spec = replace(TINY_SPEC, sha256="0" * 64)
    with pytest.raises(UserError, match="sha256"):
        weights.download(spec, tmp_path, base_url=server.base_url, progress=False)
    assert os.listdir(tmp_path) == []


def test_pickled_code_download_is_refused(server, tmp_path):
    marker = tmp_path / "marker"
    source = pickled_code_checkpoint(tmp_path / "evil.pth", marker)
    server.files[TINY_SPEC.filename] = source.read_bytes()
    with pytest.raises(UserError, match="refused: it contains pickled code"):
        weights.download(TINY_SPEC, tmp_path / "w", base_url=server.base_url, progress=False)
    assert not marker.exists()
    assert os.listdir(tmp_path / "w") == []


def test_missing_file_on_server_is_a_user_error(server, tmp_path):
    with pytest.raises(UserError, match="HTTP 404"):
        weights.download(TINY_SPEC, tmp_path, base_url=server.base_url, progress=False)


def test_retinaface_download_via_env_mirror(server, mobilenet_path, tmp_path, monkeypatch):
    server.files[MOBILENET] = mobilenet_path.read_bytes()
    monkeypatch.setenv(weights.ENV_URL, server.base_url + "/")
    path = weights.ensure("retinaface_mobile0.25", tmp_path, progress=False)
    assert path.read_bytes() == mobilenet_path.read_bytes()


# ensure


def test_ensure_uses_present_file_without_network(tmp_path, mobilenet_path, monkeypatch):
    shutil.copy(mobilenet_path, tmp_path / MOBILENET)
    monkeypatch.setenv(weights.ENV_URL, f"http://127.0.0.1:{unused_port()}")
    assert weights.ensure("retinaface_mobile0.25", tmp_path) == tmp_path / MOBILENET


def test_ensure_downloads_missing_file(server, tiny_bytes, tmp_path, monkeypatch, capfd):
    url = f"{server.base_url}/{TINY_SPEC.filename}"
    monkeypatch.setitem(weights.MODELS, TINY_SPEC.name, replace(TINY_SPEC, url=url))
    server.files[TINY_SPEC.filename] = tiny_bytes
    path = weights.ensure(TINY_SPEC.name, tmp_path, progress=False)
    assert path.read_bytes() == tiny_bytes
    assert f"downloading {url}" in capfd.readouterr().err


def test_ensure_offline_names_file_directory_and_url(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{unused_port()}/{TINY_SPEC.filename}"
    monkeypatch.setitem(weights.MODELS, TINY_SPEC.name, replace(TINY_SPEC, url=url))
    with pytest.raises(UserError) as offline:
        weights.ensure(TINY_SPEC.name, tmp_path / "w", progress=False)
    message = str(offline.value)
    assert TINY_SPEC.filename in message and str(tmp_path / "w") in message and url in message
    assert "\n" not in message


def test_ensure_without_download_names_file_directory_and_url(tmp_path):
    with pytest.raises(UserError) as missing:
        weights.ensure("GPEN-BFR-512", tmp_path, download_missing=False)
    message = str(missing.value)
    assert "GPEN-BFR-512.pth" in message and str(tmp_path) in message
    assert weights.MODELS["GPEN-BFR-512"].url in message


def test_ensure_unknown_name(tmp_path):
    with pytest.raises(UserError, match="unknown model 'nope'; known: GPEN-BFR-512"):
        weights.ensure("nope", tmp_path)


# Loading


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = pickled_code_checkpoint(tmp_path / "evil.pth", marker)
    with pytest.raises(UserError) as refused:
        weights.load_state_dict(path)
    assert str(refused.value) == (
        f"{path}: refused: it contains pickled code (io.open), not just tensors (weights_only load)"
    )
    assert not marker.exists()
    # The control: the payload is live, an unsafe load does run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "no such file"),
        (b"", "empty file"),
        (b"this is not a checkpoint\n", "not a readable PyTorch checkpoint"),
        ("truncated", "truncated or corrupt"),
        ("list", "not a state_dict (holds list, not tensors)"),
        ("mixed", "not a state_dict ('epoch' is not a tensor)"),
    ],
)
def test_unloadable_files_are_one_line_user_errors(content, reason, tmp_path, tiny_bytes):
    path = tmp_path / "model.pth"
    if content == "truncated":
        path.write_bytes(tiny_bytes[:1000])
    elif content == "list":
        torch.save([torch.zeros(1)], path)
    elif content == "mixed":
        torch.save({"weight": torch.zeros(1), "epoch": 3}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as failed:
        weights.load_state_dict(path)
    assert str(failed.value).startswith(f"{path}: ")
    assert reason in str(failed.value)
    assert "\n" not in str(failed.value)


def test_containers_and_module_prefix_are_unwrapped(tmp_path, tiny_state_dict):
    wrapped = {"g_ema": {f"module.{k}": v for k, v in tiny_state_dict.items()}, "d": {}}
    torch.save(wrapped, tmp_path / "train.pth")
    assert_tensors_equal(weights.load_state_dict(tmp_path / "train.pth"), tiny_state_dict)
    torch.save({"state_dict": tiny_state_dict}, tmp_path / "lightning.pth")
    assert_tensors_equal(weights.load_state_dict(tmp_path / "lightning.pth"), tiny_state_dict)


def test_load_gpen_matches_official_output(shared_dir):
    model = weights.load_gpen(shared_dir / "fixtures" / "gpen" / "tiny_state_dict.pt")
    io = torch.load(shared_dir / "fixtures" / "gpen" / "tiny_io.pt", weights_only=True)
    assert model.config == TINY_SPEC.config
    assert not model.training
    with torch.no_grad():
        out = model(io["input"])
    torch.testing.assert_close(out, io["output"], atol=1e-4, rtol=1e-4)


def test_load_gpen_rejects_other_architecture(mobilenet_path):
    with pytest.raises(UserError, match="not a GPEN generator state_dict"):
        weights.load_gpen(mobilenet_path)


def test_retinaface_structural_check_on_real_weights(mobilenet_path):
    weights.check(weights.MODELS["retinaface_mobile0.25"], mobilenet_path)
    with pytest.raises(UserError, match="not a retinaface_resnet50 checkpoint"):
        weights.check(weights.MODELS["retinaface_resnet50"], mobilenet_path)


def test_verify_describes_models(shared_dir, mobilenet_path, tmp_path):
    assert weights.verify(shared_dir / "fixtures" / "gpen" / "tiny_state_dict.pt") == (
        "GPEN size=64 style_dim=128 n_mlp=8 channel_multiplier=1 narrow=0.25, 3.5M parameters"
    )
    assert weights.verify(mobilenet_path) == (
        "RetinaFace mobile0.25, 0.4M parameters (retinaface_mobile0.25)"
    )
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="neither a GPEN generator nor a RetinaFace detector"):
        weights.verify(tmp_path / "other.pth")
