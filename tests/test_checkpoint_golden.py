"""The checked-in format-v1 checkpoint must stay readable, and the writer must reproduce it.

If this fails after an intended format change, bump FORMAT_VERSION, update
docs/checkpoint-format.md and regenerate with ``python tests/golden/make_golden.py``.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from evertrain.checkpoint import FORMAT_VERSION, read_checkpoint, verify_checkpoint

GOLDEN = Path(__file__).resolve().parent / "golden"
CKPT = GOLDEN / "step-00000003"


def test_golden_checkpoint_reads_back_exactly() -> None:
    assert verify_checkpoint(CKPT) == []
    c = read_checkpoint(CKPT)
    assert FORMAT_VERSION == 1 and c.manifest["format_version"] == 1 and c.global_step == 3
    assert c.summary == {"global_step": 3, "epoch": 0, "metrics": {"val_loss": 2.5},
                         "wall_time_s": 12.0, "versions": {"evertrain": "0.1.0"}}  # fmt: skip
    assert sorted(c.states) == ["model", "optimizer", "progress", "rng"]

    p = c.states["model"]["params"]
    assert c.states["model"]["version"] == 1 and list(p) == ["layers.0.weight", "layers.0.bias",
                                                              "scale"]  # fmt: skip
    w = p["layers.0.weight"]
    assert w.dtype == torch.float32 and w.tolist() == [[0.0, 0.25, 0.5], [0.75, 1.0, 1.25]]
    b = p["layers.0.bias"]
    assert b.dtype == torch.bfloat16 and b.view(torch.int16).tolist() == [16320, -16368, 16448]
    s = p["scale"]
    assert s.dtype == torch.float64 and s.shape == () and s.item() == 0.125

    o = c.states["optimizer"]
    assert o["param_groups"] == [{"lr": 0.001, "betas": [0.9, 0.999],
                                  "params": ["layers.0.weight"]}]  # fmt: skip
    step, exp_avg = o["state"]["0"]["step"], o["state"]["0"]["exp_avg"]
    assert step.dtype == torch.int64 and step.shape == () and step.item() == 7
    assert exp_avg.dtype == torch.float16 and exp_avg.tolist() == [[0.5, -1.0]]

    r = c.states["rng"]
    assert r["torch_cpu"].dtype == torch.uint8 and r["torch_cpu"].tolist() == list(range(16))
    assert r["mask"].dtype == torch.bool and r["mask"].tolist() == [True, False]
    assert r["python"] == [3, [1, 2, 3], None] and r["version"] == 1

    g = c.states["progress"]
    nan = g.pop("nan")
    assert isinstance(nan, float) and math.isnan(nan)
    assert g == {"version": 1, "global_step": 3, "epoch": 0, "done": False, "note": "héllo",
                 "best": math.inf, "big": 2**62}  # fmt: skip


def test_writer_reproduces_golden_bytes(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
    assert spec is not None and spec.loader is not None
    make_golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_golden)
    fresh = make_golden.write_golden(tmp_path)
    assert sorted(os.listdir(fresh)) == sorted(os.listdir(CKPT))
    for name in os.listdir(CKPT):
        assert (fresh / name).read_bytes() == (CKPT / name).read_bytes(), name


SHARDED = GOLDEN / "sharded" / "step-00000002"


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, GOLDEN / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_golden_sharded_checkpoint_merges_into_whole_tensors() -> None:
    """The sharded layout of docs/checkpoint-format.md: each rank's slices as per-rank
    owners, the layout in their JSON; merging gives the whole tensors back, exactly."""
    from evertrain.sharded import merge_sharded

    assert verify_checkpoint(SHARDED) == []
    states = read_checkpoint(SHARDED).states
    assert sorted(states) == ["model", "model_rank1", "optimizer", "optimizer_rank1"]
    assert states["model_rank1"]["shards"]["layout"]["weights/lin.weight"] == {
        "shape": [5, 3],
        "offset": [3, 0],
    }
    merge_sharded(states)
    w, b = states["model"]["weights"]["lin.weight"], states["model"]["weights"]["lin.bias"]
    assert "shards" not in states["model"]
    assert torch.equal(w, torch.arange(15, dtype=torch.float32).reshape(5, 3) / 8)
    assert b.dtype == torch.bfloat16 and b.tolist() == [1.0, -2.0, 3.0]
    exp_avg = states["optimizer"]["state"]["lin.weight"]["exp_avg"]
    assert exp_avg[:, 0].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # rows from rank 0, then 1
    assert states["optimizer"]["state"]["lin.weight"]["step"].item() == 4.0


def test_writer_reproduces_golden_sharded_bytes(tmp_path: Path) -> None:
    fresh = _load("make_golden_sharded").write_golden(tmp_path)
    assert sorted(os.listdir(fresh)) == sorted(os.listdir(SHARDED))
    for name in os.listdir(SHARDED):
        assert (fresh / name).read_bytes() == (SHARDED / name).read_bytes(), name


def test_merge_refuses_a_missing_or_mismatched_part() -> None:
    from evertrain.sharded import merge_sharded
    from evertrain.state import StateError

    states = read_checkpoint(SHARDED).states
    del states["model_rank1"]
    with pytest.raises(StateError, match="lacks the sharded parts"):
        merge_sharded(states)
    states = read_checkpoint(SHARDED).states
    states["model_rank1"]["shards"]["layout"]["weights/lin.weight"]["offset"] = [2, 0]
    states["model_rank1"]["weights"]["lin.weight"] = torch.zeros(1, 3)
    with pytest.raises(StateError, match="slices hold"):
        merge_sharded(states)
