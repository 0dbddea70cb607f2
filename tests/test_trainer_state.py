"""In-process checks of the state owners: save/clobber/load, O(1) cursor restore, guards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import resumed_trainer, train_losses, write_config
from evertrain.config import load_config
from evertrain.state import StateError
from evertrain.trainer import ResumeError, Trainer


def _trainer(tmp_path: Path, run: str = "run", **cfg: object) -> Trainer:
    return resumed_trainer(load_config(write_config(tmp_path, **cfg)), tmp_path / run)


def test_save_clobber_load_restores_every_tensor(tmp_path: Path) -> None:
    tr = _trainer(tmp_path)
    tr.fit(max_steps=3)
    path = tr.save()
    assert path is not None
    before = {n: o.state_dict() for n, o in tr.owners.items()}
    model_before = {k: v.clone() for k, v in before["model"].items() if "." in k}
    opt_before = {
        n: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for n, s in before["optimizer"]["state"].items()
    }
    with torch.no_grad():  # clobber
        for p in tr.model.parameters():
            p.add_(1.0)
    for s in tr.optimizer.state.values():
        s["exp_avg"].mul_(-3)
    loaded = tr.checkpoints.load(tr.checkpoints.latest_valid())  # type: ignore[arg-type]
    tr.owners["model"].load_state_dict(loaded.states["model"])
    tr.owners["optimizer"].load_state_dict(loaded.states["optimizer"])
    after = {k: v for k, v in tr.owners["model"].state_dict().items() if "." in k}
    assert set(after) == set(model_before)
    for k in after:
        assert torch.equal(after[k], model_before[k]), k
    opt_after = tr.owners["optimizer"].state_dict()["state"]
    for n, s in opt_after.items():
        for k, v in s.items():
            assert torch.equal(v, opt_before[n][k]), (n, k)
    tr.close()


def test_optimizer_state_is_keyed_by_name_and_refuses_a_changed_parameter_set(
    tmp_path: Path,
) -> None:
    tr = _trainer(tmp_path)
    tr.fit(max_steps=2)
    sd = tr.owners["optimizer"].state_dict()
    assert all("." in name for name in sd["state"])  # parameter names, not indices
    first = sd["param_groups"][0]["params"][0]
    sd["param_groups"][0]["params"][0] = "model.not_a_param"
    with pytest.raises(StateError, match="parameter set changed"):
        tr.owners["optimizer"].load_state_dict(sd)
    sd["param_groups"][0]["params"][0] = first
    name = next(iter(sd["state"]))
    sd["state"][name]["exp_avg"] = torch.zeros(3, 3)
    with pytest.raises(StateError, match="shape"):
        tr.owners["optimizer"].load_state_dict(sd)
    tr.close()


def test_resume_does_not_touch_consumed_examples(tmp_path: Path) -> None:
    """Restoring the cursor is O(1): the first batch after a resume deep into the data
    reads exactly one micro-batch of examples, as it does at position 0."""
    cfg = {"checkpoint": {"every_steps": 1000}}
    tr = _trainer(tmp_path, **cfg)
    tr.fit(max_steps=25)
    tr.close()
    resumed = _trainer(tmp_path, **cfg)
    assert resumed.progress.global_step == 25
    assert resumed.cursor.examples_seen > len(resumed.train_ds)  # past an epoch
    resumed.train_ds.getitem_calls = 0
    next(resumed.batches())
    assert resumed.train_ds.getitem_calls == 4
    resumed.close()
    fresh = _trainer(tmp_path, run="fresh", **cfg)
    fresh.train_ds.getitem_calls = 0
    next(fresh.batches())
    assert fresh.train_ds.getitem_calls == 4
    fresh.close()


def test_breaking_config_change_is_refused_on_resume(tmp_path: Path) -> None:
    tr = _trainer(tmp_path)
    tr.fit(max_steps=5)
    tr.close()
    with pytest.raises(ResumeError, match="train.micro_batch_size"):
        _trainer(tmp_path, train={"micro_batch_size": 2})
    # allowed with the flag, and a non-breaking change (eval cadence) passes silently
    ok = resumed_trainer(
        load_config(write_config(tmp_path, train={"eval_every_steps": 7})), tmp_path / "run"
    )
    assert ok.progress.global_step == 5
    ok.close()


def test_metrics_are_rewound_to_the_checkpoint(tmp_path: Path) -> None:
    """Steps logged after the last checkpoint (then lost in a crash) are dropped on resume,
    so the replayed steps appear exactly once."""
    tr = _trainer(tmp_path, checkpoint={"every_steps": 4})
    tr.fit(max_steps=6)
    tr.close()
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:  # what a crashed process had logged past step 6
        f.write('{"kind": "train", "global_step": 7, "loss": 1.0}\n')
    tr2 = _trainer(tmp_path)
    assert tr2.progress.global_step == 6
    steps = [json.loads(x)["global_step"] for x in metrics.read_text().splitlines()]
    assert max(steps) == 6
    tr2.fit(max_steps=8)
    tr2.close()
    assert sorted(train_losses(tmp_path / "run")) == list(range(1, 9))
