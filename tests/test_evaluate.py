"""``evertrain eval``: held-out loss equal to what the trainer logged, greedy generations,
reports in the run directory, and an in-training evaluation that leaves training exact."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import evertrain, resumed_trainer, write_config
from evertrain.config import load_config
from evertrain.evaluate import (
    DEFAULT_PROMPTS,
    _prompt_ids,
    evaluate_run,
    evaluate_trainer,
)
from evertrain.metrics import read_metrics

STEPS = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory: Any) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("eval")
    config = write_config(
        tmp,
        lora={"r": 4, "alpha": 8.0, "dropout": 0.1},
        train={
            "max_steps": STEPS,
            "eval_every_steps": 4,
            "device": "cpu",
            "schedule": {"warmup_steps": 0},
        },
        checkpoint={"every_steps": 4},
    )
    t = resumed_trainer(load_config(config), tmp / "run")
    t.fit()
    t.close()
    return tmp / "run", config


def test_report_matches_the_trainers_eval_and_is_written(run: tuple[Path, Path]) -> None:
    run_dir, _ = run
    logged = {r["global_step"]: r for r in read_metrics(run_dir / "metrics.jsonl", "eval")}
    rep = evaluate_run(run_dir, prompts=DEFAULT_PROMPTS[:2], max_new_tokens=12)
    assert rep.global_step == STEPS
    assert rep.val_loss == logged[STEPS]["val_loss"]  # same batches, same formula: exact
    assert rep.val_ppl == pytest.approx(math.exp(rep.val_loss))
    assert rep.val_rows > 0 and rep.val_tokens > 0
    assert [g.prompt for g in rep.generations] == list(DEFAULT_PROMPTS[:2])
    assert all(0 < g.new_tokens <= 12 for g in rep.generations)

    data = json.loads((run_dir / "eval" / f"step-{STEPS:08d}.json").read_text())
    assert data["val_loss"] == rep.val_loss and data["global_step"] == STEPS
    assert data["model"]["lora"]["r"] == 4 and data["checkpoint"].endswith(f"{STEPS:08d}")
    assert [g["completion"] for g in data["generations"]] == [g.completion for g in rep.generations]
    text = (run_dir / "eval" / f"step-{STEPS:08d}.txt").read_text()
    assert f"loss {rep.val_loss:.4f} nats/token" in text and DEFAULT_PROMPTS[1] in text

    older = evaluate_run(run_dir, step=4, prompts=DEFAULT_PROMPTS[:2], max_new_tokens=12)
    assert older.val_loss == logged[4]["val_loss"]
    again = evaluate_run(run_dir, step=4, prompts=DEFAULT_PROMPTS[:2], max_new_tokens=12)
    assert [g.completion for g in again.generations] == [g.completion for g in older.generations]


def test_untrained_model_from_config_is_step_zero(run: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, config = run
    before = evaluate_run(tmp_path / "new", config=config, prompts=["x"], max_new_tokens=4)
    after = evaluate_run(run_dir, prompts=["x"], max_new_tokens=4, write=False)
    assert before.global_step == 0 and before.checkpoint is None
    assert before.val_rows == after.val_rows and before.val_tokens == after.val_tokens
    assert before.val_loss is not None and after.val_loss is not None
    assert before.val_loss > after.val_loss  # training on this data lowered held-out loss
    assert (tmp_path / "new" / "eval" / "step-00000000.json").is_file()
    with pytest.raises(ValueError, match="not both"):
        evaluate_run(run_dir, step=4, config=config)


def test_evaluating_a_live_trainer_leaves_training_exact(run: tuple[Path, Path]) -> None:
    _, config = run
    t = resumed_trainer(load_config(config), Path(str(run[0]) + "-live"), fresh=True)
    t.model.train()
    rngs = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    rep = evaluate_trainer(t, load_config(config), prompts=["a"], max_new_tokens=4)
    assert torch.equal(torch.get_rng_state(), rngs[0]) and random.getstate() == rngs[1]
    assert np.array_equal(np.random.get_state()[1], rngs[2])
    assert t.model.training  # mode restored: dropout stays on for the next step
    assert rep.val_loss == t.evaluate()["val_loss"]
    assert (t.run_dir / "eval" / "step-00000000.txt").is_file()
    t.close()


def test_chat_prompts_use_the_template(run: tuple[Path, Path]) -> None:
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()  # no chat template: the data pipeline's fallback rendering
    ids = _prompt_ids(tok, "hi", chat=True)
    assert tok.decode(ids) == "<|user|>\nhi\n<|assistant|>\n"
    assert tok.decode(_prompt_ids(tok, "hi", chat=False)) == "hi"


def test_cli(run: tuple[Path, Path]) -> None:
    run_dir, _ = run
    proc = evertrain("eval", str(run_dir), "--step", "4", "--prompt", "def f(", "--json")
    rep = json.loads(proc.stdout)
    assert rep["global_step"] == 4 and rep["generations"][0]["prompt"] == "def f("
    assert "eval/step-00000004.json" in proc.stderr
