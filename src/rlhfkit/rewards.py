"""Reward functions for RL and evaluation: one signature for every source.

``load_reward(spec)`` returns ``fn(prompts, responses, **kwargs) -> list[float]`` for

* a reward-model directory (any ``AutoModelForSequenceClassification`` with one output; scored
  with its own tokenizer, normalised with the gain/bias stored by ``rlhfkit reward``), or a
  reward-model ensemble (``rlhfkit reward ensemble_size=K``: K heads, each normalised, aggregated
  by ``aggregation``: mean, wco or uwo, :func:`rlhfkit.losses.aggregate_rewards`);
* ``module:function``, importable from the working directory;
* a built-in simulated-annotator score (``sentiment``, ``length``, ``banned``,
  ``rubric``/``demo``).

Prompts reach user functions as strings (a chat prompt's last user turn), as
the documented interface says; a reward model sees the full prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rlhfkit import log
from rlhfkit.config import ConfigError
from rlhfkit.feedback.scorers import call_scorer, load_scorer
from rlhfkit.feedback.simulated import prompt_text
from rlhfkit.modeling.reward_model import RewardModel

RewardFn = Callable[..., list[float]]


def load_reward(
    spec: str,
    *,
    precision: str = "bf16",
    args: dict | None = None,
    field: str = "reward_args",
    device=None,
    aggregation: str = "mean",
    uwo_coef: float = 0.5,
) -> RewardFn:
    """The reward ``spec`` as ``fn(prompts, responses, **kwargs) -> list[float]``.

    ``args`` are keyword arguments bound to a scorer (``{target_words: 20}`` for
    ``length``; see :func:`rlhfkit.feedback.scorers.load_scorer`); a reward model
    takes none, and giving it some is an error naming ``field``. ``device``: where a reward model scores
    (:class:`rlhfkit.modeling.reward_model.RewardModel`; RL passes its process's device).
    ``aggregation`` and ``uwo_coef``: how a reward-model ensemble's members combine into the reward
    (:func:`rlhfkit.losses.aggregate_rewards`); a single reward model or a scorer has one score, which they leave as
    it is (said once, when not ``mean``).
    """
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        if args:
            raise ConfigError(f"{field}: {spec!r} is a reward-model directory, which takes no arguments (got {sorted(args)})")
        model = RewardModel(path, precision=precision, device=device, aggregation=aggregation, uwo_coef=uwo_coef)
        if model.num_members == 1 and aggregation != "mean":
            log.info(f"reward: {spec} is a single reward model (no ensemble): reward_aggregation={aggregation} changes nothing")
        return model
    if aggregation != "mean":
        log.info(f"reward: {spec!r} is a scorer, not a reward-model ensemble: reward_aggregation={aggregation} changes nothing")
    scorer = load_scorer(spec, args, field=field)

    def reward(prompts, responses, **kwargs) -> list[float]:
        return call_scorer(scorer, [prompt_text(p) for p in prompts], list(responses), **kwargs)

    reward.__name__ = f"reward[{spec}]"
    return reward


def scores_and_members(reward: RewardFn, prompts: Sequence, responses: Sequence[str]) -> tuple[list[float], torch.Tensor | None]:
    """``reward``'s scores of the responses, and, when it is a reward-model ensemble (K >= 2 heads), its members'
    normalised scores (N, K) from the same forward, for the disagreement (:func:`rlhfkit.losses.ensemble_std`);
    None for any other reward. The scores are the members aggregated as the ensemble was loaded
    (:func:`load_reward`'s ``aggregation``)."""
    if isinstance(reward, RewardModel) and reward.num_members > 1:
        members = reward.member_scores(list(prompts), list(responses))
        return reward.aggregate(members).tolist(), members
    return list(reward(list(prompts), list(responses))), None
