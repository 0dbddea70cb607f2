"""Data through common formats: Alpaca and ShareGPT records, data.columns, Hugging Face
save_to_disk directories, data.chat_template and the fallback-template warning; each
format trained with ``evertrain train``, killed with SIGKILL and resumed bit-identically.

ByT5's tokenizer maps byte ``b`` to id ``b + 3`` (0 pad, 1 eos, 2 unk) and has no chat
template, so expected ids are computed here independently of the code under test.
"""

from __future__ import annotations

import builtins
import csv
import json
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import ByT5Tokenizer

from conftest import assert_identical, evertrain, train_losses, write_config
from evertrain.checkpoint import read_checkpoint
from evertrain.config import ConfigError, DataConfig, load_config
from evertrain.data import DataError, Document, Encoder, Record, build_datasets, validate_record
from evertrain.data import encode as encode_mod
from evertrain.data.build import _hash_file, read_documents, read_source
from evertrain.data.dialects import alpaca_prompt, map_columns
from evertrain.data.formats import detect_format

STEPS = 6
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
# prefix-stable: rendering the first k turns plus the generation prompt starts every
# longer rendering, so the assistant tokens can be located
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def rec(data: dict[str, Any], line: int = 1) -> Record:
    return Record("f.jsonl", line, "line", data)


def jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def alpaca_records(n: int = 16) -> list[dict[str, Any]]:
    return [
        {
            "instruction": f"Repeat the word number {i}.",
            "input": "" if i % 3 else f"word{i}",
            "output": f"word{i} " * (1 + i % 4),
        }
        for i in range(n)
    ]


def sharegpt_records(n: int = 12) -> list[dict[str, Any]]:
    return [
        {
            "conversations": [
                {"from": "system", "value": "Answer briefly."},
                {"from": "human", "value": f"What is {i} plus one?"},
                {"from": "gpt", "value": f"It is {i + 1}."},
            ]
        }
        for i in range(n)
    ]


# --------------------------------------------------------------------------- alpaca


def test_alpaca_template_is_stanford_alpacas_prompt_dict() -> None:
    assert alpaca_prompt("Add the numbers.", "1, 2") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n1, 2\n\n### Response:"
    )
    assert alpaca_prompt("Say hi {name}.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi {name}.\n\n### Response:"
    )


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": None}])
def test_alpaca_record_is_prompt_completion_without_input(extra: dict[str, Any]) -> None:
    r = rec({"instruction": "Say hi.", "output": "hi", "id": 3, **extra})
    assert detect_format(r) == "alpaca"
    doc = validate_record(r, "alpaca")
    assert doc.kind == "prompt_completion" and doc.completion == "hi"
    assert doc.prompt == alpaca_prompt("Say hi.") and "### Input" not in doc.prompt


def test_alpaca_loss_is_on_the_output_only() -> None:
    doc = validate_record(rec({"instruction": "I", "input": "x", "output": "ok"}), "alpaca")
    ids, mask = Encoder(ByT5Tokenizer()).encode([doc])[0]
    prompt = [b + 3 for b in alpaca_prompt("I", "x").encode()]
    assert ids == prompt + [ord("o") + 3, ord("k") + 3, 1]
    assert mask == [False] * len(prompt) + [True] * 3


def test_alpaca_errors_name_the_field() -> None:
    with pytest.raises(DataError, match="field 'output': missing"):
        validate_record(rec({"instruction": "x", "input": "y"}), "alpaca")
    with pytest.raises(DataError, match="field 'input': expected a string, got int"):
        validate_record(rec({"instruction": "x", "input": 3, "output": "z"}), "alpaca")
    with pytest.raises(DataError, match="ambiguous.*'text', 'alpaca'"):
        detect_format(rec({"text": "t", "instruction": "x", "output": "z"}))
    assert detect_format(rec({"text": "t", "output": "metadata"})) == "text"
    with pytest.raises(DataError, match="field 'output': missing"):
        validate_record(rec({"instruction": "x"}), detect_format(rec({"instruction": "x"})))


# --------------------------------------------------------------------------- sharegpt


def test_sharegpt_roles_map_to_messages() -> None:
    turns = [
        {"from": "system", "value": "s"},
        {"from": "human", "value": "h"},
        {"from": "gpt", "value": "g"},
        {"from": "user", "value": "u"},
        {"from": "assistant", "value": "a", "weight": None},  # Arrow's null struct field
    ]
    r = rec({"conversations": turns, "id": "x"})
    assert detect_format(r) == "sharegpt"
    doc = validate_record(r, "sharegpt")
    assert doc.kind == "messages"
    assert doc.messages == (
        ("system", "s"),
        ("user", "h"),
        ("assistant", "g"),
        ("user", "u"),
        ("assistant", "a"),
    )
    # the same document, whichever way it was written: same split side, same cache
    same = Document("f.jsonl", 1, "line", "messages", messages=doc.messages)
    assert doc.content_key() == same.content_key()


def test_sharegpt_unknown_speaker_names_value_and_index() -> None:
    turns = [{"from": "human", "value": "h"}, {"from": "bot", "value": "g"}]
    with pytest.raises(DataError) as e:
        validate_record(rec({"conversations": turns}, line=7), "sharegpt")
    assert e.value.line == 7 and e.value.field == "conversations[1].from"
    assert "unknown speaker 'bot' in turn 1" in str(e.value) and "'gpt'" in str(e.value)


def test_sharegpt_other_errors() -> None:
    with pytest.raises(DataError, match=r"conversations\[0\].weight.*unsupported turn key"):
        validate_record(
            rec({"conversations": [{"from": "gpt", "value": "g", "weight": 0}]}), "sharegpt"
        )
    with pytest.raises(DataError, match="no gpt"):
        validate_record(rec({"conversations": [{"from": "human", "value": "h"}]}), "sharegpt")
    with pytest.raises(DataError, match=r"conversations\[0\].value.*empty text"):
        validate_record(rec({"conversations": [{"from": "gpt", "value": " "}]}), "sharegpt")


# --------------------------------------------------------------------------- data.columns


def test_columns_rename_before_detection(tmp_path: Path) -> None:
    p = tmp_path / "qa.csv"
    p.write_text('question,answer,text\nq1,a1,x\n"q,2",a2,y\n', encoding="utf-8")
    cfg = DataConfig(columns={"prompt": "question", "completion": "answer"})
    with pytest.raises(DataError, match="ambiguous.*set data.format"):  # text, too
        read_documents(p, read_source(p), cfg)
    cfg.format = "prompt_completion"
    report, docs = read_documents(p, read_source(p), cfg)
    assert report.format == "prompt_completion"
    assert [(d.line, d.prompt, d.completion) for d in docs] == [(2, "q1", "a1"), (3, "q,2", "a2")]
    swapped = map_columns(
        rec({"prompt": "a", "completion": "b"}), {"prompt": "completion", "completion": "prompt"}
    )
    assert swapped.data == {"prompt": "b", "completion": "a"}


def test_columns_map_json_cells_of_csv(tmp_path: Path) -> None:
    chat = json.dumps([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}])
    p = tmp_path / "chat.csv"
    with p.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["dialogue"], [chat]])
    _, docs = read_documents(p, read_source(p), DataConfig(columns={"conversations": "dialogue"}))
    assert docs[0].messages == (("user", "hi"), ("assistant", "yo"))


def test_missing_mapped_column_is_a_record_error(tmp_path: Path) -> None:
    p = jsonl(tmp_path / "d.jsonl", [{"body": "one"}, {"other": "two"}, {"body": "three"}])
    cfg = DataConfig(columns={"text": "body"})
    with pytest.raises(DataError) as e:
        read_documents(p, read_source(p), cfg)
    assert e.value.line == 2 and e.value.field == "body"
    assert "missing column 'body' (data.columns maps field 'text' to it" in str(e.value)
    report, docs = read_documents(p, read_source(p), cfg, policy="skip")
    assert [d.text for d in docs] == ["one", "three"] and report.skipped == 1


def test_columns_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"data.columns: unknown field 'question'.*'prompt'"):
        load_config({"data": {"columns": {"question": "q"}}})
    with pytest.raises(ConfigError, match="both mapped to column 'q'"):
        load_config({"data": {"columns": {"prompt": "q", "completion": "q"}}})
    # unset keys stay out of the stored config: older runs resume without a difference
    assert (
        "columns" not in DataConfig().model_dump()
        and "chat_template" not in DataConfig().model_dump()
    )


# --------------------------------------------------------------------------- datasets dirs


def save_dataset(path: Path, columns: dict[str, list[Any]], split: str | None = None) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict(columns)
    if split is None:
        ds.save_to_disk(str(path))
    else:
        datasets.DatasetDict({split: ds}).save_to_disk(str(path))
    return path


def test_save_to_disk_directory_reads_rows(tmp_path: Path) -> None:
    d = save_dataset(tmp_path / "ds", {"q": ["p1", "p2", "p3"], "a": ["c1", "", "c3"]})
    cfg = DataConfig(columns={"prompt": "q", "completion": "a"}, on_bad_record="skip")
    report, docs = read_documents(d, read_source(d), cfg)
    assert [(x.line, x.unit, x.completion) for x in docs] == [(1, "row", "c1"), (3, "row", "c3")]
    assert report.skipped == 1 and "row 2, field 'completion': empty text" in report.reasons[0]
    assert report.content_hash == _hash_file(str(d)) and report.bytes > 0


def test_dataset_dict_uses_train_split_or_errors(tmp_path: Path) -> None:
    d = save_dataset(tmp_path / "dd", {"text": ["a", "b"]}, split="train")
    assert [x.text for x in read_documents(d, read_source(d), DataConfig())[1]] == ["a", "b"]
    e = save_dataset(tmp_path / "de", {"text": ["a"]}, split="test")
    with pytest.raises(
        DataError, match=r"DatasetDict without a 'train' split \(splits: \['test'\]\)"
    ):
        read_documents(e, read_source(e), DataConfig())
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(DataError, match="not one written by Hugging Face datasets"):
        read_source(plain)


def test_directory_hash_is_deterministic_and_sees_changes(tmp_path: Path) -> None:
    a = save_dataset(tmp_path / "a", {"text": ["x", "y"]})
    h = _hash_file(str(a))
    assert _hash_file(str(a)) == h
    extra = a / "notes.txt"
    extra.write_text("n")
    assert _hash_file(str(a)) != h
    extra.unlink()
    assert _hash_file(str(a)) == h


def test_missing_datasets_package_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    for name in ("dataset_info.json", "state.json"):
        (d / name).write_text("{}")
    real_import = builtins.__import__

    def no_datasets(name: str, *args: Any, **kw: Any) -> Any:
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kw)

    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError) as e:
        read_documents(d, read_source(d), DataConfig())
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(d))
    assert "needs the datasets package" in msg and "pip install 'evertrain[datasets]'" in msg


# --------------------------------------------------------------------------- chat templates


def chat_file(tmp_path: Path) -> Path:
    return jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
        * 3,
    )


def test_fallback_template_warns_once_naming_it(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encode_mod, "_fallback_warned", False)
    doc = Document("f", 1, "line", "messages", messages=(("user", "hi"), ("assistant", "yo")))
    enc = Encoder(ByT5Tokenizer())
    with caplog.at_level(logging.WARNING, logger="evertrain.data"):
        enc.encode([doc])
        Encoder(ByT5Tokenizer()).encode([doc, doc])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no chat template" in warnings[0] and repr("<|{role}|>\n{content}\n") in warnings[0]
    assert "data.chat_template" in warnings[0]


def test_chat_template_option_is_used_and_keys_the_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encode_mod, "_fallback_warned", False)
    data = chat_file(tmp_path)
    cache = tmp_path / "cache"
    base = {"files": [str(data)], "seq_len": 64, "val_fraction": 0.0, "cache_dir": str(cache)}
    tok = ByT5Tokenizer()
    with caplog.at_level(logging.WARNING, logger="evertrain.data"):
        train, _, rep = build_datasets(DataConfig(**base, chat_template=TEMPLATE), tok, 1)
    assert tok.chat_template == TEMPLATE and not caplog.records  # no fallback warning
    text = "<user>hi</user>\n<assistant>yo</assistant>\n"
    row = train.input_ids[0].tolist()
    assert row[: len(text) + 1] == [b + 3 for b in text.encode()] + [1]
    # the loss covers the reply and the end-of-turn marker only, then eos
    target = [b + 3 for b in b"yo</assistant>\n"] + [1]
    assert [t for t in train.labels[0].tolist() if t != -100][: len(target)] == target
    assert rep.cache == "miss"
    again = build_datasets(DataConfig(**base, chat_template=TEMPLATE), ByT5Tokenizer(), 1)[2]
    assert again.cache == "hit" and again.cache_path == rep.cache_path
    other = TEMPLATE.replace("</{{ m['role'] }}>", "</end>")
    changed = build_datasets(DataConfig(**base, chat_template=other), ByT5Tokenizer(), 1)[2]
    assert changed.cache == "miss" and changed.cache_path != rep.cache_path
    # a .jinja file: its content, not its name, keys the cache
    jinja = tmp_path / "t.jinja"
    jinja.write_text(TEMPLATE, encoding="utf-8")
    by_file = build_datasets(DataConfig(**base, chat_template=str(jinja)), ByT5Tokenizer(), 1)[2]
    jinja.write_text(other, encoding="utf-8")
    edited = build_datasets(DataConfig(**base, chat_template=str(jinja)), ByT5Tokenizer(), 1)[2]
    assert by_file.cache == "miss" and edited.cache == "miss"
    assert len({rep.cache_path, changed.cache_path, by_file.cache_path, edited.cache_path}) == 4


def test_chat_template_errors(tmp_path: Path) -> None:
    data = chat_file(tmp_path)
    with pytest.raises(ConfigError, match="data.chat_template: 'chat.txt' is neither"):
        load_config({"data": {"chat_template": "chat.txt"}})
    cfg = DataConfig(files=[str(data)], chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(DataError, match="missing.jinja: chat template file not found"):
        build_datasets(cfg, ByT5Tokenizer(), 1)
    bad = DataConfig(files=[str(data)], chat_template="{% for m in messages %}{{ m.content }}")
    with pytest.raises(DataError, match="invalid Jinja chat template.*template line 1"):
        build_datasets(bad, ByT5Tokenizer(), 1)
    # a relative .jinja path in a YAML config is relative to the config's directory
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "c.jinja").write_text(TEMPLATE)
    (tmp_path / "c.yaml").write_text("model: {source: tiny}\ndata: {chat_template: tpl/c.jinja}\n")
    assert load_config(tmp_path / "c.yaml").data.chat_template == str(tmp_path / "tpl" / "c.jinja")


# --------------------------------------------------------------------------- kill and resume


def kill_and_resume(tmp_path: Path, data_file: Path, n_docs: int, fault: str, **data: Any) -> str:
    """Train ``data_file`` (``n_docs`` records, all valid) straight, and again killed by
    ``fault`` then resumed; assert both runs equal; return the straight run's log."""
    config = write_config(
        tmp_path,
        data_file,
        model={"tiny": TINY},
        data={"seq_len": 64, "val_fraction": 0.15, **data},
        train={
            "micro_batch_size": 2,
            "grad_accum_steps": 2,
            "max_steps": STEPS,
            "schedule": {"name": "cosine", "warmup_steps": 1},
            "eval_every_steps": 3,
        },
        checkpoint={"every_steps": 2, "keep_last": 2},
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    log = evertrain("train", str(config), "--run-dir", str(straight)).stderr
    m = re.search(r"data: 1 file\(s\), train (\d+) docs -> \d+ rows .*, val (\d+) docs", log)
    assert m and int(m[1]) + int(m[2]) == n_docs, log[-2000:]
    args = ["train", str(config), "--run-dir", str(resumed)]
    proc = evertrain(*args, fault=fault, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    evertrain(*args)
    assert train_losses(straight) == train_losses(resumed)
    assert sorted(train_losses(straight)) == list(range(1, STEPS + 1))
    final = f"step-{STEPS:08d}"
    a = read_checkpoint(straight / "checkpoints" / final).states
    b = read_checkpoint(resumed / "checkpoints" / final).states
    for owner in ("model", "optimizer", "scheduler", "data_cursor", "progress", "rng"):
        assert_identical(a[owner], b[owner], owner)
    return log


def test_alpaca_jsonl_resumes_bit_identical(tmp_path: Path) -> None:
    data = jsonl(tmp_path / "alpaca.jsonl", alpaca_records())
    kill_and_resume(tmp_path, data, 16, "micro@3:0")


def test_sharegpt_jsonl_resumes_bit_identical(tmp_path: Path) -> None:
    data = jsonl(tmp_path / "sharegpt.jsonl", sharegpt_records())
    log = kill_and_resume(tmp_path, data, 12, "save@4")
    assert "no chat template" in log and "<|{role}|>" in log  # the fallback was announced


def test_save_to_disk_directory_resumes_bit_identical(tmp_path: Path) -> None:
    msgs = [
        [
            {"role": "user", "content": f"Count to {i}."},
            {"role": "assistant", "content": " ".join(map(str, range(i)))},
        ]
        for i in range(2, 14)
    ]
    d = save_dataset(
        tmp_path / "hf", {"messages": msgs, "id": list(range(len(msgs)))}, split="train"
    )
    (tmp_path / "chat.jinja").write_text(TEMPLATE, encoding="utf-8")
    log = kill_and_resume(tmp_path, d, 12, "micro@5:1", chat_template="chat.jinja")
    assert "no chat template" not in log


def test_parquet_resumes_bit_identical(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    recs = alpaca_records()
    table = pa.table(
        {
            "instruction": [r["instruction"] for r in recs],
            "input": [r["input"] or None for r in recs],  # null input: the no-input prompt
            "output": [r["output"] for r in recs],
        }
    )
    p = tmp_path / "alpaca.parquet"
    pq.write_table(table, p)
    kill_and_resume(tmp_path, p, 16, "micro@3:1", format="alpaca")


def test_csv_with_columns_resumes_bit_identical(tmp_path: Path) -> None:
    p = tmp_path / "qa.csv"
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "source"])
        for i in range(16):
            w.writerow([f"What comes after {i}, then?", f"{i + 1}, then {i + 2}.", "gen"])
    kill_and_resume(
        tmp_path, p, 16, "micro@4:0", columns={"prompt": "question", "completion": "answer"}
    )
