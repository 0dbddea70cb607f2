"""Turn the errors a user can fix into one-line messages: exit code 2 for bad input, 75 for
a full or read-only disk."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from evertrain.config import ConfigError
from evertrain.state import StateError

# sysexits.h EX_TEMPFAIL: a temporary failure, to be retried (free space, run again)
EXIT_DISK = 75


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print ``error: <message>`` (no traceback) for config, data, state and resume errors
    (exit 2), and for a full or read-only disk met by ``train``, or by ``watch`` under
    torchrun, where the group stops rather than pauses (exit :data:`EXIT_DISK`)."""
    from evertrain.checkpoint import CheckpointError
    from evertrain.daemon.diskwait import describe, disk_error
    from evertrain.data import DataError
    from evertrain.runlock import RunDirNotWritableError, RunLockedError
    from evertrain.trackers import TrackerError
    from evertrain.trainer import ResumeError

    try:
        try:
            yield
        except Exception as e:
            err = disk_error(e)
            if err is None:
                raise
            # checkpoints commit atomically and metrics.jsonl is rewound on resume, so
            # nothing committed is lost: the next start goes on from the newest checkpoint
            typer.secho(
                f"error: disk full or read-only: {describe(err)}; nothing committed is lost: "
                "free space (or remount read-write) and run the same command to resume from "
                "the newest checkpoint",
                err=True,
                fg=typer.colors.RED,
            )
            raise typer.Exit(EXIT_DISK) from None
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
