"""Build the training and validation sets from ``data.files``: read, validate, split, tokenise,
pack or pad, optionally through the on-disk cache.

A ``data.files`` entry is a file (see :mod:`.records`) or a directory written by Hugging Face
``datasets``' ``save_to_disk`` (see :mod:`.hf_datasets`), read into documents by
:mod:`.documents`.

Memory: documents are tokenised a block at a time (about 1 MB of text) and their rows go
to a row store (:mod:`.rowstore`) as they are made. With the data cache on, that store is
the cache entry's files and the data set is memory-mapped from them, and JSONL files are
read as a stream: peak memory does not grow with the data (bench/bench_tokenize.py measures
it at 100 MB and 1 GB). Other file kinds are read whole; without a cache, the rows are
held in memory."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash

from evertrain.config import DataConfig, ModelKind
from evertrain.data import cache
from evertrain.data.dataset import TokenizedDataset
from evertrain.data.documents import (
    chunk_chars,
    iter_documents,
    new_report,
    open_source,
    read_documents,
    read_source,
    validate_file,
)
from evertrain.data.encode import Encoder, tokenizer_identity, use_chat_template
from evertrain.data.errors import DataError
from evertrain.data.formats import Document
from evertrain.data.hf_datasets import hash_dir
from evertrain.data.pack import Packed, Packer, pad_rows, pad_seq2seq
from evertrain.data.records import read_error
from evertrain.data.report import MAX_REASONS, DataReport, SplitReport
from evertrain.data.rowstore import FileRows, MemoryRows, dataset_from_files
from evertrain.data.split import is_validation

log = logging.getLogger("evertrain.data")

# Bump when any rule that shapes the tensors changes: it invalidates cache entries.
PIPELINE_VERSION = 1
__all__ = ["build_datasets", "chunk_chars", "read_documents", "read_source", "validate_file"]


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
    except OSError as e:
        raise read_error(path, e) from None
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
                "data": cfg.model_dump(
                    mode="json", exclude={"cache_dir", "num_workers", "files", "trim_padding"}
                ),
                "chunk_chars": chunk_chars(cfg),
                "seed": seed,
                **({"model_kind": kind} if kind != "causal" else {}),
            }
        )
        hit = cache.load(cache_dir, key)
        if hit is not None:
            return _from_cache(cfg, hit, cache_dir, key, kind)

    if _masked(cfg, kind):
        _check_packed_masks()
    report = DataReport(cache="off" if key is None else "miss")
    stores: dict[str, RowStore] | None = None
    if cache_dir is not None and key is not None:
        try:
            stores = _file_stores(cache_dir, key, cfg, kind)
            train, val = _build(cfg, encoder, seed, kind, hashes, stores, report)
            report.cache_path = str(cache.store(cache_dir, key, _entry(stores, report)))
        except OSError as e:
            # the data set is still built, in memory: a cache we cannot write only costs time
            # (and memory), and the rows are the same bytes
            log.warning("cannot write the data cache in %s (%s); building in memory", cache_dir, e)
            report = DataReport(cache="miss")
            stores = None
        finally:
            for store in (stores or {}).values():
                store.close()
    if stores is None:
        memory: dict[str, RowStore] = {
            s: MemoryRows(cfg.seq_len, _masked(cfg, kind)) for s in SPLITS
        }
        train, val = _build(cfg, encoder, seed, kind, hashes, memory, report)
    log.info(report.summary())
    return train, val, report


SPLITS = ("train", "val")
RowStore = MemoryRows | FileRows
# documents tokenised together: about a megabyte of text, so a block's token lists (Python
# ints, ~36 bytes a token) stay near 10 MB whatever the file's size
_BLOCK_CHARS = 1 << 20
_BLOCK_DOCS = 4096


def _masked(cfg: DataConfig, kind: ModelKind) -> bool:
    """Whether rows carry per-document ``position_ids`` (seq2seq rows are never packed)."""
    return cfg.packing_mode == "masked" and kind == "causal"


def _file_stores(
    cache_dir: Path, key: str, cfg: DataConfig, kind: ModelKind
) -> dict[str, RowStore]:
    masked = _masked(cfg, kind)
    stores: dict[str, RowStore] = {}
    try:
        for s in SPLITS:
            stores[s] = FileRows(cache_dir, f"{key}.{s}", cfg.seq_len, masked)
    except OSError:
        for store in stores.values():
            store.close()
        raise
    return stores


def _entry(stores: dict[str, RowStore], report: DataReport) -> dict[str, Any]:
    tensors = {s: store.entries for s, store in stores.items() if isinstance(store, FileRows)}
    return {"report": report.to_json(), "tensors": tensors}


def _doc_chars(d: Document) -> int:
    n = len(d.text or "") + len(d.prompt or "") + len(d.completion or "")
    return n + sum(len(c) for _, c in d.messages or ())


def _blocks(docs: Iterator[Document]) -> Iterator[list[Document]]:
    block: list[Document] = []
    chars = 0
    for d in docs:
        block.append(d)
        chars += _doc_chars(d)
        if chars >= _BLOCK_CHARS or len(block) >= _BLOCK_DOCS:
            yield block
            block, chars = [], 0
    if block:
        yield block


def _build(
    cfg: DataConfig,
    encoder: Encoder,
    seed: int,
    kind: ModelKind,
    hashes: list[str | None],
    stores: dict[str, RowStore],
    report: DataReport,
) -> tuple[TokenizedDataset, TokenizedDataset]:
    mode = cfg.packing_mode
    packers = (
        {s: Packer(cfg.seq_len, encoder.pad_id, masked=_masked(cfg, kind)) for s in SPLITS}
        if kind == "causal" and mode != "none"
        else None
    )

    def layout(split: str, docs: list[Document]) -> Packed:
        if kind == "seq2seq":
            return pad_seq2seq(encoder.encode_seq2seq(docs), cfg.seq_len, encoder.pad_id)
        encoded = encoder.encode(docs)
        if packers is None:
            return pad_rows(encoded, cfg.seq_len, encoder.pad_id)
        return packers[split].feed(encoded)

    documents = dict.fromkeys(SPLITS, 0)
    for f, expected in zip(cfg.files, hashes, strict=True):
        data = open_source(f, cfg, stream=True)
        fr = new_report(f, data, cfg)
        for block in _blocks(iter_documents(f, data, cfg, fr, kind=kind)):
            sides: dict[str, list[Document]] = {s: [] for s in SPLITS}
            for d in block:
                val = is_validation(d.content_key(), seed, cfg.val_fraction)
                sides["val" if val else "train"].append(d)
            for split, docs in sides.items():
                if docs:
                    stores[split].add(layout(split, docs))
                    documents[split] += len(docs)
        if expected is not None and fr.content_hash != expected:
            raise DataError("the file changed while it was being read; retry", file=f)
        report.files.append(fr)
        report.skipped += fr.skipped
        report.skip_reasons.extend(fr.reasons[: MAX_REASONS - len(report.skip_reasons)])
    if not documents["train"]:
        raise DataError(
            f"no training documents: all {documents['val']} document(s) fell into the "
            f"validation split (val_fraction {cfg.val_fraction}); add data or lower "
            "data.val_fraction"
        )
    out = []
    for split in SPLITS:
        if packers is not None:
            stores[split].add(packers[split].finish())
        ds = stores[split].dataset(_settings(cfg, split, kind))
        st = stores[split].stats
        split_report = SplitReport(
            documents=documents[split],
            rows=st.rows,
            tokens=st.tokens,
            target_tokens=st.target_tokens,
            truncated_documents=st.truncated_documents,
            rows_without_targets=st.rows_without_targets,
            fingerprint=ds.fingerprint,
        )
        setattr(report, split, split_report)
        out.append(ds)
    return out[0], out[1]


def _from_cache(
    cfg: DataConfig, meta: dict[str, Any], cache_dir: Path, key: str, kind: ModelKind
) -> tuple[TokenizedDataset, TokenizedDataset, DataReport]:
    report = DataReport.from_json(meta["report"])
    report.cache, report.cache_path = "hit", str(cache_dir / f"{key}.json")
    out = []
    for split in SPLITS:
        # the files' bytes were verified against the hashes written with them, and the
        # fingerprint was computed from those bytes: hashing them again would only cost time
        fingerprint = getattr(report, split).fingerprint
        entries = meta["tensors"][split]
        try:
            ds = dataset_from_files(cache_dir, entries, _settings(cfg, split, kind), fingerprint)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(
                f"data cache entry {report.cache_path} cannot be read ({e}); delete it and rerun"
            ) from None
        out.append(ds)
    log.info(report.summary())
    return out[0], out[1], report
