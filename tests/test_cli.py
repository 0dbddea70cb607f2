"""The CLI as a user meets it: one-line config errors, verify/inspect, damaged checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import evertrain, train_losses, write_config
from evertrain.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("train: {micro_batch_size: four}", "train.micro_batch_size"),
        ("train: {lr: -1}", "train.lr"),
        ("trian: {lr: 1}", "trian: unknown key"),
        ("model: {source: tiny, dtpye: float32}", "model.dtpye: unknown key"),
        ("data: {seq_len: 1}", "data.seq_len"),
        ("train: {max_steps: 5, schedule: {warmup_steps: 10}}", "warmup_steps"),
        ("train: [1, 2", "invalid YAML"),
        ("- 1\n- 2", "top level must be a mapping"),
    ],
)
def test_bad_config_files_name_the_key(tmp_path: Path, yaml_text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert expected in msg and str(path) in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=abc", "train.lr"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train", "expected dotted.key=value"),
        ("train..lr=1", "empty key segment"),
        ("train.nope=1", "train.nope: unknown key"),
        ("seed.x=1", "'seed' is not a section"),
    ],
)
def test_bad_set_values_name_the_key(tiny_config: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")) as err:
        load_config(tiny_config, [override])
    assert "\n" not in str(err.value)


def test_cli_config_error_is_one_line_exit_2(tmp_path: Path, tiny_config: Path) -> None:
    proc = evertrain(
        "train",
        str(tiny_config),
        "--run-dir",
        str(tmp_path / "r"),
        "--set",
        "train.lr=abc",
        check=False,
    )
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "train.lr" in lines[0], proc.stderr


def test_omegaconf_and_dict_configs_are_stored_as_plain_json(tiny_config: Path) -> None:
    raw = yaml.safe_load(tiny_config.read_text())
    cfg = load_config(raw)
    assert json.loads(json.dumps(cfg.to_json())) == cfg.to_json()
    omegaconf = pytest.importorskip("omegaconf")
    cfg2 = load_config(omegaconf.OmegaConf.create(raw))
    assert cfg2.to_json() == cfg.to_json()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with checkpoints at steps 5, 10 and 15 (keep_last 3)."""
    tmp = tmp_path_factory.mktemp("trained")
    config = write_config(tmp, train={"max_steps": 15})
    evertrain("train", str(config), "--run-dir", str(tmp / "run"))
    return tmp


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # flip one byte in the middle
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
@pytest.mark.parametrize("name", ["manifest.json", "optimizer.json", "model.safetensors"])
def test_damaged_newest_checkpoint_is_named_by_verify(
    trained_run: Path, tmp_path: Path, name: str, how: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    _damage(run / "checkpoints" / "step-00000015" / name, how)
    proc = evertrain("verify", str(run), check=False)
    assert proc.returncode == 1
    fail = [x for x in proc.stdout.splitlines() if x.startswith("FAIL")]
    assert len(fail) == 1 and "step-00000015" in fail[0], proc.stdout
    assert name in proc.stdout or (name == "manifest.json" and "manifest" in proc.stdout)


def test_train_resumes_from_previous_valid_checkpoint_with_a_warning(
    trained_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    losses = train_losses(run)
    _damage(run / "checkpoints" / "step-00000015" / "model.safetensors", "flip")
    config = write_config(trained_run, train={"max_steps": 15})
    proc = evertrain("train", str(config), "--run-dir", str(run))
    assert "step-00000015" in proc.stderr and "model.safetensors" in proc.stderr
    assert "global_step 10" in proc.stderr  # resumed from the previous valid one
    assert train_losses(run) == losses  # steps 11-15 replayed identically
    # the damaged checkpoint was set aside, not deleted
    assert list((run / "checkpoints").glob("step-00000015.damaged-*"))
    assert evertrain("verify", str(run / "checkpoints" / "step-00000015")).returncode == 0


def test_inspect_shows_step_cursor_and_config(trained_run: Path) -> None:
    assert evertrain("verify", str(trained_run / "run")).returncode == 0
    proc = evertrain(
        "inspect", str(trained_run / "run" / "checkpoints" / "step-00000010"), "--json"
    )
    info = json.loads(proc.stdout)
    assert info["global_step"] == 10
    assert info["data_cursor"]["examples_seen"] == 10 * 2 * 4
    assert info["config"]["train"]["micro_batch_size"] == 4
    assert info["files"]["model.safetensors"] > 0


def test_run_with_only_damaged_checkpoints_refuses_to_start_fresh(
    trained_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    for d in (run / "checkpoints").glob("step-*"):
        _damage(d / "manifest.json", "truncate")
    config = write_config(trained_run, train={"max_steps": 15})
    proc = evertrain("train", str(config), "--run-dir", str(run), check=False)
    assert proc.returncode == 2 and "none verifies" in proc.stderr
    assert len(list((run / "checkpoints").glob("step-*"))) == 3  # nothing deleted


def test_version() -> None:
    from evertrain import __version__

    proc = evertrain("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"evertrain {__version__}"
