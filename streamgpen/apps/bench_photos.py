"""Photo decoding speed: cv2 on the host (then copied to the device) against torchvision
decoding JPEGs on the device, through the same function the photo runs use."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import cv2
import numpy as np
import torch

from streamgpen.apps.bench_pipeline import SAMPLE
from streamgpen.errors import UserError
from streamgpen.media.images import decode_photo


def make_photo_jpeg(path: Path, size: tuple[int, int] = (3840, 2160), quality: int = 92) -> Path:
    """Write a JPEG photo of ``size`` (width, height): the sample clip's first frame (a dozen
    faces) enlarged, with seeded noise standing in for a camera's fine detail, so that it costs
    about as much to decode as a real photo of that size."""
    if not SAMPLE.exists():
        raise UserError(f"the photo decoding benchmark needs {SAMPLE} (run it from a checkout)")
    with av.open(str(SAMPLE)) as sample:
        still = next(sample.decode(video=0)).to_ndarray(format="bgr24")
    image = cv2.resize(still, size, interpolation=cv2.INTER_CUBIC).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 4, image.shape).astype(np.float32)
    cv2.imwrite(str(path), image.clip(0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return path


def bench_jpeg_decode(
    device: torch.device, size: tuple[int, int] = (3840, 2160), seconds: float = 2.0
) -> dict:
    """Images/s of one thread decoding a JPEG photo of ``size`` into a tensor on ``device``.

    ``cv2``: decoded on the host, then copied to ``device`` (the path of every file on a CPU
    device, and of files torchvision does not take); ``torchvision``: decoded straight onto
    ``device`` (nvJPEG on CUDA), the path of JPEGs on a CUDA device. Both include reading the
    file (from the page cache), as the photo runs do. When torchvision cannot decode on
    ``device`` (it fell back to cv2), its rate and the speed-up are None.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = make_photo_jpeg(Path(tmp) / "photo.jpg", size)

        def with_cv2() -> torch.Tensor:
            return torch.from_numpy(decode_photo(path, device, on_device=False).color).to(device)

        def with_torchvision() -> torch.Tensor:
            return decode_photo(path, device, on_device=True).color

        cv2_rate = _images_per_s(with_cv2, device, seconds)
        on_device = isinstance(with_torchvision(), torch.Tensor)
        torchvision_rate = _images_per_s(with_torchvision, device, seconds) if on_device else None
        jpeg_bytes = path.stat().st_size
    return {
        "device": str(device),
        "width": size[0],
        "height": size[1],
        "jpeg_bytes": jpeg_bytes,
        "cv2_images_per_s": cv2_rate,
        "torchvision_images_per_s": torchvision_rate,
        "speedup": None if torchvision_rate is None else torchvision_rate / cv2_rate,
    }


def _images_per_s(
    decode: Callable[[], torch.Tensor], device: torch.device, seconds: float
) -> float:
    decode()  # warm-up: the first nvJPEG call creates its decoder
    _sync(device)
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        decode()
        count += 1
    _sync(device)  # CUDA work is asynchronous: count it complete
    return count / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
