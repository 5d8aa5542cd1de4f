#!/usr/bin/env bash
# Set-up time of `make install` on a fresh clone: pip compiling every installed .py file to bytecode (pip's default,
# the Makefile before 2026-12-07) against `--no-compile` (the Makefile now), each followed by 3 processes that import
# what the demo's stages import, run through make (its environment: bytecode is written on first import).
#
#   bash benchmarks/setup_time.sh [REPEATS]        # default 2; alternates the two ways, prints every time
#
# Each install downloads nothing that pip's cache or the machine's wheel directory does not hold already, the same for
# both ways; run it with nothing else on the CPU. It deletes its clones (in $TMPDIR) when done.
set -euo pipefail
repeats=${1:-2}
repo=$(cd "$(dirname "$0")/.." && pwd)
imports='import rlhfkit.pipeline, rlhfkit.sft, rlhfkit.rl, rlhfkit.dpo, rlhfkit.evaluate, rlhfkit.report, rlhfkit.reward'
imports="$imports; import transformers.models.llama.modeling_llama, accelerate, peft, matplotlib.pyplot, torch.utils.tensorboard"
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
echo "repeat way install_s import1_s import2_s import3_s"
for rep in $(seq "$repeats"); do
  for way in compile no-compile; do
    d=$(mktemp -d "${TMPDIR:-/tmp}/setup_time.XXXX")
    git clone -q "$repo" "$d"
    extra=()
    # pip's default: compile everything it installs (the old Makefile's commands).
    [ "$way" = compile ] && extra=("PIP_INSTALL=$d/.venv/bin/python -m pip install -q")
    t=$(now)
    # (pip's warnings about this machine's pip.conf locations filtered out; its errors kept)
    make -s -C "$d" install "${extra[@]}" 2>&1 >/dev/null | { grep -v '^WARNING: Location' || true; } >&2
    line="$rep $way $(since "$t")"
    for k in 1 2 3; do
      t=$(now)
      make -s -C "$d" -f - run <<MAKE >/dev/null
include Makefile
run:
	\$(PY) -c "$imports"
MAKE
      line="$line $(since "$t")"
    done
    echo "$line"
    rm -rf "$d"
  done
done
