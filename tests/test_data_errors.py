"""Bad SFT input fails early, with ``FILE:LINE: field 'NAME': problem``, before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit import cli, models
from rlhfkit.data.io import DataError
from rlhfkit.data.sft import load_sft_file
from rlhfkit.sft import train

GOOD = {"prompt": "Hi", "completion": "Hello."}


def jsonl_lines(*records) -> bytes:
    """JSONL bytes; a ``str`` record is written as is (raw, possibly invalid, text)."""
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in records)


# name -> (file name, file bytes, line, field or None, words the problem must contain)
BAD_FILES = {
    "invalid_json_line3": (
        "bad.jsonl", jsonl_lines(GOOD, GOOD, '{"prompt": "x", "completion": ', GOOD), 3, None, "invalid JSON"),
    "missing_completion": (
        "bad.jsonl", jsonl_lines(GOOD, {"prompt": "only a prompt"}), 2, "completion", "missing"),
    "completion_not_string": (
        "bad.jsonl", jsonl_lines(GOOD, GOOD, GOOD, {"prompt": "p", "completion": 5}), 4, "completion", "string"),
    "empty_completion": (
        "bad.jsonl", jsonl_lines({"prompt": "p", "completion": "   "}), 1, "completion", "empty"),
    "non_utf8_line2": (
        "bad.jsonl", jsonl_lines(GOOD) + b'{"prompt": "caf\xe9", "completion": "ok"}\n' + jsonl_lines(GOOD), 2, None, "UTF-8"),
    "json_list_bad_element": (
        "bad.json",
        b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c", "completion": "d"},\n'
        b'  {"prompt": "e",\n   "completion": 7}\n]\n',
        4, "completion", "string"),
    "json_list_syntax_error": (
        "bad.json", b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c" "completion": "d"}\n]\n', 3, None, "invalid JSON"),
    "messages_bad_role": (
        "bad.jsonl",
        jsonl_lines(GOOD, {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}),
        2, "messages[1].role", "bot"),
    "messages_no_assistant": (
        "bad.jsonl", jsonl_lines({"messages": [{"role": "user", "content": "hi"}]}), 1, "messages", "no assistant"),
}


@pytest.fixture(params=sorted(BAD_FILES))
def bad_file(request, tmp_path):
    name, data, line, field, problem = BAD_FILES[request.param]
    path = tmp_path / name
    path.write_bytes(data)
    return path, line, field, problem


def assert_names_location(message: str, path: Path, line: int, field: str | None, problem: str) -> None:
    assert message.startswith(f"{path}:{line}: "), message
    if field is not None:
        assert f"field '{field}'" in message, message
    assert problem in message, message


def test_load_names_file_line_and_field(bad_file):
    path, line, field, problem = bad_file
    with pytest.raises(DataError) as info:
        load_sft_file(path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), line, field)
    assert_names_location(str(err), path, line, field, problem)


def test_train_fails_before_loading_a_model(bad_file, make_config, monkeypatch):
    path, line, field, problem = bad_file
    loaded = []
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loaded.append("model"))
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: loaded.append("tokenizer"))
    config = make_config("run", data=str(path))
    with pytest.raises(DataError) as info:
        train(config)
    assert_names_location(str(info.value), path, line, field, problem)
    assert loaded == []
    assert not (Path(config.output_dir) / "model.safetensors").exists()


def test_bad_eval_file_fails_before_loading_a_model(qa_file, bad_file, make_config, monkeypatch):
    path, line, field, problem = bad_file
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DataError) as info:
        train(make_config("run", data=str(qa_file), eval_data=str(path)))
    assert_names_location(str(info.value), path, line, field, problem)


def test_cli_exits_2_with_message_on_stderr(bad_file, tmp_path, capsys):
    path, line, field, problem = bad_file
    out = tmp_path / "cli-run"
    rc = cli.main(["sft", "model=tiny", f"data={path}", f"output_dir={out}", "progress=false", "tensorboard=false"])
    captured = capsys.readouterr()
    assert rc == 2
    message = captured.err.strip()
    assert message.startswith("rlhfkit sft: error: ")
    assert_names_location(message.removeprefix("rlhfkit sft: error: "), path, line, field, problem)
    assert not (out / "model.safetensors").exists()


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_sft_file(tmp_path / "nope.jsonl")


def test_cli_config_error_exits_2(tmp_path, capsys):
    rc = cli.main(["sft", "model=tiny", "max_steps=abc", f"output_dir={tmp_path / 'x'}"])
    assert rc == 2
    assert "max_steps" in capsys.readouterr().err
