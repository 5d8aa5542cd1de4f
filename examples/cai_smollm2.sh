#!/usr/bin/env bash
# Constitutional AI on SmolLM2-135M, measured (issue 23): SL-CAI's effect on a harm score and on helpfulness, and
# how order-consistent an RL-CAI judge is. About 15 minutes on 2 CPU cores (bf16).
#
#   bash examples/cai_smollm2.sh [OUT_DIR]
#
# 1. `rlhfkit cai` (examples/cai_smollm2.yaml): SmolLM2 answers the 32 shipped CAI prompts (16 red-team style),
#    critiques and revises each answer twice under the shipped constitution -> OUT/cai/sft.jsonl.
# 2. Two SFT runs from SmolLM2, one epoch each, same settings: the demo's 282 SFT examples alone (OUT/sft_demo),
#    and the same plus the 32 revisions (OUT/sft_cai). Mixing keeps the helpful data in, as the paper's SL-CAI
#    fine-tunes on revisions together with helpfulness samples; fine-tuning on the revisions alone (3 epochs)
#    gave a model that answered everything with "I'm here to help" loops.
# 3. `rlhfkit eval` of sft_cai against sft_demo: (a) harm on the 8 held-out red-team prompts
#    (assets/cai/prompts_heldout.jsonl, never trained on), 16 samples each, gold = the `caution` keyword scorer
#    (1 when a response refuses, names the harm or redirects; harm score = 1 - caution); (b) helpfulness on 96 of
#    the demo's held-out prompts, 2 samples each, gold = the demo rubric (polite, positive, concise: a proxy of
#    helpfulness, not a judge of it).
# 4. RL-CAI: 4 samples per CAI prompt from sft_cai, every pair judged by SmolLM2 itself on a drawn principle in
#    both orders (`rlhfkit cai-label`); its log gives the share of pairs where both orders prefer the same response.
set -euo pipefail
OUT=${1:-runs/cai_smollm2}
R=${RLHFKIT:-rlhfkit}
ASSETS=$(python -c 'import rlhfkit, pathlib; print(pathlib.Path(rlhfkit.__file__).parent / "assets")')
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
$R cai "$HERE/cai_smollm2.yaml" output_dir="$OUT/cai"
cat "$ASSETS/demo/sft.jsonl" "$OUT/cai/sft.jsonl" > "$OUT/sft_cai_data.jsonl"
SFT="$HERE/sft_smollm2.yaml num_epochs=1 eval_fraction=0 eval_every=0 save_every=0 seed=0"
$R sft $SFT data="$ASSETS/demo/sft.jsonl" output_dir="$OUT/sft_demo"
$R sft $SFT data="$OUT/sft_cai_data.jsonl" output_dir="$OUT/sft_cai"
python - "$ASSETS/cai/prompts_heldout.jsonl" "$OUT/redteam_heldout.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
with open(sys.argv[2], "w") as f:
    f.writelines(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows if r["kind"] == "red-team")
PY
EVAL="policy=$OUT/sft_cai baseline=$OUT/sft_demo best_of_n=0 max_new_tokens=96"
$R eval $EVAL prompts="$OUT/redteam_heldout.jsonl" gold=caution samples_per_prompt=16 output="$OUT/eval_harm/eval.json"
$R eval $EVAL gold=demo samples_per_prompt=2 max_prompts=96 output="$OUT/eval_help/eval.json"
$R sample model="$OUT/sft_cai" prompts="$ASSETS/cai/prompts_train.jsonl" "temperatures=[0.7,0.7,1.0,1.0]" \
  max_new_tokens=96 output="$OUT/rlcai/samples.jsonl"
$R cai-label samples="$OUT/rlcai/samples.jsonl" judge_model=smollm2-135m output="$OUT/rlcai/labels.jsonl"
