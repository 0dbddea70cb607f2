"""The ``evertrain`` command: a thin typer app, one module per subcommand."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from evertrain.cli import data as data_cmd
from evertrain.cli import evaluate as evaluate_cmd
from evertrain.cli import export as export_cmd
from evertrain.cli import import_hf as import_hf_cmd
from evertrain.cli import inspect as inspect_cmd
from evertrain.cli import status as status_cmd
from evertrain.cli import train as train_cmd
from evertrain.cli import ui as ui_cmd
from evertrain.cli import verify as verify_cmd
from evertrain.cli import watch as watch_cmd

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Continuous, exactly-resumable PyTorch training.",
)


def _version(value: bool) -> None:
    if value:
        from evertrain import __version__

        typer.echo(f"evertrain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """Continuous, exactly-resumable PyTorch training."""


app.command("train")(train_cmd.train)
app.command("inspect")(inspect_cmd.inspect)
app.command("verify")(verify_cmd.verify)
app.command("export")(export_cmd.export)
app.command("import-hf")(import_hf_cmd.import_hf)
app.command("eval")(evaluate_cmd.evaluate)
app.command("ui")(ui_cmd.ui)
app.command("watch")(watch_cmd.watch)
app.command("status")(status_cmd.status)
app.add_typer(data_cmd.app, name="data")


def setup_logging(verbose: bool = False) -> None:
    """Log lines to stderr: rich-formatted on a terminal, plain otherwise (CI, files)."""
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("evertrain")
    root.handlers[:] = [handler]
    root.setLevel(level)


def main() -> None:
    setup_logging()
    app()
