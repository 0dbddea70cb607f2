"""Multi-process training under torchrun (CPU, gloo): exact resume after the whole group is
SIGKILLed, resume on a different number of processes with the same global example sequence,
the multi-rank checkpoint commit (a failing or damaged rank is never committed / chosen),
and torchrun's --max-restarts recovering from a rank that died."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import assert_identical, cli_env, small_data, train_losses, write_config
from evertrain.batching import grad_accum_for_resume
from evertrain.checkpoint import (
    CheckpointInfo,
    CheckpointManager,
    CheckpointWriteError,
    InsufficientDiskSpaceError,
    KeepLast,
    read_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from evertrain.checkpoint.ranks import choose_checkpoint, rank_problems, save_ranked
from evertrain.config import ConfigError, load_config
from evertrain.distributed import Group

N = 12  # optimizer steps; 2 processes x micro-batch 2 x accumulation 2 = 8 examples a step
TIMEOUT = 240


def dist_config(tmp: Path) -> Path:
    """Tiny model with dropout; ~40 training rows, so 5 steps an epoch: 2 epoch boundaries."""
    data = small_data(tmp / "train.jsonl", 20)
    return write_config(
        tmp,
        data,
        train={
            "micro_batch_size": 2,
            "grad_accum_steps": 2,
            "max_steps": N,
            "lr": 3e-3,
            "schedule": {"name": "cosine", "warmup_steps": 2},
            "eval_every_steps": 6,
        },
        checkpoint={"every_steps": 2, "keep_last": 3},
    )


def torchrun_cmd(nproc: int, args: list[str], max_restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a free local port
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        str(max_restarts),
        "-m",
        "evertrain",
        *args,
    ]


def env(**extra: str) -> dict[str, str]:
    return cli_env(EVERTRAIN_LOG_EXAMPLE_IDS="1", OMP_NUM_THREADS="1", **extra)


def run(cmd: list[str], check: bool = True, **extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, env=env(**extra), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stderr[-20000:]}")
    return proc


def train(nproc: int, config: Path, run_dir: Path, *more: str, **kw: Any) -> Any:
    args = ["train", str(config), "--run-dir", str(run_dir), *more]
    if nproc == 1:  # a plain process, no torchrun
        return run([sys.executable, "-m", "evertrain", *args], **kw)
    return run(torchrun_cmd(nproc, args), **kw)


def example_ids(run_dir: Path) -> dict[int, list[int]]:
    """global_step -> the global example ids trained in it, each step logged exactly once."""
    out: dict[int, list[int]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "example_ids":
            assert rec["global_step"] not in out, f"step {rec['global_step']} logged twice"
            out[rec["global_step"]] = rec["ids"]
    return out


def final_states(run_dir: Path) -> dict[str, Any]:
    return read_checkpoint(run_dir / "checkpoints" / f"step-{N:08d}").states


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, run dir) of an uninterrupted 2-process run."""
    return straight_run(tmp_path_factory, "straight", dist_config)


def straight_run(factory: pytest.TempPathFactory, name: str, make_config: Any) -> tuple[Path, Path]:
    """(config, run dir) of an uninterrupted 2-process `evertrain train` of the config
    ``make_config(tmp)`` writes."""
    tmp = factory.mktemp(name)
    config = make_config(tmp)
    train(2, config, tmp / "run")
    return config, tmp / "run"


def step_sizes(rows: int, global_batch: int, steps: int) -> list[int]:
    """Examples of each optimizer step when every row is trained once per epoch: whole
    global batches, then the epoch's remainder."""
    per_epoch = [global_batch] * (rows // global_batch) + (
        [rows % global_batch] * (rows % global_batch > 0)
    )
    return (per_epoch * steps)[:steps]


def test_straight_run_partitions_the_global_batch(straight: tuple[Path, Path]) -> None:
    _, run_dir = straight
    ids = example_ids(run_dir)
    assert sorted(ids) == list(range(1, N + 1))
    states = final_states(run_dir)
    rows = states["data_cursor"]["num_examples"]
    sizes = step_sizes(rows, 8, N)
    assert rows % 8 and [len(ids[s]) for s in sorted(ids)] == sizes  # a short step per epoch
    assert all(len(set(v)) == len(v) for v in ids.values())
    per_epoch = -(-rows // 8)
    first_epoch = [i for s in range(1, per_epoch + 1) for i in ids[s]]
    assert sorted(first_epoch) == list(range(rows))  # every row once, none dropped
    assert "rng_rank1" in states and not torch.equal(
        states["rng"]["torch_cpu"], states["rng_rank1"]["torch_cpu"]
    )
    summary = read_checkpoint(run_dir / "checkpoints" / f"step-{N:08d}").summary
    assert summary["ranks"] == {"world_size": 2, "per_rank_owners": ["rng"]}
    assert summary["batch"] == {"world_size": 2, "micro_batch_size": 2, "grad_accum_steps": 2}
    cursor = states["data_cursor"]
    assert cursor["global_batch_size"] == 8 and cursor["examples_seen"] == sum(sizes)
    # only rank 0 writes the metrics: each train step once, with global counts
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["kind"] == "train"]
    assert [x["global_step"] for x in train_lines] == list(range(1, N + 1))
    assert [x["examples"] for x in train_lines] == sizes


def worker_pids(parent: int) -> list[int]:
    """Child processes of ``parent`` (torchrun's workers run in sessions of their own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(entry.name))
    return pids


def signal_group_after_step(cmd: list[str], run_dir: Path, step: int, how: str) -> None:
    """Start a torchrun group; once global_step ``step`` is logged, either SIGKILL all of it
    (workers and torchrun, ``how="kill"``) or send SIGTERM to torchrun (``how="term"``),
    which forwards it to the workers. Where it lands is up to timing."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if max(train_losses_so_far(run_dir), default=0) >= step:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"finished before the signal: {proc.stderr.read()}"  # type: ignore[union-attr]
        if how == "kill":
            for pid in [*worker_pids(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if how == "kill":
        assert proc.returncode == -signal.SIGKILL
    else:  # every rank stopped after the same step and saved it together
        last = max(train_losses_so_far(run_dir))
        assert (run_dir / "checkpoints" / f"step-{last:08d}" / "manifest.json").exists(), err


def train_losses_so_far(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [
        json.loads(x)["global_step"]
        for x in metrics.read_text().splitlines()
        if x.endswith("}") and '"kind": "train"' in x
    ]


def test_group_killed_anywhere_resumes_bit_identical(
    straight: tuple[Path, Path], tmp_path: Path
) -> None:
    """Every rank SIGKILLed while checkpoint 6 is half written (each rank after its first
    file), then the whole group SIGKILLed at a random moment from outside, then stopped by
    SIGTERM (the ranks agree on the step to stop after and save it): the resumed run is
    bit-identical to the uninterrupted one."""
    config, ref = straight
    run_dir = tmp_path / "run"
    proc = train(2, config, run_dir, check=False, EVERTRAIN_FAULT="save@6")
    assert proc.returncode != 0, proc.stderr[-2000:]
    # killed while step 6 was half written: it was never committed
    assert not (run_dir / "checkpoints" / "step-00000006").exists()
    assert (run_dir / "checkpoints" / "step-00000006.tmp").is_dir()
    outside = random.Random(os.environ.get("EVERTRAIN_TEST_SEED", time.time_ns())).randint(7, 9)
    print(f"external kill after step {outside}")
    cmd = torchrun_cmd(2, ["train", str(config), "--run-dir", str(run_dir)])
    signal_group_after_step(cmd, run_dir, outside, "kill")
    signal_group_after_step(cmd, run_dir, 10, "term")
    train(2, config, run_dir)
    assert_same_run(run_dir, ref)


def assert_same_run(run_dir: Path, ref: Path) -> None:
    """``run_dir`` trained what ``ref`` did: the same losses and global example ids at every
    step, every tensor of the final checkpoint equal."""
    assert train_losses(run_dir) == train_losses(ref)
    assert example_ids(run_dir) == example_ids(ref)
    assert_identical(final_states(ref), final_states(run_dir))


def test_resume_on_one_then_two_processes_keeps_the_global_sequence(
    straight: tuple[Path, Path], tmp_path: Path
) -> None:
    """2 processes (accumulation 2) -> 1 process (accumulation adjusted to 4) -> 2 again:
    the global example ids of every optimizer step are those of the uninterrupted run."""
    config, ref = straight
    run_dir = tmp_path / "run"
    train(2, config, run_dir, "--max-steps", "4")
    one = train(1, config, run_dir, "--max-steps", "8")
    assert "grad_accum_steps 2 -> 4" in one.stderr
    summary = read_checkpoint(run_dir / "checkpoints" / f"step-{8:08d}").summary
    assert summary["batch"] == {"world_size": 1, "micro_batch_size": 2, "grad_accum_steps": 4}
    train(2, config, run_dir)
    assert example_ids(run_dir) == example_ids(ref)
    final = final_states(run_dir)
    assert final["data_cursor"] == final_states(ref)["data_cursor"]
    rows = final["data_cursor"]["num_examples"]
    assert final["progress"]["examples_seen"] == sum(step_sizes(rows, 8, N))
    # the same training up to the reduction order: losses agree closely, not bit for bit
    mine, theirs = train_losses(run_dir), train_losses(ref)
    assert all(abs(mine[s] - theirs[s]) < 1e-2 for s in theirs), (mine, theirs)


def test_max_restarts_recovers_from_a_dead_rank(
    straight: tuple[Path, Path], tmp_path: Path
) -> None:
    """Rank 1 is SIGKILLed once, mid-step 7; torchrun takes the group down and restarts it,
    the run resumes from its last committed checkpoint and finishes bit-identical."""
    config, ref = straight
    run_dir, marker = tmp_path / "run", tmp_path / "fault-fired"
    args = ["train", str(config), "--run-dir", str(run_dir)]
    run(
        torchrun_cmd(2, args, max_restarts=2),
        EVERTRAIN_RANK_FAULT="1:micro@7:1",
        EVERTRAIN_FAULT_ONCE=str(marker),
    )
    assert marker.read_text().strip() == "1:micro@7:1"  # the rank did die
    assert example_ids(run_dir) == example_ids(ref)
    assert train_losses(run_dir) == train_losses(ref)
    assert_identical(final_states(ref), final_states(run_dir))


# --------------------------------------------------------------------------- commit protocol


def rng_like(value: float) -> dict[str, Any]:
    return {"version": 1, "torch_cpu": torch.full((5,), value), "note": f"v{value}"}


def _commit_worker(rank: int, root: str, results: str) -> None:
    """Rank ``rank`` of 2: save step 1 (ok), 2 (rank 1's state is invalid), 3 (rank 0 finds
    too little disk space), 4 (ok); record each outcome."""
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    group = Group(world_size=2, rank=rank, backend="gloo")
    manager = CheckpointManager(Path(root) / "checkpoints", KeepLast(10))
    outcomes: dict[Any, Any] = {
        # the collectives the trainer relies on, as every rank sees them
        "stop": group.agree_stop("SIGTERM" if rank == 0 else None),
        "any": group.any(rank == 1),
        "json": group.broadcast_json({"file": 7} if rank == 0 else None),
        "bytes": [b.decode() for b in group.all_gather_bytes(b"r" * (rank + 1))],
        "totals": group.sum_tensor(
            group.tensor([1.0 + rank, 10 + rank, 2], torch.float64)
        ).tolist(),
    }
    for step in (1, 2, 3, 4):
        states: dict[str, Any] = {"rng": rng_like(rank + step / 10)}
        if rank == 0:
            states["model"] = {"version": 1, "w": torch.arange(6.0) * step}
        if step == 2 and rank == 1:
            states["rng"]["bad"] = (1, 2)  # tuples are not storable: rank 1 fails
        manager.min_free_bytes = 1 << 62 if step == 3 else 0
        try:
            path = save_ranked(manager, group, step, states, {"global_step": step})
            outcomes[step] = f"ok {path.name}"
        except (CheckpointWriteError, InsufficientDiskSpaceError) as e:
            outcomes[step] = f"{type(e).__name__}: {e}"
    Path(results, f"rank{rank}.json").write_text(json.dumps(outcomes))
    dist.destroy_process_group()


def test_multi_rank_commit_and_choice(tmp_path: Path) -> None:
    mp.spawn(_commit_worker, args=(str(tmp_path), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    root = tmp_path / "checkpoints"
    for r in (r0, r1):
        assert r["stop"] == "SIGTERM" and r["any"] is True and r["json"] == {"file": 7}
        assert r["bytes"] == ["r", "rr"] and r["totals"] == [
            3.0,
            21,
            4,
        ]  # sums: the trainer divides by the targets
    for r in (r0, r1):
        assert r["1"] == "ok step-00000001" and r["4"] == "ok step-00000004"
        assert r["2"].startswith("CheckpointWriteError") and "rank 1" in r["2"], r["2"]
        assert "tuple" in r["2"]
        assert r["3"].startswith("InsufficientDiskSpaceError")
    # a failure on any rank commits nothing and leaves nothing behind
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000004"]
    ck = read_checkpoint(root / "step-00000004")
    assert set(ck.states) == {"model", "rng", "rng_rank1"}
    assert torch.equal(ck.states["rng_rank1"]["torch_cpu"], torch.full((5,), 1.4))
    assert rank_problems(ck.manifest) == []
    one = Group()
    assert choose_checkpoint(root, one).global_step == 4  # type: ignore[union-attr]

    # a damaged rank file: the checkpoint is not chosen, the older one is
    for damage in ("flip", "delete"):
        copy = tmp_path / damage
        shutil.copytree(root, copy)
        victim = copy / "step-00000004" / "rng_rank1.safetensors"
        if damage == "flip":
            data = bytearray(victim.read_bytes())
            data[-1] ^= 0x01
            victim.write_bytes(bytes(data))
        else:
            victim.unlink()
        warnings: list[str] = []
        chosen = choose_checkpoint(copy, one, warnings.append)
        assert chosen is not None and chosen.global_step == 1, damage
        assert "rng_rank1.safetensors" in warnings[0] and "DAMAGED" in warnings[0]
    # a manifest that does not list a rank's files at all (say, written by a broken
    # writer) is incomplete: not chosen either
    lacking = tmp_path / "lacking"
    shutil.copytree(root, lacking)
    shutil.rmtree(lacking / "step-00000004")
    states = {k: v for k, v in ck.states.items() if k != "rng_rank1"}
    write_checkpoint(lacking / "step-00000004", states, ck.summary, global_step=4)
    assert verify_checkpoint(lacking / "step-00000004") == []
    warnings = []
    chosen = choose_checkpoint(lacking, one, warnings.append)
    assert chosen is not None and chosen.global_step == 1
    assert "rank 1 of 2" in warnings[0]


def test_resume_geometry_adjusts_accumulation_or_says_what_works(tmp_path: Path) -> None:
    config = write_config(tmp_path, train={"micro_batch_size": 2, "grad_accum_steps": 3})
    cfg = load_config(config)
    ckpt = tmp_path / "step-00000005"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"version": 1, "config": cfg.to_json()}))
    batch = {"world_size": 2, "micro_batch_size": 2, "grad_accum_steps": 3}  # 12 a step
    info = CheckpointInfo(ckpt, 5, {"batch": batch})
    assert grad_accum_for_resume(cfg, 2, info) == 3
    assert grad_accum_for_resume(cfg, 1, info) == 6
    assert grad_accum_for_resume(cfg, 3, info) == 2
    assert grad_accum_for_resume(cfg, 6, info) == 1
    with pytest.raises(ConfigError, match=r"\(1, 6\), \(2, 3\), \(3, 2\), \(6, 1\)"):
        grad_accum_for_resume(cfg, 4, info)
    # a deliberate change of the batch keys is taken as given (the config check decides)
    changed = load_config(config, ["train.grad_accum_steps=1"])
    assert grad_accum_for_resume(changed, 4, info) == 1
    # no resume, or a checkpoint from before multi-process support: the config's value
    assert grad_accum_for_resume(cfg, 4, None) == 3
    assert grad_accum_for_resume(cfg, 4, CheckpointInfo(ckpt, 5, {})) == 3
