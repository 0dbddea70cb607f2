"""Tokenised splits of the files the daemon took, built per file and kept while useful.

Each file is built alone (``data.files = [path]`` through
:func:`~evertrain.data.build_datasets`), so its train/val split and rows depend on its own
bytes, the tokenizer, the data config and the run seed only: the same file gives the same
rows in every process, which exact resume and replay rely on.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from evertrain.config import RunConfig
from evertrain.data import DataError, DataReport, TokenizedDataset, build_datasets


class FileData:
    """Builds and caches ``(train, val)`` per file id (least recently used dropped first).

    Args:
        cfg: the run config (``data`` section and ``seed`` are used).
        tokenizer: the model's tokenizer.
        capacity: files kept in memory.
    """

    def __init__(self, cfg: RunConfig, tokenizer: Any, capacity: int = 8) -> None:
        self.cfg, self.tokenizer, self.capacity = cfg, tokenizer, max(capacity, 1)
        # file id -> (train or None once released, val)
        self._cache: OrderedDict[int, tuple[TokenizedDataset | None, TokenizedDataset]] = (
            OrderedDict()
        )

    def build(
        self, file_id: int, path: Path, content_hash: str | None
    ) -> tuple[TokenizedDataset, TokenizedDataset, DataReport]:
        """Read, validate, split and tokenise ``path``; cache the result under ``file_id``.

        Raises:
            DataError: bad content, no training rows, or bytes whose hash differs from
                ``content_hash`` (the file changed after it was taken).
        """
        data = self.cfg.data.model_copy(update={"files": [str(path)]})
        train, val, report = build_datasets(data, self.tokenizer, self.cfg.seed)
        found = report.files[0].content_hash
        if content_hash is not None and found != content_hash:
            raise DataError(
                f"the file changed after it was taken (content hash {found[:16]}..., "
                f"recorded {content_hash[:16]}...); files in the run directory must not be "
                "edited: drop a new version into the inbox instead",
                file=str(path),
            )
        self._put(file_id, (train, val))
        return train, val, report

    def get(
        self, file_id: int, path: Path, content_hash: str | None
    ) -> tuple[TokenizedDataset, TokenizedDataset]:
        """The cached splits of ``file_id``, built from ``path`` on a miss (see :meth:`build`)."""
        hit = self._cache.get(file_id)
        if hit is not None and hit[0] is not None:
            self._cache.move_to_end(file_id)
            return hit[0], hit[1]
        train, val, _ = self.build(file_id, path, content_hash)
        return train, val

    def get_val(self, file_id: int, path: Path, content_hash: str | None) -> TokenizedDataset:
        """The held-out split of ``file_id`` (cached even when its training split was
        released), built from ``path`` on a miss."""
        hit = self._cache.get(file_id)
        if hit is not None:
            self._cache.move_to_end(file_id)
            return hit[1]
        return self.build(file_id, path, content_hash)[1]

    def release_train(self, file_id: int) -> None:
        """Drop the training split of ``file_id`` from memory (keep its held-out split):
        the forgetting checks need only the latter, and a training split can be large."""
        hit = self._cache.get(file_id)
        if hit is not None:
            self._cache[file_id] = (None, hit[1])

    def _put(self, file_id: int, value: tuple[TokenizedDataset | None, TokenizedDataset]) -> None:
        self._cache[file_id] = value
        self._cache.move_to_end(file_id)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
