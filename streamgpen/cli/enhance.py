"""``streamgpen enhance``: the options, turned into a RunConfig, handed to the enhance app."""

from __future__ import annotations

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


def enhance(
    source: o.Source,
    output: o.Output = None,
    suffix: o.Suffix = None,
    ext: o.Ext = ImageFormat.AUTO,
    save_faces: o.SaveFaces = None,
    faces_json: o.FacesJson = None,
    draw: o.Draw = False,
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
    aligned: o.Aligned = False,
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
    realtime: o.Realtime = False,
    reconnect: o.Reconnect = "5",
    rtsp_transport: o.Transport = RtspTransport.TCP,
    timeout: o.Timeout = 10.0,
    input_size: o.InputSize = None,
    input_fps: o.InputFps = None,
    preview: o.Preview = None,
    preview_token: o.PreviewToken = None,
    batch_size: o.BatchSize = 8,
    device: o.Device = "auto",
    precision: o.PrecisionOption = Precision.AUTO,
    compile_: o.Compile = False,
    ray: o.Ray = None,
) -> None:
    """Restore every face in photos, folders, videos, streams and webcams."""
    # locals() is exactly the parameters here: every option, by its name, and nothing else.
    config = run_config(**locals())
    from streamgpen.apps import enhance as app  # torch and PyAV: not for --help

    raise typer.Exit(app.run(config))
