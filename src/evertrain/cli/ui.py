"""``evertrain ui RUN``: serve the web dashboard of a run (see evertrain.dashboard)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evertrain.dashboard.inbox import DEFAULT_MAX_UPLOAD_BYTES
from evertrain.dashboard.server import DEFAULT_HOST, DEFAULT_PORT


def ui(
    run_dir: Annotated[Path, typer.Argument(help="the run directory to show")],
    host: Annotated[
        str,
        typer.Option(help="address to listen on; any non-loopback address requires the token"),
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="TCP port (0: pick a free one)")] = DEFAULT_PORT,
    max_upload_mb: Annotated[
        float, typer.Option(help="largest file accepted by the upload form, in MiB")
    ] = DEFAULT_MAX_UPLOAD_BYTES / 2**20,
    compare: Annotated[
        list[Path] | None,
        typer.Option(
            "--compare",
            help="another run directory, or a directory of runs, whose training loss is "
            "drawn with this run's in one chart (repeatable)",
        ),
    ] = None,
) -> None:
    """Serve the dashboard until Ctrl-C; works whether or not the daemon is running.

    The access token is created on first use in RUN/ui-token (mode 0600) and printed once.
    Actions (upload, pause/resume, snapshot, verify) always need it; on a non-loopback
    --host every request does. RUN may also be a directory holding several run
    directories: the page then compares their loss curves (as --compare does).
    """
    from evertrain.dashboard.server import DashboardError, serve

    if max_upload_mb <= 0:
        typer.secho("error: --max-upload-mb must be > 0", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    try:
        serve(run_dir, host, port, int(max_upload_mb * 2**20), compare=compare or [])
    except DashboardError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
