"""One writer per run directory: `evertrain train`, `watch` and a user's Checkpointer hold
RUN/daemon.lock; a second writer exits 2 naming the holder, and the holder's run goes on."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evertrain
from conftest import cli_env, write_config
from evertrain.runlock import RunLockedError


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, train={"max_steps": 400, "eval_every_steps": None})
    run = tmp_path / "run"
    args = [sys.executable, "-m", "evertrain", "train", str(cfg), "--run-dir", str(run)]
    first = subprocess.Popen(args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
            assert first.poll() is None and time.monotonic() < deadline, "first run ended"
            time.sleep(0.05)
        for cmd in (args, [sys.executable, "-m", "evertrain", "watch", str(run), "--once"]):
            second = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr
            lines = second.stderr.strip().splitlines()
            holder = f"is in use by PID {first.pid} on {socket.gethostname()} (since "
            assert len(lines) == 1 and holder in lines[0]
        with pytest.raises(RunLockedError, match=f"PID {first.pid}"):
            evertrain.Checkpointer(run)
        assert first.poll() is None  # the holder trains on
    finally:
        first.terminate()
        first.wait(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM  # saved and stopped, not finished
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["global_step"] >= 1
    ckpt = evertrain.Checkpointer(run)  # free again
    assert ckpt.resume() >= 1
    ckpt.close()
