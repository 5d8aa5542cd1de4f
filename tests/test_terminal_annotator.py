"""The terminal annotator: a real pseudo-terminal session with resume, and StringIO unit tests.

The pty tests start ``main_annotate`` in a child Python attached to a pseudo-
terminal (stdlib ``pty``; pexpect is not a dependency), wait for each prompt
and type answers the way a person would. Expected label files are written out
by hand.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhfkit.data.io import DataError
from rlhfkit.data.preferences import load_comparisons
from rlhfkit.data.records import Comparison
from rlhfkit.feedback import terminal
from rlhfkit.feedback.terminal import CHOICE_PROMPT, HELP, REASON_PROMPT, annotate, load_labels, main_annotate

CHAT_PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
SAMPLES = [
    {"prompt_index": 0, "prompt": "Capital of France?", "responses": ["Paris.", "Lyon."], "temperatures": [0.7, 1.2]},
    {"prompt_index": 1, "prompt": CHAT_PROMPT, "responses": ["Blue.", "Bleu!"], "temperatures": [0.7, 1.2]},
    {"prompt_index": 2, "prompt": "Two plus two?", "responses": ["Four.", "Five."], "temperatures": [0.7, 1.2]},
    {"prompt_index": 3, "prompt": "Say hello.", "responses": ["Hello!", "Go away."], "temperatures": [0.7, 1.2]},
]
ITEMS = [(s["prompt"], s["responses"]) for s in SAMPLES]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def label_record(index: int, ranking: list[int], *, tie: bool = False, reason: str = "", annotator: str = "alice") -> dict:
    """The exact JSONL record expected for item ``index`` of :data:`SAMPLES`."""
    return {
        "item_index": index,
        "prompt": SAMPLES[index]["prompt"],
        "responses": SAMPLES[index]["responses"],
        "ranking": ranking,
        "tie": tie,
        "reason": reason,
        "source": f"human:{annotator}",
        "meta": {"item_index": index},
    }


# ---------------------------------------------------------------------------
# A real pseudo-terminal
# ---------------------------------------------------------------------------


class PtyProcess:
    """A child process whose stdin/stdout/stderr are one pseudo-terminal."""

    def __init__(self, code: str, cwd: Path):
        master, child_end = pty.openpty()
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=child_end, stdout=child_end, stderr=child_end, cwd=cwd, env=env
        )
        os.close(child_end)
        self.master = master
        self.output = ""  # everything read so far (the terminal echoes what we type, too)
        self.seen = 0  # output before this offset was consumed by expect()

    def _read(self, timeout: float) -> bool:
        """Read what is available within ``timeout``; False at end of output."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not data:
            return False
        self.output += data.decode("utf-8", errors="replace")
        return True

    def expect(self, marker: str, timeout: float = 60.0) -> str:
        """Wait until ``marker`` appears after the last match; return the text up to and including it."""
        deadline = time.monotonic() + timeout
        while marker not in self.output[self.seen :]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {marker!r}; output:\n{self.output}")
            if not self._read(min(remaining, 0.5)):
                raise AssertionError(f"process ended before {marker!r}; output:\n{self.output}")
        end = self.output.index(marker, self.seen) + len(marker)
        text, self.seen = self.output[self.seen : end], end
        return text

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\r").encode())  # Enter sends CR; the tty turns it into a newline

    def finish(self, timeout: float = 30.0) -> tuple[int, str]:
        """Wait for the exit status, reading the rest of the output so the child never blocks on it."""
        deadline = time.monotonic() + timeout
        while self._read(0.2) and time.monotonic() < deadline:
            if self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                break
        rc = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        os.close(self.master)
        return rc, self.output[self.seen :]


def answer(child: PtyProcess, choice: str, reason: str) -> str:
    """Type a choice and a reason; return the screen up to the next choice prompt."""
    child.type(choice)
    child.expect(REASON_PROMPT)
    child.type(reason)
    return child.expect(CHOICE_PROMPT)


def start_session(tmp_path: Path, samples: Path, labels: Path) -> PtyProcess:
    code = f"from rlhfkit.feedback.terminal import main_annotate; main_annotate({str(samples)!r}, {str(labels)!r}, 'alice')"
    return PtyProcess(code, tmp_path)


def test_pty_session_undo_quit_and_resume(tmp_path):
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES)
    labels = tmp_path / "labels.jsonl"

    # Session 1: item 1 -> a with a reason, item 2 -> tie, undo, item 2 -> b, quit at item 3.
    child = start_session(tmp_path, samples, labels)
    screen = child.expect(CHOICE_PROMPT)
    assert "[1/4]" in screen and "Capital of France?" in screen
    assert "Response A" in screen and "Paris." in screen and "Response B" in screen and "Lyon." in screen
    assert "\x1b[1m" in screen  # stdout is a terminal: headers are bold
    screen = answer(child, "a", "A names the capital")
    assert "[2/4]" in screen
    assert "System: Be brief." in screen and "User: Name a colour." in screen  # chat prompt as a transcript
    assert read_jsonl(labels) == [label_record(0, [0, 1], reason="A names the capital")]  # saved at once
    screen = answer(child, "t", "")
    assert "[3/4]" in screen
    assert read_jsonl(labels)[-1] == label_record(1, [0, 1], tie=True)
    child.type("u")
    screen = child.expect(CHOICE_PROMPT)
    assert "Undid" in screen and "[2/4]" in screen and "Bleu!" in screen
    assert read_jsonl(labels) == [label_record(0, [0, 1], reason="A names the capital")]
    screen = answer(child, "b", "B is more fun")
    assert "[3/4]" in screen
    child.type("q")
    rc, rest = child.finish()
    assert rc == 0, rest
    assert "2 of 4 items labelled" in rest
    assert read_jsonl(labels) == [
        label_record(0, [0, 1], reason="A names the capital"),
        label_record(1, [1, 0], reason="B is more fun"),
    ]

    # Session 2 resumes at item 3: answer it, quit at item 4.
    child = start_session(tmp_path, samples, labels)
    screen = child.expect(CHOICE_PROMPT)
    assert "[3/4]" in screen and "[1/4]" not in screen and "[2/4]" not in screen
    assert "Two plus two?" in screen
    screen = answer(child, "a", "")
    assert "[4/4]" in screen
    child.type("q")
    rc, rest = child.finish()
    assert rc == 0, rest

    records = read_jsonl(labels)
    assert records == [
        label_record(0, [0, 1], reason="A names the capital"),
        label_record(1, [1, 0], reason="B is more fun"),
        label_record(2, [0, 1]),
    ]
    assert len({r["item_index"] for r in records}) == len(records) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl", "samples.jsonl"]  # no temp files left


# ---------------------------------------------------------------------------
# Unit tests: StringIO terminal
# ---------------------------------------------------------------------------


def run_session(items, output, typed: str, annotator: str = "alice") -> tuple[list[Comparison], str]:
    stdout = io.StringIO()
    labels = annotate(items, output, annotator=annotator, stdin=io.StringIO(typed), stdout=stdout)
    return labels, stdout.getvalue()


def test_invalid_input_reprompts_with_help(tmp_path):
    output = tmp_path / "labels.jsonl"
    labels, screen = run_session(ITEMS[:1], output, "x\n\nA\n  why not  \n")
    assert screen.count(HELP) == 2  # once for "x", once for the empty line
    assert screen.count(CHOICE_PROMPT) == 3
    assert "\x1b[" not in screen  # not a terminal: no ANSI codes
    assert read_jsonl(output) == [label_record(0, [0, 1], reason="why not")]
    assert "All items are labelled." in screen
    assert labels == load_comparisons(output)  # the standard loader reads the file as it is


def test_eof_quits_and_keeps_saved_labels(tmp_path):
    output = tmp_path / "labels.jsonl"
    labels, screen = run_session(ITEMS, output, "b\nshorter\n")  # input ends at item 2
    assert [c.ranking for c in labels] == [[1, 0]]
    assert "Quit. 1 of 4 items labelled" in screen
    assert read_jsonl(output) == [label_record(0, [1, 0], reason="shorter")]

    labels, screen = run_session(ITEMS, output, "t\n")  # EOF at the reason: the tie stands, no reason
    assert "[1/4]" not in screen and "[2/4]" in screen
    assert [(c.ranking, c.tie, c.reason) for c in labels] == [([1, 0], False, "shorter"), ([0, 1], True, "")]
    assert read_jsonl(output) == [label_record(0, [1, 0], reason="shorter"), label_record(1, [0, 1], tie=True)]


def test_skip_leaves_item_unlabelled(tmp_path):
    output = tmp_path / "labels.jsonl"
    labels, screen = run_session(ITEMS[:2], output, "s\nb\n\n")
    assert read_jsonl(output) == [label_record(1, [1, 0])]
    assert [c.meta["item_index"] for c in labels] == [1]
    assert "1 left unlabelled for a later session" in screen

    labels, screen = run_session(ITEMS[:2], output, "a\n\n")  # the skipped item comes back next session
    assert "[1/2]" in screen and "[2/2]" not in screen
    assert [c.meta["item_index"] for c in labels] == [0, 1]  # returned in item order
    assert [r["item_index"] for r in read_jsonl(output)] == [1, 0]  # file in answer order


def test_undo_reaches_labels_of_an_earlier_session(tmp_path):
    output = tmp_path / "labels.jsonl"
    run_session(ITEMS[:3], output, "a\n\nb\n\n")
    labels, screen = run_session(ITEMS[:3], output, "u\nt\nclose call\nq\n")
    assert "Undid the label of item 2" in screen
    assert screen.index("[3/3]") < screen.index("Undid") < screen.index("[2/3]")
    assert read_jsonl(output) == [label_record(0, [0, 1]), label_record(1, [0, 1], tie=True, reason="close call")]
    assert len(labels) == 2

    _, screen = run_session(ITEMS[:1], tmp_path / "fresh.jsonl", "u\nq\n")
    assert "Nothing to undo." in screen and screen.count(CHOICE_PROMPT) == 2


def test_item_with_empty_response_is_left_out(tmp_path):
    items = [("Q1?", ["   ", "fine"]), ("Q2?", ["x", "y"])]
    labels, screen = run_session(items, tmp_path / "labels.jsonl", "a\n\n")
    assert "item 1 has an empty response" in screen and "[1/2]" not in screen
    assert [c.meta["item_index"] for c in labels] == [1]


def test_bad_items_raise(tmp_path):
    with pytest.raises(ValueError, match=r"items\[0\]: expected exactly 2 responses"):
        annotate([("Q?", ["a", "b", "c"])], tmp_path / "l.jsonl", stdin=io.StringIO(""), stdout=io.StringIO())
    with pytest.raises(DataError, match=r"items\[0\]: field 'prompt\[0\].role'"):
        annotate([([{"role": "robot", "content": "hi"}], ["a", "b"])], tmp_path / "l.jsonl", stdin=io.StringIO(""))
    with pytest.raises(ValueError, match="JSONL"):
        annotate(ITEMS, tmp_path / "labels.json", stdin=io.StringIO(""), stdout=io.StringIO())


def test_labels_file_problems_are_reported(tmp_path):
    output = tmp_path / "labels.jsonl"
    run_session(ITEMS, output, "a\n\n")
    with pytest.raises(DataError, match="different samples file"):
        annotate([("Another prompt?", ["x", "y"])], output, stdin=io.StringIO(""), stdout=io.StringIO())

    record = label_record(0, [0, 1])
    write_jsonl(output, [record, record])
    with pytest.raises(DataError, match=r"labels.jsonl:2: field 'item_index': item 0 is labelled twice"):
        load_labels(output)
    write_jsonl(output, [{k: v for k, v in record.items() if k != "item_index"}])
    with pytest.raises(DataError, match=r":1: field 'item_index': missing"):
        load_labels(output)
    assert load_labels(tmp_path / "missing.jsonl") == {}


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    """A crash inside a save leaves the last complete file and no temp file."""
    output = tmp_path / "labels.jsonl"
    run_session(ITEMS, output, "a\nfirst\n")
    before = output.read_bytes()

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr("rlhfkit.data.io.os.replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        run_session(ITEMS, output, "b\nsecond\n")
    assert output.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["labels.jsonl"]


def test_main_annotate_reads_samples(tmp_path, monkeypatch):
    samples = write_jsonl(tmp_path / "samples.jsonl", SAMPLES[:2])
    monkeypatch.setattr(sys, "stdin", io.StringIO("b\n\nt\nsame\n"))
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    labels = main_annotate(samples, tmp_path / "labels.jsonl", "bob")
    assert read_jsonl(tmp_path / "labels.jsonl") == [
        label_record(0, [1, 0], annotator="bob"),
        label_record(1, [0, 1], tie=True, reason="same", annotator="bob"),
    ]
    assert [c.source for c in labels] == ["human:bob", "human:bob"]

    write_jsonl(samples, [{"prompt": "Q?", "responses": ["only one"]}])
    with pytest.raises(DataError, match=r"samples.jsonl:1: field 'responses'"):
        main_annotate(samples, tmp_path / "other.jsonl")


def test_render_prompt():
    assert terminal._render_prompt("plain") == "plain"
    assert terminal._render_prompt(CHAT_PROMPT) == "System: Be brief.\nUser: Name a colour."
