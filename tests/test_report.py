"""The HTML run report: contents, escaping, the over-optimisation flag, partial runs, and a
headless-Chromium check that the page renders with no errors and every plot decodes."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from rlhfkit.report import ReportConfig, detect_overoptimisation, run, trend
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, require_chromium, write_jsonl

SCRIPT_PAYLOAD = "<script>alert(1)</script>"
IMG_PAYLOAD = '<img src=x onerror=alert(1)>'
STAGE_SECONDS = {"sft": 100.0, "sample": 20.0, "label": 10.0, "reward": 50.0, "rl": 3600.0, "eval": 120.0}  # 1h 05m


def _sft_metrics() -> list[dict]:
    entries = [{"step": s, "time": 1000.0 + s, "loss": 3.0 / s, "lr": 1e-4} for s in range(1, 21)]
    entries += [{"step": s, "time": 1000.5 + s, "eval_loss": 3.2 / s} for s in (5, 10, 15, 20)]
    return sorted(entries, key=lambda e: e["step"])


def _reward_metrics() -> list[dict]:
    entries = [{"step": s, "time": 2000.0 + s, "loss": 0.7 - 0.01 * s, "accuracy": 0.5 + 0.01 * s,
                "margin": 0.1 * s} for s in range(1, 21)]
    entries += [{"step": s, "time": 2000.5 + s, "eval_loss": 0.69 - 0.01 * s, "eval_accuracy": 0.5 + 0.012 * s}
                for s in (10, 20)]
    return entries


def _online_rl_metrics(gold: str) -> list[dict]:
    """40 PPO steps; the proxy score always rises. gold: 'falls' (rises, then falls), 'rises', or 'absent'."""
    entries = []
    for s in range(1, 41):
        entry = {"step": s, "time": 3000.0 + s, "score": 0.1 * s, "kl": 0.08 * s, "kl_k3": 0.07 * s,
                 "reward": 0.1 * s - 0.01 * s, "entropy": 2.0 - 0.02 * s, "policy_loss": -0.01 * s,
                 "value_loss": 1.0 / s, "clipfrac": 0.1, "approx_kl": 0.01, "response_length": 30.0}
        if gold == "falls":
            entry["gold_score"] = 0.05 * min(s, 40 - s)
        elif gold == "rises":
            entry["gold_score"] = 0.02 * s
        entries.append(entry)
    entries[3]["entropy"] = "nan"  # how MetricsLogger writes a non-finite value
    return entries


def _dpo_metrics() -> list[dict]:
    entries = [{"step": s, "time": 3000.0 + s, "loss": 0.69 - 0.01 * s, "accuracy": 0.5 + 0.02 * s,
                "margin": 0.05 * s, "rewards_chosen": 0.03 * s, "rewards_rejected": -0.02 * s} for s in range(1, 21)]
    entries += [{"step": s, "time": 3000.5 + s, "eval_loss": 0.68 - 0.01 * s, "eval_accuracy": 0.55,
                 "eval_margin": 0.04 * s, "eval_rewards_chosen": 0.02 * s, "eval_rewards_rejected": -0.01 * s}
                for s in (10, 20)]
    return entries


def _eval_json() -> dict:
    return {
        "policy": "runs/x/rl", "baseline": "runs/x/sft", "gold": "demo", "num_prompts": 3, "temperature": 0.7,
        "win_rate": 0.734, "gold_score_policy": 0.612, "gold_score_baseline": 0.401, "kl": 3.21, "kl_std": 1.05,
        "policy_stats": {"gold_score": 0.612, "response_length": 31.5, "eos_rate": 0.9},
        "baseline_stats": {"gold_score": 0.401, "response_length": 40.2, "eos_rate": 0.7},
        "best_of_n": {"n": 4, "proxy": "runs/x/reward", "gold_score": 0.55, "kl_analytic": 0.636,
                      "win_rate_vs_baseline": 0.625},
        "elo": [
            {"player": "policy", "rating": 1087.4, "ci_low": 1050.1, "ci_high": 1120.9, "games": 6},
            {"player": "best_of_4", "rating": 1010.2, "ci_low": 980.0, "ci_high": 1040.3, "games": 6},
            {"player": "baseline", "rating": 902.4, "ci_low": 870.2, "ci_high": 931.6, "games": 6},
        ],
        "samples": [
            {"prompt": "Say hi & be nice", "baseline": f"hello {SCRIPT_PAYLOAD}", "policy": "Hello, friend!",
             "gold_baseline": 0.2, "gold_policy": 0.9},
            {"prompt": f"Prompt with {IMG_PAYLOAD}", "baseline": "plain", "policy": f"tricky {IMG_PAYLOAD}",
             "gold_baseline": 0.5, "gold_policy": 0.4},
            {"prompt": "Multi\nline", "baseline": "a\nb", "policy": "c\nd", "gold_baseline": 0.1, "gold_policy": 0.1},
        ],
    }


def make_run(root: Path, *, algorithm: str = "ppo", gold: str = "falls") -> Path:
    """A complete fake pipeline run directory (no model involved)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipeline.json").write_text(json.dumps({"output_dir": str(root), "model": "tiny-test-model",
                                                    "algorithm": algorithm, "gold": "demo", "seed": 0}))
    for stage, entries in (("sft", _sft_metrics()), ("reward", _reward_metrics()),
                           ("rl", _dpo_metrics() if algorithm == "dpo" else _online_rl_metrics(gold))):
        (root / stage).mkdir(exist_ok=True)
        write_jsonl(root / stage / "metrics.jsonl", entries)
    (root / "eval").mkdir(exist_ok=True)
    (root / "eval" / "eval.json").write_text(json.dumps(_eval_json()))
    for stage, seconds in STAGE_SECONDS.items():
        (root / stage).mkdir(exist_ok=True)
        (root / stage / ".stage.json").write_text(json.dumps({"hash": "h", "seconds": seconds,
                                                              "finished": "2025-01-01T00:00:00"}))
    return root


def _report(run_dir: Path) -> str:
    return run(ReportConfig(run_dir=str(run_dir))).read_text(encoding="utf-8")


def _png_uris(page: str) -> list[str]:
    return re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)


# ---------------------------------------------------------------- pure pieces, by hand


def test_trend_is_the_least_squares_slope():
    assert trend([0, 1, 2], [1, 3, 5]) == pytest.approx(2.0)
    assert trend([0, 1, 2, 3], [0, 1, 0, 1]) == pytest.approx(0.2)  # sxy = 1, sxx = 5
    assert trend([4, 4], [0, 5]) == 0.0


def test_detect_overoptimisation_fits_the_second_half_only():
    # Steps 0..5; the second half is steps 3, 4, 5: score 3,4,5 (slope +1), gold 2,1,0 (slope -1).
    entries = [{"step": s, "score": float(s), "gold_score": g} for s, g in enumerate([0, 1, 2, 2, 1, 0])]
    verdict = detect_overoptimisation(entries)
    assert verdict.status == "detected"
    assert verdict.score_slope == pytest.approx(1.0) and verdict.gold_slope == pytest.approx(-1.0)
    assert verdict.steps == [3.0, 4.0, 5.0]
    # Gold falls only in the first half: nothing to flag.
    rising_late = [{"step": s, "score": float(s), "gold_score": g} for s, g in enumerate([2, 1, 0, 0, 1, 2])]
    assert detect_overoptimisation(rising_late).status == "not_detected"
    assert detect_overoptimisation([{"step": 1, "score": 1.0}]).status == "not_measured"
    assert detect_overoptimisation([{"step": 1, "score": 1.0, "gold_score": 0.0}]).status == "too_short"


# ---------------------------------------------------------------- the report


def test_full_report_has_headline_numbers_plots_and_escaped_text(tmp_path):
    run_dir = make_run(tmp_path / "run")
    out = run(ReportConfig(run_dir=str(run_dir)))
    assert out == run_dir / "report.html"
    page = out.read_text(encoding="utf-8")

    assert "tiny-test-model" in page and "ppo" in page
    assert "1h 05m 00s" in page  # sum of the stage seconds (3900 s)
    assert "73.4%" in page  # win rate
    assert "0.612 vs 0.401" in page and "+0.211" in page  # gold scores and their difference
    assert "3.210" in page and "1.050" in page  # KL and its sd
    assert "best-of-4" in page and "0.550" in page and "0.636" in page and "62.5%" in page
    for key in ("player", "rating", "ci_low", "ci_high", "games", "1087.4", "best_of_4"):  # Elo table
        assert key in page
    assert "missing-parts" not in page

    uris = _png_uris(page)
    assert len(uris) >= 5  # frontier, losses, reward accuracy, online RL, over-optimisation trends
    assert all(base64.b64decode(u).startswith(b"\x89PNG\r\n\x1a\n") for u in uris)

    # Model text is escaped, never markup; the report itself has no script at all.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<script" not in page.lower()
    assert "<img src=x" not in page
    assert "Say hi &amp; be nice" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_overoptimisation_warning_when_score_rises_and_gold_falls(tmp_path):
    page = _report(make_run(tmp_path / "run", gold="falls"))
    assert 'id="overoptimisation-warning"' in page
    assert "Over-optimisation warning" in page


def test_no_overoptimisation_warning_when_both_rise(tmp_path):
    page = _report(make_run(tmp_path / "run", gold="rises"))
    assert "overoptimisation-warning" not in page
    assert "No over-optimisation detected" in page


def test_overoptimisation_not_measured_without_gold_score(tmp_path):
    page = _report(make_run(tmp_path / "run", gold="absent"))
    assert "overoptimisation-warning" not in page
    assert "not measured" in page


def test_dpo_report_plots_dpo_metrics(tmp_path):
    page = _report(make_run(tmp_path / "run", algorithm="dpo"))
    assert 'alt="DPO metrics"' in page
    assert "overoptimisation-warning" not in page and "not measured" in page  # an online-RL check
    assert len(_png_uris(page)) >= 4


def test_partial_run_names_the_missing_parts(tmp_path):
    run_dir = tmp_path / "partial"
    (run_dir / "sft").mkdir(parents=True)
    write_jsonl(run_dir / "sft" / "metrics.jsonl", _sft_metrics())
    page = _report(run_dir)
    assert 'id="missing-parts"' in page
    for part in ("pipeline.json", "reward/metrics.jsonl", "rl/metrics.jsonl", "eval/eval.json",
                 "sft/.stage.json", "No evaluation"):
        assert part in page, part
    assert len(_png_uris(page)) == 1  # the SFT loss curve


def test_empty_or_corrupt_run_still_reports(tmp_path):
    run_dir = tmp_path / "broken"
    (run_dir / "rl").mkdir(parents=True)
    (run_dir / "rl" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # killed mid-write
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "eval.json").write_text("{not json")
    out = run(ReportConfig(run_dir=str(run_dir), output=str(tmp_path / "elsewhere" / "r.html")))
    assert out == tmp_path / "elsewhere" / "r.html"
    page = out.read_text(encoding="utf-8")
    assert "rl/metrics.jsonl unreadable" in page and "eval.json unreadable" in page
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
            images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
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
    assert len(result["images"]) >= 5
    assert all(complete and width > 0 for complete, width in result["images"]), result["images"]
    # Nothing fetched but the page itself (the plots are data: URIs).
    assert all(url.startswith(("file:", "data:")) for url in result["requests"]), result["requests"]
    assert screenshot.stat().st_size > 10_000
