"""Prompts: reading a prompt file, and the paths of the data shipped with the package (the demo's)."""

from __future__ import annotations

from pathlib import Path

from rlhfkit.data.io import DataError, read_rows
from rlhfkit.data.sft import parse_messages


def demo_data_path(name: str) -> Path:
    """Path of a shipped demo file (``sft.jsonl``, ``prompts_train.jsonl``, ...)."""
    return Path(__file__).parents[1] / "assets" / "demo" / name


def load_prompts(path: str | Path) -> list:
    """Prompts from a JSON/JSONL file of records with a `prompt` field (string or messages)."""
    prompts: list[str | list[dict[str, str]]] = []
    for row in read_rows(path):
        value = row.data.get("prompt")
        if isinstance(value, list):
            prompts.append([{"role": r, "content": c} for r, c in parse_messages(row, "prompt")])
        else:
            prompts.append(row.get_str("prompt"))
    if not prompts:
        raise DataError(path, None, "prompt", "no prompts")
    return prompts
