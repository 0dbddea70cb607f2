"""The checked-in format-v1 checkpoint must stay readable, and the writer must reproduce it.

If this fails after an intended format change, bump FORMAT_VERSION, update
docs/checkpoint-format.md and regenerate with ``python tests/golden/make_golden.py``.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

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
