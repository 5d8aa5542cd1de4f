#!/usr/bin/env bash
# A reward-model ensemble against a single reward model when the labels are noisy (Coste et al. 2024's 25% label
# noise), on a finished pipeline run (issue 24's WCO check).
#
#   bash examples/ensemble_label_noise.sh RUN_DIR [OUT_DIR] [FLIP_RATE]      (from the repository root)
#
# RUN_DIR is a finished `rlhfkit demo` / `rlhfkit run` whose label stage was the simulated annotator. Its samples are
# labelled again by the same annotator (scorer, temperature and seed from RUN_DIR/label/labels.jsonl.meta.json) with
# `flip_rate=FLIP_RATE` (default 0.25): that share of the rankings reversed, and with the seed unchanged exactly those
# differ from the run's labels. On the noisy labels, with RUN_DIR's reward settings (RUN_DIR/reward/config.yaml), it
# trains one reward model (OUT_DIR/single) and an ensemble of $K separate ones (OUT_DIR/sep: seeds S..S+K-1, every
# pair each, Coste et al.'s recipe). Then:
# * benchmarks/best_of_n_rankers.py draws RUN_DIR's best-of-n pool again and ranks it by the single model, by the
#   ensemble's wco, mean and uwo, and by RUN_DIR's own reward model (`clean`, trained on the noiseless labels; it also
#   checks that the pool is the run's): gold of each best-of-n pick, paired (OUT_DIR/rankers.json);
# * benchmarks/reward_accuracy_on_labels.py judges the same models on the run's own (noise-free) labels of the
#   reward stage's held-out prompts (OUT_DIR/accuracy.json).
# On SmolLM2 (the demo's 8-block reward model, 576 training rankings) about 28 minutes a run here.
set -euo pipefail
RUN=${1:?usage: examples/ensemble_label_noise.sh RUN_DIR [OUT_DIR] [FLIP_RATE]}
OUT=${2:-$RUN/label_noise}
FLIP=${3:-0.25}
K=${K:-4}
RLHFKIT=${RLHFKIT:-rlhfkit}
PYTHON=${PYTHON:-python}  # the interpreter rlhfkit is installed in
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"

# The run's annotator, as key=value overrides of `rlhfkit label` (flip_rate replaced).
mapfile -t ANNOTATOR < <("$PYTHON" - "$RUN/label/labels.jsonl.meta.json" <<'EOF'
import json, sys
meta = json.load(open(sys.argv[1]))
if meta.get("source") != "simulated":
    raise SystemExit(f"{sys.argv[1]}: source {meta.get('source')!r}; this check needs the simulated annotator")
for key in ("scorer", "temperature", "temperature_scale", "tie_threshold", "seed"):
    print(f"{key}={meta[key]}")
print(f"scorer_args={json.dumps(meta.get('scorer_args', {}))}")
EOF
)
SEED=$(grep '^seed: ' "$RUN/reward/config.yaml" | cut -d' ' -f2)

"$RLHFKIT" label samples="$RUN/sample/samples.jsonl" output="$OUT/labels.jsonl" "${ANNOTATOR[@]}" flip_rate="$FLIP"
"$RLHFKIT" reward "$RUN/reward/config.yaml" data="$OUT/labels.jsonl" output_dir="$OUT/single" ensemble_size=1
"$RLHFKIT" reward "$RUN/reward/config.yaml" data="$OUT/labels.jsonl" output_dir="$OUT/sep" ensemble_size="$K" \
  ensemble_bootstrap=false ensemble_backbones=separate
"$PYTHON" "$HERE/benchmarks/best_of_n_rankers.py" "$RUN" --ranker single="$OUT/single" --ranker wco="$OUT/sep:wco" \
  --ranker mean="$OUT/sep:mean" --ranker uwo="$OUT/sep:uwo" --ranker clean="$RUN/reward" --output "$OUT/rankers.json"
PRECISION=$(grep '^precision: ' "$RUN/reward/config.yaml" | cut -d' ' -f2)
"$PYTHON" "$HERE/benchmarks/reward_accuracy_on_labels.py" "$RUN/label/labels.jsonl" --seed "$SEED" \
  --eval-fraction "$(grep '^eval_fraction: ' "$RUN/reward/config.yaml" | cut -d' ' -f2)" \
  --eval-min-pairs "$(grep '^eval_min_pairs: ' "$RUN/reward/config.yaml" | cut -d' ' -f2)" --precision "$PRECISION" \
  --model single="$OUT/single" --model wco="$OUT/sep:wco" --model mean="$OUT/sep:mean" --model clean="$RUN/reward" \
  --output "$OUT/accuracy.json"
