"""``RUN/metrics.jsonl``: one JSON object per optimizer step (and per eval).

Process-safety: one writer per run directory (the trainer). Readers (status, dashboard)
may read concurrently; every line is written whole and flushed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evertrain.trackers import Tracker, TrackerError

log = logging.getLogger("evertrain")


class MetricsLog:
    """Append-only metrics file that can be rewound to a checkpoint's byte offset.

    Lines: ``{"kind": "train", "global_step": int, "loss": float, "lr": float,
    "grad_norm": float, "tokens": int, "examples": int, "seconds": float, ...}`` and
    ``{"kind": "eval", "global_step": int, "val_loss": float, "val_ppl": float}``.

    ``trackers`` (:mod:`evertrain.trackers`) get every record after it is written; they are
    started by :meth:`start_trackers` once the step training continues after is known.
    """

    def __init__(self, path: Path, trackers: Sequence[Tracker] = ()) -> None:
        self.path = path
        self.trackers = list(trackers)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "ab")  # noqa: SIM115 - lives as long as the trainer
        self._started = False

    def start_trackers(self, global_step: int) -> None:
        """Start (or continue) every tracker's run; training continues after
        ``global_step``. Idempotent.

        Raises:
            TrackerError: a tracker could not start (its package, its server), naming it.
        """
        if self._started:
            return
        self._started = True
        for t in self.trackers:
            try:
                t.start(self.path.parent, global_step, lambda: iter(read_metrics(self.path)))
            except TrackerError:
                raise
            except Exception as e:  # a library's own error type: say which tracker
                raise TrackerError(f"report_to: {t.name} could not start: {e}") from e

    def rewind(self, offset: int) -> None:
        """Drop everything after ``offset`` bytes: steps after the resumed checkpoint will
        be replayed, and logging them twice would make the log disagree with the model."""
        size = self.path.stat().st_size
        if offset > size:
            raise ValueError(
                f"{self.path}: checkpoint expects {offset} bytes of metrics, file "
                f"has {size} (was it truncated or replaced?)"
            )
        self._f.truncate(offset)
        self._f.seek(offset)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write((json.dumps(record) + "\n").encode())
        self._f.flush()
        for t in list(self.trackers):
            try:
                t.log(record)
            except Exception as e:  # a tracker's outage must not stop training
                log.error(
                    "tracker %s failed at global_step %s (%s: %s); no longer reporting to it "
                    "(metrics.jsonl keeps every number)",
                    t.name,
                    record.get("global_step"),
                    type(e).__name__,
                    e,
                )
                self.trackers.remove(t)
                with contextlib.suppress(Exception):
                    t.close()

    def offset(self) -> int:
        """Bytes written so far."""
        return self._f.tell()

    def sync(self) -> None:
        """fsync, so a checkpoint never points past data the OS could lose; and flush the
        trackers, so what they were given up to a checkpoint survives a kill."""
        os.fsync(self._f.fileno())
        for t in list(self.trackers):
            try:
                t.flush()
            except Exception as e:  # as in write: the tracker goes, training stays
                log.error("tracker %s failed to flush (%s); no longer reporting to it", t.name, e)
                self.trackers.remove(t)

    def close(self) -> None:
        try:
            self._f.close()
        finally:
            for t in self.trackers:
                try:
                    t.close()
                except Exception as e:  # closing is best effort: the numbers are on disk
                    log.error("tracker %s did not close cleanly: %s", t.name, e)
            self.trackers = []


def read_metrics(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of ``path`` (optionally of one ``kind``), in order; [] if absent."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if kind is None or rec.get("kind") == kind:
                    out.append(rec)
    return out
