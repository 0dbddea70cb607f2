#!/usr/bin/env bash
# The main job: the continuous-training daemon fine-tunes a LoRA adapter of the bundled
# SmolLM2-135M-Instruct on CPython's reference documentation, fed into the inbox one file
# after another, then prints the ledger, held-out loss and sample generations.
# Ctrl-C stops it cleanly (checkpoint written); running this script again resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/pydoc-stream}
DATA=${DATA:-runs/pydoc-data}
.venv/bin/evertrain data pydoc "$DATA" --num-files 12 >/dev/null
mkdir -p "$RUN/inbox"
for f in ${FILES:-pydoc-00 pydoc-04 pydoc-05 pydoc-06 pydoc-08 pydoc-11}; do  # ~200 KB: 3-13 min on 2 cores
  # write under a name the daemon ignores, then rename: a file is taken only when complete
  cp "$DATA/$f.jsonl" "$RUN/inbox/$f.jsonl.part"
  mv "$RUN/inbox/$f.jsonl.part" "$RUN/inbox/$f.jsonl"
done
.venv/bin/evertrain watch "$RUN" --config examples/watch-smollm2.yaml --once
.venv/bin/evertrain status "$RUN"
.venv/bin/evertrain verify "$RUN" >/dev/null && echo "all checkpoints verify"
.venv/bin/evertrain eval "$RUN"   # sample generations from the trained adapter
