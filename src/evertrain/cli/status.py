"""``evertrain status RUN [--json]``: what the watch daemon of RUN is doing, and its files.

Reads ``RUN/status.json`` and ``RUN/ledger.sqlite`` only (works while the daemon runs, and
after it stopped).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

LIVE_STATES = ("starting", "idle", "validating", "training", "paused", "stopping")


def status(
    run_dir: Annotated[Path, typer.Argument(help="run directory of `evertrain watch`")],
    json_: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
    files: Annotated[
        int, typer.Option(help="ledger rows to show, newest last (0 = all)", min=0)
    ] = 20,
) -> None:
    """Print the daemon's status (a table) and the files of its ledger."""
    from evertrain.daemon.ledger import LedgerError
    from evertrain.daemon.status import read_status

    try:
        st = read_status(run_dir)
        rows = ledger_rows(run_dir)
    except (ValueError, LedgerError) as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    if st is None and rows is None:
        typer.secho(
            f"error: {run_dir}: no status.json and no ledger.sqlite; has `evertrain watch "
            f"{run_dir}` run there?",
            err=True,
            fg=typer.colors.RED,
        )
        raise typer.Exit(2)
    running = daemon_running(st)
    if json_:
        out: dict[str, Any] = dict(st or {})
        out["daemon_running"] = running
        out["files"] = rows or []
        typer.echo(json.dumps(out, indent=1))
        return
    console = console_for_tables()
    if st is not None:
        console.print(status_table(st, running))
    if rows:
        shown = rows if files == 0 else rows[-files:]
        console.print(files_table(shown, len(rows)))


def console_for_tables() -> Any:
    """A rich console; 160 columns when not a terminal (rich's 80 would cut the table)."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def ledger_rows(run_dir: Path) -> list[dict[str, Any]] | None:
    """Every row of ``RUN/ledger.sqlite`` as dicts (None if there is no ledger).

    Raises:
        evertrain.daemon.LedgerError: the ledger cannot be read.
    """
    from evertrain.daemon.ledger import Ledger

    path = Path(run_dir) / "ledger.sqlite"
    if not path.exists():
        return None
    ledger = Ledger(path, readonly=True)
    try:
        return [r.to_json() for r in ledger.rows()]
    finally:
        ledger.close()


def daemon_running(st: dict[str, Any] | None) -> bool:
    """Whether the process that wrote ``st`` is alive and has not stopped."""
    if st is None or st.get("state") not in LIVE_STATES:
        return False
    pid = st.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ago(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "?"
    s = max(time.time() - t, 0)
    return (
        f"{s:.0f}s ago"
        if s < 120
        else f"{s / 60:.0f}min ago"
        if s < 7200
        else f"{s / 3600:.1f}h ago"
    )


def _num(x: Any, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def status_table(st: dict[str, Any], running: bool) -> Any:
    """A rich table of a status record."""
    from rich.table import Table

    t = Table(title="evertrain watch", show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    state = str(st.get("state"))
    if not running and state in LIVE_STATES:
        state += " (daemon not running: it was stopped or crashed)"
    t.add_row("state", f"{state}, updated {_ago(st.get('updated'))}, pid {st.get('pid')}")
    t.add_row(
        "global_step",
        f"{st.get('global_step')}  loss {_num(st.get('loss'))}  lr {_num(st.get('lr'), '.2e')}"
        f"  {_num(st.get('tokens_per_second'), '.0f')} tok/s",
    )
    cur = st.get("current_file")
    if cur:
        eta = cur.get("eta_seconds")
        t.add_row(
            "current file",
            f"#{cur['id']} {cur['name']}: step {cur['steps_done']}/{cur['steps_total']} "
            f"({cur['percent']:.1f}%), examples {cur['examples_done']}/{cur['examples_total']}"
            + ("" if eta is None else f", eta {eta:.0f}s"),
        )
    queue = st.get("queue") or []
    t.add_row("queue", ", ".join(queue) if queue else "empty")
    if st.get("inbox"):
        t.add_row("settling in inbox", ", ".join(st["inbox"]))
    ck = st.get("last_checkpoint")
    if ck:
        t.add_row(
            "last checkpoint", f"step {ck['global_step']} ({ck['path']}), {_ago(ck.get('time'))}"
        )
    sn = st.get("last_snapshot")
    if sn:
        t.add_row(
            "last snapshot", f"step {sn['global_step']} ({sn['path']}), {_ago(sn.get('time'))}"
        )
    counts = st.get("counts") or {}
    t.add_row("files", ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none yet")
    if st.get("warning"):
        t.add_row("[red]warning[/red]", f"[red]{st['warning']}[/red]")
    return t


def files_table(rows: list[dict[str, Any]], total: int | None = None) -> Any:
    """A rich table of ledger rows (``FileRow.to_json()`` dicts)."""
    from rich.table import Table

    title = (
        "files" if total is None or total == len(rows) else f"files (last {len(rows)} of {total})"
    )
    t = Table(title=title)
    for col, just, width in (
        ("id", "right", 3),
        ("name", "left", 12),
        ("status", "left", 9),
        ("examples", "right", 8),
        ("steps", "right", 5),
        ("global_step", "right", 11),
        ("train loss", "right", 14),
        ("held-out loss", "right", 14),
    ):
        # numbers and names whole (the note, a reject reason, wraps instead)
        t.add_column(col, justify=just, no_wrap=True, min_width=width)  # type: ignore[arg-type]
    t.add_column("note", max_width=60)
    colors = {"done": "green", "rejected": "red", "duplicate": "yellow", "training": "cyan"}
    for r in rows:
        gs = (
            f"{r['global_step_start']}->{r['global_step_end']}"
            if r.get("global_step_end") is not None
            else ("" if r.get("global_step_start") is None else f"{r['global_step_start']}->")
        )
        loss = (
            f"{_num(r.get('loss_start'))}->{_num(r.get('loss_end'))}"
            if r.get("loss_start") is not None
            else ""
        )
        held = (
            f"{_num(r.get('val_loss_before'))}->{_num(r.get('val_loss_after'))}"
            if r.get("val_loss_before") is not None or r.get("val_loss_after") is not None
            else ""
        )
        note = r.get("error") or ""
        color = colors.get(r["status"], "white")
        t.add_row(
            str(r["id"]),
            r["name"],
            f"[{color}]{r['status']}[/{color}]",
            "" if r.get("examples") is None else str(r["examples"]),
            "" if r.get("steps") is None else str(r["steps"]),
            gs,
            loss,
            held,
            note if len(note) <= 90 else note[:87] + "...",
        )
    return t
