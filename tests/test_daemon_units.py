"""Unit checks of the daemon's parts that need no model: watch-mode config rules, the LR on
an open-ended stream, the ledger, the stream state, replay draws, control records and the
reconciliation of the ledger with a checkpoint."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
import torch

from evertrain.config import ConfigError, ScheduleConfig, load_config
from evertrain.daemon import FileRow, Ledger, LedgerError, prepare_watch_config
from evertrain.daemon.control import ControlReader, write_control
from evertrain.daemon.layout import RunLayout, stored_name
from evertrain.daemon.reconcile import reconcile
from evertrain.daemon.replay import ReplaySampler
from evertrain.daemon.schedule import stream_lr_factor
from evertrain.daemon.stream import FilePlan, StreamState
from evertrain.data import TokenizedDataset
from evertrain.state import StateVersionError


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"schedule": {"name": "cosine"}}}, "train.schedule.name: 'cosine' needs"),
        ({"train": {"schedule": {"name": "linear"}}}, "needs the total number of steps"),
        ({"data": {"files": ["a.jsonl"]}}, "data.files: watch mode takes its files"),
        ({"train": {"max_steps": 10}}, "train.max_steps: watch mode"),
        ({"train": {"epochs": 3}}, "watch.epochs_per_file"),
        ({"watch": {"replay_fraction": 0.1}}, "0 replay row(s)"),
        ({"watch": {"replay_fraction": 0.9}}, "leave at least one row"),
    ],
)
def test_watch_config_rules(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare_watch_config(load_config(raw))


def test_watch_config_defaults() -> None:
    cfg = prepare_watch_config(load_config({}))
    assert cfg.lora is not None and cfg.train.schedule.name == "constant"
    full = prepare_watch_config(
        load_config({"lora": None, "train": {"schedule": {"warmup_steps": 5}}})
    )
    assert full.lora is None and full.train.schedule.warmup_steps == 5
    wsd = prepare_watch_config(load_config({"train": {"schedule": {"name": "wsd"}}}))
    assert wsd.train.schedule.name == "wsd"
    with pytest.raises(ConfigError, match="snapshot_daily_at"):
        load_config({"watch": {"snapshot_daily_at": "25:00"}})


def test_stream_lr_warmup_once_and_wsd_decays_at_each_file_end() -> None:
    cfg = ScheduleConfig(name="wsd", warmup_steps=3, decay_steps=2, min_lr_ratio=0.1)
    f1, f2 = (0, 6), (6, 10)
    lr1 = [stream_lr_factor(cfg, s, f1) for s in range(*f1)]
    lr2 = [stream_lr_factor(cfg, s, f2) for s in range(*f2)]
    assert lr1 == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0, 0.55])
    assert lr2 == pytest.approx([1.0, 1.0, 1.0, 0.55])  # no second warmup, decays at its end
    with pytest.raises(ValueError, match="window"):
        stream_lr_factor(cfg, 4, None)
    inv = ScheduleConfig(name="inverse_sqrt", warmup_steps=4)
    assert stream_lr_factor(inv, 15, None) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="open-ended"):
        stream_lr_factor(ScheduleConfig(name="cosine"), 10, (0, 20))


def test_ledger_wal_rows_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger(path, readonly=True)
    led = Ledger(path)
    assert led._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    led.insert(FileRow(1, "a.jsonl", "queue/000001-a.jsonl", "h1", 10, "queued", time.time()))
    led.insert(FileRow(2, "b.jsonl", "queue/000002-b.jsonl", "h1", 10, "queued", time.time()))
    led.update(1, status="done", steps=3)
    assert led.find_done("h1", 2) is not None and led.find_done("h1", 1) is None
    assert led.next_pending().id == 2  # type: ignore[union-attr]
    assert led.counts()["done"] == 1 and led.counts()["queued"] == 1
    with pytest.raises(KeyError, match="unknown column"):
        led.update(1, colour="red")
    with pytest.raises(sqlite3.IntegrityError):
        led.update(1, status="finished")
    reader = Ledger(path, readonly=True)  # concurrent reader
    assert [r.status for r in reader.rows()] == ["done", "queued"]
    reader.close()
    led.close()
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(LedgerError, match="not a usable ledger"):
        Ledger(path)


def _plan(file_id: int = 3) -> FilePlan:
    return FilePlan(
        id=file_id,
        name="c.jsonl",
        content_hash="h",
        seed=1,
        train_rows=8,
        train_fingerprint="fp",
        rows_per_micro=4,
        replay_rows=0,
        epochs=1,
        micro_total=2,
        steps_total=1,
        global_step_start=5,
    )


def test_stream_state_round_trip_and_version() -> None:
    from evertrain.data import DataCursor

    s = StreamState()
    s.completed, s.last_file = [1, 2], {"id": 2, "steps": 4}
    s.begin(_plan(), DataCursor(1, 8, 4, "fp"))
    s.cursor.advance()  # type: ignore[union-attr]
    state = json.loads(json.dumps(s.state_dict()))  # JSON only
    t = StreamState()
    t.load_state_dict(state)
    assert t.completed == [1, 2] and t.current == s.current and t.cursor is None
    cursor = DataCursor(1, 8, 4, "fp")
    t.attach(cursor)
    assert cursor.offset == 4 and t.state_dict() == state
    with pytest.raises(StateVersionError):
        t.load_state_dict({**state, "version": 2})


def test_replay_draws_are_a_function_of_seed_step_and_micro() -> None:
    def ds(n: int) -> TokenizedDataset:
        ids = torch.arange(n * 4, dtype=torch.int32).reshape(n, 4)
        return TokenizedDataset(ids, ids.clone(), torch.ones(n, 4, dtype=torch.bool))

    pool = [ds(5), ds(7)]
    a = ReplaySampler(3, pool, 2)
    assert a.indices(10, 0) == ReplaySampler(3, pool, 2).indices(10, 0)
    draws = {tuple(a.indices(s, m)) for s in range(20) for m in range(2)}
    assert len(draws) > 30  # different steps draw different rows
    assert all(0 <= i < len(pool[k]) for d in draws for k, i in d)
    state = torch.get_rng_state()
    batch = {k: torch.zeros(2, 4, dtype=torch.long) for k in ("input_ids", "labels")}
    out = a.extend(batch, 4, 1)
    assert out["input_ids"].shape == (4, 4) and torch.equal(torch.get_rng_state(), state)


def test_control_record(tmp_path: Path) -> None:
    path = tmp_path / "control.json"
    reader = ControlReader(path)
    assert reader.read().paused is False
    write_control(path, paused=True)
    assert reader.read().paused is True
    write_control(path, snapshot=True)
    c = reader.read()
    assert c.paused is True and c.snapshot_requested is not None
    path.write_text('{"paused": "yes"}')
    assert reader.read().paused is False  # malformed: ignored, training goes on


def test_reconcile_requeues_done_files_a_restored_checkpoint_lacks(tmp_path: Path) -> None:
    """After a damaged newest checkpoint the daemon restores an older one: files the ledger
    calls done but the checkpoint does not include are trained again; the file the
    checkpoint was in the middle of resumes; an end-of-file checkpoint not yet recorded
    marks its file done; an orphan left by a crash during intake gets its row."""
    layout = RunLayout(tmp_path / "run")
    layout.create()
    led = Ledger(layout.ledger)
    now = time.time()
    for i, status, folder in (
        (1, "done", layout.processed),
        (2, "training", layout.queue),
        (3, "done", layout.processed),
        (4, "validating", layout.queue),
        (6, "done", layout.queue),  # crashed after the ledger update, before the move
        (7, "rejected", layout.queue),  # same, for a rejection: the reason file is written
    ):
        name = f"f{i}.jsonl"
        (folder / stored_name(i, name)).write_text('{"text": "x"}\n')
        rel = layout.rel(folder / stored_name(i, name))
        led.insert(FileRow(i, name, rel, f"h{i}", 1, status, now, error="bad" if i == 7 else None))
    (layout.queue / stored_name(5, "f5.jsonl")).write_text('{"text": "y"}\n')  # orphan
    stream = StreamState()
    stream.load_state_dict(
        {
            "version": 1,
            "completed": [1, 2, 6],
            "last_file": {"id": 2, "steps": 7, "examples": 28, "global_step_end": 9},
            "current": None,
            "cursor": None,
        }
    )
    reconcile(layout, led, stream)
    got = {r.id: r for r in led.rows()}
    assert got[2].status == "done" and got[2].steps == 7 and got[2].examples == 28
    assert (
        got[2].path == "processed/000002-f2.jsonl"
        and (layout.processed / "000002-f2.jsonl").exists()
    )
    assert got[3].status == "queued" and got[3].path == "queue/000003-f3.jsonl"
    assert (layout.queue / "000003-f3.jsonl").exists()
    assert got[4].status == "queued"
    assert got[5].status == "queued" and got[5].name == "f5.jsonl" and got[5].content_hash
    assert got[6].status == "done" and got[6].path == "processed/000006-f6.jsonl"
    assert (layout.processed / "000006-f6.jsonl").exists()
    assert got[7].path == "rejected/000007-f7.jsonl"
    assert (layout.rejected / "000007.reason.txt").read_text().startswith("f7.jsonl")
    assert sorted(os.listdir(layout.queue)) == [
        "000003-f3.jsonl",
        "000004-f4.jsonl",
        "000005-f5.jsonl",
    ]
    led.close()


def test_snapshot_schedule(tmp_path: Path) -> None:
    import datetime as dt

    from evertrain.daemon.snapshots import Snapshots

    layout = RunLayout(tmp_path / "run")
    layout.create()
    led = Ledger(layout.ledger)
    cfg = prepare_watch_config(
        load_config({"watch": {"snapshot_every_files": 2, "snapshot_daily_at": "03:00"}})
    )
    snaps = Snapshots(layout, led, cfg)
    assert [snaps.due_files(n) for n in (0, 1, 2)] == [False, False, True]
    led.add_snapshot("snapshots/a", 10, 2, time.time(), "files")
    assert [snaps.due_files(n) for n in (2, 3, 4)] == [False, False, True]

    day = dt.datetime(2030, 5, 6)
    at = (day.replace(hour=3)).timestamp()
    assert not snaps.due_daily(at - 60, 50)  # before 03:00
    led.add_snapshot("snapshots/b", 40, 3, at - 3600, "files")
    assert snaps.due_daily(at + 60, 50)  # past 03:00, last snapshot before it
    assert not snaps.due_daily(at + 60, 0)  # nothing trained
    led.add_snapshot("snapshots/c", 50, 3, at + 60, "daily")
    assert not snaps.due_daily(at + 120, 60)  # today's is taken
    assert snaps.due_daily(at + 86400 + 60, 60)  # tomorrow's is due
    led.close()
