"""Active preference querying: ``rlhfkit query CONFIG.yaml`` / :func:`select`.

Which pairs should annotators (people, an AI judge, the simulated annotator) label next? Labelling every pair of
every sample, or a random subset, spends much of the budget on pairs the reward model already orders confidently.
:func:`select` scores every candidate pair -- every pair of responses of a prompt in ``rlhfkit sample``'s output --
with the current reward model and writes the most informative ``num_queries`` of them, in the format ``rlhfkit
label`` and ``rlhfkit annotate serve`` read (a samples file whose records hold exactly two responses).

1. Candidates: for each record of ``samples``, each pair ``(i, j)``, ``i < j``, of its responses; a pair with an
   empty response (no training pair; the annotation app leaves it out too) or two equal responses (nothing to
   prefer) is no candidate, nor is a pair already labelled in ``exclude``.
2. Acquisition score (the pure functions below), from each head's raw score of both responses:

   * ``disagreement`` (a reward-model ensemble, ``rlhfkit reward ensemble_size=K``): the standard deviation over
     heads of ``P_h(a > b) = sigmoid(r_h(a) - r_h(b))`` (:func:`preference_disagreement`);
   * ``uncertainty`` (any reward model, one head included): how close the heads' mean ``P(a > b)`` is to 1/2
     (:func:`preference_uncertainty`);
   * ``bal_pm`` (an ensemble): BALD, the mutual information between the pair's label and the heads
     (:func:`preference_bald`), plus ``beta`` times the novelty of the pair's prompt among the prompts labelled so
     far (``exclude``) and picked before it (:func:`diverse_pick`; Melo et al. 2024's BAL-PM);
   * ``random``: a seeded uniform draw per candidate, no reward model (the baseline).

3. Greedy pick, best score first (``bal_pm``: :func:`diverse_pick`, whose scores change with each pick): a
   candidate is taken unless its prompt already has ``max_per_prompt`` pairs in
   the selection, until ``num_queries`` are taken. The cap keeps the batch diverse: the pairs of one hard prompt
   tend to score alike, and a batch of them teaches less than one pair from each of several prompts (the
   redundancy that batch-mode active learning guards against). Equal scores are ordered by the seeded draw, so
   every strategy is reproducible, and ``random``'s first N picks are the first N of any larger random budget.

The output records are ``{"prompt", "responses": [a, b], "sample_index", "response_indices": [i, j],
"acquisition"}``: the source record's position in ``samples`` (0-based), the two responses' positions in it, and
the score the pair was chosen by.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from rlhfkit import log
from rlhfkit.config import ConfigError
from rlhfkit.data.io import write_jsonl
from rlhfkit.data.preferences import load_comparisons, prompt_key
from rlhfkit.data.records import Prompt
from rlhfkit.data.samples import load_items  # the reader `rlhfkit label` uses: both accept the same files

STRATEGIES: tuple[str, ...] = ("disagreement", "uncertainty", "bal_pm", "random")
"""The values of :attr:`QueryConfig.strategy`."""


# ----------------------------------------------------------------------------- acquisition scores (pure)


def preference_disagreement(scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
    """Disagreement of a reward-model ensemble on a pair: the population std over the ``K`` heads of each head's
    Bradley-Terry preference probability ``P_h(a > b) = sigmoid(r_h(a) - r_h(b))``. Shapes: (P, K), (P, K) -> (P,);
    0 for one head.

    The query rule of Christiano et al. 2017 ("Deep RL from Human Preferences", sec. 2.2.4: label the pairs "for
    which the predictions have the highest variance across ensemble members"), used as "disagreement" sampling by
    PEBBLE (Lee, Smith & Abbeel 2021, sec. 4.2), on the ensembles of Coste et al. 2024. Why the probability's spread
    and not the reward difference's (:func:`rlhfkit.losses.ensemble_std` of ``r(a) - r(b)``): two heads that put a
    pair 5 and 10 units apart disagree by 5 units yet agree on the label (P = 0.993 and 0.99995), and a label
    there teaches nothing; sigmoid saturates exactly where the outcome is settled, so the spread of P is the
    heads' disagreement about the label itself. It is a cheap stand-in for BALD's mutual information (Houlsby et
    al. 2011), which also peaks where members disagree on the label, not where the scores merely differ.
    """
    if scores_a.shape != scores_b.shape or scores_a.dim() != 2:
        raise ValueError(f"scores must both be (P, K); got {tuple(scores_a.shape)} and {tuple(scores_b.shape)}")
    return torch.sigmoid(scores_a - scores_b).std(-1, correction=0)


def preference_uncertainty(scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
    """Uncertainty of a reward model about a pair: ``1 - |2 p - 1|`` with ``p`` the mean over the ``K`` heads of
    ``sigmoid(r_h(a) - r_h(b))`` (the ensemble's predictive probability; one head: its own). 1 where ``p = 1/2``,
    0 where the model is certain. Shapes: (P, K), (P, K) -> (P,).

    Uncertainty sampling (Lewis & Gale 1994) on the Bradley-Terry probability; it needs no ensemble, but it cannot
    tell a pair the model has not learnt from one that is a genuine coin flip (a near-tie), which disagreement can.
    """
    if scores_a.shape != scores_b.shape or scores_a.dim() != 2:
        raise ValueError(f"scores must both be (P, K); got {tuple(scores_a.shape)} and {tuple(scores_b.shape)}")
    p = torch.sigmoid(scores_a - scores_b).mean(-1)
    return 1 - (2 * p - 1).abs()


def preference_bald(scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
    """BALD (Houlsby et al. 2011, "Bayesian Active Learning for Classification and Preference Learning") of a pair
    under a reward-model ensemble: the mutual information between its label and the head, ``H(mean_h p_h) - mean_h
    H(p_h)`` with ``p_h = sigmoid(r_h(a) - r_h(b))``, in nats. Shapes: (P, K), (P, K) -> (P,); 0 for one head.

    High where the heads are each confident but disagree (the label would settle which head is right), low where
    they agree or where every head finds the pair a coin flip (a near-tie teaches nothing about the head)."""
    if scores_a.shape != scores_b.shape or scores_a.dim() != 2:
        raise ValueError(f"scores must both be (P, K); got {tuple(scores_a.shape)} and {tuple(scores_b.shape)}")

    def entropy(p: torch.Tensor) -> torch.Tensor:
        p = p.clamp(1e-12, 1 - 1e-12)
        return -(p * p.log() + (1 - p) * (1 - p).log())

    p = torch.sigmoid(scores_a - scores_b)
    return entropy(p.mean(-1)) - entropy(p).mean(-1)


def diverse_pick(
    uncertainty: torch.Tensor,
    prompt_features: torch.Tensor,
    labelled_features: torch.Tensor,
    *,
    num: int,
    beta: float,
    tiebreak: list[float],
    groups: list[str],
    max_per_group: int,
) -> list[int]:
    """BAL-PM's batch (Melo, Tigas, Abate & Gal 2024, "Deep Bayesian Active Learning for Preference Modeling in Large
    Language Models"): ``num`` candidates picked greedily by ``z(uncertainty) + beta * z(log d)``, where ``d`` is the
    distance of the candidate's prompt feature (``prompt_features``, (C, f)) to the nearest prompt labelled already
    (``labelled_features``, (m, f); m may be 0) or picked earlier in this batch. The log nearest-neighbour distance
    is what a new point adds to a Kozachenko-Leonenko estimate of the labelled prompts' entropy, so the second term
    favours prompts unlike any labelled yet and the first the pairs the model is unsure of; ``z`` standardises each
    over the candidates still free, so ``beta`` weighs two unitless terms (a term that is constant there counts 0).
    The paper's finding is that epistemic uncertainty alone spends labels on redundant pairs, and that the entropy
    term, spreading them over the prompts, saves labels; what it saved on SmolLM2: :attr:`QueryConfig.strategy`.

    Equal scores go to the higher ``tiebreak``; a candidate whose group already has ``max_per_group`` picks (0: no
    cap) is skipped, as :func:`pick`. Fewer than ``num`` when the candidates run out."""

    def z(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        values = x[mask]
        if not torch.isfinite(values).all():  # no prompt labelled yet: every distance is infinite, no preference
            return torch.zeros_like(x)
        return (x - values.mean()) / values.std(correction=0).clamp_min(1e-12)

    if len(labelled_features):
        distance = torch.cdist(prompt_features, labelled_features).min(1).values
    else:
        distance = torch.full((len(prompt_features),), torch.inf, dtype=prompt_features.dtype)

    def score(free: torch.Tensor) -> torch.Tensor:
        return z(uncertainty, free) + beta * z(torch.log(distance.clamp_min(1e-6)), free)

    def picked(k: int) -> None:
        nonlocal distance
        distance = torch.minimum(distance, (prompt_features - prompt_features[k]).norm(dim=1))

    return greedy_pick(score, picked, num=num, tiebreak=tiebreak, groups=groups, max_per_group=max_per_group)


def greedy_pick(
    score: Callable[[torch.Tensor], torch.Tensor],
    picked: Callable[[int], None],
    *,
    num: int,
    tiebreak: list[float],
    groups: list[str],
    max_per_group: int,
) -> list[int]:
    """A batch picked one candidate at a time, for scores that change with every pick (:func:`diverse_pick`; the
    linear benchmark's posterior-updating rules): ``score(free)`` scores every candidate (``free``: the mask of those
    still free), the free candidate of highest score is picked (equal scores: the higher ``tiebreak``), and
    ``picked(k)`` is told, to update what ``score`` reads. A candidate whose group already has ``max_per_group``
    picks (0: no cap) is no longer free, as :func:`pick`. Fewer than ``num`` when the candidates run out."""
    group_of = {group: i for i, group in enumerate(dict.fromkeys(groups))}
    group_ids = torch.tensor([group_of[group] for group in groups], dtype=torch.long)
    free = torch.ones(len(groups), dtype=torch.bool)
    order_key = torch.tensor(tiebreak, dtype=torch.float64)
    per_group: dict[str, int] = {}
    chosen: list[int] = []
    while len(chosen) < num and free.any():
        scores = score(free)
        best = scores.masked_fill(~free, -torch.inf).max()
        k = int(torch.where(free & (scores == best), order_key, -torch.inf).argmax())
        chosen.append(k)
        free[k] = False
        per_group[groups[k]] = per_group.get(groups[k], 0) + 1
        if max_per_group and per_group[groups[k]] >= max_per_group:
            free &= group_ids != group_ids[k]
        picked(k)
    return chosen


def pick(scores: list[float], tiebreak: list[float], groups: list[str], *, num: int, max_per_group: int) -> list[int]:
    """Indices of the candidates to query, best first: highest ``scores`` first, equal scores by highest
    ``tiebreak``, skipping a candidate whose group already has ``max_per_group`` picks (0: no cap), until ``num``
    are picked (fewer when the candidates run out)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], -tiebreak[i], i))
    chosen: list[int] = []
    per_group: dict[str, int] = {}
    for i in order:
        if len(chosen) == num:
            break
        if max_per_group and per_group.get(groups[i], 0) >= max_per_group:
            continue
        per_group[groups[i]] = per_group.get(groups[i], 0) + 1
        chosen.append(i)
    return chosen


# ----------------------------------------------------------------------------- the stage


@dataclass
class QueryConfig:
    """Config of the query stage (``rlhfkit query``): which pairs to send to annotators."""

    samples: str = "runs/samples.jsonl"
    """Candidates: `rlhfkit sample` output (records with `prompt` and `responses`); every pair of a record's
    responses is a candidate."""
    reward_model: str = ""
    """The reward model that scores the candidates: an ensemble directory (`rlhfkit reward ensemble_size=K`) for
    `disagreement`, or any reward-model directory for `uncertainty`. Unused (may be empty) for `random`."""
    strategy: Literal["disagreement", "uncertainty", "bal_pm", "random"] = "disagreement"
    """`disagreement`: highest spread over the ensemble's heads of P(a > b) (Christiano et al. 2017); needs an
    ensemble. `uncertainty`: mean P(a > b) closest to 1/2. `bal_pm`: BALD over the ensemble's heads plus `beta`
    times the novelty of the pair's prompt among those labelled (`exclude`) and picked before it (Melo et al. 2024);
    needs an ensemble. `random`: a seeded random choice (the baseline).
    Measured against `random` on SmolLM2-135M with the simulated annotator (benchmarks/README.md; linear heads, 30
    seeds a run): on the base model's features no rule saved labels (`disagreement` cost some, -0.011 [-0.020,
    -0.002] held-out accuracy at 512 labels); on a fine-tuned reward model's features with the demo rubric, `bal_pm`
    saved labels in two of three runs (its 64 labels worth random's 112 [93, 144] at best) and `uncertainty` in two
    of three, but neither with another gold scorer (`relevance`, many ties), where `uncertainty` cost some; whole
    reward models fine-tuned from the SFT model saved none with `bal_pm` (8 seeds). Check a rule on your own data
    before trusting it to save labels."""
    num_queries: int = 256
    """Pairs to select (fewer if fewer candidates are left; a warning says so)."""
    max_per_prompt: int = 2
    """At most this many selected pairs share a prompt, for a diverse batch (0: no cap). Pairs of `exclude` do not
    count against it."""
    exclude: str = ""
    """A labels file (any format `rlhfkit reward` reads): its pairs -- the same prompt and the same two responses, in
    either order; a K-way ranking's every pair -- are already labelled and are not selected again. Empty: none."""
    output: str = "runs/queries.jsonl"
    """Where the selected pairs go: samples-format records with two responses each, which `rlhfkit label
    samples=OUTPUT` and `rlhfkit annotate serve OUTPUT` read."""
    beta: float = 1.0
    """`bal_pm`: the weight of the prompt-novelty term against BALD (both standardised over the candidates)."""
    seed: int = 0
    """Seed of `random`'s draw and of the order of equal scores."""
    batch_size: int = 16
    """Responses scored per forward."""
    precision: str = "bf16"
    """Compute precision of the reward model."""


@dataclass(frozen=True)
class Candidate:
    """A pair of responses of one samples record."""

    sample_index: int
    """Position of the record in the samples file (0-based)."""
    prompt: Prompt
    first: int
    """Index of response a in the record's responses."""
    second: int
    """Index of response b (> first)."""


def pair_key(prompt: Prompt, a: str, b: str) -> tuple[str, str, str]:
    """A pair's identity whatever the order of its responses: labels of it are found by this key."""
    first, second = sorted((a, b))
    return prompt_key(prompt), first, second


def labelled_pairs(path: str | Path) -> set[tuple[str, str, str]]:
    """The :func:`pair_key` of every pair a labels file judges (a K-way ranking: each of its pairs)."""
    keys = set()
    for comparison in load_comparisons(path):
        responses = comparison.responses
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                keys.add(pair_key(comparison.prompt, responses[i], responses[j]))
    return keys


def candidates(
    items: list[tuple[Prompt, list[str]]], exclude: AbstractSet[tuple[str, str, str]] = frozenset()
) -> list[Candidate]:
    """Every pair of responses of each item that can be labelled and is not in ``exclude`` (see the module doc)."""
    found = []
    for index, (prompt, responses) in enumerate(items):
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                a, b = responses[i], responses[j]
                if not a.strip() or not b.strip() or a == b or pair_key(prompt, a, b) in exclude:
                    continue
                found.append(Candidate(index, prompt, i, j))
    return found


def _reward_model(config: QueryConfig):
    """The reward model of ``config``, checked for its strategy (an ensemble for disagreement and bal_pm)."""
    from rlhfkit.modeling.reward_model import RewardModel

    if not config.reward_model:
        raise ConfigError(f"query: strategy={config.strategy} needs `reward_model` (a reward-model directory)")
    path = Path(config.reward_model)
    if not (path / "config.json").is_file():
        raise ConfigError(f"query: reward_model {config.reward_model!r} is not a reward-model directory (no config.json)")
    model = RewardModel(path, precision=config.precision, batch_size=config.batch_size)
    if config.strategy in ("disagreement", "bal_pm") and model.num_members < 2:
        raise ConfigError(
            f"query: strategy={config.strategy} needs a reward-model ensemble (rlhfkit reward ensemble_size=K); "
            f"{config.reward_model} has one head: use strategy=uncertainty"
        )
    return model


def _head_scores(
    model, items: list, pool: list[Candidate], *, features: bool
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """Each head of ``model``'s raw score of each candidate's two responses, (P, K) and (P, K), every response
    scored once; with ``features``, also each sample record's prompt feature (by :func:`prompt_key`; else none): the
    mean over its candidates' responses of what the score head reads (:meth:`RewardModel.features`), standardised
    by those responses' mean and std per dimension (as ``benchmarks/active_querying_linear.py`` measured it), and
    that standardisation, for other prompts' means.

    Raw, not normalised: the Bradley-Terry probability the heads were trained on is ``sigmoid`` of raw score
    differences; the normalisation gain would rescale each head's probabilities (the bias cancels anyway)."""
    row: dict[tuple[int, int], int] = {}  # (sample_index, response index) -> row of the scores
    for c in pool:
        for r in (c.first, c.second):
            row.setdefault((c.sample_index, r), len(row))
    keys = list(row)
    prompts = [items[s][0] for s, _ in keys]
    responses = [items[s][1][r] for s, r in keys]
    log.info(f"query: scoring {len(responses)} responses with {model.num_members} head(s) of {model.path}")
    a = torch.tensor([row[(c.sample_index, c.first)] for c in pool], dtype=torch.long)
    b = torch.tensor([row[(c.sample_index, c.second)] for c in pool], dtype=torch.long)
    if not features:
        raw = model.raw(prompts, responses).reshape(len(responses), model.num_members)
        return raw[a].double(), raw[b].double(), {}, lambda x: x
    raw, x = model.raw_and_features(prompts, responses)  # one forward for a shared-trunk ensemble
    raw, x = raw.reshape(len(responses), model.num_members), x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)

    def standardise(v: torch.Tensor) -> torch.Tensor:
        return (v - mean) / std

    by_prompt = {key: standardise(v) for key, v in _mean_by_prompt(prompts, x).items()}
    return raw[a].double(), raw[b].double(), by_prompt, standardise


def _mean_by_prompt(prompts: list, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean feature of each prompt's rows (by :func:`prompt_key`), float64."""
    rows: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        rows.setdefault(prompt_key(prompt), []).append(i)
    return {key: features[index].double().mean(0) for key, index in rows.items()}


def _labelled_prompt_features(
    path: str, known: dict[str, torch.Tensor], model, standardise: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The prompt feature of every prompt the labels file ``path`` judges, (m, f) (none without a file): a prompt of
    the samples its feature there (``known``), any other the mean over its labelled responses (scored here), by
    ``standardise``."""
    prompts, responses = [], []
    wanted: dict[str, None] = {}
    for comparison in load_comparisons(path) if path else []:
        key = prompt_key(comparison.prompt)
        wanted.setdefault(key, None)
        if key not in known:
            for response in dict.fromkeys(comparison.responses):
                prompts.append(comparison.prompt)
                responses.append(response)
    extra = _mean_by_prompt(prompts, model.features(prompts, responses).double()) if responses else {}
    rows = [known[key] if key in known else standardise(extra[key]) for key in wanted]
    return torch.stack(rows) if rows else torch.zeros(0, next(iter(known.values())).shape[0], dtype=torch.float64)


def select(config: QueryConfig) -> Path:
    """Select ``config.num_queries`` pairs of ``config.samples`` to label and write them to ``config.output``;
    returns its path. See the module docstring for the candidates, scores and pick."""
    if config.strategy not in STRATEGIES:
        raise ConfigError(f"query: strategy must be one of {', '.join(STRATEGIES)}, got {config.strategy!r}")
    if config.num_queries < 1:
        raise ConfigError(f"query: num_queries must be >= 1 (got {config.num_queries})")
    if config.max_per_prompt < 0:
        raise ConfigError(f"query: max_per_prompt must be >= 0 (0: no cap), got {config.max_per_prompt}")
    items = load_items(config.samples)
    excluded = labelled_pairs(config.exclude) if config.exclude else set()
    pool = candidates(items, excluded)
    if not pool:
        raise ConfigError(f"query: no pair of {config.samples} is left to label ({len(excluded)} pairs in exclude)")
    tiebreak = np.random.default_rng(config.seed).random(len(pool)).tolist()
    groups = [prompt_key(c.prompt) for c in pool]
    if config.strategy == "random":
        scores = tiebreak
    else:
        model = _reward_model(config)
        scores_a, scores_b, by_prompt, standardise = _head_scores(model, items, pool, features=config.strategy == "bal_pm")
        rule = {"disagreement": preference_disagreement, "uncertainty": preference_uncertainty, "bal_pm": preference_bald}
        scores = rule[config.strategy](scores_a, scores_b).tolist()
    if config.strategy == "bal_pm":
        chosen = diverse_pick(
            torch.tensor(scores, dtype=torch.float64),
            torch.stack([by_prompt[g] for g in groups]),
            _labelled_prompt_features(config.exclude, by_prompt, model, standardise),
            num=config.num_queries,
            beta=config.beta,
            tiebreak=tiebreak,
            groups=groups,
            max_per_group=config.max_per_prompt,
        )
    else:
        chosen = pick(scores, tiebreak, groups, num=config.num_queries, max_per_group=config.max_per_prompt)
    if len(chosen) < config.num_queries:
        log.warning(
            f"query: only {len(chosen)} of the {config.num_queries} pairs asked for could be selected ({len(pool)} "
            f"candidates, {f'at most {config.max_per_prompt} per prompt' if config.max_per_prompt else 'no cap per prompt'})"
        )
    records = []
    for i in chosen:
        c = pool[i]
        responses = items[c.sample_index][1]
        records.append(
            {
                "prompt": c.prompt,
                "responses": [responses[c.first], responses[c.second]],
                "sample_index": c.sample_index,
                "response_indices": [c.first, c.second],
                "acquisition": scores[i] if math.isfinite(scores[i]) else None,
            }
        )
    output = Path(config.output)
    write_jsonl(output, records)
    picked = [scores[i] for i in chosen]
    log.info(
        f"query: {len(records)} pairs by {config.strategy} from {len(pool)} candidates "
        f"({len(excluded)} labelled pairs excluded) -> {output}; score {min(picked):.4g} to {max(picked):.4g}"
    )
    return output
