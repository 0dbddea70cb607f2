"""``evertrain watch`` under torchrun with 2 processes: rank 0 owns the inbox, ledger and
checkpoint commits and tells rank 1 what to train (evertrain.daemon.ranks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env
from daemon_util import drop, equal_files, rows, watch_config
from evertrain.checkpoint import verify_checkpoint

# 17 rows (prime) against global micro-batches of 8: 8 + 8 + 1, so the last micro-batch has
# one row on one rank and none on the other (a zero-token micro-batch that must stay in step)
TRAIN_ROWS, VAL_ROWS = 17, 3  # per file
MICRO, ACCUM, WORLD = 4, 2, 2  # one global micro-batch = 8 rows -> 3 per file -> steps 2 + 1
STEPS_PER_FILE = math.ceil(math.ceil(TRAIN_ROWS / (MICRO * WORLD)) / ACCUM)


def watch(
    tmp: Path,
    every_steps: int,
    fault: str | None = None,
    async_save: bool = False,
    faulty_runs: int = 1,
) -> tuple[Path, Any]:
    """Two files dropped into a new run's inbox, then ``torchrun -m evertrain watch --once``
    (with ``EVERTRAIN_FAULT=fault``: the group is SIGKILLed there, or stops on an error,
    ``faulty_runs`` times, then is started again without the fault)."""
    files = equal_files(tmp / "src", 2, TRAIN_ROWS, VAL_ROWS)
    config = watch_config(
        tmp,
        train={"micro_batch_size": MICRO, "grad_accum_steps": ACCUM},
        checkpoint={"every_steps": every_steps, "keep_last": 10, "async": async_save},
    )
    run_dir = tmp / "run"
    for f in files:
        drop(f, run_dir / "inbox")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a free local port
        "--nproc-per-node",
        str(WORLD),
        "-m",
        "evertrain",
        "watch",
        str(run_dir),
        "--config",
        str(config),
        "--once",
    ]

    def go(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cmd,
            env=cli_env(OMP_NUM_THREADS="1", **extra),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    for _ in range(faulty_runs if fault is not None else 0):
        killed = go(EVERTRAIN_FAULT=str(fault))
        assert killed.returncode != 0, "the fault did not fire"
        assert [r.status for r in rows(run_dir)][0] == "training"
    proc = go()
    assert proc.returncode == 0, proc.stderr[-20000:]
    return run_dir, proc


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step-*/manifest.json"))[-1].parent
    (path,) = last.glob("adapter_model*.safetensors")
    return load_file(path)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # only the end-of-file checkpoints (the timer and step count never fire here)
    return watch(tmp_path_factory.mktemp("straight"), every_steps=1000)[0]


def test_watch_under_torchrun_trains_two_inbox_files(straight: Path) -> None:
    ledger = rows(straight)
    assert [r.status for r in ledger] == ["done", "done"]
    ends = []
    for k, r in enumerate(ledger):
        assert r.global_step_start == k * STEPS_PER_FILE
        assert r.global_step_end == (k + 1) * STEPS_PER_FILE
        assert (straight / r.path).exists() and "processed" in r.path
        ends.append(r.global_step_end)

    steps = sorted((straight / "checkpoints").glob("step-*/manifest.json"))
    assert [int(p.parent.name.split("-")[1]) for p in steps] == ends
    for manifest in steps:
        assert verify_checkpoint(manifest.parent) == []
        names = set(json.loads(manifest.read_text(encoding="utf-8"))["files"])
        assert any(n.startswith("rng.") for n in names), names
        assert any(n.startswith("rng_rank1") for n in names), names

    progress = json.loads((steps[-1].parent / "progress.json").read_text(encoding="utf-8"))
    assert progress["global_step"] == 2 * STEPS_PER_FILE
    # every row once, the remainder too; padding rows are not examples
    assert [r.examples for r in ledger] == [TRAIN_ROWS, TRAIN_ROWS]
    assert progress["examples_seen"] == 2 * TRAIN_ROWS


@pytest.mark.parametrize("saves", ["sync", "async"])
def test_group_killed_mid_file_resumes_bit_identical(
    straight: Path, tmp_path: Path, saves: str
) -> None:
    # killed in step 2 of the first file, after the step-1 checkpoint: the restart resumes
    # the file in the middle on both ranks (async: each rank wrote its part in the background)
    resumed, _ = watch(tmp_path, every_steps=1, fault="micro@2:0", async_save=saves == "async")
    modes = {
        json.loads(line)["mode"]
        for line in (resumed / "metrics.jsonl").read_text().splitlines()
        if '"kind": "checkpoint"' in line
    }
    assert modes == {saves}
    a, b = adapter(straight), adapter(resumed)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for x, y in zip(rows(straight), rows(resumed), strict=True):
        assert (x.status, x.loss_start, x.loss_end, x.val_loss_after) == (
            y.status,
            y.loss_start,
            y.loss_end,
            y.val_loss_after,
        )


def test_group_stopped_by_a_files_error_twice_quarantines_it(tmp_path: Path) -> None:
    # an error while training file 1 cannot reject it under torchrun (rank 1 may wait in a
    # collective), so the group stops; the error counts as a death, and the start after the
    # second one quarantines the file and trains the next instead of stopping on it forever
    run_dir, proc = watch(tmp_path, every_steps=1000, fault="trainerror@1", faulty_runs=2)
    first, second = rows(run_dir)
    assert first.status == "rejected" and "the daemon died twice while processing it" in str(
        first.error
    )
    assert second.status == "done" and second.examples == TRAIN_ROWS
    assert second.global_step_start == 0 and second.global_step_end == STEPS_PER_FILE
