"""Which inputs are live and which outputs are published streams: the one place that says so.

An input is *live* when it is a network URL of one of :data:`LIVE_INPUT_SCHEMES` or a camera
(``webcam:N``); anything else without a scheme is a file. An output is *published* when it is an
``rtsp://`` or ``rtsps://`` URL (the RTSP muxer announces and records to a server). Any other
``scheme://`` is refused with one line by the source or the sink.
"""

from __future__ import annotations

from urllib.parse import urlsplit

# Network inputs libavformat opens by URL; each is read as a live stream (no frame count, may
# reconnect).
LIVE_INPUT_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "srt", "tcp", "rtp")

# Network inputs a service request may name: those that only connect out to a server. Not tcp,
# udp, rtp or srt, which libavformat also opens as a listener (``tcp://0.0.0.0:9?listen=1``,
# ``srt://...?mode=listener``): a request must not make the service listen on a port.
CONNECTING_INPUT_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https")

# Outputs streamgpen publishes to a server rather than writes to a file.
PUBLISH_SCHEMES = ("rtsp", "rtsps")

WEBCAM_PREFIX = "webcam:"


def url_scheme(spec: str) -> str:
    """The lower-case scheme of ``spec`` (``"rtsp"`` for ``rtsp://cam/1``); ``""`` if none."""
    scheme, sep, _ = spec.partition("://")
    return scheme.lower() if sep else ""


def is_webcam(spec: str) -> bool:
    """Whether ``spec`` names a camera: ``webcam:N`` or ``webcam:<device name>``."""
    return spec.startswith(WEBCAM_PREFIX)


def is_live_input(spec: str) -> bool:
    """Whether ``spec`` is a live input: a network URL of a known scheme or ``webcam:N``."""
    return is_webcam(spec) or url_scheme(spec) in LIVE_INPUT_SCHEMES


def connects_out(spec: str) -> bool:
    """Whether ``spec`` is a network input that only connects out (what a request may name)."""
    return url_scheme(spec) in CONNECTING_INPUT_SCHEMES


def is_publish_url(spec: str) -> bool:
    """Whether the output ``spec`` is a stream to publish (``rtsp://``, ``rtsps://``)."""
    return url_scheme(spec) in PUBLISH_SCHEMES


def redacted(url: str) -> str:
    """``url`` with its password masked (``rtsp://user:***@cam/1``): what listings, errors and
    logs may show of a camera's address."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
