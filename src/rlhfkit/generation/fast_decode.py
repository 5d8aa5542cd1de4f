"""What makes transformers' ``generate`` fast here: the decoding fast path behind :class:`rlhfkit.generation.rollout.HFEngine`.

Four pieces, each giving the same tokens as plain ``generate`` (tested in ``tests/test_sampling.py``):

* :func:`prepacked_linears` -- on CPU under bf16, linears run oneDNN matmuls on weights packed once per call;
* :func:`lean_decode_steps` -- one-token decode steps of Llama-style layers take a shorter forward;
* :func:`decoding_cache` -- a KV cache in the decoding dtype, with room reserved for the new tokens;
* :func:`common_start_first` and :func:`shared_prefix_cache` -- a start every query shares (a system prompt) and
  repeated queries (k samples per prompt) are prefilled once.

Why each exists, measured: benchmarks/README.md, "Design measurements".
"""

from __future__ import annotations

import contextlib

import torch
import transformers
from packaging.version import Version

from rlhfkit.data.packing import shared_prefix_len
from rlhfkit.modeling.attention import ATTENTION, decode_attention
from rlhfkit.modeling.forward import position_ids_from_mask
from rlhfkit.modeling.models import FrozenLinear

CACHE_ARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"
"""The name of the KV cache, as an argument of ``forward``/``generate`` and a field of their output: transformers 5.24
renamed ``past_key_values`` to ``cache``; vLLM's extra pins transformers below 5.21 (README, "GPU install")."""


def output_cache(out):
    """The KV cache a ``forward(..., use_cache=True)`` returned, under either name (:data:`CACHE_ARG`)."""
    return getattr(out, CACHE_ARG)


PACKABLE_LINEARS = (torch.nn.Linear, FrozenLinear)
"""Linear classes :func:`prepacked_linears` packs."""

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
    # Exactly nn.Linear (or a frozen low-precision one) with float weights: not quantized subclasses (int8 weights are
    # not bf16 values).
    linears = [m for m in model.modules() if type(m) in PACKABLE_LINEARS and m.weight.dtype.is_floating_point]
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
                    if not all(type(m) in PACKABLE_LINEARS and m in linears and m not in done for m in group):
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
    (whose mask transformers builds as an additive float mask, the kind :func:`rlhfkit.modeling.attention.decode_attention` takes)."""

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

    def forward(hidden_states, attention_mask=None, position_ids=None, use_cache=False, position_embeddings=None, **kwargs):
        cache = kwargs.get(CACHE_ARG)
        # Prefill, and a residual stream not in fp32 (transformers' norm computes in fp32 and casts back), take the full layer.
        if hidden_states.shape[1] != 1 or cache is None or position_embeddings is None or hidden_states.dtype != torch.float32:
            return full_forward(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
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
        self._show(end)
        return self.keys, self.values

    def _show(self, end: int) -> None:
        """``keys``/``values``: views of the buffers' first ``end`` positions (remembered, to tell when another method
        replaced them)."""
        self._views = self.keys, self.values = self._buffers[0][..., :end, :], self._buffers[1][..., :end, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (the decoding rows that have not finished), room reserved included: one copy,
        where the base method's selection would be copied again into a fresh buffer at the next update."""
        buffers = getattr(self, "_buffers", None)
        if buffers is None or self.keys is not self._views[0]:
            return super().batch_select_indices(indices)
        end = self.get_seq_length()
        self._buffers = tuple(b.index_select(0, indices.to(b.device)) for b in buffers)
        self._show(end)


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
    (:func:`shared_prefix_cache`), which makes a rollout with a shared system prompt
    several percent faster (see benchmarks/README.md, "Design measurements"). The same tokens in fp32; in bf16
    the start's keys come from a one-row product, so they can differ by a rounding
    and a sample diverge (greedy, 20 tokens: 30 of 32 rows the same, 32 of 32 in fp32).
    """

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


def shared_prefix_cache(model, query_ids: torch.Tensor, query_mask: torch.Tensor, cache=None, start: int = 0):
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
            logits_to_keep=1,
            **{CACHE_ARG: cache},
        )
        cache = output_cache(out)
        cache.reorder_cache(torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device))
    if width - 1 > start:
        out = model(
            input_ids=ids[:, start:],
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask)[:, start:],
            use_cache=True,
            logits_to_keep=1,
            **{CACHE_ARG: cache},
        )
        cache = output_cache(out)
    cache.reorder_cache(inverse.to(ids.device))
    return cache
