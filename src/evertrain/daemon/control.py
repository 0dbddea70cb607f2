"""``RUN/control.json``: requests to the daemon from the dashboard or a script.

``{"paused": bool, "snapshot_requested": unix time | null, "updated": unix time}``, replaced
atomically by its writer. The daemon reads it between optimizer steps: ``paused`` holds
training after the current step (status ``paused``) until it is false again; a
``snapshot_requested`` newer than the last snapshot takes one. A missing file means no
request; a malformed one is reported once in the log and otherwise ignored (a bad request
must not stop training).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from evertrain.daemon.layout import atomic_write

log = logging.getLogger("evertrain.daemon")


@dataclass(frozen=True)
class Control:
    paused: bool = False
    snapshot_requested: float | None = None


class ControlReader:
    """Reads ``control.json`` (cheap: one ``stat`` when it has not changed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int] | None = None
        self._value = Control()
        self._warned: tuple[int, int] | None = None

    def read(self) -> Control:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._key, self._value = None, Control()
            return self._value
        key = (st.st_mtime_ns, st.st_size)
        if key == self._key:
            return self._value
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            paused = data.get("paused", False)
            snap = data.get("snapshot_requested")
            if not isinstance(paused, bool) or not (
                snap is None or (isinstance(snap, (int, float)) and not isinstance(snap, bool))
            ):
                raise ValueError("paused must be true/false, snapshot_requested a number/null")
            value = Control(paused, None if snap is None else float(snap))
        except (OSError, ValueError, AttributeError) as e:
            if self._warned != key:
                log.warning("%s: ignored, not a valid control record: %s", self.path, e)
                self._warned = key
            value = Control()
        self._key, self._value = key, value
        return value


def write_control(
    path: Path, *, paused: bool | None = None, snapshot: bool = False
) -> dict[str, object]:
    """Update ``control.json`` (for scripts and tests; the dashboard writes the same record).

    Args:
        paused: set ``paused`` (None keeps the current value).
        snapshot: request a snapshot now.

    Returns:
        The record written.
    """
    current = ControlReader(path).read()
    record: dict[str, object] = {
        "paused": current.paused if paused is None else paused,
        "snapshot_requested": time.time() if snapshot else current.snapshot_requested,
        "updated": time.time(),
    }
    atomic_write(path, json.dumps(record).encode())
    return record
