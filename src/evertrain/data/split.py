"""The train/validation split: a document's side is a pure function of its content and seed.

``u = (XXH3-64(content_key, seed) >> 11) / 2**53`` is uniform in ``[0, 1)``; the document is
validation iff ``u < val_fraction``. Because the side does not depend on the document's
index, adding, removing or reordering records never moves an existing document to the other
side, and duplicates always share a side (no train/val leakage through copies). With a small
data set and a small ``val_fraction`` no document may land in validation: the validation set
is then empty, which is allowed (evaluation is skipped).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import xxhash

T = TypeVar("T")


def is_validation(content_key: bytes, seed: int, val_fraction: float) -> bool:
    """True if the document whose :meth:`~.formats.Document.content_key` is ``content_key``
    belongs to the validation set for ``seed`` and ``val_fraction`` (in ``[0, 1)``)."""
    if val_fraction <= 0.0:
        return False
    h = xxhash.xxh3_64_intdigest(content_key, seed=seed % (1 << 64))
    return (h >> 11) * (1.0 / (1 << 53)) < val_fraction


def split_by_hash(
    records: Iterable[T],
    key: str | Callable[[T], Any],
    val_fraction: float,
    seed: int = 0,
) -> tuple[list[T], list[T]]:
    """Split ``records`` into ``(train, validation)`` lists by a hash of each record's key.

    A record's side depends only on its key, ``seed`` and ``val_fraction``, never on its
    position or on the other records: adding, removing or reordering records never moves
    one to the other side, and records with equal keys share a side (no leakage through
    copies). Order within each side follows ``records``. The validation share is
    ``val_fraction`` in expectation, not exactly.

    Args:
        records: any iterable (read once).
        key: the field whose value identifies a record (``record[key]``), or a function of
            the record. ``str`` keys hash as UTF-8, ``bytes`` as is, anything else as its
            canonical JSON (sorted keys).
        val_fraction: expected share of validation records, in ``[0, 1)``.
        seed: changes the split (an integer).

    Raises:
        ValueError: ``val_fraction`` outside ``[0, 1)``.
        KeyError: a record lacks the ``key`` field.
        TypeError: a key value that is not ``str``/``bytes`` and not JSON.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    get: Callable[[T], Any] = key if callable(key) else (lambda r: r[key])  # type: ignore[index]
    train: list[T] = []
    val: list[T] = []
    for record in records:
        value = get(record)
        if isinstance(value, str):
            raw = value.encode("utf-8")
        elif isinstance(value, bytes):
            raw = value
        else:
            raw = json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
        (val if is_validation(raw, seed, val_fraction) else train).append(record)
    return train, val
