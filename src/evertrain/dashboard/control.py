"""``RUN/control.json``: requests from the dashboard (or CLI) to the daemon.

Format (docs/run-directory.md): ``{"paused": bool, "snapshot_requested": unix time | null,
"updated": unix time}``. The daemon reads it between optimizer steps; the web process never
signals the daemon, so a dashboard on another user's account or host can only ask.
The file is replaced atomically (:func:`evertrain.fsutil.atomic_write_bytes`: hidden
temporary file, fsync, rename) so the daemon never reads half a record.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from evertrain.fsutil import atomic_write_bytes

CONTROL_FILE = "control.json"
_lock = threading.Lock()  # read-modify-write of one process's requests


class ControlError(Exception):
    """control.json exists but cannot be read or replaced (the message says which and why)."""


def read_control(run_dir: Path) -> dict[str, Any]:
    """The current control record; defaults (not paused, no snapshot) if there is none.

    Raises:
        ControlError: the file exists but is not a JSON object.
    """
    path = Path(run_dir) / CONTROL_FILE
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {"paused": False, "snapshot_requested": None, "updated": None}
    except (OSError, ValueError) as e:
        raise ControlError(
            f"{path}: unreadable or not valid JSON ({e}); fix or delete it, then retry"
        ) from e
    if not isinstance(data, dict):
        raise ControlError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    data.setdefault("paused", False)
    data.setdefault("snapshot_requested", None)
    return data


def update_control(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """Merge ``changes`` (``paused=bool``, ``snapshot_requested=unix time``) into
    control.json, stamp ``updated`` and replace the file atomically. Keys the daemon or a
    newer evertrain added are kept.

    Returns:
        the record written.

    Raises:
        ControlError: the existing file is damaged, or it cannot be written (e.g. the run
            directory is read-only).
    """
    run_dir = Path(run_dir)
    with _lock:
        record = read_control(run_dir)
        record.update(changes)
        record["updated"] = time.time()
        try:
            atomic_write_bytes(
                run_dir / CONTROL_FILE, json.dumps(record).encode("utf-8"), sync_parent=False
            )
        except OSError as e:
            raise ControlError(f"{run_dir / CONTROL_FILE}: cannot write ({e})") from e
    return record
