"""``data.packing: masked`` (issue 14, item 3): packed rows whose documents attend only to
themselves, with positions from 0, so packing changes speed, not what the model computes;
and a masked-packed run still resumes bit-identically after SIGKILL."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from conftest import assert_identical, evertrain, train_losses, write_config
from evertrain.checkpoint import read_checkpoint
from evertrain.config import ConfigError, DataConfig, ModelConfig, load_config
from evertrain.data.pack import IGNORE_INDEX, pack
from evertrain.models import load_model
from evertrain.train_settings import token_loss_sum


def _doc(ids: list[int]) -> tuple[list[int], list[bool]]:
    return ids, [True] * len(ids)


def test_masked_rows_count_positions_per_document() -> None:
    docs = [_doc([5, 6, 7]), _doc([8, 9, 10, 11, 12]), _doc([13, 14, 15])]
    greedy, masked = pack(docs, 4, pad_id=0), pack(docs, 4, pad_id=0, masked=True)
    assert greedy.position_ids is None
    assert torch.equal(masked.input_ids, greedy.input_ids)
    assert torch.equal(masked.labels, greedy.labels)
    # a continued document starts its row with the token before the cut again
    assert masked.input_ids.tolist() == [
        [5, 6, 7, 8],
        [8, 9, 10, 11],
        [11, 12, 13, 14],
        [14, 15, 0, 0],
    ]
    # every document and every row starts at 0; the padding is a segment of its own
    assert masked.position_ids is not None
    assert masked.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 0, 1]]
    assert masked.labels[2].tolist() == [IGNORE_INDEX, 12, IGNORE_INDEX, 14]
    assert masked.labels[3].tolist() == [IGNORE_INDEX, 15, IGNORE_INDEX, IGNORE_INDEX]


def test_a_masked_packed_document_computes_what_it_computes_alone() -> None:
    torch.manual_seed(0)
    model = load_model(ModelConfig(source="tiny", dropout=0.0)).model.eval()
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randint(3, 250, (n,), generator=g).tolist() for n in (11, 9))
    row = pack([_doc(a), _doc(b)], 24, pad_id=0, masked=True)
    batch = {
        "input_ids": row.input_ids.long(),
        "attention_mask": row.attention_mask.long(),
        "position_ids": row.position_ids.long(),  # type: ignore[union-attr]
    }
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "attention_mask"}
        packed = model(**inputs, use_cache=False).logits[0, len(a) : len(a) + len(b)]
        alone = model(input_ids=torch.tensor([b])).logits[0]
        across = model(input_ids=row.input_ids.long()).logits[0, len(a) : len(a) + len(b)]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    # greedy packing (attention across the boundary) computes something else: the check bites
    assert not torch.allclose(across, alone, atol=1e-3)

    # the trainer's loss takes the masked path when a batch has position_ids
    labels = row.labels.long()
    with torch.no_grad():
        got = token_loss_sum(model, {**batch, "labels": labels})
        alone_a, alone_b = (
            token_loss_sum(model, {"input_ids": torch.tensor([d]),
                                   "labels": torch.tensor([[IGNORE_INDEX, *d[1:]]])})
            for d in (a, b)
        )  # fmt: skip
    torch.testing.assert_close(got, alone_a + alone_b, atol=1e-4, rtol=1e-5)


def test_packing_setting_spellings() -> None:
    assert [DataConfig(packing=p).packing_mode for p in (True, False, "masked")] == [
        "greedy",
        "none",
        "masked",
    ]
    with pytest.raises(ConfigError, match="data.packing"):
        load_config({"model": {"source": "tiny", "kind": "seq2seq"}, "data": {"packing": "masked"}})


@pytest.mark.parametrize("packing", ["masked"])
def test_masked_packing_resumes_bit_identical(tmp_path: Path, packing: str) -> None:
    config = write_config(tmp_path, data={"packing": packing}, train={"max_steps": 8},
                          checkpoint={"every_steps": 3})  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    evertrain("train", str(config), "--run-dir", str(straight))
    args = ["train", str(config), "--run-dir", str(resumed)]
    proc = evertrain(*args, fault="micro@5:1", check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    evertrain(*args)
    assert train_losses(resumed) == train_losses(straight)
    final = [
        read_checkpoint(r / "checkpoints" / "step-00000008").states for r in (straight, resumed)
    ]
    assert_identical(final[0]["model"], final[1]["model"])
    assert_identical(final[0]["optimizer"], final[1]["optimizer"])
