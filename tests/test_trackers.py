"""Experiment trackers (issue 13, item 3): ``report_to: [tensorboard, mlflow, wandb]`` logs
the scalars of ``metrics.jsonl`` under global_step, and a run killed with SIGKILL and
resumed logs every step exactly once: read back with TensorBoard's EventAccumulator,
MLflow's client and W&B's offline run files."""

from __future__ import annotations

import json
import logging
import signal
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import evertrain, train_losses, write_config
from evertrain.metrics import MetricsLog
from evertrain.trackers import TrackerError, make_trackers, scalars

STEPS = 12  # checkpoints every 5 steps; killed inside step 8: steps 6 and 7 are replayed

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("trackers")
    config = write_config(
        tmp,
        train={"max_steps": STEPS, "eval_every_steps": 4},
        report_to=["tensorboard", "mlflow", "wandb"],
        tracking={"project": "evertrain-test"},
    )
    run = tmp / "run"
    args = ["train", str(config), "--run-dir", str(run)]
    proc = evertrain(*args, fault="micro@8:0", check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert max(train_losses(run)) == 7
    evertrain(*args)
    return run


def test_scalars_of_a_record() -> None:
    rec = {"kind": "train", "global_step": 3, "loss": 2.5, "lr": 1e-3, "tokens": 100,
           "seconds": 0.5, "epoch": 0, "skipped": False}  # fmt: skip
    assert scalars(rec) == (
        3,
        {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens": 100.0, "train/seconds": 0.5,
         "train/tokens_per_s": 200.0},
    )  # fmt: skip
    per_file = {"kind": "eval", "global_step": 9, "val_loss": 1.5, "file_id": 2}
    assert scalars(per_file) == (9, {"eval/file_2/val_loss": 1.5})
    assert scalars({"kind": "example_ids", "global_step": 1, "ids": [1, 2]}) is None
    assert scalars({"kind": "train", "global_step": 1, "loss": float("nan")}) is None


def test_tensorboard_has_each_step_once_after_a_kill(killed_and_resumed: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = killed_and_resumed
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    steps = [e.step for e in events]
    assert steps == list(range(1, STEPS + 1))  # purge_step dropped the killed run's 6, 7
    want = train_losses(run)
    assert [e.value for e in events] == [float(np.float32(want[s])) for s in steps]
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [4, 8, 12]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(acc.Tags()["scalars"])


def test_mlflow_continues_one_run_without_repeats(killed_and_resumed: Path) -> None:
    from mlflow.tracking import MlflowClient

    run = killed_and_resumed
    state = json.loads((run / "trackers" / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    (exp,) = [e for e in client.search_experiments() if e.name == "evertrain-test"]
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [state["run_id"]]  # the resume continued it
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["train.lr"] == "0.003"
    history = client.get_metric_history(state["run_id"], "train/loss")
    want = train_losses(run)
    assert [(m.step, m.value) for m in history] == sorted(want.items())


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B ``.wandb`` file: W&B's LevelDB-style log (a 7-byte header
    ``:W&B``, magic 0xBEE1, version 0; then 32 KiB blocks of chunks: CRC32C (4), length (2),
    type (1: full, 2: first, 3: middle, 4: last), data), as W&B's own reader used to parse
    it (``wandb/sdk/internal/datastore.py`` before the Go core)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B" and data[4:6] == b"\xe1\xbe", data[:7]
    block, pos, out, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        parts += chunk
        if kind in (1, 4):
            out.append(parts)
            parts = b""
    return out


def _wandb_steps(files: list[Path]) -> list[tuple[int, float]]:
    """(step, train/loss) of every history row in ``files``, in file order."""
    from wandb.proto import wandb_internal_pb2 as pb

    logged: list[tuple[int, float]] = []
    for f in files:
        for raw in _wandb_records(f):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") != "history":
                continue
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in rec.history.item}  # fmt: skip
            if "train/loss" in items:
                logged.append((int(items["_step"]), float(items["train/loss"])))
    return logged


def test_wandb_offline_run_is_resumed_without_repeats(killed_and_resumed: Path) -> None:
    run = killed_and_resumed
    state = json.loads((run / "trackers" / "wandb.json").read_text())
    files = sorted((run / "trackers" / "wandb").glob(f"offline-run-*-{state['run_id']}*/*.wandb"))
    assert len(files) == 2  # the killed session and the resumed one, one run id
    logged = _wandb_steps(files)
    # the killed session's rows died with W&B's service process (SIGKILL): the resumed
    # session found none in its file and logged every step from metrics.jsonl, once
    assert logged == sorted(train_losses(run).items())


def test_a_missing_tracker_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(TrackerError, match=r"pip install 'evertrain\[wandb\]'"):
        make_trackers(["tensorboard", "wandb"])


def test_cli_refuses_an_unknown_tracker_in_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, report_to=["tensorbord"])
    proc = evertrain("train", str(config), "--run-dir", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2
    assert "report_to" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


class _Flaky:
    name = "flaky"

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.closed = False

    def start(self, run_dir: Path, global_step: int, history: Any) -> None:
        self.start_step = global_step

    def flush(self) -> None:
        pass

    def log(self, record: dict[str, Any]) -> None:
        if record.get("global_step") == 2:
            raise ConnectionError("tracking server went away")
        self.steps.append(record["global_step"])

    def close(self) -> None:
        self.closed = True


def test_a_failing_tracker_is_dropped_and_the_metrics_file_keeps_going(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = _Flaky()
    log = MetricsLog(tmp_path / "metrics.jsonl", [flaky])
    log.start_trackers(0)
    with caplog.at_level(logging.ERROR, logger="evertrain"):
        for step in (1, 2, 3):
            log.write({"kind": "train", "global_step": step, "loss": 1.0})
    log.close()
    assert flaky.steps == [1] and flaky.closed and flaky.start_step == 0
    assert "tracker flaky failed at global_step 2" in caplog.text
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["global_step"] for x in lines] == [1, 2, 3]


def _history(steps: range) -> Any:
    return lambda: iter(
        [{"kind": "train", "global_step": s, "loss": 10.0 - s} for s in steps]
        + [{"kind": "example_ids", "global_step": 1, "ids": [3]}]
    )


def test_mlflow_and_wandb_catch_up_on_what_they_lack(tmp_path: Path) -> None:
    """A tracker that holds steps 1-3 (the process died, or the server was away, after
    that) gets 4 and 5 from metrics.jsonl at the next start, and nothing twice."""
    from mlflow.tracking import MlflowClient

    from evertrain.trackers import MLflowTracker, WandbTracker
    from evertrain.wandb_files import last_history_step

    first, again = MLflowTracker(experiment="e"), MLflowTracker(experiment="e")
    first.start(tmp_path, 0, _history(range(0)))
    for s in (1, 2, 3):
        first.log({"kind": "train", "global_step": s, "loss": 10.0 - s})
    first.close()
    again.start(tmp_path, 5, _history(range(1, 6)))
    again.log({"kind": "train", "global_step": 6, "loss": 4.0})
    again.close()
    assert first.run_id == again.run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    got = [(m.step, m.value) for m in client.get_metric_history(again.run_id, "train/loss")]
    assert got == [(s, 10.0 - s) for s in range(1, 7)]

    wb = WandbTracker(project="p")
    wb.start(tmp_path, 0, _history(range(0)))
    for s in (1, 2, 3):
        wb.log({"kind": "train", "global_step": s, "loss": 10.0 - s})
    wb.close()
    root = tmp_path / "trackers" / "wandb"
    run_id = json.loads((tmp_path / "trackers" / "wandb.json").read_text())["run_id"]
    assert last_history_step(root, run_id) == 3
    wb = WandbTracker(project="p")
    wb.start(tmp_path, 5, _history(range(1, 6)))
    assert wb.held == 3
    wb.log({"kind": "train", "global_step": 6, "loss": 4.0})
    wb.close()
    assert last_history_step(root, run_id) == 6
    assert _wandb_steps(sorted(root.glob(f"offline-run-*-{run_id}*/*.wandb"))) == [
        (s, 10.0 - s) for s in range(1, 7)
    ]


def test_mlflow_keeps_an_eval_point_whose_train_point_it_holds(tmp_path: Path) -> None:
    """Killed between step 3's train and eval records: MLflow holds train/loss at 3 but no
    eval. The resumed run replays step 3: its train point is held, its eval point is not."""
    from mlflow.tracking import MlflowClient

    from evertrain.trackers import MLflowTracker

    first, again = MLflowTracker(experiment="e"), MLflowTracker(experiment="e")
    first.start(tmp_path, 0, _history(range(0)))
    for s in (1, 2, 3):
        first.log({"kind": "train", "global_step": s, "loss": 10.0 - s})
    first.log({"kind": "eval", "global_step": 2, "val_loss": 5.0})
    first.close()  # the kill: step 3's eval record never reached MLflow
    again.start(tmp_path, 2, _history(range(1, 3)))  # resumed from the checkpoint of step 2
    again.log({"kind": "train", "global_step": 3, "loss": 7.0})
    again.log({"kind": "eval", "global_step": 3, "val_loss": 4.0})
    again.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    def history(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(again.run_id, key)]

    assert history("train/loss") == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert history("eval/val_loss") == [(2, 5.0), (3, 4.0)]


def test_an_explicit_fresh_start_opens_new_tracker_runs(tmp_path: Path) -> None:
    """``train --fresh`` (``start_fresh()``): the old MLflow/W&B run ids are set aside, not
    deleted, so the new run's steps are not skipped as held; a run directory whose first
    checkpoint never came continues its tracker runs."""
    import evertrain

    state = tmp_path / "trackers" / "wandb.json"
    state.parent.mkdir()
    state.write_text('{"run_id": "abc"}')
    ckpt = evertrain.Checkpointer(tmp_path)
    assert ckpt.resume() == 0  # no checkpoint yet: the same tracker runs go on
    ckpt.close()
    assert state.exists()
    again = evertrain.Checkpointer(tmp_path)
    again.start_fresh()
    again.close()
    assert not state.exists()
    assert [p.name.split(".before-")[0] for p in state.parent.iterdir()] == ["wandb.json"]
