"""evertrain.Checkpointer in a user's own loop: exact resume in-process, every bad input a
one-line error that names the owner, key or file and leaves the run directory untouched."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

import evertrain
from conftest import assert_identical
from evertrain.checkpoint import CheckpointError, read_checkpoint

torch.set_num_threads(1)
DATA = [torch.randn(6, generator=torch.Generator().manual_seed(i)) for i in range(22)]


class Net(torch.nn.Module):
    def __init__(self, out: int = 3) -> None:
        super().__init__()
        self.lin, self.drop, self.head = torch.nn.Linear(6, 8), torch.nn.Dropout(0.2), None
        self.head = torch.nn.Linear(8, out)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.drop(torch.relu(self.lin(x)))).pow(2).mean()


class Tracker:
    def __init__(self) -> None:
        self.losses: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = list(state["losses"])


def build(run: Path, **kw: Any) -> tuple[evertrain.Checkpointer, dict[str, Any]]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    loader = StatefulDataLoader(
        DATA,
        batch_size=4,
        sampler=RandomSampler(DATA, generator=torch.Generator().manual_seed(1)),
        generator=torch.Generator(),
    )
    tracker = Tracker()
    objs = {"model": model, "opt": opt, "sched": sched, "loader": loader, "tracker": tracker}
    ckpt = evertrain.Checkpointer(
        run,
        model=model,
        optimizer=opt,
        scheduler=sched,
        data=loader,
        extra={"tracker": tracker},
        config=kw.pop("config", {"lr": 1e-2}),
        **{"every_steps": 3, **kw},
    )
    return ckpt, objs


def train(run: Path, until: int, **kw: Any) -> dict[str, Any]:
    """Resume ``run`` and train to global_step ``until``; the objects at the end."""
    ckpt, o = build(run, **kw)
    step = ckpt.resume()
    batches = iter(o["loader"])
    with ckpt:
        while step < until:
            try:
                x = next(batches)
            except StopIteration:
                batches = iter(o["loader"])
                x = next(batches)
            loss = o["model"](x)
            loss.backward()
            o["opt"].step()
            o["sched"].step()
            o["opt"].zero_grad()
            o["tracker"].losses.append(loss.item())
            step += 1
            ckpt.step(step, {"loss": loss.item()})
    return o


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the run except the lock's holder record (rewritten by every holder)."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != "daemon.lock"
    }


def test_resume_in_process_is_bit_identical(tmp_path: Path) -> None:
    straight = train(tmp_path / "a", 13)
    train(tmp_path / "b", 7)  # last checkpoint at 6: step 7 is replayed after the resume
    resumed = train(tmp_path / "b", 13)
    for key in ("model", "opt", "sched", "loader"):
        assert_identical(straight[key].state_dict(), resumed[key].state_dict())
    assert straight["tracker"].losses == resumed["tracker"].losses
    a = read_checkpoint(tmp_path / "a" / "checkpoints" / "step-00000012").states
    b = read_checkpoint(tmp_path / "b" / "checkpoints" / "step-00000012").states
    assert_identical(a, b)  # RNG streams included
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["global_step"] for x in lines if x["kind"] == "train"] == list(range(1, 14))


def test_first_save_names_the_owner_and_key_of_a_non_json_value(tmp_path: Path) -> None:
    class Bad(Tracker):
        def state_dict(self) -> dict[str, Any]:
            return {"best": {"when": {1, 2}}}

    ckpt = evertrain.Checkpointer(tmp_path, extra={"tracker": Bad()}, every_steps=1)
    ckpt.resume()
    with pytest.raises(CheckpointError, match=r"tracker: value at state/best/when has type set"):
        ckpt.step(1)
    assert not list((tmp_path / "checkpoints").glob("step-*[0-9]"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extra": {"count": 3}}, r"count: a int has no state_dict\(\)/load_state_dict\(\)"),
        ({"extra": {"model": Tracker()}}, r"extra: name 'model' is reserved"),
        ({"optimizer": torch.optim.SGD([torch.nn.Parameter(torch.ones(1))])}, r"pass model="),
        ({"data": torch.utils.data.DataLoader(DATA)}, r"data: the DataLoader has no generator="),
        ({"data": StatefulDataLoader(DATA, shuffle=True, generator=torch.Generator())}, "shares"),
        ({"config": {"when": object()}}, r"config: when is a object"),
        ({"config": {"lr": float("nan")}}, r"config: lr is nan"),
    ],
)
def test_bad_owners_and_configs_are_refused_up_front(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        evertrain.Checkpointer(tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_a_different_model_is_refused_and_the_run_dir_is_untouched(tmp_path: Path) -> None:
    train(tmp_path, 3)
    before = snapshot(tmp_path)
    model = Net(out=4)
    ckpt = evertrain.Checkpointer(tmp_path, model=model)
    with pytest.raises(evertrain.StateError, match=r"model: head.weight is torch.float32\[3, 8\]"):
        ckpt.resume()
    other = torch.nn.Linear(6, 3)
    with pytest.raises(evertrain.StateError, match=r"missing \['bias', 'weight'\]"):
        evertrain.Checkpointer(tmp_path, model=other).resume()
    assert snapshot(tmp_path) == before


def test_another_scheduler_class_is_refused(tmp_path: Path) -> None:
    train(tmp_path, 3)
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    ckpt = evertrain.Checkpointer(tmp_path, model=model, optimizer=opt, scheduler=sched)
    with pytest.raises(
        evertrain.StateError, match=r"scheduler: .*LambdaLR, this run passes .*StepLR"
    ):
        ckpt.resume()


def test_config_drift_is_refused_unless_allowed(tmp_path: Path) -> None:
    train(tmp_path, 3, config={"lr": 1e-2, "model": {"width": 8}})
    with pytest.raises(evertrain.ResumeError, match=r"model.width \(8 -> 16\)"):
        build(tmp_path, config={"lr": 1e-2, "model": {"width": 16}})[0].resume()
    ckpt, _ = build(
        tmp_path, config={"lr": 1e-2, "model": {"width": 16}}, allow_config_change=["model"]
    )
    assert ckpt.resume() == 3
    ckpt.close()


def test_omegaconf_and_dataclass_configs_are_stored_as_plain_json(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"lr": 0.1, "sched": {"peak": "${lr}"}, "betas": [0.9, 0.95]})
    ckpt = evertrain.Checkpointer(tmp_path / "omega", config=cfg, every_steps=1)
    ckpt.resume()
    path = ckpt.step(1)
    ckpt.close()
    assert path is not None
    stored = json.loads((path / "config.json").read_text())["config"]
    assert stored == {"lr": 0.1, "sched": {"peak": 0.1}, "betas": [0.9, 0.95]}

    @dataclasses.dataclass
    class Cfg:
        lr: float = 0.1
        betas: tuple[float, float] = (0.9, 0.95)

    ckpt = evertrain.Checkpointer(tmp_path / "dc", config=Cfg(), every_steps=1)
    ckpt.resume()
    path = ckpt.step(1)
    ckpt.close()
    assert json.loads((path / "config.json").read_text())["config"] == {  # type: ignore[union-attr]
        "lr": 0.1,
        "betas": [0.9, 0.95],
    }


def test_compiled_model_weights_load_into_a_plain_model_and_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = Net()
    compiled = torch.compile(Net())
    ckpt = evertrain.Checkpointer(tmp_path, model=compiled, every_steps=1)
    ckpt.resume()
    ckpt.step(1)
    ckpt.close()
    saved = read_checkpoint(tmp_path / "checkpoints" / "step-00000001").states["model"]["weights"]
    assert sorted(saved) == ["calls", "head.bias", "head.weight", "lin.bias", "lin.weight"]
    ckpt = evertrain.Checkpointer(tmp_path, model=plain)
    assert ckpt.resume() == 1
    ckpt.close()
    assert_identical(dict(plain.state_dict()), dict(compiled._orig_mod.state_dict()))  # type: ignore[operator]
    again = torch.compile(Net())
    ckpt = evertrain.Checkpointer(tmp_path, model=again)
    ckpt.resume()
    ckpt.close()
    assert_identical(
        dict(again.state_dict()), {"_orig_mod." + k: v for k, v in plain.state_dict().items()}
    )


def test_only_damaged_checkpoints_is_an_error_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train(tmp_path, 3)
    (tmp_path / "checkpoints" / "step-00000003" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(evertrain.ResumeError, match="none verifies"):
        build(tmp_path)[0].resume()
    assert "model.safetensors" in caplog.text
    assert (tmp_path / "checkpoints" / "step-00000003").exists()  # never deleted


def test_a_first_save_cut_short_leaves_a_run_that_starts_fresh(tmp_path: Path) -> None:
    """Killed while the very first checkpoint was written (``step-N.tmp`` only, as a kill
    during a background save leaves it): the run starts from step 0, not with an error."""
    train(tmp_path, 3)
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-00000003").rename(ckpts / "step-00000003.tmp")
    (ckpts / "step-00000002.deleting").mkdir()
    assert build(tmp_path)[0].resume() == 0


def test_a_checkpoint_of_two_ranks_is_refused_on_one(tmp_path: Path) -> None:
    from evertrain.checkpoint import write_checkpoint

    ckpt, _ = build(tmp_path / "src")
    states = {n: o.state_dict() for n, o in ckpt.owners.items()}
    states["rng_rank1"] = states["rng"]
    states["data_rank1"] = states["data"]
    write_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000004", states, {}, global_step=4)
    with pytest.raises(evertrain.ResumeError, match=r"written by 2 process\(es\), this run has 1"):
        build(tmp_path / "run")[0].resume()


def test_sigterm_saves_after_the_step_and_sets_should_stop(tmp_path: Path) -> None:
    ckpt, o = build(tmp_path, every_steps=None)
    step = ckpt.resume()
    with ckpt, ckpt.stop_on_signals():
        while not ckpt.should_stop:
            step += 1
            if step == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            ckpt.step(step)
    assert step == 4 and ckpt.stop_reason == "SIGTERM"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000004"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_async_save_is_committed_by_close(tmp_path: Path) -> None:
    train(tmp_path / "sync", 6)
    train(tmp_path / "async", 6, async_save=True)
    a = read_checkpoint(tmp_path / "sync" / "checkpoints" / "step-00000006").states
    b = read_checkpoint(tmp_path / "async" / "checkpoints" / "step-00000006").states
    assert_identical(a, b)


def test_split_by_hash_is_stable_as_records_are_added() -> None:
    records = [{"id": f"doc-{i}", "text": str(i)} for i in range(400)]
    train_a, val_a = evertrain.split_by_hash(records[:200], "id", 0.25, seed=3)
    train_b, val_b = evertrain.split_by_hash(records[::-1], "id", 0.25, seed=3)
    assert {r["id"] for r in val_a} <= {r["id"] for r in val_b}
    assert not {r["id"] for r in train_a} & {r["id"] for r in val_b}
    assert 60 < len(val_b) < 140  # ~100 expected
    other = evertrain.split_by_hash(records, lambda r: r["text"], 0.25, seed=4)[1]
    assert {r["id"] for r in other} != {r["id"] for r in val_b}
    with pytest.raises(ValueError, match="val_fraction"):
        evertrain.split_by_hash(records, "id", 1.0)


def test_public_names_resolve_and_import_changes_no_environment() -> None:
    import subprocess
    import sys

    code = (
        "import os, json; before = dict(os.environ); import evertrain; "
        "[getattr(evertrain, n) for n in evertrain.__all__]; "
        "print(json.dumps(before == dict(os.environ)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "true"


def test_extra_names_that_would_read_as_another_ranks_state_are_refused(tmp_path: Path) -> None:
    for name in ("loss_rank1", "Tracker", "trackér", "a-b"):
        with pytest.raises(TypeError, match=r"not \[a-z0-9_\]\+"):
            evertrain.Checkpointer(tmp_path, extra={name: Tracker()})


def test_a_refused_resume_writes_nothing(tmp_path: Path) -> None:
    train(tmp_path, 3)
    (tmp_path / "metrics.jsonl").unlink()
    with pytest.raises(evertrain.StateError):
        evertrain.Checkpointer(tmp_path, model=torch.nn.Linear(6, 3)).resume()
    assert not (tmp_path / "metrics.jsonl").exists()


class Strict:
    def __init__(self, key: str) -> None:
        self.key = key

    def state_dict(self) -> dict[str, Any]:
        return {self.key: 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state[self.key]  # KeyError for a state of another layout


def test_an_objects_own_refusal_names_the_owner(tmp_path: Path) -> None:
    ckpt = evertrain.Checkpointer(tmp_path, extra={"strict": Strict("a")}, every_steps=1)
    ckpt.resume()
    ckpt.step(1)
    ckpt.close()
    again = evertrain.Checkpointer(tmp_path, extra={"strict": Strict("b")})
    with pytest.raises(evertrain.StateError, match=r"^strict: the .*Strict refused .*KeyError"):
        again.resume()
