#!/usr/bin/env python3
"""Summarise finished demo runs as README's table rows, and check them against the demo's acceptance bar.

    python3 tools/demo_table.py runs/demo_s0 runs/demo_s1 runs/demo_s2

For each run directory (a pipeline's ``output_dir``) it reads ``pipeline.json`` (seed, algorithms),
``eval.json`` (the players, the reward model's held-out accuracy) and each stage's marker (``STAGE/.stage.json``,
its seconds), and the frontier probes (``STAGE/frontier.jsonl``) of the policy stages. It prints one Markdown
row per run, the stage seconds, and a line per check:

* PPO and DPO each beat the SFT model: the lower end of ``win_rate_ci`` above 0.5;
* the reward model's held-out accuracy interval above 0.6, on at least 200 pairs;
* each policy stage probed its frontier at 4 or more points;
* the stages' seconds add up to 20 minutes or less (``make``'s set-up and each stage's process start-up are not
  in the markers: time ``make demo`` itself for the wall clock).

Exit status 1 when a check fails, 2 when a run directory lacks a file it needs. Reads only the standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BUDGET_S = 20 * 60
POLICIES = ("ppo", "dpo")
STAGE_ORDER = ("cai", "sft", "sample", "label", "reward", "gate", "dpo", "ppo", "grpo", "rloo", "eval", "report")


class RunError(Exception):
    """A run directory without a file the summary needs, or with one that is not JSON."""


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing (is this a finished demo run directory?)") from None
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: line {e.lineno}: not JSON ({e.msg})") from None


def _ci(entry: dict, key: str) -> str:
    low, high = entry[f"{key}_ci"]
    return f"{entry[key]:.3f} [{low:.3f}, {high:.3f}]"


def stage_seconds(run: Path) -> dict[str, float]:
    """``{stage: seconds}`` from the markers of the stages that finished, in pipeline order."""
    found = {m.parent.name: float(_load(m)["seconds"]) for m in run.glob("*/.stage.json")}
    return {s: found.pop(s) for s in STAGE_ORDER if s in found} | found


def frontier_points(run: Path, stage: str) -> int:
    path = run / stage / "frontier.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def summarise(run: Path) -> tuple[str, str, list[tuple[str, bool]]]:
    """``run``'s table row, its stage seconds (one line) and its checks ``[(what, passed)]``."""
    config = _load(run / "pipeline.json")
    results = _load(run / "eval.json")
    players = results.get("players", {})
    seconds = stage_seconds(run)
    total = sum(seconds.values())
    checks: list[tuple[str, bool]] = []
    cells = [str(config.get("seed", "?"))]

    rm = results.get("reward_model")
    if rm:
        cells.append(f"{rm['accuracy']:.3f} [{rm['accuracy_ci'][0]:.3f}, {rm['accuracy_ci'][1]:.3f}] on {rm['num_pairs']} pairs")
        ok = rm["accuracy_ci"][0] > 0.6 and rm["num_pairs"] >= 200
        checks.append((f"reward model: lower end {rm['accuracy_ci'][0]:.3f} > 0.6 on {rm['num_pairs']} >= 200 pairs", ok))
    else:
        cells.append("-")
        checks.append(("reward model: no held-out accuracy in eval.json", False))
    for name in POLICIES:
        entry = players.get(name)
        if entry is None:
            cells.append("-")
            checks.append((f"{name}: not evaluated", False))
            continue
        cells.append(f"{_ci(entry, 'win_rate')}, KL {entry['kl']:.2f}, p = {entry['p_value']:.2g}")
        checks.append((f"{name}: win rate lower end {entry['win_rate_ci'][0]:.3f} > 0.5", entry["win_rate_ci"][0] > 0.5))
        points = frontier_points(run, name)
        checks.append((f"{name}: {points} frontier points >= 4", points >= 4))
    best = max((p for p in players.values() if p.get("kind") == "best_of_n"), key=lambda p: p["n"], default=None)
    cells.append(_ci(best, "win_rate") if best else "-")
    cells.append(f"{total:,.0f} s")
    checks.append((f"stages: {total:.0f} s <= {BUDGET_S} s (without set-up and start-up)", total <= BUDGET_S))
    row = "| " + " | ".join(cells) + " |"
    return row, " / ".join(f"{s} {v:.0f}" for s, v in seconds.items()), checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="demo output directories")
    args = parser.parse_args(argv)
    print("| seed | reward model, held-out | PPO win rate vs SFT | DPO win rate vs SFT | best-of-n (largest n) | stages |")
    print("|---|---|---|---|---|---|")
    failed = False
    notes = []
    for run in args.runs:
        try:
            row, stages, checks = summarise(run)
        except RunError as e:
            print(f"demo_table: {e}", file=sys.stderr)
            return 2
        print(row)
        notes.append(f"{run}: stage seconds {stages}")
        notes += [f"  {'pass' if ok else 'FAIL'}: {what}" for what, ok in checks]
        failed = failed or not all(ok for _, ok in checks)
    print("\n".join(["", *notes]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
