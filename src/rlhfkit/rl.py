"""Online RL against a reward: PPO, NLPO, A2C, GRPO, RLOO and REINFORCE in one readable loop.

``rlhfkit ppo|nlpo|grpo|rloo|a2c|reinforce CONFIG.yaml`` / :func:`train`. Each step:

1. **Rollout.** Take ``batch_size`` prompts, sample ``samples_per_prompt``
   responses each (:func:`rlhfkit.generation.rollout.make_rollout`; KV cache, temperature,
   top-p, stop at EOS). ``nlpo`` (Ramamurthy et al. 2022) samples only among the top-p tokens
   (``nlpo_top_p``) of a masking policy, a frozen copy of the policy refreshed every
   ``nlpo_update_every`` steps, and keeps each step's mask with the rollout.
2. **Score.** ``score = reward(prompt, response)`` from a reward model (an ensemble's
   heads aggregated by ``reward_aggregation``: mean, wco or uwo), a
   ``module:function`` or a simulated-annotator scorer; minus
   ``missing_eos_penalty`` for truncated responses; optional batch
   normalisation and clipping.
3. **Evaluate the rollout** without gradients: log-probs under the sampling
   policy (logits / temperature), the frozen reference, and values (PPO).
4. **Advantages** — the only place the algorithms differ:
   * ``ppo``: per-token rewards ``r_t = -beta KL_t`` plus the score at the last
     token (Ziegler et al. 2019, eq. 2), GAE (Schulman et al. 2016), whitened;
   * ``a2c``: ppo's (A2C differs in step 5);
   * ``nlpo``: ppo's (NLPO differs in steps 1, 3 and 5: its log-probs are the policy's within the mask);
   * ``reinforce``: the same rewards, discounted reward-to-go minus the batch
     mean (Williams 1992; the seed's REINFORCE with discounting);
   * ``rloo``: sequence reward ``score - beta sum_t KL_t``, leave-one-out
     baseline over the group (Ahmadian et al. 2024);
   * ``grpo``: group-normalised scores (Shao et al. 2024; ``scale_advantages=false``:
     Dr. GRPO's unscaled ones); the KL enters the loss as ``beta * k3`` per
     token instead of the reward (their eq. 3).
5. **Optimise.** ``ppo_epochs`` passes over the rollout in ``num_minibatches``
   minibatches (each ``grad_accum`` micro-batches): clipped surrogate
   (Schulman et al. 2017; ``clip``/``ratio_level`` pick DAPO's clip-higher,
   CISPO, dual-clip or GSPO's sequence ratio, :func:`rlhfkit.losses.policy_loss`),
   clipped value loss; ``a2c`` (advantage actor-critic as RL4LMs runs it, Mnih et al. 2016) makes one pass
   (``ppo_epochs=1``) with the unclipped ``-A log pi`` (:func:`rlhfkit.losses.a2c_policy_loss`) and an
   unclipped value loss; ``nlpo`` is ppo's update with the log-probs, so the ratio, of the policy renormalised
   over the rollout's masks (:func:`rlhfkit.losses.masked_token_logps`). ``entropy_coef`` adds ``-entropy_coef`` x
   the token-mean entropy (any algorithm).
   The per-token losses are averaged per ``loss_type`` (:func:`rlhfkit.losses.loss_token_weights`); the default, ``dapo``, is the
   token mean over the global minibatch (DAPO's normalisation, not DeepSeekMath
   eq. 3's per-response mean, which is ``loss_type=grpo``). Stop the epochs early
   when approx-KL exceeds ``target_kl_stop``.
6. **Adapt beta** (adaptive controller, Ziegler et al. 2019) and log.

Departures from TRL: the old log-probs are not recomputed when there is a
single epoch and minibatch (they equal the current ones, as in TRL's GRPO);
on CUDA the reference model is kept in bf16 when training in bf16 (it is frozen,
and a bf16 copy skips autocast's per-call weight casts); on CPU it stays fp32
under autocast, which was faster than a bf16 copy there (CPU's bf16 elementwise
kernels are slow; see benchmarks/README.md, "Design measurements").
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from rlhfkit import log
from rlhfkit.config import ConfigError
from rlhfkit.data.io import append_jsonl, atomic_write_text, truncate_jsonl_by_step
from rlhfkit.data.prompts import demo_data_path, load_prompts
from rlhfkit.data.sft import collate_sft, load_sft_file, tokenize_sft
from rlhfkit.generation.rollout import (
    GenerationOptions,
    HFEngine,
    Rollout,
    TopPMasking,
    encode_prompts,
    make_rollout,
    unpack_token_mask,
)
from rlhfkit.generation.vllm_engine import VLLMEngine
from rlhfkit.losses import (
    a2c_policy_loss,
    approx_kl,
    ensemble_std,
    explained_variance,
    kl_penalty,
    loss_token_weights,
    masked_mean,
    masked_token_logps,
    overlong_penalty,
    policy_loss,
    ppo_value_loss,
    truncated_is_weights,
    whiten,
    zero_variance_groups,
)
from rlhfkit.losses import advantages as compute_advantages
from rlhfkit.modeling import models
from rlhfkit.modeling.logps import entropy_from_logits
from rlhfkit.modeling.policy import ActorCritic, load_critic, logps_and_entropy, packed_response_logps, response_logits
from rlhfkit.probe import FrontierProbe, ProbeOptions
from rlhfkit.rewards import load_reward, scores_and_members
from rlhfkit.run_layout import RLMetric as M
from rlhfkit.training.loop import (
    Checkpointer,
    CheckpointError,
    TrainOptions,
    build_optimization,
    epoch_order,
    global_mean_scale,
    prepare,
    reduce_sum,
    shard_indices,
    start_accelerator,
    step_bar,
    write_run_config,
)
from rlhfkit.training.sharding import check_rl_sharding, is_sharded, whole_parameters
from rlhfkit.training.tracking import MetricsLogger

Algorithm = Literal["ppo", "grpo", "rloo", "reinforce", "a2c", "nlpo"]
NLPO_MASKING_FILE = "nlpo_masking_policy.safetensors"
"""The masking policy's weights in a checkpoint of an nlpo run (written and read through accelerate's state hooks)."""


@dataclass
class RLConfig(models.AdapterOptions, TrainOptions, ProbeOptions):
    """Config of the online RL stage. ``batch_size`` is prompts per step per process."""

    algorithm: Algorithm = "ppo"
    """ppo (critic + GAE), a2c (critic + GAE, one unclipped pass), grpo (group-normalised), rloo (leave-one-out),
    reinforce (discounted returns), or nlpo (ppo within a masking policy's top-p tokens; `rlhfkit nlpo`, whose
    NLPOConfig holds its keys)."""
    policy: str = models.TINY
    """Policy model spec (usually the SFT output directory). The reference is its frozen copy."""
    reward_model: str = "demo"
    """Reward: a reward-model directory, `module:function`, or a built-in scorer (sentiment, length, banned, demo)."""
    reward_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments bound to a scorer reward, e.g. `{target_words: 20}` for `length`; an unknown name is an error."""
    reward_aggregation: Literal["mean", "wco", "uwo"] = "mean"
    """How a reward-model ensemble's heads (`rlhfkit reward ensemble_size=K`) combine into the score (Coste et al.
    2024): mean; wco, worst-case optimisation, the lowest head; uwo, uncertainty-weighted optimisation, the mean minus
    reward_uwo_coef x the heads' variance. The members' disagreement is logged (`rollout/ensemble_std`). No effect on a
    single reward model or a scorer."""
    reward_uwo_coef: float = 0.5
    """reward_aggregation=uwo: lambda, the weight of the heads' variance (normalised units; >= 0; the default of
    Coste et al.'s best-of-n code, tlc4418/llm_optimization)."""
    prompts: str = ""
    """JSONL/JSON with a `prompt` field (string or chat-message list). Empty: the shipped demo prompts."""
    precision: str = "bf16"
    """Training precision (bf16 autocast with fp32 master weights, fp16 on CUDA, or fp32)."""
    rollout_engine: Literal["hf", "vllm"] = "hf"
    """What samples the rollouts: transformers `generate` on the live policy (any device), or a colocated vLLM
    engine on each process's GPU (`pip install vllm`; weights pushed before every rollout; it decodes in bf16,
    fp16 where the GPU has no bf16, so `generation_precision` applies to hf only)."""
    vllm_gpu_memory_utilization: float = 0.3
    """rollout_engine=vllm: fraction of the GPU's memory vLLM takes for its weights and KV cache."""
    vllm_max_model_len: int | None = None
    """rollout_engine=vllm: the longest sequence (prompt + response) vLLM keeps a KV cache for. None: the longest
    encoded training prompt plus `max_new_tokens` (left to vLLM, a model's own limit, 131,072 tokens for
    Llama-3.1, can make it refuse to start)."""
    vllm_importance_sampling: bool = True
    """rollout_engine=vllm: weight each token's policy-gradient loss (not the value loss or grpo's KL term) by the
    truncated importance ratio min(pi_old / pi_vllm, vllm_importance_sampling_cap) of the trainer's log-prob of the
    sampled token to vLLM's sampler's, correcting for their numerical mismatch (truncated importance sampling, Yao
    et al. 2025; TRL's vllm_importance_sampling_correction, on by default there too); `update/policy_loss` is then
    the weighted loss. No effect with rollout_engine=hf, whose samples come from the trainer's own weights. The
    mismatch is logged either way (`rollout/sampler_logp_diff`, `rollout/sampler_logp_diff_max`)."""
    vllm_importance_sampling_cap: float = 2.0
    """The cap of those weights (> 0; TRL's vllm_importance_sampling_cap, 2.0)."""
    generation_precision: str = "auto"
    """Decoding precision: auto (= `precision`), bf16, fp32. bf16 autocast decodes about 2x faster than fp32 on
    CPUs with avx512-bf16 (see benchmarks/README.md, "Design measurements")."""
    samples_per_prompt: int = 1
    """Responses per prompt (the group size k for grpo/rloo; >= 2 there)."""
    max_new_tokens: int = 64
    """Response length limit."""
    temperature: float = 1.0
    """Sampling temperature (log-probs use logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of responses that hit max_new_tokens without EOS."""
    score_norm: bool = False
    """Whiten scores over the batch before use."""
    score_clip: float = 0.0
    """Clip scores to [-c, c] (0 disables)."""
    beta: float = 0.05
    """Weight of the KL penalty to the reference (the name DPO and TRL use). With beta 0, adaptive_kl off and no
    frontier probe, no reference model is loaded and no reference forward runs (nothing then measures the KL)."""
    kl_coef: float | None = None
    """Deprecated name of `beta`, still accepted with a warning; it sets `beta`."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward (ppo, rloo, reinforce). grpo's loss term always uses k3."""
    adaptive_kl: bool = False
    """Adapt beta toward `target_kl` (Ziegler et al. 2019)."""
    target_kl: float = 6.0
    """Target sequence-level KL for the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in samples) of the adaptive controller."""
    gamma: float = 1.0
    """Discount factor (ppo and a2c GAE, reinforce)."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch (ppo, a2c, reinforce)."""
    ppo_epochs: int = 1
    """Optimisation passes over each rollout batch (a2c: 1)."""
    num_minibatches: int = 1
    """Minibatches (optimizer steps) per pass."""
    clip_eps: float = 0.2
    """PPO ratio clip epsilon."""
    clip: Literal["symmetric", "asymmetric", "cispo", "dual"] = "symmetric"
    """How the policy loss clips the importance ratio (`rlhfkit.losses.policy_loss`): symmetric, to
    [1 - clip_eps, 1 + clip_eps] (PPO, Schulman et al. 2017); asymmetric, to [1 - clip_eps_low, 1 + clip_eps_high]
    (DAPO's clip-higher, Yu et al. 2025); cispo, the clipped ratio as a stop-gradient weight on log pi, so every
    token keeps its gradient (CISPO, MiniMax-M1 2025); dual, PPO's clip plus a cap of -dual_clip_c * A on the loss
    of a token with a negative advantage (dual-clip PPO, Ye et al. 2020)."""
    clip_eps_low: float | None = None
    """clip asymmetric, cispo or dual: the ratio's floor is 1 - clip_eps_low. Empty (null): clip_eps."""
    clip_eps_high: float | None = None
    """clip asymmetric, cispo or dual: the ratio's ceiling is 1 + clip_eps_high (DAPO: 0.28 with clip_eps_low 0.2).
    Empty (null): clip_eps."""
    dual_clip_c: float = 3.0
    """clip=dual: a token with advantage A < 0 has its loss capped at -dual_clip_c * A (c > 1; Ye et al. use 3)."""
    ratio_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (PPO), or per sequence: exp(mean over its tokens of the log-ratio), the same for
    every token of the response (GSPO, Zheng et al. 2025, who clip it at ~3e-4 / 4e-4: set the epsilons to match)."""
    log_ratio_clamp: float = 20.0
    """The log-ratio is clamped to [-c, c] before exp, so a far-off token cannot overflow the loss (0 disables)."""
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = "dapo"
    """How per-token losses (the policy term, and grpo's KL term) are averaged into the step's loss
    (`rlhfkit.losses.loss_token_weights`): dapo, the token mean over the optimiser step's whole batch (DAPO, Yu
    et al. 2025; the default); grpo, the mean over each response's tokens, then over responses (DeepSeekMath eq. 3);
    dr_grpo, the token sum over responses x max_new_tokens (Dr. GRPO, Liu et al. 2025); bnpo, the token mean of each
    micro-batch, averaged over micro-batches (TRL's bnpo). The value loss (ppo) is always the token mean."""
    scale_advantages: bool = True
    """grpo: divide the group-centred scores by the group's std (DeepSeekMath); false: Dr. GRPO's unscaled advantages."""
    drop_zero_variance_groups: bool = False
    """grpo, rloo: a group whose scores are all equal gets zero weight in the loss (DAPO's dynamic-sampling filter,
    without the resampling); the fraction of such groups is logged as `zero_variance_groups`."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): a response longer than max_new_tokens -
    overlong_buffer tokens gets a penalty growing linearly to -1 at max_new_tokens, times overlong_penalty_coef,
    added to its score (before score_norm and score_clip). 0: off."""
    overlong_penalty_coef: float = 1.0
    """Weight of the overlong penalty in the score (overlong_buffer > 0)."""
    value: Literal["head", "critic"] = "head"
    """ppo's, nlpo's and a2c's value function: a head on the policy trunk, or a separate critic model."""
    critic_init: str = ""
    """Critic initialisation (value=critic): a spec or reward-model dir; empty: the reward model if it is a dir, else the policy."""
    vf_coef: float = 0.1
    """Value-loss coefficient."""
    value_clip_eps: float = 0.2
    """Value clip epsilon (ppo; a2c's value loss is unclipped)."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss gets -entropy_coef x the token-mean entropy of the policy on the responses (any
    algorithm; a2c's default 0.01, as RL4LMs; nlpo's is the entropy within the mask). Not 0: the update's forward is
    padded, not packed (the entropy's gradient needs the logits, which the packed forward's fused kernels never hand
    out)."""
    target_kl_stop: float = 0.0
    """Stop the epoch loop when mean approx-KL exceeds this (0 disables)."""
    ptx_data: str = ""
    """PPO-ptx: SFT data (prompt/completion or messages) mixed into the loss; empty disables."""
    ptx_coef: float = 0.0
    """PPO-ptx coefficient of the SFT loss."""
    ptx_max_length: int = 512
    """PPO-ptx: maximum tokens per demonstration (prompt + completion); a longer one keeps its first
    ptx_max_length tokens."""
    log_samples: int = 2
    """Completions written to samples.jsonl per logged step."""
    lr: float = 1e-6
    """Peak learning rate."""
    warmup_ratio: float = 0.0
    """Fraction of steps in linear warmup."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "constant"
    """Learning-rate schedule after warmup."""
    max_steps: int = 20
    """RL steps (rollout + optimisation); -1: num_epochs passes over the prompts."""
    batch_size: int = 8
    """Prompts per step per process."""
    output_dir: str = "runs/rl"
    """Where the policy, checkpoints, metrics.jsonl and samples.jsonl go."""

    def __post_init__(self) -> None:
        if self.kl_coef is not None:  # the old name: one name for the KL weight everywhere (beta)
            warnings.warn(
                f"{type(self).__name__}: kl_coef is deprecated and will be removed; use beta (set to {self.kl_coef})",
                FutureWarning,
                stacklevel=3,
            )
            self.beta, self.kl_coef = self.kl_coef, None

    @property
    def needs_reference(self) -> bool:
        """Whether the run needs the frozen reference: a KL penalty (beta > 0, or adapted), or a probe measuring KL."""
        return self.beta > 0 or self.adaptive_kl or self.probe_points > 0

    def policy_loss_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`rlhfkit.losses.policy_loss` for this config, after checking the loss fields."""
        if self.clip == "symmetric" and (self.clip_eps_low, self.clip_eps_high) != (None, None):
            raise ConfigError(
                "clip=symmetric clips to [1 - clip_eps, 1 + clip_eps]; set clip=asymmetric (or cispo, "
                "dual) to use clip_eps_low / clip_eps_high"
            )
        if self.clip == "dual" and not self.dual_clip_c > 1:
            raise ConfigError(f"dual_clip_c must be > 1 (got {self.dual_clip_c})")
        if self.log_ratio_clamp < 0:
            raise ConfigError(f"log_ratio_clamp must be >= 0 (got {self.log_ratio_clamp})")
        if not self.vllm_importance_sampling_cap > 0:
            raise ConfigError(f"vllm_importance_sampling_cap must be > 0 (got {self.vllm_importance_sampling_cap})")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ConfigError(
                f"overlong_buffer must be in [0, max_new_tokens={self.max_new_tokens}] (got {self.overlong_buffer})"
            )
        if self.algorithm == "a2c" and self.ppo_epochs != 1:
            raise ConfigError(f"a2c makes one pass over each rollout: ppo_epochs must be 1 (got {self.ppo_epochs})")
        if self.drop_zero_variance_groups and self.algorithm not in ("grpo", "rloo"):
            raise ConfigError(f"drop_zero_variance_groups needs groups: algorithm grpo or rloo (got {self.algorithm})")
        low = self.clip_eps if self.clip_eps_low is None else self.clip_eps_low
        high = self.clip_eps if self.clip_eps_high is None else self.clip_eps_high
        return dict(
            ratio_level=self.ratio_level,
            clip=self.clip,
            clip_eps_low=low,
            clip_eps_high=high,
            dual_clip_c=self.dual_clip_c,
            log_ratio_clamp=self.log_ratio_clamp,
        )


@dataclass
class GRPOConfig(RLConfig):
    """GRPO defaults: groups of 4, KL (k3) in the loss, no critic."""

    algorithm: Algorithm = "grpo"
    samples_per_prompt: int = 4
    beta: float = 0.04
    """Weight of the k3 KL term in the loss (DeepSeekMath's 0.04)."""
    output_dir: str = "runs/grpo"


@dataclass
class RLOOConfig(RLConfig):
    """RLOO defaults: groups of 4, KL (k1) in the sequence reward, no critic."""

    algorithm: Algorithm = "rloo"
    samples_per_prompt: int = 4
    output_dir: str = "runs/rloo"


@dataclass
class A2CConfig(RLConfig):
    """A2C defaults (RL4LMs): a value head and GAE as ppo, one pass per rollout, no clipping, an entropy bonus."""

    algorithm: Algorithm = "a2c"
    ppo_epochs: int = 1
    value: Literal["head", "critic"] = "head"
    entropy_coef: float = 0.01
    output_dir: str = "runs/a2c"


@dataclass
class ReinforceConfig(RLConfig):
    """Plain REINFORCE: discounted returns minus the batch mean, KL (k1) in the reward, no critic."""

    algorithm: Algorithm = "reinforce"
    output_dir: str = "runs/reinforce"


@dataclass
class NLPOConfig(RLConfig):
    """NLPO (Ramamurthy et al. 2022, RL4LMs): PPO with invalid-action masking. A masking policy, a frozen copy of the
    policy refreshed every `nlpo_update_every` steps, keeps its top-p tokens at each step; the policy samples among
    them, and its log-probs (PPO's ratio, the entropy, the KL to the reference) are those of its distribution
    renormalised over them. Everything else is ppo's: value head, GAE, clipped surrogate. Needs rollout_engine=hf;
    the update's forward is padded (the mask needs the logits), and the masking policy is one more copy of the
    policy in memory, with one more decode step per generated token."""

    algorithm: Algorithm = "nlpo"
    nlpo_top_p: float = 0.9
    """The masking policy's nucleus: at each step the policy may sample only the smallest set of the masking policy's
    most likely tokens (at the sampling temperature) whose probability reaches nlpo_top_p; its most likely token is
    always kept. In (0, 1]; 1 keeps every token, which is ppo. 0.9: the paper's and RL4LMs' top_mask."""
    nlpo_update_every: int = 5
    """mu: the masking policy is the policy as it was at the start of the last step whose number (from 0) is a multiple
    of nlpo_update_every; it is copied at those steps, before their rollouts (>= 1; 1: every step, the mask then
    the current policy's own nucleus). 5: RL4LMs' target_update_iterations for GPT-2 on IMDB (20 for its T5 tasks)."""
    value: Literal["head", "critic"] = "critic"
    """A separate critic model by default, as RL4LMs' actor-critic policies keep one. With a head on the policy trunk
    the value loss moves the trunk, so the logits of tokens the mask leaves out drift without any policy gradient;
    when the mask is refreshed they can take over (tiny model, shortness reward: with a head, seed 1 of the learning
    test fell back from score 0 to -51 after a refresh; with a critic, 12 of 12 runs kept rising)."""
    output_dir: str = "runs/nlpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm != "nlpo":
            raise ConfigError(f"NLPOConfig (rlhfkit nlpo) is algorithm nlpo, not {self.algorithm!r}")
        if not 0 < self.nlpo_top_p <= 1:
            raise ConfigError(f"nlpo_top_p must be in (0, 1] (got {self.nlpo_top_p})")
        if self.nlpo_update_every < 1:
            raise ConfigError(f"nlpo_update_every must be >= 1 (got {self.nlpo_update_every})")


class AdaptiveKLController:
    """beta_{t+1} = beta_t (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon) — Ziegler et al. 2019, eq. 3."""

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


@dataclass
class Scored:
    """A rollout with everything the update needs. Shapes: (B, R) unless noted."""

    rollout: Rollout
    old_logps: torch.Tensor | None
    """Log-probs under the sampling policy (None: taken from the first update forward)."""
    ref_logps: torch.Tensor | None
    """Log-probs under the reference (None: the run has none, ``RLConfig.needs_reference``)."""
    values: torch.Tensor | None
    advantages: torch.Tensor
    returns: torch.Tensor | None
    scores: torch.Tensor
    """(B,) scores after penalties/normalisation."""
    kl: torch.Tensor | None
    """Per-token KL estimate used in the reward (masked); None where none was measured before the update."""
    keep: torch.Tensor | None = None
    """(B,) bool: rows that count in the loss (drop_zero_variance_groups); None: every row."""


def _micro_batches(n: int, parts: int) -> list[list[int]]:
    """``range(n)`` in ``min(n, parts)`` contiguous chunks whose sizes differ by at most one.

    Exactly ``parts`` chunks when ``n >= parts``: accelerate steps the optimizer
    every ``grad_accum``-th micro-batch, so a minibatch cut into fewer pieces
    (ceil-sized chunks: 6 rows in 4 parts gave 3) silently skipped its step.
    """
    parts = max(1, min(n, parts))
    size, extra = divmod(n, parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def _global_means(acc, parts: dict[str, tuple[float, float]]) -> dict[str, float]:
    """``{name: sum of totals / sum of weights}`` over all processes, for ``parts[name] = (total, weight)`` of this
    one (one all-reduce): a mean over every process's rows (or tokens), 0 where no process has any.

    A process's mean ``m`` enters as ``(m * n, n)``: with one process the result is ``m`` itself, bit for bit
    (a float32 ``m`` times an integer count below 2**29 is exact in float64).
    """
    flat = reduce_sum(acc, {**{k: t for k, (t, _) in parts.items()}, **{f"{k}/weight": w for k, (_, w) in parts.items()}})
    return {k: flat[k] / flat[f"{k}/weight"] if flat[f"{k}/weight"] > 0 else 0.0 for k in parts}


def _whole_batch(acc, mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(*tensors, mask)`` of the whole batch, for a masked statistic over every process's tokens.

    One process: the arguments as they are, (B, R) each. Several: each tensor's ``mask``-True entries from every
    process, 1-D (in rank order), and an all-True mask.
    """
    if acc.num_processes == 1:
        return (*tensors, mask)
    counts = acc.gather(torch.tensor([int(mask.sum())], device=acc.device)).tolist()
    width = max(counts)
    out = []
    for x in tensors:
        flat = x[mask].to(acc.device, torch.float32)
        padded = torch.cat([flat, flat.new_zeros(width - flat.numel())])  # gather needs equal sizes
        per_process = acc.gather(padded).view(len(counts), width)
        out.append(torch.cat([per_process[r, :n] for r, n in enumerate(counts)]).cpu())
    return (*out, torch.ones(sum(counts), dtype=torch.bool))


def _sampler_mismatch(
    acc, trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, cap: float | None
) -> dict[str, float]:
    """How far the sampler's (vLLM's) log-probs of the sampled tokens are from the trainer's old ones, over every
    process's response tokens (``mask``): the mean and the largest absolute difference (tokens with a NaN sampler
    log-prob left out; both left out of the stats when no process has another) and, where the correction is applied
    (``cap`` given), the mean truncated importance weight."""
    known = mask & ~sampler_logps.isnan()
    diff = torch.where(known, (trainer_logps - sampler_logps).abs(), 0.0)
    n_known, n_tokens = float(known.sum()), float(mask.sum())
    parts = {M.SAMPLER_LOGP_DIFF: (float(diff.sum()), n_known), "_known": (n_known, 1.0)}
    if cap is not None:
        parts[M.IS_WEIGHT_MEAN] = (float(truncated_is_weights(trainer_logps, sampler_logps, mask, cap).sum()), n_tokens)
    stats = _global_means(acc, parts)
    whole_diff, whole_known = _whole_batch(acc, known, diff)
    if stats.pop("_known") > 0:
        stats[M.SAMPLER_LOGP_DIFF_MAX] = float(whole_diff[whole_known].max())
    else:
        del stats[M.SAMPLER_LOGP_DIFF]
    return stats


def _forward(
    model,
    rollout: Rollout,
    rows: list[int],
    device,
    *,
    with_entropy: bool = False,
    packed: bool = False,
    entropy_grad: bool = False,
    in_mask: bool = False,
):
    """``(logps (b, R), values (b, R) or None, entropy (b, R) or None)`` of the response tokens of ``rows``.

    ``entropy_grad``: an entropy that carries a gradient (the entropy bonus), from the padded batch's logits (the
    fused log-prob kernels, and so the packed forward, give the entropy none). ``in_mask``: the log-probs and
    entropy of the model's distribution renormalised over the rollout's action masks (NLPO's policy; the padded
    forward, the masks need the logits), where the rollout has them (:attr:`Rollout.action_mask`)."""
    sub = rollout.select(rows)
    if in_mask and sub.action_mask is not None:
        input_ids, attention = sub.input_ids.to(device), sub.attention_mask.to(device)
        response_ids, response_mask = sub.response_ids.to(device), sub.response_mask.to(device)
        logits, values = response_logits(model, input_ids, attention, response_ids.shape[1])
        # Positions past the response (padding) keep every token, so their pad token has a finite log-prob: -inf
        # there, even masked out of the loss, would reach the gradient as NaN (through exp in the ratio).
        keep = unpack_token_mask(sub.action_mask.to(device), logits.shape[-1]) | ~response_mask[..., None]
        logps, entropy = masked_token_logps(
            logits, keep, response_ids, rollout.temperature, with_entropy=with_entropy or entropy_grad
        )
        return logps, values, entropy if entropy_grad or entropy is None else entropy.detach()
    if packed and not entropy_grad:
        return packed_response_logps(
            model,
            sub.query_ids,
            sub.query_mask,
            sub.response_ids,
            sub.response_mask,
            temperature=rollout.temperature,
            with_entropy=with_entropy,
            device=device,
        )
    input_ids, mask = sub.input_ids.to(device), sub.attention_mask.to(device)
    response_ids = sub.response_ids.to(device)
    logits, values = response_logits(model, input_ids, mask, response_ids.shape[1])
    if entropy_grad:
        logps, _ = logps_and_entropy(logits, response_ids, rollout.temperature)
        return logps, values, entropy_from_logits(logits.float() / rollout.temperature)
    logps, entropy = logps_and_entropy(logits, response_ids, rollout.temperature, with_entropy=with_entropy)
    return logps, values, entropy


class RLTrainer:
    """State of one RL run; :meth:`step` is steps 1-6 of the module docstring."""

    def __init__(self, config: RLConfig):
        c = self.config = config
        c.policy_loss_options()  # checks the loss options now, not after the first rollout
        if c.algorithm == "nlpo" and not isinstance(c, NLPOConfig):
            raise ConfigError("algorithm nlpo takes NLPOConfig's keys (nlpo_top_p, nlpo_update_every): run `rlhfkit nlpo`")
        if c.algorithm == "nlpo" and c.rollout_engine != "hf":
            raise ConfigError("nlpo needs rollout_engine=hf: its mask is applied by a logits processor at each decode step")
        if c.algorithm in ("grpo", "rloo") and c.samples_per_prompt < 2:
            raise ConfigError(f"{c.algorithm} needs samples_per_prompt >= 2 (got {c.samples_per_prompt})")
        rows_per_minibatch = c.batch_size * c.samples_per_prompt // c.num_minibatches
        if rows_per_minibatch < c.grad_accum:
            raise ConfigError(
                f"a minibatch of {rows_per_minibatch} responses (batch_size x samples_per_prompt / num_minibatches) "
                f"cannot be split into grad_accum={c.grad_accum} micro-batches"
            )
        self.prompts = load_prompts(c.prompts or demo_data_path("prompts_train.jsonl"))
        self.acc = start_accelerator(c.precision, c.grad_accum, c.seed)
        check_rl_sharding(self.acc)
        self.tokenizer = models.load_tokenizer(c.policy)
        policy = models.load_causal_lm(c.policy)
        # The frozen reference (none when nothing needs it: c.needs_reference): with LoRA, the base with adapters
        # disabled (no copy); otherwise a copy, in bf16 when training in bf16 on CUDA (see the module docstring).
        self.ref = None
        if c.lora_r == 0 and c.needs_reference:
            bf16_copy = c.precision == "bf16" and self.acc.device.type == "cuda"
            ref_dtype = torch.bfloat16 if bf16_copy else torch.float32
            self.ref = copy.deepcopy(policy).to(ref_dtype).eval().requires_grad_(False)  # to the device below
            if c.packing:
                models.set_attention(self.ref)
        policy = models.prepare_for_training(policy, c)
        # NLPO's masking policy: a frozen copy of the policy as prepared (LoRA adapters included, so a refresh copies
        # parameter for parameter), refreshed every nlpo_update_every steps (refresh_masking_policy) and saved with
        # each checkpoint (_save_masking_policy), so a resumed run masks as the uninterrupted one. fp32 like the
        # policy: it decodes under the generation autocast.
        self.masking = copy.deepcopy(policy).eval().requires_grad_(False) if isinstance(c, NLPOConfig) else None
        critic = None
        value = c.value if c.algorithm in ("ppo", "a2c", "nlpo") else "none"
        if value == "critic":
            init = c.critic_init or (c.reward_model if Path(c.reward_model).is_dir() else c.policy)
            critic = load_critic(init, vocab_size=policy.config.vocab_size)
            if c.packing:
                models.set_attention(critic)
        model = ActorCritic(policy, value=value, critic=critic)
        # The rollout engine before anything goes to the GPU: vLLM's start-up check compares the free memory with its
        # share (gpu_memory_utilization), so it must not see the reference, the reward models or the policy there yet
        # (TRL builds its vLLM engine in the trainer's __init__ too, trl/trainer/grpo_trainer.py).
        gen_precision = c.generation_precision if c.generation_precision != "auto" else c.precision
        self.engine = self._make_engine(policy, gen_precision)
        device = self.acc.device
        if self.ref is not None:
            self.ref.to(device)
        if self.masking is not None:
            self.masking.to(device)
            self.acc.register_save_state_pre_hook(self._save_masking_policy)
            self.acc.register_load_state_pre_hook(self._load_masking_policy)
        # A reward model scores on this process's device (TRL moves its reward models there too: grpo_trainer.py).
        self.reward_fn = load_reward(
            c.reward_model,
            precision=c.precision,
            args=c.reward_args,
            device=device,
            aggregation=c.reward_aggregation,
            uwo_coef=c.reward_uwo_coef,
        )
        self.gold_fn = (
            load_reward(c.gold, precision=c.precision, args=c.gold_args, field="gold_args", device=device) if c.gold else None
        )

        self.P = self.acc.num_processes
        self.steps_per_epoch = max(1, len(self.prompts) // (c.batch_size * self.P))
        self.total_steps = c.max_steps if c.max_steps > 0 else max(1, math.ceil(c.num_epochs * self.steps_per_epoch))
        optimizer, self.scheduler = build_optimization(model, c, self.total_steps)
        # Micro-batch rows per process (the largest of _micro_batches' parts): completes a DeepSpeed config.
        micro = -(-rows_per_minibatch // c.grad_accum)
        self.model, self.optimizer = prepare(self.acc, model, optimizer, micro_batch_size=micro, max_grad_norm=c.max_grad_norm)
        self.kl_ctl = AdaptiveKLController(c.beta, c.target_kl, c.kl_horizon)
        self.ptx = self._load_ptx() if c.ptx_data and c.ptx_coef > 0 else None
        self.step_count = 0

    def _make_engine(self, policy, precision: str):
        """The rollout engine for ``policy`` (the training model's, before ``prepare``: the same module after it)."""
        c = self.config
        if c.rollout_engine == "vllm":
            return VLLMEngine(
                policy,
                self.tokenizer,
                models.resolve(c.policy),
                gpu_memory_utilization=c.vllm_gpu_memory_utilization,
                max_model_len=c.vllm_max_model_len or self._longest_sequence(),
                seed=c.seed,
                rank=self.acc.process_index,
                local_rank=self.acc.local_process_index,
                world_size=self.acc.num_processes,
            )
        if c.rollout_engine != "hf":
            raise ValueError(f"rollout_engine must be hf or vllm, not {c.rollout_engine!r}")
        masking = TopPMasking(self.masking, c.nlpo_top_p) if isinstance(c, NLPOConfig) and self.masking is not None else None
        return HFEngine(policy, self.tokenizer, precision=precision, masking=masking)

    # ---------------------------------------------------------------- NLPO's masking policy
    def refresh_masking_policy(self) -> None:
        """Copy the policy's parameters into the masking policy (NLPO, every ``nlpo_update_every`` steps).

        Parameter by parameter, with the parameters whole (:mod:`rlhfkit.training.sharding`): a ``state_dict`` of a
        sharded model holds shards. Buffers (rotary frequencies) are not trained and stay as copied at the start."""
        with whole_parameters(self.acc, self.model) as unwrapped, torch.no_grad():
            source = dict(unwrapped.policy.named_parameters())
            for name, param in self.masking.named_parameters():
                param.copy_(source[name])

    def _save_masking_policy(self, models_, weights, output_dir: str) -> None:
        """accelerate's save-state hook: the masking policy's weights into the checkpoint being written (main process;
        every process holds the same copy), so the Checkpointer lists, fsyncs and renames them with the rest."""
        from safetensors.torch import save_model

        if self.acc.is_main_process:
            save_model(self.masking, str(Path(output_dir) / NLPO_MASKING_FILE))

    def _load_masking_policy(self, models_, input_dir: str) -> None:
        """accelerate's load-state hook: the masking policy as the checkpoint saved it (a missing or damaged file makes
        the checkpoint unloadable, as any of its files)."""
        from safetensors.torch import load_model

        load_model(self.masking, str(Path(input_dir) / NLPO_MASKING_FILE), device=str(self.acc.device))

    def _longest_sequence(self) -> int:
        """The longest encoded training prompt plus ``max_new_tokens``: what a rollout can need a KV cache for."""
        _, mask = encode_prompts(self.tokenizer, self.prompts)
        return int(mask.sum(1).max()) + self.config.max_new_tokens

    def _load_ptx(self):
        examples, _ = tokenize_sft(self.tokenizer, load_sft_file(self.config.ptx_data), max_length=self.config.ptx_max_length)
        return examples

    # ---------------------------------------------------------------- 1-4: rollout, score, advantages
    @torch.no_grad()
    def rollout_and_score(self, prompts: list) -> tuple[Scored, dict[str, float]]:
        c, device = self.config, self.acc.device
        t0 = time.perf_counter()
        options = GenerationOptions(c.max_new_tokens, c.temperature, c.top_p)
        # Generation runs forwards of its own (decode steps, shared prefixes), a number that differs by rank: with
        # the parameters whole they run no collective (training.sharding).
        with whole_parameters(self.acc, self.model) as unwrapped:
            self.engine.load_weights(unwrapped.policy)  # the policy as the last update left it
            rollout = make_rollout(self.engine, self.tokenizer, prompts, options, samples_per_prompt=c.samples_per_prompt)
        gen_time = time.perf_counter() - t0
        mask = rollout.response_mask
        B = mask.shape[0]

        # An ensemble's score is its members' aggregate (reward_aggregation); members: (B, K), else None.
        reward_scores, members = scores_and_members(self.reward_fn, rollout.prompts, rollout.responses)
        raw = torch.tensor(reward_scores, dtype=torch.float32)
        scores = raw - c.missing_eos_penalty * (~rollout.has_eos).float()
        if c.overlong_buffer > 0:  # DAPO's soft overlong punishment, part of the reward
            overlong = overlong_penalty(rollout.lengths, c.max_new_tokens, c.overlong_buffer)
            scores = scores + c.overlong_penalty_coef * overlong
        if c.score_norm:
            scores = whiten(scores, torch.ones_like(scores, dtype=torch.bool))
        if c.score_clip > 0:
            scores = scores.clamp(-c.score_clip, c.score_clip)

        t1 = time.perf_counter()
        need_old = not (c.algorithm == "grpo" and c.ppo_epochs == 1 and c.num_minibatches == 1)
        old_logps, values, ref_logps, entropy = [], [], [], []
        self.model.eval()
        # Whole parameters: the reference may be the unwrapped policy (LoRA, adapters off).
        with whole_parameters(self.acc, self.model) as unwrapped:
            for rows in _micro_batches(B, c.grad_accum * c.num_minibatches):
                with self.acc.autocast():
                    if need_old:
                        lp, v, ent = _forward(
                            self.model, rollout, rows, device, with_entropy=True, packed=c.packing, in_mask=True
                        )
                        old_logps.append(lp.float().cpu())
                        entropy.append(ent.cpu())
                        if v is not None:
                            values.append(v.cpu())
                    if c.needs_reference:
                        ref_model = self.ref if self.ref is not None else unwrapped.policy
                        with models.adapters_disabled(ref_model):
                            lp_ref, _, _ = _forward(ref_model, rollout, rows, device, packed=c.packing)
                        ref_logps.append(lp_ref.float().cpu())
        self.model.train()
        ref_logps_t = torch.cat(ref_logps) if ref_logps else None
        old_logps_t = torch.cat(old_logps) if old_logps else None
        values_t = torch.cat(values) if values else None
        fwd_time = time.perf_counter() - t1

        # KL to the reference, per token, on the sampled tokens. NLPO: of the masked policy (the one that sampled them)
        # to the unmasked reference. RL4LMs uses the unmasked policy's log-probs here (its raw_log_probs), which
        # estimate no KL of the sampling policy; this is k1's unbiased estimate of KL(masked pi || ref).
        beta = self.kl_ctl.value
        if ref_logps_t is not None and old_logps_t is not None:
            kl = torch.where(mask, kl_penalty(old_logps_t, ref_logps_t, c.kl_estimator), 0.0)
            kl_k1 = torch.where(mask, kl_penalty(old_logps_t, ref_logps_t, "k1"), 0.0)
            kl_k3 = torch.where(mask, kl_penalty(old_logps_t, ref_logps_t, "k3"), 0.0)
        else:  # no reference (beta 0): no KL term, none measured; grpo's fast path: measured in the update
            kl = kl_k1 = kl_k3 = None  # compute_advantages takes None as a zero KL

        advantages, returns = compute_advantages(
            "ppo" if c.algorithm == "nlpo" else c.algorithm,  # NLPO's advantages are PPO's
            scores,
            mask,
            kl=kl,
            beta=beta,
            values=values_t,
            gamma=c.gamma,
            lam=c.lam,
            whiten_advantages=c.whiten_advantages,
            group_size=c.samples_per_prompt,
            scale=c.scale_advantages,
        )
        # Every metric is (this process's total, its weight): _global_means turns them into the whole batch's
        # means over all processes, so every rank logs, and adapts beta from, the same numbers.
        n_rows, n_tokens = float(B), float(mask.sum())
        keep, parts = None, {}
        if c.drop_zero_variance_groups:  # groups of equal scores: zero weight in the loss (DAPO's filter)
            flat = zero_variance_groups(scores, c.samples_per_prompt)
            keep = (~flat).repeat_interleave(c.samples_per_prompt)
            parts[M.ZERO_VARIANCE_GROUPS] = (flat.float().mean().item() * flat.numel(), float(flat.numel()))
        if c.overlong_buffer > 0:
            parts[M.OVERLONG_PENALTY] = (overlong.mean().item() * n_rows, n_rows)
        if members is not None:  # the ensemble's disagreement on each response, averaged
            parts[M.ENSEMBLE_STD] = (ensemble_std(members).mean().item() * n_rows, n_rows)
            parts[M.ENSEMBLE_MEAN] = (members.mean().item() * n_rows, n_rows)

        lengths = rollout.lengths.float()
        if self.gold_fn is not None:
            gold = self.gold_fn(rollout.prompts, rollout.responses)
            parts[M.GOLD] = (sum(gold), float(len(gold)))
        parts.update(
            {
                M.SCORE: (raw.mean().item() * n_rows, n_rows),
                M.SCORE_USED: (scores.mean().item() * n_rows, n_rows),
                M.RESPONSE_LENGTH: (lengths.mean().item() * n_rows, n_rows),
                M.EOS_RATE: (rollout.has_eos.float().mean().item() * n_rows, n_rows),
                # per process: the processes generate and score side by side
                "_generated_tokens": (lengths.sum().item(), 1.0),
                "time_generate": (gen_time, 1.0),
                "time_score_forward": (fwd_time, 1.0),
            }
        )
        if kl_k1 is not None:
            parts[M.KL] = (kl_k1.sum(-1).mean().item() * n_rows, n_rows)
            parts[M.KL_K3] = (kl_k3.sum(-1).mean().item() * n_rows, n_rows)
            parts[M.REWARD] = ((scores - beta * kl.sum(-1)).mean().item() * n_rows, n_rows)
        elif ref_logps_t is None:
            parts[M.REWARD] = (scores.mean().item() * n_rows, n_rows)
        if entropy:
            parts[M.ENTROPY] = (masked_mean(torch.cat(entropy), mask).item() * n_tokens, n_tokens)
        stats = _global_means(self.acc, parts)
        # All processes' tokens per second of (mean) generation time.
        stats["gen_tokens_per_s"] = stats.pop("_generated_tokens") * self.P / max(stats["time_generate"], 1e-9)
        stats["beta"] = beta  # the same on every process: the controller is fed the global KL
        if rollout.sampler_logps is not None and old_logps_t is not None:  # vLLM's samples (grpo's fast path: update)
            cap = c.vllm_importance_sampling_cap if c.vllm_importance_sampling else None
            stats.update(_sampler_mismatch(self.acc, old_logps_t, rollout.sampler_logps, mask, cap))
        scored = Scored(rollout, old_logps_t, ref_logps_t, values_t, advantages, returns, scores, kl, keep)
        return scored, stats

    # ---------------------------------------------------------------- 5: optimise
    def update(self, scored: Scored) -> dict[str, float]:
        c, acc, device = self.config, self.acc, self.acc.device
        rollout, B = scored.rollout, scored.rollout.response_mask.shape[0]
        sums: dict[str, float] = {}
        counts = {"tokens": 0.0, "seqs": 0.0}
        t0 = time.perf_counter()
        train_tokens = 0
        stopped_early = False
        generator = torch.Generator().manual_seed(c.seed * 7919 + self.step_count)
        epochs_done = 0
        loss_options = c.policy_loss_options()
        keep = scored.keep  # rows that count in the loss (None: all)
        # vLLM's samples: truncated importance weights on the policy loss, from the old log-probs (grpo's fast path:
        # the current ones, detached, which equal them in its single pass; there the mismatch is measured here).
        sampler = rollout.sampler_logps
        is_cap = c.vllm_importance_sampling_cap if c.vllm_importance_sampling and sampler is not None else None
        seen = torch.zeros(rollout.response_mask.shape) if sampler is not None and scored.old_logps is None else None
        for _epoch in range(c.ppo_epochs):
            order = (
                torch.randperm(B, generator=generator).tolist() if c.ppo_epochs > 1 or c.num_minibatches > 1 else list(range(B))
            )
            epoch_kl, epoch_tokens = 0.0, 0.0
            for mb in _micro_batches(B, c.num_minibatches):
                mb_rows = [order[i] for i in mb]
                in_loss = rollout.response_mask[mb_rows]
                if keep is not None:
                    in_loss = in_loss & keep[mb_rows, None]
                # The optimiser step's counts, over its micro-batches and processes, for the loss's normaliser.
                seqs = len(mb_rows) if keep is None else int(keep[mb_rows].sum())
                totals = reduce_sum(acc, {"t": float(in_loss.sum()), "s": float(seqs)})
                global_tokens, global_seqs = max(1.0, totals["t"]), totals["s"]
                scale = global_mean_scale(global_tokens, c.grad_accum, self.P)  # the minibatch's token mean
                for part in _micro_batches(len(mb_rows), c.grad_accum):
                    rows = [mb_rows[i] for i in part]
                    mask = rollout.response_mask[rows].to(device)
                    loss_mask = mask if keep is None else mask & keep[rows].to(device)[:, None]
                    with acc.accumulate(self.model):
                        with acc.autocast():
                            logps, values, entropy = _forward(
                                self.model,
                                rollout,
                                rows,
                                device,
                                with_entropy=True,
                                packed=c.packing,
                                entropy_grad=c.entropy_coef != 0,
                                in_mask=True,
                            )
                        logps = logps.float()
                        old = scored.old_logps[rows].to(device) if scored.old_logps is not None else logps.detach()
                        adv = scored.advantages[rows].to(device)
                        if c.algorithm == "a2c":
                            pg_losses, clipped = a2c_policy_loss(logps, adv)
                        else:
                            pg_losses, clipped = policy_loss(logps, old, adv, mask, **loss_options)
                        if is_cap is not None:
                            pg_losses = pg_losses * truncated_is_weights(old, sampler[rows].to(device), mask, is_cap)
                        if seen is not None:
                            seen[rows] = old.cpu()
                        loss_tokens = pg_losses
                        ref = scored.ref_logps[rows].to(device) if scored.ref_logps is not None else None
                        k3 = kl_penalty(logps, ref, "k3") if ref is not None else None
                        if c.algorithm == "grpo" and self.kl_ctl.value > 0 and k3 is not None:
                            loss_tokens = loss_tokens + self.kl_ctl.value * k3
                        # Token-mean terms whatever the loss_type: the value loss (a2c's unclipped) and the entropy bonus.
                        mean_tokens = torch.zeros_like(logps)
                        if values is not None:
                            v_clip = math.inf if c.algorithm == "a2c" else c.value_clip_eps
                            v_losses, v_clipped = ppo_value_loss(
                                values, scored.values[rows].to(device), scored.returns[rows].to(device), v_clip
                            )
                            mean_tokens = mean_tokens + c.vf_coef * v_losses
                        if c.entropy_coef:
                            mean_tokens = mean_tokens - c.entropy_coef * entropy.float()
                        if c.loss_type == "dapo":  # the token mean over the minibatch (the default): one masked sum
                            loss = torch.where(loss_mask, loss_tokens + mean_tokens, 0.0).sum() * scale
                        else:  # the policy (and grpo's KL) term per loss_type; the value loss stays the token mean
                            weights = loss_token_weights(
                                loss_mask,
                                c.loss_type,
                                num_seqs=global_seqs,
                                num_tokens=global_tokens,
                                max_new_tokens=c.max_new_tokens,
                            )
                            # bnpo's weights give this micro-batch's mean, which accelerate and DDP average as they are.
                            times = 1 if c.loss_type == "bnpo" else c.grad_accum * self.P
                            loss = (weights * torch.where(loss_mask, loss_tokens, 0.0)).sum() * times
                            loss = loss + torch.where(loss_mask, mean_tokens, 0.0).sum() * scale
                        if self.ptx is not None:
                            loss = loss + c.ptx_coef * self._ptx_loss(rows)
                        acc.backward(loss)
                        if acc.sync_gradients and c.max_grad_norm > 0:
                            acc.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        n_tok = float(mask.sum())
                        kl_old = float(torch.where(mask, approx_kl(logps.detach(), old), 0.0).sum())
                        add = {
                            M.POLICY_LOSS: float(torch.where(mask, pg_losses, 0.0).sum()),
                            M.CLIPFRAC: float((clipped & mask).sum()),
                            M.APPROX_KL: kl_old,
                            M.UPDATE_ENTROPY: float(torch.where(mask, entropy, 0.0).sum()),
                        }
                        if ref is not None:
                            add["kl_k3_update"] = float(torch.where(mask, k3, 0.0).sum())
                            add["kl_k1_update"] = float(torch.where(mask, logps.detach() - ref, 0.0).sum())
                        if values is not None:
                            add[M.VALUE_LOSS] = float(torch.where(mask, v_losses, 0.0).sum())
                            add[M.VALUE_CLIPFRAC] = float((v_clipped & mask).sum())
                        for k, v in add.items():
                            sums[k] = sums.get(k, 0.0) + v
                        counts["tokens"] += n_tok
                        counts["seqs"] += len(rows)
                        train_tokens += int(rollout.attention_mask[rows].sum())
                        epoch_kl += kl_old
                        epoch_tokens += n_tok
            epochs_done += 1
            if c.target_kl_stop > 0:
                totals = reduce_sum(acc, {"kl": epoch_kl, "n": epoch_tokens})
                if totals["kl"] / max(1.0, totals["n"]) > c.target_kl_stop:
                    stopped_early = True
                    break
        self.scheduler.step()
        # The rollout's mean response length, over all processes, as _global_means forms it.
        local_len = float(rollout.response_mask.sum(-1).float().mean())
        sums = reduce_sum(acc, {**sums, **{f"_{k}": v for k, v in counts.items()}, "_len": local_len * B, "_rows": float(B)})
        tokens = max(1.0, sums.pop("_tokens"))
        sums.pop("_seqs")
        mean_len = sums.pop("_len") / sums.pop("_rows")
        stats = {k: v / tokens for k, v in sums.items()}
        # Per-sequence KL measured in the update, in the units of `kl` (sum over tokens).
        if "kl_k1_update" in stats:  # measured only against a reference
            stats[M.UPDATE_KL] = stats.pop("kl_k1_update") * mean_len
            stats[M.UPDATE_KL_K3] = stats.pop("kl_k3_update") * mean_len
        stats[M.EPOCHS_DONE] = epochs_done
        stats[M.EARLY_STOPPED] = float(stopped_early)
        stats["train_tokens_per_s"] = train_tokens * self.P / max(time.perf_counter() - t0, 1e-9)
        stats["time_update"] = time.perf_counter() - t0
        stats["lr"] = self.scheduler.get_last_lr()[0]
        if scored.values is not None and scored.returns is not None:
            # Over the whole batch: every process's tokens.
            whole = _whole_batch(acc, rollout.response_mask, scored.values, scored.returns)
            stats[M.EXPLAINED_VARIANCE] = float(explained_variance(*whole))
        if seen is not None:
            stats.update(_sampler_mismatch(acc, seen, sampler, rollout.response_mask, is_cap))
        return stats

    # ---------------------------------------------------------------- 1-6: one step
    def step(self) -> tuple[Scored, dict[str, float]]:
        """One RL step, 1-6 of the module docstring, on this step's prompts: rollout and score
        (:meth:`rollout_and_score`), optimise (:meth:`update`), then adapt beta. Returns the scored rollout
        and the step's metrics; ``step_count`` goes up by one."""
        c, t0 = self.config, time.perf_counter()
        if isinstance(c, NLPOConfig) and self.step_count % c.nlpo_update_every == 0:
            self.refresh_masking_policy()  # NLPO's mu: the masking policy follows the policy every few steps
        scored, roll_stats = self.rollout_and_score(self.prompts_for_step(self.step_count))
        upd_stats = self.update(scored)
        self.step_count += 1
        if M.KL not in roll_stats and M.UPDATE_KL in upd_stats:  # grpo fast path: the sampling policy's KL,
            roll_stats[M.KL] = upd_stats[M.UPDATE_KL]  # measured in the update
            roll_stats[M.KL_K3] = upd_stats[M.UPDATE_KL_K3]
        roll_stats.setdefault(M.REWARD, roll_stats[M.SCORE_USED])
        roll_stats.setdefault(M.ENTROPY, upd_stats[M.UPDATE_ENTROPY])
        if c.adaptive_kl:  # 6: Ziegler et al.'s controller, on the whole batch's KL
            self.kl_ctl.update(roll_stats[M.KL], len(scored.rollout.responses) * self.P)
        return scored, {**roll_stats, **upd_stats, "time_step": time.perf_counter() - t0}

    def _ptx_loss(self, rows: list[int]) -> torch.Tensor:
        """PPO-ptx (Ouyang et al. 2022, eq. 2): mean NLL of a demonstration batch."""
        g = torch.Generator().manual_seed(self.config.seed + self.step_count * 131 + rows[0])
        idx = torch.randint(len(self.ptx), (len(rows),), generator=g).tolist()
        batch = collate_sft([self.ptx[i] for i in idx], self.tokenizer.pad_token_id)
        batch = {k: v.to(self.acc.device) for k, v in batch.items()}
        with self.acc.autocast():  # through the prepared model, whose hooks gather and reduce (FSDP, DDP)
            total = self.model(sft_batch=batch)
        return total / max(1, int((batch["labels"][:, 1:] != -100).sum()))

    def make_probe(self, output_dir: Path) -> FrontierProbe:
        """The frontier probe of this run (:mod:`rlhfkit.probe`): gold, proxy (the reward) and KL to the reference."""
        c = self.config
        if self.gold_fn is None:
            raise ValueError("probe_points > 0 needs a gold scorer (`gold`)")
        policy = self.acc.unwrap_model(self.model).policy
        return FrontierProbe(
            c,
            tokenizer=self.tokenizer,
            reference=self.ref if self.ref is not None else policy,
            gold=self.gold_fn,
            proxy=self.reward_fn,
            output_dir=output_dir,
            seed=c.seed,
            precision=c.precision,
        )

    def run_probe(self, probe: FrontierProbe) -> None:
        """Probe on the main process only, with the parameters whole (:mod:`rlhfkit.training.sharding`)."""
        with whole_parameters(self.acc, self.model) as unwrapped:
            if self.acc.is_main_process:
                probe(unwrapped.policy, self.step_count, self.total_steps)
        self.acc.wait_for_everyone()

    def prompts_for_step(self, step: int) -> list:
        c = self.config
        epoch, within = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.prompts), c.seed, epoch)
        return [self.prompts[i] for i in shard_indices(order, within, c.batch_size, self.P, self.acc.process_index)]


def _save_outputs(unwrapped: ActorCritic, tokenizer, out: Path, state: dict | None = None) -> None:
    """The trained policy (``from_pretrained`` loads it), and its value head or critic.

    ``state``: the whole model's gathered state dict when it is sharded (``Accelerator.get_state_dict``), whose
    ``policy.``, ``value_head.`` and ``critic.`` entries are saved in place of the local (sharded) parameters.
    """

    def part(prefix: str, module) -> dict:
        if state is None:
            return module.state_dict()
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    if state is not None and hasattr(unwrapped.policy, "merge_and_unload"):
        raise ConfigError("a LoRA policy cannot be saved from a sharded model (FSDP, DeepSpeed): train LoRA under DDP")
    models.save_pretrained(unwrapped.policy, tokenizer, out, state_dict=None if state is None else part("policy.", None))
    try:
        if unwrapped.value_head is not None:
            save_file(
                {k: v.contiguous() for k, v in part("value_head.", unwrapped.value_head).items()},
                str(out / "value_head.safetensors"),
            )
        if unwrapped.critic is not None:
            critic_state = None if state is None else part("critic.", None)
            unwrapped.critic.save_pretrained(out / "critic", state_dict=critic_state)
    except Exception as e:  # a full disk: one line from the CLI, not safetensors' traceback
        if not models.is_write_failure(e):
            raise
        raise CheckpointError(
            f"cannot save the value model to {out}: {models.describe_write_failure(e)}; "
            f"{models.free_space(out)}; a rerun resumes from the newest checkpoint (if any) and saves again"
        ) from e


def train(config: RLConfig) -> RLTrainer:
    """Run online RL; returns the trainer (its ``model`` holds the trained policy)."""
    c = config
    out = Path(c.output_dir)
    trainer = RLTrainer(c)
    acc = trainer.acc
    if acc.is_main_process:
        write_run_config(out, c.algorithm, c)
    checkpointer = Checkpointer(acc, out, keep=c.keep_checkpoints, scheduler=trainer.scheduler, config=c)
    resumed = checkpointer.resume(c.resume)
    if resumed is not None:
        resume_from, saved = resumed
        trainer.step_count = saved["step"]
        if c.adaptive_kl:  # the controller's state; a fixed beta is the config's (a new one under resume=force)
            trainer.kl_ctl.value = saved["beta"] if "beta" in saved else saved["kl_coef"]  # older checkpoints: kl_coef
        log.info(f"resumed from {resume_from} at step {trainer.step_count}")
    logger = MetricsLogger(out, enabled=acc.is_main_process, tensorboard=c.tensorboard)
    logger.truncate_after(trainer.step_count)
    if acc.is_main_process:  # steps past the checkpoint are redone and their samples logged again
        truncate_jsonl_by_step(out / "samples.jsonl", trainer.step_count)
    probe = trainer.make_probe(out) if c.probe_points > 0 else None
    if probe is not None:
        trainer.run_probe(probe)  # step 0: the starting policy (or the resumed step, if it was a probe step)
    bar = step_bar(c, acc, total=trainer.total_steps, initial=trainer.step_count, desc=c.algorithm)
    while trainer.step_count < trainer.total_steps:
        scored, metrics = trainer.step()
        if trainer.step_count % c.log_every == 0 or trainer.step_count == trainer.total_steps:
            logger.log(trainer.step_count, metrics)
            if acc.is_main_process and c.log_samples > 0:
                for i in range(min(c.log_samples, len(scored.rollout.responses))):
                    append_jsonl(
                        out / "samples.jsonl",
                        {
                            "step": trainer.step_count,
                            "prompt": scored.rollout.prompts[i],
                            "response": scored.rollout.responses[i],
                            "score": float(scored.scores[i]),
                        },
                    )
                logger.log_text(trainer.step_count, "sample", scored.rollout.responses[0])
        if probe is not None:
            trainer.run_probe(probe)
        bar.update(1)
        bar.set_postfix(
            score=f"{metrics[M.SCORE]:.3f}", kl=f"{metrics.get(M.KL, float('nan')):.3f}", s_step=f"{metrics['time_step']:.1f}"
        )
        if c.save_every > 0 and trainer.step_count % c.save_every == 0:
            checkpointer.save(
                trainer.step_count, {"step": trainer.step_count, "beta": trainer.kl_ctl.value, "total_steps": trainer.total_steps}
            )
    bar.close()
    logger.close()
    acc.wait_for_everyone()
    # Sharded (FSDP, DeepSpeed): every process takes part in gathering the state dict, as loop.fit does.
    state = acc.get_state_dict(trainer.model) if is_sharded(acc) else None
    if acc.is_main_process:
        _save_outputs(acc.unwrap_model(trainer.model), trainer.tokenizer, out, state)
        atomic_write_text(out / "rl_state.json", json.dumps({"steps": trainer.step_count, "beta": trainer.kl_ctl.value}))
    acc.wait_for_everyone()
    return trainer
