"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024): ``rlhfkit kto CONFIG.yaml`` / :func:`train`.

KTO learns from unpaired feedback: completions labelled desirable (thumbs up) or undesirable (thumbs down),
not pairs. Paired data converts (:mod:`rlhfkit.data.unpaired`: a pair's chosen is desirable, its rejected
undesirable, ties skipped).

1. Read the examples and tokenise each with its *KL pair*: its prompt with another example's completion,
   one fixed partner per example (:func:`rlhfkit.data.unpaired.kl_partners`).
2. Compute the reference log-probs ``log ref(y|x)`` of every example and of its KL pair once, before training,
   cached under the output directory as DPO caches them (:func:`attach_reference`); the reference model is then
   not held in memory while training.
3. Train with the shared loop. Each step, for each micro-batch:

   * the reference point ``z0``: the policy's log-probs of the batch's KL pairs (a forward without gradient),
     ``z0 = max(0, mean(log pi(y'|x) - log ref(y'|x)))`` over the KL pairs of the batch, summed and counted
     across every process (:func:`batch_reference_point`), detached. That is TRL's
     ``kl = gather_for_metrics((KL_logps - ref_KL_logps).mean().detach()).mean().clamp(min=0)``
     (``KTOTrainer._compute_loss``, trl/trainer/kto_trainer.py, TRL 1.16), the mean over the process's
     batches being the same number for batches of equal size;
   * the loss :func:`rlhfkit.losses.kto_loss` of each example, weighted by ``desirable_weight`` /
     ``undesirable_weight``; the loop averages it over the global batch, as TRL's ``losses.nanmean()``.

Departures from TRL: TRL pairs each prompt with the completion of its neighbour in a fixed, unshuffled batch
order (it requires ``train_sampling_strategy='sequential'``); here the pairing is fixed per example, so the
batches stay shuffled every epoch and the reference log-probs of the KL pairs are computed once. Both estimate
``E_x E_y' log pi(y'|x)/ref(y'|x)`` over independent completions ``y'``; TRL's KL completions are the batch's
own, here they are the batch's partners'. Log-probs are sums over completion tokens, as in the paper and TRL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlhfkit import log
from rlhfkit.config import ConfigError
from rlhfkit.data.unpaired import collate_unpaired, kl_batch, load_unpaired_splits
from rlhfkit.losses import kto_loss, kto_reference_point
from rlhfkit.modeling import forward, models
from rlhfkit.run_layout import PreferenceMetric as M
from rlhfkit.training import reference
from rlhfkit.training.loop import EvalOptions, FitResult, TrainOptions, fit, write_run_config

KL = "kl"
"""The metric of the batch's reference point ``z0`` (TRL's name)."""


@dataclass
class KTOConfig(models.ModelOptions, TrainOptions, EvalOptions):
    """Config of the KTO stage."""

    data: str = ""
    """KTO data: records with `prompt`, `completion` and a boolean `label` (true: desirable), and/or preference
    records in any format DPO reads, converted (chosen desirable, rejected undesirable; ties skipped)
    (.json, .jsonl, .parquet)."""
    eval_data: str = ""
    """Optional held-out KTO file; if empty, `eval_fraction` of `data`'s records are held out."""
    eval_fraction: float = 0.05
    """Fraction of records held out when `eval_data` is empty (0 disables eval)."""
    ref_model: str = ""
    """Reference model spec; empty: the starting `model` (with LoRA: the base, adapters off)."""
    beta: float = 0.1
    """KL-regularisation strength beta."""
    desirable_weight: float = 1.0
    """lambda_D, the weight of desirable examples' losses. The paper (eq. 8) advises lambda_D n_D / (lambda_U n_U)
    in [1, 4/3] for n_D desirable and n_U undesirable examples; a run outside it is warned about."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of undesirable examples' losses."""
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """KTO, or APO-zero's unpaired loss (no reference point, so no KL pairs are scored)."""
    max_length: int = 512
    """Maximum tokens of prompt + completion; longer completions are cut."""
    chat_template: bool = True
    """Render prompts and completions with the chat template (as SFT does)."""
    ref_cache: bool = True
    """Cache reference log-probs under output_dir/.rlhfkit-cache, for reruns in the same output_dir."""
    lr: float = 5e-6
    """Peak learning rate (KTO, as DPO, wants a small one)."""
    output_dir: str = "runs/kto"
    """Where the final model, checkpoints and metrics go."""


def batch_reference_point(kl_logratios: torch.Tensor) -> torch.Tensor:
    """KTO's ``z0`` for a batch: ``max(0, mean of kl_logratios)`` over the KL pairs of this batch on *every*
    process (one all-reduce of their sum and count when several run; every process calls this the same number
    of times, since the loop runs the same number of forwards on each), detached."""
    count = torch.tensor(float(kl_logratios.numel()), dtype=torch.float64, device=kl_logratios.device)
    total = torch.stack([kl_logratios.detach().double().sum(), count])
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return kto_reference_point(total[0], total[1]).to(kl_logratios.dtype)


class KTOTask:
    """The loop's :class:`~rlhfkit.training.loop.Task` for KTO. Items are examples.

    Statistics, which the loop sums over the global batch and divides by its examples: ``rewards/chosen`` and
    ``rewards/rejected`` are the mean implicit reward ``beta log(pi / ref)`` of desirable and of undesirable
    examples (each example's reward is scaled by its split's ``class_scale``, so on the held-out split the
    result is the class mean exactly; on a training batch it is the class sum over the class's expected count),
    ``rewards/margin`` their difference, ``kl`` the reference point ``z0``.
    """

    def __init__(self, config: KTOConfig):
        self.config = config

    def num_items(self, batch) -> int:
        return int(batch["label"].shape[0])

    def num_tokens(self, batch) -> int:
        return forward.num_tokens(batch)

    def reference_point(self, model, batch) -> torch.Tensor:
        """``z0`` of the batch: its KL pairs under the policy (no gradient) against their reference log-probs."""
        if self.config.loss_type != "kto":
            return torch.zeros((), device=batch["ref_logps"].device)
        with torch.no_grad():
            kl_logps, _ = forward.sequence_logps(model, kl_batch(batch))
        return batch_reference_point(kl_logps.float() - batch["ref_kl_logps"])

    def loss(self, model, batch):
        c = self.config
        z0 = self.reference_point(model, batch)
        logps, _ = forward.sequence_logps(model, batch)
        desirable = batch["label"]
        losses, rewards = kto_loss(
            logps,
            batch["ref_logps"],
            desirable,
            z0,
            beta=c.beta,
            desirable_weight=c.desirable_weight,
            undesirable_weight=c.undesirable_weight,
            loss_type=c.loss_type,
        )
        scale = batch["class_scale"]
        chosen = torch.where(desirable, rewards * scale, 0.0).sum()
        rejected = torch.where(desirable, 0.0, rewards * scale).sum()
        detached = logps.detach()
        stats = {
            M.REWARDS_CHOSEN: chosen,
            M.REWARDS_REJECTED: rejected,
            M.MARGIN: chosen - rejected,
            KL: z0 * desirable.shape[0],
            "logps_chosen": torch.where(desirable, detached * scale, 0.0).sum(),
            "logps_rejected": torch.where(desirable, 0.0, detached * scale).sum(),
            "desirable_fraction": desirable.float().sum(),
        }
        return losses.sum(), stats


# ----------------------------------------------------------------------------- reference log-probs


def ref_cache_path(config: KTOConfig, ref_model, tokenizer) -> Path:
    """Where the reference log-probs for this (data, reference, tokenizer, settings) live; hashes every weight."""
    extra = {"stage": "kto", "kl_pairs": config.loss_type == "kto"}  # the seed also fixes the KL pairs
    return reference.cache_path(config, ref_model, tokenizer, tag="kto-ref", extra=extra)


def compute_ref_logps(
    model,
    examples: list[dict],
    pad_token_id: int,
    *,
    precision: str,
    batch_size: int = 8,
    packed: bool = True,
    kl: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Summed reference log-probs, shape (N, 2): columns example, KL pair (0 without ``kl``)."""

    def score(model, chunk: list[dict], device) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in collate_unpaired(chunk, pad_token_id, packed=packed, kl=kl).items()}
        logps, _ = forward.sequence_logps(model, batch)
        kl_logps = forward.sequence_logps(model, kl_batch(batch))[0] if kl else torch.zeros_like(logps)
        return torch.stack([logps, kl_logps], dim=1)

    return reference.score_batches(
        model, examples, score, precision=precision, batch_size=batch_size, progress=progress, desc="kto: reference log-probs"
    )


def attach_reference(config: KTOConfig, policy, tokenizer, train: list[dict], held: list[dict]) -> None:
    """Fill ``ref_logps`` / ``ref_kl_logps`` of every example (from cache when valid), as DPO's ``attach_reference``."""
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
            kl=config.loss_type == "kto",
            progress=config.progress and main,
        )

    find_cache = (lambda: ref_cache_path(config, ref, tokenizer)) if config.ref_cache else None
    ref_logps = reference.reference_logps(ref, examples, compute, find_cache=find_cache, stage="kto")
    for example, (logp, kl_logp) in zip(examples, ref_logps.tolist()):
        example["ref_logps"], example["ref_kl_logps"] = logp, kl_logp
    if ref is not policy:
        del ref


def check_weights(config: KTOConfig, train_set: list[dict]) -> None:
    """Warn when ``lambda_D n_D / (lambda_U n_U)`` is outside the paper's [1, 4/3] (eq. 8), as TRL does."""
    n_desirable = sum(bool(e["label"]) for e in train_set)
    n_undesirable = len(train_set) - n_desirable
    if n_desirable == 0 or n_undesirable == 0:
        kind = "desirable" if n_desirable == 0 else "undesirable"
        log.warning(f"kto: the training data has no {kind} examples; KTO then only pushes one way")
        return
    ratio = config.desirable_weight * n_desirable / (config.undesirable_weight * n_undesirable)
    if not 1.0 <= ratio <= 4 / 3:
        low, high = (
            n_undesirable * config.undesirable_weight / n_desirable,
            4 / 3 * n_undesirable * config.undesirable_weight / n_desirable,
        )
        log.warning(
            f"kto: desirable_weight x {n_desirable} desirable / (undesirable_weight x {n_undesirable} undesirable) = "
            f"{ratio:.3g}, outside the paper's advised [1, 4/3] (eq. 8); e.g. desirable_weight in [{low:.3g}, {high:.3g}]"
        )


def train(config: KTOConfig) -> FitResult:
    """Train ``config.model`` with KTO on ``config.data`` (unpaired, or paired data converted)."""
    if not config.data:
        raise ConfigError("kto: `data` (a KTO or preference file) is required")
    if config.desirable_weight < 0 or config.undesirable_weight < 0:
        raise ConfigError("kto: desirable_weight and undesirable_weight must be >= 0")
    tokenizer = models.load_tokenizer(config.model)
    train_set, eval_set = load_unpaired_splits(
        tokenizer,
        config.data,
        eval_data=config.eval_data,
        eval_fraction=config.eval_fraction,
        seed=config.seed,
        max_length=config.max_length,
        chat_template=config.chat_template,
        stage="kto",
    )
    check_weights(config, train_set)
    out = Path(config.output_dir)
    write_run_config(out, "kto", config)

    model = models.load_causal_lm(config.model)
    attach_reference(config, model, tokenizer, train_set, eval_set)
    model = models.prepare_for_training(model, config)
    pad_id = tokenizer.pad_token_id
    kl = config.loss_type == "kto"
    return fit(
        config,
        model=model,
        task=KTOTask(config),
        train_set=train_set,
        eval_set=eval_set,
        collate=lambda examples: collate_unpaired(examples, pad_id, packed=config.packing, kl=kl),
        precision=config.precision,
        save_model=lambda m, d, sd: models.save_pretrained(m, tokenizer, d, state_dict=sd),
        run_info={"stage": "kto", "data": config.data},
    )
