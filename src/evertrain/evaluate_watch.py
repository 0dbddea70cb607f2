"""``evertrain eval`` of a watch daemon's run: the held-out rows of every file a
checkpoint trained on (finished, or in flight with a step taken), each rebuilt from
``RUN/processed/`` as the daemon split it, scored per file and token-weighted overall (the
report's ``files``), then the greedy generations (see :mod:`evertrain.evaluate`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evertrain.checkpoint.format import step_dir_name
from evertrain.config import RunConfig
from evertrain.evaluate import (
    EvalReport,
    generate_samples,
    heldout_loss,
    is_chat,
    write_eval_report,
)


def _trained_file_ids(stream: dict[str, Any]) -> list[int]:
    """Ids of the files a watch checkpoint's ``stream`` state trained on: the completed
    ones and the one in flight if it took a step (its rows partly trained)."""
    ids = [int(i) for i in stream.get("completed") or []]
    cur = stream.get("current")
    if cur is not None and (cur.get("micro_done") or 0) > 0 and cur["id"] not in ids:
        ids.append(int(cur["id"]))
    return ids


def evaluate_watch_run(
    run_dir: str | Path,
    stream: dict[str, Any],
    cfg: RunConfig,
    model: Any,
    tok: Any,
    *,
    global_step: int,
    prompts: Sequence[str],
    max_new_tokens: int,
    model_info: dict[str, Any],
    checkpoint: str | None,
    write: bool,
    trim_padding: bool = False,
) -> EvalReport:
    """:func:`evaluate_run` of a watch checkpoint: held-out loss per trained file and
    token-weighted overall, then the generations.

    Raises:
        evertrain.data.DataError: a trained file is gone, unreadable or was edited.
        evertrain.daemon.LedgerError: the ledger cannot be read.
    """
    from evertrain.daemon.filedata import FileData
    from evertrain.daemon.layout import RunLayout
    from evertrain.daemon.ledger import Ledger
    from evertrain.data import DataError

    layout = RunLayout(Path(run_dir))
    ids = _trained_file_ids(stream)
    rows = {}
    if ids:
        led = Ledger(layout.ledger, readonly=True)
        try:
            for i in ids:
                row = led.get(i)
                if row is None:
                    raise DataError(
                        f"file {i} was trained (checkpoint step {global_step}) but the ledger "
                        "has no row for it",
                        file=str(layout.ledger),
                    )
                rows[i] = row
        finally:
            led.close()
    t0 = time.perf_counter()
    # Built through the daemon's own per-file path so every file gets exactly the split
    # (and rows) it was trained and evaluated with; capacity 1: each split is used once.
    data = FileData(cfg, tok, capacity=1)
    files: list[dict[str, Any]] = []
    total, tokens, n_rows, chat = 0.0, 0, 0, False
    for i in ids:
        row = rows[i]
        _, val, rep = data.build(i, layout.abs(row.path), row.content_hash)
        chat = chat or is_chat(rep)
        loss, r, t = (None, 0, 0)
        if len(val):
            loss, r, t = heldout_loss(
                model,
                val,
                micro_batch_size=cfg.train.micro_batch_size,
                max_batches=cfg.train.eval_max_batches,
                precision=cfg.train.precision,
                trim_padding=trim_padding,
                kind=cfg.model.kind,
            )
        files.append(
            {
                "id": i,
                "name": row.name,
                "val_loss": loss,
                "val_ppl": None if loss is None else math.exp(min(loss, 50.0)),
                "val_rows": r,
                "val_tokens": t,
            }
        )
        if loss is not None:
            total += loss * t
            tokens += t
            n_rows += r
    overall = total / tokens if tokens else None
    gens = generate_samples(
        model, tok, prompts, max_new_tokens=max_new_tokens, chat=chat, kind=cfg.model.kind
    )
    report = EvalReport(
        global_step=global_step,
        val_loss=overall,
        val_ppl=None if overall is None else math.exp(min(overall, 50.0)),
        val_rows=n_rows,
        val_tokens=tokens,
        generations=gens,
        label=step_dir_name(global_step),
        checkpoint=checkpoint,
        model=model_info,
        eval_max_batches=cfg.train.eval_max_batches,
        max_new_tokens=max_new_tokens,
        chat=chat,
        seconds=time.perf_counter() - t0,
        time=time.time(),
        files=files,
    )
    if write:
        write_eval_report(run_dir, report)
    return report
