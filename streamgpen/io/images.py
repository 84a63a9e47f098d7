"""Still images in and out: any depth, alpha kept, EXIF orientation honoured, atomic writes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from streamgpen.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2"}
_JPEG_MAGIC = b"\xff\xd8"


@dataclass
class Photo:
    """A decoded still: ``color`` is HxWx3 BGR of the file's depth (uint8 or uint16).

    ``alpha`` (HxW, same dtype) and ``grayscale`` remember what to restore when writing back.
    """

    path: Path
    color: np.ndarray
    alpha: np.ndarray | None
    grayscale: bool

    @property
    def max_value(self) -> int:
        return int(np.iinfo(self.color.dtype).max)


def read_photo(path: Path) -> Photo:
    """Decode an image file; UserError with one clear line when it cannot be read."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if data.size == 0:
        raise UserError(f"{path}: empty file")
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
