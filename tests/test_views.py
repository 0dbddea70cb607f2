"""Views of a watch run that must tell the truth: status.json progress within a file,
`evertrain inspect` and `evertrain eval` of a watch run, and the `watch --ui` dashboard
dying with a SIGKILLed daemon (so it frees its port)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import cli_env
from daemon_util import drop, equal_files, load_watch, rows, wait_for, watch_config
from evertrain.cli import app
from evertrain.daemon import Daemon
from evertrain.daemon.status import read_status


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A watch run that trained two files to the end (``--once``)."""
    tmp = tmp_path_factory.mktemp("finished")
    run = tmp / "run"
    for f in equal_files(tmp / "src", 2, train_rows=12, val_rows=3):
        drop(f, run / "inbox")
    assert Daemon(run, load_watch(watch_config(tmp)), once=True).run() == 0
    assert [r.status for r in rows(run)] == ["done", "done"]
    return run


def test_status_progress_updates_during_a_file(tmp_path: Path) -> None:
    # 16 rows, 2 per step: 8 optimizer steps, each held 0.4 s (twice status_every_seconds)
    # by a listener; no checkpoint inside the file, so only the periodic writes can show
    # the progress (a checkpoint's forced write would hide the bug).
    (src,) = equal_files(tmp_path / "src", 1, train_rows=16, val_rows=2)
    cfg = load_watch(
        watch_config(
            tmp_path,
            train={"micro_batch_size": 2, "grad_accum_steps": 1},
            checkpoint={"every_steps": 1000},
        )
    )
    run = tmp_path / "run"
    daemon = Daemon(run, cfg, once=True)
    daemon.listeners.append(lambda event, _: time.sleep(0.4) if event == "step" else None)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            daemon.run()
        except BaseException as e:  # surfaced below
            errors.append(e)

    drop(src, run / "inbox")
    thread = threading.Thread(target=target)
    thread.start()
    seen: set[int] = set()
    total = None
    try:
        while thread.is_alive():
            with contextlib.suppress(ValueError):  # never expected: writes are atomic
                st = read_status(run) or {}
                cur = st.get("current_file")
                if cur is not None:
                    seen.add(cur["steps_done"])
                    total = cur["steps_total"]
            time.sleep(0.05)
    finally:
        daemon.request_stop()
        thread.join(timeout=120)
    assert not errors
    assert total == 8
    during = {s for s in seen if 0 < s < total}
    # Before the fix only file boundaries (0, the end) reached status.json.
    assert len(during) >= 3, sorted(seen)


def test_inspect_a_watch_run(finished_run: Path) -> None:
    res = CliRunner().invoke(app, ["inspect", str(finished_run)])
    assert res.exit_code == 0, res.output
    assert "stream: 2 file(s) done" in res.output
    assert "ledger: done=2" in res.output
    res = CliRunner().invoke(app, ["inspect", str(finished_run), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    last = info["checkpoints"][-1]
    assert last["global_step"] == rows(finished_run)[-1].global_step_end == 4
    assert last["data_cursor"] is None and last["stream"]["completed"] == [1, 2]
    assert info["ledger"]["counts"]["done"] == 2


def test_eval_a_watch_run_scores_every_file(finished_run: Path) -> None:
    res = CliRunner().invoke(
        app, ["eval", str(finished_run), "--json", "--max-new-tokens", "2", "--prompt", "hi"]
    )
    assert res.exit_code == 0, res.output
    report: dict[str, Any] = json.loads(res.stdout)
    assert report["global_step"] == 4
    assert report["val_loss"] is not None and math.isfinite(report["val_loss"])
    files = report["files"]
    assert [f["name"] for f in files] == ["part-0.jsonl", "part-1.jsonl"]
    assert all(f["val_rows"] == 3 and math.isfinite(f["val_loss"]) for f in files)
    assert report["val_tokens"] == sum(f["val_tokens"] for f in files)
    weighted = sum(f["val_loss"] * f["val_tokens"] for f in files) / report["val_tokens"]
    assert report["val_loss"] == pytest.approx(weighted, rel=1e-12)
    # the last file's held-out loss at its end is what the daemon recorded in the ledger
    assert files[-1]["val_loss"] == pytest.approx(rows(finished_run)[-1].val_loss_after, rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_dashboard_dies_with_a_killed_daemon(tmp_path: Path) -> None:
    port = _free_port()
    run = tmp_path / "run"
    (run / "inbox").mkdir(parents=True)  # `evertrain ui` refuses a missing run directory
    cmd = [sys.executable, "-m", "evertrain", "watch", str(run)]
    cmd += ["--config", str(watch_config(tmp_path)), "--ui", "--port", str(port)]
    watch = subprocess.Popen(
        cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    children: list[int] = []
    try:
        wait_for(lambda: _answers(port), timeout=90, what="the dashboard's port")
        task = Path(f"/proc/{watch.pid}/task/{watch.pid}/children")
        children = [int(p) for p in task.read_text().split()]
        assert children, "the dashboard is not a child of the daemon"
        watch.send_signal(signal.SIGKILL)
        watch.wait(timeout=10)
        wait_for(lambda: not _answers(port), timeout=10, what="the port to be freed")
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        for pid in children:  # only if the test failed: don't leak the orphan
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
