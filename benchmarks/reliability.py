"""Reliability suite: does rlhfkit lose or corrupt anything when things go wrong?

    .venv/bin/python benchmarks/reliability.py            # full: a few minutes on 2 cores
    .venv/bin/python benchmarks/reliability.py --quick    # smoke: fewer points of each kind
    .venv/bin/python benchmarks/reliability.py --only kill,fuzz

Not part of ``make test``: it runs stages as subprocesses and kills them, so it is slow and
timing-dependent by design. Four parts, each in its own module (runnable alone):

* ``kill`` (:mod:`reliability_kill`): ``kill -9`` at random points of ``sft``, ``reward``, ``dpo``,
  ``ppo``, ``sample`` and ``label`` on the tiny model, including during checkpoint writes and JSONL
  appends, then a resume: the final weights and outputs must equal an uninterrupted run's. Also a
  full disk (ENOSPC injected into the writes) while saving a checkpoint, the final model and labels:
  a clear error, and the last good state intact.
* ``fuzz`` (:mod:`reliability_fuzz`): at least 1,000 generated bad files (SFT, preference and prompt
  formats, YAML configs): each ends in a clear error naming the file (valid-but-odd inputs, such as
  U+2028 inside a string, must load), with no traceback through the CLI and nothing already written
  changed.
* ``server`` (:mod:`reliability_server`): the annotation server under 50 concurrent annotators and
  5,000 labels, SIGKILLed several times mid-load and restarted: 0 labels lost, 0 duplicated.

Prints one row per check and exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

PARTS = {"kill": "reliability_kill", "fuzz": "reliability_fuzz", "server": "reliability_server"}


def format_table(rows: list[dict]) -> str:
    """The rows as a markdown table (check, cases, passed, failed, seconds)."""
    lines = ["| check | cases | passed | failed | seconds |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        failed = row["cases"] - row["passed"]
        lines.append(f"| {row['check']} | {row['cases']} | {row['passed']} | {failed} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer points of each kind (a smoke run)")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run (default: {','.join(PARTS)})")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in parts if s not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {sorted(PARTS)}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rows: list[dict] = []
    start = time.perf_counter()
    for part in parts:
        module = importlib.import_module(PARTS[part])
        part_rows = module.run(quick=args.quick)
        rows.extend(part_rows)
        for row in part_rows:
            for failure in row["failures"]:
                print(f"FAIL {row['check']}: {failure}", flush=True)
    print()
    print(format_table(rows))
    total, passed = sum(r["cases"] for r in rows), sum(r["passed"] for r in rows)
    print(
        f"\n{passed}/{total} cases passed, {total - passed} failed, {time.perf_counter() - start:.0f} s"
        f"{' (quick)' if args.quick else ''}"
    )
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
