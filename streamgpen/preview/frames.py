"""The newest published frame pair, shared by every viewer's thread."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

PANES = ("original", "enhanced")


class Frames:
    """The newest published frames and their lazily encoded JPEGs."""

    def __init__(self, jpeg_quality: int, max_width: int):
        self._jpeg_quality = jpeg_quality
        self._max_width = max_width
        self.changed = threading.Condition()
        self.seq = 0
        self.stopping = False
        self._raw: dict[str, np.ndarray] = {}
        self._stats: dict[str, Any] = {}
        self._encode_locks = {pane: threading.Lock() for pane in PANES}
        self._jpegs: dict[str, tuple[int, bytes]] = {}

    def publish(self, original: np.ndarray, enhanced: np.ndarray, stats: Mapping | None) -> None:
        """Keep references to the newest pair and its figures; wake the viewers."""
        stats = dict(stats or {})
        with self.changed:
            self._raw = {"original": original, "enhanced": enhanced}
            self._stats = stats
            self.seq += 1
            self.changed.notify_all()

    def stats(self) -> tuple[int, dict[str, Any]]:
        """``(frames published so far, the newest figures)``."""
        with self.changed:
            return self.seq, dict(self._stats)

    def wait_newer(self, seq: int) -> bool:
        """Block until a frame newer than ``seq`` exists; False when the server is stopping."""
        with self.changed:
            self.changed.wait_for(lambda: self.stopping or self.seq > seq)
            return not self.stopping

    def set_stopping(self, stopping: bool) -> None:
        """Release (True) every viewer waiting for a frame, or let them wait again (False)."""
        with self.changed:
            self.stopping = stopping
            self.changed.notify_all()

    def jpeg(self, pane: str) -> tuple[int, bytes]:
        """``(seq, jpeg)`` of the newest frame of ``pane``, encoded at most once per frame."""
        with self._encode_locks[pane]:
            with self.changed:
                seq, rgb = self.seq, self._raw[pane]
            cached = self._jpegs.get(pane)
            if cached is None or cached[0] != seq:
                cached = (seq, self._encode(rgb))
                self._jpegs[pane] = cached
            return cached

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
