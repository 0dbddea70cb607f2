"""Shared helpers: small configs for the tiny model, running the CLI in a subprocess, and
comparing saved states exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "examples" / "data" / "tiny.jsonl"


def small_data(path: Path, n_records: int = 40) -> Path:
    """The first ``n_records`` lines of the bundled tiny data: a few epochs in seconds."""
    lines = TINY_DATA.read_text(encoding="utf-8").splitlines()[:n_records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_config(tmp: Path, data_file: Path | None = None, **sections: Any) -> Path:
    """A tiny-model config (dropout, grad accumulation, multi-epoch) with overrides merged
    section by section, written to ``tmp/config.yaml``."""
    cfg: dict[str, Any] = {
        "seed": 1234,
        "model": {"source": "tiny", "dropout": 0.1, "num_threads": 1},
        "data": {
            "files": [str(data_file or small_data(tmp / "train.jsonl"))],
            "seq_len": 64,
            "val_fraction": 0.1,
        },
        "train": {
            "micro_batch_size": 4,
            "grad_accum_steps": 2,
            "epochs": 1,
            "max_steps": 40,
            "lr": 3e-3,
            "schedule": {"name": "cosine", "warmup_steps": 4},
            "eval_every_steps": 10,
        },
        "checkpoint": {"every_steps": 5, "keep_last": 3},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVERTRAIN_FAULT")}
    env.update({"PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def evertrain(
    *args: str, fault: str | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m evertrain ARGS`` in a fresh process (optionally with a SIGKILL fault)."""
    env = cli_env(**({"EVERTRAIN_FAULT": fault} if fault else {}))
    proc = subprocess.run(
        [sys.executable, "-m", "evertrain", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"evertrain {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def train_losses(run: Path) -> dict[int, float]:
    """global_step -> logged training loss, asserting each step is logged exactly once."""
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            assert rec["global_step"] not in out, f"step {rec['global_step']} logged twice"
            out[rec["global_step"]] = rec["loss"]
    return out


def assert_identical(a: Any, b: Any, path: str = "") -> None:
    """Every tensor torch.equal (dtype and shape too), every other leaf ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"tensor differs at {path}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}: {set(a) ^ set(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def resumed_trainer(cfg: Any, run_dir: Path, *, fresh: bool = False, **kw: Any) -> Any:
    """``evertrain train``'s trainer for ``cfg`` in ``run_dir``: built, then resumed (or
    started fresh), as the CLI does."""
    from evertrain.recipe import build_trainer

    trainer = build_trainer(cfg, run_dir, fresh=fresh, **kw)
    if fresh:
        trainer.start_fresh()
    else:
        trainer.resume()
    return trainer
