#!/usr/bin/env bash
# Lint, format check, type check, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The dashboard's browser test drives Debian's chromium; without it that one test skips.
bash scripts/install-browser-test-deps.sh >/dev/null \
  || echo "warning: chromium/playwright not installed; the browser test will skip" >&2
.venv/bin/ruff check src tests
.venv/bin/ruff format --check src tests
.venv/bin/mypy src
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
