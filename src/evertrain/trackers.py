"""Experiment trackers: the scalars of ``metrics.jsonl``, mirrored to TensorBoard, MLflow
or Weights & Biases under global_step.

``metrics.jsonl`` stays the record evertrain itself reads (status, dashboard, resume); a
tracker receives each record right after it was written there (rank 0 only) and logs its
numbers (:func:`scalars`): ``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_s``, ``eval/val_loss``, a daemon's held-out loss per file as
``eval/file_<id>/val_loss``, ``checkpoint/stall_s``...

Every step reaches a tracker exactly once, also across ``kill -9`` and resume. A resume
replays the steps after the checkpoint, which the killed process may already have logged
(with the same values: the replay is bit-identical), and a killed process may have lost
what a tracker still buffered:

- TensorBoard: events are flushed at every checkpoint (:meth:`Tracker.flush`), and the
  writer reopens with ``purge_step`` = resumed global_step + 1, so readers drop the earlier
  events from that step on (TensorBoard's own mechanism for restarts).
- MLflow: each batch is committed by MLflow as it is logged; the run id is kept in
  ``RUN/trackers/mlflow.json`` and the same run continued. At start the highest step the run
  has is read from MLflow; records of ``metrics.jsonl`` after it are logged again (a run
  that lost its server for a while is caught up) and later steps up to it are skipped.
- W&B: the run id is kept in ``RUN/trackers/wandb.json`` (``wandb.init(id=...,
  resume="allow")``). W&B buffers in its own service process, and a SIGKILL loses what it
  had not yet written, so the highest step W&B holds is read at start: in ``online`` mode
  from the server (``run.starting_step``), offline from the run's earlier ``.wandb`` files
  (:mod:`evertrain.wandb_files`); then as for MLflow.

The packages are optional extras (``pip install 'evertrain[tensorboard]'``, ``[mlflow]``,
``[wandb]``) imported only when a tracker starts. A tracker that fails while training (a
tracking server going away) is reported once, at ERROR, and dropped; training goes on,
since ``metrics.jsonl`` keeps every number. Not thread-safe: the training thread logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("evertrain")

TRACKERS = ("tensorboard", "mlflow", "wandb")
# records that carry no scalars worth a chart (id lists, markers)
_SKIP_KINDS = frozenset({"example_ids", "file_end"})
# numbers that identify rather than measure
_NOT_SCALARS = frozenset({"global_step", "file_id", "epoch", "micro_step"})
# the records of metrics.jsonl so far, oldest first
History = Callable[[], Iterator[Mapping[str, Any]]]


class TrackerError(ValueError):
    """A tracker cannot start (its package is missing, a bad setting): one line, naming the
    tracker and what to do."""


class Tracker(Protocol):
    """What :class:`~evertrain.metrics.MetricsLog` calls; implement it to send the
    metrics anywhere else."""

    name: str

    def start(self, run_dir: Path, global_step: int, history: History) -> None:
        """Open (or continue) the tracker's run; training continues after ``global_step``
        (0 for a fresh run). ``history()`` yields the records of ``metrics.jsonl`` so far
        (up to that step), to catch up on what the tracker lacks. Called once, before the
        first :meth:`log`."""

    def log(self, record: Mapping[str, Any]) -> None:
        """One ``metrics.jsonl`` record, as written."""

    def flush(self) -> None:
        """Make what was logged survive a ``kill -9`` of this process (called before every
        checkpoint save)."""

    def close(self) -> None:
        """Flush and end the run (idempotent)."""


class _CatchUp:
    """Skip what the tracker already holds (steps up to ``held``, or per tag up to
    ``held_by_tag`` where the tracker can tell), log the rest: the records of ``history``
    first, then the live ones."""

    held = -1
    # a kill between a step's train and eval records leaves the run holding the step for
    # one tag but not the other: a run-wide maximum would skip the eval point for good
    held_by_tag: dict[str, int] | None = None

    def catch_up(self, history: History, global_step: int) -> None:
        if self.held_by_tag is not None:
            self.held = min(self.held_by_tag.values(), default=-1)
        if self.held >= global_step:
            return  # it has every step up to the resume: no need to read metrics.jsonl
        for record in history():
            self.log(record)

    def log(self, record: Mapping[str, Any]) -> None:
        got = scalars(record)
        if got is None:
            return
        step, values = got
        if self.held_by_tag is not None:
            values = {k: v for k, v in values.items() if step > self.held_by_tag.get(k, -1)}
        elif step <= self.held:
            return
        if values:
            self._send(step, values)

    def _send(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError


def scalars(record: Mapping[str, Any]) -> tuple[int, dict[str, float]] | None:
    """``(global_step, {tag: value})`` of one ``metrics.jsonl`` record, or None when it has
    no global_step or no finite number.

    Tags are ``<kind>/<field>`` for every int or float field (not bools, not ids), with
    ``<kind>/file_<file_id>/<field>`` for records of one inbox file; a train record also
    gets ``train/tokens_per_s`` (tokens / seconds of the step).
    """
    step = record.get("global_step")
    kind = record.get("kind")
    if not isinstance(step, int) or not isinstance(kind, str) or kind in _SKIP_KINDS:
        return None
    prefix = kind
    if isinstance(record.get("file_id"), int):
        prefix = f"{kind}/file_{record['file_id']}"
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    if kind == "train":
        tokens, seconds = record.get("tokens"), record.get("seconds")
        if isinstance(tokens, int | float) and isinstance(seconds, int | float) and seconds > 0:
            out["train/tokens_per_s"] = tokens / seconds
    return (step, out) if out else None


def _need(module: str, tracker: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackerError(
            f"report_to: {tracker} needs the {module.split('.')[0]} package, which is not "
            f"installed: pip install 'evertrain[{tracker}]' (or remove {tracker} from report_to)"
        ) from None


def _state_path(run_dir: Path, name: str) -> Path:
    return run_dir / "trackers" / f"{name}.json"


def set_aside_tracker_runs(run_dir: Path) -> None:
    """Rename the tracker run ids in ``RUN/trackers/`` to ``<name>.json.before-<unix time>``,
    so the next start opens new MLflow and W&B runs (a fresh start's steps would otherwise
    be skipped as already held by the old runs). Nothing is deleted."""
    folder = run_dir / "trackers"
    for path in folder.glob("*.json") if folder.is_dir() else ():
        os.replace(path, path.with_name(f"{path.name}.before-{int(time.time())}"))


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise TrackerError(
            f"{path}: unreadable ({e}); delete it to start a new tracker run"
        ) from None
    return state if isinstance(state, dict) else {}


def _write_state(path: Path, state: Mapping[str, Any]) -> None:
    # rename, so a kill leaves the old or the new state, never half of one
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(state)), encoding="utf-8")
    os.replace(tmp, path)


class TensorBoardTracker:
    """TensorBoard event files through ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        log_dir: where the event files go (default ``RUN/tensorboard``).
        flush_seconds: how often pending events are written (seconds).
    """

    name = "tensorboard"

    def __init__(self, log_dir: str | Path | None = None, flush_seconds: float = 10.0) -> None:
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.flush_seconds = flush_seconds
        self._writer: Any = None

    def start(self, run_dir: Path, global_step: int, history: History) -> None:
        _need("tensorboard", self.name)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(
            str(self.log_dir or run_dir / "tensorboard"),
            # also from 0: a run killed before its first checkpoint starts over at step 1
            purge_step=global_step + 1,
            flush_secs=max(1, int(self.flush_seconds)),
        )

    def log(self, record: Mapping[str, Any]) -> None:
        got = scalars(record)
        if got is None or self._writer is None:
            return
        step, values = got
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class MLflowTracker(_CatchUp):
    """One MLflow run per run directory, continued across resumes.

    Args:
        tracking_uri: MLflow's tracking URI (default: ``$MLFLOW_TRACKING_URI``, else a
            SQLite file ``RUN/mlflow.db``; MLflow 3 refuses its old file store).
        experiment: experiment name (default: the run directory's name).
        params: logged once as the run's parameters (e.g. the flattened config).
    """

    name = "mlflow"

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.params = dict(params or {})
        self._client: Any = None
        self.run_id: str | None = None

    def start(self, run_dir: Path, global_step: int, history: History) -> None:
        _need("mlflow", self.name)
        from mlflow.tracking import MlflowClient

        uri = (
            self.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        )
        client = MlflowClient(tracking_uri=uri)
        path = _state_path(run_dir, self.name)
        state = _read_state(path)
        if state.get("tracking_uri") == uri and state.get("run_id"):
            self.run_id = str(state["run_id"])
            client.update_run(self.run_id, status="RUNNING")
            keys = client.get_run(self.run_id).data.metrics
            self.held_by_tag = {
                k: max((m.step for m in client.get_metric_history(self.run_id, k)), default=-1)
                for k in keys
            }
        else:
            name = self.experiment or run_dir.resolve().name
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
            self.run_id = client.create_run(exp_id, run_name=run_dir.resolve().name).info.run_id
            for key, value in list(self.params.items())[:500]:
                client.log_param(self.run_id, key, str(value)[:6000])
            _write_state(path, {"tracking_uri": uri, "run_id": self.run_id})
        self._client = client
        self.catch_up(history, global_step)

    def _send(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key=k, value=v, timestamp=now, step=step) for k, v in values.items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def flush(self) -> None:
        pass  # log_batch returns once MLflow has stored the batch

    def close(self) -> None:
        if self._client is not None:
            self._client.set_terminated(self.run_id)
            self._client = None


class WandbTracker(_CatchUp):
    """One Weights & Biases run per run directory, continued across resumes.

    Args:
        project: W&B project (default: the run directory's name).
        mode: ``offline`` (default: files under ``RUN/trackers/wandb``, uploaded later with
            ``wandb sync``) or ``online``.
        entity: W&B entity (team or user), or None for the default.
        config: the run's config, stored with the W&B run.
    """

    name = "wandb"

    def __init__(
        self,
        project: str | None = None,
        mode: str = "offline",
        entity: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.project, self.mode, self.entity = project, mode, entity
        self.config = dict(config or {})
        self._run: Any = None
        self._step = -1  # the highest step given to W&B by this process

    def start(self, run_dir: Path, global_step: int, history: History) -> None:
        wandb = _need("wandb", self.name)
        path = _state_path(run_dir, self.name)
        state = _read_state(path)
        if not state.get("run_id"):
            state = {"run_id": uuid.uuid4().hex[:12]}  # W&B ids: lowercase letters, digits
            _write_state(path, state)
        run_id = str(state["run_id"])
        if self.mode == "offline":
            from evertrain.wandb_files import last_history_step

            self.held = last_history_step(path.parent / "wandb", run_id)
        self._run = wandb.init(
            project=self.project or run_dir.resolve().name,
            entity=self.entity,
            id=run_id,
            resume="allow",
            mode=self.mode,
            dir=str(path.parent),
            config=self.config,
        )
        if self.mode == "online":
            self.held = int(getattr(self._run, "starting_step", 0) or 0) - 1
        self.catch_up(history, global_step)

    def _send(self, step: int, values: dict[str, float]) -> None:
        # W&B drops a step below its current one: an async save's record, written a few
        # steps after its global_step, goes under the current step with its own as a value
        if step < self._step:
            prefix = next(iter(values)).rsplit("/", 1)[0]
            values = {**values, f"{prefix}/global_step": float(step)}
        self._step = max(self._step, step)
        self._run.log(values, step=self._step)

    def flush(self) -> None:
        pass  # W&B's service process writes on its own schedule: see the module docstring

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.0002, ...}``: a nested config as dotted keys (MLflow parameters)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value
    return out


def make_trackers(
    names: Sequence[str],
    *,
    project: str | None = None,
    mlflow_tracking_uri: str | None = None,
    wandb_mode: str = "offline",
    wandb_entity: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> list[Tracker]:
    """The trackers ``report_to`` names, not yet started.

    Raises:
        TrackerError: an unknown name, or a tracker whose package is missing (checked here,
            before any training, so a typo costs nothing).
    """
    out: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            _need("tensorboard", name)
            out.append(TensorBoardTracker())
        elif name == "mlflow":
            _need("mlflow", name)
            params = flat_params(config or {})
            out.append(MLflowTracker(mlflow_tracking_uri, project, params))
        elif name == "wandb":
            _need("wandb", name)
            out.append(WandbTracker(project, wandb_mode, wandb_entity, config))
        else:
            raise TrackerError(f"report_to: unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
    return out
