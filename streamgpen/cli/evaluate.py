"""``streamgpen eval``: photo metrics against ground truth, temporal figures of a video.

The options that ``enhance`` also has (detector, weights, device...) are :mod:`.options`'s; the
ones only eval has are declared here. Nothing here imports torch (``--help`` answers at once).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from streamgpen.cli import options as o
from streamgpen.config import DetectorConfig, DetectorName
from streamgpen.errors import UserError

PHOTO_PANEL = "Photos"
VIDEO_PANEL = "Videos"


class LpipsNet(StrEnum):
    """LPIPS's backbones (``--lpips-net``), as torchmetrics names them."""

    ALEX = "alex"
    VGG = "vgg"
    SQUEEZE = "squeeze"


EvalOutput = Annotated[
    Path,
    typer.Argument(
        help="The enhanced photo, folder of photos or video file.",
        metavar="OUTPUT",
        show_default=False,
    ),
]
Reference = Annotated[
    Path | None,
    typer.Option(
        help="The ground truth: a photo, or a folder matched to OUTPUT's by name.",
        metavar="PATH",
        show_default=False,
        rich_help_panel=PHOTO_PANEL,
    ),
]
EvalSuffix = Annotated[
    str | None,
    typer.Option(
        "--suffix",
        help="Outputs named STEM_TEXT.EXT (enhance --suffix) match STEM.",
        metavar="TEXT",
        show_default=False,
        rich_help_panel=PHOTO_PANEL,
    ),
]
LpipsNetOption = Annotated[
    LpipsNet,
    typer.Option(
        "--lpips-net",
        help=f"LPIPS's backbone: {o.values(LpipsNet, ' or ')}.",
        metavar="NAME",
        parser=o.choice(LpipsNet, "LPIPS network"),
        rich_help_panel=PHOTO_PANEL,
    ),
]
SourceVideo = Annotated[
    Path | None,
    typer.Option(
        "--source",
        help="The video OUTPUT was enhanced from.",
        metavar="FILE",
        dir_okay=False,
        show_default=False,
        rich_help_panel=VIDEO_PANEL,
    ),
]
FaceLogInput = Annotated[
    Path | None,
    typer.Option(
        "--faces-json",
        help="enhance --faces-json's log of that run: its faces, instead of tracking the source.",
        metavar="FILE",
        dir_okay=False,
        show_default=False,
        rich_help_panel=VIDEO_PANEL,
    ),
]
EvalFrames = Annotated[
    int | None,
    typer.Option(
        "--frames",
        help="Measure the first N frames only. " + o.default("all"),
        metavar="N",
        min=2,
        show_default=False,
        rich_help_panel=VIDEO_PANEL,
    ),
]


def evaluate(
    output: EvalOutput,
    reference: Reference = None,
    suffix: EvalSuffix = None,
    lpips_net: LpipsNetOption = LpipsNet.ALEX,
    source: SourceVideo = None,
    faces_json: FaceLogInput = None,
    frames: EvalFrames = None,
    json_path: o.JsonReport = None,
    detector: o.Detector = DetectorName.RETINAFACE_RESNET50,
    weights_dir: o.WeightsDir = None,
    det_size: o.DetSize = 1280,
    det_threshold: o.DetThreshold = 0.9,
    min_face: o.MinFace = 10,
    detect_every: o.DetectEvery = 5,
    device: o.Device = "auto",
    quiet: o.Quiet = False,
) -> None:
    """Measure an enhancement: photos against ground truth, or a video's temporal stability.

    Photos (--reference): PSNR, SSIM and LPIPS per image and their means; folders are matched by
    name. LPIPS needs torchvision's backbone in torch hub's cache; it is never downloaded.

    Videos (--source): the warping error of the output's face regions along the source's optical
    flow, beside the source's own (its floor); the landmarks' jitter; how much the pasted area
    changes from frame to frame. Faces come from --faces-json, else from tracking the source.
    """
    _check_mode(reference, source, photo_only=suffix, video_only=(faces_json, frames))
    from rich.console import Console

    from streamgpen.apps import evaluate as app  # torch, cv2 and PyAV: not for --help

    if reference is not None:
        report = app.evaluate_photos(
            output, reference, suffix=suffix, lpips_net=lpips_net.value, device=device, quiet=quiet
        )
        shown = app.format_photos(report)
    else:
        config = DetectorConfig(
            name=detector, det_size=det_size, threshold=det_threshold, min_face=min_face
        )
        report = app.evaluate_video(
            str(output),
            str(source),
            faces_json=faces_json,
            frames=frames,
            detector=config,
            detect_every=detect_every,
            weights_dir=weights_dir,
            device=device,
            quiet=quiet,
        )
        shown = app.format_video(report)
    if json_path is not None:
        app.write_json(report, json_path)
    Console().print(shown)


def _check_mode(
    reference: Path | None, source: Path | None, *, photo_only: object, video_only: tuple
) -> None:
    """One of --reference and --source, and no option of the other kind."""
    if (reference is None) == (source is None):
        raise UserError("give --reference (photos) or --source (a video), one of them")
    if reference is not None and any(value is not None for value in video_only):
        raise UserError("--faces-json and --frames are for videos (--source)")
    if source is not None and photo_only is not None:
        raise UserError("--suffix is for photos (--reference)")
