"""Unpaired (thumbs-up / thumbs-down) data for KTO: records, paired data converted, tokenisation, batches.

A KTO file is JSON (a list), JSONL or Parquet; its format is detected **per record**:

* **unpaired** (TRL's unpaired preference format): ``prompt`` (a string or a chat-message list ending with a
  user turn), ``completion`` (a string, or a one-message assistant list as TRL's conversational format)
  and ``label`` (``true``: desirable, ``false``: undesirable).
* **paired**: any record :mod:`rlhfkit.data.preferences` reads (seed, TRL pairs, hh-rlhf, rankings). Its
  best response becomes a desirable example and its worst an undesirable one, both with its prompt (a pair
  gives its chosen and its rejected; a K-way ranking its first and its last, the middle ones being neither);
  a tie gives nothing and is counted as skipped. This is TRL's ``unpair_preference_dataset``.

Every problem is a :class:`~rlhfkit.data.io.DataError` naming file, line and field.

KL pairs. KTO's reference point ``z0`` is a batch estimate of ``KL(pi || ref)`` from *mismatched* pairs
``(x_i, y_j)``, a prompt with another example's completion (Ethayarajh et al. 2024). TRL builds them
when it prepares the data, rotating the completions by one within each batch-sized chunk, and so needs a fixed,
unshuffled batch order. Here each example gets one fixed partner (:func:`kl_partners`: a seeded permutation of
the split that gives no example a completion of its own prompt), so its KL pair is tokenised, and its reference
log-prob computed, once, whatever batches the training loop draws; a batch's ``z0`` averages the KL pairs of its
own examples. Both are Monte-Carlo estimates of the same expectation, ``E_x E_y' log pi(y'|x)/ref(y'|x)`` with
``y'`` an independent completion of the data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit import log
from rlhfkit.data.io import DataError, Row, read_rows, read_splits
from rlhfkit.data.pairwise import tokenize_response
from rlhfkit.data.preferences import _parquet_rows, parse_comparison, parse_prompt, prompt_key
from rlhfkit.data.records import Comparison, Prompt
from rlhfkit.data.sft import IGNORE_INDEX, collate_sft, parse_messages

UNPAIRED_FIELDS = ("completion", "label")
"""The fields that make a record an unpaired KTO example (``prompt`` is shared with the preference formats)."""
PAIRED_FIELDS = ("chosen", "rejected", "response_a", "response_b", "preferred", "responses", "ranking", "ranked", "tie")
"""Fields of the preference formats (:mod:`rlhfkit.data.preferences`); a record with these is converted."""
KL_PREFIX = "kl_"
"""The keys of a :func:`collate_unpaired` batch that hold its KL pairs' tensors carry this prefix."""


@dataclass(frozen=True)
class UnpairedExample:
    """One completion to a prompt, labelled desirable (thumbs up) or undesirable (thumbs down)."""

    prompt: Prompt
    completion: str
    desirable: bool
    source: str = ""
    """``file:line`` of the record it came from."""


@dataclass
class UnpairedStats:
    records: int = 0
    desirable: int = 0
    undesirable: int = 0
    from_pairs: int = 0
    """Records in a preference format, converted."""
    ties_skipped: int = 0
    truncated: int = 0
    dropped: int = 0
    """Examples whose completion lost every token to ``max_length``."""


def parse_unpaired(row: Row) -> UnpairedExample:
    """An unpaired record (``prompt``, ``completion``, ``label``) as an example, or a DataError naming the field."""
    for field in PAIRED_FIELDS:
        if field in row.data:
            present = next(f for f in UNPAIRED_FIELDS if f in row.data)
            raise row.error(field, f"belongs to a preference format, but the record has the KTO field '{present}'")
    if "prompt" not in row.data:
        raise row.error("prompt", "missing")
    prompt = parse_prompt(row, "prompt")
    if "completion" not in row.data:
        raise row.error("completion", "missing")
    value = row.data["completion"]
    if isinstance(value, list):
        messages = parse_messages(row, "completion")
        if len(messages) != 1 or messages[0][0] != "assistant":
            raise row.error("completion", "a message-list completion must be exactly one assistant turn")
        completion = messages[0][1]
    elif isinstance(value, str):
        completion = row.get_str("completion")
    else:
        raise row.error("completion", f"expected a string or a list of messages, got {type(value).__name__}")
    if "label" not in row.data:
        raise row.error("label", "missing")
    label = row.data["label"]
    if not isinstance(label, bool):
        raise row.error("label", f"expected true (desirable) or false (undesirable), got {json.dumps(label)[:40]}")
    return UnpairedExample(prompt, completion, label, f"{row.path}:{row.line}")


def unpair(comparison: Comparison, source: str = "") -> list[UnpairedExample]:
    """A comparison as KTO examples: its best response desirable, its worst undesirable; a tie (or a ranking whose
    best and worst are tied) gives none."""
    if comparison.extremes_tied:
        return []
    return [
        UnpairedExample(comparison.prompt, comparison.chosen, True, source),
        UnpairedExample(comparison.prompt, comparison.rejected, False, source),
    ]


def parse_record(row: Row, stats: UnpairedStats | None = None) -> list[UnpairedExample]:
    """The examples of one record of either format (see the module docstring)."""
    stats = stats if stats is not None else UnpairedStats()
    stats.records += 1
    if any(f in row.data for f in UNPAIRED_FIELDS):
        return [parse_unpaired(row)]
    if not any(f in row.data for f in PAIRED_FIELDS):
        raise row.error(
            None,
            "unrecognised KTO record: expected 'prompt' + 'completion' + 'label' (true or false), or a preference "
            "record ('chosen' + 'rejected', 'response_a' + 'response_b' + 'preferred', 'responses' + 'ranking', 'ranked')",
        )
    comparison = parse_comparison(row)
    stats.from_pairs += 1
    if comparison.extremes_tied:
        stats.ties_skipped += 1
    return unpair(comparison, f"{row.path}:{row.line}")


def load_unpaired_records(path: str | Path, stats: UnpairedStats | None = None) -> list[list[UnpairedExample]]:
    """Every record of a JSON, JSONL or Parquet file as its examples (a converted pair gives two, a tie none);
    the first bad record raises DataError."""
    path = Path(path)
    rows = _parquet_rows(path) if path.suffix == ".parquet" else read_rows(path)
    return [parse_record(row, stats) for row in rows]


def load_unpaired(path: str | Path) -> list[UnpairedExample]:
    """The examples of a KTO file, in file order (:func:`load_unpaired_records`, flattened)."""
    return [e for record in load_unpaired_records(path) for e in record]


def kl_partners(prompts: Sequence[Prompt], seed: int) -> list[int]:
    """For each example, the index of the example whose completion makes its KL pair: a permutation in which no
    example gets a completion of its own prompt whenever that can be done (no prompt has more than half the
    examples).

    The examples are laid out grouped by prompt (groups, and the examples in each, in a seeded order) and each takes
    the completion ``m`` places before it, cyclically, ``m`` being the largest group: two places ``m`` apart never
    lie in one group. With one completion per prompt that is a seeded shuffle and TRL's rotation ``(x_i, y_{i-1})``;
    converted pairs (each prompt twice) take the completions of the pair before them. Where a prompt has more than
    half the examples, the rotation is by one (some pairs then share a prompt, unavoidably); a single example is its
    own partner.
    """
    n = len(prompts)
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt_key(prompt), []).append(i)
    ordered = list(groups.values())
    rng.shuffle(ordered)
    for group in ordered:
        rng.shuffle(group)
    order = [i for group in ordered for i in group]
    largest = max((len(g) for g in ordered), default=0)
    shift = largest if 2 * largest <= n else 1
    partners = [0] * n
    for k, i in enumerate(order):
        partners[i] = order[(k - shift) % n]
    return partners


def _truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    return ids[:max_length], labels[:max_length], len(ids) > max_length


def tokenize_unpaired(
    tokenizer,
    examples: Sequence[UnpairedExample],
    *,
    max_length: int,
    chat_template: bool = True,
    seed: int = 0,
    stats: UnpairedStats | None = None,
) -> list[dict[str, Any]]:
    """Tokenise examples and their KL pairs (``prompt + completion`` as SFT renders it, labels on the completion).

    Each result holds ``input_ids``, ``labels`` (the example), ``kl_input_ids``, ``kl_labels`` (its prompt with
    its :func:`kl_partners` partner's completion), ``label`` (desirable: True) and ``class_scale`` (examples in
    this split / examples of its class in this split: a per-class mean of a statistic is then the sum of
    ``statistic x class_scale`` over the split divided by its size, as the training loop divides). Sequences
    keep their first ``max_length`` tokens; an example whose completion loses every token is dropped.
    """
    stats = stats if stats is not None else UnpairedStats()
    kept: list[tuple[UnpairedExample, list[int], list[int]]] = []
    for example in examples:
        ids, labels = tokenize_response(tokenizer, example.prompt, example.completion, chat_template=chat_template)
        ids, labels, truncated = _truncate(ids, labels, max_length)
        if all(label == IGNORE_INDEX for label in labels[1:]):
            stats.dropped += 1
            continue
        stats.truncated += truncated
        kept.append((example, ids, labels))
    n_desirable = sum(e.desirable for e, _, _ in kept)
    counts = {True: n_desirable, False: len(kept) - n_desirable}
    stats.desirable += counts[True]
    stats.undesirable += counts[False]
    partners = kl_partners([e.prompt for e, _, _ in kept], seed)
    out = []
    for (example, ids, labels), partner in zip(kept, partners):
        other = kept[partner][0]
        kl_ids, kl_labels = tokenize_response(tokenizer, example.prompt, other.completion, chat_template=chat_template)
        kl_ids, kl_labels, _ = _truncate(kl_ids, kl_labels, max_length)
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "kl_input_ids": kl_ids,
                "kl_labels": kl_labels,
                "label": example.desirable,
                "class_scale": len(kept) / counts[example.desirable],
            }
        )
    return out


def collate_unpaired(
    examples: list[dict], pad_token_id: int, *, packed: bool = False, kl: bool = True
) -> dict[str, torch.Tensor]:
    """A batch of :func:`tokenize_unpaired` examples: their sequences (right-padded or packed, as
    :func:`rlhfkit.data.sft.collate_sft`), ``label`` (B,) bool, ``class_scale`` (B,), and with ``kl`` their KL
    pairs' sequences under :data:`KL_PREFIX` keys (``kl_input_ids``, ...; :func:`kl_batch` takes them out).
    When the examples carry reference log-probs (:mod:`rlhfkit.kto`): ``ref_logps``, ``ref_kl_logps`` (B,)."""
    batch = collate_sft(examples, pad_token_id, packed=packed)
    if kl:
        pairs = [{"input_ids": e["kl_input_ids"], "labels": e["kl_labels"]} for e in examples]
        batch.update({KL_PREFIX + k: v for k, v in collate_sft(pairs, pad_token_id, packed=packed).items()})
    batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
    batch["class_scale"] = torch.tensor([e["class_scale"] for e in examples], dtype=torch.float32)
    if "ref_logps" in examples[0]:
        batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples], dtype=torch.float32)
        batch["ref_kl_logps"] = torch.tensor([e["ref_kl_logps"] for e in examples], dtype=torch.float32)
    return batch


def kl_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The KL pairs of a :func:`collate_unpaired` batch, as a batch of their own (padded or packed as it is)."""
    return {k[len(KL_PREFIX) :]: v for k, v in batch.items() if k.startswith(KL_PREFIX)}


def load_unpaired_splits(
    tokenizer,
    data: str,
    *,
    eval_data: str,
    eval_fraction: float,
    seed: int,
    max_length: int,
    chat_template: bool,
    stage: str = "kto",
) -> tuple[list[dict], list[dict]]:
    """Read a KTO file (either format), split off a held-out set, tokenise both (:func:`tokenize_unpaired`).

    The split is by record, so the two halves of a converted pair stay on one side. Prints what was kept,
    converted, truncated, dropped and skipped.
    """
    stats = UnpairedStats()
    read = load_unpaired_records
    train_r, eval_r = read_splits(read, data, stats, eval_data=eval_data, eval_fraction=eval_fraction, seed=seed, kind="KTO")
    train = tokenize_unpaired(
        tokenizer, [e for r in train_r for e in r], max_length=max_length, chat_template=chat_template, seed=seed, stats=stats
    )
    held_stats = UnpairedStats()
    held = tokenize_unpaired(
        tokenizer, [e for r in eval_r for e in r], max_length=max_length, chat_template=chat_template, seed=seed, stats=held_stats
    )
    log.info(
        f"{stage} data: {len(train)} train examples ({stats.desirable} desirable, {stats.undesirable} undesirable) "
        f"from {len(train_r)} records ({stats.truncated} truncated, {stats.dropped} dropped over max_length={max_length}); "
        f"{stats.from_pairs} of the file's {stats.records} records were preference records, converted "
        f"({stats.ties_skipped} ties skipped); {len(held)} held-out examples"
    )
    if not train:
        if not train_r:
            why = (
                f"all {len(eval_r)} record(s) went to the held-out split (eval_fraction={eval_fraction}); "
                "add records, set eval_fraction=0 or give eval_data"
            )
        else:
            lost = []
            if stats.ties_skipped:
                lost.append(f"{stats.ties_skipped} are ties, which {stage} skips")
            if stats.dropped:
                lost.append(f"{stats.dropped} example(s) lost every completion token to max_length={max_length}")
            why = f"of the {len(train_r)} training record(s), " + "; ".join(lost or ["none gave an example"])
        raise DataError(data, None, None, f"no training examples left: {why}")
    return train, held


COMPLETION_FIELD, LABEL_FIELD = UNPAIRED_FIELDS
"""The field names of an unpaired record, for writers (:func:`unpaired_record`)."""


def unpaired_record(prompt: Prompt, completion: str, desirable: bool, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """An unpaired KTO record as :func:`parse_unpaired` reads it: ``prompt``, ``completion``, ``label``, and
    ``meta`` when given (what human thumbs-up/down annotation writes; the reader ignores ``meta``)."""
    record: dict[str, Any] = {"prompt": prompt, COMPLETION_FIELD: completion, LABEL_FIELD: bool(desirable)}
    if meta is not None:
        record["meta"] = meta
    return record
