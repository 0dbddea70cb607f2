"""``evertrain verify PATH``: check every checkpoint under PATH (or the one given)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def checkpoint_dirs(path: Path) -> list[Path]:
    """Checkpoint directories at or under ``path`` (a checkpoint, a run, or checkpoints/)."""
    if (path / "manifest.json").exists() or path.name.startswith("step-"):
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def verify(
    path: Annotated[Path, typer.Argument(help="a run, its checkpoints/, or one checkpoint")],
) -> None:
    """Exit 0 when every checkpoint verifies, else 1 naming each bad file and why."""
    from evertrain.checkpoint import verify_checkpoint

    if not path.exists():
        typer.secho(f"error: {path}: no such file or directory", err=True, fg="red")
        raise typer.Exit(2)
    dirs = checkpoint_dirs(path)
    if not dirs:
        typer.secho(f"error: {path}: no checkpoints found", err=True, fg="red")
        raise typer.Exit(1)
    bad = 0
    for d in dirs:
        problems = verify_checkpoint(d)
        fatal = [p for p in problems if p.fatal]
        bad += bool(fatal)
        typer.echo(f"{'FAIL' if fatal else 'ok  '} {d}")
        for p in problems:
            typer.echo(f"     {'error' if p.fatal else 'warning'}: {p.file}: {p.message}")
    raise typer.Exit(1 if bad else 0)
