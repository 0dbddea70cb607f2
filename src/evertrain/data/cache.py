"""On-disk cache of tokenised data sets: safetensors for tensors, JSON for the rest.

An entry is two files in ``data.cache_dir`` named after its key (an XXH3-128 hex digest of
the file content hashes, the tokenizer identity and every setting that shapes the tensors):
``<key>.safetensors`` and ``<key>.json``. Each is written to a temporary file, fsynced and
renamed into place, the JSON last; the JSON records the XXH3-128 of the safetensors bytes, so
a torn or foreign tensor file is detected and the entry rebuilt (a cache entry is always
replaceable). Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import xxhash

from evertrain.fsutil import atomic_write_bytes

log = logging.getLogger("evertrain.data")
CACHE_VERSION = 1


def cache_key(spec: dict[str, Any]) -> str:
    """XXH3-128 hex digest of ``spec`` as canonical JSON."""
    text = json.dumps(
        {"cache_version": CACHE_VERSION, **spec}, sort_keys=True, separators=(",", ":")
    )
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))


def load(cache_dir: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The entry ``key`` as ``(tensors, meta)``, or ``None`` if absent or damaged (logged)."""
    meta_path = cache_dir / f"{key}.json"
    data_path = cache_dir / f"{key}.safetensors"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        blob = data_path.read_bytes()
    except (OSError, ValueError) as e:
        log.warning("data cache entry %s unreadable (%s); rebuilding it", meta_path, e)
        return None
    if (
        not isinstance(meta, dict)
        or meta.get("key") != key
        or meta.get("tensors_xxh3_128") != xxhash.xxh3_128_hexdigest(blob)
    ):
        log.warning("data cache entry %s does not match its tensors; rebuilding it", meta_path)
        return None
    return safetensors.torch.load(blob), meta


def store(
    cache_dir: Path, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write the entry ``key`` atomically; returns the JSON file's path.

    Raises:
        OSError: the directory cannot be created or written.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    blob = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})
    atomic_write_bytes(cache_dir / f"{key}.safetensors", blob)
    full = {**meta, "key": key, "tensors_xxh3_128": xxhash.xxh3_128_hexdigest(blob)}
    meta_path = cache_dir / f"{key}.json"
    atomic_write_bytes(meta_path, json.dumps(full, sort_keys=True, indent=1).encode("utf-8"))
    return meta_path
