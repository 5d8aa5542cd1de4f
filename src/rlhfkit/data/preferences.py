"""Preference data: read and write :class:`~rlhfkit.data.records.Comparison` records.

Files are JSON (a list of objects), JSONL, or Parquet (``.parquet``; a row's
"line" is its 1-based row index). The format is detected **per record** from
its fields, so a file may mix formats:

* **rlhfkit / rankings** (``responses``): ``prompt``, ``responses`` (K >= 2
  strings), ``ranking`` (indices into ``responses``, best first), optional
  ``tie`` (pairs only) and optional ``ties`` (K > 2 only: ``[[i, j], ...]``, the
  pairs of responses judged equally good). This is what :func:`save_comparisons` writes by default
  and it round-trips exactly.
* **ranked list** (``ranked``): ``prompt``, ``ranked`` (K >= 2 strings, best first).
* **seed** (``response_a``/``response_b``/``preferred``): ``prompt``,
  ``response_a``, ``response_b``, ``preferred`` in ``"a" | "b" | "tie"``.
* **TRL pairs** (``chosen``/``rejected`` with ``prompt``): each of the three is a
  string or a chat-message list; a chosen/rejected list holds the assistant reply
  (its last turn). Earlier turns in it must be empty, or be an exact copy of the
  prompt (the UltraFeedback-binarized layout) -- anything else would be dropped
  silently, so it is an error.
* **TRL implicit prompt** (``chosen``/``rejected`` lists, no ``prompt``): two whole
  conversations; their shared leading turns are the prompt (it must end with a
  user turn) and what follows is one assistant reply each.
* **Anthropic hh-rlhf** (``chosen``/``rejected`` strings, no ``prompt``):
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` transcripts. The turns before the last
  ``Assistant:`` turn are the prompt (roles user/assistant, text stripped) and must
  be the same in chosen and rejected; the last Assistant turn is the response.

Every format may also carry ``reason`` (str), ``source`` (str; ``"dataset"``
when absent) and ``meta`` (an object). Other fields (``prompt_id``,
``score_chosen``...) are ignored. A record with fields of two formats (say
``chosen`` and ``responses``) is an error rather than a guess. Chat prompts are
validated with :func:`rlhfkit.data.sft.parse_messages` and must end with a user
turn. Every problem is a :class:`~rlhfkit.data.io.DataError` naming file, line
and field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from rlhfkit.data.io import DataError, Row, atomic_open, atomic_write_text, json_problem, read_rows, write_jsonl
from rlhfkit.data.records import Comparison, Message, Prompt
from rlhfkit.data.sft import parse_messages

DEFAULT_SOURCE = "dataset"
"""``Comparison.source`` for imported records that do not say who labelled them."""

SaveFormat = Literal["rlhfkit", "seed", "trl"]

# The fields that identify each format. A record must use exactly one family;
# prompt/reason/source/meta are shared by all of them.
_FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "rlhfkit": ("responses", "ranking", "tie", "ties"),
    "ranked": ("ranked",),
    "seed": ("response_a", "response_b", "preferred"),
    "pair": ("chosen", "rejected"),
}

_PREFERRED_RANKING = {"a": [0, 1], "b": [1, 0], "tie": [0, 1]}

# hh-rlhf turn markers. The first turn may or may not be preceded by "\n\n".
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_comparisons(path: str | Path) -> list[Comparison]:
    """Read every record of a JSON, JSONL or Parquet file; the first bad one raises DataError."""
    path = Path(path)
    rows = _parquet_rows(path) if path.suffix == ".parquet" else read_rows(path)
    return [parse_comparison(row) for row in rows]


def comparison_from_dict(data: dict[str, Any], *, path: str = "<dict>", line: int | None = None) -> Comparison:
    """Parse one record in any supported format; ``path``/``line`` only label errors."""
    if not isinstance(data, dict):
        raise DataError(path, line, None, f"expected an object, got {type(data).__name__}")
    return parse_comparison(Row(path, line, data))  # type: ignore[arg-type]  # line None = no line


def parse_comparison(row: Row) -> Comparison:
    """Detect the format of one raw record and turn it into a :class:`Comparison`."""
    family = _detect(row)
    tie, ties = False, []
    if family == "rlhfkit":
        prompt = _prompt(row)
        responses = _response_list(row, "responses")
        ranking = _ranking(row, len(responses))
        tie = _tie(row, len(responses))
        ties = _ties(row, len(responses))
    elif family == "ranked":
        prompt = _prompt(row)
        responses = _response_list(row, "ranked")
        ranking = list(range(len(responses)))
    elif family == "seed":
        prompt = _prompt(row)
        responses = [row.get_str("response_a"), row.get_str("response_b")]
        preferred = row.data.get("preferred")
        if "preferred" not in row.data:
            raise row.error("preferred", "missing")
        if not isinstance(preferred, str) or preferred not in _PREFERRED_RANKING:  # a list or object is unhashable
            shown = f"a {type(preferred).__name__}" if isinstance(preferred, (list, dict)) else repr(preferred)
            raise row.error("preferred", f"preferred must be 'a', 'b' or 'tie', got {shown}")
        ranking = list(_PREFERRED_RANKING[preferred])
        tie = preferred == "tie"
    else:
        prompt, responses = _pair(row)
        ranking = [0, 1]
    return Comparison(prompt, responses, ranking, tie=tie, ties=ties, **_optional_fields(row))


def _detect(row: Row) -> str:
    """The format family of ``row`` (a key of ``_FORMAT_FIELDS``)."""
    found = [
        (family, next(f for f in fields if f in row.data))
        for family, fields in _FORMAT_FIELDS.items()
        if any(f in row.data for f in fields)
    ]
    if not found:
        raise row.error(
            None,
            "unrecognised preference record: expected 'responses' + 'ranking', 'ranked', "
            "'response_a' + 'response_b' + 'preferred', or 'chosen' + 'rejected'",
        )
    if len(found) > 1:
        (_, first), (_, other) = found[:2]
        raise row.error(other, f"belongs to a different preference format than field '{first}'")
    return found[0][0]


def _optional_fields(row: Row) -> dict[str, Any]:
    out: dict[str, Any] = {"reason": "", "source": DEFAULT_SOURCE, "meta": {}}
    for field in ("reason", "source"):
        if field in row.data:
            out[field] = row.get_str(field, allow_empty=True)
    if "meta" in row.data:
        if not isinstance(row.data["meta"], dict):
            raise row.error("meta", f"expected an object, got {type(row.data['meta']).__name__}")
        out["meta"] = row.data["meta"]
    return out


def _messages(row: Row, field: str) -> list[Message]:
    return [{"role": role, "content": content} for role, content in parse_messages(row, field)]


def parse_prompt(row: Row, field: str = "prompt") -> Prompt:
    """The prompt in ``row[field]``: a non-empty string, or a validated message list (``{role, content}`` turns,
    as :func:`rlhfkit.data.sft.parse_messages` checks them) that ends with a user turn; else a DataError."""
    value = row.data.get(field)
    if isinstance(value, list):
        messages = _messages(row, field)
        _check_ends_with_user(row, field, messages, f"{field}[{len(messages) - 1}].role")
        return messages
    if value is not None and not isinstance(value, str):
        raise row.error(field, f"expected a string or a list of messages, got {type(value).__name__}")
    return row.get_str(field)


def prompt_key(prompt: Prompt) -> str:
    """A prompt as one string: equal for the same text or the same chat (prompts are parsed alike everywhere), so
    records of one prompt can be grouped or matched across files."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _prompt(row: Row) -> Prompt:
    return parse_prompt(row, "prompt")


def _check_ends_with_user(row: Row, field: str, messages: list[Message], where: str) -> None:
    if not messages:
        raise row.error(field, "no prompt turns before the response")
    if messages[-1]["role"] != "user":
        raise row.error(where, f"a chat prompt must end with a user turn, got {messages[-1]['role']!r}")


def _response_list(row: Row, field: str) -> list[str]:
    value = row.data.get(field)
    if field not in row.data:
        raise row.error(field, "missing")
    if not isinstance(value, list) or len(value) < 2:
        raise row.error(field, "expected a list of at least 2 response strings")
    for i, response in enumerate(value):
        if not isinstance(response, str):
            raise row.error(f"{field}[{i}]", f"expected a string, got {type(response).__name__}")
        if not response.strip():
            raise row.error(f"{field}[{i}]", "empty response")
    return list(value)


def _ranking(row: Row, k: int) -> list[int]:
    value = row.data.get("ranking")
    if "ranking" not in row.data:
        raise row.error("ranking", "missing")
    # bool is an int subclass; `true` is not an index.
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise row.error("ranking", "expected a list of integer indices into 'responses'")
    if sorted(value) != list(range(k)):
        raise row.error("ranking", f"ranking {value} is not a permutation of 0..{k - 1}")
    return list(value)


def _tie(row: Row, k: int) -> bool:
    value = row.data.get("tie", False)
    if not isinstance(value, bool):
        raise row.error("tie", f"expected true or false, got {type(value).__name__}")
    if value and k != 2:
        raise row.error("tie", f"a tie is only defined for 2 responses, got {k}")
    return value


def _ties(row: Row, k: int) -> list[tuple[int, int]]:
    if "ties" not in row.data:
        return []
    value = row.data["ties"]
    if not isinstance(value, list):
        raise row.error("ties", f"expected a list of [i, j] index pairs, got {type(value).__name__}")
    if value and k == 2:
        raise row.error("ties", "ties is for rankings of more than 2 responses; a pair uses 'tie': true")
    seen = set()
    for n, entry in enumerate(value):
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < k for i in entry)
            or entry[0] == entry[1]
        ):
            raise row.error(f"ties[{n}]", f"expected two different indices into 'responses' (0..{k - 1}), got {entry!r}")
        key = (min(entry), max(entry))
        if key in seen:
            raise row.error(f"ties[{n}]", f"names the pair {list(key)} twice")
        seen.add(key)
    return sorted(seen)


def _pair(row: Row) -> tuple[Prompt, list[str]]:
    """Prompt and [chosen, rejected] of a TRL or hh-rlhf record."""
    for field in ("chosen", "rejected"):
        if field not in row.data:
            raise row.error(field, "missing")
    if "prompt" in row.data:
        prompt = _prompt(row)
        context = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return prompt, [_pair_response(row, field, context) for field in ("chosen", "rejected")]
    if isinstance(row.data["chosen"], str):
        return _hh_pair(row)
    if isinstance(row.data["chosen"], list):
        return _implicit_prompt_pair(row)
    raise row.error("chosen", f"expected a string or a list of messages, got {type(row.data['chosen']).__name__}")


def _pair_response(row: Row, field: str, context: list[Message]) -> str:
    """The response text of a TRL ``chosen``/``rejected`` value (string or message list)."""
    value = row.data[field]
    if isinstance(value, str):
        return row.get_str(field)
    if not isinstance(value, list):
        raise row.error(field, f"expected a string or a list of messages, got {type(value).__name__}")
    return _final_response(row, field, _messages(row, field), start=0, context=context)


def _final_response(row: Row, field: str, messages: list[Message], *, start: int, context: list[Message]) -> str:
    """Content of ``messages[-1]``, which must be an assistant turn.

    ``messages[start:-1]`` must add nothing: every turn empty, or (UltraFeedback
    layout) the whole list being ``context`` followed by the reply.
    """
    last = len(messages) - 1
    if last < start:
        raise row.error(field, "no response turn")
    if messages[last]["role"] != "assistant":
        raise row.error(f"{field}[{last}].role", f"the response must be an assistant turn, got {messages[last]['role']!r}")
    earlier = messages[start:last]
    if any(m["content"].strip() for m in earlier) and messages[:last] != context:
        raise row.error(
            field,
            f"{len(earlier)} turn(s) before the response are neither empty nor a copy of the prompt; "
            "only the final assistant turn may carry content",
        )
    return messages[last]["content"]


def _implicit_prompt_pair(row: Row) -> tuple[Prompt, list[str]]:
    """TRL implicit prompt: the turns ``chosen`` and ``rejected`` share are the prompt."""
    chosen, rejected = _messages(row, "chosen"), row.data["rejected"]
    if not isinstance(rejected, list):
        raise row.error("rejected", f"expected a list of messages like 'chosen', got {type(rejected).__name__}")
    rejected = _messages(row, "rejected")
    shared = 0
    # Stop one short of the shorter list so each side keeps at least its reply.
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise row.error("rejected", "no common prefix with 'chosen': implicit-prompt conversations must share the prompt turns")
    prompt = chosen[:shared]
    if prompt[-1]["role"] != "user":
        raise row.error(
            "rejected",
            f"the turns shared with 'chosen' end with a {prompt[-1]['role']} turn; the shared prompt must end with a user turn",
        )
    responses = [
        _final_response(row, field, messages, start=shared, context=prompt)
        for field, messages in (("chosen", chosen), ("rejected", rejected))
    ]
    return prompt, responses


def _hh_pair(row: Row) -> tuple[Prompt, list[str]]:
    if not isinstance(row.data["rejected"], str):
        raise row.error("rejected", f"expected a transcript string like 'chosen', got {type(row.data['rejected']).__name__}")
    chosen_prompt, chosen = _hh_transcript(row, "chosen")
    rejected_prompt, rejected = _hh_transcript(row, "rejected")
    if chosen_prompt != rejected_prompt:
        raise row.error("rejected", "the turns before the last Assistant turn differ from those in 'chosen'")
    return chosen_prompt, [chosen, rejected]


def _hh_transcript(row: Row, field: str) -> tuple[list[Message], str]:
    """Split an hh-rlhf transcript into (prompt messages, last Assistant turn text)."""
    parts = _HH_MARKER.split(row.get_str(field))
    if parts[0].strip():
        raise row.error(field, "hh transcript has text before its first 'Human:' turn")
    turns = [{"role": _HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]
    if not any(t["role"] == "assistant" for t in turns):
        raise row.error(field, "hh transcript without an 'Assistant:' turn")
    if turns[-1]["role"] != "assistant":
        raise row.error(field, "hh transcript must end with the 'Assistant:' turn being compared")
    prompt = turns[:-1]
    _check_ends_with_user(row, field, prompt, field)
    if not turns[-1]["content"]:
        raise row.error(field, "empty response (the last 'Assistant:' turn)")
    return prompt, turns[-1]["content"]


def _parquet_rows(path: Path) -> list[Row]:
    """Rows of a Parquet file; ``line`` is the 1-based row index.

    A Parquet column exists in every row, so null values are dropped (a field
    that is null is absent). ``meta`` has no fixed schema and is stored as a JSON
    string by :func:`save_comparisons`; it is decoded here.
    """
    import pyarrow as pa  # imported lazily: only Parquet users pay for it
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, None, None, f"not a readable Parquet file: {e}") from None
    rows = []
    for number, record in enumerate(records, start=1):
        data = {key: value for key, value in record.items() if value is not None}
        if isinstance(data.get("meta"), str):
            try:
                data["meta"] = json.loads(data["meta"])
            except json.JSONDecodeError as e:
                raise DataError(path, number, "meta", f"invalid JSON: {e.msg}") from None
            except (RecursionError, ValueError) as e:  # nested too deeply, an integer over Python's digit limit
                raise DataError(path, number, "meta", json_problem(e)) from None
        rows.append(Row(str(path), number, data))
    return rows


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------


def comparison_to_dict(comparison: Comparison) -> dict[str, Any]:
    """The rlhfkit record: every Comparison field; :func:`comparison_from_dict` inverts it."""
    prompt = comparison.prompt
    record: dict[str, Any] = {
        "prompt": [dict(m) for m in prompt] if isinstance(prompt, list) else prompt,
        "responses": list(comparison.responses),
        "ranking": list(comparison.ranking),
        "tie": comparison.tie,
        "reason": comparison.reason,
        "source": comparison.source,
        "meta": dict(comparison.meta),
    }
    if comparison.ties:  # only when there are some: files without tied rankings keep their bytes
        record["ties"] = [list(pair) for pair in comparison.ties]
    return record


def save_comparisons(
    path: str | Path, comparisons: Iterable[Comparison], format: SaveFormat = "rlhfkit", *, skip_ties: bool = False
) -> None:
    """Write comparisons atomically as JSONL, a JSON list (``.json``) or Parquet (``.parquet``).

    ``format``:

    * ``"rlhfkit"``: every field; :func:`load_comparisons` gives back equal records.
    * ``"seed"``: ``prompt, response_a, response_b, preferred, reason, source``
      (+ ``meta`` when not empty). Pairs only: K > 2 raises ValueError.
    * ``"trl"``: ``prompt, chosen, rejected`` (+ ``reason, source, meta``). A
      K-way ranking becomes its K(K-1)/2 pairs. With a chat prompt, chosen and
      rejected are one-message assistant lists (TRL's conversational format).
      TRL has no ties: a tie (or a ranking's tied pair, ``ties``) raises ValueError, or is left out with
      ``skip_ties=True``.
    """
    if format == "rlhfkit":
        records = [comparison_to_dict(c) for c in comparisons]
    elif format == "seed":
        records = [_seed_record(i, c) for i, c in enumerate(comparisons)]
    elif format == "trl":
        records = [r for i, c in enumerate(comparisons) for r in _trl_records(i, c, skip_ties=skip_ties)]
    else:
        raise ValueError(f"unknown format {format!r}; expected 'rlhfkit', 'seed' or 'trl'")
    _write_records(Path(path), records)


def _labels(comparison: Comparison) -> dict[str, Any]:
    out: dict[str, Any] = {"reason": comparison.reason, "source": comparison.source}
    if comparison.meta:
        out["meta"] = dict(comparison.meta)
    return out


def _seed_record(index: int, comparison: Comparison) -> dict[str, Any]:
    if len(comparison.responses) != 2:
        raise ValueError(f"comparison {index} ranks {len(comparison.responses)} responses; the seed format holds pairs only")
    preferred = "tie" if comparison.tie else "ab"[comparison.ranking[0]]
    record = {
        "prompt": comparison_to_dict(comparison)["prompt"],
        "response_a": comparison.responses[0],
        "response_b": comparison.responses[1],
        "preferred": preferred,
    }
    return record | _labels(comparison)


def _trl_records(index: int, comparison: Comparison, *, skip_ties: bool) -> list[dict[str, Any]]:
    if comparison.tie:
        if skip_ties:
            return []
        raise ValueError(
            f"comparison {index} is a tie, which the TRL format cannot represent; pass skip_ties=True to leave ties out"
        )
    prompt = comparison_to_dict(comparison)["prompt"]
    chat = isinstance(prompt, list)
    records = []
    if comparison.ties and not skip_ties:
        raise ValueError(
            f"comparison {index} ranks tied responses {[list(p) for p in comparison.ties]}, which the TRL format cannot "
            "represent; pass skip_ties=True to leave tied pairs out"
        )
    for better, worse, target in comparison.pairs():
        if target == 0.5:  # a tied pair of a ranking (skip_ties)
            continue
        chosen: str | list[dict[str, str]] = comparison.responses[better]
        rejected: str | list[dict[str, str]] = comparison.responses[worse]
        if chat:
            chosen = [{"role": "assistant", "content": comparison.responses[better]}]
            rejected = [{"role": "assistant", "content": comparison.responses[worse]}]
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected} | _labels(comparison))
    return records


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    if path.suffix == ".parquet":
        _write_parquet(path, records)
    elif path.suffix == ".json":
        # One record per line, so the reader's line numbers are record numbers + 1.
        body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
        atomic_write_text(path, f"[\n{body}\n]\n" if records else "[]\n")
    else:
        write_jsonl(path, records)


def _write_parquet(path: Path, records: list[dict[str, Any]]) -> None:
    """Write records as Parquet, atomically (temp file in the same directory, then ``os.replace``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Union of keys in first-seen order: pa.Table.from_pylist would take only the
    # first record's keys. `meta` is free-form, so it goes in as a JSON string.
    columns: dict[str, list[Any]] = {}
    for record in records:
        for key in record:
            columns.setdefault(key, [])
    for key, values in columns.items():
        for record in records:
            value = record.get(key)
            values.append(json.dumps(value, ensure_ascii=False) if key == "meta" and value is not None else value)
    arrays = {}
    for key, values in columns.items():
        try:
            arrays[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(
                f"cannot write field '{key}' to Parquet ({e}); a Parquet column needs one type "
                "(e.g. all prompts strings or all message lists) -- save as .jsonl instead"
            ) from None
    table = pa.table(arrays)
    with atomic_open(path, binary=True) as f:
        pq.write_table(table, f)
