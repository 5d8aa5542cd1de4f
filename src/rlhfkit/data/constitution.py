"""Constitutions for Constitutional AI (Bai et al. 2022), and worked critique/revision examples.

A **constitution** is a YAML or JSON file: a list of principles, or a mapping with ``principles`` (and
optionally ``name`` and ``description``). Each principle is the paper's Appendix C pair of requests::

    principles:
      - id: no-hurtful-language          # recorded with every critique, revision and comparison made under it
        category: harmlessness            # optional, informative only
        critique_request: Check your last response for insults ...
        revision_request: Rewrite your response so that it ...
        choice_request: Which of these responses is more respectful ...   # optional (RL-CAI)

``id``, ``critique_request`` and ``revision_request`` are non-empty strings, and ids are unique. ``choice_request``
(optional) is the multiple-choice question an AI judge answers when it compares two responses under the principle
(RL-CAI, :func:`rlhfkit.cai_label.label_on_principles`); without one, :meth:`Principle.choice_question` builds a generic
question from the critique request, so constitutions written before the field existed still work. Any other key
is an error (a misspelt ``critque_request`` must not be dropped silently), and so is a key given twice. Every
problem is a :class:`~rlhfkit.data.io.DataError` naming the file, the line (YAML, and JSON that YAML reads) and
the field, e.g. ``my.yaml:14: field 'principles[2].revision_request': missing``.

**Few-shot examples** (optional) are a JSON/JSONL file of worked critiques and revisions, prepended to every
critique and revision chat: records with ``prompt`` (a string or chat messages ending with a user turn),
``response``, ``critique`` and ``revision``, and either ``principle`` (an id of the constitution, whose requests
are used) or both ``critique_request`` and ``revision_request`` written out.

rlhfkit ships a default constitution (:data:`DEFAULT_CONSTITUTION`, twelve principles on harmlessness, honesty and
helpfulness, written for this project, each with a comparison question), two worked examples under it (:data:`DEFAULT_FEW_SHOT`), and red-team
style and ordinary prompts (:data:`DEFAULT_PROMPTS`, :data:`HELDOUT_PROMPTS`; each record also says its ``kind``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.data.io import DataError, read_rows
from rlhfkit.data.preferences import parse_prompt
from rlhfkit.data.records import Prompt

ASSETS = Path(__file__).parents[1] / "assets" / "cai"
DEFAULT_CONSTITUTION = ASSETS / "constitution.yaml"
"""The shipped constitution."""
DEFAULT_FEW_SHOT = ASSETS / "few_shot.jsonl"
"""Two worked critique/revision examples under the shipped constitution's principles."""
DEFAULT_PROMPTS = ASSETS / "prompts_train.jsonl"
"""32 prompts, red-team style and ordinary alternately (``kind``: ``red-team`` or ``ordinary``)."""
HELDOUT_PROMPTS = ASSETS / "prompts_heldout.jsonl"
"""16 more, in the same layout, for evaluating an SL-CAI model on prompts it was not trained on."""

REQUIRED_FIELDS = ("id", "critique_request", "revision_request")
"""What every principle must have."""
OPTIONAL_FIELDS = ("category", "description", "choice_request")
"""What a principle may also have: ``category`` and ``description`` are informative (never sent to a model);
``choice_request`` is RL-CAI's comparison question."""
GENERIC_CHOICE_REQUEST = (
    "Which of these assistant responses better satisfies the following request, asked of the assistant about "
    'its own response? "{critique_request}"'
)
"""The comparison question of a principle without ``choice_request``: its critique request, quoted."""
TOP_LEVEL_FIELDS = ("principles", "name", "description")
"""The keys of a constitution written as a mapping."""


@dataclass(frozen=True)
class Principle:
    """One principle: what to ask the model to criticise, and how to ask it to revise."""

    id: str
    critique_request: str
    revision_request: str
    category: str = ""
    description: str = ""
    choice_request: str = ""
    """The question an AI judge answers when it compares two responses under this principle ("Which of these
    responses is less harmful?"); empty: :data:`GENERIC_CHOICE_REQUEST`."""

    def choice_question(self) -> str:
        """The comparison question: ``choice_request``, or the generic one built from the critique request."""
        return self.choice_request or GENERIC_CHOICE_REQUEST.format(critique_request=self.critique_request)


@dataclass(frozen=True)
class Constitution:
    """The principles of a constitution file, in file order."""

    principles: tuple[Principle, ...]
    path: str
    """The file it was read from."""
    name: str = ""
    description: str = ""

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.principles]

    def __getitem__(self, principle_id: str) -> Principle:
        for principle in self.principles:
            if principle.id == principle_id:
                return principle
        raise KeyError(principle_id)

    def digest(self) -> str:
        """``sha256:...`` of the principles (ids, requests, order): what a run's records depend on. The name,
        descriptions, comments and layout of the file do not count."""
        payload = [[p.id, p.critique_request, p.revision_request] for p in self.principles]
        return "sha256:" + hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()

    def choice_digest(self) -> str:
        """``sha256:...`` of the principles as an AI judge compares under them (ids and comparison questions, in
        order): what RL-CAI labels depend on. Kept apart from :meth:`digest`, so adding choice requests to a
        constitution does not invalidate the SL-CAI records made under it."""
        payload = [[p.id, p.choice_question()] for p in self.principles]
        return "sha256:" + hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class FewShotExample:
    """A worked critique and revision, shown to the model before each critique and revision request."""

    prompt: Prompt
    response: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str
    principle: str = ""
    """The id of the principle it illustrates (empty when the requests were written out)."""


# ----------------------------------------------------------------------------- reading the file


class _Where:
    """Line numbers of the values in a YAML document, by path (``("principles", 2, "id")``)."""

    def __init__(self) -> None:
        self.lines: dict[tuple, int] = {}

    def line(self, *path: Any) -> int | None:
        """The line of the value at ``path``, or of the nearest enclosing value that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())


def _walk(node: yaml.Node, path: tuple, where: _Where, file: Path) -> None:
    """Record the line of ``node`` and of everything inside it; a key given twice in a mapping is a DataError."""
    where.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            _walk(child, path + (i,), where, file)
    elif isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in seen:
                raise DataError(file, line, _field_name(path + (key,)), f"given twice (first on line {seen[key]}); keep one")
            seen[key] = line
            _walk(value_node, path + (key,), where, file)


def _field_name(path: tuple) -> str:
    """``("principles", 2, "id")`` -> ``principles[2].id``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _read_document(path: Path) -> tuple[Any, _Where]:
    """The file's data and the lines of its values. YAML reads JSON too; a JSON file that YAML cannot read (tab
    indentation) is read as JSON, without lines."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, None, "file not found") from None
    except OSError as e:
        raise DataError(path, None, None, f"cannot read it: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(path, line, None, f"not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None
    where = _Where()
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, where
        _walk(node, (), where, path)
        return loader.construct_document(node), where
    except yaml.MarkedYAMLError as e:
        if path.suffix == ".json":
            return _read_json(path, text), _Where()
        mark = e.problem_mark or e.context_mark
        raise DataError(path, mark.line + 1 if mark is not None else None, None, f"invalid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise DataError(path, None, None, f"invalid YAML: {e}") from None
    except RecursionError:
        raise DataError(path, None, None, "nested too deeply to read") from None
    finally:
        loader.dispose()


def _read_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except (RecursionError, ValueError) as e:
        raise DataError(path, None, None, f"invalid JSON: {e}") from None


def _string(value: Any, path: Path, where: _Where, at: tuple, *, required: bool) -> str:
    """The non-empty string at ``at``, or a DataError naming the field."""
    if not isinstance(value, str):
        hint = " (quote it)" if isinstance(value, (int, float, bool)) else ""
        raise DataError(path, where.line(*at), _field_name(at), f"expected a string{hint}, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(path, where.line(*at), _field_name(at), "empty")
    return value.strip()


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read and check a constitution file (YAML or JSON); None or ``""``: the shipped one."""
    path = Path(path) if path else DEFAULT_CONSTITUTION
    data, where = _read_document(path)
    name = description = ""
    prefix: tuple[Any, ...] = ()
    if isinstance(data, dict):
        for key in data:
            if key not in TOP_LEVEL_FIELDS:
                raise DataError(
                    path,
                    where.line(key),
                    str(key),
                    f"unknown key (a constitution has {', '.join(TOP_LEVEL_FIELDS)}; principles go in a list under 'principles')",
                )
        if "principles" not in data:
            raise DataError(path, where.line(), "principles", "missing")
        name = _string(data.get("name", ""), path, where, ("name",), required=False)
        description = _string(data.get("description", ""), path, where, ("description",), required=False)
        items, prefix = data["principles"], ("principles",)
    elif isinstance(data, list):
        items, prefix = data, ()
    else:
        got = "nothing (an empty file)" if data is None else type(data).__name__
        raise DataError(path, where.line(), None, f"expected a list of principles, or a mapping with 'principles'; got {got}")
    if not isinstance(items, list):
        raise DataError(
            path, where.line(*prefix), _field_name(prefix), f"expected a list of principles, got {type(items).__name__}"
        )
    if not items:
        raise DataError(path, where.line(*prefix), _field_name(prefix) or None, "no principles")
    principles: list[Principle] = []
    first_line: dict[str, tuple[int, int | None]] = {}
    for i, item in enumerate(items):
        at = prefix + (i,)
        if not isinstance(item, dict):
            raise DataError(
                path,
                where.line(*at),
                _field_name(at),
                f"expected a principle (a mapping with {', '.join(REQUIRED_FIELDS)}), got {type(item).__name__}",
            )
        for key in item:
            if key not in REQUIRED_FIELDS + OPTIONAL_FIELDS:
                raise DataError(
                    path,
                    where.line(*at, key),
                    _field_name(at + (str(key),)),
                    f"unknown key (a principle has {', '.join(REQUIRED_FIELDS)}, and optionally {', '.join(OPTIONAL_FIELDS)})",
                )
        for key in REQUIRED_FIELDS:
            if key not in item:
                raise DataError(path, where.line(*at), _field_name(at + (key,)), "missing")
        values = {key: _string(item[key], path, where, at + (key,), required=True) for key in REQUIRED_FIELDS}
        extra = {key: _string(item[key], path, where, at + (key,), required=False) for key in OPTIONAL_FIELDS if key in item}
        principle_id = values["id"]
        if principle_id in first_line:
            index, line = first_line[principle_id]
            first = f"principle {index}" + (f", line {line}" if line else "")
            raise DataError(
                path, where.line(*at, "id"), _field_name(at + ("id",)), f"duplicate id {principle_id!r} (first: {first})"
            )
        first_line[principle_id] = (i, where.line(*at, "id"))
        principles.append(Principle(**values, **extra))
    return Constitution(tuple(principles), str(path), name, description)


def load_few_shot(path: str | Path, constitution: Constitution) -> list[FewShotExample]:
    """Read worked examples (JSON list or JSONL; see the module docstring); a ``principle`` must be an id of
    ``constitution``."""
    examples = []
    for row in read_rows(path):
        prompt = parse_prompt(row, "prompt")
        texts = {key: row.get_str(key).strip() for key in ("response", "critique", "revision")}
        principle_id = ""
        if "principle" in row.data:
            principle_id = row.get_str("principle").strip()
        written = [key for key in ("critique_request", "revision_request") if key in row.data]
        if len(written) == 2:
            requests = {key: row.get_str(key).strip() for key in written}
        elif written:
            missing = "revision_request" if written == ["critique_request"] else "critique_request"
            raise row.error(missing, f"missing (an example writing out {written[0]} needs both requests)")
        elif principle_id:
            try:
                principle = constitution[principle_id]
            except KeyError:
                raise row.error(
                    "principle",
                    f"{principle_id!r} is not a principle of {constitution.path} (its ids: {', '.join(constitution.ids)})",
                ) from None
            requests = {"critique_request": principle.critique_request, "revision_request": principle.revision_request}
        else:
            raise row.error("principle", "missing (give a principle id, or both critique_request and revision_request)")
        examples.append(FewShotExample(prompt=prompt, principle=principle_id, **texts, **requests))
    if not examples:
        raise DataError(path, None, None, "no examples (an empty few-shot file)")
    return examples


def few_shot_digest(examples: list[FewShotExample]) -> str:
    """``sha256:...`` of the examples as the model sees them (empty list: ``""``)."""
    if not examples:
        return ""
    payload = json.dumps([asdict(e) for e in examples], ensure_ascii=False, sort_keys=True)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()
