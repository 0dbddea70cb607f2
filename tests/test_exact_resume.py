"""Flagship: runs killed with SIGKILL at many points and resumed are bit-identical to a run
that never stopped: every tensor of the final state torch.equal, every logged loss equal."""

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

import pytest

from conftest import assert_identical, cli_env, evertrain, train_losses, write_config
from evertrain.checkpoint import read_checkpoint

N = 40  # optimizer steps; with 40 records, 3 epochs of ~13 steps each


def final_state(run: Path) -> dict[str, Any]:
    ckpt = read_checkpoint(run / "checkpoints" / f"step-{N:08d}")
    return ckpt.states


def kill_after_step(args: list[str], step: int) -> None:
    """Start training and SIGKILL it from outside once global_step ``step`` is logged:
    where exactly the kill lands (mid-step, mid-accumulation, mid-save) is up to timing."""
    run = Path(args[args.index("--run-dir") + 1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "evertrain", *args],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = run / "metrics.jsonl"
            if metrics.exists():
                steps = [
                    json.loads(x)["global_step"]
                    for x in metrics.read_text().splitlines()
                    if x.endswith("}")
                ]
                if steps and max(steps) >= step:
                    break
            time.sleep(0.005)
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()}"  # type: ignore[union-attr]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def run_straight_and_interrupted(
    tmp_path: Path, faults: list[str | int], **cfg: Any
) -> tuple[Path, Path]:
    config = write_config(tmp_path, **cfg)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    evertrain("train", str(config), "--run-dir", str(straight))
    args = ["train", str(config), "--run-dir", str(resumed)]
    for fault in faults:
        if isinstance(fault, int):  # external kill after this step
            kill_after_step(args, fault)
        else:
            proc = evertrain(*args, fault=fault, check=False)
            assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-2000:])
    evertrain(*args)
    return straight, resumed


def test_sigkill_anywhere_resumes_bit_identical(tmp_path: Path) -> None:
    """dropout + gradient accumulation + 3 epochs; kills mid-accumulation, while a
    checkpoint is half written, after its manifest but before the rename, right after an
    epoch boundary, and at a random moment from outside."""
    rng = random.Random(os.environ.get("EVERTRAIN_TEST_SEED", time.time_ns()))
    outside = rng.randint(26, 37)
    print(f"external kill after step {outside}")
    straight, resumed = run_straight_and_interrupted(
        tmp_path, ["micro@8:1", "save@15", "commit@20", "epoch@2", outside]
    )
    assert train_losses(straight) == train_losses(resumed)
    assert sorted(train_losses(straight)) == list(range(1, N + 1))
    assert_identical(final_state(straight)["model"], final_state(resumed)["model"])
    for owner in ("optimizer", "scheduler", "data_cursor", "progress", "rng"):
        assert_identical(final_state(straight)[owner], final_state(resumed)[owner], owner)
    # the kills left uncommitted work behind; it was never taken for a checkpoint
    assert final_state(resumed)["data_cursor"]["epoch"] >= 2


@pytest.mark.parametrize("variant", ["bf16_workers"])
def test_bf16_autocast_and_workers_resume_bit_identical(tmp_path: Path, variant: str) -> None:
    """bf16 autocast on CPU with two DataLoader worker processes."""
    straight, resumed = run_straight_and_interrupted(
        tmp_path, ["micro@12:0", "save@25"], train={"precision": "bf16"}, data={"num_workers": 2}
    )
    assert train_losses(straight) == train_losses(resumed)
    for owner in ("model", "optimizer", "data_cursor", "progress", "rng"):
        assert_identical(final_state(straight)[owner], final_state(resumed)[owner], owner)
