"""Directories written by Hugging Face ``datasets`` (``Dataset.save_to_disk``) as data files.

A ``data.files`` entry that is such a directory (it holds ``dataset_info.json`` and
``state.json``, or, for a ``DatasetDict``, ``dataset_dict.json``) is read with
``datasets.load_from_disk``: the Arrow files are memory-mapped and read in record batches
of :data:`BATCH_ROWS` rows, so a large data set is never held in memory as Python objects.
Of a ``DatasetDict`` the ``train`` split is used. Records are rows: positions are 1-based
row numbers (``unit="row"``), as for Parquet files.

``datasets`` is imported only when such a directory is read; it is an optional dependency
(``pip install 'evertrain[datasets]'``). Its loader reads JSON and Arrow only (no pickle).

The content hash of a directory (:func:`hash_dir`) covers every file under it, in sorted
order of their relative paths, with the paths and lengths: it keys the tokenised-data
cache and tells when the data changed, like a file's hash.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash

from evertrain.data.errors import DataError
from evertrain.data.records import Record, _too_large, _values_bytes

BATCH_ROWS = 1024
MARKERS = ("dataset_info.json", "state.json")
DICT_MARKER = "dataset_dict.json"
INSTALL_HINT = "pip install 'evertrain[datasets]'"


def is_dataset_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` or
    ``DatasetDict.save_to_disk``."""
    p = Path(path)
    if not p.is_dir():
        return False
    return all((p / m).is_file() for m in MARKERS) or (p / DICT_MARKER).is_file()


def _files(path: Path) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every file under ``path``, sorted: a
    deterministic order whatever the file system lists first."""
    out = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for n in names:
            full = Path(root) / n
            out.append((full.relative_to(path).as_posix(), full))
    return sorted(out)


def hash_dir(path: str | Path) -> str:
    """xxh3-128 hex digest of a directory's files (relative paths, lengths and bytes, in
    sorted path order).

    Raises:
        DataError: the directory is missing or a file under it cannot be read.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError("directory not found (check data.files)", file=str(path))
    h = xxhash.xxh3_128()
    for rel, full in _files(root):
        name = rel.encode("utf-8", "surrogateescape")
        try:
            with open(full, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                h.update(len(name).to_bytes(8, "little") + name + size.to_bytes(8, "little"))
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError as e:
            raise DataError(f"cannot read {rel}: {e.strerror or e}", file=str(path)) from None
    return h.hexdigest()


def dir_bytes(path: str | Path) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(full.stat().st_size for _, full in _files(Path(path)))


def _load(path: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"reading a Hugging Face datasets directory needs the datasets package, which "
            f"is not installed: {INSTALL_HINT}",
            file=path,
        ) from None
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # the loader's errors have no common base class
        raise DataError(
            f"not a readable datasets directory: {type(e).__name__}: {e}".splitlines()[0],
            file=path,
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(
                f"a DatasetDict without a 'train' split (splits: {sorted(ds)}); save the "
                "split to train on with Dataset.save_to_disk, or name it 'train'",
                file=path,
            )
        ds = ds["train"]
    # a format saved with the data set (e.g. "torch") would hand us tensors, not strings
    return ds.with_format(None)


def iter_dataset_records(path: str | Path, limit: int | None) -> Iterator[Record | DataError]:
    """The rows of the data set in ``path``, in order, as records with 1-based row numbers.

    Args:
        path: a directory for which :func:`is_dataset_dir` holds.
        limit: ``data.max_record_bytes``: a row whose values hold more UTF-8 bytes is
            yielded as an error (None: no limit).

    Yields:
        :class:`~.records.Record` per row, or a :class:`DataError` for a row over ``limit``.

    Raises:
        DataError: ``datasets`` is not installed (one line: how to install it), the
            directory cannot be loaded, a ``DatasetDict`` has no ``train`` split, or the
            Arrow data cannot be read.
    """
    name = str(path)
    ds = _load(name)
    row = 0
    try:
        for batch in ds.iter(batch_size=BATCH_ROWS):
            columns = list(batch)
            n = len(batch[columns[0]]) if columns else 0
            for i in range(n):
                row += 1
                rec = {c: batch[c][i] for c in columns}
                size = _values_bytes(rec) if limit is not None else 0
                if limit is not None and size > limit:
                    yield _too_large(name, row, size, limit, unit="row")
                else:
                    yield Record(name, row, "row", rec)
    except (OSError, ValueError) as e:
        raise DataError(
            f"cannot read the data set's Arrow data: {e}".splitlines()[0],
            file=name,
            line=row + 1,
            unit="row",
        ) from None
