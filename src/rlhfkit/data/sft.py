"""Supervised fine-tuning data: records, validation, tokenisation with loss masks.

Accepted formats (JSON list or JSONL, detected per record):

* ``{"prompt": str, "completion": str}`` — the seed format. With
  ``chat_template=True`` (default) the prompt becomes a user turn and the
  completion the assistant turn, rendered with the tokenizer's chat template;
  with ``chat_template=False`` they are concatenated as plain text and EOS is
  appended to the completion (TRL's non-conversational format).
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` — a conversation. Every
  assistant turn is a training target, seen with its full history (system turns
  included) as context, as one causal sequence.

Tokenizers without a chat template get ChatML (:data:`rlhfkit.modeling.models.CHATML_TEMPLATE`).

Labels follow the transformers convention: ``labels[t] = input_ids[t]`` on target
tokens and ``IGNORE_INDEX`` (-100) on prompt, template and padding tokens; the
model shifts them internally (position ``t`` predicts token ``t + 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.data import packing
from rlhfkit.data.io import DataError, Row, read_rows
from rlhfkit.data.records import IGNORE_INDEX

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """One SFT example: a list of ``{"role", "content"}`` turns; assistant turns are targets."""

    messages: tuple[tuple[str, str], ...]
    """(role, content) pairs, in order."""
    source: str
    """``file:line`` of the record, for error messages."""

    def as_dicts(self, upto: int | None = None) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages[:upto]]


def parse_messages(row: Row, field: str = "messages") -> tuple[tuple[str, str], ...]:
    """Validate a chat-message list field of ``row``."""
    messages = row.data.get(field)
    if messages is None:
        raise row.error(field, "missing")
    if not isinstance(messages, list) or not messages:
        raise row.error(field, "expected a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise row.error(where, f"expected an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise row.error(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise row.error(f"{where}.content", f"expected a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise row.error(f"{where}.content", "empty assistant turn")
        out.append((role, content))
    return tuple(out)


def parse_sft_row(row: Row) -> Conversation:
    """Turn one raw record into a :class:`Conversation`, or raise a DataError naming the field."""
    source = f"{row.path}:{row.line}"
    if "messages" in row.data:
        messages = parse_messages(row)
        if not any(role == "assistant" for role, _ in messages):
            raise row.error("messages", "no assistant turn to train on")
        return Conversation(messages, source)
    if "prompt" not in row.data and "completion" not in row.data:
        raise row.error(None, "expected fields 'prompt' and 'completion', or 'messages'")
    prompt = row.get_str("prompt")
    completion = row.get_str("completion")
    return Conversation((("user", prompt), ("assistant", completion)), source)


def load_sft_file(path: str | Path) -> list[Conversation]:
    """Read and validate every record of an SFT file before anything trains."""
    rows = read_rows(path)
    if not rows:
        raise DataError(path, None, None, "no records")
    return [parse_sft_row(row) for row in rows]


def _segments_chat(tokenizer, conv: Conversation) -> list[tuple[str, bool]]:
    """Split the templated conversation into (text, is_target) pieces.

    Piece boundaries come from rendering growing prefixes of the conversation, so
    the target of assistant turn ``i`` is exactly what the template adds after the
    generation prompt of turns ``[0, i)``: the content and the end-of-turn marker.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, (role, _) in enumerate(conv.messages):
        if role != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(conv.as_dicts(i), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conv.as_dicts(i + 1), tokenize=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise DataError(conv.source, None, "messages", "the chat template does not render conversations prefix by prefix")
        pieces.append((prefix[len(done) :], False))
        pieces.append((full[len(prefix) :], True))
        done = full
    return pieces


def _segments_plain(tokenizer, conv: Conversation) -> list[tuple[str, bool]]:
    """Plain concatenation (no template): prompt, then completion + EOS as target."""
    pieces: list[tuple[str, bool]] = []
    for role, content in conv.messages:
        if role == "assistant":
            pieces.append((content + tokenizer.eos_token, True))
        else:
            pieces.append((content, False))
    return pieces


@dataclass
class TokenizeStats:
    kept: int = 0
    truncated: int = 0
    dropped: int = 0


def tokenize_conversation(tokenizer, conv: Conversation, *, chat_template: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and labels (``IGNORE_INDEX`` off-target) for one conversation.

    Each piece is tokenised on its own and the ids concatenated, so the boundary
    between context and target is exact, and matches generation, where the prompt
    is tokenised first and the model continues from it.
    """
    pieces = _segments_chat(tokenizer, conv) if chat_template else _segments_plain(tokenizer, conv)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_target in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if is_target else [IGNORE_INDEX] * len(ids))
    return input_ids, labels


def tokenize_sft(
    tokenizer,
    conversations: list[Conversation],
    *,
    max_length: int,
    overlong: Literal["truncate", "drop"] = "truncate",
    chat_template: bool = True,
) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """Tokenise conversations; truncate (keep the start) or drop those over ``max_length``.

    An example left with no target token after truncation is dropped. Returns the
    examples (dicts with ``input_ids`` and ``labels``) and the counts.
    """
    stats = TokenizeStats()
    examples = []
    for conv in conversations:
        input_ids, labels = tokenize_conversation(tokenizer, conv, chat_template=chat_template)
        if len(input_ids) > max_length:
            if overlong == "drop":
                stats.dropped += 1
                continue
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            # labels[0] never counts (nothing predicts the first token).
            if all(label == IGNORE_INDEX for label in labels[1:]):
                stats.dropped += 1
                continue
            stats.truncated += 1
        examples.append({"input_ids": input_ids, "labels": labels})
        stats.kept += 1
    return examples, stats


def collate_sft(examples: list[dict[str, list[int]]], pad_token_id: int, *, packed: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad a batch, or pack it (``packed=True``: one row, no padding; see :mod:`rlhfkit.data.packing`).

    Padded: ``input_ids`` (B, T), ``attention_mask`` (B, T) with True on real
    tokens, and ``labels`` (B, T) with ``IGNORE_INDEX`` on non-target and padding.
    """
    if packed:
        return packing.pack([[e["input_ids"]] for e in examples], labels=[[e["labels"]] for e in examples])
    length = max(len(e["input_ids"]) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
