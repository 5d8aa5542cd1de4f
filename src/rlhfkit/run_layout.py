"""The names in a pipeline run's directory, which :mod:`rlhfkit.pipeline` writes and :mod:`rlhfkit.report` reads:
stages, files, and the metric keys of each stage's ``metrics.jsonl`` that the report plots.

One definition for writer and reader, so renaming a stage or a file cannot silently empty a report section.
"""

from __future__ import annotations

OFFLINE_ALGORITHMS = ("dpo",)
"""Policy stages trained on fixed preference pairs (their metrics: :class:`PreferenceMetric`)."""
ONLINE_ALGORITHMS = ("ppo", "grpo", "rloo")
"""Policy stages that sample and score as they train (their metrics: :class:`RLMetric`)."""
POLICY_ALGORITHMS = OFFLINE_ALGORITHMS + ONLINE_ALGORITHMS
"""Policy-optimisation stages; each is named, and writes to a directory named, after its algorithm."""
STAGES = ("sft", "sample", "label", "reward", "gate", *POLICY_ALGORITHMS, "eval", "report")
"""Every stage a pipeline can have, in order (a run has the policy stages it asks for)."""
GATE_FILE = "gate.json"
"""The gate's verdict, in OUTPUT/gate."""
HELDOUT_FILE = "heldout.json"
"""The reward model's held-out accuracy with its interval, in the reward stage's output directory."""


class RLMetric:
    """Keys of an online-RL stage's ``metrics.jsonl`` that :mod:`rlhfkit.rl` writes and the report plots."""

    SCORE = "score"
    """Mean reward (reward-model or scorer) of the step's rollout, before penalties."""
    GOLD = "gold_score"
    """Mean gold score of the same responses (only with a gold scorer)."""
    REWARD = "reward"
    """Mean score - beta * KL (the score itself when there is no reference)."""
    KL = "kl"
    """Mean per-sequence k1 KL of the rollout to the reference (only with a reference)."""
    KL_K3 = "kl_k3"
    """The same with the k3 estimator."""
    ENTROPY = "entropy"
    RESPONSE_LENGTH = "response_length"
    POLICY_LOSS = "policy_loss"
    VALUE_LOSS = "value_loss"
    """ppo only."""
    CLIPFRAC = "clipfrac"
    APPROX_KL = "approx_kl"
    """Approximate KL from the sampling policy to the updated one."""


class PreferenceMetric:
    """Keys of a DPO or reward-model stage's ``metrics.jsonl`` that :mod:`rlhfkit.dpo` / :mod:`rlhfkit.reward` write
    and the report plots; held-out values carry :data:`EVAL_PREFIX` (``eval_accuracy``)."""

    LOSS = "loss"
    ACCURACY = "accuracy"
    MARGIN = "margin"
    REWARDS_CHOSEN = "rewards_chosen"
    """DPO's implicit reward beta * log(pi / ref) of the chosen response (mean)."""
    REWARDS_REJECTED = "rewards_rejected"


EVAL_PREFIX = "eval_"
"""What the training loop puts before a metric's name for its held-out value."""
