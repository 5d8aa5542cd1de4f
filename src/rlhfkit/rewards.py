"""Reward functions for RL and evaluation: one signature for every source.

``load_reward(spec)`` returns ``fn(prompts, responses, **kwargs) -> list[float]`` for

* a reward-model directory (any ``AutoModelForSequenceClassification``; scored with
  its own tokenizer, normalised with the gain/bias stored by ``rlhfkit reward``);
* ``module:function``, importable from the working directory;
* a built-in simulated-annotator score (``sentiment``, ``length``, ``banned``,
  ``rubric``/``demo``).

Prompts reach user functions as strings (a chat prompt's last user turn), as
the documented interface says; a reward model sees the full prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

RewardFn = Callable[..., list[float]]


def load_reward(spec: str, *, precision: str = "bf16") -> RewardFn:
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        from rlhfkit.reward import RewardModel

        return RewardModel(path, precision=precision)
    from rlhfkit.feedback.scorers import call_scorer, load_scorer
    from rlhfkit.feedback.simulated import prompt_text

    scorer = load_scorer(spec)

    def reward(prompts, responses, **kwargs) -> list[float]:
        return call_scorer(scorer, [prompt_text(p) for p in prompts], list(responses), **kwargs)

    reward.__name__ = f"reward[{spec}]"
    return reward
