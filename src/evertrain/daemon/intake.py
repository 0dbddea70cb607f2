"""The inbox: which entries are complete files ready to take, which are refused at the door,
and waking the daemon when something changes.

Convention for writers (see ``docs/run-directory.md``): write the file under a name the
daemon ignores (``NAME.part``, ``NAME.tmp`` or a hidden ``.NAME``) and rename it to its final
name when complete; a rename within one file system is atomic, so the daemon never sees a
half-written file. Files copied in directly are also handled: an entry is taken only when it
is a regular file whose size and mtime have not changed for ``watch.settle_seconds``.

Refused at the door (moved to ``rejected/`` with a reason, never read): symbolic links,
directories, other non-regular files, files over ``watch.max_file_bytes``, and files still
changing after ``watch.settle_timeout_seconds``.

:func:`take_arrivals` moves complete entries out of the inbox and records them in the
ledger. A taken file is replaced in ``queue/`` by a copy the daemon writes and hashes in
one pass, so what is trained is exactly what was hashed, even if its writer still holds the
original open and appends to it (those later bytes are not trained).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evertrain.daemon.errors import is_run_error
from evertrain.daemon.layout import RunLayout, display_name, reason_path, stored_name
from evertrain.daemon.ledger import FileRow, Ledger
from evertrain.daemon.reconcile import FileTooLargeError, hash_file, move, own_copy, write_reason
from evertrain.faults import maybe_crash

log = logging.getLogger("evertrain.daemon")

IGNORED_SUFFIXES = (".part", ".tmp")


def is_ignored(name: str) -> bool:
    """Names the daemon never touches: hidden (``.x``) and in-progress (``*.part``,
    ``*.tmp``, any case) entries."""
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


@dataclass(frozen=True)
class Arrival:
    """An inbox entry ready to leave the inbox.

    Attributes:
        name: the entry's name in the inbox.
        reject: None to take it for training, else why it is refused (one line).
        mtime_ns: modification time (arrival order: mtime, then name).
    """

    name: str
    reject: str | None
    mtime_ns: int


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    first_seen: float
    first_size: int
    last_change: float


class InboxScanner:
    """Decides, scan after scan, which inbox entries are complete.

    A regular file is complete when its (size, mtime) has not changed between scans for
    ``settle_seconds`` *and* its mtime is at least ``settle_seconds`` old (a file that is
    already old when first seen is taken at once).

    Args:
        inbox: the inbox folder.
        settle_seconds: quiet time that makes a file complete (seconds).
        settle_timeout_seconds: a file still changing this long after it was first seen is
            refused (seconds).
        max_file_bytes: larger files are refused.
        clock, wall: monotonic and wall clocks in seconds (tests pass fakes).
    """

    def __init__(
        self,
        inbox: Path,
        settle_seconds: float,
        settle_timeout_seconds: float,
        max_file_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.inbox = inbox
        self.settle, self.timeout, self.max_bytes = (
            settle_seconds,
            settle_timeout_seconds,
            max_file_bytes,
        )
        self.clock, self.wall = clock, wall
        self._seen: dict[str, _Seen] = {}
        self.settling: list[str] = []  # regular files seen but not yet complete

    def scan(self) -> list[Arrival]:
        """Entries ready to leave the inbox, in arrival order (mtime, then name)."""
        now, wall_now = self.clock(), self.wall()
        ready: list[Arrival] = []
        settling: list[str] = []
        present: set[str] = set()
        try:
            entries = sorted(os.listdir(self.inbox))
        except FileNotFoundError:
            return []
        for name in entries:
            if is_ignored(name):
                continue
            try:
                st = os.lstat(self.inbox / name)
            except FileNotFoundError:  # renamed away between listdir and lstat
                continue
            present.add(name)
            reason = _refuse_kind(st.st_mode)
            if reason is not None:
                ready.append(Arrival(name, reason, st.st_mtime_ns))
                continue
            seen = self._seen.get(name)
            if seen is None:
                seen = _Seen(st.st_size, st.st_mtime_ns, now, st.st_size, now)
                self._seen[name] = seen
                if wall_now - st.st_mtime_ns / 1e9 >= self.settle:
                    seen.last_change = now - self.settle  # old already: quiet long enough
            elif (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                seen.size, seen.mtime_ns, seen.last_change = st.st_size, st.st_mtime_ns, now
            quiet = now - seen.last_change >= self.settle
            if quiet and wall_now - st.st_mtime_ns / 1e9 >= self.settle:
                if st.st_size > self.max_bytes:
                    ready.append(
                        Arrival(
                            name,
                            f"file is {st.st_size} bytes, over watch.max_file_bytes "
                            f"({self.max_bytes}); split it into smaller files or raise "
                            "watch.max_file_bytes",
                            st.st_mtime_ns,
                        )
                    )
                else:
                    ready.append(Arrival(name, None, st.st_mtime_ns))
            elif now - seen.first_seen >= self.timeout:
                ready.append(
                    Arrival(
                        name,
                        f"still being written: its size went from {seen.first_size} to "
                        f"{st.st_size} bytes over {now - seen.first_seen:.0f} s without "
                        f"settling (watch.settle_timeout_seconds {self.timeout:g}); write it "
                        f"as {name}.part and rename it to {name} when it is complete",
                        st.st_mtime_ns,
                    )
                )
            else:
                settling.append(name)
        for name in list(self._seen):
            if name not in present:
                del self._seen[name]
        for a in ready:
            self._seen.pop(a.name, None)
        self.settling = settling
        ready.sort(key=lambda a: (a.mtime_ns, a.name))
        return ready


def _refuse_kind(mode: int) -> str | None:
    if stat.S_ISLNK(mode):
        return (
            "is a symbolic link: the daemon takes regular files only (a link's target can "
            "change or vanish after it is recorded); move or copy the file itself into the inbox"
        )
    if stat.S_ISDIR(mode):
        return "is a directory: put the data files themselves into the inbox, not a folder"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a FIFO, socket or device); put data files in the inbox"
    return None


class InboxWatcher:
    """Sets ``wake`` when the inbox changes: filesystem events through ``watchdog`` when it
    is installed, else nothing (the daemon then polls every ``watch.poll_seconds``, which it
    does anyway as a fallback for file systems without events, e.g. network mounts).

    Attributes:
        mode: ``"events"`` or ``"polling"``.
    """

    def __init__(self, inbox: Path, wake: threading.Event) -> None:
        self.inbox, self.wake = inbox, wake
        self.mode = "polling"
        self._observer: Any = None

    def start(self) -> None:
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            log.info("watchdog is not installed: polling %s", self.inbox)
            return
        wake = self.wake

        class _Handler(FileSystemEventHandler):  # type: ignore[misc]
            def on_any_event(self, event: Any) -> None:
                wake.set()

        try:
            observer = Observer()
            observer.daemon = True
            observer.schedule(_Handler(), str(self.inbox), recursive=False)
            observer.start()
        except OSError as e:  # e.g. inotify watch limit reached
            log.warning("cannot watch %s for events (%s): polling instead", self.inbox, e)
            return
        self._observer, self.mode = observer, "events"

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)


def take_arrivals(
    scanner: InboxScanner,
    ledger: Ledger,
    layout: RunLayout,
    failed: set[str],
    emit: Callable[[str, dict[str, Any]], None],
) -> None:
    """Move each complete inbox entry to ``queue/`` and replace it there by the daemon's own
    copy (:func:`~evertrain.daemon.reconcile.own_copy`, which also hashes it), or, refused
    at the door, move it to ``rejected/`` with its reason file; then record it in the
    ledger under the next file id. A refusal is also passed to ``emit("rejected", {"id",
    "name", "reason"})``.

    An entry that cannot be moved stays in the inbox: one that vanished since the scan is
    skipped, any other is logged once (its name is added to ``failed``). Raises errors of
    the run (:func:`~evertrain.daemon.errors.is_run_error`: the ledger's, a full disk); any
    other error with one entry is logged once in the same way and the entry tried again at
    the next scan, so no inbox entry can stop the daemon.
    """
    for arrival in scanner.scan():
        try:
            _take(arrival, scanner.max_bytes, ledger, layout, failed, emit)
        except Exception as e:
            if is_run_error(e):
                raise
            if arrival.name not in failed:  # tried again at every scan, logged once
                failed.add(arrival.name)
                log.exception("cannot take %s from the inbox (%s)", arrival.name, e)


def _take(
    arrival: Arrival,
    max_bytes: int,
    ledger: Ledger,
    layout: RunLayout,
    failed: set[str],
    emit: Callable[[str, dict[str, Any]], None],
) -> None:
    file_id = ledger.max_id() + 1
    name = display_name(arrival.name)
    src = layout.inbox / arrival.name
    stored = stored_name(file_id, name)
    reject = None if arrival.reject is None else f"{name}: {arrival.reject}"
    if reject is None:
        dest = layout.queue / stored
    else:
        dest = layout.rejected / stored
        write_reason(layout.rejected, file_id, name, reject)
    try:
        move(src, dest)
    except OSError as e:
        reason_path(layout.rejected, file_id).unlink(missing_ok=True)
        if isinstance(e, FileNotFoundError):  # taken away by its writer since the scan
            return
        if arrival.name not in failed:
            failed.add(arrival.name)
            log.error("cannot take %s out of the inbox (%s); it stays there", arrival.name, e)
        return
    maybe_crash("intake", file_id)
    now = time.time()
    row = FileRow(
        id=file_id,
        name=name,
        path=layout.rel(dest),
        content_hash=None,
        size=None,
        status="queued" if reject is None else "rejected",
        arrived_at=now,
        finished_at=None if reject is None else now,
        error=reject,
    )
    if reject is not None:
        row.size = os.lstat(dest).st_size
        ledger.insert(row)
        log.warning("REJECTED file %d: %s", file_id, reject)
        emit("rejected", {"id": file_id, "name": name, "reason": reject})
        return
    try:
        row.size, row.content_hash = own_copy(dest, max_bytes)
    except FileTooLargeError:
        # It grew after the scan measured it (a writer still appending).
        row.size = os.lstat(dest).st_size
        row.status, row.finished_at = "rejected", now
        row.error = (
            f"{name}: grew to more than {max_bytes} bytes after it was taken, over "
            "watch.max_file_bytes; write the file as NAME.part and rename it when complete, "
            "or raise watch.max_file_bytes"
        )
        late = layout.rejected / stored
        row.path = layout.rel(late)
        ledger.insert(row)  # first: reconcile finishes the move and the reason after a crash
        write_reason(layout.rejected, file_id, name, row.error)
        move(dest, late)
        log.warning("REJECTED file %d: %s", file_id, row.error)
        emit("rejected", {"id": file_id, "name": name, "reason": row.error})
        return
    except OSError as e:
        # Used in place, as before copies: unreadable, it is recorded without a hash and
        # validation rejects it naming the error; with the disk full, the daemon goes on
        # (it waits out a full disk for checkpoints too) at the cost of the copy's guarantee.
        log.warning("cannot copy %s into the queue (%s); using it in place", name, e)
        row.size, row.content_hash = hash_file(dest)
    ledger.insert(row)
    log.info("took %s as file %d (%d bytes)", name, file_id, row.size)
