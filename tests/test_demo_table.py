"""tools/demo_table.py: README's demo table rows and the acceptance checks, on run directories written here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("demo_table", Path(__file__).parents[1] / "tools" / "demo_table.py")
demo_table = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(demo_table)


def player(kind: str, win: float, ci: tuple[float, float], kl: float, p: float, **extra) -> dict:
    return {"kind": kind, "win_rate": win, "win_rate_ci": list(ci), "kl": kl, "p_value": p, **extra}


def write_run(root: Path, *, ppo_low=0.543, rm_low=0.656, pairs=384, points=5, seconds=(145, 258, 0, 205, 411, 321, 511, 3)):
    root.mkdir(parents=True)
    (root / "pipeline.json").write_text(json.dumps({"seed": 1, "algorithm": "dpo", "compare": ["ppo"]}))
    players = {
        "sft": player("baseline", 0.5, (0.5, 0.5), 0.0, 1.0),
        "dpo": player("policy", 0.597, (0.556, 0.636), 0.71, 0.0001),
        "ppo": player("policy", 0.584, (ppo_low, 0.623), 1.79, 0.0001),
        "best_of_1": player("best_of_n", 0.49, (0.41, 0.56), 0.0, 0.8, n=1),
        "best_of_16": player("best_of_n", 0.852, (0.802, 0.896), 1.83, 0.0001, n=16),
    }
    rm = {"accuracy": 0.714, "accuracy_ci": [rm_low, 0.771], "num_pairs": pairs}
    (root / "eval.json").write_text(json.dumps({"players": players, "reward_model": rm}))
    for stage, s in zip(("sft", "sample", "label", "reward", "dpo", "ppo", "eval", "report"), seconds, strict=True):
        (root / stage).mkdir()
        (root / stage / ".stage.json").write_text(json.dumps({"hash": "x", "seconds": s}))
    for stage in ("ppo", "dpo"):
        (root / stage / "frontier.jsonl").write_text("".join(json.dumps({"step": k}) + "\n" for k in range(points)))
    return root


def test_a_run_gives_readmes_row_its_stage_seconds_and_its_checks(tmp_path):
    row, stages, checks = demo_table.summarise(write_run(tmp_path / "run"))
    assert row == (
        "| 1 | 0.714 [0.656, 0.771] on 384 pairs | 0.584 [0.543, 0.623], KL 1.79, p = 0.0001 "
        "| 0.597 [0.556, 0.636], KL 0.71, p = 0.0001 | 0.852 [0.802, 0.896] | 1,854 s |"
    )
    assert stages == "sft 145 / sample 258 / label 0 / reward 205 / dpo 411 / ppo 321 / eval 511 / report 3"
    verdicts = {what.split(":")[0]: ok for what, ok in checks}
    assert verdicts == {"reward model": True, "ppo": True, "dpo": True, "stages": False}  # 1,854 s is over 1,200
    assert [ok for what, ok in checks if "frontier" in what] == [True, True]


@pytest.mark.parametrize(
    ("change", "failing"),
    [
        ({"ppo_low": 0.497}, ["ppo: win rate lower end 0.497 > 0.5"]),
        ({"rm_low": 0.59}, ["reward model: lower end 0.590 > 0.6 on 384 >= 200 pairs"]),
        ({"pairs": 150}, ["reward model: lower end 0.656 > 0.6 on 150 >= 200 pairs"]),
        ({"points": 3}, ["dpo: 3 frontier points >= 4", "ppo: 3 frontier points >= 4"]),
    ],
)
def test_each_acceptance_point_can_fail(tmp_path, change, failing):
    fast = (60, 100, 0, 100, 200, 200, 300, 3)  # 963 s: within the budget, so only `change` fails
    _, _, checks = demo_table.summarise(write_run(tmp_path / "run", seconds=fast, **change))
    assert sorted(what for what, ok in checks if not ok) == failing


def test_the_command_exits_1_on_a_failed_check_and_2_on_a_missing_file(tmp_path, capsys):
    fast = (60, 100, 0, 100, 200, 200, 300, 3)
    good = write_run(tmp_path / "good", seconds=fast)
    assert demo_table.main([str(good)]) == 0
    assert demo_table.main([str(good), str(write_run(tmp_path / "slow"))]) == 1
    out = capsys.readouterr().out
    assert "FAIL: stages: 1854 s <= 1200 s" in out and out.count("| 1 |") == 3
    (good / "eval.json").unlink()
    assert demo_table.main([str(good)]) == 2
    assert "eval.json: missing" in capsys.readouterr().err
