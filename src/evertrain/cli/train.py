"""``evertrain train CONFIG --run-dir RUN``: train, resuming from RUN's newest valid checkpoint."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from evertrain.cli.model_errors import model_user_errors
from evertrain.config import RunConfig
from evertrain.errors import DivergedError

EXIT_DIVERGED = 3  # the loss or gradient norm became NaN/inf (train.on_nonfinite: stop)
# a stop signal's shell convention, 128 + its number: 130 for SIGINT, 143 for SIGTERM
STOP_SIGNALS = {"SIGINT": 2, "SIGTERM": 15}


def train(
    config: Annotated[
        Path | None, typer.Argument(help="YAML config; omit to resume RUN with its stored config")
    ] = None,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="run directory")] = Path(
        "runs/default"
    ),
    max_steps: Annotated[
        int | None,
        typer.Option(help="stop after this global_step (the schedule keeps its own length)"),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: dotted.key=value (repeatable)")
    ] = None,
    allow_config_change: Annotated[
        bool, typer.Option(help="resume although a breaking config change was made")
    ] = False,
    fresh: Annotated[
        bool, typer.Option(help="start at step 0 even if RUN has checkpoints (they are kept)")
    ] = False,
) -> None:
    """Train; resumes automatically from the newest checkpoint in RUN that verifies."""
    from evertrain.cli.progress import attach_progress
    from evertrain.config import load_config
    from evertrain.recipe import build_trainer

    with model_user_errors():
        if config is None:
            cfg = _stored_config(run_dir, set_ or [])
        else:
            cfg = load_config(config, set_ or [])
        trainer = build_trainer(cfg, run_dir, allow_config_change=allow_config_change, fresh=fresh)
        if fresh:
            trainer.start_fresh()
        else:
            trainer.resume()
        # under torchrun only rank 0 shows progress and prints the result
        shown = attach_progress(trainer, max_steps) if trainer.rank == 0 else nullcontext()
        with shown:
            try:
                outcome = trainer.fit(max_steps)
            except DivergedError as e:
                trainer.close()
                typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
                raise typer.Exit(EXIT_DIVERGED) from None
        trainer.close()
    result = {
        "outcome": outcome,
        "global_step": trainer.progress.global_step,
        "skipped_steps": trainer.progress.skipped_steps,
        "run_dir": str(run_dir),
        **trainer.last_eval,
    }
    rank = trainer.rank
    from evertrain import distributed

    del trainer, shown  # the model wrappers hold the process group
    distributed.finish()
    if rank == 0:
        typer.echo(json.dumps(result))
    if outcome in STOP_SIGNALS:
        # saved but not finished: `evertrain train ... && next-step` must not go on
        raise typer.Exit(128 + STOP_SIGNALS[outcome])


def _stored_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    from evertrain.checkpoint import CheckpointManager, KeepLast
    from evertrain.config import ConfigError, apply_overrides, config_from_json

    manager = CheckpointManager(run_dir / "checkpoints", KeepLast(1))
    info = manager.latest_valid()
    if info is None:
        raise ConfigError(f"{run_dir}: no valid checkpoint to take the config from; give CONFIG")
    stored = manager.load(info).states["config"]["config"]
    return config_from_json(apply_overrides(stored, overrides))
