"""Decoding an ILQL policy (Snell et al. 2022): the behaviour-cloned LM's log-probs perturbed by the advantage of
its heads (:mod:`rlhfkit.modeling.ilql_heads`), ``top_k(log pi_beta + beta (min Qhat - V))``, then the temperature.

* :func:`ilql_generate_ids`: token ids in, response ids out (a KV cache carries the prefix);
* :class:`ILQLGenerator`: text in, text out (``rlhfkit chat DIR --ilql-beta B``);
* :class:`ILQLEngine`: a :class:`~rlhfkit.generation.rollout.RolloutEngine`, so :func:`make_rollout` and
  ``rlhfkit eval`` sample an ILQL output as they sample any policy;
* :func:`ilql_response_logps`: the log-probs of the policy that sampled, in one forward (eval's KL).

As TRLX's ``AutoModelForCausalLMWithILQLHeads.generate`` (``trlx/models/modeling_ilql.py``): the target heads'
minimum, top-k, then the temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.generation.fast_decode import CACHE_ARG
from rlhfkit.generation.rollout import GenerationOptions, Prompt, encode_prompts, inverse_cdf_draw
from rlhfkit.losses import ilql_logits, top_k_mask
from rlhfkit.modeling import models
from rlhfkit.modeling.forward import position_ids_from_mask
from rlhfkit.modeling.ilql_heads import ILQLHeads, load_ilql


@dataclass
class ILQLDecodeOptions:
    """ILQL decoding settings (:func:`ilql_generate_ids`)."""

    beta: float = 1.0
    """Advantage weight: logits = log pi_beta + beta (min Qhat - V); 0 samples the behaviour-cloned LM."""
    top_k: int = 20
    """Keep the k best perturbed logits (TRLX's default 20); 0 keeps all."""
    temperature: float = 1.0
    """Softmax temperature after the perturbation; 0: greedy."""
    max_new_tokens: int = 64
    """Tokens to generate at most (generation also stops at EOS)."""


def base_model(lm):
    """The underlying transformers model (unwraps peft)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


@torch.no_grad()
def ilql_generate_ids(
    lm,
    heads: ILQLHeads,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    options: ILQLDecodeOptions,
    *,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample responses with ILQL's perturbed policy: at each step ``top_k(log pi_beta + beta (min Qhat - V))``,
    divided by the temperature, softmaxed and sampled (greedy at temperature 0); a KV cache carries the prefix.

    Shapes: ``query_ids`` / ``query_mask`` (B, P), left-padded, mask True on real tokens -> response ids (B, R),
    ``pad_token_id`` after each row's first EOS. ``generator`` (a CPU generator) seeds the draws (None: torch's
    global CPU RNG, so a caller's ``torch.manual_seed`` seeds them), so a seed gives the same tokens on any
    device up to the models' numerics.
    """
    from transformers import DynamicCache

    base = base_model(lm)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    device = next(lm.parameters()).device
    ids = query_ids.to(device)
    mask = query_mask.long().to(device)
    positions = position_ids_from_mask(mask)
    cache = DynamicCache()
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    tokens = []
    was_training = lm.training
    lm.eval()  # no dropout while decoding; the mode is put back below
    for _ in range(options.max_new_tokens):
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, CACHE_ARG: cache}
        hidden = decoder(**inputs, use_cache=True).last_hidden_state[:, -1]
        q, v = heads.decode_values(hidden.to(next(heads.parameters()).dtype))
        scores = top_k_mask(ilql_logits(head(hidden), q, v, options.beta), options.top_k)
        if options.temperature > 0:
            # rlhfkit's inverse-CDF draw (one uniform per row, from a CPU generator whatever the device)
            probs = torch.softmax(scores / options.temperature, dim=-1)
            u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator).to(device)
            token = inverse_cdf_draw(probs, u).squeeze(-1)
        else:
            token = scores.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        finished |= token == eos_token_id
        if bool(finished.all()):
            break
        ids = token.unsqueeze(-1)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        positions = positions[:, -1:] + 1
    lm.train(was_training)
    if not tokens:
        return torch.zeros((ids.shape[0], 0), dtype=torch.long)
    return torch.stack(tokens, dim=1).cpu()


@torch.no_grad()
def ilql_response_logps(
    lm,
    heads: ILQLHeads,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_ids: torch.Tensor,
    *,
    beta: float,
    top_k: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs of the response tokens under the ILQL policy :func:`ilql_generate_ids` samples from:
    ``log_softmax(top_k(log pi_beta + beta (min Qhat - V)) / temperature)`` at each response position, in one
    forward over the whole sequence.

    The sampled token is in the top k by construction; a whole-sequence forward can differ from the cached decode
    in the last bits, so the taken token is always kept (a token tied at the k-th value must not get -inf).

    Shapes: ``input_ids`` / ``attention_mask`` (B, P + R) (left-padded query, right-padded response),
    ``response_ids`` (B, R) -> (B, R) fp32; positions after a row's end are not meaningful (mask them).
    """
    base = base_model(lm)
    device = next(lm.parameters()).device
    mask = attention_mask.long().to(device)
    hidden = (
        base.get_decoder()(
            input_ids=input_ids.to(device), attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        )
        .last_hidden_state[:, -response_ids.shape[1] - 1 : -1]
        .contiguous()
    )  # (B, R, hidden): the state before each response token
    q, v = heads.decode_values(hidden.to(next(heads.parameters()).dtype))
    scores = ilql_logits(base.get_output_embeddings()(hidden), q, v, beta)
    taken = response_ids.to(device).unsqueeze(-1)
    kept = top_k_mask(scores, top_k).scatter(-1, taken, scores.gather(-1, taken))
    return torch.log_softmax(kept / temperature, dim=-1).gather(-1, taken).squeeze(-1).float().cpu()


class ILQLGenerator:
    """Text in, text out with ILQL decoding (as :class:`rlhfkit.generation.rollout.HFGenerator` for a plain LM)."""

    def __init__(self, lm, heads: ILQLHeads, tokenizer, *, chat_template: bool = True):
        self.lm, self.heads, self.tokenizer, self.chat_template = lm, heads, tokenizer, chat_template

    @classmethod
    def from_dir(cls, path: str | Path, *, chat_template: bool = True) -> ILQLGenerator:
        lm, heads = load_ilql(path)
        return cls(lm, heads, models.load_tokenizer(str(path)), chat_template=chat_template)

    def generate(self, prompts: list[Prompt], options: ILQLDecodeOptions, *, seed: int | None = None) -> list[str]:
        """One response per prompt (text after the prompt, special tokens removed)."""
        ids, mask = encode_prompts(self.tokenizer, prompts, chat_template=self.chat_template)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        tok = self.tokenizer
        response = ilql_generate_ids(
            self.lm,
            self.heads,
            ids,
            mask,
            options,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            generator=generator,
        )
        return tok.batch_decode(response, skip_special_tokens=True)


class ILQLEngine:
    """A :class:`~rlhfkit.generation.rollout.RolloutEngine` that samples an ILQL policy: ``beta`` and ``top_k`` are
    the engine's, the temperature and length each call's :class:`GenerationOptions`. Draws come from torch's
    global CPU RNG (as with :class:`~rlhfkit.generation.rollout.HFEngine`, a ``torch.manual_seed`` before the call
    seeds them). ``precision``: the autocast while decoding."""

    def __init__(self, lm, heads: ILQLHeads, tokenizer, *, beta: float, top_k: int, precision: str = "fp32"):
        self.lm, self.heads, self.tokenizer = lm, heads, tokenizer
        self.beta, self.top_k, self.precision = beta, top_k, precision

    def load_weights(self, model) -> None:
        self.lm = model

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
        if options.top_p < 1.0:
            # ILQL truncates its perturbed distribution by top-k (TRLX's decoding); a top-p on top would be a
            # policy no ILQL run describes
            raise ValueError(f"ILQL decoding keeps the top {self.top_k} tokens and takes no top_p (got {options.top_p})")
        decode = ILQLDecodeOptions(
            beta=self.beta, top_k=self.top_k, temperature=options.temperature, max_new_tokens=options.max_new_tokens
        )
        tok = self.tokenizer
        with models.autocast(next(self.lm.parameters()).device, self.precision):
            return ilql_generate_ids(
                self.lm, self.heads, query_ids, query_mask, decode, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
            )
