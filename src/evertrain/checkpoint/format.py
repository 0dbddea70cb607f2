"""Checkpoint format v1: the layout of one checkpoint directory's files (no I/O).

Layout and commit protocol are specified in ``docs/checkpoint-format.md``. In short: per
owner ``<owner>.json`` (the nested state with each tensor replaced by
``{"__tensor__": "<key>"}``) and, if it holds tensors, ``<owner>.safetensors``; then
``manifest.json`` with every file's size and XXH3-128 digest, written last into
``step-N.tmp/`` and published by renaming the directory. Only ``.json`` and
``.safetensors`` files are ever parsed; nothing is unpickled.

This module checks states against the format and lays them out
(:func:`prepare_checkpoint`) and seals the manifest; :mod:`evertrain.checkpoint.commit`
writes and commits a checkpoint, :mod:`evertrain.checkpoint.verify` verifies and reads one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _encode_str
from pathlib import Path
from typing import Any

import torch
import xxhash

from evertrain.checkpoint import safetensors_stream as stream
from evertrain.checkpoint.errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSOR_REF = "__tensor__"
OWNER_RE = re.compile(r"[a-z0-9_]+")
STEP_DIR_RE = re.compile(r"step-(\d{8,})")
# dtypes safetensors both writes and reads back. It also *writes* float8_e8m0fnu and
# float4_e2m1fn_x2 but cannot load them (KeyError): such a checkpoint would be unloadable.
_DTYPE_NAMES = (
    "float64 float32 float16 bfloat16 float8_e4m3fn float8_e4m3fnuz float8_e5m2 "
    "float8_e5m2fnuz complex64 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool"
)
DTYPES = frozenset(d for n in _DTYPE_NAMES.split() if (d := getattr(torch, n, None)) is not None)
SELF_DIGEST = "manifest_xxh3_128"  # the manifest's own digest, see seal_manifest
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


# --------------------------------------------------------------------------- layout


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


def seal_manifest(manifest: dict[str, Any]) -> bytes:
    """Manifest bytes carrying their own XXH3-128 as the first field (``SELF_DIGEST``).

    The digest covers the file with its 32 hex digits set to "0"; without it a flipped byte
    in the manifest (a size, a summary metric) would go unnoticed.
    """
    blob = _dump_json({SELF_DIGEST: "0" * 32, **manifest}, 2)
    i = blob.index(_SELF_PREFIX) + len(_SELF_PREFIX)
    return blob[:i] + xxhash.xxh3_128(blob).hexdigest().encode() + blob[i + 32 :]


def unseal_problem(blob: bytes, manifest: dict[str, Any]) -> str | None:
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
