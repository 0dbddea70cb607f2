"""Regenerate the golden sharded checkpoint ``tests/golden/sharded/step-00000002/``: the
format-v1 layout of an FSDP2 run on 2 ranks (docs/checkpoint-format.md, "Sharded
checkpoints"). Each rank's part of a sharded owner is an ordinary per-rank owner
(``model``, ``model_rank1``) whose JSON carries the ``shards`` layout. Run
``python tests/golden/make_golden_sharded.py`` only on an intended format change."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from evertrain.checkpoint import step_dir_name, write_checkpoint

GLOBAL_STEP = 2
HERE = Path(__file__).resolve().parent / "sharded"
# the whole tensors; rank 0 holds rows [0, 2) of w and [0, 2) of b, rank 1 the rest
W = torch.arange(15, dtype=torch.float32).reshape(5, 3) / 8
B = torch.tensor([1.0, -2.0, 3.0], dtype=torch.bfloat16)
STEP = torch.tensor(4.0)


def part(rank: int) -> dict[str, dict[str, Any]]:
    rows = slice(0, 3) if rank == 0 else slice(3, 5)
    brow = slice(0, 2) if rank == 0 else slice(2, 3)
    model = {
        "version": 1,
        "weights": {"lin.weight": W[rows].clone(), "lin.bias": B[brow].clone()},
        "shards": {
            "world_size": 2,
            "rank": rank,
            "layout": {
                "weights/lin.weight": {"shape": [5, 3], "offset": [rows.start, 0]},
                "weights/lin.bias": {"shape": [3], "offset": [brow.start]},
            },
        },
    }
    optimizer = {
        "version": 1,
        "class": "AdamW",
        "param_groups": [{"lr": 0.01, "betas": [0.9, 0.999], "params": ["lin.weight"]}],
        "state": {"lin.weight": {"step": STEP.clone(), "exp_avg": (W[rows] * 0 + rank).clone()}},
        "shards": {
            "world_size": 2,
            "rank": rank,
            "layout": {"state/lin.weight/exp_avg": {"shape": [5, 3], "offset": [rows.start, 0]}},
        },
    }
    return {"model": model, "optimizer": optimizer}


def build_states() -> dict[str, dict[str, Any]]:
    r0, r1 = part(0), part(1)
    return {
        "model": r0["model"],
        "model_rank1": r1["model"],
        "optimizer": r0["optimizer"],
        "optimizer_rank1": r1["optimizer"],
    }


def build_summary() -> dict[str, Any]:
    return {
        "global_step": GLOBAL_STEP,
        "ranks": {"world_size": 2, "per_rank_owners": ["model", "optimizer"]},
    }


def write_golden(root: Path) -> Path:
    return write_checkpoint(
        root / step_dir_name(GLOBAL_STEP), build_states(), build_summary(), global_step=GLOBAL_STEP
    )


if __name__ == "__main__":
    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir(parents=True)
    print(write_golden(HERE))
