"""How the daemon deals with a file that fails: reject it and go on, or quarantine it
after it killed the daemon twice (see :mod:`evertrain.daemon.files` for the rules).
:class:`BadFiles` is mixed into :class:`~evertrain.daemon.files.FileWork`."""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING, Any

from evertrain.daemon.errors import is_run_error
from evertrain.daemon.ledger import PENDING, FileRow
from evertrain.daemon.stream import FilePlan
from evertrain.errors import DivergedError

if TYPE_CHECKING:
    from evertrain.daemon.layout import RunLayout
    from evertrain.daemon.ledger import Ledger
    from evertrain.daemon.stream import StreamState

log = logging.getLogger("evertrain.daemon")

# Daemon deaths while working on one file (without its training advancing in between)
# after which the file is rejected instead of tried again.
MAX_DEATHS = 2
_MAX_ERROR_CHARS = 500


class BadFiles:
    """The failure paths of a file's work. Not usable on its own."""

    if TYPE_CHECKING:  # provided by the daemon and FileWork
        layout: RunLayout
        ledger: Ledger | None
        trainer: Any
        stream: StreamState
        _plan: FilePlan | None

        def _settle(self, row: FileRow, status: str, crash_point: str, **values: Any) -> None: ...
        def _emit(self, event: str, payload: dict[str, Any]) -> None: ...
        def _save_until_committed(self) -> bool: ...

    # what the file at hand is going through, for reject reasons: validating or training
    _phase: str = "validating"
    _attempts_to_undo: set[int]

    def _begin_attempt(self, row: FileRow) -> bool:
        """Count an attempt at ``row`` in the ledger before any work on it (so a death
        during the work stays counted); False when the file was quarantined instead."""
        assert self.ledger is not None
        step = self.trainer.progress.global_step
        deaths = row.attempts
        if row.attempt_step is not None and step > row.attempt_step:
            deaths = 0  # its training advanced since the last death: not a crash loop
        if deaths >= MAX_DEATHS:
            self._quarantine(row, deaths)
            return False
        self.ledger.update(row.id, attempts=deaths + 1, attempt_step=step)
        return True

    def _end_attempt(self, row: FileRow) -> None:
        """Un-count the attempt begun by :meth:`_begin_attempt`: this process is alive, so
        whatever ended the work (the file finished or was rejected, a stop request, an
        error of the run) was not a death."""
        assert self.ledger is not None
        try:
            now = self.ledger.get(row.id)
            if now is not None and now.status not in ("done", "duplicate") and now.attempts > 0:
                self.ledger.update(row.id, attempts=now.attempts - 1)
        except sqlite3.Error as e:  # must not hide the error that may be on its way out
            # (a full disk): done by :meth:`_undo_attempts` once the ledger takes writes,
            # or every pause for the disk would count as a death of the file
            log.error("file %d: cannot update its attempt count yet: %s", row.id, e)
            self._attempts_to_undo.add(row.id)

    def _undo_attempts(self) -> None:
        """Apply the attempt un-counts that :meth:`_end_attempt` could not write."""
        assert self.ledger is not None
        for file_id in sorted(self._attempts_to_undo):
            now = self.ledger.get(file_id)
            if now is not None and now.status not in ("done", "duplicate") and now.attempts > 0:
                self.ledger.update(file_id, attempts=now.attempts - 1)
        self._attempts_to_undo.clear()

    def _quarantine(self, row: FileRow, deaths: int) -> None:
        cur = self.stream.current
        plan = cur if cur is not None and cur.id == row.id else None
        where = (
            f" (each time in its training after step {plan.steps_done} of {plan.steps_total})"
            if plan is not None
            else ""
        )
        reason = (
            f"{row.name}: the daemon died twice while processing it{where}, killed or crashed "
            "without an error message (out of memory?); not tried again: drop it into the "
            "inbox again to retry it"
        )
        if deaths != MAX_DEATHS:
            reason += f" ({deaths} deaths recorded)"
        self._reject(row, reason, **self._leave_file(plan))

    def _stops_the_group(self, row: FileRow, e: Exception) -> bool:
        """Whether ``e`` is an error of ``row``'s training that stops a group of ranks (it
        cannot be rejected while the other ranks may wait in a collective): it counts as a
        death, so the next start after :data:`MAX_DEATHS` quarantines the file instead of
        stopping on it again and again."""
        return (
            self._phase == "training"
            and self.trainer.world_size > 1
            and not is_run_error(e)
            and not isinstance(e, DivergedError)
            and row.id not in self.stream.completed
        )

    def _is_file_error(self, row: FileRow, e: Exception) -> bool:
        """Whether ``e``, raised while working on ``row``, rejects the file (else it stops
        the daemon)."""
        assert self.ledger is not None
        if is_run_error(e):
            return False
        if row.id in self.stream.completed:
            return False  # the stream holds it as trained: the next checkpoint would say so
        if self._phase == "training" and self.trainer.world_size > 1:
            return False  # the other ranks may wait in a collective for this one
        now = self.ledger.get(row.id)
        return now is None or now.status in PENDING

    def _fail_file(self, row: FileRow, e: Exception) -> None:
        log.error(
            "file %d (%s): %s while %s it; rejecting it and going on",
            row.id,
            row.name,
            type(e).__name__,
            self._phase,
            exc_info=e,
        )
        cur = self.stream.current
        plan = cur if cur is not None and cur.id == row.id else None
        detail = str(e).replace(str(self.layout.abs(row.path)), row.name)
        detail = detail.replace(str(self.layout.root), "RUN")
        if len(detail) > _MAX_ERROR_CHARS:
            detail = detail[:_MAX_ERROR_CHARS] + "..."
        reason = f"{row.name}: {type(e).__name__} while {self._phase} it"
        reason += f": {detail}" if detail else ""
        if plan is not None and plan.steps_done:
            reason += (
                f"; its first {plan.steps_done} of {plan.steps_total} optimizer steps stay trained"
            )
        reason += " (see logs/evertrain.log)"
        self._reject(row, reason, **self._leave_file(plan))
        tr = self.trainer
        if plan is not None and tr.save_policy_last_step() != tr.progress.global_step:
            # the steps trained since the last checkpoint would otherwise be lost to a kill
            # before the next one: the restart would continue from before them
            self._save_until_committed()

    def _leave_file(self, plan: FilePlan | None) -> dict[str, Any]:
        """Drop the file of ``plan`` (the stream's current file, or None: nothing to do)
        from the stream before it is rejected; the ledger statistics of what it trained."""
        if plan is None:
            return {}
        optimizer = getattr(self.trainer, "optimizer", None)
        if optimizer is not None:
            # a step that failed half-way leaves its micro-batches' gradients behind: the
            # next file's first step must not add to them (a restart would not have them)
            optimizer.zero_grad(set_to_none=True)
        self.stream.current, self.stream.cursor = None, None
        self._plan = None
        step = self.trainer.progress.global_step
        if plan.steps_done:
            self.trainer.metrics.write(
                {
                    "kind": "file_end",
                    "global_step": step,
                    "file_id": plan.id,
                    "name": plan.name,
                    "rejected": True,
                }
            )
        return {
            "examples": plan.examples,
            "tokens": plan.tokens,
            "steps": plan.steps_done,
            "global_step_start": plan.global_step_start,
            "global_step_end": plan.global_step_start + plan.steps_done,
            "loss_start": plan.loss_start,
            "loss_end": plan.loss_end,
            "val_loss_before": plan.val_loss_before,
        }

    def _reject(self, row: FileRow, reason: str, **values: Any) -> None:
        """Reject ``row``'s file with ``reason`` (``values``: further ledger columns)."""
        self._settle(row, "rejected", "reject", error=reason, **values)
        log.warning("REJECTED %s (file %d): %s", row.name, row.id, reason)
        self._emit("rejected", {"id": row.id, "name": row.name, "reason": reason})

    def _duplicate(self, row: FileRow, original: FileRow) -> None:
        note = (
            f"identical to file {original.id} ({original.name}), already trained; not "
            "trained again (set watch.retrain_duplicates: true to train duplicates)"
        )
        self._settle(row, "duplicate", "processed", error=note)
        log.info("file %d (%s): %s", row.id, row.name, note)
        self._emit("duplicate", {"id": row.id, "name": row.name, "original": original.id})
