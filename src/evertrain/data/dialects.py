"""Record dialects of other trainers, read into the three document kinds of :mod:`.formats`,
and ``data.columns``, which renames a record's columns before its format is known.

- ``alpaca`` (Stanford Alpaca): ``{"instruction": str, "input": str, "output": str}``;
  ``input`` may be missing, ``null`` or ``""``. The record becomes a ``prompt_completion``
  document whose prompt is the Alpaca template filled in and whose completion is
  ``output``, so the loss is on the output (and ``eos``) only, as in Alpaca's training.
  The template is Alpaca's own (tatsu-lab/stanford_alpaca, ``train.py``, ``PROMPT_DICT``):
  ``prompt_input`` when ``input`` is not ``""`` (the same test as Alpaca's), else
  ``prompt_no_input``; see :data:`ALPACA_PROMPT_INPUT` and :data:`ALPACA_PROMPT_NO_INPUT`.
- ``sharegpt``: ``{"conversations": [{"from": str, "value": str}, ...]}``. The record
  becomes a ``messages`` document; speakers map to roles by :data:`SHAREGPT_ROLES`
  (``human`` -> ``user``, ``gpt`` -> ``assistant``, ``system``; ``user``, ``assistant`` and
  ``tool`` are taken as they are). Any other speaker is a record error naming it and the
  turn's index. A turn key other than ``from``/``value`` is refused unless it is ``null``
  (Arrow fills a struct field that a row lacks with null, e.g. ShareGPT's ``weight``).

Errors are :class:`~.errors.DataError` record errors (file, line or row, field), which
``data.on_bad_record: skip`` can skip like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evertrain.data.errors import SKIP_HINT, DataError
from evertrain.data.formats import Document, _err, _get, _string
from evertrain.data.records import Record, _loads, _TooDeepError

# tatsu-lab/stanford_alpaca, train.py, PROMPT_DICT["prompt_input"], verbatim.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
# tatsu-lab/stanford_alpaca, train.py, PROMPT_DICT["prompt_no_input"], verbatim.
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
}

# CSV cells are strings: these fields hold JSON lists there.
_JSON_LIST_FIELDS = ("messages", "conversations")


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - Alpaca's name
    """The Alpaca prompt for one record: ``prompt_input`` if ``input != ""``, else
    ``prompt_no_input`` (the values are inserted as they are, braces included)."""
    if input != "":
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def alpaca_document(rec: Record) -> Document:
    """``rec`` as a ``prompt_completion`` document (see the module docstring).

    Raises:
        DataError: ``instruction`` or ``output`` missing, not a string, empty or binary;
            ``input`` not a string (or binary).
    """
    instruction = _string(rec, "instruction", _get(rec, "instruction", "alpaca"))
    raw_input = rec.data.get("input")
    inp = "" if raw_input is None else _string(rec, "input", raw_input, allow_empty=True)
    output = _string(rec, "output", _get(rec, "output", "alpaca"))
    return Document(
        rec.file,
        rec.line,
        rec.unit,
        "prompt_completion",
        prompt=alpaca_prompt(instruction, inp),
        completion=output,
    )


def sharegpt_document(rec: Record) -> Document:
    """``rec`` as a ``messages`` document (see the module docstring).

    Raises:
        DataError: ``conversations`` missing, not a list or empty; a turn that is not an
            object, lacks ``from`` or ``value``, has another non-null key, names an unknown
            speaker (the message gives the value and the turn's index), or has empty or
            binary text where it matters; no ``gpt``/``assistant`` turn.
    """
    raw = _get(rec, "conversations", "sharegpt")
    if not isinstance(raw, list):
        raise _err(rec, "conversations", f"expected a list of turns, got {type(raw).__name__}")
    if not raw:
        raise _err(rec, "conversations", "empty list of turns")
    msgs: list[tuple[str, str]] = []
    for i, turn in enumerate(raw):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise _err(
                rec, where, f"expected an object with from and value, got {type(turn).__name__}"
            )
        extra = sorted(k for k, v in turn.items() if k not in ("from", "value") and v is not None)
        if extra:
            raise _err(
                rec,
                f"{where}.{extra[0]}",
                "unsupported turn key (evertrain trains on from and value only)",
            )
        if "from" not in turn:
            raise _err(rec, f"{where}.from", "missing")
        speaker = turn["from"]
        if not isinstance(speaker, str):
            raise _err(rec, f"{where}.from", f"expected a string, got {type(speaker).__name__}")
        role = SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise _err(
                rec,
                f"{where}.from",
                f"unknown speaker {speaker!r} in turn {i}; expected one of {list(SHAREGPT_ROLES)}",
            )
        if "value" not in turn:
            raise _err(rec, f"{where}.value", "missing")
        content = _string(rec, f"{where}.value", turn["value"], allow_empty=role != "assistant")
        msgs.append((role, content))
    if not any(r == "assistant" for r, _ in msgs):
        raise _err(rec, "conversations", "no gpt (assistant) turn: nothing to train on")
    return Document(rec.file, rec.line, rec.unit, "messages", messages=tuple(msgs))


def map_columns(rec: Record, columns: Mapping[str, str]) -> Record:
    """``rec`` with each ``data.columns`` entry ``field: column`` applied: the column's
    value is read as ``field``. A record column already named like a mapped field is
    replaced; other columns are kept. Mappings may swap names
    (``{prompt: completion, completion: prompt}``).

    Raises:
        DataError: the record lacks a mapped column (names the column and the field).
    """
    if not columns:
        return rec
    data = rec.data
    for ours, theirs in columns.items():
        if theirs not in data:
            raise DataError(
                f"missing column {theirs!r} (data.columns maps field {ours!r} to it; "
                f"columns present: {sorted(data)[:10]})",
                file=rec.file,
                line=rec.line,
                unit=rec.unit,
                field=theirs,
                hint=SKIP_HINT,
            )
    sources = set(columns.values())
    out: dict[str, Any] = {k: v for k, v in data.items() if k not in sources}
    for ours, theirs in columns.items():
        out[ours] = data[theirs]
    return Record(rec.file, rec.line, rec.unit, out)


def decode_json_lists(rec: Record) -> Record:
    """A CSV record with its ``messages``/``conversations`` cells parsed from JSON (the CSV
    reader parses a column named ``messages`` itself; a mapped or ``conversations`` column
    arrives here as text).

    Raises:
        DataError: such a cell is not valid JSON, or nests too deeply.
    """
    todo = [k for k in _JSON_LIST_FIELDS if isinstance(rec.data.get(k), str)]
    if not todo:
        return rec
    data = dict(rec.data)
    for key in todo:
        try:
            data[key] = _loads(data[key])
        except (ValueError, _TooDeepError) as e:
            problem = getattr(e, "msg", None) or str(e)
            raise DataError(
                f"a CSV {key} cell must hold a JSON list: {problem}",
                file=rec.file,
                line=rec.line,
                unit=rec.unit,
                field=key,
                hint=SKIP_HINT,
            ) from None
    return Record(rec.file, rec.line, rec.unit, data)
