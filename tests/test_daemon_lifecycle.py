"""One daemon per run directory; SIGTERM stops after the current step with a committed
checkpoint and exit 0; pause, disk-full and snapshots while a daemon runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import cli_env, evertrain, train_losses
from daemon_util import drop, equal_files, load_watch, rows, wait_for, watch_config
from evertrain.checkpoint import CheckpointManager, KeepLast
from evertrain.cli import app
from evertrain.daemon import (
    Daemon,
    Ledger,
    RunLock,
    RunLockedError,
    resolve_watch_config,
    write_control,
)
from evertrain.daemon.ledger import SnapshotRow


def status(run: Path) -> dict[str, object]:
    try:
        return dict(json.loads((run / "status.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def snapshot_rows(run: Path) -> list[SnapshotRow]:
    led = Ledger(run / "ledger.sqlite", readonly=True)
    try:
        return led.snapshots()
    finally:
        led.close()


def test_second_daemon_refused_and_sigterm_leaves_a_checkpoint(tmp_path: Path) -> None:
    files = equal_files(tmp_path / "src", 1, train_rows=8, val_rows=2)
    # 8 rows / micro-batch 4 = 2 micro-batches per epoch = 1 step; 30 epochs = 30 steps
    config = watch_config(tmp_path, watch={"epochs_per_file": 30, "poll_seconds": 0.1})
    run = tmp_path / "run"
    drop(files[0], run / "inbox")
    first = subprocess.Popen(
        [sys.executable, "-m", "evertrain", "watch", str(run), "--config", str(config)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: steps_done(run) >= 2, what="the first daemon training")
        # held (control.json) while the second daemon and `status` are tried, so the file
        # cannot finish first however fast the machine
        write_control(run / "control.json", paused=True)
        wait_for(lambda: status(run).get("state") == "paused", what="paused")
        second = evertrain("watch", str(run), check=False, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"PID {first.pid}" in second.stderr and "another `evertrain watch`" in second.stderr

        shown = CliRunner().invoke(app, ["status", str(run), "--json"])
        assert shown.exit_code == 0, shown.output
        st = json.loads(shown.output)
        assert st["daemon_running"] is True and st["state"] == "paused"
        assert st["files"][0]["status"] == "training"

        held = steps_done(run)
        write_control(run / "control.json", paused=False)
        wait_for(lambda: steps_done(run) > held, what="training again")
        first.send_signal(signal.SIGTERM)  # while training: stops after the current step
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    final = status(run)
    assert final["state"] == "stopped"
    stopped_at = final["global_step"]
    assert isinstance(stopped_at, int) and held < stopped_at < 30
    info = CheckpointManager(run / "checkpoints", KeepLast(1)).latest_valid()
    assert info is not None and info.global_step == stopped_at  # committed and verified
    assert [r.status for r in rows(run)] == ["training"]
    text = CliRunner().invoke(app, ["status", str(run)])
    assert text.exit_code == 0 and "stopped" in text.output and "part-0.jsonl" in text.output

    # restarted (here in-process, with the config the ledger stored), it finishes the file
    # from where it stopped: every step exactly once
    ledger = Ledger(run / "ledger.sqlite", readonly=True)
    stored = ledger.meta_get("config")
    ledger.close()
    assert Daemon(run, resolve_watch_config(run, None, [], stored), once=True).run() == 0
    (row,) = rows(run)
    assert row.status == "done" and row.steps == 30 and row.examples == 8 * 30
    assert sorted(train_losses(run)) == list(range(1, 31))


def steps_done(run: Path) -> int:
    cur = status(run).get("current_file") or {}
    return int(cur.get("steps_done", 0))  # type: ignore[union-attr]


HOLD = (
    "import sys, time\n"
    "from evertrain.runlock import RunLock\n"
    "RunLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def test_lock_names_the_holder_and_is_shared_within_a_process(tmp_path: Path) -> None:
    path = tmp_path / "daemon.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = path.read_bytes()
        with pytest.raises(RunLockedError, match=rf"in use by PID {holder.pid} on \S+ \(since "):
            RunLock(path).acquire()
        assert path.read_bytes() == before  # the refused probe did not touch the record
    finally:
        holder.kill()
        holder.wait()
    # one process: the daemon's trainer takes the lock its daemon holds (a reference)
    first, second = RunLock(path), RunLock(path)
    first.acquire()
    second.acquire()
    second.release()
    probe = subprocess.run([sys.executable, "-c", HOLD.replace("120", "0"), str(path)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert probe.returncode != 0 and "in use by PID" in probe.stderr  # still held
    first.release()
    RunLock(path).acquire()  # released: free again


def test_pause_disk_full_retry_and_snapshots(tmp_path: Path) -> None:
    """Paused through control.json nothing trains; a checkpoint that does not fit on disk
    is retried (the file is not done until it is written) and nothing is deleted; snapshots
    after each file and on request are loadable PEFT adapters, pruned to keep_last."""
    files = equal_files(tmp_path / "src", 2, train_rows=8, val_rows=2)
    cfg = load_watch(
        watch_config(
            tmp_path,
            checkpoint={"every_steps": 1, "keep_last": 10, "min_free_bytes": 1 << 60},
            watch={
                "epochs_per_file": 2,
                "retry_seconds": 0.2,
                "snapshot_every_files": 1,
                "snapshot_keep_last": 2,
            },
        )
    )
    run = tmp_path / "run"
    (run).mkdir()
    write_control(run / "control.json", paused=True)
    drop(files[0], run / "inbox")
    daemon = Daemon(run, cfg)
    thread = threading.Thread(target=daemon.run)
    thread.start()
    try:
        wait_for(lambda: status(run).get("state") == "paused", what="paused")
        time.sleep(0.5)
        assert [r.status for r in rows(run)] == [
            "queued"
        ] and daemon.trainer.progress.global_step == 0

        write_control(run / "control.json", paused=False)
        wait_for(lambda: bool(status(run).get("warning")), what="the disk-space warning")
        wait_for(
            lambda: (
                (status(run).get("current_file") or {}).get("steps_done") == 2  # type: ignore[union-attr]
                or daemon.stream.current is None
            ),
            what="the file's last step",
        )
        time.sleep(0.5)
        assert [r.status for r in rows(run)] == ["training"]  # not done: no checkpoint yet
        assert not list((run / "checkpoints").glob("step-*"))
        assert "disk space" in str(status(run)["warning"])

        daemon.trainer.checkpoints.min_free_bytes = 0  # space freed
        wait_for(lambda: rows(run)[0].status == "done", what="file 1 done")
        assert status(run)["warning"] is None
        drop(files[1], run / "inbox")
        wait_for(lambda: len(rows(run)) == 2 and rows(run)[1].status == "done", what="file 2")
        wait_for(lambda: len(list((run / "snapshots").iterdir())) == 2, what="snapshots")
        write_control(run / "control.json", snapshot=True)
        wait_for(
            lambda: (
                (status(run).get("last_snapshot") or {}).get("path", "").count("step-4")  # type: ignore[union-attr]
                and len(snapshot_rows(run)) == 2
                and snapshot_rows(run)[-1].reason == "request"
            ),
            what="the requested snapshot",
        )
    finally:
        daemon.request_stop()
        thread.join(timeout=120)
    snaps = sorted(p for p in (run / "snapshots").iterdir())
    assert len(snaps) == 2  # keep_last 2 of 3
    meta = json.loads((snaps[-1] / "snapshot.json").read_text())
    assert meta["reason"] == "request" and meta["files"] == [1, 2]
    assert meta["global_step"] == rows(run)[1].global_step_end == 4

    from peft import PeftModel

    from evertrain.models import load_model

    base = load_model(cfg.model).model
    peft_model = PeftModel.from_pretrained(base, str(snaps[-1]))
    trained = {k: v for k, v in daemon.trainer.model.state_dict().items() if "lora_" in k}
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert set(trained) == set(loaded) and trained
    for k in trained:
        assert (trained[k] == loaded[k]).all(), k
