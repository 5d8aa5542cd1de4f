"""The attention kernel for packed batches, registered with transformers as ``attn_implementation="rlhfkit"``.

The batch layout it reads is :mod:`rlhfkit.data.packing`'s (built by :func:`rlhfkit.data.packing.pack`).

The packed row (:func:`packed_attention`) is cut into *segments*, a small
batch of ``S`` items, one per sequence: its keys are the prefix and its own
tokens, its queries its own tokens, and the prefix's too for the first sequence
of a group (``Q`` query and ``M`` key slots, the most of any segment). A query
attends causally to its segment's keys: the attention each sequence would get
alone, so logits equal the padded forward's (tested). No score is computed
between siblings: with ``k`` responses of length ``R`` to a prompt of length
``P``, a group costs ``k (P + R)^2`` scores instead of ``(P + k R)^2``. A GRPO
batch of SmolLM2 (16 prompts x 2 responses) has 32 x 105 x 113 scores per head
instead of 16 x 177 x 177. Without a packed layout (generation, padded eval
batches) the kernel is plain eager attention on CPU (one-token decode steps:
:func:`decode_attention`) and sdpa on CUDA.

On CUDA a packed batch can run FlexAttention instead (:func:`flex_packed_attention`, opt-in with
:data:`FLEX_ENV` while it is experimental): the same mask, written per token pair from the layout's
``row_group``/``row_seq``/``row_pos``, so it keeps the shared prompts' saving without materialising
the (heads x segments, Q, M) scores, which grow to gigabytes per layer at real lengths. Padded batches
on CUDA get sdpa's boolean mask (or none when nothing is padded, so sdpa can take its flash kernel), on
CPU eager's additive one (:func:`attention_mask`).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from rlhfkit.data.packing import ATTENTION, Layout


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in here: autocast's dtype if it is on for ``x``'s device, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _kernel_of(model) -> str | None:
    inner = getattr(model, "module", model)
    return getattr(getattr(inner, "config", None), "_attn_implementation", None)


def uses_kernel(model) -> bool:
    """Whether ``model`` (possibly DDP- or peft-wrapped) attends with :data:`ATTENTION`, so takes packed batches."""
    return _kernel_of(model) == ATTENTION


def require_kernel(model) -> None:
    """Raise unless ``model`` (possibly DDP- or peft-wrapped) attends with :data:`ATTENTION`.

    Any other kernel would build its mask from the position ids alone, which cuts
    a packed row into pieces where positions restart, so a response whose
    positions continue a shared prompt would silently not see that prompt.
    """
    impl = _kernel_of(model)
    if impl != ATTENTION:
        raise ValueError(
            f"a packed batch needs attn_implementation={ATTENTION!r} (models.set_attention(model)), this model has {impl!r}"
        )


@contextlib.contextmanager
def capture_output(module: torch.nn.Module):
    """Collect ``module``'s forward outputs (with their autograd graph) while the block runs."""
    outputs: list = []
    handle = module.register_forward_hook(lambda _m, _inputs, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * groups, T, D), each kv head repeated for its query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0):
    """Plain attention: ``softmax(q k^T * scaling + mask) v`` with an additive mask; (B, T, H, D) out."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def decode_attention(query, key, value, attention_mask, scaling: float) -> torch.Tensor:
    """Attention of one query token per row (a decode step): ``softmax(q k^T * scaling + mask) v``.

    Shapes: ``query`` (B, H, 1, D), ``key``/``value`` (B, H_kv, L, D), an additive
    ``attention_mask`` (B, 1, 1, >= L) or None -> (B, 1, H, D). Two batched matmuls
    over (row, kv head), the query heads that share a kv head being the rows of one
    product, so the cache is not repeated per head. Scores and probabilities are in
    the compute dtype (under bf16 autocast: bf16, as in eager attention and in the
    packed training kernel), scaling, mask and softmax in fp32. The keys and values
    are made contiguous first: the decoding cache hands out views of reserved room
    (:func:`rlhfkit.generation.rollout.decoding_cache`), and a CPU bmm on those strided views
    took about 3x as long. On CPU a decode step is a few percent faster than with
    sdpa (see benchmarks/README.md, "Design measurements").
    """
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    dtype = compute_dtype(query)
    q = query.to(dtype).reshape(batch * kv_heads, heads // kv_heads, dim)
    k = key.to(dtype).reshape(batch * kv_heads, length, dim).contiguous()
    v = value.to(dtype).reshape(batch * kv_heads, length, dim).contiguous()
    scores = torch.bmm(q, k.transpose(1, 2)).view(batch, kv_heads, -1, length).float().mul_(scaling)
    if attention_mask is not None:
        scores = scores.add_(attention_mask[..., :length])  # (B, 1, 1, L) broadcasts over heads
    probs = torch.softmax(scores, dim=-1).to(dtype).view(batch * kv_heads, -1, length)
    return torch.bmm(probs, v).view(batch, 1, heads, dim)


def packed_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, rlhfkit_layout: Layout | None = None, **kwargs
):
    """transformers attention kernel for packed batches (see the module docstring).

    Shapes: ``query`` (1, H, L, D), ``key``/``value`` (1, H_kv, L, D) -> output (1, L, H, D).
    Without ``rlhfkit_layout``: eager attention on CPU (faster than sdpa's kernel
    for training-length sequences there), :func:`decode_attention` for one-token
    decode steps on CPU, sdpa on GPUs (and for attention softcapping or sinks,
    which these two do not implement).

    With a layout, per segment: ``softmax(q k^T * scaling + bias) v``, the scores from
    one ``baddbmm`` (matmul, scale and the segment mask as an additive bias, made once
    per forward and shared by all layers) and the softmax in the compute dtype
    (under bf16 autocast: bf16 out, fp32 inside; the probabilities are bf16 for the
    next matmul either way, and the backward reads those same bf16 values). On CPU a
    layer's forward + backward takes about 40% less time than with matmul, scale,
    masked_fill and an fp32 softmax (see benchmarks/README.md, "Design measurements").
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if rlhfkit_layout is None:
        if query.is_cuda or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if query.shape[2] == 1:
            return decode_attention(query, key, value, attention_mask, scaling), None
        return eager_attention(module, query, key, value, attention_mask, scaling, dropout)
    if use_flex(query, rlhfkit_layout, dropout if module.training else 0.0):
        return flex_packed_attention(query, key, value, rlhfkit_layout, scaling), None
    n_seg = rlhfkit_layout.seg_index.shape[0]
    heads, dim = query.shape[1], query.shape[-1]
    dtype = compute_dtype(query)

    def by_segment(
        x: torch.Tensor, slots: torch.Tensor, repeat: int = 1
    ) -> torch.Tensor:  # (1, h, L, D) -> (h * repeat * S, slots, D)
        # index_select, not x[0][:, slots]: the same values, and its backward (index_add)
        # is about twice as fast as advanced indexing's (index_put with accumulate) on CPU.
        # Cast first (what autocast would do to the gathered copy), so the gather moves half the bytes.
        x = x[0].to(dtype).index_select(1, slots.reshape(-1))
        return _repeat_kv(x[None], repeat)[0].view(-1, slots.shape[1], x.shape[-1])

    groups = heads // key.shape[1]
    q = by_segment(query, rlhfkit_layout.query_index)  # head-major: (H * S, Q, D)
    k, v = by_segment(key, rlhfkit_layout.seg_index, groups), by_segment(value, rlhfkit_layout.seg_index, groups)  # (H * S, M, D)
    weights = torch.baddbmm(_segment_bias(rlhfkit_layout, heads, dtype), q, k.transpose(1, 2), alpha=scaling)
    weights = torch.softmax(weights, dim=-1)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.bmm(weights, v).view(heads, n_seg * q.shape[1], dim).transpose(0, 1)  # (S * Q, H, D)
    return out.index_select(0, rlhfkit_layout.unpack).unsqueeze(0), None


FLEX_ENV = "RLHFKIT_FLEX_ATTENTION"
"""Set to 1 to run packed batches on CUDA with :func:`flex_packed_attention`. Off by default: on an H200
(2026-12-04, torch 2.11) its forward matched the segment kernel, but two gradient tests failed and GRPO slowed
down (benchmarks/gpu_runs/2026-12-04-h200-s24/README.md), so it is experimental until that is understood."""


def use_flex(query: torch.Tensor, layout: Layout, dropout: float) -> bool:
    """Whether a packed forward runs :func:`flex_packed_attention`: on CUDA with :data:`FLEX_ENV` set, for layouts
    that carry row ids, without dropout."""
    return query.is_cuda and os.environ.get(FLEX_ENV) == "1" and layout.row_group is not None and dropout == 0.0


_compiled: dict = {}


def _flex():
    """``flex_attention``, compiled once (a singleton, as transformers' ``integrations/flex_attention.py`` keeps it)."""
    from torch.nn.attention.flex_attention import flex_attention

    if "flex" not in _compiled:
        _compiled["flex"] = torch.compile(flex_attention)
    return _compiled["flex"]


def flex_block_mask(layout: Layout, length: int, device: torch.device):
    """The layout's mask as a FlexAttention ``BlockMask`` over the ``length`` row positions, made once per forward.

    Row ``k`` is visible to row ``q`` when ``pos[k] <= pos[q]``, ``k`` is in the shared start or ``q``'s group,
    and ``k`` is in a prefix or ``q``'s own sequence: the segments' mask of :func:`packed_attention`, per pair.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    cache = layout.cache if layout.cache is not None else {}
    if "block_mask" not in cache:
        assert layout.row_group is not None and layout.row_seq is not None and layout.row_pos is not None, (
            "flex_block_mask: the layout has no row ids"
        )
        group, seq, pos = flex_row_ids(layout.row_group, layout.row_seq, layout.row_pos)

        def mask_mod(batch, head, q, k):
            same_group = (group[k] == -1) | (group[k] == group[q])
            same_seq = (seq[k] == -1) | (seq[k] == seq[q])
            return same_group & same_seq & (pos[k] <= pos[q])

        # Compiled on CUDA (what transformers' make_flex_block_causal_mask does); the eager path serves CPU tests.
        cache["block_mask"] = create_block_mask(
            mask_mod, None, None, length, length, device=device, _compile=device.type == "cuda"
        )
    return cache["block_mask"]


FLEX_BLOCK = 128
"""FlexAttention's default block size; the row ids are padded to a multiple of it."""
_PAST_EVERY_POSITION = 1 << 30  # a padded row's position: after every real one (no device sync to find the maximum)


def flex_row_ids(group: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The row ids padded to a whole number of FlexAttention blocks plus one, so a mask_mod evaluated on a padded
    block's positions indexes inside them (out-of-range indexing in compiled flex kernels is suspected in pytorch
    issue 158212, wrong gradients). No real row sees a padded one: group -2, sequence -2, position above all."""
    n = group.shape[0]
    padded = (n // FLEX_BLOCK + 2) * FLEX_BLOCK
    extra = padded - n
    return (
        torch.cat([group, group.new_full((extra,), -2)]),
        torch.cat([seq, seq.new_full((extra,), -2)]),
        torch.cat([pos, pos.new_full((extra,), _PAST_EVERY_POSITION)]),
    )


def flex_packed_attention(query, key, value, layout: Layout, scaling: float) -> torch.Tensor:
    """Packed attention with FlexAttention: (1, H, L, D) queries, (1, H_kv, L, D) keys/values -> (1, L, H, D).

    The same values as :func:`packed_attention`'s segment kernel (tested against it), in the compute dtype.
    Compiled on CUDA; elsewhere flex's eager reference (which materialises the scores, for tests only).
    """
    from torch.nn.attention.flex_attention import flex_attention

    dtype = compute_dtype(query)
    q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
    mask = flex_block_mask(layout, q.shape[2], q.device)
    fn = _flex() if q.is_cuda else flex_attention
    out = fn(q, k, v, block_mask=mask, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).contiguous()


def attention_mask(*args, **kwargs):
    """The mask transformers builds for padded batches: sdpa's on CUDA, eager's elsewhere.

    sdpa's is boolean and may be None (nothing padded, plain causal), so sdpa can take its flash kernel on a
    GPU; eager's is the additive float mask that :func:`eager_attention` and :func:`decode_attention` add.
    """
    from transformers.masking_utils import eager_mask, sdpa_mask

    if torch.device(kwargs.get("device", "cpu")).type == "cuda":
        kwargs.pop("dtype", None)
        return sdpa_mask(*args, **kwargs)
    return eager_mask(*args, **kwargs)


def _segment_bias(layout: Layout, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(H * S, Q, M) additive mask of ``layout`` (0 where a query slot may attend to a key slot, the dtype's minimum elsewhere).

    Every layer of one forward gets the same layout, so the bias is made once and
    kept in the layout's ``cache`` dict.
    """
    cache = layout.cache if layout.cache is not None else {}
    key = (heads, dtype)
    if key not in cache:
        allowed = layout.seg_mask[:, 0]  # (S, Q, M)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
        cache[key] = bias.expand(heads, *bias.shape).reshape(-1, *bias.shape[1:])  # head-major, as the scores
    return cache[key]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    # Padded batches (generation, eval) still need transformers' causal + padding mask.
    AttentionMaskInterface.register(ATTENTION, attention_mask)


_register()
