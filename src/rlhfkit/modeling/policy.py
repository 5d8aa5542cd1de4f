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

from rlhfkit.data import packing
from rlhfkit.modeling import attention, models
from rlhfkit.modeling.forward import position_ids_from_mask, sft_loss_sum
from rlhfkit.modeling.logps import gather_logps, gather_logps_and_entropy, linear_token_logps


def _base(model):
    """The underlying transformers model (unwraps peft)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_critic(spec: str, *, vocab_size: int):
    """A ``*ForTokenClassification`` value model (num_labels=1) from a spec or a reward-model dir.

    A reward model saved by ``rlhfkit reward`` has a ``score`` head; the token
    classifier has one by the same name, so the value head starts as the reward head.
    A reward-model ensemble's K heads (``rlhfkit_ensemble_size``) start it as their mean (raw scores, as a single
    head's are).
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    if spec == models.TINY:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            critic = AutoModelForTokenClassification.from_config(models.tiny_config(num_labels=1), dtype=torch.float32)
    else:
        path = models.resolve(spec)
        heads = int(getattr(AutoConfig.from_pretrained(path), "rlhfkit_ensemble_size", None) or 1)
        critic = AutoModelForTokenClassification.from_pretrained(path, num_labels=heads, dtype=torch.float32)
        if heads > 1:  # the mean of K linear heads is one linear head
            ensemble = critic.score
            critic.score = nn.Linear(ensemble.in_features, 1, bias=ensemble.bias is not None)
            with torch.no_grad():
                critic.score.weight.copy_(ensemble.weight.mean(0, keepdim=True))
                if ensemble.bias is not None:
                    critic.score.bias.copy_(ensemble.bias.mean(0, keepdim=True))
            critic.config.num_labels = 1
            for key in ("rlhfkit_ensemble_size", "rlhfkit_reward_gain", "rlhfkit_reward_bias"):
                if hasattr(critic.config, key):
                    delattr(critic.config, key)
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
        # The blocks no device split may cut, as transformers names them on its models: accelerate's FSDP
        # transformer auto-wrap reads this attribute of the model it prepares (this one) to find the decoder
        # layers to shard one by one; without it the whole ActorCritic is one FSDP unit.
        self._no_split_modules = set(_base(policy)._no_split_modules or ())
        if critic is not None:
            self._no_split_modules |= set(critic._no_split_modules or ())

    def tie_weights(self, *args, **kwargs) -> None:
        """Re-tie the policy's (and critic's) tied weights, as transformers models do: accelerate's FSDP2 prepare calls
        this after moving the model to the meta device (``fsdp2_prepare_model``, ``cpu_ram_efficient_loading``); without
        it the LM head and the embeddings would load and train as two weights."""
        for model in (self.policy, self.critic):
            if model is not None and hasattr(model, "tie_weights"):
                model.tie_weights(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        n_response: int = 0,
        *,
        positions: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        rlhfkit_layout=None,
        targets: torch.Tensor | None = None,
        temperature: float = 1.0,
        with_entropy: bool = False,
        sft_batch: dict[str, torch.Tensor] | None = None,
    ):
        """Logits that predict each response token, and the value of the state before it.

        With ``sft_batch`` (an SFT batch, :func:`rlhfkit.data.sft.collate_sft`): the policy's summed next-token loss
        on it (:func:`rlhfkit.modeling.forward.sft_loss_sum`; PPO-ptx), so that this forward, too, goes through the
        prepared model's hooks (FSDP gathers the root's parameters in them).

        Padded (``positions`` None): ``input_ids``/``attention_mask`` (B, P + R) ->
        ``(logits (B, R, V), values (B, R) or None)`` for the last ``R = n_response``
        tokens; position ``P - 1 + j`` predicts response token ``j``, so the kept
        hidden states are ``[-(R + 1):-1]``.
        Packed (:func:`packed_rollout`): ``input_ids`` (1, L) with ``position_ids`` and
        ``rlhfkit_layout``; ``positions`` (K,) -> ``(logits (K, V), values (K,) or None)``;
        with ``targets`` (K,) the log-probs of those tokens instead of the logits
        (:func:`head_token_logps`): ``(logps (K,), values (K,) or None, entropy (K,) or None)``.
        """
        if sft_batch is not None:
            return sft_loss_sum(self.policy, sft_batch)
        if positions is None:
            position_ids = position_ids_from_mask(attention_mask)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if rlhfkit_layout is not None:
            inputs["rlhfkit_layout"] = rlhfkit_layout
            inputs["attention_mask"] = packing.NO_MASK

        def keep(x: torch.Tensor) -> torch.Tensor:
            return x[:, -(n_response + 1) : -1] if positions is None else x[0, positions]

        base = _base(self.policy)
        states = keep(base.get_decoder()(**inputs).last_hidden_state)
        values = None
        if self.value_head is not None:
            values = self.value_head(states).squeeze(-1).float()
        elif self.critic is not None:
            values = keep(self.critic(**inputs).logits[..., 0]).float()
        head = base.get_output_embeddings()
        if targets is not None:
            logps, entropy = head_token_logps(head, states, targets, temperature, with_entropy=with_entropy)
            return logps, values, entropy
        return head(states), values


HEAD_BLOCK_ROWS = 256
"""Rows per block of the fused head on CPU: a block's logits stay in cache while they become log-probs."""
CUDA_HEAD_BLOCK_VALUES = 1 << 27
"""Logit values per block of the fused head on CUDA (256 MB in bf16): rows = this // vocabulary size."""


def head_token_logps(
    head: nn.Module, states: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logps, entropy or None)`` of ``tokens`` under the LM head's ``head(states) / temperature``.

    Shapes: ``states`` (K, H), ``tokens`` (K,) -> (K,), fp32. A plain ``nn.Linear`` head is fused with the
    log-softmax (:func:`rlhfkit.modeling.logps.linear_token_logps`, in the autocast dtype if one is on), so the
    (K, V) logits are never handed out. On CPU in :data:`HEAD_BLOCK_ROWS`-row blocks, the logits kept for the
    backward and overwritten by their gradient; on CUDA in blocks of :data:`CUDA_HEAD_BLOCK_VALUES` logits, none
    kept (the backward recomputes them: (K, V) at 64k tokens and a 128k vocabulary would be 17 GB). Anything else
    (another device, a head with hooks or adapters) computes ``head(states)`` and then :func:`logps_and_entropy`.
    """
    if (
        type(head) is not nn.Linear
        or states.device.type not in ("cpu", "cuda")
        or states.dim() != 2
        or head._forward_hooks
        or head._forward_pre_hooks
    ):
        return logps_and_entropy(head(states), tokens, temperature, with_entropy=with_entropy)
    dtype = attention.compute_dtype(states)
    cuda = states.device.type == "cuda"
    with torch.autocast(states.device.type, enabled=False):
        bias = head.bias.to(dtype) if head.bias is not None else None
        out = linear_token_logps(
            states.to(dtype),
            head.weight.to(dtype),
            bias,
            tokens,
            temperature,
            with_entropy=with_entropy,
            block_rows=max(1, CUDA_HEAD_BLOCK_VALUES // head.out_features) if cuda else HEAD_BLOCK_ROWS,
            recompute=cuda,
        )
    return out if with_entropy else (out, None)


def packed_rollout(
    query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack rollout rows (:mod:`rlhfkit.data.packing`): rows with the same query form a group, so the
    prompt, and any common start of all the group's responses, runs once; no padding.

    Shapes: ``query_ids``/``query_mask`` (B, P) left-padded, ``response_ids``/``response_mask``
    (B, R). Returns ``(batch, positions (K,), rows (K,), cols (K,))``: response token
    ``cols[k]`` of row ``rows[k]`` is predicted at row position ``positions[k]``, for the
    K tokens where ``response_mask`` is True.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    sequences = []
    for b in range(query_ids.shape[0]):
        query = query_ids[b][query_mask[b]].tolist()
        n = int(response_mask[b].sum())
        sequences.append((len(query), n, query + response_ids[b, :n].tolist()))
        groups.setdefault(tuple(query), []).append(b)
    order = [b for rows in groups.values() for b in rows]  # sequence number -> row
    batch = packing.pack([[sequences[b][2] for b in rows] for rows in groups.values()])
    positions, rows, cols = [], [], []
    for seq, b in enumerate(order):
        q, n, _ = sequences[b]
        positions.append(batch["seq_index"][seq, q - 1 : q - 1 + n])  # token q-1+j predicts response token j
        rows += [b] * n
        cols += range(n)
    return batch, torch.cat(positions), torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def packed_response_logps(
    model: nn.Module,
    query_ids,
    query_mask,
    response_ids,
    response_mask,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    device=None,
):
    """:func:`response_logps` from one packed forward (see :func:`packed_rollout`).

    Returns ``(logps (B, R), values (B, R) or None, entropy (B, R) or None)``, 0 where
    ``response_mask`` is False. ``model`` is an :class:`ActorCritic` or a causal LM
    whose attention is rlhfkit's kernel. Either way the logits are the output
    embeddings applied to the decoder's last hidden state (:func:`head_token_logps`), so a
    model whose own forward post-processes them (e.g. Gemma 2's logit soft-capping)
    gets the plain head, for the policy and the reference alike.
    """
    inner = getattr(model, "module", model)  # DDP
    actor_critic = isinstance(inner, ActorCritic)
    attention.require_kernel(inner.policy if actor_critic else inner)
    batch, positions, rows, cols = packed_rollout(query_ids, query_mask, response_ids, response_mask)
    device = device if device is not None else positions.device
    inputs = {k: v.to(device) for k, v in batch.items()}
    positions, rows, cols = positions.to(device), rows.to(device), cols.to(device)
    targets = response_ids.to(device)[rows, cols]
    if actor_critic:
        layout = packing.model_inputs(inputs)
        token_logps, values, token_entropy = model(
            layout["input_ids"],
            None,
            0,
            positions=positions,
            position_ids=layout["position_ids"],
            rlhfkit_layout=layout["rlhfkit_layout"],
            targets=targets,
            temperature=temperature,
            with_entropy=with_entropy,
        )
    else:
        base = _base(inner)
        states = base.get_decoder()(**packing.model_inputs(inputs)).last_hidden_state[0, positions]
        token_logps, token_entropy = head_token_logps(
            base.get_output_embeddings(), states, targets, temperature, with_entropy=with_entropy
        )
        values = None
    shape = response_ids.shape

    def unpack(per_token: torch.Tensor) -> torch.Tensor:  # (K,) -> (B, R)
        return torch.zeros(shape, dtype=per_token.dtype, device=device).index_put((rows, cols), per_token)

    return tuple(unpack(x) if x is not None else None for x in (token_logps, values, token_entropy))


def logps_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logps, entropy or None)`` of ``tokens`` under ``logits / temperature``, in one pass over the logits."""
    if with_entropy:
        return gather_logps_and_entropy(logits, tokens, temperature)
    return gather_logps(logits, tokens, temperature), None


def response_logits(model: nn.Module, input_ids, attention_mask, n_response: int):
    """``(logits (B, R, V), values (B, R) or None)`` predicting the last ``R = n_response`` tokens
    of padded rows, under a causal LM or :class:`ActorCritic`."""
    if isinstance(model, ActorCritic) or isinstance(getattr(model, "module", None), ActorCritic):
        return model(input_ids, attention_mask, n_response)
    position_ids = position_ids_from_mask(attention_mask)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=n_response + 1,
        use_cache=False,
    )
    return out.logits[:, :-1], None


def response_logps(model: nn.Module, input_ids, attention_mask, response_ids, *, temperature: float = 1.0):
    """Log-probs of the response tokens under a causal LM or :class:`ActorCritic`.

    Shapes: ``input_ids``/``attention_mask`` (B, P + R), ``response_ids`` (B, R) ->
    ``(logps (B, R), logits (B, R, V), values (B, R) or None)``.
    """
    logits, values = response_logits(model, input_ids, attention_mask, response_ids.shape[1])
    return gather_logps(logits, response_ids, temperature), logits, values
