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
    """Enhance ``config.input`` into ``config.output``; returns the exit code (0, or 1 when some
    photos of a folder failed). Raises UserError for a user's mistake, KeyboardInterrupt after a
    clean stop on Ctrl-C/SIGTERM (exit code 130)."""
    from streamgpen.apps.signals import clean_interrupts
    from streamgpen.media.images import is_image_path
    from streamgpen.progress import stderr_console

    path = Path(config.input)
    is_photo = path.is_dir() or is_image_path(path)
    with ExitStack() as stack:
        stack.enter_context(clean_interrupts())
        console = stderr_console()
        if is_photo:
            return _photos(config, path)
        preview = _preview(config, stack, console)
        enhancer = _enhancer(config)
        from streamgpen.apps.videos import enhance_video

        enhance_video(config, enhancer, console=console, preview=preview)
        return 0


def _photos(config: RunConfig, path: Path) -> int:
    from streamgpen.apps.photos import PhotoOptions, enhance_photos, plan_outputs

    pairs = plan_outputs(path, config.output)
    enhancer = _enhancer(config)
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


def _enhancer(config: RunConfig):
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


def _preview(config: RunConfig, stack: ExitStack, console):
    """The live preview, bound before the models load (a port in use fails in a second)."""
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
    )
    stack.enter_context(server)
    console.print(f"preview: {server.url}", markup=False, soft_wrap=True)
    return server
