"""The command line's options, one ``Annotated`` alias each, shared by the commands.

Each alias carries the option's name, its help text, its ``--help`` panel and its bounds; a
command declares ``det_size: DetSize = 1280`` and the default it writes is the one ``--help``
shows. Choices are the Enums of :mod:`streamgpen.config`: ``--help`` lists their values, and a
bad value is refused in one line (exit 2) while the options are parsed, before anything heavy is
imported. Help texts are short on purpose: at 80 columns the help column is about 40 wide.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

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
from streamgpen.errors import UserError

# The panels of `streamgpen enhance --help`, in the order they are printed.
IO_PANEL = "Input and output"
MODEL_PANEL = "Model"
FACES_PANEL = "Faces"
UPSCALE_PANEL = "Upscaling"
VIDEO_PANEL = "Video and streams"
PERFORMANCE_PANEL = "Performance"

# A bool flag shows no type: "<bool>" says nothing a flag's help does not.
FLAG = ""


class BenchModel(StrEnum):
    """The networks ``streamgpen bench --model`` times (their FLOP counts are known)."""

    GPEN_BFR_256 = "GPEN-BFR-256"
    GPEN_BFR_512 = "GPEN-BFR-512"


E = TypeVar("E", bound=Enum)


def choice(enum: type[E], noun: str) -> Callable[[str | E], E]:
    """A parser from a value the user typed to a member of ``enum``.

    A value outside the Enum is a UserError, "unknown NOUN 'x' (use a, b, c)": one line, exit
    code 2, raised while typer parses the options.
    """

    def parse(value: str | E) -> E:
        if isinstance(value, enum):
            return value
        try:
            return enum(value)
        except ValueError:
            raise UserError(f"unknown {noun} {value!r} (use {values(enum)})") from None

    return parse


def values(enum: type[Enum], last: str = ", ") -> str:
    """The Enum's values as the user types them, comma-separated (``last`` before the last)."""
    names = [member.value for member in enum]
    return ", ".join(names[:-1]) + last + names[-1]


def default(text: str) -> str:
    """A ``[default: text]`` note for a help text, for defaults that are not a plain value.

    The bracket is escaped: help texts are Rich markup, where ``[default: ...]`` is a tag that
    would vanish.
    """
    return rf"\[default: {text}]"


# Input and output

Source = Annotated[
    list[str],
    typer.Argument(
        help="Photos, folders of photos or videos, video files, rtsp:// or other stream URLs, "
        "webcam:N; several inputs (-o a folder) share one device worker.",
        metavar="INPUT",
        show_default=False,
    ),
]
Output = Annotated[
    str | None,
    typer.Option(
        "-o",
        "--output",
        help="Photo, folder (a trailing / makes one), video file or stream URL (live "
        "inputs need one). " + default("beside the input, NAME_enhanced"),
        metavar="PATH|URL",
        show_default=False,
        rich_help_panel=IO_PANEL,
    ),
]
Suffix = Annotated[
    str | None,
    typer.Option(
        help="Photos: name each output STEM_TEXT.EXT. "
        + default("none; enhanced beside the input"),
        metavar="TEXT",
        show_default=False,
        rich_help_panel=IO_PANEL,
    ),
]
Ext = Annotated[
    ImageFormat,
    typer.Option(
        help=f"Photos: the outputs' type: {values(ImageFormat, ' or ')} (auto: the input's).",
        metavar="EXT",
        parser=choice(ImageFormat, "output extension"),
        rich_help_panel=IO_PANEL,
    ),
]
SaveFaces = Annotated[
    Path | None,
    typer.Option(
        help="Photos: write aligned, restored and side-by-side crops here.",
        metavar="DIR",
        file_okay=False,
        show_default=False,
        rich_help_panel=IO_PANEL,
    ),
]
FacesJson = Annotated[
    Path | None,
    typer.Option(
        help="Write one JSON line per face (per frame for video).",
        metavar="FILE",
        dir_okay=False,
        show_default=False,
        rich_help_panel=IO_PANEL,
    ),
]
Draw = Annotated[
    bool,
    typer.Option(
        "--draw",
        help="Draw boxes, landmarks and scores on the output.",
        metavar=FLAG,
        rich_help_panel=IO_PANEL,
    ),
]
Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="No progress bars (downloads included) and no summary.",
        metavar=FLAG,
        rich_help_panel=IO_PANEL,
    ),
]

# Model

Model = Annotated[
    ModelName,
    typer.Option(
        help=f"Restoration network: {values(ModelName, ' or ')}.",
        metavar="NAME",
        parser=choice(ModelName, "model"),
        rich_help_panel=MODEL_PANEL,
    ),
]
ModelPath = Annotated[
    Path | None,
    typer.Option(
        help="Any GPEN checkpoint, instead of --model; its architecture is read from its shapes.",
        metavar="FILE",
        dir_okay=False,
        show_default=False,
        rich_help_panel=MODEL_PANEL,
    ),
]
Detector = Annotated[
    DetectorName,
    typer.Option(
        help=f"Face detector: {values(DetectorName, ' or ')}.",
        metavar="NAME",
        parser=choice(DetectorName, "detector"),
        rich_help_panel=MODEL_PANEL,
    ),
]
WeightsDir = Annotated[
    Path | None,
    typer.Option(
        "--weights-dir",
        help="Directory of model files. "
        + default("$STREAMGPEN_WEIGHTS, else streamgpen/weights in $XDG_CACHE_HOME or ~/.cache"),
        metavar="DIR",
        file_okay=False,
        show_default=False,
        rich_help_panel=MODEL_PANEL,
    ),
]

# Faces

DetSize = Annotated[
    int,
    typer.Option(
        help="Detect on a copy whose long side is at most this.",
        metavar="PX",
        min=64,
        rich_help_panel=FACES_PANEL,
    ),
]
DetThreshold = Annotated[
    float,
    typer.Option(
        help="Minimum face probability.",
        metavar="P",
        min=0.0,
        max=1.0,
        rich_help_panel=FACES_PANEL,
    ),
]
MinFace = Annotated[
    int,
    typer.Option(
        help="Smallest face kept, in pixels.", metavar="PX", min=1, rich_help_panel=FACES_PANEL
    ),
]
Blend = Annotated[
    float,
    typer.Option(
        help="1: restored faces, 0: original faces, in between mixes.",
        metavar="X",
        min=0.0,
        max=1.0,
        rich_help_panel=FACES_PANEL,
    ),
]
Clahe = Annotated[
    bool,
    typer.Option(
        "--clahe",
        help="Equalise each face crop's luminance first.",
        metavar=FLAG,
        rich_help_panel=FACES_PANEL,
    ),
]
OnlyCenterFace = Annotated[
    bool,
    typer.Option(
        "--only-center-face",
        help="Enhance only the face nearest the centre.",
        metavar=FLAG,
        rich_help_panel=FACES_PANEL,
    ),
]
Aligned = Annotated[
    bool,
    typer.Option(
        "--aligned",
        help="Photos: the inputs already are aligned faces.",
        metavar=FLAG,
        rich_help_panel=FACES_PANEL,
    ),
]

Mask = Annotated[
    MaskKind,
    typer.Option(
        help="Paste-back mask: parse (a face parser's: face, hair, glasses, neck) or box (a "
        "feathered square).",
        metavar="KIND",
        parser=choice(MaskKind, "mask"),
        rich_help_panel=FACES_PANEL,
    ),
]
ParseModel = Annotated[
    ParserName,
    typer.Option(
        help=f"Face parser for --mask parse: {values(ParserName, ' or ')} (faster).",
        metavar="NAME",
        parser=choice(ParserName, "face parser"),
        rich_help_panel=FACES_PANEL,
    ),
]
ColorMatch = Annotated[
    bool,
    typer.Option(
        "--color-match",
        help="Give each restored face its input's colour (mean, chroma spread).",
        metavar=FLAG,
        rich_help_panel=FACES_PANEL,
    ),
]

Temporal = Annotated[
    TemporalMode,
    typer.Option(
        help="Video: steady each face over the frames: off, ema (GPEN's style and features "
        "averaged per track, less when it moves fast) or flow (the previous restored face "
        "carried by optical flow where it agrees).",
        metavar="MODE",
        parser=choice(TemporalMode, "temporal mode"),
        rich_help_panel=VIDEO_PANEL,
    ),
]

# Upscaling

Upscale = Annotated[
    float,
    typer.Option(
        help="Output size, times the input's; faces are restored at the output's resolution.",
        metavar="F",
        min=1.0,
        rich_help_panel=UPSCALE_PANEL,
    ),
]
BgUpsampler = Annotated[
    str,
    typer.Option(
        help="Background upscaling with --upscale: none (a resize), RealESRGAN_x2plus, "
        "RealESRGAN_x4plus, realesr-general-x4v3, or a super-resolution model file.",
        metavar="NAME|FILE",
        rich_help_panel=UPSCALE_PANEL,
    ),
]
BgTile = Annotated[
    int,
    typer.Option(
        help="Background network tile size in input pixels (less memory); 0: whole frames.",
        metavar="PX",
        min=0,
        rich_help_panel=UPSCALE_PANEL,
    ),
]

# Video and streams

DetectEvery = Annotated[
    int,
    typer.Option(
        help="Detect on the full frame every N frames (and when a face is lost); track in between.",
        metavar="N",
        min=1,
        rich_help_panel=VIDEO_PANEL,
    ),
]
Codec = Annotated[
    str,
    typer.Option(
        help="Encoder: libx264, libx265, ffv1, h264_nvenc, hevc_nvenc...",
        metavar="NAME",
        rich_help_panel=VIDEO_PANEL,
    ),
]
Crf = Annotated[
    int,
    typer.Option(
        help="Constant rate factor (x264, x265).", metavar="N", rich_help_panel=VIDEO_PANEL
    ),
]
Preset = Annotated[
    str, typer.Option(help="Encoder preset.", metavar="NAME", rich_help_panel=VIDEO_PANEL)
]
PixFmt = Annotated[
    str | None,
    typer.Option(
        help="Output pixel format. " + default("the input's, when the encoder has it"),
        metavar="NAME",
        show_default=False,
        rich_help_panel=VIDEO_PANEL,
    ),
]
Realtime = Annotated[
    bool,
    typer.Option(
        "--realtime",
        help="Pace a file at its frame rate, as a live source.",
        metavar=FLAG,
        rich_help_panel=VIDEO_PANEL,
    ),
]
Reconnect = Annotated[
    str,
    typer.Option(
        help="Live sources: reconnection attempts when the stream drops.",
        metavar="N|forever",
        rich_help_panel=VIDEO_PANEL,
    ),
]
Transport = Annotated[
    RtspTransport,
    typer.Option(
        help=f"RTSP inputs' transport: {values(RtspTransport, ' or ')}.",
        metavar="NAME",
        parser=choice(RtspTransport, "RTSP transport"),
        rich_help_panel=VIDEO_PANEL,
    ),
]
Timeout = Annotated[
    float,
    typer.Option(
        help="Seconds to wait when opening, reading or writing a stream.",
        metavar="S",
        min=0.1,
        rich_help_panel=VIDEO_PANEL,
    ),
]
InputSize = Annotated[
    str | None,
    typer.Option(
        help="Webcam capture size. " + default("the camera's"),
        metavar="WxH",
        show_default=False,
        rich_help_panel=VIDEO_PANEL,
    ),
]
InputFps = Annotated[
    float | None,
    typer.Option(
        help="Webcam capture rate. " + default("the camera's"),
        metavar="FPS",
        show_default=False,
        rich_help_panel=VIDEO_PANEL,
    ),
]
Ray = Annotated[
    str | None,
    typer.Option(
        help="Run the videos on a Ray cluster (pip install streamgpen\\[ray]): auto (the running "
        "one), local (started here) or the cluster's address; long videos are split at "
        "keyframes. " + default("this process"),
        metavar="auto|local|ADDRESS",
        show_default=False,
        rich_help_panel=PERFORMANCE_PANEL,
    ),
]
Preview = Annotated[
    str | None,
    typer.Option(
        help="Serve a live side-by-side page (host 127.0.0.1 unless given; 8765 is customary). "
        + default("off"),
        metavar="[HOST:]PORT",
        show_default=False,
        rich_help_panel=VIDEO_PANEL,
    ),
]
PreviewToken = Annotated[
    str | None,
    typer.Option(
        help="The preview's access token. " + default("none on loopback, else generated"),
        metavar="TOKEN",
        show_default=False,
        rich_help_panel=VIDEO_PANEL,
    ),
]

# Performance

BatchSize = Annotated[
    int,
    typer.Option(
        help="Faces per GPEN batch.", metavar="N", min=1, rich_help_panel=PERFORMANCE_PANEL
    ),
]
Device = Annotated[
    str,
    typer.Option(
        help="cpu, cuda, cuda:N or auto (CUDA when available).",
        metavar="DEV",
        rich_help_panel=PERFORMANCE_PANEL,
    ),
]
PrecisionOption = Annotated[
    Precision,
    typer.Option(
        "--precision",
        help=f"GPEN's weights: {values(Precision, ' or ')}; auto is fp16 on CUDA, fp32 elsewhere.",
        metavar="NAME",
        parser=choice(Precision, "precision"),
        rich_help_panel=PERFORMANCE_PANEL,
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile GPEN: slower start-up; `streamgpen bench --compile` tells whether "
        "it pays.",
        metavar=FLAG,
        rich_help_panel=PERFORMANCE_PANEL,
    ),
]

# Bench only

BenchModels = Annotated[
    list[BenchModel] | None,
    typer.Option(
        "--model",
        help=f"{values(BenchModel, ' and/or ')} (repeat the option). "
        + default("both; GPEN-BFR-256 with --quick"),
        metavar="NAME",
        parser=choice(BenchModel, "model"),
        show_default=False,
        rich_help_panel=MODEL_PANEL,
    ),
]
BenchBatchSizes = Annotated[
    list[int] | None,
    typer.Option(
        "--batch-size",
        help="Batch sizes to time (repeat the option). "
        + default("1 to 32 on CUDA, 1 to 4 on CPU, 1 and 2 with --quick"),
        metavar="N",
        min=1,
        show_default=False,
        rich_help_panel=PERFORMANCE_PANEL,
    ),
]
BenchCompile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="Also time torch.compile'd modes (minutes of compilation per batch size).",
        metavar=FLAG,
        rich_help_panel=PERFORMANCE_PANEL,
    ),
]
Quick = Annotated[
    bool, typer.Option("--quick", help="A short run: GPEN-BFR-256 only.", metavar=FLAG)
]
JsonReport = Annotated[
    Path | None,
    typer.Option(
        "--json",
        help="Write the report as JSON here.",
        metavar="FILE",
        dir_okay=False,
        show_default=False,
    ),
]
Frames = Annotated[
    int | None,
    typer.Option(
        help="End-to-end clip length in frames; 0 skips the end-to-end run. "
        + default("600 on CUDA, 16 on CPU; 120 and 4 with --quick"),
        metavar="N",
        min=0,
        show_default=False,
    ),
]
Profile = Annotated[
    Path | None,
    typer.Option(
        help="Profile the end-to-end file run with torch.profiler: a Chrome trace here, the "
        "top ops in the report.",
        metavar="FILE",
        dir_okay=False,
        show_default=False,
    ),
]
