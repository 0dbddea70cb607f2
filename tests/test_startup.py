"""What a start costs (issue 14, item 1): tokenised data is cached by default, so a restart
(a resume) does not tokenise again; the last step is evaluated only when evaluation is
configured. (Converted-model stamps: tests/test_models.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import evertrain, train_losses, write_config


def _evals(run: Path) -> list[int]:
    return [
        rec["global_step"]
        for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if rec["kind"] == "eval"
    ]


def test_tokenised_data_is_cached_by_default_and_a_resume_hits_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVERTRAIN_CACHE", str(tmp_path / "cache"))  # cli_env passes it on
    config = write_config(tmp_path, train={"max_steps": 4, "eval_every_steps": None})
    run = tmp_path / "run"
    first = evertrain("train", str(config), "--run-dir", str(run), "--max-steps", "2")
    assert "cache miss" in first.stderr
    entries = sorted(p.suffix for p in (tmp_path / "cache" / "data").iterdir())
    assert entries == [".json"] + [".safetensors"] * 6  # 3 tensors per split, no temp file
    again = evertrain("train", str(config), "--run-dir", str(run))
    assert "cache hit" in again.stderr and sorted(train_losses(run)) == [1, 2, 3, 4]
    # a run that was never cut short trains the same, bit for bit, from the cached rows
    straight = tmp_path / "straight"
    evertrain("train", str(config), "--run-dir", str(straight))
    assert train_losses(straight) == train_losses(run)

    (tmp_path / "off").mkdir()
    off = write_config(tmp_path / "off", data={"cache_dir": "off"})
    proc = evertrain("train", str(off), "--run-dir", str(tmp_path / "run-off"), "--max-steps", "1")
    assert "cache off" in proc.stderr


@pytest.mark.parametrize(
    ("train", "checkpoint", "evaluated"),
    [
        ({"eval_every_steps": None}, {}, []),  # not configured: no pass over held-out rows
        ({"eval_every_steps": 2}, {}, [2, 4, 5]),  # every 2 steps, and the last one
        ({"eval_every_steps": None}, {"keep_best": 1}, [5]),  # best retention needs it
    ],
)
def test_the_last_step_is_evaluated_only_when_configured(
    tmp_path: Path, train: dict, checkpoint: dict, evaluated: list[int]
) -> None:
    config = write_config(
        tmp_path, train={"max_steps": 5, **train}, checkpoint={"every_steps": 5, **checkpoint}
    )
    evertrain("train", str(config), "--run-dir", str(tmp_path / "run"))
    assert _evals(tmp_path / "run") == evaluated
