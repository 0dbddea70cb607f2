"""The watch daemon: takes files from the inbox and trains on each, cumulatively, once.

One :class:`Daemon` owns a run directory while it runs (``RUN/daemon.lock``). Its loop:

1. **intake**: complete inbox entries are renamed to ``queue/<id>-<name>``, replaced there
   by the daemon's own copy (hashed as it is written), or renamed to ``rejected/`` when
   refused at the door, and then recorded in the ledger (:mod:`evertrain.daemon.intake`);
2. the oldest pending file is checked for being a **duplicate** of a trained file (content
   hash), **validated** in full (every record, then tokenised), and **trained** for
   ``watch.epochs_per_file`` epochs, continuing global_step, optimizer, LR schedule and RNG
   from the previous file; held-out loss is measured before and after, and on the most
   recent earlier files after (forgetting). An error of the file rejects it, and a file
   the daemon died on twice is rejected (:mod:`evertrain.daemon.files`);
3. at the end of a file a checkpoint is committed, *then* the row becomes ``done`` and the
   file moves to ``processed/``; snapshots follow.

This module is the orchestration (start, loop, snapshots, stop); intake is
:func:`evertrain.daemon.intake.take_arrivals`, one file's way (steps 2 and 3)
:class:`evertrain.daemon.files.FileWork`, and the status record
:func:`evertrain.daemon.status.status_record`.

Checkpoints are also taken every ``checkpoint.every_steps`` / ``every_seconds``, and on
SIGTERM/SIGINT (after the optimizer step in flight). A ``kill -9`` anywhere is repaired on
the next start by :mod:`evertrain.daemon.reconcile`, which makes the ledger agree with the
newest valid checkpoint; training then resumes at the exact micro-batch, bit-identical to a
run that never stopped.

Fault points (``EVERTRAIN_FAULT``, :mod:`evertrain.faults`), ``N`` the file id:
``intake@N`` (file moved out of the inbox, no ledger row yet), ``validate@N`` (status
validating, verdict not reached), ``filedone@N`` (end-of-file checkpoint committed, row not
yet done), ``processed@N`` (row done, file still in ``queue/``), ``reject@N`` (row rejected,
file still in ``queue/``); plus the trainer's ``micro@S:M`` and the checkpoint writer's
``save@S`` / ``commit@S``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from evertrain.config import RunConfig
from evertrain.daemon.control import Control, ControlReader
from evertrain.daemon.diskwait import describe, disk_error, probe_write
from evertrain.daemon.errors import DaemonError
from evertrain.daemon.filedata import FileData
from evertrain.daemon.files import FileWork
from evertrain.daemon.intake import InboxScanner, InboxWatcher, take_arrivals
from evertrain.daemon.layout import RunLayout
from evertrain.daemon.ledger import Ledger
from evertrain.daemon.lock import RunLock
from evertrain.daemon.ranks import Follower, RankLink, env_rank
from evertrain.daemon.reconcile import reconcile
from evertrain.daemon.schedule import StreamScheduler
from evertrain.daemon.snapshots import Snapshots
from evertrain.daemon.status import ProgressLog, StatusWriter, StepMeter, status_record
from evertrain.daemon.stream import FilePlan, StreamState
from evertrain.runlock import not_writable
from evertrain.signals import on_stop_signals

log = logging.getLogger("evertrain.daemon")

Listener = Callable[[str, dict[str, Any]], None]


class Daemon(FileWork):
    """Trains on every file dropped into ``RUN/inbox``; see the module docstring.

    Args:
        run_dir: the run directory (created with its folders on first use).
        cfg: the run config, already through
            :func:`~evertrain.daemon.settings.prepare_watch_config`.
        once: process what is in the inbox (waiting for files still settling) and the
            queue, then return.
        allow_config_change: resume although the config changed in a way that breaks
            exactness (passed to the trainer).

    Attributes:
        listeners: called as ``listener(event, payload)`` for ``file_start``, ``step``,
            ``file_end``, ``rejected``, ``duplicate``, ``state`` (progress displays).
        trainer: the :class:`~evertrain.trainer.Trainer` once started.
    """

    def __init__(
        self,
        run_dir: str | Path,
        cfg: RunConfig,
        *,
        once: bool = False,
        allow_config_change: bool = False,
    ) -> None:
        self.layout = RunLayout(Path(run_dir))
        self.cfg, self.w = cfg, cfg.watch
        self.once, self.allow_config_change = once, allow_config_change
        self.listeners: list[Listener] = []
        self.stop_reason: str | None = None
        self.state = "starting"
        self.warning: str | None = None
        self.trainer: Any = None
        self.wake = threading.Event()
        self.meter = StepMeter()
        self.progress_log = ProgressLog(self.meter)
        self._plan: FilePlan | None = None
        self._control = Control()
        self._save_pending = False
        self._last_scan = -math.inf
        self._last_checkpoint: dict[str, Any] | None = None
        self._last_snapshot_request: float | None = None
        self._intake_failed: set[str] = set()
        self._attempts_to_undo: set[int] = set()
        self.ledger: Ledger | None = None
        self.scanner: InboxScanner | None = None
        self.watcher: InboxWatcher | None = None
        self.link = RankLink(None)  # replaced once the trainer has joined the process group

    # ------------------------------------------------------------------ public

    def request_stop(self, reason: str = "request") -> None:
        """Stop after the optimizer step in flight (checkpoint first); safe from a signal
        handler or another thread."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.wake.set()

    def run(self) -> int:
        """Run until stopped (or, with ``once``, until the inbox and queue are empty).

        Returns:
            0, or 1 when the final checkpoint could not be written (no disk space).

        Raises:
            evertrain.daemon.lock.RunLockedError: another daemon runs on this directory.
            DaemonError, evertrain.daemon.reconcile.ReconcileError: the run cannot be
                continued safely.
            evertrain.trainer.ResumeError, evertrain.state.StateError: see the trainer.

        Under torchrun only rank 0 runs the daemon; the other ranks follow it
        (:mod:`evertrain.daemon.ranks`).
        """
        if env_rank() != 0:
            follower = Follower(
                self.layout.root, self.cfg, allow_config_change=self.allow_config_change
            )
            return follower.run()
        lock = RunLock(self.layout.lock)
        lock.acquire()  # first: a run directory that cannot be written fails here, one line
        try:
            self.layout.create()
        except OSError as e:
            lock.release()
            raise not_writable(self.layout.root, e) from None
        handler = logging.FileHandler(self.layout.log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("evertrain")
        root.addHandler(handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        try:
            with self._signals():
                while True:
                    try:
                        self._start()
                        self._loop()
                        break
                    except Exception as e:
                        err = disk_error(e)
                        # under torchrun the other ranks would have to start over in step
                        # with rank 0: there the error stops the group (resume by restart)
                        if err is None or self.link.active:
                            raise
                        if not self._wait_for_disk(err):
                            return self._stopped_while_waiting()
                code = self._shutdown()
                self.link.send("stop")
                return code
        finally:
            self._close_all()
            root.removeHandler(handler)
            handler.close()
            lock.release()

    def _close_all(self) -> None:
        if getattr(self, "status", None) is not None:
            self.status.stop_heartbeat()
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        try:
            if self.trainer is not None:
                self.trainer.close()  # idempotent; kept for callers reading the end state
        finally:
            if self.ledger is not None:
                self.ledger.close()
                self.ledger = None

    # ------------------------------------------------------------------ full disk

    def _wait_for_disk(self, err: BaseException) -> bool:
        """Drop all in-memory state (see :mod:`evertrain.daemon.diskwait`), say why in
        ``status.json``, and probe the run directory every ``watch.retry_seconds`` until
        it takes writes again. True then (the caller starts over from the newest
        checkpoint), False if a stop was requested first."""
        step = self._last_checkpoint["global_step"] if self._last_checkpoint else 0
        log.error(
            "DISK FULL OR READ-ONLY: %s. Paused; nothing committed is lost (the run resumes "
            "from the checkpoint of global_step %d). Retrying every %g s: free space in %s",
            describe(err),
            step,
            self.w.retry_seconds,
            self.layout.root,
        )
        with contextlib.suppress(Exception):  # a save in flight fails the same way
            self._close_all()
        self.trainer = None
        self._plan = None
        why = describe(err)
        self.warning = (
            f"paused: disk full or read-only ({why}); retrying every {self.w.retry_seconds:g} s, "
            f"resumes from global_step {step} by itself once {self.layout.root} takes writes"
        )
        self._set_state("paused")
        while self.stop_reason is None:
            self._sleep(self.w.retry_seconds)
            if self.stop_reason is not None:
                break
            problem = probe_write(self.layout.root, self.cfg.checkpoint.min_free_bytes)
            if problem is None:
                log.warning("the run directory takes writes again: resuming")
                self.warning = None
                self._set_state("starting")
                return True
            self.warning = self.warning.split(" [now: ")[0] + f" [now: {problem}]"
            self._write_status(force=True)
        return False

    def _stopped_while_waiting(self) -> int:
        step = self._last_checkpoint["global_step"] if self._last_checkpoint else 0
        log.warning(
            "stopped by %s while paused for the disk; the next start resumes from the "
            "checkpoint of global_step %d",
            self.stop_reason,
            step,
        )
        self._set_state("stopped")
        return 0

    # ------------------------------------------------------------------ start

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        def handle(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self.stop_reason is not None:
                log.warning(
                    "%s received: already stopping after the current optimizer step and a "
                    "checkpoint (kill -9 aborts at once; the next start then resumes from "
                    "the last checkpoint)",
                    name,
                )
                return
            log.warning("%s received: stopping after the current optimizer step", name)
            self.request_stop(name)

        with on_stop_signals(handle):
            yield

    def _start(self) -> None:
        from evertrain.recipe import build_trainer

        new_ledger = not self.layout.ledger.exists()
        self._check_checkpoints_are_ours(new_ledger)
        self.ledger = Ledger(self.layout.ledger)
        self._undo_attempts()
        self.ledger.meta_set("config", self.cfg.to_json())
        self.status = StatusWriter(self.layout.status, self.w.status_every_seconds)
        self._write_status(force=True)
        self.status.start_heartbeat()
        log.info(
            "evertrain watch %s: model %s, %s, schedule %s, %d epoch(s) per file",
            self.layout.root,
            self.cfg.model.source,
            "LoRA" if self.cfg.lora else "full fine-tuning",
            self.cfg.train.schedule.name,
            self.w.epochs_per_file,
        )
        self.stream = StreamState()
        t = self.cfg.train
        trainer = build_trainer(
            self.cfg,
            self.layout.root,
            allow_config_change=self.allow_config_change,
            build_data=False,
            extra_owners={"stream": self.stream},
            make_scheduler=lambda opt: StreamScheduler(opt, t.schedule, t.lr),
            summary_fields=self._summary_fields,
        )
        trainer.resume()
        self.trainer = trainer
        self.link = RankLink(trainer.dist)
        sched = trainer.scheduler
        assert isinstance(sched, StreamScheduler)
        committed = trainer.checkpoints.committed()
        if committed:
            c = committed[-1]
            self._last_checkpoint = {
                "global_step": c.global_step,
                "path": self.layout.rel(c.path),
                "time": c.summary.get("time"),
            }
        self.sched = sched
        last = self.stream.last_file
        if self.stream.current is not None:
            cur = self.stream.current
            sched.window = (cur.global_step_start, cur.global_step_end)
        elif last is not None:
            sched.window = (int(last["global_step_start"]), int(last["global_step_end"]))
        self.data = FileData(
            self.cfg, trainer.tokenizer, capacity=max(8, self.w.eval_earlier_files)
        )
        reconcile(self.layout, self.ledger, self.stream)
        self.snapshots = Snapshots(self.layout, self.ledger, self.cfg)
        self.snapshots.recover()
        self.scanner = InboxScanner(
            self.layout.inbox,
            self.w.settle_seconds,
            self.w.settle_timeout_seconds,
            self.w.max_file_bytes,
        )
        self.watcher = InboxWatcher(self.layout.inbox, self.wake)
        self.watcher.start()
        self.controls = ControlReader(self.layout.control)
        snap = self.snapshots.last()
        self._last_snapshot_request = snap.time if snap else None
        if self.stream.current is None:
            self._maybe_snapshot_after_file()
        p = trainer.progress
        log.info(
            "ready: global_step %d, %d file(s) done, %s",
            p.global_step,
            len(self.stream.completed),
            f"resuming file {self.stream.current.id} ({self.stream.current.name})"
            if self.stream.current
            else "between files",
        )

    def _check_checkpoints_are_ours(self, new_ledger: bool) -> None:
        import json

        steps = sorted(self.layout.checkpoints.glob("step-*/manifest.json"))
        if not steps:
            return
        try:
            files = json.loads(steps[-1].read_text(encoding="utf-8")).get("files", {})
        except (OSError, ValueError):
            return  # damaged: the checkpoint manager reports and skips it
        if "stream.json" not in files:
            raise DaemonError(
                f"{self.layout.root} holds checkpoints of `evertrain train`, not of a watch "
                "daemon; give `evertrain watch` a new run directory"
            )
        if new_ledger:
            raise DaemonError(
                f"{self.layout.root} has watch checkpoints but no {self.layout.ledger.name}; "
                "the ledger is what says which files were trained: restore it from a backup, "
                "or start a new run directory"
            )

    def _summary_fields(self) -> dict[str, Any]:
        cur = self.stream.current
        return {
            "stream": {
                "files_done": len(self.stream.completed),
                "file_id": None if cur is None else cur.id,
                "file_name": None if cur is None else cur.name,
                "file_steps_done": None if cur is None else cur.steps_done,
                "file_steps_total": None if cur is None else cur.steps_total,
            }
        }

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        assert self.ledger is not None and self.scanner is not None
        while self.stop_reason is None:
            self._tick(scan=True)
            if self.stop_reason is not None:
                break
            if self._control.paused:
                self._set_state("paused")
                self._sleep()
                continue
            row = self.ledger.next_pending()
            if row is not None:
                self._process(row)
                continue
            if self.once and not self.scanner.settling:
                log.info("--once: inbox and queue are empty; stopping")
                break
            self._set_state("idle")
            self._sleep()

    def _sleep(self, seconds: float | None = None) -> None:
        self.wake.wait(self.w.poll_seconds if seconds is None else seconds)
        self.wake.clear()

    def _tick(self, scan: bool = False) -> None:
        """Between optimizer steps: intake, control requests, daily snapshot, status."""
        now = time.monotonic()
        if scan or now - self._last_scan >= self.w.poll_seconds:
            self._last_scan = now
            assert self.ledger is not None and self.scanner is not None
            take_arrivals(self.scanner, self.ledger, self.layout, self._intake_failed, self._emit)
        self._control = self.controls.read()
        req = self._control.snapshot_requested
        if req is not None and (
            self._last_snapshot_request is None or req > self._last_snapshot_request
        ):
            self._last_snapshot_request = req
            self._snapshot("request")
        if self.snapshots.due_daily(time.time(), self.trainer.progress.global_step):
            self._snapshot("daily")
        self._write_status()

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._emit("state", {"state": state})
            self._write_status(force=True)

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener(event, payload)

    # ------------------------------------------------------------------ snapshots

    def _maybe_snapshot_after_file(self) -> None:
        if self.snapshots.due_files(len(self.stream.completed)):
            self._snapshot("files")

    def _snapshot(self, reason: str) -> None:
        if self.trainer.progress.global_step == 0:
            log.info("snapshot (%s) skipped: nothing trained yet", reason)
            return
        try:
            self.snapshots.take(
                self.trainer.model,
                self.trainer.tokenizer,
                global_step=self.trainer.progress.global_step,
                files=list(self.stream.completed),
                reason=reason,
            )
        except OSError as e:
            # A snapshot is an export; failing one must not stop training or lose state.
            log.error("SNAPSHOT FAILED (%s): %s; training goes on", reason, e)
            self.warning = f"snapshot failed: {e}"
        self._write_status(force=True)

    # ------------------------------------------------------------------ status

    def status_dict(self) -> dict[str, Any]:
        """The status record (see :mod:`evertrain.daemon.status`)."""
        return status_record(
            state=self.state,
            trainer=self.trainer,
            plan=self._plan,
            meter=self.meter,
            ledger=self.ledger,
            scanner=self.scanner,
            watcher=self.watcher,
            last_checkpoint=self._last_checkpoint,
            warning=self.warning,
        )

    def _write_status(self, force: bool = False) -> None:
        if getattr(self, "status", None) is None:
            return
        if force or self.status.due():
            try:
                self.status.write(self.status_dict())
            except OSError as e:
                log.warning("cannot write %s: %s", self.layout.status, e)

    # ------------------------------------------------------------------ stop

    def _shutdown(self) -> int:
        self._set_state("stopping")
        code = 0
        tr = self.trainer
        if tr is not None and tr.save_policy_last_step() != tr.progress.global_step:
            try:
                saved = self._save() is not None
            except Exception as e:
                if disk_error(e) is None:
                    raise
                saved = False  # the disk filled during the last steps: say so, no traceback
            if not saved:
                log.error(
                    "FINAL CHECKPOINT NOT WRITTEN (no disk space): the next start resumes from "
                    "global_step %s and repeats the steps after it",
                    tr.save_policy_last_step(),
                )
                code = 1
        if self.stop_reason is not None:
            log.warning(
                "stopped by %s at global_step %d; checkpoint saved. Resume with: evertrain "
                "watch %s",
                self.stop_reason,
                tr.progress.global_step,
                self.layout.root,
            )
        self._plan = None
        self.status.stop_heartbeat()  # it must not rewrite an older state over "stopped"
        self._set_state("stopped")
        return code
