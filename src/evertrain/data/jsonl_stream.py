"""Records of a JSONL file read in blocks, for a build whose memory must not grow with the file.

:func:`~.records.iter_records` parses a file's bytes held whole in memory; for a JSONL file
(one record per line, the one format whose records can be found without parsing what comes
before them) :class:`JsonlStream` yields the same records, with the same line numbers and
the same errors, reading ``block_bytes`` at a time, and hashes the bytes as it reads them
(the file's content hash, which the data cache and the "file changed while it was being
read" check need, costs no second pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import xxhash

from evertrain.data.errors import DataError
from evertrain.data.records import _BOM, Record, _jsonl, _too_large, read_error

BLOCK_BYTES = 4 << 20


class JsonlStream:
    """Iterate the records of the JSONL file ``path`` (see :func:`~.records.iter_records`).

    Args:
        path: the file.
        max_record_bytes: longer lines are yielded as errors, and never held in memory
            whole (None: no limit).
        block_bytes: bytes read at a time.

    Attributes (complete once iteration has ended):
        bytes: bytes read.
        content_hash: XXH3-128 hex digest of those bytes.

    Raises (while iterating):
        DataError: the file is missing, a directory, unreadable, or holds only whitespace;
            the same messages as :func:`~.records.read_bytes`.
    """

    def __init__(
        self, path: str | Path, max_record_bytes: int | None, block_bytes: int = BLOCK_BYTES
    ) -> None:
        self.path = str(path)
        self.limit = max_record_bytes
        self.block_bytes = block_bytes
        self.bytes = 0
        self._hash = xxhash.xxh3_128()

    @property
    def content_hash(self) -> str:
        return self._hash.hexdigest()

    def _blocks(self) -> Iterator[bytes]:
        try:
            with open(self.path, "rb") as f:
                while block := f.read(self.block_bytes):
                    self._hash.update(block)
                    self.bytes += len(block)
                    yield block
        except OSError as e:
            raise read_error(self.path, e) from None

    def _unmarked(self) -> Iterator[bytes]:
        # the blocks without a leading UTF-8 byte order mark, which may span blocks
        head = b""
        blocks = self._blocks()
        for block in blocks:
            head += block
            if len(head) >= len(_BOM):
                break
        yield head.removeprefix(_BOM)
        yield from blocks

    def __iter__(self) -> Iterator[Record | DataError]:
        buf, line, content = b"", 1, False
        skipping = -1  # >= 0: bytes so far of a line too long to keep
        last = b""  # the last of them: a "\r" before the newline is not the record's
        for block in self._unmarked():
            content = content or bool(block.strip())
            if skipping >= 0:
                nl = block.find(b"\n")
                if nl < 0:
                    skipping, last = skipping + len(block), block[-1:]
                    continue
                size = skipping + nl - ((block[nl - 1 : nl] if nl else last) == b"\r")
                assert self.limit is not None
                yield _too_large(self.path, line, size, self.limit)
                line, skipping, block = line + 1, -1, block[nl + 1 :]
            buf += block
            cut = buf.rfind(b"\n")
            if cut >= 0:
                piece, buf = buf[:cut], buf[cut + 1 :]
                yield from _jsonl(self.path, piece, self.limit, line)
                line += piece.count(b"\n") + 1
            if self.limit is not None and len(buf) > self.limit + 1:
                # no newline within the limit: the rest of this line is counted, not kept
                skipping, last, buf = len(buf), buf[-1:], b""
        if skipping >= 0:
            assert self.limit is not None
            yield _too_large(self.path, line, skipping - (last == b"\r"), self.limit)
        elif buf:
            yield from _jsonl(self.path, buf, self.limit, line)
        if not content:
            raise DataError("empty file: it holds no records", file=self.path)
