"""Every example once per epoch, and one token-weighted loss per optimizer step.

- Row counts that divide by nothing (primes) against micro-batch x accumulation x world size:
  the example ids logged per step (``EVERTRAIN_LOG_EXAMPLE_IDS``) cover every training row
  exactly once per epoch, on one process and on two (where a rank's share of an epoch's last
  micro-batch can be empty: it takes part with padding only).
- The gradient of a step with accumulation 4 over rows of very different lengths equals the
  gradient of the same rows as one batch (fp32, SGD with lr 1 and no clipping, so the weight
  change is the gradient), on one process and split over two ranks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import cli_env, write_config
from evertrain.checkpoint import read_checkpoint

TIMEOUT = 300


def varied_lengths(path: Path, n: int) -> Path:
    """Prompt/completion records whose completions range from 1 to ~60 characters."""
    recs = [
        {"prompt": f"Q{i}:", "completion": " " + ("abcdefghij" * 6)[: 1 + (i * 37) % 60]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def config(tmp: Path, n_records: int, **train: Any) -> Path:
    data = varied_lengths(tmp / "data.jsonl", n_records)
    return write_config(
        tmp,
        data,
        model={"source": "tiny", "dropout": 0.0, "num_threads": 1},
        data={"files": [str(data)], "seq_len": 80, "packing": False, "val_fraction": 0.0},
        train={
            "optimizer": "sgd",
            "lr": 1.0,
            "max_grad_norm": None,
            "schedule": {"name": "constant", "warmup_steps": 0},
            "eval_every_steps": None,
            "max_steps": None,  # the epochs decide
            **train,
        },
        checkpoint={"every_steps": 100, "keep_last": 1},
    )


def train(nproc: int, cfg: Path, run: Path) -> None:
    args = ["train", str(cfg), "--run-dir", str(run)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "evertrain", *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "-m", "evertrain", *args,
        ]  # fmt: skip
    env = cli_env(EVERTRAIN_LOG_EXAMPLE_IDS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-5000:]


def steps_ids(run: Path) -> list[list[int]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["ids"] for x in lines if x["kind"] == "example_ids"]


def final(run: Path) -> dict[str, Any]:
    last = max((run / "checkpoints").glob("step-*"))
    return read_checkpoint(last).states


@pytest.mark.parametrize(
    ("nproc", "mbs", "accum"),
    [(1, 2, 3), (2, 2, 1), (2, 3, 2)],  # global batches of 6, 4 and 12 over 13 rows
)
def test_every_row_is_trained_once_per_epoch(
    tmp_path: Path, nproc: int, mbs: int, accum: int
) -> None:
    rows, epochs = 13, 2
    cfg = config(tmp_path, rows, micro_batch_size=mbs, grad_accum_steps=accum, epochs=epochs)
    train(nproc, cfg, tmp_path / "run")
    g = mbs * accum * nproc
    per_epoch = -(-rows // g)
    ids = steps_ids(tmp_path / "run")
    assert len(ids) == epochs * per_epoch
    for e in range(epochs):
        epoch = [i for step in ids[e * per_epoch : (e + 1) * per_epoch] for i in step]
        assert sorted(epoch) == list(range(rows)), (e, ids)
    assert [len(s) for s in ids[:per_epoch]] == [g] * (rows // g) + [rows % g]
    states = final(tmp_path / "run")
    assert states["progress"]["examples_seen"] == rows * epochs
    assert states["data_cursor"]["examples_seen"] == rows * epochs


def weights(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in final(run)["model"].items() if isinstance(v, torch.Tensor)}


def test_accumulated_step_has_the_gradient_of_one_batch(tmp_path: Path) -> None:
    """SGD, lr 1, no clipping, no dropout: after one step the weights are init - gradient.
    Accumulation 4 of 1-row micro-batches and 1 micro-batch of 4 rows train the same 4
    rows (the data order is a function of the global batch only)."""
    runs = {}
    for name, (nproc, mbs, accum) in {
        "one_batch": (1, 4, 1),
        "accum_4": (1, 1, 4),
        "two_ranks": (2, 1, 2),
    }.items():
        d = tmp_path / name
        d.mkdir()
        cfg = config(d, 8, micro_batch_size=mbs, grad_accum_steps=accum, max_steps=1)
        train(nproc, cfg, d / "run")
        runs[name] = weights(d / "run")
    lengths = [len(x) for x in steps_ids(tmp_path / "one_batch" / "run")]
    assert lengths == [4]
    ref = runs["one_batch"]
    for name in ("accum_4", "two_ranks"):
        for k, v in runs[name].items():
            torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")
    # the rows' target counts differ a lot, so a mean of micro-batch means would differ
    data = [json.loads(x) for x in (tmp_path / "one_batch" / "data.jsonl").read_text().splitlines()]
    assert len({len(r["completion"]) for r in data}) > 4
    # the logged loss is the step's token-weighted mean too, however the rows were split
    logged = {name: train_losses(tmp_path / name / "run") for name in runs}
    assert len(logged["one_batch"]) == 1
    for name in ("accum_4", "two_ranks"):
        assert logged[name][0] == pytest.approx(logged["one_batch"][0], rel=0, abs=1e-6), name


def train_losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["kind"] == "train"]
