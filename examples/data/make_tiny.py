"""Regenerate the small example data files next to this script (run once; results are checked in).

- ``tiny.jsonl``: 300 ``{"text": ...}`` records of 50-300 characters: paragraphs of CPython's
  pydoc topics (``pydoc_data.topics``), whitespace collapsed, duplicates dropped, picked
  evenly over the sorted topics. The topics differ between Python versions, so rerunning on
  another version gives different (equally valid) text; the checked-in file was made with
  CPython 3.11.
- ``tiny_pc.jsonl``: 50 synthetic ``{"prompt", "completion"}`` records (arithmetic, reversing
  and upper-casing words).
- ``tiny_chat.jsonl``: 30 synthetic ``{"messages": [...]}`` conversations, some with a system
  message, some with two assistant turns.

Usage: ``python examples/data/make_tiny.py``
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "piano",
    "candle",
    "forest",
    "window",
    "garden",
    "rocket",
    "silver",
    "pepper",
    "marble",
    "anchor",
    "violet",
    "castle",
    "bridge",
    "meadow",
]


def tiny_texts(n: int = 300) -> list[str]:
    from pydoc_data.topics import topics

    candidates: list[str] = []
    seen: set[str] = set()
    for name in sorted(topics):
        for para in topics[name].split("\n\n"):
            text = " ".join(para.split())
            if 50 <= len(text) <= 300 and text not in seen:
                seen.add(text)
                candidates.append(text)
    if len(candidates) < n:
        raise SystemExit(f"only {len(candidates)} paragraphs of 50-300 characters")
    return [candidates[i * len(candidates) // n] for i in range(n)]


def prompt_completions(n: int = 50) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        a, b = (7 * i + 3) % 50, (11 * i + 5) % 50
        w = WORDS[i % len(WORDS)]
        kind = i % 3
        if kind == 0:
            out.append({"prompt": f"Add: {a} + {b} =", "completion": f" {a + b}"})
        elif kind == 1:
            out.append({"prompt": f"Reverse: {w} ->", "completion": f" {w[::-1]}"})
        else:
            out.append({"prompt": f"Uppercase: {w} ->", "completion": f" {w.upper()}"})
    return out


def chats(n: int = 30) -> list[dict[str, list[dict[str, str]]]]:
    out = []
    for i in range(n):
        a, b = (5 * i + 2) % 30, (3 * i + 7) % 30
        w = WORDS[(3 * i) % len(WORDS)]
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": "You are a terse assistant."})
        if i % 2 == 0:
            msgs += [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
        else:
            msgs += [
                {"role": "user", "content": f"Spell {w} backwards."},
                {"role": "assistant", "content": w[::-1]},
                {"role": "user", "content": "And in capitals?"},
                {"role": "assistant", "content": w[::-1].upper()},
            ]
        out.append({"messages": msgs})
    return out


def write(name: str, records: list) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (HERE / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write("tiny.jsonl", [{"text": t} for t in tiny_texts()])
    write("tiny_pc.jsonl", prompt_completions())
    write("tiny_chat.jsonl", chats())
