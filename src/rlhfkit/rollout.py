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

from rlhfkit import models

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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only (0 on left padding). Shape (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens (up to and including the first EOS), and whether EOS came.

    Shapes: (B, R) -> ``mask`` (B, R) bool, ``has_eos`` (B,) bool.
    """
    is_eos = response_ids == eos_token_id
    # Tokens strictly after the first EOS are padding.
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~after_eos, is_eos.any(-1)


class RolloutEngine(Protocol):
    """What produces response tokens; HF ``generate`` here, vLLM on GPUs."""

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

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() if self.temperature == 1.0 else scores.float() / self.temperature
        probs = torch.softmax(scores, dim=-1)  # (B, V)
        order = None
        if self.top_p < 1.0:
            # Nucleus (Holtzman et al. 2020): the smallest set of most likely tokens with mass >= top_p.
            probs, order = probs.sort(dim=-1, descending=True)
            before = probs.cumsum(-1) - probs  # mass of the more likely tokens
            probs = torch.where(before < self.top_p, probs, 0.0)
        token = inverse_cdf_draw(probs, torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device))
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
    blocks = torch.nn.functional.pad(probs, (0, -vocab % block)).view(rows, -1, block)
    mass = blocks.sum(-1, dtype=torch.float64)  # (B, nb)
    cdf = mass.cumsum(-1)
    target = u.to(torch.float64) * cdf[:, -1:]
    b = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[1] - 1)  # (B, 1)
    inner = blocks.gather(1, b[:, :, None].expand(-1, 1, block))[:, 0]  # (B, block)
    before = cdf.gather(1, b) - mass.gather(1, b)
    t = torch.searchsorted(inner.double().cumsum(-1), target - before, right=True)
    last = torch.where(inner > 0, torch.arange(block, device=probs.device), -1).amax(-1, keepdim=True)
    return b * block + torch.minimum(t, last)


SIBLING_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Names of linears that a module calls one after another on the same input (Llama-style attention and MLP)."""


@contextlib.contextmanager
def prepacked_linears(model, rows: int, *, fuse: bool = True):
    """Inside this block, the model's ``nn.Linear`` layers run oneDNN bf16 matmuls on pre-packed weights.

    For bf16 decoding on CPU: each decode step multiplies a few rows (one per
    sequence) by every weight, and an ordinary ``F.linear`` re-lays the weight out
    into oneDNN's blocked format on every call; here that happens once per block
    (``rows`` is the batch-size hint the layout is chosen for), which makes bf16
    decoding about 10% faster (see benchmarks/README.md, "Design measurements"). The
    weights are a snapshot taken on entry (no gradient), so use it around one
    ``generate`` call. A no-op where oneDNN has no bf16 path (CUDA, older CPUs).

    With ``fuse``, siblings (:data:`SIBLING_LINEARS`, children of one module with
    the same input size) share one matmul on their concatenated weights: the first
    sibling computes all their outputs and keeps the others' for them (3 matmuls
    fewer per layer: a few percent faster, and the same tokens). A sibling takes a kept output only
    when called with the very tensor the first one got (``is``, and the kept
    reference holds that tensor alive, so its identity cannot be reused); called on
    anything else it multiplies by its own packed weight (packed the first time it
    is needed), so results never depend on the call order.
    """
    # Exactly nn.Linear with float weights: not quantized subclasses (int8 weights are not bf16 values).
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype.is_floating_point]
    usable = (
        linears
        and linears[0].weight.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    if not usable:
        yield
        return
    linear_pointwise = torch.ops.mkldnn._linear_pointwise

    def packed(weight: torch.Tensor, bias: torch.Tensor | None):
        weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16), rows)
        bias = bias.to(torch.bfloat16) if bias is not None else None
        return lambda flat: linear_pointwise(flat, weight, bias, "none", [], "")

    def plain_forward(matmul):
        def forward(x: torch.Tensor) -> torch.Tensor:
            return matmul(x.reshape(-1, x.shape[-1]).to(torch.bfloat16)).reshape(*x.shape[:-1], -1)

        return forward

    def first_forward(matmul, sizes: list[int], kept: dict):
        def forward(x: torch.Tensor) -> torch.Tensor:
            parts = matmul(x.reshape(-1, x.shape[-1]).to(torch.bfloat16)).split(sizes, dim=-1)
            kept.update(input=x, parts=list(parts))
            return parts[0].reshape(*x.shape[:-1], -1)

        return forward

    def sibling_forward(i: int, layer: torch.nn.Linear, kept: dict):
        own = []  # its own packed weight, made on first use (in order, siblings never need it)

        def forward(x: torch.Tensor) -> torch.Tensor:
            if kept.get("input") is x and kept["parts"][i] is not None:
                part, kept["parts"][i] = kept["parts"][i], None
                if all(p is None for p in kept["parts"][1:]):
                    kept.clear()
                return part.reshape(*x.shape[:-1], -1)
            if not own:
                with torch.no_grad():
                    own.append(plain_forward(packed(layer.weight, layer.bias)))
            return own[0](x)

        return forward

    with torch.no_grad():
        done = set()
        if fuse:
            for parent in model.modules():
                for names in SIBLING_LINEARS:
                    group = [getattr(parent, n, None) for n in names]
                    if not all(type(m) is torch.nn.Linear and m in linears and m not in done for m in group):
                        continue
                    if len({m.in_features for m in group}) > 1 or len({m.bias is None for m in group}) > 1:
                        continue
                    bias = None if group[0].bias is None else torch.cat([m.bias for m in group])
                    fused = packed(torch.cat([m.weight for m in group]), bias)
                    kept: dict = {}
                    group[0].forward = first_forward(fused, [m.out_features for m in group], kept)
                    group[0].packed_siblings = fused  # (N, in) bf16 -> (N, sum of the siblings' out): for lean_decode_steps
                    for i, m in enumerate(group[1:], start=1):
                        m.forward = sibling_forward(i, m, kept)
                    done.update(group)
        for m in linears:
            if m not in done:
                m.forward = plain_forward(packed(m.weight, m.bias))
    try:
        yield
    finally:
        for m in linears:
            del m.forward  # back to the class's forward
            m.__dict__.pop("packed_siblings", None)


LEAN_DECODE_LAYERS = ("LlamaDecoderLayer",)
"""Decoder-layer classes :func:`lean_decode_steps` knows (pre-norm RMSNorm, rotary attention, SiLU-gated MLP)."""


@contextlib.contextmanager
def lean_decode_steps(model):
    """Inside this block, one-token decode steps of Llama decoder layers run a shorter forward on CPU.

    The same computation as transformers' layer (RMSNorm, q/k/v projections,
    rotary embedding, cache update, attention, o projection, residual, RMSNorm,
    SiLU-gated MLP, residual), on the layer's own modules and cache, with less
    overhead per step: one fused ``rms_norm`` instead of eight ops, the rotation
    of q and k together as ``t * cos + roll(t) * (-sin, sin)`` instead of slicing,
    negating and concatenating halves of each, the q/k/v and gate/up products as
    one matmul each where :func:`prepacked_linears` packed them together, and no
    module calls or transformers keyword plumbing. Why: a decode step of 32 rows
    is a few ms of matmuls per layer, and the rest was per-call overhead; this
    forward runs fewer ops per step and decodes a few percent faster (see
    benchmarks/README.md, "Design measurements"). Only for :data:`LEAN_DECODE_LAYERS` with
    SiLU, no extra norms and rlhfkit's attention kernel (``models.set_attention``);
    prefill (more than one token) and every other layer run transformers'
    forward. Equal to it up to float rounding (tested: fp32 logits, and bf16
    hidden states on prepacked weights).
    """
    layers = [m for m in model.modules() if type(m).__name__ in LEAN_DECODE_LAYERS and _lean_decodable(m)]
    if not layers or next(model.parameters()).device.type != "cpu":
        yield
        return
    step: dict = {}  # the step's sin with its first half negated: made by the first layer, shared by the rest
    for layer in layers:
        layer.forward = _lean_decode_forward(layer, layer.forward, step)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _lean_decodable(layer) -> bool:
    """A layer whose decode step the lean forward computes: SiLU MLP, no extra norms, and rlhfkit's attention kernel
    (whose mask transformers builds as an additive float mask, the kind :func:`rlhfkit.packing.decode_attention` takes)."""
    from rlhfkit.packing import ATTENTION

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    parts = (attn, mlp, getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    return (
        all(p is not None for p in parts)
        and getattr(attn.config, "hidden_act", None) == "silu"
        and getattr(attn.config, "_attn_implementation", None) == ATTENTION
        and not any(hasattr(attn, n) for n in ("q_norm", "k_norm", "sinks"))
        and hasattr(layer.input_layernorm, "variance_epsilon")
    )


def _lean_decode_forward(layer, full_forward, step: dict):
    from rlhfkit.packing import decode_attention

    attn, mlp = layer.self_attn, layer.mlp
    norms = [(n.weight, n.variance_epsilon) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    heads, kv_heads, dim = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    o_proj, down_proj = attn.o_proj.forward, mlp.down_proj.forward
    qkv_packed, gate_up_packed = getattr(attn.q_proj, "packed_siblings", None), getattr(mlp.gate_proj, "packed_siblings", None)
    q_size, kv_size, inner = heads * dim, kv_heads * dim, mlp.gate_proj.out_features

    def attention_input(h):  # (B, hidden) -> q and k rotated (B, heads + kv_heads, dim), v (B, kv_heads, 1, dim)
        rows = h.shape[0]
        if qkv_packed is not None:  # one matmul on the concatenated weights (prepacked_linears)
            qkv = qkv_packed(h.to(torch.bfloat16))
            qk, v = qkv[:, : q_size + kv_size], qkv[:, q_size + kv_size :]
        else:
            qk, v = torch.cat([attn.q_proj.forward(h), attn.k_proj.forward(h)], dim=-1), attn.v_proj.forward(h)
        return qk.view(rows, heads + kv_heads, dim), v.view(rows, kv_heads, 1, dim)

    def mlp_forward(h):
        if gate_up_packed is not None:
            gate_up = gate_up_packed(h.to(torch.bfloat16))
            gate, up = gate_up[:, :inner], gate_up[:, inner:]
        else:
            gate, up = mlp.gate_proj.forward(h), mlp.up_proj.forward(h)
        return down_proj(torch.nn.functional.silu(gate) * up)

    def rms_norm(x, which: int):
        weight, eps = norms[which]
        return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)

    def forward(
        hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False, position_embeddings=None, **kwargs
    ):
        # Prefill, and a residual stream not in fp32 (transformers' norm computes in fp32 and casts back), take the full layer.
        if hidden_states.shape[1] != 1 or cache is None or position_embeddings is None or hidden_states.dtype != torch.float32:
            return full_forward(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        rows = hidden_states.shape[0]
        x = hidden_states[:, 0]  # (B, hidden)
        cos, sin = position_embeddings  # (B, 1, head_dim)
        if step.get("sin") is not sin:
            half = dim // 2
            step.update(sin=sin, signed_sin=torch.cat([-sin[..., :half], sin[..., half:]], dim=-1))
        qk, v = attention_input(rms_norm(x, 0))
        # rotate_half(t) * sin == roll(t, half) * (-sin_first_half, sin_second_half), q and k in one go
        qk = torch.addcmul(qk * cos, qk.roll(dim // 2, -1), step["signed_sin"])
        keys, values = cache.update(qk[:, heads:, None], v, attn.layer_idx)
        out = decode_attention(qk[:, :heads, None], keys, values, attention_mask, attn.scaling)  # (B, 1, heads, dim)
        x = x + o_proj(out.reshape(rows, heads * dim))
        x = x + mlp_forward(rms_norm(x, 1))
        return x[:, None]

    return forward


class _ReservedLayer:
    """Mixin for transformers' ``DynamicLayer``: keys/values kept in one ``dtype``, in a buffer with room to grow.

    ``DynamicLayer.update`` concatenates, copying the whole cache on every decode
    step (a 32-row SmolLM2 rollout: ~100 MB per step). Here a step writes its new
    token into reserved room and the layer's ``keys``/``values`` are views of the
    filled part. Under bf16 autocast the rotated keys come out of RoPE in fp32
    (its cos/sin follow the fp32 residual stream) and autocast cast the whole
    cached key to bf16 for attention on every step; stored as bf16 once, attention
    gets the very same bf16 values, so decoding is unchanged. Another method that
    replaces ``keys`` (reorder, crop, batch select) is followed by a fresh buffer
    at the next update.
    """

    dtype: torch.dtype
    reserve: int

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        key_states, value_states = key_states.to(self.dtype), value_states.to(self.dtype)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        buffers = getattr(self, "_buffers", None)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if buffers is None or self.keys is not self._views[0] or end > buffers[0].shape[-2]:
            shape = (*key_states.shape[:-2], end + self.reserve, key_states.shape[-1])
            buffers = self._buffers = tuple(torch.empty(shape, dtype=self.dtype, device=key_states.device) for _ in range(2))
            for buffer, old in zip(buffers, (self.keys, self.values)):
                if start:
                    buffer[..., :start, :].copy_(old)
        buffers[0][..., start:end, :].copy_(key_states)
        buffers[1][..., start:end, :].copy_(value_states)
        self._views = self.keys, self.values = buffers[0][..., :end, :], buffers[1][..., :end, :]
        return self.keys, self.values


def decoding_cache(model, dtype: torch.dtype, reserve: int):
    """A ``DynamicCache`` for ``model`` whose full-attention layers store ``dtype`` with room for ``reserve`` more tokens.

    See :class:`_ReservedLayer`; other layer kinds (sliding window, ...) stay as transformers makes them.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    global _RESERVED_DYNAMIC_LAYER
    if _RESERVED_DYNAMIC_LAYER is None:  # _layer_type None: not registered in transformers' layer-type mapping
        _RESERVED_DYNAMIC_LAYER = type("ReservedDynamicLayer", (_ReservedLayer, DynamicLayer), {"_layer_type": None})
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and not layer.is_initialized:
            cache.layers[i] = _RESERVED_DYNAMIC_LAYER()
            cache.layers[i].dtype, cache.layers[i].reserve = dtype, reserve
    return cache


_RESERVED_DYNAMIC_LAYER = None


def common_start_first(query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(ids, mask, n)``: left-padded queries re-laid out as ``[common start | padding | rest]``.

    ``n`` is the length of the start every query shares (a chat template's system
    prompt; each query keeps at least one token of its own), 0 if none. Attention
    masks the padding wherever it sits and positions count real tokens only
    (:func:`position_ids_from_mask`), so each query means the same; with the start
    in the same columns of every row its keys and values can be computed once
    (:func:`_shared_prefix_cache`), which makes a rollout with a shared system prompt
    several percent faster (see benchmarks/README.md, "Design measurements"). The same tokens in fp32; in bf16
    the start's keys come from a one-row product, so they can differ by a rounding
    and a sample diverge (greedy, 20 tokens: 30 of 32 rows the same, 32 of 32 in fp32).
    """
    from rlhfkit.packing import shared_prefix_len

    rows = [ids[m.bool()].tolist() for ids, m in zip(query_ids, query_mask)]
    n = shared_prefix_len(rows) if len(rows) > 1 else 0
    if n == 0:
        return query_ids, query_mask, 0
    ids, mask = query_ids.clone(), query_mask.clone()
    width = ids.shape[1]
    for b, row in enumerate(rows):
        pad = width - len(row)
        ids[b, :n], ids[b, n + pad :] = query_ids[b, pad : pad + n], query_ids[b, pad + n :]
        ids[b, n : n + pad] = query_ids[b, :pad]
        mask[b, :n], mask[b, n : n + pad], mask[b, n + pad :] = 1, 0, 1
    return ids, mask, n


def _shared_prefix_cache(model, query_ids: torch.Tensor, query_mask: torch.Tensor, cache=None, start: int = 0):
    """A KV cache of all but the last query token, with shared work done once.

    RL rollouts sample k responses per prompt, so the query batch holds each prompt
    k times; the prompt forward (prefill) is run for the distinct rows and the
    cache is then copied out to every row. The first ``start`` columns, the same in
    every row (:func:`common_start_first`), run once for all. ``generate``
    continues from the cache, running only the last query token for every row.
    ``None`` when there is nothing to share.
    """
    unique, inverse = torch.unique(torch.cat([query_ids, query_mask.long()], dim=1), dim=0, return_inverse=True)
    width = query_ids.shape[1]
    if (unique.shape[0] == query_ids.shape[0] and start == 0) or width < 2:
        return None
    ids, mask = unique[:, : width - 1], unique[:, width : 2 * width - 1]
    if start > 0:
        out = model(
            input_ids=ids[:1, :start],
            position_ids=torch.arange(start, device=ids.device)[None],
            use_cache=True,
            cache=cache,
            logits_to_keep=1,
        )
        cache = out.cache
        cache.reorder_cache(torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device))
    if width - 1 > start:
        out = model(
            input_ids=ids[:, start:],
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask)[:, start:],
            use_cache=True,
            cache=cache,
            logits_to_keep=1,
        )
        cache = out.cache
    cache.reorder_cache(inverse.to(ids.device))
    return cache


class HFEngine:
    """transformers ``generate`` on the live policy (no copy, so ``load_weights`` is a no-op).

    ``precision`` is the autocast used while decoding (bf16: about 2x faster decoding
    than fp32 on CPUs with avx512-bf16, see benchmarks/README.md, "Design measurements"; the weight casts
    are cached for the whole ``generate`` call; on CPU the bf16 matmuls run on
    :func:`prepacked_linears`). Repeated queries (k samples per prompt) share
    one prefill, and the start all queries share (a system prompt) runs once
    (:func:`common_start_first`, :func:`_shared_prefix_cache`); the KV cache keeps its keys and
    values in the decoding dtype with room reserved for the new tokens
    (:func:`decoding_cache`: about 10% faster, same tokens). Sampling goes through
    :class:`InverseCDFSampler`, greedy decoding through ``generate``'s argmax.
    """

    def __init__(self, model, tokenizer, *, precision: str = "fp32"):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision

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
        )
        if options.temperature > 0:
            kwargs["logits_processor"] = LogitsProcessorList([InverseCDFSampler(options.temperature, options.top_p)])
        was_training = self.model.training
        self.model.eval()
        query_ids, query_mask, start = common_start_first(query_ids.to(device), query_mask.long().to(device))
        packed = prepacked_linears(self.model, query_ids.shape[0]) if self.precision == "bf16" else contextlib.nullcontext()
        dtype = models.PRECISION_DTYPES.get(self.precision, next(self.model.parameters()).dtype)
        with models.autocast(device, self.precision), packed, lean_decode_steps(self.model):
            cache = decoding_cache(self.model, dtype, reserve=options.max_new_tokens)
            shared = _shared_prefix_cache(self.model, query_ids, query_mask, cache, start)
            kwargs["cache"] = cache if shared is None else shared
            out = self.model.generate(input_ids=query_ids, attention_mask=query_mask, **kwargs)
        self.model.train(was_training)
        response = out[:, query_ids.shape[1] :]
        # Anything after the first EOS becomes EOS/pad so masks are exact.
        mask, _ = response_mask_from_ids(response, tok.eos_token_id)
        return torch.where(mask, response, torch.full_like(response, tok.pad_token_id)).cpu()


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
    """Sample ``samples_per_prompt`` responses per prompt (rows grouped by prompt)."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    query_ids, query_mask = encode_prompts(tokenizer, repeated, chat_template=chat_template)
    response_ids = engine.generate(query_ids, query_mask, options)
    if response_ids.shape[1] == 0:  # nothing generated at all: keep one (masked) column
        response_ids = torch.full((len(repeated), 1), tokenizer.pad_token_id, dtype=torch.long)
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
    )
