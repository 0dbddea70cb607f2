"""evertrain.fsutil: atomic file replacement and staged directories leave the old state or
the complete new one, never a torn one, and never replace what the caller did not write."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from evertrain import fsutil


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    fsutil.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["a.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert _mode(target) == 0o666 & ~umask
    fsutil.atomic_write_bytes(target, b"x", mode=0o640, sync_parent=False)
    assert target.read_bytes() == b"x" and _mode(target) == 0o640


def test_atomic_write_failure_keeps_old_file_and_removes_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a.json"
    target.write_bytes(b"old")

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        fsutil.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.json"]


def test_staged_dir_publishes_on_success_and_cleans_up_on_error(tmp_path: Path) -> None:
    final = tmp_path / "out" / "export"
    with fsutil.staged_dir(final) as tmp:
        assert tmp.name.startswith(fsutil.tmp_prefix(final)) and not final.exists()
        (tmp / "f.txt").write_text("x")
    assert (final / "f.txt").read_text() == "x"
    assert os.listdir(final.parent) == ["export"]

    other = tmp_path / "out" / "failed"
    with pytest.raises(RuntimeError), fsutil.staged_dir(other) as tmp:
        (tmp / "f.txt").write_text("x")
        raise RuntimeError("writer died")
    assert sorted(os.listdir(final.parent)) == ["export"]


def test_staged_dir_never_replaces_existing_output(tmp_path: Path) -> None:
    final = tmp_path / "export"
    final.mkdir()
    (final / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"), fsutil.staged_dir(final):
        pass
    assert (final / "keep.txt").read_text() == "mine"

    late = tmp_path / "late"  # appears while the caller is writing: still refused
    with pytest.raises(FileExistsError), fsutil.staged_dir(late) as tmp:
        (tmp / "f.txt").write_text("x")
        late.write_text("someone else's file")
    assert late.read_text() == "someone else's file"
    assert sorted(os.listdir(tmp_path)) == ["export", "late"]
