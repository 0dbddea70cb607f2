"""The checkpoints of one run: save with retention, find the newest valid one, load."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evertrain.checkpoint.errors import InsufficientDiskSpaceError
from evertrain.checkpoint.format import (
    MANIFEST,
    STEP_DIR_RE,
    LoadedCheckpoint,
    estimate_size,
    fsync_dir,
    read_checkpoint,
    step_dir_name,
    verify_checkpoint,
    write_checkpoint,
)
from evertrain.checkpoint.policy import RetentionPolicy

_LEFTOVER_RE = re.compile(r"step-\d{8,}\.(tmp|deleting)")
_logger = logging.getLogger("evertrain.checkpoint")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint (a ``step-N`` directory holding a ``manifest.json``).

    ``summary`` is the manifest's summary, ``{}`` if the manifest is unreadable; being
    listed says nothing about validity (see :meth:`CheckpointManager.latest_valid`).
    """

    path: Path
    global_step: int
    summary: dict[str, Any] = field(default_factory=dict, compare=False)


class CheckpointManager:
    """The checkpoints under ``root`` (``RUN/checkpoints``), one ``step-NNNNNNNN`` dir each.

    Not thread-safe and not process-safe: there must be a single writer per run directory.
    The caller (the trainer, or the daemon, which holds the run directory's lock) guarantees
    it; two managers saving into the same ``root`` can corrupt each other's retention.

    Args:
        root: directory holding the step directories; created on the first save.
        retention: which committed checkpoints to keep after each save.
        log: receives warnings (damaged checkpoints skipped, dirs set aside, deletions);
            default: the ``evertrain.checkpoint`` logger at WARNING level.
        min_free_bytes: bytes that must stay free on the file system after a save.
    """

    def __init__(
        self,
        root: Path,
        retention: RetentionPolicy,
        *,
        log: Callable[[str], None] | None = None,
        info: Callable[[str], None] | None = None,
        min_free_bytes: int = 0,
    ) -> None:
        self.root = Path(root)
        self.retention = retention
        self.min_free_bytes = min_free_bytes
        self._log = log or _logger.warning
        self._info = info or _logger.info  # routine events (retention) are not warnings
        self._verified: set[str] = set()  # dir names verified or written by this process

    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = STEP_DIR_RE.fullmatch(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def committed(self) -> list[CheckpointInfo]:
        """Step directories holding a ``manifest.json``, sorted by global_step (not verified)."""
        infos = []
        for step, path in self._step_dirs():
            if not (path / MANIFEST).is_file():
                continue
            try:
                summary = json.loads((path / MANIFEST).read_bytes()).get("summary")
            except (OSError, ValueError, AttributeError):
                summary = None
            infos.append(CheckpointInfo(path, step, summary if isinstance(summary, dict) else {}))
        return infos

    def latest_valid(self) -> CheckpointInfo | None:
        """The newest checkpoint that passes full verification, or None.

        Every newer step directory that fails (including one without a manifest) is reported
        through ``log`` with a loud warning naming the file and the problem; it is skipped,
        never deleted. Cost: reads every byte of each checkpoint it checks.
        """
        for _step, path in reversed(self._step_dirs()):
            problems = verify_checkpoint(path)
            fatal = [p for p in problems if p.fatal]
            if fatal:
                self._log(
                    f"WARNING: checkpoint {path} is DAMAGED and will NOT be used: "
                    + "; ".join(str(p) for p in fatal)
                    + " -- falling back to an older checkpoint; the damaged directory "
                    "is left in place for inspection"
                )
                continue
            for p in problems:
                self._log(f"warning: checkpoint {path}: {p}")
            self._verified.add(path.name)
            return next(i for i in self.committed() if i.path == path)
        return None

    def load(self, info_or_path: CheckpointInfo | Path) -> LoadedCheckpoint:
        """Verify and load a checkpoint. Raises CorruptCheckpointError if it is damaged."""
        path = info_or_path.path if isinstance(info_or_path, CheckpointInfo) else info_or_path
        loaded = read_checkpoint(Path(path))
        self._verified.add(loaded.path.name)
        return loaded

    def save(
        self,
        global_step: int,
        states: Mapping[str, Mapping[str, Any]],
        summary: Mapping[str, Any],
        protect: Iterable[int] = (),
    ) -> Path:
        """Commit ``states`` as ``root/step-<global_step>``, then apply retention.

        Steps: remove leftovers of crashed saves/deletions (``step-*.tmp``,
        ``step-*.deleting``: ours, never checkpoints); check free space; set an existing
        ``step-N`` aside as ``step-N.damaged-<unix time>``; write and commit (see
        :func:`~evertrain.checkpoint.write_checkpoint`); delete what ``retention`` does not
        keep among the valid checkpoints, never the newest valid one, a step in
        ``protect`` (pass the step being resumed from) or a damaged one. Checkpoints not yet
        verified by this manager are fully verified once (one read each per process).

        Args:
            global_step: optimizer steps completed.
            states: owner name -> state dict.
            summary: JSON-able; ``summary["metrics"]`` feeds :class:`KeepBest`.
            protect: global_steps that retention must not delete.

        Returns:
            The committed checkpoint directory.

        Raises:
            InsufficientDiskSpaceError: free bytes < estimated size + ``min_free_bytes``;
                nothing is written or deleted.
            CheckpointWriteError: an OS error while writing; the partial dir is removed.
            CheckpointError: invalid states (owner name, value types).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.iterdir():
            if _LEFTOVER_RE.fullmatch(p.name):
                self._info(f"removing {p}, left by an interrupted save or deletion")
                shutil.rmtree(p)
        need = estimate_size(states) + self.min_free_bytes
        free = shutil.disk_usage(self.root).free
        if free < need:
            raise InsufficientDiskSpaceError(
                self.root,
                free,
                need,
                f"{self.root}: {free} bytes free, a checkpoint of step {global_step} needs about "
                f"{need - self.min_free_bytes} bytes plus min_free_bytes={self.min_free_bytes}; "
                f"not saved, nothing deleted to make room. Free disk space, lower "
                f"checkpoint.min_free_bytes or keep fewer checkpoints",
            )
        final = self.root / step_dir_name(global_step)
        if final.exists():
            aside = final.with_name(f"{final.name}.damaged-{int(time.time())}")
            while aside.exists():
                aside = aside.with_name(aside.name + "x")
            os.rename(final, aside)
            self._verified.discard(final.name)
            self._log(
                f"WARNING: {final} already existed (a checkpoint resumed past); "
                f"moved it aside to {aside.name}, not deleted"
            )
        write_checkpoint(final, states, summary, global_step=global_step)
        self._verified.add(final.name)
        self._apply_retention(global_step, set(protect))
        return final

    def _apply_retention(self, new_step: int, protect: set[int]) -> None:
        valid = []
        for info in self.committed():
            if info.path.name not in self._verified:
                fatal = [p for p in verify_checkpoint(info.path) if p.fatal]
                if fatal:
                    self._log(f"retention: {info.path} is damaged ({fatal[0]}); left untouched")
                    continue
                self._verified.add(info.path.name)
            valid.append(info)
        if not valid:
            return
        keep = self.retention.keep(valid) | protect | {new_step, valid[-1].global_step}
        for info in valid:
            if info.global_step in keep:
                continue
            # Rename first: a crash mid-rmtree leaves a *.deleting dir (cleaned up on the next
            # save) instead of a step dir with a manifest and missing files.
            doomed = info.path.with_name(info.path.name + ".deleting")
            try:
                os.rename(info.path, doomed)
                fsync_dir(self.root)
                shutil.rmtree(doomed)
            except OSError as e:
                self._log(f"retention: could not delete {info.path}: {e}")
                continue
            self._verified.discard(info.path.name)
            self._info(f"retention: deleted {info.path.name}")
