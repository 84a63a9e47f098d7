"""The configuration tree of a run: frozen, keyword-only, built once (by the CLI or by a caller).

The command line's options map one to one onto these fields; the Python API takes the same
objects. Choices are Enums (their values are what the user types), so ``--help`` lists them and a
bad value is refused before anything heavy is imported. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path


class ModelName(StrEnum):
    """The restoration networks known by name (``--model``)."""

    GPEN_BFR_512 = "GPEN-BFR-512"
    GPEN_BFR_256 = "GPEN-BFR-256"
    GPEN_BFR_1024 = "GPEN-BFR-1024"
    GPEN_BFR_2048 = "GPEN-BFR-2048"
    IDENTITY = "identity"  # crops unchanged: shows detection and alignment


class DetectorName(StrEnum):
    """The face detectors (``--detector``)."""

    RETINAFACE_RESNET50 = "retinaface_resnet50"
    RETINAFACE_MOBILE = "retinaface_mobile0.25"


class Precision(StrEnum):
    """GPEN's weights and activations (``--precision``); auto: fp16 on CUDA, fp32 elsewhere."""

    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class MaskKind(StrEnum):
    """How restored faces are pasted back (``--mask``): ``parse`` keeps the face, hair, glasses
    and neck that a face parser finds (what every anchor pastes), ``box`` a feathered square."""

    PARSE = "parse"
    BOX = "box"


class ParserName(StrEnum):
    """The face parsers (``--parse-model``): facexlib's ParseNet (GPEN's) or BiSeNet (GFPGAN's;
    about 20x cheaper on a CPU)."""

    PARSENET = "parsenet"
    BISENET = "bisenet"


class TemporalMode(StrEnum):
    """How a video's restored faces are steadied from frame to frame (``--temporal``): ``off``
    (each frame on its own), ``ema`` (GPEN's style code and encoder features averaged per track,
    less so when the face moves fast), ``flow`` (the previous restored face, carried by the
    crop's optical flow, blended where it agrees with the current one)."""

    OFF = "off"
    EMA = "ema"
    FLOW = "flow"


class ImageFormat(StrEnum):
    """Photo outputs' format (``--ext``): ``auto`` keeps each input's; the others are the
    extensions streamgpen writes (``media.images.IMAGE_EXTENSIONS``, without the dot)."""

    AUTO = "auto"
    JPG = "jpg"
    JPEG = "jpeg"
    PNG = "png"
    BMP = "bmp"
    TIF = "tif"
    TIFF = "tiff"
    WEBP = "webp"
    JP2 = "jp2"


class RtspTransport(StrEnum):
    """How RTSP inputs carry their packets (``--rtsp-transport``)."""

    TCP = "tcp"
    UDP = "udp"


def value_of(choice: Enum | str) -> str:
    """The string a user types for ``choice`` (an Enum member or already a string)."""
    return choice.value if isinstance(choice, Enum) else str(choice)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which restorer runs and how: ``model`` by name, or any GPEN checkpoint at ``path``."""

    name: ModelName | str = ModelName.GPEN_BFR_512
    path: Path | None = None
    precision: Precision | str = Precision.AUTO
    compile: bool = False
    batch_size: int = 8

    @property
    def label(self) -> str:
        """What the user asked for, for logs and the preview."""
        return str(self.path) if self.path is not None else value_of(self.name)


@dataclass(frozen=True, kw_only=True)
class DetectorConfig:
    """RetinaFace's network and thresholds (``--detector``, ``--det-size``...)."""

    name: DetectorName | str = DetectorName.RETINAFACE_RESNET50
    det_size: int = 1280
    threshold: float = 0.9
    min_face: int = 10


@dataclass(frozen=True, kw_only=True)
class FaceConfig:
    """What happens to each face: blend, CLAHE, one face only, inputs already aligned, the
    paste-back mask (and its parser), colour matched to the input's; in video, how each
    track's face is steadied over the frames (``temporal``)."""

    blend: float = 1.0
    clahe: bool = False
    only_center_face: bool = False
    aligned: bool = False
    mask: MaskKind | str = MaskKind.PARSE
    parse_model: ParserName | str = ParserName.PARSENET
    color_match: bool = False
    temporal: TemporalMode | str = TemporalMode.FLOW


# ``--bg-upsampler`` by name: a resize, or the Real-ESRGAN models of the weights registry
# (tests check the two lists agree; here, so a typo is refused before torch is imported).
BG_UPSAMPLERS = ("none", "RealESRGAN_x2plus", "RealESRGAN_x4plus", "realesr-general-x4v3")


@dataclass(frozen=True, kw_only=True)
class UpscaleConfig:
    """The output's size (``--upscale``: F times the input's) and how the background gets there
    (``--bg-upsampler``: ``none`` for a resize, a super-resolution model's name or file;
    ``--bg-tile``: its tile size in input pixels, 0 untiled)."""

    factor: float = 1.0
    bg_upsampler: str = "none"
    bg_tile: int = 400


@dataclass(frozen=True, kw_only=True)
class EnhancerConfig:
    """Everything the enhancer (detect, align, restore, paste) needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    faces: FaceConfig = field(default_factory=FaceConfig)
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)
    device: str = "auto"
    weights_dir: Path | None = None


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """How to open a video input (``--realtime``, ``--reconnect``, ``--rtsp-transport``...).

    ``reconnect``: None never (files), N attempts, -1 forever. ``timeout`` bounds opening, reading
    and writing a stream, and how long a stalled output may hold the run.
    """

    realtime: bool = False
    reconnect: int | None = 5
    rtsp_transport: RtspTransport | str = RtspTransport.TCP
    timeout: float = 10.0
    input_size: tuple[int, int] | None = None
    input_fps: float | None = None


@dataclass(frozen=True, kw_only=True)
class SinkConfig:
    """How to encode video output (``--codec``, ``--crf``, ``--preset``, ``--pix-fmt``)."""

    codec: str = "libx264"
    crf: int = 18
    preset: str = "medium"
    pix_fmt: str | None = None


@dataclass(frozen=True, kw_only=True)
class VideoConfig:
    """Video-only settings: tracking cadence, the input and the output encoder."""

    detect_every: int = 5
    source: SourceConfig = field(default_factory=SourceConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)


@dataclass(frozen=True, kw_only=True)
class ExtrasConfig:
    """What is written besides the enhanced output (``--draw``, ``--save-faces``,
    ``--faces-json``)."""

    draw: bool = False
    save_faces: Path | None = None
    faces_json: Path | None = None


@dataclass(frozen=True, kw_only=True)
class NamingConfig:
    """How photo outputs are named, as GFPGAN names them (``--suffix``, ``--ext``): STEM_SUFFIX.EXT.

    ``suffix`` None adds none (an output beside the input gets ``enhanced``); ``ext`` auto keeps
    the input's extension.
    """

    suffix: str | None = None
    ext: ImageFormat | str = ImageFormat.AUTO


@dataclass(frozen=True, kw_only=True)
class PreviewConfig:
    """The live preview page (``--preview [HOST:]PORT``, ``--preview-token``)."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One ``streamgpen enhance``: an input, where it goes, and how.

    ``output`` is a string, not a path: it may be ``rtsp://host/x`` or ``frames/`` (a trailing
    slash means a folder), which ``pathlib`` would rewrite. ``inputs``: every input of
    ``enhance IN1 IN2 ...``, ``input`` the first (given one of the two, the other follows).
    ``ray``: run the videos on a Ray
    cluster (``auto``, ``local`` or a cluster's address); None runs them in this process.
    """

    input: str = ""
    inputs: tuple[str, ...] = ()
    output: str | None = None
    enhancer: EnhancerConfig = field(default_factory=EnhancerConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    extras: ExtrasConfig = field(default_factory=ExtrasConfig)
    naming: NamingConfig = field(default_factory=NamingConfig)
    preview: PreviewConfig | None = None
    ray: str | None = None
    quiet: bool = False

    def __post_init__(self):
        if not self.inputs:
            object.__setattr__(self, "inputs", (self.input,))
        elif not self.input:
            object.__setattr__(self, "input", self.inputs[0])


MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class ServiceLimits:
    """What the service accepts and holds.

    ``max_image_bytes``/``max_image_pixels``: one photo upload (413 beyond; the pixels are read
    from the header before decoding). ``max_video_bytes``: one job's upload. ``max_queue``:
    image requests waiting for the device (503 with Retry-After beyond). ``batch_window_s``: how
    long the device worker waits for more requests to join a round once one is in.
    ``spool_quota_bytes``: the spool's size (uploads and results) beyond which new jobs are
    refused. ``max_jobs``: jobs queued or running. ``max_streams``: live streams at once.
    ``source_dir``: the one folder whose files a job may name as its ``source`` (None: none).
    ``max_upscale``: the largest ``upscale`` a request may ask (a 12 Mpx photo at 4x is already a
    200 Mpx answer).
    """

    max_image_bytes: int = 64 * MiB
    max_image_pixels: int = 100_000_000
    max_video_bytes: int = 8192 * MiB
    max_queue: int = 64
    batch_window_s: float = 0.01
    spool_quota_bytes: int = 20 * 1024 * MiB
    max_jobs: int = 32
    max_streams: int = 8
    source_dir: Path | None = None
    max_upscale: float = 4.0
