"""``evertrain inspect PATH``: what a run or a checkpoint holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from evertrain.cli.errors import user_errors
from evertrain.cli.verify import checkpoint_dirs


def describe_checkpoint(path: Path) -> dict[str, Any]:
    """Step, epoch, LR, data cursor, files with sizes, and config of one checkpoint.

    Raises:
        evertrain.checkpoint.CheckpointError: it does not verify.
    """
    from evertrain.checkpoint import read_checkpoint

    ck = read_checkpoint(path)
    s = ck.states
    return {
        "path": str(path),
        "global_step": s["progress"]["global_step"],
        "epoch": s["data_cursor"]["epoch"],
        "lr": ck.manifest.get("summary", {}).get("lr"),
        "data_cursor": {k: v for k, v in s["data_cursor"].items() if k != "version"},
        "examples_seen": s["progress"]["examples_seen"],
        "tokens_seen": s["progress"]["tokens_seen"],
        "metrics": ck.manifest.get("summary", {}).get("metrics", {}),
        "files": {name: f["size"] for name, f in ck.manifest["files"].items()},
        "bytes": sum(f["size"] for f in ck.manifest["files"].values()),
        "versions": {k: v for k, v in s["versions"].items() if k != "version"},
        "config": s["config"]["config"],
    }


def inspect(
    path: Annotated[Path, typer.Argument(help="a run directory or one checkpoint")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show step, epoch, LR, data cursor, files, sizes and config."""
    with user_errors():
        dirs = checkpoint_dirs(path)
        if not dirs:
            raise FileNotFoundError(f"{path}: no checkpoints")
        info = [describe_checkpoint(d) for d in dirs]
    if as_json:
        typer.echo(json.dumps(info if len(info) > 1 else info[0], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(path))
    for col in ("checkpoint", "step", "epoch", "lr", "examples", "tokens", "bytes", "metrics"):
        table.add_column(col)
    for d in info:
        table.add_row(
            Path(d["path"]).name,
            str(d["global_step"]),
            str(d["epoch"]),
            f"{d['lr']:.3g}" if d["lr"] is not None else "-",
            str(d["examples_seen"]),
            str(d["tokens_seen"]),
            str(d["bytes"]),
            ", ".join(f"{k}={v:.4g}" for k, v in d["metrics"].items()),
        )
    Console().print(table)
    last = info[-1]
    typer.echo(f"data cursor: {last['data_cursor']}")
    typer.echo(f"files: {last['files']}")
    typer.echo("config: " + json.dumps(last["config"]))
