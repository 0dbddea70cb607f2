"""Writing a checkpoint directory durably and committing it atomically (format v1).

Every file is written to ``step-N.tmp/``, hashed as written and fsynced, ``manifest.json``
last (sealed by :func:`~evertrain.checkpoint.format.seal_manifest`); then the directory is
renamed to ``step-N`` and its parent fsynced (``docs/checkpoint-format.md``, "Commit
protocol").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar, Token
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from evertrain import faults
from evertrain.checkpoint.errors import CheckpointError, CheckpointWriteError
from evertrain.checkpoint.format import (
    FORMAT_VERSION,
    MANIFEST,
    PreparedCheckpoint,
    prepare_checkpoint,
    seal_manifest,
)

if TYPE_CHECKING:
    from evertrain.checkpoint.ranks import PeerFiles

_CHUNK = 16 << 20  # write/hash granularity; bounds no memory, only syscall count
_SMALL = 1 << 20  # parts below this are gathered into one write


def _write_out(fd: int, h: Any, data: memoryview) -> None:
    for i in range(0, len(data), _CHUNK):
        chunk = data[i : i + _CHUNK]
        h.update(chunk)
        while chunk:
            chunk = chunk[os.write(fd, chunk) :]


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_fsync_pool: ThreadPoolExecutor | None = None
_fsync_pool_lock = threading.Lock()


class _Syncer:
    """fsyncs and closes files on helper threads while the writer goes on with the next
    file: a checkpoint's CPU work (JSON encoding, hashing, copying into the page cache)
    overlaps the disk's flushes instead of waiting for each, and concurrent fsyncs share
    journal commits. :meth:`finish` waits until every file handed over is fsynced, so each
    is durable before the directory is renamed (the commit protocol of
    docs/checkpoint-format.md). The 4 threads are shared by all commits and kept (starting
    them anew costs milliseconds per commit on a small VM)."""

    def __init__(self) -> None:
        global _fsync_pool
        with _fsync_pool_lock:
            if _fsync_pool is None:
                _fsync_pool = ThreadPoolExecutor(4, thread_name_prefix="evertrain-fsync")
            self._pool = _fsync_pool
        self._pending: list[Future[None]] = []

    def submit(self, fd: int) -> None:
        """fsync and close ``fd`` (it now belongs to the syncer)."""
        self._pending.append(self._pool.submit(_fsync_close, fd))

    def finish(self) -> None:
        """Wait for every submitted fsync; raise the first OSError. Idempotent."""
        pending, self._pending = self._pending, []
        errors = [e for f in pending if (e := f.exception()) is not None]
        if errors:
            raise errors[0]


# Set by commit_checkpoint for its data files; elsewhere (None) every file is fsynced
# before _write_parts returns.
_deferred_sync: ContextVar[_Syncer | None] = ContextVar("evertrain_deferred_sync", default=None)


def _write_parts(path: Path, parts: Iterable[Any]) -> dict[str, Any]:
    """Write the concatenation of ``parts`` (bytes-like) to a new file and fsync it (inside
    :func:`commit_checkpoint`: hand the fsync to its syncer thread).

    The XXH3-128 digest is computed over the bytes as they are handed to the OS (no second
    read). Parts under 1 MiB are gathered before writing (a safetensors file of a model has
    hundreds of small tensors: one syscall each would dominate); larger ones are written
    from their own memory, without a copy.
    """
    h = xxhash.xxh3_128()
    size, pending = 0, bytearray()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            size += len(view)
            if len(view) < _SMALL:
                pending += view
                if len(pending) < _SMALL:
                    continue
                view = memoryview(b"")
            if pending:
                _write_out(fd, h, memoryview(pending))
                pending = bytearray()
            _write_out(fd, h, view)
        _write_out(fd, h, memoryview(pending))
        syncer = _deferred_sync.get()
        if syncer is None:
            os.fsync(fd)
        else:
            syncer.submit(fd)
            fd = -1
    finally:
        if fd >= 0:
            os.close(fd)
    return {"size": size, "xxh3_128": h.hexdigest()}


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to a new file and fsync it; the XXH3-128 digest is of the written bytes."""
    return _write_parts(path, [data])


def write_owner_files(tmp: Path, prepared: Any, global_step: int) -> dict[str, Any]:
    """Write every owner's ``.json`` (and ``.safetensors``) of ``prepared`` into ``tmp``;
    return the manifest entries. Fault point ``save@global_step`` fires after the first
    file, so crash tests hit a half-written checkpoint on every rank alike."""
    files: dict[str, Any] = {}
    for owner in prepared.owners:
        files[f"{owner.name}.json"] = _write_file(tmp / f"{owner.name}.json", owner.json_bytes)
        if len(files) == 1:
            faults.maybe_crash("save", global_step)
        if owner.tensors is not None:
            name = f"{owner.name}.safetensors"
            files[name] = _write_parts(tmp / name, owner.tensor_parts())
    return files


def fsync_dir(path: Path) -> None:
    # Without this, a power loss can forget the rename or the new directory entries.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_checkpoint(
    directory: Path, prepared: PreparedCheckpoint, peers: PeerFiles | None = None
) -> int:
    """Write and atomically commit ``prepared`` at ``directory``; return the bytes written
    (every file, the manifest included).

    See :func:`write_checkpoint` for the protocol, the fault points and the errors (minus
    the validation, done by :func:`prepare_checkpoint`). ``peers`` (multi-process runs, see
    :mod:`evertrain.checkpoint.ranks`): the other ranks write their own files into the
    temporary directory once it exists; their entries join the manifest only after every
    rank reported success.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    global_step = prepared.global_step
    for target in (directory, tmp):
        if target.exists():
            raise CheckpointError(f"{target} already exists; refusing to overwrite it")
    files: dict[str, Any] = {}
    syncer = _Syncer()
    token: Token[_Syncer | None] = _deferred_sync.set(syncer)
    deferring = True
    try:
        tmp.mkdir(parents=True)
        if peers is not None:
            peers.start(tmp)
        files.update(write_owner_files(tmp, prepared, global_step))
        if peers is not None:
            files.update(peers.finish(tmp, dict(files)))
        manifest = {
            "format_version": FORMAT_VERSION,
            "global_step": global_step,
            "files": files,
            "summary": prepared.summary,
        }
        sealed = seal_manifest(manifest)
        _write_file(tmp / MANIFEST, sealed)
        _deferred_sync.reset(token)
        deferring = False
        syncer.finish()  # every file, the manifest too, durable before the rename
        faults.maybe_crash("commit", global_step)
        fsync_dir(tmp)
        os.rename(tmp, directory)
        fsync_dir(directory.parent)
    except BaseException as e:
        if deferring:
            _deferred_sync.reset(token)
        with contextlib.suppress(OSError):
            syncer.finish()  # closes the files before they are removed
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointWriteError(
                f"{directory}: writing the checkpoint failed ({e.strerror or e}); the partial "
                f"{tmp.name} was removed, older checkpoints are untouched"
            ) from e
        raise
    return len(sealed) + sum(f["size"] for f in files.values())


def write_checkpoint(
    directory: Path,
    states: Mapping[str, Mapping[str, Any]],
    summary: Mapping[str, Any],
    *,
    global_step: int,
) -> Path:
    """Write and atomically commit one checkpoint at ``directory`` (e.g. ``.../step-00000120``).

    Files go to ``<directory>.tmp/``; each is fsynced, ``manifest.json`` is written last, the
    temporary directory is renamed to ``directory`` and the parent fsynced. Tensor bytes go
    from the tensors' memory to the file (no in-memory copy of the file; see
    :mod:`evertrain.checkpoint.safetensors_stream`), hashed on the way. Fault points
    ``save@global_step`` (after the first data file) and ``commit@global_step`` (manifest
    written, not yet renamed) serve the crash tests (:mod:`evertrain.faults`).

    Args:
        directory: final checkpoint directory; it and ``<directory>.tmp`` must not exist.
        states: owner name (``[a-z0-9_]+``) -> state dict (see :mod:`evertrain.state`);
            tensors on CPU (or CUDA: copied to the host one at a time).
        summary: JSON-able description stored in the manifest (global_step, epoch,
            ``metrics`` such as val_loss, wall time, library versions).
        global_step: optimizer steps completed; stored in the manifest.

    Returns:
        ``directory``.

    Raises:
        CheckpointError: bad owner name, a value that is not JSON/tensor, a dtype
            safetensors cannot store, or an existing target. Nothing is left behind.
        CheckpointWriteError: an OS error while writing (e.g. ``ENOSPC``); the partial
            ``.tmp`` directory is removed.
    """
    directory = Path(directory)
    if not states:
        raise CheckpointError(f"{directory}: no states to save")
    commit_checkpoint(directory, prepare_checkpoint(states, summary, global_step=global_step))
    return directory
