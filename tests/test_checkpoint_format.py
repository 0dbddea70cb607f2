"""Checkpoint format v1: round trip, manifest, verification of damage, pickle refusal."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

from evertrain.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    read_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from evertrain.checkpoint import format as ckpt_format

# Every dtype the writer accepts must round-trip bit-exactly.
DTYPES = sorted(ckpt_format.DTYPES, key=str)
assert {torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.bool} <= set(DTYPES)


def _random(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    # Random bytes viewed as dtype: every bit pattern (NaN payloads, -0.0, subnormals) occurs.
    nbytes = (
        torch.empty(shape, dtype=dtype).nelement() * torch.empty((), dtype=dtype).element_size()
    )
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Exact equality, tensors compared bitwise (NaN == NaN) with dtype and shape."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(_bits(a).reshape(-1), _bits(b).reshape(-1)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, where
    else:
        assert type(a) is type(b) and a == b, where
        if isinstance(a, float):  # -0.0 == 0.0 but must round-trip with its sign
            assert str(a) == str(b), where


def sample_states(seed: int = 0) -> dict[str, dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "model": {
            "version": 1,
            "params": {f"w.{d}".replace("torch.", ""): _random(d, (3, 5), gen) for d in DTYPES},
            "scalar": torch.tensor(2.5, dtype=torch.bfloat16),  # 0-dim
            "empty": torch.zeros(0, 4),
            "transposed": base.t(),  # non-contiguous
            "view_a": base[1],  # both share base's storage
            "view_b": base[1:3],
            "tied": [base, base],  # the same tensor twice
            "grad": torch.ones(2, requires_grad=True) * 3,
        },
        "progress": {
            "version": 1,
            "floats": [0.1, -0.0, 1e308, 5e-324, float("inf"), float("-inf"), float("nan")],
            "ints": [0, -1, 2**63 - 1, -(2**70)],
            "misc": {"none": None, "t": True, "f": False, "s": 'ünïcode \u2603 "q" /'},
            "nested": [[{"a": [1, {"b": []}]}], {}],
        },
    }


def test_round_trip_is_exact(tmp_path: Path) -> None:
    states = sample_states()
    summary = {"global_step": 7, "metrics": {"val_loss": float("nan")}, "x": [1, "a"]}
    out = write_checkpoint(tmp_path / "step-00000007", states, summary, global_step=7)
    assert sorted(os.listdir(out)) == [
        "manifest.json",
        "model.json",
        "model.safetensors",
        "progress.json",
    ]  # no tensors -> no progress.safetensors
    loaded = read_checkpoint(out)
    assert_same(states, loaded.states)
    assert loaded.global_step == 7 and loaded.summary["x"] == [1, "a"]
    assert verify_checkpoint(out) == []
    # Loaded tensors are independent, writable CPU tensors.
    loaded.states["model"]["tied"][0].add_(1)
    assert not torch.equal(loaded.states["model"]["tied"][0], loaded.states["model"]["tied"][1])


def test_manifest_lists_every_file_with_size_and_hash(tmp_path: Path) -> None:
    out = write_checkpoint(tmp_path / "step-00000001", sample_states(), {}, global_step=1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["global_step"] == 1
    names = sorted(os.listdir(out))
    names.remove("manifest.json")
    assert sorted(manifest["files"]) == names
    for name, entry in manifest["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    ref = json.loads((out / "model.json").read_text())["params"]["w.float32"]
    assert ref == {"__tensor__": "params/w.float32"}  # parameter dots kept, path joined by "/"


@pytest.mark.parametrize(
    ("states", "needle"),
    [
        ({"Model": {"a": 1}}, "owner name 'Model'"),
        ({"../x": {"a": 1}}, "owner name '../x'"),
        ({"m": {"a": (1, 2)}}, "tuple"),
        ({"m": {1: 2}}, "key 1"),
        ({"m": {"a": {"__tensor__": "x"}}}, "reserved"),
        ({"m": {"a/b": torch.ones(1), "a": {"b": torch.ones(1)}}}, "'a/b'"),
        ({"m": {"a": torch.ones(1, device="meta")}}, "CPU"),
        ({"m": {"a": torch.ones(2).to_sparse()}}, "dense"),
        ({"m": {"a": torch.ones(1, dtype=torch.complex128)}}, "dtype torch.complex128"),
        # safetensors writes this dtype but cannot read it back: refuse at write time.
        ({"m": {"a": torch.ones(1).to(torch.float8_e8m0fnu)}}, "cannot store and read back"),
        ({"m": {"a": object()}}, "type object"),
        ({}, "no states"),
    ],
)
def test_writer_rejects_bad_input_and_leaves_nothing(tmp_path: Path, states, needle) -> None:
    with pytest.raises(CheckpointError, match=needle.replace("(", r"\(")):
        write_checkpoint(tmp_path / "step-00000001", states, {}, global_step=1)
    assert os.listdir(tmp_path) == []


def test_writer_refuses_tensor_in_summary_and_existing_target(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="summary"):
        write_checkpoint(tmp_path / "c", {"m": {}}, {"t": torch.ones(1)}, global_step=1)
    write_checkpoint(tmp_path / "c", {"m": {}}, {}, global_step=1)
    with pytest.raises(CheckpointError, match="already exists"):
        write_checkpoint(tmp_path / "c", {"m": {}}, {}, global_step=1)


# --------------------------------------------------------------------------- damage


def write_sealed_manifest(ckpt: Path, m: dict[str, Any]) -> None:
    """Write ``m`` as a manifest with a valid self digest, as docs/checkpoint-format.md says."""
    m = {k: v for k, v in m.items() if k != "manifest_xxh3_128"}
    text = json.dumps({"manifest_xxh3_128": "0" * 32, **m}, indent=2)
    digest = xxhash.xxh3_128(text.encode()).hexdigest()
    (ckpt / "manifest.json").write_text(text.replace("0" * 32, digest, 1))


def _rewrite_manifest_entry(ckpt: Path, name: str) -> None:
    """Make the manifest agree with the current bytes of ``name`` (damage behind the hash)."""
    m = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / name).read_bytes()
    m["files"][name] = {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    write_sealed_manifest(ckpt, m)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncate": (lambda p: p.write_bytes(p.read_bytes()[:-3]), "size mismatch"),
    "delete": (lambda p: p.unlink(), "missing"),
    "flip": (lambda p: _flip(p, len(p.read_bytes()) // 2), "hash mismatch"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", ["model.json", "model.safetensors", "manifest.json"])
def test_damage_is_detected_and_named(tmp_path: Path, name: str, damage: str) -> None:
    ckpt = write_checkpoint(tmp_path / "step-00000002", sample_states(), {}, global_step=2)
    fn, message = DAMAGE[damage]
    fn(ckpt / name)
    problems = [p for p in verify_checkpoint(ckpt) if p.fatal]
    assert problems and problems[0].file == name
    if name != "manifest.json" or damage == "flip":  # a truncated manifest is bad JSON
        assert message in problems[0].message
    with pytest.raises(CorruptCheckpointError) as info:
        read_checkpoint(ckpt)
    assert name in str(info.value) and info.value.problems == verify_checkpoint(ckpt)


def test_damage_behind_a_matching_hash_is_still_caught(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "step-00000002", sample_states(), {}, global_step=2)
    (ckpt / "model.json").write_text('{"version": 1,')
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    _rewrite_manifest_entry(ckpt, "model.json")
    _rewrite_manifest_entry(ckpt, "model.safetensors")
    found = {p.file: p.message for p in verify_checkpoint(ckpt)}
    assert found["model.json"].startswith("not valid JSON")
    assert found["model.safetensors"].startswith("safetensors header unreadable")


def test_dangling_and_unreferenced_tensors(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "c", {"m": {"a": torch.ones(1)}}, {}, global_step=1)
    (ckpt / "m.json").write_text('{"a": {"__tensor__": "nope"}}')
    _rewrite_manifest_entry(ckpt, "m.json")
    assert "'nope'" in verify_checkpoint(ckpt)[0].message
    (ckpt / "m.json").write_text('{"b": 1}')
    _rewrite_manifest_entry(ckpt, "m.json")
    assert [p.file for p in verify_checkpoint(ckpt)] == ["m.safetensors"]


V1 = {"format_version": 1, "global_step": 1, "files": {}, "summary": {}}


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not valid JSON"),
        ([], "expected an object"),
        ({**V1, "format_version": 2},
         "format_version 2 is not supported: this evertrain reads format_version 1"),
        ({**V1, "format_version": None}, "no format_version"),
        (json.dumps(V1), "manifest_xxh3_128 missing"),
        ({**V1, "files": {"m.json": {"size": 1}}}, "needs size (int) and xxh3_128"),
        ({**V1, "global_step": "1"}, "global_step (int)"),
    ],
)  # fmt: skip
def test_bad_manifest_messages(tmp_path: Path, content: Any, needle: str) -> None:
    ckpt = write_checkpoint(tmp_path / "c", {"m": {"a": 1}}, {}, global_step=1)
    if isinstance(content, str):
        (ckpt / "manifest.json").write_text(content)
    elif isinstance(content, dict):
        write_sealed_manifest(ckpt, content)
    else:
        (ckpt / "manifest.json").write_text(json.dumps(content))
    (problem,) = [p for p in verify_checkpoint(ckpt) if p.fatal]
    assert problem.file == "manifest.json" and needle in problem.message and problem.fatal


def test_global_step_must_match_directory_name(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "step-00000005", {"m": {}}, {}, global_step=6)
    assert "does not match" in verify_checkpoint(ckpt)[0].message


# --------------------------------------------------------------------------- pickle


class _Payload:
    """Unpickling this creates ``marker``: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (io.open, (self.marker, "w"))


def test_pickle_payload_is_live(tmp_path: Path) -> None:
    # Guards the next tests: the payload really does create its marker when unpickled.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path opened through builtins.open / os.open while the test runs."""
    seen: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **k):  # type: ignore[no-untyped-def]
        seen.append(os.fspath(file))
        return real_open(file, *a, **k)

    def spy_os_open(file, *a, **k):  # type: ignore[no-untyped-def]
        seen.append(os.fspath(file))
        return real_os_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    return seen


def test_planted_pickles_are_never_opened(tmp_path: Path, opened: list[str]) -> None:
    marker = tmp_path / "PWNED"
    ckpt = write_checkpoint(tmp_path / "c", sample_states(), {}, global_step=1)
    for name in ("optimizer.pt", "x.pkl", "y.bin"):
        (ckpt / name).write_bytes(pickle.dumps(_Payload(marker)))
    opened.clear()
    warnings = verify_checkpoint(ckpt)
    assert {(p.file, p.fatal) for p in warnings} == {
        ("optimizer.pt", False), ("x.pkl", False), ("y.bin", False)}  # fmt: skip
    assert all(p.message.startswith("unlisted file, ignored") for p in warnings)
    assert_same(sample_states(), read_checkpoint(ckpt).states)
    assert not any(Path(p).suffix in (".pt", ".pkl", ".bin") for p in opened)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "x.pkl", "../model.json", "sub/model.json"])
def test_manifest_listing_a_non_format_file_is_refused(
    tmp_path: Path, opened: list[str], name: str
) -> None:
    marker = tmp_path / "PWNED"
    ckpt = write_checkpoint(tmp_path / "d" / "c", {"m": {"a": 1}}, {}, global_step=1)
    payload = tmp_path / "d" / "model.json" if name.startswith("..") else ckpt / name
    payload.parent.mkdir(exist_ok=True)
    payload.write_bytes(pickle.dumps(_Payload(marker)))
    _rewrite_manifest_entry(ckpt, name)
    opened.clear()
    problems = [p for p in verify_checkpoint(ckpt) if p.fatal]
    assert [p.file for p in problems] == [name] and "refused" in problems[0].message
    with pytest.raises(CorruptCheckpointError, match="refused"):
        read_checkpoint(ckpt)
    assert not any(os.path.basename(p) == os.path.basename(name) for p in opened)
    assert not marker.exists()
