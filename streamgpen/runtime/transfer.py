"""Frames to the device and back, off the device worker's critical path.

On CUDA, the decoding thread uploads each frame through pinned memory on a stream of its own, and
downloads run on another stream into pinned memory, so that both copies overlap the worker's
compute; CUDA events order them, and the encoding thread waits for a download only when it needs
the pixels. 8-bit YUV 4:2:0 frames travel as their planes (half the bytes of RGB) and are converted
on the device. On the CPU the same calls are plain conversions, with nothing to wait for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from streamgpen.runtime.color import yuv420_to_rgb


def _event(stream: torch.cuda.Stream | None, blocking: bool = False) -> torch.cuda.Event | None:
    """An event recorded on ``stream``; ``blocking``: a host thread waiting for it sleeps rather
    than spins."""
    if stream is None:
        return None
    event = torch.cuda.Event(blocking=blocking)
    event.record(stream)
    return event


def _wait(tensor: torch.Tensor, event: torch.cuda.Event | None) -> None:
    """Make the current stream wait for ``event`` before it uses ``tensor`` (made on another)."""
    if event is None:
        return
    current = torch.cuda.current_stream(tensor.device)
    current.wait_event(event)
    # The tensor's memory belongs to the stream that allocated it; without this, the caching
    # allocator could hand it out again while the current stream still reads it.
    tensor.record_stream(current)


@dataclass(frozen=True)
class DeviceFrame:
    """A frame's pixels on the device, as uploaded: RGB [H, W, 3] or YUV 4:2:0 planes
    [H * 3 / 2, W], uint8; ``ready`` is recorded once the copy is done (CUDA)."""

    pixels: torch.Tensor
    yuv: bool
    space: int
    full_range: bool
    turns: int
    ready: torch.cuda.Event | None = None

    def rgb(self) -> torch.Tensor:
        """[3, H, W] float RGB in [0, 1], upright, computed on the current stream."""
        _wait(self.pixels, self.ready)
        if self.yuv:
            image = yuv420_to_rgb(self.pixels, self.space, self.full_range)
            return torch.rot90(image, self.turns, dims=(1, 2)) if self.turns else image
        return self.pixels.permute(2, 0, 1).float().div_(255)


@dataclass(frozen=True, kw_only=True)
class HostPlanes:
    """A decoded frame on the host, as the device layer takes it (no media types here).

    ``pixels``: YUV 4:2:0 planes [H * 3 / 2, W] uint8 when ``yuv``, else RGB [H, W, 3] uint8
    (already upright). ``space`` is the AVColorSpace of the YUV matrix, ``full_range`` its range,
    ``turns`` the counter-clockwise quarter turns that make YUV planes upright.
    """

    pixels: np.ndarray
    yuv: bool = False
    space: int = 2
    full_range: bool = False
    turns: int = 0


class Uploader:
    """Copies decoded frames to ``device``; call it from the decoding thread.

    ``yuv_on_device`` (default: on CUDA) asks for 8-bit 4:2:0 frames as planes, converted to RGB on
    the device; otherwise frames come as RGB converted by libswscale on the host.
    """

    def __init__(self, device: torch.device, yuv_on_device: bool | None = None):
        self.device = device
        self.yuv_on_device = device.type == "cuda" if yuv_on_device is None else yuv_on_device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, frame: HostPlanes) -> DeviceFrame:
        host = torch.from_numpy(frame.pixels)
        if self._stream is None:
            pixels = host.to(self.device)
        else:
            with torch.cuda.stream(self._stream):
                pixels = host.pin_memory().to(self.device, non_blocking=True)
        return DeviceFrame(
            pixels,
            yuv=frame.yuv,
            space=frame.space,
            full_range=frame.full_range,
            turns=frame.turns if frame.yuv else 0,
            ready=_event(self._stream),
        )


@dataclass(frozen=True)
class HostImage:
    """One downloaded frame; ``get()`` waits for its copy and returns HxWx3 uint8 RGB."""

    array: np.ndarray
    ready: torch.cuda.Event | None = None

    def get(self) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()
        return self.array


class Downloader:
    """Copies finished frames back to the host; the copy is queued, not waited for."""

    def __init__(self, device: torch.device):
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, frames: torch.Tensor) -> list[HostImage]:
        """[B, 3, H, W] float RGB in [0, 1] on the device -> B frames on their way to the host."""
        # [B, H, W, 3] uint8, contiguous: the layout the encoder reads
        pixels = frames.mul(255).round_().clamp_(0, 255).to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).contiguous()
        if self._stream is None:
            return [HostImage(image) for image in pixels.numpy()]
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        self._stream.wait_stream(torch.cuda.current_stream(frames.device))
        with torch.cuda.stream(self._stream):
            host.copy_(pixels, non_blocking=True)
        pixels.record_stream(self._stream)
        # The encoder thread waits on it: sleeping keeps a CPU core free for decoding.
        ready = _event(self._stream, blocking=True)
        return [HostImage(image, ready) for image in host.numpy()]
