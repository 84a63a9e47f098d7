"""Checkpoints that are wrong in ways a download check alone does not catch: NaN weights, a small
file declaring gigabytes, a GPEN size past the 1024 model, and the one-message report of every
missing file of a run; plus how a download ends (permissions, what a failure promises)."""

from __future__ import annotations

import io
import os
import re
import socket
import struct
import subprocess
import sys
import urllib.error
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import test_weights
import torch
from test_weights import MOBILENET, TINY_SPEC, unused_port

from streamgpen.errors import UserError
from streamgpen.models import gpen, weights
from streamgpen.models.gpen import GPENConfig, expected_shapes, infer_config

# A zip entry larger than this needs zip64 records, which the crafted writer below does not make.
ZIP32_MAX = (1 << 32) - 1
CHUNK = 1 << 24
# 255 x 16 MiB = 4.28 GB of zeros, declared by a file of 4.16 MB (measured).
BOMB_BYTES = 255 * CHUNK
SENTINEL_NUMEL = 1_000_003  # pickled as a BININT, replaced by the bomb's element count
# The download tests' real local HTTP server (a fixture).
server = test_weights.server


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch):
    for name in (weights.ENV_URL, weights.ENV_DIR):
        monkeypatch.delenv(name, raising=False)


def zeros_deflate(n: int, chunk: int = CHUNK) -> bytes:
    """A raw deflate stream of ``n`` zero bytes, made in milliseconds: one compressed chunk,
    ended by a full flush (byte-aligned, history reset, so copies of it concatenate), repeated,
    then an empty final block."""
    assert n % chunk == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (n // chunk) + b"\x03\x00"


def write_zip(path: Path, entries: list[tuple[str, bytes, int, int]]) -> None:
    """A zip of (name, data as stored, uncompressed size, method) entries, CRCs left 0 (torch
    inflates the whole entry before it could compare one)."""
    out, central = bytearray(), bytearray()
    for name, data, size, method in entries:
        encoded, offset = name.encode(), len(out)
        # method, time, date, crc, compressed size, size, name length, extra length
        common = struct.pack("<HHHIIIHH", method, 0, 0, 0, len(data), size, len(encoded), 0)
        out += struct.pack("<IHH", 0x04034B50, 20, 0) + common + encoded + data
        # version made by, needed, flags | common | comment, disk, attributes, offset
        central += struct.pack("<IHHH", 0x02014B50, 20, 20, 0) + common
        central += struct.pack("<HHHII", 0, 0, 0, 0, offset) + encoded
    count, directory = len(entries), len(out)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), directory, 0)
    path.write_bytes(bytes(out + central + end))


def bomb_checkpoint(path: Path, nbytes: int = BOMB_BYTES) -> Path:
    """A torch checkpoint of one float32 tensor of ``nbytes`` zeros, its storage deflated: the
    pickle and the zip directory both declare the full size, the file holds ~1/1000 of it."""
    assert nbytes <= ZIP32_MAX
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(SENTINEL_NUMEL)}, buffer)
    archive = zipfile.ZipFile(buffer)
    entries = []
    for info in archive.infolist():
        data = archive.read(info.filename)
        if info.filename.endswith("/data.pkl"):
            sentinel = b"J" + struct.pack("<i", SENTINEL_NUMEL)
            assert data.count(sentinel) == 2  # the storage's numel and the tensor's size
            data = data.replace(sentinel, b"J" + struct.pack("<i", nbytes // 4))
        if info.filename.endswith("/data/0"):
            entries.append((info.filename, zeros_deflate(nbytes), nbytes, zipfile.ZIP_DEFLATED))
        else:
            entries.append((info.filename, data, len(data), zipfile.ZIP_STORED))
    write_zip(path, entries)
    return path


PEAK_RSS = """
import resource, sys
from streamgpen.errors import UserError
from streamgpen.models import weights
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    weights.load_state_dict(sys.argv[1])
except UserError as e:
    print(e)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


# Declared sizes, checked before anything is inflated


def test_small_file_declaring_gigabytes_is_refused_before_loading(tmp_path):
    path = bomb_checkpoint(tmp_path / "bomb.pth")
    assert path.stat().st_size < 5_000_000
    run = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, check=True
    )
    message, grown = run.stdout.splitlines()
    assert message == (
        f"{path}: refused: it declares 4.3 GB of data, more than any model streamgpen runs "
        "(2.1 GB limit); a corrupt or hostile file"
    )
    # Measured (peak RSS over the imports): the old load (torch.load straight away) inflated and
    # returned the whole 1.07e9-element tensor, +4.28 GB; the refusal now costs +0 MB (under
    # ru_maxrss's 1 kB). The bound leaves room for allocator noise, 1/40 of the declared size.
    assert int(grown) < 100_000_000


def test_compressed_checkpoint_of_honest_size_still_loads(tmp_path, tiny_state_dict):
    # torch never writes compressed entries, but reads them; a re-zipped file stays loadable.
    torch.save(tiny_state_dict, tmp_path / "tiny.pth")
    with (
        zipfile.ZipFile(tmp_path / "tiny.pth") as source,
        zipfile.ZipFile(tmp_path / "zipped.pth", "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    loaded = weights.load_state_dict(tmp_path / "zipped.pth")
    assert all(torch.equal(loaded[k], v) for k, v in tiny_state_dict.items())


def test_unreadable_zip_directory_is_one_line(tmp_path, tiny_state_dict):
    torch.save(tiny_state_dict, tmp_path / "tiny.pth")
    data = (tmp_path / "tiny.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) - 30])  # the end-of-directory record
    with pytest.raises(UserError, match=r"cut\.pth: not a readable PyTorch checkpoint"):
        weights.load_state_dict(tmp_path / "cut.pth")


# NaN and infinity


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_everywhere(bad, tmp_path, tiny_state_dict):
    state = dict(tiny_state_dict)
    keys = list(state)
    first, later = keys[3], keys[-1]
    for key in (later, first):
        state[key] = state[key].clone()
        state[key].view(-1)[0] = bad
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    expected = f"{path}: {first} holds NaN or infinite values"
    for load in (
        weights.load_state_dict,
        weights.load_gpen,
        weights.verify,
        lambda p: weights.check(TINY_SPEC, p),
    ):
        with pytest.raises(UserError) as refused:
            load(path)
        assert str(refused.value).startswith(expected)
        assert "\n" not in str(refused.value)


def test_integer_buffers_are_not_checked_for_nan(tmp_path):
    torch.save({"bn.num_batches_tracked": torch.tensor(7), "w": torch.ones(2)}, tmp_path / "a.pth")
    assert set(weights.load_state_dict(tmp_path / "a.pth")) == {"bn.num_batches_tracked", "w"}


# One shape comparator


def test_one_shape_comparator_for_gpen_and_retinaface(tiny_state_dict, mobilenet_state):
    assert not hasattr(weights, "_compare_shapes")
    assert weights.compare_shapes is gpen.compare_shapes
    expected = {"a": (2, 3), "b": (4,)}
    assert gpen.compare_shapes(expected, {"a": torch.zeros(2, 3), "b": torch.zeros(4)}) is None
    assert gpen.compare_shapes(expected, {"a": torch.zeros(2, 3)}) == "1 missing keys, e.g. b"
    extra = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}
    assert gpen.compare_shapes(expected, extra) == "1 unexpected keys, e.g. c"
    wrong = {"a": torch.zeros(3, 2), "b": torch.zeros(4)}
    assert gpen.compare_shapes(expected, wrong) == "a has shape [3, 2], expected [2, 3]"
    # Both architectures' checks say it the same way.
    state = dict(tiny_state_dict, **{"final_linear.0.bias": torch.zeros(7)})
    assert weights.structure_problem(TINY_SPEC, state) == (
        "final_linear.0.bias has shape [7], expected [128]"
    )
    mobile = weights.MODELS["retinaface_mobile0.25"]
    state = dict(mobilenet_state, **{"ClassHead.0.conv1x1.bias": torch.zeros(7)})
    assert weights.structure_problem(mobile, state) == (
        "ClassHead.0.conv1x1.bias has shape [7], expected [4]"
    )


@pytest.fixture(scope="module")
def mobilenet_state(shared_dir) -> dict[str, torch.Tensor]:
    return weights.load_state_dict(shared_dir / "weights" / MOBILENET)


# GPEN-BFR-2048 and sizes past it


def test_a_2048_gpen_config_has_shapes_and_is_inferred():
    # Shapes only (meta tensors): the 2048 network itself would take 285 MB and seconds to build.
    config = GPENConfig(2048, style_dim=256, n_mlp=4, channel_multiplier=1, narrow=0.5)
    shapes = expected_shapes(config)
    assert shapes["ecd0.0.0.weight"] == (4, 3, 1, 1)  # 8 * channel_multiplier * narrow at 2048
    assert shapes["generator.to_rgbs.8.conv.weight"] == (1, 3, 8, 1, 1)  # the 2048 layer, 2x4 in
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    assert infer_config(state) == config


def test_a_gpen_size_past_the_channel_table_is_a_user_error(tmp_path):
    # Eleven encoder layers make a 4096 GPEN, which the channel table (to 2048) has no entry for.
    state = {f"ecd{i}.0.0.weight": torch.zeros(1) for i in range(11)}
    state |= {
        "final_linear.0.weight": torch.zeros(4, 4),
        "generator.input.input": torch.zeros(1, 4, 4, 4),
        "generator.convs.6.activate.bias": torch.zeros(4),
    }
    torch.save(state, tmp_path / "huge.pth")
    with pytest.raises(UserError, match="neither a GPEN generator nor a RetinaFace detector"):
        weights.verify(tmp_path / "huge.pth")
    with pytest.raises(UserError, match="not a GPEN generator state_dict"):
        weights.load_gpen(tmp_path / "huge.pth")


# Every missing file of a run, in one message


def test_missing_weights_lists_every_missing_file_at_once(tmp_path):
    (tmp_path / MOBILENET).write_bytes(b"present")
    names = ["GPEN-BFR-512", "retinaface_resnet50", "retinaface_mobile0.25", "GPEN-BFR-512"]
    message = weights.missing_weights(names, tmp_path)
    assert message is not None and "\n" not in message
    assert message.startswith(f"2 model file(s) missing from {tmp_path} ")
    for name in ("GPEN-BFR-512", "retinaface_resnet50"):
        spec = weights.MODELS[name]
        assert f"{spec.filename} from {spec.url}" in message
    assert MOBILENET not in message.split("; or use")[0]
    assert "--weights-dir" in message and weights.ENV_DIR in message
    assert "`streamgpen weights list`" in message
    assert "--detector retinaface_mobile0.25" in message


def test_missing_weights_none_missing_and_hand_placed_files(tmp_path, monkeypatch):
    (tmp_path / MOBILENET).write_bytes(b"present")
    assert weights.missing_weights(["retinaface_mobile0.25"], tmp_path) is None
    message = weights.missing_weights(["GPEN-BFR-2048", "retinaface_mobile0.25"], tmp_path)
    assert "GPEN-BFR-2048.pth from https://modelscope.cn/" in message
    assert "--detector" not in message  # the mobilenet detector is the one present
    monkeypatch.setenv(weights.ENV_URL, "http://mirror.example/w")
    message = weights.missing_weights(["GPEN-BFR-256"], tmp_path)
    assert "GPEN-BFR-256.pth from http://mirror.example/w/GPEN-BFR-256.pth" in message


# How a download ends


def test_installed_download_has_normal_permissions(server, tiny_bytes, tmp_path):
    # A partial file from an earlier run under a stricter umask (or copied in by hand) used to
    # keep its 0600 through the final rename.
    server.files[TINY_SPEC.filename] = tiny_bytes
    part = tmp_path / f"{TINY_SPEC.filename}.part"
    part.write_bytes(tiny_bytes)
    part.chmod(0o600)
    old = os.umask(0o022)
    try:
        path = weights.download(TINY_SPEC, tmp_path, base_url=server.base_url, progress=False)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_no_resume_promised_when_the_host_never_answered(tmp_path, monkeypatch):
    # A partial file from an earlier attempt, then no network at all: nothing is being resumed.
    (tmp_path / f"{TINY_SPEC.filename}.part").write_bytes(b"x" * 100)

    def no_dns(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(weights.urllib.request, "urlopen", no_dns)
    with pytest.raises(UserError) as failed:
        weights.download(TINY_SPEC, tmp_path, base_url="http://nowhere.invalid", progress=False)
    message = str(failed.value)
    assert "Name or service not known" in message
    assert "resumed" not in message and "check the network" in message
    assert str(tmp_path) in message


def test_no_resume_promised_without_a_partial_file(tmp_path):
    base_url = f"http://127.0.0.1:{unused_port()}"
    with pytest.raises(UserError) as failed:
        weights.download(TINY_SPEC, tmp_path, base_url=base_url, progress=False)
    assert "resumed" not in str(failed.value)


def test_dropped_transfer_promises_the_resume(server, tiny_bytes, tmp_path):
    server.files[TINY_SPEC.filename] = tiny_bytes
    server.cut_after = 1000
    with pytest.raises(UserError, match=re.escape("try again (the partial download is resumed)")):
        weights.download(TINY_SPEC, tmp_path, base_url=server.base_url, progress=False)


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_obeys_the_keyword(progress, server, tiny_bytes, tmp_path, monkeypatch, capfd):
    url = f"{server.base_url}/{TINY_SPEC.filename}"
    monkeypatch.setitem(weights.MODELS, TINY_SPEC.name, replace(TINY_SPEC, url=url))
    server.files[TINY_SPEC.filename] = tiny_bytes
    weights.ensure(TINY_SPEC.name, tmp_path, progress=progress)
    notice, bar = capfd.readouterr().err.split("\n", 1)
    assert f"downloading {url}" in notice
    # rich draws the bar's last state on stderr when it stops (no terminal here): the file name.
    assert (TINY_SPEC.filename in bar) == progress


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory, tiny_state_dict) -> bytes:
    path = tmp_path_factory.mktemp("tiny") / "tiny.pth"
    torch.save(tiny_state_dict, path)
    return path.read_bytes()
