"""A full or read-only disk pauses the daemon (status.json says why), which resumes by
itself when the disk takes writes again, bit-identical to a run that never paused; a run
directory that is read-only from the start is one line and exit 2 (issue 11, item 4).

Two ways to fill the disk: a real small tmpfs (where this machine lets the test mount one:
root with CAP_SYS_ADMIN), and fault injection at each write layer (the ledger, metrics,
a checkpoint file) everywhere else."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_identical, cli_env, evertrain, train_losses, write_config
from daemon_util import drop, equal_files, load_watch, rows, wait_for, watch_config
from evertrain.checkpoint import CheckpointManager, KeepLast, read_checkpoint, verify_checkpoint
from evertrain.daemon import Daemon

N_FILES, TRAIN_ROWS = 3, 24  # 3 optimizer steps per file (micro 4 x accumulation 2)
TOTAL = N_FILES * 3


def config(tmp: Path) -> Path:
    return watch_config(
        tmp,
        checkpoint={"every_steps": 2, "keep_last": 3},
        watch={"retry_seconds": 0.3, "eval_earlier_files": 1},
    )


def status(run: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((run / "status.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def outcome(run: Path) -> tuple[dict[str, Any], dict[int, float]]:
    """The newest checkpoint's states (every owner but the clock-bearing stream) and the
    logged loss per step, after checking every checkpoint left on disk verifies."""
    ckpts = run / "checkpoints"
    assert not list(ckpts.glob("*.tmp")), "a partial checkpoint was left behind"
    for d in ckpts.glob("step-*"):
        assert verify_checkpoint(d) == [], d
    info = CheckpointManager(ckpts, KeepLast(1)).latest_valid()
    assert info is not None and info.global_step == TOTAL
    states = read_checkpoint(info.path).states
    return {k: v for k, v in states.items() if k in ("model", "optimizer", "rng", "scheduler")}, (
        train_losses(run)
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The files, and a run that never paused."""
    tmp = tmp_path_factory.mktemp("disk-ref")
    files = equal_files(tmp / "src", N_FILES, train_rows=TRAIN_ROWS, val_rows=3)
    run = tmp / "run"
    for f in files:
        drop(f, run / "inbox")
    assert Daemon(run, load_watch(config(tmp)), once=True).run() == 0
    return tmp / "src", run


def dashboard_status(run: Path) -> dict[str, Any]:
    from starlette.testclient import TestClient

    from evertrain.dashboard.app import create_app

    app = create_app(run, token="t" * 43, loopback=True, port=8765, max_upload_bytes=1 << 20)
    with TestClient(app, base_url="http://127.0.0.1:8765") as c:
        return dict(c.get("/api/status").json()["status"])


def _enospc(where: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)


@pytest.mark.parametrize("layer", ["metrics", "ledger", "checkpoint"])
def test_full_disk_at_each_write_layer_pauses_and_resumes_bit_identical(
    tmp_path: Path, reference: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, layer: str
) -> None:
    import evertrain.checkpoint.commit as commit
    from evertrain.daemon.ledger import Ledger
    from evertrain.metrics import MetricsLog

    src, ref_run = reference
    run = tmp_path / "run"
    for f in sorted(src.iterdir()):
        drop(f, run / "inbox")
    daemon = Daemon(run, load_watch(config(tmp_path)), once=True)
    fault = {"armed": True, "full": False, "hits": 0}

    def full_now() -> bool:
        # the disk fills once training passed step 3 (mid file 2), and stays full until
        # the test frees it
        tr = daemon.trainer
        if fault["armed"] and tr is not None and tr.progress.global_step >= 3:
            fault["full"] = True
        if fault["full"]:
            fault["hits"] += 1
        return bool(fault["full"])

    if layer == "metrics":
        write = MetricsLog.write

        def metrics_write(self: MetricsLog, record: dict[str, Any]) -> None:
            if full_now():
                raise _enospc(str(self.path))
            write(self, record)

        monkeypatch.setattr(MetricsLog, "write", metrics_write)
    elif layer == "ledger":
        update = Ledger.update

        def ledger_update(self: Ledger, file_id: int, **values: Any) -> None:
            if full_now():
                raise sqlite3.OperationalError("database or disk is full")
            update(self, file_id, **values)

        monkeypatch.setattr(Ledger, "update", ledger_update)
    else:
        write_parts = commit._write_parts

        def checkpoint_write(path: Path, parts: Any) -> Any:
            if full_now():
                raise _enospc(str(path))
            return write_parts(path, parts)

        monkeypatch.setattr(commit, "_write_parts", checkpoint_write)

    # the daemon's probe write must see the same full disk, or it resumes at once and the
    # state flips between "paused" and "training" while the test looks
    import evertrain.daemon.loop as loop

    probe = loop.probe_write

    def probe_write(root: Path, min_free_bytes: int = 0) -> str | None:
        return "No space left on device (injected)" if full_now() else probe(root, min_free_bytes)

    monkeypatch.setattr(loop, "probe_write", probe_write)

    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(daemon.run()))
    thread.start()
    try:
        wait_for(lambda: status(run).get("state") == "paused", what="the pause")
        s = status(run)
        assert (
            "disk full" in s["warning"]
            and "No space left" in s["warning"]
            or ("disk is full" in s["warning"])
        ), s["warning"]
        wait_for(lambda: fault["hits"] >= 2, what="a retry while still full")
        assert status(run)["state"] == "paused" and thread.is_alive()
        shown = dashboard_status(run)  # what the dashboard's page shows
        assert shown["state"] == "paused" and shown["warning"] == status(run)["warning"]
        fault["armed"] = fault["full"] = False  # space freed
    finally:
        fault["armed"] = fault["full"] = False
        thread.join(timeout=300)
    assert result == [0]
    assert [(r.status, r.attempts) for r in rows(run)] == [("done", 0)] * N_FILES
    assert [r.examples for r in rows(run)] == [r.examples for r in rows(ref_run)]
    got, losses = outcome(run)
    want, ref_losses = outcome(ref_run)
    assert_identical(got, want)
    assert losses == ref_losses and sorted(losses) == list(range(1, TOTAL + 1))
    assert status(run)["warning"] is None


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
        ).returncode
        == 0
    )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    if not _mount_tmpfs(disk, "64m"):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    """Write a ballast file until the file system says ENOSPC."""
    ballast = disk / "ballast"
    with open(ballast, "wb", buffering=0) as f:  # unbuffered: close has nothing to flush
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    return ballast


@pytest.mark.slow
def test_real_full_tmpfs_pauses_and_resumes_bit_identical(
    tmp_path: Path, reference: tuple[Path, Path], small_disk: Path
) -> None:
    src, ref_run = reference
    run = small_disk / "run"
    for f in sorted(src.iterdir()):
        drop(f, run / "inbox")
    proc = subprocess.Popen(
        [sys.executable, "-m", "evertrain", "watch", str(run), "--config", str(config(tmp_path))]
        + ["--once"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (status(run).get("global_step") or 0) >= 1, what="training")
        ballast = _fill(small_disk)
        wait_for(lambda: status(run).get("state") == "paused", what="the pause")
        # which write meets the full disk first depends on timing: a checkpoint's free-space
        # check (skipped and retried), a file write that fails with ENOSPC, or the ledger's
        # SQLite write ("database or disk is full"); each pauses the same way
        warning = status(run)["warning"]
        reasons = ("No space left on device", "not enough disk space", "disk is full")
        assert warning.startswith("paused: ") and any(r in warning for r in reasons), warning
        assert proc.poll() is None
        ballast.unlink()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert [(r.status, r.attempts) for r in rows(run)] == [("done", 0)] * N_FILES
    got, losses = outcome(run)
    want, ref_losses = outcome(ref_run)
    assert_identical(got, want)
    assert losses == ref_losses


@pytest.mark.parametrize("command", ["train", "watch"])
def test_read_only_run_dir_is_one_line_exit_2(tmp_path: Path, command: str) -> None:
    disk = tmp_path / "ro"
    if _mount_tmpfs(disk, "1m"):
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    elif os.geteuid() != 0:
        disk.mkdir()
        disk.chmod(0o555)  # not root: permissions stop the writes
    else:
        pytest.skip("root without mount: neither a read-only mount nor permissions apply")
    try:
        cfg = config(tmp_path)
        args = (
            ["train", str(cfg), "--run-dir", str(disk / "run")]
            if command == "train"
            else ["watch", str(disk / "run"), "--config", str(cfg), "--once"]
        )
        proc = subprocess.run(
            [sys.executable, "-m", "evertrain", *args],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not writable" in lines[0] and str(disk / "run") in lines[0]


def test_train_on_a_full_disk_exits_75_and_resumes_bit_identical(tmp_path: Path) -> None:
    # checkpoints of every step fill a 20 MB disk around step 12: the saves after are skipped
    # (too little space) and retried; the last one too, which used to end "done", exit 0,
    # with steps 13..40 in no checkpoint
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "20m"):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        cfg = write_config(
            tmp_path,
            train={"max_steps": 40, "eval_every_steps": None},
            checkpoint={"every_steps": 1, "keep_last": 100},
        )
        evertrain("train", str(cfg), "--run-dir", str(tmp_path / "ref"))
        run = disk / "run"
        proc = evertrain("train", str(cfg), "--run-dir", str(run), check=False)
        assert proc.returncode == 75, proc.stderr[-3000:]
        err = [x for x in proc.stderr.splitlines() if " INFO " not in x and " WARNING " not in x]
        assert len(err) == 1 and err[0].startswith("error: disk full or read-only: "), err
        newest = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
        assert 1 <= newest < 40 and f"the newest checkpoint is global_step {newest}" in err[0]
        subprocess.run(["mount", "-o", "remount,size=100m", str(disk)], check=True)
        evertrain("train", str(cfg), "--run-dir", str(run))  # resumes from `newest`
        assert train_losses(run) == train_losses(tmp_path / "ref")
        got, want = (
            read_checkpoint(r / "checkpoints" / "step-00000040").states
            for r in (run, tmp_path / "ref")
        )
        for owner in ("model", "optimizer", "rng", "scheduler", "data_cursor", "progress"):
            assert_identical(got[owner], want[owner])
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)
