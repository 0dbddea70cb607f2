"""Checks of the ``data`` section's mapping options (kept out of :mod:`evertrain.config`,
which is long enough): ``data.columns`` and ``data.chat_template``."""

from __future__ import annotations

# The fields the record formats read, which data.columns can map a user's column to.
DATA_FIELDS = (
    "text",
    "prompt",
    "completion",
    "messages",
    "instruction",
    "input",
    "output",
    "conversations",
)


def is_template_path(value: str) -> bool:
    """Whether a ``data.chat_template`` value names a ``.jinja`` file (else it is the
    template itself): one line ending in ``.jinja`` with no Jinja delimiter in it."""
    return "\n" not in value and "{" not in value and value.strip().lower().endswith(".jinja")


def check_columns(columns: dict[str, str]) -> None:
    """Refuse a ``data.columns`` mapping that cannot mean what it says.

    Raises:
        ValueError: a field that is not one of :data:`DATA_FIELDS` (the message lists them),
            an empty column name, or one column mapped to two fields.
    """
    unknown = sorted(set(columns) - set(DATA_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown field {unknown[0]!r}; the fields a column can be mapped "
            f"to are {list(DATA_FIELDS)}"
        )
    seen: dict[str, str] = {}
    for ours, theirs in columns.items():
        if not theirs.strip():
            raise ValueError(f"empty column name for field {ours!r}")
        if theirs in seen:
            raise ValueError(
                f"{seen[theirs]!r} and {ours!r} are both mapped to column "
                f"{theirs!r}; map each field to its own column"
            )
        seen[theirs] = ours


def check_chat_template(value: str | None) -> None:
    """Refuse a ``data.chat_template`` that is neither a template nor a ``.jinja`` path
    (a mistyped path would otherwise render as constant text).

    Raises:
        ValueError: the value has no ``{`` and does not end in ``.jinja``.
    """
    if value is not None and not is_template_path(value) and "{" not in value:
        raise ValueError(
            f"{value[:60]!r} is neither a Jinja template (it has no "
            "{{ or {%) nor the path of a .jinja file"
        )
