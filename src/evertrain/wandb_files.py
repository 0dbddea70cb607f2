"""What an offline Weights & Biases run already holds: the highest history step in its
``.wandb`` files.

W&B's Python library no longer ships a reader for these files (its service process, written
in Go, writes them), so this module reads the container format itself: a 7-byte header
(``:W&B``, magic ``0xBEE1`` little-endian, version 0), then 32 KiB blocks of chunks, each
``CRC32C (4 bytes) | length (2, little-endian) | type (1)`` and the data; types 1 (a whole
record), 2/3/4 (first/middle/last part of a record split over blocks); a block tail shorter
than a chunk header is padding. This is LevelDB's log format
(github.com/google/leveldb/blob/main/doc/log_format.md), which W&B adopted; records are
``wandb_internal_pb2.Record`` protobuf messages (the ``wandb.proto`` package). A torn tail,
left by a killed process, ends the scan: what comes before it is what W&B holds.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

_HEADER = b":W&B\xe1\xbe\x00"
_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[bytes]:
    """The serialized records of one ``.wandb`` file, in order; stops at a torn tail.

    Raises:
        OSError: the file cannot be read.
    """
    data = path.read_bytes()
    if not data.startswith(_HEADER):
        return
    pos, parts = len(_HEADER), b""
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        end = pos + _CHUNK_HEADER + length
        if kind not in (_FULL, _FIRST, _MIDDLE, _LAST) or end > len(data):
            return  # zero padding or a record cut short by a kill
        parts += data[pos + _CHUNK_HEADER : end]
        pos = end
        if kind in (_FULL, _LAST):
            yield parts
            parts = b""


def last_history_step(root: Path, run_id: str) -> int:
    """The highest ``_step`` of the history rows in every offline run directory of
    ``run_id`` under ``root`` (``offline-run-<time>-<run_id>[-N]/run-<run_id>.wandb``), or -1
    when there are none."""
    from wandb.proto import wandb_internal_pb2 as pb

    best = -1
    # W&B appends -1, -2... to the directory of a session started in the same second
    for path in sorted(root.glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb")):
        for raw in records(path):
            rec = pb.Record()  # type: ignore[attr-defined]
            try:
                rec.ParseFromString(raw)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError: a damaged record
                break
            if rec.WhichOneof("record_type") != "history":
                continue
            for item in rec.history.item:
                if item.key == "_step" or list(item.nested_key) == ["_step"]:
                    best = max(best, int(json.loads(item.value_json)))
    return best
