"""rlhfkit.stats: bootstrap coverage, hand-worked permutation p-values, win fractions, Gao et al. fits, the verdict.

Expected numbers are worked out by hand in comments, or by an independent
method in the test (itertools enumeration, a dynamic program over sums, the
textbook OLS standard error), never by the functions under test.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from statistics import NormalDist

import numpy as np
import pytest

from rlhfkit.stats import (
    Estimate,
    analytic_bon_kl,
    cluster_accuracy,
    cluster_accuracy_difference,
    fit_gao_bon,
    fit_gao_rl,
    overoptimisation,
    paired_bootstrap,
    seed_cluster_bootstrap,
    sign_flip_p_value,
    win_fractions,
)

# --------------------------------------------------------------------------- 1. bootstrap coverage

TRUE_P = 0.6
PROMPTS = 200
REPEATS = 1000


def _coverage(per_unit_rows: list[np.ndarray], truth: float) -> float:
    hits = 0
    for i, row in enumerate(per_unit_rows):
        # resamples=1000 keeps the 1,000-repeat loop to ~1 s; a different
        # bootstrap seed per repeat, as independent analyses would have.
        est = paired_bootstrap(row, resamples=1000, seed=i)
        hits += est.ci[0] <= truth <= est.ci[1]
    return hits / len(per_unit_rows)


def test_paired_bootstrap_coverage_bernoulli_wins():
    # One sample each, so each prompt's win is Bernoulli(0.6) and the mean's
    # true value is 0.6. Observed coverage of the 95% percentile interval with
    # data seeds 0, 1, 2: 0.946, 0.951, 0.955 (binomial SE of a
    # coverage over 1,000 repeats ~0.007, so [0.93, 0.97] is ~+-3 SE).
    # A 90% interval (~0.90) or a too-wide one (~0.99) fails this.
    rng = np.random.default_rng(0)
    wins = (rng.random((REPEATS, PROMPTS)) < TRUE_P).astype(np.float64)
    coverage = _coverage(list(wins), TRUE_P)
    assert 0.93 <= coverage <= 0.97, coverage


def test_paired_bootstrap_coverage_win_fraction_2x2():
    # Two policy and two baseline samples per prompt, scores = prompt offset +
    # N(mu, 1) vs offset + N(0, 1): P(policy > baseline) = Phi(mu / sqrt 2),
    # set to 0.6. The per-prompt fraction (in {0, 1/4, ..., 1}) has mean 0.6;
    # its four pairs are correlated, which is why prompts are the units.
    # Observed coverage with data seeds 0, 1, 2: 0.951, 0.944, 0.953.
    mu = math.sqrt(2.0) * NormalDist().inv_cdf(TRUE_P)
    rng = np.random.default_rng(0)
    offset = rng.normal(size=(REPEATS, PROMPTS, 1))
    policy = offset + mu + rng.normal(size=(REPEATS, PROMPTS, 2))
    baseline = offset + rng.normal(size=(REPEATS, PROMPTS, 2))
    fractions = [win_fractions(policy[r], baseline[r]) for r in range(REPEATS)]
    assert abs(np.mean(fractions) - TRUE_P) < 0.005  # the data really have mean 0.6
    coverage = _coverage(fractions, TRUE_P)
    assert 0.93 <= coverage <= 0.97, coverage


def test_paired_bootstrap_basics():
    est = paired_bootstrap([0.0, 1.0, 1.0, 0.5], resamples=500, seed=3)
    assert est.value == pytest.approx(0.625)
    assert est.n == 4
    assert 0.0 <= est.ci[0] <= est.value <= est.ci[1] <= 1.0
    assert est == paired_bootstrap([0.0, 1.0, 1.0, 0.5], resamples=500, seed=3)  # seeded: reproducible
    assert est.as_dict() == {"value": 0.625, "ci": [est.ci[0], est.ci[1]], "n": 4}
    # A narrower level gives a nested interval.
    narrow = paired_bootstrap([0.0, 1.0, 1.0, 0.5], resamples=500, level=0.5, seed=3)
    assert est.ci[0] <= narrow.ci[0] <= narrow.ci[1] <= est.ci[1]
    # One unit: nothing to resample, the interval is the value.
    assert paired_bootstrap([0.3]).ci == (0.3, 0.3)
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            paired_bootstrap(bad)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], level=1.0)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], resamples=0)


def test_paired_bootstrap_interval_scale():
    # Percentile interval of a mean of n = 400 draws from N(0, 1): half-width
    # ~ 1.96 / sqrt(400) = 0.098 (Efron & Tibshirani 1993: the bootstrap SE of a
    # mean is the plug-in SE). Catches a bootstrap of the wrong statistic
    # (e.g. resampling values but not averaging over n).
    x = np.random.default_rng(5).normal(size=400)
    est = paired_bootstrap(x, seed=1)
    half = (est.ci[1] - est.ci[0]) / 2
    assert half == pytest.approx(1.96 * x.std() / 20, rel=0.1)


# --------------------------------------------------------------------------- 2. sign-flip test


def _exact_by_itertools(d: list[float]) -> float:
    observed = abs(sum(d))
    patterns = list(itertools.product((1, -1), repeat=len(d)))
    extreme = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed for signs in patterns)
    return extreme / len(patterns)


def _exact_by_dynamic_program(d: list[int]) -> float:
    # Distribution of sum(+-d_i) over all 2^n patterns, one unit at a time.
    counts = Counter({0: 1})
    for x in d:
        step: Counter = Counter()
        for s, k in counts.items():
            step[s + x] += k
            step[s - x] += k
        counts = step
    observed = abs(sum(d))
    return sum(k for s, k in counts.items() if abs(s) >= observed) / 2 ** len(d)


def test_sign_flip_hand_worked():
    # [1, 1, 1]: observed |sum| = 3; of the 8 sign patterns only +++ (3) and
    # --- (-3) reach |sum| >= 3, so p = 2/8.
    assert sign_flip_p_value([1, 1, 1]) == 0.25
    # [1, 2, -1]: observed sum 2. The 8 sums of +-1 +-2 +-1:
    #   +++ 4, ++- 2, +-+ 0, +-- -2, -++ 2, -+- 0, --+ -2, --- -4
    # |sum| >= 2 for all but the two zeros: p = 6/8.
    assert sign_flip_p_value([1, 2, -1]) == 0.75
    # [3, 1, 0]: the zero stays zero. Sums of +-3 +-1: 4, 2, -2, -4; only
    # +-4 reach 4: p = 2/4 (= 4/8 over all 8 patterns, each counted twice).
    assert sign_flip_p_value([3, 1, 0]) == 0.5
    # [2, 2, 2, 2]: p = 2/16, and flipping every sign changes nothing (two-sided).
    assert sign_flip_p_value([2, 2, 2, 2]) == sign_flip_p_value([-2, -2, -2, -2]) == 0.125
    # No differences at all: no evidence.
    assert sign_flip_p_value([0, 0]) == 1.0
    assert sign_flip_p_value([0.0]) == 1.0
    # Observed sum 0 (in floating point ~5e-17): every pattern is as extreme.
    assert sign_flip_p_value([0.1, 0.2, -0.3]) == 1.0
    with pytest.raises(ValueError):
        sign_flip_p_value([])


D16 = [2, -1, 3, 1, -2, 4, 1, -1, 2, 3, -3, 1, 2, -1, 1, 2]


def test_sign_flip_exact_n16_matches_enumeration():
    expected = _exact_by_itertools(D16)
    assert expected == pytest.approx(0.1217041015625)  # 7976 / 65536, also by the dynamic program
    assert _exact_by_dynamic_program(D16) == expected
    assert sign_flip_p_value(D16) == expected
    # Scaled to non-integers the sums tie only up to rounding; the p-value must not move.
    assert sign_flip_p_value([0.1 * x for x in D16]) == expected
    # Exact means deterministic: the seed is irrelevant.
    assert sign_flip_p_value(D16, seed=7) == expected


def test_sign_flip_monte_carlo_close_to_exact():
    d20 = [3, -1, 2, 5, -2, 1, 4, -3, 2, 1, -1, 3, 2, -4, 1, 2, -2, 3, 1, -1]
    exact = _exact_by_dynamic_program(d20)  # 0.18215..., over 2^20 patterns
    m = 20000
    p = sign_flip_p_value(d20, resamples=m, seed=0)
    se = math.sqrt(exact * (1 - exact) / m)  # ~0.0027
    assert abs(p - exact) < 4 * se + 1 / m, (p, exact)
    # 16 non-zero differences plus 4 zeros: still exact (zeros only repeat patterns).
    assert sign_flip_p_value(D16 + [0, 0, 0, 0], resamples=10, seed=1) == _exact_by_itertools(D16)


def test_sign_flip_monte_carlo_phipson_smyth_correction():
    # 40 equal differences: exact p = 2 / 2^40, so no random pattern reaches
    # the observed sum, b = 0 and p = (0 + 1) / (m + 1), never 0.
    assert sign_flip_p_value([1.0] * 40, resamples=999, seed=0) == 1 / 1000


# --------------------------------------------------------------------------- 3. win fractions


def test_win_fractions_hand_case_with_ties():
    # Prompt 0, K=2 policy [1, 3] vs L=3 baseline [1, 2, 3]:
    #   1 vs 1 tie 0.5, 1 vs 2 loss, 1 vs 3 loss, 3 vs 1 win, 3 vs 2 win, 3 vs 3 tie 0.5 -> 3/6
    # Prompt 1, policy [4, 2] vs baseline [0, 2, 5]:
    #   4: win, win, loss = 2;  2: win, tie, loss = 1.5  -> 3.5/6 = 7/12
    policy = [[1.0, 3.0], [4.0, 2.0]]
    baseline = [[1.0, 2.0, 3.0], [0.0, 2.0, 5.0]]
    np.testing.assert_allclose(win_fractions(policy, baseline), [0.5, 7 / 12])
    # Swapping roles gives 1 - fraction (ties are symmetric).
    np.testing.assert_allclose(win_fractions(baseline, policy), [0.5, 5 / 12])


def test_win_fractions_ragged():
    # Prompt 2 has K=1, L=1: 5 vs 5 is a tie -> 0.5; prompt 3 K=3, L=1:
    # [1, 2, 3] vs [2] -> loss, tie, win = 1.5 / 3.
    policy = [[1.0, 3.0], [4.0, 2.0], [5.0], [1.0, 2.0, 3.0]]
    baseline = [[1.0, 2.0, 3.0], [0.0, 2.0, 5.0], [5.0], [2.0]]
    out = win_fractions(policy, baseline)
    assert out.shape == (4,)
    np.testing.assert_allclose(out, [0.5, 7 / 12, 0.5, 0.5])
    assert win_fractions([], []).shape == (0,)
    with pytest.raises(ValueError):
        win_fractions([[1.0]], [[1.0], [2.0]])  # prompt counts differ
    with pytest.raises(ValueError):
        win_fractions([[1.0], []], [[1.0], [2.0]])  # a prompt without policy samples
    with pytest.raises(ValueError):
        win_fractions([[float("nan")]], [[1.0]])


# --------------------------------------------------------------------------- 4. Gao et al. fits


def _ols_se(design: np.ndarray, sigma: float) -> np.ndarray:
    # Textbook OLS standard errors: sqrt(diag(sigma^2 (X^T X)^-1)).
    return np.sqrt(np.diag(sigma**2 * np.linalg.inv(design.T @ design)))


def test_fit_gao_bon_noiseless_and_noisy():
    alpha, beta = 1.3, 0.2
    d = np.linspace(0.0, 4.0, 25)
    r = d * (alpha - beta * d)
    a, b = fit_gao_bon(d, r)
    assert a == pytest.approx(alpha, abs=1e-6) and b == pytest.approx(beta, abs=1e-6)
    # Also from the analytic best-of-n KLs, as it is used.
    d_bon = np.sqrt([analytic_bon_kl(n) for n in (1, 2, 4, 8, 16, 64, 256, 1000)])
    a, b = fit_gao_bon(d_bon, d_bon * (alpha - beta * d_bon))
    assert a == pytest.approx(alpha, abs=1e-6) and b == pytest.approx(beta, abs=1e-6)

    sigma = 0.05
    noisy = r + np.random.default_rng(0).normal(scale=sigma, size=d.size)
    a, b = fit_gao_bon(d, noisy)
    se = _ols_se(np.stack([d, -(d**2)], axis=1), sigma)  # ~(0.04, 0.01)
    assert abs(a - alpha) < 4 * se[0] and abs(b - beta) < 4 * se[1], (a, b, se)
    with pytest.raises(ValueError):
        fit_gao_bon([1.0, 1.0, 1.0], [0.5, 0.6, 0.7])  # one distinct d: not identifiable
    with pytest.raises(ValueError):
        fit_gao_bon([1.0, 2.0], [0.5])


def test_fit_gao_rl_noiseless_and_noisy():
    alpha, beta = 0.9, 0.4
    d = np.linspace(0.2, 8.0, 30)
    r = d * (alpha - beta * np.log(d))
    # Points at d = 0 (and a nonsense negative d) are dropped, not fitted.
    a, b = fit_gao_rl(np.concatenate([[0.0, -1.0], d]), np.concatenate([[0.0, 123.0], r]))
    assert a == pytest.approx(alpha, abs=1e-6) and b == pytest.approx(beta, abs=1e-6)

    sigma = 0.05
    noisy = r + np.random.default_rng(1).normal(scale=sigma, size=d.size)
    a, b = fit_gao_rl(d, noisy)
    se = _ols_se(np.stack([d, -d * np.log(d)], axis=1), sigma)
    assert abs(a - alpha) < 4 * se[0] and abs(b - beta) < 4 * se[1], (a, b, se)
    with pytest.raises(ValueError):
        fit_gao_rl([0.0, 2.0], [0.0, 1.0])  # one point left after dropping d = 0


def test_analytic_bon_kl():
    assert analytic_bon_kl(1) == 0.0
    assert analytic_bon_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert analytic_bon_kl(16) == pytest.approx(math.log(16) - 15 / 16)  # 1.8351
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError):
            analytic_bon_kl(bad)


# --------------------------------------------------------------------------- 5. over-optimisation verdict


def _points(gold, proxy, se, kl=None):
    kl = kl if kl is not None else [0.5 * i for i in range(len(gold))]
    return [
        {"step": 100 * i, "kl": kl[i], "gold": g, "gold_se": s, "proxy": p} for i, (g, p, s) in enumerate(zip(gold, proxy, se))
    ]


def test_overoptimisation_rise_then_fall():
    # Peak gold 1.0 at step 200 (kl 1.0); later golds 0.8, 0.5, 0.3 while the
    # proxy keeps rising. Threshold 1.96 * sqrt(0.05^2 + 0.05^2) = 0.1386;
    # falls 0.2, 0.5, 0.7 all exceed it; the largest is the last point's.
    out = overoptimisation(_points([0.0, 0.5, 1.0, 0.8, 0.5, 0.3], [0, 1, 2, 3, 4, 5], [0.05] * 6))
    assert out["verdict"] == "over-optimised"
    assert out["num_points"] == 6
    assert out["peak_step"] == 200 and out["peak_kl"] == 1.0 and out["peak_gold"] == 1.0
    assert out["final_gold"] == 0.3
    assert out["drop"] == pytest.approx(0.7) and out["drop_step"] == 500
    assert out["drop_threshold"] == pytest.approx(1.96 * math.sqrt(2) * 0.05)


def test_overoptimisation_dip_within_noise_not_flagged():
    # Peak 1.0, then 0.9 and 0.95 with se 0.1: threshold 1.96 * sqrt(0.02) =
    # 0.277 > falls of 0.1 and 0.05. Numbers are against the last point.
    gold, proxy = [0.0, 0.5, 1.0, 0.9, 0.95], [0, 1, 2, 3, 4]
    out = overoptimisation(_points(gold, proxy, [0.1] * 5))
    assert out["verdict"] == "no over-optimisation detected"
    assert out["drop"] == pytest.approx(0.05) and out["drop_step"] == 400 and out["final_gold"] == 0.95
    assert out["drop_threshold"] == pytest.approx(1.96 * math.sqrt(0.02))
    # The same curve measured precisely (se 0.01, threshold 0.028): the 0.1
    # fall at step 300 is real, so the test is on noise, not on the shape.
    precise = overoptimisation(_points(gold, proxy, [0.01] * 5))
    assert precise["verdict"] == "over-optimised"
    assert precise["drop_step"] == 300 and precise["drop"] == pytest.approx(0.1)


def test_overoptimisation_proxy_falls_too_not_flagged():
    # Gold falls well beyond its noise, but so does the proxy: the optimiser is
    # not exploiting the proxy, it is simply getting worse (e.g. instability).
    out = overoptimisation(_points([0.0, 1.0, 0.5], [0.0, 2.0, 1.0], [0.01] * 3))
    assert out["verdict"] == "no over-optimisation detected"
    assert out["drop"] == pytest.approx(0.5)
    # Proxy above the peak's at one later point and a real gold fall at
    # another -- but never both at the same point: still not flagged.
    out = overoptimisation(_points([1.0, 0.99, 0.5], [1.0, 3.0, 0.5], [0.01] * 3))
    assert out["verdict"] == "no over-optimisation detected"


def test_overoptimisation_not_measured_and_errors():
    for pts in ([], _points([1.0], [1.0], [0.1])):
        out = overoptimisation(pts)
        assert out["verdict"] == "not measured" and out["num_points"] == len(pts)
    # Gold still at its peak at the end: nothing fell.
    out = overoptimisation(_points([0.0, 0.5, 1.0], [0, 1, 2], [0.1] * 3))
    assert out["verdict"] == "no over-optimisation detected" and out["drop"] == 0.0 and out["peak_step"] == 200
    unordered = _points([0.0, 1.0, 0.5], [0, 1, 2], [0.01] * 3)
    unordered[0]["step"] = 999
    with pytest.raises(ValueError):
        overoptimisation(unordered)


# --------------------------------------------------------------------------- 6. cluster accuracy


def test_cluster_accuracy_value_and_width():
    base = (np.random.default_rng(2).random(60) < 0.7).astype(np.float64)
    base[::7] = 0.5  # some ties
    correct = np.repeat(base, 4)  # each prompt's 4 pairs agree: perfectly correlated
    prompts = np.repeat(np.arange(60), 4)
    clustered = cluster_accuracy(correct, prompts, seed=0)
    independent = cluster_accuracy(correct, np.arange(correct.size), seed=0)
    assert clustered.value == independent.value == pytest.approx(correct.mean())
    assert clustered.n == independent.n == 240  # pairs, not clusters
    # Four identical pairs per cluster carry the information of one: the
    # honest interval is ~sqrt(4) = 2x the one that treats them as independent.
    width_c = clustered.ci[1] - clustered.ci[0]
    width_i = independent.ci[1] - independent.ci[0]
    assert width_c > 1.6 * width_i, (width_c, width_i)
    # Singleton clusters are exactly the paired bootstrap of the pairs.
    assert independent == paired_bootstrap(correct, seed=0)


def test_cluster_accuracy_difference_by_hand_and_against_an_independent_bootstrap():
    # Prompt "a": A right on 3 pairs, B on 1 (d = 0, 1, 1); prompt "b": A wrong, B right (d = -1). mean(d) = 1/4.
    a, b, clusters = [1, 1, 1, 0], [1, 0, 0, 1], ["a", "a", "a", "b"]
    est = cluster_accuracy_difference(a, b, clusters, resamples=500, seed=0)
    assert est.value == pytest.approx(0.25) and est.n == 4
    # Whole clusters only: a replicate is 2/3 (all "a"), -1 (all "b") or a mix, so the interval lies in [-1, 2/3].
    assert -1.0 - 1e-12 <= est.ci[0] <= est.value <= est.ci[1] <= 2 / 3 + 1e-12
    # Singleton clusters: the percentile bootstrap of the per-pair differences, computed here independently.
    rng = np.random.default_rng(5)
    a, b = (rng.random(80) < 0.7).astype(float), (rng.random(80) < 0.6).astype(float)
    est = cluster_accuracy_difference(a, b, np.arange(80), resamples=2000, seed=3)
    ref = paired_bootstrap(a - b, resamples=2000, seed=3)
    assert est.value == pytest.approx(ref.value) and est.ci == pytest.approx(ref.ci, abs=1e-12)
    with pytest.raises(ValueError, match="pairs"):
        cluster_accuracy_difference([1, 0], [1], ["a", "b"])


def test_cluster_accuracy_hand_case_and_errors():
    # Unequal clusters: "a" has 3 pairs (1, 1, 0.5), "b" has 1 (0): mean over
    # pairs 2.5 / 4, not the mean of cluster means ((2.5/3 + 0) / 2).
    est = cluster_accuracy([1, 1, 0.5, 0], ["a", "a", "a", "b"], resamples=300, seed=0)
    assert isinstance(est, Estimate)
    assert est.value == pytest.approx(0.625) and est.n == 4
    # Replicates are pair-weighted means of whole clusters: only {0, 2.5/4,
    # 2.5/3} are possible, so the interval lies within [0, 2.5/3].
    assert 0.0 <= est.ci[0] <= est.ci[1] <= 2.5 / 3 + 1e-12
    with pytest.raises(ValueError):
        cluster_accuracy([1, 0], ["a"])
    with pytest.raises(ValueError):
        cluster_accuracy([1, 2], ["a", "b"])
    with pytest.raises(ValueError):
        cluster_accuracy([], [])


# --------------------------------------------------------------------------- the seeds-and-prompts bootstrap


def test_seed_cluster_bootstrap_replicates_are_resampled_means():
    """Two seeds, two prompts of one pair each, values [[1, 0], [0, 0]]: a replicate draws 2 seeds and 2 prompts
    with replacement, so its mean is (drawn seeds' count of seed 0) / 2 * (drawn prompts' count of prompt 0) / 2, one
    of 0, 1/4, 1/2, 1: both ends of the interval must be among them, the point estimate is 1/4, and n counts seeds."""
    est = seed_cluster_bootstrap([[1.0, 0.0], [0.0, 0.0]], ["p", "q"], resamples=4000, seed=3)
    assert est.value == 0.25 and est.n == 2
    assert est.ci[0] == 0.0 and est.ci[1] == 1.0  # P(replicate = 1) = 1/16 > 2.5%, and P(0) = 1 - 9/16 > 2.5%
    # Pairs of one prompt move together: one prompt of two pairs ([1, 1] and [0, 0] under the two seeds) leaves only
    # the seed draw, so replicates are 0, 1/2 or 1 and the interval spans [0, 1].
    one_prompt = seed_cluster_bootstrap([[1.0, 1.0], [0.0, 0.0]], ["p", "p"], resamples=4000, seed=3)
    assert one_prompt.value == 0.5 and one_prompt.ci == (0.0, 1.0)
    # Every seed alike and every prompt alike: no spread at all.
    flat = seed_cluster_bootstrap(np.full((5, 6), 0.3), list("aabbcc"))
    assert flat.value == pytest.approx(0.3) and flat.ci == pytest.approx((0.3, 0.3))


def test_seed_cluster_bootstrap_covers_a_crossed_design():
    """value[s, p] = 0.1 + seed effect + prompt effect + noise (normal); the 95% interval covers the true mean
    0.1 in most of 300 repeats: Owen's two-way bootstrap is conservative, so at least 93%."""
    rng = np.random.default_rng(0)
    covered = 0
    for repeat in range(300):
        seeds, prompts = 30, 40
        table = 0.1 + rng.normal(0, 0.05, (seeds, 1)) + rng.normal(0, 0.05, (1, prompts)) + rng.normal(0, 0.05, (seeds, prompts))
        est = seed_cluster_bootstrap(table, list(range(prompts)), resamples=500, seed=repeat)
        covered += est.ci[0] <= 0.1 <= est.ci[1]
    assert covered / 300 >= 0.93


def test_seed_cluster_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="clusters has 1"):
        seed_cluster_bootstrap([[1.0, 0.0]], ["p"])
    with pytest.raises(ValueError, match="finite"):
        seed_cluster_bootstrap([[float("nan")]], ["p"])
    with pytest.raises(ValueError, match="non-empty"):
        seed_cluster_bootstrap([[]], [])
