"""Seq2seq (encoder-decoder) models from the CLI: a tiny T5 from a local Hugging Face
directory and the built-in ``tiny`` T5 train with LoRA (``q``/``v`` adapters) and fully,
resume bit-identically after SIGKILL (mid-accumulation and mid-checkpoint, in ``train`` and
in ``watch``), export as an adapter or a merged ``AutoModelForSeq2SeqLM``, and evaluate;
packing and text records are refused with one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import (
    REPO,
    assert_identical,
    cli_env,
    evertrain,
    resumed_trainer,
    train_losses,
    write_config,
)
from daemon_util import drop, rows, watch_config
from evertrain.checkpoint import CheckpointManager, KeepLast, read_checkpoint
from evertrain.config import ConfigError, load_config
from evertrain.data import DataError, build_datasets
from evertrain.evaluate import evaluate_run
from evertrain.export import export_run
from evertrain.metrics import read_metrics
from evertrain.restore import restore_model
from test_exact_resume import run_straight_and_interrupted

PC_DATA = REPO / "examples" / "data" / "tiny_pc.jsonl"  # 50 prompt/completion records
STEPS = 12  # 39 training rows, global batch 8: 4 steps per epoch, so 3 epochs
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.1}


def _sections(source: str, **over: Any) -> dict[str, Any]:
    sections: dict[str, Any] = {
        "model": {"source": source, "kind": "seq2seq", "num_threads": 1, "dropout": 0.1},
        "data": {"files": [str(PC_DATA)], "seq_len": 32, "val_fraction": 0.2},
        "train": {
            "max_steps": STEPS,
            "lr": 1e-2,
            "device": "cpu",
            "eval_every_steps": 6,
            "schedule": {"name": "cosine", "warmup_steps": 2},
        },
        "checkpoint": {"every_steps": 4, "keep_last": 5},
    }
    for key, value in over.items():
        sections[key] = {**sections[key], **value} if key in sections else value
    return sections


def _probe(tok: Any) -> dict[str, torch.Tensor]:
    enc = tok(["Add: 3 + 5 =", "Reverse: stone ->"], return_tensors="pt", padding=True)
    labels = tok([" 8", " enots"], return_tensors="pt", padding=True)["input_ids"]
    start = torch.zeros_like(labels[:, :1])  # T5's decoder_start_token_id
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "decoder_input_ids": torch.cat([start, labels], 1),
    }


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: Any) -> Path:
    """A random-init tiny T5 saved as a Hugging Face directory with ByT5's tokenizer."""
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    out = tmp_path_factory.mktemp("t5")
    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2,
                      num_heads=4, dropout_rate=0.1, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def lora_runs(t5_dir: Path, tmp_path_factory: Any) -> tuple[Path, Path]:
    """The same LoRA run straight and killed twice (mid-accumulation of step 6, then
    while checkpoint 8 is half written) and resumed."""
    return run_straight_and_interrupted(
        tmp_path_factory.mktemp("lora"),
        ["micro@6:1", "save@8"],
        **_sections(str(t5_dir), lora=LORA),
    )


def test_lora_trains_q_v_adapters_and_resumes_bit_identical(lora_runs: tuple[Path, Path]) -> None:
    straight, resumed = lora_runs
    losses = train_losses(straight)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == train_losses(resumed)  # every logged loss, bit for bit
    assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3))
    a = read_checkpoint(straight / "checkpoints" / f"step-{STEPS:08d}").states
    b = read_checkpoint(resumed / "checkpoints" / f"step-{STEPS:08d}").states
    assert_identical(a, b)  # every tensor of every owner, every JSON value
    assert "model" not in a and a["data_cursor"]["epoch"] >= 2
    assert a["adapter_model"]["identity"]["kind"] == "seq2seq"
    keys = [k for k in a["adapter_model"] if k not in ("version", "identity")]
    # 2 encoder + 2 decoder blocks; q and v of self-attention and of cross-attention
    assert len(keys) == (2 * 1 + 2 * 2) * 2 * 2
    assert {k.split(".")[-3] for k in keys} == {"q", "v"}
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert any(".EncDecAttention.q.lora_B." in k for k in keys)
    assert a["adapter_config"]["task_type"] == "SEQ_2_SEQ_LM"


def test_checkpoint_is_a_peft_adapter_and_merged_export_loads(
    lora_runs: tuple[Path, Path], t5_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    run, _ = lora_runs
    trained = restore_model(run).model  # the adapter model at the newest step
    tok = AutoTokenizer.from_pretrained(str(t5_dir))
    probe = _probe(tok)
    with torch.no_grad():
        want = trained(**probe).logits
        base = AutoModelForSeq2SeqLM.from_pretrained(str(t5_dir))
        ckpt = run / "checkpoints" / f"step-{STEPS:08d}"
        adapter = PeftModel.from_pretrained(base, str(ckpt)).eval()
        assert torch.equal(adapter(**probe).logits, want)

    out = tmp_path / "merged"
    res = json.loads(evertrain("export", str(run), "--out", str(out), "--merge").stdout)
    assert res["kind"] == "merged" and "adapter_config.json" not in res["files"]
    merged = AutoModelForSeq2SeqLM.from_pretrained(str(out), local_files_only=True).eval()
    assert type(merged).__name__ == "T5ForConditionalGeneration"
    assert type(AutoTokenizer.from_pretrained(str(out))).__name__ == "ByT5Tokenizer"
    with torch.no_grad():
        got = merged(**probe).logits
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert export_run(run, tmp_path / "adapter").kind == "adapter"


def test_eval_gives_the_held_out_loss_the_trainer_logged(lora_runs: tuple[Path, Path]) -> None:
    run, _ = lora_runs
    logged = {r["global_step"]: r for r in read_metrics(run / "metrics.jsonl", "eval")}
    rep = evaluate_run(run, prompts=["Add: 3 + 5 ="], max_new_tokens=6, write=False)
    assert rep.global_step == STEPS and rep.val_loss is not None
    # every label of the decoder is scored (no causal shift), as the trainer weighted it
    cfg = load_config(_stored(run))
    _, val, _ = build_datasets(cfg.data, _tokenizer(), cfg.seed)
    assert rep.val_rows == len(val) and rep.val_tokens == int((val.labels != -100).sum())
    assert rep.val_loss == logged[STEPS]["val_loss"]
    assert rep.model["base"]["kind"] == "seq2seq"
    assert len(rep.generations) == 1 and 0 < rep.generations[0].new_tokens <= 6


def _stored(run: Path) -> dict[str, Any]:
    return read_checkpoint(run / "checkpoints" / f"step-{STEPS:08d}").states["config"]["config"]


def _tokenizer() -> Any:
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def test_full_finetune_of_builtin_tiny_t5_exports_a_full_model(tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    sections = _sections(
        "tiny",
        model={"tiny": {"hidden_size": 32, "intermediate_size": 64}},
        train={"max_steps": 6, "eval_every_steps": None},
    )
    t = resumed_trainer(load_config(write_config(tmp_path, **sections)), tmp_path / "run")
    before = t.evaluate()["val_loss"]
    assert t.fit() == "done"
    t.close()
    assert t.evaluate()["val_loss"] < before
    states = read_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000006").states
    weights = {k: v for k, v in states["model"].items() if k not in ("version", "identity")}
    assert "adapter_model" not in states
    assert "decoder.block.1.layer.1.EncDecAttention.q.weight" in weights

    out = tmp_path / "full"
    assert export_run(tmp_path / "run", out, merge=True).kind == "full"
    model = AutoModelForSeq2SeqLM.from_pretrained(str(out), local_files_only=True).eval()
    sd = model.state_dict()
    for name, w in weights.items():
        assert torch.equal(sd[name], w), name
    t.model.eval()
    probe = _probe(t.tokenizer)
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, t.model(**probe).logits)


def test_watch_trains_inbox_files_and_resumes_after_sigkill_bit_identical(
    tmp_path: Path,
) -> None:
    lines = PC_DATA.read_text(encoding="utf-8").splitlines()
    files = []
    for k in range(2):
        p = tmp_path / "src" / f"pc-{k}.jsonl"
        p.parent.mkdir(exist_ok=True)
        p.write_text("\n".join(lines[k * 25 : (k + 1) * 25]) + "\n", encoding="utf-8")
        files.append(p)
    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    config = watch_config(
        tmp_path,
        model={
            "source": "tiny",
            "kind": "seq2seq",
            "num_threads": 1,
            "dropout": 0.1,
            "tiny": tiny,
        },  # fmt: skip
        data={"seq_len": 32, "val_fraction": 0.2},
    )

    def start(name: str) -> list[str]:
        base = time.time() - 100
        for k, f in enumerate(files):  # distinct mtimes: a deterministic arrival order
            drop(f, tmp_path / name / "inbox", mtime=base + k)
        return ["watch", str(tmp_path / name), "--config", str(config), "--once"]

    straight = start("straight")
    reference = subprocess.Popen(
        [sys.executable, "-m", "evertrain", *straight],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    resumed = start("resumed")
    # while file 2's checkpoint 4 is written, then mid-step 5 (after checkpoint 4 was
    # committed: a death after progress, so the file is not quarantined as a crash loop)
    for fault in ("save@4", "micro@5:1"):
        proc = evertrain(*resumed, fault=fault, check=False)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-3000:])
    evertrain(*resumed)
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    a, b = tmp_path / "straight", tmp_path / "resumed"
    ledger = rows(a)
    assert [r.status for r in ledger] == ["done", "done"]
    end = ledger[-1].global_step_end
    assert end is not None and end >= 4
    assert [(r.global_step_start, r.global_step_end) for r in rows(b)] == [
        (r.global_step_start, r.global_step_end) for r in ledger
    ]
    assert train_losses(a) == train_losses(b)
    assert sorted(train_losses(b)) == list(range(1, end + 1))
    sa, sb = (read_checkpoint(_latest(r)).states for r in (a, b))
    for owner in sa:
        if owner != "config":  # the run directories differ in name only
            assert_identical(sa[owner], sb[owner], owner)
    assert sa["adapter_model"]["identity"]["kind"] == "seq2seq"


def _latest(run: Path) -> Path:
    info = CheckpointManager(run / "checkpoints", KeepLast(1)).latest_valid()
    assert info is not None
    return info.path


def test_packing_and_text_records_are_refused_in_one_line(tmp_path: Path, t5_dir: Path) -> None:
    config = write_config(tmp_path, **_sections(str(t5_dir), data={"packing": True}))
    proc = evertrain("train", str(config), "--run-dir", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and "data.packing" in err and "seq2seq" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()

    with pytest.raises(ConfigError, match=r"data\.format: 'messages' has no encoder input"):
        load_config({"model": {"kind": "seq2seq"}, "data": {"format": "messages"}})
    with pytest.raises(ConfigError, match=r"model\.kind: seq2seq needs model\.source tiny"):
        load_config({"model": {"kind": "seq2seq", "source": "x.gguf"}})
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "hello"}\n{"text": "world"}\n', encoding="utf-8")
    cfg = load_config({"model": {"kind": "seq2seq"}, "data": {"files": [str(text)]}})
    with pytest.raises(DataError, match=r"text.jsonl, line 1: 'text' records have no encoder"):
        build_datasets(cfg.data, _tokenizer(), 0)
    # on_bad_record: skip does not pass over a whole file of the wrong format
    cfg.data.on_bad_record = "skip"
    with pytest.raises(DataError, match="no encoder input"):
        build_datasets(cfg.data, _tokenizer(), 0)
    assert cfg.data.packing is False and "kind" not in load_config({}).to_json()["model"]
    example = load_config(REPO / "examples" / "seq2seq-tiny.yaml")  # the README's example
    assert example.model.kind == "seq2seq" and example.data.packing is False


def test_kind_is_part_of_the_model_identity_and_a_breaking_change() -> None:
    from evertrain.config_diff import breaking_changes, diff_configs
    from evertrain.model_state import ModelState
    from evertrain.state import StateError

    causal = {"format": "hf", "model_type": "t5", "weights_hash": "xxh3_128:0"}
    owner = ModelState(torch.nn.Linear(2, 2), {**causal, "kind": "seq2seq"})
    with pytest.raises(StateError, match="model.kind"):
        owner.load_state_dict({"version": 1, "identity": causal})
    old, new = load_config({}).to_json(), load_config({"model": {"kind": "seq2seq"}}).to_json()
    assert ("model.kind", None, "seq2seq") in breaking_changes(diff_configs(old, new))
