"""The pure math of ILQL (Implicit Language Q-Learning, Snell et al. 2022, "Offline RL for Natural Language
Generation with Implicit Language Q Learning", arXiv:2206.11871): plain torch functions on tensors, no model,
no trainer. They are meant to move into :mod:`rlhfkit.losses` later; they live here for now so the two files
are edited apart.

ILQL is IQL (Kostrikov et al. 2021, "Offline Reinforcement Learning with Implicit Q-Learning") at the token
level: the state ``s_t`` is the prompt and the response tokens before ``t``, the action ``a_t`` the response
token ``t``; the reward is sparse, the sequence's scalar reward on its last response token; the state after the
last token is terminal (``V = 0``). Per response token:

* Bellman (TD) loss for each Q head: ``(Q_i(s, a) - (r + gamma V(s')))^2``, the target held fixed
  (:func:`bellman_targets`, :func:`q_loss`);
* expectile loss for V toward the target Q heads' minimum at the taken action,
  ``L_2^tau(min_i Qhat_i(s, a) - V(s))`` with ``L_2^tau(u) = |tau - 1(u < 0)| u^2`` (:func:`expectile_loss`);
* the CQL-style regulariser: cross-entropy of each Q head's values over the vocabulary, read as logits, toward
  the taken token, ``logsumexp_a' Q(s, a') - Q(s, a)`` (:func:`cql_loss`);
* the language-model (behaviour-cloning) loss, each token's cross-entropy weighted by
  ``exp(beta_awac (min Qhat - V))`` (AWAC; ``beta_awac = 0`` is plain behaviour cloning) (:func:`awac_loss`).

Decoding perturbs the behaviour policy's log-probs by the advantage, ``log pi_beta(a|s) + beta (Q(s, a) - V(s))``
(the paper's eq. 7 as issue 23 cites it: ``pi(a|s) ∝ pi_beta(a|s) exp(beta (Q(s, a) - V(s)))``)
(:func:`ilql_logits`, :func:`top_k_mask`), and the target Q heads follow the trained ones by Polyak averaging
(:func:`polyak_update_`).

Where this follows TRLX: ``ILQLConfig.loss`` and ``ILQLHeads._sync_target_q_heads`` /
``AutoModelForCausalLMWithILQLHeads.generate`` in ``trlx/models/modeling_ilql.py`` (CarperAI/trlx): the same
terms, the target heads' minimum in the V loss and in decoding, the Q loss and CQL loss summed over the Q heads.
Losses here are *per token* (shape (K,)); the caller sums them and the training loop divides by the tokens of
the global batch, which for one batch is TRLX's ``sum(...) / n_nonterminal``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


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
def polyak_update_(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], alpha: float) -> None:
    """Move each target tensor toward its online tensor, in place: ``target <- (1 - alpha) target + alpha online``
    (written ``target + alpha (online - target)``, so a target equal to its online tensor stays bit for bit).

    ``alpha = 1`` copies; ``alpha = 0`` leaves the target as it is.
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
