#!/usr/bin/env bash
# The main job: train the built-in tiny model on the bundled data file, stop it half-way
# (as a preemption would), then resume it to the end from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/quickstart}
.venv/bin/evertrain train examples/tiny.yaml --run-dir "$RUN" --max-steps 30
.venv/bin/evertrain train examples/tiny.yaml --run-dir "$RUN"
.venv/bin/evertrain verify "$RUN"
.venv/bin/evertrain inspect "$RUN"
