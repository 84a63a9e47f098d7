"""A decoded frame as the device layer takes it: planes and colour info, no PyAV types."""

from __future__ import annotations

from streamgpen.media.video import Frame
from streamgpen.runtime.color import is_full_range
from streamgpen.runtime.transfer import HostPlanes


def host_planes(frame: Frame, *, yuv: bool) -> HostPlanes:
    """``frame``'s pixels for upload: its YUV 4:2:0 planes when ``yuv`` and the frame is 8-bit
    4:2:0 of even size (converted on the device), else upright RGB converted by libswscale."""
    planes = frame.yuv420() if yuv else None
    if planes is None:
        return HostPlanes(pixels=frame.image)
    picture = frame.picture
    return HostPlanes(
        pixels=planes,
        yuv=True,
        space=int(picture.colorspace),
        full_range=is_full_range(picture.format.name, int(picture.color_range)),
        turns=frame.turns,
    )
