"""Write Alpaca-format instruction data from CPython's own documentation (``pydoc_data``,
shipped with Python): half as a JSONL file, half as a Hugging Face ``datasets`` directory
(``Dataset.save_to_disk``), the two sources ``examples/alpaca.yaml`` trains on.

    .venv/bin/python examples/make_alpaca.py [OUT_DIR]     # default: examples/data
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydoc_data.topics import topics


def records() -> list[dict[str, str]]:
    """One record per documented topic: the instruction names it, the output is the
    opening of its documentation (whole paragraphs, whitespace folded, 300-800 characters)."""
    out = []
    for key in sorted(topics):
        body = ""
        for para in topics[key].split("\n\n"):
            text = " ".join(para.split())
            if text and len(body) + len(text) < 800:
                body = f"{body} {text}".strip()
            if len(body) >= 300:
                break
        if len(body) >= 100:
            out.append({
                "instruction": f'Explain the Python topic "{key}".',
                "input": "",
                "output": body,
            })  # fmt: skip
    return out


def main() -> None:
    import datasets

    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "data")
    out.mkdir(parents=True, exist_ok=True)
    recs = records()
    half = len(recs) // 2
    with open(out / "alpaca.jsonl", "w", encoding="utf-8") as f:
        for r in recs[:half]:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    columns = {k: [r[k] for r in recs[half:]] for k in ("instruction", "input", "output")}
    datasets.Dataset.from_dict(columns).save_to_disk(str(out / "alpaca_ds"))
    print(f"{out / 'alpaca.jsonl'}: {half} records; {out / 'alpaca_ds'}: {len(recs) - half} rows")


if __name__ == "__main__":
    main()
