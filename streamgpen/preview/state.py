"""Everything the live page shows and changes, without networking: frames, figures, controls.

The pipeline calls ``publish()`` once per frame and reads ``controls`` once per chunk; the page
(``preview.app``) reads the rest. ``close()`` ends every open stream: the run is over.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from streamgpen.pipeline.packet import Controls
from streamgpen.preview.frames import Frames
from streamgpen.preview.streams import Streams

STATS_KEYS = (
    "fps_in",
    "fps_out",
    "latency_ms_p50",
    "latency_ms_p95",
    "faces",
    "dropped",
    "model",
    "device",
)
# Open MJPEG streams at most (two per browser tab); more get 503.
MAX_STREAMS = 32
# With every stream slot taken, a viewer whose send has been blocked this long gives way to a new
# one. A reading viewer takes a frame in milliseconds, even at 25 fps over a slow LAN.
STREAM_EVICT_AFTER_S = 1.0


class PreviewState:
    """The newest frame pair and figures, the viewer's controls, and the open streams.

    ``publish()`` costs the same whether or not anyone watches and never waits for viewers
    (measured on 2 cores: ~5 µs a call with no viewer and with two; tests/test_preview.py's
    ``test_publish_is_cheap_and_a_960_wide_viewer_keeps_up``). Thread-safe: the pipeline's
    thread publishes, the server's event loop reads.
    """

    def __init__(
        self, *, controls: Controls = Controls(), jpeg_quality: int = 80, max_width: int = 960
    ):
        if not 1 <= jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in 1..100")
        if max_width < 1:
            raise ValueError("max_width must be positive")
        self.frames = Frames(jpeg_quality, max_width)
        self.streams = Streams(limit=MAX_STREAMS, evict_after_s=STREAM_EVICT_AFTER_S)
        self._controls = controls
        self._controls_lock = threading.Lock()

    @property
    def controls(self) -> Controls:
        """The viewer's current controls, a frozen snapshot (the run's own until changed)."""
        with self._controls_lock:
            return self._controls

    def update_controls(self, values: Mapping[str, Any]) -> Controls:
        """Apply ``values`` (all or nothing) and return the new snapshot; ``ValueError`` if bad."""
        with self._controls_lock:
            self._controls = self._controls.updated(values)
            return self._controls

    @property
    def viewers(self) -> int:
        """How many MJPEG streams are open now."""
        return len(self.streams)

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called: no stream is served any more."""
        return self.frames.closed

    def publish(
        self, original_rgb: np.ndarray, enhanced_rgb: np.ndarray, stats: Mapping | None = None
    ) -> None:
        """Offer the newest frame pair (HxWx3 uint8 RGB) and figures; never waits for viewers.

        It stores references and wakes the viewers, which encode on worker threads. The arrays
        are kept by reference until the next call: do not modify them afterwards. ``stats``
        holds the ``/stats`` figures (``STATS_KEYS``, and anything else to show).
        """
        for image in (original_rgb, enhanced_rgb):
            if (
                not isinstance(image, np.ndarray)
                or image.ndim != 3
                or image.shape[2] != 3
                or image.dtype != np.uint8
            ):
                shape, dtype = getattr(image, "shape", "?"), getattr(image, "dtype", type(image))
                raise ValueError(f"expected an HxWx3 uint8 image, got {shape} {dtype}")
        self.frames.publish(original_rgb, enhanced_rgb, stats)

    def stats(self) -> dict[str, Any]:
        """What ``/stats`` returns: ``STATS_KEYS`` (None until the pipeline passes them), whatever
        else it passes, ``viewers`` (open streams) and ``published`` (frames so far)."""
        seq, latest = self.frames.latest()
        return (
            {key: None for key in STATS_KEYS} | latest | {"viewers": self.viewers, "published": seq}
        )

    def close(self) -> None:
        """End every open stream now: a reading viewer's ends after its part under way, one
        blocked in a send is cut (one whose last send just filled its buffers is cut by the
        server when nothing moves for ``SEND_STALL_TIMEOUT_S``, or by its ``stop()``). New
        streams are refused (410). Idempotent; call it from any thread."""
        self.frames.close()
        self.streams.end_stalled()
