"""Scored offline data for ILQL: (prompt, response, reward) triples, tokenisation, batches.

A scored file is JSON (a list) or JSONL; its format is detected **per record**:

* **scored** (the native format): ``prompt`` (a string, or a chat-message list ending with a user turn),
  ``response`` (a string) and ``reward`` (a finite number): one example.
* **scored samples**: an ``rlhfkit sample`` record (``prompt``, ``responses``: a list of strings) with a list of
  the same length of finite numbers under ``scores`` or ``rewards`` (a scorer's, a reward model's or gold scores
  written beside the samples): one example per response.
* **preferences**: any record :mod:`rlhfkit.data.preferences` reads (``chosen``/``rejected``, rlhfkit's label
  records, hh-rlhf, rankings): the best response gets ``chosen_reward`` and the worst ``rejected_reward``
  (TRLX's hh example: +1 / -1); a tie gives nothing and is counted as skipped.

The reward is a whole response's: ILQL puts it on the response's last token (sparse), as TRLX does. A response
cut by ``max_length`` keeps its reward on its last kept token; one that loses every token is dropped.

Every problem is a :class:`~rlhfkit.data.io.DataError` naming file, line and field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlhfkit import log
from rlhfkit.data.io import DataError, Row, read_rows, read_splits
from rlhfkit.data.pairwise import tokenize_response
from rlhfkit.data.preferences import parse_comparison, parse_prompt
from rlhfkit.data.records import IGNORE_INDEX, Prompt
from rlhfkit.data.sft import collate_sft

SCORE_FIELDS = ("scores", "rewards")
"""The fields that may hold a scored-samples record's per-response numbers."""
PREFERENCE_FIELDS = ("chosen", "rejected", "response_a", "response_b", "preferred", "ranking", "ranked", "tie")
"""Fields of the preference formats (:mod:`rlhfkit.data.preferences`); a record with one is converted."""


@dataclass(frozen=True)
class ScoredExample:
    """One response to a prompt and its scalar reward."""

    prompt: Prompt
    response: str
    reward: float
    source: str = ""
    """``file:line`` of the record it came from."""


@dataclass
class OfflineStats:
    records: int = 0
    examples: int = 0
    from_samples: int = 0
    """Scored-samples records (one example per response)."""
    from_preferences: int = 0
    """Preference records, converted."""
    ties_skipped: int = 0
    truncated: int = 0
    dropped: int = 0
    """Examples whose response lost every token to ``max_length``."""


def _number(row: Row, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise row.error(field, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise row.error(field, f"expected a finite number, got {value}")
    return float(value)


def _scored(row: Row) -> ScoredExample:
    prompt = parse_prompt(row, "prompt") if "prompt" in row.data else None
    if prompt is None:
        raise row.error("prompt", "missing")
    response = row.get_str("response")
    if "reward" not in row.data:
        raise row.error("reward", "missing")
    return ScoredExample(prompt, response, _number(row, "reward", row.data["reward"]), f"{row.path}:{row.line}")


def _scored_samples(row: Row) -> list[ScoredExample]:
    if "prompt" not in row.data:
        raise row.error("prompt", "missing")
    prompt = parse_prompt(row, "prompt")
    responses = row.data["responses"]
    if not isinstance(responses, list) or not responses:
        raise row.error("responses", "expected a non-empty list of strings")
    present = [f for f in SCORE_FIELDS if f in row.data]
    if len(present) != 1:
        problem = "both 'scores' and 'rewards' given; keep one" if present else "missing (or 'rewards')"
        raise row.error("scores", problem)
    field = present[0]
    scores = row.data[field]
    if not isinstance(scores, list) or len(scores) != len(responses):
        got = f"{len(scores)} numbers" if isinstance(scores, list) else type(scores).__name__
        raise row.error(field, f"expected a list of {len(responses)} numbers (one per response), got {got}")
    out = []
    for i, (response, score) in enumerate(zip(responses, scores)):
        if not isinstance(response, str) or not response.strip():
            raise row.error(f"responses[{i}]", "expected a non-empty string")
        out.append(ScoredExample(prompt, response, _number(row, f"{field}[{i}]", score), f"{row.path}:{row.line}"))
    return out


def parse_scored_record(
    row: Row, stats: OfflineStats, *, chosen_reward: float = 1.0, rejected_reward: float = -1.0
) -> list[ScoredExample]:
    """The examples of one record of any accepted format (see the module docstring)."""
    stats.records += 1
    if "response" in row.data or "reward" in row.data:
        return [_scored(row)]
    if "responses" in row.data and any(f in row.data for f in SCORE_FIELDS):
        stats.from_samples += 1
        return _scored_samples(row)
    if "responses" in row.data or any(f in row.data for f in PREFERENCE_FIELDS):
        comparison = parse_comparison(row)
        stats.from_preferences += 1
        if comparison.extremes_tied:  # a tie, or a ranking whose best and worst are tied
            stats.ties_skipped += 1
            return []
        source = f"{row.path}:{row.line}"
        return [
            ScoredExample(comparison.prompt, comparison.chosen, chosen_reward, source),
            ScoredExample(comparison.prompt, comparison.rejected, rejected_reward, source),
        ]
    raise row.error(
        None,
        "unrecognised scored record: expected 'prompt' + 'response' + 'reward', 'prompt' + 'responses' + 'scores' "
        "(or 'rewards'), or a preference record ('chosen' + 'rejected', 'responses' + 'ranking', ...)",
    )


def load_scored_records(
    path: str | Path, stats: OfflineStats | None = None, *, chosen_reward: float = 1.0, rejected_reward: float = -1.0
) -> list[list[ScoredExample]]:
    """Every record of a JSON or JSONL file as its examples; the first bad record raises DataError."""
    stats = stats if stats is not None else OfflineStats()
    rows = read_rows(path)
    return [parse_scored_record(r, stats, chosen_reward=chosen_reward, rejected_reward=rejected_reward) for r in rows]


def tokenize_scored(
    tokenizer,
    examples: Sequence[ScoredExample],
    *,
    max_length: int,
    chat_template: bool = True,
    stats: OfflineStats | None = None,
) -> list[dict[str, Any]]:
    """Tokenise examples as SFT renders ``prompt + response`` (labels on the response tokens, the end-of-turn
    marker or EOS included). Each result: ``input_ids``, ``labels`` (:data:`IGNORE_INDEX` off the response) and
    ``reward`` (float). Sequences keep their first ``max_length`` tokens; one with no response token left is dropped."""
    stats = stats if stats is not None else OfflineStats()
    out = []
    for example in examples:
        ids, labels = tokenize_response(tokenizer, example.prompt, example.response, chat_template=chat_template)
        truncated = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            stats.dropped += 1
            continue
        stats.truncated += truncated
        stats.examples += 1
        out.append({"input_ids": ids, "labels": labels, "reward": example.reward})
    return out


def collate_scored(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch of :func:`tokenize_scored` examples: ``input_ids``, ``attention_mask``, ``labels``
    (B, T) as :func:`rlhfkit.data.sft.collate_sft`, and ``rewards`` (B,) float32 (each sequence's reward, which
    ILQL puts on its last response token). Position ``t`` predicts ``labels[t + 1]``."""
    batch = collate_sft(examples, pad_token_id, packed=False)
    batch["rewards"] = torch.tensor([e["reward"] for e in examples], dtype=torch.float32)
    return batch


def normalize_rewards(train: list[dict], held: list[dict]) -> tuple[float, float]:
    """Standardise the rewards of both splits with the training split's mean and standard deviation, in place
    (TRLX standardises ILQL's rewards so); returns ``(mean, std)``. A std of 0 (all rewards equal) leaves the
    scale at 1, so the rewards become 0."""
    rewards = torch.tensor([e["reward"] for e in train], dtype=torch.float64)
    mean = float(rewards.mean())
    std = float(rewards.std(unbiased=False)) if len(train) > 1 else 0.0
    scale = std if std > 0 else 1.0
    for example in (*train, *held):
        example["reward"] = (example["reward"] - mean) / scale
    return mean, std


def load_scored_splits(
    tokenizer,
    data: str,
    *,
    eval_data: str,
    eval_fraction: float,
    seed: int,
    max_length: int,
    chat_template: bool,
    chosen_reward: float = 1.0,
    rejected_reward: float = -1.0,
    stage: str = "ilql",
) -> tuple[list[dict], list[dict]]:
    """Read a scored file (any format), split off a held-out set by record, tokenise both (:func:`tokenize_scored`).
    Prints what was kept, converted, truncated, dropped and skipped."""
    stats = OfflineStats()
    read = partial(load_scored_records, chosen_reward=chosen_reward, rejected_reward=rejected_reward)
    train_r, eval_r = read_splits(read, data, stats, eval_data=eval_data, eval_fraction=eval_fraction, seed=seed, kind="scored")
    train = tokenize_scored(
        tokenizer, [e for r in train_r for e in r], max_length=max_length, chat_template=chat_template, stats=stats
    )
    held = tokenize_scored(tokenizer, [e for r in eval_r for e in r], max_length=max_length, chat_template=chat_template)
    log.info(
        f"{stage} data: {len(train)} train examples from {len(train_r)} records ({stats.truncated} truncated, "
        f"{stats.dropped} dropped over max_length={max_length}); {stats.from_samples} scored-samples and "
        f"{stats.from_preferences} preference records of the file's {stats.records} ({stats.ties_skipped} ties "
        f"skipped); {len(held)} held-out examples"
    )
    if not train:
        raise DataError(
            data,
            None,
            None,
            f"no training examples left ({stats.ties_skipped} ties skipped, {stats.dropped} dropped over "
            f"max_length={max_length}, {len(eval_r)} records held out)",
        )
    return train, held
