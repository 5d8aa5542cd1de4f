#!/usr/bin/env bash
# GPU check: SFT, reward model, DPO and GRPO (and GRPO with rollout_engine=vllm when vLLM imports) on one GPU,
# asserting finite losses and printing tokens/s and MFU per stage. See benchmarks/gpu_check.py and
# benchmarks/README.md, "GPU check". Runs rlhfkit from this tree (PYTHONPATH=src, no install).
#
#   bash benchmarks/gpu_check.sh --out gpu_check.json     # on a GPU machine
#   bash benchmarks/gpu_check.sh --device cpu --tiny      # the CPU dry run
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
