"""A simulated annotator: labels comparisons by sampling from a score function.

The stand-in for human labellers in demos and benchmarks. It scores each
response with a transparent scorer (a :class:`~rlhfkit.feedback.scorers.Rubric`
by default in the demo) and turns the scores into a noisy judgement, the way
reward models assume humans behave:

* **Pairs** (Bradley & Terry 1952)::

      P(a preferred over b) = sigmoid((s_a - s_b) / temperature)

  ``temperature -> 0`` is a perfectly consistent labeller (higher score wins);
  large temperatures approach coin flips.
* **K > 2 responses** (Plackett 1975; Luce 1959): the ranking is drawn best
  first, each next item with probability ``softmax(s / temperature)`` over the
  items not yet placed. We sample it with the Gumbel-max trick, which is exactly
  equivalent (Yellott 1977): sort ``s_i / temperature + g_i``, ``g_i ~ Gumbel(0, 1)``,
  in descending order. For K = 2 this reduces to the Bradley-Terry formula.
* **Ties**: ``|s_a - s_b| <= tie_threshold`` gives ``tie=True`` for a pair
  whatever the temperature, before any sampling; in a ranking of K > 2 the pair
  is listed in ``Comparison.ties`` (target 0.5: neither preferred) and the sampled
  order between the two means nothing. Equal scores are ties by default
  (``tie_threshold = 0``): a scorer on a coarse scale (an integer rating) ties
  often, and a coin flip recorded as a preference would be label noise.
* **Label noise**: after sampling, with probability ``flip_rate`` the judgement
  is reversed (pair: the other response wins; K > 2: the ranking is reversed).
  Ties are never flipped. This models careless clicks, separately from the
  "hard to tell" noise that the temperature models.

**Scale**: the temperature and tie threshold are in the scorer's units. A scorer
100 times larger at the same temperature gives near-deterministic labels; one
100 times smaller, near coin flips. :func:`score_spread` measures a scorer's
scale (the population standard deviation of its scores on the items to label)
so that both can be set relative to it (``LabelConfig.temperature_scale:
spread``): with ``temperature = t * spread`` and ``tie_threshold = h * spread``,
scaling the scorer by any c > 0 scales the spread by c and leaves every label
unchanged.

**Randomness per item**: each item has its own random stream, set by the seed
and the item's index alone (``numpy.random.SeedSequence(seed, spawn_key=(index,))``,
the index-th child of the seed's sequence), and consumes the same draws from it
whatever the settings (two uniforms per pair; K Gumbels plus one uniform for
K > 2). So annotators that share a seed share their randomness: with
``flip_rate`` changed and nothing else, exactly the flipped labels differ. And an
item's label does not depend on the items labelled before it, nor on how they
were split into calls: labelling items 0..N in one go gives the labels of
labelling 0..k, then (resuming, in another process) k+1..N. The index is the
one passed to ``label_many(items, indices=...)`` (the labelling stage passes each
item's index in the samples file); without it, an annotator numbers the items it
is given 0, 1, 2... in the order it gets them, across calls, so ``label_many``
equals repeated ``label`` calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rlhfkit.data.records import Comparison, Prompt
from rlhfkit.feedback.scorers import Scorer, call_scorer, load_scorer


def _sigmoid(x: float) -> float:
    """Logistic function without overflow for large ``|x|``."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def prompt_text(prompt: Prompt) -> str:
    """The text a scorer sees for a prompt: the string itself, or the last user turn of a chat."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            return message.get("content", "")
    raise ValueError(f"chat prompt has no user message: {prompt!r}")


def _unpack(item: Any) -> tuple[Prompt, list[str]]:
    """``(prompt, responses)`` from a tuple/list pair or a mapping with those keys."""
    if isinstance(item, Mapping):
        prompt, responses = item["prompt"], item["responses"]
    else:
        prompt, responses = item
    responses = list(responses)
    if len(responses) < 2:
        raise ValueError(f"an item to label needs at least 2 responses, got {len(responses)}")
    return prompt, responses


def score_spread(scorer: Scorer | str, items: Iterable[Any]) -> float:
    """Population standard deviation of the scores of every response of every item (one scorer call).

    ``items``: ``(prompt, responses)`` tuples or dicts, as :meth:`SimulatedAnnotator.label_many`
    takes them; each response is scored against its prompt exactly as the annotator scores it.
    Returns ``sqrt(mean((s - mean(s))^2))`` over all N scores (ddof 0), so 0.0 when every score is
    equal, and 0.0 for no responses at all.
    """
    scorer = load_scorer(scorer) if isinstance(scorer, str) else scorer
    unpacked = [_unpack(item) for item in items]
    texts = [prompt_text(prompt) for prompt, responses in unpacked for _ in responses]
    flat_responses = [r for _, responses in unpacked for r in responses]
    if not flat_responses:
        return 0.0
    return float(np.std(np.asarray(call_scorer(scorer, texts, flat_responses), dtype=np.float64)))


class SimulatedAnnotator:
    """Labels ``(prompt, responses)`` with a :class:`Comparison`, sampled from scorer scores.

    Args:
        scorer: a scorer callable or a spec for :func:`~rlhfkit.feedback.scorers.load_scorer`
            (``"demo"``, ``"sentiment"``, ``"module:function"``...).
        temperature: Bradley-Terry / Plackett-Luce temperature; 0 = deterministic
            (sort by score, ties broken by index for K > 2).
        flip_rate: probability of reversing each non-tie judgement after sampling.
        seed: a non-negative integer; with an item's index it sets the item's random
            draws (see the module docstring), so the same seed gives the same label
            to the same item at the same index, whatever else is labelled.
        tie_threshold: two responses whose scores differ by at most this are tied (so
            equal scores are ties by default): a pair's ``tie``, a ranking's ``ties``.
        name: recorded as ``source=f"simulated:{name}"``.

    Each label's ``meta`` holds the scores, ``p_first`` (the probability that response
    0 wins or ranks first, before flip noise), ``flipped`` and ``temperature`` (the one
    used, in the scorer's units).

    ``next_index`` is the index the next item labelled without one gets (how many were).
    """

    def __init__(
        self,
        scorer: Scorer | str,
        *,
        temperature: float = 1.0,
        flip_rate: float = 0.0,
        seed: int = 0,
        tie_threshold: float = 0.0,
        name: str = "rubric",
    ):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 <= flip_rate <= 1.0:
            raise ValueError(f"flip_rate must be in [0, 1], got {flip_rate}")
        if tie_threshold < 0:
            raise ValueError(f"tie_threshold must be >= 0, got {tie_threshold}")
        self.scorer = load_scorer(scorer) if isinstance(scorer, str) else scorer
        self.temperature = float(temperature)
        self.flip_rate = float(flip_rate)
        self.tie_threshold = float(tie_threshold)
        self.name = name
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.next_index = 0  # the index of the next item labelled without one

    def label(self, prompt: Prompt, responses: Sequence[str], index: int | None = None) -> Comparison:
        """One comparison of ``responses`` (K >= 2) to ``prompt`` (string or chat messages); ``index``: the item's
        index (its random stream), by default :attr:`next_index`."""
        return self.label_many([(prompt, responses)], indices=None if index is None else [index])[0]

    def label_many(self, items: Iterable[Any], indices: Iterable[int] | None = None) -> list[Comparison]:
        """Label many ``(prompt, responses)`` items (tuples or dicts) with one scorer call.

        ``indices``: each item's index, which with the seed alone sets its random draws (any non-negative
        integers; an index given twice gives the same draws twice). None: :attr:`next_index` and on, which
        then moves past them."""
        unpacked = [_unpack(item) for item in items]
        numbered = indices is None
        if indices is None:
            indices = list(range(self.next_index, self.next_index + len(unpacked)))
        else:
            indices = [int(i) for i in indices]
            if len(indices) != len(unpacked):
                raise ValueError(f"label_many: {len(indices)} indices for {len(unpacked)} items")
            if any(i < 0 for i in indices):
                raise ValueError(f"label_many: indices must be non-negative, got {min(indices)}")
        texts = [prompt_text(prompt) for prompt, responses in unpacked for _ in responses]
        flat_responses = [r for _, responses in unpacked for r in responses]
        flat_scores = call_scorer(self.scorer, texts, flat_responses) if flat_responses else []
        labels, start = [], 0
        for (prompt, responses), index in zip(unpacked, indices):
            scores = flat_scores[start : start + len(responses)]
            start += len(responses)
            labels.append(self._judge(prompt, responses, scores, self._rng(index)))
        if numbered:
            self.next_index += len(unpacked)
        return labels

    def _rng(self, index: int) -> np.random.Generator:
        """Item ``index``'s random stream: the index-th child of ``SeedSequence(seed)``."""
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(index,)))

    def _judge(self, prompt: Prompt, responses: list[str], scores: list[float], rng: np.random.Generator) -> Comparison:
        ties: list[tuple[int, int]] = []
        if len(responses) == 2:
            ranking, tie, p_first, flipped = self._judge_pair(scores, rng)
        else:
            ranking, p_first, flipped = self._judge_ranking(scores, rng)
            tie = False
            ties = [
                (i, j)
                for i in range(len(scores))
                for j in range(i + 1, len(scores))
                if abs(scores[i] - scores[j]) <= self.tie_threshold
            ]
        return Comparison(
            prompt=prompt,
            responses=responses,
            ranking=ranking,
            tie=tie,
            ties=ties,
            source=f"simulated:{self.name}",
            meta={"scores": scores, "p_first": p_first, "flipped": flipped, "temperature": self.temperature},
        )

    def _judge_pair(self, scores: list[float], rng: np.random.Generator) -> tuple[list[int], bool, float, bool]:
        """Bradley-Terry choice between two responses: ``(ranking, tie, p_first, flipped)``.

        ``p_first`` is P(response 0 preferred) before flip noise.
        """
        u_choice, u_flip = rng.random(2)  # drawn unconditionally: see module docstring
        diff = scores[0] - scores[1]
        if abs(diff) <= self.tie_threshold:
            return [0, 1], True, 0.5, False
        if self.temperature == 0:
            p_first = 1.0 if diff > 0 else 0.0
        else:
            p_first = _sigmoid(diff / self.temperature)
        first_wins = bool(u_choice < p_first)
        flipped = bool(u_flip < self.flip_rate)
        if flipped:
            first_wins = not first_wins
        return ([0, 1] if first_wins else [1, 0]), False, p_first, flipped

    def _judge_ranking(self, scores: list[float], rng: np.random.Generator) -> tuple[list[int], float, bool]:
        """Plackett-Luce ranking of K > 2 responses: ``(ranking, p_first, flipped)``.

        ``p_first`` is P(response 0 ranked first) before flip noise,
        ``softmax(s / temperature)[0]``.
        """
        gumbels = rng.gumbel(size=len(scores))
        u_flip = rng.random()
        s = np.asarray(scores, dtype=np.float64)
        if self.temperature == 0:
            ranking = [int(i) for i in np.argsort(-s, kind="stable")]
            p_first = 1.0 if ranking[0] == 0 else 0.0
        else:
            logits = s / self.temperature
            ranking = [int(i) for i in np.argsort(-(logits + gumbels), kind="stable")]
            probs = np.exp(logits - logits.max())
            p_first = float(probs[0] / probs.sum())
        flipped = bool(u_flip < self.flip_rate)
        if flipped:
            ranking.reverse()
        return ranking, p_first, flipped

    def __repr__(self) -> str:
        return (
            f"SimulatedAnnotator({self.scorer!r}, temperature={self.temperature}, flip_rate={self.flip_rate}, "
            f"tie_threshold={self.tie_threshold}, name={self.name!r})"
        )
