"""Bad inputs are refused one by one with a specific reason while the good files train, and
nothing that lands in the inbox is ever lost."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from daemon_util import equal_files, load_watch, rows, watch_config
from evertrain.daemon import Daemon
from evertrain.daemon.intake import InboxScanner, is_ignored

MAX_BYTES = 20_000


def test_bad_inputs_rejected_with_reasons_good_files_trained(tmp_path: Path) -> None:
    run = tmp_path / "run"
    inbox = run / "inbox"
    inbox.mkdir(parents=True)
    good = equal_files(tmp_path / "src", 2, train_rows=8, val_rows=2)
    old = time.time() - 60
    entries: dict[str, bytes | None] = {
        "good-a.jsonl": good[0].read_bytes(),
        "good-b.jsonl": good[1].read_bytes(),
        "same-as-a.jsonl": good[0].read_bytes(),
        "empty.jsonl": b"",
        "binary.jsonl": bytes(range(256)) * 4,
        "latin1.jsonl": b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
        "malformed.jsonl": b'{"text": "one"}\n{"text": "2"}\n{"text": "three"\n{"text": "4"}\n',
        "missing.jsonl": b'{"prompt": "p", "completion": "c"}\n{"prompt": "no completion"}\n',
        "wrongtype.jsonl": b'{"text": "ok"}\n{"text": 42}\n',
        "notes.docx": b"PK\x03\x04 not a data file",
        "huge.jsonl": b'{"text": "' + b"x" * MAX_BYTES + b'"}\n',
    }
    for name, data in entries.items():
        assert data is not None
        (inbox / name).write_bytes(data)
        os.utime(inbox / name, (old, old))
    (tmp_path / "outside.jsonl").write_bytes(good[1].read_bytes())
    os.symlink(tmp_path / "outside.jsonl", inbox / "link.jsonl")
    (inbox / "folder").mkdir()
    (inbox / "folder" / "x.jsonl").write_bytes(good[0].read_bytes())
    # the write-then-rename convention: names the daemon must leave alone
    (inbox / "upload.jsonl.part").write_bytes(b"half")
    (inbox / ".hidden.jsonl").write_bytes(b"half")

    # a file that never stops growing (its writer keeps the file open, as a logger would)
    stop = threading.Event()
    growing = open(inbox / "growing.jsonl", "ab")  # noqa: SIM115 - closed below

    def grow() -> None:
        while not stop.is_set():
            growing.write(b'{"text": "more"}\n')
            growing.flush()
            time.sleep(0.05)

    writer = threading.Thread(target=grow)
    writer.start()
    cfg = load_watch(
        watch_config(
            tmp_path,
            watch={
                "settle_seconds": 1.0,  # the writer appends every 0.05 s: never this quiet
                "settle_timeout_seconds": 2.5,
                "poll_seconds": 0.1,
                "max_file_bytes": MAX_BYTES,
                "eval_earlier_files": 0,
            },
        )
    )
    try:
        assert Daemon(run, cfg, once=True).run() == 0
    finally:
        stop.set()
        writer.join()
        growing.close()

    by_name = {r.name: r for r in rows(run)}
    assert sorted(os.listdir(inbox)) == [".hidden.jsonl", "upload.jsonl.part"]
    expected_reason = {
        "empty.jsonl": "empty file",
        "binary.jsonl": "binary content",
        "latin1.jsonl": "line 2: invalid UTF-8",
        "malformed.jsonl": "line 3: invalid JSON",
        "missing.jsonl": "line 2, field 'completion'",
        "wrongtype.jsonl": "line 2, field 'text'",
        "notes.docx": "unknown file extension '.docx'",
        "huge.jsonl": f"over watch.max_file_bytes ({MAX_BYTES})",
        "link.jsonl": "symbolic link",
        "folder": "is a directory",
        "growing.jsonl": "still being written",
    }
    assert set(by_name) == set(expected_reason) | {
        "good-a.jsonl",
        "good-b.jsonl",
        "same-as-a.jsonl",
    }
    for name, phrase in expected_reason.items():
        r = by_name[name]
        assert r.status == "rejected", (name, r)
        assert r.error is not None and phrase in r.error, (name, r.error)
        stored = run / "rejected" / f"{r.id:06d}-{name}"
        assert os.path.lexists(stored), name
        reason = (run / "rejected" / f"{r.id:06d}.reason.txt").read_text()
        assert phrase in reason and name in reason
        assert str(run) not in reason  # the reason names the file as the user called it
    assert os.path.islink(run / "rejected" / f"{by_name['link.jsonl'].id:06d}-link.jsonl")
    assert (tmp_path / "outside.jsonl").read_bytes() == good[1].read_bytes()  # target untouched
    grown = run / "rejected" / f"{by_name['growing.jsonl'].id:06d}-growing.jsonl"
    assert grown.stat().st_size > 0  # the writer's data followed the file; nothing lost

    for name in ("good-a.jsonl", "good-b.jsonl"):
        r = by_name[name]
        assert r.status == "done" and r.examples == 8 and r.steps == 1, r
    dup = by_name["same-as-a.jsonl"]
    assert dup.status == "duplicate" and dup.steps is None
    assert dup.error and f"identical to file {by_name['good-a.jsonl'].id}" in dup.error
    # every taken entry ends in processed/ or rejected/ with a ledger row
    for r in by_name.values():
        folder = "rejected" if r.status == "rejected" else "processed"
        assert r.path == f"{folder}/{r.id:06d}-{r.name}" and os.path.lexists(run / r.path)
    assert os.listdir(run / "queue") == []
    status = json.loads((run / "status.json").read_text())
    assert status["counts"] == {
        "queued": 0,
        "validating": 0,
        "training": 0,
        "done": 2,
        "rejected": len(expected_reason),
        "duplicate": 1,
    }


def test_scanner_settles_files_and_ignores_in_progress_names(tmp_path: Path) -> None:
    now = [1000.0]
    wall = [5_000_000.0]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    scanner = InboxScanner(inbox, 2.0, 10.0, 1 << 20, clock=lambda: now[0], wall=lambda: wall[0])
    f = inbox / "a.jsonl"
    f.write_bytes(b"1")
    os.utime(f, (wall[0], wall[0]))
    (inbox / "b.jsonl.PART").write_bytes(b"x")
    assert is_ignored("b.jsonl.PART") and is_ignored(".x") and is_ignored("y.tmp")
    assert scanner.scan() == [] and scanner.settling == ["a.jsonl"]  # just written
    now[0] += 1.5
    wall[0] += 1.5
    f.write_bytes(b"12")  # still changing
    os.utime(f, (wall[0], wall[0]))
    assert scanner.scan() == []
    now[0] += 1.9
    wall[0] += 1.9
    assert scanner.scan() == []  # quiet for 1.9 s < 2 s
    now[0] += 0.2
    wall[0] += 0.2
    ready = scanner.scan()
    assert [(a.name, a.reject) for a in ready] == [("a.jsonl", None)]
