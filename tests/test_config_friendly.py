"""Configs as people write them (issue 13, item 1): YAML 1.2 numbers (`2e-4` is a float,
not a string), "did you mean" for misspelt keys, and the evertrain name for keys brought
from transformers' TrainingArguments or PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest

from evertrain.config import ConfigError, load_config, parse_override


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("model: {source: tiny}\n" + text)
    return path


@pytest.mark.parametrize(
    ("text", "value"),
    [("2e-4", 2e-4), ("1E-5", 1e-5), ("+3e-1", 0.3), ("2.0e-4", 2e-4), (".5", 0.5)],
)
def test_exponent_numbers_are_floats(tmp_path: Path, text: str, value: float) -> None:
    cfg = load_config(write(tmp_path, f"train: {{lr: {text}}}\n"))
    assert cfg.train.lr == value and isinstance(cfg.train.lr, float)


def test_override_reads_yaml_1_2_numbers_too() -> None:
    assert parse_override("train.lr=2e-4") == (["train", "lr"], 2e-4)
    assert parse_override("train.max_steps=10") == (["train", "max_steps"], 10)


def test_strings_and_integers_stay_what_they_were(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "train: {max_steps: 12, lr: 0.01}\nseed: 7\n"))
    assert cfg.train.max_steps == 12 and cfg.seed == 7 and cfg.train.lr == 0.01


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train: {lrr: 0.1}\n", "train.lrr: unknown key; did you mean 'lr'?"),
        ("train: {micro_batchsize: 4}\n", "did you mean 'micro_batch_size'?"),
        (
            "train: {learning_rate: 2e-4}\n",
            "train.learning_rate: unknown key; evertrain calls this train.lr",
        ),
        (
            "train: {per_device_train_batch_size: 8}\n",
            "evertrain calls this train.micro_batch_size",
        ),
        ("train: {num_train_epochs: 3}\n", "evertrain calls this train.epochs"),
        ("checkpoint: {save_total_limit: 2}\n", "evertrain calls this checkpoint.keep_last"),
        ("learning_rate: 2e-4\n", "learning_rate: unknown key; evertrain calls this train.lr"),
        ("lora: {lora_alpha: 16}\n", "evertrain calls this lora.alpha"),
    ],
)
def test_unknown_keys_get_a_suggestion(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert expected in str(err.value) and "\n" not in str(err.value)
