"""The names in a pipeline run's directory, which :mod:`rlhfkit.pipeline` writes and :mod:`rlhfkit.report` reads:
stages, files, and the metric keys of each stage's ``metrics.jsonl`` that the report plots.

One definition for writer and reader, so renaming a stage or a file cannot silently empty a report section.
"""

from __future__ import annotations

OFFLINE_ALGORITHMS = ("dpo",)
"""Policy stages trained on fixed preference pairs (their metrics: :class:`PreferenceMetric`)."""
OFFLINE_RL_ALGORITHMS = ("ilql",)
"""Policy stages trained by offline RL on fixed responses and their rewards (the labels' preferences turned into
rewards), no reward model and no sampling (their metrics: :class:`ILQLMetric`, not :class:`PreferenceMetric`)."""
ONLINE_ALGORITHMS = ("ppo", "grpo", "rloo", "a2c", "nlpo", "reinforce")
"""Policy stages that sample and score as they train (their metrics: :class:`RLMetric`)."""
POLICY_ALGORITHMS = OFFLINE_ALGORITHMS + OFFLINE_RL_ALGORITHMS + ONLINE_ALGORITHMS
"""Policy-optimisation stages; each is named, and writes to a directory named, after its algorithm."""
STAGES = ("sft", "sample", "label", "reward", "gate", *POLICY_ALGORITHMS, "eval", "report")
"""Every stage a pipeline can have, in order (a run has the policy stages it asks for)."""
GATE_FILE = "gate.json"
"""The gate's verdict, in OUTPUT/gate."""
HELDOUT_FILE = "heldout.json"
"""The reward model's held-out accuracy with its interval, in the reward stage's output directory."""
PROBE_CACHE = "probe_cache"
"""OUTPUT/probe_cache: the policy stages' shared step-0 frontier probe (:attr:`rlhfkit.probe.ProbeOptions.probe_cache`)."""


class RLMetric:
    """Keys of an online-RL stage's ``metrics.jsonl`` (and TensorBoard scalars), which :mod:`rlhfkit.rl` writes and
    the report plots. Namespaced as TRL does: ``rollout/`` for the step's samples, ``update/`` for the optimisation
    on them; the run's generic numbers (``lr``, ``beta``, timings, throughput) stay bare."""

    SCORE = "rollout/score"
    """Mean reward (reward-model or scorer) of the step's rollout, before penalties."""
    GOLD = "rollout/gold_score"
    """Mean gold score of the same responses (only with a gold scorer)."""
    SCORE_USED = "rollout/score_used"
    """Mean of the scores the advantages were computed from (after the overlong penalty, if any)."""
    REWARD = "rollout/reward"
    """Mean score - beta * KL (the score itself when there is no reference)."""
    KL = "rollout/kl"
    """Mean per-sequence k1 KL of the rollout to the reference (only with a reference)."""
    KL_K3 = "rollout/kl_k3"
    """The same with the k3 estimator."""
    ENTROPY = "rollout/entropy"
    RESPONSE_LENGTH = "rollout/response_length"
    EOS_RATE = "rollout/eos_rate"
    ZERO_VARIANCE_GROUPS = "rollout/zero_variance_groups"
    """Fraction of groups whose samples all scored the same (grpo/rloo: no learning signal)."""
    OVERLONG_PENALTY = "rollout/overlong_penalty"
    ENSEMBLE_STD = "rollout/ensemble_std"
    """A reward-model ensemble's disagreement: mean over the rollout of each response's std over the members'
    normalised scores (only with an ensemble reward model; `rollout/score` is their aggregate)."""
    ENSEMBLE_MEAN = "rollout/ensemble_mean"
    """Mean over the rollout of the members' mean score (only with an ensemble; `rollout/score` with
    reward_aggregation=mean)."""
    SAMPLER_LOGP_DIFF = "rollout/sampler_logp_diff"
    """rollout_engine=vllm: mean |trainer's log-prob - vLLM's| of the sampled response tokens (the training/inference
    mismatch)."""
    SAMPLER_LOGP_DIFF_MAX = "rollout/sampler_logp_diff_max"
    """rollout_engine=vllm: the largest of those differences over the step's tokens."""
    IS_WEIGHT_MEAN = "rollout/is_weight_mean"
    """rollout_engine=vllm with vllm_importance_sampling: mean truncated importance weight on the response tokens."""
    POLICY_LOSS = "update/policy_loss"
    VALUE_LOSS = "update/value_loss"
    """ppo only."""
    CLIPFRAC = "update/clipfrac"
    VALUE_CLIPFRAC = "update/value_clipfrac"
    APPROX_KL = "update/approx_kl"
    """Approximate KL from the sampling policy to the updated one."""
    UPDATE_ENTROPY = "update/entropy"
    UPDATE_KL = "update/kl"
    """Per-sequence k1 KL to the reference measured in the update's forward passes."""
    UPDATE_KL_K3 = "update/kl_k3"
    EXPLAINED_VARIANCE = "update/explained_variance"
    EPOCHS_DONE = "update/epochs_done"
    EARLY_STOPPED = "update/early_stopped"


class PreferenceMetric:
    """Keys of a DPO or reward-model stage's ``metrics.jsonl`` that :mod:`rlhfkit.dpo` / :mod:`rlhfkit.reward` write
    and the report plots; held-out values carry :data:`EVAL_PREFIX` (``eval_rewards/accuracy``). Named as TRL's
    DPO trainer names them (``rewards/...``); ``loss`` stays bare, as every trainer's."""

    LOSS = "loss"
    ACCURACY = "rewards/accuracy"
    """Pairs whose chosen response scores above the rejected one (a tie counts a half, for the reward model)."""
    MARGIN = "rewards/margin"
    REWARDS_CHOSEN = "rewards/chosen"
    """DPO's implicit reward beta * log(pi / ref) of the chosen response (mean)."""
    REWARDS_REJECTED = "rewards/rejected"


class ILQLMetric:
    """Keys of the ILQL stage's ``metrics.jsonl`` that :mod:`rlhfkit.ilql` writes: the mean over the batch's
    response tokens of each loss term and value (held-out values carry :data:`EVAL_PREFIX`). Named as TRLX's ILQL
    trainer names them (``losses/loss_q``, ...); ``loss`` stays bare, as every trainer's."""

    LOSS = "loss"
    """loss_q + loss_v + cql_scale * loss_cql + awac_scale * loss_awac."""
    LOSS_Q = "losses/loss_q"
    """Bellman loss, summed over the Q heads."""
    LOSS_V = "losses/loss_v"
    """Expectile loss of V toward the target Q heads' minimum."""
    LOSS_CQL = "losses/loss_cql"
    """CQL regulariser (cross-entropy of the Q values toward the taken token), summed over the Q heads."""
    LOSS_AWAC = "losses/loss_awac"
    """Language-model (behaviour-cloning / AWAC-weighted) cross-entropy."""
    VALUE = "values/mean"
    """Mean V of the states before response tokens."""
    TARGET_Q = "qvalues/target_min_mean"
    """Mean over tokens of the target Q heads' minimum at the taken token."""
    AWAC_WEIGHT = "awac_weight/mean"
    """Mean AWAC weight exp(awac_beta (min Qhat - V)) (1 with awac_beta 0)."""


LEGACY_METRIC_NAMES = {
    "score": RLMetric.SCORE,
    "gold_score": RLMetric.GOLD,
    "score_used": RLMetric.SCORE_USED,
    "reward": RLMetric.REWARD,
    "kl": RLMetric.KL,
    "kl_k3": RLMetric.KL_K3,
    "entropy": RLMetric.ENTROPY,
    "response_length": RLMetric.RESPONSE_LENGTH,
    "eos_rate": RLMetric.EOS_RATE,
    "zero_variance_groups": RLMetric.ZERO_VARIANCE_GROUPS,
    "overlong_penalty": RLMetric.OVERLONG_PENALTY,
    "policy_loss": RLMetric.POLICY_LOSS,
    "value_loss": RLMetric.VALUE_LOSS,
    "clipfrac": RLMetric.CLIPFRAC,
    "value_clipfrac": RLMetric.VALUE_CLIPFRAC,
    "approx_kl": RLMetric.APPROX_KL,
    "entropy_update": RLMetric.UPDATE_ENTROPY,
    "kl_update_seq": RLMetric.UPDATE_KL,
    "kl_k3_update_seq": RLMetric.UPDATE_KL_K3,
    "explained_variance": RLMetric.EXPLAINED_VARIANCE,
    "epochs_done": RLMetric.EPOCHS_DONE,
    "early_stopped": RLMetric.EARLY_STOPPED,
    "accuracy": PreferenceMetric.ACCURACY,
    "margin": PreferenceMetric.MARGIN,
    "rewards_chosen": PreferenceMetric.REWARDS_CHOSEN,
    "rewards_rejected": PreferenceMetric.REWARDS_REJECTED,
}
"""Metric names of runs written before the names were namespaced -> today's (the report reads old runs through it;
held-out values map the same way under :data:`EVAL_PREFIX`)."""


def current_metric_names(entry: dict) -> dict:
    """A ``metrics.jsonl`` entry with any name from before the namespacing (:data:`LEGACY_METRIC_NAMES`) renamed."""
    out = {}
    for key, value in entry.items():
        bare = key[len(EVAL_PREFIX) :] if key.startswith(EVAL_PREFIX) else key
        new = LEGACY_METRIC_NAMES.get(bare)
        out[key if new is None else (EVAL_PREFIX + new if key.startswith(EVAL_PREFIX) else new)] = value
    return out


EVAL_PREFIX = "eval_"
"""What the training loop puts before a metric's name for its held-out value."""
