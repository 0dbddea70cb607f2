"""CheckpointManager: atomic saves under crashes, fallback past damage, retention, disk space."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from evertrain.checkpoint import (
    CheckpointInfo,
    CheckpointManager,
    CheckpointWriteError,
    InsufficientDiskSpaceError,
    KeepBest,
    KeepEvery,
    KeepLast,
    KeepPinned,
    RetentionPolicy,
    SavePolicy,
    retention_from_config,
)
from evertrain.checkpoint import commit as ckpt_commit
from evertrain.checkpoint import (
    format as ckpt_format,
)
from evertrain.config import CheckpointConfig


def states(step: int) -> dict[str, dict[str, Any]]:
    return {
        "model": {"version": 1, "w": torch.full((4, 3), float(step)), "b": torch.tensor(step)},
        "progress": {"version": 1, "global_step": step},
    }


def summary(step: int, val_loss: float | None = None) -> dict[str, Any]:
    metrics = {} if val_loss is None else {"val_loss": val_loss}
    return {"global_step": step, "epoch": 0, "metrics": metrics}


def manager(root: Path, retention: RetentionPolicy | None = None, **kw: Any):
    logs: list[str] = []
    return CheckpointManager(
        root, retention or KeepLast(100), log=logs.append, info=logs.append, **kw
    ), logs


def steps(m: CheckpointManager) -> list[int]:
    return [i.global_step for i in m.committed()]


def test_save_commit_load(tmp_path: Path) -> None:
    m, _ = manager(tmp_path / "checkpoints")
    assert m.committed() == [] and m.latest_valid() is None
    path = m.save(120, states(120), summary(120, 0.5))
    assert path == tmp_path / "checkpoints" / "step-00000120"
    m.save(7, states(7), summary(7))
    assert steps(m) == [7, 120]
    latest = m.latest_valid()
    assert latest is not None and latest.global_step == 120
    assert latest.summary["metrics"] == {"val_loss": 0.5}
    loaded = m.load(latest)
    assert torch.equal(loaded.states["model"]["w"], states(120)["model"]["w"])
    assert loaded.states["progress"] == {"version": 1, "global_step": 120}
    assert m.load(latest.path).global_step == 120


# --------------------------------------------------------------------------- crashes

CRASH_SCRIPT = """
import sys, torch
from pathlib import Path
from evertrain.checkpoint import CheckpointManager, KeepLast
m = CheckpointManager(Path(sys.argv[1]), KeepLast(5))
for step in (1, 2):
    m.save(step, {"model": {"w": torch.full((3,), float(step))}}, {"global_step": step})
"""


@pytest.mark.parametrize("point", ["save", "commit"])
def test_crash_mid_save_leaves_only_a_tmp_dir(tmp_path: Path, point: str) -> None:
    root = tmp_path / "checkpoints"
    env = {**os.environ, "EVERTRAIN_FAULT": f"{point}@2"}
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(root)], env=env,
                          capture_output=True, timeout=120)  # fmt: skip
    assert proc.returncode == -9, proc.stderr.decode()
    assert sorted(os.listdir(root)) == ["step-00000001", "step-00000002.tmp"]
    tmp_files = set(os.listdir(root / "step-00000002.tmp"))
    assert ("manifest.json" in tmp_files) == (point == "commit")
    m, logs = manager(root)
    assert steps(m) == [1]
    latest = m.latest_valid()
    assert latest is not None and latest.global_step == 1 and logs == []
    assert m.load(latest).states["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    # The next save of step 2 removes the stale tmp dir (it is ours) and commits.
    m.save(2, states(2), summary(2))
    assert sorted(os.listdir(root)) == ["step-00000001", "step-00000002"]


def test_os_error_during_write_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, _ = manager(tmp_path)
    m.save(1, states(1), summary(1))
    real, calls = ckpt_commit._write_file, []

    def failing(path: Path, data: bytes) -> dict[str, Any]:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(ckpt_commit, "_write_file", failing)
    with pytest.raises(CheckpointWriteError, match="No space left on device") as info:
        m.save(2, states(2), summary(2))
    assert "step-00000002.tmp was removed" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["step-00000001"]
    assert m.load(m.committed()[0]).global_step == 1


def test_insufficient_disk_space_raises_and_deletes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, _ = manager(tmp_path, KeepLast(1))
    m.save(1, states(1), summary(1))
    need = ckpt_format.estimate_size(states(2))
    assert need > states(2)["model"]["w"].nbytes
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=need + 99))
    m.min_free_bytes = 100
    with pytest.raises(InsufficientDiskSpaceError) as info:
        m.save(2, states(2), summary(2))
    assert (info.value.free_bytes, info.value.required_bytes) == (need + 99, need + 100)
    assert f"{need + 99} bytes free" in str(info.value) and "nothing deleted" in str(info.value)
    assert os.listdir(tmp_path) == ["step-00000001"]
    m.min_free_bytes = 99
    m.save(2, states(2), summary(2))  # exactly enough
    assert steps(m) == [2]


# --------------------------------------------------------------------------- damage


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:-3])
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
@pytest.mark.parametrize("name", ["manifest.json", "model.json", "model.safetensors"])
def test_latest_valid_falls_back_loudly(tmp_path: Path, name: str, how: str) -> None:
    m, logs = manager(tmp_path)
    for step in (1, 2, 3):
        m.save(step, states(step), summary(step))
    _damage(tmp_path / "step-00000003" / name, how)
    _damage(tmp_path / "step-00000002" / name, how)
    latest = m.latest_valid()
    assert latest is not None and latest.global_step == 1
    assert len(logs) == 2 and all("DAMAGED" in line and name in line for line in logs)
    assert "step-00000003" in logs[0] and "step-00000002" in logs[1]
    assert sorted(os.listdir(tmp_path)) == ["step-00000001", "step-00000002", "step-00000003"]


def test_saving_over_a_damaged_step_sets_it_aside(tmp_path: Path) -> None:
    m, logs = manager(tmp_path)
    m.save(1, states(1), summary(1))
    m.save(2, states(2), summary(2))
    _damage(tmp_path / "step-00000002" / "model.safetensors", "flip")
    assert m.latest_valid().global_step == 1  # type: ignore[union-attr]
    m.save(2, states(2), summary(2))
    aside = [n for n in os.listdir(tmp_path) if n.startswith("step-00000002.damaged-")]
    assert len(aside) == 1 and any("moved it aside" in line for line in logs)
    assert (tmp_path / aside[0] / "model.safetensors").exists()  # kept for inspection
    assert steps(m) == [1, 2] and m.latest_valid().global_step == 2  # type: ignore[union-attr]


# --------------------------------------------------------------------------- retention


def infos(*entries: tuple[int, float | None]) -> list[CheckpointInfo]:
    return [CheckpointInfo(Path(f"s{s}"), s, summary(s, v)) for s, v in entries]


def test_retention_policies() -> None:
    xs = infos((1, 3.0), (2, 1.0), (3, None), (4, float("nan")), (5, 1.0), (6, 2.0))
    assert KeepLast(2).keep(xs) == {5, 6} and KeepLast(0).keep(xs) == set()
    assert KeepBest("val_loss", 2, "min").keep(xs) == {2, 5}
    assert KeepBest("val_loss", 1, "min").keep(xs) == {5}  # tie: the newer one
    assert KeepBest("val_loss", 2, "max").keep(xs) == {1, 6}
    assert KeepBest("acc", 3).keep(xs) == set()
    assert KeepEvery(2).keep(xs) == {2, 4, 6}
    assert KeepPinned([3, 99]).keep(xs) == {3}
    assert (KeepLast(1) | KeepPinned([1]) | KeepEvery(4)).keep(xs) == {1, 4, 6}
    cfg = CheckpointConfig(keep_last=1, keep_best=1, best_mode="max", keep_every_steps=3,
                           pinned=[2])  # fmt: skip
    assert retention_from_config(cfg).keep(xs) == {6, 1, 3, 2}
    assert retention_from_config(CheckpointConfig(keep_last=2)).keep(xs) == {5, 6}
    with pytest.raises(ValueError, match="mode"):
        KeepBest("val_loss", 1, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        KeepEvery(0)


def test_manager_applies_retention_after_commit(tmp_path: Path) -> None:
    policy = KeepLast(2) | KeepBest("val_loss", 1) | KeepEvery(4) | KeepPinned([3])
    m, logs = manager(tmp_path, policy)
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 6.0, 6: 7.0, 7: 8.0, 8: 9.0, 9: 9.5}
    for step, loss in losses.items():
        m.save(step, states(step), summary(step, loss))
    assert steps(m) == [2, 3, 4, 8, 9]
    assert sorted(os.listdir(tmp_path)) == [f"step-0000000{s}" for s in (2, 3, 4, 8, 9)]
    assert sum("retention: deleted" in line for line in logs) == 4


def test_retention_never_deletes_newest_protected_or_damaged(tmp_path: Path) -> None:
    m, _ = manager(tmp_path, KeepPinned([]))  # a policy that keeps nothing
    m.save(5, states(5), summary(5))
    m.save(3, states(3), summary(3), protect=[5])
    assert steps(m) == [3, 5]
    m.save(4, states(4), summary(4))  # 5 is the newest valid, 4 the new one
    assert steps(m) == [4, 5]
    m.save(6, states(6), summary(6), protect=[4])
    assert steps(m) == [4, 6]
    _damage(tmp_path / "step-00000004" / "model.json", "flip")
    m2, logs = manager(tmp_path, KeepPinned([]))  # fresh process: nothing verified yet
    m2.save(7, states(7), summary(7))
    assert steps(m2) == [4, 7] and any("step-00000004 is damaged" in line for line in logs)


def test_save_policy() -> None:
    p = SavePolicy(every_steps=10)
    assert [s for s in range(0, 31) if p.should_save(s, 0.0)] == [10, 20, 30]
    p.mark_saved(20, 0.0)
    assert not p.should_save(20, 0.0)  # e.g. the step we resumed from
    t = SavePolicy(every_seconds=60)
    assert not t.should_save(1, 1000.0)  # clock starts at the first call
    assert not t.should_save(2, 1059.0) and t.should_save(3, 1060.0)
    t.mark_saved(3, 1060.0)
    assert not t.should_save(4, 1100.0) and t.should_save(5, 1120.0)
    both = SavePolicy.from_config(CheckpointConfig(every_steps=100, every_seconds=5.0))
    assert both.should_save(100, 0.0) and both.should_save(7, 5.0)
    with pytest.raises(ValueError):
        SavePolicy(every_steps=0)
