"""The HTML run report: headline with intervals, the reward-KL frontier and its Gao et al. fits, the
per-stage over-optimisation verdicts, partial and older-layout runs, escaping, and a headless-Chromium
check that the page renders with no errors and every plot decodes."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest

from rlhfkit import stats
from rlhfkit.report import ReportConfig, fit_curve, read_frontier, run
from rlhfkit.run_layout import current_metric_names
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, require_chromium, write_jsonl

SCRIPT_PAYLOAD = "<script>alert(1)</script>"
IMG_PAYLOAD = "<img src=x onerror=alert(1)>"
STAGE_SECONDS = {
    "sft": 100.0,
    "sample": 20.0,
    "label": 10.0,
    "reward": 50.0,
    "gate": 1.0,
    "dpo": 1799.0,
    "ppo": 1800.0,
    "eval": 120.0,
}  # 3900 s = 1h 05m
GATE_MESSAGE = "held-out accuracy 0.71 is below 0.75 & the gate was overridden by --force"

# Best-of-n gold = baseline + d (BON_ALPHA - BON_BETA d), d = sqrt(analytic KL): the fit must recover them.
BASE_GOLD, BON_ALPHA, BON_BETA = 0.10, 0.35, 0.06
# Probe paths follow the RL form gold = gold_0 + d (alpha - beta log d), d = sqrt(KL).
PPO_GOLD0, PPO_ALPHA, PPO_BETA = 0.12, 0.50, 0.40  # peak at d* = e^0.25 = 1.28 (KL 1.65): rises, then falls
DPO_GOLD0, DPO_ALPHA, DPO_BETA = 0.12, 0.30, 0.05  # peak at d* = e^5 = 148: rises throughout


def _current(entries: list[dict]) -> list[dict]:
    """The fixtures below are written with the names of runs from before the metric names were namespaced (the
    older-layout tests read them so); a current run writes today's names."""
    return [current_metric_names(e) for e in entries]


def _sft_metrics() -> list[dict]:
    entries = [{"step": s, "time": 1000.0 + s, "loss": 3.0 / s, "lr": 1e-4} for s in range(1, 21)]
    entries += [{"step": s, "time": 1000.5 + s, "eval_loss": 3.2 / s} for s in (5, 10, 15, 20)]
    return sorted(entries, key=lambda e: e["step"])


def _reward_metrics() -> list[dict]:
    entries = [
        {"step": s, "time": 2000.0 + s, "loss": 0.7 - 0.01 * s, "accuracy": 0.5 + 0.01 * s, "margin": 0.1 * s}
        for s in range(1, 21)
    ]
    entries += [{"step": s, "time": 2000.5 + s, "eval_loss": 0.69 - 0.01 * s, "eval_accuracy": 0.5 + 0.012 * s} for s in (10, 20)]
    return entries


def _online_rl_metrics() -> list[dict]:
    entries = []
    for s in range(1, 41):
        entries.append(
            {
                "step": s,
                "time": 3000.0 + s,
                "score": 0.1 * s,
                "gold_score": 0.05 * min(s, 40 - s),
                "kl": 0.08 * s,
                "kl_k3": 0.07 * s,
                "reward": 0.09 * s,
                "entropy": 2.0 - 0.02 * s,
                "policy_loss": -0.01 * s,
                "value_loss": 1.0 / s,
                "clipfrac": 0.1,
                "approx_kl": 0.01,
                "response_length": 30.0,
            }
        )
    entries[3]["entropy"] = "nan"  # how MetricsLogger writes a non-finite value
    return entries


def _dpo_metrics() -> list[dict]:
    entries = [
        {
            "step": s,
            "time": 3000.0 + s,
            "loss": 0.69 - 0.01 * s,
            "accuracy": 0.5 + 0.02 * s,
            "margin": 0.05 * s,
            "rewards_chosen": 0.03 * s,
            "rewards_rejected": -0.02 * s,
        }
        for s in range(1, 21)
    ]
    entries += [
        {
            "step": s,
            "time": 3000.5 + s,
            "eval_loss": 0.68 - 0.01 * s,
            "eval_accuracy": 0.55,
            "eval_margin": 0.04 * s,
            "eval_rewards_chosen": 0.02 * s,
            "eval_rewards_rejected": -0.01 * s,
        }
        for s in (10, 20)
    ]
    return entries


def _rl_form(gold0: float, alpha: float, beta: float, kl: float) -> float:
    d = math.sqrt(kl)
    return gold0 + (d * (alpha - beta * math.log(d)) if d > 0 else 0.0)


def _frontier(gold0: float, alpha: float, beta: float, kl_per_step: float, *, proxy: bool = True) -> list[dict]:
    """Probe points every 10 steps, 0..100; gold exactly on the RL form; proxy rising with d (or null)."""
    points = []
    for i in range(11):
        kl = kl_per_step * i
        points.append(
            {
                "step": 10 * i,
                "kl": kl,
                "kl_se": 0.05 * i,
                "gold": _rl_form(gold0, alpha, beta, kl),
                "gold_se": 0.01,
                "proxy": 0.1 + 0.3 * math.sqrt(kl) if proxy else None,
                "proxy_se": 0.02 if proxy else None,
                "num_prompts": 32,
                "response_length": 40.0 + i,
            }
        )
    return points


def _write_frontier(path: Path, points: list[dict]) -> None:
    # A repeated step: the first line is superseded by the last (a resumed run re-probes a step).
    stale = {**points[3], "gold": 5.0, "proxy": -5.0}
    lines = [json.dumps(p) for p in points[:3]] + [json.dumps(stale)] + [json.dumps(p) for p in points[3:]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _estimate(value: float, half: float) -> tuple[float, list[float]]:
    return value, [round(value - half, 6), round(value + half, 6)]


def _player(kind: str, gold: float, *, win: float, kl: float, proxy: float | None, half: float, **extra) -> dict:
    entry = {"kind": kind, "response_length": 35.0, "eos_rate": 0.9}
    entry["gold_score"], entry["gold_score_ci"] = _estimate(gold, half)
    entry["gold_diff"], entry["gold_diff_ci"] = _estimate(round(gold - BASE_GOLD, 6), half + 0.001)
    entry["win_rate"], entry["win_rate_ci"] = _estimate(win, 0.06)
    entry["kl"], entry["kl_ci"] = _estimate(kl, 0.1 * kl)
    entry["p_value"] = 0.0004 if win > 0.55 else 0.31
    if proxy is not None:
        entry["proxy_score"], entry["proxy_score_ci"] = _estimate(proxy, 0.021)
    lo, hi = entry["win_rate_ci"]
    word = "better than" if lo > 0.5 else "worse than" if hi < 0.5 else "not distinguishable from"
    entry["verdict"] = f"{word} sft: {win:.2f} [{lo:.2f}, {hi:.2f}]"
    return {**entry, **extra}


def _players() -> dict:
    players = {
        # Listed out of order on purpose: the report orders them.
        "ppo": _player("policy", 0.452, win=0.71, kl=4.8, proxy=0.913, half=0.031),
        "best_of_16": None,
        "sft": None,
        "dpo": _player("policy", 0.381, win=0.66, kl=3.21, proxy=None, half=0.027),
    }
    base = {"kind": "baseline", "response_length": 40.2, "eos_rate": 0.7}
    base["gold_score"], base["gold_score_ci"] = _estimate(BASE_GOLD, 0.023)
    base["proxy_score"], base["proxy_score_ci"] = _estimate(0.205, 0.019)
    players["sft"] = base
    for n in (16, 1, 8, 2, 4):
        d = math.sqrt(stats.analytic_bon_kl(n))
        gold = BASE_GOLD + d * (BON_ALPHA - BON_BETA * d)
        entry = _player(
            "best_of_n", gold, win=0.5 + 0.01 * n, kl=stats.analytic_bon_kl(n), proxy=0.2 + 0.01 * n, half=0.02 + 0.001 * n, n=n
        )
        entry["gold_score"] = gold  # exact, unrounded: the fit is checked to 4 decimals
        players[f"best_of_{n}"] = entry
    return players


def _eval_json() -> dict:
    players = _players()
    main = players["dpo"]
    return {
        "policy": "runs/x/dpo",
        "baseline": "runs/x/sft",
        "gold": "demo",
        "num_prompts": 240,
        "samples_per_prompt": 2,
        "kl_samples_per_prompt": 1,
        "temperature": 0.7,
        "main_player": "dpo",
        "baseline_name": "sft",
        "win_rate": main["win_rate"],
        "win_rate_ci": main["win_rate_ci"],
        "p_value": main["p_value"],
        "gold_score_policy": main["gold_score"],
        "gold_score_policy_ci": main["gold_score_ci"],
        "gold_score_baseline": BASE_GOLD,
        "gold_score_baseline_ci": players["sft"]["gold_score_ci"],
        "kl": main["kl"],
        "kl_ci": main["kl_ci"],
        "kl_std": 1.05,
        "verdict": main["verdict"],
        "players": players,
        "reward_model": {"accuracy": 0.69, "accuracy_ci": [0.6, 0.8], "num_pairs": 10, "num_prompts": 5},
        "best_of_n": {
            "n": 16,
            "gold_score": players["best_of_16"]["gold_score"],
            "kl_analytic": 1.83,
            "win_rate_vs_baseline": 0.66,
        },
        "elo": [
            {"player": "dpo", "rating": 1087.4, "ci_low": 1050.1, "ci_high": 1120.9, "games": 6},
            {"player": "best_of_4", "rating": 1010.2, "ci_low": 980.0, "ci_high": 1040.3, "games": 6},
            {"player": "sft", "rating": 902.4, "ci_low": 870.2, "ci_high": 931.6, "games": 6},
        ],
        "samples": [
            {
                "prompt": "Say hi & be nice",
                "baseline": f"hello {SCRIPT_PAYLOAD}",
                "policy": "Hello, friend!",
                "gold_baseline": 0.2,
                "gold_policy": 0.9,
            },
            {
                "prompt": f"Prompt with {IMG_PAYLOAD}",
                "baseline": "plain",
                "policy": f"tricky {IMG_PAYLOAD}",
                "gold_baseline": 0.5,
                "gold_policy": 0.4,
            },
            {"prompt": "Multi\nline", "baseline": "a\nb", "policy": "c\nd", "gold_baseline": 0.1, "gold_policy": 0.1},
        ],
    }


def make_run(root: Path, *, gate: str = "overridden", dpo_proxy: bool = True, compare: tuple = ("ppo",)) -> Path:
    """A complete fake run directory in the layout with one directory per policy stage (no model involved)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipeline.json").write_text(
        json.dumps(
            {
                "output_dir": str(root),
                "model": "tiny-test-model",
                "algorithm": "dpo",
                "compare": list(compare),
                "gold": "demo",
                "seed": 0,
            }
        )
    )
    for stage in ("sft", "reward", "gate", "dpo", "ppo", "eval"):
        (root / stage).mkdir(exist_ok=True)
    write_jsonl(root / "sft" / "metrics.jsonl", _sft_metrics())
    write_jsonl(root / "reward" / "metrics.jsonl", _current(_reward_metrics()))
    (root / "reward" / "heldout.json").write_text(
        json.dumps({"accuracy": 0.71, "accuracy_ci": [0.66, 0.76], "num_pairs": 480, "num_prompts": 80, "ties": 3})
    )
    (root / "gate" / "gate.json").write_text(
        json.dumps({"verdict": gate, "accuracy": 0.71, "accuracy_ci": [0.66, 0.76], "num_pairs": 480, "message": GATE_MESSAGE})
    )
    write_jsonl(root / "dpo" / "metrics.jsonl", _current(_dpo_metrics()))
    _write_frontier(root / "dpo" / "frontier.jsonl", _frontier(DPO_GOLD0, DPO_ALPHA, DPO_BETA, 0.5, proxy=dpo_proxy))
    write_jsonl(root / "ppo" / "metrics.jsonl", _current(_online_rl_metrics()))
    _write_frontier(root / "ppo" / "frontier.jsonl", _frontier(PPO_GOLD0, PPO_ALPHA, PPO_BETA, 0.6))
    (root / "eval" / "eval.json").write_text(json.dumps(_eval_json()))
    (root / "eval.json").write_text(json.dumps(_eval_json()))
    for stage, seconds in STAGE_SECONDS.items():
        (root / stage).mkdir(exist_ok=True)
        (root / stage / ".stage.json").write_text(
            json.dumps({"hash": "h", "seconds": seconds, "finished": "2025-01-01T00:00:00"})
        )
    return root


def _report(run_dir: Path) -> str:
    return run(ReportConfig(run_dir=str(run_dir))).read_text(encoding="utf-8")


def _png_uris(page: str) -> list[str]:
    return re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)


def _element(page: str, element_id: str) -> tuple[str, str, str]:
    """(tag, class, inner text without tags) of the element with ``id`` (no nesting of the same tag)."""
    match = re.search(rf'<(\w+) class="([^"]*)" id="{re.escape(element_id)}">(.*?)</\1>', page, re.S)
    assert match, f"no element with id {element_id!r}"
    return match.group(1), match.group(2), re.sub(r"<[^>]+>", "", match.group(3))


def _row(page: str, row_id: str) -> list[str]:
    """Cells (tags stripped) of the table row with ``id``."""
    match = re.search(rf'<tr id="{re.escape(row_id)}">(.*?)</tr>', page, re.S)
    assert match, f"no row with id {row_id!r}"
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", match.group(1), re.S)]


def _est(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


# ---------------------------------------------------------------- pure pieces, by hand


def test_read_frontier_sorts_by_step_and_the_last_line_of_a_step_wins(tmp_path):
    path = tmp_path / "frontier.jsonl"
    path.write_text(
        '{"step": 20, "kl": 2.0, "gold": 0.3, "proxy": null}\n'
        '{"step": 0, "kl": 0.0, "gold": 0.1, "gold_se": 0.02}\n'
        '{"step": 20, "kl": 2.5, "gold": 0.4, "gold_se": "nan"}\n'
        '{"step": 10, "kl": 1.0, "gold": 0.2}\n'
        '{"step": 30, "kl": 3.0, "go',
        encoding="utf-8",
    )  # killed mid-write
    points, bad = read_frontier(path)
    assert bad == 1
    assert [p["step"] for p in points] == [0, 10, 20]
    assert points[2]["kl"] == 2.5 and points[2]["gold"] == 0.4 and points[2]["gold_se"] is None
    assert points[0]["gold_se"] == 0.02 and points[0]["proxy"] is None


def test_fit_curve_recovers_the_forms_and_skips_with_a_reason():
    d = [0.0, 0.5, 1.0, 1.5, 2.0]
    bon = fit_curve("bon", "bon", [x**2 for x in d], [0.2 + x * (0.35 - 0.06 * x) for x in d], 0.2)
    assert bon.alpha == pytest.approx(0.35) and bon.beta == pytest.approx(0.06)
    assert bon.peak == pytest.approx(0.35 / 0.12) and bon.num_points == 4
    rl = fit_curve("ppo", "rl", [x**2 for x in d], [_rl_form(0.2, 0.5, 0.4, x**2) for x in d], 0.2)
    assert rl.alpha == pytest.approx(0.5) and rl.beta == pytest.approx(0.4)
    assert rl.peak == pytest.approx(math.exp(0.25))
    two = fit_curve("x", "rl", [0.0, 1.0, 4.0, 4.0], [0.0, 0.1, 0.2, 0.2], 0.0)  # distinct d > 0: 1 and 2
    assert two.alpha is None and "fewer than 3 points" in two.skipped
    assert fit_curve("x", "bon", [1.0, 2.0, 3.0], [0.1, 0.2, 0.3], None).skipped


# ---------------------------------------------------------------- the report


def test_full_report_headline_intervals_gate_and_escaping(tmp_path):
    run_dir = make_run(tmp_path / "run")
    out = run(ReportConfig(run_dir=str(run_dir)))
    assert out == run_dir / "report.html"
    page = out.read_text(encoding="utf-8")
    assert "missing-parts" not in page, re.search(r'id="missing-parts".*?</div>', page, re.S).group(0)

    assert "tiny-test-model" in page and "dpo (vs ppo)" in page
    assert "1h 05m 00s" in page  # sum of the stage seconds (3900 s)

    # Sections in order.
    order = [
        page.index(f'<h2 id="{s}">')
        for s in (
            "headline",
            "frontier",
            "overoptimisation",
            "policy-optimisation",
            "reward-model",
            "losses",
            "elo",
            "samples",
            "stages",
        )
    ]
    assert order == sorted(order)

    # The main player's verdict above the table.
    _, css, lead = _element(page, "main-verdict")
    assert css == "lead" and "dpo" in lead and "better than sft: 0.66 [0.60, 0.72]" in lead and "p = 4.0e-04" in lead

    # One row per player: baseline, main policy, other policies, best-of-n by n.
    rows = re.findall(r'<tr id="player-([\w]+)">', page)
    assert rows == ["sft", "dpo", "ppo", "best_of_1", "best_of_2", "best_of_4", "best_of_8", "best_of_16"]
    players = _eval_json()["players"]
    for name, p in players.items():
        cells = _row(page, f"player-{name}")
        assert _est(p["gold_score"], p["gold_score_ci"]) in cells[3], name
        if p["kind"] == "baseline":
            assert "reference" in cells[2] and "reference" in cells[6]
            assert _est(p["proxy_score"], p["proxy_score_ci"]) == cells[7]
            continue
        assert cells[2] == _est(p["win_rate"], p["win_rate_ci"]), name
        assert cells[4] == _est(p["gold_diff"], p["gold_diff_ci"]), name
        assert cells[5] == ("4.0e-04" if p["p_value"] < 0.001 else f"{p['p_value']:.3f}"), name
        if p["kind"] == "best_of_n":
            assert cells[6] == f"{p['kl']:.3f} (analytic)"
        else:
            assert cells[6] == _est(p["kl"], p["kl_ci"]), name
        assert cells[7] == (_est(p["proxy_score"], p["proxy_score_ci"]) if "proxy_score" in p else "–"), name
        assert cells[8] == p["verdict"]

    assert "samples per prompt: 2 · temperature: 0.7 · KL on the first 1 sample(s) of each prompt" in page
    # Reward model (from reward/heldout.json, not eval.json's copy) and the overridden gate as a warning.
    assert "0.710 [0.660, 0.760] on 480 pairs (80 prompts), 3 ties" in page
    tag, css, gate = _element(page, "gate-verdict")
    assert css == "warning" and "overridden" in gate
    assert GATE_MESSAGE.replace("&", "&amp;") in page

    uris = _png_uris(page)
    # frontier, 2 probe figures (dpo, ppo), dpo and ppo training panels, reward accuracy, losses
    assert len(uris) == 7
    assert all(base64.b64decode(u).startswith(b"\x89PNG\r\n\x1a\n") for u in uris)

    # Model text is escaped, never markup; the report itself has no script at all.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<script" not in page.lower()
    assert "<img src=x" not in page
    assert "Say hi &amp; be nice" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_frontier_fits_recover_the_known_coefficients(tmp_path):
    page = _report(make_run(tmp_path / "run"))
    bon = _row(page, "fit-best-of-n")
    assert bon[0] == "best-of-n" and "d (α − β d)" in bon[1]
    assert bon[3] == f"{BON_ALPHA:.4f}" and bon[4] == f"{BON_BETA:.4f}"  # 0.3500, 0.0600
    assert bon[2] == "4"  # n = 2, 4, 8, 16 (best-of-1 is at d = 0)
    ppo = _row(page, "fit-ppo")
    assert "d (α − β log d)" in ppo[1] and ppo[3] == f"{PPO_ALPHA:.4f}" and ppo[4] == f"{PPO_BETA:.4f}"
    assert ppo[2] == "10"
    assert f"d* = {math.exp(PPO_ALPHA / PPO_BETA - 1):.3f}" in ppo[5] and "extrapolation" not in ppo[5]  # 1.284
    dpo = _row(page, "fit-dpo")
    assert dpo[3] == f"{DPO_ALPHA:.4f}" and dpo[4] == f"{DPO_BETA:.4f}"
    assert "beyond the measured range" in dpo[5]  # d* = e^5, far past the path's d <= sqrt(5)
    assert "applied to its path for comparison" in page and "held-out subset" in page
    assert 'alt="reward-KL frontier: gold score vs KL and vs sqrt(KL)"' in page


def test_overoptimisation_verdict_per_policy_stage(tmp_path):
    page = _report(make_run(tmp_path / "run"))
    # PPO: gold rose to step 30 (KL 1.8 nearest the fitted peak KL 1.65) then fell while the proxy rose.
    tag, css, text = _element(page, "overoptimisation-ppo")
    assert css == "warning" and "over-optimised" in text
    ppo = _frontier(PPO_GOLD0, PPO_ALPHA, PPO_BETA, 0.6)
    verdict = stats.overoptimisation(ppo)
    assert verdict["verdict"] == "over-optimised" and verdict["peak_step"] == 30
    assert "peaked at step 30" in text and f"gold {verdict['peak_gold']:.3f}" in text
    assert f"final gold {ppo[-1]['gold']:.3f}" in text
    assert f"{verdict['drop']:.3f} vs threshold {verdict['drop_threshold']:.3f}" in text
    # The section's summary warning keeps its old id.
    _, css, summary = _element(page, "overoptimisation-warning")
    assert css == "warning" and "ppo" in summary and "dpo" not in summary
    # DPO: rising gold, not flagged.
    tag, css, text = _element(page, "overoptimisation-dpo")
    assert css == "ok" and "no over-optimisation detected" in text
    assert 'alt="ppo: proxy and gold over training"' in page and 'alt="dpo: proxy and gold over training"' in page


def test_overoptimisation_not_measured_without_proxy_or_frontier(tmp_path):
    run_dir = make_run(tmp_path / "run", gate="passed", dpo_proxy=False, compare=("ppo", "grpo"))
    # GRPO: directory and metrics, no frontier.jsonl.
    (run_dir / "grpo").mkdir()
    write_jsonl(run_dir / "grpo" / "metrics.jsonl", _current(_online_rl_metrics()))
    page = _report(run_dir)
    _, css, text = _element(page, "overoptimisation-dpo")
    assert css == "neutral" and "not measured" in text and "no proxy" in text and "DPO" in text
    _, css, text = _element(page, "overoptimisation-grpo")
    assert css == "neutral" and "not measured" in text and "no frontier.jsonl" in text
    _, css, text = _element(page, "overoptimisation-ppo")
    assert css == "warning"
    assert "grpo/frontier.jsonl not found" in page and "stage &#x27;grpo&#x27;: not finished" in page
    assert 'alt="grpo: online RL metrics"' in page
    # A passed gate is not a warning.
    _, css, text = _element(page, "gate-verdict")
    assert css == "ok" and "passed" in text


def test_fit_skipped_with_too_few_distinct_kl(tmp_path):
    run_dir = make_run(tmp_path / "run")
    write_jsonl(
        run_dir / "ppo" / "frontier.jsonl",
        [
            {"step": 0, "kl": 0.0, "gold": 0.1, "gold_se": 0.01, "proxy": 0.1},
            {"step": 10, "kl": 1.0, "gold": 0.3, "gold_se": 0.01, "proxy": 0.2},
            {"step": 20, "kl": 1.0, "gold": 0.31, "gold_se": 0.01, "proxy": 0.3},
        ],
    )
    page = _report(run_dir)
    cells = _row(page, "fit-ppo")
    assert cells[3] == "–" and "skipped: fewer than 3 points with distinct KL &gt; 0 (1)" in cells[5]
    assert "ppo: fit skipped" in page
    _, css, _ = _element(page, "overoptimisation-ppo")
    assert css == "ok"  # gold rose along the three points


def test_partial_run_names_the_missing_parts(tmp_path):
    run_dir = tmp_path / "partial"
    (run_dir / "sft").mkdir(parents=True)
    (run_dir / "pipeline.json").write_text(json.dumps({"model": "m", "algorithm": "dpo", "compare": ["ppo"]}))
    write_jsonl(run_dir / "sft" / "metrics.jsonl", _sft_metrics())
    page = _report(run_dir)
    assert 'id="missing-parts"' in page
    missing = re.search(r'id="missing-parts">(.*?)</div>', page, re.S).group(1)
    for part in (
        "reward/metrics.jsonl",
        "reward/heldout.json",
        "gate/gate.json",
        "dpo/metrics.jsonl",
        "dpo/frontier.jsonl",
        "ppo/metrics.jsonl",
        "ppo/frontier.jsonl",
        "eval/eval.json",
        "sft/.stage.json",
        "dpo/.stage.json",
        "ppo/.stage.json",
    ):
        assert part in missing, part
    assert "No evaluation" in page
    for alg in ("dpo", "ppo"):
        _, css, text = _element(page, f"overoptimisation-{alg}")
        assert css == "neutral" and "not measured" in text
    assert len(_png_uris(page)) == 1  # the SFT loss curve


def test_run_without_pipeline_json_or_policy_stages(tmp_path):
    run_dir = tmp_path / "bare"
    (run_dir / "sft").mkdir(parents=True)
    write_jsonl(run_dir / "sft" / "metrics.jsonl", _sft_metrics())
    page = _report(run_dir)
    assert (
        "pipeline.json not found" in page
        and "policy stages: no dpo, ilql, ppo, grpo, rloo, a2c, nlpo, reinforce directory" in page
    )


def test_policy_directory_an_earlier_run_left_is_named_not_reported(tmp_path):
    # pipeline.json names dpo alone (compare=[]): the ppo/ beside it is an earlier run's, trained against that
    # run's reward model, so it gets no section, no frontier path and no over-optimisation verdict; the page says so.
    run_dir = make_run(tmp_path / "run", compare=())
    page = _report(run_dir)
    assert 'id="policy-dpo"' in page and 'id="overoptimisation-dpo"' in page
    assert 'id="policy-ppo"' not in page and 'id="overoptimisation-ppo"' not in page
    _, _, text = _element(page, "left-out")
    assert "ppo/" in text and "earlier run" in text
    # Without pipeline.json every policy directory present is the run's own, and none is left out.
    (run_dir / "pipeline.json").unlink()
    page = _report(run_dir)
    assert 'id="policy-ppo"' in page and 'id="policy-dpo"' in page and 'id="left-out"' not in page


def test_eval_copy_at_the_top_level_is_used_when_eval_dir_is_missing(tmp_path):
    run_dir = make_run(tmp_path / "run")
    (run_dir / "eval" / "eval.json").unlink()
    page = _report(run_dir)
    assert "eval/eval.json" not in page
    assert 'id="player-dpo"' in page


def test_model_name_and_gate_message_are_escaped(tmp_path):
    run_dir = make_run(tmp_path / "run")
    config = json.loads((run_dir / "pipeline.json").read_text())
    config["model"] = f"evil {SCRIPT_PAYLOAD}"
    config["compare"] = ["ppo", "../../etc", IMG_PAYLOAD]  # never read as paths
    (run_dir / "pipeline.json").write_text(json.dumps(config))
    (run_dir / "gate" / "gate.json").write_text(json.dumps({"verdict": "failed", "message": IMG_PAYLOAD}))
    page = _report(run_dir)
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "evil &lt;script&gt;" in page
    _, css, text = _element(page, "gate-verdict")
    assert css == "warning" and "failed" in text
    assert "etc/metrics.jsonl" not in page


# ---------------------------------------------------------------- the older layout


def _legacy_run(root: Path, algorithm: str) -> Path:
    """The layout before per-algorithm stage directories: rl/ and an eval.json without players."""
    root.mkdir(parents=True)
    (root / "pipeline.json").write_text(json.dumps({"model": "old-model", "algorithm": algorithm}))
    for stage, entries in (
        ("sft", _sft_metrics()),
        ("reward", _reward_metrics()),
        ("rl", _dpo_metrics() if algorithm == "dpo" else _online_rl_metrics()),
    ):
        (root / stage).mkdir()
        write_jsonl(root / stage / "metrics.jsonl", entries)
    (root / "eval").mkdir()
    old = {
        k: v
        for k, v in _eval_json().items()
        if k
        not in (
            "players",
            "main_player",
            "baseline_name",
            "win_rate_ci",
            "kl_ci",
            "p_value",
            "verdict",
            "gold_score_policy_ci",
            "gold_score_baseline_ci",
            "reward_model",
        )
    }
    old["best_of_n"] = {"n": 4, "gold_score": 0.55, "kl_analytic": 0.636, "win_rate_vs_baseline": 0.625}
    old["policy_stats"] = {"gold_score": 0.381, "response_length": 31.5, "eos_rate": 0.9}
    (root / "eval" / "eval.json").write_text(json.dumps(old))
    for stage in ("sft", "sample", "label", "reward", "rl", "eval"):
        (root / stage).mkdir(exist_ok=True)
        (root / stage / ".stage.json").write_text(json.dumps({"hash": "h", "seconds": 10.0, "finished": "x"}))
    return root


@pytest.mark.parametrize("algorithm", ["ppo", "dpo"])
def test_older_layout_still_renders(tmp_path, algorithm):
    page = _report(_legacy_run(tmp_path / "old", algorithm))
    assert "old-model" in page
    rows = re.findall(r'<tr id="player-([\w]+)">', page)
    assert rows == ["sft", algorithm, "best_of_4"]
    assert "0.660 [no CI]" in _row(page, f"player-{algorithm}")[2]
    assert f"{0.381 - BASE_GOLD:.3f} [no CI]" in _row(page, f"player-{algorithm}")[4]
    assert "rl/frontier.jsonl not found" in page and "gate/gate.json" not in page
    _, css, text = _element(page, f"overoptimisation-{algorithm}")
    assert css == "neutral" and "not measured" in text
    kind = "DPO metrics" if algorithm == "dpo" else "online RL metrics"
    assert f'alt="{algorithm}: {kind}"' in page
    assert 'alt="reward-KL frontier: gold score vs KL and vs sqrt(KL)"' in page  # the eval points
    assert "best-of-n: fit skipped" in page


def test_empty_or_corrupt_run_still_reports(tmp_path):
    run_dir = tmp_path / "broken"
    (run_dir / "rl").mkdir(parents=True)
    # A torn *last* line (killed mid-append) is dropped by the reader; a broken line in the middle is unreadable.
    (run_dir / "rl" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3, "loss": 0.4}\n')
    (run_dir / "rl" / "frontier.jsonl").write_text('{"step": 0, "kl": 0.0, "gold": 0.1}\n{"step": 1')
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "eval.json").write_text("{not json")
    out = run(ReportConfig(run_dir=str(run_dir), output=str(tmp_path / "elsewhere" / "r.html")))
    assert out == tmp_path / "elsewhere" / "r.html"
    page = out.read_text(encoding="utf-8")
    assert "rl/metrics.jsonl unreadable" in page and "eval.json unreadable" in page
    assert "1 unreadable line(s) of rl/frontier.jsonl skipped" in page
    with pytest.raises(FileNotFoundError):
        run(ReportConfig(run_dir=str(tmp_path / "nope")))


# ---------------------------------------------------------------- in a real browser


def render_in_chromium(html_path: Path, screenshot: Path) -> dict:
    """Open ``html_path`` in headless Chromium; return console errors, requests and image sizes."""
    from playwright.sync_api import sync_playwright

    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(html_path.resolve().as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.getAttribute('src')])"
            )
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"errors": errors, "requests": requests, "images": images}


def test_report_renders_in_headless_chromium(tmp_path):
    require_chromium()
    html_path = run(ReportConfig(run_dir=str(make_run(tmp_path / "run"))))
    screenshot = tmp_path / "report.png"
    result = render_in_chromium(html_path, screenshot)
    assert result["errors"] == []
    # Every plot of the page (the 7 PNGs of test_report_of_a_complete_run) loaded and decoded at the size
    # its PNG header states (IHDR: width and height, big-endian, at bytes 16-24).
    page = html_path.read_text(encoding="utf-8")
    pngs = [base64.b64decode(u) for u in _png_uris(page)]
    assert len(pngs) == 7
    assert [src for *_, src in result["images"]] == ["data:image/png;base64," + u for u in _png_uris(page)]
    for (complete, width, height, _), png in zip(result["images"], pngs, strict=True):
        assert complete and (width, height) == (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big"))
    # Nothing fetched but the page itself (the plots are data: URIs).
    assert all(url.startswith(("file:", "data:")) for url in result["requests"]), result["requests"]
    assert screenshot.stat().st_size > 10_000


def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    """The browser tests must not hide: under CI (CI or RLHFKIT_REQUIRE_BROWSER set) a missing chromium fails."""
    import pytest as _pytest

    from tests import helpers

    monkeypatch.setattr(helpers, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("RLHFKIT_REQUIRE_BROWSER", raising=False)
    monkeypatch.setenv("CI", "true")
    with _pytest.raises(_pytest.fail.Exception, match="required under CI"):
        helpers.require_chromium()
    monkeypatch.delenv("CI")
    with _pytest.raises(_pytest.skip.Exception):
        helpers.require_chromium()
    monkeypatch.setenv("RLHFKIT_REQUIRE_BROWSER", "1")
    with _pytest.raises(_pytest.fail.Exception):
        helpers.require_chromium()


def test_a_policy_stage_kind_comes_from_its_algorithm_not_its_keys():
    from rlhfkit.report import PolicyStage

    assert PolicyStage("ppo", "ppo", metrics=[{"step": 1, "rewards/margin": 0.1}]).kinds == (True, False)
    assert PolicyStage("dpo", "dpo", metrics=[{"step": 1, "rollout/score": 0.1}]).kinds == (False, True)
    assert PolicyStage("grpo", "grpo", metrics=None).kinds == (True, False)
    # Only the older layout's rl/ directory, whose algorithm has no record, is told by its keys.
    assert PolicyStage("rl", "rl", metrics=[{"step": 1, "rollout/score": 0.1}]).kinds == (True, False)
    assert PolicyStage("rl", "rl", metrics=[{"step": 1, "rewards/chosen": 0.1}]).kinds == (False, True)


def test_metric_names_of_older_runs_are_read_as_todays():
    old = {"step": 3, "score": 0.5, "kl_update_seq": 1.5, "eval_accuracy": 0.7, "eval_loss": 0.6, "lr": 1e-4, "loss": 0.2}
    assert current_metric_names(old) == {
        "step": 3,
        "rollout/score": 0.5,
        "update/kl": 1.5,
        "eval_rewards/accuracy": 0.7,
        "eval_loss": 0.6,
        "lr": 1e-4,
        "loss": 0.2,
    }
    today = {"step": 3, "rollout/score": 0.5, "eval_rewards/margin": 0.1}
    assert current_metric_names(today) == today


# ---------------------------------------------------------------- an ensemble proxy's best-of-n curves


def _ensemble_block(golds: dict[str, list[float]], wco_minus: tuple[float, list[float], float]) -> dict:
    """eval.json's ``best_of_n_ensemble`` for n = 1, 2, 4, 8, 16 from each ranker's gold per n (intervals ±0.02);
    WCO's difference from member 0 at n = 16 is ``wco_minus`` (value, interval, p), 0 elsewhere."""
    by_n = {}
    for i, n in enumerate((1, 2, 4, 8, 16)):
        rows = {name: {"gold_score": g[i], "gold_score_ci": [g[i] - 0.02, g[i] + 0.02]} for name, g in golds.items()}
        d, ci, p = wco_minus if n == 16 else (0.0, [-0.01, 0.01], 1.0)
        rows["wco"].update(
            {"minus_member_0": d, "minus_member_0_ci": ci, "minus_member_0_p": p}
            | {"minus_members": d / 2, "minus_members_ci": [c / 2 for c in ci], "minus_members_p": p}
        )
        by_n[str(n)] = rows
    return {"single": "member_0", "ensemble_size": 4, "uwo_coef": 0.5, "num_prompts": 120, "by_n": by_n}


def test_the_ensembles_best_of_n_curves_table_and_verdict(tmp_path):
    """Member 0 alone peaks at n = 4 and falls (over-optimised); WCO still rises at n = 16 and beats it there with an
    interval above 0: the report draws the curves, tabulates them and says WCO delayed over-optimisation."""
    run_dir = make_run(tmp_path / "run")
    golds = {
        "member_0": [0.10, 0.16, 0.20, 0.18, 0.15],
        "members": [0.10, 0.16, 0.18, 0.19, 0.17],
        "mean": [0.10, 0.17, 0.21, 0.22, 0.21],
        "wco": [0.10, 0.15, 0.19, 0.21, 0.23],
        "uwo": [0.10, 0.16, 0.20, 0.22, 0.22],
    }
    evaluation = _eval_json() | {"best_of_n_ensemble": _ensemble_block(golds, (0.08, [0.03, 0.13], 0.004))}
    (run_dir / "eval" / "eval.json").write_text(json.dumps(evaluation))
    plain = _png_uris(_report(make_run(tmp_path / "plain")))
    page = _report(run_dir)
    assert 'id="ensemble-frontier"' in page and "ensemble of 4 reward models" in page and "120 prompts" in page
    _, _, verdict = _element(page, "ensemble-verdict")
    assert "At n = 16" in verdict and "higher than one member alone: difference +0.080 [+0.030, +0.130], p = 0.004" in verdict
    assert "one member alone (member 0) at n = 4" in verdict and "each member alone (mean over members) at n = 8" in verdict
    assert "ensemble WCO (worst member) at n = 16" in verdict and "delayed over-optimisation" in verdict
    table = page[page.index('id="ensemble-frontier"') :]
    assert "<td>16</td><td>0.150 [0.130, 0.170]</td><td>0.170 [0.150, 0.190]</td>" in table
    assert "<td>+0.080 [+0.030, +0.130], p = 0.004</td><td>+0.040 [+0.015, +0.065], p = 0.004</td>" in table
    assert len(_png_uris(page)) == len(plain) and _png_uris(page)[0] != plain[0]  # the same figures, curves added
    assert 'id="ensemble-frontier"' not in _report(make_run(tmp_path / "plain"))  # a single reward model: no section


def test_the_ensemble_verdict_without_over_optimisation_and_with_an_earlier_wco_peak():
    from rlhfkit.report import ensemble_verdict

    rising = {name: [0.1, 0.2, 0.3, 0.4, 0.5] for name in ("member_0", "members", "wco")}
    text = ensemble_verdict(_ensemble_block(rising, (0.0, [-0.02, 0.02], 1.0)))
    assert "not distinguishable from one member alone" in text and "No ranker's gold peaked before n = 16" in text
    earlier = {"member_0": [0.1, 0.2, 0.3, 0.2, 0.1], "members": [0.1, 0.2, 0.3, 0.3, 0.2], "wco": [0.1, 0.3, 0.2, 0.1, 0.0]}
    text = ensemble_verdict(_ensemble_block(earlier, (-0.1, [-0.15, -0.05], 0.001)))
    assert "lower than one member alone" in text and "WCO peaked earlier than one member alone: no delay seen" in text
    assert ensemble_verdict(None) is None and ensemble_verdict({"by_n": {"2": {"wco": {"gold_score": 0.1}}}}) is None
