#!/usr/bin/env bash
# A reward-model ensemble against a single reward model at best-of-n (issue 24's WCO check; Coste et al. 2024).
#
#   bash examples/ensemble_wco.sh [POLICY] [OUT_DIR] [GOLD]      (from the repository root)
#
# POLICY (default smollm2-135m) samples 4 responses (temperatures 0.7, 1.0, 0.7, 1.0) for each of the first
# $TRAIN_PROMPTS shipped training prompts; the simulated annotator ranks them by GOLD (default: the demo rubric)
# with Bradley-Terry noise relative to the scores' spread, as the demo labels (temperature 0.1, scale spread).
# `rlhfkit reward` then trains $K separate reward models on those rankings (ensemble_backbones=separate, seeds
# 0..K-1, all the data each: Coste et al.'s recipe), each on the first $NUM_LAYERS blocks of POLICY, holding out
# 10% of the prompts (OUT_DIR/reward/heldout.json: the ensemble's accuracy and each member's). Last,
# benchmarks/ensemble_best_of_n.py draws $N samples for each of the first $EVAL_PROMPTS held-out eval prompts and
# compares best-of-n picked by member 0 alone (`single`), by each member alone (`members`) and by the ensemble's
# mean, worst case (wco) and uwo, in gold score with paired intervals (OUT_DIR/bon/results.json).
# PRECISION defaults to what the demo picks here (bf16 with fast bf16 matmuls, else fp32).
set -euo pipefail
POLICY=${1:-smollm2-135m}
OUT=${2:-runs/ensemble_wco}
GOLD=${3:-demo}
TRAIN_PROMPTS=${TRAIN_PROMPTS:-160}
EVAL_PROMPTS=${EVAL_PROMPTS:-96}
K=${K:-4}
NUM_LAYERS=${NUM_LAYERS:-8}
EPOCHS=${EPOCHS:-2}
N=${N:-16}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-48}
RLHFKIT=${RLHFKIT:-rlhfkit}
PYTHON=${PYTHON:-python}  # the interpreter rlhfkit is installed in
PRECISION=${PRECISION:-$("$PYTHON" -c 'from rlhfkit.modeling.models import default_precision; print(default_precision())')}
DEMO=$("$PYTHON" -c 'from rlhfkit.sft import demo_data_path; print(demo_data_path(""))')
mkdir -p "$OUT"

"$RLHFKIT" sample model="$POLICY" prompts="$DEMO/prompts_train.jsonl" max_prompts="$TRAIN_PROMPTS" \
  temperatures="[0.7,1.0,0.7,1.0]" max_new_tokens="$MAX_NEW_TOKENS" batch_size=64 precision="$PRECISION" \
  output="$OUT/samples.jsonl"
"$RLHFKIT" label samples="$OUT/samples.jsonl" output="$OUT/labels.jsonl" scorer="$GOLD" temperature=0.1 \
  temperature_scale=spread
"$RLHFKIT" reward model="$POLICY" data="$OUT/labels.jsonl" output_dir="$OUT/reward" num_layers="$NUM_LAYERS" \
  num_epochs="$EPOCHS" lr=1e-4 batch_size=8 eval_fraction=0.1 eval_every=0 norm_max_samples=256 \
  ensemble_size="$K" ensemble_backbones=separate ensemble_bootstrap=false precision="$PRECISION"
"$PYTHON" benchmarks/ensemble_best_of_n.py --policy "$POLICY" --prompts "$DEMO/prompts_eval.jsonl" --single member0 \
  --ensemble "$OUT/reward" --gold "$GOLD" --n "$N" --max-prompts "$EVAL_PROMPTS" --max-new-tokens "$MAX_NEW_TOKENS" \
  --precision "$PRECISION" --output-dir "$OUT/bon"
