"""Elo / Bradley-Terry ratings of models from labelled comparisons (the math; the stage is :mod:`rlhfkit.elo`).

The *players* are models or checkpoints. A :class:`~rlhfkit.data.records.Comparison`
becomes a game between players when its ``meta`` says who wrote each response:

    meta["players"] = [player_of_response_0, player_of_response_1, ...]

one name per entry of ``responses``, in the same order (``rlhfkit eval`` writes
its comparisons this way). A pair gives one match; a tie one match scored 0.5;
a K-way ranking its K(K-1)/2 implied pairs, as
:meth:`~rlhfkit.data.records.Comparison.pairs` expands them. Records without
``meta["players"]`` are skipped and counted.

Ratings (:func:`bradley_terry_ratings`) follow the Bradley-Terry model (Bradley &
Terry 1952): player i has a strength ``p_i = exp(theta_i)`` and beats j with
probability ``p_i / (p_i + p_j) = sigmoid(theta_i - theta_j)``. Strengths are
the maximum of the log-likelihood

    sum_{i != j} W_ij log sigmoid(theta_i - theta_j)

(``W_ij`` is i's total score against j), found by Newton's method; Hunter 2004
gives the classic MM algorithm ``p_i <- W_i / sum_j N_ij / (p_i + p_j)`` and
the conditions for the maximum to exist, and the tests check the fit against
MM. Ratings are on the Elo scale (Elo 1978): ``rating_i = 400 log10 p_i + c``,
so a 400-point gap means 10:1 odds -- the logistic curve of Elo's own
expected-score formula -- and ``c`` puts the mean rating (or a named anchor
player) at 1000.

Departures from the textbook MLE, and why:

* **Ties count as half a win each way** (score 0.5), the tie target of
  :func:`rlhfkit.losses.preference_loss`, rather than a tie model with its own
  parameter (Rao-Kupper, Davidson): one number per player, and the same
  treatment as the reward model.
* **A weak prior**: every player also plays ``prior`` virtual games, each a tie,
  against a fixed reference of strength 1 (``theta = 0``); this adds
  ``prior * (log sigmoid(theta_i) + log sigmoid(-theta_i)) / 2`` per player.
  Without it an undefeated player's MLE is infinite: the MLE exists only when
  the "scored against" graph is strongly connected (Hunter 2004, Assumption
  1). With it every rating is finite, at the cost of shrinking ratings a
  little towards each other (one virtual game per player by default: two
  players at 3-1 end 165 Elo apart instead of 191). ``prior=0`` gives the
  plain MLE.

:func:`rating_table` adds 95% intervals from a percentile bootstrap over
matches, and per-player games, wins, losses, ties and win rate.
:func:`online_elo` is classic sequential Elo, for reference: its result depends
on the order of the games, which is why the table uses Bradley-Terry.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhfkit import log
from rlhfkit.data.records import Comparison

Match = tuple[str, str, float]
"""``(player_i, player_j, score of i)``: 1.0 i won, 0.0 j won, 0.5 a tie."""

BASE_RATING = 1000.0
"""The mean rating (or the anchor player's rating)."""

ELO_PER_NAT = 400.0 / math.log(10.0)
"""Elo points per unit of natural-log strength: ``400 log10 p = ELO_PER_NAT * ln p``."""

_TOLERANCE = 1e-10
"""The fit stops when no log-strength moves more than this (about 2e-8 Elo points)."""

_SCORES = (0.0, 0.5, 1.0)


# ---------------------------------------------------------------------------
# Comparisons -> matches
# ---------------------------------------------------------------------------


def matches_from_comparisons(comparisons: Iterable[Comparison]) -> list[Match]:
    """The matches implied by comparisons that name their players in ``meta["players"]``.

    Each comparison gives one ``(better, worse, 1.0)`` match per implied pair (a
    K-way ranking gives K(K-1)/2), a tie gives ``(players[ranking[0]],
    players[ranking[1]], 0.5)``. Records without ``meta["players"]`` are
    skipped, and pairs of two responses by the same player (which say nothing
    about ratings) are dropped; both are counted in a printed note. Raises
    ValueError when no record names its players, or when one names them wrongly.
    """
    comparisons = list(comparisons)
    matches, skipped, same_player = collect_matches(comparisons, first_number=0, label="comparison")
    if comparisons and skipped == len(comparisons):
        raise ValueError(
            f"none of the {len(comparisons)} comparisons has meta['players'] (one player name per response, "
            "e.g. {'players': ['sft', 'dpo']}); ratings need to know who wrote each response"
        )
    if skipped or same_player:
        log.info(
            f"elo: {len(matches)} matches from {len(comparisons) - skipped} comparisons; "
            f"{skipped} comparisons without meta['players'] skipped, {same_player} same-player pairs dropped"
        )
    return matches


def collect_matches(comparisons: list[Comparison], *, first_number: int, label: str) -> tuple[list[Match], int, int]:
    """``(matches, comparisons skipped, same-player pairs dropped)``; errors name ``label`` and number."""
    matches: list[Match] = []
    skipped = same_player = 0
    for number, comparison in enumerate(comparisons, start=first_number):
        found = _comparison_matches(comparison, where=f"{label} {number}")
        if found is None:
            skipped += 1
            continue
        kept = [m for m in found if m[0] != m[1]]
        same_player += len(found) - len(kept)
        matches.extend(kept)
    return matches, skipped, same_player


def _comparison_matches(comparison: Comparison, *, where: str) -> list[Match] | None:
    """Matches of one comparison (same-player pairs included), or None when it names no players."""
    players = comparison.meta.get("players") if isinstance(comparison.meta, dict) else None
    if players is None:
        return None
    k = len(comparison.responses)
    if not isinstance(players, list) or len(players) != k:
        raise ValueError(f"{where}: meta['players'] must be a list of {k} player names (one per response), got {players!r}")
    for i, name in enumerate(players):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: meta['players'][{i}] must be a non-empty string, got {name!r}")
    return [(players[a], players[b], target) for a, b, target in comparison.pairs()]


# ---------------------------------------------------------------------------
# Tallies: matches as counts of distinct outcomes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tally:
    """Matches grouped by outcome ``(i, j, score of i)``; i < j, as indices into ``players``.

    The bootstrap resamples these counts (a multinomial over outcomes is the
    same as resampling matches with replacement) instead of match lists.
    """

    players: list[str]
    """Player names, sorted (so the result never depends on match order)."""
    first: np.ndarray
    """(C,) index of player i of each outcome."""
    second: np.ndarray
    """(C,) index of player j of each outcome."""
    score: np.ndarray
    """(C,) score of i: 0.0, 0.5 or 1.0."""
    count: np.ndarray
    """(C,) matches with this outcome."""


def _tally(matches: Sequence[Match]) -> _Tally:
    counts: Counter[tuple[str, str, float]] = Counter()
    for n, match in enumerate(matches):
        if not (isinstance(match, (tuple, list)) and len(match) == 3):
            raise ValueError(f"match {n}: expected (player_i, player_j, score), got {match!r}")
        a, b, score = match
        if not isinstance(a, str) or not isinstance(b, str):
            raise ValueError(f"match {n}: player names must be strings, got {a!r} and {b!r}")
        if a == b:
            raise ValueError(f"match {n}: player {a!r} against itself")
        if score not in _SCORES:
            raise ValueError(f"match {n}: score must be 1 (win), 0 (loss) or 0.5 (tie), got {score!r}")
        # One orientation per pair of names, so (a, b, 1) and (b, a, 0) are one outcome.
        counts[(a, b, float(score)) if a < b else (b, a, 1.0 - float(score))] += 1
    if not counts:
        raise ValueError("no matches to rate")
    players = sorted({name for a, b, _ in counts for name in (a, b)})
    index = {name: i for i, name in enumerate(players)}
    outcomes = sorted(counts)
    return _Tally(
        players=players,
        first=np.array([index[a] for a, _, _ in outcomes]),
        second=np.array([index[b] for _, b, _ in outcomes]),
        score=np.array([s for _, _, s in outcomes]),
        count=np.array([counts[o] for o in outcomes], dtype=np.float64),
    )


def _score_matrices(tally: _Tally, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(wins, games)``, each (B, n, n), for B count vectors ``counts`` (B, C).

    ``wins[b, i, j]`` is i's total score against j (a tie adds 0.5 to both
    sides); ``games[b, i, j] = games[b, j, i]`` the matches between them.
    """
    n = len(tally.players)
    ij = tally.first * n + tally.second
    ji = tally.second * n + tally.first
    wins = np.zeros((n * n, counts.shape[0]))
    games = np.zeros((n * n, counts.shape[0]))
    np.add.at(wins, ij, (counts * tally.score).T)
    np.add.at(wins, ji, (counts * (1.0 - tally.score)).T)
    np.add.at(games, ij, counts.T)
    np.add.at(games, ji, counts.T)
    return wins.T.reshape(-1, n, n), games.T.reshape(-1, n, n)


# ---------------------------------------------------------------------------
# Bradley-Terry
# ---------------------------------------------------------------------------


def _strongly_connected(wins: np.ndarray) -> bool:
    """Whether every player reaches every other along "scored against" edges (wins: (n, n)).

    This is the condition for the prior-free MLE to exist (Hunter 2004,
    Assumption 1); a tie is an edge both ways.
    """
    edges = wins > 0
    for adjacency in (edges, edges.T):
        seen = np.zeros(len(edges), dtype=bool)
        seen[0] = True
        frontier = seen.copy()
        while frontier.any():
            frontier = adjacency[frontier].any(0) & ~seen
            seen |= frontier
        if not seen.all():
            return False
    return True


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)  # stable for large |x|


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_sigmoid(x))


def _log_posterior(theta: np.ndarray, wins: np.ndarray, prior: float) -> np.ndarray:
    """Bradley-Terry log-likelihood plus the virtual-tie prior. theta (B, n), wins (B, n, n) -> (B,)."""
    value = (wins * _log_sigmoid(theta[:, :, None] - theta[:, None, :])).sum((1, 2))
    return value + prior * 0.5 * (_log_sigmoid(theta) + _log_sigmoid(-theta)).sum(-1)


def _fit_log_strengths(wins: np.ndarray, games: np.ndarray, *, prior: float, iterations: int) -> np.ndarray:
    """Bradley-Terry log-strengths ``theta = ln p``, batched: (B, n, n) x2 -> (B, n).

    Maximises the log-posterior (concave in theta) by Newton's method with
    backtracking. Why not Hunter's MM: it converges linearly, and when one model
    beats another almost every time -- a tuned policy against its base model --
    it needs ~10^4 steps where Newton needs ~10.

    With ``prior > 0`` each player also has ``prior`` virtual tied games against
    a reference with ``theta = 0``, which fixes the scale and makes the
    Hessian definite. With ``prior == 0`` theta is defined up to a common
    shift; adding the all-ones matrix to the negated Hessian removes that
    direction, so every Newton step keeps ``mean(theta) = 0`` (the gradient
    sums to zero).
    """
    batch, n = wins.shape[:2]
    theta = np.zeros((batch, n))
    diagonal = np.arange(n)
    gauge = np.ones((n, n)) if prior == 0 else np.zeros((n, n))
    for _ in range(iterations):
        p_beats = _sigmoid(theta[:, :, None] - theta[:, None, :])  # (B, n, n): P(i beats j)
        grad = (wins - games * p_beats).sum(-1)
        curvature = games * p_beats * (1.0 - p_beats)
        neg_hessian = gauge - curvature
        neg_hessian[:, diagonal, diagonal] += curvature.sum(-1)
        if prior > 0:
            p_ref = _sigmoid(theta)  # (B, n): P(i beats the reference)
            grad += prior * (0.5 - p_ref)
            neg_hessian[:, diagonal, diagonal] += prior * p_ref * (1.0 - p_ref)
        step = np.linalg.solve(neg_hessian, grad[..., None])[..., 0]
        # Backtracking (Armijo): halve the step until the log-posterior rises enough. Tiny
        # steps are taken whole: Newton is exact there, and rounding can hide their gain.
        current, slope = _log_posterior(theta, wins, prior), (grad * step).sum(-1)
        small = np.abs(step).max(-1) < 1e-6
        scale = np.ones(batch)
        for _ in range(60):
            candidate = theta + scale[:, None] * step
            accepted = small | (_log_posterior(candidate, wins, prior) >= current + 1e-4 * scale * slope)
            if accepted.all():
                break
            scale = np.where(accepted, scale, scale / 2)
        theta = theta + scale[:, None] * step
        if np.abs(scale[:, None] * step).max() < _TOLERANCE:
            break
    return theta


def _to_elo(log_strengths: np.ndarray, anchor: int | None) -> np.ndarray:
    """Log-strengths (B, n) -> Elo ratings (B, n): mean (or player ``anchor``) at BASE_RATING."""
    ratings = ELO_PER_NAT * log_strengths
    reference = ratings.mean(-1, keepdims=True) if anchor is None else ratings[:, anchor : anchor + 1]
    return ratings - reference + BASE_RATING


def _ratings(tally: _Tally, counts: np.ndarray, *, prior: float, iterations: int, anchor: str | None) -> np.ndarray:
    """Elo ratings (B, n) of ``tally.players`` for B count vectors ``counts`` (B, C)."""
    if not (prior >= 0 and math.isfinite(prior)):
        raise ValueError(f"prior must be a finite number >= 0, got {prior!r}")
    if anchor is not None and anchor not in tally.players:
        raise ValueError(f"anchor {anchor!r} is not a player; players: {', '.join(tally.players)}")
    wins, games = _score_matrices(tally, counts)
    if prior == 0 and not all(_strongly_connected(w) for w in wins):
        raise ValueError(
            "with prior=0 the Bradley-Terry MLE is infinite: some player never beat (or never lost to) the others; use prior > 0"
        )
    log_strengths = _fit_log_strengths(wins, games, prior=prior, iterations=iterations)
    return _to_elo(log_strengths, None if anchor is None else tally.players.index(anchor))


def bradley_terry_ratings(
    matches: Sequence[Match], *, iterations: int = 100, prior: float = 1.0, anchor: str | None = None
) -> dict[str, float]:
    """Bradley-Terry (Bradley & Terry 1952) ratings on the Elo scale (Elo 1978), best first.

    Maximum-likelihood strengths (by Newton's method; Hunter 2004's MM
    algorithm reaches the same point, slower), ties counted as half a win each
    way, with ``prior`` virtual tied games per player against a fixed
    reference. ``prior=0`` is the plain MLE, which raises ValueError when it is
    infinite (some player never won, or never lost, against the rest: the
    comparison graph is not strongly connected, Hunter 2004). ``rating = 400
    log10(strength)``, shifted so the mean rating is 1000, or ``anchor``'s
    rating is. ``iterations`` caps the Newton steps (about 10 are needed); it
    stops once no log-strength moves more than 1e-10.
    """
    tally = _tally(matches)
    ratings = _ratings(tally, tally.count[None, :], prior=prior, iterations=iterations, anchor=anchor)[0]
    return _by_rating(tally.players, ratings)


def _by_rating(players: list[str], ratings: np.ndarray) -> dict[str, float]:
    """``{player: rating}``, best first (ties by name)."""
    order = sorted(range(len(players)), key=lambda i: (-ratings[i], players[i]))
    return {players[i]: float(ratings[i]) for i in order}


def online_elo(matches: Iterable[Match], k: float = 32.0, initial: float = BASE_RATING) -> dict[str, float]:
    """Classic sequential Elo (Elo 1978), in match order; for reference.

    Before each match, i's expected score is ``E = 1 / (1 + 10^((R_j - R_i) / 400))``;
    then ``R_i += k (s - E)`` and ``R_j -= k (s - E)``. Players enter at
    ``initial``; the result is in order of first appearance. Unlike
    :func:`bradley_terry_ratings` the result depends on the order of the matches.
    """
    ratings: dict[str, float] = {}
    for a, b, score in matches:
        ra, rb = ratings.setdefault(a, initial), ratings.setdefault(b, initial)
        expected = 1.0 / (1.0 + 10.0 ** ((rb - ra) / 400.0))
        ratings[a] = ra + k * (score - expected)
        ratings[b] = rb - k * (score - expected)
    return ratings


# ---------------------------------------------------------------------------
# The rating table
# ---------------------------------------------------------------------------


def rating_table(
    matches: Sequence[Match],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    anchor: str | None = None,
    prior: float = 1.0,
    iterations: int = 100,
) -> list[dict[str, Any]]:
    """One row per player, best first: Bradley-Terry rating, 95% interval and record.

    Row keys: ``player``, ``rating`` (:func:`bradley_terry_ratings`),
    ``ci_low``/``ci_high`` (2.5th and 97.5th percentiles of the rating over
    ``bootstrap`` resamples of the matches with replacement, each rated the
    same way and anchored the same way; None when ``bootstrap == 0``),
    ``games``, ``wins``, ``losses``, ``ties`` and ``win_rate`` ((wins + ties / 2) / games).

    The pairs of one K-way ranking are resampled independently although they
    are correlated, so for K > 2 the intervals are somewhat too narrow. An
    ``anchor`` player's interval is [1000, 1000] by construction: the others'
    intervals are then relative to it. The bootstrap needs ``prior > 0``, since
    a resample can leave a player undefeated.
    """
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if bootstrap > 0 and prior == 0:
        raise ValueError("the bootstrap needs prior > 0: a resample can leave a player undefeated (infinite MLE)")
    tally = _tally(matches)
    fit = dict(prior=prior, iterations=iterations, anchor=anchor)
    ratings = _by_rating(tally.players, _ratings(tally, tally.count[None, :], **fit)[0])
    if bootstrap > 0:
        # Resampling the matches with replacement = a multinomial draw over the distinct outcomes.
        rng = np.random.default_rng(seed)
        total = int(tally.count.sum())
        counts = rng.multinomial(total, tally.count / total, size=bootstrap).astype(np.float64)
        low, high = np.percentile(_ratings(tally, counts, **fit), [2.5, 97.5], axis=0)
    record = _records(matches)
    rows = []
    for player, rating in ratings.items():
        i = tally.players.index(player)
        won, lost, tied = record[player]
        games = won + lost + tied
        rows.append(
            {
                "player": player,
                "rating": rating,
                "ci_low": float(low[i]) if bootstrap > 0 else None,
                "ci_high": float(high[i]) if bootstrap > 0 else None,
                "games": games,
                "wins": won,
                "losses": lost,
                "ties": tied,
                "win_rate": (won + tied / 2) / games,
            }
        )
    return rows


def _records(matches: Iterable[Match]) -> dict[str, list[int]]:
    """player -> [wins, losses, ties]."""
    record: dict[str, list[int]] = {}
    for a, b, score in matches:
        ra, rb = record.setdefault(a, [0, 0, 0]), record.setdefault(b, [0, 0, 0])
        if score == 0.5:
            ra[2] += 1
            rb[2] += 1
        else:
            winner, loser = (ra, rb) if score == 1.0 else (rb, ra)
            winner[0] += 1
            loser[1] += 1
    return record


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """:func:`rating_table` rows as an aligned text table (names left, numbers right)."""
    header = ["#", "player", "rating", "95% CI", "games", "wins", "losses", "ties", "win rate"]
    body = []
    for rank, row in enumerate(rows, start=1):
        has_ci = row.get("ci_low") is not None and row.get("ci_high") is not None
        body.append(
            [
                str(rank),
                str(row["player"]),
                f"{row['rating']:.1f}",
                f"[{row['ci_low']:.1f}, {row['ci_high']:.1f}]" if has_ci else "-",
                str(row["games"]),
                str(row["wins"]),
                str(row["losses"]),
                str(row["ties"]),
                f"{row['win_rate']:.3f}",
            ]
        )
    widths = [max(len(line[c]) for line in [header, *body]) for c in range(len(header))]

    def render(cells: list[str]) -> str:
        aligned = [cell.ljust(w) if c == 1 else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths))]
        return "  ".join(aligned).rstrip()

    return "\n".join([render(header), *(render(line) for line in body)])
