"""Reading and writing record files: JSON (a list) and JSONL, with line numbers.

Every reader reports bad input as a :class:`DataError` naming the file, the line
and the field, and every writer is atomic (temp file in the same directory, then
``os.replace``), so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from rlhfkit import log

T = TypeVar("T")


class DataError(ValueError):
    """Malformed input data. ``str(e)`` is ``"FILE:LINE: field 'F': problem"``."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = f"{path}:{line}" if line is not None else str(path)
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{problem}")


# A JSON escape that can decode to a surrogate (U+D800-U+DFFF). UTF-8 decoding never yields one, so a text
# without such an escape cannot hold a lone surrogate; the exact check runs only on records that have one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def json_problem(e: Exception) -> str:
    """What is wrong with a JSON text whose decoding raised ``e`` (not a JSONDecodeError)."""
    if isinstance(e, RecursionError):
        return "invalid JSON: nested too deeply"
    if "integer string conversion" in str(e):  # int("9" * 5000): "Exceeds the limit (4300 digits) for ..."
        return f"invalid JSON: integer too long (over {sys.get_int_max_str_digits()} digits)"
    return f"invalid JSON: {e}"


def _lone_surrogate(data: Any) -> tuple[str, str] | None:
    """``(field, character)`` of the first string (or key) in ``data`` holding a lone surrogate; None if none.

    Iterative, so a record nested as deep as json accepts is walked without a RecursionError."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                return where, found.group()
        elif isinstance(value, dict):
            for key in value:
                found = _SURROGATE.search(key)
                if found:  # in a key: name the object holding it
                    return where, found.group()
            stack.extend((f"{where}.{key}" if where else key, item) for key, item in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def _check_text(path: str | Path, line: int, raw: str, data: Any) -> None:
    """Raise a DataError if the record decoded from ``raw`` holds a lone surrogate (an escape like ``\\ud800``
    that JSON accepts but that is no Unicode text: tokenizers and UTF-8 writers fail on it later)."""
    if not _SURROGATE_ESCAPE.search(raw):
        return
    found = _lone_surrogate(data)
    if found is not None:
        field, char = found
        raise DataError(
            path,
            line,
            field or None,
            f"lone surrogate escape \\u{ord(char):04x} (not Unicode text; a surrogate pair must be complete)",
        )


def loads_line(path: str | Path, line: int, text: str) -> Any:
    """``json.loads(text)`` of line ``line`` of ``path``: every problem (bad syntax, nesting too deep, an integer
    over Python's digit limit, a lone surrogate escape) is a :class:`DataError` naming the file and line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, line, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except (RecursionError, ValueError) as e:
        raise DataError(path, line, None, json_problem(e)) from None
    _check_text(path, line, text, data)
    return data


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from."""

    path: str
    line: int
    """1-based line number where the record starts."""
    data: dict[str, Any]

    def error(self, field: str | None, problem: str) -> DataError:
        return DataError(self.path, self.line, field, problem)

    def get_str(self, field: str, *, allow_empty: bool = False) -> str:
        """The string value of ``field``, or a DataError naming it."""
        if field not in self.data:
            raise self.error(field, "missing")
        value = self.data[field]
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.error(field, "empty")
        return value


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(path, line, None, f"not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None


def read_rows(path: str | Path) -> list[Row]:
    """Read a ``.json`` (list of objects) or ``.jsonl`` file into rows with line numbers."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    text = _decode(path, path.read_bytes())
    if path.suffix == ".json" or (path.suffix != ".jsonl" and text.lstrip().startswith("[")):
        return list(_json_rows(path, text))
    return list(_jsonl_rows(path, text))


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSONL text: split on "\\n" only (a trailing "\\r" dropped).

    ``str.splitlines`` also breaks on U+2028, U+2029, U+0085 and other characters that JSON
    strings may hold raw, so JSONL written with ``ensure_ascii=False`` would not read back.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_jsonl_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL log that rlhfkit appends to; an unparseable *last* line (a write cut by a
    kill or a full disk) is ignored. An unparseable line elsewhere raises ``DataError`` with its line."""
    return [row.data for row in read_jsonl_log(path)]


def read_jsonl_log(path: str | Path, *, repair: bool = False) -> list[Row]:
    """The rows (with line numbers) of a JSONL log that rlhfkit appends to; no file: none.

    An unparseable *last* line -- a write cut by a kill or a full disk, even mid-character -- is
    ignored; with ``repair=True`` it is also cut off the file (and a missing final newline added),
    so that appending goes on from a whole line. An unparseable line elsewhere raises
    :class:`DataError` with its line.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")  # a "\n" byte never occurs inside a UTF-8 multi-byte character
    if lines and lines[-1] == b"":
        lines.pop()
    rows: list[Row] = []
    torn_at = None  # byte offset of a torn last line
    end = 0
    for number, line in enumerate(lines, start=1):
        start, end = end, end + len(line) + 1
        try:
            text = line.decode("utf-8")
            if not text.strip():
                continue
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if number == len(lines):  # torn final append
                torn_at = start
                break
            if isinstance(e, UnicodeDecodeError):
                problem = f"not valid UTF-8 (byte {line[e.start]:#04x} at offset {start + e.start})"
            else:
                problem = f"invalid JSON: {e.msg} (column {e.colno})"
            raise DataError(path, number, None, problem) from None
        except (RecursionError, ValueError) as e:  # whole but undecodable: no torn write
            raise DataError(path, number, None, json_problem(e)) from None
        _check_text(path, number, text, data)
        if not isinstance(data, dict):
            raise DataError(path, number, None, f"expected a JSON object, got {type(data).__name__}")
        rows.append(Row(str(path), number, data))
    if repair and (torn_at is not None or (raw and not raw.endswith(b"\n"))):
        with open(path, "r+b") as f:
            if torn_at is not None:
                f.truncate(torn_at)
            else:  # a whole last record whose newline was cut off
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
    return rows


def truncate_jsonl_by_step(path: str | Path, step: int) -> None:
    """Keep the records of a JSONL log whose ``step`` is at most ``step`` (a resumed run logs the
    later ones again); drops a torn last line; rewrites atomically. No-op if the file is absent."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_jsonl_records(path) if r.get("step", 0) <= step]
    write_jsonl(path, kept)


def _jsonl_rows(path: Path, text: str) -> Iterator[Row]:
    for number, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        data = loads_line(path, number, line)
        if not isinstance(data, dict):
            raise DataError(path, number, None, f"expected a JSON object, got {type(data).__name__}")
        yield Row(str(path), number, data)


def _json_rows(path: Path, text: str) -> Iterator[Row]:
    """Walk a top-level JSON array element by element so each keeps its line number."""
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(0)
    if pos >= len(text) or text[pos] != "[":
        raise DataError(path, line_of(pos), None, "expected a JSON list of objects")
    pos = skip_ws(pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            data, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
        except (RecursionError, ValueError) as e:
            raise DataError(path, line_of(pos), None, json_problem(e)) from None
        if not isinstance(data, dict):
            raise DataError(path, line_of(pos), None, f"expected a JSON object, got {type(data).__name__}")
        _check_text(path, line_of(pos), text[pos:end], data)
        yield Row(str(path), line_of(pos), data)
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if skip_ws(pos + 1) != len(text):
                raise DataError(path, line_of(pos + 1), None, "invalid JSON: extra data after the list")
            return
        raise DataError(path, line_of(pos), None, "invalid JSON: expected ',' or ']' between list items")


@contextmanager
def atomic_open(path: str | Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """Write ``path`` atomically through the yielded file (UTF-8 text, or bytes with ``binary=True``).

    The file is a temp file in the same directory: fsynced and ``os.replace``d
    over ``path`` when the block ends normally, deleted (``path`` untouched) when
    it raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temps(directory: str | Path, pattern: re.Pattern) -> list[Path]:
    """Delete the entries of ``directory`` whose whole name matches ``pattern`` (an rlhfkit temp a killed save
    left: nothing else removes them); returns them. Assumes one writer per output directory (under several
    processes only the main one saves), so a temp of that name is not in use by another save."""
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        fsync_path(directory)
    return removed


def atomic_temp_pattern(path: str | Path) -> re.Pattern[str]:
    """The names of the temp files :func:`atomic_open` makes for ``path`` (and for its settings file,
    :func:`settings_path`): what :func:`remove_stale_temps` clears after a kill."""
    name = Path(path).name
    return re.compile(re.escape(f".{name}.") + r"(meta\.json\.)?[a-z0-9_]{8}")


RESUME_MODES = ("auto", "force", "never")
"""The values of the ``resume`` key of a stage that resumes from its output (sample, label, cai, cai-label): those
of :attr:`rlhfkit.training.loop.TrainOptions.resume`, less a path."""


def compare_settings(output: str | Path, settings: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """``(the settings recorded beside output or None, what differs from settings)``: the changes map each key to
    ``old -> new`` (:func:`changed_settings`); an unreadable settings file is the change ``settings``."""
    try:
        saved = read_settings(output)
    except DataError as e:  # written atomically, so only a damaged disk or a hand edit gets here
        return {}, {"settings": e.problem}
    return saved, (changed_settings(saved, settings) if saved else {})


def start_over(output: str | Path, stage: str) -> None:
    """``resume=never`` of a stage that appends to ``output`` (sample, label): delete it and its settings file."""
    output = Path(output)
    removed = [path for path in (output, settings_path(output)) if path.exists()]
    for path in removed:
        path.unlink()
    if removed:
        log.info(f"{stage}: resume=never: deleted {' and '.join(map(str, removed))}; starting over")


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters with ``...``: a record's value inside an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fsync_path(path: str | Path) -> None:
    """fsync one file, or a directory (making the names created, renamed or removed in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root``, then ``root``: contents before the names that point at them."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(directory, name))
        fsync_path(directory)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(text)


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write records as JSONL, atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class ThrottledSave:
    """Rewrite a growing output now and then rather than after every piece of work.

    Call :meth:`changed` after each piece of work (a chunk of labels): it runs ``write`` (an atomic rewrite of the
    whole output) once at least ``seconds`` have passed since the last write *and* at least four times as long as
    that write took, so that rewriting a file that grows with the work takes at most about a fifth of the time,
    however large it gets (a rewrite after every chunk is quadratic in the output's size). :meth:`flush` writes
    what is still pending: call it at the end and when the work fails part way, so that an exception loses no work
    and a kill at most the work since the last write (``seconds``, or four times the last write's duration when that
    is longer). ``seconds=0`` writes after every piece of work, whatever the writes cost.
    """

    def __init__(self, write: Callable[[], None], seconds: float, clock: Callable[[], float] = time.monotonic):
        if not seconds >= 0:
            raise ValueError(f"seconds must be at least 0, got {seconds}")
        self._write, self.seconds, self._clock = write, seconds, clock
        self._last = clock()
        self._cost = 0.0
        self.pending = False

    def changed(self) -> None:
        """Note new work; write it if the last write is old enough."""
        self.pending = True
        if self.seconds == 0 or self._clock() - self._last >= max(self.seconds, 4 * self._cost):
            self.flush()

    def flush(self) -> None:
        """Write now if anything is pending (a write that raises is not tried again)."""
        if not self.pending:
            return
        self.pending = False
        start = self._clock()
        self._write()
        self._last = self._clock()
        self._cost = self._last - start


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record and flush it to disk (for incremental logs)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def settings_path(output: str | Path) -> Path:
    """The settings file beside a stage's ``output``: ``samples.jsonl`` -> ``samples.jsonl.meta.json``."""
    output = Path(output)
    return output.with_name(output.name + ".meta.json")


def read_settings(output: str | Path) -> dict[str, Any] | None:
    """The settings recorded beside ``output`` (:func:`write_settings`); None when there is no such file.
    An unreadable one raises :class:`DataError` naming it."""
    path = settings_path(output)
    if not path.exists():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, None, None, f"unreadable settings file ({e})") from None
    if not isinstance(settings, dict):
        raise DataError(path, None, None, f"expected a JSON object, got {type(settings).__name__}")
    return settings


def write_settings(output: str | Path, settings: dict[str, Any]) -> None:
    """Record, atomically, the settings that the records of ``output`` are made under."""
    atomic_write_text(settings_path(output), json.dumps(settings, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, str]:
    """``{key: "old -> new"}`` for every key whose value differs (as JSON reads it back) between two settings;
    a value's repr is cut at 100 characters."""
    unset = object()

    def shown(value: Any) -> str:
        text = "(unset)" if value is unset else repr(value)
        return text if len(text) <= 100 else text[:97] + "..."

    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    changes = {}
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key, unset), current.get(key, unset)
        if old != new:
            changes[key] = f"{shown(old)} -> {shown(new)}"
    return changes


def holdout_size(count: int, fraction: float) -> int:
    """How many of ``count`` items ``fraction`` holds out in :func:`split_holdout` before ``min_held`` grows it: at least
    one if ``fraction`` > 0."""
    return max(1, int(round(fraction * count))) if fraction > 0 else 0


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``, first and last included (all of them if ``k`` is 0 or less,
    or at least ``n``). The reward model's normalisation samples and the frontier probes' prompts: spread over a
    file written topic by topic, not its first ``k`` records."""
    if k <= 0 or k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def split_holdout(
    items: list[T],
    fraction: float,
    seed: int,
    *,
    min_held: int = 0,
    weight: Callable[[T], int] | None = None,
    max_fraction: float = 0.25,
) -> tuple[list[T], list[T]]:
    """Deterministic train / held-out split (at least one held-out item if fraction > 0).

    With ``min_held`` > 0 the held-out split grows past ``fraction``, item by item in the same shuffled order (so it
    extends the split ``fraction`` alone gives), until the ``weight`` of its items (1 each without ``weight``) adds
    up to ``min_held`` or it holds ``max_fraction`` of the items, whichever comes first."""
    if fraction <= 0:
        return items, []
    import random

    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = holdout_size(len(items), fraction)
    if min_held > 0:
        weigh = weight or (lambda _: 1)
        cap = max(n_eval, int(max_fraction * len(items)))
        held_weight = sum(weigh(items[i]) for i in order[:n_eval])
        while held_weight < min_held and n_eval < cap:
            held_weight += weigh(items[order[n_eval]])
            n_eval += 1
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def read_splits(
    read: Callable[[str, Any], list[T]], data: str, stats: Any, *, eval_data: str, eval_fraction: float, seed: int, kind: str
) -> tuple[list[T], list[T]]:
    """The training and held-out records of a training file of ``kind`` (named in the error on an empty file).
    ``read(path, stats)`` gives a file's records (each as its examples), counted in ``stats``; the held-out ones are
    ``eval_data``'s (read with no ``stats``: only the training file is counted) or, without it, split off ``data``
    by record (:func:`split_holdout`), so the examples of one record stay on one side."""
    records = read(data, stats)
    if not records:
        raise DataError(data, None, None, f"no records (an empty {kind} file)")
    if eval_data:
        return records, read(eval_data, None)
    return split_holdout(records, eval_fraction, seed)


# ---------------------------------------------------------------- append-only logs of prompt-indexed records (sample, cai)


def append_whole(f, data: bytes) -> None:
    """Append ``data`` to the unbuffered file ``f`` in one ``write()`` (more only if the OS writes it short, as on
    a full disk) and fsync it: a batch reaches the file whole unless the write itself fails or is cut (a kill
    inside a large write, a full disk), and a re-run drops a batch left partly written."""
    view = memoryview(data)
    while view:
        written = f.write(view)
        view = view[written:]
    os.fsync(f.fileno())


def drop_records(output: Path, rows: list[Row], indices: set[int]) -> int:
    """Rewrite ``output`` (atomically, fsynced) without the records whose prompt_index is in ``indices``; the other
    lines are kept byte for byte. ``rows`` are its records as read (line numbers). Returns how many went."""
    lines = {row.line for row in rows if row.data.get("prompt_index") in indices}
    if not lines:
        return 0
    raw = output.read_bytes().split(b"\n")
    kept = [line for number, line in enumerate(raw, start=1) if number not in lines]
    with atomic_open(output, binary=True) as f:
        f.write(b"\n".join(kept))
    fsync_path(output.parent)
    return len(lines)


def chunk_grid(n: int, size: int) -> list[list[int]]:
    """The chunks of a run over ``n`` prompts: chunk k is prompt indices ``[k*size, min((k+1)*size, n))``, generated
    under the seed ``seed * 1_000_003 + k*size`` whatever is already on disk, so a resumed run generates each prompt
    as an uninterrupted run does."""
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def chunks_to_do(
    output: Path, rows: list[Row], grid: list[list[int]], done: set[int], *, stage: str, unit: str = "chunk(s)"
) -> list[list[int]]:
    """The chunks of ``grid`` (:func:`chunk_grid`) not all in ``output``, whose records ``rows`` hold the prompt
    indices ``done``. A chunk only partly there (its write cut by a kill, a power loss or a full disk) has its
    records dropped from ``output`` and is generated again whole under its own seed, as an uninterrupted run
    generates it; the log line saying so names ``stage`` and the grid's ``unit``."""
    partial = [chunk for chunk in grid if done.intersection(chunk) and not done.issuperset(chunk)]
    if partial:
        drop = {i for chunk in partial for i in chunk}
        removed = drop_records(output, rows, drop)
        done = done - drop
        log.info(
            f"{stage}: {output}: dropped the {removed} record(s) of {len(partial)} {unit} only partly written "
            f"(prompt_index {', '.join(f'{c[0]}-{c[-1]}' for c in partial)}); generating them again whole"
        )
    return [chunk for chunk in grid if not done.issuperset(chunk)]
