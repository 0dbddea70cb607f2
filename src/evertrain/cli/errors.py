"""Turn the errors a user can fix into one-line messages and exit code 2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from evertrain.config import ConfigError
from evertrain.state import StateError


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print ``error: <message>`` (no traceback) for config, data, state and resume errors."""
    from evertrain.checkpoint import CheckpointError
    from evertrain.data import DataError
    from evertrain.runlock import RunDirNotWritableError, RunLockedError
    from evertrain.trackers import TrackerError
    from evertrain.trainer import ResumeError

    try:
        yield
    except (
        ConfigError,
        StateError,
        CheckpointError,
        DataError,
        ResumeError,
        RunLockedError,
        RunDirNotWritableError,
        TrackerError,
        FileNotFoundError,
    ) as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
