"""The daemon killed with SIGKILL anywhere (intake, validation, mid-file, mid-checkpoint,
between files, an external kill at a random moment) and restarted ends bit-identical to a
daemon that never stopped: same adapter, optimizer, RNG and stream state, same ledger rows
but for timestamps, every file trained exactly once and none lost."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import assert_identical, cli_env, evertrain, train_losses
from daemon_util import drop, equal_files, rows, watch_config
from evertrain.checkpoint import CheckpointManager, KeepLast, read_checkpoint
from evertrain.daemon.ledger import TIME_COLUMNS

# 16 training rows per file, micro-batch 4 with 1 replay row from file 2 on, 3 micro-batches
# per step, 2 epochs per file: file 1 = 8 micro-batches = 3 steps (the last of 2 micro-
# batches), files 2 and 3 = 10 micro-batches of 3 new rows = 4 steps (the last of 1).
# global_step: file 1 0->3, file 2 3->7, file 3 7->11; periodic checkpoints every 2 steps.
TOTAL = 11
CONFIG: dict[str, Any] = {
    "model": {
        "source": "tiny",
        "num_threads": 1,
        "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    },
    "train": {
        "micro_batch_size": 4,
        "grad_accum_steps": 3,
        "lr": 1.0e-2,
        "schedule": {"name": "wsd", "warmup_steps": 2, "decay_steps": 2, "min_lr_ratio": 0.1},
    },
    "watch": {
        "epochs_per_file": 2,
        "replay_fraction": 0.25,
        "settle_seconds": 0.0,
        "poll_seconds": 0.05,
        "status_every_seconds": 0.2,
        "eval_earlier_files": 2,
    },
}


def setup_run(tmp: Path, name: str, files: list[Path], config: Path) -> list[str]:
    run = tmp / name
    base = time.time() - 100
    for k, f in enumerate(files):  # distinct mtimes: a deterministic arrival order
        drop(f, run / "inbox", mtime=base + k)
    return ["watch", str(run), "--config", str(config), "--once"]


def kill_after_step(args: list[str], step: int) -> bool:
    """SIGKILL the daemon from outside once ``step`` is logged (where it lands is timing).
    False if the daemon finished first (a very fast machine): the run is then complete."""
    run = Path(args[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "evertrain", *args],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            m = run / "metrics.jsonl"
            if m.exists():
                done = [
                    json.loads(x).get("global_step", 0)
                    for x in m.read_text().splitlines()
                    if x.endswith("}")
                ]
                if done and max(done) >= step:
                    break
            time.sleep(0.005)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read()  # type: ignore[union-attr]
            return False
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return True


def final_states(run: Path) -> dict[str, Any]:
    info = CheckpointManager(run / "checkpoints", KeepLast(1)).latest_valid()
    assert info is not None and info.global_step == TOTAL
    return read_checkpoint(info.path).states


def comparable(run: Path) -> list[dict[str, Any]]:
    out = []
    for r in rows(run):
        d = r.to_json()
        for k in TIME_COLUMNS:
            assert d.pop(k) is not None or k == "started_at" and r.status != "done"
        out.append(d)
    return out


def test_sigkill_anywhere_then_restart_is_bit_identical(tmp_path: Path) -> None:
    files = equal_files(tmp_path / "src", 3, train_rows=16, val_rows=3)
    config = watch_config(tmp_path, **CONFIG)
    straight = setup_run(tmp_path, "straight", files, config)
    # the uninterrupted run goes on beside the interrupted ones (start-up is single-threaded)
    reference = subprocess.Popen(
        [sys.executable, "-m", "evertrain", *straight],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    resumed = setup_run(tmp_path, "resumed", files, config)
    outside = random.Random(os.environ.get("EVERTRAIN_TEST_SEED", time.time_ns())).randint(7, 9)
    print(f"external kill after step {outside}")
    faults: list[str | int] = [
        "intake@2",  # file 2 moved to queue/, no ledger row yet
        "validate@1",  # during validation
        "commit@3",  # end-of-file-1 checkpoint: manifest written, not renamed
        "filedone@1",  # between files: checkpoint committed, ledger not yet done
        "micro@6:1",  # mid-file 2, mid-accumulation, after the step-4 checkpoint
        outside,
    ]
    for fault in faults:
        if isinstance(fault, int):
            if not kill_after_step(resumed, fault):
                print("the daemon finished before the external kill landed")
        else:
            proc = evertrain(*resumed, fault=fault, check=False)
            assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-3000:])
    evertrain(*resumed)
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    a, b = Path(straight[1]), Path(resumed[1])
    sa, sb = final_states(a), final_states(b)
    for owner in ("adapter_model", "optimizer", "scheduler", "stream", "progress", "rng"):
        assert_identical(sa[owner], sb[owner], owner)
    assert train_losses(a) == train_losses(b)
    assert sorted(train_losses(b)) == list(range(1, TOTAL + 1))
    assert comparable(a) == comparable(b)
    ledger = rows(b)
    assert [r.status for r in ledger] == ["done"] * 3
    assert [(r.global_step_start, r.global_step_end) for r in ledger] == [(0, 3), (3, 7), (7, 11)]
    # nothing lost, nothing left behind, every file exactly once in processed/
    for run in (a, b):
        assert sorted(os.listdir(run / "processed")) == [
            f"{i + 1:06d}-{f.name}" for i, f in enumerate(files)
        ]
        assert os.listdir(run / "inbox") == [] and os.listdir(run / "queue") == []
        assert os.listdir(run / "rejected") == []
