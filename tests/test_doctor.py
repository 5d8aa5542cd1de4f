"""The training doctor: each rule on a synthetic metrics.jsonl that shows it and on one that does not (a near
miss: a single noisy step, a change below the threshold), the frontier's standard errors, the command's exit
codes, a missing file, a pipeline run directory, and the report's section."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhfkit import cli, doctor
from rlhfkit.doctor import DoctorConfig, Finding
from rlhfkit.report import ReportConfig
from rlhfkit.report import run as write_report
from rlhfkit.run_layout import RLMetric as M

STEPS = 20


def wiggle(step: int, amplitude: float) -> float:
    """Deterministic noise: the same every run, both signs, no trend."""
    return amplitude * math.sin(1.7 * step)


def healthy(steps: int = STEPS) -> list[dict]:
    """A PPO run where nothing is wrong: score and gold rise together, KL grows slowly from 0, entropy eases
    down, length and EOS rate hold, the value loss falls, the clip fraction is moderate."""
    rows = []
    for s in range(1, steps + 1):
        rows.append(
            {
                "step": s,
                "time": 1000.0 + s,
                M.SCORE: 0.1 + 0.02 * s + wiggle(s, 0.02),
                M.GOLD: 0.1 + 0.015 * s + wiggle(s + 3, 0.02),
                M.REWARD: 0.1 + 0.018 * s,
                M.KL: 0.05 * s + wiggle(s, 0.005),
                M.KL_K3: 0.045 * s,
                M.ENTROPY: 2.0 - 0.02 * s + wiggle(s, 0.01),
                M.RESPONSE_LENGTH: 40.0 + wiggle(s, 1.0),
                M.EOS_RATE: 0.9 + wiggle(s, 0.02),
                M.POLICY_LOSS: -0.05 + wiggle(s, 0.01),
                M.VALUE_LOSS: 1.0 / (1 + 0.1 * s),
                M.CLIPFRAC: 0.1 + wiggle(s, 0.01),
                M.APPROX_KL: 0.01,
                M.EPOCHS_DONE: 2,
                M.EXPLAINED_VARIANCE: 0.5,
                "lr": 1e-6,
                "beta": 0.05,
            }
        )
    return rows


def with_series(rows: list[dict], key: str, value) -> list[dict]:
    """``rows`` with ``key`` set to ``value(step)`` at every step."""
    return [{**r, key: value(r["step"])} for r in rows]


def write_run(directory: Path, rows: list[dict], frontier: list[dict] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if frontier is not None:
        (directory / "frontier.jsonl").write_text("".join(json.dumps(p) + "\n" for p in frontier), encoding="utf-8")
    return directory


def diagnose_file(tmp_path: Path, rows: list[dict], frontier: list[dict] | None = None, **options) -> list[Finding]:
    """The findings of :func:`doctor.run` on ``rows`` written as ``tmp_path/run/metrics.jsonl``."""
    run_dir = write_run(tmp_path / "run", rows, frontier)
    return doctor.run(DoctorConfig(run_dir=str(run_dir), **options))


def only(findings: list[Finding], rule: str) -> Finding:
    found = [f for f in findings if f.rule == rule]
    assert len(found) == 1, [f.rule for f in findings]
    return found[0]


def rules(findings: list[Finding]) -> set[str]:
    return {f.rule for f in findings}


def g(x: float) -> str:
    return f"{x:.3g}"


def window_mean(values: list[float], first: int, last: int) -> float:
    """Mean of the values of steps first..last (1-based)."""
    return sum(values[first - 1 : last]) / (last - first + 1)


def test_a_healthy_run_has_no_finding_and_says_so(tmp_path, capsys):
    assert diagnose_file(tmp_path, healthy()) == []
    assert f"no problems found in {STEPS} steps" in capsys.readouterr().out


# ---------------------------------------------------------------- non-finite losses


def test_a_nan_loss_is_a_problem(tmp_path):
    rows = healthy()
    rows[6][M.POLICY_LOSS] = "nan"  # how MetricsLogger writes a non-finite value
    rows[9][M.POLICY_LOSS] = "inf"
    f = only(diagnose_file(tmp_path, rows), "non_finite")
    assert f.severity == "problem" and f.steps == (7, 10)
    assert f"{M.POLICY_LOSS} (2 step(s), first at step 7)" in f.seen


def test_a_nan_that_is_not_a_loss_is_not_flagged(tmp_path):
    rows = healthy()
    rows[6][M.EXPLAINED_VARIANCE] = "nan"  # legitimately NaN when the returns have no variance
    assert "non_finite" not in rules(diagnose_file(tmp_path, rows))


# ---------------------------------------------------------------- negative k1 KL


def test_a_negative_k1_kl_names_the_estimator_and_why(tmp_path):
    rows = with_series(healthy(), M.KL, lambda s: -0.05)
    f = only(diagnose_file(tmp_path, rows), "negative_kl")
    assert f.severity == "problem"
    assert "averaged -0.05 over steps 1–5" in f.seen and f"{STEPS} of {STEPS} logged steps were negative" in f.seen
    assert "k1" in f.seen and "unbiased" in f.why and "top_p" in f.why and "kl_estimator=k3" in f.advice


def test_one_negative_kl_step_is_noise_not_a_finding(tmp_path):
    rows = healthy()
    rows[2][M.KL] = -0.5  # steps 1-5: 0.05, 0.1, -0.5, 0.2, 0.25 (mean 0.02)
    assert "negative_kl" not in rules(diagnose_file(tmp_path, rows))


# ---------------------------------------------------------------- entropy collapse


def test_entropy_collapse_to_a_fraction_of_its_start(tmp_path):
    entropy = [2.0 * 0.8**s for s in range(1, STEPS + 1)]
    rows = with_series(healthy(), M.ENTROPY, lambda s: entropy[s - 1])
    f = only(diagnose_file(tmp_path, rows), "entropy_collapse")
    first, last = window_mean(entropy, 1, 5), window_mean(entropy, 16, 20)
    assert last < 0.1 * first
    assert f"fell from {g(first)} (steps 1–5) to {g(last)} (steps 16–20)" in f.seen
    assert f.severity == "problem" and "entropy bonus" in f.advice


def test_entropy_below_the_floor_having_started_above_it(tmp_path):
    rows = with_series(healthy(), M.ENTROPY, lambda s: 0.06 if s <= 10 else 0.04)
    f = only(diagnose_file(tmp_path, rows), "entropy_collapse")
    assert "fell from 0.06" in f.seen and "to 0.04" in f.seen and "below the floor of 0.05" in f.seen


def test_entropy_halving_is_not_a_collapse(tmp_path):
    rows = with_series(healthy(), M.ENTROPY, lambda s: 2.0 - 0.05 * s)  # 2.0 -> 1.0
    assert "entropy_collapse" not in rules(diagnose_file(tmp_path, rows))


# ---------------------------------------------------------------- clip fraction


def test_a_high_clip_fraction(tmp_path):
    rows = with_series(healthy(), M.CLIPFRAC, lambda s: 0.1 if s <= 15 else 0.45)
    f = only(diagnose_file(tmp_path, rows), "clip_fraction_high")
    assert f.severity == "problem" and "averaged 0.45 over steps 16–20, above 0.3" in f.seen
    assert "ppo_epochs" in f.advice


def test_one_clip_fraction_spike_is_not_high(tmp_path):
    rows = with_series(healthy(), M.CLIPFRAC, lambda s: 0.9 if s == 18 else 0.1)  # last window's mean 0.26
    assert not {"clip_fraction_high", "clip_fraction_zero"} & rules(diagnose_file(tmp_path, rows))


def test_a_clip_fraction_of_zero_over_several_epochs_is_a_note(tmp_path):
    rows = with_series(healthy(), M.CLIPFRAC, lambda s: 0.0)
    f = only(diagnose_file(tmp_path, rows), "clip_fraction_zero")
    assert f.severity == "note" and f"exactly 0 at all {STEPS} logged steps" in f.seen and "2 epochs" in f.seen


def test_a_clip_fraction_of_zero_in_one_on_policy_pass_is_no_finding(tmp_path):
    # One epoch, one minibatch: the ratio is exactly 1, so the clip cannot act (approx KL 0).
    rows = with_series(with_series(healthy(), M.CLIPFRAC, lambda s: 0.0), M.EPOCHS_DONE, lambda s: 1)
    rows = with_series(rows, M.APPROX_KL, lambda s: 0.0)
    assert not {"clip_fraction_high", "clip_fraction_zero"} & rules(diagnose_file(tmp_path, rows))


# ---------------------------------------------------------------- value loss


def test_an_exploding_value_loss(tmp_path):
    rows = with_series(healthy(), M.VALUE_LOSS, lambda s: 0.5 * 1.3**s)
    losses = [0.5 * 1.3**s for s in range(1, STEPS + 1)]
    f = only(diagnose_file(tmp_path, rows), "value_loss_explosion")
    first, last = window_mean(losses, 1, 5), window_mean(losses, 16, 20)
    assert f"grew from {g(first)} (steps 1–5) to {g(last)} (steps 16–20), {g(last / first)} times" in f.seen


def test_a_value_loss_that_grows_threefold_is_not_an_explosion(tmp_path):
    rows = with_series(healthy(), M.VALUE_LOSS, lambda s: 0.5 + 0.1 * s)  # 0.8 -> 2.3
    assert "value_loss_explosion" not in rules(diagnose_file(tmp_path, rows))


# ---------------------------------------------------------------- length exploitation


def test_length_growing_while_the_eos_rate_falls(tmp_path):
    rows = with_series(healthy(), M.RESPONSE_LENGTH, lambda s: 40.0 + 4.0 * s)
    rows = with_series(rows, M.EOS_RATE, lambda s: 0.95 - 0.03 * s)
    f = only(diagnose_file(tmp_path, rows), "length_exploitation")
    assert f.severity == "problem"
    assert "fell from 0.86 (steps 1–5) to 0.41 (steps 16–20)" in f.seen  # 0.95 - 0.03 * 3, 0.95 - 0.03 * 18
    assert "went from 52 tokens (steps 1–5) to 112 (steps 16–20), +115%" in f.seen
    assert "missing_eos_penalty" in f.advice and "overlong_buffer" in f.advice


def test_the_eos_rate_falling_below_the_floor_is_length_exploitation(tmp_path):
    rows = with_series(healthy(), M.EOS_RATE, lambda s: 0.9 if s <= 10 else 0.3)
    assert only(diagnose_file(tmp_path, rows), "length_exploitation").severity == "problem"


def test_length_growing_with_eos_holding_is_a_note(tmp_path):
    rows = with_series(healthy(), M.RESPONSE_LENGTH, lambda s: 40.0 + 4.0 * s)
    f = only(diagnose_file(tmp_path, rows), "length_growth")
    assert f.severity == "note" and "+115%" in f.seen
    assert "length_exploitation" not in rules(diagnose_file(tmp_path, rows))


def test_modest_length_growth_with_eos_holding_is_no_finding(tmp_path):
    rows = with_series(healthy(), M.RESPONSE_LENGTH, lambda s: 40.0 + 0.6 * s)  # +30%
    rows = with_series(rows, M.EOS_RATE, lambda s: 0.9 - 0.005 * s)  # -0.075
    assert not {"length_exploitation", "length_growth"} & rules(diagnose_file(tmp_path, rows))


# ---------------------------------------------------------------- the policy far from its reference


def test_a_kl_per_token_above_the_limit_is_a_note_naming_beta_zero(tmp_path):
    rows = with_series(healthy(), M.KL, lambda s: 2.0 * s)  # 40 tokens: 0.05 nats per token a step
    rows = with_series(rows, "beta", lambda s: 0.0)
    f = only(diagnose_file(tmp_path, rows), "kl_far")
    assert f.severity == "note"
    kl_last = window_mean([2.0 * s for s in range(1, 21)], 16, 20)  # 36 nats
    length = window_mean([40.0 + wiggle(s, 1.0) for s in range(1, 21)], 16, 20)
    assert f"averaged {g(kl_last)} nats per response over steps 16–20" in f.seen
    assert f"{g(kl_last / length)} nats per token" in f.seen and "beta was 0" in f.seen
    assert f.steps == (16, 20) and "adaptive_kl" in f.advice


def test_a_kl_per_token_just_below_the_limit_is_no_finding(tmp_path):
    rows = with_series(healthy(), M.KL, lambda s: 0.5 * 40.0 * 0.95 * s / 18)  # last window 0.475 nats per token
    assert "kl_far" not in rules(diagnose_file(tmp_path, rows))
    assert "kl_far" in rules(diagnose_file(tmp_path, rows, kl_per_token_high=0.4))


# ---------------------------------------------------------------- GRPO zero-variance groups


def grpo(zero_variance: float, policy_loss: float) -> list[dict]:
    rows = with_series(healthy(), M.ZERO_VARIANCE_GROUPS, lambda s: zero_variance)
    return with_series(rows, M.POLICY_LOSS, lambda s: policy_loss * (1 if s % 2 else -1))


def test_many_zero_variance_groups_and_a_loss_near_zero(tmp_path):
    f = only(diagnose_file(tmp_path, grpo(0.8, 0.002)), "zero_variance_groups")
    assert f.severity == "problem"
    assert "On average 0.8 of the groups" in f.seen and "averaged 0.002 in absolute value, near zero" in f.seen
    assert "samples_per_prompt" in f.advice and "drop_zero_variance_groups" in f.advice


def test_many_zero_variance_groups_with_a_working_loss_is_a_note(tmp_path):
    assert only(diagnose_file(tmp_path, grpo(0.8, 0.05)), "zero_variance_groups").severity == "note"


def test_few_zero_variance_groups_is_no_finding(tmp_path):
    assert "zero_variance_groups" not in rules(diagnose_file(tmp_path, grpo(0.2, 0.002)))


# ---------------------------------------------------------------- over-optimisation


def test_proxy_rising_while_the_logged_gold_falls_beyond_its_noise(tmp_path):
    gold = [0.1 + 0.04 * min(s, 8) - 0.03 * max(0, s - 8) + wiggle(s, 0.01) for s in range(1, STEPS + 1)]
    rows = with_series(healthy(), M.GOLD, lambda s: gold[s - 1])
    f = only(diagnose_file(tmp_path, rows), "overoptimisation")
    assert f.severity == "problem" and "reward hacking" in f.why and "Gao" in f.why
    assert f"{M.GOLD}) averaged" in f.seen and "(steps 16–20)" not in f.seen and "over steps 16–20" in f.seen
    assert "more than 1.96 combined standard errors" in f.seen and "beta" in f.advice and "ensemble" in f.advice


def test_a_noisy_flat_gold_is_not_overoptimisation(tmp_path):
    rows = with_series(healthy(), M.GOLD, lambda s: 0.5 + wiggle(s, 0.05))  # proxy still rising
    assert "overoptimisation" not in rules(diagnose_file(tmp_path, rows))


def probe_points(gold_se: float) -> list[dict]:
    """Probes at steps 0..100: gold peaks at 0.40 (step 40) and ends at 0.37, the proxy rising throughout."""
    gold = [0.20, 0.30, 0.36, 0.39, 0.40, 0.39, 0.385, 0.38, 0.375, 0.372, 0.37]
    return [
        {
            "step": 10 * i,
            "kl": 0.5 * i,
            "kl_se": 0.05,
            "gold": gold[i],
            "gold_se": gold_se,
            "proxy": 0.1 + 0.05 * i,
            "proxy_se": 0.01,
            "num_prompts": 32,
        }
        for i in range(11)
    ]


def test_a_gold_fall_beyond_the_frontiers_standard_errors_is_flagged(tmp_path):
    # Fall 0.40 - 0.37 = 0.03 > 1.96 * sqrt(2) * 0.005 = 0.0139.
    f = only(diagnose_file(tmp_path, healthy(), probe_points(0.005)), "overoptimisation")
    assert f.steps == (40, 100)
    assert "peaked at 0.4 ± 0.005 (SE) at step 40" in f.seen and "fell to 0.37 ± 0.005 by step 100" in f.seen
    assert "a fall of 0.03" in f.seen and "(0.0139)" in f.seen and "rose from 0.3 to 0.6" in f.seen


def test_a_gold_fall_within_the_frontiers_standard_errors_is_not_flagged(tmp_path):
    # Fall 0.03 < 1.96 * sqrt(2) * 0.02 = 0.055: within noise. The logged gold falls beyond its own spread,
    # but the held-out probes, when the run has them, are what counts.
    gold = [0.1 + 0.04 * min(s, 8) - 0.03 * max(0, s - 8) for s in range(1, STEPS + 1)]
    rows = with_series(healthy(), M.GOLD, lambda s: gold[s - 1])
    assert "overoptimisation" not in rules(diagnose_file(tmp_path, rows, probe_points(0.02)))
    assert "overoptimisation" in rules(diagnose_file(tmp_path / "no-probes", rows))


# ---------------------------------------------------------------- training/inference mismatch


def test_a_large_sampler_logp_difference(tmp_path):
    rows = with_series(healthy(), M.SAMPLER_LOGP_DIFF, lambda s: 0.3)
    rows = with_series(rows, M.SAMPLER_LOGP_DIFF_MAX, lambda s: 2.0)
    f = only(diagnose_file(tmp_path, rows), "sampler_mismatch")
    assert f.severity == "problem" and "reached 0.3 nats" in f.seen and "(limit 0.1)" in f.seen
    assert "correction is off" in f.seen and "vllm_importance_sampling=true" in f.advice and "vLLM" in f.why
    rows = with_series(rows, M.IS_WEIGHT_MEAN, lambda s: 0.8)
    f = only(diagnose_file(tmp_path / "with-is", rows), "sampler_mismatch")
    assert "correction is on (mean truncated weight rollout/is_weight_mean 0.8" in f.seen


def test_only_the_largest_difference_large_is_a_note(tmp_path):
    rows = with_series(healthy(), M.SAMPLER_LOGP_DIFF, lambda s: 0.03)
    rows = with_series(rows, M.SAMPLER_LOGP_DIFF_MAX, lambda s: 8.0)
    assert only(diagnose_file(tmp_path, rows), "sampler_mismatch").severity == "note"


def test_a_small_sampler_logp_difference_is_no_finding(tmp_path):
    rows = with_series(healthy(), M.SAMPLER_LOGP_DIFF, lambda s: 0.3 if s == 10 else 0.02)  # one spike
    rows = with_series(rows, M.SAMPLER_LOGP_DIFF_MAX, lambda s: 1.5)
    assert "sampler_mismatch" not in rules(diagnose_file(tmp_path, rows))


# ---------------------------------------------------------------- reading runs, the command, the report


def test_older_metric_names_and_a_torn_last_line_are_read(tmp_path):
    rows = [{"step": s, "entropy": 2.0 * 0.7**s} for s in range(1, STEPS + 1)]  # before the namespacing
    run_dir = write_run(tmp_path / "run", rows)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 21, "entr')  # a run killed mid-append
    assert rules(doctor.run(DoctorConfig(run_dir=str(run_dir)))) == {"entropy_collapse"}


def test_a_missing_metrics_file_is_an_error_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nothing-here"
    with pytest.raises(FileNotFoundError, match=str(missing / "metrics.jsonl")):
        doctor.run(DoctorConfig(run_dir=str(missing)))
    assert cli.main(["doctor", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rlhfkit doctor: error:") and str(missing / "metrics.jsonl") in err


def test_a_pipeline_run_directory_is_read_per_policy_stage(tmp_path, capsys):
    entropy = [2.0 * 0.8**s for s in range(1, STEPS + 1)]
    write_run(tmp_path / "pipe" / "ppo", with_series(healthy(), M.ENTROPY, lambda s: entropy[s - 1]))
    write_run(tmp_path / "pipe" / "grpo", healthy())
    findings = doctor.run(DoctorConfig(run_dir=str(tmp_path / "pipe")))
    assert [(f.source, f.rule) for f in findings] == [("ppo", "entropy_collapse")]
    out = capsys.readouterr().out
    assert "ppo/metrics.jsonl: 1 problem(s) in 20 steps" in out and "grpo/metrics.jsonl: no problems found" in out


def test_the_command_exits_0_or_with_strict_1_on_a_problem(tmp_path, capsys):
    entropy = [2.0 * 0.8**s for s in range(1, STEPS + 1)]
    sick = write_run(tmp_path / "sick", with_series(healthy(), M.ENTROPY, lambda s: entropy[s - 1]))
    clean = write_run(tmp_path / "clean", healthy())
    noted = write_run(tmp_path / "noted", with_series(healthy(), M.CLIPFRAC, lambda s: 0.0))

    assert cli.main(["doctor", str(sick)]) == 0
    out = capsys.readouterr().out
    assert "1 problem(s) in 20 steps" in out and "PROBLEM entropy_collapse (steps 1–20)" in out
    assert "  seen: The policy's entropy" in out and "  why: " in out and "  try: " in out
    assert cli.main(["doctor", str(sick), "--strict"]) == 1
    assert cli.main(["doctor", str(sick), "strict=true"]) == 1
    # Thresholds are key=value overrides: loose enough, the collapse is not one.
    assert cli.main(["doctor", str(sick), "entropy_fraction=0.01", "entropy_floor=0.01", "--strict"]) == 0
    capsys.readouterr()
    assert cli.main(["doctor", str(clean), "--strict"]) == 0
    assert "no problems found in 20 steps" in capsys.readouterr().out
    assert cli.main(["doctor", "--strict", str(noted)]) == 0  # a note is not a problem
    assert "no problems found in 20 steps; 1 note(s)" in capsys.readouterr().out
    assert cli.main(["doctor", str(clean), "window=0"]) == 2  # a bad threshold is a config error
    assert cli.main(["config", "doctor"]) == 0
    assert "clipfrac_high: 0.3\n" in capsys.readouterr().out


def test_the_report_has_a_training_doctor_section(tmp_path):
    run_dir = tmp_path / "pipe"
    entropy = [2.0 * 0.8**s for s in range(1, STEPS + 1)]
    write_run(run_dir / "ppo", with_series(healthy(), M.ENTROPY, lambda s: entropy[s - 1]))
    write_run(run_dir / "grpo", healthy())
    (run_dir / "pipeline.json").write_text(json.dumps({"algorithm": "ppo", "compare": ["grpo"], "model": "m"}))
    page = write_report(ReportConfig(run_dir=str(run_dir))).read_text(encoding="utf-8")
    section = page[page.index('<h2 id="doctor">Training doctor</h2>') : page.index('<h2 id="reward-model">')]
    assert 'class="warning" id="doctor-ppo"' in section and "problem: entropy_collapse" in section
    assert 'class="ok" id="doctor-grpo"' in section and "no problems found in 20 steps" in section
    assert "The policy&#x27;s entropy" in section  # escaped
