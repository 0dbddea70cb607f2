"""Padded rows (``data.packing: none``) cost what the micro-batch's longest row does, not
``seq_len``: each micro-batch loses the trailing columns that are padding in every row; the
loss is the same (up to float rounding) and a SIGKILLed run still resumes bit-identical."""

from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import assert_identical, evertrain, resumed_trainer, train_losses, write_config
from evertrain.checkpoint import read_checkpoint
from evertrain.config import load_config
from evertrain.data.loader import ROW_MASK, trim_padding

SEQ_LEN = 384


def _batch(lengths: list[int], n: int = 8, label_after: int | None = None) -> dict[str, Any]:
    mask = torch.zeros(len(lengths), n, dtype=torch.bool)
    for r, k in enumerate(lengths):
        mask[r, :k] = True
    ids = torch.arange(len(lengths) * n).view(len(lengths), n)
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    if label_after is not None:  # a target where the attention mask is False
        labels[0, label_after] = 7
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "position_ids": torch.arange(n).expand(len(lengths), n),
        ROW_MASK: torch.ones(len(lengths), dtype=torch.bool),
    }


def test_trailing_all_padding_columns_go_and_nothing_else() -> None:
    b = _batch([3, 5, 2])
    t = trim_padding(b)
    assert {k: tuple(v.shape) for k, v in t.items()} == {
        "input_ids": (3, 5),
        "labels": (3, 5),
        "attention_mask": (3, 5),
        "position_ids": (3, 5),
        ROW_MASK: (3,),
    }
    for k in ("input_ids", "labels", "attention_mask", "position_ids"):
        assert torch.equal(t[k], b[k][:, :5]) and t[k].is_contiguous()
    assert (b["labels"][:, 5:] == -100).all() and not b["attention_mask"][:, 5:].any()
    # a target beyond every attention mask is kept (never drop a target)
    assert trim_padding(_batch([3, 5, 2], label_after=6))["labels"].shape == (3, 7)
    full = _batch([8, 1])
    assert trim_padding(full) is full  # nothing to cut: the same object
    no_mask = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
    assert trim_padding(no_mask) is no_mask


def _fit(tmp: Path, name: str, trim: bool) -> tuple[list[tuple[int, ...]], dict[int, float], Any]:
    cfg = load_config(
        write_config(
            tmp,
            data={"packing": False, "seq_len": SEQ_LEN, "trim_padding": trim},
            train={"max_steps": 6, "eval_every_steps": 3},
            # dropout off: its masks are drawn in the batch's shape, so they would differ
            model={"source": "tiny", "dropout": 0.0, "num_threads": 1},
        )
    )
    trainer = resumed_trainer(cfg, tmp / name)
    shapes: list[tuple[int, ...]] = []
    trainer.model.register_forward_pre_hook(
        lambda m, args, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    trainer.fit()
    return shapes, train_losses(tmp / name), trainer


def test_trimmed_training_computes_the_same_losses_on_shorter_batches(tmp_path: Path) -> None:
    trimmed, losses, t = _fit(tmp_path, "trimmed", True)
    full, full_losses, f = _fit(tmp_path, "full", False)
    assert {s[1] for s in full} == {SEQ_LEN}
    # the tiny data's records are 60-320 characters (tokens) long: no micro-batch needs 384
    assert max(s[1] for s in trimmed) < SEQ_LEN and min(s[1] for s in trimmed) < 200
    assert len(trimmed) == len(full)  # the same micro-batches, train and held-out
    assert sorted(losses) == sorted(full_losses) == list(range(1, 7))
    for step, loss in losses.items():  # another matmul shape may round differently
        assert math.isclose(loss, full_losses[step], rel_tol=1e-5), step
    assert t.progress.tokens_seen == f.progress.tokens_seen
    assert t.progress.examples_seen == f.progress.examples_seen


@pytest.mark.slow
def test_sigkilled_trimmed_run_resumes_bit_identical(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, data={"packing": False, "seq_len": SEQ_LEN}, train={"max_steps": 16}
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    evertrain("train", str(config), "--run-dir", str(straight))
    args = ["train", str(config), "--run-dir", str(resumed)]
    for fault in ("micro@6:1", "save@10"):
        proc = evertrain(*args, fault=fault, check=False)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-2000:])
    evertrain(*args)
    assert train_losses(straight) == train_losses(resumed)
    a = read_checkpoint(straight / "checkpoints" / "step-00000016").states
    b = read_checkpoint(resumed / "checkpoints" / "step-00000016").states
    for owner in ("model", "optimizer", "data_cursor", "rng"):
        assert_identical(a[owner], b[owner], owner)


def test_unset_trim_follows_the_checkpoint_and_a_new_run_the_compile_setting(
    tmp_path: Path,
) -> None:
    from evertrain.batching import trim_for_resume
    from evertrain.train_settings import TrainSettings

    cfg = load_config(write_config(tmp_path, data={"packing": False}))
    assert cfg.data.trim_padding is None
    assert trim_for_resume(cfg, None) is True  # a new run
    assert trim_for_resume(cfg, {"trim_padding": True}) is True
    # written before trimming existed: it trained on full rows and keeps doing so
    assert trim_for_resume(cfg, {"global_step": 5}) is False
    compiled = load_config(write_config(tmp_path, data={"packing": False}, model={"compile": True}))
    assert trim_for_resume(compiled, None) is False
    assert trim_for_resume(compiled, {"trim_padding": True}) is True  # the run's own choice
    explicit = load_config(write_config(tmp_path, data={"packing": False, "trim_padding": False}))
    assert trim_for_resume(explicit, {"trim_padding": True}) is False
    assert TrainSettings().trim_padding is False  # the library's own loop: only when asked


def test_the_checkpoint_records_trimming_and_a_resume_keeps_it(tmp_path: Path) -> None:
    cfg = load_config(
        write_config(
            tmp_path,
            data={"packing": False, "seq_len": SEQ_LEN},
            train={"max_steps": 4, "eval_every_steps": None},
        )  # fmt: skip
    )
    trainer = resumed_trainer(cfg, tmp_path / "run")
    assert trainer.settings.trim_padding is True
    trainer.fit()
    assert trainer.checkpoints.committed()[-1].summary["trim_padding"] is True
    assert resumed_trainer(cfg, tmp_path / "run").settings.trim_padding is True
