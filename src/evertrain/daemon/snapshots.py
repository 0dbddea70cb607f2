"""Snapshots: exports of the model being trained, kept apart from checkpoints.

A snapshot is ``RUN/snapshots/<YYYYmmdd-HHMMSS>-step-<N>/`` (local time, ``N`` the
global_step) holding, with LoRA, the adapter in PEFT's layout (``adapter_config.json``,
``adapter_model.safetensors``: ``PeftModel.from_pretrained(base, snapshot_dir)`` loads it)
and with ``watch.snapshot_merge`` a merged full model in ``merged/``; without LoRA the full
model and tokenizer at the top. ``snapshot.json`` describes it (global_step, time, reason,
files done, ids of the files trained). It is published atomically (written under a hidden
temporary name, then renamed) and recorded in the ledger's ``snapshots`` table.

Snapshots are taken after every ``watch.snapshot_every_files`` trained files, daily at
``watch.snapshot_daily_at`` (local time), and on request (``control.json``). Checkpoint
retention never looks at this folder; ``watch.snapshot_keep_last`` (if set) deletes the
oldest snapshots beyond that many, and nothing else deletes one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from evertrain.config import RunConfig
from evertrain.daemon.layout import RunLayout
from evertrain.daemon.ledger import Ledger, SnapshotRow
from evertrain.fsutil import fsync_dir, staged_dir
from evertrain.models import merge_and_save, save_peft_adapter

log = logging.getLogger("evertrain.daemon")


class Snapshots:
    """Takes, records and prunes the snapshots of one run."""

    def __init__(self, layout: RunLayout, ledger: Ledger, cfg: RunConfig) -> None:
        self.layout, self.ledger, self.cfg = layout, ledger, cfg
        self.w = cfg.watch

    def recover(self) -> None:
        """After a crash: remove half-written snapshot folders (hidden ``.*.tmp-*``, ours),
        record published ones the ledger missed, and forget rows whose folder is gone."""
        root = self.layout.snapshots
        root.mkdir(parents=True, exist_ok=True)
        known = {s.path for s in self.ledger.snapshots()}
        for p in sorted(root.iterdir()):
            if p.name.startswith(".") and ".tmp-" in p.name:
                log.info("removing %s, left by an interrupted snapshot", p)
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir() and self.layout.rel(p) not in known:
                try:
                    meta = json.loads((p / "snapshot.json").read_text(encoding="utf-8"))
                    self.ledger.add_snapshot(
                        self.layout.rel(p),
                        int(meta["global_step"]),
                        int(meta["files_done"]),
                        float(meta["time"]),
                        str(meta["reason"]),
                    )
                except (OSError, ValueError, KeyError, TypeError):
                    log.warning("%s: not a snapshot written by evertrain; left alone", p)
        for s in self.ledger.snapshots():
            if not self.layout.abs(s.path).exists():
                log.warning("snapshot %s is gone from disk; dropping its ledger row", s.path)
                self.ledger.delete_snapshot(s.id)

    def last(self) -> SnapshotRow | None:
        rows = self.ledger.snapshots()
        return rows[-1] if rows else None

    def due_files(self, files_done: int) -> bool:
        """True when ``files_done`` crossed a multiple of ``snapshot_every_files`` since the
        last snapshot taken for that reason."""
        n = self.w.snapshot_every_files
        if not n or files_done == 0:
            return False
        last = max(
            (s.files_done for s in self.ledger.snapshots() if s.reason == "files"), default=0
        )
        return files_done // n > last // n

    def due_daily(self, now: float, global_step: int) -> bool:
        """True when today's ``snapshot_daily_at`` (local time) has passed and no snapshot
        was taken since, and there has been training since the last snapshot."""
        at = self.w.snapshot_daily_at
        if at is None or global_step == 0:
            return False
        hh, mm = (int(x) for x in at.split(":"))
        local = dt.datetime.fromtimestamp(now)
        mark = local.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
        if now < mark:
            return False
        last = self.last()
        return last is None or (last.time < mark and last.global_step != global_step)

    def take(
        self,
        model: Any,
        tokenizer: Any,
        *,
        global_step: int,
        files: list[int],
        reason: str,
    ) -> Path:
        """Export the model now (see the module docstring) and record it.

        Args:
            model: the model being trained (left untouched: merging works on a copy).
            tokenizer: saved with a merged model.
            global_step: optimizer steps in the exported weights.
            files: ids of the files trained into them.
            reason: ``files``, ``daily`` or ``request``.

        Returns:
            The snapshot folder.

        Raises:
            OSError: the export could not be written (nothing half-written is left).
        """
        now = time.time()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        final = self.layout.snapshots / f"{stamp}-step-{global_step}"
        k = 1
        while final.exists():
            k += 1
            final = self.layout.snapshots / f"{stamp}-step-{global_step}-{k}"
        meta = {
            "global_step": global_step,
            "time": now,
            "reason": reason,
            "files_done": len(files),
            "files": list(files),
            "base_model": self.cfg.model.source,
            "adapter": self.cfg.lora is not None,
            "merged": self.cfg.lora is None or self.w.snapshot_merge,
        }
        with staged_dir(final) as tmp:
            if self.cfg.lora is not None:
                save_peft_adapter(model, tmp)
                if self.w.snapshot_merge:
                    merge_and_save(model, tokenizer, tmp / "merged")
            else:
                merge_and_save(model, tokenizer, tmp)
            (tmp / "snapshot.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        self.ledger.add_snapshot(self.layout.rel(final), global_step, len(files), now, reason)
        log.info("snapshot %s (%s, global_step %d)", final, reason, global_step)
        self._prune()
        return final

    def _prune(self) -> None:
        keep = self.w.snapshot_keep_last
        if keep is None:
            return
        rows = self.ledger.snapshots()
        for s in rows[: max(len(rows) - keep, 0)]:
            path = self.layout.abs(s.path)
            # Renamed first: a crash mid-delete leaves a hidden folder recover() removes,
            # never a snapshot folder with files missing.
            doomed = path.with_name(f".{path.name}.tmp-deleting")
            try:
                if path.exists():
                    os.rename(path, doomed)
                    fsync_dir(path.parent)
                    shutil.rmtree(doomed)
            except OSError as e:
                log.warning("snapshot retention: could not delete %s: %s", path, e)
                continue
            self.ledger.delete_snapshot(s.id)
            log.info("snapshot retention: deleted %s", path.name)
