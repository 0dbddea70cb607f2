"""train.precision: auto is bf16 only where the device computes it natively, and exactly
the run an explicit choice would give; bf16 without hardware support warns (naming the
fix) rather than switching; the resolved precision is recorded and a resume that resolves
it otherwise says so."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import assert_identical, resumed_trainer, write_config
from evertrain import precision
from evertrain.config import load_config

CPU = torch.device("cpu")


def _cpu_flags(monkeypatch: pytest.MonkeyPatch, **flags: bool) -> None:
    caps = {**torch.cpu.get_capabilities(), "avx512_bf16": False, "amx_bf16": False, **flags}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)


@pytest.mark.parametrize(
    ("flags", "want"),
    [({}, "fp32"), ({"avx512_bf16": True}, "bf16"), ({"amx_bf16": True}, "bf16")],
)
def test_auto_follows_the_cpu_flags(
    monkeypatch: pytest.MonkeyPatch, flags: dict[str, bool], want: str
) -> None:
    _cpu_flags(monkeypatch, **flags)
    assert precision.resolve("auto", CPU) == want
    assert precision.resolve("fp32", CPU) == "fp32"
    assert precision.resolve("bf16", CPU) == "bf16"  # asked for: kept, whatever the cost
    with pytest.raises(ValueError, match="fp16"):
        precision.resolve("fp16", CPU)


def test_emulated_bf16_warns_with_the_fix_and_auto_says_what_it_chose(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _cpu_flags(monkeypatch)
    with caplog.at_level(logging.INFO, logger="evertrain"):
        assert precision.announce("bf16", CPU) == "bf16"
        assert precision.announce("auto", CPU) == "fp32"
        assert precision.announce("fp32", CPU) == "fp32"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "avx512_bf16" in warnings[0] and "train.precision: fp32 or auto" in warnings[0]
    assert any("auto -> fp32" in r.getMessage() for r in caplog.records)
    caplog.clear()
    _cpu_flags(monkeypatch, amx_bf16=True)
    with caplog.at_level(logging.WARNING, logger="evertrain"):
        assert precision.announce("bf16", CPU) == "bf16"
    assert not caplog.records


def _run(tmp: Path, name: str, prec: str, steps: int = 6) -> tuple[list[float], dict, dict]:
    cfg = load_config(
        write_config(
            tmp,
            train={"precision": prec, "max_steps": steps, "eval_every_steps": None},
            checkpoint={"every_steps": 3, "keep_last": 3},
        )
    )
    trainer = resumed_trainer(cfg, tmp / name)
    losses: list[float] = []
    trainer.on_step.append(lambda s: losses.append(s.loss))
    trainer.fit()
    info = trainer.checkpoints.committed()[-1]
    return losses, trainer.model.state_dict(), dict(info.summary)


@pytest.mark.parametrize("native", [False, True])
def test_auto_trains_exactly_as_its_resolution(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, native: bool
) -> None:
    _cpu_flags(monkeypatch, avx512_bf16=native)
    want = "bf16" if native else "fp32"
    auto_losses, auto_state, summary = _run(tmp_path, "auto", "auto")
    same_losses, same_state, _ = _run(tmp_path, "explicit", want)
    other_losses, _, _ = _run(tmp_path, "other", "fp32" if native else "bf16")
    assert summary["precision"] == want
    assert auto_losses == same_losses
    assert_identical(auto_state, same_state)
    assert auto_losses != other_losses  # the two precisions are told apart by the run


def test_a_resume_where_auto_resolves_otherwise_warns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _cpu_flags(monkeypatch, amx_bf16=True)
    _run(tmp_path, "run", "auto")
    cfg = load_config(tmp_path / "config.yaml")
    with caplog.at_level(logging.WARNING, logger="evertrain"):
        resumed_trainer(cfg, tmp_path / "run")  # the same machine: no warning
    assert not [r for r in caplog.records if "trained in" in r.getMessage()]
    _cpu_flags(monkeypatch)  # "another machine": no native bf16
    with caplog.at_level(logging.WARNING, logger="evertrain"):
        trainer = resumed_trainer(cfg, tmp_path / "run")
    assert trainer.precision == "fp32"
    msgs = [r.getMessage() for r in caplog.records if "trained in bf16" in r.getMessage()]
    assert len(msgs) == 1 and "train.precision: bf16 for an exact resume" in msgs[0]


@pytest.mark.parametrize("native", [False, True])
def test_bf16_to_auto_resumes_where_they_compute_alike(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """The examples' configs moved from bf16 to auto: their old runs resume where auto
    means bf16; elsewhere the change is refused (it would change the arithmetic)."""
    from evertrain.recipe import config_change_allowed
    from evertrain.resume_checks import ResumeError, check_config

    _cpu_flags(monkeypatch, amx_bf16=native)
    stored = {"train": {"precision": "bf16", "device": "cpu"}}
    new = {"train": {"precision": "auto", "device": "cpu"}}
    allow = config_change_allowed(False)
    if native:
        check_config(new, stored, Path("step-1"), allow)
    else:
        with pytest.raises(ResumeError, match="train.precision"):
            check_config(new, stored, Path("step-1"), allow)
    with pytest.raises(ResumeError, match="train.precision"):  # fp32 -> bf16: never alike
        fp32 = {"train": {"precision": "fp32", "device": "cpu"}}
        check_config(stored, fp32, Path("step-1"), allow)
    assert precision.equivalent("auto", "bf16" if native else "fp32", "cpu")
    assert not precision.equivalent("fp16", "fp32", "cpu")
