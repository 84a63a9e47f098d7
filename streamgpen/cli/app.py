"""The ``streamgpen`` command line: the typer ``app``, its commands and ``main()``.

The commands live one to a module (:mod:`.enhance`, :mod:`.weights`, :mod:`.bench`) and share
the option declarations of :mod:`.options`; ``enhance`` builds a
:class:`~streamgpen.config.RunConfig` (:mod:`.build`) and hands it to
:func:`streamgpen.apps.enhance.run`. Commands import what needs torch, PyAV or cv2 inside their
bodies, so that ``--help`` and ``--version`` answer without the seconds torch takes to import.
``main()`` runs the app: a ``UserError`` ends in one ``streamgpen: error: ...`` line on stderr
and its exit code (2), Ctrl-C in exit code 130 without a traceback.
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Annotated

import typer

from streamgpen import __version__
from streamgpen.cli.bench import bench
from streamgpen.cli.enhance import enhance
from streamgpen.cli.evaluate import evaluate
from streamgpen.cli.serve import serve
from streamgpen.cli.weights import weights_app
from streamgpen.errors import UserError

app = typer.Typer(
    name="streamgpen",
    help="GPEN face enhancement for photos, video files, RTSP streams and webcams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help texts are Rich markup (the option panels need Rich): a literal "[" is written "\[".
    rich_markup_mode="rich",
)
app.add_typer(weights_app, name="weights")


def _help(doc: str | None) -> str:
    """A docstring as ``--help`` prints it: one line per paragraph, which Rich then wraps (in
    Rich markup mode typer keeps the docstring's own line breaks)."""
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)


app.command(help=_help(enhance.__doc__))(enhance)
app.command(help=_help(serve.__doc__))(serve)
app.command(help=_help(bench.__doc__))(bench)
app.command(name="eval", help=_help(evaluate.__doc__))(evaluate)


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


def main() -> None:
    """The console entry point: run ``app``.

    A UserError (raised by a command, or by an option's parser) is one ``streamgpen: error:``
    line on stderr and exit code ``e.exit_code``; Ctrl-C is exit code 130, no traceback (typer
    turns one inside a command into 130 itself; this covers the rest, start-up included).
    """
    # Library modules report recoverable trouble (a dropped stream, a transcoded track) through
    # logging: one line each on stderr.
    logging.basicConfig(level=logging.WARNING, format="streamgpen: %(message)s")
    try:
        app(prog_name="streamgpen")
    except UserError as e:
        message = " ".join(str(e).split())
        print(f"streamgpen: error: {message}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        # The work is over: a Ctrl-C during interpreter shutdown must not kill the process by
        # the signal (and lose the exit code) after a clean end.
        from streamgpen.apps.signals import ignore_interrupts

        ignore_interrupts()
