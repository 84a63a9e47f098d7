"""The model files streamgpen knows: where they live, how they are fetched, checked and loaded.

Every checkpoint is read with ``torch.load(..., weights_only=True)``: a file that carries pickled
code instead of plain tensors is refused before any of it can run. A download is checked
(structure, and sha256 where known) before it takes its final name, so a file in the weights
directory under a model's name was either checked on arrival or put there by hand. Every load,
hand-placed files' included, refuses a file that declares more tensor bytes than any model
streamgpen runs (read from the zip directory, before anything is inflated) and one whose tensors
hold NaN or infinity.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from http.client import HTTPException
from pathlib import Path
from typing import Literal

import torch

from streamgpen import __version__
from streamgpen.errors import UserError
from streamgpen.files import cache_dir, place
from streamgpen.models.gpen import GPEN, GPENConfig, compare_shapes, infer_config, shape_mismatch
from streamgpen.progress import download_bar

GPEN_URL = "https://public-vigen-video.oss-cn-shanghai.aliyuncs.com/robin/models/{}"
FACEXLIB_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/{}"
FACEXLIB_PARSING_URL = "https://github.com/xinntao/facexlib/releases/download/{}"
REAL_ESRGAN_URL = "https://github.com/xinntao/Real-ESRGAN/releases/download/{}"
# The GPEN authors publish their high-resolution models ("for selfies") on ModelScope only.
MODELSCOPE_GPEN_HIRES_URL = (
    "https://modelscope.cn/api/v1/models/damo/cv_gpen_image-portrait-enhancement-hires/repo"
    "?Revision=master&FilePath={}"
)
ENV_DIR = "STREAMGPEN_WEIGHTS"
ENV_URL = "STREAMGPEN_WEIGHTS_URL"
CHUNK = 1 << 16
TIMEOUT_S = 30
# Training checkpoints that wrap the generator's state_dict: GPEN's own training script saves
# {'g': ..., 'd': ..., 'g_ema': ...} (g_ema is the generator to use); Lightning saves 'state_dict';
# basicsr (Real-ESRGAN's releases) saves {'params_ema': ...} or {'params': ...}, the EMA first as
# Real-ESRGAN's own loader prefers it.
CONTAINER_KEYS = ("g_ema", "params_ema", "params", "state_dict")
# The most tensor bytes a checkpoint may declare. The largest released model, GPEN-BFR-1024, holds
# 285 MB (fp32); a GPEN-512 training checkpoint (g, g_ema, discriminator and both Adam states) is
# about 1.5 GB by the same count. 2 GiB admits those and refuses a small compressed file that
# would inflate to gigabytes before torch.load could look at it.
MAX_CHECKPOINT_BYTES = 2 << 30
_ZIP_MAGIC = b"PK\x03\x04"  # torch.load's own test for its zip format


@dataclass(frozen=True)
class ModelSpec:
    """A model file streamgpen knows by name.

    ``url`` is where the file is downloaded from (its authors' release). ``config`` is set for
    GPEN models; ``network_name`` names the architecture of the others: facexlib's RetinaFace
    network, ``parsenet``/``bisenet`` for face parsing, spandrel's ``RRDBNet``/``SRVGGNetCompact``
    for super-resolution, whose ``scale`` is set too.
    """

    name: str
    kind: Literal["gpen", "retinaface", "parse", "sr"]
    filename: str
    url: str
    config: GPENConfig | None = None
    network_name: str | None = None
    sha256: str | None = None
    scale: int | None = None


def _gpen(name: str, config: GPENConfig) -> ModelSpec:
    filename = f"{name}.pth"
    return ModelSpec(name, "gpen", filename, GPEN_URL.format(filename), config=config)


def _gpen_hires(name: str, config: GPENConfig, modelscope_file: str) -> ModelSpec:
    # Kept under our name (GPEN-BFR-2048.pth), fetched from ModelScope's file name.
    url = MODELSCOPE_GPEN_HIRES_URL.format(modelscope_file)
    return ModelSpec(name, "gpen", f"{name}.pth", url, config=config)


def _parsing(network_name: str, release: str) -> ModelSpec:
    filename = f"parsing_{network_name}.pth"
    url = FACEXLIB_PARSING_URL.format(f"{release}/{filename}")
    return ModelSpec(network_name, "parse", filename, url, network_name=network_name)


def _real_esrgan(name: str, release: str, network_name: str, scale: int) -> ModelSpec:
    filename = f"{name}.pth"
    url = REAL_ESRGAN_URL.format(f"{release}/{filename}")
    return ModelSpec(name, "sr", filename, url, network_name=network_name, scale=scale)


def _retinaface(network_name: str, filename: str, sha256: str | None = None) -> ModelSpec:
    return ModelSpec(
        f"retinaface_{network_name}",
        "retinaface",
        filename,
        FACEXLIB_URL.format(filename),
        network_name=network_name,
        sha256=sha256,
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _gpen("GPEN-BFR-512", GPENConfig(512, channel_multiplier=2, narrow=1)),
        _gpen("GPEN-BFR-256", GPENConfig(256, channel_multiplier=1, narrow=0.5)),
        _gpen_hires(
            "GPEN-BFR-1024", GPENConfig(1024, channel_multiplier=2, narrow=1), "pytorch_model.pt"
        ),
        _gpen_hires(
            "GPEN-BFR-2048",
            GPENConfig(2048, channel_multiplier=2, narrow=1),
            "pytorch_model-2048.pt",
        ),
        _parsing("parsenet", "v0.2.2"),
        _parsing("bisenet", "v0.2.0"),
        _real_esrgan("RealESRGAN_x2plus", "v0.2.1", "RRDBNet", 2),
        _real_esrgan("RealESRGAN_x4plus", "v0.1.0", "RRDBNet", 4),
        _real_esrgan("realesr-general-x4v3", "v0.2.5.0", "SRVGGNetCompact", 4),
        _retinaface("resnet50", "detection_Resnet50_Final.pth"),
        _retinaface(
            "mobile0.25",
            "detection_mobilenet0.25_Final.pth",
            "38ec7bb3c9cbfe2f40edabc05fab970a6d648747cbc534092be85d5eb9b37ed0",
        ),
    )
}


def weights_dir(option: Path | None = None) -> Path:
    """The directory model files are looked up in and downloaded to.

    In order of precedence: ``option`` (the CLI's ``--weights-dir``), the environment variable
    ``STREAMGPEN_WEIGHTS``, then ``$XDG_CACHE_HOME/streamgpen/weights`` (``XDG_CACHE_HOME``
    defaulting to ``~/.cache``).
    """
    if option is not None:
        return Path(option).expanduser()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    return cache_dir("weights")


def get_spec(name: str) -> ModelSpec:
    """The registry entry called ``name``; UserError listing the known names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def source_url(spec: ModelSpec, base_url: str | None = None) -> str:
    """Where ``spec`` is downloaded from: ``base_url`` or ``$STREAMGPEN_WEIGHTS_URL`` (a mirror
    serving every file under its file name) when given, else the official URL."""
    base = base_url or os.environ.get(ENV_URL)
    if base:
        return f"{base.rstrip('/')}/{spec.filename}"
    return spec.url


def missing_message(spec: ModelSpec, directory: Path, url: str) -> str:
    """One line telling the user which file is missing, where to put it and where to get it."""
    return f"{spec.filename} is not in {directory}: download it from {url} into {directory}"


def missing_weights(names: list[str], directory: Path) -> str | None:
    """One line naming every file of the models ``names`` that ``directory`` lacks, or None.

    Each file comes with its download URL; the line says where the files go (``directory``, or
    another one given by ``--weights-dir`` or ``STREAMGPEN_WEIGHTS``), points at ``streamgpen
    weights list``, and offers the small mobilenet detector when the ResNet-50 one is missing: a
    machine without network is prepared in one go, not one failure per file.
    """
    directory = Path(directory)
    specs = [get_spec(name) for name in dict.fromkeys(names)]
    missing = [spec for spec in specs if not (directory / spec.filename).is_file()]
    if not missing:
        return None
    files = "; ".join(_where_to_get(spec) for spec in missing)
    message = (
        f"{len(missing)} model file(s) missing from {directory} (put them there, or give the "
        f"directory holding them with --weights-dir or {ENV_DIR}): {files}; "
        "`streamgpen weights list` shows every model and its URL"
    )
    if any(spec.name == "retinaface_resnet50" for spec in missing):
        mobile = MODELS["retinaface_mobile0.25"]
        message += (
            f"; or use the smaller detector, --detector {mobile.name} ({mobile.filename}, 1.7 MB)"
        )
    return message


def _where_to_get(spec: ModelSpec) -> str:
    return f"{spec.filename} from {source_url(spec)}"


def ensure(
    name: str, directory: Path, *, download_missing: bool = True, progress: bool = True
) -> Path:
    """The path of model ``name``'s file in ``directory``, downloading it if it is missing.

    Raises UserError (naming the file, the directory and the URL) when the file is missing and
    cannot be downloaded: ``download_missing`` False, or a network failure.
    """
    spec = get_spec(name)
    path = Path(directory) / spec.filename
    if path.is_file():
        return path
    url = source_url(spec)
    if not download_missing:
        raise UserError(missing_message(spec, Path(directory), url))
    print(f"streamgpen: {spec.filename} is not in {directory}; downloading {url}", file=sys.stderr)
    return download(spec, Path(directory), progress=progress)


def download(
    spec: ModelSpec, directory: Path, *, base_url: str | None = None, progress: bool = True
) -> Path:
    """Download ``spec``'s file into ``directory``, check it, and return its final path.

    The transfer goes to ``NAME.part``, which is kept when the transfer fails and resumed
    (HTTP Range) on the next call. The complete file is checked (keys and shapes against the
    model's architecture, sha256 when known) and only then renamed to ``NAME``; a file that
    fails the check is deleted. Raises UserError on network errors and bad files.
    """
    url = source_url(spec, base_url)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / spec.filename
    part = final.with_name(final.name + ".part")
    try:
        _fetch(url, part, spec.filename, progress)
    except (OSError, HTTPException) as e:
        raise UserError(_download_failed(spec, url, directory, part, e)) from None
    try:
        check(spec, part)
    except UserError as e:
        part.unlink(missing_ok=True)
        raise UserError(
            f"{spec.filename} downloaded from {url} was rejected and deleted: {e}"
        ) from None
    place(part, final)
    return final


def _download_failed(
    spec: ModelSpec, url: str, directory: Path, part: Path, error: BaseException
) -> str:
    """The line for a failed download: resuming is promised only when there is something to
    resume, a partial file left by a transfer that dropped (not a host that never answered)."""
    # urlopen wraps every failure to connect (name resolution, refused, HTTP status) in URLError;
    # what fails after the response began (a reset, a timeout, a short body) is not one.
    dropped = not isinstance(error, urllib.error.URLError)
    if dropped and part.is_file() and part.stat().st_size > 0:
        retry = "try again (the partial download is resumed)"
    elif isinstance(error, urllib.error.HTTPError):
        retry = "try again later"
    else:
        retry = "check the network and try again"
    return (
        f"could not download {spec.filename} from {url} ({_reason(error)}); {retry} "
        f"or download it by hand into {directory}"
    )


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def _open(url: str, offset: int):
    request = urllib.request.Request(url, headers={"User-Agent": f"streamgpen/{__version__}"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(request, timeout=TIMEOUT_S)


def _fetch(url: str, part: Path, label: str, progress: bool) -> None:
    """Complete ``part`` from ``url``, appending to what an earlier attempt left there."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Nothing left to send: an earlier attempt got every byte; the check will tell.
            return
        raise
    with response:
        if response.status == 206 and _range_start(response) == offset:
            mode = "ab"
        else:
            # The server ignored (or garbled) the Range request and sends the whole file.
            mode, offset = "wb", 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with part.open(mode) as out, download_bar(disable=not progress) as bar:
            task = bar.add_task(label, total=total, completed=offset)
            received = offset
            while chunk := response.read(CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(task, completed=received)
    if total is not None and received < total:
        # urllib returns a short body silently when the connection drops.
        raise ConnectionError(f"connection closed after {received} of {total} bytes")


def _range_start(response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def sha256_file(path: Path) -> str:
    """The hex sha256 digest of the file at ``path``."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check(spec: ModelSpec, path: Path) -> None:
    """Raise UserError unless ``path`` holds ``spec``'s model: keys, shapes and sha256."""
    load_checked(spec, path)
    if spec.sha256:
        digest = sha256_file(path)
        if digest != spec.sha256:
            raise UserError(f"{path}: sha256 {digest}, expected {spec.sha256}")


def load_checked(spec: ModelSpec, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint at ``path`` (:func:`load_state_dict`), once their keys and
    shapes are those of ``spec``'s architecture; UserError, one line, otherwise."""
    state_dict = load_state_dict(path)
    problem = structure_problem(spec, state_dict)
    if problem:
        raise UserError(f"{path}: not a {spec.name} checkpoint ({problem})")
    return state_dict


def load_retinaface(path: Path, network_name: str) -> dict[str, torch.Tensor]:
    """The state_dict of facexlib's RetinaFace ``network_name`` from ``path``, checked.

    A missing, corrupt, truncated, pickled-code or other-architecture file is one UserError line
    naming the file and the file to put in its place (and where to download it).
    """
    spec = get_spec(f"retinaface_{network_name}")
    try:
        return load_checked(spec, path)
    except UserError as e:
        url = source_url(spec)
        where = f" (download it from {url})" if url else ""
        raise UserError(f"{e}; replace it with {spec.filename}{where}") from None


def structure_problem(spec: ModelSpec, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """How ``state_dict`` differs from ``spec``'s architecture (one line), or None."""
    if spec.kind == "gpen":
        return shape_mismatch(spec.config, state_dict)
    if spec.kind == "parse":
        from streamgpen.faces.parse import parser_problem

        return parser_problem(spec, state_dict)
    if spec.kind == "sr":
        from streamgpen.runtime.upsampler import upsampler_problem

        return upsampler_problem(spec, state_dict)
    return compare_shapes(retinaface_shapes(spec.network_name), state_dict)


@cache
def retinaface_shapes(network_name: str) -> dict[str, tuple[int, ...]]:
    """Every state_dict key and shape of facexlib's RetinaFace ``network_name`` detector.

    Built on the meta device: no memory, no weights, and no facexlib download.
    """
    from facexlib.detection.retinaface import RetinaFace

    with warnings.catch_warnings(), torch.device("meta"):
        # torchvision warns about facexlib's `resnet50(pretrained=False)`; not ours to fix.
        warnings.simplefilter("ignore", UserWarning)
        model = RetinaFace(
            network_name=network_name, half=False, phase="test", device=torch.device("meta")
        )
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors in the checkpoint at ``path``, read with ``weights_only=True``, on the CPU.

    A GPEN training checkpoint's ``g_ema`` (or a ``state_dict`` entry) is unwrapped and a
    ``module.`` prefix (from DataParallel) is stripped. Raises UserError, one line, for a missing,
    empty, truncated or foreign file, for one that carries pickled code (which never runs), for one
    that declares more than :data:`MAX_CHECKPOINT_BYTES` (refused before anything is inflated) and
    for one whose floating-point tensors hold NaN or infinity.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file")
    declared = _declared_bytes(path)
    if declared > MAX_CHECKPOINT_BYTES:
        raise UserError(
            f"{path}: refused: it declares {declared / 1e9:.1f} GB of data, more than any "
            f"model streamgpen runs ({MAX_CHECKPOINT_BYTES / 1e9:.1f} GB limit); a corrupt or "
            "hostile file"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(_unpickling_message(path, e)) from None
    except Exception:
        # On arbitrary bytes torch.load fails in many ways (RuntimeError, EOFError, KeyError,
        # IndexError, ...); under weights_only none of them ran code from the file.
        raise UserError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt)"
        ) from None
    state_dict = _tensors(path, _unwrap(obj))
    _require_finite(path, state_dict)
    return state_dict


def _declared_bytes(path: Path) -> int:
    """The most memory loading ``path`` can take, known without inflating anything.

    torch's zip format: the sum of its entries' uncompressed sizes, from the zip directory (torch
    stores entries, but its reader inflates compressed ones too, into a buffer of the declared
    size). The legacy format (not a zip) reads its storages as stored: the file's size.
    """
    with path.open("rb") as f:
        if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            return path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError):
        raise UserError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt)"
        ) from None


def _require_finite(path: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """A NaN or infinite weight turns every face it touches into a flat square: refuse the file."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(
                f"{path}: {key} holds NaN or infinite values (a corrupt or diverged checkpoint); "
                "replace the file"
            )


def _unpickling_message(path: Path, error: pickle.UnpicklingError) -> str:
    # The weights_only unpickler names the global it refused; anything else is not a pickle.
    context = f"{error} {error.__context__ or ''}"
    found = re.search(r"GLOBAL ([\w.]+)", context)
    if found:
        return (
            f"{path}: refused: it contains pickled code ({found.group(1)}), not just tensors "
            "(weights_only load)"
        )
    return f"{path}: not a PyTorch checkpoint (unreadable pickle data)"


def _unwrap(obj):
    for key in CONTAINER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def _tensors(path: Path, obj) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"{path}: not a state_dict (holds {type(obj).__name__}, not tensors)")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise UserError(f"{path}: not a state_dict ({bad!r} is not a tensor)")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def load_gpen(path: Path, device: str | torch.device = "cpu") -> GPEN:
    """The GPEN in the checkpoint at ``path``, its config read from the tensors' shapes, in eval
    mode on ``device`` (float32). Raises UserError when the file is not a GPEN generator's."""
    state_dict = load_state_dict(path)
    try:
        config = _gpen_config(state_dict)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    # infer_config has checked every key and shape, so building on the meta device and taking
    # the file's tensors as they are is safe, and skips initialising weights only to overwrite them.
    with torch.device("meta"):
        model = GPEN.from_config(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=torch.float32).eval()


def verify(path: Path) -> str:
    """A one-line description of the model in the checkpoint at ``path``.

    E.g. ``GPEN size=512 style_dim=512 n_mlp=8 channel_multiplier=2 narrow=1, 71.0M parameters
    (GPEN-BFR-512)`` or ``RetinaFace mobile0.25, 0.4M parameters (retinaface_mobile0.25)``.
    Raises UserError when it is neither a GPEN nor a RetinaFace the registry knows.
    """
    state_dict = load_state_dict(path)
    try:
        config = _gpen_config(state_dict)
    except ValueError as e:
        gpen_problem = str(e)
    else:
        return _describe_gpen(config)
    for spec in MODELS.values():
        if spec.kind == "retinaface" and not structure_problem(spec, state_dict):
            millions = _parameter_count(state_dict) / 1e6
            return f"RetinaFace {spec.network_name}, {millions:.1f}M parameters ({spec.name})"
    raise UserError(f"{path}: neither a GPEN generator nor a RetinaFace detector ({gpen_problem})")


def _gpen_config(state_dict: Mapping[str, torch.Tensor]) -> GPENConfig:
    """:func:`infer_config`, every way it fails a ValueError."""
    try:
        return infer_config(state_dict)
    except (KeyError, IndexError, ZeroDivisionError) as e:
        # infer_config lets these out of dicts that look half like a GPEN's: a size past the
        # channel table (4096), no 64x64 layer, a zero-width input.
        reason = f"{type(e).__name__} {e}"
        raise ValueError(f"not a GPEN generator state_dict ({reason})") from None


def _describe_gpen(config: GPENConfig) -> str:
    with torch.device("meta"):
        n = sum(p.numel() for p in GPEN.from_config(config).parameters())
    fields = " ".join(f"{k}={v}" for k, v in config.as_dict().items())
    known = [s.name for s in MODELS.values() if s.config == config]
    suffix = f" ({known[0]})" if known else ""
    return f"GPEN {fields}, {n / 1e6:.1f}M parameters{suffix}"


def _parameter_count(state_dict: Mapping[str, torch.Tensor]) -> int:
    # BatchNorm running statistics are buffers, not parameters.
    return sum(
        v.numel()
        for k, v in state_dict.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
