"""Tokenising labelled comparisons into (chosen, rejected) pairs for reward models and DPO.

Each :class:`~rlhfkit.data.records.Comparison` expands to its implied pairs
(:meth:`Comparison.pairs`). A pair is tokenised as two sequences sharing the
prompt, each ``prompt + response`` rendered exactly as SFT renders a
conversation (:func:`rlhfkit.data.sft.tokenize_conversation`), so the response
tokens (content + end-of-turn marker) carry labels and everything else is
``IGNORE_INDEX``.

A collated batch stacks chosen rows first, then rejected rows — ``(2B, T)`` —
so one forward pass scores both (the "concatenated forward" of TRL's DPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit import log
from rlhfkit.data import packing
from rlhfkit.data.io import DataError, holdout_size, split_holdout
from rlhfkit.data.preferences import load_comparisons
from rlhfkit.data.records import Comparison
from rlhfkit.data.sft import IGNORE_INDEX, Conversation, collate_sft, tokenize_conversation


def prompt_messages(prompt) -> list[tuple[str, str]]:
    """A prompt (string or message list) as (role, content) turns."""
    if isinstance(prompt, str):
        return [("user", prompt)]
    return [(m["role"], m["content"]) for m in prompt]


def tokenize_response(tokenizer, prompt, response: str, *, chat_template: bool = True) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one prompt + response; labels mark response tokens."""
    conv = Conversation(tuple(prompt_messages(prompt)) + (("assistant", response),), source="<comparison>")
    return tokenize_conversation(tokenizer, conv, chat_template=chat_template)


@dataclass
class PairStats:
    pairs: int = 0
    truncated: int = 0
    dropped: int = 0
    ties_skipped: int = 0


def _response_tokens(
    tokenizer, comp: Comparison, idx: int, *, max_length: int, chat_template: bool
) -> tuple[list[int], list[int], bool] | None:
    """``(input_ids, labels, truncated)`` of response ``idx`` cut to ``max_length``; None if it lost every token."""
    ids, labels = tokenize_response(tokenizer, comp.prompt, comp.responses[idx], chat_template=chat_template)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return ids, labels, truncated


def _margin(comp: Comparison) -> float:
    return float(comp.meta.get("margin", 0.0)) if isinstance(comp.meta, dict) else 0.0


def soft_target(comp: Comparison) -> float | None:
    """A pair's soft label ``meta["target"]`` (P(``chosen`` is preferred), a number in [0, 1]), or None.

    Graded human labels carry one (:mod:`rlhfkit.feedback.grades`: "A slightly better"
    is 0.7, a tie 0.5, the mean over several annotators); it replaces the pair's hard
    target (1.0, or 0.5 for a tie). For a tie the ranking is arbitrary and the target is
    P(``responses[ranking[0]]`` is preferred). Rankings of more than two responses keep
    their hard targets. A ``target`` that is not a number in [0, 1] is a ValueError.
    """
    if len(comp.responses) != 2 or not isinstance(comp.meta, dict) or comp.meta.get("target") is None:
        return None
    value = comp.meta["target"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"meta.target must be a number in [0, 1] (P(chosen is preferred)), got {value!r}")
    return float(value)


def tokenize_pairs(
    tokenizer,
    comparisons: list[Comparison],
    *,
    max_length: int,
    chat_template: bool = True,
    keep_ties: bool = True,
    ranking_pairs: str = "all",
) -> tuple[list[dict], PairStats]:
    """Expand comparisons to pairs and tokenise them (:func:`tokenize_rankings`, one example per pair).

    ``ranking_pairs="best_worst"`` keeps one pair per K-way ranking, its first against its last (the
    largest preference gap, as UltraFeedback-style binarisation does; with ties left out, the first and last of
    the pairs that remain, none when those two were tied); ``"all"`` keeps all K(K-1)/2.

    Each example holds ``chosen_input_ids``, ``chosen_labels``,
    ``rejected_input_ids``, ``rejected_labels``, ``target`` (P(chosen > rejected):
    1.0, or 0.5 for a tie; a pair's ``meta["target"]`` when present, :func:`soft_target`)
    and ``margin`` (from ``meta["margin"]`` when present, else 0).
    """
    groups, stats = tokenize_rankings(
        tokenizer, comparisons, max_length=max_length, chat_template=chat_template, keep_ties=keep_ties
    )
    out = []
    for group in groups:
        ids, labels = group["input_ids"], group["labels"]
        pairs = group["pairs"]
        if ranking_pairs == "best_worst" and len(pairs) > 1:
            best, worst = pairs[0][0], pairs[-1][1]
            pairs = [p for p in pairs if p[0] == best and p[1] == worst]
        elif ranking_pairs not in ("all", "best_worst"):
            raise ValueError(f"ranking_pairs must be all or best_worst, not {ranking_pairs!r}")
        for better, worse, target in pairs:
            out.append(
                {
                    "chosen_input_ids": ids[better],
                    "chosen_labels": labels[better],
                    "rejected_input_ids": ids[worse],
                    "rejected_labels": labels[worse],
                    "target": target,
                    "margin": group["margin"],
                }
            )
    stats.pairs = len(out)  # after any best_worst selection
    return out, stats


def tokenize_rankings(
    tokenizer, comparisons: list[Comparison], *, max_length: int, chat_template: bool = True, keep_ties: bool = True
) -> tuple[list[dict], PairStats]:
    """One example per comparison, holding all its pairs (InstructGPT's batch element).

    Ouyang et al. 2022, sec. 3.5: putting all K(K-1)/2 comparisons of a prompt in
    one batch element needs one forward per response instead of one per pair, and
    stops the overfitting that shuffled pairs (each response seen K-1 times per
    epoch) cause. Each example holds ``input_ids``/``labels`` (K lists), ``pairs``
    (``(better, worse, target)`` indices into them, target 1.0 or 0.5 for a tie (a ranking's tied pairs too:
    ``Comparison.ties``), or a pair's soft label ``meta["target"]``, :func:`soft_target`) and ``margin`` (``meta["margin"]`` when present, else 0). Over-long sequences
    keep their first ``max_length`` tokens (the response is cut, never the prompt
    start; ``stats.truncated`` counts responses); a response that loses every
    token is dropped with its pairs (``stats.dropped`` counts pairs), and a
    comparison left without pairs is dropped. Without ``keep_ties``, tied pairs are left out (a tie, or a
    ranking's tied pair; ``stats.ties_skipped`` counts them).
    """
    stats = PairStats()
    out: list[dict] = []
    for index, comp in enumerate(comparisons):
        if comp.tie and not keep_ties:
            stats.ties_skipped += 1
            continue
        every = [
            _response_tokens(tokenizer, comp, i, max_length=max_length, chat_template=chat_template)
            for i in range(len(comp.responses))
        ]
        tokens = {i: t for i, t in enumerate(every) if t is not None}
        kept = list(tokens)
        slot = {i: k for k, i in enumerate(kept)}
        pairs = []
        try:
            soft = soft_target(comp)
        except ValueError as e:
            raise ValueError(f"comparison {index} ({comp.source or 'no source'}): {e}") from None
        for better, worse, target in comp.pairs():
            if comp.ties and target == 0.5 and not keep_ties:  # a ranking's tied pair
                stats.ties_skipped += 1
                continue
            target = target if soft is None else soft
            if better in slot and worse in slot:
                pairs.append((slot[better], slot[worse], target))
            else:
                stats.dropped += 1
        if not pairs:
            continue
        stats.truncated += sum(tokens[i][2] for i in kept)
        stats.pairs += len(pairs)
        out.append(
            {
                "input_ids": [tokens[i][0] for i in kept],
                "labels": [tokens[i][1] for i in kept],
                "pairs": pairs,
                "margin": _margin(comp),
            }
        )
    return out, stats


def collate_pairs(examples: list[dict], pad_token_id: int, *, packed: bool = False) -> dict[str, torch.Tensor]:
    """Chosen and rejected sequences of a batch of pairs, right-padded or packed.

    Padded: ``input_ids``, ``attention_mask``, ``labels``: (2B, T), rows ``[:B]``
    chosen and ``[B:]`` rejected. Packed (:mod:`rlhfkit.data.packing`): each pair is a
    group, so its prompt runs once; sequences alternate chosen, rejected. Both:
    ``target``, ``margin``: (B,); and, when the examples carry them (DPO),
    ``ref_chosen_logps``, ``ref_rejected_logps``: (B,). :func:`chosen_rejected`
    splits per-sequence values either way.
    """
    if packed:
        batch = packing.pack(
            [[e["chosen_input_ids"], e["rejected_input_ids"]] for e in examples],
            labels=[[e["chosen_labels"], e["rejected_labels"]] for e in examples],
        )
    else:
        seqs = [{"input_ids": e["chosen_input_ids"], "labels": e["chosen_labels"]} for e in examples]
        seqs += [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in examples]
        batch = collate_sft(seqs, pad_token_id)
    batch["target"] = torch.tensor([e["target"] for e in examples], dtype=torch.float32)
    batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    if "ref_chosen_logps" in examples[0]:
        batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logps"] for e in examples], dtype=torch.float32)
    return batch


def chosen_rejected(batch: dict[str, torch.Tensor], values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence ``values`` of a :func:`collate_pairs` or :func:`collate_rankings` batch as (chosen (P,), rejected (P,))."""
    if "chosen_index" in batch:  # rankings: pairs index the responses
        return values[batch["chosen_index"]], values[batch["rejected_index"]]
    if packing.is_packed(batch):  # chosen, rejected alternate
        return values[0::2], values[1::2]
    n = batch["target"].shape[0]
    return values[:n], values[n:]


def collate_rankings(examples: list[dict], pad_token_id: int, *, packed: bool = False) -> dict[str, torch.Tensor]:
    """A batch of :func:`tokenize_rankings` examples: their responses, and their pairs as indices.

    Responses are numbered example by example (packed: each example's responses
    are a group, so its prompt runs once; padded: one right-padded row each).
    ``chosen_index``, ``rejected_index``, ``target``, ``margin``: (P,) over all the
    batch's pairs.
    """
    if packed:
        batch = packing.pack([e["input_ids"] for e in examples], labels=[e["labels"] for e in examples])
    else:
        seqs = [{"input_ids": ids, "labels": labels} for e in examples for ids, labels in zip(e["input_ids"], e["labels"])]
        batch = collate_sft(seqs, pad_token_id)
    chosen, rejected, target, margin, offset = [], [], [], [], 0
    for e in examples:
        for better, worse, p in e["pairs"]:
            chosen.append(offset + better)
            rejected.append(offset + worse)
            target.append(p)
            margin.append(e["margin"])
        offset += len(e["input_ids"])
    batch["chosen_index"] = torch.tensor(chosen, dtype=torch.long)
    batch["rejected_index"] = torch.tensor(rejected, dtype=torch.long)
    batch["target"] = torch.tensor(target, dtype=torch.float32)
    batch["margin"] = torch.tensor(margin, dtype=torch.float32)
    return batch


def strict_pair_count(comparison: Comparison) -> int:
    """The pairs of ``comparison`` that prefer one response (its K(K-1)/2 pairs less its ties): the pairs a held-out
    accuracy counts."""
    return sum(1 for *_, p in comparison.pairs() if p != 0.5)


def load_pair_splits(
    tokenizer,
    data: str,
    *,
    eval_data: str,
    eval_fraction: float,
    seed: int,
    max_length: int,
    chat_template: bool,
    keep_ties: bool,
    stage: str,
    grouped: bool = False,
    ranking_pairs: str = "all",
    max_comparisons: int = -1,
    min_heldout_pairs: int = 0,
) -> tuple[list[dict], list[dict]]:
    """Read comparisons (any supported format), split off a held-out set, tokenise both.

    With ``max_comparisons`` > 0 only the file's first that many comparisons are read, before the split (as
    ``head -N`` of a JSONL file would). The split is by comparison (all pairs of a K-way ranking stay on one side).
    With ``min_heldout_pairs`` > 0 (and no ``eval_data``) the held-out split grows past ``eval_fraction`` until it
    holds that many strict pairs (:func:`strict_pair_count`; ties do not count), up to a quarter of the
    comparisons (:func:`~rlhfkit.data.io.split_holdout`).
    Examples are pairs (:func:`tokenize_pairs`), or with ``grouped`` whole
    comparisons (:func:`tokenize_rankings`). Prints what was kept, truncated,
    dropped and skipped.
    """
    comparisons = load_comparisons(data)
    if not comparisons:
        raise DataError(data, None, None, "no comparisons (an empty preference file)")
    if max_comparisons > 0:
        comparisons = comparisons[:max_comparisons]
    if eval_data:
        train_c, eval_c = comparisons, load_comparisons(eval_data)
    else:
        train_c, eval_c = split_holdout(comparisons, eval_fraction, seed, min_held=min_heldout_pairs, weight=strict_pair_count)
        strict = sum(map(strict_pair_count, eval_c)) if min_heldout_pairs > 0 else 0
        if len(eval_c) > holdout_size(len(comparisons), eval_fraction) or strict < min_heldout_pairs:
            short = (
                f"; fewer than min_heldout_pairs={min_heldout_pairs}: no more than a quarter is held out"
                if strict < min_heldout_pairs
                else ""
            )
            log.info(
                f"{stage} data: {len(eval_c)} comparisons held out ({len(eval_c) / len(comparisons):.1%}; "
                f"eval_fraction={eval_fraction}) for {strict} strict held-out pairs (min_heldout_pairs="
                f"{min_heldout_pairs}){short}"
            )
    kwargs: dict[str, Any] = dict(max_length=max_length, chat_template=chat_template, keep_ties=keep_ties)
    if not grouped:
        kwargs["ranking_pairs"] = ranking_pairs
    tokenize = tokenize_rankings if grouped else tokenize_pairs
    train, stats = tokenize(tokenizer, train_c, **kwargs)
    held, held_stats = tokenize(tokenizer, eval_c, **kwargs)
    log.info(
        f"{stage} data: {stats.pairs} train pairs from {len(train_c)} comparisons ({stats.truncated} truncated, "
        f"{stats.dropped} dropped over max_length={max_length}, {stats.ties_skipped} ties skipped); "
        f"{held_stats.pairs} held-out pairs"
    )
    if not train:
        if not train_c:
            why = (
                f"all {len(comparisons)} comparison(s) went to the held-out split (eval_fraction={eval_fraction}); "
                "add comparisons, set eval_fraction=0 or give eval_data"
            )
        else:
            lost = []
            if stats.ties_skipped:
                lost.append(f"{stats.ties_skipped} are ties, which {stage} skips")
            if stats.dropped:
                lost.append(f"{stats.dropped} pair(s) were dropped: a response lost every token to max_length={max_length}")
            why = f"of the {len(train_c)} training comparison(s), " + "; ".join(lost or ["none gave a pair"])
        raise DataError(data, None, None, f"no training pairs left: {why}")
    return train, held
