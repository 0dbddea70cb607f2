"""A bad file never stops the daemon: hostile records, unexpected errors while a file is
validated or trained, names too long for a reason file, files that kill the daemon, and
files appended to after intake each cost that one file (rejected with its reason) while
the daemon goes on with the next."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from conftest import evertrain
from daemon_util import equal_files, load_watch, rows, watch_config
from evertrain.checkpoint import CheckpointManager, KeepLast, read_checkpoint
from evertrain.config import RunConfig
from evertrain.daemon import Daemon, FileRow, Ledger
from evertrain.daemon.intake import Arrival, InboxScanner, take_arrivals
from evertrain.daemon.layout import MAX_STORED_BYTES, RunLayout
from evertrain.daemon.reconcile import FileTooLargeError, own_copy

# 8 training rows per file, micro-batch 4, 2 micro-batches per step: one step per epoch
SECTIONS: dict[str, Any] = {
    "model": {
        "source": "tiny",
        "num_threads": 1,
        "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    },
    "watch": {
        "settle_seconds": 0.0,
        "poll_seconds": 0.05,
        "status_every_seconds": 0.2,
        "eval_earlier_files": 0,
    },
}


def config(tmp: Path, epochs: int = 1, **data: Any) -> Path:
    watch = {**SECTIONS["watch"], "epochs_per_file": epochs}
    extra = {
        "data": {"seq_len": 48, "packing": False, "val_fraction": 0.2, **data},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
    }
    return watch_config(tmp, model=SECTIONS["model"], watch=watch, **extra)


def fill_inbox(run: Path, entries: list[tuple[str, bytes]]) -> None:
    """Drop ``entries`` in this order (distinct mtimes: arrival order is mtime order),
    written under short temporary names (``.NAME.part`` of a long NAME is too long)."""
    inbox = run / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    for k, (name, data) in enumerate(entries):
        tmp = inbox / f".drop-{k}.part"
        tmp.write_bytes(data)
        mtime = 1_000_000_000.0 + len(os.listdir(inbox))
        os.utime(tmp, (mtime, mtime))
        os.rename(tmp, inbox / name)


def run_once(run: Path, cfg: RunConfig) -> Daemon:
    daemon = Daemon(run, cfg, once=True)
    assert daemon.run() == 0
    return daemon


def by_name(run: Path) -> dict[str, FileRow]:
    return {r.name: r for r in rows(run)}


def reason_file(run: Path, row: FileRow) -> str:
    return (run / "rejected" / f"{row.id:06d}.reason.txt").read_text(encoding="utf-8")


def stream_state(run: Path, step: int | None = None) -> dict[str, Any]:
    """The stream owner of the newest checkpoint, or of the one at ``step``."""
    if step is None:
        info = CheckpointManager(run / "checkpoints", KeepLast(1)).latest_valid()
        assert info is not None
        path = info.path
    else:
        path = run / "checkpoints" / f"step-{step:08d}"
    return dict(read_checkpoint(path).states["stream"])


@pytest.fixture
def good(tmp_path: Path) -> list[bytes]:
    return [p.read_bytes() for p in equal_files(tmp_path / "good", 2, train_rows=8, val_rows=2)]


def test_deeply_nested_records_rejected_with_their_line(tmp_path: Path, good: list[bytes]) -> None:
    """Nesting ~10^5 levels deep made the JSON parser raise RecursionError, which killed the
    daemon, and again at every start (the file stayed `validating`)."""
    run = tmp_path / "run"
    first = good[0].split(b"\n", 1)[0]
    array = first + b"\n" + b"[" * 100_000 + b"]" * 100_000 + b"\n"
    obj = first + b"\n" + first + b"\n" + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"\n"
    fill_inbox(run, [("array.jsonl", array), ("object.jsonl", obj), ("good.jsonl", good[0])])
    run_once(run, load_watch(config(tmp_path)))
    got = by_name(run)
    for name, line in (("array.jsonl", 2), ("object.jsonl", 3)):
        r = got[name]
        assert r.status == "rejected" and r.error is not None, r
        assert f"{name}, line {line}: JSON nested deeper than 100 levels" in r.error
        assert f"line {line}" in reason_file(run, r)
    assert got["good.jsonl"].status == "done" and got["good.jsonl"].steps == 1


def test_record_over_max_record_bytes_rejected_with_file_and_line(
    tmp_path: Path, good: list[bytes]
) -> None:
    run = tmp_path / "run"
    lines = good[0].splitlines()
    big = json.dumps({"text": "x " * 150}).encode()  # 312 bytes
    fill_inbox(run, [("big.jsonl", b"\n".join([*lines[:2], big, *lines[2:]]) + b"\n")])
    fill_inbox(run, [("good.jsonl", good[1])])
    run_once(run, load_watch(config(tmp_path, max_record_bytes=200)))
    got = by_name(run)
    err = got["big.jsonl"].error
    assert got["big.jsonl"].status == "rejected" and err is not None
    assert "big.jsonl, line 3: record of 312 bytes, over data.max_record_bytes (200)" in err
    assert got["good.jsonl"].status == "done"


def test_long_names_get_short_stored_names_and_reason_files_by_id(
    tmp_path: Path, good: list[bytes]
) -> None:
    """A legal 246-character name made `<id>-NAME.reason.txt` longer than NAME_MAX: writing
    the reason failed with ENAMETOOLONG and killed the daemon."""
    run = tmp_path / "run"
    bad_name, good_name = "b" * 240 + ".jsonl", "g" * 244 + ".jsonl"  # 246, 250 characters
    fill_inbox(run, [(bad_name, b'{"text": "unclosed\n'), (good_name, good[0])])
    run_once(run, load_watch(config(tmp_path)))
    bad, ok = by_name(run)[bad_name], by_name(run)[good_name]
    assert bad.status == "rejected" and bad.error and "line 1: invalid JSON" in bad.error
    assert reason_file(run, bad).startswith(f"{bad_name}: rejected\n")
    assert ok.status == "done" and ok.steps == 1
    for r in (bad, ok):
        stored = Path(r.path).name
        assert (run / r.path).is_file() and stored.endswith("~.jsonl")
        assert stored.startswith(f"{r.id:06d}-") and len(stored.encode()) <= MAX_STORED_BYTES
    assert sorted(os.listdir(run / "rejected")) == [Path(bad.path).name, "000001.reason.txt"]
    assert os.listdir(run / "inbox") == []


def test_unexpected_error_while_validating_rejects_the_file(
    tmp_path: Path, good: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    import evertrain.daemon.files as files

    real = files.validate_file

    def validate(path: Path, cfg: Any, policy: Any = None) -> Any:
        if "boom" in Path(path).name:
            raise RuntimeError(f"tokenizer exploded on {path}")
        return real(path, cfg, policy)

    monkeypatch.setattr(files, "validate_file", validate)
    run = tmp_path / "run"
    fill_inbox(run, [("boom.jsonl", good[0]), ("good.jsonl", good[1])])
    run_once(run, load_watch(config(tmp_path)))
    got = by_name(run)
    err = got["boom.jsonl"].error
    assert got["boom.jsonl"].status == "rejected" and err is not None
    assert "RuntimeError while validating it: tokenizer exploded on boom.jsonl" in err
    assert str(run) not in err and got["boom.jsonl"].attempts == 0
    assert got["good.jsonl"].status == "done" and got["good.jsonl"].attempts == 0


def test_error_mid_training_rejects_the_file_and_keeps_its_steps(
    tmp_path: Path, good: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    import evertrain.daemon.files as files

    real = files.file_batches

    def batches(plan: Any, *args: Any, **kw: Any) -> Iterator[Any]:
        for k, batch in enumerate(real(plan, *args, **kw)):
            if plan.id == 1 and k == 2:  # the first micro-batch of step 2
                raise RuntimeError("bad batch")
            yield batch

    monkeypatch.setattr(files, "file_batches", batches)
    run = tmp_path / "run"
    fill_inbox(run, [("first.jsonl", good[0]), ("second.jsonl", good[1])])
    run_once(run, load_watch(config(tmp_path, epochs=3)))
    first, second = by_name(run)["first.jsonl"], by_name(run)["second.jsonl"]
    assert first.status == "rejected" and first.error is not None
    assert "RuntimeError while training it: bad batch" in first.error
    assert "its first 1 of 3 optimizer steps stay trained" in first.error
    assert (first.steps, first.global_step_start, first.global_step_end) == (1, 0, 1)
    assert second.status == "done" and (second.global_step_start, second.global_step_end) == (
        1,
        4,
    )
    at_1 = stream_state(run, 1)  # the step it kept, checkpointed at once without the file
    assert at_1["current"] is None and at_1["completed"] == []
    assert stream_state(run)["current"] is None and stream_state(run)["completed"] == [2]
    ends = [
        json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "file_end" in x
    ]
    assert [(e["file_id"], e["global_step"], e.get("rejected")) for e in ends] == [
        (1, 1, True),
        (2, 4, None),
    ]


def test_file_appended_after_intake_trains_the_hashed_bytes(
    tmp_path: Path, good: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking a file was a rename: a writer holding it open appended to the queued file
    itself, whose bytes then no longer matched the recorded hash."""
    import evertrain.daemon.loop as loop

    run = tmp_path / "run"
    fill_inbox(run, [("log.jsonl", good[0])])
    writer = open(run / "inbox" / "log.jsonl", "ab")  # noqa: SIM115 - closed below
    real = loop.take_arrivals

    def take_then_append(*args: Any) -> None:
        real(*args)
        if not os.listdir(run / "inbox") and not writer.closed:
            writer.write(b'{"text": "written after the file was taken"}\n' * 4)
            writer.close()

    monkeypatch.setattr(loop, "take_arrivals", take_then_append)
    try:
        run_once(run, load_watch(config(tmp_path)))
    finally:
        writer.close()
    (row,) = rows(run)
    assert row.status == "done" and row.examples == 8, row
    assert row.content_hash == xxhash.xxh3_128_hexdigest(good[0])
    assert (run / row.path).read_bytes() == good[0]


def test_own_copy_is_a_new_inode_and_refuses_growth(tmp_path: Path) -> None:
    path = tmp_path / "000001-f.jsonl"
    path.write_bytes(b"x" * 100)
    inode = path.stat().st_ino
    assert own_copy(path, 100) == (100, xxhash.xxh3_128_hexdigest(b"x" * 100))
    assert path.stat().st_ino != inode and path.read_bytes() == b"x" * 100
    with pytest.raises(FileTooLargeError):
        own_copy(path, 99)
    assert path.read_bytes() == b"x" * 100 and os.listdir(tmp_path) == [path.name]


def test_file_grown_past_max_file_bytes_after_the_scan_is_rejected(tmp_path: Path) -> None:
    """The scan measured it under the limit; by the copy it is over: refused, not read."""
    layout = RunLayout(tmp_path / "run")
    layout.create()
    (layout.inbox / "grows.jsonl").write_bytes(b'{"text": "x"}\n' * 10)  # 140 bytes
    scanner = InboxScanner(layout.inbox, 0.0, 60.0, 100)
    scanner.scan = lambda: [Arrival("grows.jsonl", None, 0)]  # type: ignore[method-assign]
    led = Ledger(layout.ledger)
    events: list[tuple[str, dict[str, Any]]] = []
    take_arrivals(scanner, led, layout, set(), lambda e, p: events.append((e, p)))
    (row,) = led.rows()
    led.close()
    assert row.status == "rejected" and row.path == "rejected/000001-grows.jsonl", row
    assert row.error and "grew to more than 100 bytes after it was taken" in row.error
    assert "watch.max_file_bytes" in reason_file(layout.root, row)
    assert (layout.root / row.path).stat().st_size == 140 and events[0][0] == "rejected"
    assert os.listdir(layout.queue) == []


def test_file_the_daemon_died_on_twice_is_quarantined(tmp_path: Path, good: list[bytes]) -> None:
    """Killed twice while validating file 1 (SIGKILL fault injection), the next start
    rejects it instead of dying on it again; file 2, killed once while training, resumes."""
    run = tmp_path / "run"
    fill_inbox(run, [("killer.jsonl", good[0]), ("second.jsonl", good[1])])
    args = ["watch", str(run), "--config", str(config(tmp_path, epochs=2)), "--once"]
    for fault in ("validate@1", "validate@1", "micro@2:0"):
        proc = evertrain(*args, fault=fault, check=False, timeout=120)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-2000:])
    assert [(r.status, r.attempts) for r in rows(run)] == [("rejected", 2), ("training", 1)]
    evertrain(*args, timeout=120)
    killer, second = rows(run)
    assert killer.status == "rejected" and killer.attempts == 2 and killer.error is not None
    assert "the daemon died twice while processing it" in killer.error
    assert "the daemon died twice while processing it" in reason_file(run, killer)
    assert (second.status, second.steps, second.attempts) == ("done", 2, 0)


def test_quarantine_in_the_middle_of_a_file(tmp_path: Path, good: list[bytes]) -> None:
    """A stop request is not a death; two deaths recorded without progress reject the
    file the checkpoint is in the middle of: its steps stay, the next file goes on."""
    run = tmp_path / "run"
    fill_inbox(run, [("first.jsonl", good[0]), ("second.jsonl", good[1])])
    cfg = load_watch(config(tmp_path, epochs=4))
    daemon = Daemon(run, cfg, once=True)

    def stop_at_2(event: str, payload: dict[str, Any]) -> None:
        if event == "step" and payload["stats"].global_step == 2:
            daemon.request_stop("test")

    daemon.listeners.append(stop_at_2)
    assert daemon.run() == 0
    first = rows(run)[0]
    assert (first.status, first.attempts, first.attempt_step) == ("training", 0, 0)
    led = Ledger(run / "ledger.sqlite")
    led.update(first.id, attempts=2, attempt_step=2)  # as if killed twice after step 2
    led.close()

    run_once(run, cfg)
    first, second = rows(run)
    assert first.status == "rejected" and first.error is not None
    assert "died twice while processing it (each time in its training after step 2 of 4)" in (
        first.error
    )
    assert (first.steps, first.global_step_end, first.attempts) == (2, 2, 2)
    assert second.status == "done" and (second.global_step_start, second.global_step_end) == (
        2,
        6,
    )
    state = stream_state(run)
    assert state["current"] is None and state["completed"] == [2]
