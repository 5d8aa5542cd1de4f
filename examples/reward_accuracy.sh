#!/usr/bin/env bash
# Reward-model accuracy on held-out noiseless pairs (issue 3's acceptance check).
#
#   bash examples/reward_accuracy.sh [POLICY] [OUT_DIR] [SCORER]
#
# POLICY (default smollm2-135m; a demo SFT run such as runs/demo/sft also works)
# samples one response per temperature in $TEMPS (default 6: 0.6 ... 1.3) for each
# training prompt (the shipped RL train prompts and the SFT data's prompts: 442
# distinct prompts; with the 160 RL prompts alone the model overfits) and,
# separately, each held-out eval prompt (disjoint from both). Each response is cut
# at its first blank line ($STOP, default ["\n\n"]: the first paragraph), so
# lengths vary as answers do (10th-90th percentile about 18-54 words); uncut, 92% of
# SmolLM2's responses run into the 64-token limit at 45-55 words, where a length
# scorer asks the model to count words almost exactly. The simulated annotator
# labels them at temperature 0 with a known scorer (noiseless: responses ranked by
# score); the default is the length scorer with a 20-word target ($SCORER_ARGS).
# Responses with equal scores carry no preference, so each ranking keeps one
# response per distinct score (train) and the held-out set keeps strict pairs only.
# A reward model on POLICY is trained on the train rankings for $EPOCHS (4) epochs,
# each ranking one batch element with all its pairs (InstructGPT), and its accuracy
# on the held-out pairs is the last eval line of OUT_DIR/reward/metrics.jsonl.
set -euo pipefail
POLICY=${1:-smollm2-135m}
OUT=${2:-runs/reward_accuracy}
SCORER=${3:-length}
TEMPS=${TEMPS:-[0.6,0.8,1.0,1.1,1.2,1.3]}
DEFAULT_ARGS="{}"
[ "$SCORER" = length ] && DEFAULT_ARGS="{target_words: 20}"
SCORER_ARGS=${SCORER_ARGS:-$DEFAULT_ARGS}  # keyword arguments of the scorer (label's scorer_args)
STOP=${STOP:-'["\n\n"]'}  # sample's stop strings; '[]' keeps whole responses
EPOCHS=${EPOCHS:-4}
LR=${LR:-5e-5}
RLHFKIT=${RLHFKIT:-rlhfkit}
PYTHON=${PYTHON:-python}  # the interpreter rlhfkit is installed in
DEMO=$("$PYTHON" -c 'from rlhfkit.sft import demo_data_path; print(demo_data_path(""))')
mkdir -p "$OUT"

for split in train sft eval; do
  prompts="$DEMO/prompts_$split.jsonl"
  [ "$split" = sft ] && prompts="$DEMO/sft.jsonl"  # its `prompt` fields; the completions are not used
  "$RLHFKIT" sample model="$POLICY" prompts="$prompts" output="$OUT/samples_$split.jsonl" \
    temperatures="$TEMPS" max_new_tokens=64 batch_size=32 stop="$STOP"
  "$RLHFKIT" label samples="$OUT/samples_$split.jsonl" output="$OUT/labels_$split.jsonl" \
    scorer="$SCORER" scorer_args="$SCORER_ARGS" temperature=0
done
"$PYTHON" - "$OUT" <<'EOF'
import sys
from rlhfkit.data.preferences import load_comparisons, save_comparisons
from rlhfkit.data.records import Comparison
out = sys.argv[1]

train = []
for c in load_comparisons(f"{out}/labels_train.jsonl") + load_comparisons(f"{out}/labels_sft.jsonl"):
    s = c.meta["scores"]
    best_first, seen = [], set()
    for i in sorted(range(len(c.responses)), key=lambda i: -s[i]):
        if s[i] not in seen:  # one response per distinct score: equal scores are no preference
            seen.add(s[i])
            best_first.append(i)
    if len(best_first) >= 2:
        train.append(Comparison(c.prompt, [c.responses[i] for i in best_first], list(range(len(best_first))),
                                source=c.source, meta={"scores": [s[i] for i in best_first]}))
save_comparisons(f"{out}/train_rankings.jsonl", train)

held = []
for c in load_comparisons(f"{out}/labels_eval.jsonl"):
    s = c.meta["scores"]
    for better, worse, _ in c.pairs():
        if s[better] > s[worse]:  # equal scores carry no preference
            held.append(Comparison(c.prompt, [c.responses[better], c.responses[worse]], [0, 1],
                                   source=c.source, meta={"scores": [s[better], s[worse]]}))
save_comparisons(f"{out}/heldout_pairs.jsonl", held)
n_pairs = sum(len(c.responses) * (len(c.responses) - 1) // 2 for c in train)
print(f"train: {len(train)} strict rankings ({n_pairs} pairs); held-out: {len(held)} strict pairs")
EOF
"$RLHFKIT" reward model="$POLICY" data="$OUT/train_rankings.jsonl" eval_data="$OUT/heldout_pairs.jsonl" \
  output_dir="$OUT/reward" num_epochs="$EPOCHS" lr="$LR" warmup_ratio=0.1 batch_size=8 eval_every=1000
"$PYTHON" - "$OUT" <<'EOF'
import json, sys
evals = [json.loads(l) for l in open(f"{sys.argv[1]}/reward/metrics.jsonl") if "eval_accuracy" in l]
print(f"held-out accuracy: {evals[-1]['eval_accuracy']:.4f} (step {evals[-1]['step']})")
EOF
