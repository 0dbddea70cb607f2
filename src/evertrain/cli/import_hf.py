"""``evertrain import-hf HF_CHECKPOINT_DIR --run-dir RUN --config CONFIG.yaml``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from evertrain.cli.model_errors import model_user_errors


def import_hf(
    hf_checkpoint: Annotated[
        Path, typer.Argument(help="a transformers.Trainer checkpoint-N directory")
    ],
    run_dir: Annotated[Path, typer.Option("--run-dir", help="new run directory")],
    config: Annotated[Path, typer.Option("--config", help="YAML config to continue with")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: dotted.key=value (repeatable)")
    ] = None,
) -> None:
    """Turn a Hugging Face Trainer checkpoint (weights, optimizer moments, global_step,
    RNG) into an evertrain checkpoint; continue with `evertrain train CONFIG --run-dir RUN`.
    Only safetensors and weights_only torch files are read; training_args.bin never is."""
    from evertrain.config import load_config
    from evertrain.importers.hf_trainer import import_hf_checkpoint

    with model_user_errors():
        cfg = load_config(config, set_ or [])
        result = import_hf_checkpoint(
            hf_checkpoint, run_dir, cfg, log_note=lambda n: typer.echo(f"note: {n}", err=True)
        )
    typer.echo(json.dumps(result.to_json()))
