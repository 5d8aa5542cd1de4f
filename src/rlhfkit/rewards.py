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

from collections.abc import Callable
from pathlib import Path

from rlhfkit.config import ConfigError
from rlhfkit.feedback.scorers import call_scorer, load_scorer
from rlhfkit.feedback.simulated import prompt_text
from rlhfkit.modeling.reward_model import RewardModel

RewardFn = Callable[..., list[float]]


def load_reward(
    spec: str, *, precision: str = "bf16", args: dict | None = None, field: str = "reward_args", device=None
) -> RewardFn:
    """The reward ``spec`` as ``fn(prompts, responses, **kwargs) -> list[float]``.

    ``args`` are keyword arguments bound to a scorer (``{target_words: 20}`` for
    ``length``; see :func:`rlhfkit.feedback.scorers.load_scorer`); a reward model
    takes none, and giving it some is an error naming ``field``. ``device``: where a reward model scores
    (:class:`rlhfkit.modeling.reward_model.RewardModel`; RL passes its process's device).
    """
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        if args:
            raise ConfigError(f"{field}: {spec!r} is a reward-model directory, which takes no arguments (got {sorted(args)})")
        return RewardModel(path, precision=precision, device=device)
    scorer = load_scorer(spec, args, field=field)

    def reward(prompts, responses, **kwargs) -> list[float]:
        return call_scorer(scorer, [prompt_text(p) for p in prompts], list(responses), **kwargs)

    reward.__name__ = f"reward[{spec}]"
    return reward
