#!/usr/bin/env bash
# Active querying vs random, and best-of-n by a reward-model ensemble vs one reward model, over many repeats with a
# linear score head on a frozen backbone (issue 24; benchmarks/active_querying_linear.py, ensemble_best_of_n_linear.py).
#
#   bash examples/active_querying_linear.sh [POLICY] [OUT_DIR] [GOLD]      (from the repository root)
#
# POLICY (default smollm2-135m) samples 6 responses for each of the first $POOL_PROMPTS shipped training prompts (the
# pool) and $N for each of the first $HELD_PROMPTS shipped eval prompts (held out, and the best-of-n pools); the
# simulated annotator labels every pair of both by GOLD (default: the demo rubric; any built-in scorer or
# module:function) with Bradley-Terry noise at temperature 0.1 of the scores' spread.
# Both benchmarks then read the same cached features (the first $NUM_LAYERS blocks of $BACKBONE, by default POLICY;
# a trained reward-model directory with NUM_LAYERS=-1 queries a second round on a first round's features, where
# benchmarks/README.md found uncertainty and bal_pm saving labels with the demo rubric).
set -euo pipefail
POLICY=${1:-smollm2-135m}
OUT=${2:-runs/active_querying_linear}
GOLD=${3:-demo}
POOL_PROMPTS=${POOL_PROMPTS:-256}
HELD_PROMPTS=${HELD_PROMPTS:-120}
N=${N:-16}
BACKBONE=${BACKBONE:-$POLICY}
NUM_LAYERS=${NUM_LAYERS:-8}
SEEDS=${SEEDS:-0-29}
BUDGETS=${BUDGETS:-64,96,128,192,256,384,512}
TRAIN_PAIRS=${TRAIN_PAIRS:-128,512}
STRATEGIES=${STRATEGIES:-disagreement,uncertainty}  # also: d_optimal, variance_reduction, importance, bal_pm
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-48}
RLHFKIT=${RLHFKIT:-rlhfkit}
PYTHON=${PYTHON:-python}  # the interpreter rlhfkit is installed in
PRECISION=${PRECISION:-$("$PYTHON" -c 'from rlhfkit.modeling.models import default_precision; print(default_precision())')}
DEMO=$("$PYTHON" -c 'from rlhfkit.sft import demo_data_path; print(demo_data_path(""))')
HELD_TEMPERATURES=$("$PYTHON" -c "print([0.7, 1.0] * ($N // 2) + [0.7] * ($N % 2))")
mkdir -p "$OUT"

"$RLHFKIT" sample model="$POLICY" prompts="$DEMO/prompts_train.jsonl" max_prompts="$POOL_PROMPTS" \
  temperatures="[0.7,1.0,0.7,1.0,0.7,1.0]" max_new_tokens="$MAX_NEW_TOKENS" batch_size=64 precision="$PRECISION" \
  output="$OUT/pool_samples.jsonl"
"$RLHFKIT" sample model="$POLICY" prompts="$DEMO/prompts_eval.jsonl" max_prompts="$HELD_PROMPTS" \
  temperatures="$HELD_TEMPERATURES" max_new_tokens="$MAX_NEW_TOKENS" batch_size=32 precision="$PRECISION" \
  output="$OUT/held_samples.jsonl"
"$RLHFKIT" query samples="$OUT/pool_samples.jsonl" strategy=random num_queries=1000000 max_per_prompt=0 \
  output="$OUT/pool_pairs.jsonl"
"$RLHFKIT" label samples="$OUT/pool_pairs.jsonl" output="$OUT/pool_labels.jsonl" scorer="$GOLD" temperature=0.1 \
  temperature_scale=spread
# Held-out pairs are labelled one by one, as the pool's are, so that a gold scorer's exact ties are marked as ties
# (and left out of the accuracy); a K-way ranking would order tied responses arbitrarily.
"$RLHFKIT" query samples="$OUT/held_samples.jsonl" strategy=random num_queries=1000000 max_per_prompt=0 \
  output="$OUT/held_pairs.jsonl"
"$RLHFKIT" label samples="$OUT/held_pairs.jsonl" output="$OUT/held_labels.jsonl" scorer="$GOLD" temperature=0.1 \
  temperature_scale=spread
COMMON=(--model "$BACKBONE" --num-layers "$NUM_LAYERS" --precision "$PRECISION" --samples "$OUT/pool_samples.jsonl"
  --labels "$OUT/pool_labels.jsonl" --features-dir "$OUT/features")
"$PYTHON" benchmarks/active_querying_linear.py "${COMMON[@]}" --heldout "$OUT/held_labels.jsonl" --seeds "$SEEDS" \
  --budgets "$BUDGETS" --initial "${INITIAL:-32}" --strategies "$STRATEGIES" --output-dir "$OUT/active"
"$PYTHON" benchmarks/ensemble_best_of_n_linear.py "${COMMON[@]}" --bon "$OUT/held_samples.jsonl" --gold "$GOLD" \
  --train-pairs "$TRAIN_PAIRS" --seeds "$SEEDS" --output-dir "$OUT/bon"
