"""JSONL that rlhfkit writes reads back; logs survive a torn last line and a resume."""

from __future__ import annotations

import json

import pytest

from rlhfkit.data.io import (
    DataError,
    append_jsonl,
    jsonl_lines,
    read_jsonl_records,
    read_rows,
    truncate_jsonl_by_step,
    write_jsonl,
)
from rlhfkit.training.tracking import MetricsLogger, read_metrics

# Characters that str.splitlines() treats as line breaks but that JSON strings hold raw.
SEPARATORS = ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


@pytest.mark.parametrize("sep", SEPARATORS)
def test_written_jsonl_reads_back_with_unicode_line_separators(tmp_path, sep):
    path = tmp_path / "samples.jsonl"
    records = [{"prompt": "hi", "responses": [f"one{sep}two", "plain"]}, {"prompt": f"a{sep}b", "responses": []}]
    write_jsonl(path, records)
    if ord(sep) > 0x7F:  # json escapes control characters; these three it writes raw (ensure_ascii=False)
        assert sep in path.read_text(encoding="utf-8")
    rows = read_rows(path)
    assert [r.data for r in rows] == records
    assert [r.line for r in rows] == [1, 2]  # line numbers do not shift


def test_error_line_numbers_count_newlines_only(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": "x\u2028y"}\n{"a": 1}\n{broken\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert info.value.line == 3


def test_jsonl_lines_drops_carriage_returns_and_the_final_newline():
    assert jsonl_lines('{"a": 1}\r\n{"b": 2}\n') == ['{"a": 1}', '{"b": 2}']
    assert jsonl_lines('{"a": 1}') == ['{"a": 1}']
    assert jsonl_lines("") == []


def test_torn_last_line_of_metrics_does_not_break_resume(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        logger.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 4, "loss": 0.')  # killed mid-append
    assert [e["step"] for e in read_metrics(tmp_path)] == [1, 2, 3]
    logger.truncate_after(2)  # raised JSONDecodeError before the fix
    assert [e["step"] for e in read_metrics(tmp_path)] == [1, 2]
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").endswith("}\n")


def test_a_bad_line_in_the_middle_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_jsonl_records(path)
    assert info.value.line == 2 and str(path) in str(info.value)


def test_truncate_by_step_keeps_earlier_records_in_order(tmp_path):
    path = tmp_path / "samples.jsonl"
    for step in (1, 1, 2, 3, 3, 4):
        append_jsonl(path, {"step": step, "response": f"r\u2028{step}"})
    truncate_jsonl_by_step(path, 3)
    assert [r["step"] for r in read_jsonl_records(path)] == [1, 1, 2, 3, 3]
    truncate_jsonl_by_step(tmp_path / "absent.jsonl", 3)  # no file: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()
    assert json.loads(path.read_text(encoding="utf-8").split("\n")[0])["response"] == "r\u20281"


DEEP = "[" * 5000 + "]" * 5000
BIG = "9" * 5000  # over Python's 4300-digit int-string limit


@pytest.mark.parametrize(
    "value, problem", [(DEEP, "nested too deeply"), (BIG, "integer too long"), ('"a \\ud800 b"', "lone surrogate escape \\ud800")]
)
@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_undecodable_values_are_data_errors_with_the_line(tmp_path, value, problem, layout):
    """json raised RecursionError / ValueError, or (a lone surrogate) accepted text that is no Unicode."""
    bad = '{"prompt": "p", "x": ' + value + "}"
    path = tmp_path / f"data.{layout}"
    if layout == "jsonl":
        path.write_text('{"a": 1}\n\n' + bad + "\n", encoding="utf-8")
    else:
        path.write_text('[\n{"a": 1},\n\n' + bad + "\n]\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert info.value.line == (3 if layout == "jsonl" else 4)
    assert problem in str(info.value) and str(path) in str(info.value)
    if "surrogate" in problem:
        assert info.value.field == "x"


def test_lone_surrogate_is_named_by_its_field_path(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"m": [{"c": "ok"}, {"c": "\\uDC00"}]}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert (info.value.line, info.value.field) == (1, "m[1].c")
    path.write_text('{"k\\ud800": 1}\n', encoding="utf-8")  # in a key: the object holding it (here the record)
    with pytest.raises(DataError, match="lone surrogate") as info:
        read_rows(path)
    assert info.value.field is None


def test_surrogate_pairs_and_escaped_backslashes_are_not_lone_surrogates(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": "\\ud83d\\ude00", "b": "\\\\ud800", "c": "\\uD83D\\uDE00"}\n', encoding="utf-8")
    assert read_rows(path)[0].data == {"a": "\U0001f600", "b": "\\ud800", "c": "\U0001f600"}


@pytest.mark.parametrize(
    "value, problem", [(DEEP, "nested too deeply"), (BIG, "integer too long"), ('"\\udfff"', "lone surrogate")]
)
def test_log_lines_that_decode_badly_are_errors_not_torn_writes(tmp_path, value, problem):
    """A whole line json cannot decode is an error with its line, in the middle or at the end of a log."""
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"x": ' + value + '}\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=problem) as info:
        read_jsonl_records(path)
    assert info.value.line == 2
    path.write_text('{"step": 1}\n{"x": ' + value + "}\n", encoding="utf-8")
    with pytest.raises(DataError, match=problem):
        read_jsonl_records(path)
