"""The run directory as the watch daemon lays it out (see ``docs/run-directory.md``).

Files taken from ``inbox/`` are renamed ``<id>-<name>`` (the id zero-padded to six digits,
e.g. ``000012-notes.jsonl``; a long name is shortened, see :func:`stored_name`) and keep that
name in ``queue/``, ``processed/`` and ``rejected/``; the ledger's ``path`` column holds the
current location relative to RUN and its ``name`` column the name as the user gave it. A
rejected file's reason is ``rejected/<id>.reason.txt``: named by id only, so no file name,
however long, can make it too long for the file system.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from evertrain.fsutil import atomic_write_bytes

_STORED_RE = re.compile(r"(\d{6,})-(.+)", re.DOTALL)
_REASON_RE = re.compile(r"(\d{6,})\.reason\.txt")
REASON_SUFFIX = ".reason.txt"
# Stored names are cut to this many bytes: NAME_MAX is 255 on most file systems, and a
# legal inbox name plus the "<id>-" prefix (or a tool's suffix, e.g. "x.bak") must not
# exceed it, or the move out of the inbox fails with ENAMETOOLONG.
MAX_STORED_BYTES = 200
_MAX_SUFFIX_BYTES = 16
# C0 controls and DEL: a newline in a name would split the reason file's first line and
# the log's lines.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


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


def display_name(entry: str) -> str:
    """The name the ledger records for inbox entry ``entry`` (as :func:`os.listdir` gives
    it): bytes that are not UTF-8 and control characters become U+FFFD.

    SQLite (and the UTF-8 reason files and logs) refuse the lone surrogates that Python
    uses for undecodable bytes in file names; such a name once made every start of the
    daemon fail while recording the file.
    """
    text = os.fsencode(entry).decode("utf-8", "replace")
    return _CONTROL_RE.sub("\ufffd", text)


def stored_name(file_id: int, name: str) -> str:
    """``<id>-<name>``: the name of a taken file outside the inbox (``name`` as the ledger
    records it, see :func:`display_name`).

    A name that would make it longer than :data:`MAX_STORED_BYTES` (UTF-8) keeps its
    extension (which chooses the reader) and as much of its start as fits, joined by
    ``~``: ``000012-a-very-lo~.jsonl``. The ledger keeps the whole name.
    """
    prefix = f"{file_id:06d}-"
    full = prefix + name
    if len(_utf8(full)) <= MAX_STORED_BYTES:
        return full
    stem, dot, ext = name.rpartition(".")
    suffix = f".{ext}" if dot and stem and len(_utf8(ext)) <= _MAX_SUFFIX_BYTES else ""
    if not suffix:
        stem = name
    room = MAX_STORED_BYTES - len(_utf8(f"{prefix}~{suffix}"))
    cut = _utf8(stem)[:room].decode("utf-8", "ignore")  # "ignore": a character cut in two
    return f"{prefix}{cut}~{suffix}"


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def parse_stored_name(stored: str) -> tuple[int, str] | None:
    """``(id, name)`` of a ``<id>-<name>`` file name, None for any other name (the name
    as stored: shortened if it was long)."""
    m = _STORED_RE.fullmatch(stored)
    if m is None:
        return None
    return int(m.group(1)), m.group(2)


def reason_path(rejected: Path, file_id: int) -> Path:
    """``<rejected>/<id>.reason.txt``: the reason file of rejected file ``file_id``."""
    return rejected / f"{file_id:06d}{REASON_SUFFIX}"


def parse_reason_name(entry: str) -> int | None:
    """The file id of a ``<id>.reason.txt`` name, None for any other name (including the
    ``<id>-<name>.reason.txt`` files of earlier versions, which are left alone)."""
    m = _REASON_RE.fullmatch(entry)
    return None if m is None else int(m.group(1))


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
