"""The run directory as the watch daemon lays it out (see ``docs/run-directory.md``).

Files taken from ``inbox/`` are renamed ``<id>-<name>`` (the id zero-padded to six digits,
e.g. ``000012-notes.jsonl``) and keep that name in ``queue/``, ``processed/`` and
``rejected/``; the ledger's ``path`` column holds the current location relative to RUN.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from evertrain.fsutil import atomic_write_bytes

_STORED_RE = re.compile(r"(\d{6,})-(.+)")
REASON_SUFFIX = ".reason.txt"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory. :meth:`create` makes the folders; nothing else writes."""

    root: Path

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    @property
    def processed(self) -> Path:
        return self.root / "processed"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def log_file(self) -> Path:
        return self.logs / "evertrain.log"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.sqlite"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def control(self) -> Path:
        return self.root / "control.json"

    @property
    def lock(self) -> Path:
        return self.root / "daemon.lock"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def create(self) -> None:
        """Create RUN and its folders (existing ones are left as they are)."""
        for d in (
            self.inbox,
            self.queue,
            self.processed,
            self.rejected,
            self.checkpoints,
            self.snapshots,
            self.logs,
        ):
            d.mkdir(parents=True, exist_ok=True)

    def rel(self, path: Path) -> str:
        """``path`` relative to RUN, as stored in the ledger."""
        return Path(os.path.relpath(path, self.root)).as_posix()

    def abs(self, rel: str) -> Path:
        """A ledger path (relative to RUN) as a path."""
        return self.root / rel

    def folder(self, status: str) -> Path:
        """Where a file of ledger status ``status`` lives."""
        if status in ("done", "duplicate"):
            return self.processed
        if status == "rejected":
            return self.rejected
        return self.queue


def stored_name(file_id: int, name: str) -> str:
    """``<id>-<name>``: the name of a taken file outside the inbox."""
    return f"{file_id:06d}-{name}"


def parse_stored_name(stored: str) -> tuple[int, str] | None:
    """``(id, original name)`` of a ``<id>-<name>`` file name, None for any other name."""
    m = _STORED_RE.fullmatch(stored)
    if m is None:
        return None
    return int(m.group(1)), m.group(2)


def reason_path(rejected_file: Path) -> Path:
    """The ``<id>-<name>.reason.txt`` beside a rejected file."""
    return rejected_file.with_name(rejected_file.name + REASON_SUFFIX)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace a run-directory file (``status.json``, ``control.json``, a reason file) with
    ``data`` atomically (:func:`evertrain.fsutil.atomic_write_bytes`).

    The file gets mode 0644 whatever the umask, so ``evertrain status`` and the dashboard can
    read it from another account. The folder is not fsynced: ``status.json`` is rewritten
    every few seconds, and a rename lost to a power cut only leaves the previous version
    (reason files are made durable by the :func:`evertrain.daemon.reconcile.move` that
    follows them, which fsyncs the same folder).

    Raises:
        OSError: the folder is not writable or the disk is full.
    """
    atomic_write_bytes(path, data, mode=0o644, sync_parent=False)
