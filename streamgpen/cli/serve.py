"""``streamgpen serve``: the HTTP service, with ``enhance``'s options as the requests' defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from streamgpen.cli import options as o
from streamgpen.cli.build import run_config
from streamgpen.config import (
    DetectorName,
    ImageFormat,
    MaskKind,
    ModelName,
    ParserName,
    Precision,
    RtspTransport,
    TemporalMode,
)

SERVICE_PANEL = "Service"
Host = Annotated[
    str,
    typer.Option(
        help="The address to listen on; anything but loopback needs a token (--token, or one "
        "is generated and printed).",
        metavar="HOST",
        rich_help_panel=SERVICE_PANEL,
    ),
]
Port = Annotated[
    int,
    typer.Option(
        help="The port (0: any free one).",
        metavar="N",
        min=0,
        max=65535,
        rich_help_panel=SERVICE_PANEL,
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        help="Require 'Authorization: Bearer TOKEN' on every request. "
        + o.default("none on loopback, else generated"),
        metavar="TOKEN",
        show_default=False,
        rich_help_panel=SERVICE_PANEL,
    ),
]
Spool = Annotated[
    Path | None,
    typer.Option(
        help="Where uploads, jobs and recordings are kept (a restart finds them). "
        + o.default("~/.cache/streamgpen/spool"),
        metavar="DIR",
        show_default=False,
        rich_help_panel=SERVICE_PANEL,
    ),
]
SpoolQuota = Annotated[
    float,
    typer.Option(
        help="Spool size beyond which new jobs are refused, GiB.",
        metavar="GIB",
        min=0,
        rich_help_panel=SERVICE_PANEL,
    ),
]
SourceDir = Annotated[
    Path | None,
    typer.Option(
        help="A folder on the server whose videos jobs may name as their source. "
        + o.default("none: uploads and URLs only"),
        metavar="DIR",
        show_default=False,
        rich_help_panel=SERVICE_PANEL,
    ),
]
MaxImageMb = Annotated[
    float,
    typer.Option(
        help="Largest photo upload, MiB.", metavar="MIB", min=0, rich_help_panel=SERVICE_PANEL
    ),
]
MaxPixels = Annotated[
    float,
    typer.Option(
        help="Largest photo, megapixels.", metavar="MPX", min=0, rich_help_panel=SERVICE_PANEL
    ),
]
MaxVideoMb = Annotated[
    float,
    typer.Option(
        help="Largest video upload, MiB.", metavar="MIB", min=0, rich_help_panel=SERVICE_PANEL
    ),
]
MaxQueue = Annotated[
    int,
    typer.Option(
        help="Photo requests waiting for the device; beyond, 503 and Retry-After.",
        metavar="N",
        min=1,
        rich_help_panel=SERVICE_PANEL,
    ),
]
BatchWindow = Annotated[
    float,
    typer.Option(
        help="How long the device waits for more photo requests to batch with, ms.",
        metavar="MS",
        min=0,
        rich_help_panel=SERVICE_PANEL,
    ),
]


def serve(
    host: Host = "127.0.0.1",
    port: Port = 8000,
    token: Token = None,
    spool: Spool = None,
    spool_quota: SpoolQuota = 20.0,
    source_dir: SourceDir = None,
    max_image_mb: MaxImageMb = 64.0,
    max_pixels: MaxPixels = 100.0,
    max_video_mb: MaxVideoMb = 8192.0,
    max_queue: MaxQueue = 64,
    batch_window: BatchWindow = 10.0,
    quiet: o.Quiet = False,
    model: o.Model = ModelName.GPEN_BFR_512,
    model_path: o.ModelPath = None,
    detector: o.Detector = DetectorName.RETINAFACE_RESNET50,
    weights_dir: o.WeightsDir = None,
    det_size: o.DetSize = 1280,
    det_threshold: o.DetThreshold = 0.9,
    min_face: o.MinFace = 10,
    blend: o.Blend = 1.0,
    clahe: o.Clahe = False,
    only_center_face: o.OnlyCenterFace = False,
    mask: o.Mask = MaskKind.PARSE,
    parse_model: o.ParseModel = ParserName.PARSENET,
    color_match: o.ColorMatch = False,
    upscale: o.Upscale = 1.0,
    bg_upsampler: o.BgUpsampler = "none",
    bg_tile: o.BgTile = 400,
    detect_every: o.DetectEvery = 5,
    temporal: o.Temporal = TemporalMode.FLOW,
    codec: o.Codec = "libx264",
    crf: o.Crf = 18,
    preset: o.Preset = "medium",
    pix_fmt: o.PixFmt = None,
    reconnect: o.Reconnect = "5",
    rtsp_transport: o.Transport = RtspTransport.TCP,
    timeout: o.Timeout = 10.0,
    batch_size: o.BatchSize = 8,
    device: o.Device = "auto",
    precision: o.PrecisionOption = Precision.AUTO,
    compile_: o.Compile = False,
) -> None:
    """Serve face enhancement over HTTP: photos (POST /v1/enhance, faces of concurrent requests
    batched together), video jobs (/v1/jobs), live streams with a preview (/v1/streams),
    Prometheus figures (/metrics) and the API's docs (/docs).

    The enhancement options are the requests' defaults; a request may change blend, upscale,
    only_center_face and mask.
    """
    options = dict(locals())
    config = _run_config({k: v for k, v in options.items() if k not in _SERVICE_KEYS})
    limits = _limits(**{k: options[k] for k in _LIMIT_KEYS})
    from streamgpen.apps import serve as app  # torch and uvicorn: not for --help

    raise typer.Exit(app.run(config, limits=limits, host=host, port=port, token=token, spool=spool))


def _run_config(settings: dict):
    """The requests' defaults: ``enhance``'s configuration without an input or output of its own
    (each job and stream gets its own)."""
    return run_config(
        source="",
        output=None,
        draw=False,
        save_faces=None,
        faces_json=None,
        suffix=None,
        ext=ImageFormat.AUTO,
        aligned=False,
        realtime=False,
        input_size=None,
        input_fps=None,
        preview=None,
        preview_token=None,
        **settings,
    )


def _limits(
    *,
    spool_quota: float,
    source_dir: Path | None,
    max_image_mb: float,
    max_pixels: float,
    max_video_mb: float,
    max_queue: int,
    batch_window: float,
):
    """The options' units (MiB, Mpx, GiB, ms) as the service's limits (bytes, pixels, s)."""
    from streamgpen.config import MiB, ServiceLimits

    return ServiceLimits(
        max_image_bytes=int(max_image_mb * MiB),
        max_image_pixels=int(max_pixels * 1e6),
        max_video_bytes=int(max_video_mb * MiB),
        max_queue=max_queue,
        batch_window_s=batch_window / 1e3,
        spool_quota_bytes=int(spool_quota * 1024 * MiB),
        source_dir=source_dir,
    )


_LIMIT_KEYS = (
    "spool_quota", "source_dir", "max_image_mb", "max_pixels", "max_video_mb", "max_queue",
    "batch_window",
)  # fmt: skip
_SERVICE_KEYS = {"host", "port", "token", "spool", *_LIMIT_KEYS}
