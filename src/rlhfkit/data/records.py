"""Typed records shared across stages.

:class:`Comparison` is *the* label record: human annotators (terminal or web),
AI judges, simulated annotators and imported datasets all produce it, and the
reward-model and DPO trainers consume it. It follows lm-human-preferences'
idea of one label type for every feedback source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100
"""Label of a token that is not a training target (prompt tokens, padding): PyTorch's cross-entropy default."""

Message = dict[str, str]
Prompt = str | list[Message]
"""A prompt: plain text (one user turn) or a chat-message list ending before the reply."""


@dataclass
class Comparison:
    """K >= 2 responses to one prompt and a judgement of their order.

    For a pair, ``ranking == [0, 1]`` means response 0 is preferred; ``tie=True``
    means neither is (the ranking is then arbitrary). For K > 2, ``ranking`` lists
    response indices best first, and ``ties`` names the pairs of responses judged
    equally good (their order in the ranking is then arbitrary).
    """

    prompt: Prompt
    """The prompt: a string or a chat-message list (the context before the responses)."""
    responses: list[str]
    """Candidate responses (assistant text), K >= 2."""
    ranking: list[int]
    """Indices into ``responses``, best first; a permutation of range(K)."""
    tie: bool = False
    """Pairs only: the two responses are judged equally good (target probability 0.5)."""
    reason: str = ""
    """Free-text rationale (human or judge), may be empty."""
    source: str = ""
    """Who labelled it, e.g. ``human:alice``, ``judge:gpt-x``, ``simulated:rubric``, ``dataset``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (scores, sampling temperatures, annotator order...)."""
    ties: list[tuple[int, int]] = field(default_factory=list)
    """K > 2 only: pairs of response indices judged equally good (target probability 0.5), each ``(i, j)`` with
    ``i < j``, sorted, no repeats (given in any order, they are stored so). A pair uses ``tie`` instead."""

    def __post_init__(self) -> None:
        k = len(self.responses)
        if k < 2:
            raise ValueError(f"a comparison needs at least 2 responses, got {k}")
        if sorted(self.ranking) != list(range(k)):
            raise ValueError(f"ranking {self.ranking} is not a permutation of 0..{k - 1}")
        if self.tie and k != 2:
            raise ValueError("tie is only defined for pairs")
        if self.ties:
            if k == 2:
                raise ValueError("ties is for rankings of K > 2 responses; a pair uses tie=True")
            pairs = set()
            for entry in self.ties:
                if len(entry) != 2 or any(not 0 <= i < k for i in entry) or entry[0] == entry[1]:
                    raise ValueError(f"ties entry {list(entry)} is not two different indices into 0..{k - 1}")
                pairs.add((min(entry), max(entry)))
            if len(pairs) != len(self.ties):
                raise ValueError(f"ties {[list(e) for e in self.ties]} names a pair twice")
            self.ties = sorted(pairs)

    @property
    def chosen(self) -> str:
        return self.responses[self.ranking[0]]

    @property
    def rejected(self) -> str:
        return self.responses[self.ranking[-1]]

    def pairs(self) -> list[tuple[int, int, float]]:
        """All implied pairwise judgements ``(better, worse, P(better > worse))``.

        A K-way ranking expands to its K(K-1)/2 ordered pairs with target 1.0
        (InstructGPT's treatment of rankings), those in ``ties`` with target 0.5 (in
        ranking order); a tie gives one pair with target 0.5.
        """
        if self.tie:
            return [(self.ranking[0], self.ranking[1], 0.5)]
        r, tied = self.ranking, set(self.ties)
        return [
            (r[i], r[j], 0.5 if (min(r[i], r[j]), max(r[i], r[j])) in tied else 1.0)
            for i in range(len(r))
            for j in range(i + 1, len(r))
        ]

    @property
    def extremes_tied(self) -> bool:
        """Whether ``chosen`` and ``rejected`` are judged equally good (a tie, or a ranking whose first and last
        are in ``ties``): then the comparison prefers neither of them."""
        if self.tie:
            return True
        a, b = self.ranking[0], self.ranking[-1]
        return (min(a, b), max(a, b)) in set(self.ties)
