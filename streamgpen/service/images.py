"""``POST /v1/enhance``: one photo in, the enhanced photo out, its faces batched with everyone's.

The upload is streamed to the spool (never whole in memory), its type read from its first bytes
(not from what the client claims), its size from its header before it is decoded, then it is
decoded on a worker thread (EXIF orientation honoured, alpha and 16 bits kept:
``media.images.read_photo``) and queued for the device worker (``batcher``). The answer is the
image in its own format (or ``format=``'s) with the faces as JSON in ``X-Faces``, or, with
``faces=1``, the faces alone as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import anyio.to_thread
import cv2
import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from streamgpen.errors import UserError
from streamgpen.media.facelog import face_record
from streamgpen.media.images import image_size, merge_channels, read_photo
from streamgpen.service.batcher import ImageRequest, QueueFull
from streamgpen.service.core import Service, new_id
from streamgpen.service.uploads import receive_upload
from streamgpen.web.responses import HttpError, busy, json_response

# The formats served, by their magic bytes: (media type, extension cv2 encodes by).
FORMATS = {
    "jpeg": ("image/jpeg", ".jpg"),
    "png": ("image/png", ".png"),
    "webp": ("image/webp", ".webp"),
    "tiff": ("image/tiff", ".tif"),
}
# How long a client told "queue full" should wait: a round of a few batches on a GPU.
RETRY_AFTER_S = 1
# Photos decoded at once (each up to --max-pixels, ~300 MB at 100 Mpx as BGR): the rest of the
# uploads wait their turn here rather than all holding decoded pixels before the queue.
_DECODERS = anyio.CapacityLimiter(4)


def sniff(head: bytes) -> str | None:
    """The format of a file from its first 12 bytes (None: not one we serve)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    return None


async def enhance_image(request: Request) -> Response:
    """Enhance the faces of one photo.

    Multipart form with a ``file`` part (JPEG, PNG, WebP or TIFF). Options, as query parameters
    or form fields: ``blend``, ``upscale``, ``only_center_face``, ``mask`` (parse|box) override
    the service's; ``format`` (jpeg|png|webp|tiff) the output's; ``faces=1`` answers the faces as
    JSON instead of the image. The image's answer carries the faces in ``X-Faces``.
    Errors: 400 unreadable, 413 too many bytes or pixels, 415 unsupported type, 503 queue full.
    """
    service: Service = request.app.state.service
    limits = service.limits
    if service.batcher.queued >= limits.max_queue:  # before the upload is read and decoded
        raise busy(f"{limits.max_queue} requests are waiting for the device", RETRY_AFTER_S)
    target = service.spool / "uploads" / f"{new_id()}.upload"
    try:
        upload = await receive_upload(request, target, max_bytes=limits.max_image_bytes)
        params = {**request.query_params, **upload.fields}
        kind, photo = await anyio.to_thread.run_sync(
            _read, upload.path, limits.max_image_pixels, limiter=_DECODERS
        )
    finally:
        with contextlib.suppress(OSError):
            target.unlink()
    params.pop("token", None)  # TokenGuard's, when the token came in the URL
    out_format = _output_format(params.pop("format", None), kind)
    as_json = params.pop("faces", "0")
    if as_json not in ("0", "1"):
        raise HttpError(400, "faces must be 0 or 1")
    enhancer = service.request_enhancer(params)  # the rest: options, or a 400 naming them
    try:
        future = service.batcher.submit(ImageRequest(bgr=photo.color, enhancer=enhancer))
    except QueueFull as error:
        raise busy(str(error), RETRY_AFTER_S) from None
    try:
        result = await asyncio.wrap_future(future)
    except QueueFull as error:
        raise busy(str(error), RETRY_AFTER_S) from None
    except UserError as error:
        raise HttpError(400, str(error)) from None
    faces = [face_record(face) for face in result.faces]
    height, width = result.bgr.shape[:2]
    if as_json == "1":
        return json_response({"width": width, "height": height, "faces": faces})
    body = await run_in_threadpool(_encode, merge_channels(photo, result.bgr), out_format)
    headers = {
        "X-Faces": json.dumps(faces, separators=(",", ":")),
        "Server-Timing": (
            f"queue;dur={result.wait_s * 1e3:.1f}, device;dur={result.device_s * 1e3:.1f}"
        ),
    }
    return Response(body, media_type=FORMATS[out_format][0], headers=headers)


def _read(path: Path, max_pixels: int):
    """(format, Photo) of an uploaded file; 415, 413 or 400 as :class:`HttpError`."""
    with open(path, "rb") as file:
        head = file.read(1 << 16)
    kind = sniff(head)
    if kind is None:
        raise HttpError(415, "send a JPEG, PNG, WebP or TIFF image")
    size = image_size(head) if kind != "tiff" else image_size(path.read_bytes())
    if size is not None and size[0] * size[1] > max_pixels:
        raise HttpError(413, f"{size[0]}x{size[1]} is over the limit of {max_pixels} pixels")
    try:
        return kind, read_photo(path, max_pixels=max_pixels)
    except UserError as error:
        message = str(error).removeprefix(f"{path}: ")
        raise HttpError(400, f"unreadable image: {message}") from None


def _output_format(asked: str | None, kind: str) -> str:
    if asked is None:
        return kind
    asked = {"jpg": "jpeg", "tif": "tiff"}.get(asked.lower(), asked.lower())
    if asked not in FORMATS:
        raise HttpError(400, f"format must be one of {', '.join(FORMATS)}, not {asked!r}")
    return asked


def _encode(image: np.ndarray, kind: str) -> bytes:
    """The image encoded as ``kind``; JPEG holds neither alpha nor 16 bits, so they go."""
    if kind == "jpeg":
        if image.ndim == 3 and image.shape[2] in (2, 4):
            image = image[..., : image.shape[2] - 1]
        if image.dtype == np.uint16:
            image = (image // 257).astype(np.uint8)
    ok, encoded = cv2.imencode(FORMATS[kind][1], np.ascontiguousarray(image))
    if not ok:
        raise HttpError(500, f"cannot encode a {image.dtype} image as {kind}")
    return encoded.tobytes()
