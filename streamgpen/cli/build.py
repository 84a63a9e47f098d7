"""From ``streamgpen enhance``'s parsed options to the :class:`~streamgpen.config.RunConfig`.

:func:`run_config` takes the options by their parameter names; each ``*_config`` function below
builds one part of the tree from the options it names and ignores the others. Values that are
text on the command line (``--reconnect``, ``--input-size``, ``--preview``) are parsed here; a
bad one is a UserError of one line. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streamgpen.config import (
    BG_UPSAMPLERS,
    DetectorConfig,
    DetectorName,
    EnhancerConfig,
    ExtrasConfig,
    FaceConfig,
    ImageFormat,
    MaskKind,
    ModelConfig,
    ModelName,
    NamingConfig,
    ParserName,
    Precision,
    PreviewConfig,
    RtspTransport,
    RunConfig,
    SinkConfig,
    SourceConfig,
    TemporalMode,
    UpscaleConfig,
    VideoConfig,
)
from streamgpen.errors import UserError

FOREVER = "forever"


def run_config(
    *,
    source: str | list[str],
    output: str | None,
    quiet: bool,
    ray: str | None = None,
    **options: Any,
) -> RunConfig:
    """The RunConfig of one ``streamgpen enhance`` from its options (keyword arguments named as
    ``enhance``'s parameters; ``source``: its inputs). ``output`` stays the string the user
    typed."""
    inputs = (source,) if isinstance(source, str) else tuple(source)
    return RunConfig(
        inputs=inputs,
        output=output,
        enhancer=enhancer_config(**options),
        video=video_config(**options),
        extras=extras_config(**options),
        naming=naming_config(**options),
        preview=preview_config(**options),
        ray=ray,
        quiet=quiet,
    )


def enhancer_config(*, device: str, weights_dir: Path | None, **options: Any) -> EnhancerConfig:
    """Model, detector and per-face settings, the device and the weights directory."""
    return EnhancerConfig(
        model=model_config(**options),
        detector=detector_config(**options),
        faces=face_config(**options),
        upscale=upscale_config(**options),
        device=device,
        weights_dir=weights_dir,
    )


def model_config(
    *,
    model: ModelName,
    model_path: Path | None,
    precision: Precision,
    compile_: bool,
    batch_size: int,
    **_: Any,
) -> ModelConfig:
    """``--model``/``--model-path``, ``--precision``, ``--compile``, ``--batch-size``."""
    return ModelConfig(
        name=model, path=model_path, precision=precision, compile=compile_, batch_size=batch_size
    )


def detector_config(
    *, detector: DetectorName, det_size: int, det_threshold: float, min_face: int, **_: Any
) -> DetectorConfig:
    """``--detector``, ``--det-size``, ``--det-threshold``, ``--min-face``."""
    return DetectorConfig(
        name=detector, det_size=det_size, threshold=det_threshold, min_face=min_face
    )


def face_config(
    *,
    blend: float,
    clahe: bool,
    only_center_face: bool,
    aligned: bool,
    mask: MaskKind,
    parse_model: ParserName,
    color_match: bool,
    temporal: TemporalMode,
    **_: Any,
) -> FaceConfig:
    """``--blend``, ``--clahe``, ``--only-center-face``, ``--aligned``, ``--mask``,
    ``--parse-model``, ``--color-match``, ``--temporal``."""
    return FaceConfig(
        blend=blend,
        clahe=clahe,
        only_center_face=only_center_face,
        aligned=aligned,
        mask=mask,
        parse_model=parse_model,
        color_match=color_match,
        temporal=temporal,
    )


def upscale_config(*, upscale: float, bg_upsampler: str, bg_tile: int, **_: Any) -> UpscaleConfig:
    """``--upscale``, ``--bg-upsampler`` (a known name or an existing file), ``--bg-tile``."""
    if bg_upsampler not in BG_UPSAMPLERS and not Path(bg_upsampler).is_file():
        raise UserError(
            f"--bg-upsampler {bg_upsampler}: not a file, nor one of {', '.join(BG_UPSAMPLERS)}"
        )
    return UpscaleConfig(factor=upscale, bg_upsampler=bg_upsampler, bg_tile=bg_tile)


def video_config(*, detect_every: int, **options: Any) -> VideoConfig:
    """``--detect-every``, the source's and the encoder's options."""
    return VideoConfig(
        detect_every=detect_every, source=source_config(**options), sink=sink_config(**options)
    )


def source_config(
    *,
    realtime: bool,
    reconnect: str,
    rtsp_transport: RtspTransport,
    timeout: float,
    input_size: str | None,
    input_fps: float | None,
    **_: Any,
) -> SourceConfig:
    """How the video input is opened; ``--reconnect forever`` is -1."""
    return SourceConfig(
        realtime=realtime,
        reconnect=parse_reconnect(reconnect),
        rtsp_transport=rtsp_transport,
        timeout=timeout,
        input_size=parse_size(input_size),
        input_fps=input_fps,
    )


def sink_config(*, codec: str, crf: int, preset: str, pix_fmt: str | None, **_: Any) -> SinkConfig:
    """``--codec``, ``--crf``, ``--preset``, ``--pix-fmt``."""
    return SinkConfig(codec=codec, crf=crf, preset=preset, pix_fmt=pix_fmt)


def extras_config(
    *, draw: bool, save_faces: Path | None, faces_json: Path | None, **_: Any
) -> ExtrasConfig:
    """``--draw``, ``--save-faces``, ``--faces-json``."""
    return ExtrasConfig(draw=draw, save_faces=save_faces, faces_json=faces_json)


def naming_config(*, suffix: str | None, ext: ImageFormat, **_: Any) -> NamingConfig:
    """``--suffix``, ``--ext``. The suffix goes into file names: no folder, not empty."""
    if suffix is not None and (suffix.strip(".") == "" or any(c in suffix for c in "/\\")):
        raise UserError(f"--suffix {suffix!r}: a part of a file name (no / or \\, not empty)")
    return NamingConfig(suffix=suffix, ext=ext)


def preview_config(
    *, preview: str | None, preview_token: str | None, **_: Any
) -> PreviewConfig | None:
    """``--preview [HOST:]PORT`` and its token; None without ``--preview``."""
    if preview is None:
        if preview_token is not None:
            raise UserError("--preview-token needs --preview [HOST:]PORT")
        return None
    # Imported here: starlette and uvicorn, which `--help` should not wait for.
    from streamgpen.web.server import parse_bind

    try:
        host, port = parse_bind(preview)
    except ValueError as e:
        raise UserError(f"--preview {preview}: {e}") from None
    return PreviewConfig(host=host, port=port, token=preview_token)


def parse_reconnect(value: str) -> int:
    """``--reconnect N|forever``: N attempts, -1 for forever."""
    if value == FOREVER:
        return -1
    try:
        count = int(value)
    except ValueError:
        raise UserError(f"--reconnect takes a number or 'forever', not {value!r}") from None
    if count < 0:
        raise UserError("--reconnect must be >= 0 (or 'forever')")
    return count


def parse_size(value: str | None) -> tuple[int, int] | None:
    """``--input-size WxH`` as ``(width, height)``."""
    if value is None:
        return None
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise UserError(f"--input-size takes WIDTHxHEIGHT, e.g. 1280x720, not {value!r}") from None
    if width <= 0 or height <= 0:
        raise UserError(f"--input-size needs a positive width and height, not {value!r}")
    return width, height
