"""What annotators will label: pairs read from ``rlhfkit sample``'s output or from seed-format pairs.

:func:`read_pairs` takes the output of ``rlhfkit sample`` (``prompt`` + ``responses`` with exactly two entries) or
seed-format pairs (``prompt``, ``response_a``, ``response_b``; a ``preferred`` already there is ignored, the pair is
labelled afresh). :func:`read_thumb_items` takes the same files (and single completions) for thumbs mode: every
response is an item of its own. :func:`read_checks` takes check questions: pairs in the same formats with the
known answer in ``expected``.
"""

from __future__ import annotations

from pathlib import Path

from rlhfkit.data.io import DataError, Row, read_rows
from rlhfkit.data.preferences import comparison_from_dict, parse_prompt
from rlhfkit.feedback.web.store import CHECK_ANSWERS, CheckItem, PairItem, ThumbItem


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


CHECK_FIELD = "expected"
"""The field of a checks-file record that names the better response."""


def read_checks(path: str | Path) -> list[CheckItem]:
    """The check questions in ``path``: pairs in :func:`read_pairs`' formats plus ``"expected": "a"`` or ``"b"``,
    the better response in the file's order (``a`` = ``responses[0]`` / ``response_a``).

    Every record must be a usable check (both responses non-empty, ``expected`` given and valid): a bad one is
    a DataError naming file, line and field, since a check with a wrong or missing answer would mark annotators
    wrong for being right.
    """
    checks = []
    for index, row in enumerate(read_rows(path)):
        responses = _pair_responses(row)
        for side, response in zip(("a", "b"), responses):
            if not response.strip():
                raise row.error("responses", f"response {side} is empty; a check question needs two responses to compare")
        if CHECK_FIELD not in row.data:
            raise row.error(CHECK_FIELD, 'missing: a check question names its better response, "a" or "b"')
        expected = row.data[CHECK_FIELD]
        if expected not in CHECK_ANSWERS:
            raise row.error(
                CHECK_FIELD,
                f'expected "a" (response_a / responses[0] is better) or "b", got {expected!r}; ties make no check question',
            )
        parsed = comparison_from_dict(
            {"prompt": row.data.get("prompt"), "responses": responses, "ranking": [0, 1]}, path=row.path, line=row.line
        )
        checks.append(CheckItem(index, parsed.prompt, (parsed.responses[0], parsed.responses[1]), expected))
    if not checks:
        raise DataError(path, None, None, "no check questions")
    return checks


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
