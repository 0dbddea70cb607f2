"""Where the rows of a data set go while it is built: memory, or files read back by mmap.

A build lays rows out in order, a few thousand at a time (:class:`~.pack.Packer`); a row
store collects them and, at the end, gives the :class:`~.dataset.TokenizedDataset`.

- :class:`MemoryRows` keeps the pieces and concatenates them (no data cache).
- :class:`FileRows` appends each piece to one safetensors file per tensor in the data cache
  directory, as it comes, so a 1 GB data file is tokenised with memory that does not grow
  with it; the data set then reads its rows through ``mmap``: pages come from the page
  cache on demand and are shared by every run (and DataLoader worker) on the machine.

The files are ordinary safetensors files (one tensor, named ``"t"``; any safetensors reader
opens them). Rows are written before their number is known, so the JSON header has a fixed
reserved size and is filled in, padded with spaces as the format allows, once the last row
is written (format: https://github.com/huggingface/safetensors#format). Each file is written
under a temporary name and renamed into place after an fsync; the XXH3-128 of its tensor
bytes goes to the cache entry's JSON (:mod:`.cache`), which is verified before the file is
mapped. Nothing is pickled.

Not thread-safe: one builder writes a store; a finished file is only read.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from evertrain.data.dataset import TokenizedDataset, fingerprint_of
from evertrain.data.pack import IGNORE_INDEX, Packed, concat, empty

NAMES = ("input_ids", "labels", "attention_mask", "position_ids")
_DTYPES = {"input_ids": "I32", "labels": "I32", "attention_mask": "BOOL", "position_ids": "I32"}
_NUMPY = {"I32": np.int32, "BOOL": np.bool_}
_TORCH = {"I32": torch.int32, "BOOL": torch.bool}
# 8 bytes of length + this many of JSON: the tensor bytes start 256-byte aligned
_HEADER_BYTES = 248
_READ_CHUNK = 8 << 20


@dataclass
class RowStats:
    """Counts over the rows stored so far (see :class:`~.report.SplitReport`)."""

    rows: int = 0
    tokens: int = 0
    target_tokens: int = 0
    rows_without_targets: int = 0
    truncated_documents: int = 0

    def add(self, p: Packed) -> None:
        targets = (p.labels != IGNORE_INDEX).sum(dim=1)
        self.rows += int(p.input_ids.shape[0])
        self.tokens += int(p.attention_mask.sum())
        self.target_tokens += int(targets.sum())
        self.rows_without_targets += int((targets == 0).sum())
        self.truncated_documents += p.truncated_documents


def _tensors(p: Packed) -> dict[str, torch.Tensor]:
    out = {"input_ids": p.input_ids, "labels": p.labels, "attention_mask": p.attention_mask}
    if p.position_ids is not None:
        out["position_ids"] = p.position_ids
    return out


class MemoryRows:
    """Rows kept in memory; :meth:`dataset` concatenates them."""

    def __init__(self, seq_len: int, masked: bool) -> None:
        self.seq_len, self.masked = seq_len, masked
        self.stats = RowStats()
        self._parts: list[Packed] = []

    def add(self, p: Packed) -> None:
        """Append the rows of ``p`` (any number, zero included)."""
        self.stats.add(p)
        if len(p.input_ids):
            self._parts.append(p)

    def dataset(self, settings: dict[str, Any]) -> TokenizedDataset:
        """All rows added, in order."""
        p = concat(self._parts or [empty(self.seq_len, self.masked)])
        return TokenizedDataset(p.input_ids, p.labels, p.attention_mask, settings, p.position_ids)

    def close(self) -> None:
        self._parts = []


def _header(dtype: str, rows: int, cols: int, nbytes: int) -> bytes:
    meta = {"t": {"dtype": dtype, "shape": [rows, cols], "data_offsets": [0, nbytes]}}
    text = json.dumps(meta, separators=(",", ":")).encode("ascii")
    if len(text) > _HEADER_BYTES:  # 20-digit sizes still fit; this guards the arithmetic
        raise ValueError(f"safetensors header of {len(text)} bytes exceeds the reserved space")
    return struct.pack("<Q", _HEADER_BYTES) + text.ljust(_HEADER_BYTES, b" ")


class _TensorFile:
    def __init__(self, path: Path, dtype: str, cols: int) -> None:
        self.path, self.dtype, self.cols = path, dtype, cols
        self.tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.f = open(self.tmp, "wb")  # noqa: SIM115 (closed by finish or abort)
        self.f.write(b"\0" * (8 + _HEADER_BYTES))
        self.rows = 0
        self.nbytes = 0
        self.hash = xxhash.xxh3_128()

    def append(self, t: torch.Tensor) -> None:
        b = np.ascontiguousarray(t.numpy()).view(np.uint8).reshape(-1).data
        self.f.write(b)
        self.hash.update(b)
        self.rows += int(t.shape[0])
        self.nbytes += len(b)

    def finish(self) -> dict[str, Any]:
        self.f.seek(0)
        self.f.write(_header(self.dtype, self.rows, self.cols, self.nbytes))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return {
            "file": self.path.name,
            "dtype": self.dtype,
            "shape": [self.rows, self.cols],
            "data_xxh3_128": self.hash.hexdigest(),
        }

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _data_chunks(path: Path) -> Iterator[bytes]:
    # plain reads, not the mapping: pages read through a mapping count in the process's RSS
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        while chunk := f.read(_READ_CHUNK):
            yield chunk


class FileRows:
    """Rows appended to ``<prefix>.<tensor>.safetensors`` files in ``directory`` as they come.

    Args:
        directory: the data cache directory (created if missing).
        prefix: file name prefix, e.g. ``<cache key>.train``.
        seq_len: columns of every tensor.
        masked: whether rows carry ``position_ids``.

    Raises:
        OSError: the directory or a file cannot be created or written (also from
            :meth:`add` and :meth:`dataset`, e.g. a full disk); :meth:`close` then removes
            what was written.
    """

    def __init__(self, directory: Path, prefix: str, seq_len: int, masked: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.seq_len = seq_len
        self.stats = RowStats()
        names = NAMES if masked else NAMES[:3]
        self._files: dict[str, _TensorFile] = {}
        try:
            for n in names:
                path = directory / f"{prefix}.{n}.safetensors"
                self._files[n] = _TensorFile(path, _DTYPES[n], seq_len)
        except OSError:
            self.close()
            raise
        self.entries: dict[str, dict[str, Any]] = {}

    def add(self, p: Packed) -> None:
        """Append the rows of ``p`` (any number, zero included) to the files."""
        self.stats.add(p)
        for name, t in _tensors(p).items():
            self._files[name].append(t)

    def dataset(self, settings: dict[str, Any]) -> TokenizedDataset:
        """Commit the files and return their rows, memory-mapped; :attr:`entries` then
        describes the files for the cache entry (name, dtype, shape, XXH3-128 of the
        tensor bytes)."""
        for name, tf in self._files.items():
            self.entries[name] = tf.finish()
        paths = [tf.path for tf in self._files.values()]
        self._files = {}
        fp = fingerprint_of(
            [self.stats.rows, self.seq_len], settings, (c for p in paths for c in _data_chunks(p))
        )
        return dataset_from_files(paths[0].parent, self.entries, settings, fp)

    def close(self) -> None:
        """Remove the temporary files of an unfinished store (no-op after :meth:`dataset`)."""
        for tf in self._files.values():
            tf.abort()
        self._files = {}


def _header_of(path: Path, entry: dict[str, Any]) -> int:
    # the JSON header's length, once the header is found to describe the entry's tensor
    dtype = entry["dtype"]
    rows, cols = entry["shape"]
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))["t"]
    nbytes = rows * cols * np.dtype(_NUMPY[dtype]).itemsize
    if header != {"dtype": dtype, "shape": [rows, cols], "data_offsets": [0, nbytes]}:
        raise ValueError(f"{path.name}: header {header} does not match the cache entry")
    return int(n)


def _open(path: Path, entry: dict[str, Any]) -> torch.Tensor:
    dtype = entry["dtype"]
    rows, cols = entry["shape"]
    n = _header_of(path, entry)
    if rows == 0:
        return torch.zeros((0, cols), dtype=_TORCH[dtype])
    # copy-on-write: a private mapping torch may treat as writable, never written back
    arr = np.memmap(path, dtype=_NUMPY[dtype], mode="c", offset=8 + n, shape=(rows, cols))
    return torch.from_numpy(arr)


def verify_file(directory: Path, entry: dict[str, Any]) -> bool:
    """Whether the file of ``entry`` holds the tensor it was written with: a header
    describing the entry's dtype and shape, and tensor bytes with the entry's XXH3-128.

    Raises:
        OSError: the file cannot be read.
        ValueError, KeyError: its header or the entry is malformed.
    """
    path = directory / entry["file"]
    _header_of(path, entry)
    h = xxhash.xxh3_128()
    for chunk in _data_chunks(path):
        h.update(chunk)
    return bool(h.hexdigest() == entry["data_xxh3_128"])


def dataset_from_files(
    directory: Path, entries: dict[str, dict[str, Any]], settings: dict[str, Any], fingerprint: str
) -> TokenizedDataset:
    """The data set of the files ``entries`` describes (see :attr:`FileRows.entries`),
    memory-mapped, with its known ``fingerprint``.

    Raises:
        OSError: a file cannot be opened.
        ValueError: a file's header does not match its entry; the files' shapes differ.
        KeyError: an entry lacks a field.
    """
    t = {n: _open(directory / e["file"], e) for n, e in entries.items()}
    return TokenizedDataset(
        t["input_ids"],
        t["labels"],
        t["attention_mask"],
        settings,
        t.get("position_ids"),
        fingerprint=fingerprint,
    )
