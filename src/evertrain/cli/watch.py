"""``evertrain watch RUN``: the continuous training daemon (see :mod:`evertrain.daemon`)."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from evertrain.cli.model_errors import model_user_errors
from evertrain.errors import DivergedError

if TYPE_CHECKING:
    from evertrain.daemon import Daemon

log = logging.getLogger("evertrain")
EXIT_LOCKED = 2  # another process writes RUN: bad input, like a bad config


def watch(
    run_dir: Annotated[Path, typer.Argument(help="run directory (created on first use)")],
    config: Annotated[
        Path | None,
        typer.Option("--config", help="YAML config; omit to reuse the run's stored config"),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="process the inbox and the queue, then exit")
    ] = False,
    ui: Annotated[
        bool, typer.Option("--ui", help="also start the dashboard (evertrain ui)")
    ] = False,
    port: Annotated[int, typer.Option(help="dashboard port (with --ui)")] = 8765,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: dotted.key=value (repeatable)")
    ] = None,
    allow_config_change: Annotated[
        bool, typer.Option(help="resume although a breaking config change was made")
    ] = False,
) -> None:
    """Train on every file dropped into RUN/inbox, cumulatively and exactly once.

    Write files into the inbox as NAME.part (or .NAME) and rename them when complete.
    Stop with Ctrl-C or SIGTERM (a checkpoint is written); run the same command to resume.
    Exit codes: 0 done/stopped, 1 final checkpoint not written (disk full), 2 bad config,
    data or run directory, or another process (daemon, train) writes RUN.
    """
    from evertrain.cli.status import console_for_tables, files_table, ledger_rows
    from evertrain.daemon.lock import RunLock, RunLockedError
    from evertrain.runlock import RunDirNotWritableError

    # Refuse a second daemon at once, before loading torch and the model (the daemon takes
    # the lock again for good when it starts). Under torchrun only rank 0 probes: the other
    # ranks would find rank 0's lock held and exit as if a second daemon were running.
    if os.environ.get("RANK", "0") in ("", "0") and (run_dir / "daemon.lock").exists():
        probe = RunLock(run_dir / "daemon.lock")
        try:
            probe.acquire()
        except RunLockedError as e:
            typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
            raise typer.Exit(EXIT_LOCKED) from None
        probe.release()
    from evertrain.daemon import (
        Daemon,
        DaemonError,
        Ledger,
        LedgerError,
        ReconcileError,
        resolve_watch_config,
    )
    from evertrain.daemon.layout import RunLayout

    code = 0
    try:
        with model_user_errors():
            stored = None
            if config is None and (run_dir / "ledger.sqlite").exists():
                ledger = Ledger(run_dir / "ledger.sqlite", readonly=True)
                stored = ledger.meta_get("config")
                ledger.close()
            cfg = resolve_watch_config(run_dir, config, set_ or [], stored)
            daemon = Daemon(run_dir, cfg, once=once, allow_config_change=allow_config_change)
            if ui:  # the dashboard refuses a run directory that does not exist yet
                RunLayout(run_dir).create()
            with _dashboard(run_dir, port) if ui else contextlib.nullcontext():
                with _progress(daemon):
                    code = daemon.run()
            if code == 0 and daemon.stop_reason == "SIGINT":
                code = 130  # Ctrl-C: saved and stopped (SIGTERM, a service stop, exits 0)
    except (RunLockedError, RunDirNotWritableError) as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(EXIT_LOCKED) from None
    except DivergedError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(3) from None
    except (DaemonError, ReconcileError, LedgerError) as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    from evertrain import distributed

    del daemon  # its trainer's model wrappers hold the process group
    distributed.finish()
    rows = ledger_rows(run_dir)
    if rows:
        console_for_tables().print(files_table(rows))
    raise typer.Exit(code)


@contextlib.contextmanager
def _dashboard(run_dir: Path, port: int) -> Iterator[None]:
    """``evertrain ui RUN --port P`` in its own process, stopped when the daemon stops (a
    crash of either never takes the other down)."""
    cmd = [sys.executable, "-m", "evertrain", "ui", str(run_dir), "--port", str(port)]
    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent())
    time.sleep(0.5)
    if proc.poll() is not None:
        log.warning("the dashboard exited at once (code %s): %s", proc.returncode, " ".join(cmd))
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux);
    None elsewhere (there the dashboard outlives a ``kill -9`` of the daemon).

    Why ``prctl(PR_SET_PDEATHSIG)`` rather than the child polling ``os.getppid()``: the
    kernel delivers the signal at once and needs no code in ``evertrain ui``, which also
    runs on its own. The ``finally`` of :func:`_dashboard` covers every exit but SIGKILL
    (and an OOM kill), which would otherwise leave an orphan holding the port. The death
    signal follows the *thread* that forked, so this must be called from the main thread
    (it is: the CLI's). libc is resolved here, before the fork, so the child only makes
    two system calls (work between fork and exec must stay minimal in a threaded parent).
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util
    import signal

    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        log.warning("no prctl in libc: the dashboard may outlive a killed daemon")
        return None
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    parent = os.getpid()

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


@contextlib.contextmanager
def _progress(daemon: Daemon) -> Iterator[None]:
    """A rich progress bar per file on a terminal; elsewhere the daemon's log lines."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )
    tasks: dict[int, Any] = {}

    def on_event(event: str, payload: dict[str, Any]) -> None:
        if event == "file_start":
            plan = payload["plan"]
            if plan.id not in tasks:
                tasks[plan.id] = bar.add_task(
                    f"#{plan.id} {plan.name}", total=plan.steps_total, info=""
                )
            bar.update(tasks[plan.id], completed=plan.steps_done)
        elif event == "step":
            s, plan = payload["stats"], payload["plan"]
            tok_s = daemon.meter.tokens_per_second() or 0.0
            bar.update(
                tasks[plan.id],
                completed=plan.steps_done,
                info=f"loss {s.loss:.4f} lr {s.lr:.2e} {tok_s:.0f} tok/s ep {s.epoch}",
            )

    daemon.listeners.append(on_event)
    with bar:
        yield
    daemon.listeners.remove(on_event)
