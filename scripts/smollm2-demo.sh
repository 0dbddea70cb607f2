#!/usr/bin/env bash
# The main job: LoRA fine-tuning of the bundled SmolLM2-135M-Instruct on CPython's reference
# documentation, on CPU, in about 10 minutes on 2 cores. Writes the data, evaluates the
# untrained model (held-out loss + greedy generations), trains with progress lines, evaluates
# again and prints both. Run it again after an interruption (Ctrl-C, kill -9) and it resumes
# from the last checkpoint. Environment: RUN (run directory), DATA (data directory; must
# match examples/smollm2.yaml), MAX_STEPS (override train.max_steps).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ET=.venv/bin/evertrain
PY=.venv/bin/python
CONFIG=examples/smollm2.yaml
RUN=${RUN:-runs/smollm2-demo}
DATA=runs/pydoc-data
SET=()
if [ -n "${MAX_STEPS:-}" ]; then SET=(--set "train.max_steps=$MAX_STEPS"); fi

echo "== 1/4 data: CPython's reference documentation (pydoc_data.topics) -> $DATA"
"$ET" data pydoc "$DATA"

if [ -f "$RUN/eval/step-00000000.json" ]; then
  echo "== 2/4 before: already evaluated ($RUN/eval/step-00000000.txt)"
else
  echo "== 2/4 before: evaluating the untrained model (the first run converts the model once)"
  "$ET" eval "$RUN" --config "$CONFIG" >/dev/null
fi

echo "== 3/4 training (LoRA r=8 on q/k/v/o; resumes if $RUN has checkpoints)"
"$ET" train "$CONFIG" --run-dir "$RUN" "${SET[@]}"

echo "== 4/4 after: evaluating the trained adapter"
"$ET" eval "$RUN" >/dev/null

"$PY" - "$RUN" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
reports = sorted((run / "eval").glob("step-*.json"))
before = json.loads(reports[0].read_text())
after = json.loads(reports[-1].read_text())
train = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
train = [r for r in train if r["kind"] == "train"]
secs = sum(r["seconds"] for r in train)
toks = sum(r["tokens"] for r in train)
print(f"\nheld-out loss (nats/token, {after['val_tokens']} tokens):")
print(f"  before (step {before['global_step']}): {before['val_loss']:.4f}  ppl {before['val_ppl']:.2f}")
print(f"  after  (step {after['global_step']}): {after['val_loss']:.4f}  ppl {after['val_ppl']:.2f}")
if secs:
    print(f"training: {len(train)} steps, {toks} tokens in {secs:.0f} s = {toks / secs:.0f} tokens/s")
for b, a in zip(before["generations"], after["generations"]):
    print("\n--- prompt ---\n" + b["prompt"])
    print("--- before ---\n" + b["completion"].strip())
    print("--- after ---\n" + a["completion"].strip())
print(f"\nreports: {reports[0]} {reports[-1]} (and .txt)")
PY
