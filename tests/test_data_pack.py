"""Tokenisation masks, packing and padding, the train/val split, determinism and the cache.

ByT5's tokenizer maps byte ``b`` to id ``b + 3`` (0 pad, 1 eos, 2 unk), so expected ids and
label positions are computed here independently of the code under test.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import ByT5Tokenizer

from evertrain.config import DataConfig
from evertrain.data import (
    DataError,
    Document,
    Encoder,
    build_datasets,
    is_validation,
    pack,
    pad_rows,
    target_tokens,
)

EOS, PAD, IGN = 1, 0, -100
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> ByT5Tokenizer:
    return ByT5Tokenizer()


def b(s: str) -> list[int]:
    return [x + 3 for x in s.encode("utf-8")]


def doc(kind: str, **kw: object) -> Document:
    return Document("f.jsonl", 1, "line", kind, **kw)  # type: ignore[arg-type]


def chat(*turns: tuple[str, str]) -> Document:
    return doc("messages", messages=tuple(turns))


def targets(ids: list[int], mask: list[bool]) -> list[int]:
    return [i for i, m in zip(ids, mask, strict=True) if m]


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- encoding


def test_text_is_bytes_plus_eos_and_all_targets(tok: ByT5Tokenizer) -> None:
    ((ids, mask),) = Encoder(tok).encode([doc("text", text="héllo </s>")])
    # A literal "</s>" in a document stays text: only the appended eos is an eos.
    assert ids == b("héllo </s>") + [EOS]
    assert mask == [True] * len(ids)


def test_prompt_completion_loss_on_completion_only(tok: ByT5Tokenizer) -> None:
    ((ids, mask),) = Encoder(tok).encode(
        [doc("prompt_completion", prompt="Q: 2+2?", completion=" 4")]
    )
    assert ids == b("Q: 2+2?") + b(" 4") + [EOS]
    assert mask == [False] * 7 + [True] * 3


def test_chat_fallback_template_masks_exactly_the_assistant_turns(tok: ByT5Tokenizer) -> None:
    d = chat(
        ("system", "S"), ("user", "hi"), ("assistant", "yo"), ("user", "x"), ("assistant", "ok")
    )
    ((ids, mask),) = Encoder(tok).encode([d])
    text = "<|system|>\nS\n<|user|>\nhi\n<|assistant|>\nyo\n<|user|>\nx\n<|assistant|>\nok\n"
    assert ids == b(text) + [EOS]
    # Targets: each reply with its newline, and the final eos; never a role header.
    expected = [False] * len(ids)
    for reply in ("yo\n", "ok\n"):
        start = len(text.encode().split(b"<|assistant|>\n" + reply.encode())[0]) + 14
        expected[start : start + len(reply)] = [True] * len(reply)
    expected[-1] = True
    assert mask == expected
    assert targets(ids, mask) == b("yo\n") + b("ok\n") + [EOS]


def test_chat_fallback_eos_not_a_target_after_a_user_turn(tok: ByT5Tokenizer) -> None:
    ((ids, mask),) = Encoder(tok).encode([chat(("user", "a"), ("assistant", "b"), ("user", "c"))])
    assert ids[-1] == EOS and mask[-1] is False
    assert targets(ids, mask) == b("b\n")


def test_chat_template_masks_reply_and_end_of_turn(tok: ByT5Tokenizer) -> None:
    t = ByT5Tokenizer()
    t.chat_template = CHATML
    ((ids, mask),) = Encoder(t).encode(
        [chat(("user", "hi"), ("assistant", "yo"), ("user", "more"), ("assistant", "ok"))]
    )
    text = (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
        "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    )
    assert ids == b(text) + [EOS]
    expected = [False] * len(ids)
    pos = 0
    for reply in ("yo<|im_end|>\n", "ok<|im_end|>\n"):
        pos = text.index("assistant\n" + reply, pos) + len("assistant\n")
        expected[pos : pos + len(reply)] = [True] * len(reply)
    expected[-1] = True
    assert mask == expected


def test_chat_template_that_rewrites_history_is_refused(tok: ByT5Tokenizer) -> None:
    t = ByT5Tokenizer()
    t.chat_template = "{{ messages|length }}:" + CHATML
    with pytest.raises(DataError, match=r"not prefix-stable") as e:
        Encoder(t).encode([chat(("user", "hi"), ("assistant", "yo"))])
    assert (e.value.file, e.value.line, e.value.field) == ("f.jsonl", 1, "messages[1]")


def test_chat_template_errors_become_data_errors(tok: ByT5Tokenizer) -> None:
    t = ByT5Tokenizer()
    t.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="roles must alternate"):
        Encoder(t).encode([chat(("user", "hi"), ("assistant", "yo"))])


# --------------------------------------------------------------------------- packing


def test_packing_boundaries_and_shift(tok: ByT5Tokenizer) -> None:
    docs = [
        (b("abc") + [EOS], [True] * 4),
        (b("xy") + [EOS], [False, True, True]),
        (b("hello") + [EOS], [True] * 6),
    ]
    p = pack(docs, seq_len=5, pad_id=PAD)
    assert p.input_ids.dtype == torch.int32 and p.input_ids.shape == (3, 5)
    # "xy" and "hello" continue past a row's end: the next row starts with the token
    # before the cut again ("x", "e"), so "y" and the second "l" are scored, after their
    # predecessors; 13 tokens + 2 overlaps fill 3 rows exactly
    assert p.input_ids.tolist() == [
        b("abc") + [EOS] + b("x"),
        b("xy") + [EOS] + b("he"),
        b("ello") + [EOS],
    ]
    assert p.attention_mask.all()
    # doc starts ("a", "x", "h") and the prompt "x" are never targets
    assert p.labels.tolist() == [
        [IGN] + b("bc") + [EOS, IGN],
        [IGN] + b("y") + [EOS, IGN] + b("e"),
        [IGN] + b("llo") + [EOS],
    ]
    # every target of every document, once; no label that is not -100 goes unscored
    assert target_tokens(p.labels) == int((p.labels != IGN).sum()) == 3 + 2 + 5


def test_packing_scores_every_target_once_after_its_predecessor() -> None:
    """Random documents of unique tokens (document * 100 + position): every scored label is
    the token right after its input in the same document, and the scored targets are each
    document's targets (position >= 1, flag set), each exactly once; greedy and masked."""
    rng = random.Random(3)
    for _ in range(200):
        docs = []
        for d in range(rng.randint(0, 8)):
            k = rng.randint(0, 14)
            docs.append(([d * 100 + i for i in range(k)], [rng.random() < 0.7 for _ in range(k)]))
        seq_len = rng.randint(2, 7)
        want = sorted(ids[j] for ids, flags in docs for j in range(1, len(ids)) if flags[j])
        for masked in (False, True):
            p = pack(docs, seq_len, pad_id=-1, masked=masked)
            ids, labels = p.input_ids.tolist(), p.labels.tolist()
            scored = []
            for row_ids, row_labels in zip(ids, labels, strict=True):
                for c in range(1, seq_len):
                    if row_labels[c] != IGN:
                        assert row_labels[c] == row_ids[c] == row_ids[c - 1] + 1
                        scored.append(row_labels[c])
            assert sorted(scored) == want
            assert all(row_labels[0] == IGN for row_labels in labels)
            # the rows hold the stream in order: each row continues where the last ended,
            # or one token back where a document continues
            stream = [t for d_ids, _ in docs for t in d_ids]
            rebuilt: list[int] = []
            for row_ids, keep in zip(ids, p.attention_mask.tolist(), strict=True):
                row = [t for t, k in zip(row_ids, keep, strict=True) if k]
                rebuilt += row[1:] if rebuilt and row[0] == rebuilt[-1] else row
            assert rebuilt == stream


def test_padding_one_document_per_row_with_truncation() -> None:
    docs = [(b("ab") + [EOS], [True] * 3), (b("abcdefgh") + [EOS], [True] * 9)]
    p = pad_rows(docs, seq_len=6, pad_id=PAD)
    assert p.input_ids.tolist() == [b("ab") + [EOS, PAD, PAD, PAD], b("abcdef")]
    assert p.labels.tolist() == [[IGN] + b("b") + [EOS, IGN, IGN, IGN], [IGN] + b("bcdef")]
    assert p.attention_mask.tolist() == [[True] * 3 + [False] * 3, [True] * 6]
    assert p.truncated_documents == 1


def test_build_datasets_packed_and_padded(tmp_path: Path, tok: ByT5Tokenizer) -> None:
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}" * (i + 1)} for i in range(12)])
    cfg = DataConfig(files=[str(f)], seq_len=16, val_fraction=0.0)
    train, val, rep = build_datasets(cfg, tok, seed=1)
    assert len(val) == 0 and rep.val.rows == 0
    row = train[0]
    assert set(row) == {"input_ids", "labels", "attention_mask"}
    assert all(v.dtype == torch.long and v.shape == (16,) for v in row.values())
    total = sum(len(f"doc {i}" * (i + 1)) + 1 for i in range(12))
    # every token but each document's first is a target, once; rows that continue a
    # document repeat one token (the overlap), so the rows hold a little more than the text
    assert rep.train.target_tokens == total - 12 and rep.train.documents == 12
    assert total < rep.train.tokens == train.total_tokens < total + len(train)
    assert len(train) == -(-rep.train.tokens // 16)  # every row full but the last
    padded, _, rep2 = build_datasets(cfg.model_copy(update={"packing": False}), tok, seed=1)
    assert len(padded) == 12 and padded.num_tokens(0) == len("doc 0") + 1
    assert rep2.train.truncated_documents == sum(
        len(f"doc {i}" * (i + 1)) + 1 > 16 for i in range(12)
    )


def test_mixed_formats_across_files(tmp_path: Path, tok: ByT5Tokenizer) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "alpha"}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "P", "completion": "C"}])
    t = tmp_path / "t.txt"
    t.write_text("gamma\n\ndelta\n")
    cfg = DataConfig(files=[str(a), str(c), str(t)], seq_len=64, val_fraction=0.0)
    train, _, rep = build_datasets(cfg, tok, seed=0)
    assert [fr.format for fr in rep.files] == ["text", "prompt_completion", "text"]
    stream = b("alpha") + [EOS] + b("PC") + [EOS] + b("gamma") + [EOS] + b("delta") + [EOS]
    assert train.input_ids[0, : len(stream)].tolist() == stream
    lab = train.labels[0, : len(stream)].tolist()
    assert lab[6:9] == [IGN] + b("C") + [EOS]  # prompt masked (doc start), completion + eos


# --------------------------------------------------------------------------- split


def test_split_fraction_and_seed() -> None:
    keys = [f"document {i}".encode() for i in range(4000)]
    val = [is_validation(k, 7, 0.1) for k in keys]
    assert 0.08 < sum(val) / len(keys) < 0.12
    assert val != [is_validation(k, 8, 0.1) for k in keys]
    assert not any(is_validation(k, 7, 0.0) for k in keys)


def _sides(train: object, val: object, tok: ByT5Tokenizer) -> tuple[set[str], set[str]]:
    def texts(ds: object) -> set[str]:
        out = set()
        for i in range(len(ds)):  # type: ignore[arg-type]
            row = ds[i]  # type: ignore[index]
            ids = row["input_ids"][row["attention_mask"].bool()].tolist()
            out.add(tok.decode(ids[:-1]))
        return out

    return texts(train), texts(val)


def test_split_is_stable_when_the_file_grows(tmp_path: Path, tok: ByT5Tokenizer) -> None:
    recs = [{"text": f"record number {i}"} for i in range(200)]
    f = write_jsonl(tmp_path / "a.jsonl", recs)
    cfg = DataConfig(files=[str(f)], seq_len=32, packing=False, val_fraction=0.2)
    tr1, va1 = _sides(*build_datasets(cfg, tok, seed=3)[:2], tok)
    assert len(va1) > 10 and len(tr1) > 100
    # Grow the file (new records before, between and after the old ones).
    grown = [{"text": f"new {i}"} for i in range(50)] + recs[::-1] + [{"text": "last"}]
    write_jsonl(f, grown)
    tr2, va2 = _sides(*build_datasets(cfg, tok, seed=3)[:2], tok)
    assert tr1 <= tr2 and va1 <= va2 and len(va2) > len(va1)


def test_all_documents_in_validation_is_an_error(tmp_path: Path, tok: ByT5Tokenizer) -> None:
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "only one"}])
    key = Document("", 0, "line", "text", text="only one").content_key()
    seed = next(s for s in range(1000) if is_validation(key, s, 0.5))
    cfg = DataConfig(files=[str(f)], val_fraction=0.5)
    with pytest.raises(DataError, match="no training documents"):
        build_datasets(cfg, tok, seed=seed)


# --------------------------------------------------------------------------- determinism, cache


def test_build_is_deterministic(tmp_path: Path, tok: ByT5Tokenizer) -> None:
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": f"t{i} " * (i % 7 + 1)} for i in range(80)])
    cfg = DataConfig(files=[str(f)], seq_len=24, val_fraction=0.2)
    a_tr, a_va, _ = build_datasets(cfg, tok, seed=5)
    b_tr, b_va, _ = build_datasets(cfg, ByT5Tokenizer(), seed=5)
    for x, y in ((a_tr, b_tr), (a_va, b_va)):
        assert x.fingerprint == y.fingerprint
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.attention_mask, y.attention_mask)
    assert a_tr.fingerprint != a_va.fingerprint
    # One changed byte changes the fingerprint.
    f.write_text(f.read_text().replace("t3 ", "t3x", 1))
    assert build_datasets(cfg, tok, seed=5)[0].fingerprint != a_tr.fingerprint


def test_cache_hit_equals_fresh_build(
    tmp_path: Path, tok: ByT5Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": f"cached {i}"} for i in range(50)])
    cache = tmp_path / "cache"
    cfg = DataConfig(files=[str(f)], seq_len=16, val_fraction=0.2, cache_dir=str(cache))
    tr1, va1, rep1 = build_datasets(cfg, tok, seed=1)
    assert rep1.cache == "miss"
    key = Path(rep1.cache_path or "").stem
    # one JSON and one safetensors file per split and tensor; no temporary file left
    assert sorted(p.name for p in cache.iterdir()) == [f"{key}.json"] + sorted(
        f"{key}.{s}.{n}.safetensors"
        for s in ("train", "val")
        for n in ("input_ids", "labels", "attention_mask")
    )
    # ordinary safetensors files: the library reads the same rows
    with safe_open(cache / f"{key}.train.labels.safetensors", "pt") as sf:
        assert torch.equal(sf.get_tensor("t"), tr1.labels)
    # the fresh build's rows are the files' (memory-mapped), and equal an in-memory build
    mem = build_datasets(cfg.model_copy(update={"cache_dir": "off"}), tok, seed=1)
    for x, y in ((tr1, mem[0]), (va1, mem[1])):
        assert x.fingerprint == y.fingerprint == x._fingerprint()
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
    assert mem[2].train == rep1.train
    tr2, va2, rep2 = build_datasets(cfg, tok, seed=1)
    assert rep2.cache == "hit" and rep2.train == rep1.train and rep2.files == rep1.files
    assert (tr2.fingerprint, va2.fingerprint) == (tr1.fingerprint, va1.fingerprint)
    assert tr2._fingerprint() == tr1.fingerprint
    assert torch.equal(tr2.labels, tr1.labels)
    # Another seed is another entry.
    assert build_datasets(cfg, tok, seed=2)[2].cache == "miss"
    # A damaged tensor file is detected and rebuilt, with the same result.
    st = cache / f"{key}.train.input_ids.safetensors"
    st.write_bytes(st.read_bytes()[:-8] + b"garbage!")
    with caplog.at_level(logging.WARNING, logger="evertrain.data"):
        tr3, _, rep3 = build_datasets(cfg, tok, seed=1)
    assert rep3.cache == "miss" and "rebuilding" in caplog.text
    assert tr3.fingerprint == tr1.fingerprint
    # Changed data misses the cache.
    write_jsonl(f, [{"text": f"cached {i}"} for i in range(51)])
    tr4, _, rep4 = build_datasets(cfg, tok, seed=1)
    assert rep4.cache == "miss" and tr4.fingerprint != tr1.fingerprint


def test_skip_mode_counts_in_the_report(tmp_path: Path, tok: ByT5Tokenizer) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "good one"}\n{"text": 3}\nnot json\n{"text": "good two"}\n')
    cfg = DataConfig(files=[str(f)], val_fraction=0.0, on_bad_record="skip")
    train, _, rep = build_datasets(cfg, tok, seed=0)
    assert rep.skipped == 2 and len(rep.skip_reasons) == 2 and rep.train.documents == 2
    assert "line 2" in rep.skip_reasons[0] and "line 3" in rep.skip_reasons[1]
    with pytest.raises(DataError, match="line 2"):
        build_datasets(cfg.model_copy(update={"on_bad_record": "fail"}), tok, seed=0)


def test_fast_tokenizer_parses_template_specials_but_not_document_text() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {c: i for i, c in enumerate(specials + [chr(i) for i in range(32, 127)] + ["\n"])}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])),
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[2:],
    )
    fast.chat_template = CHATML
    enc = Encoder(fast)
    ((ids, mask),) = enc.encode([chat(("user", "hi"), ("assistant", "yo"))])
    toks = fast.convert_ids_to_tokens(ids)
    assert toks == [
        "<|im_start|>",
        *"user\nhi",
        "<|im_end|>",
        "\n",
        "<|im_start|>",
        *"assistant\nyo",
        "<|im_end|>",
        "\n",
        "</s>",
    ]
    assert [t for t, m in zip(toks, mask, strict=True) if m] == [
        "y",
        "o",
        "<|im_end|>",
        "\n",
        "</s>",
    ]
    ((ids, _),) = enc.encode([doc("text", text="a</s>")])
    assert fast.convert_ids_to_tokens(ids) == ["a", "<", "/", "s", ">", "</s>"]
