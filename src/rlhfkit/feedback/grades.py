"""Graded preferences: the 7-point scale of the web annotator and what each grade means for training.

The one place the mapping lives (pure data and two small functions); the store
validates against it, the export turns votes into ``meta.margin`` and ``meta.target``
with it, and the page offers the same three strengths.

The scale, as InstructGPT's and Anthropic's HH labelling interfaces used it
(Ouyang et al. 2022, app. B; Bai et al. 2022, sec. 2.2)::

    A much better | A better | A slightly better | tie | B slightly better | B better | B much better

A vote is a choice (``a``, ``b`` or ``tie``, canonical: ``a`` is the pairs file's
``response_a``) and, for ``a`` / ``b``, a **strength** from :data:`STRENGTHS`. Each
strength maps to

* a Bradley-Terry **margin** (:data:`MARGIN`; Llama 2's margin ranking loss,
  Touvron et al. 2023, eq. 2, read by :func:`rlhfkit.data.pairwise.tokenize_pairs`
  from ``meta["margin"]``), and
* a **soft label** (:data:`SOFT_LABEL`), the probability that the side chosen is
  preferred: the target of the soft Bradley-Terry loss
  (:func:`rlhfkit.losses.preference_loss`) and of conservative DPO
  (Mitchell 2023), read from ``meta["target"]``.

==================  ======  ==========
strength            margin  soft label
==================  ======  ==========
``much_better``     1.0     1.0
``better``          0.5     0.9
``slightly_better`` 0.25    0.7
tie                 0       0.5
ungraded a / b      0       1.0
==================  ======  ==========

An **ungraded** vote is a choice sent without a strength: labels stored before
grades existed (a migrated database) and API clients that send only the choice.
It counts as a plain preference, exactly as before grades existed (soft label
1.0, no margin), so an old database exports the same targets it always did.

"Both bad" is a separate flag on a vote (both responses are poor, whatever the
preference between them); it changes neither margin nor soft label.
"""

from __future__ import annotations

from collections.abc import Sequence

STRENGTHS: tuple[str, ...] = ("much_better", "better", "slightly_better")
"""How much better the chosen response is; sent and stored with a choice of ``a`` or ``b`` only."""

MARGIN: dict[str, float] = {"much_better": 1.0, "better": 0.5, "slightly_better": 0.25}
"""Bradley-Terry margin of each strength (``meta["margin"]``)."""

SOFT_LABEL: dict[str, float] = {"much_better": 1.0, "better": 0.9, "slightly_better": 0.7}
"""P(the chosen side is preferred) for each strength (``meta["target"]``)."""

TIE_SOFT_LABEL = 0.5
UNGRADED_SOFT_LABEL = 1.0
UNGRADED_MARGIN = 0.0

SCALE: tuple[str, ...] = (
    "a_much_better",
    "a_better",
    "a_slightly_better",
    "tie",
    "b_slightly_better",
    "b_better",
    "b_much_better",
)
"""The 7-point scale in canonical terms: the ``grade`` of an exported vote."""


def check_vote(choice: str, strength: str | None) -> None:
    """A ValueError unless ``strength`` is None or one of :data:`STRENGTHS` given with ``a`` or ``b``."""
    if strength is None:
        return
    if strength not in STRENGTHS:
        raise ValueError(f"grade must be one of {', '.join(STRENGTHS)}, got {strength!r}")
    if choice not in ("a", "b"):
        raise ValueError(f"a grade goes with choice a or b, not {choice!r}")


def scale_grade(choice: str, strength: str | None) -> str | None:
    """A canonical vote on the 7-point scale (``a_much_better`` ... ``tie`` ... ``b_much_better``); None if ungraded."""
    if choice == "tie":
        return "tie"
    return None if strength is None else f"{choice}_{strength}"


def prob_a(choice: str, strength: str | None) -> float:
    """P(``response_a`` is preferred) according to one canonical vote (``a``, ``b`` or ``tie``)."""
    if choice == "tie":
        return TIE_SOFT_LABEL
    p = UNGRADED_SOFT_LABEL if strength is None else SOFT_LABEL[strength]
    return p if choice == "a" else 1.0 - p


def margin_a(choice: str, strength: str | None) -> float:
    """The vote's margin signed toward ``response_a`` (negative for a vote for ``response_b``, 0 for a tie)."""
    if choice == "tie":
        return 0.0
    m = UNGRADED_MARGIN if strength is None else MARGIN[strength]
    return m if choice == "a" else -m


def pair_targets(votes: Sequence[tuple[str, str | None]], *, chosen: int, tie: bool) -> tuple[float, float]:
    """``(target, margin)`` of an exported pair from its canonical votes ``(choice, strength)``.

    ``chosen`` is the index (0 = ``response_a``) of the exported ``ranking[0]``.
    ``target`` is the mean of the votes' soft labels, as P(responses[chosen] is
    preferred); it can be below 0.5 when a minority felt much more strongly than
    the majority that picked ``chosen``. ``margin`` is the mean of the votes'
    margins toward ``chosen``, floored at 0, and 0 for a tie (or split): a margin
    is a gap the chosen side must clear, never a head start. Both rounded to 6 places.
    """
    if not votes:
        raise ValueError("a pair needs at least one vote")
    p_a = sum(prob_a(c, s) for c, s in votes) / len(votes)
    m_a = sum(margin_a(c, s) for c, s in votes) / len(votes)
    target = p_a if chosen == 0 else 1.0 - p_a
    margin = 0.0 if tie else max(0.0, m_a if chosen == 0 else -m_a)
    return round(target, 6), round(margin, 6)
