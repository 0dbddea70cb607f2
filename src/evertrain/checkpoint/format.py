"""Checkpoint format v1: write, verify and read one checkpoint directory.

Layout and commit protocol are specified in ``docs/checkpoint-format.md``. In short: per
owner ``<owner>.json`` (the nested state with each tensor replaced by
``{"__tensor__": "<key>"}``) and, if it holds tensors, ``<owner>.safetensors``; then
``manifest.json`` with every file's size and XXH3-128 digest, written last into
``step-N.tmp/`` and published by renaming the directory. Only ``.json`` and
``.safetensors`` files are ever parsed; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar, Token
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _encode_str
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import safetensors.torch
import torch
import xxhash

from evertrain import faults
from evertrain.checkpoint import safetensors_stream as stream
from evertrain.checkpoint.errors import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    Problem,
)

if TYPE_CHECKING:
    from evertrain.checkpoint.ranks import PeerFiles

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSOR_REF = "__tensor__"
OWNER_RE = re.compile(r"[a-z0-9_]+")
STEP_DIR_RE = re.compile(r"step-(\d{8,})")
_SUFFIXES = (".json", ".safetensors")
# dtypes safetensors both writes and reads back. It also *writes* float8_e8m0fnu and
# float4_e2m1fn_x2 but cannot load them (KeyError): such a checkpoint would be unloadable.
_DTYPE_NAMES = (
    "float64 float32 float16 bfloat16 float8_e4m3fn float8_e4m3fnuz float8_e5m2 "
    "float8_e5m2fnuz complex64 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool"
)
DTYPES = frozenset(d for n in _DTYPE_NAMES.split() if (d := getattr(torch, n, None)) is not None)
_CHUNK = 16 << 20  # write/hash granularity; bounds no memory, only syscall count
_SMALL = 1 << 20  # parts below this are gathered into one write
_HEX128 = re.compile(r"[0-9a-f]{32}")
SELF_DIGEST = "manifest_xxh3_128"  # the manifest's own digest, see _seal
_SELF_PREFIX = b'"manifest_xxh3_128": "'


def step_dir_name(global_step: int) -> str:
    """``step-00000120`` for global_step 120 (8 digits, zero-padded; more digits past 10^8)."""
    if global_step < 0:
        raise CheckpointError(f"global_step must be >= 0, got {global_step}")
    return f"step-{global_step:08d}"


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint read into memory.

    Attributes:
        path: the checkpoint directory.
        states: owner name -> state dict (nested dicts/lists of JSON values and CPU tensors).
        manifest: the parsed ``manifest.json`` (``format_version``, ``global_step``,
            ``files``, ``summary``).
    """

    path: Path
    states: dict[str, dict[str, Any]]
    manifest: dict[str, Any]

    @property
    def global_step(self) -> int:
        return int(self.manifest["global_step"])

    @property
    def summary(self) -> dict[str, Any]:
        return dict(self.manifest["summary"])


# --------------------------------------------------------------------------- writing


_SCALARS = frozenset((bool, int, float, str))


def _split(owner: str, node: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON tree of ``node`` with tensors moved into ``tensors`` under their ``key``: the
    path from the owner's top level joined by "/" (``""`` at the top level).

    The tree is rebuilt (new dicts and lists), so later changes to ``node``'s containers do
    not reach it; tensors are not copied (non-contiguous ones are made contiguous). Called
    once per node of every state at every save: kept lean (a LoRA optimizer has ~1000).
    """
    if node is None or type(node) in _SCALARS:
        return node
    if isinstance(node, torch.Tensor):
        if key in tensors:  # a dict key containing "/" would silently overwrite a tensor
            raise CheckpointError(
                f"{owner}: two tensors map to key {key!r}; a dict key contains '/', rename it"
            )
        t = node.detach()
        if type(t) is not torch.Tensor or not (t.is_cpu or t.is_cuda) or t.is_sparse:
            raise CheckpointError(
                f"{owner}: tensor at {key or '(top level)'} is a {type(t).__name__} on "
                f"{t.device} with layout {t.layout}; state dicts hold dense CPU (or CUDA) "
                f"torch.Tensor only (move it with .cpu(), gather DTensors, densify sparse tensors)"
            )
        if t.layout != torch.strided:
            raise CheckpointError(
                f"{owner}: tensor at {key or '(top level)'} has layout {t.layout}; state dicts "
                f"hold dense tensors only (densify it)"
            )
        if t.dtype not in DTYPES:
            raise CheckpointError(
                f"{owner}: tensor at {key or '(top level)'} has dtype {t.dtype}, which format "
                f"v1 cannot store and read back; supported: {_DTYPE_NAMES}"
            )
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        # Tensors sharing memory (tied weights, views) need no copy: each one's bytes are
        # written separately.
        tensors[key] = t if t.is_contiguous() else t.contiguous()
        return {TENSOR_REF: key}
    prefix = f"{key}/" if key else ""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if type(k) is not str and not isinstance(k, str):
                raise CheckpointError(
                    f"{owner}: key {k!r} at {key or '(top level)'} is a {type(k).__name__}; "
                    f"JSON keys must be str (convert, e.g. str(k))"
                )
            if k == TENSOR_REF:
                raise CheckpointError(
                    f"{owner}: key {TENSOR_REF!r} at {key or '(top level)'} is reserved for "
                    f"tensor references"
                )
            out[k] = _split(owner, v, prefix + k, tensors)
        return out
    if isinstance(node, list):
        return [_split(owner, v, f"{prefix}{i}", tensors) for i, v in enumerate(node)]
    if isinstance(node, (bool, int, float, str)):
        return node
    raise CheckpointError(
        f"{owner}: value at {key or '(top level)'} has type {type(node).__name__}; state "
        f"dicts hold only dicts, lists, JSON scalars and CPU tensors (tuples do not survive "
        f"JSON: use lists)"
    )


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


def _dump_tree(tree: Any) -> bytes:
    """``_dump_json(tree, 1)`` for a tree made by :func:`_split` (str keys, JSON scalars,
    dicts and lists), byte for byte, about twice as fast: with an indent, ``json`` runs its
    pure-Python generator-based encoder. Same rules as ``json.dumps(indent=1,
    ensure_ascii=True, allow_nan=True)``: items separated by ``","`` and a newline, one
    space of indent per level, key separator ``": "``, ``NaN``/``Infinity``/``-Infinity``,
    ``float.__repr__``; tests/test_async_checkpoint.py compares the two on random trees."""
    parts: list[str] = []
    append = parts.append

    def encode(o: Any, level: int) -> None:
        if isinstance(o, str):
            append(_encode_str(o))
        elif o is None:
            append("null")
        elif o is True:
            append("true")
        elif o is False:
            append("false")
        elif isinstance(o, int):
            append(int.__repr__(o))
        elif isinstance(o, float):
            if o != o:
                append("NaN")
            elif o in (math.inf, -math.inf):
                append("Infinity" if o > 0 else "-Infinity")
            else:
                append(float.__repr__(o))
        elif isinstance(o, dict):
            if not o:
                append("{}")
                return
            newline = "\n" + " " * (level + 1)
            sep = "{" + newline
            for k, v in o.items():
                append(sep)
                append(_encode_str(k))
                append(": ")
                encode(v, level + 1)
                sep = "," + newline
            append("\n" + " " * level + "}")
        elif isinstance(o, list):
            if not o:
                append("[]")
                return
            newline = "\n" + " " * (level + 1)
            sep = "[" + newline
            for v in o:
                append(sep)
                encode(v, level + 1)
                sep = "," + newline
            append("\n" + " " * level + "]")
        else:  # _split admits nothing else
            raise TypeError(f"not a JSON value: {type(o).__name__}")

    encode(tree, 0)
    return "".join(parts).encode()


def _dump_json(obj: Any, indent: int) -> bytes:
    # allow_nan: NaN/Infinity are written as JSON5-style tokens that json.loads reads back.
    return json.dumps(obj, indent=indent, allow_nan=True, ensure_ascii=True).encode()


def _seal(manifest: dict[str, Any]) -> bytes:
    """Manifest bytes carrying their own XXH3-128 as the first field.

    The digest covers the file with its 32 hex digits set to "0"; without it a flipped byte
    in the manifest (a size, a summary metric) would go unnoticed.
    """
    blob = _dump_json({SELF_DIGEST: "0" * 32, **manifest}, 2)
    i = blob.index(_SELF_PREFIX) + len(_SELF_PREFIX)
    return blob[:i] + xxhash.xxh3_128(blob).hexdigest().encode() + blob[i + 32 :]


def _unseal_problem(blob: bytes, manifest: dict[str, Any]) -> str | None:
    """Why the manifest's own digest does not match its bytes, or None."""
    i = blob.find(_SELF_PREFIX) + len(_SELF_PREFIX)
    claimed = blob[i : i + 32].decode(errors="replace")
    if i < len(_SELF_PREFIX) or manifest.get(SELF_DIGEST) != claimed:
        return f"{SELF_DIGEST} missing or not the first field"
    actual = xxhash.xxh3_128(blob[:i] + b"0" * 32 + blob[i + 32 :]).hexdigest()
    if actual != claimed:
        return f"content hash mismatch (xxh3_128 {actual}, recorded {claimed}): corrupted"
    return None


def estimate_size(states: Mapping[str, Mapping[str, Any]]) -> int:
    """Approximate on-disk size of ``states`` in bytes (tensor bytes + 64 KiB per owner)."""
    total = 0

    def walk(node: Any) -> None:
        nonlocal total
        if isinstance(node, torch.Tensor):
            total += node.nelement() * node.element_size() + 128
        elif isinstance(node, Mapping):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for state in states.values():
        walk(state)
        total += 64 << 10
    return total


@dataclass
class PreparedOwner:
    """One owner, validated and laid out: the tree of ``<owner>.json`` and the layout of
    ``<owner>.safetensors`` (``None`` when it holds no tensors).

    ``tree`` is a private copy (new dicts and lists, immutable leaves, tensors replaced by
    references): the caller may change its state after :func:`prepare_checkpoint`.
    ``data`` is ``None`` while the tensors are the caller's own (a synchronous save writes
    them from their memory); after staging it is a 1-D ``uint8`` CPU tensor holding the
    data section, and the caller's tensors are no longer needed.
    """

    name: str
    tree: Any
    tensors: stream.Layout | None
    data: torch.Tensor | None = None

    @property
    def json_bytes(self) -> bytes:
        """The bytes of ``<owner>.json``, encoded now: for an asynchronous save, on the
        writer thread. (``indent=1`` runs json's pure-Python encoder, the C one serves only
        ``indent=None``: milliseconds per save the training step need not wait for.)"""
        return _dump_tree(self.tree)

    def tensor_parts(self) -> Iterator[Any]:
        """The ``<owner>.safetensors`` file as bytes-like pieces, in order."""
        assert self.tensors is not None
        yield self.tensors.header
        if self.data is not None:
            yield stream.tensor_bytes(self.data)
            return
        for t in self.tensors.tensors:
            # A CUDA tensor is copied to the host one at a time: bounded extra memory.
            yield stream.tensor_bytes(t if t.device.type == "cpu" else t.cpu())


@dataclass
class PreparedCheckpoint:
    """States checked against format v1 and laid out, ready for :func:`commit_checkpoint`.

    Made by :func:`prepare_checkpoint`; the checkpoint manager stages it for asynchronous
    saves. Package-internal (the layout is format v1's, not a stable API).

    Attributes:
        global_step: optimizer steps completed.
        owners: in the order the states were given.
        summary: a copy of the summary (JSON values only).
    """

    global_step: int
    owners: list[PreparedOwner]
    summary: dict[str, Any]

    @property
    def data_nbytes(self) -> int:
        """Tensor bytes (what staging copies)."""
        return sum(o.tensors.data_nbytes for o in self.owners if o.tensors is not None)

    @property
    def estimated_size(self) -> int:
        """:func:`estimate_size` of the states this was prepared from, without walking them
        again (tensor bytes + 128 per tensor + 64 KiB per owner)."""
        total = len(self.owners) * (64 << 10)
        for o in self.owners:
            if o.tensors is not None:
                total += o.tensors.data_nbytes + 128 * len(o.tensors.tensors)
        return total

    def staging_groups(self) -> list[tuple[torch.Tensor, ...]]:
        """Per owner with tensors, its tensors in file order (see :mod:`.staging`)."""
        return [o.tensors.tensors for o in self.owners if o.tensors is not None]

    def staged(self, views: list[torch.Tensor]) -> PreparedCheckpoint:
        """A copy whose tensor data are ``views`` (one per :meth:`staging_groups` entry)."""
        it = iter(views)
        owners = [
            PreparedOwner(o.name, o.tree, o.tensors, next(it) if o.tensors else None)
            for o in self.owners
        ]
        return PreparedCheckpoint(self.global_step, owners, self.summary)


def prepare_checkpoint(
    states: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any], *, global_step: int
) -> PreparedCheckpoint:
    """Check ``states`` and ``summary`` against format v1 and lay them out (no I/O).

    The JSON trees are copied here, so later changes to the states' dicts and lists do not
    reach the checkpoint; the tensors are referenced, not copied.

    Raises:
        CheckpointError: no states, a bad owner name, a value that is not JSON/tensor, a
            dtype format v1 cannot store, or tensors in ``summary``.
    """
    if not states:
        raise CheckpointError("no states to save")
    for owner in states:
        if not isinstance(owner, str) or not OWNER_RE.fullmatch(owner):
            raise CheckpointError(
                f"owner name {owner!r} is invalid: use [a-z0-9_]+ (it becomes a file name)"
            )
    summary_tensors: dict[str, torch.Tensor] = {}
    summary_copy = _split("summary", dict(summary), "", summary_tensors)
    if summary_tensors:
        raise CheckpointError(f"summary holds tensors at {sorted(summary_tensors)}; JSON only")
    owners = []
    for owner, state in states.items():
        tensors: dict[str, torch.Tensor] = {}
        tree = _split(owner, state, "", tensors)
        try:
            laid = stream.layout(tensors) if tensors else None
        except stream.LayoutError as e:
            raise CheckpointError(
                f"{owner}: safetensors cannot store these tensors ({e})"
            ) from None
        owners.append(PreparedOwner(owner, tree, laid))
    return PreparedCheckpoint(global_step, owners, summary_copy)


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
        sealed = _seal(manifest)
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


# --------------------------------------------------------------------------- reading


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
    sealed = _unseal_problem(blob, m)
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


def _scan(directory: Path) -> tuple[list[Problem], dict[str, Any], dict[str, dict[str, Any]]]:
    """Verify ``directory`` and parse it from the same bytes: (problems, manifest, states)."""
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
    problems = [
        Problem(n, "unlisted file, ignored (never opened)", fatal=False)
        for n in sorted(os.listdir(directory))
        if n != MANIFEST and n not in files
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


def read_checkpoint(path: Path) -> LoadedCheckpoint:
    """Verify and load one checkpoint directory (each file read once: hashed and parsed).

    Raises:
        CorruptCheckpointError: any fatal problem (``.problems`` lists them all).
    """
    path = Path(path)
    problems, manifest, states = _scan(path)
    if any(p.fatal for p in problems):
        raise CorruptCheckpointError(path, problems)
    return LoadedCheckpoint(path=path, states=states, manifest=manifest)
