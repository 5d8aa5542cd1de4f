"""The math of RLHF, as pure torch functions: tensors in, tensors out.

Nothing here imports a trainer, a model class or a distributed engine, so every
function can be tested against a hand computation. Shape conventions:

* ``B`` sequences, ``T`` response positions. A ``mask`` of shape (B, T) is True on
  real response tokens (False on padding and prompt). Response tokens of a row
  are contiguous and start at position 0 of the response tensor.
* Sequence log-probabilities ("logps") are *sums* over response tokens, shape (B,).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is True."""
    x = torch.where(mask, x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over True entries of ``mask`` (0 where a row has none)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Variance of the True entries of ``x`` (Bessel-corrected by default, as in TRL)."""
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased:
        if n < 2:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        return sq / (n - 1)
    return sq / n.clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to unit variance over the masked entries; zero-mean if ``shift_mean``.

    ``(x - mean) / sqrt(var + eps)``, with ``mean`` added back when
    ``shift_mean=False`` (used to rescale rewards without moving their mean).
    Statistics use masked entries only; unmasked entries are returned as 0.
    Shape: ``x``, ``mask``: any matching shape.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))


# ----------------------------------------------------------------------------- reward models


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Per-pair Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected - margin)``.

    Ouyang et al. 2022 (InstructGPT), eq. 1; the optional margin is Llama 2's
    margin ranking loss (Touvron et al. 2023, eq. 2). Shapes: (B,) -> (B,).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def preference_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, target: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Bradley-Terry with soft targets: cross-entropy of ``P(chosen > rejected) = sigmoid(d)``.

    ``-(p log sigmoid(d) + (1 - p) log sigmoid(-d))`` with ``d = r_c - r_r``;
    ``target`` p is 1 for a plain preference (equals :func:`bradley_terry_loss`) and
    0.5 for a tie. The margin applies to strict preferences only: ``d - margin`` where p = 1,
    ``d + margin`` where p = 0, and no margin for a tie (else the tie loss, minimal at
    ``d = margin``, would teach a preference). Shapes: (B,) -> (B,).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        sign = torch.where(target >= 1, 1.0, torch.where(target <= 0, -1.0, 0.0)).to(diff.dtype)
        diff = diff - sign * margin
    return -(target * F.logsigmoid(diff) + (1 - target) * F.logsigmoid(-diff))


# ----------------------------------------------------------------------------- reward-model ensembles

RewardAggregation = Literal["mean", "wco", "uwo"]
REWARD_AGGREGATIONS: tuple[str, ...] = ("mean", "wco", "uwo")
"""How an ensemble's member scores become one reward (:func:`aggregate_rewards`)."""


def aggregate_rewards(scores: torch.Tensor, how: str = "mean", uwo_coef: float = 0.5) -> torch.Tensor:
    """One reward per sample from the scores of ``k`` ensemble members (Coste et al. 2024, "Reward Model Ensembles
    Help Mitigate Overoptimization"). Shapes: (N, k) -> (N,).

    * ``mean``: ``(1/k) sum_i R_i``;
    * ``wco`` (worst-case optimisation): ``min_i R_i``;
    * ``uwo`` (uncertainty-weighted optimisation): ``(1/k) sum_i R_i - lambda (1/k) sum_i (R_i - mean)^2``, the mean
      minus ``uwo_coef`` (lambda) times the intra-ensemble variance -- the population variance (divided by ``k``),
      as in the paper's formula.

    With one member (k = 1) every aggregation returns its score unchanged (the variance is 0).
    """
    if scores.dim() != 2:
        raise ValueError(f"aggregate_rewards: scores must be (N, k), got shape {tuple(scores.shape)}")
    if how == "mean":
        return scores.mean(-1)
    if how == "wco":
        return scores.min(-1).values
    if how == "uwo":
        return scores.mean(-1) - uwo_coef * scores.var(-1, correction=0)
    raise ValueError(f"reward aggregation must be one of {', '.join(REWARD_AGGREGATIONS)}, not {how!r}")


def ensemble_std(scores: torch.Tensor) -> torch.Tensor:
    """Disagreement of an ensemble on each sample: the population std over its members, the square root of the
    variance :func:`aggregate_rewards` ``uwo`` penalises (0 for one member). Shapes: (N, k) -> (N,)."""
    return scores.std(-1, correction=0)


def ensemble_preference_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    target: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss of a ``k``-member reward ensemble: the mean over members of each member's
    :func:`preference_loss` on the pair, times the member's weight for the pair (a bootstrap count: how often the
    member's resample drew the pair; None: 1 for all). Shapes: scores (P, k), ``target`` and a tensor ``margin``
    (P,), ``weights`` (P, k) -> (P,).

    Summed over pairs this is ``(1/k) sum_h sum_p w_ph loss_ph``: member ``h``'s weighted Bradley-Terry loss, averaged
    over members, so one member (k = 1, weight 1) gives :func:`preference_loss` exactly.
    """
    if isinstance(margin, torch.Tensor):
        margin = margin[:, None]
    per_member = preference_loss(chosen_rewards, rejected_rewards, target[:, None], margin)
    if weights is not None:
        per_member = per_member * weights
    return per_member.mean(-1)


# ----------------------------------------------------------------------------- direct preference optimisation

DPOLossType = Literal["sigmoid", "ipo", "hinge"]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO and relatives. Returns ``(losses, chosen_rewards, rejected_rewards)``, each (B,).

    With ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``:

    * ``sigmoid``: ``-log sigmoid(beta h)`` — Rafailov et al. 2023, eq. 7. With
      ``label_smoothing`` eps it is conservative DPO (Mitchell 2023):
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    * ``ipo``: ``(h - 1 / (2 beta))^2`` — Azar et al. 2023, eq. 17 (beta is tau).
    * ``hinge``: ``max(0, 1 - beta h)`` — SLiC-HF, Zhao et al. 2023, eq. 1 (beta = 1/delta).

    ``label_smoothing`` applies to ``sigmoid`` only (IPO and hinge have no label-noise form).

    Log-probs are sums over response tokens, the paper's definition of
    ``log pi(y|x)``. (The seed example averaged them; averaging makes the implicit
    reward length-normalised, which is SimPO's choice — see :func:`simpo_loss`.)
    Implicit rewards are ``beta (log pi - log ref)``, detached.
    """
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type '{loss_type}' (sigmoid, ipo, hinge)")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with target margin.

    ``-log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)``; label
    smoothing as in :func:`dpo_loss`. Returns ``(losses, chosen_rewards,
    rejected_rewards)`` with rewards ``beta log pi(y) / |y|``. Shapes: (B,).
    """
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths
    logits = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


KTOLossType = Literal["kto", "apo_zero_unpaired"]


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: KTOLossType = "kto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO on unpaired examples (Ethayarajh et al. 2024, eq. 7). Returns ``(losses, rewards)``, each (B,).

    With ``r(x, y) = log pi(y|x) - log ref(y|x)`` and the reference point ``z0`` (``kl``; a scalar,
    treated as a constant: no gradient flows through it), the per-example loss is
    ``lambda_y - v(x, y)`` where the value is::

        v(x, y) = lambda_D sigmoid(beta (r(x, y) - z0))   if y is desirable
                  lambda_U sigmoid(beta (z0 - r(x, y)))   if y is undesirable

    i.e. ``lambda_D (1 - sigmoid(beta (r - z0)))`` for a desirable example and
    ``lambda_U (1 - sigmoid(beta (z0 - r)))`` for an undesirable one (``lambda_D`` =
    ``desirable_weight``, ``lambda_U`` = ``undesirable_weight``). The paper's ``z0`` is
    ``max(0, mean over mismatched pairs (x_i, y_j) of r)``, estimated per batch by the caller
    (:func:`kto_reference_point`). ``loss_type="apo_zero_unpaired"`` is APO-zero's unpaired form
    (D'Oosterlinck et al. 2024): ``1 - sigmoid(beta r)`` desirable, ``sigmoid(beta r)`` undesirable, no ``z0``.

    This is TRL's definition (``KTOTrainer._compute_loss``, trl/trainer/kto_trainer.py, TRL 1.16): its batch loss
    is the mean of these per-example losses. ``desirable``: (B,) bool. Implicit rewards are ``beta r``, detached.
    Log-probs are sums over response tokens.
    """
    logratios = policy_logps - ref_logps
    z0 = kl.detach() if torch.is_tensor(kl) else kl
    desirable = desirable.to(torch.bool)
    if loss_type == "kto":
        chosen = 1 - torch.sigmoid(beta * (logratios - z0))
        rejected = 1 - torch.sigmoid(beta * (z0 - logratios))
    elif loss_type == "apo_zero_unpaired":
        chosen = 1 - torch.sigmoid(beta * logratios)
        rejected = torch.sigmoid(beta * logratios)
    else:
        raise ValueError(f"unknown KTO loss_type '{loss_type}' (kto, apo_zero_unpaired)")
    losses = torch.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)
    return losses, beta * logratios.detach()


def kto_reference_point(kl_logratio_sum: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """KTO's reference point ``z0 = max(0, kl_logratio_sum / count)``, detached (a scalar).

    ``kl_logratio_sum`` sums ``log pi(y'|x) - log ref(y'|x)`` over mismatched pairs ``(x, y')``; with the
    sum and count of every process's batch it is the mean over the global batch. (TRL: the mean of each
    process's batch mean, ``gather_for_metrics(...).mean().clamp(min=0)``: the same for equal batches.)
    """
    count = count.clamp(min=1) if torch.is_tensor(count) else max(float(count), 1.0)
    return (kl_logratio_sum.detach() / count).clamp(min=0)


# ----------------------------------------------------------------------------- KL estimators

KLEstimator = Literal["k1", "k2", "k3"]


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from pi_theta.

    Schulman, "Approximating KL Divergence" (2020). With ``log r = ref_logps - logps``:

    * ``k1 = -log r = logps - ref_logps`` — unbiased, high variance, can be negative;
    * ``k2 = (log r)^2 / 2`` — biased, low variance, >= 0;
    * ``k3 = (r - 1) - log r`` — unbiased, low variance, >= 0.

    Shapes: (B, T) -> (B, T).
    """
    log_ratio = ref_logps - logps
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator '{estimator}' (k1, k2, k3)")


# ----------------------------------------------------------------------------- advantages


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16).

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``,
    where the value after the last response token is 0: the episode ends there.
    Returns ``(advantages, returns)`` with ``returns = advantages + values``; both
    are 0 where ``mask`` is False. Shapes: ``rewards``, ``values``, ``mask`` (B, T).
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards, torch.zeros_like(rewards))
    values = torch.where(mask, values, torch.zeros_like(values))
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        adv = torch.where(mask[:, t], adv, torch.zeros_like(adv))
        advantages[:, t] = adv
        # Positions past the end of a response have mask False, so the value and
        # advantage carried back into the last real token are 0.
        next_adv, next_value = adv, values[:, t]
    return advantages, advantages + values


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go ``G_t = sum_{k>=t} gamma^(k-t) r_k`` within each response (REINFORCE).

    Shapes: (B, T) -> (B, T); 0 where ``mask`` is False.
    """
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    return advantages


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 5; Kool et al. 2019).

    ``A_i = s_i - mean_{j != i} s_j`` within each group of ``group_size`` samples of
    the same prompt. Shape: (N * group_size,) ordered group by group -> same.
    """
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2")
    grouped = scores.view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


def grpo_advantages(scores: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath, eq. 3 with outcome rewards).

    ``A_i = (s_i - mean(group)) / (std(group) + eps)``; ``scale=False`` skips the
    division (Dr. GRPO, Liu et al. 2025, which argues the std term biases toward
    easy/hard prompts). ``std`` is Bessel-corrected, as in TRL. Shape: (N * G,) -> same.
    Eq. 3 also averages each response's token losses before averaging over responses; rlhfkit's
    RL trainer instead defaults to DAPO's token mean over the step (see :func:`loss_token_weights`).
    """
    grouped = scores.view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    return centred.view(-1)


def advantages(
    algorithm: str,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    values: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
    group_size: int = 1,
    scale: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token advantages of every online algorithm, and PPO's value targets: the one place they differ.

    * ``ppo``: token rewards ``r_t = -beta KL_t`` plus the score at the last response token (Ziegler et
      al. 2019, eq. 2), then GAE against ``values`` (:func:`gae`); returns ``(advantages, returns)``;
    * ``a2c``: exactly ppo's (A2C differs in the loss, :func:`a2c_policy_loss`, not the advantages);
    * ``reinforce``: the same rewards, discounted reward-to-go minus its masked mean over the batch;
    * ``rloo``: the sequence reward ``score - beta sum_t KL_t``, leave-one-out baseline over each group
      of ``group_size`` (:func:`rloo_advantages`), the same for every token;
    * ``grpo``: group-normalised scores (:func:`grpo_advantages`, ``scale``), every token; the KL is
      not in the reward but in the loss (``beta k3`` per token, in the trainer).

    ``whiten_advantages`` whitens ppo's, a2c's and reinforce's over the batch. ``kl`` (B, R) is the per-token
    KL estimate, None for none (no reference). Shapes: ``scores`` (B,), ``mask``/``values`` (B, R).
    Advantages are 0 where ``mask`` is False; the second value is None except for ppo and a2c.
    """
    mask = mask.bool()
    kl = torch.zeros(mask.shape, dtype=scores.dtype) if kl is None else kl
    returns = None
    if algorithm in ("ppo", "a2c", "reinforce"):
        last = (mask.long().cumsum(-1) == mask.sum(-1, keepdim=True)) & mask  # the last response token
        token_rewards = -beta * kl + last.to(scores.dtype) * scores[:, None]
        if algorithm in ("ppo", "a2c"):
            if values is None:
                raise ValueError(f"{algorithm}'s advantages need values (GAE)")
            adv, returns = gae(token_rewards, values, mask, gamma, lam)
        else:
            adv = discounted_returns(token_rewards, mask, gamma)
            adv = torch.where(mask, adv - masked_mean(adv, mask), 0.0)
        if whiten_advantages:
            adv = whiten(adv, mask)
    elif algorithm == "rloo":
        adv = rloo_advantages(scores - beta * torch.where(mask, kl, 0.0).sum(-1), group_size)[:, None].expand_as(mask)
    elif algorithm == "grpo":
        adv = grpo_advantages(scores, group_size, scale=scale)[:, None].expand_as(mask)
    else:
        raise ValueError(f"unknown algorithm '{algorithm}' (ppo, a2c, reinforce, rloo, grpo)")
    return torch.where(mask, adv, 0.0), returns


# ----------------------------------------------------------------------------- PPO


def ppo_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a per-token loss.

    ``loss_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))`` with
    ``rho_t = exp(logps - old_logps)``. Returns ``(losses, clipped)``: per-token
    losses and a bool tensor True where the clipped term was the active one.
    The caller reduces with a mask (e.g. :func:`masked_mean`). Shapes: (B, T). The trainer uses
    :func:`policy_loss`, which equals this with its defaults and adds the GRPO family's variants.
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def a2c_policy_loss(logps: torch.Tensor, advantages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantage actor-critic's per-token policy loss, ``-A_t log pi(a_t | s_t)`` (Mnih et al. 2016; RL4LMs' A2C).

    No importance ratio and no clip: one pass over fresh samples, so its gradient ``-A_t grad log pi`` is the
    clipped surrogate's at ratio 1, but it never zeroes a token's gradient. Returns ``(losses, clipped)`` like
    :func:`policy_loss`, ``clipped`` all False. Shapes: (B, T); reduce with a mask.
    """
    return -advantages * logps, torch.zeros_like(logps, dtype=torch.bool)


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_eps: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (as in OpenAI baselines' PPO2 and Ziegler et al. 2019), per token.

    ``0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)``. Returns
    ``(losses, clipped)``, clipped True where the clipped error was larger. Shapes: (B, T).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    return 0.5 * torch.maximum(err, err_clipped), err_clipped > err


def approx_kl(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_old || pi_theta), for early stopping (as in cleanrl)."""
    log_ratio = logps - old_logps
    return torch.expm1(log_ratio) - log_ratio


def truncated_is_weights(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, cap: float = 2.0
) -> torch.Tensor:
    """Truncated importance weights ``min(exp(trainer_logps - sampler_logps), cap)`` (B, T); detached, 0 where
    ``mask`` is False.

    When an inference engine (vLLM) samples the rollouts, its numerics (bf16 kernels, another attention) make it a
    slightly different policy ``mu`` from the ``pi_old`` the trainer computes, so the samples are off-policy.
    Weighting each token's policy-gradient loss by ``pi_old / mu``, truncated at ``cap`` to bound the variance,
    corrects for it: truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings
    You Off-Policy RL Training"; TRL's GRPOTrainer, ``vllm_importance_sampling_correction`` with
    ``vllm_importance_sampling_cap=2.0``). Only the top is truncated: a token the sampler found likelier than the
    trainer keeps its weight below 1. A NaN in ``sampler_logps`` (a token the sampler gave no log-prob for)
    gets weight 1, uncorrected.
    """
    with torch.no_grad():
        ratio = torch.exp(trainer_logps.detach() - sampler_logps).clamp(max=cap)
        ratio = torch.where(sampler_logps.isnan(), 1.0, ratio)
        return torch.where(mask, ratio, 0.0)


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[targets - predictions] / Var[targets]`` over masked entries (nan if Var[targets] = 0)."""
    var_targets = masked_var(targets, mask)
    if var_targets == 0:
        return torch.tensor(math.nan)
    return 1 - masked_var(targets - predictions, mask) / var_targets


# ----------------------------------------------------------------------------- the GRPO family of policy losses
#
# One policy loss, with the choices the GRPO follow-ups made named: how the importance ratio is formed
# (per token or per sequence), how it is clipped, and how per-token losses are averaged into the step's
# loss. :func:`policy_loss` gives per-token losses; :func:`loss_token_weights` the weights that reduce them.

RatioLevel = Literal["token", "sequence"]
ClipMode = Literal["symmetric", "asymmetric", "cispo", "dual"]
LossType = Literal["grpo", "dapo", "dr_grpo", "bnpo"]


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio_level: RatioLevel = "token",
    clip: ClipMode = "symmetric",
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: float = 3.0,
    log_ratio_clamp: float | None = 20.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token policy-gradient losses of the PPO/GRPO family. Returns ``(losses, clipped)``, both (B, T).

    The importance ratio (``ratio_level``), with ``log r = logps - old_logps`` clamped to
    ``[-log_ratio_clamp, log_ratio_clamp]`` before ``exp`` (None or 0: no clamp):

    * ``token``: ``r_t = exp(log r_t)`` — PPO (Schulman et al. 2017, eq. 6-7).
    * ``sequence``: ``s_i = exp(mean_t log r_t)`` over the masked tokens of row i, the same for every
      token of the row, its gradient flowing through the mean — GSPO (Zheng et al. 2025, eq. 7; their
      objective, eq. 5, is the per-sequence clipped surrogate, which ``loss_type="grpo"`` weights give back).

    The clip (``clip``), with ``lo = 1 - clip_eps_low``, ``hi = 1 + clip_eps_high``:

    * ``symmetric``: ``max(-A r, -A clip(r, lo, hi))`` with ``clip_eps_low == clip_eps_high`` —
      PPO's clipped surrogate, Schulman et al. 2017, eq. 7 (DeepSeekMath's GRPO, Shao et al. 2024, eq. 3).
    * ``asymmetric``: the same with two epsilons — DAPO's clip-higher (Yu et al. 2025, eq. 8; they use
      ``clip_eps_low=0.2, clip_eps_high=0.28``).
    * ``cispo``: ``-sg(clip(r, lo, hi)) A log pi_t`` — CISPO (MiniMax-M1, MiniMax 2025, eq. 4-5): the
      clipped ratio is a stop-gradient weight, so every token keeps its gradient ``-clip(r) A`` w.r.t.
      ``logps`` (the value of this loss is not comparable with the others').
    * ``dual``: PPO's clip, and for ``A < 0`` the loss capped at ``-c A``:
      ``min(max(-A r, -A clip(r)), -c A)`` with ``c = dual_clip_c > 1`` — dual-clip PPO (Ye et al. 2020,
      "Mastering Complex Control in MOBA Games", eq. 5).

    ``clipped`` is True where a clip was active: the clipped surrogate was the larger term (or the
    dual cap was reached), or, for ``cispo``, the weight was clipped. ``mask`` (B, T) selects the tokens
    of the sequence mean; losses at masked-out positions are meaningless (reduce with a mask or
    :func:`loss_token_weights`). With ``ratio_level="token", clip="symmetric"`` and log-ratios inside the
    clamp, this is exactly :func:`ppo_policy_loss`.
    """
    if clip not in ("symmetric", "asymmetric", "cispo", "dual"):
        raise ValueError(f"unknown clip '{clip}' (symmetric, asymmetric, cispo, dual)")
    if clip == "symmetric" and clip_eps_low != clip_eps_high:
        raise ValueError(
            f"clip='symmetric' takes one epsilon (got low {clip_eps_low}, high {clip_eps_high}); use clip='asymmetric'"
        )
    if clip == "dual" and not dual_clip_c > 1:
        raise ValueError(f"dual_clip_c must be > 1 (got {dual_clip_c})")
    log_ratio = logps - old_logps
    if ratio_level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, dim=-1)[:, None].expand_as(logps)
    elif ratio_level != "token":
        raise ValueError(f"unknown ratio_level '{ratio_level}' (token, sequence)")
    if log_ratio_clamp:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    low, high = 1.0 - clip_eps_low, 1.0 + clip_eps_high
    if clip == "cispo":
        weight = torch.clamp(ratio, low, high).detach()
        return -weight * advantages * logps, (ratio < low) | (ratio > high)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, low, high)
    losses, active = torch.maximum(unclipped, clipped), clipped > unclipped
    if clip == "dual":
        cap = -dual_clip_c * advantages
        capped = (advantages < 0) & (losses > cap)
        losses, active = torch.where(capped, cap, losses), active | capped
    return losses, active


def loss_token_weights(
    mask: torch.Tensor, loss_type: LossType, *, num_seqs: float, num_tokens: float, max_new_tokens: int
) -> torch.Tensor:
    """Weights (B, T) that reduce per-token losses to a loss: ``sum(weights * losses)``.

    ``num_seqs`` and ``num_tokens`` count the sequences and (masked) tokens of the whole optimiser
    step — every micro-batch of the accumulation on every process — so that summing this over the
    step's micro-batches gives the step's loss. ``mask`` is this micro-batch's (B, T) mask:

    * ``grpo``: the mean over each sequence's tokens, then over sequences: ``1 / (len_i num_seqs)`` —
      DeepSeekMath's GRPO objective (Shao et al. 2024, eq. 3). Long responses get a smaller weight per token.
    * ``dapo``: the token mean over the step: ``1 / num_tokens`` — DAPO's token-level policy-gradient
      loss (Yu et al. 2025, eq. 8 and §3.3). rlhfkit's default.
    * ``dr_grpo``: ``1 / (num_seqs max_new_tokens)``, a constant that depends on no response's length —
      Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", the objective of their Fig. 1,
      which drops GRPO's ``1 / |o_i|``; their code divides by the generation limit).
    * ``bnpo``: the token mean of this ``mask`` alone, ``1 / mask.sum()`` (TRL's ``bnpo``): a loss per
      micro-batch, to be *averaged* over the step's micro-batches (it depends on how the step is split).

    Summed over the step, the weights are 1 for grpo (every sequence non-empty), dapo and bnpo (per
    micro-batch), and ``num_tokens / (num_seqs max_new_tokens)`` for dr_grpo. Masked-out entries are 0.
    """
    m = mask.to(torch.float32)
    if loss_type == "dapo":
        return m / max(float(num_tokens), 1.0)
    if loss_type == "grpo":
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * max(float(num_seqs), 1.0))
    if loss_type == "dr_grpo":
        return m / (max(float(num_seqs), 1.0) * max_new_tokens)
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    raise ValueError(f"unknown loss_type '{loss_type}' (grpo, dapo, dr_grpo, bnpo)")


def zero_variance_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) bool: True for each group of ``group_size`` consecutive scores that are all equal.

    Such a group has zero group-relative advantage (GRPO, RLOO): DAPO's dynamic sampling (Yu et al.
    2025, eq. 8, the constraint ``0 < |{correct}| < G``; §3.2) filters them out. Exact equality.
    Shape: (N * group_size,) ordered group by group -> (N,).
    """
    grouped = scores.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(1)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with ``L_max = max_new_tokens``, ``L_cache = buffer``.

    ``R_length(y) = 0`` if ``|y| <= L_max - L_cache``; ``((L_max - L_cache) - |y|) / L_cache`` if
    ``L_max - L_cache < |y| <= L_max`` (0 down to -1); ``-1`` if ``|y| > L_max``. The paper's ``L_max``
    is the generation limit too (20,480 tokens: a 16,384-token expected length plus a 4,096-token
    cache), so a rollout never reaches the last case; it is kept for lengths from elsewhere.
    Shape: (B,) lengths in tokens -> (B,) fp32.
    """
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"the overlong buffer must be in (0, max_new_tokens={max_new_tokens}] (got {buffer})")
    lengths = lengths.to(torch.float32)
    expected = max_new_tokens - buffer
    soft = (expected - lengths) / buffer
    return torch.where(lengths <= expected, torch.zeros_like(lengths), torch.where(lengths <= max_new_tokens, soft, -1.0))


# ----------------------------------------------------------------------------- NLPO
#
# Natural Language Policy Optimization (Ramamurthy et al. 2022, "Is Reinforcement Learning (Not) for Natural
# Language Processing?", §3.2 and Algorithm 1; RL4LMs): PPO with invalid-action masking. A masking policy, a
# periodically refreshed copy of the policy, keeps the top-p tokens of each step; the policy samples among them,
# and its log-probs (so PPO's ratio) are those of its distribution renormalised over the kept tokens.


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus of ``softmax(logits)`` (Holtzman et al. 2020), as NLPO's action mask: True on the smallest set of
    most likely tokens whose probability reaches ``top_p``, i.e. on each token whose more likely tokens have mass
    below ``top_p``. The most likely token is always kept (``top_p <= 0`` keeps it alone); ``top_p >= 1`` keeps every
    token (exactly, whatever the rounding of the cumulative sum). Equal probabilities are ranked by token id (a stable
    sort), so ties at the edge keep the lower ids.

    Ramamurthy et al. 2022, §3.2 ("top-p sampling of the masking policy"); RL4LMs' ``learned_top_p`` mask keeps a
    token when the mass before it is <= top_p, this the standard nucleus (< top_p, as
    :class:`rlhfkit.generation.rollout.InverseCDFSampler`), and RL4LMs' ``min_tokens_to_keep`` and always-kept special
    tokens are left out (the most likely token alone is kept unconditionally).

    Shape: ``logits`` (..., V) -> (..., V) bool. Temperature: divide the logits before the call.
    """
    if top_p >= 1.0:
        return torch.ones_like(logits, dtype=torch.bool)
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the more likely tokens
    keep_sorted = before < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def masked_token_logps(
    logits: torch.Tensor, keep: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logps, entropy or None)`` of ``tokens`` under ``softmax(logits / temperature)`` restricted to ``keep``
    (renormalised over the kept tokens): the logits are -inf outside ``keep``, then log-softmax and gather. NLPO's
    masked log-probs (Ramamurthy et al. 2022, §3.2), from which PPO's ratio ``exp(logps - old_logps)`` is formed
    with both under the same mask; the entropy is that of the masked distribution.

    ``keep`` must hold at least one True per position; a token outside it gets -inf. Gradients reach the kept
    logits only (the masked ones have probability 0).

    Shape: ``logits`` (B, T, V), ``keep`` (B, T, V) bool (True: the token may be sampled), ``tokens`` (B, T) ->
    ``logps`` (B, T) fp32, ``entropy`` (B, T) fp32 or None.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    logp = z.masked_fill(~keep, float("-inf")).log_softmax(-1)
    logps = logp.gather(-1, tokens[..., None]).squeeze(-1)
    if not with_entropy:
        return logps, None
    # 0 * log 0 = 0 outside the mask: fill the -inf log-probs there with 0 before the product (not after, or NaN).
    entropy = -(logp.exp() * logp.masked_fill(~keep, 0.0)).sum(-1)
    return logps, entropy


# ----------------------------------------------------------------------------- ILQL
# The math of ILQL (Implicit Language Q-Learning, Snell et al. 2022, "Offline RL for Natural Language Generation
# with Implicit Language Q Learning", arXiv:2206.11871); the model and the training loop are in rlhfkit.ilql.
#
# ILQL is IQL (Kostrikov et al. 2021, "Offline Reinforcement Learning with Implicit Q-Learning") at the token
# level: the state s_t is the prompt and the response tokens before t, the action a_t the response token t; the
# reward is sparse, the sequence's scalar reward on its last response token; the state after the last token is
# terminal (V = 0). Per response token:
#
# * Bellman (TD) loss for each Q head: (Q_i(s, a) - (r + gamma V(s')))^2, the target held fixed
#   (bellman_targets, q_loss);
# * expectile loss for V toward the target Q heads' minimum at the taken action,
#   L_2^tau(min_i Qhat_i(s, a) - V(s)) with L_2^tau(u) = |tau - 1(u < 0)| u^2 (expectile_loss, v_loss);
# * the CQL-style regulariser: cross-entropy of each Q head's values over the vocabulary, read as logits, toward
#   the taken token, logsumexp_a' Q(s, a') - Q(s, a) (cql_loss);
# * the language-model (behaviour-cloning) loss, each token's cross-entropy weighted by
#   exp(beta_awac (min Qhat - V)) (AWAC; beta_awac = 0 is plain behaviour cloning) (awac_weights, awac_loss).
#
# Decoding perturbs the behaviour policy's log-probs by the advantage, log pi_beta(a|s) + beta (Q(s, a) - V(s))
# (the paper's eq. 7 as issue 23 cites it: pi(a|s) ∝ pi_beta(a|s) exp(beta (Q(s, a) - V(s)))) (ilql_logits,
# top_k_mask), and the target Q heads follow the trained ones by Polyak averaging (polyak_update_).
#
# Where this follows TRLX: ILQLConfig.loss and ILQLHeads._sync_target_q_heads /
# AutoModelForCausalLMWithILQLHeads.generate in trlx/models/modeling_ilql.py (CarperAI/trlx): the same terms, the
# target heads' minimum in the V loss and in decoding, the Q loss and CQL loss summed over the Q heads. Losses
# here are *per token* (shape (K,), K response tokens); the caller sums them and the training loop divides by the
# tokens of the global batch, which for one batch is TRLX's sum(...) / n_nonterminal.


def expectile_loss(diff: torch.Tensor, tau: float) -> torch.Tensor:
    """IQL's asymmetric squared loss ``L_2^tau(u) = |tau - 1(u < 0)| u^2`` of ``u = target - prediction``,
    elementwise (the expectile regression of IQL, Kostrikov et al. 2021; ILQL's V loss).

    With ``tau > 0.5`` an under-estimate (``u > 0``) costs ``tau u^2`` and an over-estimate ``(1 - tau) u^2``, so
    the minimiser over samples of the target is their ``tau``-expectile, above the mean: V approaches the value of
    the better in-data actions. ``tau = 0.5`` is half the squared error.

    Shape: ``diff`` any -> the same.
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"expectile tau must be in (0, 1), got {tau}")
    weight = torch.where(diff < 0, 1.0 - tau, tau)
    return weight * diff.pow(2)


def bellman_targets(rewards: torch.Tensor, next_values: torch.Tensor, terminal: torch.Tensor, gamma: float) -> torch.Tensor:
    """The Q heads' regression targets ``r_t + gamma V(s_{t+1})``, with ``V = 0`` after the last token, detached.

    Shapes: ``rewards`` (K,) (the sequence reward on its last token, 0 elsewhere), ``next_values`` (K,) (V of the
    state after token k, whatever it is at a terminal token), ``terminal`` (K,) bool (True: token k is its
    response's last) -> (K,).
    """
    bootstrap = torch.where(terminal, torch.zeros_like(next_values), next_values.detach())
    return (rewards + gamma * bootstrap).detach()


def q_loss(q_taken: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The Bellman (TD) loss summed over Q heads: ``sum_i (Q_i(s, a) - target)^2`` per token.

    Shapes: ``q_taken`` (H, K) (each head's value of the taken token), ``targets`` (K,) -> (K,).
    """
    return (q_taken - targets.detach().unsqueeze(0)).pow(2).sum(0)


def v_loss(target_q_taken: torch.Tensor, values: torch.Tensor, tau: float) -> torch.Tensor:
    """The expectile loss of V toward the target Q heads' minimum at the taken token (held fixed):
    ``L_2^tau(min_i Qhat_i(s, a) - V(s))`` per token.

    Shapes: ``target_q_taken`` (H, K), ``values`` (K,) -> (K,).
    """
    target = target_q_taken.detach().min(0).values
    return expectile_loss(target - values, tau)


def cql_loss(q_logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """The CQL-style regulariser summed over Q heads: each head's Q values over the vocabulary read as logits, and
    their cross-entropy toward the taken token, ``logsumexp_a' Q_i(s, a') - Q_i(s, a)``; it pushes down the
    values of tokens the data did not take.

    Shapes: ``q_logits`` (H, K, V), ``actions`` (K,) long -> (K,).
    """
    heads, k, vocab = q_logits.shape
    per_head = F.cross_entropy(q_logits.float().reshape(heads * k, vocab), actions.repeat(heads), reduction="none")
    return per_head.reshape(heads, k).sum(0)


def awac_weights(target_q_taken: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """AWAC's per-token weight of the language-model loss, ``exp(beta (min_i Qhat_i(s, a) - V(s)))``, detached;
    ``beta = 0`` gives 1 (plain behaviour cloning, TRLX's default).

    Shapes: ``target_q_taken`` (H, K), ``values`` (K,) -> (K,).
    """
    with torch.no_grad():
        return torch.exp(beta * (target_q_taken.min(0).values - values))


def awac_loss(lm_logits: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted behaviour-cloning loss: the LM's cross-entropy of the taken token times ``weights``.

    Shapes: ``lm_logits`` (K, V), ``actions`` (K,) long, ``weights`` (K,) -> (K,).
    """
    return F.cross_entropy(lm_logits.float(), actions, reduction="none") * weights.detach()


def ilql_logits(lm_logits: torch.Tensor, q: torch.Tensor, v: torch.Tensor, beta: float) -> torch.Tensor:
    """ILQL's decoding logits: ``log_softmax(lm_logits) + beta (q - v)`` (``pi ∝ pi_beta exp(beta (Q - V))``).

    ``q`` is the Q value of every token (in ILQL, the minimum over the target Q heads), ``v`` the state's value;
    ``beta = 0`` returns the behaviour policy's log-probs. The result is unnormalised (a softmax, after any
    temperature or top-k, normalises it).

    Shapes: ``lm_logits`` (..., V), ``q`` (..., V), ``v`` (...,) -> (..., V), fp32.
    """
    logps = torch.log_softmax(lm_logits.float(), dim=-1)
    return logps + beta * (q.float() - v.float().unsqueeze(-1))


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``logits`` with every entry below the row's ``k``-th largest set to ``-inf``; ``k <= 0`` or ``k >= V``:
    unchanged (TRLX's ``topk_mask``; ties with the ``k``-th value are kept).

    Shape: (..., V) -> (..., V).
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


@torch.no_grad()
def polyak_update_(target: list[torch.Tensor], online: list[torch.Tensor], alpha: float) -> None:
    """Move each target tensor toward its online tensor, in place: ``target <- (1 - alpha) target + alpha online``
    (written ``target + alpha (online - target)``, so a target equal to its online tensor stays bit for bit).

    ``alpha = 1`` copies; ``alpha = 0`` leaves the target as it is. ``target`` and ``online``: tensors paired in
    order (e.g. ``list(module.parameters())``).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"polyak alpha must be in [0, 1], got {alpha}")
    targets, onlines = list(target), list(online)
    if len(targets) != len(onlines):
        raise ValueError(f"{len(targets)} target tensors but {len(onlines)} online ones")
    for t, o in zip(targets, onlines):
        if t.shape != o.shape:
            raise ValueError(f"target shape {tuple(t.shape)} != online shape {tuple(o.shape)}")
        t.lerp_(o.to(t.dtype), alpha)
