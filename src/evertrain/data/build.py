"""Build the training and validation sets from ``data.files``: read, validate, split, tokenise,
pack or pad, optionally through the on-disk cache."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
import xxhash

from evertrain.config import DataConfig
from evertrain.data import cache
from evertrain.data.dataset import TokenizedDataset
from evertrain.data.encode import Encoder, tokenizer_identity
from evertrain.data.errors import DataError
from evertrain.data.formats import Document, Format, detect_format, validate_record
from evertrain.data.pack import pack, pad_rows
from evertrain.data.records import file_kind, iter_records, read_bytes
from evertrain.data.report import MAX_REASONS, DataReport, FileReport, SplitReport
from evertrain.data.split import is_validation

log = logging.getLogger("evertrain.data")

# Bump when any rule that shapes the tensors changes: it invalidates cache entries.
PIPELINE_VERSION = 1
Policy = Literal["fail", "skip"]


def chunk_chars(cfg: DataConfig) -> int:
    """Characters per chunk for ``text_split: chunks``: ``4 * seq_len`` (about one row of
    tokens for a subword tokenizer at ~4 characters per token)."""
    return 4 * cfg.seq_len


def read_documents(
    path: str | Path, data: bytes, cfg: DataConfig, policy: Policy | None = None
) -> tuple[FileReport, list[Document]]:
    """Parse and validate every record of one file.

    Args:
        path: the file (for its extension and for messages).
        data: its bytes.
        cfg: ``format``, ``text_split`` and ``seq_len`` (chunk size) are used.
        policy: ``"fail"`` or ``"skip"``; default ``cfg.on_bad_record``.

    Returns:
        The file's report and its valid documents in file order.

    Raises:
        DataError: a file-level problem; the first bad record under ``"fail"``; a file with
            no valid record (always).
    """
    policy = policy or cfg.on_bad_record
    name = str(path)
    kind = file_kind(path)
    fmt: Format | None = None if cfg.format == "auto" else cfg.format
    if kind == "text" and fmt not in (None, "text"):
        raise DataError(
            f"plain text files hold text records, but data.format is {fmt!r}",
            file=name,
            hint="use a .jsonl file for that format, or format: auto",
        )
    report = FileReport(
        path=name,
        format=fmt or "unknown",
        bytes=len(data),
        content_hash=xxhash.xxh3_128_hexdigest(data),
    )
    docs: list[Document] = []
    for item in iter_records(path, data, text_split=cfg.text_split, chunk_chars=chunk_chars(cfg)):
        try:
            if isinstance(item, DataError):
                raise item
            if fmt is None:
                fmt = detect_format(item)
            docs.append(validate_record(item, fmt))
        except DataError as e:
            if policy == "fail":
                raise
            report.skipped += 1
            if len(report.reasons) < MAX_REASONS:
                report.reasons.append(str(e))
    report.format = fmt or "unknown"
    report.records = len(docs)
    if not docs:
        first = f"; first: {report.reasons[0]}" if report.reasons else ""
        raise DataError(
            f"no valid records ({report.skipped} bad record(s) skipped{first})", file=name
        )
    if report.skipped:
        log.warning(
            "%s: skipped %d bad record(s); first: %s", name, report.skipped, report.reasons[0]
        )
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
    return read_documents(path, read_bytes(path), cfg, policy)[0]


def _hash_file(path: str) -> str:
    h = xxhash.xxh3_128()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except FileNotFoundError:
        raise DataError("file not found (check data.files)", file=path) from None
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", file=path) from None
    return h.hexdigest()


def _settings(cfg: DataConfig, split: str) -> dict[str, Any]:
    return {
        "split": split,
        "seq_len": cfg.seq_len,
        "packing": cfg.packing,
        "pipeline": PIPELINE_VERSION,
    }


def _split_report(ds: TokenizedDataset, documents: int, truncated: int) -> SplitReport:
    no_target = int(((ds.labels != -100).sum(dim=1) == 0).sum()) if len(ds) else 0
    return SplitReport(
        documents=documents,
        rows=len(ds),
        tokens=ds.total_tokens,
        target_tokens=ds.total_target_tokens,
        truncated_documents=truncated,
        rows_without_targets=no_target,
        fingerprint=ds.fingerprint,
    )


def build_datasets(
    cfg: DataConfig, tokenizer: Any, seed: int
) -> tuple[TokenizedDataset, TokenizedDataset, DataReport]:
    """Read every file of ``cfg.files``, validate, split, tokenise and pack (or pad).

    Order: files in ``cfg.files`` order, records in file order; each document goes to train or
    validation by :func:`~evertrain.data.split.is_validation` (content hash and ``seed``,
    before packing), then each side is tokenised (:mod:`~evertrain.data.encode`) and laid
    out in rows (:mod:`~evertrain.data.pack`). The result is a pure function of the file
    bytes, the tokenizer, ``cfg`` and ``seed``. With ``cfg.cache_dir`` the tensors are cached
    (:mod:`~evertrain.data.cache`), keyed by all of those.

    Returns:
        ``(train, val, report)``; ``val`` may have zero rows.

    Raises:
        DataError: no files, a bad file or record (per ``cfg.on_bad_record``), a file with
            no valid record, or no training rows at all.
        ValueError: the tokenizer has no eos token.
    """
    if not cfg.files:
        raise DataError("data.files is empty: list at least one data file")
    encoder = Encoder(tokenizer)
    key: str | None = None
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
    hashes: list[str | None] = [None] * len(cfg.files)
    if cache_dir is not None:
        hashes = [_hash_file(f) for f in cfg.files]
        key = cache.cache_key(
            {
                "pipeline": PIPELINE_VERSION,
                "files": [
                    {"path": f, "xxh3_128": h} for f, h in zip(cfg.files, hashes, strict=True)
                ],
                "tokenizer": tokenizer_identity(tokenizer),
                "data": cfg.model_dump(mode="json", exclude={"cache_dir", "num_workers", "files"}),
                "chunk_chars": chunk_chars(cfg),
                "seed": seed,
            }
        )
        hit = cache.load(cache_dir, key)
        if hit is not None:
            return _from_cache(cfg, hit, cache_dir, key)

    report = DataReport(cache="off" if key is None else "miss")
    train_docs: list[Document] = []
    val_docs: list[Document] = []
    for f, expected in zip(cfg.files, hashes, strict=True):
        data = read_bytes(f)
        fr, docs = read_documents(f, data, cfg)
        if expected is not None and fr.content_hash != expected:
            raise DataError("the file changed while it was being read; retry", file=f)
        report.files.append(fr)
        report.skipped += fr.skipped
        report.skip_reasons.extend(fr.reasons[: MAX_REASONS - len(report.skip_reasons)])
        for d in docs:
            side = (
                val_docs if is_validation(d.content_key(), seed, cfg.val_fraction) else train_docs
            )
            side.append(d)
    if not train_docs:
        raise DataError(
            f"no training documents: all {len(val_docs)} document(s) fell into the validation "
            f"split (val_fraction {cfg.val_fraction}); add data or lower data.val_fraction"
        )

    layout = pack if cfg.packing else pad_rows
    out = []
    for split, docs in (("train", train_docs), ("val", val_docs)):
        p = layout(encoder.encode(docs), cfg.seq_len, encoder.pad_id)
        ds = TokenizedDataset(p.input_ids, p.labels, p.attention_mask, _settings(cfg, split))
        setattr(report, split, _split_report(ds, len(docs), p.truncated_documents))
        out.append(ds)
    train, val = out
    if cache_dir is not None and key is not None:
        tensors = {
            f"{s}.{n}": getattr(ds, n)
            for s, ds in (("train", train), ("val", val))
            for n in ("input_ids", "labels", "attention_mask")
        }
        report.cache_path = str(cache_dir / f"{key}.json")
        try:
            cache.store(cache_dir, key, tensors, {"report": report.to_json()})
        except OSError as e:
            # The data set is built and correct; a cache we cannot write only costs time.
            log.warning("cannot write the data cache in %s: %s", cache_dir, e)
            report.cache_path = None
    log.info(report.summary())
    return train, val, report


def _from_cache(
    cfg: DataConfig, hit: tuple[dict[str, torch.Tensor], dict[str, Any]], cache_dir: Path, key: str
) -> tuple[TokenizedDataset, TokenizedDataset, DataReport]:
    tensors, meta = hit
    report = DataReport.from_json(meta["report"])
    report.cache, report.cache_path = "hit", str(cache_dir / f"{key}.json")
    out = []
    for split in ("train", "val"):
        ds = TokenizedDataset(
            tensors[f"{split}.input_ids"],
            tensors[f"{split}.labels"],
            tensors[f"{split}.attention_mask"],
            _settings(cfg, split),
        )
        expected = getattr(report, split).fingerprint
        if ds.fingerprint != expected:
            raise DataError(
                f"data cache entry {report.cache_path} holds different tensors than "
                f"it describes ({split}); delete it and rerun"
            )
        out.append(ds)
    log.info(report.summary())
    return out[0], out[1], report
