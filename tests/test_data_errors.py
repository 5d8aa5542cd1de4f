"""Bad SFT input fails early, with ``FILE:LINE: field 'NAME': problem``, before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit import cli
from rlhfkit.data.io import DataError
from rlhfkit.data.sft import load_sft_file
from rlhfkit.modeling import models
from rlhfkit.sft import train

GOOD = {"prompt": "Hi", "completion": "Hello."}


def jsonl_lines(*records) -> bytes:
    """JSONL bytes; a ``str`` record is written as is (raw, possibly invalid, text)."""
    return b"".join((r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in records)


# name -> (file name, file bytes, line, field or None, words the problem must contain)
BAD_FILES = {
    "invalid_json_line3": ("bad.jsonl", jsonl_lines(GOOD, GOOD, '{"prompt": "x", "completion": ', GOOD), 3, None, "invalid JSON"),
    "missing_completion": ("bad.jsonl", jsonl_lines(GOOD, {"prompt": "only a prompt"}), 2, "completion", "missing"),
    "completion_not_string": (
        "bad.jsonl",
        jsonl_lines(GOOD, GOOD, GOOD, {"prompt": "p", "completion": 5}),
        4,
        "completion",
        "string",
    ),
    "empty_completion": ("bad.jsonl", jsonl_lines({"prompt": "p", "completion": "   "}), 1, "completion", "empty"),
    "non_utf8_line2": (
        "bad.jsonl",
        jsonl_lines(GOOD) + b'{"prompt": "caf\xe9", "completion": "ok"}\n' + jsonl_lines(GOOD),
        2,
        None,
        "UTF-8",
    ),
    "json_list_bad_element": (
        "bad.json",
        b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c", "completion": "d"},\n'
        b'  {"prompt": "e",\n   "completion": 7}\n]\n',
        4,
        "completion",
        "string",
    ),
    "json_list_syntax_error": (
        "bad.json",
        b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c" "completion": "d"}\n]\n',
        3,
        None,
        "invalid JSON",
    ),
    "messages_bad_role": (
        "bad.jsonl",
        jsonl_lines(GOOD, {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}),
        2,
        "messages[1].role",
        "bot",
    ),
    "messages_no_assistant": (
        "bad.jsonl",
        jsonl_lines({"messages": [{"role": "user", "content": "hi"}]}),
        1,
        "messages",
        "no assistant",
    ),
    # json raised RecursionError (deep nesting) and ValueError (an integer over Python's 4300-digit limit)
    "deep_nesting_line2": (
        "bad.jsonl",
        jsonl_lines(GOOD, '{"prompt": "x", "completion": "y", "x": ' + "[" * 5000 + "]" * 5000 + "}"),
        2,
        None,
        "nested too deeply",
    ),
    "deep_nesting_json_list": (
        "bad.json",
        b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c", "completion": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}\n]\n",
        3,
        None,
        "nested too deeply",
    ),
    "huge_integer_line3": (
        "bad.jsonl",
        jsonl_lines(GOOD, GOOD, '{"prompt": "x", "completion": "y", "n": ' + "9" * 5000 + "}"),
        3,
        None,
        "integer too long",
    ),
    "huge_integer_json_list": (
        "bad.json",
        b'[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c", "completion": "d", "n": ' + b"9" * 5000 + b"}\n]\n",
        4,
        None,
        "integer too long",
    ),
    # a lone surrogate escape decodes (json accepts it) and crashed the tokenizer later
    "lone_surrogate": (
        "bad.jsonl",
        jsonl_lines(GOOD, '{"prompt": "a \\ud800 b", "completion": "ok"}'),
        2,
        "prompt",
        "lone surrogate",
    ),
    "lone_surrogate_in_messages": (
        "bad.json",
        b'[\n  {"prompt": "a", "completion": "b"},\n  {"messages": [{"role": "user", "content": "hi"},'
        b' {"role": "assistant", "content": "x\\uDFFFy"}]}\n]\n',
        3,
        "messages[1].content",
        "lone surrogate",
    ),
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


def test_surrogate_pairs_and_escaped_backslashes_still_load(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_bytes(jsonl_lines('{"prompt": "smile \\ud83d\\ude00", "completion": "a \\\\ud800 b"}'))
    (conv,) = load_sft_file(path)
    assert conv.messages == (("user", "smile \U0001f600"), ("assistant", "a \\ud800 b"))


def test_one_record_sft_file_says_it_went_to_the_held_out_split(tmp_path, make_config):
    """With the default eval_fraction the only record is held out; the error said "after max_length=512"."""
    path = tmp_path / "one.jsonl"
    path.write_bytes(jsonl_lines(GOOD))
    with pytest.raises(DataError) as info:
        train(make_config("run", data=str(path), eval_fraction=0.05))
    assert info.value.path == str(path)
    assert "all 1 example(s) went to the held-out split (eval_fraction=0.05)" in str(info.value)
    with pytest.raises(DataError, match=r"all 1 training example\(s\) were longer than max_length=2"):
        train(make_config("run", data=str(path), max_length=2, overlong="drop"))


def _no_model(monkeypatch):
    for name in ("load_causal_lm", "load_tokenizer"):
        monkeypatch.setattr(models, name, lambda *a, **k: pytest.fail("model or tokenizer loaded"))
    from rlhfkit import reward

    monkeypatch.setattr(reward, "reward_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded"))


def test_reward_and_dpo_without_data_are_config_errors(tmp_path, monkeypatch):
    from rlhfkit import dpo, reward
    from rlhfkit.config import ConfigError

    _no_model(monkeypatch)
    with pytest.raises(ConfigError, match="`data`"):
        reward.train(reward.RewardConfig(model="tiny", output_dir=str(tmp_path / "r")))
    with pytest.raises(ConfigError, match="`data`"):
        dpo.train(dpo.DPOConfig(model="tiny", output_dir=str(tmp_path / "d")))


@pytest.mark.parametrize(
    "record, line, field, problem",
    [
        ({"response": "fine"}, 2, "prompt", "missing"),  # was a KeyError, at save time
        ({"prompt": 5, "response": "fine"}, 2, "prompt", "expected a string or a list of messages"),
        ({"prompt": "p"}, 2, "response", "missing"),
        (None, None, None, "no records"),
    ],
)
def test_reward_norm_data_is_checked_before_any_model_loads(tmp_path, monkeypatch, record, line, field, problem):
    from rlhfkit import reward

    _no_model(monkeypatch)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_bytes(jsonl_lines({"prompt": "p", "chosen": "a", "rejected": "b"}))
    norm = tmp_path / "norm.jsonl"
    norm.write_bytes(jsonl_lines({"prompt": "p", "response": "r"}, record) if record else b"")
    config = reward.RewardConfig(model="tiny", data=str(prefs), norm_data=str(norm), output_dir=str(tmp_path / "r"))
    with pytest.raises(DataError) as info:
        reward.train(config)
    assert (info.value.path, info.value.line, info.value.field) == (str(norm), line, field)
    assert problem in str(info.value)


@pytest.mark.parametrize(
    "prompt, field, problem",
    [
        (5, "prompt", "expected a string or a list of messages, got int"),
        (None, "prompt", "expected a string"),
        ([[1, 2]], "prompt[0]", "expected an object"),
        ([], "prompt", "non-empty list"),
        ({"role": "user", "content": "x"}, "prompt", "expected a string or a list of messages, got dict"),
        ([{"role": "user", "content": 5}], "prompt[0].content", "expected a string"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "prompt[1].role", "end with a user turn"),
        ("  ", "prompt", "empty"),
    ],
)
def test_label_items_check_the_prompt(tmp_path, prompt, field, problem):
    """load_items took any JSON value as a prompt; the labeller crashed on it later."""
    from rlhfkit.label import load_items

    path = tmp_path / "samples.jsonl"
    path.write_bytes(jsonl_lines({"prompt": "ok", "responses": ["a", "b"]}, {"prompt": prompt, "responses": ["a", "b"]}))
    with pytest.raises(DataError) as info:
        load_items(path)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, field)
    assert problem in str(info.value)


def test_label_items_accept_string_and_chat_prompts_and_refuse_an_empty_file(tmp_path):
    from rlhfkit.label import load_items

    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    path = tmp_path / "samples.jsonl"
    path.write_bytes(jsonl_lines({"prompt": "Hi", "responses": ["a", "b"]}, {"prompt": chat, "responses": ["c", ""]}))
    assert load_items(path) == [("Hi", ["a", "b"]), (chat, ["c", ""])]
    path.write_bytes(b"\n")
    with pytest.raises(DataError, match="no items") as info:
        load_items(path)
    assert (info.value.path, info.value.line) == (str(path), None)
