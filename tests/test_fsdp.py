"""FSDP2 (``fully_shard``) under torchrun on CPU (gloo) through the library: each rank saves
its own shards (safetensors + JSON layout, no pickle); a run killed with SIGKILL resumes
bit-exactly on the same world size; on another world size (2 -> 1, 2 -> 3, 1 -> 2) model
and optimizer are resharded exactly (the gathered moments equal the saved ones) and the
losses follow the uninterrupted run's within float reduction-order noise; DDP and FSDP2
resume each other's checkpoints. The loop is ``examples/own_loop/fsdp.py``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_identical, cli_env, train_losses
from evertrain.checkpoint import read_checkpoint, verify_checkpoint
from evertrain.sharded import merge_sharded

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own_loop" / "fsdp.py"
STEPS, SAVE_EVERY = 6, 3
# the loss of a step on another world size: the same rows, summed in another order
LOSS_RTOL = 1e-5


def launch(
    nproc: int, run: Path, *more: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), "--max-restarts", "0", str(EXAMPLE)]
    cmd += ["--run-dir", str(run), "--save-every", str(SAVE_EVERY), *more]
    proc = subprocess.run(
        cmd, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stderr[-6000:]}")
    return proc


def record(out: Path) -> dict[str, Any]:
    rec: dict[str, Any] = json.loads(out.read_text())
    rec["weights"] = load_file(f"{out}.weights.safetensors")
    moments = Path(f"{out}.moments.safetensors")
    rec["moments"] = load_file(moments) if moments.exists() else None
    return rec


def saved_moments(checkpoint: Path) -> dict[str, torch.Tensor]:
    states = read_checkpoint(checkpoint).states
    merge_sharded(states)
    return {
        f"{name}/{key}": v
        for name, s in states["optimizer"]["state"].items()
        for key, v in s.items()
        if isinstance(v, torch.Tensor)
    }


def assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b) and a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The run that never stopped, on 1 and on 2 processes."""
    tmp = tmp_path_factory.mktemp("fsdp-ref")
    out = {}
    for n in (1, 2):
        launch(n, tmp / f"run{n}", "--steps", str(STEPS), "--out", str(tmp / f"ref{n}.json"))
        out[n] = record(tmp / f"ref{n}.json")
        out[n]["run"] = tmp / f"run{n}"
    return out


def test_sharded_checkpoint_is_per_rank_safetensors_and_json(
    uninterrupted: dict[int, dict[str, Any]],
) -> None:
    ckpt = uninterrupted[2]["run"] / "checkpoints" / f"step-{SAVE_EVERY:08d}"
    assert verify_checkpoint(ckpt) == []
    names = {p.name for p in ckpt.iterdir()}
    for owner in ("model", "optimizer"):
        assert {f"{owner}.safetensors", f"{owner}_rank1.safetensors"} <= names
    assert {p.suffix for p in ckpt.iterdir()} == {".json", ".safetensors"}
    part = json.loads((ckpt / "model_rank1.json").read_text())
    assert part["shards"]["world_size"] == 2 and part["shards"]["rank"] == 1
    # inp.weight is [37, 24]: rank 1 holds rows 19..36 (torch.chunk's split)
    assert part["shards"]["layout"]["weights/inp.weight"] == {"shape": [37, 24], "offset": [19, 0]}
    states = read_checkpoint(ckpt).states
    assert list(states["model_rank1"]["weights"]["inp.weight"].shape) == [18, 24]


@pytest.mark.parametrize("saves", ["sync", "async"])
def test_kill_9_then_resume_on_the_same_world_size_is_bit_exact(
    tmp_path: Path, uninterrupted: dict[int, dict[str, Any]], saves: str
) -> None:
    ref = uninterrupted[2]  # saved synchronously: async saves change nothing trained
    run, out = tmp_path / "run", tmp_path / "b.json"
    more = ["--async-save"] if saves == "async" else []
    proc = launch(2, run, "--steps", str(STEPS), "--kill-at", "5", *more, check=False)
    assert proc.returncode != 0  # every rank SIGKILLed after step 5, before its save
    assert verify_checkpoint(run / "checkpoints" / f"step-{SAVE_EVERY:08d}") == []
    launch(2, run, "--steps", str(STEPS), "--out", str(out), *more)
    got = record(out)
    assert got["resumed_at"] == SAVE_EVERY
    assert_equal_tensors(got["weights"], ref["weights"])
    assert {k: got["losses"][k] for k in got["losses"]} == {
        k: ref["losses"][k] for k in got["losses"]
    }


@pytest.mark.parametrize(("before", "after"), [(2, 1), (2, 3), (1, 2)])
def test_resume_on_another_world_size_reshards_exactly(
    tmp_path: Path, uninterrupted: dict[int, dict[str, Any]], before: int, after: int
) -> None:
    ref = uninterrupted[before]
    run, out = tmp_path / "run", tmp_path / "b.json"
    shutil.copytree(ref["run"], run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:08d}")  # back to step 3
    launch(after, run, "--steps", str(STEPS), "--out", str(out))
    got = record(out)
    assert got["resumed_at"] == SAVE_EVERY
    # the optimizer moments after the reshard, gathered, are the saved ones, bit for bit
    saved = saved_moments(ref["run"] / "checkpoints" / f"step-{SAVE_EVERY:08d}")
    assert_equal_tensors(got["moments"], saved)
    # the same global rows at each step; the loss curve within reduction-order noise
    for step in range(SAVE_EVERY + 1, STEPS + 1):
        assert got["rows"][str(step)] == ref["rows"][str(step)]
        assert got["losses"][str(step)] == pytest.approx(ref["losses"][str(step)], rel=LOSS_RTOL)
    for k, w in got["weights"].items():
        torch.testing.assert_close(w, ref["weights"][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("first", "then"), [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_ddp_and_fsdp_resume_each_others_checkpoints(tmp_path: Path, first: str, then: str) -> None:
    run = tmp_path / "run"
    launch(2, run, "--mode", first, "--steps", str(SAVE_EVERY))
    out = tmp_path / "b.json"
    launch(2, run, "--mode", then, "--steps", str(STEPS), "--out", str(out))
    got = record(out)
    assert got["resumed_at"] == SAVE_EVERY
    assert_equal_tensors(got["moments"], saved_moments(run / "checkpoints" / "step-00000003"))


# ---------------------------------------------------------------- the CLI: train.parallel


def fsdp_config(tmp: Path) -> Path:
    import yaml

    from test_distributed import dist_config

    path = dist_config(tmp)
    raw = yaml.safe_load(path.read_text())
    raw["train"]["parallel"] = "fsdp"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def cli_straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, run dir) of an uninterrupted 2-process FSDP2 `evertrain train`."""
    from test_distributed import straight_run

    return straight_run(tmp_path_factory, "fsdp-cli", fsdp_config)


def test_cli_fsdp_saves_shards_and_partitions_the_global_batch(
    cli_straight: tuple[Path, Path],
) -> None:
    from test_distributed import N, example_ids, step_sizes

    _, run = cli_straight
    ckpt = run / "checkpoints" / f"step-{N:08d}"
    assert verify_checkpoint(ckpt) == []
    summary = read_checkpoint(ckpt).summary
    assert set(summary["ranks"]["per_rank_owners"]) == {"rng", "model", "optimizer"}
    part = json.loads((ckpt / "model_rank1.json").read_text())
    assert part["shards"]["world_size"] == 2 and part["shards"]["layout"]
    ids = example_ids(run)
    rows = read_checkpoint(ckpt).states["data_cursor"]["num_examples"]
    assert [len(ids[s]) for s in sorted(ids)] == step_sizes(rows, 8, N)


def test_cli_fsdp_killed_anywhere_resumes_bit_identical(
    cli_straight: tuple[Path, Path], tmp_path: Path
) -> None:
    """Killed while checkpoint 6 is half written, then SIGKILLed from outside after step 7
    or later: the resumed FSDP2 run is bit-identical to the uninterrupted one."""
    from test_distributed import assert_same_run, signal_group_after_step, torchrun_cmd, train

    config, ref = cli_straight
    run = tmp_path / "run"
    proc = train(2, config, run, check=False, EVERTRAIN_FAULT="save@6")
    assert proc.returncode != 0 and not (run / "checkpoints" / "step-00000006").exists()
    cmd = torchrun_cmd(2, ["train", str(config), "--run-dir", str(run)])
    signal_group_after_step(cmd, run, 8, "kill")
    train(2, config, run)
    assert_same_run(run, ref)


def test_cli_fsdp_async_saves_killed_mid_write_resume_bit_identical(
    cli_straight: tuple[Path, Path], tmp_path: Path
) -> None:
    """``checkpoint.async`` under FSDP2 on 2 processes: every rank writes its shards in the
    background. Killed while the background write of checkpoint 6 is half done, then
    SIGKILLed from outside after step 8: the run is bit-identical to the uninterrupted
    synchronous one, and every checkpoint it left was written asynchronously."""
    import yaml

    from test_distributed import (
        example_ids,
        final_states,
        signal_group_after_step,
        torchrun_cmd,
        train,
    )

    config, ref = cli_straight
    raw = yaml.safe_load(config.read_text())
    raw["checkpoint"]["async"] = True
    config = tmp_path / "async.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    proc = train(2, config, run, check=False, EVERTRAIN_FAULT="save@6")
    assert proc.returncode != 0 and not (run / "checkpoints" / "step-00000006").exists()
    assert (run / "checkpoints" / "step-00000006.tmp").is_dir()  # the write was under way
    cmd = torchrun_cmd(2, ["train", str(config), "--run-dir", str(run)])
    signal_group_after_step(cmd, run, 8, "kill")
    train(2, config, run)
    assert train_losses(run) == train_losses(ref)
    assert example_ids(run) == example_ids(ref)
    mine, theirs = final_states(run), final_states(ref)
    assert mine.pop("config")["config"]["checkpoint"]["async"] is True
    theirs.pop("config")
    assert_identical(mine, theirs)
    saves = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"kind": "checkpoint"' in line
    ]
    assert saves and {s["mode"] for s in saves} == {"async"}


def test_cli_fsdp_to_one_process_to_ddp_keeps_the_global_sequence(
    cli_straight: tuple[Path, Path], tmp_path: Path
) -> None:
    """FSDP2 on 2 processes -> 1 process (unsharded, accumulation 2 -> 4) -> DDP on 2: the
    global example ids of every step are the uninterrupted run's; losses agree closely."""
    from conftest import train_losses
    from test_distributed import example_ids, train

    config, ref = cli_straight
    run = tmp_path / "run"
    train(2, config, run, "--max-steps", "4")
    one = train(1, config, run, "--max-steps", "8")
    assert "grad_accum_steps 2 -> 4" in one.stderr
    train(2, config, run, "--set", "train.parallel=ddp")
    assert example_ids(run) == example_ids(ref)
    mine, theirs = train_losses(run), train_losses(ref)
    assert all(abs(mine[s] - theirs[s]) < 1e-2 for s in theirs), (mine, theirs)


def test_cli_export_of_a_sharded_checkpoint_reads_no_optimizer(
    cli_straight: tuple[Path, Path], tmp_path: Path
) -> None:
    """`evertrain export` of an FSDP2 checkpoint writes the whole model as a Hugging Face
    directory; the optimizer's files are not read (damaged here, the export still works)."""
    from transformers import AutoModelForCausalLM

    from conftest import evertrain
    from test_distributed import N

    _, ref = cli_straight
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    ckpt = run / "checkpoints" / f"step-{N:08d}"
    (ckpt / "optimizer_rank1.safetensors").write_bytes(b"not a safetensors file")
    evertrain("export", str(run), "--out", str(tmp_path / "out"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    states = read_checkpoint(ref / "checkpoints" / f"step-{N:08d}").states
    merge_sharded(states)
    weights = {k: v for k, v in states["model"].items() if isinstance(v, torch.Tensor)}
    assert weights and all(torch.equal(exported[k], w) for k, w in weights.items())


def test_cli_fsdp_lora_adapter_is_sharded_and_exports_whole(tmp_path: Path) -> None:
    import yaml

    from conftest import evertrain
    from test_distributed import train

    config = fsdp_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["lora"] = {"r": 4, "alpha": 8.0}
    config.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    train(2, config, run, "--max-steps", "4")
    ckpt = run / "checkpoints" / "step-00000004"
    assert (ckpt / "adapter_model_rank1.safetensors").exists()
    evertrain("export", str(run), "--out", str(tmp_path / "out"))
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    states = read_checkpoint(ckpt).states
    merge_sharded(states)
    saved = {k: v for k, v in states["adapter_model"].items() if isinstance(v, torch.Tensor)}
    assert saved and set(adapter) == set(saved)
    assert all(torch.equal(adapter[k], saved[k]) for k in saved)


# ---------------------------------------------------------------- two "nodes" on localhost


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_nodes_one_killed_then_one_node_resumes_the_sequence(
    cli_straight: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two torchrun agents on localhost (``--nnodes 2``, c10d rendezvous, one FSDP2 process
    each) train one run; one "node" is SIGKILLed with its worker mid-run; the job comes
    back on one node (``--nnodes 1``): it resumes from the last committed checkpoint and
    the global sequence of examples is the uninterrupted run's."""
    import os
    import signal
    import time

    from conftest import train_losses
    from test_distributed import env, example_ids, train_losses_so_far, worker_pids

    config, ref = cli_straight
    run = tmp_path / "run"
    port = _free_port()

    def agent(nnodes: int) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes)]
        cmd += ["--nproc-per-node", "1", "--rdzv-backend", "c10d", "--max-restarts", "0"]
        cmd += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"job{nnodes}"]
        cmd += ["-m", "evertrain", "train", str(config), "--run-dir", str(run)]
        return subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    first, second = agent(2), agent(2)
    try:
        deadline = time.monotonic() + 240
        while max(train_losses_so_far(run), default=0) < 5:
            assert time.monotonic() < deadline and first.poll() is None, "no progress"
            time.sleep(0.01)
        for pid in [*worker_pids(second.pid), second.pid]:  # the whole "node"
            os.kill(pid, signal.SIGKILL)
        second.wait()
        assert first.wait(timeout=240) != 0  # its peer is gone: the group is down
    finally:
        for p in (first, second):
            if p.poll() is None:
                for pid in [*worker_pids(p.pid), p.pid]:
                    os.kill(pid, signal.SIGKILL)
            p.wait()
    done = max(int(d.name[5:]) for d in (run / "checkpoints").glob("step-*[0-9]"))
    assert 4 <= done < 12
    one = agent(1)
    _, err = one.communicate(timeout=600)
    assert one.returncode == 0, err[-4000:]
    assert b"grad_accum_steps 2 -> 4" in err
    assert example_ids(run) == example_ids(ref)
    mine, theirs = train_losses(run), train_losses(ref)
    assert all(abs(mine[s] - theirs[s]) < 1e-2 for s in theirs), (mine, theirs)
