"""Read one data file (or ``datasets`` directory) into validated documents.

Each raw record goes through ``data.columns`` (:func:`~.dialects.map_columns`; not for plain
text files, whose records have no columns), then format detection and validation
(:mod:`.formats`). A JSONL file can be read as a stream (:class:`~.jsonl_stream.JsonlStream`)
so that a build of any size holds one block of it at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import xxhash

from evertrain.config import DataConfig, ModelKind
from evertrain.data.dialects import decode_json_lists, map_columns
from evertrain.data.errors import DataError
from evertrain.data.formats import Document, RecordFormat, detect_format, validate_record
from evertrain.data.hf_datasets import dir_bytes, hash_dir, is_dataset_dir, iter_dataset_records
from evertrain.data.jsonl_stream import JsonlStream
from evertrain.data.records import Record, file_kind, iter_records, read_bytes
from evertrain.data.report import MAX_REASONS, FileReport

log = logging.getLogger("evertrain.data")
Policy = Literal["fail", "skip"]


def chunk_chars(cfg: DataConfig) -> int:
    """Characters per chunk for ``text_split: chunks``: ``4 * seq_len`` (about one row of
    tokens for a subword tokenizer at ~4 characters per token)."""
    return 4 * cfg.seq_len


def _seq2seq_format_error(name: str, fmt: str, line: int | None = None) -> DataError:
    return DataError(
        f"{fmt!r} records have no encoder input for a seq2seq model (model.kind: seq2seq)",
        file=name,
        line=line,
        hint="give prompt/completion records: the prompt is the encoder input, the "
        "completion the decoder target",
    )


def read_source(path: str | Path) -> bytes | None:
    """The bytes of data file ``path``, or None for a ``datasets`` directory (read from disk
    by :func:`read_documents`).

    Raises:
        DataError: missing, unreadable or empty; a directory that ``datasets`` did not write.
    """
    if is_dataset_dir(path):
        return None
    if Path(path).is_dir():
        raise DataError(
            "is a directory, but not one written by Hugging Face datasets' save_to_disk "
            "(no dataset_info.json + state.json, nor dataset_dict.json); list the data "
            "files themselves",
            file=str(path),
        )
    return read_bytes(path)


def open_source(
    path: str | Path, cfg: DataConfig, stream: bool = False
) -> bytes | JsonlStream | None:
    """What :func:`iter_documents` reads ``path`` from: its bytes, a :class:`JsonlStream`
    (``stream`` and a JSONL file), or None for a ``datasets`` directory.

    Raises:
        DataError: see :func:`read_source` (a stream raises its errors while iterated).
    """
    if stream and not Path(path).is_dir() and file_kind(path) == "jsonl":
        return JsonlStream(path, cfg.max_record_bytes)
    return read_source(path)


def new_report(path: str | Path, data: bytes | JsonlStream | None, cfg: DataConfig) -> FileReport:
    """The report :func:`iter_documents` fills for ``path`` read from ``data``."""
    fmt = "unknown" if cfg.format == "auto" else cfg.format
    if isinstance(data, bytes):
        digest = xxhash.xxh3_128_hexdigest(data)
        return FileReport(str(path), fmt, bytes=len(data), content_hash=digest)
    if data is None:
        return FileReport(str(path), fmt, bytes=dir_bytes(path), content_hash=hash_dir(path))
    return FileReport(str(path), fmt)  # a stream: filled in as it is read


def iter_documents(
    path: str | Path,
    data: bytes | JsonlStream | None,
    cfg: DataConfig,
    report: FileReport,
    policy: Policy | None = None,
    kind: ModelKind | None = None,
) -> Iterator[Document]:
    """Parse and validate every record of one file (or ``datasets`` directory), in order.

    Args:
        path: the file (for its extension and for messages).
        data: from :func:`open_source`.
        cfg: ``format``, ``columns``, ``text_split``, ``seq_len`` (chunk size) and
            ``max_record_bytes`` are used.
        report: from :func:`new_report`; counts are complete when the iteration ends (and,
            for a stream, ``bytes`` and ``content_hash``).
        policy: ``"fail"`` or ``"skip"``; default ``cfg.on_bad_record``.
        kind: the model kind the documents are for; default ``cfg.model_kind``.

    Yields:
        The file's valid documents in file order.

    Raises:
        DataError: a file-level problem; the first bad record under ``"fail"``; a file with
            no valid record (always, at the end); for a seq2seq model, a file whose records
            are not ``prompt_completion`` (always, whatever the policy).
    """
    policy = policy or cfg.on_bad_record
    kind = kind or cfg.model_kind
    name = str(path)
    file_type = "dataset" if data is None else file_kind(path)
    fmt: RecordFormat | None = None if cfg.format == "auto" else cfg.format
    if file_type == "text" and fmt not in (None, "text"):
        raise DataError(
            f"plain text files hold text records, but data.format is {fmt!r}",
            file=name,
            hint="use a .jsonl file for that format, or format: auto",
        )
    if kind == "seq2seq" and (
        file_type == "text" or fmt not in (None, "prompt_completion", "alpaca")
    ):
        raise _seq2seq_format_error(name, fmt or "text")
    records: Iterator[Record | DataError] | JsonlStream
    if data is None:
        records = iter_dataset_records(path, cfg.max_record_bytes)
    elif isinstance(data, JsonlStream):
        records = data
    else:
        records = iter_records(
            path,
            data,
            text_split=cfg.text_split,
            chunk_chars=chunk_chars(cfg),
            max_record_bytes=cfg.max_record_bytes,
        )
    for item in records:
        try:
            if isinstance(item, DataError):
                raise item
            if file_type != "text":
                item = map_columns(item, cfg.columns)
            if file_type == "csv":
                item = decode_json_lists(item)
            if fmt is None:
                fmt = detect_format(item)
                report.format = fmt
            doc = validate_record(item, fmt)
        except DataError as e:
            if policy == "fail":
                raise
            report.skipped += 1
            if len(report.reasons) < MAX_REASONS:
                report.reasons.append(str(e))
            continue
        if kind == "seq2seq" and doc.kind != "prompt_completion":
            # The file's format, not one bad record: on_bad_record: skip must not pass it.
            raise _seq2seq_format_error(name, doc.kind, doc.line)
        report.records += 1
        yield doc
    if isinstance(data, JsonlStream):
        report.bytes, report.content_hash = data.bytes, data.content_hash
    if not report.records:
        first = f"; first: {report.reasons[0]}" if report.reasons else ""
        raise DataError(
            f"no valid records ({report.skipped} bad record(s) skipped{first})", file=name
        )
    if report.skipped:
        log.warning(
            "%s: skipped %d bad record(s); first: %s", name, report.skipped, report.reasons[0]
        )


def read_documents(
    path: str | Path,
    data: bytes | None,
    cfg: DataConfig,
    policy: Policy | None = None,
    kind: ModelKind | None = None,
) -> tuple[FileReport, list[Document]]:
    """Every valid document of one file as a list (see :func:`iter_documents`).

    Args:
        data: its bytes, or None for a ``datasets`` directory (see :func:`read_source`).

    Returns:
        The file's report and its valid documents in file order.

    Raises:
        DataError: see :func:`iter_documents`.
    """
    report = new_report(path, data, cfg)
    docs = list(iter_documents(path, data, cfg, report, policy, kind))
    return report, docs


def validate_file(path: str | Path, cfg: DataConfig, policy: Policy | None = None) -> FileReport:
    """Read and validate one whole file without tokenising it (no tokenizer needed).

    Args:
        path: the data file.
        cfg: the data config (format, text_split, seq_len, on_bad_record).
        policy: override ``cfg.on_bad_record``: ``"skip"`` counts every bad record in the
            report instead of raising on the first.

    Raises:
        DataError: see :func:`read_documents`.
    """
    data = open_source(path, cfg, stream=True)
    report = new_report(path, data, cfg)
    for _ in iter_documents(path, data, cfg, report, policy):
        pass
    return report
