"""What annotators will label: pairs read from ``rlhfkit sample``'s output or from seed-format pairs.

:func:`read_pairs` takes the output of ``rlhfkit sample`` (``prompt`` + ``responses`` with exactly two entries) or
seed-format pairs (``prompt``, ``response_a``, ``response_b``; a ``preferred`` already there is ignored, the pair is
labelled afresh). :func:`read_thumb_items` takes the same files (and single completions) for thumbs mode: every
response is an item of its own.
"""

from __future__ import annotations

from pathlib import Path

from rlhfkit.data.io import DataError, Row, read_rows
from rlhfkit.data.preferences import comparison_from_dict, parse_prompt
from rlhfkit.feedback.web.store import PairItem, ThumbItem


def read_pairs(path: str | Path) -> tuple[list[PairItem], int]:
    """The pairs in ``path`` and how many records were left out for an empty response.

    Prompts are validated and normalised exactly as the preference loaders will
    read the exported labels (:func:`rlhfkit.data.preferences.comparison_from_dict`),
    so every label collected can be trained on. Problems are DataErrors naming
    file, line and field. A record with an empty response (a sample that stopped
    at once) cannot be a training pair and is left out, as the terminal annotator does.
    """
    items, empty = [], 0
    for index, row in enumerate(read_rows(path)):
        responses = _pair_responses(row)
        if any(not r.strip() for r in responses):
            empty += 1
            continue
        parsed = comparison_from_dict(
            {"prompt": row.data.get("prompt"), "responses": responses, "ranking": [0, 1]}, path=row.path, line=row.line
        )
        items.append(PairItem(index, parsed.prompt, (parsed.responses[0], parsed.responses[1])))
    if not items:
        raise DataError(path, None, None, "no pairs to label")
    return items, empty


def _pair_responses(row: Row) -> list[str]:
    if "response_a" in row.data or "response_b" in row.data:
        return [row.get_str("response_a", allow_empty=True), row.get_str("response_b", allow_empty=True)]
    if "responses" not in row.data:
        raise row.error("responses", "missing: expected `responses` (rlhfkit sample output) or `response_a` + `response_b`")
    responses = row.data["responses"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise row.error("responses", "expected a list of response strings")
    if len(responses) != 2:
        raise row.error(
            "responses", f"the web annotator compares pairs; got {len(responses)} responses (sample with two temperatures)"
        )
    return responses


def read_thumb_items(path: str | Path) -> tuple[list[ThumbItem], int]:
    """Thumbs mode: every response of every record in ``path`` as one item, and how many were left out as empty.

    Records are ``rlhfkit sample`` output (``prompt`` + ``responses``, any number of them), seed pairs
    (``response_a``, ``response_b``) or single completions (``prompt`` + ``completion``). Items are numbered
    record by record, response by response (an empty response keeps its number, so numbers do not shift
    when the file is read again). Prompts are validated as the KTO reader will read the export
    (:func:`rlhfkit.data.preferences.parse_prompt`); problems are DataErrors naming file, line and field.
    """
    items, empty, index = [], 0, 0
    for row in read_rows(path):
        prompt = parse_prompt(row, "prompt")
        for response in _thumb_responses(row):
            if response.strip():
                items.append(ThumbItem(index, prompt, response))
            else:
                empty += 1
            index += 1
    if not items:
        raise DataError(path, None, None, "no responses to rate")
    return items, empty


def _thumb_responses(row: Row) -> list[str]:
    if "completion" in row.data:
        return [row.get_str("completion", allow_empty=True)]
    if "response_a" in row.data or "response_b" in row.data:
        return [row.get_str("response_a", allow_empty=True), row.get_str("response_b", allow_empty=True)]
    if "responses" not in row.data:
        raise row.error(
            "responses", "missing: expected `responses` (rlhfkit sample output), `response_a` + `response_b` or `completion`"
        )
    responses = row.data["responses"]
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        raise row.error("responses", "expected a non-empty list of response strings")
    return responses
