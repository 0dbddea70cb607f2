"""The watch daemon under torchrun: rank 0 decides, the other ranks follow in lockstep.

Only rank 0 runs :class:`~evertrain.daemon.loop.Daemon`'s loop: it holds ``daemon.lock``
and alone does intake, the ledger, reconciliation, validation, status, snapshots and
control requests. Every collective it is about to enter (an optimizer step, an
evaluation, a checkpoint) is first announced to the other ranks as one JSON command
(:meth:`evertrain.distributed.Group.broadcast_json`, never pickled), which a
:class:`Follower` executes with its own share of the data:

``{"op": "file", "file": REF, "plan": FilePlan, "cursor": DataCursor state, "pool": [REF]}``
    start (or resume) training a file: build its datasets and this rank's micro-batches
    (:func:`~evertrain.daemon.stream.file_batches` with ``rank``/``world_size``);
``{"op": "step", "n": N, "epoch": E}``
    one optimizer step of ``N`` micro-batches (``Trainer.train_step``), followed on every
    rank by ``Group.any(stop requested here)`` so a signal that reached any rank stops all
    of them after the same step;
``{"op": "end"}`` the file's micro-batches are done (the loader is closed);
``{"op": "eval", "file": REF}`` ``Trainer.evaluate`` on that file's held-out split;
``{"op": "save"}`` ``Trainer.save`` (every rank writes its part, rank 0 commits);
``{"op": "stop"}`` the daemon stopped: the follower returns.

``REF`` is ``{"id", "path", "hash"}`` of a file in the run directory (absolute path, the
ledger's content hash), so a follower builds exactly the rows rank 0 trains on. Pause,
stop, the ``every_seconds`` timer and the choice of file are therefore decided once, on
rank 0; a follower never decides anything, so the ranks cannot disagree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import torch

from evertrain.config import RunConfig
from evertrain.daemon.filedata import FileData
from evertrain.daemon.replay import ReplaySampler
from evertrain.daemon.schedule import StreamScheduler
from evertrain.daemon.stream import FilePlan, StreamState, file_batches
from evertrain.data import DataCursor
from evertrain.signals import on_stop_signals

log = logging.getLogger("evertrain.daemon")


def env_rank() -> int:
    """This process's global rank under torchrun (``RANK``), 0 without it."""
    return int(os.environ.get("RANK", "0") or 0)


class RankLink:
    """Rank 0's side of the protocol (see the module docstring); with one process every
    method is a no-op that touches no process group, so a single daemon is unchanged.

    Args:
        group: the trainer's :class:`~evertrain.distributed.Group` (None before the
            trainer exists: inactive).
    """

    def __init__(self, group: Any) -> None:
        self.group = group

    @property
    def active(self) -> bool:
        return self.group is not None and bool(self.group.distributed)

    def send(self, op: str, **args: Any) -> None:
        """Announce command ``op`` (JSON-able ``args``) to the other ranks."""
        if self.active:
            self.group.broadcast_json({"op": op, **args})

    def any_stop(self, requested: bool) -> bool:
        """True if a stop was requested on any rank (called after every ``step``)."""
        return bool(self.group.any(requested)) if self.active else requested


def file_ref(file_id: int, path: Path, content_hash: str | None) -> dict[str, Any]:
    """The ``REF`` of a file for a command (see the module docstring)."""
    return {"id": file_id, "path": str(path), "hash": content_hash}


class Follower:
    """A rank > 0 of ``evertrain watch`` under torchrun: executes rank 0's commands.

    Args:
        run_dir: the run directory (rank 0 creates and owns it).
        cfg: the run config (as given to the daemon).
        allow_config_change: passed to the trainer.

    Raises (from :meth:`run`):
        RuntimeError: an unknown command or a step before any file (a protocol bug).
        evertrain.data.DataError: a file's bytes differ from its recorded hash.
        evertrain.trainer.ResumeError, evertrain.state.StateError: see the trainer.
    """

    def __init__(
        self, run_dir: str | Path, cfg: RunConfig, *, allow_config_change: bool = False
    ) -> None:
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.allow_config_change = allow_config_change
        self.stop_requested = False

    def run(self) -> int:
        """Follow rank 0 until it sends ``stop``. Returns 0."""
        from evertrain.recipe import build_trainer

        t = self.cfg.train
        with self._signals():
            tr = build_trainer(
                self.cfg,
                self.run_dir,
                allow_config_change=self.allow_config_change,
                build_data=False,
                extra_owners={"stream": StreamState()},
                # the same open-ended schedule as rank 0's (the learning rate of each step)
                make_scheduler=lambda opt: StreamScheduler(opt, t.schedule, t.lr),
            )
            try:
                tr.resume()
                sched = tr.scheduler
                assert isinstance(sched, StreamScheduler)
                self._follow(tr, sched)
            finally:
                tr.close()
        return 0

    def _follow(self, tr: Any, sched: StreamScheduler) -> None:
        """Execute rank 0's commands until ``stop``; a file's steps run in
        :meth:`Trainer.run <evertrain.trainer.Trainer.run>`, the loop rank 0 runs too."""
        data = FileData(self.cfg, tr.tokenizer, capacity=max(8, self.cfg.watch.eval_earlier_files))
        while True:
            cmd = tr.dist.broadcast_json(None)
            if cmd["op"] == "stop":
                return
            if cmd["op"] != "file":
                self._side_command(tr, data, cmd)
                continue
            if self._follow_file(tr, sched, data, cmd):
                return

    def _follow_file(
        self, tr: Any, sched: StreamScheduler, data: FileData, cmd: dict[str, Any]
    ) -> bool:
        """Train one file's steps as rank 0 announces them; True if ``stop`` came."""
        step = {"n": 0, "epoch": 0}
        stopped = False

        def before_step() -> bool:
            nonlocal stopped
            while True:  # evaluations and saves between steps, until the next step
                nxt = tr.dist.broadcast_json(None)
                op = nxt["op"]
                if op == "step":
                    step.update(n=int(nxt["n"]), epoch=int(nxt["epoch"]))
                    return True
                if op in ("end", "file", "stop"):
                    stopped = op == "stop"
                    if op == "file":  # rank 0 never starts a file inside one
                        raise RuntimeError("watch follower: a file before the last one ended")
                    return False
                self._side_command(tr, data, nxt)

        def after_step(stats: Any) -> bool:
            tr.dist.any(self.stop_requested)  # rank 0's any_stop: every rank stops alike
            return True

        batches = self._file_batches(tr, sched, data, cmd)
        try:
            tr.run(
                batches,
                sys.maxsize,
                epoch=lambda: step["epoch"],
                micro_batches=lambda done: step["n"],
                before_step=before_step,
                after_step=after_step,
            )
        finally:
            batches.close()
        return stopped

    @staticmethod
    def _side_command(tr: Any, data: FileData, cmd: dict[str, Any]) -> None:
        op = cmd["op"]
        if op == "eval":
            ref = cmd["file"]
            tr.evaluate(data.get_val(int(ref["id"]), Path(ref["path"]), ref["hash"]))
        elif op == "save":
            tr.save()
        else:
            raise RuntimeError(f"watch follower: unexpected command {op!r} from rank 0")

    def _file_batches(
        self, tr: Any, sched: StreamScheduler, data: FileData, cmd: dict[str, Any]
    ) -> Generator[dict[str, torch.Tensor], None, None]:
        ref = cmd["file"]
        train, _ = data.get(int(ref["id"]), Path(ref["path"]), ref["hash"])
        plan = FilePlan.from_json(cmd["plan"])
        sched.window = (plan.global_step_start, plan.global_step_end)
        cursor = DataCursor(
            plan.seed, len(train), plan.rows_per_micro * tr.world_size, train.fingerprint
        )
        cursor.load_state_dict(cmd["cursor"])
        replay = None
        if plan.replay_rows:
            pool = [data.get(int(r["id"]), Path(r["path"]), r["hash"])[0] for r in cmd["pool"]]
            replay = ReplaySampler(self.cfg.seed, pool, plan.replay_rows)
        return file_batches(
            plan,
            cursor,
            train,
            grad_accum_steps=tr.grad_accum_steps,
            num_workers=self.cfg.data.num_workers,
            replay=replay,
            rank=tr.rank,
            world_size=tr.world_size,
            trim=tr.settings.trim_padding,
        )

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        # torchrun forwards SIGTERM/SIGINT to every rank: a follower that died at once would
        # take the group down before rank 0's final checkpoint; it finishes the step in
        # flight, tells rank 0 (Group.any after the step) and follows it to the end.

        def handle(signum: int, frame: Any) -> None:
            self.stop_requested = True

        with on_stop_signals(handle):
            yield
