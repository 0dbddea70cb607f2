"""Asynchronous checkpoints: snapshot semantics, one save in flight, errors surfacing in the
caller, stats, the trainer's wiring, and the flagship SIGKILL exactness test in async mode.
Also the streamed safetensors writer that both save paths use: byte-identical to the
library's own output."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from conftest import evertrain, resumed_trainer, train_losses, write_config
from evertrain.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointWriteError,
    InsufficientDiskSpaceError,
    KeepLast,
    read_checkpoint,
    verify_checkpoint,
)
from evertrain.checkpoint import commit as ckpt_commit
from evertrain.checkpoint import format as ckpt_format
from evertrain.checkpoint import manager as ckpt_manager
from evertrain.checkpoint.safetensors_stream import layout, tensor_bytes
from evertrain.checkpoint.staging import StagingBuffer
from evertrain.config import load_config
from evertrain.trainer import Trainer
from test_exact_resume import N, assert_identical, final_state, kill_after_step

# --------------------------------------------------------------------------- streamed bytes


def _random_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    names = ["a", "b", "Z", "é", "日本", 'q"uote', "back\\slash", "ctl\n\t\x01\x7f", "a.b/c", ""]
    out = {}
    for i, dtype in enumerate(sorted(ckpt_format.DTYPES, key=str) * 2):
        shape = rnd.choice([(), (0,), (3,), (2, 5), (1, 0, 4), (7, 1, 3)])
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        t = (raw % 2).bool() if dtype == torch.bool else raw.view(dtype)
        out[f"{rnd.choice(names)}{i}"] = t.reshape(shape)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_streamed_safetensors_bytes_equal_the_librarys(seed: int) -> None:
    """Header order, escaping and padding as ``safetensors.torch.save`` makes them, for every
    dtype, 0-dim and empty tensors and awkward names; also from the staging buffer."""
    tensors = _random_tensors(seed)
    expected = safetensors.torch.save(tensors)
    laid = layout(tensors)
    streamed = laid.header + b"".join(bytes(tensor_bytes(t)) for t in laid.tensors)
    assert streamed == expected
    assert laid.file_nbytes == len(expected)
    (staged,) = StagingBuffer().stage([laid.tensors])
    assert laid.header + bytes(tensor_bytes(staged)) == expected


def _random_tree(rnd: random.Random, depth: int = 0) -> Any:
    leaves: list[Any] = [
        None, True, False, 0, -1, 2**70, 0.1, -0.0, 1e308, 5e-324, float("nan"),
        float("inf"), float("-inf"), "", "é\u2603 \"q\" \\ \n\x01 /", "plain",
    ]  # fmt: skip
    kind = rnd.choice(["leaf", "dict", "list"] if depth < 4 else ["leaf"])
    if kind == "leaf":
        return rnd.choice(leaves)
    n = rnd.randint(0, 4)
    if kind == "list":
        return [_random_tree(rnd, depth + 1) for _ in range(n)]
    return {
        rnd.choice(["a", "é", "k\n", str(i)]) + str(i): _random_tree(rnd, depth + 1)
        for i in range(n)
    }


@pytest.mark.parametrize("seed", range(20))
def test_tree_json_encoder_equals_json_dumps(seed: int) -> None:
    """The owner-file encoder must write exactly what json.dumps(indent=1) writes."""
    tree = _random_tree(random.Random(seed))
    assert ckpt_format._dump_tree(tree) == ckpt_format._dump_json(tree, 1)


def test_staging_buffer_is_reused_and_holds_a_copy() -> None:
    buf = StagingBuffer()
    a = {"w": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int64)}
    laid = layout(a)
    (first,) = buf.stage([laid.tensors])
    size, ptr = buf.nbytes, first.data_ptr()
    a["w"].add_(100)  # the source changes after staging: the snapshot must not
    assert laid.header + bytes(tensor_bytes(first)) != safetensors.torch.save(a)
    (second,) = buf.stage([laid.tensors])
    assert (buf.nbytes, second.data_ptr()) == (size, ptr)  # no new allocation
    assert laid.header + bytes(tensor_bytes(second)) == safetensors.torch.save(a)
    buf.release()
    assert buf.nbytes == 0


# --------------------------------------------------------------------------- the manager


def states(step: int) -> dict[str, dict[str, Any]]:
    return {
        "model": {
            "version": 1,
            "w": torch.full((64, 32), float(step)),
            "tied": [torch.arange(6.0)] * 2,
            "half": torch.arange(5, dtype=torch.bfloat16),
        },
        "progress": {"version": 1, "global_step": step, "hist": [1, 2]},
    }


def manager(root: Path, keep: int = 100) -> tuple[CheckpointManager, list[str]]:
    logs: list[str] = []
    return CheckpointManager(root, KeepLast(keep), log=logs.append, info=logs.append), logs


def test_async_snapshot_is_taken_at_the_call_and_bytes_equal_a_sync_save(tmp_path: Path) -> None:
    m, _ = manager(tmp_path / "async")
    s = states(3)
    path = m.save_async(3, s, {"global_step": 3, "metrics": {"val_loss": 1.5}})
    # The caller mutates everything in place before the background write may have run.
    s["model"]["w"].add_(1)
    s["model"]["tied"][0].mul_(0)
    s["progress"]["hist"].append(3)
    s["progress"]["global_step"] = 99
    m.wait()
    assert not m.in_flight and verify_checkpoint(path) == []
    sync, _ = manager(tmp_path / "sync")
    ref = sync.save(3, states(3), {"global_step": 3, "metrics": {"val_loss": 1.5}})
    assert sorted(os.listdir(path)) == sorted(os.listdir(ref))
    for name in os.listdir(ref):
        assert (path / name).read_bytes() == (ref / name).read_bytes(), name
    assert_identical(read_checkpoint(path).states, states(3))


def test_at_most_one_save_in_flight_and_the_next_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, int]] = []
    real = ckpt_manager.commit_checkpoint

    def slow_commit(directory: Path, prepared: Any, *rest: Any) -> int:
        events.append(("start", prepared.global_step))
        time.sleep(0.3)
        n = real(directory, prepared, *rest)
        events.append(("end", prepared.global_step))
        return n

    monkeypatch.setattr(ckpt_manager, "commit_checkpoint", slow_commit)
    m, _ = manager(tmp_path)
    m.save_async(1, states(1), {})
    assert m.in_flight and events in ([], [("start", 1)])
    m.save_async(2, states(2), {})  # waits for 1 first
    assert events[:2] == [("start", 1), ("end", 1)]
    m.save(3, states(3), {})  # a sync save waits too
    assert events == [("start", 1), ("end", 1), ("start", 2), ("end", 2), ("start", 3), ("end", 3)]
    stats = m.take_stats()
    assert [(s.global_step, s.mode) for s in stats] == [(1, "async"), (2, "async"), (3, "sync")]
    assert stats[1].wait_s > 0.1 and stats[1].stall_s >= stats[1].wait_s + stats[1].stage_s
    assert stats[2].wait_s > 0.1 and stats[2].stall_s > stats[2].write_s
    assert m.take_stats() == [] and m.last_stats == stats[2]
    for s in stats:
        files = list(Path(s.path).iterdir())
        assert s.bytes == sum(f.stat().st_size for f in files) and s.write_s > 0
        assert s.as_metrics()["kind"] == "checkpoint"
        assert s.as_metrics()["bytes_per_s"] == s.bytes / s.write_s


def _fail_safetensors_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    real = ckpt_commit._write_parts

    def failing(path: Path, parts: Any) -> dict[str, Any]:
        if path.suffix == ".safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, parts)

    monkeypatch.setattr(ckpt_commit, "_write_parts", failing)


def _check_until_raised(m: CheckpointManager) -> BaseException:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            m.check()  # never blocks
        except CheckpointWriteError as e:
            return e
        time.sleep(0.01)
    raise AssertionError("the background error was never raised by check()")


def test_background_error_is_raised_once_by_check_and_nothing_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, _ = manager(tmp_path)
    m.save(1, states(1), {})
    with monkeypatch.context() as mp:
        _fail_safetensors_writes(mp)
        m.save_async(2, states(2), {})
        error = _check_until_raised(m)
    assert "No space left on device" in str(error) and "step-00000002.tmp was removed" in str(error)
    m.check()  # raised once, not again
    m.wait()
    assert sorted(os.listdir(tmp_path)) == ["step-00000001"]
    assert m.latest_valid().global_step == 1  # type: ignore[union-attr]
    assert m.take_stats()[-1].global_step == 1  # the failed save has no stats
    m.save_async(2, states(2), {})  # the manager is usable again
    m.close()
    assert verify_checkpoint(tmp_path / "step-00000002") == []


@pytest.mark.parametrize("surface", ["save_async", "wait", "close", "latest_valid"])
def test_background_error_is_raised_by_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, surface: str
) -> None:
    m, _ = manager(tmp_path)
    with monkeypatch.context() as mp:
        _fail_safetensors_writes(mp)
        m.save_async(1, states(1), {})
        futures.wait([m._writer._job])  # type: ignore[list-item]  # let it fail first
    call = {
        "save_async": lambda: m.save_async(2, states(2), {}),
        "wait": m.wait,
        "close": m.close,
        "latest_valid": m.latest_valid,
    }[surface]
    with pytest.raises(CheckpointWriteError, match="No space left"):
        call()
    assert not (tmp_path / "step-00000002").exists()  # the failing call saved nothing


def test_validation_and_disk_space_errors_are_raised_synchronously(tmp_path: Path) -> None:
    m, _ = manager(tmp_path)
    with pytest.raises(CheckpointError, match="tuple"):
        m.save_async(1, {"m": {"a": (1, 2)}}, {})
    assert not m.in_flight and os.listdir(tmp_path) == []
    m.min_free_bytes = 1 << 62
    with pytest.raises(InsufficientDiskSpaceError):
        m.save_async(1, states(1), {})
    assert not m.in_flight and os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- the trainer


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Any:
    # _trainer sets one torch thread (model.num_threads): on a loaded 2-core machine OpenMP's
    # spinning threads make a tiny step 15x slower. Other tests get the default back.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _trainer(tmp_path: Path, **cfg: Any) -> Trainer:
    cfg.setdefault("checkpoint", {"every_steps": 5, "keep_last": 3, "async": True})
    cfg.setdefault("model", {"source": "tiny", "dropout": 0.1, "num_threads": 1})
    return resumed_trainer(load_config(write_config(tmp_path, **cfg)), tmp_path / "run")


def _slow_commits(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = ckpt_manager.commit_checkpoint

    def slow(directory: Path, prepared: Any, *rest: Any) -> int:
        time.sleep(seconds)
        return real(directory, prepared, *rest)

    monkeypatch.setattr(ckpt_manager, "commit_checkpoint", slow)


def test_trainer_async_saves_log_stats_and_fit_waits_for_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _slow_commits(monkeypatch, 0.2)
    tr = _trainer(tmp_path, train={"max_steps": 12, "eval_every_steps": None})
    assert tr.checkpoint_config.async_save and tr.ckpt.async_save
    assert tr.fit() == "done"
    # fit returned only after the final checkpoint (step 12) was committed
    assert not tr.checkpoints.in_flight
    assert [i.global_step for i in tr.checkpoints.committed()] == [5, 10, 12]
    tr.close()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ckpts = [r for r in records if r["kind"] == "checkpoint"]
    assert [(r["global_step"], r["mode"]) for r in ckpts] == [
        (5, "async"),
        (10, "async"),
        (12, "async"),
    ]
    for r in ckpts:
        # the stall includes waiting for the previous save (step 12's waits for step 10's
        # nearly whole 0.2 s write): the save's own blocking part is the rest of it
        assert r["stall_s"] >= r["wait_s"] >= 0 and r["bytes"] > 0 and r["bytes_per_s"] > 0
        assert r["write_s"] >= 0.2 > r["stall_s"] - r["wait_s"]
    # each record is logged after its save completed: never before the step that saved it
    steps = [r["global_step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, 13))
    pos = {id(r): i for i, r in enumerate(records)}
    train_pos = {r["global_step"]: pos[id(r)] for r in records if r["kind"] == "train"}
    assert all(pos[id(r)] > train_pos[r["global_step"]] for r in ckpts)


def test_sigterm_waits_for_the_in_flight_async_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _slow_commits(monkeypatch, 0.3)
    tr = _trainer(tmp_path, train={"max_steps": 40, "eval_every_steps": None})
    tr.on_step.append(lambda s: signal.raise_signal(signal.SIGTERM) if s.global_step == 7 else None)
    assert tr.fit() == "SIGTERM"
    assert tr.progress.global_step == 7 and not tr.checkpoints.in_flight
    assert [i.global_step for i in tr.checkpoints.committed()] == [5, 7]
    assert verify_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000007") == []
    tr.close()


def test_trainer_raises_a_background_error_at_a_following_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tr = _trainer(tmp_path, train={"max_steps": 40, "eval_every_steps": None})
    _fail_safetensors_writes(monkeypatch)

    def let_the_save_of_step_5_fail(stats: Any) -> None:
        job = tr.checkpoints._writer._job
        if stats.global_step == 6 and job is not None:
            futures.wait([job])

    tr.on_step.append(let_the_save_of_step_5_fail)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        tr.fit()
    # raised by the check at the start of step 6 or 7, not by the next save (step 10)
    assert tr.progress.global_step in (5, 6)
    assert tr.checkpoints.committed() == []
    monkeypatch.undo()
    tr.close()  # nothing pending any more


# --------------------------------------------------------------------------- crash exactness


def test_sigkill_during_background_writes_resumes_bit_identical(tmp_path: Path) -> None:
    """The flagship test with ``checkpoint.async``: SIGKILL inside the background writer
    while a checkpoint is half written (``save@15``) and after its manifest before the rename
    (``commit@20``), and from outside at a random step (possibly mid-write). The reference
    run saves synchronously: async and sync runs end bit-identical."""
    rng = random.Random(os.environ.get("EVERTRAIN_TEST_SEED", time.time_ns()))
    outside = rng.randint(26, 37)
    print(f"external kill after step {outside}")
    straight_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    straight_dir.mkdir()
    async_dir.mkdir()
    data = write_config(tmp_path).parent / "train.jsonl"
    one_thread = {"source": "tiny", "dropout": 0.1, "num_threads": 1}  # see above
    sync_cfg = write_config(straight_dir, data, model=one_thread)
    async_cfg = write_config(
        async_dir,
        data,
        model=one_thread,
        checkpoint={"every_steps": 5, "keep_last": 3, "async": True},
    )
    straight, resumed = straight_dir / "run", async_dir / "run"
    evertrain("train", str(sync_cfg), "--run-dir", str(straight))
    args = ["train", str(async_cfg), "--run-dir", str(resumed)]
    for fault in ["save@15", "commit@20", outside]:
        if isinstance(fault, int):
            kill_after_step(args, fault)
        else:
            proc = evertrain(*args, fault=fault, check=False)
            assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-2000:])
            if fault.startswith(("save", "commit")):
                # killed inside the writer thread: only a .tmp dir, the previous one intact
                step = int(fault.split("@")[1])
                ckpts = sorted(os.listdir(resumed / "checkpoints"))
                assert f"step-{step:08d}.tmp" in ckpts and f"step-{step:08d}" not in ckpts
                assert verify_checkpoint(resumed / "checkpoints" / f"step-{step - 5:08d}") == []
    evertrain(*args)
    assert train_losses(straight) == train_losses(resumed)
    assert sorted(train_losses(resumed)) == list(range(1, N + 1))
    for owner in ("model", "optimizer", "scheduler", "data_cursor", "progress", "rng"):
        assert_identical(final_state(straight)[owner], final_state(resumed)[owner], owner)
    records = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    modes = {r["mode"] for r in records if r["kind"] == "checkpoint"}
    assert modes == {"async"}


def test_async_writes_on_the_writer_thread_sync_on_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names: list[str] = []
    real = ckpt_manager.commit_checkpoint

    def spy(directory: Path, prepared: Any, *rest: Any) -> int:
        names.append(threading.current_thread().name)
        return real(directory, prepared, *rest)

    monkeypatch.setattr(ckpt_manager, "commit_checkpoint", spy)
    m, _ = manager(tmp_path)
    m.save_async(1, states(1), {})
    m.save(2, states(2), {})
    assert names[0].startswith("evertrain-checkpoint-writer")
    assert names[1] == threading.main_thread().name
