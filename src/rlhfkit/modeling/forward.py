"""Model forward helpers shared by trainers: logits and log-probs of labelled tokens.

These call the (possibly distributed-wrapped) model itself, so gradients sync
under DDP/FSDP, and they send only the positions that predict a labelled token
through the LM head (``logits_to_keep``): on SmolLM2 the 49k-row head and its
fp32 softmax are a fifth of the compute, and prompts are often half a sequence.

A batch is either padded (``input_ids``, ``attention_mask``, ``labels``: (N, T))
or packed (:mod:`rlhfkit.data.packing`); both give the same flat lists of labelled
tokens, so losses never see the layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfkit.data import packing
from rlhfkit.data.sft import IGNORE_INDEX
from rlhfkit.modeling import attention
from rlhfkit.modeling.logps import gather_logps


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (0 on left padding). Shape (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def target_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that predict each labelled token: ``(logits (K, V), targets (K,), sequence (K,))``.

    ``sequence[k]`` is the row (padded) or sequence number (packed) of token ``k``.
    Position ``t`` of a sequence predicts its token ``t + 1``.
    """
    if packing.is_packed(batch):
        attention.require_kernel(model)
        positions, targets, owner = packing.target_positions(batch)
        logits = model(**packing.model_inputs(batch), logits_to_keep=positions).logits[0]
        return logits, targets, owner
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX  # (N, T-1): True where position t predicts a target
    positions = mask.any(dim=0).nonzero().squeeze(-1)  # union over the batch
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=positions, use_cache=False)
    mask = mask[:, positions]
    owner = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(mask)
    return out.logits[mask], targets[:, positions][mask], owner[mask]


def num_sequences(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["labels"].shape[0])


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the labelled tokens of each sequence, and their counts: ``(N,), (N,)``."""
    logits, targets, owner = target_logits(model, batch)
    token_logps = gather_logps(logits, targets)
    n = num_sequences(batch)
    logps = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, owner, token_logps)
    return logps, torch.bincount(owner, minlength=n)


def num_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a padded or packed batch."""
    return packing.num_tokens(batch) if packing.is_packed(batch) else int(batch["attention_mask"].sum())


def sft_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens of a padded or packed batch.

    ``batch["labels"]``: (N, T), ``IGNORE_INDEX`` where no loss is taken;
    position ``t`` predicts ``labels[t+1]`` (see :func:`rlhfkit.modeling.forward.target_logits`).
    """
    logits, targets, _ = target_logits(model, batch)
    return F.cross_entropy(logits.float(), targets, reduction="sum")
