"""Record formats: detect a file's format and validate each record into a :class:`Document`.

Formats (``data.format``, or detected per file from the first parsed record's keys):

- ``text``: ``{"text": str}``; loss on every token.
- ``prompt_completion``: ``{"prompt": str, "completion": str}``; loss on the completion only.
- ``messages``: ``{"messages": [{"role": str, "content": str}, ...]}``; rendered with the
  tokenizer's chat template; loss on assistant turns only.
- ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}``, read as a
  ``prompt_completion`` document (the Stanford Alpaca prompt; see :mod:`.dialects`).
- ``sharegpt``: ``{"conversations": [{"from": str, "value": str}, ...]}``, read as a
  ``messages`` document (see :mod:`.dialects`).

A document's ``kind`` is always one of the first three (:data:`FORMATS`): the two dialects
only change how a record is read, so the split, the cache and the encoder are the same for
them. ``data.columns`` renames a record's columns before any of this
(:func:`~.dialects.map_columns`).

Other keys of a record (``id``, ``source``, ...) are ignored. A record with the keys of two
formats (e.g. ``text`` and ``messages``) is ambiguous and rejected under ``format: auto``.
Strings must not be empty (whitespace only counts as empty; a prompt may be empty) and must
not contain NUL or other C0 control characters except tab, newline, carriage return, form
feed, vertical tab and escape: those mean binary data was stored as text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from evertrain.data.errors import SKIP_HINT, DataError
from evertrain.data.records import Record

Format = Literal["text", "prompt_completion", "messages"]
FORMATS: tuple[Format, ...] = ("text", "prompt_completion", "messages")
# What a file can hold (data.format): the document kinds plus the dialects read into them.
RecordFormat = Literal["text", "prompt_completion", "messages", "alpaca", "sharegpt"]
RECORD_FORMATS: tuple[RecordFormat, ...] = (*FORMATS, "alpaca", "sharegpt")
ROLES = ("system", "developer", "user", "assistant", "tool")

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")


@dataclass(frozen=True)
class Document:
    """One validated training document.

    Attributes:
        file, line, unit: where the record came from (see :class:`~.records.Record`).
        kind: the record format.
        text: for ``text``.
        prompt, completion: for ``prompt_completion``.
        messages: for ``messages``: ``((role, content), ...)``.
    """

    file: str
    line: int
    unit: str
    kind: Format
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    def content_key(self) -> bytes:
        """Canonical UTF-8 JSON of the content only (not the origin): the split's hash input.

        Two records with the same content get the same key wherever they are, so duplicates
        land on the same side of the train/val split and a record keeps its side when other
        records are added, removed or reordered.
        """
        if self.kind == "text":
            obj: Any = {"text": self.text}
        elif self.kind == "prompt_completion":
            obj = {"prompt": self.prompt, "completion": self.completion}
        else:
            obj = {"messages": [list(m) for m in self.messages or ()]}
        return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode(
            "utf-8"
        )


def _err(rec: Record, field: str | None, problem: str) -> DataError:
    return DataError(
        problem, file=rec.file, line=rec.line, unit=rec.unit, field=field, hint=SKIP_HINT
    )


def detect_format(rec: Record) -> RecordFormat:
    """The format implied by ``rec``'s keys. Alpaca records are recognised by
    ``instruction``: ``output`` and ``input`` alone imply nothing (common metadata names
    next to a ``text`` field, which must stay a text record).

    Raises:
        DataError: no known key set, or the keys of more than one format.
    """
    keys = set(rec.data)
    found: list[RecordFormat] = []
    if "text" in keys:
        found.append("text")
    if "prompt" in keys or "completion" in keys:
        found.append("prompt_completion")
    if "messages" in keys:
        found.append("messages")
    if "instruction" in keys:
        found.append("alpaca")
    if "conversations" in keys:
        found.append("sharegpt")
    if len(found) == 1:
        return found[0]
    shown = sorted(keys)[:10]
    if not found:
        raise DataError(
            f"cannot detect the record format from keys {shown}: expected 'text', "
            "'prompt' + 'completion', 'messages', 'instruction' + 'output' (alpaca) or "
            "'conversations' (sharegpt)",
            file=rec.file,
            line=rec.line,
            unit=rec.unit,
            hint="rename the columns or map them with data.columns, or set data.format",
        )
    raise DataError(
        f"ambiguous record format: keys {shown} match formats {found}",
        file=rec.file,
        line=rec.line,
        unit=rec.unit,
        hint="keep the keys of one format, or set data.format",
    )


def _string(rec: Record, field: str, value: Any, *, allow_empty: bool = False) -> str:
    if value is None:
        raise _err(rec, field, "missing (null)")
    if not isinstance(value, str):
        raise _err(rec, field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _err(rec, field, "empty text")
    m = _CONTROL.search(value)
    if m:
        raise _err(
            rec,
            field,
            f"binary content: control character U+{ord(m.group()):04X} at character {m.start()}",
        )
    return value


def _get(rec: Record, key: str, fmt: str) -> Any:
    if key not in rec.data:
        raise _err(
            rec, key, f"missing (format {fmt!r} needs it; keys present: {sorted(rec.data)[:10]})"
        )
    return rec.data[key]


def validate_record(rec: Record, fmt: RecordFormat) -> Document:
    """Check ``rec`` against ``fmt`` and return its :class:`Document`.

    Raises:
        DataError: a missing field, a wrong type, empty text, binary content, an unknown
            role, a conversation without an assistant turn; the message names file, line and
            field (e.g. ``messages[2].content``, ``conversations[1].from``).
    """
    if fmt in ("alpaca", "sharegpt"):
        from evertrain.data import dialects  # it builds on this module's checks

        if fmt == "alpaca":
            return dialects.alpaca_document(rec)
        return dialects.sharegpt_document(rec)
    if fmt == "text":
        text = _string(rec, "text", _get(rec, "text", fmt))
        return Document(rec.file, rec.line, rec.unit, "text", text=text)
    if fmt == "prompt_completion":
        prompt = _string(rec, "prompt", _get(rec, "prompt", fmt), allow_empty=True)
        completion = _string(rec, "completion", _get(rec, "completion", fmt))
        return Document(
            rec.file, rec.line, rec.unit, "prompt_completion", prompt=prompt, completion=completion
        )
    if fmt != "messages":
        raise ValueError(f"unknown record format {fmt!r}")
    raw = _get(rec, "messages", fmt)
    if not isinstance(raw, list):
        raise _err(rec, "messages", f"expected a list of messages, got {type(raw).__name__}")
    if not raw:
        raise _err(rec, "messages", "empty list of messages")
    msgs: list[tuple[str, str]] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _err(
                rec, where, f"expected an object with role and content, got {type(m).__name__}"
            )
        # null keys are Arrow's fill for fields other rows have (datasets directories)
        extra = sorted(k for k, v in m.items() if k not in ("role", "content") and v is not None)
        if extra:
            raise _err(
                rec,
                f"{where}.{extra[0]}",
                "unsupported message key (evertrain trains on role and content only)",
            )
        if "role" not in m:
            raise _err(rec, f"{where}.role", "missing")
        role = m["role"]
        if not isinstance(role, str):
            raise _err(rec, f"{where}.role", f"expected a string, got {type(role).__name__}")
        if role not in ROLES:
            raise _err(
                rec, f"{where}.role", f"unknown role {role!r}; expected one of {list(ROLES)}"
            )
        if "content" not in m:
            raise _err(rec, f"{where}.content", "missing")
        content = _string(rec, f"{where}.content", m["content"], allow_empty=role != "assistant")
        msgs.append((role, content))
    if not any(r == "assistant" for r, _ in msgs):
        raise _err(rec, "messages", "no assistant message: nothing to train on")
    return Document(rec.file, rec.line, rec.unit, "messages", messages=tuple(msgs))
