"""scripts/gpu-check.sh: skips cleanly without CUDA, and its device-free checks pass when
dry-run on the CPU (so the script itself is known to work before a GPU runs it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from conftest import cli_env

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the real checks")
def test_without_cuda_every_check_is_skipped() -> None:
    p = subprocess.run(["bash", str(SCRIPT)], env=cli_env(), capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("SKIP all: no CUDA device"), p.stderr


@pytest.mark.slow
def test_cpu_dry_run_passes() -> None:
    p = subprocess.run(
        ["bash", str(SCRIPT), "--cpu"], env=cli_env(), capture_output=True, text=True, timeout=900
    )
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert not [x for x in lines if x.startswith("FAIL")]
    assert sum(x.startswith("PASS") for x in lines) >= 4, lines
