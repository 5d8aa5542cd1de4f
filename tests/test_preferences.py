"""Preference-data formats: detection, exact parses, round trips, and error messages.

Every expected Comparison below is written out by hand from the input record.
"""

from __future__ import annotations

import json
import os

import pytest

from rlhfkit.data.io import DataError
from rlhfkit.data.preferences import comparison_from_dict, comparison_to_dict, load_comparisons, save_comparisons
from rlhfkit.data.records import Comparison


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path, records):
    """A Parquet file as another tool (e.g. a Hub dataset) would write it: native nested types."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


# ---------------------------------------------------------------------------
# Inputs, one list per format, and what they must parse to
# ---------------------------------------------------------------------------

SEED = [
    {"prompt": "2+2?", "response_a": "4", "response_b": "5", "preferred": "a", "reason": "correct"},
    {"prompt": "Capital of France?", "response_a": "Lyon", "response_b": "Paris", "preferred": "b"},
    {
        "prompt": "Say hi",
        "response_a": "hi",
        "response_b": "hello",
        "preferred": "tie",
        "source": "human:alice",
        "meta": {"seconds": 4.5},
    },
]
SEED_EXPECTED = [
    Comparison("2+2?", ["4", "5"], [0, 1], tie=False, reason="correct", source="dataset"),
    Comparison("Capital of France?", ["Lyon", "Paris"], [1, 0], tie=False, reason="", source="dataset"),
    Comparison("Say hi", ["hi", "hello"], [0, 1], tie=True, reason="", source="human:alice", meta={"seconds": 4.5}),
]

TRL_STRINGS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "prompt_id": "x1"},
    {"prompt": "Water is", "chosen": " wet.", "rejected": " dry.", "source": "judge:tiny"},
]
TRL_STRINGS_EXPECTED = [
    Comparison("The sky is", [" blue.", " green."], [0, 1], source="dataset"),
    Comparison("Water is", [" wet.", " dry."], [0, 1], source="judge:tiny"),
]

TRL_CHAT = [
    {"prompt": [user("What color is the sky?")], "chosen": [assistant("It is blue.")], "rejected": [assistant("It is green.")]},
    # UltraFeedback-binarized layout: the prompt is repeated inside chosen/rejected.
    {
        "prompt": [system("Be brief."), user("Hi")],
        "chosen": [system("Be brief."), user("Hi"), assistant("Hello!")],
        "rejected": [system("Be brief."), user("Hi"), assistant("Go away.")],
        "score_chosen": 9.0,
    },
    # Earlier turns present but empty.
    {"prompt": [user("2+2?")], "chosen": [user(""), assistant("4")], "rejected": [assistant("5")]},
]
TRL_CHAT_EXPECTED = [
    Comparison([user("What color is the sky?")], ["It is blue.", "It is green."], [0, 1], source="dataset"),
    Comparison([system("Be brief."), user("Hi")], ["Hello!", "Go away."], [0, 1], source="dataset"),
    Comparison([user("2+2?")], ["4", "5"], [0, 1], source="dataset"),
]

TRL_IMPLICIT = [
    {
        "chosen": [user("What color is the sky?"), assistant("It is blue.")],
        "rejected": [user("What color is the sky?"), assistant("It is green.")],
    },
    {
        "chosen": [system("Be terse."), user("Hi"), assistant("Hello"), user("Bye"), assistant("Bye!")],
        "rejected": [system("Be terse."), user("Hi"), assistant("Hello"), user("Bye"), assistant("Wait, stay.")],
    },
]
TRL_IMPLICIT_EXPECTED = [
    Comparison([user("What color is the sky?")], ["It is blue.", "It is green."], [0, 1], source="dataset"),
    Comparison(
        [system("Be terse."), user("Hi"), assistant("Hello"), user("Bye")], ["Bye!", "Wait, stay."], [0, 1], source="dataset"
    ),
]

HH = [
    {
        "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant: "
        "Why did the chicken cross the road?",
        "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant: No.\n",
    }
]
HH_EXPECTED = [
    Comparison(
        [user("Hi there"), assistant("Hello! How can I help?"), user("Tell me a joke.")],
        ["Why did the chicken cross the road?", "No."],
        [0, 1],
        source="dataset",
    )
]

RANKINGS = [
    {"prompt": "Name a prime.", "responses": ["4", "7", "2"], "ranking": [1, 2, 0], "reason": "7 and 2 are prime"},
    {"prompt": "Name a color.", "ranked": ["red", "blue", "sock"]},
]
RANKINGS_EXPECTED = [
    Comparison("Name a prime.", ["4", "7", "2"], [1, 2, 0], reason="7 and 2 are prime", source="dataset"),
    Comparison("Name a color.", ["red", "blue", "sock"], [0, 1, 2], source="dataset"),
]

RLHFKIT = [
    {
        "prompt": [user("Hi")],
        "responses": ["Hello", "Hey"],
        "ranking": [1, 0],
        "tie": False,
        "reason": "warmer",
        "source": "",
        "meta": {"order": [1, 0], "temperature": 0.7},
    },
    {
        "prompt": [user("Yes?")],
        "responses": ["Yes", "Yep"],
        "ranking": [0, 1],
        "tie": True,
        "reason": "",
        "source": "simulated:rubric",
        "meta": {},
    },
]
RLHFKIT_EXPECTED = [
    Comparison(
        [user("Hi")], ["Hello", "Hey"], [1, 0], tie=False, reason="warmer", source="", meta={"order": [1, 0], "temperature": 0.7}
    ),
    Comparison([user("Yes?")], ["Yes", "Yep"], [0, 1], tie=True, reason="", source="simulated:rubric"),
]

# (name, records, expected, the save format that reproduces them)
FORMATS = [
    ("seed", SEED, SEED_EXPECTED, "seed"),
    ("trl_strings", TRL_STRINGS, TRL_STRINGS_EXPECTED, "trl"),
    ("trl_chat", TRL_CHAT, TRL_CHAT_EXPECTED, "trl"),
    ("trl_implicit", TRL_IMPLICIT, TRL_IMPLICIT_EXPECTED, "trl"),
    ("hh", HH, HH_EXPECTED, "trl"),
    ("rankings", RANKINGS, RANKINGS_EXPECTED, "rlhfkit"),
    ("rlhfkit", RLHFKIT, RLHFKIT_EXPECTED, "rlhfkit"),
]
FORMAT_IDS = [f[0] for f in FORMATS]


@pytest.mark.parametrize("name, records, expected, _", FORMATS, ids=FORMAT_IDS)
def test_each_format_parses_to_the_expected_comparisons(tmp_path, name, records, expected, _):
    assert load_comparisons(write_jsonl(tmp_path / f"{name}.jsonl", records)) == expected


@pytest.mark.parametrize("name, records, expected, _", FORMATS, ids=FORMAT_IDS)
def test_each_format_parses_from_a_json_list(tmp_path, name, records, expected, _):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    assert load_comparisons(path) == expected


def test_hh_two_turn_conversation_prompt_and_responses(tmp_path):
    (comparison,) = load_comparisons(write_jsonl(tmp_path / "hh.jsonl", HH))
    assert comparison.prompt == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ]
    assert comparison.chosen == "Why did the chicken cross the road?"
    assert comparison.rejected == "No."
    assert comparison.pairs() == [(0, 1, 1.0)]


def test_hh_transcript_without_leading_blank_lines(tmp_path):
    record = {"chosen": "Human: Hi\n\nAssistant: Hello", "rejected": "Human: Hi\n\nAssistant: Bye"}
    assert load_comparisons(write_jsonl(tmp_path / "hh.jsonl", [record])) == [
        Comparison([user("Hi")], ["Hello", "Bye"], [0, 1], source="dataset")
    ]


def test_implicit_prompt_identical_conversations_keep_the_last_turn_as_response(tmp_path):
    """The shared prefix never swallows the final turn, even when nothing differs."""
    record = {"chosen": [user("Hi"), assistant("Hello")], "rejected": [user("Hi"), assistant("Hello")]}
    assert load_comparisons(write_jsonl(tmp_path / "same.jsonl", [record])) == [
        Comparison([user("Hi")], ["Hello", "Hello"], [0, 1], source="dataset")
    ]


def test_parquet_from_another_tool_with_native_nested_types(tmp_path):
    """Hub-style Parquet: message lists as list<struct>, a missing field as null."""
    records = [
        {
            "prompt": [user("What color is the sky?")],
            "chosen": [assistant("It is blue.")],
            "rejected": [assistant("It is green.")],
            "reason": "accurate",
        },
        {"prompt": [user("Hi")], "chosen": [assistant("Hello")], "rejected": [assistant("Go away")], "reason": None},
    ]
    assert load_comparisons(write_parquet(tmp_path / "trl.parquet", records)) == [
        Comparison(
            [user("What color is the sky?")], ["It is blue.", "It is green."], [0, 1], reason="accurate", source="dataset"
        ),
        Comparison([user("Hi")], ["Hello", "Go away"], [0, 1], source="dataset"),
    ]


def test_one_file_may_mix_formats(tmp_path):
    records = [SEED[1], TRL_STRINGS[0], HH[0], RANKINGS[0], RLHFKIT[1]]
    expected = [SEED_EXPECTED[1], TRL_STRINGS_EXPECTED[0], HH_EXPECTED[0], RANKINGS_EXPECTED[0], RLHFKIT_EXPECTED[1]]
    assert load_comparisons(write_jsonl(tmp_path / "mixed.jsonl", records)) == expected


# ---------------------------------------------------------------------------
# Ties and rankings
# ---------------------------------------------------------------------------


def test_tie_gives_one_half_probability_pair(tmp_path):
    (_, _, tie) = load_comparisons(write_jsonl(tmp_path / "seed.jsonl", SEED))
    assert tie.tie and tie.pairs() == [(0, 1, 0.5)]


def test_three_way_ranking_expands_to_three_ordered_pairs(tmp_path):
    (prime, color) = load_comparisons(write_jsonl(tmp_path / "r.jsonl", RANKINGS))
    # ranking [1, 2, 0]: "7" > "2" > "4".
    assert prime.pairs() == [(1, 2, 1.0), (1, 0, 1.0), (2, 0, 1.0)]
    assert (prime.chosen, prime.rejected) == ("7", "4")
    assert color.pairs() == [(0, 1, 1.0), (0, 2, 1.0), (1, 2, 1.0)]


def test_trl_save_expands_rankings_to_all_pairs(tmp_path):
    path = tmp_path / "out.jsonl"
    save_comparisons(path, [RANKINGS_EXPECTED[0]], "trl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("7", "2"), ("7", "4"), ("2", "4")]
    assert all(r["prompt"] == "Name a prime." and r["reason"] == "7 and 2 are prime" for r in rows)
    assert load_comparisons(path) == [
        Comparison("Name a prime.", [c, r], [0, 1], reason="7 and 2 are prime", source="dataset")
        for c, r in [("7", "2"), ("7", "4"), ("2", "4")]
    ]


def test_trl_save_rejects_ties_unless_skipped(tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match="comparison 2 is a tie"):
        save_comparisons(path, SEED_EXPECTED, "trl")
    assert not path.exists()
    save_comparisons(path, SEED_EXPECTED, "trl", skip_ties=True)
    assert load_comparisons(path) == [
        Comparison("2+2?", ["4", "5"], [0, 1], reason="correct", source="dataset"),
        Comparison("Capital of France?", ["Paris", "Lyon"], [0, 1], source="dataset"),
    ]


def test_seed_save_rejects_more_than_two_responses(tmp_path):
    with pytest.raises(ValueError, match="comparison 1 ranks 3 responses"):
        save_comparisons(tmp_path / "out.jsonl", [SEED_EXPECTED[0], RANKINGS_EXPECTED[0]], "seed")


def test_unknown_save_format(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'hh'"):
        save_comparisons(tmp_path / "out.jsonl", SEED_EXPECTED, "hh")


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("name, records, expected, save_format", FORMATS, ids=FORMAT_IDS)
def test_round_trip_in_the_same_format(tmp_path, suffix, name, records, expected, save_format):
    loaded = load_comparisons(write_jsonl(tmp_path / f"{name}.jsonl", records))
    out = tmp_path / f"out{suffix}"
    save_comparisons(out, loaded, save_format)
    assert load_comparisons(out) == loaded == expected


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("name, records, expected, _", FORMATS, ids=FORMAT_IDS)
def test_round_trip_through_rlhfkit_format(tmp_path, suffix, name, records, expected, _):
    out = tmp_path / f"out{suffix}"
    save_comparisons(out, load_comparisons(write_jsonl(tmp_path / f"{name}.jsonl", records)))
    assert load_comparisons(out) == expected


def test_rlhfkit_format_keeps_every_field(tmp_path):
    path = tmp_path / "out.jsonl"
    save_comparisons(path, RLHFKIT_EXPECTED)
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {
        "prompt": [user("Hi")],
        "responses": ["Hello", "Hey"],
        "ranking": [1, 0],
        "tie": False,
        "reason": "warmer",
        "source": "",
        "meta": {"order": [1, 0], "temperature": 0.7},
    }


def test_seed_save_writes_the_seed_fields(tmp_path):
    path = tmp_path / "out.jsonl"
    save_comparisons(path, SEED_EXPECTED, "seed")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[1] == {
        "prompt": "Capital of France?",
        "response_a": "Lyon",
        "response_b": "Paris",
        "preferred": "b",
        "reason": "",
        "source": "dataset",
    }
    assert rows[2]["preferred"] == "tie" and rows[2]["meta"] == {"seconds": 4.5}


def test_trl_save_of_chat_prompt_is_conversational(tmp_path):
    path = tmp_path / "out.jsonl"
    save_comparisons(path, TRL_IMPLICIT_EXPECTED[:1], "trl")
    assert json.loads(path.read_text()) == {
        "prompt": [user("What color is the sky?")],
        "chosen": [assistant("It is blue.")],
        "rejected": [assistant("It is green.")],
        "reason": "",
        "source": "dataset",
    }


def test_empty_list_round_trips(tmp_path):
    for suffix in (".jsonl", ".json", ".parquet"):
        save_comparisons(tmp_path / f"empty{suffix}", [])
        assert load_comparisons(tmp_path / f"empty{suffix}") == []


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out.parquet"
    save_comparisons(path, SEED_EXPECTED)
    with pytest.raises(ValueError, match="is a tie"):
        save_comparisons(path, SEED_EXPECTED, "trl")
    assert load_comparisons(path) == SEED_EXPECTED  # the failed save left the old file alone
    assert os.listdir(tmp_path) == ["out.parquet"]


def test_parquet_cannot_mix_string_and_chat_prompts(tmp_path):
    with pytest.raises(ValueError, match="field 'prompt'.*save as .jsonl"):
        save_comparisons(tmp_path / "out.parquet", [SEED_EXPECTED[0], RLHFKIT_EXPECTED[0]])
    assert os.listdir(tmp_path) == []


def test_dict_helpers_round_trip():
    for comparison in SEED_EXPECTED + RANKINGS_EXPECTED + RLHFKIT_EXPECTED:
        assert comparison_from_dict(comparison_to_dict(comparison)) == comparison
    with pytest.raises(DataError, match=r"^<dict>: field 'preferred': missing$"):
        comparison_from_dict({"prompt": "p", "response_a": "a", "response_b": "b"})


# ---------------------------------------------------------------------------
# Errors: file, line and field in every message
# ---------------------------------------------------------------------------

GOOD = SEED[0]
BAD = [
    # (record, field, part of the problem)
    (
        {"prompt": "p", "response_a": "a", "response_b": "b", "preferred": "c"},
        "preferred",
        "preferred must be 'a', 'b' or 'tie', got 'c'",
    ),
    # unhashable values: `in _PREFERRED_RANKING` raised TypeError
    (
        {"prompt": "p", "response_a": "a", "response_b": "b", "preferred": ["a"]},
        "preferred",
        "preferred must be 'a', 'b' or 'tie', got a list",
    ),
    (
        {"prompt": "p", "response_a": "a", "response_b": "b", "preferred": {"a": 1}},
        "preferred",
        "preferred must be 'a', 'b' or 'tie', got a dict",
    ),
    ({"prompt": "p", "response_a": "a", "response_b": "b"}, "preferred", "missing"),
    ({"prompt": "p", "response_a": "a", "preferred": "a"}, "response_b", "missing"),
    ({"prompt": "p", "response_a": "  ", "response_b": "b", "preferred": "a"}, "response_a", "empty"),
    ({"prompt": "p", "response_a": 3, "response_b": "b", "preferred": "a"}, "response_a", "expected a string, got int"),
    ({"response_a": "a", "response_b": "b", "preferred": "a"}, "prompt", "missing"),
    ({"prompt": 7, "chosen": "a", "rejected": "b"}, "prompt", "expected a string or a list of messages"),
    ({"prompt": [user("q"), assistant("a")], "chosen": "x", "rejected": "y"}, "prompt[1].role", "must end with a user turn"),
    (
        {"prompt": [{"role": "bot", "content": "q"}], "chosen": "x", "rejected": "y"},
        "prompt[0].role",
        "expected one of system, user, assistant",
    ),
    ({"prompt": "p", "rejected": "b"}, "chosen", "missing"),
    ({"prompt": "p", "chosen": 1.5, "rejected": "b"}, "chosen", "expected a string or a list of messages"),
    (
        {"prompt": "p", "chosen": [user("other"), assistant("a")], "rejected": [assistant("b")]},
        "chosen",
        "neither empty nor a copy of the prompt",
    ),
    ({"prompt": "p", "chosen": [assistant("a")], "rejected": [user("b")]}, "rejected[0].role", "must be an assistant turn"),
    ({"prompt": "p", "chosen": [assistant("")], "rejected": [assistant("b")]}, "chosen[0].content", "empty assistant turn"),
    ({"chosen": [user("q1"), assistant("a")], "rejected": [user("q2"), assistant("b")]}, "rejected", "no common prefix"),
    (
        {
            "chosen": [user("q"), assistant("a"), user("q2"), assistant("x")],
            "rejected": [user("q"), assistant("a"), user("q3"), assistant("y")],
        },
        "rejected",
        "must end with a user turn",
    ),
    ({"chosen": [user("q"), assistant("a")], "rejected": "b"}, "rejected", "expected a list of messages"),
    ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, "chosen", "without an 'Assistant:' turn"),
    (
        {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hey\n\nAssistant: yo"},
        "rejected",
        "differ from those in 'chosen'",
    ),
    (
        {"chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok", "rejected": "\n\nHuman: hi\n\nAssistant: yo"},
        "chosen",
        "must end with the 'Assistant:' turn",
    ),
    ({"chosen": "\n\nHuman: hi\n\nAssistant:  ", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}, "chosen", "empty response"),
    (
        {"chosen": "hello\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
        "chosen",
        "text before its first 'Human:' turn",
    ),
    ({"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"}, "chosen", "no prompt turns"),
    (
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]},
        "ranking",
        "ranking [0, 0, 1] is not a permutation of 0..2",
    ),
    ({"prompt": "p", "responses": ["a", "b"]}, "ranking", "missing"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [True, False]}, "ranking", "integer indices"),
    ({"prompt": "p", "ranking": [0, 1]}, "responses", "missing"),
    ({"prompt": "p", "responses": ["a"], "ranking": [0]}, "responses", "at least 2"),
    ({"prompt": "p", "responses": ["a", ""], "ranking": [0, 1]}, "responses[1]", "empty response"),
    ({"prompt": "p", "responses": ["a", 2], "ranking": [0, 1]}, "responses[1]", "expected a string"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2], "tie": True}, "tie", "only defined for 2 responses"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "tie": "yes"}, "tie", "expected true or false"),
    ({"prompt": "p", "ranked": "a"}, "ranked", "at least 2"),
    (
        {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "chosen": "a"},
        "chosen",
        "different preference format than field 'responses'",
    ),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "tie": True}, "chosen", "different preference format than field 'tie'"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "meta": "x"}, "meta", "expected an object"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "reason": 5}, "reason", "expected a string"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "source": None}, "source", "expected a string"),
]


@pytest.mark.parametrize("record, field, problem", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_record_names_file_line_and_field(tmp_path, record, field, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, record])
    with pytest.raises(DataError) as info:
        load_comparisons(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: field '{field}': ")
    assert problem in message
    assert (info.value.line, info.value.field) == (3, field)


def test_unrecognised_record(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, {"prompt": "p", "answer": "a"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: unrecognised preference record"):
        load_comparisons(path)


def test_json_list_error_reports_the_line_of_the_record(tmp_path):
    path = tmp_path / "bad.json"
    bad = {"prompt": "p", "response_a": "a", "response_b": "b", "preferred": "x"}
    # line 1 "[", lines 2-3 good records, line 4 the bad one.
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in [GOOD, GOOD, bad]) + "\n]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:4: field 'preferred': preferred must be"):
        load_comparisons(path)


def test_parquet_error_reports_the_row_number(tmp_path):
    records = [dict(GOOD), dict(GOOD), dict(GOOD, preferred="x")]
    path = write_parquet(tmp_path / "bad.parquet", records)
    with pytest.raises(DataError, match=r"bad\.parquet:3: field 'preferred': preferred must be 'a', 'b' or 'tie'"):
        load_comparisons(path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="nope.parquet: file not found"):
        load_comparisons(tmp_path / "nope.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet file"):
        load_comparisons(tmp_path / "junk.parquet")


def test_best_worst_keeps_one_pair_per_ranking_first_against_last():
    from rlhfkit.data.pairwise import tokenize_pairs
    from rlhfkit.data.records import Comparison
    from rlhfkit.modeling import models

    tok = models.load_tokenizer("tiny")
    comps = [
        Comparison(prompt="p", responses=["a a", "b b", "c c", "d d"], ranking=[2, 0, 3, 1]),
        Comparison(prompt="q", responses=["x", "y"], ranking=[1, 0]),
        Comparison(prompt="r", responses=["s", "t"], ranking=[0, 1], tie=True),
    ]
    every, stats = tokenize_pairs(tok, comps, max_length=64)
    assert stats.pairs == len(every) == 6 + 1 + 1
    best, stats = tokenize_pairs(tok, comps, max_length=64, ranking_pairs="best_worst")
    assert stats.pairs == len(best) == 3
    want = [e for e in every if e["chosen_input_ids"] == every[0]["chosen_input_ids"]]  # response 2 is best
    # the kept pair of the 4-way ranking: response 2 (first) over response 1 (last)
    last = [e for e in every if e["rejected_input_ids"] == every[5]["rejected_input_ids"]]
    assert best[0]["chosen_input_ids"] == want[0]["chosen_input_ids"]
    assert best[0]["rejected_input_ids"] == last[0]["rejected_input_ids"] == every[2]["rejected_input_ids"]
    assert best[1:] == every[6:]


def test_parquet_meta_nested_too_deeply_or_with_a_huge_integer(tmp_path):
    """meta is a JSON string in Parquet; decoding it raised RecursionError / ValueError (int digit limit)."""
    for meta, problem in (
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"v": ' + "9" * 5000 + "}", "integer too long"),
    ):
        path = write_parquet(tmp_path / "meta.parquet", [dict(GOOD, meta="{}"), dict(GOOD, meta=meta)])
        with pytest.raises(DataError) as info:
            load_comparisons(path)
        assert (info.value.line, info.value.field) == (2, "meta") and problem in str(info.value)


def test_empty_preference_file_is_a_data_error_naming_it(tmp_path):
    """load_pair_splits (reward and DPO data) raised ValueError, which the CLI does not print as one clean line."""
    from rlhfkit.data.pairwise import load_pair_splits
    from rlhfkit.modeling import models

    tok = models.load_tokenizer("tiny")
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    kwargs = dict(eval_data="", eval_fraction=0.1, seed=0, max_length=64, chat_template=True, keep_ties=True, stage="dpo")
    with pytest.raises(DataError) as info:
        load_pair_splits(tok, str(path), **kwargs)
    assert info.value.path == str(path) and "no comparisons" in str(info.value)
    # one comparison, held out by the default eval_fraction: say so, not "max_length"
    write_jsonl(path, [GOOD])
    with pytest.raises(DataError, match=r"all 1 comparison\(s\) went to the held-out split"):
        load_pair_splits(tok, str(path), **kwargs)
    # only a tie, which DPO skips (held-out data from its own file)
    write_jsonl(path, [dict(GOOD, preferred="tie")])
    held = write_jsonl(tmp_path / "held.jsonl", [GOOD])
    with pytest.raises(DataError, match="1 are ties, which dpo skips"):
        load_pair_splits(tok, str(path), **dict(kwargs, eval_data=str(held), keep_ties=False))


# ---------------------------------------------------------------------------
# Tied pairs inside a ranking (K > 2)
# ---------------------------------------------------------------------------


def test_a_rankings_tied_pairs_get_one_half_and_round_trip(tmp_path):
    # "b" and "c" tied (their order in the ranking means nothing), "a" best.
    tied = Comparison("q", ["a", "b", "c", "d"], [0, 2, 1, 3], ties=[(2, 1)])
    assert tied.ties == [(1, 2)]  # stored sorted
    assert tied.pairs() == [(0, 2, 1.0), (0, 1, 1.0), (0, 3, 1.0), (2, 1, 0.5), (2, 3, 1.0), (1, 3, 1.0)]
    assert not tied.extremes_tied
    assert Comparison("q", ["a", "b", "c"], [2, 0, 1], ties=[(1, 2)]).extremes_tied
    record = comparison_to_dict(tied)
    assert record["ties"] == [[1, 2]]
    assert "ties" not in comparison_to_dict(Comparison("q", ["a", "b", "c"], [0, 1, 2]))  # old files keep their bytes
    path = tmp_path / "out.jsonl"
    save_comparisons(path, [tied])
    assert load_comparisons(path) == [tied]


@pytest.mark.parametrize(
    "ties, k, message",
    [
        ("no", 3, "field 'ties': expected a list of \\[i, j\\] index pairs, got str"),
        ([[0, 3]], 3, "field 'ties\\[0\\]': expected two different indices into 'responses' \\(0..2\\), got \\[0, 3\\]"),
        ([[1, 1]], 3, "field 'ties\\[0\\]': expected two different indices"),
        ([[0, True]], 3, "field 'ties\\[0\\]': expected two different indices"),
        ([[0, 1], [1, 0]], 3, "field 'ties\\[1\\]': names the pair \\[0, 1\\] twice"),
        ([[0, 1]], 2, "field 'ties': ties is for rankings of more than 2 responses; a pair uses 'tie': true"),
    ],
)
def test_bad_ties_name_the_file_line_and_field(tmp_path, ties, k, message):
    good = {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]}
    bad = {"prompt": "q", "responses": ["a", "b", "c"][:k], "ranking": list(range(k)), "ties": ties}
    path = write_jsonl(tmp_path / "r.jsonl", [good, bad])
    with pytest.raises(DataError, match=f"r.jsonl:2: {message}"):
        load_comparisons(path)


def test_trl_save_leaves_out_a_rankings_tied_pairs_only_when_asked(tmp_path):
    tied = Comparison("q", ["a", "b", "c"], [0, 1, 2], ties=[(1, 2)])
    path = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=r"comparison 0 ranks tied responses \[\[1, 2\]\]"):
        save_comparisons(path, [tied], "trl")
    assert not path.exists()
    save_comparisons(path, [tied], "trl", skip_ties=True)
    assert [(c.chosen, c.rejected) for c in load_comparisons(path)] == [("a", "b"), ("a", "c")]


def test_split_holdout_grows_to_min_held_in_the_same_order_up_to_its_cap():
    from rlhfkit.data.io import split_holdout

    items = list(range(40))
    weight = {i: (0 if i % 2 else 3) for i in items}.__getitem__  # odd items weigh nothing (all ties)
    train, held = split_holdout(items, 0.1, seed=3)
    assert len(held) == 4 and sorted(train + held) == items
    assert split_holdout(items, 0.1, seed=3, min_held=0, weight=weight) == (train, held)
    grown_train, grown = split_holdout(items, 0.1, seed=3, min_held=15, weight=weight, max_fraction=0.5)
    assert set(held) <= set(grown) and sorted(grown_train + grown) == items  # extends the 10% split
    assert sum(map(weight, grown)) >= 15 and len(grown) < 20
    # The smallest extension: without its last-added item (in the shuffled order) the weight falls short.
    import random

    order = list(range(40))
    random.Random(3).shuffle(order)
    assert set(grown) == set(order[: len(grown)]) and sum(weight(i) for i in order[: len(grown) - 1]) < 15
    # Capped at max_fraction (a quarter by default) when min_held cannot be met.
    _, capped = split_holdout(items, 0.1, seed=3, min_held=10_000, weight=weight)
    assert len(capped) == 10 and set(capped) == set(order[:10])
    _, half = split_holdout(items, 0.1, seed=3, min_held=10_000, weight=weight, max_fraction=0.5)
    assert len(half) == 20
    assert split_holdout(items, 0.0, seed=3, min_held=15, weight=weight) == (items, [])  # 0: no held-out split at all


def test_strict_pair_count_leaves_ties_out():
    from rlhfkit.data.pairwise import strict_pair_count

    four = Comparison(prompt="p", responses=["a", "b", "c", "d"], ranking=[2, 0, 3, 1], ties=[(0, 2), (1, 3)])
    assert strict_pair_count(four) == 6 - 2
    assert strict_pair_count(Comparison(prompt="p", responses=["a", "b"], ranking=[1, 0])) == 1
    assert strict_pair_count(Comparison(prompt="p", responses=["a", "b"], ranking=[0, 1], tie=True)) == 0


def test_reward_splits_hold_out_enough_strict_pairs_when_labels_tie(tmp_path, caplog):
    """A ranking file whose every other comparison is all ties: eval_min_pairs grows the held-out split past
    eval_fraction until it has that many strict pairs; the log says so."""
    import logging

    from rlhfkit.modeling import models
    from rlhfkit.reward import RewardConfig, load_splits, reward_tokenizer

    rows = []
    for i in range(40):
        responses = [f"answer {i} {k}" for k in range(4)]
        ties = [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]] if i % 2 else []
        rows.append({"prompt": f"question {i}?", "responses": responses, "ranking": [0, 1, 2, 3], "ties": ties})
    data = tmp_path / "ranked.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = reward_tokenizer(models.TINY)

    def held_pairs(**fields) -> tuple[int, int]:
        config = RewardConfig(model=models.TINY, data=str(data), eval_fraction=0.1, seed=1, max_length=64, **fields)
        _, held = load_splits(config, tokenizer)
        return len(held), sum(1 for ex in held for *_, target in ex["pairs"] if target == 1.0)

    n, strict = held_pairs()
    assert n == 4 and strict < 12
    with caplog.at_level(logging.INFO, logger="rlhfkit"):
        n, strict = held_pairs(eval_min_pairs=12)
    assert 4 < n < 10 and 12 <= strict < 18  # the first comparison that reaches 12 ends it (6 strict pairs each)
    assert f"{n} comparisons held out" in caplog.text and "min_heldout_pairs=12" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rlhfkit"):
        assert held_pairs(eval_min_pairs=1000)[0] == 10  # a quarter of the 40 comparisons at most
    assert "fewer than min_heldout_pairs=1000" in caplog.text
    from rlhfkit.config import ConfigError
    from rlhfkit.reward import train

    with pytest.raises(ConfigError, match="eval_min_pairs must be >= 0"):
        train(RewardConfig(model=models.TINY, data=str(data), output_dir=str(tmp_path / "out"), eval_min_pairs=-1))
    assert not (tmp_path / "out").exists()
