"""Elo / Bradley-Terry ratings: hand-computed fits, a slow MM reference, invariances, the bootstrap, the stage.

Expected numbers are worked out by hand in each test (or by the plain-Python MM
algorithm of Hunter 2004 below), never by the functions under test.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from rlhfkit.config import ConfigError, load_config
from rlhfkit.data.io import DataError
from rlhfkit.data.preferences import load_comparisons
from rlhfkit.data.records import Comparison
from rlhfkit.elo import EloConfig, run
from rlhfkit.ratings import bradley_terry_ratings, format_table, matches_from_comparisons, online_elo, rating_table
from tests.helpers import write_jsonl


def wins(winner, loser, times):
    return [(winner, loser, 1.0)] * times


def mm_reference(matches, *, prior, max_steps=20_000):
    """Hunter 2004's MM iteration in plain Python, ratings with mean 1000.

    ``p_i <- (W_i + prior/2) / (sum_j N_ij / (p_i + p_j) + prior / (p_i + 1))``:
    ties are half a win each way, and the prior is ``prior`` tied games against
    a reference of strength 1. Slow and obviously right.
    """
    players = sorted({name for a, b, _ in matches for name in (a, b)})
    score = {p: 0.0 for p in players}
    games = {(p, q): 0 for p in players for q in players}
    for a, b, s in matches:
        score[a] += s
        score[b] += 1 - s
        games[a, b] += 1
        games[b, a] += 1
    strength = {p: 1.0 for p in players}
    for _ in range(max_steps):
        new = {}
        for p in players:
            denominator = sum(games[p, q] / (strength[p] + strength[q]) for q in players if q != p)
            new[p] = (score[p] + prior / 2) / (denominator + prior / (strength[p] + 1))
        if prior == 0:
            geometric_mean = math.exp(sum(math.log(v) for v in new.values()) / len(new))
            new = {p: v / geometric_mean for p, v in new.items()}
        change = max(abs(math.log(new[p] / strength[p])) for p in players)
        strength = new
        if change < 1e-13:
            break
    ratings = {p: 400 * math.log10(v) for p, v in strength.items()}
    mean = sum(ratings.values()) / len(ratings)
    return {p: r - mean + 1000 for p, r in ratings.items()}


# ----------------------------------------------------------------------------- Bradley-Terry


def test_two_players_without_prior_give_the_win_ratio():
    # MLE: P(A beats B) = 3/4, so p_A / p_B = 3 and the gap is 400 log10 3 = 190.85; mean 1000.
    ratings = bradley_terry_ratings(wins("A", "B", 3) + wins("B", "A", 1), prior=0)
    gap = 400 * math.log10(3)
    assert gap == pytest.approx(190.848, abs=1e-3)
    assert ratings["A"] == pytest.approx(1000 + gap / 2, abs=1e-6)
    assert ratings["B"] == pytest.approx(1000 - gap / 2, abs=1e-6)
    assert list(ratings) == ["A", "B"]  # best first


def test_two_players_with_one_virtual_tie_each():
    # With theta = ln p and the reference at theta = 0, the stationarity conditions are
    #   A: 3 + 1/2 = 4 sigmoid(tA - tB) + sigmoid(tA)
    #   B: 1 + 1/2 = 4 sigmoid(tB - tA) + sigmoid(tB).
    # Their sum gives sigmoid(tA) + sigmoid(tB) = 1, so tB = -tA. With x = e^tA the A
    # equation is 3.5 = 4x^2/(1 + x^2) + x/(1 + x), i.e. 3x^3 + x^2 - 5x - 7 = 0, and
    # the gap is 400 log10(x^2).
    roots = np.roots([3, 1, -5, -7])
    x = float(next(r.real for r in roots if abs(r.imag) < 1e-12 and r.real > 0))
    gap = 800 * math.log10(x)
    assert gap == pytest.approx(164.8, abs=0.1)  # shrunk from 190.8 without the prior
    ratings = bradley_terry_ratings(wins("A", "B", 3) + wins("B", "A", 1), prior=1.0)
    assert ratings["A"] - ratings["B"] == pytest.approx(gap, abs=1e-6)
    assert ratings["A"] + ratings["B"] == pytest.approx(2000, abs=1e-9)


def test_undefeated_player_is_finite_with_the_prior_and_an_error_without():
    matches = wins("A", "B", 10)
    ratings = bradley_terry_ratings(matches, prior=1.0)
    assert all(math.isfinite(r) for r in ratings.values())
    assert ratings["A"] > ratings["B"]
    # More wins still raise the gap (the prior is weak, not a cap).
    assert bradley_terry_ratings(wins("A", "B", 100))["A"] > ratings["A"]
    with pytest.raises(ValueError, match="prior=0"):
        bradley_terry_ratings(matches, prior=0)


def test_prior_free_fit_satisfies_the_score_equations():
    # The MLE condition (Zermelo / Bradley-Terry): each player's actual score equals its
    # expected score sum_j N_ij / (1 + 10^((R_j - R_i) / 400)).
    matches = (
        wins("A", "B", 5)
        + wins("B", "A", 2)
        + wins("B", "C", 4)
        + wins("C", "B", 3)
        + wins("A", "C", 6)
        + wins("C", "A", 1)
        + [("A", "B", 0.5)] * 2
        + [("C", "A", 0.5)]
    )
    ratings = bradley_terry_ratings(matches, prior=0)
    for player in "ABC":
        actual = sum(s if a == player else 1 - s for a, b, s in matches if player in (a, b))
        expected = 0.0
        for a, b, _ in matches:
            if player in (a, b):
                other = b if a == player else a
                expected += 1 / (1 + 10 ** ((ratings[other] - ratings[player]) / 400))
        assert expected == pytest.approx(actual, abs=1e-8)
    assert sum(ratings.values()) / 3 == pytest.approx(1000)


@pytest.mark.parametrize("prior", [0.0, 1.0, 3.0])
def test_fit_matches_the_mm_reference(prior):
    rng = random.Random(prior)
    true_rating = {"a": 1200, "b": 1100, "c": 1000, "d": 850}
    names = list(true_rating)
    matches = []
    for _ in range(120):
        x, y = rng.sample(names, 2)
        p_x = 1 / (1 + 10 ** ((true_rating[y] - true_rating[x]) / 400))
        u = rng.random()
        matches.append((x, y, 0.5 if u < 0.1 else 1.0 if u < 0.1 + 0.9 * p_x else 0.0))
    expected = mm_reference(matches, prior=prior)
    ratings = bradley_terry_ratings(matches, prior=prior)
    for player in names:
        assert ratings[player] == pytest.approx(expected[player], abs=1e-6)


def test_transitive_order_is_recovered():
    matches = (
        wins("top", "mid", 7)
        + wins("mid", "top", 3)
        + wins("mid", "low", 7)
        + wins("low", "mid", 3)
        + wins("top", "low", 9)
        + wins("low", "top", 1)
    )
    random.Random(0).shuffle(matches)
    assert list(bradley_terry_ratings(matches)) == ["top", "mid", "low"]
    assert list(bradley_terry_ratings(matches, prior=0)) == ["top", "mid", "low"]


def test_swapping_names_swaps_ratings_and_orientation_does_not_matter():
    matches = wins("A", "B", 4) + wins("B", "A", 1) + wins("B", "C", 2) + [("A", "C", 0.5)]
    ratings = bradley_terry_ratings(matches)
    swap = {"A": "B", "B": "A", "C": "C"}
    swapped = bradley_terry_ratings([(swap[a], swap[b], s) for a, b, s in matches])
    assert swapped["A"] == pytest.approx(ratings["B"], abs=1e-9)
    assert swapped["B"] == pytest.approx(ratings["A"], abs=1e-9)
    assert swapped["C"] == pytest.approx(ratings["C"], abs=1e-9)
    flipped = bradley_terry_ratings([(b, a, 1 - s) for a, b, s in reversed(matches)])
    assert flipped == pytest.approx(ratings, abs=1e-9)


def test_ties_count_as_half_a_win_each_way():
    # Two ties contribute exactly what one win each way does: score 1 each over 2 games.
    base = wins("A", "B", 3)
    with_ties = bradley_terry_ratings(base + [("A", "B", 0.5), ("B", "A", 0.5)])
    with_split = bradley_terry_ratings(base + [("A", "B", 1.0), ("B", "A", 1.0)])
    assert with_ties == pytest.approx(with_split, abs=1e-9)
    # Only ties: equal ratings, with or without the prior.
    for prior in (0.0, 1.0):
        ratings = bradley_terry_ratings([("A", "B", 0.5)] * 3, prior=prior)
        assert ratings == pytest.approx({"A": 1000.0, "B": 1000.0}, abs=1e-9)


def test_anchor_player_sits_at_1000_and_gaps_do_not_move():
    matches = wins("A", "B", 3) + wins("B", "A", 1) + wins("B", "C", 2) + wins("C", "B", 1)
    by_mean = bradley_terry_ratings(matches)
    anchored = bradley_terry_ratings(matches, anchor="C")
    assert anchored["C"] == pytest.approx(1000.0, abs=1e-9)
    for player in "AB":
        assert anchored[player] - anchored["C"] == pytest.approx(by_mean[player] - by_mean["C"], abs=1e-9)
    with pytest.raises(ValueError, match="anchor 'Z' is not a player"):
        bradley_terry_ratings(matches, anchor="Z")


def test_bad_matches_are_rejected():
    with pytest.raises(ValueError, match="score must be"):
        bradley_terry_ratings([("A", "B", 0.7)])
    with pytest.raises(ValueError, match="against itself"):
        bradley_terry_ratings([("A", "A", 1.0)])
    with pytest.raises(ValueError, match="no matches"):
        bradley_terry_ratings([])


# ----------------------------------------------------------------------------- rating table and bootstrap


def test_rating_table_records_by_hand():
    matches = wins("A", "B", 2) + wins("B", "A", 1) + [("B", "A", 0.5)] + wins("A", "C", 1)
    rows = rating_table(matches, bootstrap=0)
    assert [r["player"] for r in rows] == ["A", "B", "C"]
    a, b, c = rows
    assert (a["games"], a["wins"], a["losses"], a["ties"], a["win_rate"]) == (5, 3, 1, 1, 3.5 / 5)
    assert (b["games"], b["wins"], b["losses"], b["ties"], b["win_rate"]) == (4, 1, 2, 1, 1.5 / 4)
    assert (c["games"], c["wins"], c["losses"], c["ties"], c["win_rate"]) == (1, 0, 1, 0, 0.0)
    assert a["ci_low"] is None and a["ci_high"] is None
    assert {r["player"]: r["rating"] for r in rows} == pytest.approx(bradley_terry_ratings(matches))


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_games():
    few = wins("A", "B", 6) + wins("B", "A", 2)
    many = few * 10  # same 3:1 record, ten times the games
    widths = []
    for matches in (few, many):
        rows = rating_table(matches, bootstrap=400, seed=1)
        for row in rows:
            assert row["ci_low"] < row["rating"] < row["ci_high"]
        widths.append(rows[0]["ci_high"] - rows[0]["ci_low"])
    # Roughly 1/sqrt(10) narrower; demand at least a factor 2.
    assert widths[1] < widths[0] / 2


def test_bootstrap_is_seeded_and_anchor_interval_is_a_point():
    matches = wins("A", "B", 5) + wins("B", "A", 3) + wins("B", "C", 4) + wins("C", "B", 2) + [("A", "C", 0.5)]
    first = rating_table(matches, bootstrap=200, seed=7)
    assert rating_table(matches, bootstrap=200, seed=7) == first
    assert rating_table(matches, bootstrap=200, seed=8) != first
    anchored = {r["player"]: r for r in rating_table(matches, bootstrap=200, anchor="B")}
    assert anchored["B"]["ci_low"] == pytest.approx(1000.0) and anchored["B"]["ci_high"] == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="prior > 0"):
        rating_table(matches, bootstrap=10, prior=0)


def test_format_table_is_aligned():
    rows = rating_table(wins("policy", "baseline", 3) + wins("baseline", "policy", 1), bootstrap=50)
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["#", "player", "rating", "95%", "CI", "games", "wins", "losses", "ties", "win", "rate"]
    assert len({len(line) for line in lines}) == 1  # last column right-aligned: equal widths
    assert lines[1].split()[1] == "policy" and lines[2].split()[1] == "baseline"
    assert f"{rows[0]['rating']:.1f}" in lines[1] and "0.750" in lines[1]
    no_ci = format_table(rating_table(wins("x", "y", 1), bootstrap=0)).splitlines()
    assert " - " in no_ci[1]


# ----------------------------------------------------------------------------- online Elo


def test_online_elo_updates_by_hand():
    # Equal ratings: expected score 1/2, so the winner gains 32 * (1 - 1/2) = 16.
    assert online_elo([("A", "B", 1.0)]) == {"A": 1016.0, "B": 984.0}
    # Then B beats A: E_B = 1 / (1 + 10^(32/400)) = 0.454078, B gains 32 * 0.545922 = 17.4695.
    after = online_elo([("A", "B", 1.0), ("A", "B", 0.0)])
    assert after["B"] == pytest.approx(984 + 17.4695, abs=1e-3)
    assert after["A"] == pytest.approx(1016 - 17.4695, abs=1e-3)
    assert online_elo([("A", "B", 0.5)], k=10, initial=1500) == {"A": 1500.0, "B": 1500.0}


# ----------------------------------------------------------------------------- comparisons -> matches


def comparison(players, ranking, *, tie=False):
    responses = [f"response {i}" for i in range(len(ranking))]
    meta = {} if players is None else {"players": players}
    return Comparison("prompt", responses, ranking, tie=tie, meta=meta)


def test_matches_from_pairs_ties_and_rankings():
    comparisons = [
        comparison(["sft", "dpo"], [1, 0]),
        comparison(["sft", "dpo"], [0, 1], tie=True),
        comparison(["x", "y", "z"], [2, 0, 1]),
    ]
    assert matches_from_comparisons(comparisons) == [
        ("dpo", "sft", 1.0),
        ("sft", "dpo", 0.5),
        ("z", "x", 1.0),
        ("z", "y", 1.0),
        ("x", "y", 1.0),
    ]


def test_matches_skip_records_without_players_and_same_player_pairs(capsys):
    comparisons = [comparison(["a", "b"], [0, 1]), comparison(None, [0, 1]), comparison(["a", "a", "b"], [0, 1, 2])]
    assert matches_from_comparisons(comparisons) == [("a", "b", 1.0), ("a", "b", 1.0), ("a", "b", 1.0)]
    out = capsys.readouterr().out
    assert "1 comparisons without meta['players'] skipped" in out and "1 same-player pairs dropped" in out
    with pytest.raises(ValueError, match="none of the 2 comparisons has meta"):
        matches_from_comparisons([comparison(None, [0, 1]), comparison(None, [1, 0])])
    with pytest.raises(ValueError, match=r"comparison 0: meta\['players'\] must be a list of 2"):
        matches_from_comparisons([comparison(["only-one"], [0, 1])])
    with pytest.raises(ValueError, match=r"comparison 0: meta\['players'\]\[1\] must be a non-empty string"):
        matches_from_comparisons([comparison(["a", 3], [0, 1])])


# ----------------------------------------------------------------------------- the stage


def elo_records():
    """sft vs dpo: dpo wins 3, sft 1, one tie; one 3-way ranking; one record without players."""
    pair = lambda first, players, **extra: {  # noqa: E731
        "prompt": "p",
        "responses": ["r0", "r1"],
        "ranking": first,
        "meta": {"players": players},
        **extra,
    }
    return [
        pair([1, 0], ["sft", "dpo"]),
        pair([0, 1], ["dpo", "sft"]),
        pair([0, 1], ["dpo", "sft"]),
        pair([0, 1], ["sft", "dpo"]),
        pair([0, 1], ["sft", "dpo"], tie=True),
        {"prompt": "p", "ranked": ["best", "middle", "worst"], "meta": {"players": ["dpo", "ppo", "sft"]}},
        {"prompt": "p", "response_a": "a", "response_b": "b", "preferred": "a"},
    ]


def test_run_prints_and_writes_the_table(tmp_path, capsys):
    data = write_jsonl(tmp_path / "comparisons.jsonl", elo_records())
    output = tmp_path / "out" / "elo.json"
    rows = run(EloConfig(data=[str(data)], bootstrap=100, seed=3, output=str(output)))
    assert json.loads(output.read_text(encoding="utf-8")) == rows
    assert [r["player"] for r in rows] == ["dpo", "ppo", "sft"]
    record = {r["player"]: (r["games"], r["wins"], r["losses"], r["ties"]) for r in rows}
    # dpo: 3 wins + 1 loss + 1 tie vs sft, beats ppo and sft in the ranking.
    assert record == {"dpo": (7, 5, 1, 1), "ppo": (2, 1, 1, 0), "sft": (7, 1, 5, 1)}
    for row in rows:
        assert row["ci_low"] <= row["rating"] <= row["ci_high"]
    out = capsys.readouterr().out
    assert "8 matches between 3 players from 7 records (1 without meta.players skipped" in out
    assert format_table(rows) in out


def test_run_from_config_with_two_files_and_an_anchor(tmp_path, capsys):
    records = elo_records()
    first = write_jsonl(tmp_path / "a.jsonl", records[:3])
    second = write_jsonl(tmp_path / "b.jsonl", records[3:])
    config = load_config(EloConfig, overrides=[f"data={first},{second}", "anchor=sft", "bootstrap=0"])
    assert config.data == [str(first), str(second)]
    rows = run(config)
    ratings = {r["player"]: r["rating"] for r in rows}
    assert ratings["sft"] == pytest.approx(1000.0)
    # The same as rating the one-file concatenation.
    single = write_jsonl(tmp_path / "all.jsonl", records)
    expected = bradley_terry_ratings(matches_from_comparisons(load_comparisons(single)), anchor="sft")
    assert ratings == pytest.approx(expected, abs=1e-9)


def test_run_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="no comparison files"):
        run(EloConfig())
    data = write_jsonl(tmp_path / "c.jsonl", elo_records())
    with pytest.raises(ConfigError, match="anchor 'nobody' is not a player"):
        run(EloConfig(data=[str(data)], anchor="nobody", bootstrap=0))
    with pytest.raises(ConfigError, match="prior > 0"):
        run(EloConfig(data=[str(data)], prior=0.0))
    unnamed = write_jsonl(tmp_path / "unnamed.jsonl", elo_records()[-1:])
    with pytest.raises(DataError, match="no matches between players in 1 records"):
        run(EloConfig(data=[str(unnamed)]))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**elo_records()[0], "meta": {"players": ["just-one"]}}])
    with pytest.raises(DataError, match=r"bad.jsonl: field 'meta.players': record 1: meta\['players'\] must be a list"):
        run(EloConfig(data=[str(bad)]))
