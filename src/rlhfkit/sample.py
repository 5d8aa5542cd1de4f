"""Sampling responses to label: ``rlhfkit sample CONFIG.yaml`` / :func:`run`.

For every prompt, one response per entry of ``temperatures`` (the seed design:
two responses, at 0.7 and 1.2, so pairs differ in quality). Generation is
batched with a KV cache (:class:`rlhfkit.rollout.HFGenerator`). Each finished
prompt is appended to the output JSONL and flushed at once, so a crash loses at
most the batch in flight; a re-run skips prompts already written (by
``prompt_index``) and drops a torn last line, so nothing is duplicated or lost.

Output records: ``{"prompt_index", "prompt", "responses": [...], "temperatures": [...]}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhfkit import models
from rlhfkit.data.io import DataError, read_rows
from rlhfkit.rollout import GenerationOptions, HFGenerator


@dataclass
class SampleConfig:
    """Config of the sampling stage."""

    model: str = models.TINY
    """Model spec to sample from (usually the SFT output directory)."""
    prompts: str = ""
    """JSONL/JSON of records with a `prompt` field (string or chat-message list). Empty: the shipped demo prompts."""
    output: str = "runs/samples.jsonl"
    """Output JSONL (appended to; re-runs resume)."""
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.2])
    """One response per temperature per prompt."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 96
    """Maximum response length in tokens."""
    stop: list[str] = field(default_factory=list)
    """Cut each response at the first occurrence of any of these strings, which is not kept (as the
    ``stop`` of OpenAI-style APIs); e.g. ``["\\n\\n"]`` keeps the first paragraph. Leading whitespace
    is dropped first, so a response that opens with a blank line is not cut to nothing."""
    batch_size: int = 16
    """Prompts generated together."""
    max_prompts: int = -1
    """Use only the first N prompts (-1: all)."""
    seed: int = 0
    """Sampling seed (each batch is reseeded from it and its first prompt index)."""
    precision: str = "bf16"
    """Compute precision for generation."""
    progress: bool = True
    """Show a progress bar."""


def load_prompts(path: str | Path) -> list:
    """Prompts from a JSON/JSONL file of records with a `prompt` field (string or messages)."""
    from rlhfkit.data.sft import parse_messages

    prompts = []
    for row in read_rows(path):
        value = row.data.get("prompt")
        if isinstance(value, list):
            prompts.append([{"role": r, "content": c} for r, c in parse_messages(row, "prompt")])
        else:
            prompts.append(row.get_str("prompt"))
    if not prompts:
        raise DataError(path, None, "prompt", "no prompts")
    return prompts


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` without surrounding whitespace, cut at the first occurrence of any ``stop`` string.

    ``cut_at_stop("  Hi.\\n\\nMore", ["\\n\\n"]) == "Hi."``; no ``stop``: just stripped.
    """
    text = text.strip()
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut].strip()


def _done_indices(output: Path) -> set[int]:
    """Indices already written; a torn (unparseable) last line is cut off."""
    if not output.exists():
        return set()
    raw = output.read_bytes()
    lines = raw.split(b"\n")
    done: set[int] = set()
    good = 0
    for i, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            done.add(int(json.loads(line)["prompt_index"]))
        except (ValueError, KeyError):
            if i >= len(lines) - 2:  # torn final write: truncate it
                with open(output, "r+b") as f:
                    f.truncate(good)
                break
            raise DataError(output, i + 1, "prompt_index", "unreadable sample record in the middle of the file")
        good += len(line) + 1
    return done


def run(config: SampleConfig) -> Path:
    """Generate samples; returns the output path."""
    from rlhfkit.sft import demo_data_path

    prompts = load_prompts(config.prompts or demo_data_path("prompts_train.jsonl"))
    if config.max_prompts > 0:
        prompts = prompts[: config.max_prompts]
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = _done_indices(output)
    todo = [i for i in range(len(prompts)) if i not in done]
    if not todo:
        print(f"sample: all {len(prompts)} prompts already in {output}")
        return output
    tokenizer = models.load_tokenizer(config.model)
    model = models.load_causal_lm(config.model).eval()
    generator = HFGenerator(model, tokenizer, precision=config.precision)
    bar = tqdm(total=len(prompts), initial=len(done), unit="prompt", disable=not config.progress, desc="sample")
    with open(output, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start : start + config.batch_size]
            torch.manual_seed(config.seed * 1_000_003 + batch[0])
            responses = [
                generator.generate([prompts[i] for i in batch], GenerationOptions(config.max_new_tokens, t, config.top_p))
                for t in config.temperatures
            ]
            for j, index in enumerate(batch):
                record = {
                    "prompt_index": index,
                    "prompt": prompts[index],
                    "responses": [cut_at_stop(r[j], config.stop) for r in responses],
                    "temperatures": list(config.temperatures),
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    return output
