"""Samples files: what ``rlhfkit sample`` writes and the labelling stages (``rlhfkit label``, ``rlhfkit cai-label``)
read, records with a ``prompt`` and K >= 2 ``responses`` to it (and ``prompt_index`` and ``temperatures``, which
readers ignore)."""

from __future__ import annotations

from pathlib import Path

from rlhfkit.data.io import DataError, read_rows
from rlhfkit.data.preferences import parse_prompt
from rlhfkit.data.records import Prompt


def load_items(path: str | Path) -> list[tuple[Prompt, list[str]]]:
    """(prompt, responses) items from a samples file, in file order.

    A prompt is what a comparison holds (:func:`rlhfkit.data.preferences.parse_prompt`): a non-empty string, or a
    chat-message list ending with a user turn (as ``{role, content}`` dicts); anything else, responses that are not
    a list of at least 2 strings, or a file without records, is a DataError."""
    items = []
    for row in read_rows(path):
        prompt = parse_prompt(row, "prompt")
        responses = row.data.get("responses")
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise row.error("responses", "expected a list of at least 2 strings")
        items.append((prompt, responses))
    if not items:
        raise DataError(path, None, None, "no items (an empty samples file)")
    return items
