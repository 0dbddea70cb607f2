"""Strict configs and the divergence guard: nothing silent.

- ``lr: .inf``, a key given twice, a config file without ``model:``: one line naming the
  key (and both lines of a duplicate), exit 2, nothing trained.
- A hidden NaN in one step (fault injection ``EVERTRAIN_FAULT=nan@5``): with the default
  ``train.on_nonfinite: stop`` the step is not applied, nothing is saved from it, and
  ``train`` exits 3 naming the step and the last good checkpoint; with ``skip`` the step's
  batches are dropped, logged as skipped, and the run goes on with finite weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import evertrain, write_config
from evertrain.checkpoint import read_checkpoint
from evertrain.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: {source: tiny}\ntrain: {lr: .inf}\n", "train.lr: Input should be a finite"),
        ("model: {source: tiny}\ntrain: {weight_decay: .nan}\n", "train.weight_decay"),
        (
            "model: {source: tiny}\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n",
            "line 5 column 3: invalid YAML: duplicate key 'lr' (first at line 3)",
        ),
        ("train: {lr: 0.1}\n", "no model: section"),
    ],
)
def test_silent_config_mistakes_are_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_an_infinite_lr_in_one_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, train={"lr": float("inf")})
    proc = evertrain("train", str(cfg), "--run-dir", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "train.lr" in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


def nan_run(tmp_path: Path, on_nonfinite: str) -> tuple[Path, object]:
    cfg = write_config(
        tmp_path,
        train={"max_steps": 8, "eval_every_steps": None, "on_nonfinite": on_nonfinite},
        checkpoint={"every_steps": 2, "keep_last": 10},
    )
    run = tmp_path / "run"
    proc = evertrain("train", str(cfg), "--run-dir", str(run), fault="nan@5", check=False)
    return run, proc


def lines(run: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_nonfinite_step_stops_with_exit_3_and_saves_nothing_from_it(tmp_path: Path) -> None:
    run, proc = nan_run(tmp_path, "stop")
    assert proc.returncode == 3, proc.stderr  # type: ignore[attr-defined]
    err = proc.stderr.strip().splitlines()[-1]  # type: ignore[attr-defined]
    assert err.startswith("error: ") and "diverged at global_step 5" in err  # one line
    assert "step-00000004" in err  # the last good checkpoint
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step-00000002", "step-00000004"]
    trained = [x["global_step"] for x in lines(run) if x["kind"] == "train"]
    assert trained == [1, 2, 3, 4]  # step 5 was never applied nor logged


def test_nonfinite_step_is_skipped_when_asked(tmp_path: Path) -> None:
    run, proc = nan_run(tmp_path, "skip")
    assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
    train = {x["global_step"]: x for x in lines(run) if x["kind"] == "train"}
    assert sorted(train) == list(range(1, 9))
    assert train[5]["skipped"] is True and train[5]["loss"] is None
    assert all("skipped" not in train[s] and train[s]["loss"] > 0 for s in train if s != 5)
    states = read_checkpoint(run / "checkpoints" / "step-00000008").states
    weights = [v for v in states["model"].values() if isinstance(v, torch.Tensor)]
    assert weights and all(bool(torch.isfinite(w).all()) for w in weights)
    assert all(torch.isfinite(torch.tensor(x)) for x in states["progress"]["recent_losses"])
