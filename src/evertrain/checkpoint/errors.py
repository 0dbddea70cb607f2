"""Errors and problem reports of the checkpoint layer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`~evertrain.checkpoint.verify_checkpoint`.

    Attributes:
        file: the file inside the checkpoint directory (e.g. ``"model.safetensors"``), or the
            directory itself for problems with the directory.
        message: what is wrong and, where it helps, what to do.
        fatal: ``True`` if the checkpoint must not be loaded; ``False`` for warnings
            (e.g. an unlisted file, which is ignored).
    """

    file: str
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


class CheckpointError(Exception):
    """Base of all checkpoint errors: bad input to the writer, or a checkpoint that cannot
    be read (the message names the path and what is wrong)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint failed verification; ``problems`` lists every finding."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        fatal = [p for p in problems if p.fatal]
        lines = "; ".join(str(p) for p in fatal)
        super().__init__(f"{path}: damaged checkpoint, not loaded: {lines}")


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed with an OS error (e.g. ``ENOSPC``); the partial
    ``.tmp`` directory was removed and older checkpoints are untouched."""


class InsufficientDiskSpaceError(CheckpointError):
    """Too little free disk space to save; nothing was written and nothing was deleted.

    Attributes:
        path: the directory whose file system was checked.
        free_bytes: free bytes reported by ``shutil.disk_usage``.
        required_bytes: estimated checkpoint size plus ``min_free_bytes``.
    """

    def __init__(self, path: Path, free_bytes: int, required_bytes: int, msg: str) -> None:
        self.path = path
        self.free_bytes = free_bytes
        self.required_bytes = required_bytes
        super().__init__(msg)

    def unsaved(self, step: int, newest: int | None) -> InsufficientDiskSpaceError:
        """This error, said of a loop that ended (or stopped) with ``step`` unsaved while
        the newest checkpoint is ``newest`` (None: there is none)."""
        return InsufficientDiskSpaceError(
            self.path,
            self.free_bytes,
            self.required_bytes,
            f"the checkpoint of global_step {step} was not written: {self}; the newest "
            f"checkpoint is global_step {newest}",
        )
