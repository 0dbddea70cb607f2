"""``evertrain export``: a LoRA run as a PEFT adapter or a merged model, a full fine-tuning
run as a model; both load offline with plain transformers/peft and reproduce the trained
model; damaged checkpoints and existing outputs are refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import evertrain, resumed_trainer, write_config
from evertrain.checkpoint import CheckpointError, read_checkpoint
from evertrain.config import config_from_json, load_config
from evertrain.export import EXPORT_MANIFEST, export_run
from evertrain.models import load_model
from evertrain.rng import seed_everything

PROBE = "The quick brown fox"


def _train(tmp: Path, **sections: Any) -> tuple[Path, Any]:
    cfg = load_config(
        write_config(
            tmp,
            train={
                "max_steps": 6,
                "eval_every_steps": None,
                "device": "cpu",
                "schedule": {"warmup_steps": 0},
            },
            checkpoint={"every_steps": 3, "keep_last": 5},
            **sections,
        )
    )
    run = tmp / "run"
    t = resumed_trainer(cfg, run)
    t.fit()
    t.close()
    t.model.eval()
    return run, t


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: Any) -> tuple[Path, Any]:
    return _train(tmp_path_factory.mktemp("lora"), lora={"r": 4, "alpha": 8.0, "dropout": 0.1})


def _ids(tok: Any) -> torch.Tensor:
    return tok(PROBE, return_tensors="pt")["input_ids"]


def test_adapter_export_loads_with_peft(lora_run: tuple[Path, Any], tmp_path: Path) -> None:
    from peft import PeftModel

    run, trained = lora_run
    out = tmp_path / "adapter"
    res = export_run(run, out)
    assert res.kind == "adapter" and res.global_step == 6
    assert {"adapter_config.json", "adapter_model.safetensors", EXPORT_MANIFEST} <= set(res.files)
    assert not (out / "model.safetensors").exists()  # never the frozen base
    # what a plain open() gives, not the 0600 of the libraries' mkstemp
    umask = os.umask(0)
    os.umask(umask)
    assert {f: (out / f).stat().st_mode & 0o777 for f in res.files} == {
        f: 0o666 & ~umask for f in res.files
    }
    meta = json.loads((out / EXPORT_MANIFEST).read_text())
    assert meta["global_step"] == 6 and meta["kind"] == "adapter"
    assert (
        meta["base_model"]["weights_hash"]
        == trained.owners["adapter_model"].identity["weights_hash"]
    )

    cfg = config_from_json(trained.ckpt.config)
    seed_everything(cfg.seed)
    base = load_model(cfg.model).model
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = _ids(trained.tokenizer)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, trained.model(input_ids=ids).logits)


def test_merged_export_loads_and_generates_offline(
    lora_run: tuple[Path, Any], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, trained = lora_run
    out = tmp_path / "merged"
    proc = evertrain("export", str(run), "--out", str(out), "--merge", "--step", "3")
    res = json.loads(proc.stdout)
    assert res["kind"] == "merged" and res["global_step"] == 3
    assert "model.safetensors" in res["files"] and "adapter_config.json" not in res["files"]

    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = _ids(tok)
    assert torch.equal(ids, _ids(trained.tokenizer))
    # the merged weights reproduce step 3's adapter model (merging rounds, so allclose)
    from evertrain.restore import restore_model

    at3 = restore_model(run, 3).model
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, at3(input_ids=ids).logits
        later = trained.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, later, atol=1e-5, rtol=1e-5)  # step 3, not the newest
    seq = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert seq.shape == (1, ids.shape[1] + 8) and torch.equal(seq[:, : ids.shape[1]], ids)
    assert isinstance(tok.decode(seq[0]), str)


def test_full_finetune_exports_the_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run, trained = _train(tmp_path)
    out = tmp_path / "full"
    res = export_run(run, out, merge=False)  # a full run is exported whole either way
    assert res.kind == "full"
    saved = read_checkpoint(run / "checkpoints" / "step-00000006").states["model"]
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    sd = model.state_dict()
    weights = {k: v for k, v in saved.items() if k not in ("version", "identity")}
    assert weights and set(weights) <= set(sd)
    for name, t in weights.items():
        assert torch.equal(sd[name], t), name


def test_damaged_checkpoint_and_existing_output_are_refused(
    lora_run: tuple[Path, Any], tmp_path: Path
) -> None:
    src, _ = lora_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    weights = run / "checkpoints" / "step-00000006" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))

    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors.*--step"):
        export_run(run, out)
    assert not out.exists()
    proc = evertrain("export", str(run), "--out", str(out), check=False)
    assert proc.returncode == 2
    assert "damaged" in proc.stderr and "content hash mismatch" in proc.stderr
    assert not out.exists()

    assert export_run(run, out, step=3).global_step == 3  # an intact older step is fine

    with pytest.raises(FileExistsError, match="not an empty directory"):
        export_run(run, out, step=3)
    assert (out / EXPORT_MANIFEST).is_file()  # untouched
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 4 \(steps present: 3, 6"):
        export_run(run, tmp_path / "other", step=4)
