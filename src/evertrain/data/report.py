"""What the pipeline read, skipped and produced: plain dataclasses with ``to_json()``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MAX_REASONS = 5


@dataclass
class FileReport:
    """One validated file.

    Attributes:
        path: as given in ``data.files``.
        format: the record format used (detected or configured).
        records: valid records (documents).
        skipped: bad records skipped (``on_bad_record: skip``).
        reasons: the first few skip reasons (full error messages).
        bytes: file size in bytes.
        content_hash: XXH3-128 hex digest of the file's bytes.
    """

    path: str
    format: str
    records: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)
    bytes: int = 0
    content_hash: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SplitReport:
    """One side of the split.

    Attributes:
        documents: documents on this side.
        rows: dataset rows (sequences of ``seq_len`` tokens).
        tokens: non-padding tokens.
        target_tokens: tokens with a label.
        truncated_documents: documents cut at ``seq_len`` (``packing=False``).
        rows_without_targets: rows whose labels are all -100 (e.g. a prompt longer than
            ``seq_len``); they add nothing to the loss.
        fingerprint: the dataset's fingerprint.
    """

    documents: int = 0
    rows: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated_documents: int = 0
    rows_without_targets: int = 0
    fingerprint: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DataReport:
    """The result of :func:`~evertrain.data.build_datasets`.

    Attributes:
        files: one report per file, in ``data.files`` order.
        train, val: per-split statistics.
        skipped: bad records skipped over all files.
        skip_reasons: the first few skip reasons over all files.
        cache: ``"off"``, ``"hit"`` or ``"miss"`` (built and stored).
        cache_path: the cache's JSON file when the cache is on.
    """

    files: list[FileReport] = field(default_factory=list)
    train: SplitReport = field(default_factory=SplitReport)
    val: SplitReport = field(default_factory=SplitReport)
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    cache: str = "off"
    cache_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataReport:
        return cls(
            files=[FileReport(**f) for f in data["files"]],
            train=SplitReport(**data["train"]),
            val=SplitReport(**data["val"]),
            skipped=data["skipped"],
            skip_reasons=list(data["skip_reasons"]),
            cache=data["cache"],
            cache_path=data["cache_path"],
        )

    def summary(self) -> str:
        """One line for logs."""
        s = (
            f"data: {len(self.files)} file(s), train {self.train.documents} docs -> "
            f"{self.train.rows} rows ({self.train.tokens} tokens), val {self.val.documents} "
            f"docs -> {self.val.rows} rows"
        )
        if self.skipped:
            s += f", {self.skipped} bad record(s) skipped"
        if self.train.truncated_documents:
            s += f", {self.train.truncated_documents} train docs truncated"
        return s + f", cache {self.cache}"
