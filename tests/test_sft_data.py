"""SFT tokenisation: loss masks token by token, padding, over-long examples.

Expected labels are built independently of :mod:`rlhfkit.data.sft`: the chat
text is written out by hand (ChatML, as SmolLM2's template renders it), the
whole string is tokenised in one go, and each token is labelled by whether its
character span lies inside an assistant turn's content + end-of-turn marker.
"""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data.sft import IGNORE_INDEX, collate_sft, load_sft_file, tokenize_sft
from tests.helpers import write_jsonl

# SmolLM2's template inserts this system turn when a conversation has none.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_END = "<|im_end|>"


def chatml(turns: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The ChatML text of ``turns`` and the character spans that are training targets.

    A target span is an assistant turn's content plus the end-of-turn marker
    ``<|im_end|>\\n`` that the template writes after it.
    """
    text, spans = "", []
    for role, content in turns:
        text += f"<|im_start|>{role}\n"
        start = len(text)
        text += f"{content}{IM_END}\n"
        if role == "assistant":
            spans.append((start, len(text)))
    return text, spans


def expected_tokens(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenise ``text`` whole; label = id for tokens inside a span, IGNORE_INDEX elsewhere."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token_id, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = [a >= s and b <= e for s, e in spans]
        straddles = [a < s < b or a < e < b for s, e in spans]
        assert not any(straddles), f"token {text[a:b]!r} crosses a target boundary"
        labels.append(token_id if any(inside) else IGNORE_INDEX)
    return enc["input_ids"], labels


def target_texts(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """Decode each maximal run of labelled tokens."""
    runs, current = [], []
    for token_id, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token_id
            current.append(token_id)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def tokenize_one(tokenizer, path, **kwargs) -> dict[str, list[int]]:
    examples, stats = tokenize_sft(tokenizer, load_sft_file(path), max_length=kwargs.pop("max_length", 512), **kwargs)
    assert stats.kept == 1 and stats.dropped == 0 and stats.truncated == 0
    return examples[0]


def test_chatml_reference_matches_tokenizer_template(tokenizer):
    # Guards the hand-written reference itself: if the tokenizer's template
    # changed, the masking tests below would compare against the wrong text.
    turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")]
    rendered = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False)
    assert rendered == chatml(turns)[0]


def test_prompt_completion_masking_token_by_token(tokenizer, tmp_path):
    prompt, completion = "What is the capital of France?", "Paris is the capital."
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}])
    example = tokenize_one(tokenizer, path)

    text, spans = chatml([("system", SMOLLM2_DEFAULT_SYSTEM), ("user", prompt), ("assistant", completion)])
    want_ids, want_labels = expected_tokens(tokenizer, text, spans)

    assert example["input_ids"] == want_ids
    assert len(example["labels"]) == len(want_labels)
    for t, (got, want) in enumerate(zip(example["labels"], want_labels)):
        assert got == want, f"position {t} ({tokenizer.decode([want_ids[t]])!r}): label {got}, expected {want}"
    assert target_texts(tokenizer, example["input_ids"], example["labels"]) == [completion + IM_END + "\n"]
    # The assistant header is context, the end-of-turn token is a target.
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    first_target = next(t for t, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert example["input_ids"][first_target - len(header) : first_target] == header
    assert all(x == IGNORE_INDEX for x in example["labels"][:first_target])
    assert example["labels"][-2] == eos


def test_messages_masking_token_by_token(tokenizer, tmp_path):
    turns = [
        ("system", "You answer in one short sentence."),
        ("user", "Hi, who are you?"),
        ("assistant", "I am a small test model."),
        ("user", "What can you do?"),
        ("assistant", "I can repeat what I was trained on."),
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": r, "content": c} for r, c in turns]}])
    example = tokenize_one(tokenizer, path)

    text, spans = chatml(turns)  # has a system turn, so no default one is added
    want_ids, want_labels = expected_tokens(tokenizer, text, spans)

    assert example["input_ids"] == want_ids
    for t, (got, want) in enumerate(zip(example["labels"], want_labels, strict=True)):
        assert got == want, f"position {t} ({tokenizer.decode([want_ids[t]])!r}): label {got}, expected {want}"
    # Exactly the two assistant turns (content + end-of-turn marker) are targets;
    # the system turn, user turns and all template tokens are masked.
    assert target_texts(tokenizer, example["input_ids"], example["labels"]) == [
        turns[2][1] + IM_END + "\n",
        turns[4][1] + IM_END + "\n",
    ]
    n_targets = sum(x != IGNORE_INDEX for x in example["labels"])
    n_content = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for r, c in turns if r == "assistant")
    assert n_targets == n_content + 2 * 2  # + "<|im_end|>" and "\n" per assistant turn


def test_plain_mode_labels_completion_and_eos(tokenizer, tmp_path):
    prompt, completion = "Question: two plus two?", " Answer: four."
    path = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": prompt, "completion": completion}])
    example = tokenize_one(tokenizer, path, chat_template=False)

    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert example["input_ids"] == prompt_ids + completion_ids + [eos]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [eos]
    assert "<|im_start|>" not in tokenizer.decode(example["input_ids"])


def test_collate_pads_right_with_ignored_labels():
    pad = 7
    examples = [
        {"input_ids": [11, 12, 13, 14, 15], "labels": [-100, -100, 13, 14, 15]},
        {"input_ids": [21, 22], "labels": [-100, 22]},
    ]
    batch = collate_sft(examples, pad)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15], [21, 22, pad, pad, pad]]
    assert batch["labels"].tolist() == [[-100, -100, 13, 14, 15], [-100, 22, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def _overlong_data(tokenizer, tmp_path):
    """One short and one long plain-mode record, with their token counts."""
    short = {"prompt": "Hi.", "completion": " Yes."}
    long = {
        "prompt": "Please count slowly from one up to ten for me, in English words.",
        "completion": " one two three four five six seven eight nine ten",
    }
    path = write_jsonl(tmp_path / "overlong.jsonl", [short, long])
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    lengths = {
        "short": count(short["prompt"]) + count(short["completion"]) + 1,
        "long_prompt": count(long["prompt"]),
        "long": count(long["prompt"]) + count(long["completion"]) + 1,
    }
    return load_sft_file(path), lengths


def test_overlong_truncate_keeps_max_length_tokens(tokenizer, tmp_path):
    conversations, n = _overlong_data(tokenizer, tmp_path)
    max_length = n["long_prompt"] + 3  # three target tokens survive
    assert n["short"] <= max_length < n["long"]
    examples, stats = tokenize_sft(tokenizer, conversations, max_length=max_length, overlong="truncate", chat_template=False)
    assert (stats.kept, stats.truncated, stats.dropped) == (2, 1, 0)
    assert len(examples[0]["input_ids"]) == n["short"]
    full, _ = tokenize_sft(tokenizer, conversations[1:], max_length=10_000, chat_template=False)
    assert examples[1]["input_ids"] == full[0]["input_ids"][:max_length]  # the start is kept
    assert examples[1]["labels"] == full[0]["labels"][:max_length]
    assert sum(x != IGNORE_INDEX for x in examples[1]["labels"]) == 3


def test_overlong_drop_drops_and_counts(tokenizer, tmp_path):
    conversations, n = _overlong_data(tokenizer, tmp_path)
    examples, stats = tokenize_sft(tokenizer, conversations, max_length=n["long"] - 1, overlong="drop", chat_template=False)
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 0, 1)
    assert len(examples) == 1 and len(examples[0]["input_ids"]) == n["short"]


@pytest.mark.parametrize("extra", [0, -2])
def test_truncation_that_cuts_all_targets_drops(tokenizer, tmp_path, extra):
    conversations, n = _overlong_data(tokenizer, tmp_path)
    max_length = n["long_prompt"] + extra  # nothing of the completion fits
    assert max_length >= n["short"]
    examples, stats = tokenize_sft(tokenizer, conversations, max_length=max_length, overlong="truncate", chat_template=False)
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 0, 1)
    assert len(examples) == 1


def test_truncation_keeping_one_target_is_kept(tokenizer, tmp_path):
    conversations, n = _overlong_data(tokenizer, tmp_path)
    examples, stats = tokenize_sft(
        tokenizer, conversations, max_length=n["long_prompt"] + 1, overlong="truncate", chat_template=False
    )
    assert (stats.kept, stats.truncated, stats.dropped) == (2, 1, 0)
    assert sum(x != IGNORE_INDEX for x in examples[1]["labels"]) == 1
