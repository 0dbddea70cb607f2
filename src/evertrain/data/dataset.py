"""The tokenised, fixed-length training (or validation) set held in memory."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import xxhash
from torch.utils.data import Dataset, get_worker_info

FINGERPRINT_VERSION = 1


def _bytes_of(t: torch.Tensor) -> memoryview:
    # numpy's buffer is the tensor's memory (no copy); little-endian on every supported platform
    return np.ascontiguousarray(t.numpy()).view(np.uint8).reshape(-1).data


def fingerprint_of(shape: list[int], settings: dict[str, Any], tensor_bytes: Iterable[Any]) -> str:
    """XXH3-128 hex digest identifying a data set's rows: version, shape ``[rows, seq_len]``
    and settings as sorted JSON, then the raw bytes of ``input_ids``, ``labels``,
    ``attention_mask`` (and ``position_ids``), each whole, in that order.

    Args:
        shape: ``[rows, seq_len]``.
        settings: the data set's settings (split, seq_len, packing, ...).
        tensor_bytes: byte buffers in the order above; a tensor may come in several pieces
            (a streaming hash of the concatenation equals the hash of the whole).
    """
    h = xxhash.xxh3_128()
    meta = {"v": FINGERPRINT_VERSION, "shape": shape, "settings": settings}
    h.update(json.dumps(meta, sort_keys=True).encode("utf-8"))
    for b in tensor_bytes:
        h.update(b)
    return h.hexdigest()


class TokenizedDataset(Dataset[dict[str, torch.Tensor]]):
    """Rows of ``seq_len`` tokens with labels and attention mask.

    Storage is compact (``int32`` ids and labels, ``bool`` mask); :meth:`__getitem__` returns
    ``torch.long`` tensors as transformers models expect.

    Args:
        input_ids: ``int32 [rows, seq_len]`` token ids.
        labels: ``int32 [rows, seq_len]``, ``-100`` where no loss is taken (see
            :mod:`evertrain.data.pack` for the convention).
        attention_mask: ``bool [rows, seq_len]``, False on padding.
        settings: JSON-able settings that produced the rows (split name, seq_len, packing),
            folded into :attr:`fingerprint`.
        position_ids: ``int32 [rows, seq_len]``, each packed document's positions from 0
            (``data.packing: masked``); None: rows carry no positions of their own.
        fingerprint: the tensors' :func:`fingerprint_of`, when the caller computed it from
            the same bytes (the tensors may be memory-mapped from a file; see
            :mod:`.rowstore`); None: computed here.

    Attributes:
        fingerprint: XXH3-128 hex digest over ``settings`` and the bytes of all three tensors:
            equal fingerprints mean identical rows in identical order.
        seq_len: tokens per row.
        getitem_calls: how many times :meth:`__getitem__` ran in *this* process (calls inside
            DataLoader worker processes are not counted); tests use it to prove a resumed
            loader does not read consumed examples.

    Raises:
        ValueError: tensors of different shapes, not 2-D, or of the wrong dtype.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        settings: dict[str, Any] | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        fingerprint: str | None = None,
    ) -> None:
        if (
            input_ids.dim() != 2
            or labels.shape != input_ids.shape
            or attention_mask.shape != input_ids.shape
        ):
            raise ValueError(
                f"input_ids, labels and attention_mask must share one 2-D shape, got "
                f"{tuple(input_ids.shape)}, {tuple(labels.shape)}, {tuple(attention_mask.shape)}"
            )
        if (
            input_ids.dtype != torch.int32
            or labels.dtype != torch.int32
            or attention_mask.dtype != torch.bool
        ):
            raise ValueError("expected int32 input_ids and labels and a bool attention_mask")
        self.input_ids = input_ids.contiguous()
        self.labels = labels.contiguous()
        self.attention_mask = attention_mask.contiguous()
        if position_ids is not None and (
            position_ids.shape != input_ids.shape or position_ids.dtype != torch.int32
        ):
            raise ValueError("position_ids must be int32 and shaped like input_ids")
        self.position_ids = None if position_ids is None else position_ids.contiguous()
        self.settings = dict(settings or {})
        self.seq_len = int(input_ids.shape[1])
        self.getitem_calls = 0
        # given by a builder that hashed these very bytes as it wrote them to a file
        # (:mod:`.rowstore`): recomputing it would read a memory-mapped data set in full
        self.fingerprint = fingerprint if fingerprint is not None else self._fingerprint()

    def _fingerprint(self) -> str:
        extra = () if self.position_ids is None else (self.position_ids,)
        return fingerprint_of(
            list(self.input_ids.shape),
            self.settings,
            (_bytes_of(t) for t in (self.input_ids, self.labels, self.attention_mask, *extra)),
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Row ``i`` as ``{"input_ids", "labels", "attention_mask"}`` (and ``position_ids``
        when the rows have them), each ``long [seq_len]``.

        Raises:
            IndexError: ``i`` out of range.
        """
        if get_worker_info() is None:
            self.getitem_calls += 1
        row = {
            "input_ids": self.input_ids[i].long(),
            "labels": self.labels[i].long(),
            "attention_mask": self.attention_mask[i].long(),
        }
        if self.position_ids is not None:
            row["position_ids"] = self.position_ids[i].long()
        return row

    def num_tokens(self, i: int) -> int:
        """Non-padding tokens in row ``i``."""
        return int(self.attention_mask[i].sum())

    def num_target_tokens(self, i: int) -> int:
        """Tokens of row ``i`` with a label (not ``-100``); the loss averages over these
        (after the causal shift, which drops position 0)."""
        return int((self.labels[i] != -100).sum())

    @property
    def total_tokens(self) -> int:
        """Non-padding tokens in all rows."""
        return int(self.attention_mask.sum())

    @property
    def total_target_tokens(self) -> int:
        """Labelled tokens in all rows."""
        return int((self.labels != -100).sum())

    def __repr__(self) -> str:
        return (
            f"TokenizedDataset(rows={len(self)}, seq_len={self.seq_len}, "
            f"fingerprint={self.fingerprint[:12]}..., settings={self.settings})"
        )
