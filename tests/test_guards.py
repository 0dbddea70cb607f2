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

from conftest import assert_identical, evertrain, write_config
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
        ("train: {lr: 0.1}\n", "no model.source"),
        ("model: {num_threads: 1}\n", "no model.source"),  # not the tiny model, silently
        ("model: {source: tiny}\ntrain: {lr: 2e4}\n", "train.lr: Input should be less than"),
        ("model: {source: tiny}\ntrain: {weight_decay: 10}\n", "train.weight_decay"),
        (
            "model: {source: tiny}\ntrain: {lr: 2, weight_decay: 0.5}\n",
            "lr * weight_decay = 1 would shrink every weight past zero",
        ),
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


def test_infinite_gradient_with_a_finite_loss_also_stops(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        train={"max_steps": 8, "eval_every_steps": None},
        checkpoint={"every_steps": 2, "keep_last": 10},
    )
    run = tmp_path / "run"
    proc = evertrain("train", str(cfg), "--run-dir", str(run), fault="gradinf@5", check=False)
    assert proc.returncode == 3, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "diverged at global_step 5" in err and "step-00000004" in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step-00000004"
    assert all(x["global_step"] < 5 for x in lines(run) if x["kind"] == "train")


def test_watch_stops_with_exit_3_naming_the_file(tmp_path: Path) -> None:
    from daemon_util import drop, equal_files, rows, watch_config

    files = equal_files(tmp_path / "src", 2, train_rows=24, val_rows=3)
    run = tmp_path / "run"
    for f in files:
        drop(f, run / "inbox")
    cfg = watch_config(tmp_path, checkpoint={"every_steps": 2, "keep_last": 10})
    proc = evertrain("watch", str(run), "--config", str(cfg), "--once", fault="nan@5", check=False)
    assert proc.returncode == 3, proc.stderr
    err = [x for x in proc.stderr.strip().splitlines() if x.startswith("error: ")]
    assert len(err) == 1 and "part-1.jsonl" in err[0], err  # file 2 trains steps 4..6
    assert "diverged at global_step 5" in err[0] and "step-00000004" in err[0], err
    assert [r.status for r in rows(run)] == ["done", "training"]  # kept for the next start


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


def adam_steps(run: Path, step: int) -> set[float]:
    """The optimizer's own step counts (Adam's bias correction) in checkpoint ``step``."""
    opt = read_checkpoint(run / "checkpoints" / f"step-{step:08d}").states["optimizer"]
    return {float(v) for k, v in _leaves(opt) if k.endswith(".step")}


def _leaves(tree: object, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(tree, dict):
        return [kv for k, v in tree.items() for kv in _leaves(v, f"{prefix}.{k}")]
    if isinstance(tree, list):
        return [kv for i, v in enumerate(tree) for kv in _leaves(v, f"{prefix}.{i}")]
    return [(prefix, tree)]


def rollback_run(tmp_path: Path, fault: str) -> tuple[Path, object]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = write_config(
        tmp_path,
        train={"max_steps": 9, "eval_every_steps": None, "on_nonfinite": "rollback"},
        checkpoint={"every_steps": 3, "keep_last": 10},
    )
    run = tmp_path / "run"
    proc = evertrain("train", str(cfg), "--run-dir", str(run), fault=fault, check=False)
    return run, proc


def test_nonfinite_step_rolls_back_to_the_last_checkpoint(tmp_path: Path) -> None:
    """NaN at step 5, checkpoint at 3: model and optimizer go back to step 3 and the batches
    of steps 4 and 5 are skipped; global_step, schedule and data position go on."""
    run, proc = rollback_run(tmp_path, "nan@5")
    assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
    train = {x["global_step"]: x for x in lines(run) if x["kind"] == "train"}
    assert sorted(train) == list(range(1, 10))
    assert train[5]["skipped"] is True and train[5]["steps_undone"] == 2
    assert adam_steps(run, 3) == {3.0}
    assert adam_steps(run, 6) == {4.0}  # 3 from the checkpoint, then step 6 only
    assert adam_steps(run, 9) == {7.0}
    final = read_checkpoint(run / "checkpoints" / "step-00000009").states
    assert final["progress"]["skipped_steps"] == 2
    assert final["progress"]["examples_seen"] == 9 * 8  # every step's batches were drawn


def test_rollback_is_exact_across_a_kill_inside_the_poisoned_step(tmp_path: Path) -> None:
    a, proc = rollback_run(tmp_path / "a", "nan@5")
    assert proc.returncode == 0
    b, proc = rollback_run(tmp_path / "b", "nan@5,micro@5:1")
    assert proc.returncode != 0  # SIGKILLed in step 5, before its NaN was seen
    b, proc = rollback_run(tmp_path / "b", "nan@5")
    assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
    for step in (6, 9):
        name = f"step-{step:08d}"
        sa = read_checkpoint(a / "checkpoints" / name).states
        sb = read_checkpoint(b / "checkpoints" / name).states
        assert_identical(sa["model"], sb["model"])
        assert_identical(sa["optimizer"], sb["optimizer"])
    la = {x["global_step"]: x.get("loss") for x in lines(a) if x["kind"] == "train"}
    lb = {x["global_step"]: x.get("loss") for x in lines(b) if x["kind"] == "train"}
    assert la == lb


def test_rollback_without_a_checkpoint_before_the_step_stops(tmp_path: Path) -> None:
    run, proc = rollback_run(tmp_path, "nan@2")
    assert proc.returncode == 3, proc.stderr  # type: ignore[attr-defined]
    err = proc.stderr.strip().splitlines()[-1]  # type: ignore[attr-defined]
    assert "rollback has no checkpoint before this step" in err


@pytest.mark.parametrize(("policy", "poison", "skipped"), [("skip", 5, 1), ("rollback", 6, 2)])
def test_daemon_counts_skipped_steps_in_the_ledger_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, poison: int, skipped: int
) -> None:
    """Two files of 3 steps each, checkpoints every 2 steps (and at each file's end): the
    poisoned step is in file 2; a rollback from step 6 goes back to step 4's checkpoint."""
    from daemon_util import drop, equal_files, load_watch, rows, watch_config
    from evertrain import faults
    from evertrain.daemon import Daemon

    monkeypatch.setattr(faults, "_POINTS", {f"nan@{poison}"})
    files = equal_files(tmp_path / "src", 2, train_rows=24, val_rows=3)
    run = tmp_path / "run"
    for f in files:
        drop(f, run / "inbox")
    cfg = load_watch(watch_config(tmp_path, train={"on_nonfinite": policy}))
    assert Daemon(run, cfg, once=True).run() == 0
    got = [(r.status, r.steps, r.skipped_steps) for r in rows(run)]
    assert got == [("done", 3, 0), ("done", 3, skipped)]
    train = {x["global_step"]: x for x in lines(run) if x["kind"] == "train"}
    assert train[poison]["skipped"] is True and train[poison]["steps_undone"] == skipped


def _bad_config(tmp_path: Path, what: str) -> Path:
    """A config with one mistake a user makes: ``what`` names it."""
    data = tmp_path / "train.jsonl"
    sections: dict[str, object] = {"train": {"max_steps": 4, "eval_every_steps": None}}
    if what == "target_modules":
        sections["lora"] = {"r": 4, "target_modules": ["q_proj", "nope_proj"]}
    elif what == "model.source":
        sections["model"] = {"source": str(tmp_path / "no-such-model"), "num_threads": 1}
    elif what == "missing data":
        data = tmp_path / "missing.jsonl"
    elif what == "data is a directory":
        data = tmp_path / "folder"
        data.mkdir()
    elif what == "unreadable data":
        (tmp_path / "plain").write_text("x")
        data = tmp_path / "plain" / "train.jsonl"  # under a file: ENOTDIR, even for root
    cfg = write_config(tmp_path, data_file=data if "data" in what else None, **sections)
    return cfg


EXPECTED = {
    "target_modules": "lora.target_modules: ['nope_proj'] match no module",
    "model.source": "no-such-model",
    "missing data": "missing.jsonl: file not found (check data.files)",
    "data is a directory": "folder: is a directory",
    "unreadable data": "plain/train.jsonl: cannot read file: Not a directory",
}


@pytest.mark.parametrize(
    ("command", "what"),
    [
        ("train", "target_modules"),
        ("watch", "target_modules"),
        ("eval", "target_modules"),
        ("train", "model.source"),
        ("watch", "model.source"),
        ("eval", "model.source"),
        ("train", "missing data"),
        ("eval", "missing data"),
        ("train", "data is a directory"),
        ("train", "unreadable data"),
    ],
)
def test_bad_model_or_data_is_one_line_exit_2_in_every_command(
    tmp_path: Path, command: str, what: str
) -> None:
    cfg = _bad_config(tmp_path, what)
    run = str(tmp_path / "run")
    if command == "watch":  # no data.files and no epochs in watch mode
        import yaml

        raw = yaml.safe_load(cfg.read_text())
        raw["data"].pop("files")
        raw["train"].pop("epochs")
        raw["train"].pop("max_steps")
        raw["train"]["schedule"] = {"name": "constant"}
        cfg.write_text(yaml.safe_dump(raw))
    args = {
        "train": ["train", str(cfg), "--run-dir", run],
        "watch": ["watch", run, "--config", str(cfg), "--once"],
        "eval": ["eval", run, "--config", str(cfg)],
    }[command]
    proc = evertrain(*args, check=False)
    err = [x for x in proc.stderr.strip().splitlines() if " INFO " not in x]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("error: ") and EXPECTED[what] in err[0], err[0]
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))
