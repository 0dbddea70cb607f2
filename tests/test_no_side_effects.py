"""Importing evertrain and building a trainer change nothing process-wide: the environment
(e.g. Hugging Face's offline switches) is as it was. Checked in a fresh interpreter, where
``import evertrain`` (and of transformers and huggingface_hub) is a real first import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import cli_env, write_config

SCRIPT = textwrap.dedent(
    """
    import json
    import os
    import sys

    # torch's own import-time side effect (torch._dynamo sets TORCHINDUCTOR_CACHE_DIR, and
    # transformers imports it): taken before the snapshot; nothing else is imported yet
    import torch._dynamo

    assert "transformers" not in sys.modules and "huggingface_hub" not in sys.modules
    before = dict(os.environ)
    import evertrain
    from evertrain.config import load_config
    from evertrain.recipe import build_trainer

    trainer = build_trainer(load_config(sys.argv[1]), sys.argv[2])
    trainer.resume()
    trainer.close()
    after = dict(os.environ)
    import huggingface_hub.constants

    changed = {
        k: [before.get(k), after.get(k)]
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    }
    print(json.dumps({"changed": changed, "hub_offline": huggingface_hub.constants.HF_HUB_OFFLINE}))
    """
)


def test_import_and_trainer_leave_the_environment_unchanged(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = cli_env()
    # absent, so that setting them would show
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(config), str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"changed": {}, "hub_offline": False}
