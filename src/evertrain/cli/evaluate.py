"""``evertrain eval RUN [--step N | --config CONFIG]``: held-out loss, perplexity and
greedy generations, written to ``RUN/eval/``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evertrain.cli.model_errors import model_user_errors


def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="run directory")],
    step: Annotated[
        int | None, typer.Option(help="global_step of the checkpoint; default: the newest")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="evaluate the untrained model this config builds (step 0) instead"),
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", help="prompt for a greedy generation (repeatable)"),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens generated per prompt")] = 48,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON report")] = False,
) -> None:
    """Evaluate a checkpoint (or the untrained model) on the run's held-out data."""
    import json

    from evertrain.config import ConfigError
    from evertrain.evaluate import DEFAULT_PROMPTS, evaluate_run, write_eval_report

    with model_user_errors():
        if step is not None and config is not None:
            raise ConfigError("give --step or --config, not both")
        if max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        report = evaluate_run(
            run_dir,
            step=step,
            config=config,
            prompts=tuple(prompt) if prompt else DEFAULT_PROMPTS,
            max_new_tokens=max_new_tokens,
            write=False,
        )
        jpath, tpath = write_eval_report(run_dir, report)
    typer.echo(json.dumps(report.to_json(), indent=2) if as_json else report.to_text(), nl=False)
    typer.echo(f"report: {jpath} {tpath}", err=True)
