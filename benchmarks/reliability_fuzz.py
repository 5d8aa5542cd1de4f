"""Fuzzed input files: every loader must load odd-but-valid input correctly and reject bad input cleanly.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reliability_fuzz.py            # ~1,300 cases + 25 CLI runs, 3-7 minutes
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reliability_fuzz.py --quick    # ~300 cases + 6 CLI runs
    .venv/bin/python benchmarks/reliability_fuzz.py --seed 7 --dump /tmp/fuzz    # another draw; failing files kept in /tmp/fuzz

Part of the reliability benchmark (benchmarks/reliability.py calls :func:`run`);
not a test: it runs on demand and prints one row per check.

What is generated (seeded RNG, so a seed reproduces every file byte for byte):
valid files in each input format -- SFT data (``data/sft.py`` ``load_sft_file``),
preference data (``data/preferences.py`` ``load_comparisons``), prompts
(``data/prompts.py`` ``load_prompts``), samples to label (``label.py`` ``load_items``),
annotation pairs (``feedback/web/admin.py`` ``read_pairs``) and YAML stage
configs with ``key=value`` overrides (``config.py`` ``load_config``) -- then one
mutation each: truncation at a random byte, a wrong type for a field (number,
list, null, object, bool, empty string where a string is expected...), a
missing field, other encodings (latin-1, cp1252, UTF-16 with and without BOM,
invalid UTF-8 bytes, lone surrogate escapes), 1-5 MB lines, raw control
characters and NUL bytes, raw U+2028 / U+2029 / U+0085 inside strings, empty
files, JSON arrays where JSONL is expected (and the reverse), a UTF-8 BOM, CRLF
and lone-CR line ends, duplicated keys, deeply nested JSON, bad JSON syntax;
for YAML: unknown keys, wrong types, bad indentation, tabs, anchors and
billion-laughs alias bombs, non-mapping top levels, non-UTF-8 files, deep
nesting, duplicated keys, bad overrides. Blank lines are sprinkled between
records so line numbers are checked against physical lines.

Each case states its expected outcome:

* **load** (valid, if odd: CRLF, U+2028 inside a string, a 5 MB line, duplicated
  JSON keys -- the last one wins, as in Python's json): the loader returns the
  right number of records, and injected text is found in them;
* **error** (invalid): the loader raises the error type the CLI prints as one
  clean line (``DataError``/``ConfigError``; see ``cli.py``), whose message names
  the file, and -- for line-oriented data -- whose ``line`` is the physical line
  of the bad record (YAML syntax errors: the message says ``line N``, N within 1);
  anything else escaping (KeyError, TypeError, RecursionError, UnicodeDecodeError...)
  fails the case;
* **either** (a UTF-8 BOM, an empty preference file, a truncated YAML file...):
  a clean load or a clean error, but nothing escapes.

Cases that may hang or eat memory (alias bombs, deep nesting) run in a forked
child with a 5 s limit (a correct loader answers in well under a second) and a
2 GiB address-space cap. The other cases call the loaders in-process (fast);
then a sample of 25 runs goes through the real
``rlhfkit`` command line (``sft``, ``reward``, ``dpo``, ``sample``, ``label``,
``run``, ``annotate serve``) with bad data or config, checking exit code != 0,
no ``Traceback`` on stderr, the bad file named on stderr, and -- each run is
pointed at outputs of a finished earlier run (a tiny SFT model directory,
samples, labels, an annotation db, a pipeline with a finished sft stage) --
that every pre-existing file is byte-identical afterwards.

Rows: one per format and kind (bad -> clean error, odd-but-valid -> loads),
YAML duplicate keys (a policy check: YAML forbids them, PyYAML keeps the last
silently), the CLI runs and the earlier outputs. Failures are grouped by
signature: ``[N] case-id: what happened``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import typing
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

REPO = Path(__file__).resolve().parents[1]
SEED = 20240917
ISOLATED_TIMEOUT_S = 5.0
ISOLATED_EXTRA_AS = 2 << 30
CLI_TIMEOUT_S = 150
CLI_HANG_TIMEOUT_S = 25
MB = 1 << 20

Expect = Literal["load", "error", "either"]


@dataclass
class Case:
    id: str
    fmt: str
    """sft | pref | prompts | samples | pairs | config | overrides"""
    mutation: str
    data: bytes
    expect: Expect
    valid: bool
    """Which row the case counts in: odd-but-valid input (True) or bad input (False)."""
    suffix: str = ".jsonl"
    records: int | None = None
    """Records expected when it loads (None: not checked)."""
    lines: tuple[int, int] | None = None
    """For an error: the DataError's line must be in this range (YAML: ``line N`` in the message)."""
    needle: str | None = None
    """Text that must be found in the loaded records."""
    config_cls: str | None = None
    overrides: list[str] | None = None
    key: str | None = None
    """A config key the error message must name."""
    values: dict[str, Any] | None = None
    """Config values the loaded config must have."""
    isolate: bool = False
    row: str | None = None
    """Overrides the row name."""


# ============================================================================ text and layout

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
]
UNICODE_WORDS = ["café", "naïve", "Straße", "日本語", "😀", "Ωmega", "señor", "ü-ber", "x\u200by", "añejo"]
LATIN1_WORDS = ["café", "naïve", "Straße", "señor", "über", "garçon", "déjà"]


def words(rng: random.Random, lo: int = 2, hi: int = 7, *, uni: float = 0.2, pool: list[str] | None = None) -> str:
    out = []
    for _ in range(rng.randint(lo, hi)):
        if pool is not None:
            out.append(rng.choice(pool))
        else:
            out.append(rng.choice(UNICODE_WORDS) if rng.random() < uni else rng.choice(WORDS))
    return " ".join(out)


def dumps(rec: Any, rng: random.Random) -> str:
    return json.dumps(rec, ensure_ascii=rng.random() < 0.4)


@dataclass
class Layout:
    data: bytes
    line_of: list[int]
    """Physical (1-based) line of each record."""
    suffix: str
    eof_line: int


def layout(
    rec_lines: list[str | bytes], rng: random.Random, *, kind: str | None = None, blanks: bool = True, eol: str | None = None
) -> Layout:
    """Put serialised records in a file: JSONL (random blank lines) or a JSON list, one record per line."""
    kind = kind or ("json" if rng.random() < 0.2 else "jsonl")
    eol = eol or ("\r\n" if rng.random() < 0.1 else "\n")
    eolb = eol.encode()
    enc = [line.encode("utf-8") if isinstance(line, str) else line for line in rec_lines]
    parts: list[bytes] = []
    line_of = []
    line = 1
    if kind == "json":
        parts.append(b"[" + eolb)
        line += 1
        for i, body in enumerate(enc):
            line_of.append(line)
            parts.append(body + (b"," if i < len(enc) - 1 else b"") + eolb)
            line += 1
        parts.append(b"]" + eolb)
        return Layout(b"".join(parts), line_of, ".json", line + 1)
    for body in enc:
        while blanks and rng.random() < 0.15:
            parts.append(rng.choice([b"", b"   ", b"\t"]) + eolb)
            line += 1
        line_of.append(line)
        parts.append(body + eolb)
        line += 1
    suffix = ".jsonl" if rng.random() < 0.9 else ".txt"  # other suffixes are sniffed
    return Layout(b"".join(parts), line_of, suffix, line)


# ============================================================================ formats


def set_path(rec: dict, path: tuple, value: Any) -> dict:
    rec = copy.deepcopy(rec)
    target = rec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return rec


def get_path(rec: Any, path: tuple) -> Any:
    for key in path:
        rec = rec[key]
    return rec


NONEMPTY_STR = [0, 1.5, -7, True, None, [], ["x"], {}, {"k": "v"}, "", "  \n\t "]
ANY_STR = [0, 1.5, True, None, [], ["x"], {}, {"k": "v"}]
PROMPT = [0, 1.5, True, None, [], ["x"], [1, 2], {}, {"role": "user", "content": "x"}, "", " "]
PROMPT_NOT_EMPTY_STR = [0, 1.5, True, None, [], ["x"], [1, 2], {}, {"role": "user", "content": "x"}]
RESP_LIST = ["ab", 3, None, True, {}, {"0": "a"}, [], ["only one"], ["a", 5], ["a", None], ["a", ["b"]], ["a", ""]]
RESP_LIST_ANY_STR = ["ab", 3, None, True, {}, {"0": "a"}, [], ["only one"], ["a", 5], ["a", None], ["a", ["b"]]]
RESP_PAIR = RESP_LIST_ANY_STR + [["a", "b", "c"]]
PREFERRED = ["A", "c", "", 1, 0, None, True, ["a"], {"a": 1}, "a "]
BOOL = ["true", 1, 0, None, [], {}, "yes"]
DICT = [1, "x", [], ["a"], True, None]
ROLE = ["robot", "User", "", 5, None, [], {}]
MSG_LIST = ["hi", 5, None, {}, [], ["hi"], [5]]
MSG_LIST_NOT_STR = [5, None, {}, [], ["hi"], [5]]  # a TRL chosen/rejected may be a plain string
TEXT_POOLS = (NONEMPTY_STR, ANY_STR, PROMPT, PROMPT_NOT_EMPTY_STR)


def ranking_pool(k: int) -> list:
    return [
        "0,1",
        0,
        None,
        [],
        [0],
        [0] * k,
        [1.0] + list(range(k - 1)),
        [True, False] + list(range(2, k)),
        list(range(1, k + 1)),
        {"0": 1},
        [[i] for i in range(k)],
        [str(i) for i in range(k)],
    ]


def msgs(rng: random.Random, *, system: bool = False, turns: int = 1, end_user: bool = False) -> list[dict]:
    out = [{"role": "system", "content": words(rng)}] if system else []
    for _ in range(turns):
        out.append({"role": "user", "content": words(rng)})
        out.append({"role": "assistant", "content": words(rng)})
    if end_user:
        out.append({"role": "user", "content": words(rng)})
    return out


@dataclass
class Fmt:
    name: str
    title: str
    make: Callable[[random.Random, int], dict]
    fields: Callable[[dict], list[tuple[tuple, list]]]
    """(path, bad values) of each checked field of a record."""
    required: Callable[[dict], list[str]]
    optional: Callable[[dict], list[str]]
    empty: Expect
    """What an empty file should do."""
    extra: str = "x_extra"
    """A field the loader ignores (meta for preferences, which must hold an object)."""


def sft_make(rng: random.Random, i: int) -> dict:
    if rng.random() < 0.6:
        return {"prompt": words(rng), "completion": words(rng)}
    return {"messages": msgs(rng, system=rng.random() < 0.3, turns=rng.randint(1, 2))}


def sft_fields(rec: dict) -> list:
    if "messages" in rec:
        out = [(("messages",), MSG_LIST)]
        for i, m in enumerate(rec["messages"]):
            out.append((("messages", i, "role"), ROLE))
            out.append((("messages", i, "content"), NONEMPTY_STR if m["role"] == "assistant" else ANY_STR))
        return out
    return [(("prompt",), NONEMPTY_STR), (("completion",), NONEMPTY_STR)]


def pref_make(rng: random.Random, i: int) -> dict:
    family = rng.choice(["rlhfkit", "seed", "trl", "trl-chat", "hh", "ranked", "implicit"])
    if family == "rlhfkit":
        k = rng.choice([2, 2, 3, 4])
        ranking = list(range(k))
        rng.shuffle(ranking)
        rec = {"prompt": words(rng), "responses": [words(rng) for _ in range(k)], "ranking": ranking}
        if k == 2 and rng.random() < 0.5:
            rec["tie"] = rng.random() < 0.3
    elif family == "seed":
        rec = {
            "prompt": words(rng),
            "response_a": words(rng),
            "response_b": words(rng),
            "preferred": rng.choice(["a", "b", "tie"]),
        }
    elif family == "trl":
        rec = {"prompt": words(rng), "chosen": words(rng), "rejected": words(rng)}
    elif family == "trl-chat":
        rec = {
            "prompt": msgs(rng, turns=rng.randint(0, 1), end_user=True),
            "chosen": [{"role": "assistant", "content": words(rng)}],
            "rejected": [{"role": "assistant", "content": words(rng)}],
        }
    elif family == "hh":
        q = words(rng)
        rec = {"chosen": f"\n\nHuman: {q}\n\nAssistant: {words(rng)}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {words(rng)}"}
    elif family == "implicit":
        shared = [{"role": "user", "content": words(rng)}]
        rec = {
            "chosen": shared + [{"role": "assistant", "content": words(rng)}],
            "rejected": shared + [{"role": "assistant", "content": words(rng)}],
        }
    else:
        rec = {"prompt": words(rng), "ranked": [words(rng) for _ in range(rng.randint(2, 4))]}
    if rng.random() < 0.3:
        rec["reason"] = words(rng)
    if rng.random() < 0.2:
        rec["source"] = "human:" + rng.choice(WORDS)
    if rng.random() < 0.2:
        rec["meta"] = {"score": rng.random(), "tag": rng.choice(WORDS)}
    return rec


def pref_fields(rec: dict) -> list:
    out: list = []
    if isinstance(rec.get("prompt"), str):
        out.append((("prompt",), PROMPT))
    elif isinstance(rec.get("prompt"), list):
        out.append((("prompt",), PROMPT))
        out.append((("prompt", len(rec["prompt"]) - 1, "content"), ANY_STR))
        out.append((("prompt", len(rec["prompt"]) - 1, "role"), ROLE + ["assistant"]))
    if "responses" in rec:
        k = len(rec["responses"])
        out += [(("responses",), RESP_LIST), (("responses", 0), NONEMPTY_STR), (("ranking",), ranking_pool(k))]
        if "tie" in rec:
            out.append((("tie",), BOOL))
    if "response_a" in rec:
        out += [(("response_a",), NONEMPTY_STR), (("response_b",), NONEMPTY_STR), (("preferred",), PREFERRED)]
    if "ranked" in rec:
        out += [(("ranked",), RESP_LIST), (("ranked", 1), NONEMPTY_STR)]
    if "chosen" in rec:
        if isinstance(rec["chosen"], str):
            out += [(("chosen",), NONEMPTY_STR), (("rejected",), NONEMPTY_STR)]
        else:
            out += [
                (("chosen",), MSG_LIST_NOT_STR),
                (("rejected",), MSG_LIST_NOT_STR),
                (("chosen", len(rec["chosen"]) - 1, "content"), NONEMPTY_STR),
                (("rejected", len(rec["rejected"]) - 1, "role"), ROLE + ["user"]),
            ]
    for opt, pool in (("reason", ANY_STR), ("source", ANY_STR), ("meta", DICT)):
        if opt in rec:
            out.append(((opt,), pool))
    return out


def pref_required(rec: dict) -> list[str]:
    for keys in (("responses", "ranking"), ("response_a", "response_b", "preferred"), ("ranked",)):
        if keys[0] in rec:
            return ["prompt", *keys]
    return ["chosen", "rejected"]  # deleting a TRL pair's prompt leaves an hh/implicit record that fails its own checks


def prompts_make(rng: random.Random, i: int) -> dict:
    rec: dict = {"prompt": words(rng) if rng.random() < 0.7 else msgs(rng, turns=0, end_user=True)}
    if rng.random() < 0.3:
        rec["id"] = i
    return rec


def samples_make(rng: random.Random, i: int) -> dict:
    k = rng.choice([2, 2, 2, 4])
    prompt = words(rng) if rng.random() < 0.8 else msgs(rng, turns=0, end_user=True)
    return {
        "prompt_index": i,
        "prompt": prompt,
        "responses": [words(rng) for _ in range(k)],
        "temperatures": [0.7, 1.2, 0.7, 1.0][:k],
    }


def pairs_make(rng: random.Random, i: int) -> dict:
    prompt = words(rng) if rng.random() < 0.8 else msgs(rng, turns=0, end_user=True)
    if rng.random() < 0.7:
        return {"prompt_index": i, "prompt": prompt, "responses": [words(rng), words(rng)]}
    return {"prompt": prompt, "response_a": words(rng), "response_b": words(rng)}


FORMATS = {
    "sft": Fmt(
        "sft",
        "SFT data (load_sft_file)",
        sft_make,
        sft_fields,
        lambda r: ["messages"] if "messages" in r else ["prompt", "completion"],
        lambda r: [],
        "error",
    ),
    "pref": Fmt(
        "pref",
        "preference data (load_comparisons)",
        pref_make,
        pref_fields,
        pref_required,
        lambda r: [k for k in ("reason", "source", "meta", "tie") if k in r],
        "either",
        extra="meta",
    ),
    "prompts": Fmt(
        "prompts",
        "prompts (data.prompts.load_prompts)",
        prompts_make,
        lambda r: (
            [(("prompt",), PROMPT)]
            + ([(("prompt", 0, "role"), ROLE), (("prompt", 0, "content"), ANY_STR)] if isinstance(r["prompt"], list) else [])
        ),
        lambda r: ["prompt"],
        lambda r: [k for k in ("id",) if k in r],
        "error",
    ),
    "samples": Fmt(
        "samples",
        "samples to label (label.load_items)",
        samples_make,
        lambda r: [(("prompt",), PROMPT_NOT_EMPTY_STR), (("responses",), RESP_LIST_ANY_STR), (("responses", 1), ANY_STR)],
        lambda r: ["prompt", "responses"],
        lambda r: ["prompt_index", "temperatures"],
        "either",
    ),
    "pairs": Fmt(
        "pairs",
        "annotation pairs (annotate serve: read_pairs)",
        pairs_make,
        lambda r: (
            (
                [(("responses",), RESP_PAIR), (("responses", 0), ANY_STR)]
                if "responses" in r
                else [(("response_a",), ANY_STR), (("response_b",), ANY_STR)]
            )
            + [(("prompt",), PROMPT)]
        ),
        lambda r: ["prompt", "responses"] if "responses" in r else ["prompt", "response_a", "response_b"],
        lambda r: [k for k in ("prompt_index",) if k in r],
        "error",
    ),
}


def loader(fmt: str) -> Callable[[Path], list]:
    if fmt == "sft":
        from rlhfkit.data.sft import load_sft_file

        return load_sft_file
    if fmt == "pref":
        from rlhfkit.data.preferences import load_comparisons

        return load_comparisons
    if fmt == "prompts":
        from rlhfkit.data.prompts import load_prompts

        return load_prompts
    if fmt == "samples":
        from rlhfkit.label import load_items

        return load_items
    if fmt == "pairs":
        from rlhfkit.feedback.web.pairs import read_pairs

        return lambda path: read_pairs(path)[0]
    raise KeyError(fmt)


# ============================================================================ data-file mutations


class Gen:
    """Builds the cases of one data format."""

    def __init__(self, fmt: Fmt, rng: random.Random):
        self.f, self.rng = fmt, rng
        self.n = 0

    def records(self, lo: int = 1, hi: int = 6) -> list[dict]:
        return [self.f.make(self.rng, i) for i in range(self.rng.randint(lo, hi))]

    def case(self, mutation: str, data: bytes, expect: Expect, *, valid: bool, suffix: str = ".jsonl", **kw: Any) -> Case:
        self.n += 1
        return Case(f"{self.f.name}-{mutation}-{self.n:04d}", self.f.name, mutation, data, expect, valid, suffix, **kw)

    def good(
        self,
        mutation: str,
        recs: list[dict],
        lines: list[str | bytes] | None = None,
        *,
        needle: str | None = None,
        kind: str | None = None,
        eol: str | None = None,
        records: int | None = None,
    ) -> Case:
        lay = layout(lines if lines is not None else [dumps(r, self.rng) for r in recs], self.rng, kind=kind, eol=eol)
        return self.case(
            mutation,
            lay.data,
            "load",
            valid=True,
            suffix=lay.suffix,
            records=len(recs) if records is None else records,
            needle=needle,
        )

    def bad_at(
        self,
        mutation: str,
        recs: list[dict],
        k: int,
        bad_line: str | bytes,
        *,
        kind: str | None = None,
        expect: Expect = "error",
        valid: bool = False,
        **kw: Any,
    ) -> Case:
        lines: list[str | bytes] = [dumps(r, self.rng) for r in recs]
        lines[k] = bad_line
        lay = layout(lines, self.rng, kind=kind)
        return self.case(
            mutation,
            lay.data,
            expect,
            valid=valid,
            suffix=lay.suffix,
            lines=(lay.line_of[k], lay.line_of[k]),
            records=len(recs),
            **kw,
        )

    def with_text(self, rec: dict, inner: str) -> tuple[dict, tuple]:
        """``rec`` with ``inner`` placed in the middle of one of its string fields (one the loaders keep)."""
        fields = [p for p, pool in self.f.fields(rec) if any(pool is t for t in TEXT_POOLS) and p[-1] != "role"]
        paths = [p for p in fields if isinstance(get_path(rec, p), str)]
        path = self.rng.choice(paths)
        value = get_path(rec, path)
        if self.f.name == "pref" and path[0] in ("chosen", "rejected") and isinstance(value, str):
            head, _, tail = value.rpartition("Assistant: ")
            return set_path(rec, path, f"{head}Assistant: {tail} {inner} end"), path
        return set_path(rec, path, f"{value} {inner} end"), path

    # ------------------------------------------------------------ families

    def wrong_type(self) -> Case:
        recs = self.records()
        k = self.rng.randrange(len(recs))
        path, pool = self.rng.choice(self.f.fields(recs[k]))
        value = self.rng.choice(pool)
        recs[k] = set_path(recs[k], path, value)
        return self.bad_at(f"type[{'.'.join(map(str, path))}={json.dumps(value)[:12]}]", recs, k, dumps(recs[k], self.rng))

    def missing(self) -> Case:
        recs = self.records()
        k = self.rng.randrange(len(recs))
        key = self.rng.choice(self.f.required(recs[k]))
        rec = dict(recs[k])
        rec.pop(key, None)
        recs[k] = rec
        return self.bad_at(f"missing[{key}]", recs, k, dumps(rec, self.rng))

    def optional_or_extra(self) -> Case:
        recs = self.records()
        k = self.rng.randrange(len(recs))
        opts = self.f.optional(recs[k])
        if opts and self.rng.random() < 0.5:
            rec = dict(recs[k])
            rec.pop(self.rng.choice(opts))
            recs[k] = rec
            return self.good("drop-optional", recs)
        extra = self.rng.choice(
            [
                {"id": 5},
                {"note": None},
                {"x_extra": [1, {"a": []}]},
                {"score_chosen": 8.5},
                {"prompt_id": "abc"},
                {"": ""},
                {"ünïcode-key": "v"},
            ]
        )
        recs[k] = {**recs[k], **extra}
        return self.good("extra-field", recs)

    def truncate(self) -> Case:
        recs = self.records(1, 5)
        lines = [dumps(r, self.rng) for r in recs]
        lay = layout(lines, self.rng)
        data = lay.data
        cut = self.rng.randint(1, len(data) - 1)
        head = data[:cut]
        if lay.suffix == ".json":
            if head.rstrip() == data.rstrip():  # only the final line end is gone
                return self.case("truncate", head, "load", valid=True, suffix=".json", records=len(recs))
            return self.case("truncate", head, "error", valid=False, suffix=".json", lines=(1, head.count(b"\n") + 1))
        # JSONL: complete records before the cut load; a cut inside a record is an error on its line.
        starts = []
        pos = 0
        for physical in data.split(b"\n"):
            starts.append(pos)
            pos += len(physical) + 1
        line_no = head.count(b"\n") + 1
        partial = head[starts[line_no - 1] :]
        full_line = data.split(b"\n")[line_no - 1]
        complete = [i for i, ln in enumerate(lay.line_of) if ln < line_no]
        if partial.rstrip(b"\r \t") == full_line.rstrip(b"\r \t"):
            complete = [i for i, ln in enumerate(lay.line_of) if ln <= line_no]
            partial = b""
        if not partial.strip():
            n = len(complete)
            expect: Expect = "load" if n else self.f.empty
            if expect == "error":
                return self.case("truncate", head, "error", valid=False, suffix=lay.suffix)
            return self.case("truncate", head, expect, valid=True, suffix=lay.suffix, records=n)
        return self.case("truncate", head, "error", valid=False, suffix=lay.suffix, lines=(line_no, line_no))

    def encoding(self) -> Case:
        kind = self.rng.choice(
            ["latin-1", "cp1252", "utf-16", "utf-16-be-bom", "utf-16-le", "invalid-bytes", "invalid-bytes", "utf-32"]
        )
        recs = self.records(2, 5)
        if kind in ("latin-1", "cp1252"):
            k = self.rng.randrange(len(recs))
            word = self.rng.choice(LATIN1_WORDS) if kind == "latin-1" else "\u201csmart quotes\u201d \u2013 dash"
            recs[k], _ = self.with_text(recs[k], "@@X@@")
            lines = [json.dumps(r).replace("@@X@@", word) for r in recs]  # the only non-ASCII text
            lay = layout(lines, self.rng)
            data = lay.data.decode("utf-8").encode(kind)
            return self.case(
                f"encoding[{kind}]", data, "error", valid=False, suffix=lay.suffix, lines=(lay.line_of[k], lay.line_of[k])
            )
        if kind == "invalid-bytes":
            k = self.rng.randrange(len(recs))
            junk = self.rng.choice(
                [
                    b"\xff",
                    b"\xfe\xfe",
                    b"\xc0\xaf",
                    b"\xed\xa0\x80",
                    b"\xf8\x88\x80\x80\x80",
                    b"\x80",
                    b"\xe2\x82",
                    b"\xf4\x90\x80\x80",
                    b"\xc3",
                ]
            )
            recs[k], _ = self.with_text(recs[k], "@@X@@")
            line = dumps(recs[k], self.rng).encode("utf-8").replace(b"@@X@@", junk)
            return self.bad_at(f"encoding[bytes {junk.hex()}]", recs, k, line)
        text_lines = [json.dumps(r, ensure_ascii=self.rng.random() < 0.5) for r in recs]
        body = "\n".join(text_lines) + "\n"
        codec = {"utf-16": "utf-16", "utf-16-be-bom": "utf-16-be", "utf-16-le": "utf-16-le", "utf-32": "utf-32"}[kind]
        data = body.encode(codec)
        if kind == "utf-16-be-bom":
            data = b"\xfe\xff" + data
        try:  # where a UTF-8 reader first stumbles: an invalid byte, else the JSON of line 1
            data.decode("utf-8")
            line = 1
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
        return self.case(f"encoding[{kind}]", data, "error", valid=False, suffix=".jsonl", lines=(line, line))

    def huge(self) -> Case:
        size = self.rng.choice([1, 1, 2, 5]) * MB
        recs = self.records(1, 3)
        k = self.rng.randrange(len(recs))
        what = self.rng.choice(["valid", "valid", "garbage", "blank"])
        if what == "valid":
            big = "".join(self.rng.choice("abcdefghij ") for _ in range(997)) * (size // 1000)
            recs[k], _ = self.with_text(recs[k], "HUGE" + big + "TAIL")
            return self.good(f"huge[{size // MB}MB]", recs, needle="TAIL")
        if what == "blank":
            lines = [dumps(r, self.rng) for r in recs]
            lines.insert(k, " " * size)
            return self.good(f"huge-blank[{size // MB}MB]", recs, lines, kind="jsonl")
        garbage = '{"prompt": "' + "x" * size  # an unterminated 5 MB string, no newline until the next record
        return self.bad_at(f"huge-garbage[{size // MB}MB]", recs, k, garbage)

    def control(self) -> Case:
        recs = self.records(1, 5)
        k = self.rng.randrange(len(recs))
        mode = self.rng.choice(["raw", "raw", "raw", "escaped", "del", "between", "blank-line"])
        ch = self.rng.choice(["\x00", "\x01", "\x07", "\x08", "\t", "\x0b", "\x0c", "\x1b", "\x1c", "\x1d", "\x1e", "\x1f"])
        if mode == "escaped":
            recs[k], _ = self.with_text(recs[k], f"ctl{ch}ctl")
            return self.good(f"control[escaped {ord(ch):#04x}]", recs, needle=f"ctl{ch}ctl")
        if mode == "del":
            recs[k], _ = self.with_text(recs[k], "@@X@@")
            line = dumps(recs[k], self.rng).replace("@@X@@", "d\x7fd")
            return self.good(
                "control[raw DEL]",
                recs,
                [*(dumps(r, self.rng) for r in recs[:k]), line, *(dumps(r, self.rng) for r in recs[k + 1 :])],
                needle="d\x7fd",
            )
        if mode == "between":
            line = dumps(recs[k], self.rng)
            line = line[:1] + ch + line[1:]  # after the opening brace: JSON whitespace is space, tab, CR, LF only
            if ch == "\t":
                lines = [dumps(r, self.rng) for r in recs]
                lines[k] = line
                return self.good("control[tab between tokens]", recs, lines)
            return self.bad_at(f"control[between {ord(ch):#04x}]", recs, k, line)
        if mode == "blank-line":  # a line holding only a control character: str.strip() calls it blank
            lines: list[str | bytes] = [dumps(r, self.rng) for r in recs]
            lines.insert(k, ch * 3)
            lay = layout(lines, self.rng, kind="jsonl", blanks=False)
            expect: Expect = "either" if ch in "\x0b\x0c\x1c\x1d\x1e\x1f\t" else "error"
            return self.case(
                f"control[line of {ord(ch):#04x}]",
                lay.data,
                expect,
                valid=False,
                suffix=lay.suffix,
                lines=(lay.line_of[k], lay.line_of[k]),
                records=len(recs),
            )
        recs[k], _ = self.with_text(recs[k], "@@X@@")
        line = dumps(recs[k], self.rng).replace("@@X@@", f"c{ch}c")
        return self.bad_at(f"control[raw {ord(ch):#04x}]", recs, k, line)

    def separators(self) -> Case:
        recs = self.records(1, 5)
        k = self.rng.randrange(len(recs))
        seps = "".join(self.rng.sample(["\u2028", "\u2029", "\u0085"], self.rng.randint(1, 3)))
        needle = f"s{seps}s"
        recs[k], _ = self.with_text(recs[k], "@@X@@")
        lines: list[str | bytes] = [dumps(r, self.rng) for r in recs]
        lines[k] = str(lines[k]).replace("@@X@@", needle)  # raw, even when the rest is ASCII-escaped
        return self.good("unicode-separators", recs, lines, needle=needle)

    def empty(self) -> Case:
        data = self.rng.choice([b"", b"\n", b"   \n\t\n", b"\r\n\r\n", b"\n" * 50])
        suffix = ".jsonl"
        if self.rng.random() < 0.3:
            data, suffix = self.rng.choice([(b"[]", ".json"), (b"[\n]\n", ".json"), (b"", ".json")])
            if data == b"":  # an empty .json is not a JSON list
                return self.case("empty[.json]", data, "error", valid=False, suffix=".json")
        return self.case(
            f"empty[{suffix}]", data, self.f.empty, valid=False, suffix=suffix, records=0 if self.f.empty == "either" else None
        )

    def arrays(self) -> Case:
        recs = self.records(1, 4)
        mode = self.rng.choice(
            [
                "array-in-jsonl",
                "array-in-jsonl-1line",
                "array-in-json",
                "array-sniffed",
                "jsonl-in-json",
                "trailing-comma",
                "non-object-element",
                "object-top-level",
                "nested-array",
                "extra-after-list",
            ]
        )
        items = [json.dumps(r) for r in recs]
        if mode == "array-in-jsonl":
            return self.case(mode, ("[\n" + ",\n".join(items) + "\n]\n").encode(), "error", valid=False, lines=(1, 1))
        if mode == "array-in-jsonl-1line":
            return self.case(mode, ("[" + ", ".join(items) + "]\n").encode(), "error", valid=False, lines=(1, 1))
        if mode == "array-in-json":
            return self.case(mode, ("[" + ", ".join(items) + "]").encode(), "load", valid=True, suffix=".json", records=len(recs))
        if mode == "array-sniffed":
            return self.case(
                mode, ("  \n[" + ",\n".join(items) + "]\n").encode(), "load", valid=True, suffix=".data", records=len(recs)
            )
        if mode == "jsonl-in-json":
            return self.case(mode, ("\n".join(items) + "\n").encode(), "error", valid=False, suffix=".json", lines=(1, 1))
        if mode == "trailing-comma":
            body = "[\n" + ",\n".join(items) + ",\n]\n"
            return self.case(mode, body.encode(), "error", valid=False, suffix=".json", lines=(len(items) + 1, len(items) + 2))
        if mode == "non-object-element":
            k = self.rng.randrange(len(items))
            items[k] = self.rng.choice(["5", '"text"', "null", "[1, 2]", "true"])
            return self.case(
                mode, ("[\n" + ",\n".join(items) + "\n]\n").encode(), "error", valid=False, suffix=".json", lines=(k + 2, k + 2)
            )
        if mode == "object-top-level":
            return self.case(mode, json.dumps({"data": recs}).encode(), "error", valid=False, suffix=".json", lines=(1, 1))
        if mode == "nested-array":
            return self.case(mode, ("[[" + ", ".join(items) + "]]").encode(), "error", valid=False, suffix=".json", lines=(1, 1))
        body = "[\n" + ",\n".join(items) + "\n]\n" + items[0] + "\n"
        return self.case(mode, body.encode(), "error", valid=False, suffix=".json", lines=(len(items) + 2, len(items) + 3))

    def bom(self) -> Case:
        recs = self.records(1, 4)
        lay = layout([dumps(r, self.rng) for r in recs], self.rng, blanks=False)
        where = self.rng.choice(["start", "start", "middle"])
        if where == "start" or len(recs) == 1:
            return self.case(
                f"bom[start{lay.suffix}]",
                b"\xef\xbb\xbf" + lay.data,
                "either",
                valid=True,
                suffix=lay.suffix,
                records=len(recs),
                lines=(1, 1),
            )
        k = self.rng.randrange(1, len(recs))
        lines: list[str | bytes] = [dumps(r, self.rng) for r in recs]
        lines[k] = "\ufeff" + str(lines[k])  # two files concatenated
        lay = layout(lines, self.rng, kind="jsonl")
        return self.case(
            "bom[middle]",
            lay.data,
            "either",
            valid=False,
            suffix=lay.suffix,
            records=len(recs),
            lines=(lay.line_of[k], lay.line_of[k]),
        )

    def line_ends(self) -> Case:
        recs = self.records(2, 5)
        mode = self.rng.choice(["crlf", "crlf", "mixed", "lone-cr", "no-final-eol"])
        lines = [dumps(r, self.rng) for r in recs]
        if mode == "crlf":
            return self.good("eol[crlf]", recs, eol="\r\n")
        if mode == "mixed":
            data = "".join(line + self.rng.choice(["\n", "\r\n"]) for line in lines).encode()
            return self.case("eol[mixed]", data, "load", valid=True, records=len(recs))
        if mode == "no-final-eol":
            return self.case("eol[no final]", "\n".join(lines).encode(), "load", valid=True, records=len(recs))
        return self.case("eol[lone cr]", "\r".join(lines).encode() + b"\r", "error", valid=False, lines=(1, 1))

    def dup_keys(self) -> Case:
        recs = self.records(1, 4)
        k = self.rng.randrange(len(recs))
        fields = [(p, pool) for p, pool in self.f.fields(recs[k]) if len(p) == 1]
        path, pool = self.rng.choice(fields)
        key = path[0]
        good = recs[k][key]
        bad = self.rng.choice(pool)
        rest = {k2: v for k2, v in recs[k].items() if k2 != key}
        head = json.dumps(rest)[:-1] + (", " if rest else "")
        if self.rng.random() < 0.5:  # bad first, good last: Python's json keeps the last
            line = head + f"{json.dumps(key)}: {json.dumps(bad)}, {json.dumps(key)}: {json.dumps(good)}}}"
            return self.good(
                f"dup-key[{key} bad,good]",
                recs,
                [*(dumps(r, self.rng) for r in recs[:k]), line, *(dumps(r, self.rng) for r in recs[k + 1 :])],
            )
        line = head + f"{json.dumps(key)}: {json.dumps(good)}, {json.dumps(key)}: {json.dumps(bad)}}}"
        return self.bad_at(f"dup-key[{key} good,bad]", recs, k, line)

    def nesting(self) -> Case:
        recs = self.records(1, 4)
        k = self.rng.randrange(len(recs))
        depth = self.rng.choice([50, 200, 400, 5_000, 100_000, 1_000_000])
        where = self.rng.choice(["extra", "extra", "field"])
        if self.f.name == "pref":
            nest = '{"a": ' * depth + "1" + "}" * depth
        else:
            nest = "[" * depth + "]" * depth
        if where == "field" or depth > 1000:
            path, _ = self.rng.choice(
                [(p, pool) for p, pool in self.f.fields(recs[k]) if len(p) == 1 and p[0] not in ("meta", self.f.extra)]
            )
            if where == "extra":
                path = (self.f.extra,)
        else:
            path = (self.f.extra,)
        rec = set_path(recs[k], path, "@@NEST@@")
        line = dumps(rec, self.rng).replace('"@@NEST@@"', nest)
        shallow_ok = depth <= 400 and path == (self.f.extra,)
        if shallow_ok:
            lines: list[str | bytes] = [dumps(r, self.rng) for r in recs]
            lines[k] = line
            return self.good(f"nesting[{depth} in {path[0]}]", recs, lines)
        c = self.bad_at(f"nesting[{depth} in {path[0]}]", recs, k, line)
        c.isolate = True
        return c

    def surrogates(self) -> Case:
        recs = self.records(1, 4)
        k = self.rng.randrange(len(recs))
        esc = self.rng.choice(["\\ud800", "\\udfff", "\\ud83d", "\\ude00x", "\\ud83d\\ude00", "\\ud83d\\ude00"])
        recs[k], _ = self.with_text(recs[k], "@@X@@")
        lines: list[str | bytes] = [dumps(r, self.rng) for r in recs]
        lines[k] = str(lines[k]).replace("@@X@@", f"u{esc}u")
        if esc == "\\ud83d\\ude00":  # an escaped surrogate pair is one valid character
            return self.good("surrogate[pair]", recs, lines, needle="u\U0001f600u")
        # A lone surrogate parses in Python's json but is no Unicode text: tokenizers and UTF-8 writers raise later.
        lay = layout(lines, self.rng)
        return self.case(
            f"surrogate[lone {esc}]", lay.data, "error", valid=False, suffix=lay.suffix, lines=(lay.line_of[k], lay.line_of[k])
        )

    def syntax(self) -> Case:
        recs = self.records(1, 5)
        k = self.rng.randrange(len(recs))
        good = json.dumps(recs[k])
        mode = self.rng.choice(
            [
                "single-quotes",
                "trailing-comma",
                "comment",
                "unquoted-key",
                "open-brace",
                "two-objects",
                "non-object",
                "non-object",
                "nan-extra",
                "bigint-extra",
                "python-repr",
                "empty-object",
            ]
        )
        if mode == "nan-extra":  # Python's json reads NaN/Infinity; the field is ignored
            rec = (
                set_path(recs[k], (self.f.extra,), "@@V@@")
                if self.f.name != "pref"
                else set_path(recs[k], ("meta",), {"v": "@@V@@"})
            )
            line = json.dumps(rec).replace('"@@V@@"', self.rng.choice(["NaN", "Infinity", "-Infinity", "1e999"]))
            return self.bad_at("syntax[nan in ignored field]", recs, k, line, expect="either", valid=True)
        if mode == "bigint-extra":
            rec = (
                set_path(recs[k], (self.f.extra,), "@@V@@")
                if self.f.name != "pref"
                else set_path(recs[k], ("meta",), {"v": "@@V@@"})
            )
            line = json.dumps(rec).replace('"@@V@@"', "9" * self.rng.choice([5_000, 50_000]))
            return self.bad_at("syntax[huge int literal]", recs, k, line, expect="either", valid=False)
        line = {
            "single-quotes": good.replace('"', "'"),
            "trailing-comma": good[:-1] + ", }",
            "comment": good + " // note",
            "unquoted-key": re.sub(r'"(\w+)":', r"\1:", good, count=1),
            "open-brace": good[: max(1, len(good) // 2)],
            "two-objects": good + " " + good,
            "non-object": self.rng.choice(["5", '"text"', "null", "[1, 2]", "true", json.dumps([recs[k]])]),
            "python-repr": repr(recs[k]),
            "empty-object": "{}",
        }[mode]
        return self.bad_at(f"syntax[{mode}]", recs, k, line)

    def plain_valid(self) -> Case:
        recs = self.records(1, 8)
        return self.good("valid", recs)


# How many cases of each family per data format (full mode); quick mode takes about a fifth.
FAMILIES = {
    "wrong_type": 44,
    "missing": 12,
    "optional_or_extra": 6,
    "truncate": 18,
    "encoding": 16,
    "huge": 4,
    "control": 14,
    "separators": 8,
    "empty": 5,
    "arrays": 10,
    "bom": 3,
    "line_ends": 5,
    "dup_keys": 5,
    "nesting": 6,
    "surrogates": 6,
    "syntax": 12,
    "plain_valid": 3,
}


def data_cases(rng: random.Random, scale: float) -> list[Case]:
    cases = []
    for fmt in FORMATS.values():
        gen = Gen(fmt, random.Random(rng.random()))
        for family, count in FAMILIES.items():
            for _ in range(max(1, round(count * scale))):
                cases.append(getattr(gen, family)())
    return cases


# ============================================================================ YAML configs


def config_classes() -> dict[str, tuple[type, str]]:
    from rlhfkit.dpo import DPOConfig
    from rlhfkit.label import LabelConfig
    from rlhfkit.reward import RewardConfig
    from rlhfkit.sample import SampleConfig
    from rlhfkit.sft import SFTConfig

    return {
        "SFTConfig": (SFTConfig, "sft"),
        "RewardConfig": (RewardConfig, "reward"),
        "DPOConfig": (DPOConfig, "dpo"),
        "SampleConfig": (SampleConfig, "sample"),
        "LabelConfig": (LabelConfig, "label"),
    }


def _base(tp: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in get_args(tp)
    return tp, False


def valid_value(tp: Any, rng: random.Random) -> Any:
    tp, _ = _base(tp)
    origin = get_origin(tp)
    if tp is bool:
        return rng.choice([True, False])
    if tp is int:
        return rng.randint(0, 500)
    if tp is float:
        return rng.choice([0.0, 0.5, 1.0, 1e-4, 2.5e-5, 3.0])
    if tp is str:
        return rng.choice(["runs/x", "data/train.jsonl", "tiny", "some text", "ü-path/ß.jsonl"])
    if origin is Literal:
        return rng.choice(get_args(tp))
    if origin in (list, tuple):
        return [valid_value(get_args(tp)[0] if get_args(tp) else str, rng) for _ in range(rng.randint(1, 3))]
    if origin is dict:
        return rng.choice([{}, {"k": 1}])
    return None


def wrong_values(tp: Any) -> list[Any]:
    tp, optional = _base(tp)
    origin = get_origin(tp)
    none = [] if optional else [None]
    if tp is bool:
        return ["maybe", 2, [True], {"a": 1}, 1.5, *none]
    if tp is int:
        return ["abc", [1, 2], {"a": 1}, True, 1.5, "1.5e0x", *none]
    if tp is float:
        return ["abc", [1.0], {"a": 1}, True, "1e-4x", *none]
    if tp is str:
        return [[1, 2], {"a": 1}, True, *none]
    if origin is Literal:
        return ["definitely-not-valid", 12345, ["x"]]
    if origin in (list, tuple):
        item = get_args(tp)[0] if get_args(tp) else str
        return [{"a": 1}, True, 7.5, [{"a": 1}], *none] + (["abc", [True]] if item is float else [])
    if origin is dict:
        return [5, "x", [1], True, *none]
    return []


def y(value: Any) -> str:
    """A YAML value on one line (flow style)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 30)
    return (text[:-5] if text.endswith("\n...\n") else text).strip()


def yaml_dump(obj: dict[str, Any]) -> str:
    """A mapping as block YAML, one key per line, values in flow style."""
    return "".join(f"{k}: {y(v)}\n" for k, v in obj.items())


def bomb(levels: int = 10, width: int = 9) -> str:
    parts = [f"&l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        parts.append(f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "[" + ", ".join(parts) + "]"


class ConfigGen:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.classes = config_classes()
        self.n = 0

    def pick(self) -> tuple[str, type, dict[str, Any]]:
        name = self.rng.choice(sorted(self.classes))
        cls, _ = self.classes[name]
        return name, cls, typing.get_type_hints(cls)

    def base(self, hints: dict[str, Any], n: int | None = None) -> dict[str, Any]:
        keys = self.rng.sample(sorted(hints), n if n is not None else self.rng.randint(1, 5))
        return {k: valid_value(hints[k], self.rng) for k in keys}

    def case(self, mutation: str, text: str | bytes, expect: Expect, *, valid: bool, cls: str, **kw: Any) -> Case:
        self.n += 1
        data = text.encode("utf-8") if isinstance(text, str) else text
        return Case(
            f"config-{mutation}-{self.n:04d}",
            kw.pop("fmt", "config"),
            mutation,
            data,
            expect,
            valid,
            ".yaml",
            config_cls=cls,
            **kw,
        )

    def valid(self) -> Case:
        name, cls, hints = self.pick()
        values = self.base(hints)
        style = self.rng.choice(["plain", "crlf", "bom", "comments", "flow", "doc-markers", "anchors", "quoted-keys"])
        text = yaml_dump(values)
        if style == "crlf":
            text = text.replace("\n", "\r\n")
        elif style == "bom":
            text = "\ufeff" + text
        elif style == "comments":
            text = (
                "# a comment\n"
                + "".join(f"{line}  # c\n" if not line.endswith(("[", "{")) else line + "\n" for line in text.splitlines())
                + "# end\n"
            )
        elif style == "flow":
            text = "{" + ", ".join(f"{k}: {y(v)}" for k, v in values.items()) + "}\n"
        elif style == "doc-markers":
            text = "---\n" + text + "...\n"
        elif style == "anchors":
            strs = [k for k in hints if _base(hints[k])[0] is str]
            a, b = self.rng.sample(strs, 2)
            values = {**{k: v for k, v in values.items() if k not in (a, b)}, a: "shared/value", b: "shared/value"}
            text = "".join(f"{k}: {y(v)}\n" for k, v in values.items() if k not in (a, b))
            text += f"{a}: &shared shared/value\n{b}: *shared\n"
        elif style == "quoted-keys":
            text = "".join(f'"{k}": {y(v)}\n' for k, v in values.items())
        return self.case(f"valid[{style}]", text, "load", valid=True, cls=name, values=values)

    def odd_valid(self) -> Case:
        name, cls, hints = self.pick()
        mode = self.rng.choice(
            [
                "empty",
                "only-comments",
                "block-scalar",
                "huge-value",
                "own-stage",
                "deep-in-dict",
                "null-top",
                "separators",
                "dict-bomb",
            ]
        )
        strs = [k for k in hints if _base(hints[k])[0] is str]
        key = self.rng.choice(strs)
        if mode == "empty":
            return self.case("odd[empty]", self.rng.choice(["", "\n", "   \n"]), "load", valid=True, cls=name, values={})
        if mode == "only-comments":
            return self.case("odd[comments only]", "# nothing\n  # here\n", "load", valid=True, cls=name, values={})
        if mode == "block-scalar":
            return self.case(
                "odd[block scalar]",
                f"{key}: |\n  first line\n  second\n",
                "load",
                valid=True,
                cls=name,
                values={key: "first line\nsecond\n"},
            )
        if mode == "huge-value":
            big = "x" * (self.rng.choice([1, 5]) * MB)
            return self.case("odd[huge value]", f"{key}: {big}\n", "load", valid=True, cls=name, values={key: big})
        if mode == "own-stage":
            stage = self.classes[name][1]
            return self.case(
                "odd[own stage key]", f"stage: {stage}\n{key}: abc\n", "load", valid=True, cls=name, values={key: "abc"}
            )
        if mode == "deep-in-dict" and name == "LabelConfig":
            nest = "[" * 60 + "]" * 60
            return self.case("odd[nested 60 in dict]", f"scorer_args: {{a: {nest}}}\n", "load", valid=True, cls=name)
        if mode == "dict-bomb" and name == "LabelConfig":
            # Aliases are shared references: loading is cheap; what reads the value must not expand it.
            c = self.case("bomb[in dict field]", f"scorer_args: {{target_words: {bomb()}}}\n", "either", valid=True, cls=name)
            c.isolate = True
            return c
        if mode == "null-top":
            return self.case("odd[null document]", "~\n", "either", valid=True, cls=name)
        if mode == "separators":
            sep = self.rng.choice(["\u2028", "\u2029", "\u0085"])
            return self.case("odd[separator in quoted string]", f'{key}: "a{sep}b"\n', "either", valid=True, cls=name)
        return self.valid()

    def unknown_key(self) -> Case:
        name, cls, hints = self.pick()
        values = self.base(hints)
        bad = self.rng.choice(
            ["bogus", "learning_rate", "max_step", "LR", "Output_Dir", "data ", "model.name", "étrange", "0", "null_key"]
        )
        if self.rng.random() < 0.5 and hints:  # a near-miss of a real key
            real = self.rng.choice(sorted(hints))
            bad = real[:-1] if len(real) > 3 else real + "s"
            bad = bad if bad not in hints else bad + "_x"
        lines = [f"{k}: {y(v)}" for k, v in values.items()]
        lines.insert(self.rng.randint(0, len(lines)), f"{json.dumps(bad)}: {y(self.rng.choice([1, 'x', [1], None]))}")
        return self.case("unknown-key", "\n".join(lines) + "\n", "error", valid=False, cls=name, key=bad.strip())

    def wrong_type(self) -> Case:
        name, cls, hints = self.pick()
        values = self.base(hints)
        candidates = [k for k in sorted(hints) if wrong_values(hints[k])]
        key = self.rng.choice(candidates)
        value = self.rng.choice(wrong_values(hints[key]))
        values[key] = value
        text = "".join(f"{k}: {y(v)}\n" for k, v in values.items())
        return self.case(f"wrong-type[{key}]", text, "error", valid=False, cls=name, key=key)

    def syntax(self) -> Case:
        name, cls, hints = self.pick()
        values = self.base(hints, 3)
        lines = [f"{k}: {y(v)}" for k, v in values.items()]
        k1 = list(values)[0]
        mode = self.rng.choice(
            [
                "indent",
                "tab-indent",
                "tab-nested",
                "unclosed-flow",
                "unclosed-quote",
                "colon",
                "mixed-list",
                "undefined-alias",
                "bad-tag",
                "python-tag",
                "complex-key",
                "multi-doc",
                "duplicate-anchor-use",
            ]
        )
        at = self.rng.randint(1, len(lines))
        if mode == "indent":
            lines.insert(at, "  " + f"{self.rng.choice(sorted(hints))}: 1")
            return self.case("yaml[indent]", "\n".join(lines) + "\n", "error", valid=False, cls=name, lines=(at, at + 2))
        if mode == "tab-indent":
            lines.insert(at, "\t" + f"{self.rng.choice(sorted(hints))}: 1")
            return self.case("yaml[tab indent]", "\n".join(lines) + "\n", "error", valid=False, cls=name, lines=(at, at + 2))
        if mode == "tab-nested":
            lines.insert(at, "scorer_args:\n\ttarget_words: 3")
            return self.case("yaml[tab nested]", "\n".join(lines) + "\n", "error", valid=False, cls=name, lines=(at + 1, at + 2))
        if mode == "unclosed-flow":
            lines.insert(at, f"{k1}: [1, 2")
            return self.case("yaml[unclosed flow]", "\n".join(lines) + "\n", "error", valid=False, cls=name)
        if mode == "unclosed-quote":
            lines.insert(at, f'{k1}: "abc')
            return self.case("yaml[unclosed quote]", "\n".join(lines) + "\n", "error", valid=False, cls=name)
        if mode == "colon":
            lines.insert(at, f"{k1}: a: b")
            return self.case("yaml[colon]", "\n".join(lines) + "\n", "error", valid=False, cls=name, lines=(at, at + 2))
        if mode == "mixed-list":
            lines.insert(at, "- item")
            return self.case(
                "yaml[mapping then list]", "\n".join(lines) + "\n", "error", valid=False, cls=name, lines=(at, at + 2)
            )
        if mode == "undefined-alias":
            lines.insert(at, f"{k1}: *nowhere")
            return self.case("yaml[undefined alias]", "\n".join(lines) + "\n", "error", valid=False, cls=name, lines=(at, at + 2))
        if mode == "bad-tag":
            lines.insert(at, f"{k1}: !!binary aGVsbG8=")
            return self.case("yaml[!!binary]", "\n".join(lines) + "\n", "error", valid=False, cls=name)
        if mode == "python-tag":
            lines.insert(at, f"{k1}: !!python/object/apply:os.system ['echo pwned']")
            return self.case("yaml[python tag]", "\n".join(lines) + "\n", "error", valid=False, cls=name)
        if mode == "complex-key":
            lines.insert(at, "? [a, b]\n: 1")
            return self.case("yaml[unhashable key]", "\n".join(lines) + "\n", "error", valid=False, cls=name)
        if mode == "multi-doc":
            return self.case("yaml[two documents]", "\n".join(lines) + "\n---\nb: 1\n", "error", valid=False, cls=name)
        return self.case("yaml[alias used before anchor]", f"{k1}: *a\nx: &a 1\n", "error", valid=False, cls=name)

    def top_level(self) -> Case:
        name, cls, hints = self.pick()
        text = self.rng.choice(
            ["- a\n- b\n", "hello\n", "42\n", "[1, 2]\n", '"quoted"\n', "- {lr: 1}\n", "true\n", "!!set {a, b}\n"]
        )
        return self.case("top-level[not a mapping]", text, "error", valid=False, cls=name)

    def encoding(self) -> Case:
        name, cls, hints = self.pick()
        values = self.base(hints, 2)
        key = self.rng.choice([k for k in hints if _base(hints[k])[0] is str])
        text = "".join(f"{k}: {y(v)}\n" for k, v in values.items() if k != key) + f"{key}: {self.rng.choice(LATIN1_WORDS)}\n"
        codec = self.rng.choice(["latin-1", "utf-16", "utf-16-le", "cp1252", "bytes", "nul", "control"])
        if codec == "bytes":
            data = text.encode() + self.rng.choice([b"x: \xff\xfe\n", b"y: \xc0\xaf\n", b"z: \xed\xa0\x80\n"])
        elif codec == "nul":
            data = text.encode().replace(b"\n", b"\x00\n", 1)
        elif codec == "control":
            data = text.encode().replace(b": ", b": \x01", 1)
        else:
            data = text.encode(codec)
        return self.case(f"encoding[{codec}]", data, "error", valid=False, cls=name)

    def truncate(self) -> Case:
        name, cls, hints = self.pick()
        text = yaml_dump(self.base(hints, self.rng.randint(2, 6))).encode()
        cut = self.rng.randint(1, len(text) - 1)
        return self.case("truncate", text[:cut], "either", valid=False, cls=name)

    def deep(self) -> Case:
        name, cls, hints = self.pick()
        key = self.rng.choice(sorted(hints))
        depth = self.rng.choice([5_000, 20_000, 100_000])
        kind = self.rng.choice(["[", "{"])
        nest = "[" * depth + "]" * depth if kind == "[" else "{a: " * depth + "1" + "}" * depth
        c = self.case(f"nesting[{depth}]", f"{key}: {nest}\n", "error", valid=False, cls=name)
        c.isolate = True
        return c

    def bombs(self) -> Case:
        name, cls, hints = self.pick()
        mode = self.rng.choice(["unknown", "str-field", "list-field", "override", "quadratic"])
        strs = [k for k in hints if _base(hints[k])[0] is str]
        lists = [k for k in hints if get_origin(_base(hints[k])[0]) in (list, tuple)]
        if mode == "unknown":
            text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
            prev = "a"
            for n in "bcdefghij":
                text += f"{n}: &{n} [{', '.join([f'*{prev}'] * 9)}]\n"
                prev = n
            c = self.case("bomb[top-level anchors]", text, "error", valid=False, cls=name)
        elif mode == "list-field" and lists:
            c = self.case("bomb[in list field]", f"{self.rng.choice(lists)}: {bomb()}\n", "error", valid=False, cls=name)
        elif mode == "override":
            key = self.rng.choice(strs)
            c = self.case("bomb[in override]", "", "error", valid=False, cls=name, overrides=[f"{key}={bomb()}"], key=key)
        elif mode == "quadratic":
            key = self.rng.choice(strs)
            text = f"{key}: [&big [{', '.join(['y' * 100] * 2000)}], {', '.join(['*big'] * 5000)}]\n"
            c = self.case("bomb[quadratic]", text, "error", valid=False, cls=name, key=key)
        else:
            key = self.rng.choice(strs)
            c = self.case("bomb[in str field]", f"{key}: {bomb()}\n", "error", valid=False, cls=name, key=key)
        c.isolate = True
        return c

    def key_oddities(self) -> Case:
        name, cls, hints = self.pick()
        mode = self.rng.choice(
            ["int-and-str-unknown", "stage-list", "stage-dict", "stage-other", "stage-null", "null-key", "bool-key"]
        )
        other = {
            "SFTConfig": "reward",
            "RewardConfig": "sft",
            "DPOConfig": "sft",
            "SampleConfig": "label",
            "LabelConfig": "sample",
        }[name]
        text = {
            "int-and-str-unknown": "1: 2\nbogus: 3\n",
            "stage-list": "stage: [sft]\n",
            "stage-dict": "stage: {a: 1}\n",
            "stage-other": f"stage: {other}\n",
            "stage-null": "stage: null\n",
            "null-key": "null: 1\n",
            "bool-key": "true: 1\nyes_key: 2\n",
        }[mode]
        return self.case(f"keys[{mode}]", text, "error", valid=False, cls=name)

    def duplicate(self) -> Case:
        name, cls, hints = self.pick()
        values = self.base(hints, 3)
        key = self.rng.choice(list(values))
        second = valid_value(hints[key], self.rng)
        lines = [f"{k}: {y(v)}" for k, v in values.items()]
        lines.insert(self.rng.randint(0, len(lines)), f"{key}: {y(second)}")
        return self.case(
            "duplicate-key",
            "\n".join(lines) + "\n",
            "error",
            valid=False,
            cls=name,
            key=key,
            row="YAML config: duplicated keys rejected (YAML forbids them)",
        )

    def overrides(self) -> Case:
        name, cls, hints = self.pick()
        base = yaml_dump(self.base(hints, 2))
        strs = [k for k in hints if hints[k] is str]
        ints = [k for k in hints if hints[k] is int]
        floats = [k for k in hints if hints[k] is float]
        bools = [k for k in hints if hints[k] is bool]
        valid_pool: list[tuple[list[str], dict[str, Any]]] = []
        s, i = self.rng.choice(strs), self.rng.choice(ints)
        valid_pool += [
            ([f"{s}=1e3"], {s: "1e3"}),
            ([f"{s}="], {s: ""}),
            ([f"{s}=[a"], {s: "[a"}),
            ([f"{s}=a=b"], {s: "a=b"}),
            ([f"{s}=ü ß"], {s: "ü ß"}),
            ([f"{i}=1e3"], {i: 1000}),
            ([f"{i}=7", f"{i}=9"], {i: 9}),
        ]
        if floats:
            fl = self.rng.choice(floats)
            valid_pool.append(([f"{fl}=1e-4"], {fl: 1e-4}))
        if bools:
            b = self.rng.choice(bools)
            valid_pool.append(([f"{b}=false"], {b: False}))
        if name == "LabelConfig":
            valid_pool.append((["scorer=length", "scorer_args.target_words=20"], {"scorer_args": {"target_words": 20}}))
        if name == "SampleConfig":
            valid_pool.append((["temperatures=0.5,1.0"], {"temperatures": [0.5, 1.0]}))
        bad_pool: list[tuple[list[str], str]] = [
            ([s], s),
            ([f"={1}"], "="),
            ([" =3"], "="),
            (["bogus_key=1"], "bogus_key"),
            ([f"{i}=abc"], i),
            ([f"{i}.x=1"], i),
            ([f"{s}={{a: 1}}"], s),
            ([f"{i}=[1]"], i),
            ([f"{s}.sub.deeper=1"], s),
        ]
        if bools:
            bad_pool.append(([f"{self.rng.choice(bools)}=maybe"], ""))
        if self.rng.random() < 0.45:
            overrides, values = self.rng.choice(valid_pool)
            return self.case(
                "override[valid]", base, "load", valid=True, cls=name, overrides=overrides, values=values, fmt="overrides"
            )
        overrides, key = self.rng.choice(bad_pool)
        return self.case(
            "override[bad]",
            base,
            "error",
            valid=False,
            cls=name,
            overrides=overrides,
            key=key if key and key != "=" else None,
            fmt="overrides",
        )


CONFIG_FAMILIES = {
    "valid": 40,
    "odd_valid": 30,
    "unknown_key": 30,
    "wrong_type": 60,
    "syntax": 50,
    "top_level": 12,
    "encoding": 25,
    "truncate": 20,
    "deep": 5,
    "bombs": 8,
    "key_oddities": 14,
    "duplicate": 12,
    "overrides": 80,
}


def config_cases(rng: random.Random, scale: float) -> list[Case]:
    gen = ConfigGen(random.Random(rng.random()))
    return [getattr(gen, family)() for family, count in CONFIG_FAMILIES.items() for _ in range(max(1, round(count * scale)))]


# ============================================================================ judging one case


def clean_errors() -> tuple[type, ...]:
    """What ``rlhfkit`` prints as one clean line (cli.py ``main``); ``annotate`` also prints ValueError/FileNotFoundError."""
    from rlhfkit.config import ConfigError
    from rlhfkit.data.io import DataError
    from rlhfkit.modeling.models import ModelLoadError
    from rlhfkit.training.loop import CheckpointError

    return (ConfigError, DataError, ModelLoadError, CheckpointError)


def strings_of(obj: Any, out: list[str] | None = None) -> list[str]:
    out = [] if out is None else out
    if isinstance(obj, str):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            strings_of(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            strings_of(v, out)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            strings_of(getattr(obj, f.name), out)
    return out


def short(text: str, n: int = 160) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


def judge(case: Case, path: Path) -> tuple[bool, str]:
    """Load ``path`` as ``case`` says; (passed, what happened)."""
    from rlhfkit.data.io import DataError

    errors = clean_errors()
    try:
        if case.config_cls:
            from rlhfkit.config import load_config

            cls, stage = config_classes()[case.config_cls]
            result: Any = load_config(cls, path, case.overrides, stages={stage})
        else:
            result = loader(case.fmt)(path)
    except errors as e:
        message = str(e)
        if case.expect == "load":
            return False, f"rejected valid input: {type(e).__name__}: {short(message)}"
        named = (
            str(path) in message
            or (case.overrides is not None and "command line" in message)
            or (case.overrides and any(o.split("=", 1)[0].strip() in message for o in case.overrides))
        )
        if not named:
            return False, f"error does not name the file: {type(e).__name__}: {short(message)}"
        if case.key and case.key not in message:
            return False, f"error does not name key {case.key!r}: {short(message)}"
        if case.lines and isinstance(e, DataError):
            lo, hi = case.lines
            if e.line is None or not lo <= e.line <= hi:
                want = f"{lo}" if lo == hi else f"{lo}-{hi}"
                return False, f"error at line {e.line}, the bad record is on line {want}: {short(message)}"
        if case.lines and case.config_cls and case.overrides is None:
            found = [int(n) for n in re.findall(r"line (\d+)", message)]
            lo, hi = case.lines
            if not any(lo - 1 <= n <= hi + 1 for n in found):
                return False, f"YAML error without line {lo}-{hi}: {short(message)}"
        return True, f"clean {type(e).__name__}"
    except RecursionError as e:
        return False, f"RecursionError escaped: {short(str(e), 80)}"
    except MemoryError:
        return False, "MemoryError escaped"
    except Exception as e:  # noqa: BLE001 - the point of the exercise
        return False, f"{type(e).__name__} escaped: {short(str(e), 100)}"
    if case.expect == "error":
        return False, f"accepted bad input ({describe(result)})"
    if case.config_cls:
        for key, value in (case.values or {}).items():
            got = getattr(result, key)
            if isinstance(value, dict) and isinstance(got, dict):
                got = {k: got.get(k) for k in value}
            if got != value and not (isinstance(got, list) and list(value) == got):
                return False, f"loaded {key}={short(repr(got), 60)}, expected {short(repr(value), 60)}"
        return True, "loaded"
    if case.records is not None and len(result) != case.records:
        return False, f"loaded {len(result)} records, expected {case.records}"
    if case.needle is not None and not any(case.needle in s for s in strings_of(result)):
        return False, f"loaded, but the text {short(repr(case.needle), 40)} is not in the records"
    return True, "loaded"


def describe(result: Any) -> str:
    if isinstance(result, list):
        return f"{len(result)} records"
    return type(result).__name__


def judge_isolated(case: Case, path: Path) -> tuple[bool, str]:
    """:func:`judge` in a forked child with a time limit and an address-space cap."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read)
            vm = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + ISOLATED_EXTRA_AS, vm + ISOLATED_EXTRA_AS))
            ok, what = judge(case, path)
        except BaseException as e:  # noqa: BLE001
            ok, what = False, f"{type(e).__name__} escaped: {short(str(e), 100)}"
        os.write(write, json.dumps([ok, what]).encode()[:60000])
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + ISOLATED_TIMEOUT_S
    chunks = []
    os.set_blocking(read, False)
    status = None
    while time.monotonic() < deadline:
        try:
            chunk = os.read(read, 65536)
            if chunk:
                chunks.append(chunk)
        except BlockingIOError:
            pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        return False, f"no answer in {ISOLATED_TIMEOUT_S:.0f} s (hangs)"
    try:
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    os.close(read)
    if not chunks:
        return False, f"child died (status {status}: memory cap of +{ISOLATED_EXTRA_AS >> 30} GiB?)"
    ok, what = json.loads(b"".join(chunks))
    return ok, what


# ============================================================================ the command line


def rlhfkit_command() -> list[str]:
    script = Path(sys.executable).with_name("rlhfkit")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rlhfkit.cli"]


def cli_env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def run_cli(args: list[str], *, cwd: Path, timeout: float) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, stderr, seconds)."""
    t0 = time.perf_counter()

    def limits() -> None:
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))

    proc = subprocess.Popen(
        [*rlhfkit_command(), *args], cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=limits
    )
    try:
        _, err = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        rc = None
    return rc, err.decode("utf-8", "replace"), time.perf_counter() - t0


def exception_line(stderr: str) -> str:
    """The ``SomeError: message`` line that ends a traceback (progress bars may be printed after it)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line):
            return line
    return lines[-1] if lines else ""


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Pre-existing files that are gone or differ (new files are fine)."""
    return [name for name, digest in before.items() if after.get(name) != digest]


SFT_TRAIN = ["model=tiny", "max_steps=1", "batch_size=2", "precision=fp32", "progress=false", "tensorboard=false"]


@dataclass
class CliCase:
    name: str
    args: list[str]
    bad: Path
    """The file stderr must name."""
    timeout: float = CLI_TIMEOUT_S


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def good_sft(rng: random.Random, n: int = 12) -> str:
    return "".join(json.dumps({"prompt": words(rng), "completion": words(rng)}) + "\n" for _ in range(n))


def good_prefs(rng: random.Random, n: int = 12) -> str:
    return "".join(json.dumps({"prompt": words(rng), "chosen": words(rng), "rejected": words(rng)}) + "\n" for _ in range(n))


def good_samples(rng: random.Random, n: int = 6) -> str:
    return "".join(
        json.dumps({"prompt_index": i, "prompt": words(rng), "responses": [words(rng), words(rng)], "temperatures": [0.7, 1.2]})
        + "\n"
        for i in range(n)
    )


def prepare_earlier_outputs(tmp: Path, rng: random.Random, quick: bool) -> tuple[dict[str, Path], list[str]]:
    """Finished earlier outputs the CLI cases are pointed at; returns {name: root} and set-up problems."""
    problems = []
    prev = tmp / "prev"
    good = write(tmp / "inputs" / "good_sft.jsonl", good_sft(rng))
    rc, err, _ = run_cli(
        ["sft", *SFT_TRAIN, "max_steps=2", "eval_fraction=0", f"data={good}", f"output_dir={prev / 'sft'}"],
        cwd=tmp,
        timeout=CLI_TIMEOUT_S,
    )
    if rc != 0:
        problems.append(f"set-up: the earlier tiny sft run failed (exit {rc}): {short(err[-400:], 300)}")
    write(prev / "sft" / "NOTES.txt", "an earlier finished run; nothing may change it\n")
    write(prev / "samples.jsonl", good_samples(rng))
    rc, err, _ = run_cli(
        ["label", f"samples={prev / 'samples.jsonl'}", f"output={prev / 'labels.jsonl'}"], cwd=tmp, timeout=CLI_TIMEOUT_S
    )
    if rc != 0:
        problems.append(f"set-up: the earlier label run failed (exit {rc}): {short(err[-400:], 300)}")
    from rlhfkit.feedback.web.pairs import read_pairs
    from rlhfkit.feedback.web.store import AnnotationStore

    store = AnnotationStore(prev / "annotations.sqlite")
    store.add_pairs(read_pairs(write(tmp / "inputs" / "pairs.jsonl", good_samples(rng)))[0])
    store.add_annotator("alice")
    store.close()
    roots = {"prev": prev}
    if not quick:  # a pipeline whose sft stage finished (its sample stage then stopped on bad prompts)
        pipe = tmp / "pipeline"
        bad_prompts = write(tmp / "inputs" / "pipeline_bad_prompts.jsonl", '{"prompt": 5}\n')
        write(
            tmp / "inputs" / "pipeline.yaml",
            yaml_dump(
                {
                    "output_dir": str(pipe),
                    "model": "tiny",
                    "sft": {
                        "data": str(good),
                        "max_steps": 2,
                        "batch_size": 2,
                        "eval_fraction": 0.0,
                        "precision": "fp32",
                        "progress": False,
                        "tensorboard": False,
                    },
                    "sample": {"prompts": str(bad_prompts)},
                }
            ),
        )
        rc, err, _ = run_cli(["run", str(tmp / "inputs" / "pipeline.yaml")], cwd=tmp, timeout=CLI_TIMEOUT_S)
        if not (pipe / "sft" / ".stage.json").is_file():
            problems.append(f"set-up: the earlier pipeline's sft stage did not finish (exit {rc}): {short(err[-400:], 300)}")
        roots["pipeline"] = pipe
    return roots, problems


def cli_cases(tmp: Path, rng: random.Random, roots: dict[str, Path], quick: bool) -> list[CliCase]:
    """The CLI runs: each a bad data file or config, pointed at the earlier outputs in ``roots``."""
    inp = tmp / "inputs"
    prev = roots["prev"]
    sft_out = f"output_dir={prev / 'sft'}"
    sft = good_sft(rng, 4).splitlines()
    prefs = good_prefs(rng, 4).splitlines()

    def jl(*records: Any) -> str:
        return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)

    def data(name: str, content: str | bytes) -> Path:
        return write(inp / name, content)

    def train(stage: str, name: str, content: str | bytes, what: str) -> CliCase:
        bad = data(name, content)
        return CliCase(f"{stage}: {what}", [stage, *SFT_TRAIN, sft_out, f"data={bad}"], bad)

    def config(stage: str, name: str, content: str | bytes, what: str, *extra: str, timeout: float = CLI_TIMEOUT_S) -> CliCase:
        bad = data(name, content)
        return CliCase(f"{stage}: {what}", [stage, str(bad), *extra], bad, timeout=timeout)

    def sample(name: str, content: str | bytes, what: str) -> CliCase:
        bad = data(name, content)
        return CliCase(
            f"sample: {what}",
            ["sample", "model=tiny", f"output={prev / 'samples.jsonl'}", "max_new_tokens=2", f"prompts={bad}"],
            bad,
        )

    earlier_samples = (prev / "samples.jsonl").read_text(encoding="utf-8")

    def label(name: str, record: Any, what: str, *, fresh: bool = False) -> CliCase:
        """The earlier samples file plus one bad record (the file grew), labelled into the earlier labels file."""
        bad = data(name, earlier_samples + jl(record) if record is not None else "")
        output = prev / f"new-{name}" if fresh else prev / "labels.jsonl"
        return CliCase(f"label: {what}", ["label", f"output={output}", f"samples={bad}"], bad)

    latin1 = jl(*sft, json.dumps({"prompt": "café", "completion": "olé"}, ensure_ascii=False)).encode("latin-1")
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "completion": "x"}'
    surrogate = '{"prompt": "a \\ud800 b", "completion": "ok"}'
    bigint = prefs[1][:-1] + ', "score": ' + "9" * 5000 + "}"
    cases = [
        train("sft", "sft_badjson.jsonl", jl(*sft[:2], "{not json", *sft[2:]), "invalid JSON on line 3"),
        train("sft", "sft_latin1.jsonl", latin1, "latin-1 file"),
        train("sft", "sft_type.jsonl", jl(sft[0], {"prompt": "p", "completion": 5}), "completion is a number"),
        train("sft", "sft_deep.jsonl", jl(sft[0], deep), "100,000-deep JSON"),
        train("sft", "sft_surrogate.jsonl", jl(*sft, surrogate), "lone surrogate escape \\ud800"),
        train("sft", "sft_one.jsonl", jl(sft[0]), "a single record (the default held-out split takes it)"),
        config("sft", "cfg_tabs.yaml", "model: tiny\n\tmax_steps: 1\n", "config with tab indentation", sft_out),
        config("sft", "cfg_unknown.yaml", "model: tiny\nmax_stepz: 1\n", "config with an unknown key", sft_out),
        config("sft", "cfg_latin1.yaml", "model: tiny\ndata: café.jsonl\n".encode("latin-1"), "latin-1 config", sft_out),
        config(
            "sft",
            "cfg_bomb.yaml",
            f"model: tiny\ndata: {bomb()}\n",
            "billion-laughs config (alias bomb in `data`)",
            sft_out,
            timeout=CLI_HANG_TIMEOUT_S,
        ),
        config("sft", "cfg_stage.yaml", "stage: [sft]\nmodel: tiny\n", "config with 'stage: [sft]'", sft_out),
        config("sft", "cfg_keys.yaml", "model: tiny\n1: 2\nbogus: 3\n", "config with an int key and an unknown key", sft_out),
        train(
            "reward",
            "pref_preferred.jsonl",
            jl(prefs[0], {"prompt": "p", "response_a": "a", "response_b": "b", "preferred": ["a"]}),
            "'preferred' is a list",
        ),
        train("reward", "pref_empty.jsonl", "", "empty preference file"),
        train("reward", "pref_missing.jsonl", jl(prefs[0], {"prompt": "p", "rejected": "r"}), "'chosen' missing on line 2"),
        train("dpo", "pref_bigint.jsonl", jl(prefs[0], bigint), "5,000-digit integer in an ignored field"),
        train("dpo", "pref_utf16.jsonl", jl(*prefs).encode("utf-16"), "UTF-16 file"),
        sample("prompts_num.jsonl", jl({"prompt": "ok"}, {"prompt": 7}), "prompt is a number"),
        sample("prompts_nul.jsonl", '{"prompt": "a\x00b"}\n', "raw NUL byte in a prompt"),
        label(
            "samples_prompt_num.jsonl", {"prompt": 5, "responses": ["a good answer", "bad"]}, "a new record's prompt is a number"
        ),
        label("samples_missing.jsonl", {"prompt": "p"}, "a new record without responses"),
        label("samples_empty.jsonl", None, "empty samples file (fresh output)", fresh=True),
        config(
            "label",
            "cfg_label_bomb.yaml",
            f"scorer: length\nscorer_args: {{target_words: {bomb()}}}\n",
            "alias bomb in scorer_args (fresh output)",
            f"output={prev / 'new-labels-bomb.jsonl'}",
            f"samples={prev / 'samples.jsonl'}",
            timeout=CLI_HANG_TIMEOUT_S,
        ),
    ]
    bad_pairs = data("pairs_bad.jsonl", good_samples(rng, 2) + jl({"prompt": "p", "responses": ["a", 5]}))
    cases.append(
        CliCase(
            "annotate serve: bad pairs file",
            ["annotate", "serve", "--db", str(prev / "annotations.sqlite"), "--port", "0", "--pairs", str(bad_pairs)],
            bad_pairs,
        )
    )
    if "pipeline" in roots:
        bad = data("sft_pipeline_bad.jsonl", jl(sft[0], "{broken"))
        pipe_cfg = data(
            "pipeline_bad.yaml",
            yaml_dump(
                {
                    "output_dir": str(roots["pipeline"]),
                    "model": "tiny",
                    "sft": {
                        "data": str(bad),
                        "max_steps": 2,
                        "batch_size": 2,
                        "eval_fraction": 0.0,
                        "precision": "fp32",
                        "progress": False,
                        "tensorboard": False,
                    },
                }
            ),
        )
        cases.append(CliCase("run: a pipeline whose sft data became invalid", ["run", str(pipe_cfg)], bad))
    if quick:
        keep = (
            "sft: invalid JSON",
            "sft: 100,000",
            "reward: 'preferred'",
            "sample: prompt is",
            "label: a new record's prompt is a",
            "sft: config with tab",
        )
        cases = [c for c in cases if c.name.startswith(keep)]
    return cases


def cli_rows(tmp: Path, rng: random.Random, quick: bool, progress: Callable[[str], None]) -> list[dict]:
    t0 = time.perf_counter()
    roots, problems = prepare_earlier_outputs(tmp, rng, quick)
    setup_s = time.perf_counter() - t0
    cases = cli_cases(tmp, rng, roots, quick)
    run_fail: list[str] = list(problems)
    keep_fail: list[str] = []
    run_pass = keep_pass = 0
    run_s = keep_s = 0.0
    for case in cases:
        before = {name: snapshot(root) for name, root in roots.items()}
        rc, err, seconds = run_cli(case.args, cwd=tmp, timeout=case.timeout)
        run_s += seconds
        t1 = time.perf_counter()
        problems = []
        if rc is None:
            problems.append(f"still running after {case.timeout:.0f} s (killed)")
        elif rc == 0:
            problems.append("exit code 0")
        if "Traceback" in err:
            problems.append(f"traceback: {short(exception_line(err), 140)}")
        elif rc is not None and str(case.bad) not in err:
            last = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["(empty stderr)"]
            problems.append(f"stderr does not name {case.bad.name}: {short(last[0], 140)}")
        if problems:
            run_fail.append(f"{case.name}: " + "; ".join(problems))
        else:
            run_pass += 1
        after = {name: snapshot(root) for name, root in roots.items()}
        touched = [f"{name}/{f}" for name in roots for f in changed(before[name], after[name])]
        if touched:
            gone = [f for f in touched if f.split("/", 1)[1] not in after[f.split("/", 1)[0]]]
            keep_fail.append(
                f"{case.name}: {len(touched)} earlier file(s) changed or deleted"
                f" ({len(gone)} deleted), e.g. {', '.join(sorted(touched)[:4])}"
            )
        else:
            keep_pass += 1
        keep_s += time.perf_counter() - t1
        last = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["(empty stderr)"]
        progress(
            f"  cli {case.name}: exit {rc}, {seconds:.1f} s{' -- ' + '; '.join(problems) if problems else ''}"
            f"{' -- earlier files changed' if touched else ''}\n      stderr: {short(last[0], 200)}"
        )
    return [
        {
            "check": "CLI: bad input -> exit != 0, no traceback, file named",
            "cases": len(cases),
            "passed": run_pass,
            "failures": run_fail,
            "seconds": round(run_s, 1),
        },
        {
            "check": "CLI: earlier finished outputs byte-identical",
            "cases": len(cases),
            "passed": keep_pass,
            "failures": keep_fail,
            "seconds": round(keep_s + setup_s, 1),
        },
    ]


# ============================================================================ rows


def row_name(case: Case) -> str:
    if case.row:
        return case.row
    if case.fmt == "config":
        return f"YAML config (load_config): {'odd but valid -> loads' if case.valid else 'bad -> clean error'}"
    if case.fmt == "overrides":
        return f"key=value overrides: {'valid -> applied' if case.valid else 'bad -> clean error'}"
    return f"{FORMATS[case.fmt].title}: {'odd but valid -> loads' if case.valid else 'bad -> clean error'}"


def group_failures(failures: list[tuple[Case, str]]) -> list[str]:
    """``[N] first-case-id (mutation): what happened`` per distinct (mutation family, outcome)."""
    groups: OrderedDict[tuple[str, str], list[Case]] = OrderedDict()
    for case, what in failures:
        family = re.sub(r"\d+", "#", case.mutation) if case.config_cls else re.sub(r"\[.*", "", case.mutation)
        sig = re.sub(r"/\S+|0x[0-9a-f]+|\d+", "#", what)[:70]
        groups.setdefault((family, sig), []).append(case)
        groups[(family, sig)][-1]._what = what  # type: ignore[attr-defined]
    out = []
    for (_family, _), cases in groups.items():
        first = cases[0]
        out.append(f"[{len(cases)}] {first.id} ({first.mutation}): {first._what}")  # type: ignore[attr-defined]
    return out


def run(
    quick: bool = False,
    *,
    seed: int = SEED,
    dump: str | None = None,
    cli: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Generate and judge every case; one row per check (see the module docstring)."""
    progress = progress or (lambda line: None)
    rng = random.Random(seed)
    scale = 0.2 if quick else 1.0
    t0 = time.perf_counter()
    cases = data_cases(rng, scale) + config_cases(rng, scale)
    progress(f"fuzz: {len(cases)} generated cases ({time.perf_counter() - t0:.1f} s to generate), seed {seed}")
    rows: OrderedDict[str, dict] = OrderedDict()
    failures: dict[str, list[tuple[Case, str]]] = {}
    dump_dir = Path(dump) if dump else None
    with tempfile.TemporaryDirectory(prefix="rlhfkit-fuzz-") as tmp_name:
        tmp = Path(tmp_name)
        for i, case in enumerate(cases):
            path = tmp / "cases" / f"{case.id.replace('/', '_')}{case.suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(case.data)
            c0 = time.perf_counter()
            ok, what = judge_isolated(case, path) if case.isolate else judge(case, path)
            seconds = time.perf_counter() - c0
            name = row_name(case)
            row = rows.setdefault(name, {"check": name, "cases": 0, "passed": 0, "failures": [], "seconds": 0.0})
            row["cases"] += 1
            row["seconds"] += seconds
            if ok:
                row["passed"] += 1
            else:
                failures.setdefault(name, []).append((case, what))
                if dump_dir:
                    dump_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, dump_dir / path.name)
                    with open(dump_dir / "failures.txt", "a", encoding="utf-8") as f:
                        f.write(f"{path.name}\t{case.config_cls or case.fmt}\t{case.overrides or ''}\t{what}\n")
            path.unlink()
            if (i + 1) % 200 == 0:
                progress(f"  {i + 1}/{len(cases)} cases judged")
        for name, row in rows.items():
            row["failures"] = group_failures(failures.get(name, []))
            row["seconds"] = round(row["seconds"], 1)
        out = list(rows.values())
        if cli:
            out += cli_rows(tmp, random.Random(seed + 1), quick, progress)
    return out


def print_rows(rows: list[dict]) -> None:
    width = max(len(r["check"]) for r in rows)
    print(f"{'check':{width}s}  {'cases':>6s}  {'passed':>6s}  {'failed':>6s}  {'seconds':>7s}")
    for r in rows:
        print(f"{r['check']:{width}s}  {r['cases']:6d}  {r['passed']:6d}  {r['cases'] - r['passed']:6d}  {r['seconds']:7.1f}")
    for r in rows:
        if r["failures"]:
            print(f"\n{r['check']}: failures")
            for failure in r["failures"]:
                print(f"  {failure}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a fifth of the cases and 6 CLI runs")
    parser.add_argument("--seed", type=int, default=SEED, help=f"RNG seed (default {SEED}); a seed reproduces every file")
    parser.add_argument("--dump", default=None, help="copy each failing case's file here (+ failures.txt)")
    parser.add_argument("--no-cli", action="store_true", help="in-process cases only")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows = run(args.quick, seed=args.seed, dump=args.dump, cli=not args.no_cli, progress=lambda s: print(s, flush=True))
    print()
    print_rows(rows)
    cases, passed = sum(r["cases"] for r in rows), sum(r["passed"] for r in rows)
    print(f"\n{passed}/{cases} passed in {time.perf_counter() - t0:.0f} s")
    return 0 if passed == cases else 1


if __name__ == "__main__":
    sys.exit(main())
