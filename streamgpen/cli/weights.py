"""``streamgpen weights list|download|verify``: the model files and where they come from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from streamgpen.cli.options import WeightsDir

weights_app = typer.Typer(help="List, download and check model weights.", no_args_is_help=True)


COLUMNS = ("name", "kind", "file", "present", "url")


@weights_app.command("list")
def weights_list(weights_dir: WeightsDir = None) -> None:
    """List the known models, whether each is in the weights directory, and its URL."""
    from streamgpen.models import weights

    directory = weights.weights_dir(weights_dir)
    rows = [
        (
            spec.name,
            spec.kind,
            spec.filename,
            "yes" if (directory / spec.filename).is_file() else "no",
            weights.source_url(spec),
        )
        for spec in weights.MODELS.values()
    ]
    console = Console()
    title = f"weights directory: {directory}"
    table = _table(title, rows, COLUMNS)
    if _width(console, table) <= console.width:
        console.print(table)
        return
    # Too narrow for the URLs in the table, where rich would cut them mid-word: each goes after
    # the table on a line of its own, unwrapped (the terminal folds it), so it copies whole.
    # The kind goes too (the name tells it): then the table fits 80 columns.
    narrow = [(name, filename, present) for name, _, filename, present, _ in rows]
    console.print(_table(title, narrow, ("name", "file", "present")))
    console.print("URLs:", highlight=False)
    for name, *_, url in rows:
        console.print(f"  {name}: {url}", soft_wrap=True, highlight=False)


def _width(console: Console, table: Table) -> int:
    """The width ``table`` takes without wrapping a cell (unbounded by the terminal's)."""
    unbounded = console.options.update_width(10_000)
    return Measurement.get(console, unbounded, table).maximum


def _table(title: str, rows: list[tuple[str, ...]], columns: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


@weights_app.command("download")
def weights_download(
    name: Annotated[str, typer.Argument(help="Model name, as `weights list` shows it.")],
    weights_dir: WeightsDir = None,
) -> None:
    """Download a model into the weights directory (resuming a partial download) and check it.

    Prints the file's path. A file already present is left as it is.
    """
    from streamgpen.models import weights

    typer.echo(weights.ensure(name, weights.weights_dir(weights_dir)))


@weights_app.command("verify")
def weights_verify(
    file: Annotated[Path, typer.Argument(help="Checkpoint file to check.", dir_okay=False)],
) -> None:
    """Check that FILE is a loadable GPEN or RetinaFace checkpoint and describe it."""
    from streamgpen.models import weights

    typer.echo(f"{file}: {weights.verify(file)}")
