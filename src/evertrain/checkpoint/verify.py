"""Verifying and reading a checkpoint directory (format v1): every listed file's size and
XXH3-128 digest, the manifest's own digest, and every tensor reference; each byte is read
once, hashed and parsed from the same buffer. Only ``.json`` and ``.safetensors`` files are
parsed; unlisted files are never opened.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import xxhash

from evertrain.checkpoint.errors import CorruptCheckpointError, Problem
from evertrain.checkpoint.format import (
    FORMAT_VERSION,
    MANIFEST,
    OWNER_RE,
    STEP_DIR_RE,
    TENSOR_REF,
    LoadedCheckpoint,
    unseal_problem,
)

_SUFFIXES = (".json", ".safetensors")  # the only files ever opened
_HEX128 = re.compile(r"[0-9a-f]{32}")


def _check_manifest(m: Any, blob: bytes) -> str | None:
    """Why ``m`` (parsed from ``blob``) is not an intact v1 manifest, or None."""
    if not isinstance(m, dict):
        return f"top level is a {type(m).__name__}, expected an object"
    v = m.get("format_version")
    if v is None:
        return "no format_version: not an evertrain checkpoint manifest"
    if v != FORMAT_VERSION:
        return (
            f"format_version {v!r} is not supported: this evertrain reads format_version "
            f"{FORMAT_VERSION}; use the evertrain version that wrote it"
        )
    sealed = unseal_problem(blob, m)
    if sealed is not None:
        return sealed
    if not isinstance(m.get("global_step"), int) or not isinstance(m.get("summary"), dict):
        return "global_step (int) or summary (object) missing or of the wrong type"
    files = m.get("files")
    if not isinstance(files, dict):
        return "files (object) missing or of the wrong type"
    for name, e in files.items():
        if not (
            isinstance(e, dict)
            and isinstance(e.get("size"), int)
            and isinstance(e.get("xxh3_128"), str)
            and _HEX128.fullmatch(e["xxh3_128"])
        ):
            return f"entry {name!r} needs size (int) and xxh3_128 (32 hex digits)"
    return None


def _entry_problem(name: str) -> str | None:
    """Why the manifest entry ``name`` must not be opened, or None."""
    if "/" in name or "\\" in name or ".." in name or name == MANIFEST:
        return "unsafe file name in the manifest (path separator, '..' or the manifest); refused"
    suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        return (
            "listed in the manifest but only .json and .safetensors files are read "
            "(nothing is unpickled); refused without opening it"
        )
    if not OWNER_RE.fullmatch(name[: -len(suffix)]):
        return "owner name in the file name is not [a-z0-9_]+; refused"
    return None


def _read_listed(directory: Path, name: str, entry: dict[str, Any]) -> tuple[bytes | None, str]:
    path = directory / name
    try:
        size = path.stat().st_size
        if size != entry["size"]:
            return None, (
                f"size mismatch: manifest says {entry['size']} bytes, file has {size} "
                f"(truncated or overwritten)"
            )
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, "missing (listed in the manifest)"
    except OSError as e:
        return None, f"cannot read: {e}"
    digest = xxhash.xxh3_128(data).hexdigest()
    if len(data) != entry["size"] or digest != entry["xxh3_128"]:
        return None, (
            f"content hash mismatch (xxh3_128 {digest}, manifest says "
            f"{entry['xxh3_128']}): the file is corrupted"
        )
    return data, ""


def _rebuild(node: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    if isinstance(node, dict):
        if len(node) == 1 and isinstance(node.get(TENSOR_REF), str):
            key = node[TENSOR_REF]
            if key not in tensors:
                raise KeyError(key)
            used.add(key)
            return tensors[key]
        return {k: _rebuild(v, tensors, used) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebuild(v, tensors, used) for v in node]
    return node


def _scan(
    directory: Path, only: Callable[[str], bool] | None = None
) -> tuple[list[Problem], dict[str, Any], dict[str, dict[str, Any]]]:
    """Verify ``directory`` and parse it from the same bytes: (problems, manifest, states);
    with ``only``, just the owners it accepts (the others are neither read nor checked)."""
    if not directory.is_dir():
        return [Problem(str(directory), "not a directory")], {}, {}
    try:
        blob = (directory / MANIFEST).read_bytes()
        manifest = json.loads(blob)
    except FileNotFoundError:
        gone = "missing: never committed (crash before the commit) or deleted; not a checkpoint"
        return [Problem(MANIFEST, gone)], {}, {}
    except (OSError, ValueError) as e:
        return [Problem(MANIFEST, f"unreadable or not valid JSON ({e})")], {}, {}
    bad = _check_manifest(manifest, blob)
    if bad is not None:
        return [Problem(MANIFEST, bad)], {}, {}
    files: dict[str, Any] = manifest["files"]
    listed = files
    if only is not None:
        files = {n: e for n, e in files.items() if only(n.partition(".")[0])}
    problems = [
        Problem(n, "unlisted file, ignored (never opened)", fatal=False)
        for n in sorted(os.listdir(directory))
        if n != MANIFEST and n not in listed
    ]
    m = STEP_DIR_RE.match(directory.name)
    if m and int(m.group(1)) != manifest["global_step"]:
        problems.append(
            Problem(
                MANIFEST,
                f"global_step {manifest['global_step']} does not "
                f"match the directory name {directory.name}",
            )
        )
    trees: dict[str, Any] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, entry in files.items():
        why = _entry_problem(name)
        data = None
        if why is None:
            data, why = _read_listed(directory, name, entry)
        if data is None:
            problems.append(Problem(name, why))
            continue
        owner, _, kind = name.partition(".")
        try:
            if kind == "json":
                trees[owner] = json.loads(data)
                if not isinstance(trees[owner], dict):
                    problems.append(Problem(name, "top level is not a JSON object"))
            else:
                tensors[owner] = safetensors.torch.load(data)
        except (ValueError, KeyError, safetensors.SafetensorError) as e:  # KeyError: dtype
            what = "not valid JSON" if kind == "json" else "safetensors header unreadable"
            problems.append(Problem(name, f"{what}: {e}"))
    states: dict[str, dict[str, Any]] = {}
    for name in files:
        owner = name.partition(".")[0]
        if name.endswith(".safetensors") and f"{owner}.json" not in files:
            problems.append(Problem(name, f"no {owner}.json in the manifest refers to it"))
    for owner, tree in trees.items():
        if not isinstance(tree, dict) or (f"{owner}.safetensors" in files and owner not in tensors):
            continue  # already reported
        used: set[str] = set()
        owned = tensors.get(owner, {})
        try:
            states[owner] = _rebuild(tree, owned, used)
        except KeyError as e:
            why = f"refers to tensor {e.args[0]!r}, not in a listed {owner}.safetensors"
            problems.append(Problem(f"{owner}.json", why))
            continue
        if set(owned) - used:
            extra = sorted(set(owned) - used)[:3]
            problems.append(
                Problem(f"{owner}.safetensors", f"tensors not referenced by {owner}.json: {extra}")
            )
    return problems, manifest, states


def verify_checkpoint(path: Path) -> list[Problem]:
    """Check one checkpoint directory completely; ``[]`` means valid.

    Checks: the manifest exists, is JSON and format_version 1; every listed file is a
    plain ``<owner>.json`` / ``<owner>.safetensors`` name, exists, has the listed size and
    XXH3-128 digest, and parses; every tensor reference resolves. Unlisted files are
    reported as non-fatal warnings and never opened. Reads every byte once.
    """
    return _scan(Path(path))[0]


def read_checkpoint(path: Path, owners: Callable[[str], bool] | None = None) -> LoadedCheckpoint:
    """Verify and load one checkpoint directory (each file read once: hashed and parsed).

    Args:
        path: the ``step-N`` directory.
        owners: read only the owners (file name before the extension, e.g. ``model``,
            ``model_rank1``) this accepts: the manifest is checked whole, the other owners'
            files are not read (an export need not load the optimizer). None: every owner.

    Raises:
        CorruptCheckpointError: any fatal problem (``.problems`` lists them all).
    """
    path = Path(path)
    problems, manifest, states = _scan(path, owners)
    if any(p.fatal for p in problems):
        raise CorruptCheckpointError(path, problems)
    return LoadedCheckpoint(path=path, states=states, manifest=manifest)
