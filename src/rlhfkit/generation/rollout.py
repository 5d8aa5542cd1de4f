"""Generation from a policy: text for ``rlhfkit chat``/``sample``, typed rollouts for RL.

An *engine* turns prompt token ids into response token ids. :class:`HFEngine`
wraps transformers ``generate`` (batched, KV cache, left padding); a vLLM engine
implements the same :class:`RolloutEngine` protocol (``generate`` +
``load_weights``) for GPUs. :func:`make_rollout` then builds a :class:`Rollout`
record, the one structure every RL trainer consumes.

Sequence layout of a rollout (B sequences):

    [ pad pad q q q q | r r r EOS pad pad ]
      query (B, P), left-padded   response (B, R), right-padded after EOS

Position ids count real tokens only (``cumsum(attention_mask) - 1``), so left
padding does not shift positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch

from rlhfkit.generation.fast_decode import (
    CACHE_ARG,
    common_start_first,
    decoding_cache,
    lean_decode_steps,
    output_cache,
    prepacked_linears,
    shared_prefix_cache,
)
from rlhfkit.losses import top_p_mask
from rlhfkit.modeling import models
from rlhfkit.modeling.forward import position_ids_from_mask as position_ids_from_mask  # moved; still importable here

Messages = list[dict[str, str]]
Prompt = str | Messages


@dataclass
class GenerationOptions:
    """Sampling settings."""

    max_new_tokens: int = 64
    """Tokens to generate at most (generation also stops at EOS)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 disables it)."""


def render_prompt(tokenizer, prompt: Prompt, *, chat_template: bool = True) -> str:
    """Prompt text: a string becomes one user turn, rendered with the chat template plus
    the generation prompt; a message list is rendered as is; ``chat_template=False``
    leaves a string untouched."""
    if isinstance(prompt, str):
        if not chat_template:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: list[Prompt], *, chat_template: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask, shapes (B, P); mask True on real tokens."""
    texts = [render_prompt(tokenizer, p, chat_template=chat_template) for p in prompts]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = True
    return ids, mask


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens (up to and including the first EOS), and whether EOS came.

    Shapes: (B, R) -> ``mask`` (B, R) bool, ``has_eos`` (B,) bool.
    """
    is_eos = response_ids == eos_token_id
    # Tokens strictly after the first EOS are padding.
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~after_eos, is_eos.any(-1)


class RolloutEngine(Protocol):
    """What produces response tokens; HF ``generate`` here, vLLM on GPUs.

    Optionally, an engine whose sampler is not the trainer's own forward (vLLM) also keeps, after each
    ``generate``, an attribute ``last_logprobs``: the log-probs its sampler gave the returned tokens, a (B, R)
    float32 tensor aligned with the response ids (0.0 at padding, NaN at a token it gave none for). An engine
    without the attribute (:class:`HFEngine`, whose samples come from the trainer's weights), or with it None,
    has none; :func:`make_rollout` reads it into :attr:`Rollout.sampler_logps`. Likewise ``last_action_mask``: the
    bit-packed (B, R, ceil(V / 8)) uint8 masks of the tokens its sampler could draw at each response position
    (:class:`HFEngine` with a :class:`TopPMasking`, NLPO), read into :attr:`Rollout.action_mask`.
    """

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
        """Response token ids (B, R), right-padded with EOS/pad after the first EOS."""

    def load_weights(self, model) -> None:
        """Refresh the engine's weights from the trained policy."""


class InverseCDFSampler:
    """Samples the next token from ``softmax(logits / temperature)`` (optionally top-p), as a logits processor.

    Returns logits that are 0 at the sampled token and -inf elsewhere, so
    ``generate``'s greedy step picks it. Why not ``do_sample=True``: its
    ``torch.multinomial`` draws an exponential variate for every vocabulary entry
    of every row, single-threaded on CPU: about a quarter of each decode step for
    SmolLM2 (see benchmarks/README.md, "Design measurements"). Inverse-CDF sampling needs one uniform per row and a
    cumulative sum (:func:`inverse_cdf_draw`): ``token = min{i : cdf_i > u * cdf_V}``, u ~ U[0, 1), which
    draws token i with probability p_i (tokens with p_i = 0 never: ``cdf`` does not
    grow there and the search takes the first index strictly above ``u``).
    Uses torch's global RNG, like ``do_sample``.
    """

    def __init__(self, temperature: float, top_p: float = 1.0):
        if temperature <= 0:
            raise ValueError("InverseCDFSampler needs temperature > 0 (use greedy decoding for 0)")
        self.temperature, self.top_p = temperature, top_p
        self.batch: int | None = None
        """Rows of the whole batch, when ``rows`` is set."""
        self.rows: torch.Tensor | None = None
        """Which rows of a batch of ``batch`` the scores' rows are (:meth:`HFEngine.generate` drops finished rows):
        each step still draws one uniform per row of the whole batch and uses those of ``rows``, so the random
        stream, and with it every row's tokens, is the one decoding the whole batch would use."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() if self.temperature == 1.0 else scores.float() / self.temperature
        probs = torch.softmax(scores, dim=-1)  # (B, V)
        order = None
        if self.top_p < 1.0:
            # Nucleus (Holtzman et al. 2020): the smallest set of most likely tokens with mass >= top_p.
            probs, order = probs.sort(dim=-1, descending=True)
            before = probs.cumsum(-1) - probs  # mass of the more likely tokens
            probs = torch.where(before < self.top_p, probs, 0.0)
        if self.rows is None:
            u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device)
        else:
            u = torch.rand(self.batch, 1, dtype=torch.float64, device=probs.device)[self.rows]
        token = inverse_cdf_draw(probs, u)
        if order is not None:
            token = order.gather(1, token)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


def inverse_cdf_draw(probs: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``min{i : cdf_i > u * cdf_V}`` per row of ``probs`` (B, V), u (B, 1) in [0, 1): the inverse-CDF draw, in two levels.

    A cumulative sum runs along a row one element after another; over a whole vocabulary it took
    about a tenth of a decode step (see benchmarks/README.md, "Design measurements"). So the vocabulary is cut into
    blocks of ``block``: the blocks' masses (a vectorised sum) and their running total pick
    the block, then one block's cumulative sum picks the token. The same token as one long
    cumulative sum up to fp64 rounding at the boundaries; a zero-probability token is never
    drawn (the search takes the first index strictly above the target, and the pick within a
    block is capped at the block's last token with positive probability). Returns (B, 1) int64.
    """
    rows, vocab = probs.shape
    # F.pad copies even when it adds nothing (SmolLM2: 49,152 = 192 x 256; 0.6 ms a decode step at 128 rows).
    padded = probs if vocab % block == 0 else torch.nn.functional.pad(probs, (0, -vocab % block))
    blocks = padded.reshape(rows, -1, block)
    mass = blocks.sum(-1, dtype=torch.float64)  # (B, nb)
    cdf = mass.cumsum(-1)
    target = u.to(torch.float64) * cdf[:, -1:]
    b = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[1] - 1)  # (B, 1)
    inner = blocks.gather(1, b[:, :, None].expand(-1, 1, block))[:, 0]  # (B, block)
    before = cdf.gather(1, b) - mass.gather(1, b)
    t = torch.searchsorted(inner.double().cumsum(-1), target - before, right=True)
    last = torch.where(inner > 0, torch.arange(block, device=probs.device), -1).amax(-1, keepdim=True)
    return b * block + torch.minimum(t, last)


def pack_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """A vocabulary mask in one bit per token: (..., V) bool -> (..., ceil(V / 8)) uint8, token ``v`` in bit
    ``v % 8`` of byte ``v // 8``. A rollout's NLPO masks (B, R, V) would take a byte per token; this an eighth."""
    vocab = mask.shape[-1]
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, -vocab % 8)).unflatten(-1, (-1, 8))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_token_mask(packed: torch.Tensor, vocab: int) -> torch.Tensor:
    """The inverse of :func:`pack_token_mask`: (..., ceil(V / 8)) uint8 -> (..., V) bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & 1).bool().flatten(-2)[..., :vocab]


@dataclass
class TopPMasking:
    """NLPO's action mask for :class:`HFEngine` (Ramamurthy et al. 2022): at each step the policy samples only among
    the top-p tokens of the masking policy, at the sampling temperature."""

    model: torch.nn.Module
    """The masking policy: a frozen causal LM with the policy's vocabulary (NLPO: a periodically refreshed copy)."""
    top_p: float
    """The nucleus each step keeps (:func:`rlhfkit.losses.top_p_mask`)."""


class TopPMaskProcessor:
    """A logits processor: -inf outside the masking policy's top-p set of the same step, and that set recorded.

    Runs before the sampler, so :class:`InverseCDFSampler` (or greedy decoding) draws from the policy's distribution
    renormalised over the kept tokens. The masking policy decodes alongside the policy with a KV cache of its own
    (transformers makes a ``DynamicCache`` on the first call): the first call runs the whole query, each later
    one only the token the last step appended, so it costs one decode step of the masking model per step, not a
    forward over the whole sequence. Its inputs are the rows ``generate`` decodes (``query_mask`` is their query
    mask, as :func:`common_start_first` left it, then 1 for every generated token, as ``generate`` extends its own)
    with positions counting real tokens only, as every rlhfkit forward. ``masks`` holds each step's mask, packed
    (:func:`pack_token_mask`), so the trainer computes its log-probs under the very masks that were sampled from
    (stored as sb3-contrib's maskable PPO and RL4LMs store theirs in the rollout buffer), not under a recomputation
    that rounding could move at the edge of the nucleus.
    """

    def __init__(self, model: torch.nn.Module, query_mask: torch.Tensor, *, top_p: float, temperature: float = 1.0):
        self.model, self.top_p, self.temperature = model, top_p, temperature
        self.attention = query_mask.long()
        self.cache = None
        self.seen = 0  # columns of the rows the masking model has run
        self.masks: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        grown = input_ids.shape[1] - self.attention.shape[1]
        if grown > 0:
            self.attention = torch.cat([self.attention, self.attention.new_ones(self.attention.shape[0], grown)], dim=1)
        positions = position_ids_from_mask(self.attention)
        out = self.model(
            input_ids=input_ids[:, self.seen :],
            attention_mask=self.attention,
            position_ids=positions[:, self.seen :],
            use_cache=True,
            logits_to_keep=1,
            **{CACHE_ARG: self.cache},
        )
        self.cache, self.seen = output_cache(out), input_ids.shape[1]
        keep = top_p_mask(out.logits[:, -1].float() / self.temperature, self.top_p)
        self.masks.append(pack_token_mask(keep))
        return scores.masked_fill(~keep, float("-inf"))


COMPACT_EVERY = 8
"""Tokens :class:`HFEngine` decodes between drops of the rows that finished (``HFEngine._decode``); 0 keeps every row
to the end, as plain ``generate`` does."""


class HFEngine:
    """transformers ``generate`` on the live policy (no copy, so ``load_weights`` is a no-op).

    ``precision`` is the autocast used while decoding (bf16: about 2x faster decoding
    than fp32 on CPUs with avx512-bf16, see benchmarks/README.md, "Design measurements"; the weight casts
    are cached for the whole ``generate`` call; on CPU the bf16 matmuls run on
    :func:`prepacked_linears`). Repeated queries (k samples per prompt) share
    one prefill, and the start all queries share (a system prompt) runs once
    (:func:`common_start_first`, :func:`shared_prefix_cache`); the KV cache keeps its keys and
    values in the decoding dtype with room reserved for the new tokens
    (:func:`decoding_cache`: about 10% faster, same tokens). Sampling goes through
    :class:`InverseCDFSampler`, greedy decoding through ``generate``'s argmax. Every ``compact_every`` tokens the
    rows that finished leave the batch (``_decode``; 0 keeps them to the end). With ``masking`` (NLPO) a
    :class:`TopPMaskProcessor` restricts every step to the masking policy's top-p set first, and the steps' masks
    are kept in ``last_action_mask`` (see :class:`RolloutEngine`); its rows are never dropped.
    """

    compact_every: int = COMPACT_EVERY
    """Tokens decoded between drops of the finished rows (0: none). A class default, so that a caller that counts
    ``generate`` calls (the benchmarks against TRL, one call per rollout) can set it for every engine a trainer makes."""

    def __init__(
        self, model, tokenizer, *, precision: str = "fp32", masking: TopPMasking | None = None, compact_every: int | None = None
    ):
        self.model, self.tokenizer, self.precision, self.masking = model, tokenizer, precision, masking
        if compact_every is not None:
            self.compact_every = compact_every
        self.last_action_mask: torch.Tensor | None = None

    def load_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
        from transformers import LogitsProcessorList

        tok = self.tokenizer
        device = next(self.model.parameters()).device
        # Greedy decoding of the logits our sampler leaves: exactly its sampled token.
        kwargs = dict(
            max_new_tokens=options.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            # transformers turns on synced_gpus (an all-reduce per decode step) when it sees an FSDP or ZeRO-3 module;
            # rlhfkit generates only with whole parameters (training.sharding.whole_parameters), often on one process
            # alone (the probe), where those all-reduces would wait for the others forever.
            synced_gpus=False,
        )
        was_training = self.model.training
        self.model.eval()
        query_ids, query_mask, start = common_start_first(query_ids.to(device), query_mask.long().to(device))
        masker = None
        if self.masking is not None:
            temperature = options.temperature if options.temperature > 0 else 1.0
            masker = TopPMaskProcessor(self.masking.model, query_mask, top_p=self.masking.top_p, temperature=temperature)
        processors: list = [] if masker is None else [masker]
        sampler = InverseCDFSampler(options.temperature, options.top_p) if options.temperature > 0 else None
        if sampler is not None:
            processors.append(sampler)
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        packed = prepacked_linears(self.model, query_ids.shape[0]) if self.precision == "bf16" else contextlib.nullcontext()
        dtype = models.PRECISION_DTYPES.get(self.precision, next(self.model.parameters()).dtype)
        # NLPO's masker keeps each step's masks for the whole batch, and a generation config's minimum length would
        # apply to each call anew: then no row is dropped.
        config = getattr(self.model, "generation_config", None)
        minimum = getattr(config, "min_new_tokens", None) or getattr(config, "min_length", 0)
        chunk = self.compact_every if self.compact_every > 0 and masker is None and not minimum else options.max_new_tokens
        with models.autocast(device, self.precision), packed, lean_decode_steps(self.model):
            cache = decoding_cache(self.model, dtype, reserve=options.max_new_tokens)
            shared = shared_prefix_cache(self.model, query_ids, query_mask, cache, start)
            response = self._decode(query_ids, query_mask, cache if shared is None else shared, kwargs, chunk, sampler)
        self.model.train(was_training)
        self.last_action_mask = torch.stack(masker.masks, dim=1).cpu() if masker is not None and masker.masks else None
        # Anything after the first EOS becomes EOS/pad so masks are exact.
        mask, _ = response_mask_from_ids(response, tok.eos_token_id)
        return torch.where(mask, response, torch.full_like(response, tok.pad_token_id)).cpu()

    def _decode(self, ids, mask, cache, kwargs: dict, chunk: int, sampler: InverseCDFSampler | None) -> torch.Tensor:
        """Response ids (B, steps): ``generate`` ``chunk`` tokens at a time, dropping the rows that finished.

        ``generate`` steps every row until the last one ends, so a row that stopped early still costs a full
        row of every matmul: in the demo's batches of SmolLM2 samples (64 tokens at most) 10-17% of the row-steps.
        Between chunks the rows that produced EOS leave the batch and its KV cache (``batch_select_indices``), and
        the next ``generate`` continues the others from the cache (it runs only their last token). The sampler
        draws the whole batch's uniforms each step (:attr:`InverseCDFSampler.rows`), so each row gets the tokens
        decoding the whole batch would give it, up to the matmuls' rounding on fewer rows.
        """
        tok, max_new = self.tokenizer, kwargs["max_new_tokens"]
        rows = torch.arange(ids.shape[0], device=ids.device)  # the original rows still decoding
        response = torch.full((ids.shape[0], max_new), tok.pad_token_id, dtype=ids.dtype, device=ids.device)
        if sampler is not None:
            sampler.batch, sampler.rows = ids.shape[0], None
        done = 0
        while True:
            asked = min(chunk, max_new - done)
            out = self.model.generate(input_ids=ids, attention_mask=mask, **{**kwargs, "max_new_tokens": asked, CACHE_ARG: cache})
            new = out[:, ids.shape[1] :]
            response[rows, done : done + new.shape[1]] = new
            done += new.shape[1]
            finished = (new == tok.eos_token_id).any(-1)
            # generate stopped short of `asked` only where every row ended (or a stopping rule of its own fired)
            if done >= max_new or new.shape[1] < asked or bool(finished.all()):
                return response[:, :done]
            ids, mask = out, torch.cat([mask, mask.new_ones(new.shape)], dim=1)
            if bool(finished.any()):
                keep = (~finished).nonzero()[:, 0]
                cache.batch_select_indices(keep)
                ids, mask, rows = ids[keep], mask[keep], rows[keep]
                if sampler is not None:
                    sampler.rows = rows


class HFGenerator:
    """Text in, text out: batched sampling for ``rlhfkit chat`` and ``rlhfkit sample``."""

    def __init__(self, model, tokenizer, *, precision: str = "fp32", chat_template: bool = True):
        models.set_attention(model)  # rlhfkit's kernel: decode steps take the lean forward (lean_decode_steps)
        self.engine = HFEngine(model, tokenizer, precision=precision)
        self.tokenizer, self.chat_template = tokenizer, chat_template

    def generate(self, prompts: list[Prompt], options: GenerationOptions) -> list[str]:
        """One completion per prompt (text after the prompt, special tokens removed)."""
        ids, mask = encode_prompts(self.tokenizer, prompts, chat_template=self.chat_template)
        response = self.engine.generate(ids, mask, options)
        return self.tokenizer.batch_decode(response, skip_special_tokens=True)


@dataclass
class Rollout:
    """A batch of sampled responses and everything RL needs about them.

    ``B`` sequences (prompts x samples per prompt, grouped: the samples of prompt
    ``i`` are rows ``i*k .. i*k+k-1``), ``P`` prompt width, ``R`` response width.
    """

    prompts: list[Prompt]
    """(B,) the prompt of each row."""
    responses: list[str]
    """(B,) decoded response text (special tokens removed)."""
    query_ids: torch.Tensor
    """(B, P) prompt ids, left-padded."""
    query_mask: torch.Tensor
    """(B, P) True on real prompt tokens."""
    response_ids: torch.Tensor
    """(B, R) response ids, right-padded after the first EOS."""
    response_mask: torch.Tensor
    """(B, R) True on response tokens up to and including the first EOS."""
    has_eos: torch.Tensor
    """(B,) True if the response ended with EOS (False: truncated at max_new_tokens)."""
    temperature: float
    """Sampling temperature; log-probs are of softmax(logits / temperature)."""
    sampler_logps: torch.Tensor | None = None
    """(B, R) float32 log-probs the engine's own sampler gave the response tokens (vLLM: ``last_logprobs``, see
    :class:`RolloutEngine`), 0.0 at padding, NaN where it gave none; None when the trainer's weights sampled them."""
    action_mask: torch.Tensor | None = None
    """(B, R, ceil(V / 8)) uint8, the tokens the sampler could draw at each response position, one bit per token
    (:func:`pack_token_mask`; NLPO's masking-policy top-p sets, :class:`TopPMaskProcessor`); None: every token."""

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + R) prompt and response."""
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + R) True on real tokens."""
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) response lengths in tokens (EOS included)."""
        return self.response_mask.sum(-1)

    def select(self, rows: list[int] | torch.Tensor) -> Rollout:
        """The sub-batch of the given rows."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        idx = rows.tolist()
        return Rollout(
            prompts=[self.prompts[i] for i in idx],
            responses=[self.responses[i] for i in idx],
            query_ids=self.query_ids[rows],
            query_mask=self.query_mask[rows],
            response_ids=self.response_ids[rows],
            response_mask=self.response_mask[rows],
            has_eos=self.has_eos[rows],
            temperature=self.temperature,
            sampler_logps=None if self.sampler_logps is None else self.sampler_logps[rows],
            action_mask=None if self.action_mask is None else self.action_mask[rows],
        )


def make_rollout(
    engine: RolloutEngine,
    tokenizer,
    prompts: list[Prompt],
    options: GenerationOptions,
    *,
    samples_per_prompt: int = 1,
    chat_template: bool = True,
) -> Rollout:
    """Sample ``samples_per_prompt`` responses per prompt (rows grouped by prompt); the engine's sampler log-probs,
    if it keeps any (``last_logprobs``, :class:`RolloutEngine`), become :attr:`Rollout.sampler_logps`, and its
    action masks (``last_action_mask``) :attr:`Rollout.action_mask`."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    query_ids, query_mask = encode_prompts(tokenizer, repeated, chat_template=chat_template)
    response_ids = engine.generate(query_ids, query_mask, options)
    sampler_logps = getattr(engine, "last_logprobs", None)
    if sampler_logps is not None:
        if sampler_logps.shape != response_ids.shape:
            raise ValueError(f"the engine's log-probs {tuple(sampler_logps.shape)} != its responses {tuple(response_ids.shape)}")
        sampler_logps = sampler_logps.float().cpu()
    action_mask = getattr(engine, "last_action_mask", None)
    if action_mask is not None and action_mask.shape[:2] != response_ids.shape:
        raise ValueError(f"the engine's action masks {tuple(action_mask.shape)} != its responses {tuple(response_ids.shape)}")
    if response_ids.shape[1] == 0:  # nothing generated at all: keep one (masked) column
        response_ids = torch.full((len(repeated), 1), tokenizer.pad_token_id, dtype=torch.long)
        sampler_logps = None if sampler_logps is None else torch.zeros(response_ids.shape)
        if action_mask is not None:
            action_mask = action_mask.new_zeros((*response_ids.shape, action_mask.shape[-1]))
        response_mask, has_eos = torch.zeros_like(response_ids, dtype=torch.bool), torch.zeros(len(repeated), dtype=torch.bool)
    else:
        response_mask, has_eos = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(torch.where(response_mask, response_ids, tokenizer.pad_token_id), skip_special_tokens=True)
    return Rollout(
        prompts=repeated,
        responses=[t.strip() for t in texts],
        query_ids=query_ids,
        query_mask=query_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        has_eos=has_eos,
        temperature=options.temperature if options.temperature > 0 else 1.0,
        sampler_logps=sampler_logps,
        action_mask=action_mask,
    )
