"""docs/api.md runs: every ```python block, top to bottom in one namespace, in a fresh
directory (as a reader pasting them one after another would)."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO

BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_every_code_block_of_the_api_doc_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    blocks = BLOCK.findall(text)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    # torch itself sets TORCHINDUCTOR_CACHE_DIR the first time an optimizer is built (its
    # import of torch._dynamo): done before the snapshot, so only evertrain's effects count
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    env_before = dict(os.environ)
    namespace: dict[str, object] = {"__name__": "__api_doc__"}
    out = io.StringIO()
    for i, code in enumerate(blocks):
        with contextlib.redirect_stdout(out):
            try:
                exec(compile(code, f"docs/api.md block {i + 1}", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"docs/api.md block {i + 1} failed: {e!r}\n{code}") from e
    printed = out.getvalue()
    # what the text says the blocks print
    assert "['step-00000010', 'step-00000012']" in printed
    assert "tracker: value at state/best/seen has type set" in printed
    assert "lr (0.01 -> 0.03)" in printed
    assert "done 6 {'val_loss':" in printed  # the Trainer: 2 epochs of ceil(22 / 8) steps
    assert dict(os.environ) == env_before
