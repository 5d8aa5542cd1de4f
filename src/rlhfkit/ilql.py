"""Implicit Language Q-Learning (Snell et al. 2022): ``rlhfkit ilql CONFIG.yaml`` / :func:`train`.

Offline RL from scored data, with no sampling while training. The policy is the causal LM; beside it, on the
final hidden state of every position, sit two Q heads (a value for every vocabulary token), their target copies
(Polyak averages, not trained by gradient) and a V head (:class:`ILQLHeads`).

1. Read (prompt, response, reward) examples (:mod:`rlhfkit.data.offline`: the native format, scored samples,
   or preferences turned into rewards), tokenise them as SFT does, and optionally standardise the rewards
   (``normalize_rewards``, as TRLX does).
2. Train with the shared loop (:func:`rlhfkit.training.loop.fit`). Per response token (state = prompt and the
   tokens before it, action = the token; the sequence reward on the last token, ``V = 0`` after it), the loss
   of the ILQL section of :mod:`rlhfkit.losses`: the Bellman loss of each Q head toward ``r + gamma V(s')``, the
   expectile loss of V toward the target Q heads' minimum, ``cql_scale`` x the CQL regulariser of the Q heads,
   and ``awac_scale`` x the language-model loss (weighted by ``exp(awac_beta (Qhat - V))``; ``awac_beta = 0`` is
   behaviour cloning). Every ``target_sync_every`` optimizer steps, before the next step's forward, the target
   heads move ``alpha`` of the way to the trained ones (:meth:`ILQLTask.before_forward`).
3. Save the LM where ``from_pretrained`` loads it (``rlhfkit chat DIR``: the behaviour-cloned policy, beta = 0)
   and the heads beside it, :data:`~rlhfkit.modeling.ilql_heads.HEADS_FILE`. Reading them back
   (:func:`~rlhfkit.modeling.ilql_heads.load_ilql`) and decoding with ``log pi_beta + beta (min Qhat - V)``,
   optionally top-k (:mod:`rlhfkit.generation.ilql_decode`: ``ilql_generate_ids``, ``ILQLGenerator``, and the
   ``ILQLEngine`` with which ``rlhfkit eval`` samples an ILQL output) live below the stages, so eval can use them;
   this module re-exports the names it used to define.

Where this follows TRLX (``trlx/models/modeling_ilql.py``): the loss terms and their weights
(``ILQLConfig.loss``), the heads (``ILQLHeads``: two-layer MLP heads, ``make_head``), the target update
(``ILQLHeads._sync_target_q_heads`` every ``steps_for_target_q_sync`` steps) and decoding
(``AutoModelForCausalLMWithILQLHeads.generate``: the target heads' minimum, top-k, temperature); the defaults
are TRLX's (``default_ilql_config``: tau 0.7, gamma 0.99, cql_scale 0.1, awac_scale 1, alpha 0.001, beta 0,
sync every 5 steps, two Qs). Departures: losses are averaged over every response token of the *global* batch
(the shared loop's rule; TRLX averages per micro-batch); only padded batches (``packing`` must stay false);
the V head is evaluated only at the states before response tokens (``V`` of the terminal state is 0 by
definition, so TRLX's extra terminal state is never used).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfkit import log
from rlhfkit.config import ConfigError
from rlhfkit.data.offline import collate_scored, load_scored_splits, normalize_rewards
from rlhfkit.data.records import IGNORE_INDEX

# re-exported (rlhfkit chat and older callers import them from here): ILQLDecodeOptions, ILQLGenerator,
# ilql_generate_ids, load_ilql
from rlhfkit.generation.ilql_decode import ILQLDecodeOptions, ILQLGenerator, base_model, ilql_generate_ids  # noqa: F401
from rlhfkit.losses import awac_loss, awac_weights, bellman_targets, cql_loss, q_loss, v_loss
from rlhfkit.modeling import models
from rlhfkit.modeling.forward import position_ids_from_mask
from rlhfkit.modeling.ilql_heads import HEADS_FILE, ILQLHeads, load_ilql, save_heads  # noqa: F401 (load_ilql re-exported)
from rlhfkit.run_layout import ILQLMetric as M
from rlhfkit.training.loop import EvalOptions, FitResult, TrainOptions, fit, write_run_config


@dataclass
class ILQLConfig(models.ModelOptions, TrainOptions, EvalOptions):
    """Config of the ILQL stage."""

    data: str = ""
    """Scored data (.json, .jsonl): records with `prompt`, `response` and a numeric `reward`; `rlhfkit sample`
    records with a `scores` (or `rewards`) list beside `responses`; or preference records (chosen gets
    `chosen_reward`, rejected `rejected_reward`; ties skipped)."""
    eval_data: str = ""
    """Optional held-out scored file; if empty, `eval_fraction` of `data`'s records are held out."""
    eval_fraction: float = 0.05
    """Fraction of records held out when `eval_data` is empty (0 disables eval)."""
    chosen_reward: float = 1.0
    """Reward of a preference record's chosen (best) response."""
    rejected_reward: float = -1.0
    """Reward of a preference record's rejected (worst) response."""
    normalize_rewards: bool = True
    """Standardise the rewards with the training split's mean and std (TRLX does), so `gamma`, `cql_scale` and the
    decoding `beta` mean the same on any reward scale."""
    max_length: int = 512
    """Maximum tokens of prompt + response; longer responses are cut (the reward stays on the last kept token)."""
    chat_template: bool = True
    """Render prompt + response with the chat template (as SFT does)."""
    gamma: float = 0.99
    """Discount per token in the Bellman target r + gamma V(s')."""
    tau: float = 0.7
    """Expectile of the V loss (0.5: V is the mean of Q over the data's actions; toward 1: their maximum)."""
    cql_scale: float = 0.1
    """Weight of the CQL regulariser (cross-entropy of the Q values toward the taken token)."""
    awac_scale: float = 1.0
    """Weight of the language-model (behaviour-cloning / AWAC) loss."""
    awac_beta: float = 0.0
    """AWAC temperature: the LM loss of a token is weighted by exp(awac_beta (min Qhat - V)); 0: plain behaviour
    cloning (TRLX's default)."""
    alpha: float = 0.001
    """Polyak rate of the target Q heads: target <- (1 - alpha) target + alpha Q."""
    target_sync_every: int = 5
    """Optimizer steps between target-head updates (TRLX's steps_for_target_q_sync)."""
    two_qs: bool = True
    """Twin Q heads (the minimum of the two targets is used); false: one."""
    packing: bool = False
    """ILQL reads padded batches only (its heads need every response position's hidden state); true is refused."""
    lr: float = 5e-5
    """Peak learning rate (TRLX's gpt2 ILQL examples use 5e-5)."""
    output_dir: str = "runs/ilql"
    """Where the model, its ILQL heads, checkpoints and metrics go."""


# ----------------------------------------------------------------------------- the heads and the model


@dataclass
class ILQLTokens:
    """One forward's per-response-token tensors, flattened row by row (K = response tokens of the batch)."""

    actions: torch.Tensor
    """(K,) long: the response token taken at each state."""
    rows: torch.Tensor
    """(K,) long: the batch row of each token."""
    terminal: torch.Tensor
    """(K,) bool: True at each row's last response token (the state after it is terminal, V = 0)."""
    lm_logits: torch.Tensor
    """(K, vocab): the LM's logits at each state."""
    qs: torch.Tensor
    """(H, K, vocab): the trained Q heads."""
    target_qs: torch.Tensor
    """(H, K, vocab): the target Q heads (no gradient)."""
    values: torch.Tensor
    """(K,): V of each state."""


class ILQLModel(nn.Module):
    """The causal LM and its :class:`ILQLHeads` as one module, so one ``accelerator.prepare`` wraps both (one
    optimizer, one DDP unit, one checkpoint)."""

    def __init__(self, lm, heads: ILQLHeads):
        super().__init__()
        self.lm, self.heads = lm, heads
        # accelerate's FSDP auto-wrap reads this to shard the decoder layers one by one (as ActorCritic does).
        self._no_split_modules = set(base_model(lm)._no_split_modules or ())

    def tie_weights(self, *args, **kwargs) -> None:
        """Re-tie the LM's tied weights (accelerate's FSDP2 prepare calls this, as on ActorCritic)."""
        if hasattr(self.lm, "tie_weights"):
            self.lm.tie_weights(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> ILQLTokens:
        """The per-token tensors of a right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (B, T),
        labels :data:`IGNORE_INDEX` off the response. Position ``t`` is the state whose action is ``labels[t + 1]``."""
        base = base_model(self.lm)
        states = base.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX  # (B, T-1): True where position t takes a response action
        following = torch.nn.functional.pad(mask[:, 1:], (0, 1), value=False)
        terminal = (mask & ~following)[mask]
        rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(mask)[mask]
        kept = states[mask]  # (K, hidden), row by row
        qs, target_qs, values = self.heads(kept)
        return ILQLTokens(
            actions=targets[mask],
            rows=rows,
            terminal=terminal,
            lm_logits=base.get_output_embeddings()(kept),
            qs=qs,
            target_qs=target_qs,
            values=values,
        )


def unwrap(model) -> ILQLModel:
    """The :class:`ILQLModel` inside a DDP wrapper, or the model itself."""
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------- the loss


@dataclass
class ILQLLosses:
    """Per-token loss terms, (K,) each, their weighted sum, and the quantities they were computed from."""

    total: torch.Tensor
    q: torch.Tensor
    v: torch.Tensor
    cql: torch.Tensor
    awac: torch.Tensor
    awac_weight: torch.Tensor
    target_q: torch.Tensor
    """(K,): the target Q heads' minimum at the taken token (what V regresses to)."""


def token_losses(tokens: ILQLTokens, rewards: torch.Tensor, config: ILQLConfig) -> ILQLLosses:
    """ILQL's per-token losses for one forward (the ILQL section of :mod:`rlhfkit.losses`); ``rewards`` (B,) per row.

    The next state's value of token k is the value of token k + 1 (the same row's next state: tokens are
    flattened row by row and a row's response tokens are contiguous); at a row's last token it is 0."""
    token_rewards = torch.where(tokens.terminal, rewards[tokens.rows].float(), 0.0)
    next_values = torch.cat([tokens.values[1:], tokens.values.new_zeros(1)])
    targets = bellman_targets(token_rewards, next_values, tokens.terminal, config.gamma)
    index = tokens.actions.view(1, -1, 1).expand(tokens.qs.shape[0], -1, 1)
    q_taken = tokens.qs.gather(-1, index).squeeze(-1).float()
    target_q_taken = tokens.target_qs.gather(-1, index).squeeze(-1).float()
    loss_q = q_loss(q_taken, targets)
    loss_v = v_loss(target_q_taken, tokens.values, config.tau)
    loss_cql = cql_loss(tokens.qs, tokens.actions)
    weight = awac_weights(target_q_taken, tokens.values, config.awac_beta)
    loss_awac = awac_loss(tokens.lm_logits, tokens.actions, weight)
    total = loss_q + loss_v + config.cql_scale * loss_cql + config.awac_scale * loss_awac
    return ILQLLosses(total, loss_q, loss_v, loss_cql, loss_awac, weight, target_q_taken.min(0).values)


class ILQLTask:
    """The loop's :class:`~rlhfkit.training.loop.Task` for ILQL. Items are response tokens (actions).

    Statistics (summed over tokens; the loop divides by the global batch's tokens, giving means): each loss
    term, V, the minimum target Q of the taken token, and the AWAC weight (:class:`rlhfkit.run_layout.ILQLMetric`).
    """

    def __init__(self, config: ILQLConfig):
        self.config = config

    def num_items(self, batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def num_tokens(self, batch) -> int:
        return int(batch["attention_mask"].sum())

    def before_forward(self, model) -> None:
        """In training, before the first micro-batch of every ``target_sync_every``-th optimizer step (after the
        first), move the target heads toward the Q heads, as TRLX does after the step before it. Counted with the
        heads' saved ``train_forwards``, so a resumed run updates the targets when an uninterrupted one would."""
        if not model.training:
            return
        heads = unwrap(model).heads
        done = int(heads.train_forwards)
        step, micro = divmod(done, self.config.grad_accum)
        if micro == 0 and step > 0 and step % self.config.target_sync_every == 0:
            heads.sync_targets(self.config.alpha)
        heads.train_forwards.add_(1)

    def loss(self, model, batch):
        self.before_forward(model)
        tokens = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
        losses = token_losses(tokens, batch["rewards"], self.config)
        stats = {
            M.LOSS_Q: losses.q.detach().sum(),
            M.LOSS_V: losses.v.detach().sum(),
            M.LOSS_CQL: losses.cql.detach().sum(),
            M.LOSS_AWAC: losses.awac.detach().sum(),
            M.VALUE: tokens.values.detach().sum(),
            M.TARGET_Q: losses.target_q.sum(),
            M.AWAC_WEIGHT: losses.awac_weight.sum(),
        }
        return losses.total.sum(), stats


# ----------------------------------------------------------------------------- saving and loading


def split_state_dict(state_dict: dict) -> tuple[dict, dict]:
    """An :class:`ILQLModel` state dict as ``(the LM's, the heads')``, prefixes removed."""
    lm = {k[len("lm.") :]: v for k, v in state_dict.items() if k.startswith("lm.")}
    heads = {k[len("heads.") :]: v for k, v in state_dict.items() if k.startswith("heads.")}
    return lm, heads


def save_ilql(model: ILQLModel, tokenizer, out_dir: str | Path, *, state_dict: dict | None = None) -> Path:
    """Save the LM with :func:`rlhfkit.modeling.models.save_pretrained` (``from_pretrained`` loads it) and the
    heads beside it (:data:`HEADS_FILE`). The heads are written first, after any earlier completion marker is
    removed, so a directory whose save completed holds the heads of the same run. ``state_dict``: the gathered
    :class:`ILQLModel` state under FSDP / DeepSpeed (None: the model's own)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm_state, heads_state = split_state_dict(state_dict) if state_dict is not None else (None, None)
    (out / models.COMPLETE_MARKER).unlink(missing_ok=True)
    save_heads(model.heads, out / HEADS_FILE, heads_state)
    return models.save_pretrained(model.lm, tokenizer, out, state_dict=lm_state)


# ----------------------------------------------------------------------------- the stage


def check_config(config: ILQLConfig) -> None:
    """Refuse settings ILQL cannot run, naming them."""
    if not config.data:
        raise ConfigError("ilql: `data` (a scored, scored-samples or preference file) is required")
    if config.packing:
        raise ConfigError("ilql: packing=true is not supported (ILQL reads padded batches); set packing=false")
    if not 0.0 < config.tau < 1.0:
        raise ConfigError(f"ilql: tau must be in (0, 1), got {config.tau}")
    if not 0.0 <= config.gamma <= 1.0:
        raise ConfigError(f"ilql: gamma must be in [0, 1], got {config.gamma}")
    if not 0.0 <= config.alpha <= 1.0:
        raise ConfigError(f"ilql: alpha must be in [0, 1], got {config.alpha}")
    if config.target_sync_every < 1:
        raise ConfigError(f"ilql: target_sync_every must be >= 1, got {config.target_sync_every}")
    if config.cql_scale < 0 or config.awac_scale < 0:
        raise ConfigError("ilql: cql_scale and awac_scale must be >= 0")


def build_model(config: ILQLConfig) -> ILQLModel:
    """The LM (prepared for training: attention, LoRA, checkpointing) and fresh heads seeded by ``config.seed``."""
    lm = models.prepare_for_training(models.load_causal_lm(config.model), config)
    base = base_model(lm)
    hidden = base.config.hidden_size
    vocab = base.get_output_embeddings().weight.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        heads = ILQLHeads(hidden, vocab, two_qs=config.two_qs)
    return ILQLModel(lm, heads)


def train(config: ILQLConfig) -> FitResult:
    """Train ``config.model`` with ILQL on ``config.data``; the LM and :data:`HEADS_FILE` go to ``config.output_dir``."""
    check_config(config)
    tokenizer = models.load_tokenizer(config.model)
    train_set, eval_set = load_scored_splits(
        tokenizer,
        config.data,
        eval_data=config.eval_data,
        eval_fraction=config.eval_fraction,
        seed=config.seed,
        max_length=config.max_length,
        chat_template=config.chat_template,
        chosen_reward=config.chosen_reward,
        rejected_reward=config.rejected_reward,
    )
    run_info: dict[str, Any] = {"stage": "ilql", "data": config.data}
    if config.normalize_rewards:
        mean, std = normalize_rewards(train_set, eval_set)
        run_info.update(reward_mean=mean, reward_std=std)
        log.info(f"ilql: rewards standardised with the training split's mean {mean:.4g} and std {std:.4g}")
    out = Path(config.output_dir)
    write_run_config(out, "ilql", config)
    pad_id = tokenizer.pad_token_id

    def save(model: ILQLModel, directory: Path, state_dict: dict | None) -> None:
        save_ilql(model, tokenizer, directory, state_dict=state_dict)

    return fit(
        config,
        model=build_model(config),
        task=ILQLTask(config),
        train_set=train_set,
        eval_set=eval_set,
        collate=lambda examples: collate_scored(examples, pad_id),
        precision=config.precision,
        save_model=save,
        run_info=run_info,
    )
