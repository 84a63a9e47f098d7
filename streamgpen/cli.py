"""The ``streamgpen`` command line.

Commands are registered on the module-level ``app`` (and sub-apps such as ``weights_app``);
``main()`` runs it and turns a ``UserError`` into one ``streamgpen: error: ...`` line on stderr.
Commands import what needs torch inside their bodies, so that ``--help`` and ``--version`` answer
without the seconds torch takes to import.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from streamgpen import __version__
from streamgpen.errors import UserError

app = typer.Typer(
    name="streamgpen",
    help="GPEN face enhancement for photos, video files, RTSP streams and webcams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
weights_app = typer.Typer(
    help="List, download and check model weights.",
    no_args_is_help=True,
)
app.add_typer(weights_app, name="weights")

WeightsDirOption = Annotated[
    Path | None,
    typer.Option(
        "--weights-dir",
        help=(
            "Directory of model files [default: $STREAMGPEN_WEIGHTS, else "
            "$XDG_CACHE_HOME/streamgpen/weights, else ~/.cache/streamgpen/weights]."
        ),
        show_default=False,
        file_okay=False,
    ),
]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"streamgpen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """GPEN face enhancement for photos, video files, RTSP streams and webcams."""


@weights_app.command("list")
def weights_list(weights_dir: WeightsDirOption = None) -> None:
    """List the known models, whether each is in the weights directory, and its URL."""
    from streamgpen import weights

    directory = weights.weights_dir(weights_dir)
    table = Table(title=f"weights directory: {directory}", title_justify="left")
    for column in ("name", "kind", "file", "present", "url"):
        table.add_column(column, overflow="fold")
    for spec in weights.MODELS.values():
        present = "yes" if (directory / spec.filename).is_file() else "no"
        url = weights.source_url(spec) or "none: place the file by hand"
        table.add_row(spec.name, spec.kind, spec.filename, present, url)
    Console().print(table)


@weights_app.command("download")
def weights_download(
    name: Annotated[str, typer.Argument(help="Model name, as `weights list` shows it.")],
    weights_dir: WeightsDirOption = None,
) -> None:
    """Download a model into the weights directory (resuming a partial download) and check it.

    Prints the file's path. A file already present is left as it is.
    """
    from streamgpen import weights

    path = weights.ensure(name, weights.weights_dir(weights_dir))
    typer.echo(path)


@weights_app.command("verify")
def weights_verify(
    file: Annotated[Path, typer.Argument(help="Checkpoint file to check.", dir_okay=False)],
) -> None:
    """Check that FILE is a loadable GPEN or RetinaFace checkpoint and describe it."""
    from streamgpen import weights

    typer.echo(f"{file}: {weights.verify(file)}")


DEVICE_HELP = "cpu, cuda, cuda:N or auto (CUDA when available)."
VIDEO = "Video and streams"


@app.command()
def enhance(
    source: Annotated[
        str,
        typer.Argument(
            help="A photo, a folder of photos, a video file, rtsp://... or another stream URL, "
            "or webcam:N.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="Output photo, folder, or video file [default: beside the input, *_enhanced].",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str, typer.Option(help="GPEN-BFR-512, GPEN-BFR-256, GPEN-BFR-1024 or identity.")
    ] = "GPEN-BFR-512",
    model_path: Annotated[
        Path | None,
        typer.Option(
            help="Any GPEN checkpoint; its architecture is read from its shapes.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    detector: Annotated[
        str, typer.Option(help="retinaface_resnet50 or retinaface_mobile0.25.")
    ] = "retinaface_resnet50",
    det_size: Annotated[
        int, typer.Option(help="Detection runs on a copy whose long side is at most this.", min=64)
    ] = 1280,
    det_threshold: Annotated[
        float, typer.Option(help="Minimum face probability.", min=0.0, max=1.0)
    ] = 0.9,
    min_face: Annotated[int, typer.Option(help="Smallest face kept, in pixels.", min=1)] = 10,
    batch_size: Annotated[int, typer.Option(help="Faces per GPEN batch.", min=1)] = 8,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    precision: Annotated[
        str,
        typer.Option(help="GPEN's weights: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16."),
    ] = "auto",
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile GPEN before CUDA graph capture: slower start-up; "
            "see `streamgpen bench --compile` for whether it pays on your GPU.",
        ),
    ] = False,
    blend: Annotated[
        float, typer.Option(help="1: restored faces, 0: original faces.", min=0.0, max=1.0)
    ] = 1.0,
    clahe: Annotated[
        bool, typer.Option("--clahe", help="Equalise each face crop's luminance first.")
    ] = False,
    only_center_face: Annotated[
        bool, typer.Option("--only-center-face", help="Enhance only the face nearest the centre.")
    ] = False,
    aligned: Annotated[
        bool, typer.Option("--aligned", help="Inputs already are aligned faces (photos).")
    ] = False,
    draw: Annotated[
        bool, typer.Option("--draw", help="Draw boxes, landmarks and scores on the output.")
    ] = False,
    save_faces: Annotated[
        Path | None,
        typer.Option(
            help="Write aligned, restored and side-by-side crops here (photos).",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    faces_json: Annotated[
        Path | None,
        typer.Option(
            help="Write one JSON line per face found.", dir_okay=False, show_default=False
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary.")] = False,
    weights_dir: WeightsDirOption = None,
    detect_every: Annotated[
        int,
        typer.Option(
            help="Video: full-frame detection every N frames (and when a face is lost); "
            "tracked in between.",
            min=1,
            rich_help_panel=VIDEO,
        ),
    ] = 5,
    codec: Annotated[
        str,
        typer.Option(
            help="libx264, libx265, ffv1, h264_nvenc or hevc_nvenc.", rich_help_panel=VIDEO
        ),
    ] = "libx264",
    crf: Annotated[
        int, typer.Option(help="Constant rate factor (x264/x265).", rich_help_panel=VIDEO)
    ] = 18,
    preset: Annotated[str, typer.Option(help="Encoder preset.", rich_help_panel=VIDEO)] = "medium",
    pix_fmt: Annotated[
        str | None,
        typer.Option(
            help="Output pixel format [default: the input's when the encoder supports it].",
            rich_help_panel=VIDEO,
            show_default=False,
        ),
    ] = None,
    realtime: Annotated[
        bool,
        typer.Option(
            "--realtime",
            help="Pace a file at its frame rate, as a live source.",
            rich_help_panel=VIDEO,
        ),
    ] = False,
    reconnect: Annotated[
        str,
        typer.Option(
            help="Live sources: reconnect attempts when the stream drops (N or forever).",
            rich_help_panel=VIDEO,
        ),
    ] = "5",
    rtsp_transport: Annotated[str, typer.Option(help="tcp or udp.", rich_help_panel=VIDEO)] = "tcp",
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds to wait when opening or reading a stream.", min=0.1, rich_help_panel=VIDEO
        ),
    ] = 10.0,
    input_size: Annotated[
        str | None,
        typer.Option(help="Webcam capture size, WxH.", rich_help_panel=VIDEO, show_default=False),
    ] = None,
    input_fps: Annotated[
        float | None,
        typer.Option(help="Webcam capture rate.", rich_help_panel=VIDEO, show_default=False),
    ] = None,
    preview: Annotated[
        str | None,
        typer.Option(
            help="Serve a live side-by-side page at [HOST:]PORT (host 127.0.0.1 unless given; "
            "8765 is the customary port). Beyond loopback the page needs a token.",
            rich_help_panel=VIDEO,
            show_default=False,
        ),
    ] = None,
    preview_token: Annotated[
        str | None,
        typer.Option(
            help="The preview's access token [default: generated when not on loopback].",
            rich_help_panel=VIDEO,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Restore every face in photos, folders, videos, streams and webcams."""
    from streamgpen.enhancer import Enhancer
    from streamgpen.io.images import is_image_path
    from streamgpen.photos import PhotoOptions, enhance_photos, plan_outputs

    path = Path(source)
    is_photo = path.is_dir() or is_image_path(path)
    pairs = plan_outputs(path, output) if is_photo else None
    enhancer = Enhancer(
        model,
        model_path=model_path,
        detector=detector,
        device=device,
        weights_dir=weights_dir,
        batch_size=batch_size,
        precision=precision,
        compile=compile_,
        det_size=det_size,
        det_threshold=det_threshold,
        min_face=min_face,
        blend=blend,
        clahe=clahe,
        only_center_face=only_center_face,
    )
    if pairs is None:
        from streamgpen.pipeline import VideoOptions
        from streamgpen.preview import PreviewServer, parse_bind
        from streamgpen.videos import SinkOptions, SourceOptions, enhance_video

        server = None
        if preview is not None:
            try:
                host, port = parse_bind(preview)
                server = PreviewServer(host, port, token=preview_token)
            except ValueError as e:
                raise UserError(f"--preview {preview}: {e}") from None

        sources = SourceOptions(
            realtime,
            _parse_reconnect(reconnect),
            rtsp_transport,
            timeout,
            _parse_size(input_size),
            input_fps,
        )
        enhance_video(
            source,
            None if output is None else str(output),
            enhancer,
            detect_every=detect_every,
            source_options=sources,
            sink_options=SinkOptions(codec, crf, preset, pix_fmt),
            video_options=VideoOptions(draw=draw, model_name=str(model_path or model)),
            faces_json=faces_json,
            quiet=quiet,
            preview=server,
        )
        return
    options = PhotoOptions(aligned, draw, save_faces, faces_json, quiet)
    summary = enhance_photos(enhancer, pairs, options)
    if summary.failed:
        raise typer.Exit(1)


def _parse_reconnect(value: str) -> int:
    if value == "forever":
        return -1
    try:
        count = int(value)
    except ValueError:
        raise UserError(f"--reconnect takes a number or 'forever', not {value!r}") from None
    if count < 0:
        raise UserError("--reconnect must be >= 0 (or 'forever')")
    return count


def _parse_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise UserError(f"--input-size takes WIDTHxHEIGHT, e.g. 1280x720, not {value!r}") from None
    return width, height


@app.command()
def bench(
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="GPEN-BFR-256 and/or GPEN-BFR-512 (repeat the option).", show_default=False
        ),
    ] = None,
    batch_size: Annotated[
        list[int] | None,
        typer.Option(help="Batch sizes to time (repeat the option).", show_default=False),
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A short run: GPEN-BFR-256 only.")] = False,
    json_path: Annotated[
        Path | None,
        typer.Option(
            "--json", help="Write the report as JSON here.", dir_okay=False, show_default=False
        ),
    ] = None,
    frames: Annotated[
        int | None,
        typer.Option(
            help="End-to-end clip length in frames; 0 skips the end-to-end run "
            "[default: 600 on CUDA, 16 on CPU; 120 and 4 with --quick].",
            min=0,
            show_default=False,
        ),
    ] = None,
    detector: Annotated[
        str, typer.Option(help="Detector of the end-to-end run.")
    ] = "retinaface_mobile0.25",
    weights_dir: WeightsDirOption = None,
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Also time torch.compile'd modes (minutes of compilation per batch size).",
        ),
    ] = False,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="Profile the end-to-end file run with torch.profiler: Chrome trace here, "
            "top ops in the report.",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Measure GPEN's speed on this machine (random weights: speed does not depend on them).

    Model only (faces/s per model, precision and batch size, against the official eager fp32
    batch-1 way) and end to end (a generated 1080p clip with four moving faces).
    """
    from streamgpen.bench import format_jpeg_decode, format_pipeline, format_report, run_bench

    report = run_bench(
        device,
        model or None,
        batch_size or None,
        quick,
        json_path,
        frames,
        detector,
        weights_dir,
        compiled=compile_,
        profile=profile,
    )
    # Wide enough for the tables when the output is a file or a pipe (rich assumes 80 columns).
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(format_report(report))
    console.print(format_jpeg_decode(report), highlight=False)
    pipeline = format_pipeline(report)
    if pipeline is not None:
        console.print(pipeline)


def main() -> None:
    """The console entry point: run ``app``; user errors end in one stderr line, exit code 2.

    Typer handles usage errors (exit 2) and Ctrl-C inside a command (exit 130) itself.
    """
    # Library modules report recoverable trouble (a dropped stream, a transcoded track) through
    # logging: one line each on stderr.
    logging.basicConfig(level=logging.WARNING, format="streamgpen: %(message)s")
    try:
        app()
    except UserError as e:
        message = " ".join(str(e).split())
        print(f"streamgpen: error: {message}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
