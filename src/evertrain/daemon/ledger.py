"""``RUN/ledger.sqlite``: the durable record of every file the daemon took (stdlib sqlite3).

WAL journal mode, so readers (``evertrain status``, the dashboard) never block the daemon,
and ``synchronous=FULL``, so a committed status change survives a power loss, not only a
crash. Every change is one transaction. The daemon is the only writer (it holds
``RUN/daemon.lock``).

Tables (the schema is in ``docs/run-directory.md``):

- ``files``: one row per file taken from the inbox; ``path`` is relative to RUN. A row is
  ``done`` only once the checkpoint that includes the file's last optimizer step is
  committed. ``attempts`` counts the daemon processes that began work on the file and died
  without unwinding (SIGKILL, a segfault, the OOM killer) since its training last advanced
  (``attempt_step``: global_step when the last one began); two quarantine the file
  (:mod:`evertrain.daemon.files`). ``skipped_steps``: of the file's steps, those the
  divergence guard did not apply or rolled back (``train.on_nonfinite``).
- ``snapshots``: one row per exported snapshot.
- ``meta``: ``schema_version`` and ``config`` (the resolved run config of the last start,
  JSON), so ``evertrain watch RUN`` can restart without ``--config``.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("queued", "validating", "training", "done", "rejected", "duplicate")
PENDING = ("queued", "validating", "training")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    content_hash TEXT,
    size INTEGER,
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    arrived_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    examples INTEGER,
    tokens INTEGER,
    steps INTEGER,
    global_step_start INTEGER,
    global_step_end INTEGER,
    loss_start REAL,
    loss_end REAL,
    val_loss_before REAL,
    val_loss_after REAL,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    attempt_step INTEGER,
    skipped_steps INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS files_hash ON files (content_hash);
-- the next file to train and the queue: without it every pick scanned all finished files
CREATE INDEX IF NOT EXISTS files_status ON files (status, id);
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    global_step INTEGER NOT NULL,
    files_done INTEGER NOT NULL,
    time REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Columns added after schema version 1 was first written: ledgers of earlier versions get
# them on the daemon's next start (readers of such a ledger see the defaults).
_ADDED_COLUMNS = {
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "attempt_step": "INTEGER",
    "skipped_steps": "INTEGER NOT NULL DEFAULT 0",
}


class LedgerError(RuntimeError):
    """The ledger cannot be used (unreadable, or written by another schema version)."""


@dataclass
class FileRow:
    """One row of ``files`` (see the module docstring); times are unix seconds."""

    id: int
    name: str
    path: str
    content_hash: str | None
    size: int | None
    status: str
    arrived_at: float
    started_at: float | None = None
    finished_at: float | None = None
    examples: int | None = None
    tokens: int | None = None
    steps: int | None = None
    global_step_start: int | None = None
    global_step_end: int | None = None
    loss_start: float | None = None
    loss_end: float | None = None
    val_loss_before: float | None = None
    val_loss_after: float | None = None
    error: str | None = None
    attempts: int = 0
    attempt_step: int | None = None
    skipped_steps: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = tuple(f.name for f in fields(FileRow))
TIME_COLUMNS = ("arrived_at", "started_at", "finished_at")


@dataclass
class SnapshotRow:
    """One row of ``snapshots``: ``path`` relative to RUN, ``reason`` what triggered it."""

    id: int
    path: str
    global_step: int
    files_done: int
    time: float
    reason: str


# Rows per status, kept by triggers in the writer's own transactions, so status.json
# (written every few seconds) need not count 10^4 finished files each time. Added in one
# transaction with its first fill, to a ledger of an earlier version too.
_COUNTS = (
    "CREATE TABLE status_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL)",
    "CREATE TRIGGER files_count_insert AFTER INSERT ON files BEGIN "
    "INSERT INTO status_counts (status, n) VALUES (NEW.status, 1) "
    "ON CONFLICT(status) DO UPDATE SET n = n + 1; END",
    "CREATE TRIGGER files_count_update AFTER UPDATE OF status ON files "
    "WHEN OLD.status IS NOT NEW.status BEGIN "
    "UPDATE status_counts SET n = n - 1 WHERE status = OLD.status; "
    "INSERT INTO status_counts (status, n) VALUES (NEW.status, 1) "
    "ON CONFLICT(status) DO UPDATE SET n = n + 1; END",
    "CREATE TRIGGER files_count_delete AFTER DELETE ON files BEGIN "
    "UPDATE status_counts SET n = n - 1 WHERE status = OLD.status; END",
    "INSERT INTO status_counts (status, n) SELECT status, COUNT(*) FROM files GROUP BY status",
)


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return row.fetchone() is not None


def _create(path: Path) -> None:
    """Create the ledger under a temporary name and rename it into place, so a reader
    never opens a ledger without its tables."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.executescript(_SCHEMA)
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
            (json.dumps(SCHEMA_VERSION),),
        )
    finally:
        db.close()
    os.replace(tmp, path)


class Ledger:
    """The ledger of one run directory.

    Args:
        path: ``RUN/ledger.sqlite`` (created with its tables unless ``readonly``).
        readonly: open for reading only (``evertrain status``, the dashboard).

    Raises:
        LedgerError: the file is not a ledger, or has another schema version.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly and not self.path.is_file():
            raise LedgerError(f"{self.path}: no ledger (has `evertrain watch` run here?)")
        try:
            if readonly:
                self._db = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, isolation_level=None, timeout=30
                )
            else:
                if not self.path.exists():
                    _create(self.path)
                self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                # refused before any change: a ledger of another version is left as it is
                found = self.meta_get("schema_version") if _has_table(self._db, "meta") else None
                if found != SCHEMA_VERSION:
                    self._db.close()
                    raise LedgerError(
                        f"{self.path}: ledger schema version {found!r}, this evertrain reads "
                        f"{SCHEMA_VERSION}; use the evertrain version that wrote it"
                    )
                self._db.executescript(_SCHEMA)  # IF NOT EXISTS: tables added by later versions
                have = {r[1] for r in self._db.execute("PRAGMA table_info(files)")}
                for column, decl in _ADDED_COLUMNS.items():
                    if column not in have:
                        self._db.execute(f"ALTER TABLE files ADD COLUMN {column} {decl}")
                if not _has_table(self._db, "status_counts"):
                    self._db.execute("BEGIN IMMEDIATE")
                    for statement in _COUNTS:
                        self._db.execute(statement)
                    self._db.execute("COMMIT")
            self._db.row_factory = sqlite3.Row
            found = self.meta_get("schema_version")
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"{self.path}: not a usable ledger: {e}") from None
        if found != SCHEMA_VERSION:
            raise LedgerError(
                f"{self.path}: ledger schema version {found!r}, this evertrain reads "
                f"{SCHEMA_VERSION}; use the evertrain version that wrote it"
            )

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ meta

    def meta_get(self, key: str) -> Any:
        """The JSON value stored under ``key``, or None."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def meta_set(self, key: str, value: Any) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    # ------------------------------------------------------------------ files

    def insert(self, row: FileRow) -> FileRow:
        """Insert ``row`` (its ``id`` chosen by the caller, see :meth:`next_id`).

        Raises:
            sqlite3.IntegrityError: the id exists or the status is unknown.
        """
        cols = ", ".join(COLUMNS)
        marks = ", ".join("?" for _ in COLUMNS)
        values = [getattr(row, c) for c in COLUMNS]
        self._db.execute(f"INSERT INTO files ({cols}) VALUES ({marks})", values)
        return row

    def update(self, file_id: int, **values: Any) -> None:
        """Set columns of one row in one transaction.

        Raises:
            KeyError: an unknown column or file id.
        """
        bad = [k for k in values if k not in COLUMNS or k == "id"]
        if bad:
            raise KeyError(f"ledger: unknown column(s) {bad}")
        sets = ", ".join(f"{k} = ?" for k in values)
        cur = self._db.execute(f"UPDATE files SET {sets} WHERE id = ?", [*values.values(), file_id])
        if cur.rowcount != 1:
            raise KeyError(f"ledger: no file with id {file_id}")

    def get(self, file_id: int) -> FileRow | None:
        r = self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if r is None else FileRow(**dict(r))

    def rows(self, *statuses: str) -> list[FileRow]:
        """Rows in id (arrival) order, optionally only those with one of ``statuses``."""
        if statuses:
            marks = ", ".join("?" for _ in statuses)
            cur = self._db.execute(
                f"SELECT * FROM files WHERE status IN ({marks}) ORDER BY id", statuses
            )
        else:
            cur = self._db.execute("SELECT * FROM files ORDER BY id")
        return [FileRow(**dict(r)) for r in cur.fetchall()]

    def next_pending(self) -> FileRow | None:
        """The oldest row still to be validated or trained (arrival order), by the status
        index: one lookup per pending status, whatever the number of finished rows."""
        first = self.pending_names(1)
        return self.get(first[0][0]) if first else None

    def max_id(self) -> int:
        r = self._db.execute("SELECT MAX(id) FROM files").fetchone()
        return int(r[0] or 0)

    def find_done(self, content_hash: str, before_id: int) -> FileRow | None:
        """The first ``done`` row with this content hash and a smaller id, if any."""
        r = self._db.execute(
            "SELECT * FROM files WHERE content_hash = ? AND status = 'done' AND id < ? "
            "ORDER BY id LIMIT 1",
            (content_hash, before_id),
        ).fetchone()
        return None if r is None else FileRow(**dict(r))

    def counts(self) -> dict[str, int]:
        """Rows per status, every status present (0 when none); O(statuses) from the
        trigger-kept ``status_counts`` (counted, for a ledger a reader opens before any
        writer of this version added it)."""
        out = dict.fromkeys(STATUSES, 0)
        query = (
            "SELECT status, n FROM status_counts"
            if _has_table(self._db, "status_counts")
            else "SELECT status, COUNT(*) FROM files GROUP BY status"
        )
        for status, n in self._db.execute(query):
            out[status] = int(n)
        return out

    def pending_names(self, limit: int) -> list[tuple[int, str]]:
        """``(id, name)`` of the first ``limit`` rows still to be validated or trained, in
        arrival order (the status index: no scan of finished rows)."""
        rows = []
        for status in PENDING:  # one index range each, merged: IN () would sort them all
            rows += self._db.execute(
                "SELECT id, name FROM files WHERE status = ? ORDER BY id LIMIT ?", (status, limit)
            ).fetchall()
        return sorted((int(i), str(n)) for i, n in rows)[:limit]

    def last_snapshot(self) -> SnapshotRow | None:
        """The newest snapshot row, or None."""
        r = self._db.execute("SELECT * FROM snapshots ORDER BY id DESC LIMIT 1").fetchone()
        return None if r is None else SnapshotRow(**dict(r))

    # ------------------------------------------------------------------ snapshots

    def add_snapshot(
        self, path: str, global_step: int, files_done: int, time: float, reason: str
    ) -> None:
        self._db.execute(
            "INSERT INTO snapshots (path, global_step, files_done, time, reason) "
            "VALUES (?, ?, ?, ?, ?)",
            (path, global_step, files_done, time, reason),
        )

    def snapshots(self) -> list[SnapshotRow]:
        cur = self._db.execute("SELECT * FROM snapshots ORDER BY id")
        return [SnapshotRow(**dict(r)) for r in cur.fetchall()]

    def delete_snapshot(self, snapshot_id: int) -> None:
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))
