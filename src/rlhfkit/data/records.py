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
    response indices best first (ties among K > 2 are not represented).
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

    def __post_init__(self) -> None:
        k = len(self.responses)
        if k < 2:
            raise ValueError(f"a comparison needs at least 2 responses, got {k}")
        if sorted(self.ranking) != list(range(k)):
            raise ValueError(f"ranking {self.ranking} is not a permutation of 0..{k - 1}")
        if self.tie and k != 2:
            raise ValueError("tie is only defined for pairs")

    @property
    def chosen(self) -> str:
        return self.responses[self.ranking[0]]

    @property
    def rejected(self) -> str:
        return self.responses[self.ranking[-1]]

    def pairs(self) -> list[tuple[int, int, float]]:
        """All implied pairwise judgements ``(better, worse, P(better > worse))``.

        A K-way ranking expands to its K(K-1)/2 ordered pairs with target 1.0
        (InstructGPT's treatment of rankings); a tie gives one pair with target 0.5.
        """
        if self.tie:
            return [(self.ranking[0], self.ranking[1], 0.5)]
        r = self.ranking
        return [(r[i], r[j], 1.0) for i in range(len(r)) for j in range(i + 1, len(r))]
