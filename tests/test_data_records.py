"""Readers, format detection, validation of bad data, skip policy, pydoc and example files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from evertrain.config import DataConfig
from evertrain.data import DataError, Record, iter_records, read_bytes, validate_file
from evertrain.data.pydoc import MAX_RECORD_CHARS, _pieces, write_pydoc_files

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"


def records(path: Path, **kw: object) -> list[Record]:
    out = list(iter_records(path, read_bytes(path), **kw))  # type: ignore[arg-type]
    errors = [r for r in out if isinstance(r, DataError)]
    assert not errors, errors
    return [r for r in out if isinstance(r, Record)]


def write(tmp: Path, name: str, content: str | bytes) -> Path:
    p = tmp / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    p.write_bytes(content)
    return p


# --------------------------------------------------------------------------- readers


def test_jsonl_reader_keeps_line_numbers(tmp_path: Path) -> None:
    p = write(tmp_path, "a.jsonl", '{"text": "one"}\r\n\n{"text": "two", "id": 7}\n\n')
    recs = records(p)
    assert [(r.line, r.data["text"]) for r in recs] == [(1, "one"), (3, "two")]
    assert recs[1].data["id"] == 7 and recs[0].file == str(p) and recs[0].unit == "line"


def test_jsonl_bom_is_ignored(tmp_path: Path) -> None:
    p = write(tmp_path, "a.jsonl", b'\xef\xbb\xbf{"text": "x"}\n')
    assert records(p)[0].data == {"text": "x"}


def test_json_list_reader_gives_each_object_its_line(tmp_path: Path) -> None:
    p = write(tmp_path, "a.json", '[\n  {"text": "a"},\n\n  {\n    "text": "b"\n  }\n]\n')
    assert [(r.line, r.data["text"]) for r in records(p)] == [(2, "a"), (4, "b")]


def test_json_must_be_a_list(tmp_path: Path) -> None:
    p = write(tmp_path, "a.json", '{"text": "a"}')
    with pytest.raises(DataError, match="one list of objects") as e:
        records(p)
    assert e.value.file == str(p) and e.value.line == 1


def test_csv_reader_multiline_cells_and_messages_column(tmp_path: Path) -> None:
    msgs = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    csv_msgs = '"' + msgs.replace('"', '""') + '"'
    p = write(tmp_path, "a.csv", f'text,messages\n"multi\nline",{csv_msgs}\nplain,[]\n')
    recs = records(p)
    assert [(r.line, r.data["text"]) for r in recs] == [(2, "multi\nline"), (4, "plain")]
    assert recs[0].data["messages"][1] == {"role": "assistant", "content": "yo"}


def test_parquet_reader_numbers_rows(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2", "p3"], "completion": ["c1", "c2", "c3"]}), p)
    recs = records(p)
    assert [(r.line, r.unit, r.data["completion"]) for r in recs] == [
        (1, "row", "c1"),
        (2, "row", "c2"),
        (3, "row", "c3"),
    ]
    rep = validate_file(p, DataConfig())
    assert rep.format == "prompt_completion" and rep.records == 3


def test_parquet_without_pyarrow_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    p = write(tmp_path, "a.parquet", b"PAR1 not really")
    with pytest.raises(DataError, match="pip install pyarrow"):
        records(p)


def test_text_documents_split_at_blank_lines(tmp_path: Path) -> None:
    p = write(tmp_path, "a.txt", "\nfirst doc\nstill first\n\n  \nsecond\n\n\nthird\n")
    recs = records(p)
    assert [(r.line, r.data["text"]) for r in recs] == [
        (2, "first doc\nstill first"),
        (6, "second"),
        (9, "third"),
    ]


def test_text_chunks_are_bounded_and_cut_between_words(tmp_path: Path) -> None:
    words = [f"word{i:03d}" for i in range(200)]
    text = "\n".join(" ".join(words[i : i + 10]) for i in range(0, 200, 10)) + "\n"
    p = write(tmp_path, "a.md", text)
    recs = records(p, text_split="chunks", chunk_chars=100)
    assert len(recs) > 10
    assert all(0 < len(r.data["text"]) <= 100 for r in recs)
    # Nothing lost, no word cut in two, and each chunk's line is where its first word is.
    assert " ".join(r.data["text"] for r in recs).split() == words
    for r in recs:
        first = r.data["text"].split()[0]
        assert text.split("\n")[r.line - 1].split()[0:10].count(first) == 1


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"text": "hello"}, "text"),
        ({"prompt": "q", "completion": "a", "id": 3}, "prompt_completion"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "messages",
        ),
    ],
)
def test_format_auto_detection(tmp_path: Path, record: dict, fmt: str) -> None:
    p = write(tmp_path, "a.jsonl", json.dumps(record) + "\n")
    rep = validate_file(p, DataConfig())
    assert (rep.format, rep.records, rep.skipped) == (fmt, 1, 0)


def test_detection_is_per_file_and_later_records_must_match(tmp_path: Path) -> None:
    p = write(tmp_path, "a.jsonl", '{"text": "a"}\n{"prompt": "q", "completion": "a"}\n')
    with pytest.raises(DataError) as e:
        validate_file(p, DataConfig())
    assert (e.value.line, e.value.field) == (2, "text")
    assert "missing" in str(e.value)


def test_ambiguous_and_unknown_keys(tmp_path: Path) -> None:
    p = write(tmp_path, "a.jsonl", '{"text": "a", "messages": []}\n')
    with pytest.raises(DataError, match="ambiguous"):
        validate_file(p, DataConfig())
    p = write(tmp_path, "b.jsonl", '{"body": "a"}\n')
    with pytest.raises(DataError, match="cannot detect.*'body'"):
        validate_file(p, DataConfig())
    # An explicit format reads the same record as missing its field.
    with pytest.raises(DataError) as e:
        validate_file(p, DataConfig(format="text"))
    assert e.value.field == "text"


def test_text_file_with_a_non_text_format_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, "a.txt", "hello\n")
    with pytest.raises(DataError, match="plain text files hold text records"):
        validate_file(p, DataConfig(format="messages"))


# --------------------------------------------------------------------------- bad data

USER = {"role": "user", "content": "q"}
BOT = {"role": "assistant", "content": "a"}
GOOD = '{"text": "fine"}\n'


@pytest.mark.parametrize(
    ("name", "content", "line", "field", "pattern"),
    [
        ("a.jsonl", GOOD + '{"text": "x"\n', 2, None, "invalid JSON"),
        ("a.jsonl", GOOD + "[1, 2]\n", 2, None, "expected a JSON object"),
        ("a.jsonl", GOOD + GOOD + '{"txt": "x"}\n', 3, "text", "missing"),
        ("a.jsonl", GOOD + '{"text": 5}\n', 2, "text", "expected a string, got int"),
        ("a.jsonl", GOOD + '{"text": null}\n', 2, "text", "null"),
        ("a.jsonl", GOOD + '{"text": " \\n "}\n', 2, "text", "empty text"),
        ("a.jsonl", GOOD.encode() + b'{"text": "caf\xe9"}\n', 2, None, "invalid UTF-8"),
        ("a.jsonl", GOOD.encode() + b'{"text": "a\x00b"}\n', 2, None, "binary content"),
        ("a.jsonl", GOOD + '{"text": "a\\u0001b"}\n', 2, "text", "binary content.*U\\+0001"),
        ("a.jsonl", '{"prompt": "q"}\n', 1, "completion", "missing"),
        ("a.jsonl", '{"prompt": "q", "completion": ""}\n', 1, "completion", "empty text"),
        (
            "a.jsonl",
            json.dumps({"messages": [USER, {"role": "bot", "content": "a"}]}) + "\n",
            1,
            "messages[1].role",
            "unknown role 'bot'",
        ),
        (
            "a.jsonl",
            json.dumps({"messages": [USER, {"role": "assistant"}]}) + "\n",
            1,
            "messages[1].content",
            "missing",
        ),
        (
            "a.jsonl",
            json.dumps({"messages": [USER, {"role": "assistant", "content": 1}]}) + "\n",
            1,
            "messages[1].content",
            "expected a string",
        ),
        (
            "a.jsonl",
            json.dumps({"messages": [USER, {**BOT, "tool_calls": []}]}) + "\n",
            1,
            "messages[1].tool_calls",
            "unsupported message key",
        ),
        ("a.jsonl", json.dumps({"messages": [USER]}) + "\n", 1, "messages", "no assistant"),
        ("a.jsonl", json.dumps({"messages": "hi"}) + "\n", 1, "messages", "expected a list"),
        ("a.json", '[{"text": "a"},\n {"text": "b"}\n {"text": "c"}]', 3, None, "expected ','"),
        ("a.csv", 'text\nok\n"a","b"\n', 3, None, "row has 2 cells"),
        ("a.csv", b"text\nok\n" + b"caf\xe9\n", 3, None, "invalid UTF-8"),
        ("a.txt", b"ok\n\nbad \xff byte\n", 3, None, "invalid UTF-8"),
        ("a.txt", b"ok\n\nbin\x00ary\n", 3, None, "binary content"),
    ],
)
def test_bad_data_names_file_line_and_field(
    tmp_path: Path, name: str, content: str | bytes, line: int, field: str | None, pattern: str
) -> None:
    p = write(tmp_path, name, content)
    with pytest.raises(DataError, match=pattern) as e:
        validate_file(p, DataConfig())
    err = e.value
    assert (err.file, err.line, err.field) == (str(p), line, field)
    msg = str(err)
    assert str(p) in msg and f"line {line}" in msg
    if field is not None:
        assert f"field {field!r}" in msg


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.jsonl", "", "empty file"),
        ("blank.txt", "\n \n", "empty file"),
        ("a.xlsx", "text\n", "unknown file extension '.xlsx'"),
        ("none", "text\n", "unknown file extension '\\(none\\)'"),
        ("header_only.csv", "text\n", "no valid records"),
        ("empty_list.json", "[]", "no valid records"),
    ],
)
def test_file_level_errors(tmp_path: Path, name: str, content: str, pattern: str) -> None:
    p = write(tmp_path, name, content)
    for policy in ("fail", "skip"):
        with pytest.raises(DataError, match=pattern) as e:
            validate_file(p, DataConfig(on_bad_record=policy))
        assert e.value.file == str(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        validate_file(tmp_path / "nope.jsonl", DataConfig())


def test_skip_policy_counts_bad_records_and_fail_stops_at_the_first(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"good {i}"}) for i in range(5)]
    lines[1:1] = ['{"text": 1}', "{oops", '{"text": ""}']
    p = write(tmp_path, "a.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        validate_file(p, DataConfig(on_bad_record="fail"))
    assert e.value.line == 2 and e.value.field == "text"
    rep = validate_file(p, DataConfig(on_bad_record="skip"))
    assert (rep.records, rep.skipped) == (5, 3)
    assert ["line 2" in rep.reasons[0], "line 3" in rep.reasons[1], "line 4" in rep.reasons[2]] == [
        True,
        True,
        True,
    ]
    # The policy argument overrides the config (a daemon validating a whole file).
    assert validate_file(p, DataConfig(on_bad_record="fail"), policy="skip").skipped == 3


def test_skip_policy_still_refuses_a_file_with_no_valid_record(tmp_path: Path) -> None:
    p = write(tmp_path, "a.jsonl", '{"text": 1}\n{"text": ""}\n')
    with pytest.raises(DataError, match=r"no valid records \(2 bad record\(s\) skipped; first:"):
        validate_file(p, DataConfig(on_bad_record="skip"))


def test_skip_detects_format_from_the_first_good_record(tmp_path: Path) -> None:
    p = write(tmp_path, "a.jsonl", '{oops\n{"prompt": "q", "completion": "a"}\n')
    rep = validate_file(p, DataConfig(on_bad_record="skip"))
    assert (rep.format, rep.records, rep.skipped) == ("prompt_completion", 1, 1)


# --------------------------------------------------------------------------- pydoc, examples


def test_pieces_respect_the_limit_and_keep_all_text() -> None:
    paras = [" ".join(f"w{i}x{j}" for j in range(k)) for i, k in enumerate([5, 300, 40, 900])]
    text = "\n\n".join(paras) + "\n" + "y" * 2500
    pieces = _pieces(text, 1000)
    assert all(len(p) <= 1000 for p in pieces) and len(pieces) > 3
    assert "".join("".join(p.split()) for p in pieces) == "".join(text.split())


def test_write_pydoc_files(tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    paths = write_pydoc_files(tmp_path / "a", 6)
    assert [p.name for p in paths] == [f"pydoc-{i:02d}.jsonl" for i in range(6)]
    texts = [json.loads(line)["text"] for p in paths for line in p.read_text().splitlines()]
    assert len(texts) >= len(topics)
    assert all(0 < len(t) <= MAX_RECORD_CHARS for t in texts)
    # Deterministic, and every topic's words are there in order.
    again = write_pydoc_files(tmp_path / "b", 6)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    joined = "".join("".join(t.split()) for t in texts)
    assert joined == "".join("".join(topics[k].split()) for k in sorted(topics))
    for p in paths:
        assert validate_file(p, DataConfig()).format == "text"
    with pytest.raises(ValueError, match="num_files"):
        write_pydoc_files(tmp_path / "c", 0)


def test_example_files() -> None:
    tiny = validate_file(EXAMPLES / "tiny.jsonl", DataConfig())
    assert tiny.format == "text" and 250 <= tiny.records <= 350 and tiny.skipped == 0
    lengths = [len(json.loads(x)["text"]) for x in (EXAMPLES / "tiny.jsonl").open()]
    assert min(lengths) >= 50 and max(lengths) <= 300
    pc = validate_file(EXAMPLES / "tiny_pc.jsonl", DataConfig())
    assert pc.format == "prompt_completion" and 40 <= pc.records <= 60
    chat = validate_file(EXAMPLES / "tiny_chat.jsonl", DataConfig())
    assert chat.format == "messages" and 25 <= chat.records <= 40
