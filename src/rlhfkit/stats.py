"""Statistics for evaluation results: bootstrap intervals, a paired permutation test, and the Gao et al. fits.

Everything here is a pure function of plain numbers (numpy only, no torch), so
it can be unit-tested against hand-worked answers and reused by the report,
the eval stage and notebooks alike.

* :func:`paired_bootstrap` -- mean of per-unit values with a percentile
  bootstrap interval, the units (prompts) resampled with replacement
  (Efron & Tibshirani 1993, ch. 6 and 13).
* :func:`win_fractions` -- per-prompt win fraction of a policy over a baseline
  from several samples of each, ties counting 1/2 (the unit that
  :func:`paired_bootstrap` then resamples).
* :func:`sign_flip_p_value` -- two-sided paired permutation (sign-flip) test,
  exact for small n and Monte Carlo with the Phipson & Smyth 2010 correction
  otherwise.
* :func:`cluster_accuracy` -- accuracy over preference pairs with a cluster
  bootstrap: pairs from one prompt are resampled together (Efron & Tibshirani
  1993; the cluster / block bootstrap of Davison & Hinkley 1997, sec. 3.8).
* :func:`seed_cluster_bootstrap` -- the mean of a (repeats x pairs) table with an
  interval that resamples repeats and prompt clusters together (Owen 2007).
* :func:`fit_gao_bon`, :func:`fit_gao_rl` -- the functional forms of Gao,
  Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization",
  fitted by least squares.
* :func:`overoptimisation` -- a noise-aware verdict on whether gold reward fell
  while the proxy kept rising along a training run.
* :func:`analytic_bon_kl` -- the analytic KL of best-of-n sampling.

Why the bootstrap is over *units* (prompts, clusters) and never over samples:
responses to one prompt share its difficulty, so they are correlated, and
resampling them independently would understate the variance.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Bootstrap and sign-flip resamples are drawn in blocks of at most this many
# index entries, so memory stays ~tens of MB however many units or resamples.
_BLOCK_ELEMENTS = 1 << 22

# Largest number of non-zero differences for which the sign-flip test
# enumerates every pattern (2^16 = 65,536 patterns x 16 is ~1M entries).
_EXACT_MAX_N = 16

# z for a two-sided 95% normal interval, used by :func:`overoptimisation`.
_Z95 = 1.96


@dataclass
class Estimate:
    """A point estimate with an interval and the number of independent units behind it."""

    value: float
    """Point estimate."""
    ci: tuple[float, float]
    """Interval at the requested level (95% by default): (low, high)."""
    n: int
    """Number of units it rests on (prompts, pairs: see the function that returned it)."""

    def as_dict(self) -> dict:
        """JSON-ready ``{"value": v, "ci": [lo, hi], "n": n}`` (plain Python numbers)."""
        return {"value": float(self.value), "ci": [float(self.ci[0]), float(self.ci[1])], "n": int(self.n)}


# --------------------------------------------------------------------------- helpers


def _finite_vector(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return arr


def _check_bootstrap_args(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _bootstrap_ratio_replicates(
    numerators: np.ndarray, denominators: np.ndarray | None, *, resamples: int, seed: int
) -> np.ndarray:
    """Bootstrap replicates of ``sum(num[idx]) / sum(den[idx])`` over units resampled with replacement.

    numerators, denominators: shape (G,), one entry per unit; ``denominators``
    None means every unit weighs 1 (a plain mean, skipping a second gather).
    Returns shape (resamples,). The resample index matrix is drawn in blocks of
    rows, each block a (rows, G) matrix, so the whole thing is vectorised.
    """
    units = numerators.shape[0]
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _BLOCK_ELEMENTS // units)
    out = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, rows_per_block):
        rows = min(rows_per_block, resamples - start)
        idx = rng.integers(0, units, size=(rows, units))
        num = numerators[idx].sum(axis=1)
        if denominators is None:
            out[start : start + rows] = num / units
        else:
            out[start : start + rows] = num / denominators[idx].sum(axis=1)
    return out


# --------------------------------------------------------------------------- bootstrap


def paired_bootstrap(per_unit: Sequence[float], *, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of per-unit values with a percentile bootstrap interval over units.

    Units are resampled with replacement (Efron & Tibshirani 1993, ch. 6; the
    percentile interval of ch. 13). "Paired" because each unit already holds a
    paired quantity -- e.g. a prompt's win fraction of policy over baseline, or
    its gold-score difference -- so the pairing is kept by resampling whole units.

    per_unit: shape (n,), finite, n >= 1.
    Returns ``Estimate(value=mean, ci=(lo, hi), n=n)``; with n = 1 the interval
    is the single value.

    At n = 200 the 95% percentile interval covers the true mean ~94-95% of the
    time (tests/test_stats.py checks coverage over 1,000 synthetic repeats);
    with a few tens of units it undercovers, since it ignores the extra width
    a t-interval would add.
    """
    _check_bootstrap_args(resamples, level)
    x = _finite_vector(per_unit, "per_unit")
    if x.size == 0:
        raise ValueError("per_unit is empty")
    replicates = _bootstrap_ratio_replicates(x, None, resamples=resamples, seed=seed)
    return Estimate(value=float(x.mean()), ci=_percentile_interval(replicates, level), n=int(x.size))


def cluster_accuracy(
    correct: Sequence[float], clusters: Sequence[Hashable], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> Estimate:
    """Accuracy over pairs with a cluster bootstrap interval: pairs of one prompt are resampled together.

    correct: shape (n_pairs,), each in [0, 1] (1 right, 0 wrong, 0.5 a tie).
    clusters: shape (n_pairs,), the cluster (prompt) of each pair; any hashable.

    The pairs drawn from one prompt are correlated (same prompt, often shared
    responses), so the bootstrap draws *clusters* with replacement and takes
    every pair of each drawn cluster (the cluster bootstrap; Efron & Tibshirani
    1993, resampling the independent units; Davison & Hinkley 1997, sec. 3.8).
    Each replicate is the pair-weighted mean ``sum(correct) / num_pairs`` over
    the drawn clusters, the same statistic as the point estimate.

    Returns ``Estimate(value=mean over pairs, ci, n=number of pairs)`` -- n
    counts pairs, not clusters. When every pair is its own cluster this is
    :func:`paired_bootstrap` of ``correct`` (same seed, same interval).
    """
    _check_bootstrap_args(resamples, level)
    c = _finite_vector(correct, "correct")
    if c.size == 0:
        raise ValueError("correct is empty")
    if len(clusters) != c.size:
        raise ValueError(f"correct has {c.size} entries but clusters has {len(clusters)}")
    if np.any((c < 0.0) | (c > 1.0)):
        raise ValueError("correct must lie in [0, 1] (1 right, 0 wrong, 0.5 tie)")
    # Integer ids in order of first appearance: makes the result independent of
    # the cluster labels' type or hash order.
    ids: dict[Hashable, int] = {}
    cluster_index = np.fromiter((ids.setdefault(k, len(ids)) for k in clusters), dtype=np.int64, count=c.size)
    sums = np.bincount(cluster_index, weights=c, minlength=len(ids))
    sizes = np.bincount(cluster_index, minlength=len(ids)).astype(np.float64)
    # All clusters of size 1: skip the denominator gather, and match
    # paired_bootstrap exactly (same draws, same arithmetic).
    denominators = None if len(ids) == c.size else sizes
    replicates = _bootstrap_ratio_replicates(sums, denominators, resamples=resamples, seed=seed)
    return Estimate(value=float(c.mean()), ci=_percentile_interval(replicates, level), n=int(c.size))


def cluster_accuracy_difference(
    correct_a: Sequence[float],
    correct_b: Sequence[float],
    clusters: Sequence[Hashable],
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Accuracy of model A minus model B on the same pairs, with a cluster bootstrap interval (pairs of a prompt
    resampled together): the paired comparison of two reward models judged on one held-out set, far tighter than
    comparing their two intervals, since both face the same hard and easy pairs.

    correct_a, correct_b: shape (n_pairs,), each in [0, 1], aligned (pair i is the same pair in both); clusters:
    shape (n_pairs,). Each pair's difference ``d = a - b`` lies in [-1, 1]; this is :func:`cluster_accuracy` of
    ``(d + 1) / 2`` mapped back by ``2 x - 1`` (a linear map: the pair-weighted mean and the percentile interval map
    exactly). Returns ``Estimate(value=mean(d), ci, n=number of pairs)``.
    """
    a, b = _finite_vector(correct_a, "correct_a"), _finite_vector(correct_b, "correct_b")
    if a.size != b.size:
        raise ValueError(f"correct_a has {a.size} pairs but correct_b has {b.size}")
    half = cluster_accuracy((a - b + 1.0) / 2.0, clusters, resamples=resamples, level=level, seed=seed)
    return Estimate(value=2 * half.value - 1, ci=(2 * half.ci[0] - 1, 2 * half.ci[1] - 1), n=half.n)


def cluster_sums(table: np.ndarray, clusters: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    """A (rows, pairs) table summed over each cluster's pairs: ``(sums (rows, C), sizes (C,))``, the clusters in order
    of first appearance in ``clusters`` (shape (pairs,)) and ``sizes`` their pair counts. What a bootstrap that
    resamples whole clusters needs (:func:`seed_cluster_bootstrap`)."""
    ids: dict[Hashable, int] = {}
    cluster_index = np.fromiter((ids.setdefault(k, len(ids)) for k in clusters), dtype=np.int64, count=table.shape[1])
    sums = np.zeros((table.shape[0], len(ids)))
    np.add.at(sums, (slice(None), cluster_index), table)
    return sums, np.bincount(cluster_index, minlength=len(ids)).astype(np.float64)


def seed_cluster_bootstrap(
    values: Sequence[Sequence[float]], clusters: Sequence[Hashable], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> Estimate:
    """Mean of a (seeds x pairs) table with an interval that resamples seeds and prompt clusters at once.

    values: shape (S, n_pairs): row s holds each held-out pair's value under repeat (seed) s of an experiment -- for
    example a pair's correctness under an actively chosen reward model minus under a randomly chosen one, in [-1, 1].
    clusters: shape (n_pairs,), the prompt of each pair (pairs of one prompt are resampled together, as in
    :func:`cluster_accuracy`).

    Two sources of chance are in such a number: which pairs the repeats happened to draw (the seed), and which
    prompts happened to be held out. Each bootstrap replicate draws S seeds with replacement *and*, independently,
    the clusters with replacement, and takes the pair-weighted mean over the drawn seeds and clusters: the two-way
    ("pigeonhole") bootstrap of Owen 2007 (Annals of Applied Statistics 1(2)), which for a crossed design is
    somewhat conservative (its variance counts the seed-by-pair interaction twice) but never ignores either
    source. Returns ``Estimate(value=mean over every entry, ci, n=S)``; with S = 1 it is the cluster bootstrap of
    the one row.
    """
    _check_bootstrap_args(resamples, level)
    table = np.asarray(values, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(f"values must be a non-empty (seeds, pairs) table, got shape {table.shape}")
    if not np.all(np.isfinite(table)):
        raise ValueError("values must be finite (no NaN or inf)")
    if len(clusters) != table.shape[1]:
        raise ValueError(f"values has {table.shape[1]} pairs a row but clusters has {len(clusters)}")
    sums, sizes = cluster_sums(table, clusters)
    seeds, groups = sums.shape
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=resamples).astype(np.float64)  # (R, S)
    cluster_counts = rng.multinomial(groups, np.full(groups, 1.0 / groups), size=resamples).astype(np.float64)  # (R, C)
    numerators = ((seed_counts @ sums) * cluster_counts).sum(axis=1)
    replicates = numerators / (seeds * (cluster_counts @ sizes))
    return Estimate(value=float(table.mean()), ci=_percentile_interval(replicates, level), n=seeds)


# --------------------------------------------------------------------------- win fractions


def _pairwise_win_fraction(policy: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """policy (P, K), baseline (P, L) -> (P,) fraction of the K*L pairs won, ties 1/2."""
    diff = policy[:, :, None] - baseline[:, None, :]  # (P, K, L)
    score = (diff > 0).astype(np.float64) + 0.5 * (diff == 0)
    return score.mean(axis=(1, 2))


def win_fractions(policy_scores: Sequence[Sequence[float]], baseline_scores: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-prompt win fraction of the policy over the baseline.

    policy_scores: num_prompts rows, row i the K_i >= 1 scores of the policy's
    samples for prompt i; baseline_scores: num_prompts rows of L_i >= 1
    baseline scores. Rows may differ in length (ragged).
    Returns shape (num_prompts,): for prompt i, the fraction of its K_i * L_i
    (policy, baseline) pairs that the policy wins, an exact tie counting 1/2
    (every pair compared, the Mann-Whitney U statistic divided by K_i L_i).

    Comparing all pairs within a prompt, rather than pairing sample j with
    sample j, uses every sample and does not depend on sample order; the
    result is one number per prompt, the independent unit for
    :func:`paired_bootstrap` (Efron & Tibshirani 1993).
    """
    if len(policy_scores) != len(baseline_scores):
        raise ValueError(f"{len(policy_scores)} prompts of policy scores but {len(baseline_scores)} of baseline scores")
    if len(policy_scores) == 0:
        return np.zeros(0, dtype=np.float64)
    # Rectangular input (same K and L on every prompt) is the common case: one
    # broadcast comparison instead of a Python loop over prompts.
    try:
        pol = np.asarray(policy_scores, dtype=np.float64)
        base = np.asarray(baseline_scores, dtype=np.float64)
        rectangular = pol.ndim == 2 and base.ndim == 2
    except ValueError:  # numpy refuses ragged nested sequences
        rectangular = False
    if rectangular:
        if pol.shape[1] == 0 or base.shape[1] == 0:
            raise ValueError("every prompt needs at least one policy and one baseline score")
        if not (np.all(np.isfinite(pol)) and np.all(np.isfinite(base))):
            raise ValueError("scores must be finite (a NaN would silently count as a loss)")
        return _pairwise_win_fraction(pol, base)
    out = np.empty(len(policy_scores), dtype=np.float64)
    for i, (p_row, b_row) in enumerate(zip(policy_scores, baseline_scores)):
        p = _finite_vector(p_row, f"policy_scores[{i}]")
        b = _finite_vector(b_row, f"baseline_scores[{i}]")
        if p.size == 0 or b.size == 0:
            raise ValueError(f"prompt {i} needs at least one policy and one baseline score")
        out[i] = _pairwise_win_fraction(p[None, :], b[None, :])[0]
    return out


# --------------------------------------------------------------------------- permutation test


def _count_at_least(signs: np.ndarray, d: np.ndarray, threshold: float) -> int:
    """Number of sign patterns (rows of ``signs``) whose |sum(sign * d)| >= threshold."""
    return int(np.count_nonzero(np.abs(signs @ d) >= threshold))


def sign_flip_p_value(differences: Sequence[float], *, resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided paired permutation (sign-flip) test of mean(differences) == 0.

    differences: shape (n,), one paired difference per independent unit
    (e.g. per-prompt gold score of policy minus baseline).

    Under the null each unit's difference is symmetric about 0, so its sign is
    a fair coin (Fisher 1935; Efron & Tibshirani 1993, ch. 15). The statistic is
    |sum(d)| (equivalent to |mean(d)|, n being fixed); the p-value is the
    fraction of sign patterns with |sum| at least the observed one.

    * Exact -- all 2^n patterns -- when n <= 16. Zero differences stay zero
      under a flip, so they are dropped first: each pattern of the non-zero
      ones occurs 2^(zeros) times among all 2^n, leaving the fraction
      unchanged; hence the test is also exact whenever at most 16 differences
      are non-zero.
    * Monte Carlo otherwise: ``resamples`` random patterns, p = (b + 1) / (m + 1)
      with b of the m patterns at least as extreme (Phipson & Smyth 2010: the
      observed pattern counts as one of the permutations, so p is never 0 and
      the test keeps its size).

    Returns 1.0 when every difference is 0 (no evidence either way).
    "At least as extreme" allows a relative slack of 1e-9 of sum(|d|), so
    patterns that tie the observed sum are not lost to floating-point rounding.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    d_all = _finite_vector(differences, "differences")
    if d_all.size == 0:
        raise ValueError("differences is empty")
    d = d_all[d_all != 0.0]
    if d.size == 0:
        return 1.0
    observed = abs(float(d.sum()))
    threshold = observed - 1e-9 * float(np.abs(d).sum())
    n = d.size
    if n <= _EXACT_MAX_N:
        # Row k is pattern k's signs: bit j of k set -> unit j flipped.
        bits = (np.arange(1 << n, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)) & 1
        signs = 1.0 - 2.0 * bits
        return _count_at_least(signs, d, threshold) / float(1 << n)
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _BLOCK_ELEMENTS // n)
    extreme = 0
    for start in range(0, resamples, rows_per_block):
        rows = min(rows_per_block, resamples - start)
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(rows, n), dtype=np.int8)
        extreme += _count_at_least(signs, d, threshold)
    return (extreme + 1) / (resamples + 1)


# --------------------------------------------------------------------------- Gao et al. 2022 fits


def _least_squares_2(columns: tuple[np.ndarray, np.ndarray], r: np.ndarray, form: str) -> tuple[float, float]:
    design = np.stack(columns, axis=1)  # (num_points, 2)
    coef, _, rank, _ = np.linalg.lstsq(design, r, rcond=None)
    # A rank-deficient design (e.g. every d equal) has no unique fit; lstsq
    # would quietly return the minimum-norm one, which means nothing.
    if rank < 2:
        raise ValueError(f"cannot fit {form}: the points do not determine both coefficients (need 2 distinct d)")
    return float(coef[0]), float(coef[1])


def _fit_inputs(d: Sequence[float], r: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    d_arr = _finite_vector(d, "d")
    r_arr = _finite_vector(r, "r")
    if d_arr.shape != r_arr.shape:
        raise ValueError(f"d has {d_arr.size} points but r has {r_arr.size}")
    return d_arr, r_arr


def fit_gao_bon(d: Sequence[float], r: Sequence[float]) -> tuple[float, float]:
    """Fit the best-of-n form of Gao et al. 2022, ``R(d) = d (alpha - beta d)``, by least squares.

    d: shape (num_points,), d = sqrt(KL(pi || pi_init)) in nats^(1/2) (for
    best-of-n, ``sqrt(analytic_bon_kl(n))``); r: shape (num_points,), the gold
    reward gain over the initial policy at each point. The form has no
    intercept (R(0) = 0 by construction), so it is linear in (alpha, beta) with
    design columns [d, -d^2]; ordinary (unweighted) least squares as in
    Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
    Overoptimization", eq. 1. Needs at least two distinct non-zero d.

    Returns (alpha, beta). The gold peak is at d* = alpha / (2 beta).
    """
    d_arr, r_arr = _fit_inputs(d, r)
    return _least_squares_2((d_arr, -(d_arr**2)), r_arr, "R = d (alpha - beta d)")


def fit_gao_rl(d: Sequence[float], r: Sequence[float]) -> tuple[float, float]:
    """Fit the RL form of Gao et al. 2022, ``R(d) = d (alpha - beta log d)``, by least squares.

    d: shape (num_points,), d = sqrt(KL(pi || pi_init)); r: shape (num_points,),
    gold reward gain over the initial policy. Points with d <= 0 are dropped:
    log d is undefined there, and R(0) = 0 holds in the limit anyway, so they
    carry no information about (alpha, beta). Linear in (alpha, beta) with
    design columns [d, -d log d]; ordinary least squares (Gao, Schulman &
    Hilton 2022, "Scaling Laws for Reward Model Overoptimization", eq. 2).
    Needs at least two remaining points that are not all at the same d.

    Returns (alpha, beta). The gold peak is at d* = exp(alpha / beta - 1).
    """
    d_arr, r_arr = _fit_inputs(d, r)
    keep = d_arr > 0.0
    d_arr, r_arr = d_arr[keep], r_arr[keep]
    return _least_squares_2((d_arr, -d_arr * np.log(d_arr)), r_arr, "R = d (alpha - beta log d)")


# --------------------------------------------------------------------------- over-optimisation verdict


_VERDICT_FIELDS = ("peak_step", "peak_kl", "peak_gold", "peak_proxy", "final_gold", "drop", "drop_threshold", "drop_step")


def overoptimisation(points: Sequence[Mapping]) -> dict:
    """Did gold reward fall significantly while the proxy kept rising? (Goodhart; Gao et al. 2022.)

    points: a training run's probe points in step order, each a mapping with
    "step", "kl", "gold", "gold_se" (standard error of that point's mean gold
    score, >= 0) and "proxy".

    Let p* be the point with the highest gold (the earliest, on a tie). The run
    is **over-optimised** when some later point q has proxy(q) > proxy(p*) and

        gold(p*) - gold(q) > 1.96 * sqrt(se(p*)^2 + se(q)^2),

    i.e. the optimised (proxy) reward still rose while the gold reward fell by
    more than its noise -- the signature of reward-model over-optimisation in
    Gao, Schulman & Hilton 2022. The test is on the size of the fall relative
    to its standard error, not on the sign of a fitted slope, so noisy
    wiggles around a plateau are not flagged. (The two points' errors are
    treated as independent: they are means over fresh samples at each probe.)

    Returns a dict that always has "verdict" and "num_points":

    * fewer than 2 points: verdict "not measured", the numeric fields None;
    * over-optimised: verdict "over-optimised"; "drop", "drop_threshold" and
      "drop_step" describe the qualifying later point with the largest fall;
    * otherwise: verdict "no over-optimisation detected", with "drop",
      "drop_threshold" and "drop_step" computed against the last point.

    Numeric fields: "peak_step", "peak_kl", "peak_gold", "peak_proxy" (of p*),
    "final_gold" (gold of the last point), "drop" (= peak_gold - gold of the
    compared point), "drop_threshold" (1.96 sqrt(se(p*)^2 + se(q)^2)),
    "drop_step" (step of the compared point).
    """
    num_points = len(points)
    if num_points < 2:
        return {"verdict": "not measured", "num_points": num_points, **{k: None for k in _VERDICT_FIELDS}}
    steps = [p["step"] for p in points]
    # "Later" is defined by list order, so an unordered list is a caller bug
    # that would silently change the verdict.
    if any(b < a for a, b in zip(steps, steps[1:])):
        raise ValueError("points must be in step order")
    gold = _finite_vector([p["gold"] for p in points], "gold")
    se = _finite_vector([p["gold_se"] for p in points], "gold_se")
    proxy = _finite_vector([p["proxy"] for p in points], "proxy")
    if np.any(se < 0):
        raise ValueError("gold_se must be >= 0")

    peak = int(np.argmax(gold))  # first maximum: the earliest peak
    later = np.arange(peak + 1, num_points)
    drops = gold[peak] - gold[later]
    thresholds = _Z95 * np.sqrt(se[peak] ** 2 + se[later] ** 2)
    qualifies = (proxy[later] > proxy[peak]) & (drops > thresholds)

    if np.any(qualifies):
        verdict = "over-optimised"
        candidates = later[qualifies]
        compared = int(candidates[np.argmax(gold[peak] - gold[candidates])])
    else:
        verdict = "no over-optimisation detected"
        compared = num_points - 1
    result: dict[str, Any] = {
        "verdict": verdict,
        "num_points": num_points,
        "peak_step": steps[peak],
        "peak_kl": float(points[peak]["kl"]),
        "peak_gold": float(gold[peak]),
        "peak_proxy": float(proxy[peak]),
        "final_gold": float(gold[-1]),
        "drop": float(gold[peak] - gold[compared]),
        "drop_threshold": float(_Z95 * math.sqrt(se[peak] ** 2 + se[compared] ** 2)),
        "drop_step": steps[compared],
    }
    return result


# --------------------------------------------------------------------------- best-of-n


def analytic_bon_kl(n: int) -> float:
    """KL(best-of-n || base) by the analytic formula ``log n - (n - 1) / n`` (nats).

    The formula of Stiennon et al. 2020 (appendix), used for best-of-n in Gao,
    Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization".
    It is exact for continuous rewards with no ties and an upper bound in
    general (Beirami et al. 2024), so it is the conservative x-coordinate.
    n: number of samples, n >= 1 (n = 1 gives 0).
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    n = int(n)
    return math.log(n) - (n - 1) / n
