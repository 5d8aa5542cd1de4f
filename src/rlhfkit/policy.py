"""The trainable RL policy: a causal LM plus an optional value function.

:class:`ActorCritic` is one ``nn.Module`` so one ``accelerator.prepare`` wraps
policy and value together (one DDP/FSDP unit, one optimizer). The value is
either a linear head on the policy's final hidden state (shared trunk: cheap,
one forward) or a separate critic (a token-classification model initialised
from the reward model or the policy: no interference between the two losses).

Its forward returns, for the last ``R`` positions of a ``[query | response]``
sequence, the logits that predict each response token and the value of the
state before it. Only those positions go through the LM head.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhfkit import models
from rlhfkit.losses import gather_logps
from rlhfkit.rollout import position_ids_from_mask


def _base(model):
    """The underlying transformers model (unwraps peft)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_critic(spec: str, *, vocab_size: int):
    """A ``*ForTokenClassification`` value model (num_labels=1) from a spec or a reward-model dir.

    A reward model saved by ``rlhfkit reward`` has a ``score`` head; the token
    classifier has one by the same name, so the value head starts as the reward head.
    """
    from transformers import AutoModelForTokenClassification

    if spec == models.TINY:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            critic = AutoModelForTokenClassification.from_config(models.tiny_config(num_labels=1), dtype=torch.float32)
    else:
        critic = AutoModelForTokenClassification.from_pretrained(models.resolve(spec), num_labels=1, dtype=torch.float32)
    if critic.config.vocab_size != vocab_size:
        raise ValueError(
            f"critic '{spec}' has vocabulary size {critic.config.vocab_size}, the policy {vocab_size}: "
            "a separate critic reads the policy's tokens, so it must share its tokenizer"
        )
    return critic


class ActorCritic(nn.Module):
    """Policy with an optional value head (``value="head"``) or critic (``value="critic"``)."""

    def __init__(self, policy, *, value: str = "none", critic=None):
        super().__init__()
        self.policy = policy
        self.value_kind = value
        self.value_head = None
        self.critic = None
        if value == "head":
            hidden = _base(policy).config.hidden_size
            self.value_head = nn.Linear(hidden, 1)
            # Zero: the first values are 0, a neutral baseline (explained variance 0), where a
            # random head's values are noise of the size of the final hidden state's RMS.
            # Its gradient (V - R) * h is not zero, so it learns from the first update.
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        elif value == "critic":
            if critic is None:
                raise ValueError("value='critic' needs a critic model")
            self.critic = critic
        elif value != "none":
            raise ValueError(f"value must be none, head or critic; got '{value}'")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int):
        """``(logits (B, R, V), values (B, R) or None)`` for the last ``R = n_response`` tokens.

        Position ``P - 1 + j`` (the token before response token ``j``) predicts it,
        so the kept hidden states are ``[-(R + 1):-1]``.
        """
        position_ids = position_ids_from_mask(attention_mask)
        base = _base(self.policy)
        hidden = base.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        states = hidden[:, -(n_response + 1) : -1]
        logits = base.get_output_embeddings()(states)
        values = None
        if self.value_head is not None:
            values = self.value_head(states).squeeze(-1).float()
        elif self.critic is not None:
            out = self.critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
            values = out.logits[:, -(n_response + 1) : -1, 0].float()
        return logits, values


def response_logps(model: nn.Module, input_ids, attention_mask, response_ids, *, temperature: float = 1.0):
    """Log-probs of the response tokens under a causal LM or :class:`ActorCritic`.

    Shapes: ``input_ids``/``attention_mask`` (B, P + R), ``response_ids`` (B, R) ->
    ``(logps (B, R), logits (B, R, V), values (B, R) or None)``.
    """
    n = response_ids.shape[1]
    if isinstance(model, ActorCritic) or isinstance(getattr(model, "module", None), ActorCritic):
        logits, values = model(input_ids, attention_mask, n)
    else:
        position_ids = position_ids_from_mask(attention_mask)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=n + 1, use_cache=False)
        logits, values = out.logits[:, :-1], None
    return gather_logps(logits, response_ids, temperature), logits, values
