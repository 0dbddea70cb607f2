"""The real data set that ships with CPython: the language reference topics behind ``help()``.

``pydoc_data.topics.topics`` maps a topic name (``"assignment"``, ``"for"``, ...) to its
plain-text documentation (~80 topics, ~0.5 MB on CPython 3.11). The content varies between
Python versions, so the written files do too; within one Python version the output is
byte-for-byte deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

from evertrain.fsutil import atomic_write_bytes

MAX_RECORD_CHARS = 4000


def _pieces(text: str, limit: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``limit`` characters: whole paragraphs (separated
    by blank lines) grouped greedily, long paragraphs at line breaks, long lines hard."""
    text = text.strip()
    if len(text) <= limit:
        return [text]
    units: list[str] = []
    for para in (p.strip("\n") for p in text.split("\n\n")):
        if not para.strip():
            continue
        if len(para) <= limit:
            units.append(para)
            continue
        line_group = ""
        for line in para.split("\n"):
            while len(line) > limit:
                if line_group:
                    units.append(line_group)
                    line_group = ""
                units.append(line[:limit])
                line = line[limit:]
            if line_group and len(line_group) + 1 + len(line) > limit:
                units.append(line_group)
                line_group = line
            else:
                line_group = f"{line_group}\n{line}" if line_group else line
        if line_group.strip():
            units.append(line_group)
    out: list[str] = []
    cur = ""
    for u in units:
        if cur and len(cur) + 2 + len(u) > limit:
            out.append(cur)
            cur = u
        else:
            cur = f"{cur}\n\n{u}" if cur else u
    if cur:
        out.append(cur)
    return out


def pydoc_records(max_chars: int = MAX_RECORD_CHARS) -> list[tuple[str, list[str]]]:
    """``[(topic, [text, ...]), ...]`` for every topic in sorted order; each text is at most
    ``max_chars`` characters (a topic longer than that is split into paragraph groups)."""
    from pydoc_data.topics import topics

    return [(name, _pieces(topics[name], max_chars)) for name in sorted(topics)]


def write_pydoc_files(out_dir: Path, num_files: int = 6) -> list[Path]:
    """Write the pydoc topics as ``num_files`` JSONL files of ``{"text": ...}`` records.

    Topics are taken in sorted order and split into ``num_files`` contiguous groups of
    near-equal topic count, written as ``pydoc-00.jsonl``, ``pydoc-01.jsonl``, ...; each
    record is one topic, or one paragraph group (< 4000 characters) of a long topic. Each
    file is written to a temporary name and renamed into place (replacing an earlier output
    of the same name; no other file in ``out_dir`` is touched).

    Returns:
        The written paths, in order.

    Raises:
        ValueError: ``num_files`` is not between 1 and the number of topics.
    """
    records = pydoc_records()
    if not 1 <= num_files <= len(records):
        raise ValueError(f"num_files must be between 1 and {len(records)}, got {num_files}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    n = len(records)
    for i in range(num_files):
        group = records[i * n // num_files : (i + 1) * n // num_files]
        lines = [json.dumps({"text": t}, ensure_ascii=False) for _, texts in group for t in texts]
        path = out_dir / f"pydoc-{i:02d}.jsonl"
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
        paths.append(path)
    return paths
