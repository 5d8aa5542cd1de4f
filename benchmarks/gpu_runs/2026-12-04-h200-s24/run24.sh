#!/usr/bin/env bash
# Session 24 GPU run: flex attention tests, packed attention benchmark, GPU check, then more test files.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks/gpu_runs/2026-12-04-h200:$PWD RLHFKIT_CACHE=$PWD/.gpucache HF_HUB_OFFLINE=1
git log --oneline -1 2>/dev/null || true
T0=$(date +%s)
echo "=== packing tests"; timeout 150 python3 -m pytest -q -p gpuplug tests/test_packing.py 2>&1 | tail -15 | tee $OUT/tests_packing.log
echo "=== t=$(( $(date +%s) - T0 )) s: packed attention benchmark"; timeout 170 python3 benchmarks/packed_attention.py 2>&1 | grep -v -i warn | tee $OUT/packed_attention.log
echo "=== t=$(( $(date +%s) - T0 )) s: gpu check"; timeout 170 bash benchmarks/gpu_check.sh --out $OUT/gpu_check.json > $OUT/gpu_check.log 2>&1; tail -9 $OUT/gpu_check.log
LEFT=$(( 520 - ($(date +%s) - T0) ))
echo "=== t=$(( $(date +%s) - T0 )) s: unit tests for ${LEFT} s"
[ $LEFT -gt 30 ] && timeout $LEFT python3 -m pytest -q -p gpuplug tests/test_sampling.py tests/test_reward.py tests/test_dpo.py tests/test_sft_train.py tests/test_rl_train.py 2>&1 | tail -25 | tee $OUT/tests_units.log
echo "=== done t=$(( $(date +%s) - T0 )) s"
