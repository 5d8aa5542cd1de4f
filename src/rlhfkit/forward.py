"""Model forward helpers shared by trainers: log-probs of labelled tokens.

These call the (possibly distributed-wrapped) model itself, so gradients sync
under DDP/FSDP, and they send only the positions that predict a labelled token
through the LM head (``logits_to_keep``): on SmolLM2 the 49k-row head and its
fp32 softmax are a fifth of the compute, and prompts are often half a sequence.
"""

from __future__ import annotations

import torch

from rlhfkit.data.sft import IGNORE_INDEX
from rlhfkit.losses import gather_logps


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the labelled tokens of each row, and their counts.

    Shapes: inputs (N, T) -> ``(logps (N,), n_tokens (N,))``. Only positions that
    predict a labelled token go through the LM head (``logits_to_keep``).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    positions = mask.any(dim=0).nonzero().squeeze(-1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions, use_cache=False).logits
    mask = mask[:, positions]
    token_logps = gather_logps(logits, targets[:, positions].clamp(min=0))
    token_logps = torch.where(mask, token_logps, torch.zeros_like(token_logps))
    return token_logps.sum(-1), mask.sum(-1)
