"""The ledger's hot paths do not grow with the finished files (issue 14, item 6): the next
file comes from the status index, the counts from trigger-kept totals (also in a ledger of
an earlier version, which gets them on open), status.json names at most QUEUE_NAMES
waiting files. Costs themselves are measured in bench/bench_scaling.py."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from evertrain.daemon.ledger import FileRow, Ledger


def _add(ledger: Ledger, file_id: int, status: str) -> None:
    ledger.insert(FileRow(file_id, f"f{file_id}.jsonl", f"queue/{file_id}", None, 1, status,
                          time.time()))  # fmt: skip


def test_next_pending_and_counts_follow_every_change(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    for i in range(1, 8):
        _add(ledger, i, "done" if i <= 4 else "queued")
    ledger.update(6, status="training")
    assert [r.id for r in [ledger.next_pending()] if r] == [5]
    assert ledger.pending_names(2) == [(5, "f5.jsonl"), (6, "f6.jsonl")]
    ledger.update(5, status="done")
    ledger.update(5, status="done")  # no change: counted once
    assert ledger.next_pending().id == 6  # type: ignore[union-attr]
    counted = ledger.counts()
    grouped = {r[0]: r[1] for r in ledger._db.execute(
        "SELECT status, COUNT(*) FROM files GROUP BY status")}  # fmt: skip
    assert {k: v for k, v in counted.items() if v} == grouped == {"done": 5, "training": 1,
                                                                 "queued": 1}  # fmt: skip
    plan = " ".join(
        str(row["detail"])
        for row in ledger._db.execute(
            "EXPLAIN QUERY PLAN SELECT id, name FROM files WHERE status = ? ORDER BY id LIMIT 1",
            ("queued",),
        )
    )
    assert "files_status" in plan and "SCAN files" not in plan, plan
    ledger.close()


def test_a_ledger_of_an_earlier_version_gets_its_counts_on_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    for i in range(1, 6):
        _add(ledger, i, "done" if i < 4 else "rejected")
    ledger.close()
    db = sqlite3.connect(path)  # as written before status_counts existed
    for name in ("files_count_insert", "files_count_update", "files_count_delete"):
        db.execute(f"DROP TRIGGER {name}")
    db.execute("DROP TABLE status_counts")
    db.commit()
    db.close()
    reader = Ledger(path, readonly=True)
    assert reader.counts()["done"] == 3  # counted the slow way, not missing
    reader.close()
    again = Ledger(path)
    assert again.counts()["done"] == 3 and again.counts()["rejected"] == 2
    _add(again, 6, "queued")
    assert again.counts()["queued"] == 1
    again.close()


def test_a_ledger_of_another_schema_version_is_refused_unchanged(tmp_path: Path) -> None:
    from evertrain.daemon.ledger import LedgerError

    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.execute("DROP TABLE status_counts")  # what a later version might not have
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="ledger schema version 2, this evertrain reads 1"):
        Ledger(path)
    db = sqlite3.connect(path)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert "status_counts" not in tables and path.read_bytes() == before
