"""``streamgpen enhance``: one entry point for photos, folders, videos, streams and webcams.

The order matters to a user: what can be refused is refused before anything slow (the input and
output are planned, the preview's port is bound, every missing weights file is listed at once),
then the models load, then the work runs with Ctrl-C/SIGTERM stopping it cleanly.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from streamgpen.config import RunConfig


def run(config: RunConfig) -> int:
    """Enhance ``config.inputs`` into ``config.output``; returns the exit code (0, or 1 when
    some photos of a folder, or some of several videos, failed). Raises UserError for a user's
    mistake, KeyboardInterrupt after a clean stop on Ctrl-C/SIGTERM (exit code 130)."""
    for spec in config.inputs:
        _check_input(spec, Path(spec))
    from streamgpen.apps.inputs import is_many
    from streamgpen.apps.signals import clean_interrupts
    from streamgpen.media.images import is_image_path
    from streamgpen.progress import stderr_console

    path = Path(config.input)
    many = config.ray is not None or is_many(config.inputs)
    is_photo = not many and (path.is_dir() or is_image_path(path))
    with ExitStack() as stack:
        stack.enter_context(clean_interrupts())
        console = stderr_console()
        if many:
            return _videos(config, stack, console)
        if is_photo:
            return _photos(config, path, console)
        preview = _preview(config, stack, console)
        enhancer = load_enhancer(config)
        announce(config, enhancer, console)
        from streamgpen.apps.videos import enhance_video

        enhance_video(config, enhancer, console=console, preview=preview)
        return 0


def _check_input(spec: str, path: Path) -> None:
    """Refuse a missing input in a moment, before torch, cv2 and PyAV take seconds to import."""
    from streamgpen.errors import UserError
    from streamgpen.files import require_regular_file
    from streamgpen.media.urls import is_live_input

    if is_live_input(spec) or "://" in spec:
        return  # reached (or refused) when opened
    if not path.exists():
        raise UserError(f"input file not found: {spec} (no such file or folder)")
    require_regular_file(path)


def _videos(config: RunConfig, stack: ExitStack, console) -> int:
    """Several videos with one device worker (and a live page picking them), or (``--ray``)
    videos on a Ray cluster."""
    from streamgpen.apps.inputs import plan_videos
    from streamgpen.errors import UserError

    plans = plan_videos(config.inputs, config.output)
    if config.ray is not None and config.preview is not None:
        raise UserError("--preview shows a run in this process, not one on Ray (--ray)")
    if config.ray is not None:
        from streamgpen.scale.archive import run_archive

        return run_archive(config, [(p.input, p.output) for p in plans], console=console)
    preview = _preview(config, stack, console, inputs=[p.name for p in plans])
    enhancer = load_enhancer(config)
    announce(config, enhancer, console)
    from streamgpen.apps.many import enhance_many

    return enhance_many(config, enhancer, plans, console=console, preview=preview)


def _photos(config: RunConfig, path: Path, console) -> int:
    from streamgpen.apps.photos import PhotoOptions, enhance_photos, plan_outputs

    pairs = plan_outputs(path, config.output, config.naming)
    enhancer = load_enhancer(config)
    announce(config, enhancer, console)
    extras = config.extras
    options = PhotoOptions(
        aligned=config.enhancer.faces.aligned,
        draw=extras.draw,
        save_faces=extras.save_faces,
        faces_json=extras.faces_json,
        quiet=config.quiet,
    )
    summary = enhance_photos(enhancer, pairs, options)
    return 1 if summary.failed else 0


def load_enhancer(config: RunConfig):
    """The enhancer, after checking that every weights file the run needs is there (or can be
    downloaded): one message names all that are missing."""
    from streamgpen.enhancer import Enhancer, required_weights
    from streamgpen.errors import UserError
    from streamgpen.models import weights

    directory = weights.weights_dir(config.enhancer.weights_dir)
    missing = []
    for name in required_weights(config.enhancer):
        try:
            weights.ensure(name, directory, progress=not config.quiet)
        except UserError:
            missing.append(name)
    if missing:
        raise UserError(weights.missing_weights(missing, directory))
    return Enhancer.from_config(config.enhancer, progress=not config.quiet)


def _preview(config: RunConfig, stack: ExitStack, console, inputs: list[str] | None = None):
    """The live preview, bound before the models load (a port in use fails in a second);
    ``inputs``: the names of several inputs, each with its page."""
    if config.preview is None:
        return None
    from streamgpen.pipeline.packet import Controls
    from streamgpen.preview.server import PreviewServer

    settings = config.preview
    server = PreviewServer(
        settings.host,
        settings.port,
        token=settings.token,
        controls=Controls(blend=config.enhancer.faces.blend),
        inputs=inputs or (),
    )
    stack.enter_context(server)
    console.print(f"preview: {server.url}", markup=False, soft_wrap=True)
    return server


# What a CPU user should try first: measured on a 2-core machine, GPEN-BFR-512 with RetinaFace-R50
# took ~13.7 s per face, GPEN-BFR-256 with the mobilenet detector ~0.15 s; GPEN's ParseNet mask
# costs ~5.6 s a face there and BiSeNet's ~0.4 s, so the fast recipe pastes the feathered box.
FAST_CPU_RECIPE = (
    "--model GPEN-BFR-256 --detector retinaface_mobile0.25 --mask box --detect-every 10"
)


def announce(config: RunConfig, enhancer, console) -> None:
    """Say which device, precision, model and detector run; on the CPU, what a face costs
    (one timed forward) and the fast recipe, since the defaults are made for a GPU."""
    restorer = enhancer.restorer
    if config.quiet or restorer.is_identity:  # identity: a check of detection, nothing to time
        return
    precision = str(restorer.dtype).removeprefix("torch.").replace("float", "fp")
    model = config.enhancer.model.label
    detector = config.enhancer.detector.name
    line = f"{model} ({precision}, {restorer.size}px) on {enhancer.device}, detector {detector}"
    console.print(line, markup=False, highlight=False, soft_wrap=True)
    if enhancer.device.type != "cpu":
        return
    per_face = _seconds_per_face(enhancer)
    console.print(
        f"no GPU: about {per_face:.2f} s per face on this CPU. Faster: {FAST_CPU_RECIPE} "
        "(or --device cuda on a machine with an NVIDIA GPU)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _seconds_per_face(enhancer) -> float:
    """One face through the restorer and the face parser, timed. A single call: on the CPU
    (eager, no graphs) the first forward costs about what the others do, and GPEN-BFR-512 takes
    ~14 s there."""
    import time

    import torch

    restorer = enhancer.restorer
    crop = torch.zeros(1, 3, restorer.size, restorer.size, device=restorer.device)
    start = time.perf_counter()
    restored = restorer(crop)
    if enhancer.parser is not None:
        enhancer.parser.masks(restored)
    return time.perf_counter() - start
