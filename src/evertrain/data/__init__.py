"""The data pipeline: files -> validated documents -> train/val split -> token rows -> batches.

Files: JSONL, JSON, CSV, Parquet, plain text (:mod:`.records`) and ``datasets``
``save_to_disk`` directories (:mod:`.hf_datasets`); formats ``text``,
``prompt_completion``, ``messages`` (:mod:`.formats`) and the ``alpaca``/``sharegpt``
dialects read into them (:mod:`.dialects`), after ``data.columns``.

- :func:`build_datasets`: read, validate, split, tokenise and pack ``data.files``.
- :func:`validate_file`: validate one file without a tokenizer (for a daemon's intake).
- :class:`TokenizedDataset`: fixed-length rows (``input_ids``, ``labels``, ``attention_mask``).
- :func:`target_tokens`: the labels a batch's loss averages over, per model kind.
- :class:`DataCursor`: the Stateful data position (epoch, offset); O(1) exact resume.
- :func:`make_loader`: a DataLoader at the cursor's position that never touches global RNG.
- :class:`DataError`: bad data, located to file, line and field.
"""

from evertrain.data.build import build_datasets, read_documents, validate_file
from evertrain.data.cursor import DataCursor, epoch_permutation
from evertrain.data.dataset import TokenizedDataset
from evertrain.data.encode import Encoder, tokenizer_identity
from evertrain.data.errors import DataError
from evertrain.data.formats import Document, detect_format, validate_record
from evertrain.data.loader import DataIterator, make_loader
from evertrain.data.pack import IGNORE_INDEX, pack, pad_rows, pad_seq2seq, target_tokens
from evertrain.data.records import Record, iter_records, read_bytes
from evertrain.data.report import DataReport, FileReport, SplitReport
from evertrain.data.split import is_validation, split_by_hash

__all__ = [
    "IGNORE_INDEX",
    "DataCursor",
    "DataError",
    "DataIterator",
    "DataReport",
    "Document",
    "Encoder",
    "FileReport",
    "Record",
    "SplitReport",
    "TokenizedDataset",
    "build_datasets",
    "detect_format",
    "epoch_permutation",
    "is_validation",
    "iter_records",
    "make_loader",
    "pack",
    "pad_rows",
    "pad_seq2seq",
    "read_bytes",
    "read_documents",
    "split_by_hash",
    "target_tokens",
    "tokenizer_identity",
    "validate_file",
    "validate_record",
]
