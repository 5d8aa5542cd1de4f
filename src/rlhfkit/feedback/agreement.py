"""Inter-annotator agreement: Cohen's kappa (two raters) and Fleiss' kappa (n raters).

Both are chance-corrected agreement, ``kappa = (P_o - P_e) / (1 - P_e)``:
``P_o`` is the observed agreement and ``P_e`` the agreement expected if raters
labelled at random with their observed category frequencies. 1 is perfect
agreement, 0 is chance level, negative is worse than chance. Where ``P_e == 1``
(every rating is the same single category) kappa is 0/0 and we return ``nan``,
as scikit-learn does, rather than pretend to know.

Per-annotator quality (what the annotation lead watches): :func:`check_accuracy`
(answers to questions with a known answer), :func:`majority_agreement` (each
rater against the majority of the *other* raters of an item) and
:func:`position_bias` (the share of decided votes that went to the response
shown on the left; 0.5 is unbiased).

Pure functions over plain Python sequences: no server or database involved, so
any feedback source (humans, judges, simulated annotators) can be compared.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence


def cohen_kappa(ratings_1: Sequence[Hashable], ratings_2: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters who rated the same items (Cohen 1960).

    ``ratings_1[i]`` and ``ratings_2[i]`` are the two raters' categories for item i.
    ``P_e = sum_c p1(c) * p2(c)`` uses each rater's own marginal frequencies.
    """
    if len(ratings_1) != len(ratings_2):
        raise ValueError(f"cohen_kappa: {len(ratings_1)} vs {len(ratings_2)} ratings; both raters must rate the same items")
    n = len(ratings_1)
    if n == 0:
        return math.nan
    observed = sum(a == b for a, b in zip(ratings_1, ratings_2)) / n
    marginal_1, marginal_2 = Counter(ratings_1), Counter(ratings_2)
    expected = sum(marginal_1[c] * marginal_2[c] for c in marginal_1) / (n * n)
    return _kappa(observed, expected)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa (Fleiss 1971) from an items x categories count matrix.

    ``counts[i][j]`` is how many raters put item i in category j; every row must
    sum to the same number of raters ``n >= 2`` (who the raters are may differ
    from item to item). With ``N`` items:

    * ``P_i = (sum_j counts[i][j]**2 - n) / (n (n - 1))``, the agreeing rater pairs of item i;
    * ``P_o = mean_i P_i``;
    * ``p_j = sum_i counts[i][j] / (N n)`` and ``P_e = sum_j p_j**2``.
    """
    if not counts:
        return math.nan
    n = sum(counts[0])
    for i, row in enumerate(counts):
        if sum(row) != n:
            raise ValueError(f"fleiss_kappa: row {i} has {sum(row)} ratings, row 0 has {n}; every item needs the same number")
        if any(c < 0 for c in row):
            raise ValueError(f"fleiss_kappa: row {i} has a negative count")
    if n < 2:
        raise ValueError(f"fleiss_kappa: needs at least 2 ratings per item, got {n}")
    items = len(counts)
    observed = sum((sum(c * c for c in row) - n) / (n * (n - 1)) for row in counts) / items
    totals = [sum(col) for col in zip(*counts)]
    expected = sum((t / (items * n)) ** 2 for t in totals)
    return _kappa(observed, expected)


def category_counts(item_ratings: Sequence[Sequence[Hashable]], categories: Sequence[Hashable]) -> list[list[int]]:
    """Per-item rating lists -> the count matrix :func:`fleiss_kappa` takes (columns in ``categories`` order)."""
    index = {c: j for j, c in enumerate(categories)}
    matrix = []
    for i, ratings in enumerate(item_ratings):
        row = [0] * len(categories)
        for rating in ratings:
            if rating not in index:
                raise ValueError(f"category_counts: item {i} has rating {rating!r}, not one of {list(categories)}")
            row[index[rating]] += 1
        matrix.append(row)
    return matrix


def check_accuracy(answers: Sequence[Hashable], expected: Sequence[Hashable]) -> tuple[float, int]:
    """``(share of answers equal to the known answer, number of answers)``; ``(nan, 0)`` with no answers."""
    if len(answers) != len(expected):
        raise ValueError(f"check_accuracy: {len(answers)} answers vs {len(expected)} known answers")
    if not answers:
        return math.nan, 0
    return sum(a == e for a, e in zip(answers, expected)) / len(answers), len(answers)


def majority_agreement(votes_by_item: Mapping[Hashable, Mapping[str, Hashable]]) -> dict[str, tuple[float, int]]:
    """Each rater's agreement with the majority of the other raters, over items with at least 2 votes.

    ``votes_by_item[item][rater]`` is the rater's category for the item. For every item with at least two
    raters and every rater of it, the majority is taken over the *other* raters' votes (leave-one-out: with
    the rater's own vote counted, two raters could never disagree with "the majority", only split it); an
    item where the others' top category is shared (a split) tells nothing and is not counted for that rater.
    Returns ``{rater: (share of counted items where the rater voted the others' majority, counted items)}``
    for every rater with at least one counted item.
    """
    agree: Counter[str] = Counter()
    counted: Counter[str] = Counter()
    for votes in votes_by_item.values():
        if len(votes) < 2:
            continue
        for rater, vote in votes.items():
            others = Counter(v for r, v in votes.items() if r != rater)
            (top, top_count), *rest = others.most_common()
            if rest and rest[0][1] == top_count:
                continue  # the others are split
            counted[rater] += 1
            agree[rater] += vote == top
    return {rater: (agree[rater] / n, n) for rater, n in counted.items()}


def position_bias(shown_choices: Sequence[Hashable], *, left: Hashable = "a", right: Hashable = "b") -> tuple[float, int]:
    """``(share of decided votes for the response shown on the left, decided votes)``; ``(nan, 0)`` with none.

    ``shown_choices`` are votes **as shown on screen** (``left`` = the left response); ties and anything
    else are not decided and left out. With sides drawn at random, an unbiased rater is near 0.5.
    """
    decided = [c for c in shown_choices if c in (left, right)]
    if not decided:
        return math.nan, 0
    return sum(c == left for c in decided) / len(decided), len(decided)


def _kappa(observed: float, expected: float) -> float:
    if math.isclose(expected, 1.0):
        return math.nan
    return (observed - expected) / (1.0 - expected)
