"""What flows through the pipeline: one packet per frame, and the controls a chunk runs under.

A :class:`FramePacket` is made by the decoding thread and handed from stage to stage; each stage
fills in what it learns (device pixels, the frame on the device, tracked faces, the output, the
host copy) and adds its wall time. Observers read finished packets; nobody else keeps state about
a frame.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from streamgpen.faces.types import FaceBatch, TrackedFace
    from streamgpen.media.video import Frame
    from streamgpen.runtime.transfer import DeviceFrame, HostImage


@dataclass(frozen=True, kw_only=True)
class Controls:
    """What a viewer may change while a stream runs; a chunk of frames runs under one snapshot.

    ``enhance`` off passes frames through; ``blend`` mixes restored (1) and original (0) faces;
    ``overlay`` draws boxes and landmarks on the output.
    """

    enhance: bool = True
    blend: float = 1.0
    overlay: bool = False

    def updated(self, values: Mapping[str, Any]) -> Controls:
        """A copy with ``values`` applied, all checked first; ``ValueError`` names a bad one."""
        if not isinstance(values, Mapping):
            raise ValueError("controls must be a JSON object")
        known = {f.name for f in fields(self)}
        for key in values:
            if key not in known:
                raise ValueError(f"unknown control {key!r}")
        checked = {key: _check(key, value) for key, value in values.items()}
        return replace(self, **checked)

    def as_dict(self) -> dict[str, Any]:
        return {"enhance": self.enhance, "blend": self.blend, "overlay": self.overlay}


def _check(key: str, value: Any) -> Any:
    if key in ("enhance", "overlay"):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false")
        return value
    # bool is an int subclass; true/false as a blend is a client bug, not 1.0/0.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("blend must be a number")
    try:
        number = float(value)  # a 400-digit integer overflows here
    except OverflowError:
        raise ValueError("blend must be between 0 and 1") from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise ValueError("blend must be between 0 and 1")
    return number


@dataclass(eq=False, kw_only=True)
class FramePacket:
    """One frame and everything known about it, filled in stage by stage.

    ``frame`` is the decoder's frame (index, pts, time base, duration: the sink keeps its timing);
    ``arrived`` the clock when it was decoded; ``discontinuity`` marks the first frame after a
    reconnect (the tracker starts afresh there). ``pixels`` are the uploaded planes, ``image`` the
    frame on the device as [3, H, W] float RGB in [0, 1], ``faces`` its tracked faces (and
    ``face_batches``: the number of the restorer's device batch each went through, counted over
    the process: faces of several inputs in one batch share it), ``output``
    the enhanced frame on the device, ``host`` its copy on its way to the host, ``result`` the
    image the sink was given.
    ``stage_seconds`` adds up each stage's wall time for this frame (a chunk's time is shared
    evenly by its frames).
    """

    frame: Frame
    seconds: float  # the tracker's clock: pts in seconds, or index / fps without timestamps
    arrived: float = field(default_factory=time.perf_counter)
    discontinuity: bool = False
    pixels: DeviceFrame | None = None
    image: torch.Tensor | None = None
    faces: list[TrackedFace] = field(default_factory=list)
    face_batches: list[int] = field(default_factory=list)  # each face's device batch number
    full_detection: bool = False  # the tracker ran a full-frame detection on this frame
    batch: FaceBatch | None = None  # a photo's aligned and restored crops (--save-faces)
    controls: Controls = field(default_factory=Controls)
    output: torch.Tensor | None = None
    host: HostImage | None = None
    result: np.ndarray | None = None  # what was written: HxWx3 uint8 RGB (overlay drawn)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def index(self) -> int:
        return self.frame.index

    def add_time(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
