"""``evertrain inspect PATH``: what a run or a checkpoint holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from evertrain.cli.errors import user_errors
from evertrain.cli.verify import checkpoint_dirs


def _stream_position(stream: dict[str, Any]) -> dict[str, Any]:
    """The ``stream`` owner of a watch checkpoint, trimmed for reading: files finished and
    the file in flight (id, name, steps/examples done of total, cursor without version)."""
    cur = stream.get("current")
    cursor = stream.get("cursor")
    return {
        "files_done": len(stream.get("completed") or []),
        "completed": list(stream.get("completed") or []),
        "current_file": None
        if cur is None
        else {
            "id": cur.get("id"),
            "name": cur.get("name"),
            "steps_done": cur.get("steps_done"),
            "steps_total": cur.get("steps_total"),
            "examples_done": cur.get("examples"),
            "cursor": None
            if cursor is None
            else {k: v for k, v in cursor.items() if k != "version"},
        },
    }


def describe_checkpoint(path: Path) -> dict[str, Any]:
    """Step, epoch, LR, data position, files with sizes, and config of one checkpoint.

    The data position is ``data_cursor`` for an ``evertrain train`` checkpoint and
    ``stream`` (files done, the file in flight and its cursor) for an ``evertrain watch``
    one; the other key is None. ``epoch`` is the cursor's epoch, None between watch files.

    Raises:
        evertrain.checkpoint.CheckpointError: it does not verify.
    """
    from evertrain.checkpoint import read_checkpoint

    ck = read_checkpoint(path)
    s = ck.states
    # A watch checkpoint has no run-wide data cursor: its position lives in the daemon's
    # ``stream`` owner, one cursor per file (see evertrain.daemon.stream).
    data_cursor = s.get("data_cursor")
    stream = _stream_position(s["stream"]) if "stream" in s else None
    if data_cursor is not None:
        epoch = data_cursor["epoch"]
    elif stream is not None and stream["current_file"] and stream["current_file"]["cursor"]:
        epoch = stream["current_file"]["cursor"].get("epoch")
    else:
        epoch = None
    return {
        "path": str(path),
        "global_step": s["progress"]["global_step"],
        "epoch": epoch,
        "lr": ck.manifest.get("summary", {}).get("lr"),
        "data_cursor": None
        if data_cursor is None
        else {k: v for k, v in data_cursor.items() if k != "version"},
        "stream": stream,
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
    """Show step, epoch, LR, data position, files, sizes and config.

    For a watch run the data position is the stream's (files done, the file in flight),
    and the ledger's rows per status are shown too; its ``--json`` is then
    ``{"checkpoints": [...], "ledger": {...}}``. Exit 2: no checkpoints, or a damaged
    checkpoint or ledger.
    """
    from evertrain.daemon.ledger import LedgerError

    with user_errors():
        dirs = checkpoint_dirs(path)
        if not dirs:
            raise FileNotFoundError(f"{path}: no checkpoints")
        info = [describe_checkpoint(d) for d in dirs]
    try:
        ledger = _ledger_summary(path)
    except LedgerError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    if as_json:
        out: Any = info if len(info) > 1 else info[0]
        if ledger is not None:
            out = {"checkpoints": info, "ledger": ledger}
        typer.echo(json.dumps(out, indent=2))
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
            "-" if d["epoch"] is None else str(d["epoch"]),
            f"{d['lr']:.3g}" if d["lr"] is not None else "-",
            str(d["examples_seen"]),
            str(d["tokens_seen"]),
            str(d["bytes"]),
            ", ".join(f"{k}={v:.4g}" for k, v in d["metrics"].items()),
        )
    Console().print(table)
    last = info[-1]
    if last["stream"] is not None:
        st = last["stream"]
        cur = st["current_file"]
        where = (
            "between files"
            if cur is None
            else f"file #{cur['id']} {cur['name']}: step {cur['steps_done']}/"
            f"{cur['steps_total']}, {cur['examples_done']} examples, cursor {cur['cursor']}"
        )
        typer.echo(f"stream: {st['files_done']} file(s) done {st['completed']}; {where}")
    else:
        typer.echo(f"data cursor: {last['data_cursor']}")
    if ledger is not None:
        typer.echo(
            "ledger: "
            + ", ".join(f"{k}={v}" for k, v in sorted(ledger["counts"].items()))
            + f"; {ledger['examples']} examples, {ledger['tokens']} tokens in done files"
        )
    typer.echo(f"files: {last['files']}")
    typer.echo("config: " + json.dumps(last["config"]))


def _ledger_summary(path: Path) -> dict[str, Any] | None:
    """Rows per status and the examples/tokens of done files in a watch run's ledger, or
    None when ``path`` is not a watch run directory.

    Raises:
        evertrain.daemon.LedgerError: the ledger is unreadable.
    """
    if not (path / "ledger.sqlite").is_file():
        return None
    from evertrain.daemon import Ledger

    # Read-only: inspect must be safe while a daemon is writing this run.
    led = Ledger(path / "ledger.sqlite", readonly=True)
    try:
        done = led.rows("done")
        return {
            "counts": led.counts(),
            "examples": sum(r.examples or 0 for r in done),
            "tokens": sum(r.tokens or 0 for r in done),
        }
    finally:
        led.close()
