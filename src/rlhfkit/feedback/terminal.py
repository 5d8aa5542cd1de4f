"""Label response pairs by hand at a terminal: :func:`annotate` / :func:`main_annotate`.

For each pair not yet labelled, the annotator sees the prompt (a chat prompt as a
``User: ... / Assistant: ...`` transcript) and the two responses, then types

* ``a`` / ``b`` -- that response is better; ``t`` -- a tie. An optional one-line
  reason follows (Enter for none);
* ``u`` -- undo the most recent label (it is removed and that item shown again);
* ``s`` -- skip: leave the item unlabelled for a later session;
* ``q`` -- quit. End of input (Ctrl-D) quits too.

Labels are :class:`~rlhfkit.data.records.Comparison` records like every other
feedback source, stored as rlhfkit-format JSONL (:func:`rlhfkit.data.preferences.load_comparisons`
reads the file as it is) with the position of the item in ``items`` added::

    {"item_index": 3, "prompt": ..., "responses": [A, B], "ranking": [1, 0], "tie": false,
     "reason": "B answers the question", "source": "human:alice", "meta": {"item_index": 3}}

Saving: the whole file is rewritten atomically after every answer and every undo
(temp file in the same directory, fsync, ``os.replace``), so a crash or a closed
terminal loses at most the answer being typed and never leaves a torn file.
Lines are in the order the labels were given, so undo always removes the last line.

Resume: a new session reads the file and shows only the items it does not label
yet, in order (so items skipped last time come first). Each stored label must
match its item's prompt and responses, which catches a labels file reused with a
different samples file.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from rlhfkit.data.io import DataError, Row, read_rows, write_jsonl
from rlhfkit.data.preferences import comparison_from_dict, comparison_to_dict, parse_comparison
from rlhfkit.data.records import Comparison, Prompt
from rlhfkit.data.sft import parse_messages

Item = tuple[Prompt, list[str]]
"""One thing to label: a prompt (string or chat messages) and exactly two responses."""

CHOICE_PROMPT = "Which is better? [a/b/t, u=undo, s=skip, q=quit] > "
REASON_PROMPT = "Reason (optional, Enter for none) > "
HELP = "Type a (A is better), b (B is better), t (tie), u (undo the last answer), s (skip for now) or q (quit, saving)."

# Tie rankings are arbitrary (Comparison docs); [0, 1] keeps A first.
_RANKINGS = {"a": [0, 1], "b": [1, 0], "t": [0, 1]}
_RULE = "=" * 72


def load_labels(output: str | Path) -> dict[int, Comparison]:
    """The labels in ``output`` by item index, in file order; ``{}`` if the file does not exist.

    Raises :class:`DataError` (file, line, field) for a malformed record, a missing
    or invalid ``item_index``, or an item labelled twice.
    """
    path = Path(output)
    if not path.exists():
        return {}
    labels: dict[int, Comparison] = {}
    for row in read_rows(path):
        index = row.data.get("item_index")
        if "item_index" not in row.data:
            raise row.error("item_index", "missing")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise row.error("item_index", f"expected a non-negative integer, got {index!r}")
        if index in labels:
            raise row.error("item_index", f"item {index} is labelled twice")
        labels[index] = parse_comparison(row)
    return labels


def annotate(
    items: Sequence[Item],
    output: str | Path,
    *,
    annotator: str = "human",
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> list[Comparison]:
    """Ask a person to label every pair in ``items`` not yet labelled in ``output``.

    Args:
        items: ``(prompt, [response_a, response_b])`` pairs; a label's ``item_index``
            is the item's position here, so pass the same list when resuming.
            Items with an empty response are left unlabelled, with a note (the
            preference loaders reject empty responses, so such a label could not
            be trained on).
        output: JSONL labels file (module docstring); created if missing, resumed if not.
        annotator: recorded as ``source=f"human:{annotator}"``.
        stdin, stdout: the terminal; ``sys.stdin`` / ``sys.stdout`` when None.

    Returns:
        Every label in ``output`` when the session ends (this session's and earlier
        ones), ordered by item index.
    """
    output = Path(output)
    if output.suffix == ".json":
        raise ValueError(f"{output}: labels are written as JSONL; use a .jsonl file name")
    pairs = [_check_item(i, item) for i, item in enumerate(items)]
    labels = load_labels(output)
    _check_labels_match(output, labels, pairs)
    session = _Session(
        pairs,
        labels,
        output,
        source=f"human:{annotator}",
        stdin=sys.stdin if stdin is None else stdin,
        stdout=sys.stdout if stdout is None else stdout,
    )
    session.run()
    return [labels[i] for i in sorted(labels)]


def main_annotate(samples_path: str | Path, output: str | Path, annotator: str = "human") -> list[Comparison]:
    """Label the output of ``rlhfkit sample`` at this terminal (the CLI entry point).

    ``samples_path`` holds records ``{"prompt", "responses": [a, b]}``; other fields
    (``prompt_index``, ``temperatures``...) are ignored. A label's ``item_index`` is
    the 0-based position of its record in that file. Ctrl-C exits with status 130;
    every answer given before it is already saved.
    """
    items = [_sample_item(row) for row in read_rows(samples_path)]
    if not items:
        raise DataError(samples_path, None, None, "no samples to label")
    try:
        return annotate(items, output, annotator=annotator)
    except KeyboardInterrupt:
        print(f"\nInterrupted. Every answer so far is saved in {output}.", file=sys.stdout, flush=True)
        raise SystemExit(130) from None


# ---------------------------------------------------------------------------
# Checking inputs
# ---------------------------------------------------------------------------


def _check_item(index: int, item: Any) -> Item | None:
    """The item, normalised exactly as its label will read back; None if it cannot be labelled."""
    try:
        prompt, responses = item
    except (TypeError, ValueError):
        raise ValueError(f"items[{index}]: expected a (prompt, responses) pair, got {item!r}") from None
    if not isinstance(responses, (list, tuple)) or len(responses) != 2:
        raise ValueError(f"items[{index}]: expected exactly 2 responses, got {responses!r}")
    if any(isinstance(r, str) and not r.strip() for r in responses):
        return None
    # Parse the would-be label with the loader's own rules, so every label we
    # write can be read back, and chat prompts are normalised to {role, content}.
    record = {"prompt": prompt, "responses": list(responses), "ranking": [0, 1]}
    parsed = comparison_from_dict(record, path=f"items[{index}]")
    return parsed.prompt, parsed.responses


def _check_labels_match(output: Path, labels: dict[int, Comparison], pairs: list[Item | None]) -> None:
    for index, label in labels.items():
        if index >= len(pairs) or pairs[index] is None or pairs[index] != (label.prompt, label.responses):
            raise DataError(
                output,
                None,
                "item_index",
                f"the label of item {index} does not match item {index} of the {len(pairs)} items being "
                "labelled; is this labels file from a different samples file?",
            )


def _sample_item(row: Row) -> Item:
    """``(prompt, responses)`` of one ``rlhfkit sample`` record."""
    if isinstance(row.data.get("prompt"), list):
        prompt: Prompt = [{"role": role, "content": content} for role, content in parse_messages(row, "prompt")]
    else:
        prompt = row.get_str("prompt")
    responses = row.data.get("responses")
    if "responses" not in row.data:
        raise row.error("responses", "missing")
    if not isinstance(responses, list) or len(responses) != 2 or not all(isinstance(r, str) for r in responses):
        raise row.error("responses", "expected a list of exactly 2 response strings")
    return prompt, responses


# ---------------------------------------------------------------------------
# The interactive session
# ---------------------------------------------------------------------------


class _Session:
    """One sitting at the terminal. ``labels`` (item index -> label, in file order) is updated in place."""

    def __init__(
        self, pairs: list[Item | None], labels: dict[int, Comparison], output: Path, *, source: str, stdin: TextIO, stdout: TextIO
    ):
        self.pairs, self.labels, self.output, self.source = pairs, labels, output, source
        self.stdin, self.stdout = stdin, stdout
        isatty = getattr(stdout, "isatty", None)
        self.bold = bool(isatty and isatty())
        self.skipped: set[int] = {i for i, pair in enumerate(pairs) if pair is None}
        """Items not shown again this session: skipped by the annotator, or not labelable."""
        self.redo: int | None = None
        """An item just undone, shown next whatever its position."""

    def run(self) -> None:
        for index, pair in enumerate(self.pairs):
            if pair is None:
                self._say(f"Note: item {index + 1} has an empty response and cannot be labelled; leaving it out.")
        while (index := self._next_item()) is not None:
            if not self._label_one(index):
                self._say(f"Quit. {self._summary()} Run again to continue.")
                return
        left = len(self.pairs) - len(self.labels)
        ending = "All items are labelled." if left == 0 else f"{left} left unlabelled for a later session."
        self._say(f"{ending} {self._summary()}")

    def _next_item(self) -> int | None:
        if self.redo is not None:
            index, self.redo = self.redo, None
            return index
        return next((i for i in range(len(self.pairs)) if i not in self.labels and i not in self.skipped), None)

    choice_prompt, help_text = CHOICE_PROMPT, HELP
    """What the session asks, and what it says after an answer it does not know."""

    def _label_one(self, index: int) -> bool:
        """Show item ``index`` and act on the answer; False means quit."""
        self._show(index)
        while True:
            answer = self._ask(self.choice_prompt)
            choice = "q" if answer is None else answer.strip().lower()
            if choice == "q":
                return False
            if self._is_label(choice):
                reason = self._ask(REASON_PROMPT)
                # End of input at the reason: the choice stands, without a reason.
                self._record(index, choice, (reason or "").strip())
                return reason is not None
            if choice == "s":
                self.skipped.add(index)
                return True
            if choice == "u":
                if self._undo():
                    return True
                continue
            self._say(self.help_text)

    def _is_label(self, choice: str) -> bool:
        return choice in _RANKINGS

    def _record(self, index: int, choice: str, reason: str) -> None:
        self._add(index, choice, reason)

    def _add(self, index: int, choice: str, reason: str) -> None:
        prompt, responses = self.pairs[index]  # type: ignore[misc]  # only labelable items are shown
        self.labels[index] = Comparison(
            prompt=prompt,
            responses=list(responses),
            ranking=list(_RANKINGS[choice]),
            tie=choice == "t",
            reason=reason,
            source=self.source,
            meta={"item_index": index},
        )
        self._save()

    def _undo(self) -> bool:
        """Remove the last label (this session's, else the file's last line); False if there is none."""
        if not self.labels:
            self._say("Nothing to undo.")
            return False
        undone = next(reversed(self.labels))
        del self.labels[undone]
        self._save()
        self.redo = undone
        self._say(f"Undid the label of item {undone + 1}; showing it again.")
        return True

    def _save(self) -> None:
        # write_jsonl is atomic: temp file in the same directory, fsync, os.replace.
        write_jsonl(self.output, [{"item_index": i, **comparison_to_dict(c)} for i, c in self.labels.items()])

    # -- terminal I/O ------------------------------------------------------

    def _show(self, index: int) -> None:
        prompt, responses = self.pairs[index]  # type: ignore[misc]
        lines = [
            "",
            self._strong(_RULE),
            self._strong(f"[{index + 1}/{len(self.pairs)}]") + f"  ({len(self.labels)} labelled)",
            self._strong("Prompt"),
            _indent(_render_prompt(prompt)),
        ]
        for name, response in zip("AB", responses):
            lines += [self._strong(f"--- Response {name} ---"), _indent(response)]
        lines.append(self._strong(_RULE))
        self._say("\n".join(lines))

    def _ask(self, question: str) -> str | None:
        """One line typed by the annotator, without its newline; None at end of input."""
        self.stdout.write(question)
        self.stdout.flush()
        line = self.stdin.readline()
        if not line:
            self._say("")  # end the prompt line before any closing message
            return None
        return line.rstrip("\r\n")

    def _say(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def _strong(self, text: str) -> str:
        return f"\033[1m{text}\033[0m" if self.bold else text

    def _summary(self) -> str:
        return f"{len(self.labels)} of {len(self.pairs)} items labelled, saved in {self.output}."


def _render_prompt(prompt: Prompt) -> str:
    """A string prompt as is; chat messages as a ``Role: content`` transcript."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{message['role'].capitalize()}: {message['content']}" for message in prompt)


def _indent(text: str) -> str:
    return "\n".join("  " + line if line else "" for line in text.splitlines()) or "  (empty)"


# ---------------------------------------------------------------------------
# Thumbs mode: one response at a time, up or down (KTO records)
# ---------------------------------------------------------------------------

ThumbsItem = tuple[Prompt, str]
"""One response to rate: a prompt and the response."""

THUMB_PROMPT = "Is this response good? [y/+ = thumbs up, n/- = thumbs down, u=undo, s=skip, q=quit] > "
THUMB_HELP = "Type y or + (good), n or - (bad), u (undo the last answer), s (skip for now) or q (quit, saving)."
_THUMB_KEYS = {"y": True, "+": True, "up": True, "n": False, "-": False, "down": False}


def load_thumb_labels(output: str | Path) -> dict[int, dict[str, Any]]:
    """The thumbs labels in ``output`` by item index, in file order; ``{}`` if the file does not exist.

    Each record is read with the KTO reader's own rules (:func:`rlhfkit.data.unpaired.parse_unpaired`), so a
    file that loads here trains as it is; a DataError (file, line, field) otherwise.
    """
    from rlhfkit.data.unpaired import parse_unpaired

    path = Path(output)
    if not path.exists():
        return {}
    labels: dict[int, dict[str, Any]] = {}
    for row in read_rows(path):
        index = row.data.get("item_index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise row.error("item_index", f"expected a non-negative integer, got {index!r}")
        if index in labels:
            raise row.error("item_index", f"item {index} is labelled twice")
        parse_unpaired(row)
        labels[index] = row.data
    return labels


def annotate_thumbs(
    items: Sequence[ThumbsItem | None],
    output: str | Path,
    *,
    annotator: str = "human",
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Ask a person for a thumbs up or down on every response in ``items`` not yet labelled in ``output``.

    ``items[i]`` is ``(prompt, response)`` (None: nothing to rate, e.g. an empty response; its number is
    kept). ``output`` is JSONL of KTO records, the format ``rlhfkit annotate export`` writes for a thumbs
    database (:func:`rlhfkit.data.unpaired.unpaired_record`) with ``item_index`` added; saving, undo and
    resume work as in pair mode (module docstring). Returns every record, ordered by item index.
    """
    output = Path(output)
    if output.suffix == ".json":
        raise ValueError(f"{output}: labels are written as JSONL; use a .jsonl file name")
    labels = load_thumb_labels(output)
    for index, record in labels.items():
        if index >= len(items) or items[index] is None or items[index] != (record["prompt"], record["completion"]):
            raise DataError(
                output,
                None,
                "item_index",
                f"the label of item {index} does not match item {index} of the {len(items)} responses being "
                "rated; is this labels file from a different samples file?",
            )
    session = _ThumbSession(
        list(items),
        labels,
        output,
        source=f"human:{annotator}",
        stdin=sys.stdin if stdin is None else stdin,
        stdout=sys.stdout if stdout is None else stdout,
    )
    session.annotator = annotator
    session.run()
    return [labels[i] for i in sorted(labels)]


def main_thumbs(samples_path: str | Path, output: str | Path, annotator: str = "human") -> list[dict[str, Any]]:
    """``rlhfkit annotate terminal SAMPLES OUTPUT --mode thumbs``: rate every response of ``samples_path``.

    Samples are read as the web app's thumbs mode reads them
    (:func:`rlhfkit.feedback.web.pairs.read_thumb_items`: every response of every record, numbered in
    file order), so item numbers match the web app's. Ctrl-C exits with status 130, every answer saved.
    """
    from rlhfkit.feedback.web.pairs import read_thumb_items

    found, _ = read_thumb_items(samples_path)
    items: list[ThumbsItem | None] = [None] * (found[-1].item_index + 1)
    for item in found:
        items[item.item_index] = (item.prompt, item.response)
    try:
        return annotate_thumbs(items, output, annotator=annotator)
    except KeyboardInterrupt:
        print(f"\nInterrupted. Every answer so far is saved in {output}.", file=sys.stdout, flush=True)
        raise SystemExit(130) from None


class _ThumbSession(_Session):
    """:class:`_Session` with one response per item and up / down answers; ``labels`` holds KTO records."""

    annotator = "human"
    choice_prompt, help_text = THUMB_PROMPT, THUMB_HELP

    def _is_label(self, choice: str) -> bool:
        return choice in _THUMB_KEYS

    def _record(self, index: int, choice: str, reason: str) -> None:
        self._add_thumb(index, _THUMB_KEYS[choice], reason)

    def _add_thumb(self, index: int, up: bool, reason: str) -> None:
        from rlhfkit.data.unpaired import unpaired_record

        prompt, response = self.pairs[index]  # type: ignore[misc]  # only ratable items are shown
        vote = "up" if up else "down"
        meta = {
            "item_index": index,
            "votes": {"up": int(up), "down": int(not up)},
            "annotators": [self.annotator],
            "labels": [{"annotator": self.annotator, "choice": vote, "reason": reason}],
            "source": self.source,
        }
        self.labels[index] = {"item_index": index, **unpaired_record(prompt, response, up, meta)}  # type: ignore[assignment]
        self._save()

    def _save(self) -> None:
        write_jsonl(self.output, list(self.labels.values()))  # type: ignore[arg-type]

    def _show(self, index: int) -> None:
        prompt, response = self.pairs[index]  # type: ignore[misc]
        lines = [
            "",
            self._strong(_RULE),
            self._strong(f"[{index + 1}/{len(self.pairs)}]") + f"  ({len(self.labels)} rated)",
            self._strong("Prompt"),
            _indent(_render_prompt(prompt)),
            self._strong("--- Response ---"),
            _indent(response),
            self._strong(_RULE),
        ]
        self._say("\n".join(lines))
