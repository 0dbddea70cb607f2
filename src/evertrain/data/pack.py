"""Packing and padding: lay tokenised documents out as fixed-length rows.

Label convention (the one of transformers' causal LMs, which shift internally: the logits at
position ``i`` are scored against ``labels[i + 1]``): ``labels[i]`` is the token that position
``i - 1`` must predict, or ``-100`` (ignored). ``labels[i] = -100`` where token ``i`` is

- not a target of its document (prompt, non-assistant turn, ``bos``),
- the first token of a document: nothing before it in the row belongs to the same
  document, so no token is ever trained to predict across a document boundary (in
  particular, the previous document's ``eos`` is never trained to predict the next
  document's first token),
- padding.

``packing=True``: all documents are concatenated in order and cut into rows of exactly
``seq_len`` tokens. A document that does not fit continues in the next row, which starts
with the **last token of the previous row again** (an overlap of one token): position 0's
label is never scored (the shift drops it), so without the overlap the token after the
cut would never be a target; with it, every target of every document is scored exactly
once, after its predecessor in the same row. The overlap token's label is -100 in its
second row (it was scored in the first), so every label that is not -100 is scored
exactly once. The last, incomplete row is kept and right-padded (``attention_mask`` 0,
labels -100) so no data is lost. Attention still spans document boundaries within a row
(no block-diagonal mask): the labels stop the loss from crossing them, the usual
trade-off of packed training.

``packing="masked"``: the rows of ``packing=True``, plus ``position_ids`` that start at 0
with every document and at every row (a document continued from the previous row starts
again at 0 there, at its overlap token: it cannot attend to its first part), and padding
as a segment of its own. transformers turns positions that restart into a
block-diagonal causal mask when neither an ``attention_mask`` nor a KV cache is passed
(``masking_utils.find_packed_sequence_indices``: SDPA and eager attention; flash
attention's varlen kernels on GPU), so each document attends only to itself and sees the
positions it would see alone: packing changes speed, not what is learned.
:func:`~evertrain.train_settings.token_loss_sum` drops the ``attention_mask`` of a batch
that has ``position_ids`` and passes ``use_cache=False``.

``packing=False``: one document per row, truncated to ``seq_len`` (losing its tail, its
``eos`` included; counted in ``truncated_documents``) and right-padded.

Seq2seq models (``model.kind: seq2seq``, :func:`pad_seq2seq`) have no shift: the decoder
is fed ``labels`` shifted right by the model itself, and ``labels[i]`` is the target at
decoder position ``i``. One prompt/completion pair per row: ``input_ids`` and
``attention_mask`` are the encoder input, ``labels`` the completion's tokens and ``eos``,
each truncated to ``seq_len`` and right-padded (pad id / ``-100``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from evertrain.data.encode import Encoded, Seq2SeqEncoded

IGNORE_INDEX = -100


@dataclass
class Packed:
    """Rows ready for :class:`~.dataset.TokenizedDataset`.

    Attributes:
        input_ids: ``int32 [rows, seq_len]``.
        labels: ``int32 [rows, seq_len]``, ``-100`` where ignored.
        attention_mask: ``bool [rows, seq_len]``, False on padding.
        truncated_documents: documents cut short by ``seq_len`` (``packing=False`` only).
        position_ids: ``int32 [rows, seq_len]``, each document's positions from 0
            (``packing="masked"`` only, else None).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    truncated_documents: int = 0
    position_ids: torch.Tensor | None = None


def _doc_arrays(doc: Encoded) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(doc[0], dtype=np.int64)
    labels = np.where(np.asarray(doc[1], dtype=bool), ids, IGNORE_INDEX)
    if len(labels):
        labels[0] = IGNORE_INDEX
    return ids, labels


def _to_tensors(
    ids: np.ndarray, labels: np.ndarray, mask: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int32)),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int32)),
        torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)),
    )


def empty(seq_len: int, masked: bool) -> Packed:
    """Zero rows of ``seq_len`` columns (with ``position_ids`` when ``masked``)."""
    empty = np.zeros((0, seq_len), dtype=np.int64)
    out = Packed(*_to_tensors(empty, empty, empty.astype(bool)))
    if masked:
        out.position_ids = torch.zeros((0, seq_len), dtype=torch.int32)
    return out


def _positions(doc: np.ndarray) -> torch.Tensor:
    # each document (and the padding) counts its positions from 0, and so does the part of a
    # document continued in the next row: it cannot see its first part anyway, and positions
    # past seq_len could run off a model's position table
    shape = doc.shape
    start = np.ones(shape, dtype=bool)
    start[:, 1:] = doc[:, 1:] != doc[:, :-1]
    index = np.broadcast_to(np.arange(shape[1]), shape)
    first = np.maximum.accumulate(np.where(start, index, 0), axis=1)
    return torch.from_numpy((index - first).astype(np.int32))


class Packer:
    """:func:`pack` fed in parts: documents go in, in order, in as many calls of
    :meth:`feed` as suit the caller; complete rows come out as soon as they are full, and
    :meth:`finish` pads the last one. The rows are exactly :func:`pack`'s for the
    concatenation of everything fed (tests compare them), while at most ``seq_len - 1``
    tokens wait between calls: the memory of a streamed build does not grow with the file.

    Not thread-safe: one builder feeds it.

    Raises:
        ValueError: ``seq_len`` below 2.
    """

    def __init__(self, seq_len: int, pad_id: int, masked: bool = False) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.seq_len, self.pad_id, self.masked = seq_len, pad_id, masked
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._doc: list[np.ndarray] = []  # each waiting token's document index
        self._waiting = 0  # tokens in the lists above
        self._docs = 0  # non-empty documents fed: the next document's index

    def feed(self, docs: list[Encoded]) -> Packed:
        """Add ``docs``; returns the rows completed by them (possibly zero rows)."""
        for d in docs:
            if not d[0]:
                continue
            ids, labels = _doc_arrays(d)
            self._ids.append(ids)
            self._labels.append(labels)
            self._doc.append(np.full(len(ids), self._docs, dtype=np.int64))
            self._docs += 1
            self._waiting += len(ids)
        return self._take(last=False)

    def finish(self) -> Packed:
        """The last, incomplete row, right-padded (zero rows if nothing is waiting)."""
        return self._take(last=True)

    def _take(self, last: bool) -> Packed:
        if self._waiting < (1 if last else self.seq_len):
            return empty(self.seq_len, self.masked)
        ids = np.concatenate(self._ids)
        labels = np.concatenate(self._labels)
        doc = np.concatenate(self._doc)
        n, size = len(ids), self.seq_len
        starts, overlaps, p = [], [], 0
        while n - p >= size:
            starts.append(p)
            p += size
            # documents are fed whole, so one that continues past the row has its next
            # token waiting: the next row starts one token back (see the module doc)
            if p < n and doc[p] == doc[p - 1]:
                p -= 1
                overlaps.append(len(starts))
        if last and p < n:  # the last row, right-padded; the padding is a document of its own
            pad = size - (n - p)
            ids = np.concatenate([ids, np.full(pad, self.pad_id, dtype=np.int64)])
            labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX, dtype=np.int64)])
            doc = np.concatenate([doc, np.full(pad, self._docs, dtype=np.int64)])
            starts.append(p)
        index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(size)
        row_ids, row_labels, row_doc, mask = ids[index], labels[index], doc[index], index < n
        # the overlap token is a target in the row before, not in its own (nothing there
        # predicts it): -100 keeps "every label not -100 is scored once" true for counts
        row_labels[[i for i in overlaps if i < len(starts)], 0] = IGNORE_INDEX
        if last:
            p = n
        elif overlaps and overlaps[-1] == len(starts):
            labels[p] = IGNORE_INDEX  # the waiting tokens start with an overlap
        self._ids, self._labels, self._doc = [ids[p:n]], [labels[p:n]], [doc[p:n]]
        self._waiting = n - p
        out = Packed(*_to_tensors(row_ids, row_labels, mask))
        if self.masked:
            out.position_ids = _positions(row_doc)
        return out


def concat(parts: list[Packed]) -> Packed:
    """Rows of ``parts`` one after another (``truncated_documents`` summed).

    Raises:
        ValueError: ``parts`` is empty.
    """
    if not parts:
        raise ValueError("concat needs at least one Packed")
    pos = [p.position_ids for p in parts]
    return Packed(
        torch.cat([p.input_ids for p in parts]),
        torch.cat([p.labels for p in parts]),
        torch.cat([p.attention_mask for p in parts]),
        sum(p.truncated_documents for p in parts),
        None if any(x is None for x in pos) else torch.cat(pos),  # type: ignore[arg-type]
    )


def pack(docs: list[Encoded], seq_len: int, pad_id: int, masked: bool = False) -> Packed:
    """Concatenate ``docs`` and cut them into rows of ``seq_len`` tokens (see module doc).

    Returns ``ceil((total_tokens + c) / seq_len)`` rows, ``c`` the one-token overlaps
    (rows that continue a document, each repeating one token); zero rows for no documents.

    Raises:
        ValueError: ``seq_len`` below 2.
    """
    packer = Packer(seq_len, pad_id, masked)
    return concat([packer.feed(docs), packer.finish()])


def pad_rows(docs: list[Encoded], seq_len: int, pad_id: int) -> Packed:
    """One row per document: truncate to ``seq_len`` and right-pad (see module doc)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    n = len(docs)
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=bool)
    truncated = 0
    for r, d in enumerate(docs):
        d_ids, d_labels = _doc_arrays(d)
        if len(d_ids) > seq_len:
            truncated += 1
        k = min(len(d_ids), seq_len)
        ids[r, :k] = d_ids[:k]
        labels[r, :k] = d_labels[:k]
        mask[r, :k] = True
    return Packed(*_to_tensors(ids, labels, mask), truncated_documents=truncated)


def pad_seq2seq(pairs: list[Seq2SeqEncoded], seq_len: int, pad_id: int) -> Packed:
    """One ``(encoder ids, target ids)`` pair per row (see the module doc).

    Returns:
        ``len(pairs)`` rows; ``truncated_documents`` counts pairs whose encoder input or
        target did not fit in ``seq_len``.

    Raises:
        ValueError: ``seq_len`` below 2.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    n = len(pairs)
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=bool)
    truncated = 0
    for r, (src, tgt) in enumerate(pairs):
        if len(src) > seq_len or len(tgt) > seq_len:
            truncated += 1
        k, t = min(len(src), seq_len), min(len(tgt), seq_len)
        ids[r, :k] = src[:k]
        mask[r, :k] = True
        labels[r, :t] = tgt[:t]
    return Packed(*_to_tensors(ids, labels, mask), truncated_documents=truncated)


def target_tokens(labels: torch.Tensor, kind: str = "causal") -> int:
    """How many labels of ``labels`` (``long``/``int32 [batch, seq_len]``) the model's loss
    averages over: a causal LM shifts and never scores position 0; a seq2seq model scores
    every label that is not ``-100``.

    Raises:
        ValueError: ``kind`` is neither ``"causal"`` nor ``"seq2seq"``.
    """
    # numpy on the host batch: counting is not a device sync (or a tensor read-back)
    if kind == "causal":
        return int(np.count_nonzero(labels[:, 1:].numpy() != IGNORE_INDEX))
    if kind == "seq2seq":
        return int(np.count_nonzero(labels.numpy() != IGNORE_INDEX))
    raise ValueError(f"unknown model kind {kind!r}; expected 'causal' or 'seq2seq'")
