#!/usr/bin/env bash
# Reward-model accuracy on held-out noiseless pairs (issue 3's acceptance check).
#
#   bash examples/reward_accuracy.sh [SFT_DIR] [OUT_DIR] [SCORER]
#
# Samples 3 responses per prompt from SFT_DIR (T = 0.7, 1.0, 1.2) on the shipped
# train prompts and, separately, on the held-out eval prompts; labels both with the
# simulated annotator at temperature 0 (noiseless: always the higher score; a
# ranking of 3 expands to 3 pairs); drops exact ties from the held-out set (a tie
# is no preference); trains a reward model on the train labels and reports its
# accuracy on the held-out pairs (OUT_DIR/reward/metrics.jsonl, last eval line).
set -euo pipefail
SFT=${1:-runs/demo/sft}
OUT=${2:-runs/reward_accuracy}
SCORER=${3:-length}
RLHFKIT=${RLHFKIT:-rlhfkit}
PYTHON=${PYTHON:-python}  # the interpreter rlhfkit is installed in
DEMO=$("$PYTHON" -c 'from rlhfkit.sft import demo_data_path; print(demo_data_path(""))')
mkdir -p "$OUT"

for split in train eval; do
  "$RLHFKIT" sample model="$SFT" prompts="$DEMO/prompts_$split.jsonl" output="$OUT/samples_$split.jsonl" \
    temperatures='[0.7,1.0,1.2]' max_new_tokens=64 batch_size=32
  "$RLHFKIT" label samples="$OUT/samples_$split.jsonl" output="$OUT/labels_$split.jsonl" \
    scorer="$SCORER" temperature=0
done
"$PYTHON" - "$OUT" <<'EOF'
import sys
from rlhfkit.data.preferences import load_comparisons, save_comparisons
from rlhfkit.data.records import Comparison
out = sys.argv[1]
pairs = []
for c in load_comparisons(f"{out}/labels_eval.jsonl"):
    s = c.meta["scores"]
    for better, worse, _ in c.pairs():
        if s[better] > s[worse]:  # equal scores carry no preference
            pairs.append(Comparison(c.prompt, [c.responses[better], c.responses[worse]], [0, 1],
                                    source=c.source, meta={"scores": [s[better], s[worse]]}))
save_comparisons(f"{out}/heldout_pairs.jsonl", pairs)
print(f"held-out: {len(pairs)} strict pairs")
EOF
"$RLHFKIT" reward model="$SFT" data="$OUT/labels_train.jsonl" eval_data="$OUT/heldout_pairs.jsonl" \
  output_dir="$OUT/reward" num_epochs=1 lr=3e-5 batch_size=8 eval_every=1000
"$PYTHON" - "$OUT" <<'EOF'
import json, sys
evals = [json.loads(l) for l in open(f"{sys.argv[1]}/reward/metrics.jsonl") if "eval_accuracy" in l]
print(f"held-out accuracy: {evals[-1]['eval_accuracy']:.4f} (step {evals[-1]['step']})")
EOF
