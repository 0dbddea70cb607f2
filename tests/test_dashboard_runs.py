"""The dashboard over `evertrain train` runs (no status.json): derived status, the stored
config panel's API, and comparing runs. One real tiny-model `evertrain train` run of a few
steps is shared by the module; the other runs are synthetic metrics.jsonl files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from conftest import cli_env, evertrain, write_config
from evertrain.dashboard.app import create_app
from evertrain.dashboard.auth import load_or_create_token
from evertrain.runlock import LOCK_NAME

STEPS = 6


def client(run: Path, compare: list[Path] | None = None) -> TestClient:
    token, _ = load_or_create_token(run)
    app = create_app(
        run, token=token, loopback=True, port=8765, max_upload_bytes=1 << 20, compare=compare
    )
    return TestClient(app, base_url="http://127.0.0.1:8765")


def train_records(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


@pytest.fixture(scope="module")
def train_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`evertrain train` on the tiny model for STEPS steps, a checkpoint every 4."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = write_config(
        tmp,
        train={"max_steps": STEPS, "eval_every_steps": 4},
        checkpoint={"every_steps": 4, "keep_last": 3},
    )
    run = tmp / "run"
    evertrain("train", str(cfg), "--run-dir", str(run))
    return run


def synthetic_run(root: Path, steps: int, scale: float) -> Path:
    root.mkdir(parents=True)
    with open(root / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            rec = {"kind": "train", "global_step": s, "loss": scale / s, "lr": 1e-3}
            f.write(json.dumps(rec) + "\n")
    return root


def test_status_of_a_train_run_is_derived_from_metrics_checkpoints_and_lock(
    train_run: Path,
) -> None:
    last = train_records(train_run)[-1]
    assert last["global_step"] == STEPS
    steps = sorted(int(p.name[5:]) for p in (train_run / "checkpoints").glob("step-*"))
    assert steps and steps[-1] == STEPS
    # an unfinished save and a step dir without manifest are not committed checkpoints
    (train_run / "checkpoints" / f"step-{STEPS + 10:08d}.tmp").mkdir()
    (train_run / "checkpoints" / f"step-{STEPS + 20:08d}").mkdir()
    try:
        d = client(train_run).get("/api/status").json()
    finally:
        (train_run / "checkpoints" / f"step-{STEPS + 10:08d}.tmp").rmdir()
        (train_run / "checkpoints" / f"step-{STEPS + 20:08d}").rmdir()
    assert d["status"] is None and d["stale"] is False  # no status.json: nothing is stale
    s = d["derived"]
    assert s["derived"] is True and s["state"] == "stopped" and d["daemon_running"] is False
    assert s["kind"] == "train"
    assert s["global_step"] == STEPS
    assert s["loss_last"] == pytest.approx(last["loss"])
    assert s["lr"] == pytest.approx(last["lr"])
    assert s["grad_norm"] == pytest.approx(last["grad_norm"])
    assert s["loss"] is not None  # smoothed
    assert s["last_checkpoint"]["global_step"] == STEPS
    assert s["last_checkpoint"]["path"].endswith(f"step-{STEPS:08d}")
    assert s["updated"] == pytest.approx((train_run / "metrics.jsonl").stat().st_mtime)


def test_train_run_held_by_a_live_process_shows_as_training(train_run: Path) -> None:
    code = (
        "import sys, time\nfrom evertrain.runlock import RunLock\n"
        "RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(train_run / LOCK_NAME)],
        stdout=subprocess.PIPE,
        env=cli_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        d = client(train_run).get("/api/status").json()
        assert d["derived"]["state"] == "training" and d["daemon_running"] is True
        assert d["derived"]["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    d = client(train_run).get("/api/status").json()
    assert d["derived"]["state"] == "stopped" and d["daemon_running"] is False


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_lock_file_naming_a_live_pid_without_the_lock_is_not_running(train_run: Path) -> None:
    # the lock file keeps the last holder's record; its pid may since belong to another
    # process (here: this one, certainly alive), yet nobody holds the lock
    lock = train_run / LOCK_NAME
    before = lock.read_bytes() if lock.exists() else None
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": 1}))
    try:
        d = client(train_run).get("/api/status").json()
        assert d["derived"]["state"] == "stopped" and d["derived"]["lock"] == "proc-locks"
    finally:
        if before is not None:
            lock.write_bytes(before)


def test_config_endpoint_returns_the_newest_checkpoints_stored_config(
    train_run: Path, tmp_path: Path
) -> None:
    d = client(train_run).get("/api/config").json()
    assert d["checkpoint"] == f"step-{STEPS:08d}" and d["global_step"] == STEPS
    assert d["problem"] is None
    cfg = d["config"]
    assert cfg["model"]["source"] == "tiny"
    assert cfg["train"]["max_steps"] == STEPS and cfg["checkpoint"]["every_steps"] == 4

    # a damaged config.json is reported (by its hash), never served
    copy = tmp_path / "copy"
    shutil.copytree(train_run, copy, ignore=shutil.ignore_patterns("ui-token", LOCK_NAME))
    f = copy / "checkpoints" / f"step-{STEPS:08d}" / "config.json"
    raw = bytearray(f.read_bytes())
    raw[raw.index(b"tiny")] = ord("T")
    f.write_bytes(bytes(raw))
    d = client(copy).get("/api/config").json()
    assert d["config"] is None and "config.json" in d["problem"]

    empty = tmp_path / "empty"
    empty.mkdir()
    d = client(empty).get("/api/config").json()
    assert d == {"checkpoint": None, "global_step": None, "config": None, "problem": None}


def test_compare_a_directory_of_runs_and_compare_option(train_run: Path, tmp_path: Path) -> None:
    parent = tmp_path / "runs"
    a = synthetic_run(parent / "a", 5000, 3.0)
    b = synthetic_run(parent / "b", 40, 2.0)
    (parent / "notes").mkdir()  # not a run: skipped
    d = client(parent).get("/api/compare?max_points=500").json()
    assert [r["name"] for r in d["runs"]] == ["a", "b"]
    ra, rb = d["runs"]
    assert ra["count"] == 5000 and len(ra["global_step"]) <= 501 and ra["stride"] == 10
    assert ra["global_step"][-1] == 5000 and ra["loss"][-1] == pytest.approx(3.0 / 5000)
    assert rb["global_step"] == list(range(1, 41)) and rb["loss"][0] == pytest.approx(2.0)
    assert ra["path"] == str(a) and rb["path"] == str(b)

    # the dashboard's own run first, then --compare (a parent expands to its runs)
    d = client(train_run, compare=[parent]).get("/api/compare").json()
    assert [r["name"] for r in d["runs"]] == ["run", "a", "b"]
    assert d["runs"][0]["last_step"] == STEPS and d["runs"][1]["count"] == 5000
    assert len(d["runs"][1]["global_step"]) <= 2001  # default thinning

    # same directory names in different places: named with their parents
    other = synthetic_run(tmp_path / "elsewhere" / "a", 3, 1.0)
    d = client(a, compare=[other]).get("/api/compare").json()
    assert [r["name"] for r in d["runs"]] == ["runs/a", "elsewhere/a"]

    assert client(train_run).get("/api/compare").json() == {"runs": []}  # nothing to compare
    assert client(parent).get("/api/compare?max_points=x").status_code == 400


def test_cli_ui_accepts_compare(train_run: Path, tmp_path: Path) -> None:
    proc = evertrain("ui", str(train_run), "--compare", str(tmp_path / "missing"), check=False)
    assert (
        proc.returncode == 2 and "--compare" in proc.stderr and "no such directory" in (proc.stderr)
    )
