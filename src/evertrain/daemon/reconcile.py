"""Make the ledger and the folders agree with the newest valid checkpoint after a restart.

The daemon's write order makes every crash window recoverable (``N`` = the file's id):

==========================================  ================================================
crash between                               found on restart, and what is done
==========================================  ================================================
inbox -> queue/rejected move and insert     ``queue/N-name`` (or ``rejected/N-name`` and its
                                            reason file) without a row: the row is inserted
                                            (``intake@N``)
reason file written and the move            a reason file without its file: removed (the
                                            file is still in the inbox and is taken again)
status ``validating`` and the verdict       row ``validating``: validated again
                                            (``validate@N``)
status ``training`` and the first           row ``training``, not the checkpoint's current
checkpoint holding a step of the file       file: back to ``queued``, trained from its start
mid-file                                    row ``training`` = the checkpoint's current
                                            file: resumed at the exact micro-batch
end-of-file checkpoint and ``done``         the checkpoint lists the file as completed: the
                                            row becomes ``done`` with the statistics the
                                            checkpoint carries (``filedone@N``)
``done``/``rejected``/``duplicate`` and     the file is still in ``queue/``: moved (and a
the move out of ``queue/``                  missing reason file written) (``processed@N``,
                                            ``reject@N``)
==========================================  ================================================

Only a damaged newest checkpoint (the checkpoint manager falls back to an older one, loudly)
can leave ``done`` rows that the restored checkpoint does not include; they are put back in
the queue, with a loud warning, and trained again, so the model and the ledger agree.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import xxhash

from evertrain.daemon.layout import (
    REASON_SUFFIX,
    RunLayout,
    atomic_write,
    parse_stored_name,
    reason_path,
    stored_name,
)
from evertrain.daemon.ledger import PENDING, FileRow, Ledger
from evertrain.daemon.stream import StreamState
from evertrain.fsutil import fsync_dir

log = logging.getLogger("evertrain.daemon")

STAT_COLUMNS = (
    "examples",
    "tokens",
    "steps",
    "global_step_start",
    "global_step_end",
    "loss_start",
    "loss_end",
    "val_loss_before",
    "val_loss_after",
)


class ReconcileError(RuntimeError):
    """The ledger and the checkpoint cannot be brought to agree (the message says why)."""


def hash_file(path: Path) -> tuple[int, str | None]:
    """``(size in bytes, XXH3-128 hex digest)`` of a file, read in 1 MiB chunks (the digest
    :func:`evertrain.data.validate_file` reports); the digest is None when the file cannot
    be read (its validation then rejects it, naming the OS error)."""
    h = xxhash.xxh3_128()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    except OSError:
        return os.lstat(path).st_size, None
    return size, h.hexdigest()


def write_reason(path: Path, name: str, reason: str) -> None:
    """Write ``<id>-<name>.reason.txt`` beside the rejected file ``path``."""
    text = f"{name}: rejected\n{reason}\n"
    atomic_write(reason_path(path), text.encode("utf-8"))


def move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (same file system) and make it durable."""
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def reconcile(layout: RunLayout, ledger: Ledger, stream: StreamState) -> None:
    """Bring the ledger and the folders in line with ``stream`` (restored from the newest
    valid checkpoint, or fresh); see the module docstring.

    Raises:
        ReconcileError: the checkpoint is mid-file in a file the ledger does not know.
    """
    _adopt_orphans(layout, ledger)
    completed = set(stream.completed)
    current = stream.current
    if current is not None and ledger.get(current.id) is None:
        raise ReconcileError(
            f"the newest checkpoint is in the middle of file {current.id} ({current.name}), "
            f"which {layout.ledger} does not list; was the ledger replaced? Restore it, or "
            "start a new run directory"
        )
    last = stream.last_file or {}
    for row in ledger.rows():
        if row.id in completed:
            if row.status != "done":
                stats = {k: last.get(k) for k in STAT_COLUMNS} if last.get("id") == row.id else {}
                log.info(
                    "file %d (%s): its end-of-file checkpoint is committed: done", row.id, row.name
                )
                ledger.update(row.id, status="done", finished_at=time.time(), error=None, **stats)
        elif current is not None and row.id == current.id:
            if row.status != "training":
                log.warning(
                    "file %d (%s) is %s in the ledger, but the newest valid checkpoint is in "
                    "the middle of it: resuming it from there",
                    row.id,
                    row.name,
                    row.status,
                )
                ledger.update(row.id, status="training", finished_at=None)
        elif row.status == "done":
            log.warning(
                "WARNING: file %d (%s) is done in the ledger, but the newest valid checkpoint "
                "does not include it (a newer checkpoint was damaged?): it goes back to the "
                "queue and will be trained again",
                row.id,
                row.name,
            )
            ledger.update(
                row.id,
                status="queued",
                started_at=None,
                finished_at=None,
                **dict.fromkeys(STAT_COLUMNS),
            )
        elif row.status in ("validating", "training"):
            log.info(
                "file %d (%s): no checkpoint holds any of its steps: starting it over",
                row.id,
                row.name,
            )
            ledger.update(row.id, status="queued")
        _place(layout, ledger, ledger.get(row.id) or row)


def _adopt_orphans(layout: RunLayout, ledger: Ledger) -> None:
    known = {r.id for r in ledger.rows()}
    for folder, status in ((layout.queue, "queued"), (layout.rejected, "rejected")):
        for entry in sorted(os.listdir(folder)):
            if entry.endswith(REASON_SUFFIX) or entry.startswith("."):
                continue
            parsed = parse_stored_name(entry)
            if parsed is None:
                log.warning("%s: not written by the daemon; left alone", folder / entry)
                continue
            file_id, name = parsed
            if file_id in known:
                continue
            path = folder / entry
            size: int | None
            digest: str | None = None
            if status == "queued":
                size, digest = hash_file(path)
                error = None
            else:
                size = os.lstat(path).st_size
                try:
                    error = reason_path(path).read_text(encoding="utf-8").split("\n", 1)[1].strip()
                except (OSError, IndexError):
                    error = "rejected at intake (the reason was lost in a crash)"
            log.warning(
                "recovered %s after a crash: recorded as file %d (%s)", path, file_id, status
            )
            ledger.insert(
                FileRow(
                    id=file_id,
                    name=name,
                    path=layout.rel(path),
                    content_hash=digest,
                    size=size,
                    status=status,
                    arrived_at=os.lstat(path).st_mtime,
                    finished_at=None if status == "queued" else time.time(),
                    error=error,
                )
            )
            known.add(file_id)
    for entry in sorted(os.listdir(layout.rejected)):
        if not entry.endswith(REASON_SUFFIX):
            continue
        data = layout.rejected / entry[: -len(REASON_SUFFIX)]
        parsed = parse_stored_name(data.name)
        if parsed and parsed[0] not in known and not os.path.lexists(data):
            # Written just before a crash that kept the file in the inbox: it will be taken
            # again under the same id, with a fresh reason.
            (layout.rejected / entry).unlink()


def _place(layout: RunLayout, ledger: Ledger, row: FileRow) -> None:
    """Move the row's file to the folder its status says (finishing an interrupted move)."""
    stored = stored_name(row.id, row.name)
    target = layout.folder(row.status) / stored
    if not os.path.lexists(target):
        for folder in (layout.queue, layout.processed, layout.rejected):
            if os.path.lexists(folder / stored):
                move(folder / stored, target)
                break
        else:
            if row.status in PENDING:
                msg = (
                    f"the file vanished from {layout.rel(layout.queue)}/ before it was "
                    "trained (removed by hand?); drop it into the inbox again"
                )
                log.error("file %d (%s): %s", row.id, row.name, msg)
                ledger.update(
                    row.id,
                    status="rejected",
                    error=msg,
                    finished_at=time.time(),
                    path=layout.rel(layout.rejected / stored),
                )
            else:
                log.warning("file %d (%s): %s is missing", row.id, row.name, target)
            return
    if row.status == "rejected" and not reason_path(target).exists():
        write_reason(target, row.name, row.error or "rejected")
    if row.path != layout.rel(target):
        ledger.update(row.id, path=layout.rel(target))
