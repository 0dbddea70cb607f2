"""The one error type of the data pipeline: bad input data, located to file, line and field."""

from __future__ import annotations

SKIP_HINT = "fix the record, or set data.on_bad_record: skip to skip bad records"


class DataError(ValueError):
    """Training data cannot be used; the message says which file, line (or row) and field.

    Attributes:
        file: the data file (``None`` for errors not tied to one file).
        line: 1-based line (JSONL, JSON, CSV, text) or row (Parquet) number, or ``None``
            for errors about the whole file.
        field: the record field at fault, e.g. ``"text"`` or ``"messages[2].role"``.
        problem: what is wrong, without the location.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        line: int | None = None,
        unit: str = "line",
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file, self.line, self.unit, self.field, self.problem = file, line, unit, field, problem
        parts = []
        if file is not None:
            parts.append(file)
        if line is not None:
            parts.append(f"{unit} {line}")
        if field is not None:
            parts.append(f"field {field!r}")
        where = ", ".join(parts)
        msg = f"{where}: {problem}" if where else problem
        if hint:
            msg = f"{msg} ({hint})"
        super().__init__(msg)
