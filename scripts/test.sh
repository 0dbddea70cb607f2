#!/usr/bin/env bash
# Lint, format check, type check, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests
.venv/bin/ruff format --check src tests
.venv/bin/mypy src
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
