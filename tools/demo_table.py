#!/usr/bin/env python3
"""Summarise finished demo runs as README's table rows, and check them against the demo's acceptance bar.

    .venv/bin/python tools/demo_table.py runs/demo_s0 runs/demo_s1 runs/demo_s2

For each run directory (a pipeline's ``output_dir``) it reads ``pipeline.json`` (seed, algorithms),
``eval.json`` (the players, the reward model's held-out accuracy) and each stage's marker (``STAGE/.stage.json``,
its seconds), and the frontier probes (``STAGE/frontier.jsonl``) of the policy stages. It prints one Markdown
row per run, the stage seconds, and a line per check:

* PPO and DPO each beat the SFT model: the lower end of ``win_rate_ci`` above 0.5;
* the reward model's held-out accuracy interval above 0.6, on at least 200 pairs;
* each policy stage probed its frontier at 4 or more points;
* the stages' seconds add up to 20 minutes or less (``make``'s set-up and each stage's process start-up are not
  in the markers: time ``make demo`` itself for the wall clock).

It reads a run as the report does (:func:`rlhfkit.report.load_run`), so it needs rlhfkit installed. Exit status 1
when a check fails, 2 when a run directory lacks a file it needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlhfkit.report import EVAL_FILE, PIPELINE_FILE, REPORT_STAGE, STAGE_MARKER, RunData, load_run

BUDGET_S = 20 * 60
POLICIES = ("ppo", "dpo")


class RunError(Exception):
    """A run directory without a file the summary needs, or with one that is not JSON."""


def _ci(entry: dict, key: str) -> str:
    low, high = entry[f"{key}_ci"]
    return f"{entry[key]:.3f} [{low:.3f}, {high:.3f}]"


def read_run(run: Path) -> RunData:
    """The run as the report reads it (:func:`rlhfkit.report.load_run`), with the report stage's own marker, which
    the report cannot see; a RunError when the config, the eval or a stage marker is missing or unreadable."""
    data = load_run(run)
    for name, value in ((PIPELINE_FILE, data.pipeline), (EVAL_FILE, data.evaluation)):
        if value is None:
            raise RunError(f"{run / name}: missing or unreadable (is this a finished demo run directory?)")
    for marker in sorted(run.glob(f"*/{STAGE_MARKER}")):
        stage = marker.parent.name
        if stage == REPORT_STAGE:
            try:
                data.timings[stage] = json.loads(marker.read_text())
            except json.JSONDecodeError as e:
                raise RunError(f"{marker}: line {e.lineno}: not JSON ({e.msg})") from None
        elif stage not in data.timings:
            raise RunError(f"{marker}: unreadable")
    return data


def summarise(run: Path) -> tuple[str, str, list[tuple[str, bool]]]:
    """``run``'s table row, its stage seconds (one line) and its checks ``[(what, passed)]``."""
    data = read_run(run)
    config, results = data.pipeline or {}, data.evaluation or {}
    players = results.get("players", {})
    seconds = {stage: float(marker["seconds"]) for stage, marker in data.timings.items()}
    frontier = {policy.name: len(policy.frontier or []) for policy in data.policies}
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
        points = frontier.get(name, 0)
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
