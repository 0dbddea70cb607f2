"""``model.compile: true`` (torch.compile, inductor on CPU) trains through the CLI and a run
killed with SIGKILL resumes bit-identically: the resumed process compiles the same graph
(issue 14, item 4). Slow: each process compiles for about a minute on 2 cores."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from conftest import assert_identical, evertrain, train_losses, write_config
from evertrain.checkpoint import read_checkpoint


@pytest.mark.slow
def test_compiled_run_killed_and_resumed_is_bit_identical(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        model={"source": "tiny", "dropout": 0.1, "num_threads": 1, "compile": True},
        train={"max_steps": 6, "eval_every_steps": None},
        checkpoint={"every_steps": 3},
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    evertrain("train", str(config), "--run-dir", str(straight), timeout=900)
    args = ["train", str(config), "--run-dir", str(resumed)]
    proc = evertrain(*args, fault="micro@5:0", check=False, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    evertrain(*args, timeout=900)
    assert train_losses(resumed) == train_losses(straight)
    a, b = (
        read_checkpoint(r / "checkpoints" / "step-00000006").states for r in (straight, resumed)
    )
    assert_identical(a["model"], b["model"])
    assert_identical(a["optimizer"], b["optimizer"])
