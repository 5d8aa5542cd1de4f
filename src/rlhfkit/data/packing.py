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

Attention over this layout is :mod:`rlhfkit.modeling.attention`'s kernel, registered with transformers as
``attn_implementation="rlhfkit"`` (:data:`ATTENTION`).

Batch tensors (built by :func:`pack`; the loop moves them to the device):

* ``input_ids``, ``position_ids``: (1, L).
* ``seg_index``: (S, M) row position of each key slot of each segment (0 on unused slots).
* ``query_index``: (S, Q) row position of each query slot of each segment (0 on unused slots).
* ``seg_mask``: (S, 1, Q, M) bool, True where query slot ``i`` may attend to key slot ``j``.
* ``unpack``: (L,) flat query slot ``s * Q + q`` of each row position.
* ``row_group``, ``row_seq``: (L,) the group and the sequence (numbered over the batch) of each row position;
  -1 for the batch's shared start (group) and for prefixes (sequence). With ``position_ids`` they give the
  same mask per token pair (what the FlexAttention path reads on CUDA): row ``j`` is visible to row ``i``
  when ``pos[j] <= pos[i]``, ``group[j]`` is -1 or ``group[i]``, and ``seq[j]`` is -1 or ``seq[i]``.
* ``seq_index``: (N, T) row position of token ``t`` of sequence ``n`` (0 past its end);
  sequences are numbered group by group, in the order given.
* ``seq_len``: (N,) tokens in each sequence.
* ``labels``: (N, T) target token or ``IGNORE_INDEX``, per sequence (when given).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from rlhfkit.data.records import IGNORE_INDEX

ATTENTION = "rlhfkit"


class Layout(NamedTuple):
    """What :func:`rlhfkit.modeling.attention.packed_attention` needs; passed through the model as ``rlhfkit_layout``."""

    seg_index: torch.Tensor  # (S, M) key slots
    query_index: torch.Tensor  # (S, Q) query slots
    seg_mask: torch.Tensor  # (S, 1, Q, M) bool
    unpack: torch.Tensor  # (L,)
    cache: dict | None = None  # what the layers of one forward share (the additive mask), filled by the first
    row_group: torch.Tensor | None = None  # (L,) group of each row position, -1 for the shared start
    row_seq: torch.Tensor | None = None  # (L,) sequence of each row position, -1 for prefixes
    row_pos: torch.Tensor | None = None  # (L,) position id of each row position


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
    row_group: list[int] = [-1] * root
    row_seq: list[int] = [-1] * root
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
        row_group.extend([g] * (p - root))
        row_seq.extend([-1] * (p - root))
        prefix_rows = list(range(root)) + list(range(start, start + p - root))
        first = 0 if g == 0 else root  # the shared start's queries: in the first group only
        for j, seq in enumerate(group):
            own_start = len(row)
            own_rows = list(range(own_start, own_start + len(seq) - p))
            row.extend(seq[p:])
            positions.extend(range(p, len(seq)))
            row_group.extend([g] * (len(seq) - p))
            row_seq.extend([len(seq_rows)] * (len(seq) - p))
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
        "row_group": torch.tensor(row_group, dtype=torch.long),
        "row_seq": torch.tensor(row_seq, dtype=torch.long),
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


NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)
"""The attention mask handed to transformers with a packed batch. transformers takes a 4-D mask as it is
(``masking_utils._preprocess_mask_arguments``), so it builds no (L, L) causal mask for the row, which at real
lengths is gigabytes; the kernel reads the layout instead and never looks at this placeholder."""


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """Keyword arguments for a transformers model whose attention is :data:`ATTENTION`."""
    layout = Layout(
        batch["seg_index"],
        batch["query_index"],
        batch["seg_mask"],
        batch["unpack"],
        cache={},
        row_group=batch.get("row_group"),
        row_seq=batch.get("row_seq"),
        row_pos=batch["position_ids"][0],
    )
    return {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": NO_MASK,
        "rlhfkit_layout": layout,
        "use_cache": False,
    }


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
