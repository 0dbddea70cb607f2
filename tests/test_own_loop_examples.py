"""The own-loop examples (examples/own_loop/) killed with SIGKILL at random steps, once while
a checkpoint is being written, and resumed: every tensor of every owner and every logged
loss equal to an uninterrupted run.

The kill points are drawn from a seed printed in every failure message; set
EVERTRAIN_KILL_SEED to replay one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, assert_identical, cli_env
from evertrain.checkpoint import read_checkpoint

EXAMPLES = REPO / "examples" / "own_loop"
TIMEOUT = 300
SEED = int(os.environ.get("EVERTRAIN_KILL_SEED", random.randrange(1 << 30)))


def seq2seq_cmd(run: Path) -> list[str]:
    return [sys.executable, str(EXAMPLES / "seq2seq.py"), str(run)]


def pretrain_cmd(run: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(EXAMPLES / "pretrain.py"),
        str(run),
    ]


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [
        json.loads(x)["global_step"]
        for x in path.read_text().splitlines()
        if x.endswith("}") and '"kind": "train"' in x
    ]


def train_lines(run: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def run_to_end(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd,
        env=cli_env(OMP_NUM_THREADS="1", **env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    return proc


def kill_after_step(cmd: list[str], run: Path, step: int) -> None:
    """Start ``cmd``; once ``step`` is logged, SIGKILL it and every process under it."""
    proc = subprocess.Popen(
        cmd,
        env=cli_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if max(logged_steps(run), default=0) >= step:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"seed {SEED}: ended before step {step}: {proc.stderr.read()}"  # type: ignore[union-attr]
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def killed_and_resumed(
    cmd: list[str], run: Path, total: int, save_step: int, kills: int
) -> list[str]:
    """Kill once inside the save of ``save_step`` (EVERTRAIN_FAULT), then ``kills`` times
    at random steps, then run to the end; returns what happened, for messages."""
    rnd = random.Random(SEED)
    proc = run_to_end(cmd, EVERTRAIN_FAULT=f"save@{save_step}")
    assert proc.returncode != 0, f"the save@{save_step} fault did not fire: {proc.stderr}"
    assert (run / "checkpoints" / f"step-{save_step:08d}.tmp").exists(), proc.stderr[-3000:]
    story = [f"killed inside the save of step {save_step}"]
    for _ in range(kills):
        done = max(logged_steps(run), default=0)
        if done + 1 >= total:
            break
        at = rnd.randint(done + 1, min(done + 4, total - 1))
        kill_after_step(cmd, run, at)
        story.append(f"SIGKILL after step {at} was logged")
    proc = run_to_end(cmd)
    assert proc.returncode == 0, f"seed {SEED}, {story}: {proc.stderr[-5000:]}"
    return story


def assert_same_run(straight: Path, resumed: Path, total: int, story: list[str]) -> None:
    final = f"step-{total:08d}"
    a = read_checkpoint(straight / "checkpoints" / final).states
    b = read_checkpoint(resumed / "checkpoints" / final).states
    a.pop("versions"), b.pop("versions")
    try:
        assert_identical(a, b)
        la, lb = train_lines(straight), train_lines(resumed)
        assert [x["global_step"] for x in lb] == list(range(1, total + 1))
        assert la == lb
    except AssertionError as e:
        raise AssertionError(f"seed {SEED}, {story}: {e}") from None


@pytest.fixture(scope="module")
def seq2seq_straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("s2s") / "straight"
    proc = run_to_end(seq2seq_cmd(run))
    assert proc.returncode == 0, proc.stderr
    return run


def test_seq2seq_example_killed_anywhere_resumes_bit_identical(
    seq2seq_straight: Path, tmp_path: Path
) -> None:
    run = tmp_path / "killed"
    story = killed_and_resumed(seq2seq_cmd(run), run, total=24, save_step=10, kills=3)
    assert_same_run(seq2seq_straight, run, 24, story)
    tracker = read_checkpoint(run / "checkpoints" / "step-00000024").states["tracker"]["state"]
    # 2.5 optimizer steps per epoch: resumes crossed epoch boundaries
    assert tracker["epoch"] >= 2 and len(tracker["epoch_losses"]) == tracker["epoch"]
    assert tracker["best_loss"] == min(tracker["epoch_losses"])


def test_pretrain_example_under_torchrun_killed_anywhere_resumes_bit_identical(
    tmp_path: Path,
) -> None:
    straight = tmp_path / "straight"
    proc = run_to_end(pretrain_cmd(straight))
    assert proc.returncode == 0, proc.stderr[-5000:]
    run = tmp_path / "killed"
    story = killed_and_resumed(pretrain_cmd(run), run, total=16, save_step=9, kills=3)
    assert_same_run(straight, run, 16, story)
    states = read_checkpoint(run / "checkpoints" / "step-00000016").states
    # each rank saved its own data position and RNG streams (dropout masks differ by rank)
    assert states["data_rank1"]["state"]["_num_yielded"] == states["data"]["state"]["_num_yielded"]
    assert not torch.equal(states["rng"]["torch_cpu"], states["rng_rank1"]["torch_cpu"])
    assert states["config"]["config"]["data"]["block_size"] == 32  # resolved interpolation
