"""One-line messages (exit code 2) for the errors of export, import-hf and eval that
:func:`evertrain.cli.errors.user_errors` does not cover."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from evertrain.cli.errors import user_errors


@contextlib.contextmanager
def model_user_errors() -> Iterator[None]:
    """Like :func:`~evertrain.cli.errors.user_errors`, plus model loading errors, an
    existing output directory and refused Hugging Face checkpoints."""
    from evertrain.importers.hf_trainer import ImportHFError
    from evertrain.models import ModelCacheError, ModelSourceError

    with user_errors():
        try:
            yield
        except (ModelSourceError, ModelCacheError, FileExistsError, ImportHFError) as e:
            typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None
