#!/usr/bin/env bash
# What tests/test_dashboard_browser.py needs: Debian's chromium (apt) and Playwright (PyPI)
# in .venv, driving that system chromium. Playwright's own browser download
# (`playwright install`) is never run: bundled browser downloads are not possible here, and
# the test passes executable_path=/usr/bin/chromium. Idempotent: a no-op when both are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PLAYWRIGHT_SPEC=${PLAYWRIGHT_SPEC:-"playwright>=1.45"}

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq chromium >/dev/null
fi
chromium --version 2>/dev/null | grep -i chromium

[ -x .venv/bin/python ] || { echo "error: .venv missing; run scripts/setup.sh first" >&2; exit 1; }
if ! .venv/bin/python -c "import playwright.sync_api" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "$PLAYWRIGHT_SPEC"
fi
.venv/bin/python -c "from importlib.metadata import version; print('playwright', version('playwright'))"
