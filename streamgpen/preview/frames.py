"""The newest published frame pair, waited for by viewers on an event loop, encoded once.

The pipeline's thread publishes; viewers' coroutines wait for a frame newer than the one they
sent. ``publish`` never waits for them: it stores references, bumps the sequence number and
wakes each event loop that has waiters with one ``call_soon_threadsafe``. The JPEG of a frame is
encoded off the loop (a worker thread), at most once per frame and pane whoever asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import anyio
import cv2
import numpy as np

PANES = ("original", "enhanced")


def _wake(events: set[asyncio.Event]) -> None:
    for event in events:
        event.set()


class Frames:
    """The newest published frames and figures, their lazily encoded JPEGs, and who waits."""

    def __init__(self, jpeg_quality: int, max_width: int):
        self._jpeg_quality = jpeg_quality
        self._max_width = max_width
        self._lock = threading.Lock()
        self._seq = 0
        self._closed = False
        self._raw: dict[str, np.ndarray] = {}
        self._stats: dict[str, Any] = {}
        self._waiters: dict[asyncio.AbstractEventLoop, set[asyncio.Event]] = {}
        self._encode_locks = {pane: threading.Lock() for pane in PANES}
        self._jpegs: dict[str, tuple[int, bytes]] = {}
        # One encode at a time per pane and loop; the other viewers wait for its result.
        self._loop_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def publish(self, original: np.ndarray, enhanced: np.ndarray, stats: Mapping | None) -> None:
        """Keep references to the newest pair and its figures; wake the waiting viewers."""
        stats = dict(stats or {})
        with self._lock:
            self._raw = {"original": original, "enhanced": enhanced}
            self._stats = stats
            self._seq += 1
            waiters, self._waiters = self._waiters, {}
        self._wake(waiters)

    def close(self) -> None:
        """From now on ``wait_newer`` returns False at once; wake every waiter."""
        with self._lock:
            self._closed = True
            waiters, self._waiters = self._waiters, {}
        self._wake(waiters)

    @property
    def closed(self) -> bool:
        return self._closed

    def latest(self) -> tuple[int, dict[str, Any]]:
        """``(frames published so far, the newest figures)``."""
        with self._lock:
            return self._seq, dict(self._stats)

    async def wait_newer(self, seq: int) -> bool:
        """Wait (on the running loop) for a frame newer than ``seq``; False once closed."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._lock:
            if self._closed or self._seq > seq:
                return not self._closed
            self._waiters.setdefault(loop, set()).add(event)
        try:
            await event.wait()
        finally:
            with self._lock:
                self._waiters.get(loop, set()).discard(event)
        return not self._closed

    async def jpeg(self, pane: str) -> tuple[int, bytes]:
        """``(seq, jpeg)`` of the newest frame of ``pane``, encoded on a worker thread by the
        first viewer to ask; a frame must have been published."""
        cached = self._cached(pane)
        if cached is not None:
            return cached
        async with self._loop_lock(pane):
            return self._cached(pane) or await anyio.to_thread.run_sync(self.encode, pane)

    def encode(self, pane: str) -> tuple[int, bytes]:
        """``(seq, jpeg)`` of the newest frame of ``pane``, encoded at most once per frame."""
        with self._encode_locks[pane]:
            with self._lock:
                seq, rgb = self._seq, self._raw[pane]
            cached = self._jpegs.get(pane)
            if cached is None or cached[0] != seq:
                cached = (seq, self._encode(rgb))
                self._jpegs[pane] = cached
            return cached

    def _cached(self, pane: str) -> tuple[int, bytes] | None:
        cached = self._jpegs.get(pane)
        return cached if cached is not None and cached[0] == self._seq else None

    def _loop_lock(self, pane: str) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        with self._lock:
            locks = self._loop_locks.get(loop)
            if locks is None:
                locks = self._loop_locks[loop] = {name: asyncio.Lock() for name in PANES}
            return locks[pane]

    @staticmethod
    def _wake(waiters: dict[asyncio.AbstractEventLoop, set[asyncio.Event]]) -> None:
        for loop, events in waiters.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_wake, events)

    def _encode(self, rgb: np.ndarray) -> bytes:
        height, width = rgb.shape[:2]
        if width > self._max_width:
            size = (self._max_width, max(1, round(height * self._max_width / width)))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        # The pipeline may publish views (a permuted tensor's numpy, a flipped array).
        bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, self._jpeg_quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return buf.tobytes()
