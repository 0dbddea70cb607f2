"""``evertrain eval RUN [--step N | --config CONFIG]``: held-out loss, perplexity and
greedy generations, written to ``RUN/eval/``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
    """Evaluate a checkpoint (or the untrained model) on the run's held-out data.

    A watch run is scored on the held-out rows of every file the checkpoint trained on,
    per file and token-weighted overall. Exit 2: bad options, missing or damaged
    checkpoint, data files or (watch run) ledger.
    """
    import json

    from evertrain.config import ConfigError
    from evertrain.daemon.ledger import LedgerError
    from evertrain.evaluate import DEFAULT_PROMPTS, evaluate_run, write_eval_report

    with model_user_errors(), _ledger_errors(LedgerError):
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


@contextlib.contextmanager
def _ledger_errors(kind: type[Exception]) -> Iterator[None]:
    """A ``kind`` (the ledger's error, imported lazily by the caller) as a one-line message
    and exit 2, like the other errors of bad input."""
    try:
        yield
    except kind as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
