"""Still images in and out: any depth, alpha kept, EXIF orientation honoured, atomic writes.

On a CUDA device, ordinary JPEGs are decoded there by torchvision (nvJPEG); everything else by
cv2 on the host. Before either decodes, the image's size is read from its header (PNG, JPEG,
WebP, TIFF, BMP, GIF, JPEG 2000): a small file that would decode to gigabytes is refused first.
"""

from __future__ import annotations

import shutil
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch

from streamgpen.errors import UserError
from streamgpen.files import atomic_path, is_temp_name

# The most pixels a photo may have: Pillow's decompression-bomb error threshold (2 * its
# MAX_IMAGE_PIXELS). 179 Mpx of 16-bit BGR is 1 GB before any processing; a 20000x20000 PNG of
# 1.2 MB took 11.3 GB of memory on its way through the photo pipeline. Formats whose header is
# not read here are left to cv2's own guard (OPENCV_IO_MAX_IMAGE_PIXELS, 2^30 by default).
MAX_PIXELS = 178_956_970
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


def read_photo(path: Path, *, max_pixels: int = MAX_PIXELS) -> Photo:
    """Decode an image file with cv2; UserError with one clear line when it cannot be read or
    its header declares more than ``max_pixels`` pixels (checked before decoding)."""
    return _decode_cv2(path, _read_bytes(path, max_pixels))


def decode_photo(
    path: Path,
    device: torch.device,
    on_device: bool | None = None,
    *,
    max_pixels: int = MAX_PIXELS,
) -> Photo:
    """Decode an image file for enhancement on ``device``, choosing the decoder by this rule.

    torchvision decodes the file straight into a tensor on ``device`` (nvJPEG on CUDA) when
    ``on_device`` holds (by default: when ``device`` is CUDA; the tests force it on the CPU) and
    the file is a complete (ends with the EOI marker) 8-bit baseline or progressive JPEG whose 1
    or 3 components are gray or YCbCr. Every other file (other formats; CMYK, YCCK, RGB-coded,
    12-bit, extended, arithmetic-coded or lossless JPEGs; data after EOI) and any failure of that
    decode go to cv2 (:func:`read_photo`): same pixels, same errors as before. An image whose
    header declares more than ``max_pixels`` pixels is refused before either decoder runs.
    """
    data = _read_bytes(path, max_pixels)
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


def _read_bytes(path: Path, max_pixels: int) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if data.size == 0:
        raise UserError(f"{path}: empty file")
    # The whole file: a TIFF's first directory may follow its pixels, a JPEG's frame header
    # follows its EXIF and ICC segments.
    size = image_size(data.tobytes())
    if size is not None and size[0] * size[1] > max_pixels:
        width, height = size
        raise UserError(
            f"{path}: {width}x{height} = {width * height / 1e6:.0f} Mpx is over the "
            f"{max_pixels / 1e6:.0f} Mpx limit"
        )
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
    width: int  # as stored, before the EXIF orientation
    height: int  # 0: given later by a DNL marker


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
            height, width = struct.unpack(">HH", segment[1:5])
            return _JpegHeader(
                marker, segment[0], components, rgb, orientation, complete, width, height
            )
        pos += 2 + length
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, WebP, TIFF, BMP, GIF or JPEG 2000 file,
    told apart by their signatures as cv2 does; None for other formats and unreadable headers."""
    try:
        for signatures, reader in _SIZE_READERS:
            if data.startswith(signatures):
                size = reader(data)
                return size if size is not None and min(size) > 0 else None
    except (struct.error, IndexError):
        pass  # a truncated header: cv2 reports the file as it always has
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR":
        return None
    return struct.unpack_from(">II", data, 16)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    header = _jpeg_header(data)
    return None if header is None else (header.width, header.height)


def _gif_size(data: bytes) -> tuple[int, int]:
    return struct.unpack_from("<HH", data, 6)


def _bmp_size(data: bytes) -> tuple[int, int]:
    if struct.unpack_from("<I", data, 14)[0] == 12:  # OS/2 BITMAPCOREHEADER
        return struct.unpack_from("<HH", data, 18)
    width, height = struct.unpack_from("<ii", data, 18)
    return abs(width), abs(height)  # a negative height: rows stored top-down


def _webp_size(data: bytes) -> tuple[int, int] | None:
    if data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: the canvas size, 24 bits each, minus one
        fields = data[24:30]
        return int.from_bytes(fields[:3], "little") + 1, int.from_bytes(fields[3:], "little") + 1
    if chunk == b"VP8L":  # lossless: 14 bits each, minus one, after the 0x2f signature
        bits = struct.unpack_from("<I", data, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    return None


# TIFF version -> (where the first directory's offset is, its format, the entry count's format,
# the size of an entry); an entry is tag, type, count, then the value.
_TIFF_LAYOUTS = {42: (4, "I", "H", 12), 43: (8, "Q", "Q", 20)}  # classic TIFF, BigTIFF


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth and ImageLength of the first directory, classic TIFF or BigTIFF."""
    order = "<" if data[:2] == b"II" else ">"
    version = struct.unpack_from(order + "H", data, 2)[0]
    offset_at, offset_format, count_format, entry_size = _TIFF_LAYOUTS[version]
    ifd = struct.unpack_from(order + offset_format, data, offset_at)[0]
    count = struct.unpack_from(order + count_format, data, ifd)[0]
    first = ifd + struct.calcsize(order + count_format)
    value_at = 4 + struct.calcsize(order + offset_format)  # after tag, type and count
    found: dict[int, int] = {}
    for entry in range(first, first + entry_size * min(count, 4096), entry_size):
        tag, kind = struct.unpack_from(order + "HH", data, entry)
        value_format = {3: "H", 4: "I", 16: "Q"}.get(kind)  # SHORT, LONG, LONG8
        if tag in (0x100, 0x101) and value_format is not None:  # ImageWidth, ImageLength
            found[tag] = struct.unpack_from(order + value_format, data, entry + value_at)[0]
    return (found[0x100], found[0x101]) if len(found) == 2 else None


def _jp2_size(data: bytes) -> tuple[int, int] | None:
    """The image header box (``jp2h`` > ``ihdr``) of a JP2 file."""
    pos = 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if length == 1:  # a 64-bit length follows
            length, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        if kind == b"jp2h":
            pos += header  # a superbox: step into it
            continue
        if kind == b"ihdr":
            height, width = struct.unpack_from(">II", data, pos + header)
            return width, height
        if length < header:  # 0: the box runs to the end of the file
            return None
        pos += length
    return None


def _j2k_size(data: bytes) -> tuple[int, int]:
    """The SIZ segment right after a raw JPEG 2000 codestream's SOC marker."""
    width, height, x_offset, y_offset = struct.unpack_from(">IIII", data, 8)
    return width - x_offset, height - y_offset


_SIZE_READERS = (
    (b"\x89PNG\r\n\x1a\n", _png_size),
    (_JPEG_MAGIC, _jpeg_size),
    ((b"GIF87a", b"GIF89a"), _gif_size),
    (b"BM", _bmp_size),
    (b"RIFF", _webp_size),
    ((b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"), _tiff_size),
    (b"\0\0\0\x0cjP  \r\n\x87\n", _jp2_size),
    (b"\xff\x4f\xff\x51", _j2k_size),
)


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
    """The array to write for ``photo`` with its colour replaced: gray and alpha as they were
    (the alpha resized with the colour when ``--upscale`` made it larger)."""
    alpha = photo.alpha
    if alpha is not None and alpha.shape[:2] != color.shape[:2]:
        size = (color.shape[1], color.shape[0])
        alpha = cv2.resize(alpha, size, interpolation=cv2.INTER_LINEAR)
    if photo.grayscale:
        out = cv2.cvtColor(color, cv2.COLOR_BGR2GRAY)
        return out if alpha is None else np.dstack([out, alpha])
    return color if alpha is None else np.dstack([color, alpha])


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


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def iter_folder(root: Path, *, exclude: Path | None = None) -> Iterator[Path]:
    """Image files below ``root`` (recursively, sorted), by extension.

    Hidden files and our temporary files (:func:`streamgpen.files.is_temp_name`) are skipped, and
    so is everything below ``exclude``: the output folder when it lies inside ``root``, whose
    files a rerun would otherwise take for inputs. An ``exclude`` that is ``root`` or above it
    would leave nothing and is ignored (writing in place is the caller's decision).
    """
    left_out = _folder_left_out(root, exclude)
    for path in sorted(root.rglob("*")):
        name = path.name
        if name.startswith(".") or is_temp_name(name) or not is_image_path(path):
            continue
        if left_out is not None and path.parent.resolve().is_relative_to(left_out):
            continue
        if path.is_file():
            yield path


def _folder_left_out(root: Path, exclude: Path | None) -> Path | None:
    if exclude is None:
        return None
    left_out, root = Path(exclude).resolve(), Path(root).resolve()
    return None if root.is_relative_to(left_out) else left_out
