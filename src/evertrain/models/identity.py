"""Content hashes that identify a base model (so a resume against another base is refused).

All hashes are XXH3-128 (``xxhash``), written as ``"xxh3_128:<32 hex digits>"``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import xxhash

_CHUNK = 8 << 20  # bytes per read: large enough for disk throughput, small enough for RAM
PREFIX = "xxh3_128:"


def _update_file(h: xxhash.xxh3_128, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def hash_file(path: str | Path) -> str:
    """XXH3-128 of a file's bytes.

    Raises:
        OSError: the file cannot be read.
    """
    h = xxhash.xxh3_128()
    _update_file(h, Path(path))
    return PREFIX + h.hexdigest()


def hash_files(paths: Iterable[Path], root: Path) -> str:
    """XXH3-128 over several files: for each, in name order, its path relative to ``root``,
    its size in bytes (little-endian u64) and its bytes. Renaming or resizing a file
    changes the hash, not just editing it.
    """
    h = xxhash.xxh3_128()
    for p in sorted(paths, key=lambda q: q.relative_to(root).as_posix()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(struct.pack("<Q", p.stat().st_size))
        _update_file(h, p)
    return PREFIX + h.hexdigest()


def hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """XXH3-128 over named tensors in name order: name, dtype, shape, then the raw bytes.

    Args:
        tensors: name -> tensor of any dtype/device (copied to CPU to read the bytes).
    """
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return PREFIX + h.hexdigest()
