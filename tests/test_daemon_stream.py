"""The daemon trains every example of every file exactly once, continuing one run:
global_step, LR schedule and the ledger's statistics carry across files."""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from pathlib import Path

import pytest

from daemon_util import drop, equal_files, load_watch, rows, wait_for, watch_config
from evertrain.daemon import Daemon
from evertrain.data import TokenizedDataset

TRAIN_ROWS, VAL_ROWS = 12, 3  # per file; micro-batch 4 -> 3 micro-batches -> steps of 2 + 1


def test_three_equal_files_dropped_one_after_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accesses: Counter[tuple[str, str, int]] = Counter()
    original = TokenizedDataset.__getitem__

    def counting(self: TokenizedDataset, i: int) -> dict[str, object]:
        accesses[(self.fingerprint, str(self.settings.get("split")), int(i))] += 1
        return original(self, i)

    monkeypatch.setattr(TokenizedDataset, "__getitem__", counting)
    files = equal_files(tmp_path / "src", 3, TRAIN_ROWS, VAL_ROWS)
    cfg = load_watch(watch_config(tmp_path))
    run = tmp_path / "run"
    daemon = Daemon(run, cfg)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            daemon.run()
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)
            raise

    thread = threading.Thread(target=target)
    thread.start()
    try:
        for k, f in enumerate(files):
            drop(f, run / "inbox")
            wait_for(
                lambda k=k: len(rows(run)) > k and rows(run)[k].status == "done",  # type: ignore[misc]
                what=f"{f.name} done",
            )
            assert not errors
    finally:
        daemon.request_stop()
        thread.join(timeout=120)
    assert not errors and not thread.is_alive()

    ledger = rows(run)
    assert [r.name for r in ledger] == [f.name for f in files]
    assert [r.status for r in ledger] == ["done"] * 3
    # Every training row of every file was read exactly once (counted at the dataset).
    train_sets: dict[str, Counter[int]] = {}
    for (fp, split, i), n in accesses.items():
        if split == "train":
            train_sets.setdefault(fp, Counter())[i] += n
    assert len(train_sets) == 3
    for counts in train_sets.values():
        assert counts == Counter(dict.fromkeys(range(TRAIN_ROWS), 1))
    assert [r.examples for r in ledger] == [TRAIN_ROWS] * 3
    steps = [r.steps for r in ledger]
    assert steps == [math.ceil(TRAIN_ROWS / 4 / 2)] * 3
    # One continuous run: each file starts where the previous one ended.
    assert ledger[0].global_step_start == 0
    for prev, cur in zip(ledger, ledger[1:], strict=False):
        assert cur.global_step_start == prev.global_step_end
    assert (
        ledger[-1].global_step_end
        == sum(s or 0 for s in steps)
        == daemon.trainer.progress.global_step
    )
    for r in ledger:
        assert r.val_loss_before is not None and r.val_loss_after is not None
        assert r.loss_start is not None and r.loss_end is not None
        assert r.path == f"processed/{r.id:06d}-{r.name}"
        assert (run / r.path).is_file()

    # The LR is one schedule over global_step: warmup once, inverse-sqrt decay continuing
    # across file boundaries (no re-warmup, no drop to 0 at a file's first step).
    train = [
        json.loads(x)
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]
    assert [t["global_step"] for t in train] == list(range(1, ledger[-1].global_step_end + 1))
    base, w = cfg.train.lr, cfg.train.schedule.warmup_steps
    for t in train:
        s = t["global_step"] - 1
        expected = base * ((s + 1) / w if s < w else math.sqrt(w / (s + 1)))
        assert t["lr"] == pytest.approx(expected, rel=1e-12)
    lr = {t["global_step"]: t["lr"] for t in train}
    for r in ledger[1:]:
        first = lr[r.global_step_start + 1]
        assert 0 < first < lr[r.global_step_start]  # continues the decay
        assert first != pytest.approx(base / w)  # not a restarted warmup
    # forgetting is visible: held-out loss on earlier files after each file
    evals = [
        json.loads(x)
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "eval" and json.loads(x).get("scope") == "earlier"
    ]
    assert {(e["global_step"], e["file_id"]) for e in evals} == {
        (ledger[1].global_step_end, 1),
        (ledger[2].global_step_end, 1),
        (ledger[2].global_step_end, 2),
    }
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["counts"]["done"] == 3
