"""The README's data-and-trackers example: ``examples/make_alpaca.py`` writes Alpaca records
as a JSONL file and a ``datasets`` directory, and ``examples/alpaca.yaml`` trains on both with
TensorBoard logging (here on the tiny model instead of SmolLM2, for speed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import evertrain, train_losses

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("datasets")
pytest.importorskip("tensorboard")


def test_alpaca_example_trains_both_sources_and_logs_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    made = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_alpaca.py"), str(tmp_path / "data")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "alpaca.jsonl" in made.stdout and "alpaca_ds" in made.stdout
    first = json.loads((tmp_path / "data" / "alpaca.jsonl").read_text().splitlines()[0])
    assert set(first) == {"instruction", "input", "output"}
    assert (tmp_path / "data" / "alpaca_ds" / "dataset_info.json").exists()
    shutil.copy(ROOT / "examples" / "alpaca.yaml", tmp_path / "alpaca.yaml")
    run = tmp_path / "run"
    sets = ["model.source=tiny", "train.max_steps=4", "train.eval_every_steps=2"]
    args = ["train", str(tmp_path / "alpaca.yaml"), "--run-dir", str(run)]
    proc = evertrain(*args, *(x for s in sets for x in ("--set", s)))
    assert "data: 2 file(s)" in proc.stderr, proc.stderr[-2000:]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    losses = train_losses(run)
    assert [e.step for e in acc.Scalars("train/loss")] == sorted(losses) == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [2, 4]
