"""Packed batches: no padding, and a prompt shared by several responses computed once.

A padded batch of ``N`` rows costs ``N x max_len`` tokens of compute. On the
shipped demo data that is 10% padding for SFT and, for preference pairs (chosen
and rejected rows padded to the longest of ``2B``), 22% padding plus a prompt
that is 48% of every row and is run twice. A packed batch lays the tokens end
to end in one row of length ``L`` and runs each shared prompt once: the same
pairs cost ~0.6 of the padded compute.

Layout. A batch is a list of *groups*; a group is sequences that share their
first ``p`` tokens (the longest common prefix, capped so every sequence keeps
at least one token of its own). The row holds, for each group, the prefix once
and then each sequence's own tokens::

    row:       [ prefix | own tokens of seq 1 | own tokens of seq 2 ] [ next group ...
    positions:   0..p-1    p..p+n1-1            p..p+n2-1               0..

Position ids restart per group and each sequence's own tokens continue from
``p``, so rotary embeddings see every sequence exactly as if it ran alone.

The start that *every* sequence of the batch shares (``r`` tokens: a chat
template's system prompt, 24 of SmolLM2's ~42-token demo prompts) goes once at
the head of the row, and every group's slots refer to those rows; each group's
own prefix then holds only its tokens ``r..p-1``::

    row:       [ start | prefix of group 1 | own tokens ... ] [ prefix of group 2 | own tokens ... ] ...
    positions:   0..r-1  r..p1-1                                r..p2-1

The start's keys and values reach every group through the gather, and its
gradient sums over all of them (the gather's backward); its queries run once.

Attention (:func:`packed_attention`, registered with transformers as
``attn_implementation="rlhfkit"``). The row is cut into *segments*, a small
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

Batch tensors (built by :func:`pack`; the loop moves them to the device):

* ``input_ids``, ``position_ids``: (1, L).
* ``seg_index``: (S, M) row position of each key slot of each segment (0 on unused slots).
* ``query_index``: (S, Q) row position of each query slot of each segment (0 on unused slots).
* ``seg_mask``: (S, 1, Q, M) bool, True where query slot ``i`` may attend to key slot ``j``.
* ``unpack``: (L,) flat query slot ``s * Q + q`` of each row position.
* ``seq_index``: (N, T) row position of token ``t`` of sequence ``n`` (0 past its end);
  sequences are numbered group by group, in the order given.
* ``seq_len``: (N,) tokens in each sequence.
* ``labels``: (N, T) target token or ``IGNORE_INDEX``, per sequence (when given).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlhfkit.data.records import IGNORE_INDEX

ATTENTION = "rlhfkit"
LAYOUT_KEYS = ("seg_index", "query_index", "seg_mask", "unpack")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in here: autocast's dtype if it is on for ``x``'s device, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class Layout(NamedTuple):
    """What :func:`packed_attention` needs; passed through the model as ``rlhfkit_layout``."""

    seg_index: torch.Tensor  # (S, M) key slots
    query_index: torch.Tensor  # (S, Q) query slots
    seg_mask: torch.Tensor  # (S, 1, Q, M) bool
    unpack: torch.Tensor  # (L,)
    cache: dict | None = None  # what the layers of one forward share (the additive mask), filled by the first


def shared_prefix_len(sequences: Sequence[Sequence[int]]) -> int:
    """Longest common prefix of ``sequences``, leaving every sequence at least one own token."""
    if len(sequences) < 2:
        return 0
    limit = min(len(s) for s in sequences) - 1
    n = 0
    first = sequences[0]
    while n < limit and all(s[n] == first[n] for s in sequences[1:]):
        n += 1
    return n


def pack(
    groups: Sequence[Sequence[Sequence[int]]], labels: Sequence[Sequence[Sequence[int]]] | None = None
) -> dict[str, torch.Tensor]:
    """Pack groups of token sequences (each group shares its common prefix) into one row.

    ``groups[g][j]`` is the token list of sequence ``j`` of group ``g``; ``labels``,
    if given, has the same nesting and lengths. Returns the tensors described in the
    module docstring.
    """
    for group in groups:
        if not group or any(len(s) == 0 for s in group):
            raise ValueError("pack: every group needs at least one non-empty sequence")
    # The start that every sequence of every group shares (a chat template's system prompt) is laid
    # out once, at the head of the row; each group's slots refer to those same rows.
    root = shared_prefix_len([seq for group in groups for seq in group]) if len(groups) > 1 else 0
    row: list[int] = list(groups[0][0][:root])
    positions: list[int] = list(range(root))
    seq_rows: list[list[int]] = []  # row position of each token of each sequence: its segment's keys
    # One attention segment per sequence: its keys are the prefix and its own tokens, its queries its
    # own tokens, and the prefix too for the group's first sequence. Every row is the query of exactly
    # one segment: the batch's shared start is a query of the first group's only.
    seg_queries: list[list[int]] = []
    for g, group in enumerate(groups):
        p = max(root, shared_prefix_len(group))
        start = len(row)
        row.extend(group[0][root:p])
        positions.extend(range(root, p))
        prefix_rows = list(range(root)) + list(range(start, start + p - root))
        first = 0 if g == 0 else root  # the shared start's queries: in the first group only
        for j, seq in enumerate(group):
            own_start = len(row)
            own_rows = list(range(own_start, own_start + len(seq) - p))
            row.extend(seq[p:])
            positions.extend(range(p, len(seq)))
            seq_rows.append(prefix_rows + own_rows)
            seg_queries.append((prefix_rows[first:] if j == 0 else []) + own_rows)

    n_seg = len(seq_rows)
    width, q_width = max(len(k) for k in seq_rows), max(len(q) for q in seg_queries)
    seg_index = torch.zeros(n_seg, width, dtype=torch.long)
    query_index = torch.zeros(n_seg, q_width, dtype=torch.long)
    unpack = torch.full((len(row),), -1, dtype=torch.long)
    for seg, (keys, queries) in enumerate(zip(seq_rows, seg_queries)):
        seg_index[seg, : len(keys)] = torch.tensor(keys)
        query_index[seg, : len(queries)] = torch.tensor(queries)
        unpack[query_index[seg, : len(queries)]] = seg * q_width + torch.arange(len(queries))
    assert bool((unpack >= 0).all()), "pack: a row is the query of no segment"
    # A query sees the keys of its sequence at or before its position; an unused query slot sees
    # key slot 0 (always used), so no softmax row is empty.
    row_pos = torch.tensor(positions, dtype=torch.long)
    key_used = torch.arange(width) < torch.tensor([len(k) for k in seq_rows])[:, None]
    query_used = torch.arange(q_width) < torch.tensor([len(q) for q in seg_queries])[:, None]
    key_pos = torch.where(key_used, row_pos[seg_index], len(row))  # unused key slots: later than any query
    query_pos = torch.where(query_used, row_pos[query_index], -1)  # unused query slots: before every key
    seg_mask = key_pos[:, None, :] <= query_pos[:, :, None]
    seg_mask[:, :, 0] |= ~query_used
    seg_mask = seg_mask[:, None]

    n_seq, longest = len(seq_rows), max(len(r) for r in seq_rows)
    seq_index = torch.zeros(n_seq, longest, dtype=torch.long)
    seq_len = torch.tensor([len(r) for r in seq_rows], dtype=torch.long)
    for n, rows in enumerate(seq_rows):
        seq_index[n, : len(rows)] = torch.tensor(rows)
    batch = {
        "input_ids": torch.tensor([row], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "seg_index": seg_index,
        "query_index": query_index,
        "seg_mask": seg_mask,
        "unpack": unpack,
        "seq_index": seq_index,
        "seq_len": seq_len,
    }
    if labels is not None:
        label_rows = torch.full((n_seq, longest), IGNORE_INDEX, dtype=torch.long)
        flat = [seq for group in labels for seq in group]
        for n, lab in enumerate(flat):
            if len(lab) != int(seq_len[n]):
                raise ValueError(f"pack: labels of sequence {n} have {len(lab)} entries for {int(seq_len[n])} tokens")
            label_rows[n, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        batch["labels"] = label_rows
    return batch


def is_packed(batch: dict) -> bool:
    return "seg_index" in batch


def require_kernel(model) -> None:
    """Raise unless ``model`` (possibly DDP- or peft-wrapped) attends with :data:`ATTENTION`.

    Any other kernel would build its mask from the position ids alone, which cuts
    a packed row into pieces where positions restart, so a response whose
    positions continue a shared prompt would silently not see that prompt.
    """
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl != ATTENTION:
        raise ValueError(
            f"a packed batch needs attn_implementation={ATTENTION!r} (models.set_attention(model)), this model has {impl!r}"
        )


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """Keyword arguments for a transformers model whose attention is :data:`ATTENTION`."""
    layout = Layout(*(batch[k] for k in LAYOUT_KEYS), cache={})
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "rlhfkit_layout": layout, "use_cache": False}


def num_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of all sequences, a shared prefix counted once per sequence (as a padded batch counts them)."""
    return int(batch["seq_len"].sum())


def last_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) row position of the last token of each sequence."""
    return batch["seq_index"].gather(1, (batch["seq_len"] - 1).unsqueeze(1)).squeeze(1)


def target_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each labelled token is predicted: ``(row positions (K,), target tokens (K,), sequence (K,))``.

    Token ``t`` of a sequence is predicted by the logits at its token ``t - 1``; a
    shared prefix's last position can predict a different token for each sequence,
    so it may appear more than once.
    """
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    owner = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)
    return batch["seq_index"][:, :-1][mask], targets[mask], owner[mask]


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
    (:func:`rlhfkit.rollout.decoding_cache`), and a CPU bmm on those strided views
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
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, packed_attention)
    # Padded batches (generation, eval) still need transformers' causal + padding mask.
    AttentionMaskInterface.register(ATTENTION, eager_mask)


_register()
