"""Build the training and validation sets from ``data.files``: read, validate, split, tokenise,
pack or pad, optionally through the on-disk cache.

A ``data.files`` entry is a file (see :mod:`.records`) or a directory written by Hugging Face
``datasets``' ``save_to_disk`` (see :mod:`.hf_datasets`). Each raw record goes through
``data.columns`` (:func:`~.dialects.map_columns`; not for plain text files, whose records
have no columns), then format detection and validation (:mod:`.formats`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
import xxhash

from evertrain.config import DataConfig, ModelKind
from evertrain.data import cache
from evertrain.data.dataset import TokenizedDataset
from evertrain.data.dialects import decode_json_lists, map_columns
from evertrain.data.encode import Encoder, tokenizer_identity, use_chat_template
from evertrain.data.errors import DataError
from evertrain.data.formats import Document, RecordFormat, detect_format, validate_record
from evertrain.data.hf_datasets import dir_bytes, hash_dir, is_dataset_dir, iter_dataset_records
from evertrain.data.pack import pack, pad_rows, pad_seq2seq
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


def read_documents(
    path: str | Path,
    data: bytes | None,
    cfg: DataConfig,
    policy: Policy | None = None,
    kind: ModelKind | None = None,
) -> tuple[FileReport, list[Document]]:
    """Parse and validate every record of one file (or ``datasets`` directory).

    Args:
        path: the file (for its extension and for messages).
        data: its bytes, or None for a ``datasets`` directory (see :func:`read_source`).
        cfg: ``format``, ``columns``, ``text_split``, ``seq_len`` (chunk size) and
            ``max_record_bytes`` are used.
        policy: ``"fail"`` or ``"skip"``; default ``cfg.on_bad_record``.
        kind: the model kind the documents are for; default ``cfg.model_kind``.

    Returns:
        The file's report and its valid documents in file order.

    Raises:
        DataError: a file-level problem; the first bad record under ``"fail"``; a file with
            no valid record (always); for a seq2seq model, a file whose records are not
            ``prompt_completion`` (always, whatever the policy).
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
    report = FileReport(
        path=name,
        format=fmt or "unknown",
        bytes=dir_bytes(path) if data is None else len(data),
        content_hash=hash_dir(path) if data is None else xxhash.xxh3_128_hexdigest(data),
    )
    docs: list[Document] = []
    if data is None:
        records = iter_dataset_records(path, cfg.max_record_bytes)
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
        docs.append(doc)
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
    return read_documents(path, read_source(path), cfg, policy)[0]


def _check_packed_masks() -> None:
    # transformers turns restarting position_ids into per-document masks since 4.53
    # (masking_utils.find_packed_sequence_indices); without it the rows would silently
    # attend across documents
    try:
        from transformers import masking_utils

        ok = hasattr(masking_utils, "find_packed_sequence_indices")
    except ImportError:
        ok = False
    if not ok:
        raise DataError(
            "data.packing: masked needs transformers >= 4.53 (packed-sequence attention "
            "masks); upgrade transformers or use data.packing: greedy or none"
        )


def data_cache_dir(setting: str | None, default_cache: bool) -> Path | None:
    """Where tokenised data is cached: ``data.cache_dir`` if set (``"off"``: nowhere), else,
    with ``default_cache``, ``$EVERTRAIN_CACHE/data`` or ``~/.cache/evertrain/data`` (the
    model cache's sibling), else nowhere. Entries are keyed by content, so runs share
    them, concurrent writers write the same bytes, and any entry may be deleted."""
    if setting is not None and setting.strip().lower() == "off":
        return None
    if setting:
        return Path(setting).expanduser()
    if not default_cache:
        return None
    env = os.environ.get("EVERTRAIN_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "evertrain") / "data"


def _hash_file(path: str) -> str:
    """xxh3-128 hex digest of a data file's bytes, or of a directory's files
    (:func:`~.hf_datasets.hash_dir`).

    Raises:
        DataError: missing or unreadable.
    """
    if Path(path).is_dir():
        return hash_dir(path)
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


def _settings(cfg: DataConfig, split: str, kind: ModelKind) -> dict[str, Any]:
    out: dict[str, Any] = {
        "split": split,
        "seq_len": cfg.seq_len,
        "packing": cfg.packing,
        "pipeline": PIPELINE_VERSION,
    }
    if kind != "causal":  # absent for causal: its fingerprints stay what they were
        out["model_kind"] = kind
    return out


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
    cfg: DataConfig,
    tokenizer: Any,
    seed: int,
    *,
    kind: ModelKind | None = None,
    default_cache: bool = False,
) -> tuple[TokenizedDataset, TokenizedDataset, DataReport]:
    """Read every file of ``cfg.files``, validate, split, tokenise and pack (or pad).

    ``cfg.chat_template``, if set, is set on ``tokenizer`` first (see
    :func:`~.encode.use_chat_template`).

    Order: files in ``cfg.files`` order, records in file order; each document goes to train or
    validation by :func:`~evertrain.data.split.is_validation` (content hash and ``seed``,
    before packing), then each side is tokenised (:mod:`~evertrain.data.encode`) and laid
    out in rows (:mod:`~evertrain.data.pack`). The result is a pure function of the file
    bytes, the tokenizer, ``cfg``, ``kind`` and ``seed``. The tensors are cached
    (:mod:`~evertrain.data.cache`), keyed by all of those, in the directory
    :func:`data_cache_dir` gives for ``cfg.cache_dir`` and ``default_cache``.

    ``kind`` (default ``cfg.model_kind``, i.e. the run config's ``model.kind``):
    ``"seq2seq"`` lays each prompt/completion pair out as one row of encoder input and
    decoder target (:func:`~evertrain.data.pack.pad_seq2seq`); ``cfg.packing`` is then
    not used.

    Returns:
        ``(train, val, report)``; ``val`` may have zero rows.

    Raises:
        DataError: no files, a bad file or record (per ``cfg.on_bad_record``), a file with
            no valid record, no training rows at all, (seq2seq) records that are not
            ``prompt_completion``, or a ``data.chat_template`` that cannot be read or parsed.
        ValueError: the tokenizer has no eos token.
    """
    kind = kind or cfg.model_kind
    if not cfg.files:
        raise DataError("data.files is empty: list at least one data file")
    # before the cache key: the template in use is part of the tokenizer's identity
    use_chat_template(tokenizer, cfg.chat_template)
    encoder = Encoder(tokenizer)
    key: str | None = None
    cache_dir = data_cache_dir(cfg.cache_dir, default_cache)
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
                **({"model_kind": kind} if kind != "causal" else {}),
            }
        )
        hit = cache.load(cache_dir, key)
        if hit is not None:
            return _from_cache(cfg, hit, cache_dir, key, kind)

    report = DataReport(cache="off" if key is None else "miss")
    train_docs: list[Document] = []
    val_docs: list[Document] = []
    for f, expected in zip(cfg.files, hashes, strict=True):
        fr, docs = read_documents(f, read_source(f), cfg, kind=kind)
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

    mode = cfg.packing_mode
    if mode == "masked" and kind == "causal":
        _check_packed_masks()
    out = []
    for split, docs in (("train", train_docs), ("val", val_docs)):
        if kind == "seq2seq":
            p = pad_seq2seq(encoder.encode_seq2seq(docs), cfg.seq_len, encoder.pad_id)
        else:
            encoded = encoder.encode(docs)
            p = (
                pad_rows(encoded, cfg.seq_len, encoder.pad_id)
                if mode == "none"
                else pack(encoded, cfg.seq_len, encoder.pad_id, masked=mode == "masked")
            )
        ds = TokenizedDataset(
            p.input_ids, p.labels, p.attention_mask, _settings(cfg, split, kind), p.position_ids
        )
        setattr(report, split, _split_report(ds, len(docs), p.truncated_documents))
        out.append(ds)
    train, val = out
    if cache_dir is not None and key is not None:
        tensors = {
            f"{s}.{n}": getattr(ds, n)
            for s, ds in (("train", train), ("val", val))
            for n in ("input_ids", "labels", "attention_mask", "position_ids")
            if getattr(ds, n) is not None
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
    cfg: DataConfig,
    hit: tuple[dict[str, torch.Tensor], dict[str, Any]],
    cache_dir: Path,
    key: str,
    kind: ModelKind,
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
            _settings(cfg, split, kind),
            tensors.get(f"{split}.position_ids"),
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
