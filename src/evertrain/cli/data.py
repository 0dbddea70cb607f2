"""``evertrain data ...``: write the bundled real data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="Write bundled data sets.")


@app.command("pydoc")
def pydoc(
    out_dir: Annotated[Path, typer.Argument(help="directory to write the JSONL files into")],
    num_files: Annotated[int, typer.Option(help="how many files to split the topics into")] = 6,
) -> None:
    """Write CPython's reference documentation (pydoc_data.topics) as JSONL files by topic."""
    from evertrain.data.pydoc import write_pydoc_files

    for p in write_pydoc_files(out_dir, num_files):
        typer.echo(str(p))
