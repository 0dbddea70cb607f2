"""On-disk cache of tokenised data sets: safetensors files for the rows, JSON for the rest.

An entry is named after its key (an XXH3-128 hex digest of the file content hashes, the
tokenizer identity and every setting that shapes the tensors): ``<key>.json`` and one
safetensors file per split and tensor, ``<key>.<split>.<tensor>.safetensors``, written as
the rows are built (:class:`~.rowstore.FileRows`). Every file is written to a temporary
name, fsynced and renamed into place, the JSON last; the JSON records each tensor file's
dtype, shape and XXH3-128 of its tensor bytes, so a torn or foreign file is detected and the
entry rebuilt (a cache entry is always replaceable). Concurrent runs building the same entry
write the same bytes under the same names; renames are atomic, so a reader sees one whole
file or the other. Nothing is pickled.

A run killed while building leaves ``*.tmp-<pid>-<id>`` files behind; they are never read
and may be deleted.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import xxhash

from evertrain.data.rowstore import verify_file
from evertrain.fsutil import atomic_write_bytes

log = logging.getLogger("evertrain.data")
# 3: packed rows overlap by one token where a document continues (2: they did not: the
# first target after each cut was never scored); 2: one safetensors file per tensor,
# memory-mapped (1: one file for all, read into memory)
CACHE_VERSION = 3


def cache_key(spec: dict[str, Any]) -> str:
    """XXH3-128 hex digest of ``spec`` as canonical JSON."""
    text = json.dumps(
        {"cache_version": CACHE_VERSION, **spec}, sort_keys=True, separators=(",", ":")
    )
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))


def load(cache_dir: Path, key: str) -> dict[str, Any] | None:
    """The JSON of entry ``key`` once every tensor file it lists has been verified, or
    ``None`` if the entry is absent or damaged (logged). ``meta["tensors"][split]`` is the
    ``entries`` argument of :func:`~.rowstore.dataset_from_files`."""
    meta_path = cache_dir / f"{key}.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise ValueError("it names another key")
        for split in ("train", "val"):
            for entry in meta["tensors"][split].values():
                if not verify_file(cache_dir, entry):
                    raise ValueError(f"{entry['file']} does not match its hash")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        log.warning("data cache entry %s unusable (%s); rebuilding it", meta_path, e)
        return None
    return meta


def store(cache_dir: Path, key: str, meta: dict[str, Any]) -> Path:
    """Write the JSON of entry ``key`` atomically (after its tensor files); returns its path.

    Raises:
        OSError: the file cannot be written.
    """
    meta_path = cache_dir / f"{key}.json"
    full = {**meta, "key": key}
    atomic_write_bytes(meta_path, json.dumps(full, sort_keys=True, indent=1).encode("utf-8"))
    return meta_path
