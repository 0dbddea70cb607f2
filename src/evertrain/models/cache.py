"""The converted-model cache: build once, verify on every use, rebuild when stale.

An entry is a directory ``<root>/<name>`` holding a plain Hugging Face model (config,
safetensors weights, tokenizer) plus ``evertrain_cache.json``, the manifest: the source
file's hash, the dtype, and every file's size and XXH3-128. An entry is used only if the
manifest matches what is expected and every file still has its recorded size and hash;
otherwise it is rebuilt. Entries are built in a hidden temporary directory and renamed
into place, so a crash mid-conversion never leaves an entry that looks complete. A lock
file (``fcntl.flock``) keeps two processes from converting the same entry at once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evertrain.fsutil import make_tmp_dir, tmp_prefix
from evertrain.models.identity import hash_file
from evertrain.models.stamps import read_stamps, stamp, write_stamps

MANIFEST = "evertrain_cache.json"
FORMAT_VERSION = 1


def cache_root(cache_dir: str | None) -> Path:
    """Directory holding converted models.

    ``model.cache_dir`` if set, else ``$EVERTRAIN_CACHE/models``, else
    ``~/.cache/evertrain/models``.
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("EVERTRAIN_CACHE")
    if env:
        return Path(env).expanduser() / "models"
    return Path.home() / ".cache" / "evertrain" / "models"


def check_entry(entry: Path, expect: dict[str, Any], full: bool = False) -> str | None:
    """Why the entry cannot be used (one line), or ``None`` when it is complete and current.

    Every file's size is checked, and its XXH3-128 against the manifest unless its stat
    stamp still matches the one taken when it was last hashed (:mod:`~.stamps`).

    Args:
        entry: the entry directory.
        expect: manifest fields that must match exactly (e.g. ``source_hash``, ``dtype``).
        full: hash every file, stamps or not (after a build).
    """
    mpath = entry / MANIFEST
    if not mpath.is_file():
        return f"{mpath} is missing (never built, or the build did not finish)"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{mpath} is unreadable: {e}"
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return f"{mpath}: format_version is not {FORMAT_VERSION}"
    for key, want in expect.items():
        if manifest.get(key) != want:
            return f"{mpath}: {key} is {manifest.get(key)!r}, expected {want!r}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{mpath}: no file list"
    # files whose stat stamp matches the one taken at their last full check are not read
    # again (see evertrain.models.stamps); the rest are hashed and their stamps renewed
    stamps_path = entry.parent / f".{entry.name}.stamps.json"
    old = {} if full else read_stamps(stamps_path)
    new: dict[str, Any] = {}
    for name, info in files.items():
        p = entry / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != info.get("size"):
            return f"{p} has {p.stat().st_size} bytes, the manifest says {info.get('size')}"
        now = stamp(p)
        if old.get(name) != [*now, info.get("hash")] and hash_file(p) != info.get("hash"):
            return f"{p} content hash differs from the manifest (corrupted or edited)"
        new[name] = [*now, info.get("hash")]
    if new != old:
        write_stamps(stamps_path, new)
    return None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; concurrent builds then only waste time
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_entry(
    entry: Path,
    expect: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
    log: Callable[[str], None] | None = None,
) -> Path:
    """Return ``entry``, building it first unless :func:`check_entry` accepts it.

    Args:
        entry: entry directory (its parent is created).
        expect: manifest fields the entry must have; written into a new manifest.
        build: writes the converted files into the empty directory it is given and returns
            extra JSON fields for the manifest. Must raise to reject its own output.
        log: receives one line saying why a build happens.

    Raises:
        Whatever ``build`` raises; nothing is published then and its files are removed.
        ModelCacheError: the freshly built entry fails its own check.
    """
    from evertrain.models.errors import ModelCacheError

    if check_entry(entry, expect) is None:
        return entry
    root = entry.parent
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{entry.name}.lock"):
        reason = check_entry(entry, expect)  # another process may have built it meanwhile
        if reason is None:
            return entry
        if log is not None:
            log(f"building model cache {entry}: {reason}")
        # Under the lock, leftovers of earlier builds of this entry are from crashed
        # processes: a build's own temporary directory only lives while it holds the lock.
        for pattern in (f"{tmp_prefix(entry)}*", f".{entry.name}.old-*"):
            for p in root.glob(pattern):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
        tmp = make_tmp_dir(entry)
        old: Path | None = None
        try:
            extra = build(tmp)
            files = {
                p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "hash": hash_file(p)}
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            manifest = {"format_version": FORMAT_VERSION, **expect, **extra, "files": files}
            # The manifest is written last: its presence is what marks an entry complete.
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            if entry.exists() or entry.is_symlink():
                # A stale entry is derived data; move it aside (not delete) until the new
                # one is in place, so a crash here leaves no half-removed entry visible.
                old = root / f".{entry.name}.old-{os.getpid()}"
                os.rename(entry, old)
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        problem = check_entry(entry, expect, full=True)
        if problem is not None:
            raise ModelCacheError(f"model cache {entry} failed its check after building: {problem}")
    return entry
