"""``evertrain export RUN --out DIR [--step N] [--merge]``: a PEFT adapter or a full model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from evertrain.cli.model_errors import model_user_errors


def export(
    run_dir: Annotated[Path, typer.Argument(help="run directory (holds checkpoints/)")],
    out: Annotated[Path, typer.Option("--out", help="output directory (new or empty)")],
    step: Annotated[
        int | None, typer.Option(help="global_step of the checkpoint; default: the newest")
    ] = None,
    merge: Annotated[
        bool, typer.Option(help="LoRA runs: merge the adapter and write a full model")
    ] = False,
) -> None:
    """Write a checkpoint as a PEFT adapter (LoRA) or as a full Hugging Face model
    (--merge, or a full fine-tuning run); both load offline with transformers/peft."""
    from evertrain.export import export_run

    with model_user_errors():
        result = export_run(run_dir, out, step=step, merge=merge)
    typer.echo(json.dumps(result.to_json()))
