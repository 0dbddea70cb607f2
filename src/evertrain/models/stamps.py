"""Stat stamps: skip re-hashing a file whose bytes cannot have changed since it was hashed.

A stamp is ``(size, st_mtime_ns, st_ino, st_dev, st_ctime_ns)`` of a file, stored next to
the hash it vouches for. Writing a file changes its mtime and ctime (also when the writer
restores the mtime, ctime moves), replacing it changes the inode: a stamp that still matches
means the file was not touched since the hash was taken. Starts thus stat a 540 MB
converted model instead of reading it (the full hash ran ~1 s a start on this machine);
the full hash still runs when an entry is built, and whenever a stamp does not match.
What a stamp does not catch: a disk that rots bits under an unchanged inode; the
checkpoints' own hashes (``evertrain verify``) are unaffected by any of this.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def stamp(path: Path) -> list[int]:
    """The stat stamp of ``path``. Raises OSError if it cannot be stat'ed."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns]


def read_stamps(path: Path) -> dict[str, Any]:
    """The stamps file's content, ``{}`` when it is absent or unreadable (a stamp is only a
    shortcut: losing it costs a full hash, nothing else)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_stamps(path: Path, data: dict[str, Any]) -> None:
    """Replace the stamps file (tmp + rename; errors ignored: a read-only cache still works,
    it just hashes every time)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    with contextlib.suppress(OSError):
        tmp.unlink()


def stamped_hash(paths: list[Path], stamps_file: Path, compute: Callable[[], str]) -> str:
    """``compute()`` (a hash over ``paths``), or the value stored in ``stamps_file`` for
    these paths when every file's stamp still matches the one stored with it (then nothing
    is read); a new value is stored with fresh stamps.

    Raises:
        OSError: a path cannot be stat'ed or read.
    """
    now = [stamp(p) for p in paths]
    known = read_stamps(stamps_file)
    key = "\0".join(str(p.resolve()) for p in paths)
    entry = known.get(key)
    if (
        isinstance(entry, dict)
        and entry.get("stamps") == now
        and isinstance(entry.get("hash"), str)
    ):
        return str(entry["hash"])
    digest = compute()
    write_stamps(stamps_file, {**known, key: {"stamps": now, "hash": digest}})
    return digest
