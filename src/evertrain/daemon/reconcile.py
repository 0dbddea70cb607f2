"""Make the ledger and the folders agree with the newest valid checkpoint after a restart.

The daemon's write order makes every crash window recoverable (``N`` = the file's id):

==========================================  ================================================
crash between                               found on restart, and what is done
==========================================  ================================================
inbox -> queue/rejected move and insert     ``queue/N-name`` (or ``rejected/N-name`` and its
                                            reason file) without a row: the row is inserted
                                            (``intake@N``), a queued one after it is
                                            replaced by the daemon's own copy
the daemon's copy of a taken file and its   a hidden ``queue/.copy-*.tmp``: removed (the
rename over the original                    file itself is the orphan above)
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
a file's rejection in the middle of its     row ``rejected`` = the checkpoint's current
training and the next checkpoint            file: it stays rejected and the stream leaves it
                                            (its steps before the checkpoint stay trained)
``done``/``rejected``/``duplicate`` and     the file is still in ``queue/``: moved (and a
the move out of ``queue/``                  missing reason file written) (``processed@N``,
                                            ``reject@N``)
==========================================  ================================================

A row's ``attempts`` (daemon deaths while working on it) is left as it is, and reset when
the row becomes ``done``: the daemon quarantines a file that two of them died on
(:mod:`evertrain.daemon.files`).

Only a damaged newest checkpoint (the checkpoint manager falls back to an older one, loudly)
can leave ``done`` rows that the restored checkpoint does not include; they are put back in
the queue, with a loud warning, and trained again, so the model and the ledger agree.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import xxhash

from evertrain.daemon.errors import DaemonError
from evertrain.daemon.layout import (
    REASON_SUFFIX,
    RunLayout,
    atomic_write,
    parse_reason_name,
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


COPY_PREFIX, COPY_SUFFIX = ".copy-", ".tmp"  # own_copy's temporary files in queue/


class ReconcileError(DaemonError):
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


class FileTooLargeError(Exception):
    """A file grew past the size limit after the inbox scan measured it."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


def own_copy(path: Path, max_bytes: int | None = None) -> tuple[int, str]:
    """Replace ``path`` (a file just taken into ``queue/``) by a copy of its bytes that the
    daemon wrote itself, and return ``(size, XXH3-128 digest)`` of exactly those bytes.

    Taking a file is a rename, so without the copy the queued file would still be the inode
    its writer may hold open: bytes appended after the file was hashed would change it
    under its recorded hash, and a file changed after its training began cannot be resumed
    or replayed. The copy is a new inode nobody else holds; appends to the original after
    this point are not trained (and not kept). A plain copy (one extra write of a file of
    at most ``watch.max_file_bytes``), hashed as it is written, so the bytes hashed are the
    bytes stored: a reflink would save the write on btrfs/XFS but need the file read again
    for the hash, and is not portable.

    Raises:
        OSError: reading or writing failed; ``path`` is left as it was.
        FileTooLargeError: more than ``max_bytes`` bytes; ``path`` is left as it was.
    """
    h = xxhash.xxh3_128()
    size = 0
    fd, tmp = tempfile.mkstemp(prefix=COPY_PREFIX, suffix=COPY_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as dst, open(path, "rb") as src:
            os.fchmod(dst.fileno(), os.fstat(src.fileno()).st_mode & 0o777)
            while chunk := src.read(1 << 20):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise FileTooLargeError(max_bytes)
                h.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())  # the data before the name: the ledger will hold its hash
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return size, h.hexdigest()


def write_reason(rejected: Path, file_id: int, name: str, reason: str) -> None:
    """Write ``<rejected>/<id>.reason.txt``, the reason file of rejected file ``file_id``
    (named by id: a long ``name`` cannot make it too long for the file system)."""
    text = f"{name}: rejected\n{reason}\n"
    atomic_write(reason_path(rejected, file_id), text.encode("utf-8", "replace"))


def move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (same file system) and make it durable."""
    os.rename(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def reconcile(layout: RunLayout, ledger: Ledger, stream: StreamState) -> None:
    """Bring the ledger and the folders in line with ``stream`` (restored from the newest
    valid checkpoint, or fresh); see the module docstring. ``stream`` leaves its current
    file when the ledger has rejected it since.

    Raises:
        ReconcileError: the checkpoint is mid-file in a file the ledger does not know.
    """
    _remove_copy_leftovers(layout)
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
                ledger.update(
                    row.id,
                    status="done",
                    finished_at=time.time(),
                    error=None,
                    attempts=0,
                    attempt_step=None,
                    **stats,
                )
        elif current is not None and row.id == current.id and row.status == "rejected":
            # Rejected (an error, or quarantined) after the checkpoint was written: the
            # ledger's verdict stands. The steps trained before it cannot be taken back.
            log.warning(
                "file %d (%s) was rejected after the newest checkpoint, which is in the middle "
                "of it: it stays rejected (its %d step(s) before the checkpoint stay trained)",
                row.id,
                row.name,
                current.steps_done,
            )
            stream.current, stream.cursor = None, None
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


def _remove_copy_leftovers(layout: RunLayout) -> None:
    for entry in os.listdir(layout.queue):
        if entry.startswith(COPY_PREFIX) and entry.endswith(COPY_SUFFIX):
            (layout.queue / entry).unlink(missing_ok=True)


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
                try:
                    size, digest = own_copy(path)
                except OSError as e:
                    log.warning("cannot copy %s (%s): hashing it in place", path, e)
                    size, digest = hash_file(path)
                error = None
            else:
                size = os.lstat(path).st_size
                try:
                    text = reason_path(layout.rejected, file_id).read_text(encoding="utf-8")
                    error = text.split("\n", 1)[1].strip()
                except (OSError, IndexError, UnicodeDecodeError):
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
    entries = sorted(os.listdir(layout.rejected))
    with_data = {p[0] for p in map(parse_stored_name, entries) if p is not None}
    for entry in entries:
        reason_id = parse_reason_name(entry)
        if reason_id is not None and reason_id not in known and reason_id not in with_data:
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
    if row.status == "rejected" and not reason_path(layout.rejected, row.id).exists():
        write_reason(layout.rejected, row.id, row.name, row.error or "rejected")
    if row.path != layout.rel(target):
        ledger.update(row.id, path=layout.rel(target))
