"""Readers: turn the bytes of one data file into raw records that remember where they came from.

Supported files (chosen by extension, case-insensitive; directories written by ``datasets``
are read by :mod:`.hf_datasets`):

- ``.jsonl`` / ``.ndjson``: one JSON object per line; blank lines are ignored.
- ``.json``: one JSON list of objects; each record's line is the line its object starts on.
- ``.csv``: a header row, then one record per row (RFC 4180 quoting; a ``messages`` cell holds
  the JSON list of messages). The line is the line the row starts on.
- ``.parquet``: one record per row (needs ``pyarrow``, imported only for Parquet files);
  positions are 1-based row numbers.
- ``.txt`` / ``.md``: plain UTF-8 text, one ``{"text": ...}`` record per document. With
  ``text_split="documents"`` a document is a run of non-blank lines (documents are separated
  by blank lines); with ``text_split="chunks"`` the text is cut into chunks of at most
  ``chunk_chars`` characters, at the last line break (else whitespace) before the limit.

Errors about the whole file (unreadable, empty, unknown extension, binary, invalid UTF-8 or
invalid JSON in a ``.json``/``.csv``/text file, which leave no way to resynchronise) are raised
as :class:`~evertrain.data.errors.DataError`. Errors about one record (a bad JSONL line, a
CSV row with the wrong number of cells) are *yielded* as ``DataError`` values so the caller
can apply ``data.on_bad_record``.

Two limits make hostile records ordinary record errors: a record larger than
``max_record_bytes`` (its bytes in the file for JSONL and JSON; the UTF-8 bytes of its
values for CSV and Parquet, of its text for plain text) is refused before it is parsed
where the format allows, and JSON nested deeper than :data:`MAX_JSON_DEPTH` levels is
refused (Python's JSON parser raises ``RecursionError`` on deep nesting, about 1000 levels,
which once escaped as an error that was no ``DataError`` at all).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evertrain.data.errors import SKIP_HINT, DataError

EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}

# git's heuristic for "binary": a NUL byte in the first 8000 bytes.
_BINARY_SNIFF_BYTES = 8000
_BOM = b"\xef\xbb\xbf"
# Records are flat objects of strings, or a list of message objects (depth 3); metadata
# fields may nest more. Far below the depth where Python's parser gives up, so the verdict
# does not depend on how deep the caller's stack happens to be.
MAX_JSON_DEPTH = 100
_TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"


class _TooDeepError(ValueError):
    pass


def _loads(text: str) -> Any:
    """``json.loads``, refusing nesting deeper than :data:`MAX_JSON_DEPTH`.

    Raises:
        json.JSONDecodeError: invalid JSON.
        _TooDeepError: nested too deeply.
    """
    try:
        obj = json.loads(text)
    except RecursionError:
        raise _TooDeepError(_TOO_DEEP) from None
    _check_depth(obj, text.count("[") + text.count("{"))
    return obj


def _check_depth(obj: Any, brackets: int) -> None:
    """Raise :class:`_TooDeepError` if ``obj`` (parsed from text with ``brackets`` opening
    brackets) nests deeper than :data:`MAX_JSON_DEPTH`."""
    if brackets <= MAX_JSON_DEPTH:  # counted in C: almost every record stops here
        return
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise _TooDeepError(_TOO_DEEP)
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _values_bytes(value: Any) -> int:
    """UTF-8 bytes of the strings (and bytes) in a parsed record, nested values included."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += _utf8_len(v)
        elif isinstance(v, (bytes, bytearray)):
            total += len(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return total


def _too_large(path: str, line: int, size: int, limit: int, unit: str = "line") -> DataError:
    return DataError(
        f"record of {size} bytes, over data.max_record_bytes ({limit}): split it into "
        "smaller records, or raise data.max_record_bytes",
        file=path,
        line=line,
        unit=unit,
        hint=SKIP_HINT,
    )


@dataclass(frozen=True)
class Record:
    """One raw record: a dict of fields plus its origin.

    Attributes:
        file: the path as given in ``data.files``.
        line: 1-based line (or row, for Parquet) the record starts on.
        unit: ``"line"`` or ``"row"``: what ``line`` counts.
        data: the record's fields as parsed (not yet validated).
    """

    file: str
    line: int
    unit: str
    data: dict[str, Any] = field(hash=False)


def file_kind(path: str | Path) -> str:
    """The reader for ``path``: ``jsonl``, ``json``, ``csv``, ``parquet`` or ``text``.

    Raises:
        DataError: the extension is not one of the supported ones.
    """
    ext = Path(path).suffix.lower()
    kind = EXTENSIONS.get(ext)
    if kind is None:
        raise DataError(
            f"unknown file extension {ext or '(none)'!r}; supported: "
            f"{', '.join(sorted(EXTENSIONS))} (rename the file to match its content)",
            file=str(path),
        )
    return kind


def read_error(path: str | Path, e: OSError) -> DataError:
    """The one-line error for data file ``path`` that could not be read (``e``)."""
    if isinstance(e, FileNotFoundError):
        return DataError("file not found (check data.files)", file=str(path))
    if isinstance(e, IsADirectoryError):
        return DataError("is a directory; list the data files themselves", file=str(path))
    return DataError(f"cannot read file: {e.strerror or e}", file=str(path))


def read_bytes(path: str | Path) -> bytes:
    """The whole file as bytes.

    Raises:
        DataError: missing, a directory, unreadable, or empty (0 bytes or only whitespace).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise read_error(path, e) from None
    if not data.strip():
        raise DataError("empty file: it holds no records", file=str(path))
    return data


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _check_binary(path: str, data: bytes) -> None:
    nul = data.find(b"\x00", 0, _BINARY_SNIFF_BYTES)
    if nul >= 0:
        raise DataError(
            f"binary content (NUL byte at byte {nul}); not a text file",
            file=path,
            line=_line_of(data, nul),
        )


def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"invalid UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start}); "
            "re-encode the file as UTF-8",
            file=path,
            line=_line_of(data, e.start),
        ) from None


def iter_records(
    path: str | Path,
    data: bytes,
    *,
    text_split: str = "documents",
    chunk_chars: int = 512,
    max_record_bytes: int | None = None,
) -> Iterator[Record | DataError]:
    """Parse ``data`` (the bytes of ``path``) into records, in file order.

    Args:
        path: the file's path (chooses the reader by extension; used in messages).
        data: the file's content, as returned by :func:`read_bytes`.
        text_split: ``"documents"`` or ``"chunks"``, for ``.txt``/``.md`` files.
        chunk_chars: maximum chunk length in characters for ``text_split="chunks"``.
        max_record_bytes: larger records are yielded as errors (None: no limit); see the
            module docstring for how each format measures a record.

    Yields:
        :class:`Record` for each parsed record, or a :class:`DataError` for a record that
        cannot be parsed (the caller decides whether to raise or skip it).

    Raises:
        DataError: a problem with the whole file (see the module docstring).
    """
    name = str(path)
    kind = file_kind(path)
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    limit = max_record_bytes
    if kind == "jsonl":
        yield from _jsonl(name, data, limit)
    elif kind == "json":
        yield from _json_list(name, data, limit)
    elif kind == "csv":
        yield from _csv(name, data, limit)
    elif kind == "parquet":
        yield from _parquet(name, data, limit)
    else:
        yield from _text(name, data, text_split, chunk_chars, limit)


def _jsonl(
    path: str, data: bytes, limit: int | None, first_line: int = 1
) -> Iterator[Record | DataError]:
    for lineno, raw in enumerate(data.split(b"\n"), first_line):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        if limit is not None and len(raw) > limit:
            yield _too_large(path, lineno, len(raw), limit)
            continue
        if b"\x00" in raw:
            yield DataError(
                "binary content (NUL byte); not a JSON line", file=path, line=lineno, hint=SKIP_HINT
            )
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield DataError(
                f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                "re-encode the file as UTF-8",
                file=path,
                line=lineno,
                hint=SKIP_HINT,
            )
            continue
        try:
            obj = _loads(text)
        except json.JSONDecodeError as e:
            yield DataError(
                f"invalid JSON: {e.msg} at column {e.colno}", file=path, line=lineno, hint=SKIP_HINT
            )
            continue
        except _TooDeepError as e:
            yield DataError(str(e), file=path, line=lineno, hint=SKIP_HINT)
            continue
        if not isinstance(obj, dict):
            yield DataError(
                f"expected a JSON object, got {type(obj).__name__}",
                file=path,
                line=lineno,
                hint=SKIP_HINT,
            )
            continue
        yield Record(path, lineno, "line", obj)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_list(path: str, data: bytes, limit: int | None) -> Iterator[Record | DataError]:
    _check_binary(path, data)
    text = _decode(path, data)
    decoder = json.JSONDecoder()

    def fail(pos: int, msg: str) -> DataError:
        return DataError(f"invalid JSON: {msg}", file=path, line=text.count("\n", 0, pos) + 1)

    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise fail(
            pos,
            "a .json data file must hold one list of objects, [{...}, ...] "
            "(use .jsonl for one object per line)",
        )
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        end = _skip_ws(text, pos + 1)
        if end != len(text):
            raise fail(end, "extra data after the list")
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        start = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON: {e.msg} at column {e.colno}", file=path, line=e.lineno
            ) from None
        except RecursionError:
            # where the element ends is unknown, so the rest of the file cannot be read
            raise DataError(_TOO_DEEP, file=path, line=line) from None
        size = _utf8_len(text[start:pos]) if limit is not None else 0
        if limit is not None and size > limit:
            yield _too_large(path, line, size, limit)
        elif isinstance(obj, dict):
            try:
                _check_depth(obj, text.count("[", start, pos) + text.count("{", start, pos))
            except _TooDeepError as e:
                yield DataError(str(e), file=path, line=line, hint=SKIP_HINT)
            else:
                yield Record(path, line, "line", obj)
        else:
            yield DataError(
                f"expected a JSON object, got {type(obj).__name__}",
                file=path,
                line=line,
                hint=SKIP_HINT,
            )
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            end = _skip_ws(text, pos + 1)
            if end != len(text):
                raise fail(end, "extra data after the list")
            return
        raise fail(pos, "expected ',' or ']' after a list element")


def _csv(path: str, data: bytes, limit: int | None) -> Iterator[Record | DataError]:
    _check_binary(path, data)
    text = _decode(path, data)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError("empty file: it holds no records", file=path) from None
    except csv.Error as e:
        raise DataError(f"invalid CSV: {e}", file=path, line=reader.line_num) from None
    names = [h.strip() for h in header]
    if not any(names):
        raise DataError("the first row must be a header naming the columns", file=path, line=1)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"duplicate column names in the header: {dupes}", file=path, line=1)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"invalid CSV: {e}", file=path, line=start) from None
        if not row:
            continue  # a blank line
        if len(row) != len(names):
            yield DataError(
                f"row has {len(row)} cells, the header has {len(names)} "
                "(quote cells that contain commas)",
                file=path,
                line=start,
                hint=SKIP_HINT,
            )
            continue
        if limit is not None:
            size = sum(_utf8_len(cell) for cell in row)
            if size > limit:
                yield _too_large(path, start, size, limit)
                continue
        rec: dict[str, Any] = dict(zip(names, row, strict=True))
        if "messages" in rec:
            try:
                rec["messages"] = _loads(rec["messages"])
            except (json.JSONDecodeError, _TooDeepError) as e:
                problem = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                yield DataError(
                    f"a CSV messages cell must hold a JSON list of messages: {problem}",
                    file=path,
                    line=start,
                    field="messages",
                    hint=SKIP_HINT,
                )
                continue
        yield Record(path, start, "line", rec)


def _parquet(path: str, data: bytes, limit: int | None) -> Iterator[Record | DataError]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            "reading Parquet files needs pyarrow, which is not installed: pip install pyarrow",
            file=path,
        ) from None
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file: {e}", file=path) from None
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                row += 1
                size = _values_bytes(rec) if limit is not None else 0
                if limit is not None and size > limit:
                    yield _too_large(path, row, size, limit, unit="row")
                else:
                    yield Record(path, row, "row", rec)
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"cannot read Parquet data: {e}", file=path, line=row + 1, unit="row"
        ) from None


def _text(
    path: str, data: bytes, text_split: str, chunk_chars: int, limit: int | None
) -> Iterator[Record | DataError]:
    _check_binary(path, data)
    text = _decode(path, data).replace("\r\n", "\n")

    def record(line: int, doc: str) -> Record | DataError:
        if limit is not None and (size := _utf8_len(doc)) > limit:
            return _too_large(path, line, size, limit)
        return Record(path, line, "line", {"text": doc})

    if text_split == "documents":
        start, lines = 0, list[str]()
        for lineno, text_line in enumerate(text.split("\n"), 1):
            if text_line.strip():
                if not lines:
                    start = lineno
                lines.append(text_line)
            elif lines:
                yield record(start, "\n".join(lines))
                lines = []
        if lines:
            yield record(start, "\n".join(lines))
        return
    if text_split != "chunks":
        raise ValueError(f"text_split must be 'documents' or 'chunks', got {text_split!r}")
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    pos, line = 0, 1
    while pos < len(text):
        end = min(pos + chunk_chars, len(text))
        if end < len(text):
            # Cut after a line break (else a space) so a chunk does not end mid-word.
            cut = text.rfind("\n", pos, end)
            if cut < 0:
                cut = max(text.rfind(" ", pos, end), text.rfind("\t", pos, end))
            if cut >= 0:
                end = cut + 1
        chunk = text[pos:end]
        if chunk.strip():
            lead = len(chunk) - len(chunk.lstrip())
            first = line + chunk.count("\n", 0, lead)
            yield record(first, chunk.strip())
        line += chunk.count("\n")
        pos = end
