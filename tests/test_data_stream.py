"""A streamed build (JSONL read in blocks, rows packed a block at a time, written to the
cache's files and memory-mapped) gives exactly the rows, reports and errors of one that
holds everything in memory."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer

import evertrain.data.build as build
from evertrain.config import DataConfig
from evertrain.data import DataError, build_datasets, iter_records, read_bytes
from evertrain.data.jsonl_stream import JsonlStream
from evertrain.data.pack import Packer, concat, pack


@pytest.fixture(scope="module")
def tok() -> ByT5Tokenizer:
    return ByT5Tokenizer()


def _records(items: list[object]) -> list[tuple[str, object]]:
    return [
        (type(r).__name__, str(r) if isinstance(r, DataError) else (r.line, r.data))  # type: ignore[attr-defined]
        for r in items
    ]


TRICKY = (
    b"\xef\xbb\xbf"
    + b'{"text": "first"}\r\n\n  \n{"text": "a line far too long for the limit of fifty bytes"}\n'
    + b'not json\n{"text": "nul \x00"}\n[1]\n'
    + b'{"text": "'
    + b"x" * 300
    + b'"}\r\n'
    + b'{"text": "caf\xc3\xa9"}\n{"text": "bad \xff utf8"}\n'
    + b'{"text": "last, no newline"}'
)


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("limit", [None, 50])
def test_jsonl_stream_yields_what_the_whole_file_parser_yields(
    tmp_path: Path, block: int, limit: int | None
) -> None:
    f = tmp_path / "t.jsonl"
    f.write_bytes(TRICKY)
    whole = _records(list(iter_records(f, read_bytes(f), max_record_bytes=limit)))
    stream = JsonlStream(f, limit, block_bytes=block)
    assert _records(list(stream)) == whole
    assert stream.bytes == len(TRICKY)
    assert stream.content_hash == build._hash_file(str(f))
    assert len(whole) == 9  # the records and errors above, none lost or merged


def test_jsonl_stream_refuses_empty_and_missing_files(tmp_path: Path) -> None:
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b" \n\n \r\n")
    with pytest.raises(DataError, match="empty file"):
        list(JsonlStream(blank, None))
    with pytest.raises(DataError, match="file not found"):
        list(JsonlStream(tmp_path / "missing.jsonl", None))


def test_packer_fed_in_parts_makes_pack_rows() -> None:
    rng = random.Random(0)
    for _ in range(100):
        docs = [
            ([rng.randint(0, 50) for _ in range(k)], [rng.random() < 0.7 for _ in range(k)])
            for k in (rng.randint(0, 15) for _ in range(rng.randint(0, 12)))
        ]
        seq_len = rng.randint(2, 9)
        for masked in (False, True):
            whole = pack(docs, seq_len, 99, masked)
            packer, parts, i = Packer(seq_len, 99, masked), [], 0
            while i < len(docs):
                j = i + rng.randint(0, 4)
                parts.append(packer.feed(docs[i:j]))
                i = j
            parts.append(packer.finish())
            got = concat(parts)
            for name in ("input_ids", "labels", "attention_mask", "position_ids"):
                a, b = getattr(whole, name), getattr(got, name)
                assert (a is None and b is None) or torch.equal(a, b), name


def _data(tmp_path: Path) -> Path:
    rng = random.Random(1)
    lines = [
        json.dumps(
            {"prompt": f"q{i} " * rng.randint(1, 9), "completion": f"a{i} " * rng.randint(1, 30)}
        )
        for i in range(300)
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines[:150]) + "\nnot json\n" + "\n".join(lines[150:]) + "\n")
    return f


def _text(tmp_path: Path) -> Path:
    f = tmp_path / "t.jsonl"
    f.write_text(
        "".join(json.dumps({"text": f"doc {i} " * (i % 40 + 1)}) + "\n" for i in range(99))
    )
    return f


@pytest.mark.parametrize("packing", ["masked", "greedy", "none"])
def test_streamed_build_equals_in_memory_build(
    tmp_path: Path, tok: ByT5Tokenizer, packing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = dict(files=[str(_data(tmp_path)), str(_text(tmp_path))], seq_len=64, packing=packing)
    base["val_fraction"] = 0.2
    base["on_bad_record"] = "skip"
    mem_tr, mem_va, mem_rep = build_datasets(DataConfig(**base, cache_dir="off"), tok, seed=3)
    # tiny blocks: every block boundary falls inside a row
    monkeypatch.setattr(build, "_BLOCK_DOCS", 7)
    cfg = DataConfig(**base, cache_dir=str(tmp_path / "cache"))
    tr, va, rep = build_datasets(cfg, tok, seed=3)
    assert rep.cache == "miss" and rep.skipped == mem_rep.skipped == 1
    assert (rep.train, rep.val, rep.files) == (mem_rep.train, mem_rep.val, mem_rep.files)
    for x, y in ((tr, mem_tr), (va, mem_va)):
        assert x.fingerprint == y.fingerprint == x._fingerprint()
        for name in ("input_ids", "labels", "attention_mask", "position_ids"):
            a, b = getattr(x, name), getattr(y, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        assert [x[i]["input_ids"].tolist() for i in range(3)] == [
            y[i]["input_ids"].tolist() for i in range(3)
        ]


def test_a_bad_record_leaves_no_partial_cache_entry(tmp_path: Path, tok: ByT5Tokenizer) -> None:
    f = _data(tmp_path)
    cache = tmp_path / "cache"
    cfg = DataConfig(files=[str(f)], seq_len=64, cache_dir=str(cache))
    with pytest.raises(DataError, match=r"line 151"):
        build_datasets(cfg, tok, seed=0)
    assert list(cache.iterdir()) == []


def test_an_unwritable_cache_builds_in_memory_with_a_warning(
    tmp_path: Path, tok: ByT5Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    f = _data(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    base = dict(files=[str(f)], seq_len=64, on_bad_record="skip")
    with caplog.at_level(logging.WARNING, logger="evertrain.data"):
        tr, _, rep = build_datasets(DataConfig(**base, cache_dir=str(blocker)), tok, seed=0)
    assert "cannot write the data cache" in caplog.text and rep.cache_path is None
    off = build_datasets(DataConfig(**base, cache_dir="off"), tok, seed=0)[0]
    assert tr.fingerprint == off.fingerprint
    assert blocker.read_text().startswith("a file")


def test_fast_backend_gives_the_ids_the_tokenizer_call_gives() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from evertrain.data.encode import Encoder

    specials = ["<pad>", "</s>", "<|im_start|>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n", "é"]
    vocab = {c: i for i, c in enumerate(specials + chars + ["he", "ll", "hell"])}
    merges = [("h", "e"), ("l", "l"), ("he", "ll")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=specials[2:],
    )  # fmt: skip
    enc = Encoder(fast)
    assert enc._fast_backend() is not None
    texts = ["hello world", "<|im_start|>hell é", "", "</s> x"] * 300  # > one batch
    for literal in (True, False):
        want = fast(texts, add_special_tokens=False, split_special_tokens=literal)["input_ids"]
        assert enc._tokenize(texts, literal=literal) == [list(x) for x in want]
    # literal text keeps "<|im_start|>" as characters; otherwise it is the special token
    assert enc._tokenize(["<|im_start|>"], literal=False) == [[2]]
    assert len(enc._tokenize(["<|im_start|>"], literal=True)[0]) == len("<|im_start|>")
    # a truncation set on the backend is what __call__ turns off: the call path is taken
    fast.backend_tokenizer.enable_truncation(3)
    assert enc._fast_backend() is None
    assert enc._tokenize(["hello world"], literal=True) == [
        list(fast("hello world", add_special_tokens=False)["input_ids"])
    ]


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_a_damaged_cache_file_is_rebuilt_not_trusted(
    tmp_path: Path, tok: ByT5Tokenizer, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    cfg = DataConfig(files=[str(_text(tmp_path))], seq_len=64, cache_dir=str(tmp_path / "c"))
    first, _, rep = build_datasets(cfg, tok, seed=0)
    key = Path(rep.cache_path or "").stem
    f = tmp_path / "c" / f"{key}.train.labels.safetensors"
    raw = f.read_bytes()
    if damage == "header":  # a header that lies about the shape, the tensor bytes intact
        rows = len(first)
        raw = raw.replace(f"[{rows},64]".encode(), f"[{rows - 1},64]".encode().ljust(
            len(f"[{rows},64]")), 1)  # fmt: skip
    else:
        raw = raw[:5]
    # replaced, not rewritten in place: ``first`` maps the old file, and a mapped file
    # truncated under a process kills it with SIGBUS (docs/config.md)
    f.with_suffix(".new").write_bytes(raw)
    f.with_suffix(".new").replace(f)
    with caplog.at_level(logging.WARNING, logger="evertrain.data"):
        again, _, rep2 = build_datasets(cfg, tok, seed=0)
    assert rep2.cache == "miss" and "rebuilding" in caplog.text
    assert again.fingerprint == first.fingerprint and torch.equal(again.labels, first.labels)
