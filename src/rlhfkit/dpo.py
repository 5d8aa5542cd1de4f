"""Direct preference optimisation: ``rlhfkit dpo CONFIG.yaml`` / :func:`train`.

1. Read comparisons (any format of :mod:`rlhfkit.data.preferences`), expand them
   to (chosen, rejected) pairs and tokenise.
2. Compute the reference log-probs ``log ref(y|x)`` of every pair once, before
   training, and cache them under the output directory (never next to the
   data, which may be read-only), so a rerun or a resumed run reads them back.
   The cache key hashes the data file, the reference weights (once, on the
   main process), the tokenizer and the tokenisation settings, so any change
   recomputes it. The reference model is then not held in memory during
   training (with the default reference = the starting model, it never is a
   second copy at all).
3. Train with the shared loop: one concatenated forward pass over chosen and
   rejected, :func:`rlhfkit.losses.dpo_loss` (sigmoid / ipo / hinge, label
   smoothing) or :func:`rlhfkit.losses.simpo_loss`, plus an optional NLL term on
   the chosen responses (RPO, Pang et al. 2024).

Departures from TRL: ties are skipped (DPO has no tie target); log-probs are
sums over response tokens (the paper's definition).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.config import ConfigError
from rlhfkit.data.pairwise import chosen_rejected, collate_pairs, load_pair_splits
from rlhfkit.losses import dpo_loss, simpo_loss
from rlhfkit.modeling import forward, models
from rlhfkit.probe import FrontierProbe, ProbeOptions
from rlhfkit.rewards import load_reward
from rlhfkit.run_layout import PreferenceMetric as M
from rlhfkit.training import reference
from rlhfkit.training.loop import EvalOptions, FitResult, TrainOptions, fit, write_run_config


@dataclass
class DPOConfig(models.ModelOptions, TrainOptions, EvalOptions, ProbeOptions):
    """Config of the DPO stage."""

    data: str = ""
    """Preference data: seed, TRL, hh-rlhf, ranking or rlhfkit format (.json, .jsonl, .parquet)."""
    eval_data: str = ""
    """Optional held-out preference file; if empty, `eval_fraction` of `data` is held out."""
    eval_fraction: float = 0.05
    """Fraction of comparisons held out when `eval_data` is empty (0 disables eval)."""
    ranking_pairs: Literal["all", "best_worst"] = "all"
    """A K-way ranking gives all its K(K-1)/2 pairs, or only its best against its worst (one pair per prompt)."""
    max_comparisons: int = -1
    """Read only the first this many comparisons of `data` (before the held-out split); 0 or less: all of them."""
    ref_model: str = ""
    """Reference model spec; empty: the starting `model` (with LoRA: the base, adapters off)."""
    beta: float = 0.1
    """KL-regularisation strength (beta in DPO; tau in IPO; 1/delta in SLiC; beta in SimPO)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"
    """DPO (sigmoid), IPO, SLiC hinge, or the reference-free SimPO."""
    label_smoothing: float = 0.0
    """Assumed label-noise rate (conservative DPO); 0 disables."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin gamma."""
    rpo_alpha: float = 0.0
    """Weight of the per-token NLL of chosen responses added to the loss (RPO); 0 disables."""
    max_length: int = 512
    """Maximum tokens of prompt + response; longer responses are cut."""
    chat_template: bool = True
    """Render prompts and responses with the chat template (as SFT does)."""
    proxy: str = ""
    """Frontier probes: the reward model (or scorer) whose score of the probe samples is logged as the proxy, to
    set beside the gold score; DPO never trains on it. Empty: no proxy."""
    ref_cache: bool = True
    """Cache reference log-probs under output_dir/.rlhfkit-cache, for reruns in the same output_dir."""
    lr: float = 5e-6
    """Peak learning rate (DPO wants a small one)."""
    output_dir: str = "runs/dpo"
    """Where the final model, checkpoints and metrics go."""


class DPOTask:
    """The loop's :class:`~rlhfkit.training.loop.Task` for DPO and its relatives. Items are pairs."""

    def __init__(self, config: DPOConfig):
        self.config = config

    def num_items(self, batch) -> int:
        return int(batch["target"].shape[0])

    def num_tokens(self, batch) -> int:
        return forward.num_tokens(batch)

    def loss(self, model, batch):
        c = self.config
        logps, n_tokens = forward.sequence_logps(model, batch)
        chosen_logps, rejected_logps = chosen_rejected(batch, logps)
        chosen_tokens, rejected_tokens = chosen_rejected(batch, n_tokens)
        # A pair's soft label p (`target`: meta.target of graded human labels, else 1.0) is conservative DPO's
        # P(chosen is preferred), combined with label_smoothing eps as p (1 - eps) + (1 - p) eps; with p = 1 this
        # is eps, the old behaviour. (IPO and hinge have no label-noise form: they ignore it.)
        target = batch["target"]
        smoothing = 1 - (target * (1 - c.label_smoothing) + (1 - target) * c.label_smoothing)
        if c.loss_type == "simpo":
            losses, chosen_rewards, rejected_rewards = simpo_loss(
                chosen_logps,
                rejected_logps,
                chosen_tokens,
                rejected_tokens,
                beta=c.beta,
                gamma=c.simpo_gamma,
                label_smoothing=smoothing,
            )
        else:
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen_logps,
                rejected_logps,
                batch["ref_chosen_logps"],
                batch["ref_rejected_logps"],
                beta=c.beta,
                loss_type=c.loss_type,
                label_smoothing=smoothing,
            )
        if c.rpo_alpha > 0:
            losses = losses + c.rpo_alpha * (-chosen_logps / chosen_tokens.clamp(min=1))
        stats = {
            M.ACCURACY: (chosen_rewards > rejected_rewards).float().sum(),
            M.MARGIN: (chosen_rewards - rejected_rewards).sum(),
            M.REWARDS_CHOSEN: chosen_rewards.sum(),
            M.REWARDS_REJECTED: rejected_rewards.sum(),
            "logps_chosen": chosen_logps.detach().sum(),
            "logps_rejected": rejected_logps.detach().sum(),
        }
        return losses.sum(), stats


def ref_cache_path(config: DPOConfig, ref_model, tokenizer) -> Path:
    """Where the reference log-probs for this (data, reference, tokenizer, settings) live; hashes every weight.
    The pair-forming settings are in the key too: another ``ranking_pairs`` or ``max_comparisons`` gives other pairs."""
    extra = {"ranking_pairs": config.ranking_pairs, "max_comparisons": max(config.max_comparisons, 0)}
    return reference.cache_path(config, ref_model, tokenizer, extra=extra)


def compute_ref_logps(
    model,
    examples: list[dict],
    pad_token_id: int,
    *,
    precision: str,
    batch_size: int = 8,
    packed: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Summed reference log-probs, shape (N, 2): columns chosen, rejected."""

    def score(model, chunk: list[dict], device) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_token_id, packed=packed).items()}
        logps, _ = forward.sequence_logps(model, batch)
        return torch.stack(chosen_rejected(batch, logps), dim=1)

    return reference.score_batches(
        model, examples, score, precision=precision, batch_size=batch_size, progress=progress, desc="dpo: reference log-probs"
    )


def attach_reference(config: DPOConfig, policy, tokenizer, train: list[dict], held: list[dict]) -> None:
    """Fill ``ref_chosen_logps`` / ``ref_rejected_logps`` of every pair (from cache when valid)."""
    if config.loss_type == "simpo":
        return  # reference-free
    ref = policy if not config.ref_model else models.load_causal_lm(config.ref_model)
    if config.packing:  # the policy too: prepare_for_training, which also sets it, comes later
        models.set_attention(ref)
    examples = train + held

    def compute(model, part: list[dict], main: bool) -> torch.Tensor:
        return compute_ref_logps(
            model,
            part,
            tokenizer.pad_token_id,
            precision=config.precision,
            batch_size=config.batch_size,
            packed=config.packing,
            progress=config.progress and main,
        )

    find_cache = (lambda: ref_cache_path(config, ref, tokenizer)) if config.ref_cache else None
    ref_logps = reference.reference_logps(ref, examples, compute, find_cache=find_cache, stage="dpo")
    for example, (chosen, rejected) in zip(examples, ref_logps.tolist()):
        example["ref_chosen_logps"], example["ref_rejected_logps"] = chosen, rejected
    if ref is not policy:
        del ref


def load_splits(config: DPOConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """The stage's tokenised (train, held-out) pairs: held out are ``config.eval_data``'s comparisons, else
    ``config.eval_fraction`` of ``config.data``'s (its first ``config.max_comparisons``), drawn with ``config.seed``;
    ties left out (DPO has no tie target), rankings expanded as ``config.ranking_pairs`` says."""
    return load_pair_splits(
        tokenizer,
        config.data,
        eval_data=config.eval_data,
        eval_fraction=config.eval_fraction,
        seed=config.seed,
        max_length=config.max_length,
        chat_template=config.chat_template,
        keep_ties=False,
        stage="dpo",
        ranking_pairs=config.ranking_pairs,
        max_comparisons=config.max_comparisons,
    )


def train(config: DPOConfig) -> FitResult:
    """Train ``config.model`` with DPO (or IPO / SLiC / SimPO) on ``config.data``."""
    if not config.data:
        raise ConfigError("dpo: `data` (a preference file) is required")
    tokenizer = models.load_tokenizer(config.model)
    train_set, eval_set = load_splits(config, tokenizer)
    out = Path(config.output_dir)
    write_run_config(out, "dpo", config)

    model = models.load_causal_lm(config.model)
    attach_reference(config, model, tokenizer, train_set, eval_set)
    # The probe's reference: a frozen copy of the starting model (with LoRA: the base, adapters off).
    probe_reference = (
        copy.deepcopy(model).eval().requires_grad_(False) if config.probe_points > 0 and config.lora_r == 0 else None
    )
    model = models.prepare_for_training(model, config)
    pad_id = tokenizer.pad_token_id
    probe = None
    if config.probe_points > 0:
        if not config.gold:
            raise ConfigError("dpo: probe_points > 0 needs a gold scorer (`gold`)")
        probe = FrontierProbe(
            config,
            tokenizer=tokenizer,
            reference=probe_reference if probe_reference is not None else model,
            gold=load_reward(config.gold, precision=config.precision, args=config.gold_args, field="gold_args"),
            proxy=load_reward(config.proxy, precision=config.precision) if config.proxy else None,
            output_dir=out,
            seed=config.seed,
            precision=config.precision,
        )
    return fit(
        config,
        model=model,
        task=DPOTask(config),
        train_set=train_set,
        eval_set=eval_set,
        collate=lambda examples: collate_pairs(examples, pad_id, packed=config.packing),
        precision=config.precision,
        save_model=lambda m, d, sd: models.save_pretrained(m, tokenizer, d, state_dict=sd),
        run_info={"stage": "dpo", "data": config.data},
        on_step=probe,
    )
