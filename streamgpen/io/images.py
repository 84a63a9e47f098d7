"""Still images in and out: any depth, alpha kept, EXIF orientation honoured, atomic writes.

On a CUDA device, ordinary JPEGs are decoded there by torchvision (nvJPEG); everything else by
cv2 on the host.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch

from streamgpen.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2"}
_JPEG_MAGIC = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
# Per reader thread: its CUDA stream for decoding.
_thread = threading.local()
# Start-of-frame markers of baseline and progressive (Huffman) JPEGs: the kinds nvJPEG documents
# decoding. Extended, lossless, hierarchical and arithmetic-coded ones are left to cv2.
_DEVICE_FRAMES = {0xC0, 0xC2}
# EXIF orientation -> (transpose?, dims to flip) that turn stored [C, H, W] pixels upright.
_UPRIGHT = {
    1: (False, ()),
    2: (False, (2,)),
    3: (False, (1, 2)),
    4: (False, (1,)),
    5: (True, ()),
    6: (True, (2,)),
    7: (True, (1, 2)),
    8: (True, (1,)),
}


@dataclass
class Photo:
    """A decoded still: ``color`` is HxWx3 BGR of the file's depth (uint8 or uint16), or, when
    torchvision decoded it (:func:`decode_photo`), a [3, H, W] uint8 RGB tensor on the device.

    ``alpha`` (HxW, same dtype) and ``grayscale`` remember what to restore when writing back.
    """

    path: Path
    color: np.ndarray | torch.Tensor
    alpha: np.ndarray | None
    grayscale: bool

    @property
    def max_value(self) -> int:
        if isinstance(self.color, torch.Tensor):
            return int(torch.iinfo(self.color.dtype).max)
        return int(np.iinfo(self.color.dtype).max)


def read_photo(path: Path) -> Photo:
    """Decode an image file with cv2; UserError with one clear line when it cannot be read."""
    return _decode_cv2(path, _read_bytes(path))


def decode_photo(path: Path, device: torch.device, on_device: bool | None = None) -> Photo:
    """Decode an image file for enhancement on ``device``, choosing the decoder by this rule.

    torchvision decodes the file straight into a tensor on ``device`` (nvJPEG on CUDA) when
    ``on_device`` holds (by default: when ``device`` is CUDA; the tests force it on the CPU) and
    the file is a complete (ends with the EOI marker) 8-bit baseline or progressive JPEG whose 1
    or 3 components are gray or YCbCr. Every other file (other formats; CMYK, YCCK, RGB-coded,
    12-bit, extended, arithmetic-coded or lossless JPEGs; data after EOI) and any failure of that
    decode go to cv2 (:func:`read_photo`): same pixels, same errors as before.
    """
    data = _read_bytes(path)
    if on_device is None:
        on_device = device.type == "cuda"
    header = _jpeg_header(data.tobytes()) if on_device else None
    if (
        header is not None
        and header.frame in _DEVICE_FRAMES
        and header.precision == 8
        and header.components in (1, 3)
        and not header.rgb
        and header.complete
    ):
        try:
            return _decode_jpeg_tensor(path, data, header, device)
        except RuntimeError:
            pass  # cv2 decodes it, or reports why it cannot, exactly as it always has
    return _decode_cv2(path, data)


def _read_bytes(path: Path) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if data.size == 0:
        raise UserError(f"{path}: empty file")
    return data


def _decode_cv2(path: Path, data: np.ndarray) -> Photo:
    # JPEGs carry no alpha but often an EXIF orientation, which IMREAD_UNCHANGED would ignore;
    # ANYCOLOR also converts CMYK JPEGs to BGR.
    if data[:2].tobytes() == _JPEG_MAGIC:
        flags = cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH
    else:
        flags = cv2.IMREAD_UNCHANGED
    image = cv2.imdecode(data, flags)
    if image is None or image.size == 0:
        raise UserError(f"{path}: not a readable image (corrupt, truncated or unsupported format)")
    return _split_channels(path, image)


def _decode_jpeg_tensor(
    path: Path, data: np.ndarray, header: _JpegHeader, device: torch.device
) -> Photo:
    try:
        # Deprecated since torchvision 0.29 (superseded by TorchCodec's decoders): a torchvision
        # without it leaves every photo to cv2.
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as e:
        raise RuntimeError("torchvision cannot decode JPEGs") from e
    gray = header.components == 1
    mode = ImageReadMode.UNCHANGED if gray else ImageReadMode.RGB
    # Reader threads decode while the main thread's kernels run on the default stream; nvJPEG
    # could write into memory those kernels still read (pytorch/vision#9606) unless it allocates
    # from a stream of its own, synchronised before the image is handed over.
    stream = _decoding_stream(device)
    with torch.cuda.stream(stream):
        image = decode_jpeg(torch.from_numpy(data), mode=mode, device=device)  # [1 or 3, H, W]
        # torchvision applies EXIF orientation only on the CPU (not with nvJPEG), so it is
        # applied here, on every device alike.
        transpose, flips = _UPRIGHT[header.orientation]
        if transpose:
            image = image.transpose(1, 2)
        if flips:
            image = image.flip(flips)
        image = image.contiguous().expand(3, -1, -1)
    if stream is not None:
        stream.synchronize()
    return Photo(path, image, None, grayscale=gray)


def _decoding_stream(device: torch.device) -> torch.cuda.Stream | None:
    """This thread's stream for decoding on ``device``, made once (None off CUDA)."""
    if device.type != "cuda":
        return None
    streams = _thread.__dict__.setdefault("streams", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


class _JpegHeader(NamedTuple):
    frame: int  # the start-of-frame marker (0xC0 baseline, 0xC2 progressive, ...)
    precision: int  # bits per sample
    components: int  # 1 gray; 3 YCbCr or RGB; 4 CMYK or YCCK
    rgb: bool  # 3 components stored as RGB (Adobe transform 0, or ids "RGB"), not YCbCr
    orientation: int  # EXIF orientation, 1 (as stored) to 8
    complete: bool  # the data ends with the end-of-image marker (not truncated)


def _jpeg_header(data: bytes) -> _JpegHeader | None:
    """The markers of a JPEG up to its frame header; None if there is none to read."""
    if not data.startswith(_JPEG_MAGIC):
        return None
    pos, orientation, adobe_transform = 2, 1, None
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\0\0"):
            orientation = _exif_orientation(segment[6:])
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            adobe_transform = segment[11]
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # not DHT, JPG, DAC
            if len(segment) < 6 or len(segment) < 6 + 3 * segment[5]:
                return None
            components = segment[5]
            ids = bytes(segment[6 + 3 * i] for i in range(components))
            rgb = adobe_transform == 0 or ids == b"RGB"
            complete = data.endswith(_JPEG_END)
            return _JpegHeader(marker, segment[0], components, rgb, orientation, complete)
        pos += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of an EXIF block's first IFD; 1 when absent or invalid."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None:
        return 1

    def number(at: int, size: int) -> int:
        return int.from_bytes(tiff[at : at + size], order)

    ifd = number(4, 4)
    for entry in range(ifd + 2, ifd + 2 + 12 * number(ifd, 2), 12):
        if entry + 12 > len(tiff):
            break
        if number(entry, 2) == 0x0112:
            value = number(entry + 8, 2)
            return value if value in _UPRIGHT else 1
    return 1


def _split_channels(path: Path, image: np.ndarray) -> Photo:
    if image.dtype not in (np.uint8, np.uint16):
        # float/32-bit TIFFs: scale into 16 bits rather than refuse them
        image = np.clip(image.astype(np.float64), 0, 1 if image.dtype.kind == "f" else None)
        scale = 65535 if image.max() <= 1 else 65535 / max(float(image.max()), 1.0)
        image = (image * scale).round().astype(np.uint16)
    if image.ndim == 2:
        return Photo(path, cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), None, grayscale=True)
    channels = image.shape[2]
    if channels == 1:
        return Photo(path, cv2.cvtColor(image[..., 0], cv2.COLOR_GRAY2BGR), None, True)
    if channels == 2:
        color = cv2.cvtColor(np.ascontiguousarray(image[..., 0]), cv2.COLOR_GRAY2BGR)
        return Photo(path, color, np.ascontiguousarray(image[..., 1]), True)
    if channels == 4:
        return Photo(path, np.ascontiguousarray(image[..., :3]), image[..., 3].copy(), False)
    return Photo(path, image, None, grayscale=False)


def merge_channels(photo: Photo, color: np.ndarray) -> np.ndarray:
    """The array to write for ``photo`` with its colour replaced: gray and alpha as they were."""
    if photo.grayscale:
        out = cv2.cvtColor(color, cv2.COLOR_BGR2GRAY)
        return out if photo.alpha is None else np.dstack([out, photo.alpha])
    return color if photo.alpha is None else np.dstack([color, photo.alpha])


def write_image(path: Path, image: np.ndarray, params: list[int] | None = None) -> None:
    """Encode ``image`` by ``path``'s extension under a temporary name, then rename into place."""
    ext = path.suffix.lower() or ".png"
    ok, encoded = cv2.imencode(ext, image, params or [])
    if not ok:
        raise UserError(f"{path}: cannot encode a {image.dtype} image as {ext}")
    with atomic_path(path) as tmp:
        encoded.tofile(tmp)


def copy_file(src: Path, dst: Path) -> None:
    """Copy bytes for bytes (an image left unchanged), atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


class atomic_path:  # lower case: used like open()
    """Context manager yielding a temporary path beside ``path``, renamed onto it on success."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent
            )
        except OSError as e:
            raise UserError(f"{self.path}: cannot write ({e.strerror or e})") from None
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def iter_folder(root: Path) -> Iterator[Path]:
    """Image files below ``root`` (recursively, sorted), by extension."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and is_image_path(path) and not path.name.startswith("."):
            yield path
