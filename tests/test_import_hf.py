"""Import of checkpoints written by the real transformers.Trainer (tiny model, LoRA and full
fine-tuning): global_step, weights and Adam moments arrive unchanged under the right
parameter names, nothing unsafe is unpickled, and evertrain trains on from them."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import evertrain, resumed_trainer, write_config
from evertrain.checkpoint import read_checkpoint
from evertrain.config import RunConfig, load_config
from evertrain.data import build_datasets
from evertrain.importers import ImportHFError, import_hf_checkpoint
from evertrain.importers.hf_trainer import safe_torch_load
from evertrain.models import load_model, trainable_parameters
from evertrain.rng import seed_everything

HF_STEPS = 3
MORE_STEPS = 7


class _Planted:
    """Unpickling this creates ``marker``: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _train_with_hf(tmp: Path, lora: bool) -> tuple[Any, Path, RunConfig, Path]:
    """Train the tiny model HF_STEPS steps with transformers.Trainer on evertrain's rows."""
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments

    sections: dict[str, Any] = {
        "train": {
            "max_steps": HF_STEPS + MORE_STEPS,
            "device": "cpu",
            "weight_decay": 0.01,
            "schedule": {"name": "cosine", "warmup_steps": 0},
        }
    }
    if lora:
        sections["lora"] = {"r": 4, "alpha": 8.0, "dropout": 0.1}
    path = write_config(tmp, **sections)
    cfg = load_config(path)
    seed_everything(cfg.seed)  # the same base weights evertrain will build
    lm = load_model(cfg.model, cfg.lora)
    train_ds, _, _ = build_datasets(cfg.data, lm.tokenizer, cfg.seed)
    args = TrainingArguments(
        output_dir=str(tmp / "hf"),
        per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        max_steps=HF_STEPS,
        save_steps=HF_STEPS,
        learning_rate=cfg.train.lr,
        weight_decay=0.01,
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=True,
        logging_steps=1,
        seed=7,
    )
    trainer = HFTrainer(model=lm.model, args=args, train_dataset=train_ds)
    trainer.train()
    return trainer, tmp / "hf" / f"checkpoint-{HF_STEPS}", cfg, path


@pytest.fixture(scope="module", params=["lora", "full"])
def hf_run(request: Any, tmp_path_factory: Any) -> tuple[Any, Path, RunConfig, Path, bool]:
    lora = request.param == "lora"
    tmp = tmp_path_factory.mktemp(request.param)
    trainer, ckpt, cfg, path = _train_with_hf(tmp, lora)
    return trainer, ckpt, cfg, path, lora


def _hf_params_by_evertrain_name(model: Any) -> dict[str, torch.nn.Parameter]:
    # evertrain names LoRA tensors as PEFT's adapter file does (no adapter name).
    return trainable_parameters(model)


def test_import_round_trip_and_training_continues(hf_run: Any, tmp_path: Path) -> None:
    hf_trainer, ckpt, cfg, _, lora = hf_run
    run = tmp_path / "run"
    result = import_hf_checkpoint(ckpt, run, cfg)
    assert result.global_step == HF_STEPS == hf_trainer.state.global_step
    assert result.kind == ("adapter" if lora else "full")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == HF_STEPS

    ck = read_checkpoint(result.checkpoint)
    s = ck.states
    assert s["progress"]["global_step"] == HF_STEPS
    assert s["progress"]["micro_step"] == HF_STEPS * cfg.train.grad_accum_steps
    examples = HF_STEPS * cfg.train.grad_accum_steps * cfg.train.micro_batch_size
    assert s["progress"]["examples_seen"] == examples
    assert s["data_cursor"]["examples_seen"] == examples
    assert result.data_cursor["examples_seen"] == examples
    assert ck.summary["imported_from"]["global_step"] == HF_STEPS
    assert any("training_args.bin" in n for n in result.notes)

    owner = "adapter_model" if lora else "model"
    assert set(s) >= {owner, "optimizer", "scheduler", "data_cursor", "progress", "rng"}
    hf_params = _hf_params_by_evertrain_name(hf_trainer.model)
    weights = {k: v for k, v in s[owner].items() if k not in ("version", "identity")}
    assert set(weights) == set(hf_params)
    for name, p in hf_params.items():
        assert torch.equal(weights[name], p.detach()), name

    # Adam moments: looked up in the Trainer's live optimizer by parameter object, so a
    # wrong index-to-name mapping cannot pass.
    hf_opt = getattr(hf_trainer.optimizer, "optimizer", hf_trainer.optimizer)
    saved = s["optimizer"]["state"]
    assert set(saved) == set(hf_params)
    for name, p in hf_params.items():
        live = hf_opt.state[p]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[name][key], live[key].cpu()), (name, key)
    if not lora:  # the Trainer's no-decay group (norm weights) was mapped too
        groups = hf_opt.param_groups
        assert groups[1]["params"] and groups[0]["params"]

    rng = safe_torch_load(ckpt / "rng_state.pth", numpy_rng=True)
    assert torch.equal(s["rng"]["torch_cpu"], rng["cpu"])
    assert s["rng"]["numpy"]["keys"].tolist() == [int(x) for x in rng["numpy"][1]]

    # evertrain continues from the imported state: the optimizer's step counts go on
    # from the Trainer's (a fresh optimizer would count only the new steps)
    t = resumed_trainer(cfg, run)
    assert t.progress.global_step == HF_STEPS
    assert t.fit() == "done"
    t.close()
    final = read_checkpoint(run / "checkpoints" / f"step-{HF_STEPS + MORE_STEPS:08d}").states
    steps = {int(v["step"]) for v in final["optimizer"]["state"].values()}
    assert steps == {HF_STEPS + MORE_STEPS}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [x["global_step"] for x in lines if x["kind"] == "train"]
    assert logged == list(range(HF_STEPS + 1, HF_STEPS + MORE_STEPS + 1))
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines if x["kind"] == "train")


# The refusals and the CLI path do not depend on the weights' kind: run them on LoRA only.
@pytest.mark.parametrize("hf_run", ["lora"], indirect=True)
def test_refusals_leave_nothing_behind(hf_run: Any, tmp_path: Path) -> None:
    _, ckpt, cfg, _, lora = hf_run
    assert lora
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    run = tmp_path / "run"

    # a pickle that would run code when loaded is refused, and its code never runs
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "x": _Planted(marker)}, bad / "optimizer.pt")
    with pytest.raises(ImportHFError, match=r"optimizer\.pt: refused.*nothing in it was run"):
        import_hf_checkpoint(bad, run, cfg)
    assert not marker.exists() and not run.exists()

    (bad / "optimizer.pt").unlink()
    with pytest.raises(ImportHFError, match=r"optimizer\.pt: missing"):
        import_hf_checkpoint(bad, run, cfg)

    # an adapter of another rank is refused by name, before any state is written
    shutil.copy(ckpt / "optimizer.pt", bad / "optimizer.pt")
    other = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"r": 8})})  # type: ignore[union-attr]
    with pytest.raises(ImportHFError, match=r"adapter_config\.json.*r is 4 there, lora\.r is 8"):
        import_hf_checkpoint(bad, run, other)
    assert not run.exists()

    # a full-model config against an adapter checkpoint names what is there
    with pytest.raises(ImportHFError, match="LoRA adapter: add a lora section"):
        import_hf_checkpoint(bad, run, cfg.model_copy(update={"lora": None}))

    # never into a run that already has checkpoints
    import_hf_checkpoint(bad, run, cfg)
    with pytest.raises(ImportHFError, match="already has checkpoints"):
        import_hf_checkpoint(bad, run, cfg)


@pytest.mark.parametrize("hf_run", ["lora"], indirect=True)
def test_cli_never_opens_training_args(hf_run: Any, tmp_path: Path) -> None:
    _, ckpt, _, config_path, lora = hf_run
    assert lora
    planted = tmp_path / "ckpt"
    shutil.copytree(ckpt, planted)
    marker = tmp_path / "pwned"
    (planted / "training_args.bin").write_bytes(pickle.dumps(_Planted(marker)))
    run = tmp_path / "run"
    proc = evertrain("import-hf", str(planted), "--run-dir", str(run), "--config", str(config_path))
    out = json.loads(proc.stdout)
    assert out["global_step"] == HF_STEPS
    assert "note: training_args.bin ignored" in proc.stderr
    assert not marker.exists()
    assert read_checkpoint(Path(out["checkpoint"])).global_step == HF_STEPS
    bad = evertrain(
        "import-hf", str(planted), "--run-dir", str(run), "--config", str(config_path), check=False
    )
    assert bad.returncode == 2 and "already has checkpoints" in bad.stderr


@pytest.mark.parametrize("hf_run", ["lora"], indirect=True)
def test_import_into_a_run_another_process_writes_is_refused(hf_run: Any, tmp_path: Path) -> None:
    _, ckpt, _, config_path, _ = hf_run
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from evertrain.runlock import RunLock; "
            f"RunLock({str(run / 'daemon.lock')!r}).acquire(); print('held', flush=True); "
            "time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        proc = evertrain(
            "import-hf", str(ckpt), "--run-dir", str(run), "--config", str(config_path), check=False
        )
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert f"is in use by PID {holder.pid} on " in line
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
